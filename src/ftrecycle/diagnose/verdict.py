"""``diagnose()``: geometry, the optional probes, and a verdict in plain words.

The verdict's rules (thresholds are module constants, recorded with every verdict):

* with calibration items that carry answers (GSM8K format), two signals decide: the relative change
  of the calibration loss at α = 1 (*falls* at −``HELP_LOSS`` or below, *rises* above ``HURT_LOSS``)
  and the accuracy probe's gain (*falls clearly* when it is below −``ACC_HURT`` and more than
  ``ACC_Z`` paired standard errors below zero; *rises clearly* the same way upwards).
  *likely hurts*: the accuracy falls clearly, or the loss rises while the accuracy does not rise
  clearly. *likely helps*: the loss falls and the accuracy falls by no more than ``ACC_HELP_FLOOR``.
  Otherwise (the signals disagree, or both are within noise) *uncertain*.
* with calibration data without answers, the loss decides as above but a *likely helps* is never
  stronger than the geometry allows: it stands only where geometry alone would say *likely helps*
  (drift under ``NEAR`` times the diff), and is *uncertain* otherwise.
* from geometry alone: a version drift more than ``FAR`` times the diff's size, with the diff
  nearly orthogonal to it, is *uncertain, leaning to hurts* (the paper's cross-stage case); a drift
  under ``NEAR`` times the diff is *likely helps* (the within-stage case); otherwise *uncertain*.

A path barrier above ``BARRIER`` (nats) is named as a reason for doubt.

Where the numbers come from: the lab's experiment (f), ``lab run --preset tiny --seeds 0,1``, 20
ordered pairs Mj + Δi per seed, tuned on seed 0 and checked on seed 1 (a small sample: treat them as
a starting point, not a calibration for every model family). See docs/diagnose.md.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftrecycle.delta.adapter import is_adapter
from ftrecycle.diagnose.accuracy import PROBE_ITEMS, PROBE_NEW_TOKENS, AccuracyProbe
from ftrecycle.diagnose.geometry import Geometry, geometry
from ftrecycle.diagnose.probe import ALPHAS, Probe, probe
from ftrecycle.errors import ConfigError
from ftrecycle.ops.transfer import transfer

# Where these numbers come from: the lab's experiment (f), `lab run --preset tiny --seeds 0,1` (the
# models of the last full run, diagnose jobs rerun with the accuracy probe: 64 calibration items, 40 new
# tokens), 20 pairs Mj + Δi per seed. Tuned on seed 0, checked on seed 1; a small sample (see docs/diagnose.md).
#
# Relative fall of the calibration loss (at α = 1) that counts as "the loss falls". Seed 0: the pairs whose
# test accuracy rose had loss changes of −10 % to −43 %; 5 % keeps the near-zero changes of unrelated diffs
# (M1 + Δ2: −0.8 %, gain −5.0; M2 + Δ3: −2.6 %, gain +0.3) out of "helps". 2 % scored the same on seed 0.
HELP_LOSS = 0.05
# Any rise of the calibration loss counts as "the loss rises": on seed 0 every pair whose loss rose lost
# accuracy (−6.3 to −18.3 points; M3 + Δ1 rose 0.6 % and lost 9.2, M4 + Δ2 rose 3.6 % and lost 11.0 while
# its accuracy probe showed +0.0: the loss caught what the 64 items missed). On seed 1 three pairs whose loss
# rose gained 0.7 to 3.4 points: they are the verdict's misses there.
HURT_LOSS = 0.0
# The accuracy probe "falls clearly" when its gain is below −ACC_HURT and ACC_Z paired standard errors
# below zero; "rises clearly" symmetrically. With 64 items the paired standard error was 4.7 to 8.6 points
# on the lab, so "clearly" means a fall of 10 to 17 points (seed 0: M4 + Δ1 −20.3, M5 + Δ1 −23.4 and
# M5 + Δ3 −23.4 on the probe, which lost 13 to 18 points on the test set; their loss rose too).
ACC_HURT = 0.05
ACC_Z = 2.0
#: the fewest accuracy-probe items whose change counts as evidence (fewer: the probe says "flat")
ACC_MIN_ITEMS = 16
# "likely helps" needs the probe's accuracy not to fall by more than this (a fraction). Seed 0: the two
# pairs whose loss fell by 17-18 % but lost test accuracy (M1 + Δ5 −1.8, M3 + Δ2 −3.7, called "likely
# helps" by the loss-only verdict) had probe gains of −6.2 points; the gainers M3 + Δ4 (+6.6) and
# M3 + Δ5 (+5.0) had −3.1 and −4.7. 5 points (the same as ACC_HURT) separates them; 0 called the
# gainers "uncertain" (16 → 14 of 20 agreeing on seed 0). It is a thin margin: one item is 1.6 points.
ACC_HELP_FLOOR = 0.05
BARRIER = 0.5
FAR = 5.0
NEAR = 2.0


def thresholds() -> dict[str, float]:
    """The verdict's thresholds, as recorded with every verdict."""
    return {
        "help_loss": HELP_LOSS,
        "hurt_loss": HURT_LOSS,
        "acc_hurt": ACC_HURT,
        "acc_z": ACC_Z,
        "acc_help_floor": ACC_HELP_FLOOR,
        "acc_min_items": ACC_MIN_ITEMS,
        "barrier": BARRIER,
        "far": FAR,
        "near": NEAR,
    }


