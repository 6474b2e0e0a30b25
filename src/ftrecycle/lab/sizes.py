"""Update sizes ‖Δ‖/‖W‖ and experiment (h), the Δ-size sweep: job names, the arithmetic, the published ratios.

The issue behind (h): compression and perhaps transfer depend on how far fine-tuning moves the weights
relative to their norm, and published instruction deltas are far smaller than a toy lab's. (h)
fine-tunes M4 and M5 at several multiples of the lab's fine-tuning rate, so that ‖Δ‖/‖W‖ spans a range,
and measures at each size the transfer recovery of finding 1 and the accuracy of compressed transfers.

Every share here is None when its reference is not positive: a fine-tune that did not gain over its
base has no "share of the gain", and dividing by it would print a number that means nothing.
"""

from __future__ import annotations

import math
from typing import Any

#: Module types of :func:`ftrecycle.diagnose.geometry.module_type` that the sizes table shows, in order.
SIZE_COLUMNS = ("embeddings", "attention", "mlp", "norms")

#: Published reference points the report compares the lab's update sizes and rates with. Each value
#: says where it comes from; the paper itself does not state OLMo 2 7B's pretraining rate. The two rates
#: are kept as text: results.json's seed mean rounds numbers to 4 decimals, which would make 5e-8 zero.
PUBLISHED: dict[str, dict[str, Any]] = {
    "llama31_instruct_delta_pct": {
        "value": 2.0,
        "source": "Llama 3.1 8B Instruct against its base, on average, as issue 13 gives it",
    },
    "sft_delta_entry_abs": {
        "value": 0.002,
        "source": "SFT delta entries typically lie within ±0.002 (issue 13)",
    },
    "paper_ft_lr": {
        "value": "5e-8",
        "source": "the paper's §3 setup reads 'a learning rate of 5e-8'; issue 13 quotes 5e-6",
    },
    "olmo2_7b_pretrain_peak_lr": {
        "value": "3e-4",
        "source": "OLMo 2's own report; the paper does not state it",
    },
}


def scale_tag(scale: float) -> str:
    """The ``@lrS`` suffix of a sweep job's name ("" for scale 1: those are the ordinary jobs).

    Args:
        scale: multiplier of ``ft_lr``.

    Returns:
        ``""`` or ``"@lr0.2"`` and the like (``%g`` keeps names short and filesystem-safe).
    """
    return "" if scale == 1.0 else f"@lr{scale:g}"


def safe_dir(name: str) -> str:
    """A job name as a directory name: ``:`` and ``=`` of compression specs dropped or replaced."""
    return name.replace(":", "-").replace("=", "")


def rel_pct(x: float | None) -> float | None:
    """A relative norm (a fraction) in percent, to three decimals (None stays None)."""
    return None if x is None else round(100.0 * x, 3)


def gain_recovered_pct(transfer: float, base: float, finetuned: float, floor: float = 0.0) -> float | None:
    """Finding 1's recovery: ``(transfer − base) / (finetuned − base)`` in percent.

    Args:
        transfer: accuracy of Mj + Δi.
        base: accuracy of Mj.
        finetuned: accuracy of Mj fine-tuned directly (at the same settings as Δi).
        floor: the smallest gain (points) that counts as one (see :func:`noise_points`).

    Returns:
        The share in percent (one decimal), or None when fine-tuning gained no more than ``floor``.
    """
    gain = finetuned - base
    return round(100.0 * (transfer - base) / gain, 1) if gain > max(floor, 0.0) else None


def noise_points(accuracy: float, items: int) -> float:
    """Two binomial standard errors of an accuracy (percent) measured on ``items`` problems, in points.

    A fine-tuning gain below it is test noise: a share of it (a recovery of -167 % from a gain of 0.3
    points, measured) would mean nothing.
    """
    p = min(max(accuracy / 100.0, 0.0), 1.0)
    return 200.0 * math.sqrt(p * (1.0 - p) / max(items, 1))


def share_pct(value: float, reference: float) -> float | None:
    """``value`` as a percentage of ``reference`` (one decimal); None when the reference is not positive."""
    return round(100.0 * value / reference, 1) if reference > 0 else None


