"""Fine-tuning settings: one typed dataclass whose field help and range become the CLI's help and check.

Its fields are declared like the transfer options (:func:`ftrecycle.options.option`) and checked by the
same function (:func:`ftrecycle.options.check_value`), when :meth:`FinetuneConfig.validate` is called
(a config is built from parsed flags or a file and checked once, where it enters).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from ftrecycle.errors import ConfigError
from ftrecycle.options import (
    MAX_COUNT,
    NONNEGATIVE_INT,
    POSITIVE_INT,
    SEED,
    TOKENS,
    Bound,
    check_value,
    flag_of,
    option,
)

BF16_CHOICES = ("auto", "on", "off")
_BATCH = Bound(int, lo=1, hi=65536)
# transformers' scheduler names that need no extra arguments
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
REPORT_TO = ("none", "tensorboard")
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def _targets(value: Any, name: str) -> str:
    """``--lora-targets``: comma-separated module names (a YAML list is accepted too); empty: found in the model."""
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be comma-separated module names, got a {type(value).__name__}")
    parts = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in parts if not _MODULE_NAME.fullmatch(v)]
    if bad:
        raise ConfigError(f"{name}: {bad[0]!r:.60} is not a module name (e.g. q_proj,v_proj)")
    return ",".join(parts)


def flag_name(name: str) -> str:
    """The command-line flag of a setting: ``learning_rate`` -> ``--learning-rate``.

    Raises:
        KeyError: ``name`` is not a fine-tuning setting.
    """
    return flag_of(_FIELDS[name])


@dataclass
class FinetuneConfig:
    """Hyperparameters of one fine-tuning run. Defaults follow the paper (open-instruct's SFT recipe)."""

    max_steps: int = option(
        -1, "optimizer steps; -1 trains for --epochs instead", bound=Bound(int, 1, MAX_COUNT, also=(-1,))
    )
    epochs: float = option(2.0, "passes over the data when --max-steps is -1", bound=Bound(float, 0, 1e6, lo_open=True))
    batch_size: int = option(8, "examples per device per step", bound=_BATCH)
    grad_accum: int = option(1, "gradient accumulation steps", bound=_BATCH)
    learning_rate: float = option(
        5e-6,
        "peak learning rate (AdamW; decayed by --lr-scheduler; LoRA usually wants 1e-4 to 1e-3)",
        bound=Bound(float, 0, 1, lo_open=True),
    )
    warmup_ratio: float = option(0.03, "fraction of steps of linear warm-up", bound=Bound(float, 0, 1, hi_open=True))
    weight_decay: float = option(
        0.0, "AdamW weight decay; never applied to embeddings, biases or norms", bound=Bound(float, 0, 1)
    )
    max_length: int = option(
        2048, "longest tokenized example; longer ones are cut on the right", bound=Bound(int, 1, 2**20)
    )
    seed: int = option(42, "seed of initialisation-free randomness: data order, dropout (off)", bound=SEED)
    save_every: int = option(500, "checkpoint every N steps, for --resume", bound=POSITIVE_INT)
    logging_every: int = option(10, "log the loss every N steps", bound=POSITIVE_INT)
    eval_every: int = option(
        0, "with --eval-data: evaluate every N steps (0: only before and after)", bound=NONNEGATIVE_INT
    )
    eval_batch_size: int = option(64, "prompts per generation batch in evaluation", bound=_BATCH)
    eval_max_new_tokens: int = option(256, "most generated tokens per evaluation item", bound=TOKENS)
    eval_shots: int = option(
        0, "few-shot examples (taken from the training data) in evaluation prompts", bound=Bound(int, 0, 1024)
    )
    bf16: str = option("auto", "bf16 mixed precision: auto (on when a GPU supports it), on, off", choices=BF16_CHOICES)
    gradient_checkpointing: bool = option(False, "trade compute for memory")
    lr_scheduler: str = option(
        "linear", "learning-rate schedule after warm-up (transformers' names)", choices=LR_SCHEDULERS
    )
    report_to: str = option(
        "none", "where training metrics go: none, or tensorboard (offline event files in OUT/runs)", choices=REPORT_TO
    )
    lora: bool = option(False, "train a LoRA adapter instead of every weight (output: a PEFT adapter directory)")
    lora_rank: int = option(16, "LoRA rank r", bound=Bound(int, 1, 4096))
    lora_alpha: int = option(
        32, "LoRA scaling numerator (the update is scaled by alpha / rank)", bound=Bound(int, 1, 1 << 20)
    )
    lora_targets: str = option(
        "",
        "comma-separated module names to adapt; empty: every linear layer of the blocks (attention, MLP)",
        check=_targets,
    )
    lora_dropout: float = option(0.0, "dropout on the LoRA input (seeded)", bound=Bound(float, 0, 1, hi_open=True))
    qlora: bool = option(False, "LoRA on a 4-bit NF4 base (implies --lora; needs bitsandbytes and a CUDA GPU)")
    merge: bool = option(
        False, "with --lora: write the start model with the adapter merged in (a full model) instead of the adapter"
    )

    def validate(self) -> FinetuneConfig:
        """Check every value's type and range (the bounds declared with each field).

        Raises:
            ConfigError: a value of the wrong type or out of range, naming its flag.
        """
        for f in fields(self):
            setattr(self, f.name, check_value(f, getattr(self, f.name)))
        if self.qlora:
            self.lora = True  # QLoRA is LoRA on a quantized base
        if self.merge and not self.lora:
            raise ConfigError("--merge applies to --lora (a full fine-tune is already a full model)")
        if self.merge and self.qlora:
            raise ConfigError("--merge with --qlora would merge into a 4-bit base; train with --lora, or merge later")
        return self

    def key(self) -> dict[str, Any]:
        """The settings as they key a run (resume check, chain and lab caches).

        A setting added after runs were keyed is left out while it has its default, so those runs keep their keys.
        """
        return {k: v for k, v in asdict(self).items() if not (k in _LATER and v == _FIELDS[k].default)}

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
            close = difflib.get_close_matches(unknown[0].replace("-", "_"), list(known), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"{where}: unknown fine-tuning setting(s) {', '.join(unknown)}{hint}; known: {', '.join(known)}"
            )
        try:
            values = {k: check_value(known[k], v) for k, v in data.items()}
            return cls(**values).validate()
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e


_FIELDS = {f.name: f for f in fields(FinetuneConfig)}
_LATER = frozenset(
    ("lr_scheduler", "report_to", "lora", "lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "qlora", "merge")
)