@dataclass
class Diagnosis:
    """Everything ``ftrecycle diagnose`` reports.

    Attributes:
        geometry: drift, diff size and alignment, streamed.
        probe: the calibration probe (None without calibration data).
        verdict: ``likely helps``, ``uncertain`` or ``likely hurts``.
        reasons: the verdict in plain words.
        score: the loss probe's score, higher = more likely to help: the relative drop of the
            calibration loss at α = 1 (None without calibration data: it never stands for another signal).
        accuracy_gain: the accuracy probe's score: accuracy of C + Δ minus that of C on the calibration
            items with answers (a fraction; None without such items).
        geometry_score: the geometry's score, always measured: minus the drift-to-diff ratio
            ‖C − A‖ / ‖B − A‖ (None for a zero diff).
    """

    geometry: Geometry
    probe: Probe | None
    verdict: str
    reasons: list[str] = field(default_factory=list)
    score: float | None = None
    accuracy_gain: float | None = None
    geometry_score: float | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "verdict": self.verdict,
            "reasons": self.reasons,
            "score": self.score,
            "accuracy_gain": self.accuracy_gain,
            "geometry_score": self.geometry_score,
            "scores": {"loss": self.score, "accuracy": self.accuracy_gain, "geometry": self.geometry_score},
            "thresholds": thresholds(),
            "geometry": self.geometry.to_json(),
            "probe": self.probe.to_json() if self.probe else None,
        }


def _direction(x: float, down: float, up: float) -> str:
    """``falls`` at or below ``down``, ``rises`` above ``up``, else ``flat``."""
    return "falls" if x <= down else "rises" if x > up else "flat"


def accuracy_direction(acc: AccuracyProbe) -> str:
    """``falls`` / ``rises``: the probe's gain beyond ``ACC_HURT`` and ``ACC_Z`` standard errors; else ``flat``
    (always ``flat`` on fewer than ``ACC_MIN_ITEMS`` items: a paired standard error of a handful of items, all
    flipping the same way, is 0 and would call any change certain)."""
    if acc.items < ACC_MIN_ITEMS:
        return "flat"
    margin = max(ACC_HURT, ACC_Z * acc.stderr)
    return "falls" if acc.gain < -margin else "rises" if acc.gain > margin else "flat"


def combine(loss: str, accuracy: str | None, gain: float | None, geometry_helps: bool) -> tuple[str, str]:
    """The verdict from the loss's direction and the accuracy probe's, with the reason for it.

    Args:
        loss: the calibration loss's direction (``falls``, ``flat``, ``rises``).
        accuracy: the accuracy probe's direction, None without answers in the data.
        gain: the accuracy probe's gain (None without answers).
        geometry_helps: whether geometry alone would say ``likely helps`` (used without answers only).
    """
    if accuracy == "falls":
        return "likely hurts", "the accuracy probe falls clearly (beyond its noise)"
    if loss == "rises" and accuracy != "rises":
        return "likely hurts", "the calibration loss rises"
    if loss == "rises":
        return "uncertain", "the loss rises but the accuracy probe rises clearly: the signals disagree"
    if loss == "flat":
        return "uncertain", "the loss changes too little to tell"
    if accuracy is None:
        if geometry_helps:
            return "likely helps", "the loss falls and the versions are close compared with the diff"
        return "uncertain", (
            "the loss falls, but without answers in the data (GSM8K format, '#### N') there is no accuracy "
            "probe, and the geometry alone does not say the transfer helps: a falling loss can hide broken answers"
        )
    if gain is not None and gain < -ACC_HELP_FLOOR:
        return "uncertain", (
            f"the loss falls but the accuracy probe falls by more than {100 * ACC_HELP_FLOOR:g} points (within "
            "its noise): the signals disagree"
        )
    return "likely helps", "the loss falls and the accuracy probe does not"


