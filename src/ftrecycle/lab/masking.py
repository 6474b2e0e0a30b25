"""Experiment (i)'s summary: does the gradient-sign mask (GradFix) help where plain transfer hurts?

For every ordered pair Mj + Δi, the gain of plain transfer over Mj (experiment b) beside the gain of the
masked transfer Mj + (mask ⊙ Δi) for each number of examples N the mask was computed on. Then, on the
pairs where plain transfer hurts (gain < 0), whether the masked transfer loses less: the mean gains and
the count of pairs where the masked gain is above the plain one. Pure arithmetic on a results record
(one seed's or the seed mean), so that it can be checked on a made-up one.
"""

from __future__ import annotations

from typing import Any

from ftrecycle.lab.pretrain import VERSIONS


def _mean(values: list[float], digits: int = 2) -> float | None:
    """The mean of ``values`` rounded to ``digits`` (None for none)."""
    return round(sum(values) / len(values), digits) if values else None


def _rows(m: dict[str, Any], n: str) -> list[dict[str, Any]]:
    """Per pair: the plain and the masked gain (points over the target's zero-shot accuracy) with N = ``n``."""
    rows = []
    for j in VERSIONS:
        for i in VERSIONS:
            if i == j:
                continue
            base, masked = m["base"][j], m["masked"][n][j][i]
            rows.append(
                {
                    "pair": f"{j}+Δ{i[1]}",
                    "base": base,
                    "plain_gain": round(m["transfer"][j][i] - base, 2),
                    "masked_gain": round(masked["accuracy"] - base, 2),
                    "kept_pct": None if masked["kept_fraction"] is None else round(100 * masked["kept_fraction"], 1),
                }
            )
    return rows


def _compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean plain and masked gains over ``rows``, and how many pairs the mask made better or worse."""
    return {
        "pairs": len(rows),
        "mean_plain_gain": _mean([r["plain_gain"] for r in rows]),
        "mean_masked_gain": _mean([r["masked_gain"] for r in rows]),
        "masked_better": sum(r["masked_gain"] > r["plain_gain"] for r in rows),
        "masked_worse": sum(r["masked_gain"] < r["plain_gain"] for r in rows),
    }


def masking_summary(m: dict[str, Any]) -> dict[str, Any]:
    """Experiment (i) on one results record.

    Args:
        m: a seed's (or the seed mean's) record, with ``base``, ``transfer`` and ``masked`` (N -> target ->
            source -> accuracy and kept fraction).

    Returns:
        Per N (as text): the per-pair rows; ``all``: the comparison over every pair; ``harmful``: over the
        pairs where plain transfer hurts (its names, the mean gains, and ``loses_less``: the pairs where the
        masked gain is above the plain one); ``made_harmful``: pairs plain transfer helps (gain ≥ 0) but the
        masked one hurts; ``examples``: N; ``mean_kept_pct``: the share of Δ's non-zero entries kept, in percent.
    """
    out: dict[str, Any] = {}
    for n in m["masked"]:
        rows = _rows(m, n)
        harmful = [r for r in rows if r["plain_gain"] < 0]
        hurt = _compare(harmful)
        out[n] = {
            "rows": rows,
            "all": _compare(rows),
            "harmful": {
                **hurt,
                "names": [r["pair"] for r in harmful],
                "loses_less": hurt["masked_better"],
            },
            "made_harmful": sum(r["plain_gain"] >= 0 > r["masked_gain"] for r in rows),
            "examples": int(n.split()[0]),
            "mean_kept_pct": _mean([r["kept_pct"] for r in rows if r["kept_pct"] is not None], 1),
        }
    return out
