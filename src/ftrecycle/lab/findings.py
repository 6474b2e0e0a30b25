"""The findings the lab checks, computed from a run's numbers (never written by hand).

Each returns ``{"id", "claim", "passed", "numbers", "detail"}``; ``numbers`` holds every
value the verdict used, so the report can show them.
"""

from __future__ import annotations

from typing import Any

from ftrecycle.lab.experiments import GROUPS, STAGE2_PAIRS, pairs, same_group
from ftrecycle.lab.pretrain import VERSIONS

RECOVERY_PCT = 80  # finding 1's share of direct fine-tuning's gain
GROUP_RATIO = 2  # finding 2: within-stage gain over across-stage gain
ITER_TOLERANCE = 1.0  # finding 4: points iterative may trail direct
COMPRESS_RATIO = 8  # finding 5: a delta at least this many times smaller than dense bf16 ...
COMPRESS_LOSS = 1.0  # ... losing at most this many points against the full delta


def _r(x: float) -> float:
    return round(x, 1)


def _no_signal(values: list[float]) -> bool:
    """Whether every accuracy a finding compares is the same (e.g. all zero): nothing was measured.

    Comparisons like "≥" and "loses at most one point" hold trivially on such numbers, so a finding
    on them is never a PASS.
    """
    return len(set(values)) <= 1


def _verdict(finding: dict[str, Any], values: list[float]) -> dict[str, Any]:
    """Mark a finding with no signal in its numbers as not passed, saying why."""
    flat = _no_signal(values)
    finding["no_signal"] = flat
    if flat:
        finding["passed"] = False
        finding["detail"] += "; NO SIGNAL: every accuracy it compares is the same, so it proves nothing"
    return finding


def _curve_values(curve: list[list[float]]) -> list[float]:
    return [float(a) for _, a in curve]


def _ft_score(transfer: float, direct_ft: float) -> float | None:
    return 100 * transfer / direct_ft if direct_ft > 0 else None


def _gain(base: float, transfer: float, direct_ft: float) -> float | None:
    gain = direct_ft - base
    return 100 * (transfer - base) / gain if gain > 0 else None


def _round(x: float | None) -> float | None:
    return None if x is None else _r(x)


def pct_of_ft_score(transfer: float, direct_ft: float) -> float | None:
    """Mj + Δi as a percentage of FT(Mj)'s score (the field's first measure).

    Args:
        transfer: accuracy of Mj + Δi.
        direct_ft: accuracy of FT(Mj).

    Returns:
        The percentage to 0.1; None when FT(Mj) scored 0.
    """
    return _round(_ft_score(transfer, direct_ft))


def pct_of_gain(base: float, transfer: float, direct_ft: float) -> float | None:
    """The share of fine-tuning's gain that Mj + Δi recovers, (transfer − base) / (FT − base), in percent.

    Args:
        base: accuracy of Mj.
        transfer: accuracy of Mj + Δi.
        direct_ft: accuracy of FT(Mj).

    Returns:
        The percentage to 0.1 (negative when the transfer hurt); None when fine-tuning gained nothing
        (FT(Mj) ≤ Mj): the share is undefined there, never a division by zero.
    """
    return _round(_gain(base, transfer, direct_ft))


def _mean_defined(values: list[float | None]) -> float | None:
    # averaged unrounded: the mean of values rounded to 0.1 can be off by one in the last place
    known = [v for v in values if v is not None]
    return _r(sum(known) / len(known)) if known else None