def _probe_reasons(pr: Probe, change: float) -> list[str]:
    reasons = [
        f"on {pr.examples} calibration examples the target's loss {pr.loss_target:.3f} becomes "
        f"{pr.loss_transfer:.3f} with the diff ({100 * change:+.1f} %); best α on the grid is {pr.best_alpha:g} "
        f"(by {pr.alpha_method})"
    ]
    acc = pr.accuracy
    if acc is not None:
        reasons.append(
            f"on {acc.items} calibration items with answers the target answers {100 * acc.target:.1f} % right, "
            f"C + {acc.alpha:g}Δ {100 * acc.transfer:.1f} % ({100 * acc.gain:+.1f} ± {100 * acc.stderr:.1f} points)"
        )
    if pr.barrier > BARRIER:
        reasons.append(
            f"the straight path between the versions rises {pr.barrier:.2f} nats above its ends: "
            "they may not share a basin"
        )
    edge = edge_of_grid(pr)
    if edge is not None:
        reasons.append(edge)
    return reasons


def edge_of_grid(pr: Probe) -> str | None:
    """A warning when the lowest calibration loss of the α grid is at its edge (the minimum may lie beyond)."""
    grid = sorted(a for a, _ in pr.alphas)
    if len(grid) < 2 or pr.best_alpha not in (grid[0], grid[-1]):
        return None
    side = "largest" if pr.best_alpha == grid[-1] else "smallest"
    return (
        f"warning: the best α on the grid, {pr.best_alpha:g}, is the {side} tried ({grid[0]:g} to {grid[-1]:g}): the "
        "loss may fall further beyond it; widen the grid (--alphas)"
    )


def judge(geo: Geometry, pr: Probe | None) -> tuple[str, list[str], float | None]:
    """The verdict, its reasons and the loss probe's score (None without a probe) from the measurements."""
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
        reasons += _probe_reasons(pr, change)
        acc = pr.accuracy
        verdict, why = combine(
            _direction(change, -HELP_LOSS, HURT_LOSS),
            accuracy_direction(acc) if acc else None,
            acc.gain if acc else None,
            ratio is not None and ratio < NEAR,
        )
        return verdict, [*reasons, why], -change
    if ratio is None:
        return "uncertain", [*reasons, "the diff is zero"], None
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
    return verdict, reasons, None


def diagnose(
    source_base: str,
    source_finetuned: str,
    target_base: str,
    *,
    data: str | Path | None = None,
    alphas: tuple[float, ...] = ALPHAS,
    max_examples: int = 256,
    device: str | None = None,
    probe_items: int = PROBE_ITEMS,
    max_new_tokens: int = PROBE_NEW_TOKENS,
) -> Diagnosis:
    """Predict whether ``target_base + (source_finetuned − source_base)`` will help, before evaluating it.

    Args:
        source_base: A. source_finetuned: B. target_base: C (directories or hub ids).
        data: calibration JSONL (a few hundred examples of the task); enables the probe.
        alphas: α grid of the probe.
        max_examples: calibration examples used for the losses.
        device: the probe's device (default CUDA when available).
        probe_items: calibration items with ``#### N`` answers scored by the accuracy probe (0: none).
        max_new_tokens: most new tokens per answer the accuracy probe generates.

    Returns:
        The geometry, the probe, the verdict with its reasons, and both scores.

    Raises:
        CheckpointError, IncompatibleModelsError: bad models. DataError: bad calibration data.
    """
    with merged_source(source_base, source_finetuned) as fin:
        geo = geometry(source_base, fin, target_base)
        pr = None
        if data is not None:
            pr = probe(
                source_base,
                fin,
                target_base,
                data,
                alphas=alphas,
                max_examples=max_examples,
                device=device,
                probe_items=probe_items,
                max_new_tokens=max_new_tokens,
            )
    verdict, reasons, score = judge(geo, pr)
    gain = pr.accuracy.gain if pr is not None and pr.accuracy is not None else None
    ratio = geo.total["drift_over_delta"]
    return Diagnosis(geo, pr, verdict, reasons, score, gain, None if ratio is None else -ratio)


