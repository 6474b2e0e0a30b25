"""Fine-tuning settings: one typed dataclass whose field help becomes the CLI's help."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ftrecycle.errors import ConfigError


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class FinetuneConfig:
    """Hyperparameters of one fine-tuning run. Defaults follow the paper (open-instruct's SFT recipe)."""

    max_steps: int = _f(-1, "optimizer steps; -1 trains for --epochs instead")
    epochs: float = _f(2.0, "passes over the data when --max-steps is -1")
    batch_size: int = _f(8, "examples per device per step")
    grad_accum: int = _f(1, "gradient accumulation steps")
    learning_rate: float = _f(5e-6, "peak learning rate (AdamW, linear decay)")
    warmup_ratio: float = _f(0.03, "fraction of steps of linear warm-up")
    weight_decay: float = _f(0.0, "AdamW weight decay; never applied to embeddings, biases or norms")
    max_length: int = _f(2048, "longest tokenized example; longer ones are cut on the right")
    seed: int = _f(42, "seed of initialisation-free randomness: data order, dropout (off)")
    save_every: int = _f(500, "checkpoint every N steps, for --resume")
    logging_every: int = _f(10, "log the loss every N steps")
    eval_every: int = _f(0, "with --eval-data: evaluate every N steps (0: only before and after)")
    eval_batch_size: int = _f(64, "prompts per generation batch in evaluation")
    eval_max_new_tokens: int = _f(256, "most generated tokens per evaluation item")
    eval_shots: int = _f(0, "few-shot examples (taken from the training data) in evaluation prompts")
    bf16: str = _f("auto", "bf16 mixed precision: auto (on when a GPU supports it), on, off")
    gradient_checkpointing: bool = _f(False, "trade compute for memory")

    def validate(self) -> FinetuneConfig:
        """Check ranges.

        Raises:
            ConfigError: a value out of range.
        """
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"--max-steps must be positive or -1, got {self.max_steps}")
        for name in ("batch_size", "grad_accum", "max_length", "save_every", "logging_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0 or self.epochs <= 0:
            raise ConfigError("--learning-rate and --epochs must be positive")
        if self.bf16 not in ("auto", "on", "off"):
            raise ConfigError(f"--bf16 must be auto, on or off, got {self.bf16!r}")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "config") -> FinetuneConfig:
        """Build from a mapping (a YAML section), refusing unknown keys.

        Raises:
            ConfigError: an unknown key or a wrong type.
        """
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(
                f"{where}: unknown fine-tuning setting(s) {', '.join(unknown)}; known: {', '.join(known)}"
            )
        try:
            values = {k: type(getattr(cls(), k))(v) for k, v in data.items()}
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from e
        return cls(**values).validate()