def sizes_entry(total: dict[str, Any], by_module: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """One measured update's ‖Δ‖/‖W‖ in percent: total and per module type (from a geometry's ``delta_rel``).

    Args:
        total: ``Geometry.total``.
        by_module: ``Geometry.by_module``.

    Returns:
        ``{"total": ..., "embeddings": ..., ...}``; a module type the model lacks is None.
    """
    out = {"total": rel_pct(total["delta_rel"])}
    for kind in SIZE_COLUMNS:
        out[kind] = rel_pct(by_module[kind]["delta_rel"]) if kind in by_module else None
    return out


def sweep_pair(
    size: float | None,
    base: float,
    finetuned: float,
    transfer: float,
    compressed: dict[str, dict[str, float]],
    floor: float = 0.0,
) -> dict[str, Any]:
    """One (scale, pair) row of (h): the source Δ's size, the accuracies and every share derived from them.

    Args:
        size: ‖Δi‖/‖Mi‖ in percent of the source fine-tune at this scale.
        base: accuracy of the target Mj.
        finetuned: accuracy of Mj fine-tuned directly at this scale.
        transfer: accuracy of Mj + Δi (full float32 Δ).
        compressed: per compression spec, ``{"accuracy", "ratio"}`` of Mj + Δi stored compressed.
        floor: gains (of fine-tuning, or of the dense transfer) at or below it give no share (test noise).

    Returns:
        The inputs, ``recovery_pct`` (share of the gain), ``of_ft_pct`` (share of the fine-tuned score),
        and per compression its accuracy, measured ratio and ``of_dense_pct`` (share of the dense transfer's
        gain over the base that it keeps; None when the dense transfer gains nothing).
    """
    return {
        "delta_rel_pct": size,
        "base": base,
        "finetuned": finetuned,
        "transfer": transfer,
        "recovery_pct": gain_recovered_pct(transfer, base, finetuned, floor),
        "of_ft_pct": share_pct(transfer, finetuned),
        "compressed": {
            spec: {
                "accuracy": c["accuracy"],
                "ratio": round(c["ratio"], 2),
                # the share of the dense transfer's gain over the target that the compressed one keeps: a
                # ratio of accuracies would sit near 100 % whenever Δ does little, whatever the compression
                "of_dense_pct": gain_recovered_pct(c["accuracy"], base, transfer, floor),
            }
            for spec, c in compressed.items()
        },
    }


def sweep_of_means(sweep: dict[str, Any], items: int) -> dict[str, Any]:
    """(h)'s shares recomputed from seed-mean accuracies, as the findings are (not a mean of per-seed shares,
    which skips a seed where a share is undefined and disagrees with finding 1 on scale 1's pairs).

    Args:
        sweep: the seed mean of :func:`sweep_pair` rows, ``{scale: {"scale", "lr", "pairs": {pair: row}}}``.
        items: test problems per accuracy (for the noise floor).

    Returns:
        The same structure with every share derived again from its row's mean accuracies.
    """
    out: dict[str, Any] = {}
    for tag, sc in sweep.items():
        pairs = {
            name: sweep_pair(
                p["delta_rel_pct"],
                p["base"],
                p["finetuned"],
                p["transfer"],
                {spec: {"accuracy": c["accuracy"], "ratio": c["ratio"]} for spec, c in p["compressed"].items()},
                floor=noise_points(p["base"], items),
            )
            for name, p in sc["pairs"].items()
        }
        out[tag] = {**sc, "pairs": pairs}
    return out


def lr_ratios(ft_lr: float, pretrain_lr: float, stage2_lr: float) -> dict[str, float]:
    """How many times smaller than the pretraining peaks the fine-tuning rate is, beside the paper's.

    Inverse ratios (peak / fine-tuning rate), so that the seed mean's rounding to 4 decimals keeps them.

    Returns:
        ``pretrain_peak_over_ft``, ``stage2_peak_over_ft`` (this lab) and ``olmo2_peak_over_paper_ft``.
    """
    paper = float(PUBLISHED["olmo2_7b_pretrain_peak_lr"]["value"]) / float(PUBLISHED["paper_ft_lr"]["value"])
    return {
        "pretrain_peak_over_ft": round(pretrain_lr / ft_lr, 3),
        "stage2_peak_over_ft": round(stage2_lr / ft_lr, 3),
        "olmo2_peak_over_paper_ft": round(paper, 1),
    }