def transfer_measures(m: dict[str, Any]) -> dict[str, Any]:
    """The transfer matrix (b) in the field's two measures: % of the target's fine-tuned score and % of the
    fine-tuning gain recovered, per ordered pair, and their means over the stage-2 pairs (M4 ↔ M5), the
    within-stage pairs and the cross-stage pairs.

    Args:
        m: one seed's (or the seed-mean) numbers: ``base``, ``transfer`` and ``direct_ft``.

    Returns:
        ``{"pairs": {"Mj+Δi": {...}}, "summary": {group: {"ft_score_pct", "gain_recovered_pct", "pairs",
        "gain_defined"}}}``; a group's mean is over the pairs where the measure is defined (``gain_defined``
        of ``pairs`` for the gain), None when none is.
    """
    raw: dict[str, dict[str, Any]] = {}
    for i, j in pairs():
        b, t, f = m["base"][j], m["transfer"][j][i], m["direct_ft"][j]["final"]
        measured = {"ft_score_pct": _ft_score(t, f), "gain_recovered_pct": _gain(b, t, f)}
        raw[f"{j}+Δ{i[1]}"] = {"source": i, "target": j, **measured}
    rows = {
        k: {**r, "ft_score_pct": _round(r["ft_score_pct"]), "gain_recovered_pct": _round(r["gain_recovered_pct"])}
        for k, r in raw.items()
    }
    groups = {
        "stage2": [r for r in raw.values() if (r["source"], r["target"]) in STAGE2_PAIRS],
        "within": [r for r in raw.values() if same_group(r["source"], r["target"])],
        "across": [r for r in raw.values() if not same_group(r["source"], r["target"])],
    }
    summary = {
        name: {
            "ft_score_pct": _mean_defined([r["ft_score_pct"] for r in group]),
            "gain_recovered_pct": _mean_defined([r["gain_recovered_pct"] for r in group]),
            "pairs": len(group),
            "gain_defined": sum(r["gain_recovered_pct"] is not None for r in group),
        }
        for name, group in groups.items()
    }
    return {"pairs": rows, "summary": summary}


def recovery(m: dict[str, Any]) -> dict[str, Any]:
    """(1) Stage-2 pairs: Mj + Δi recovers ≥ 80 % of direct fine-tuning's gain over Mj."""
    rows = []
    for i, j in (("M4", "M5"), ("M5", "M4")):
        b, t, f = m["base"][j], m["transfer"][j][i], m["direct_ft"][j]["final"]
        share = (t - b) / (f - b) if f > b else float("nan")
        rows.append(
            {
                "source": i,
                "target": j,
                "base": b,
                "transfer": t,
                "direct_ft": f,
                "recovered_pct": _r(100 * share) if share == share else None,
                "ft_score_pct": pct_of_ft_score(t, f),
            }
        )
    passed = all(r["recovered_pct"] is not None and r["recovered_pct"] >= RECOVERY_PCT for r in rows)
    finding = {
        "id": 1,
        "claim": f"for M4 ↔ M5, Mj + Δi recovers at least {RECOVERY_PCT} % of direct fine-tuning's gain over Mj",
        "passed": passed,
        "numbers": {"pairs": rows, "threshold_pct": RECOVERY_PCT},
        "detail": "recovered = (Mj+Δi − Mj) / (FT(Mj) − Mj); undefined (fail) when FT(Mj) ≤ Mj; "
        "% of FT score = Mj+Δi / FT(Mj)",
    }
    return _verdict(finding, [v for r in rows for v in (r["base"], r["transfer"], r["direct_ft"])])


def grouping(m: dict[str, Any]) -> dict[str, Any]:
    """(2) Transfers within a stage gain at least twice those across, and one cross transfer hurts."""
    gains = {(i, j): m["transfer"][j][i] - m["base"][j] for i, j in pairs()}
    within = [g for (i, j), g in gains.items() if same_group(i, j)]
    across = [g for (i, j), g in gains.items() if not same_group(i, j)]
    worst_gain, (wi, wj) = min((g, p) for p, g in gains.items() if not same_group(*p))
    w, a = sum(within) / len(within), sum(across) / len(across)
    hurt = [(i, j) for i, j in pairs() if not same_group(i, j) and m["transfer"][j][i] < m["base"][j]]
    passed = w > 0 and w >= GROUP_RATIO * a and bool(hurt)
    values = [m["transfer"][j][i] for i, j in pairs()] + [m["base"][j] for _, j in pairs()]
    return _verdict(
        {
            "id": 2,
            "claim": f"mean gain within a stage (M1–M3, M4–M5) ≥ {GROUP_RATIO} × the mean gain across stages, "
            "and at least one cross-stage transfer leaves its target below the target's own score",
            "passed": passed,
            "numbers": {
                "mean_gain_within": _r(w),
                "mean_gain_across": _r(a),
                "cross_pairs_below_target": len(hurt),
                "ratio_required": GROUP_RATIO,
                "worst_cross": {"source": wi, "target": wj, "gain": _r(worst_gain)},
            },
            "detail": f"groups {', '.join('–'.join((g[0], g[-1])) for g in GROUPS)}; gain = Mj+Δi − Mj",
        },
        values,
    )


