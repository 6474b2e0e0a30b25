"""Fine-tuning settings: one typed dataclass whose field help and range become the CLI's help and check."""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any

from ftrecycle.errors import ConfigError
from ftrecycle.options import (
    MAX_COUNT,
    NONNEGATIVE_INT,
    POSITIVE_INT,
    SEED,
    TOKENS,
    Bound,
)

BF16_CHOICES = ("auto", "on", "off")
_BATCH = Bound(int, lo=1, hi=65536)


def _f(default: Any, help: str, bound: Bound | None = None, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "bound": bound, "choices": choices})


def flag_name(name: str) -> str:
    """The command-line flag of a setting: ``learning_rate`` -> ``--learning-rate``."""
    return "--" + name.replace("_", "-")


@dataclass
class FinetuneConfig:
    """Hyperparameters of one fine-tuning run. Defaults follow the paper (open-instruct's SFT recipe)."""

    max_steps: int = _f(-1, "optimizer steps; -1 trains for --epochs instead", Bound(int, 1, MAX_COUNT, also=(-1,)))
    epochs: float = _f(2.0, "passes over the data when --max-steps is -1", Bound(float, 0, 1e6, lo_open=True))
    batch_size: int = _f(8, "examples per device per step", _BATCH)
    grad_accum: int = _f(1, "gradient accumulation steps", _BATCH)
    learning_rate: float = _f(5e-6, "peak learning rate (AdamW, linear decay)", Bound(float, 0, 1, lo_open=True))
    warmup_ratio: float = _f(0.03, "fraction of steps of linear warm-up", Bound(float, 0, 1, hi_open=True))
    weight_decay: float = _f(
        0.0, "AdamW weight decay; never applied to embeddings, biases or norms", Bound(float, 0, 1)
    )
    max_length: int = _f(2048, "longest tokenized example; longer ones are cut on the right", Bound(int, 1, 2**20))
    seed: int = _f(42, "seed of initialisation-free randomness: data order, dropout (off)", SEED)
    save_every: int = _f(500, "checkpoint every N steps, for --resume", POSITIVE_INT)
    logging_every: int = _f(10, "log the loss every N steps", POSITIVE_INT)
    eval_every: int = _f(0, "with --eval-data: evaluate every N steps (0: only before and after)", NONNEGATIVE_INT)
    eval_batch_size: int = _f(64, "prompts per generation batch in evaluation", _BATCH)
    eval_max_new_tokens: int = _f(256, "most generated tokens per evaluation item", TOKENS)
    eval_shots: int = _f(
        0, "few-shot examples (taken from the training data) in evaluation prompts", Bound(int, 0, 1024)
    )
    bf16: str = _f("auto", "bf16 mixed precision: auto (on when a GPU supports it), on, off", choices=BF16_CHOICES)
    gradient_checkpointing: bool = _f(False, "trade compute for memory")

    def validate(self) -> FinetuneConfig:
        """Check every value's type and range (the bounds declared with each field).

        Raises:
            ConfigError: a value of the wrong type or out of range, naming its flag.
        """
        for f in fields(self):
            setattr(self, f.name, check_setting(f, getattr(self, f.name)))
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "config") -> FinetuneConfig:
        """Build from a mapping (a YAML section), refusing unknown keys.

        Raises:
            ConfigError: an unknown key, a wrong type or a value out of range.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got a {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(str(k) for k in set(data) - set(known))
        if unknown:
            raise ConfigError(
                f"{where}: unknown fine-tuning setting(s) {', '.join(unknown)}; known: {', '.join(known)}"
            )
        try:
            values = {k: check_setting(known[k], v) for k, v in data.items()}
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e
        return cls(**values)


def check_setting(f: Field[Any], value: Any) -> Any:
    """One setting's value, checked against its field's declared type, bound or choices.

    Raises:
        ConfigError: naming the setting's flag and what it must be.
    """
    name = flag_name(f.name)
    bound: Bound | None = f.metadata.get("bound")
    choices: tuple[str, ...] | None = f.metadata.get("choices")
    if bound is not None:
        return bound.check(value, name)
    if choices is not None:
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value
    if f.type in (bool, "bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    return value