def best_alpha(
    source_base: str,
    source_finetuned: str,
    target_base: str,
    calibration: str | Path,
    *,
    alphas: tuple[float, ...] = ALPHAS,
    max_examples: int = 256,
    device: str | None = None,
    probe_items: int = PROBE_ITEMS,
    max_new_tokens: int = PROBE_NEW_TOKENS,
) -> Probe:
    """The α search behind ``transfer --alpha auto`` (no path probe).

    With calibration items that carry ``#### N`` answers, α is the grid point of highest accuracy on
    ``probe_items`` of them among the few of lowest loss (ties: lower loss); otherwise the grid point of
    lowest loss. ``Probe.alpha_method`` records which.

    Args:
        source_base: A. source_finetuned: B. target_base: C (directories or hub ids).
        calibration: JSONL examples of the task (fine-tuning formats).
        alphas: the α grid.
        max_examples: calibration examples used for the losses.
        device: the search's device (default CUDA when available).
        probe_items: items with answers scored per candidate α (0: choose by loss only).
        max_new_tokens: most new tokens per generated answer.

    Returns:
        The probe, with ``best_alpha`` and ``alpha_method``.

    Raises:
        CheckpointError, IncompatibleModelsError, DataError: bad models or calibration data.
    """
    with merged_source(source_base, source_finetuned) as fin:
        return probe(
            source_base,
            fin,
            target_base,
            calibration,
            alphas=alphas,
            path=(),
            max_examples=max_examples,
            device=device,
            probe_items=probe_items,
            max_new_tokens=max_new_tokens,
            choose_by_accuracy=True,
        )


@contextlib.contextmanager
def merged_source(source_base: str, source_finetuned: str) -> Iterator[str]:
    """The fine-tuned model as a model directory: itself, or for a PEFT LoRA adapter over the source base
    (which ``transfer`` accepts as its source) the base with the adapter merged, written by ``transfer``
    into a temporary directory (removed at the end) — so that the geometry and the probes read B as a model.

    Raises:
        CheckpointError, IncompatibleModelsError: an adapter that ``transfer`` refuses.
    """
    if not is_adapter(source_finetuned):
        yield source_finetuned
        return
    with tempfile.TemporaryDirectory(prefix="ftrecycle-diagnose-") as tmp:
        out = Path(tmp) / "merged"
        transfer(source_base, source_finetuned, source_base, out)  # A + Δ: the fine-tuned model the adapter stands for
        yield str(out)


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
        acc = self.probe.accuracy
        scored = ""
        if acc is not None:
            scored = f"; accuracy on {acc.items} items by alpha: " + ", ".join(
                f"{a:g}: {100 * v:.1f} %" for a, v in acc.by_alpha
            )
        return f"alpha auto: {self.alpha:g} by {self.probe.alpha_method} (calibration loss by alpha: {losses}{scored})"


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
    if alpha == "auto" and mask is not None:
        # the α search probes C + αΔ, not C + α(m ⊙ Δ): its α would be chosen for another model
        raise ConfigError("--alpha auto with --mask: the α search does not see the mask yet; give --alpha a number")


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
    """The alpha to use: ``alpha`` itself, or for ``"auto"`` the choice of :func:`best_alpha` (by accuracy, else loss).

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
    acc = d.probe.accuracy if d.probe is not None else None
    gain = "–" if acc is None else f"{100 * acc.gain:+.1f} ± {100 * acc.stderr:.1f} points on {acc.items} items"
    loss = "– (no --data)" if d.score is None else f"{100 * d.score:+.1f} % (calibration loss drop at α = 1)"
    geo_score = "–" if d.geometry_score is None else f"{d.geometry_score:+.3g} (minus drift / diff)"
    lines = [
        f"verdict: **{d.verdict}**",
        "",
        f"scores: loss {loss}; accuracy gain {gain}; geometry {geo_score}",
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
        if acc is not None:
            lines += [
                "",
                "| α | accuracy of C + αΔ (calibration items) |",
                "|---|---|",
                *[f"| {a:g} | {100 * v:.1f} % |" for a, v in acc.by_alpha],
            ]
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