def convergence(m: dict[str, Any], ft_steps: int) -> dict[str, Any]:
    """(3) At equal steps FT(Mj+Δi) ≥ FT(Mj) for every pair, and it reaches FT(Mj)'s final score in ≤ ⅓ the steps."""
    margins: list[tuple[float, str, str, int]] = []
    slow = []
    reach_steps = []
    for i, j in pairs():
        d = {s: a for s, a in m["direct_ft"][j]["curve"]}
        rc = m["recycle_ft"][j][i]["curve"]
        margins += [(a - d[s], i, j, s) for s, a in rc if s != 0 and s in d]
        target = m["direct_ft"][j]["final"]
        reached = next((s for s, a in rc if a >= target), None)
        reach_steps.append(reached)
        if reached is None or reached > ft_steps / 3:
            slow.append({"source": i, "target": j, "reached_at": reached})
    comparisons, held = len(margins), sum(mg >= 0 for mg, *_ in margins)
    worst_margin = min(margins)
    passed = held == comparisons and not slow
    known = [s for s in reach_steps if s is not None]
    values = [a for j in m["direct_ft"] for a in _curve_values(m["direct_ft"][j]["curve"])] + [
        a for i, j in pairs() for a in _curve_values(m["recycle_ft"][j][i]["curve"])
    ]
    return _verdict(
        {
            "id": 3,
            "claim": "at equal steps FT(Mj+Δi) ≥ FT(Mj) for every pair, and FT(Mj+Δi) reaches FT(Mj)'s "
            "final accuracy within a third of FT(Mj)'s steps",
            "passed": passed,
            "numbers": {
                "comparisons": comparisons,
                "held": held,
                "worst": {
                    "source": worst_margin[1],
                    "target": worst_margin[2],
                    "step": worst_margin[3],
                    "margin": _r(worst_margin[0]),
                },
                "pairs": len(reach_steps),
                "pairs_too_slow": len(slow),
                "third_of_steps": ft_steps // 3,
                "median_steps_to_reach": sorted(known)[len(known) // 2] if known else None,
                "too_slow": slow,
            },
            "detail": "compared at every evaluation after step 0 (at step 0 FT(Mj+Δi) is Mj+Δi, which finding 2 "
            "expects to be below Mj for some cross-stage pairs)",
        },
        values,
    )


def iterative(m: dict[str, Any]) -> dict[str, Any]:
    """(4) Iterative recycling-then-fine-tuning ≥ direct at M5, within one point."""
    last = VERSIONS[-1]
    it, di = m["iterative"][last]["iter_ft"], m["iterative"][last]["dir_ft"]
    row = m["iterative"][last]
    return _verdict(
        {
            "id": 4,
            "claim": f"at {last}, iterative recycling-then-fine-tuning ≥ direct, within {ITER_TOLERANCE:g} point",
            "passed": it >= di - ITER_TOLERANCE,
            "numbers": {"iterative": it, "direct": di, "difference": _r(it - di), "tolerance": ITER_TOLERANCE},
            "detail": "passes when iterative ≥ direct − 1",
        },
        [it, di, *(row[k] for k in ("base", "direct_ft") if k in row)],
    )


def method_of(spec: str) -> str:
    """A (g) setting's method as its curve is labelled: ``lowrank:ratio=8`` -> ``lowrank``, ``sign:axis=row``
    -> ``sign:axis=row`` (another estimator than ``sign``), ``auto:ratio=8+cal`` -> ``auto+cal``, ``none``."""
    method, _, opts = spec.partition(":")
    if method == "sign" and opts:
        return spec
    return method.removesuffix("+cal") + ("+cal" if spec.endswith("+cal") else "")


def compression(m: dict[str, Any]) -> dict[str, Any]:
    """(5) Some compression ≥ 8x smaller than the dense bf16 delta loses ≤ 1 point on both stage-2 pairs."""
    rows = []
    for spec, by_pair in m["compressed"].items():
        losses = {p: _r(m["transfer"][p[0:2]][f"M{p[-1]}"] - v["accuracy"]) for p, v in by_pair.items()}
        ratio = min(v["ratio"] for v in by_pair.values())
        rows.append({"spec": spec, "ratio": round(ratio, 1), "max_loss": max(losses.values()), "loss": losses})
    ok = [r for r in rows if r["ratio"] >= COMPRESS_RATIO and r["max_loss"] <= COMPRESS_LOSS]
    best = max(ok, key=lambda r: r["ratio"]) if ok else None
    # per method: its smallest delta (largest ratio) within the allowed loss, None where none is
    by_method: dict[str, Any] = {}
    for r in rows:
        key, top = method_of(r["spec"]), by_method.get(method_of(r["spec"]))
        if r["max_loss"] <= COMPRESS_LOSS and (top is None or r["ratio"] > top["ratio"]):
            by_method[key] = r
        else:
            by_method.setdefault(key, None)
    values = [v["accuracy"] for by_pair in m["compressed"].values() for v in by_pair.values()] + [
        m["transfer"][p[0:2]][f"M{p[-1]}"] for by_pair in m["compressed"].values() for p in by_pair
    ]
    return _verdict(
        {
            "id": 5,
            "claim": f"on M4 ↔ M5 some compressed delta ≥ {COMPRESS_RATIO}× smaller than the dense bf16 one loses at "
            f"most {COMPRESS_LOSS:g} point against the full delta on both pairs",
            "passed": bool(ok),
            "numbers": {
                "settings": rows,
                "best": best,
                "by_method": by_method,
                "ratio_required": COMPRESS_RATIO,
                "loss_allowed": COMPRESS_LOSS,
            },
            "detail": "loss = accuracy of Mj + Δi (full, float32) − accuracy of Mj + compressed Δi; ratio = dense "
            "bf16 bytes / stored bytes (the smaller of the two pairs)",
        },
        values,
    )


def all_findings(m: dict[str, Any], ft_steps: int) -> list[dict[str, Any]]:
    """The findings on the (seed-mean) numbers ``m``."""
    found = [recovery(m), grouping(m), convergence(m, ft_steps), iterative(m)]
    return found + ([compression(m)] if "compressed" in m else [])


def key_numbers(finding: dict[str, Any]) -> dict[str, float | None]:
    """The numbers a finding's verdict turns on, by name, to show as seed mean ± spread.

    Args:
        finding: one of :func:`all_findings`' records.

    Returns:
        Name -> value (None where the finding left it undefined).
    """
    n = finding["numbers"]
    fid = finding["id"]
    if fid == 1:
        out: dict[str, float | None] = {}
        for r in n["pairs"]:
            name = f"{r['target']}+Δ{r['source'][1]}"
            out[f"{name} % of gain"] = r["recovered_pct"]
            out[f"{name} % of FT score"] = r.get("ft_score_pct")
        return out
    if fid == 2:
        return {"mean gain within": n["mean_gain_within"], "mean gain across": n["mean_gain_across"]}
    if fid == 3:
        return {"comparisons held": float(n["held"]), "pairs too slow": float(n["pairs_too_slow"])}
    if fid == 4:
        return {"iterative − direct": n["difference"]}
    # compression: the least loss among the settings at least COMPRESS_RATIO× smaller
    near = [r["max_loss"] for r in n["settings"] if r["ratio"] >= n["ratio_required"]]
    return {f"least loss at ≥ {n['ratio_required']}×": min(near) if near else None}


def across_seeds(per_seed: list[list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each finding over the seeds: how many pass alone, and its key numbers' mean, min and max.

    Args:
        per_seed: :func:`all_findings` of each seed (same findings, same order).

    Returns:
        Finding id -> ``{"passed": k, "seeds": n, "key": {name: {"mean", "min", "max", "seeds", "per_seed"}}}``;
        a key number's statistics are over the seeds where it is defined (``seeds`` of them), None when none is;
        ``per_seed`` lists its value in each seed, in the order given.
    """
    out: dict[str, dict[str, Any]] = {}
    for column in zip(*per_seed, strict=True):
        keys = [key_numbers(f) for f in column]
        stats: dict[str, Any] = {}
        for name in keys[0]:
            known = [float(v) for k in keys if (v := k.get(name)) is not None]
            stats[name] = {
                "mean": _r(sum(known) / len(known)) if known else None,
                "min": min(known) if known else None,
                "max": max(known) if known else None,
                "seeds": len(known),
                "per_seed": [k.get(name) for k in keys],
            }
        passed = sum(bool(f["passed"]) for f in column)
        out[str(column[0]["id"])] = {"passed": passed, "seeds": len(column), "key": stats}
    return out
