"""Experiment (f): does ``diagnose`` predict the measured gain of Mj + Δi over Mj?

For each of the 20 ordered pairs, several signals (higher = predicted to help more) beside the
measured gain; Spearman's rank correlation of each with the gain; and ``--alpha auto`` against
α = 1 on the stage-2 pairs.
"""

from __future__ import annotations

from typing import Any

from ftrecycle.lab.experiments import pairs

SIGNALS = {
    "score": "diagnose's score: relative drop of the calibration loss at α = 1 (α-loss)",
    "geometry": "minus the drift-to-diff ratio ‖C−A‖ / ‖B−A‖ (geometry alone)",
    "cos": "cos(diff, drift) (geometry alone)",
    "barrier": "minus the loss barrier on the straight path A → C",
}
SPEARMAN_TARGET = 0.7


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


def signal_values(d: dict[str, Any]) -> dict[str, float]:
    """One pair's signals from its diagnostics record."""
    return {"score": d["score"], "geometry": -d["drift_over_delta"], "cos": d["cos"], "barrier": -d["barrier"]}


def diagnostics_summary(m: dict[str, Any]) -> dict[str, Any]:
    """Per-pair signals and gains, Spearman per signal, and the --alpha auto comparison."""
    rows = []
    for i, j in pairs():
        d = m["diagnostics"][j][i]
        rows.append(
            {
                "source": i,
                "target": j,
                "gain": round(m["transfer"][j][i] - m["base"][j], 1),
                "verdict": d["verdict"],
                **{k: round(v, 3) for k, v in signal_values(d).items()},
                "best_alpha": d["best_alpha"],
            }
        )
    gains = [r["gain"] for r in rows]
    rho = {k: spearman([r[k] for r in rows], gains) for k in SIGNALS}
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
        "alpha_auto": auto,
        "alpha_auto_not_worse": all(v["accuracy"] >= v["accuracy_alpha_1"] for v in auto.values()),
    }
