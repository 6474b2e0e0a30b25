"""Seed-mean and seed-spread of the lab's nested results (same structure as one seed's)."""

from __future__ import annotations

from typing import Any


def _is_curve(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(p, list) and len(p) == 2 for p in x)


def combine(values: list[Any], how: str) -> Any:
    """Combine one field across seeds: ``how`` is ``mean`` or ``spread`` (max − min).

    Numbers combine directly, dicts key by key, curves step by step (steps every seed has);
    a value that is None in any seed is None; anything else is taken from the first seed.
    """
    first = values[0]
    if isinstance(first, bool) or first is None:
        return first
    if any(v is None for v in values):
        # a share undefined in one seed (its fine-tune gained nothing) has no mean or spread either
        return None
    if isinstance(first, (int, float)):
        if how == "mean":
            return round(sum(values) / len(values), 4)
        return round(max(values) - min(values), 4)
    if isinstance(first, dict):
        return {k: combine([v[k] for v in values], how) for k in first}
    if _is_curve(first):
        steps = [s for s, _ in first if all(any(s == t for t, _ in c) for c in values)]
        return [[s, combine([dict((int(t), a) for t, a in c)[s] for c in values], how)] for s in steps]
    return first
