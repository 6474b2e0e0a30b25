"""Experiment (f): does ``diagnose`` predict the measured gain of Mj + Δi over Mj?

For each of the 20 ordered pairs, several signals (higher = predicted to help more) beside the
measured gain; Spearman's rank correlation of each with the gain; the confusion table of the
verdict (helps / uncertain / hurts) against the sign of the measured gain, per seed and over all
seeds; and ``--alpha auto`` against α = 1 on the stage-2 pairs.
"""

from __future__ import annotations

from typing import Any

from ftrecycle.lab.experiments import pairs

SIGNALS = {
    "score": "diagnose's score: relative drop of the calibration loss at α = 1 (α-loss)",
    "geometry": "minus the drift-to-diff ratio ‖C−A‖ / ‖B−A‖ (geometry alone)",
    "cos": "cos(diff, drift) (geometry alone)",
    "barrier": "minus the loss barrier on the straight path A → C",
    "accuracy": "diagnose's accuracy_gain: accuracy of C + Δ minus C's on 64 calibration items (accuracy probe)",
}
SPEARMAN_TARGET = 0.7
#: a pair losing at least this many points is "harmful": it must never be called "likely helps"
HARMFUL = -5.0
VERDICTS = ("likely helps", "uncertain", "likely hurts")


def _ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    k = 0
    while k < len(order):
        end = k
        while end + 1 < len(order) and x[order[end + 1]] == x[order[k]]:
            end += 1
        for t in range(k, end + 1):
            ranks[order[t]] = (k + end) / 2 + 1  # ties share their mean rank
        k = end + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson on ranks, ties averaged); None when a side is constant."""
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else None


def signal_values(d: dict[str, Any]) -> dict[str, float | None]:
    """One pair's signals from its diagnostics record (``accuracy`` None where no accuracy probe ran)."""
    acc = d.get("accuracy_gain")
    return {
        "score": d["score"],
        "geometry": -d["drift_over_delta"],
        "cos": d["cos"],
        "barrier": -d["barrier"],
        "accuracy": None if acc is None else 100 * acc,
    }


def confusion(pairs: list[tuple[str, float]]) -> dict[str, Any]:
    """The verdicts against the measured sign of the gain.

    Args:
        pairs: (verdict, measured gain in points) per pair.

    Returns:
        ``table``: verdict -> {``gain > 0``, ``gain ≤ 0``, ``harmful`` (gain ≤ :data:`HARMFUL`)} counts;
        ``agree``: pairs called likely helps with gain > 0 or likely hurts with gain ≤ 0; ``pairs``;
        ``harmful_called_helps``: pairs with gain ≤ :data:`HARMFUL` called likely helps (should be 0);
        ``harmful_at``: :data:`HARMFUL`.
    """
    table = {v: {"gain > 0": 0, "gain ≤ 0": 0, "harmful": 0} for v in VERDICTS}
    for verdict, gain in pairs:
        row = table.setdefault(verdict, {"gain > 0": 0, "gain ≤ 0": 0, "harmful": 0})
        row["gain > 0" if gain > 0 else "gain ≤ 0"] += 1
        row["harmful"] += gain <= HARMFUL
    agree = table["likely helps"]["gain > 0"] + table["likely hurts"]["gain ≤ 0"]
    return {
        "table": table,
        "agree": agree,
        "pairs": len(pairs),
        "harmful_called_helps": table["likely helps"]["harmful"],
        "harmful_at": HARMFUL,
    }


def _gain(m: dict[str, Any], i: str, j: str) -> float:
    return round(m["transfer"][j][i] - m["base"][j], 1)


def confusion_by_seed(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """:func:`confusion` of each seed's 20 pairs, and of all seeds' pairs together (``overall``)."""
    by_seed = {
        s: [(m["diagnostics"][j][i]["verdict"], _gain(m, i, j)) for i, j in pairs()] for s, m in per_seed.items()
    }
    return {
        "per_seed": {s: confusion(v) for s, v in by_seed.items()},
        "overall": confusion([p for v in by_seed.values() for p in v]),
        "harmful_at": HARMFUL,
    }


def diagnostics_summary(m: dict[str, Any], per_seed: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per-pair signals and gains, Spearman per signal, the verdicts' confusion table, and the --alpha auto comparison.

    Args:
        m: the seeds' mean record (its verdicts are the first seed's).
        per_seed: each seed's record, for the confusion table (default: ``m`` alone, as seed ``mean``).
    """
    rows = []
    for i, j in pairs():
        d = m["diagnostics"][j][i]
        rows.append(
            {
                "source": i,
                "target": j,
                "gain": _gain(m, i, j),
                "verdict": d["verdict"],
                **{k: (None if v is None else round(v, 3)) for k, v in signal_values(d).items()},
                "best_alpha": d["best_alpha"],
            }
        )
    gains = [r["gain"] for r in rows]
    rho = {k: spearman([r[k] for r in rows], gains) if all(r[k] is not None for r in rows) else None for k in SIGNALS}
    rho_r = {k: (round(v, 3) if v is not None else None) for k, v in rho.items()}
    known = {k: v for k, v in rho_r.items() if v is not None}
    best = max(known, key=lambda k: known[k]) if known else None
    auto = m["alpha_auto"]
    return {
        "pairs": rows,
        "spearman": rho_r,
        "best_signal": best,
        "target": SPEARMAN_TARGET,
        "score_meets_target": rho_r["score"] is not None and rho_r["score"] >= SPEARMAN_TARGET,
        "confusion": confusion_by_seed(per_seed if per_seed is not None else {"mean": m}),
        "alpha_auto": auto,
        "alpha_auto_not_worse": all(v["accuracy"] >= v["accuracy_alpha_1"] for v in auto.values()),
    }
