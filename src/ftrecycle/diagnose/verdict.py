"""``diagnose()``: geometry, the optional probe, and a verdict in plain words.

The verdict's rules (thresholds are module constants, recorded with every verdict):

* with calibration data, the probe decides: C + Δ lowering the calibration loss of C by at least
  ``HELP_LOSS`` (relative) is *likely helps*; raising it by ``HURT_LOSS`` is *likely hurts*; in between
  is *uncertain*. A path barrier above ``BARRIER`` (nats) is named as a reason for doubt.
* from geometry alone: a version drift more than ``FAR`` times the diff's size, with the diff
  nearly orthogonal to it, is *uncertain, leaning to hurts* (the paper's cross-stage case); a drift
  under ``NEAR`` times the diff is *likely helps* (the within-stage case); otherwise *uncertain*.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftrecycle.diagnose.geometry import Geometry, geometry
from ftrecycle.diagnose.probe import ALPHAS, Probe, probe
from ftrecycle.errors import ConfigError

HELP_LOSS = 0.05
HURT_LOSS = 0.0
BARRIER = 0.5
FAR = 5.0
NEAR = 2.0


@dataclass
class Diagnosis:
    """Everything ``ftrecycle diagnose`` reports.

    Attributes:
        geometry: drift, diff size and alignment, streamed.
        probe: the calibration probe (None without calibration data).
        verdict: ``likely helps``, ``uncertain`` or ``likely hurts``.
        reasons: the verdict in plain words.
        score: one number, higher = more likely to help (the probe's relative loss change at α = 1,
            negated; without calibration, minus the drift-to-diff ratio).
    """

    geometry: Geometry
    probe: Probe | None
    verdict: str
    reasons: list[str] = field(default_factory=list)
    score: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "verdict": self.verdict,
            "reasons": self.reasons,
            "score": self.score,
            "thresholds": {
                "help_loss": HELP_LOSS,
                "hurt_loss": HURT_LOSS,
                "barrier": BARRIER,
                "far": FAR,
                "near": NEAR,
            },
            "geometry": self.geometry.to_json(),
            "probe": self.probe.to_json() if self.probe else None,
        }


def judge(geo: Geometry, pr: Probe | None) -> tuple[str, list[str], float]:
    """The verdict, its reasons and the score from the measurements."""
    t = geo.total
    ratio, cos = t["drift_over_delta"], t["cos"]
    reasons = []
    if ratio is not None and cos is not None:
        reasons.append(
            f"the versions differ by {ratio:.2f}× the diff's size (relative drift {t['drift_rel']:.3g}, diff "
            f"{t['delta_rel']:.3g} of the base's norm); cos(diff, drift) = {cos:+.3f}"
        )
    if pr is not None:
        change = (pr.loss_transfer - pr.loss_target) / pr.loss_target if pr.loss_target else 0.0
        reasons.append(
            f"on {pr.examples} calibration examples the target's loss {pr.loss_target:.3f} becomes "
            f"{pr.loss_transfer:.3f} with the diff ({100 * change:+.1f} %); best α on the grid is {pr.best_alpha:g}"
        )
        if pr.barrier > BARRIER:
            reasons.append(
                f"the straight path between the versions rises {pr.barrier:.2f} nats above its ends: "
                "they may not share a basin"
            )
        if change <= -HELP_LOSS:
            verdict = "likely helps"
        elif change > HURT_LOSS:
            verdict = "likely hurts"
        else:
            verdict = "uncertain"
        return verdict, reasons, -change
    if ratio is None:
        return "uncertain", [*reasons, "the diff is zero"], 0.0
    if ratio > FAR and abs(cos or 0) < 0.1:
        verdict = "uncertain"
        reasons.append(
            "the versions are far apart compared with the diff, which is unrelated to the drift "
            "(the paper's cross-stage case, where transfers hurt); give --data to measure"
        )
    elif ratio < NEAR:
        verdict = "likely helps"
        reasons.append("the versions are close compared with the diff (the paper's within-stage case)")
    else:
        verdict = "uncertain"
        reasons.append("give --data (a few hundred examples of your task) for a loss-based verdict")
    return verdict, reasons, -ratio


def diagnose(
    source_base: str,
    source_finetuned: str,
    target_base: str,
    *,
    data: str | Path | None = None,
    alphas: tuple[float, ...] = ALPHAS,
    max_examples: int = 256,
    device: str | None = None,
) -> Diagnosis:
    """Predict whether ``target_base + (source_finetuned − source_base)`` will help, before evaluating it.

    Args:
        source_base: A. source_finetuned: B. target_base: C (directories or hub ids).
        data: calibration JSONL (a few hundred examples of the task); enables the probe.
        alphas: α grid of the probe.
        max_examples: calibration examples used.
        device: the probe's device (default CUDA when available).

    Raises:
        CheckpointError, IncompatibleModelsError: bad models. DataError: bad calibration data.
    """
    geo = geometry(source_base, source_finetuned, target_base)
    pr = None
    if data is not None:
        pr = probe(
            source_base, source_finetuned, target_base, data, alphas=alphas, max_examples=max_examples, device=device
        )
    verdict, reasons, score = judge(geo, pr)
    return Diagnosis(geo, pr, verdict, reasons, score)


def best_alpha(
    source_base: str,
    source_finetuned: str,
    target_base: str,
    calibration: str | Path,
    *,
    alphas: tuple[float, ...] = ALPHAS,
    max_examples: int = 256,
    device: str | None = None,
) -> Probe:
    """The α search behind ``transfer --alpha auto`` (no path probe)."""
    return probe(
        source_base,
        source_finetuned,
        target_base,
        calibration,
        alphas=alphas,
        path=(),
        max_examples=max_examples,
        device=device,
    )


@dataclass(frozen=True)
class AlphaChoice:
    """The alpha an operation uses, and how it was chosen.

    Attributes:
        alpha: the scale to apply.
        probe: the calibration search that chose it (None: the alpha was given as a number).
    """

    alpha: float
    probe: Probe | None = None

    def describe(self) -> str:
        """One line for a log: the chosen alpha and the calibration loss at each grid point."""
        if self.probe is None:
            return f"alpha {self.alpha:g}"
        losses = ", ".join(f"{a:g}: {lo:.4f}" for a, lo in self.probe.alphas)
        return f"alpha auto: {self.alpha:g} (calibration loss by alpha: {losses})"


def check_alpha_request(alpha: float | str, calibration: str | Path | None, *, mask: str | None = None) -> None:
    """Refuse an alpha/calibration pair that cannot be resolved, before any model is read.

    Args:
        alpha: a number, or ``"auto"``.
        calibration: calibration data, or None.
        mask: ``--mask``; ``grad-sign`` uses the calibration data too.

    Raises:
        ConfigError: ``auto`` without calibration data, or calibration data used for nothing (a numeric
            alpha and no ``grad-sign`` mask).
    """
    if alpha != "auto" and calibration is not None and mask != "grad-sign":
        raise ConfigError("--calibration is only used with --alpha auto or --mask grad-sign")
    if alpha == "auto" and calibration is None:
        raise ConfigError("--alpha auto needs --calibration CALIB (JSONL examples of the task)")


def resolve_alpha(
    source_base: str,
    source_finetuned: str,
    target_base: str,
    alpha: float | str,
    calibration: str | Path | None = None,
    *,
    max_examples: int = 256,
    device: str | None = None,
) -> AlphaChoice:
    """The alpha to use: ``alpha`` itself, or for ``"auto"`` the grid point of lowest calibration loss.

    The one implementation of ``--alpha auto`` (``transfer``, ``recycle-finetune``, ``iterate``).

    Args:
        source_base: A. source_finetuned: B. target_base: C (directories or hub ids).
        alpha: a number, or ``"auto"``.
        calibration: JSONL examples of the task (fine-tuning formats); required with ``"auto"`` only.
        max_examples: calibration examples used by the search.
        device: the search's device (default CUDA when available).

    Returns:
        The alpha, with the search that chose it when it was ``"auto"``.

    Raises:
        ConfigError: see :func:`check_alpha_request`.
        CheckpointError, IncompatibleModelsError, DataError: as :func:`best_alpha`.
    """
    check_alpha_request(alpha, calibration)
    if alpha != "auto" or calibration is None:  # (auto without calibration was refused above)
        return AlphaChoice(float(alpha))
    pr = best_alpha(source_base, source_finetuned, target_base, calibration, max_examples=max_examples, device=device)
    return AlphaChoice(pr.best_alpha, pr)


def format_diagnosis(d: Diagnosis) -> str:
    """A markdown summary: verdict, reasons, totals, by module type and by layer."""

    def row(name: str, s: dict[str, Any]) -> str:
        def f(x: Any, spec: str) -> str:
            return "–" if x is None else format(x, spec)

        return (
            f"| {name} | {f(s['drift_rel'], '.4g')} | {f(s['delta_rel'], '.4g')} | "
            f"{f(s['drift_over_delta'], '.3g')} | {f(s['cos'], '+.3f')} | {f(s['sign_agreement'], '.3f')} |"
        )

    head = [
        "| group | drift ‖C−A‖/‖A‖ | diff ‖B−A‖/‖A‖ | drift / diff | cos(diff, drift) | sign agreement |",
        "|---|---|---|---|---|---|",
    ]
    g = d.geometry
    lines = [
        f"verdict: **{d.verdict}** (score {d.score:+.4g})",
        "",
        *[f"- {r}" for r in d.reasons],
        "",
        *head,
        row("all", g.total),
        *[row(k, v) for k, v in g.by_module.items()],
        "",
        *head,
        *[row(k, v) for k, v in g.by_layer.items()],
    ]
    if d.probe is not None:
        lines += ["", "| α | loss of C + αΔ |", "|---|---|", *[f"| {a:g} | {lo:.4f} |" for a, lo in d.probe.alphas]]
        if d.probe.path:
            lines += [
                "",
                "| t | loss of (1−t)A + tC |",
                "|---|---|",
                *[f"| {t:g} | {lo:.4f} |" for t, lo in d.probe.path],
                "",
                f"barrier: {d.probe.barrier:.4f} nats",
            ]
    if g.skipped:
        lines += [
            "",
            f"not compared ({len(g.skipped)}): " + "; ".join(f"{k}: {v}" for k, v in sorted(g.skipped.items())),
        ]
    return "\n".join(lines) + "\n"
