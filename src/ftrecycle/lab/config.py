"""The lab's settings: one typed dataclass and the named presets the CLI offers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ftrecycle.codecs import parse_compression
from ftrecycle.errors import ConfigError
from ftrecycle.lab.pretrain import ModelSpec, PretrainSpec

#: experiment (g): each method that takes a ``ratio``, and the sizes (times smaller than the dense bf16 delta)
#: it is run at: the issue's 4, 8, 16 and 32x, and 10x because a ``ratio`` sizes the matrices' parts while
#: finding 5 measures the files — the 1-D tensors, per-part headers and scales take the rest (on the tiny
#: model, ratio=8 stores 7.3-7.9x smaller files); signlr's sign bit alone is 16x (its low-rank part gets
#: nothing there). ``auto``: the size budget, each tensor's method chosen by rate-distortion.
RATIOS: dict[str, tuple[int, ...]] = {
    "lowrank": (4, 8, 10, 16, 32),
    "sparse": (4, 8, 10, 16, 32),
    "mpsvd": (4, 8, 10, 16, 32),
    "signlr": (4, 8),
    "auto": (4, 8, 10, 16, 32),
}
#: a (g) setting with this suffix is calibrated (``ftrecycle calibrate``, BitDelta's scale distillation) on the
#: fine-tuning set after it is compressed
CALIBRATED = "+cal"
#: experiment (g): Δ stored dense bf16, losslessly, by each fixed-rate codec, by each ratio method at each of
#: RATIOS, and three settings calibrated
COMPRESSIONS: tuple[str, ...] = (
    "none",
    "lossless",
    "int8",
    "kbit:bits=4",
    "kbit:bits=3",
    "kbit:bits=2",
    "sign",
    "sign:axis=row",
    *(f"{m}:ratio={r}" for m, ratios in RATIOS.items() for r in ratios),
    "sign:axis=row" + CALIBRATED,
    "kbit:bits=2" + CALIBRATED,
    "auto:ratio=8" + CALIBRATED,
)
#: experiment (i): the labelled examples (the first training problems) the gradient-sign mask is computed on:
#: GradFix's "tens", at two sizes
MASK_EXAMPLES: tuple[int, ...] = (16, 64)
#: and at these N also with the mask a majority vote of the examples' own signs (GradFix's few-sample
#: estimator, ``ftrecycle mask --vote majority``) instead of the sign of their summed gradient
MASK_MAJORITY: tuple[int, ...] = (64,)
#: experiment (h)'s default: every (g) setting but dense and the calibrated ones
SWEEP_COMPRESSIONS = tuple(c for c in COMPRESSIONS if c != "none" and not c.endswith(CALIBRATED))


@dataclass(frozen=True)
class LabConfig:
    """Everything that decides a lab run's numbers (its cache is valid only for the same config).

    Attributes:
        preset: the preset this config came from.
        model: model size.
        pretrain: the two pretraining stages.
        train_items: fine-tuning problems (GSM8K format).
        test_items: held-out test problems; each accuracy is over all of them.
        ft_steps: fine-tuning steps of direct fine-tuning (experiment a).
        recycle_steps: steps of every recycling-then-fine-tuning run (c, d); (d)'s chain starts from (a)'s
            M*1 = FT(M1), passed to ``iterate`` as its ``finetuned`` model.
        ft_batch: fine-tuning batch size.
        ft_lr: peak learning rate (linear decay) of fine-tuning from a base (a, e).
        recycle_lr: peak learning rate of fine-tuning from Mj + Δi (c, d). Lower than ``ft_lr``: such a
            start already sits near a fine-tuned optimum, and ``ft_lr`` first knocks it out of it.
        warmup_ratio: fine-tuning warm-up share.
        eval_every: steps between accuracy evaluations during fine-tuning.
        language_items: training problems in the second language (experiment e).
        language_steps: fine-tuning steps on them.
        seeds: one full run per seed; tables show the mean and the spread.
        workers: fine-tuning and evaluation jobs run at once (each gets cores / workers threads).
        max_new_tokens: generation budget per test problem.
        sweep_lr_scales: experiment (h): multipliers of ``ft_lr`` at which M4 and M5 are fine-tuned directly
            (1.0 is (a)'s own ft-M4 and ft-M5, never run twice), so that ‖Δ‖/‖W‖ spans a range.
        sweep_compressions: experiment (h): ``diff --compress`` specs applied to each scale's stage-2 transfers
            (default: every uncalibrated setting of (g), :data:`SWEEP_COMPRESSIONS`).
        calibration_steps: experiment (g): Adam steps of ``ftrecycle calibrate`` for the ``+cal`` settings.
    """

    preset: str = "tiny"
    model: ModelSpec = field(default_factory=ModelSpec)
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)
    train_items: int = 4000
    test_items: int = 400
    ft_steps: int = 480
    recycle_steps: int = 160
    ft_batch: int = 16
    ft_lr: float = 1.1e-4
    recycle_lr: float = 1.1e-4
    warmup_ratio: float = 0.1
    eval_every: int = 80
    language_items: int = 2000
    language_steps: int = 160
    seeds: tuple[int, ...] = (0,)
    workers: int = 2
    max_new_tokens: int = 40
    sweep_lr_scales: tuple[float, ...] = (0.1, 1.0, 5.0)
    sweep_compressions: tuple[str, ...] = SWEEP_COMPRESSIONS
    calibration_steps: int = 200

    def validate(self) -> LabConfig:
        """Check ranges.

        Raises:
            ConfigError: a value out of range.
        """
        for name in (
            "calibration_steps",
            "train_items",
            "test_items",
            "ft_steps",
            "recycle_steps",
            "ft_batch",
            "eval_every",
            "language_items",
            "language_steps",
            "workers",
            "max_new_tokens",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"lab setting {name} must be at least 1, got {getattr(self, name)}")
        if not self.seeds:
            raise ConfigError("lab setting seeds must name at least one seed")
        if self.pretrain.stage1_steps < 3 or self.pretrain.stage2_steps < 2:
            raise ConfigError("pretraining needs at least 3 stage-1 and 2 stage-2 steps (five saved versions)")
        self._validate_sweep()
        return self

    def _validate_sweep(self) -> None:
        """Check experiment (h)'s settings.

        Raises:
            ConfigError: a scale that is not a positive number, a repeated scale or spec, or an empty spec.
        """
        scales = self.sweep_lr_scales
        if not scales or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0 for x in scales):
            raise ConfigError(f"lab setting sweep_lr_scales must be positive numbers, got {scales!r}")
        # job names carry the scale as %g: two scales with one name would share their models
        if len({f"{x:g}" for x in scales}) != len(scales):
            raise ConfigError(f"lab setting sweep_lr_scales repeats a scale: {scales!r}")
        specs = self.sweep_compressions
        if any(not isinstance(c, str) or not c.strip() for c in specs) or len(set(specs)) != len(specs):
            raise ConfigError(f"lab setting sweep_compressions must be distinct, non-empty specs, got {specs!r}")
        for c in specs:
            try:
                parse_compression(c.removesuffix(CALIBRATED))
            except ConfigError as e:
                raise ConfigError(f"lab setting sweep_compressions: {e}") from None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (recorded in results.json and used as the cache's key)."""
        d = asdict(self)
        d["seeds"] = list(self.seeds)
        d["sweep_lr_scales"] = list(self.sweep_lr_scales)
        d["sweep_compressions"] = list(self.sweep_compressions)
        return d


PRESETS: dict[str, LabConfig] = {
    # The README's main command, sized for a 2-core laptop: one seed within 15 minutes. Not two: one seed's
    # jobs add up to nearly that budget in seconds (docs/lab.md, "Where the time goes"), so two cannot fit.
    "tiny": LabConfig(),
    # The tiny run on three seeds with a larger test set: the spread behind each finding (CPU; three times the
    # tiny run's job seconds over the cores, at least).
    "small": LabConfig(preset="small", test_items=1000, seeds=(0, 1, 2)),
    # One GPU: a wider, deeper model, longer pretraining and fine-tuning, five seeds (not validated on CPU).
    "gpu": LabConfig(
        preset="gpu",
        model=ModelSpec(hidden=256, layers=4, heads=8, intermediate=1024),
        pretrain=PretrainSpec(stage1_steps=6000, stage2_steps=4500, batch=64, seq_len=128, lr=1e-3, stage2_lr=2e-4),
        train_items=20000,
        test_items=2000,
        ft_steps=1200,
        recycle_steps=600,
        ft_batch=32,
        ft_lr=4e-5,  # the tiny preset's ratio to the pretraining peak (about 1/25)
        recycle_lr=4e-5,
        eval_every=100,
        language_items=5000,
        language_steps=500,
        seeds=(0, 1, 2, 3, 4),
        workers=1,
    ),
    # Minimal step counts: exercises every stage in seconds (the CI test). Its numbers mean nothing.
    "smoke": LabConfig(
        preset="smoke",
        model=ModelSpec(hidden=32, layers=1, heads=2, intermediate=64),
        pretrain=PretrainSpec(stage1_steps=6, stage2_steps=4, batch=4, seq_len=32, warmup=2),
        train_items=64,
        test_items=16,
        ft_steps=4,
        recycle_steps=4,
        ft_batch=4,
        eval_every=2,
        language_items=32,
        language_steps=2,
        max_new_tokens=8,
        calibration_steps=4,
    ),
}


#: Presets whose reports say they are not evidence: they check that every stage runs, nothing more.
NOT_EVIDENCE = frozenset({"smoke"})


def preset(name: str, **overrides: Any) -> LabConfig:
    """A preset by name, with fields overridden.

    Raises:
        ConfigError: an unknown preset or field.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown lab preset {name!r}; choose one of {', '.join(PRESETS)}")
    try:
        return replace(PRESETS[name], **overrides).validate()
    except TypeError as e:
        raise ConfigError(f"bad lab setting: {e}") from e
