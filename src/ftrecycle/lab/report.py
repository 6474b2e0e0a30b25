"""``report.md`` and the PNG plots, made from ``results.json`` alone.

Every number the report shows is read from the results record passed in (the lab's own
numbers, the findings' numbers and the paper's reference numbers all live there), so the
report can be rebuilt from ``results.json`` without rerunning anything.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftrecycle.io.output import replaced_file
from ftrecycle.lab.config import NOT_EVIDENCE
from ftrecycle.lab.findings import compression, method_of
from ftrecycle.lab.signals import SIGNALS

V = ("M1", "M2", "M3", "M4", "M5")
PLOTS = {
    "transfer_matrix": "transfer_matrix.png",
    "recycle_curves": "recycle_curves.png",
    "iterative_curves": "iterative_curves.png",
    "direct_ft_curves": "direct_ft_curves.png",
    "diagnostics": "diagnostics.png",
    "compression": "compression.png",
    "delta_size_sweep": "delta_size_sweep.png",
}
SIZE_COLUMNS = ("total", "embeddings", "attention", "mlp", "norms")
STAGE2_LIMIT_PCT = 5.0  # issue 13: the default preset's stage-2 fine-tuning deltas at or below this


def _f(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.1f}"
    return str(x)


def _xy(curve: list[list[float]]) -> tuple[list[float], list[float]]:
    return [p[0] for p in curve], [p[1] for p in curve]


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return out


def _sub(x: float, gain: float) -> str:
    return f"{x:.1f} ({gain:+.1f})"


def _transfer_table(m: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = [["base (zero-shot)", *[m["base"][j] for j in V]]]
    for i in V:
        rows.append([f"+ Δ{i[1]}", *[m["transfer"][j][i] if i != j else None for j in V]])
    rows.append(["Direct FT", *[m["direct_ft"][j]["final"] for j in V]])
    return rows


def _paper_transfer_table(p: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = [["OLMo 2 7B", *[p["base"][j] for j in V]]]
    for i in V:
        rows.append([f"+ Δ{i[1]}", *[p["transfer"][i].get(j) for j in V]])
    rows.append(["Direct FT", *[p["direct_ft"][j] for j in V]])
    return rows


def _recovery_text(n: dict[str, Any]) -> str:
    return "; ".join(
        f"{r['target']}+Δ{r['source'][1]}: {_f(r['transfer'])} vs {r['target']} {_f(r['base'])} and "
        f"FT({r['target']}) {_f(r['direct_ft'])} → {_f(r['recovered_pct'])} % of the gain recovered, "
        f"{_f(r.get('ft_score_pct'))} % of FT's score"
        for r in n["pairs"]
    )


def _grouping_text(n: dict[str, Any]) -> str:
    w = n["worst_cross"]
    return (
        f"mean gain within {_f(n['mean_gain_within'])}, across {_f(n['mean_gain_across'])}; "
        f"{n['cross_pairs_below_target']} cross-stage transfers below their target "
        f"(worst {w['target']}+Δ{w['source'][1]}: {_f(w['gain'])})"
    )


def _convergence_text(n: dict[str, Any]) -> str:
    w = n["worst"]
    return (
        f"{n['held']} of {n['comparisons']} equal-step comparisons hold "
        f"(worst FT({w['target']}+Δ{w['source'][1]}) at step {w['step']}: {_f(w['margin'])}); "
        f"{n['pairs'] - n['pairs_too_slow']} of {n['pairs']} pairs reach FT(Mj)'s final accuracy within "
        f"{n['third_of_steps']} steps (median {_f(n['median_steps_to_reach'])})"
    )


def _iterative_text(n: dict[str, Any]) -> str:
    return f"iterative {_f(n['iterative'])}, direct {_f(n['direct'])} (difference {_f(n['difference'])})"


def _compression_text(n: dict[str, Any]) -> str:
    b = n["best"]
    if b is not None:
        return f"`{b['spec']}`: {_f(b['ratio'])}× smaller, loses at most {_f(b['max_loss'])} points"
    near = [r for r in n["settings"] if r["ratio"] >= n["ratio_required"]]
    low = min(near, key=lambda r: r["max_loss"]) if near else None
    return "no setting qualifies" + (
        f"; the least loss at ≥ {n['ratio_required']}×: `{low['spec']}` ({_f(low['ratio'])}×) loses "
        f"{_f(low['max_loss'])} points"
        if low
        else ""
    )


#: How each finding's numbers read in the findings table, by finding id (5 and any later: compression).
_FINDING_TEXT: dict[int, Callable[[dict[str, Any]], str]] = {
    1: _recovery_text,
    2: _grouping_text,
    3: _convergence_text,
    4: _iterative_text,
}


def _across_text(key: dict[str, dict[str, Any]]) -> str:
    """A finding's key numbers over the seeds: mean (min–max over the seeds where each is defined)."""
    parts = []
    for name, st in key.items():
        if st["mean"] is None:
            parts.append(f"{name}: undefined in every seed")
        else:
            parts.append(f"{name}: {_f(st['mean'])} ({_f(st['min'])}–{_f(st['max'])}, {st['seeds']} seeds)")
    return "; ".join(parts)


def _findings(
    findings: list[dict[str, Any]], per_seed: dict[str, list[bool]], across: dict[str, Any] | None = None
) -> list[str]:
    """The findings table; ``across`` (results' ``findings_across_seeds``) adds each finding's key numbers."""
    head = ["#", "finding", "verdict (seed mean)", "seeds passing", "numbers (seed mean)"]
    lines = ["| " + " | ".join([*head, "key numbers: mean of seeds (min–max)"]) + " |", "|---" * 6 + "|"]
    for f in findings:
        txt = _FINDING_TEXT.get(f["id"], _compression_text)(f["numbers"])
        seeds = per_seed.get(str(f["id"]), [])
        verdict = f"**{'PASS' if f['passed'] else 'FAIL'}**" + (" (no signal)" if f.get("no_signal") else "")
        a = (across or {}).get(str(f["id"]))
        spread = _across_text(a["key"]) if a is not None else "–"
        lines.append(f"| {f['id']} | {f['claim']} | {verdict} | {sum(seeds)} of {len(seeds)} | {txt} | {spread} |")
    return lines


def _seeds_note(results: dict[str, Any]) -> list[str]:
    """How many seeds the findings rest on, and how their verdicts and spreads are made."""
    n = len(results["config"]["seeds"])
    if n == 1:
        return [
            "The findings rest on **one seed**: the verdict is that seed's, and there is no spread to show "
            "(one fine-tuning run can swing by many points between seeds; read them as such).",
            "",
        ]
    return [
        f'The findings rest on **{n} seeds**. The verdict is computed on the seed-mean numbers; "seeds passing" '
        "counts the seeds whose own numbers pass; the key numbers are the mean of the per-seed values with their "
        "min–max range over the seeds.",
        "",
    ]


def _confusion(c: dict[str, Any]) -> list[str]:
    """(f)'s confusion tables: the verdict against the measured sign of the gain, per seed and overall."""
    out = [
        f"The verdict against the measured sign of the gain (harmful: a gain of {c['harmful_at']:g} points or "
        "less), per seed and over all seeds:",
        "",
    ]
    for name, t in [*((f"seed {s}", v) for s, v in c["per_seed"].items()), ("all seeds", c["overall"])]:
        rows = [[v, n["gain > 0"], n["gain ≤ 0"], n["harmful"]] for v, n in t["table"].items()]
        out += [
            f"**{name}**: verdict sign agrees (helps & gain > 0, or hurts & gain ≤ 0) on **{t['agree']} of "
            f"{t['pairs']}** pairs; harmful pairs called likely helps: **{t['harmful_called_helps']}**.",
            "",
            *_table(["verdict", "gain > 0", "gain ≤ 0", "of which harmful"], rows),
            "",
        ]
    return out


def _diagnostics(results: dict[str, Any]) -> list[str]:
    d = results["diagnostics_summary"]
    rows = [
        [
            f"{r['target']}+Δ{r['source'][1]}",
            r["gain"],
            r["verdict"],
            *["–" if r.get(k) is None else str(r[k]) for k in SIGNALS],
            str(r["best_alpha"]),
        ]
        for r in d["pairs"]
    ]
    auto = [
        [name, str(v["alpha"]), v.get("alpha_method", "loss"), v["accuracy"], v["accuracy_alpha_1"]]
        for name, v in d["alpha_auto"].items()
    ]
    rho = d["spearman"]
    return [
        "## (f) Does `diagnose` predict the gain? (issue: diagnostics)",
        "",
        "For every ordered pair, `ftrecycle diagnose` (geometry streamed from the checkpoints; the probe on the "
        "first training problems as calibration data) beside the measured gain of Mj + Δi over Mj:",
        "",
        *_table(["pair", "gain", "verdict", *SIGNALS, "best α"], rows),
        "",
        "Spearman rank correlation with the measured gain, over the pairs:",
        "",
        *_table(
            ["signal", "meaning", "Spearman ρ"],
            [[k, SIGNALS[k], "–" if rho[k] is None else str(rho[k])] for k in SIGNALS],
        ),
        "",
        f"Best predictor here: **{d['best_signal']}**. diagnose's score reaches ρ ≥ {d['target']}: "
        f"**{'yes' if d['score_meets_target'] else 'no'}**.",
        "",
        *(_confusion(d["confusion"]) if "confusion" in d else []),
        "`--alpha auto` (α of highest accuracy on the calibration items among the 3 of lowest loss, or of lowest "
        "loss without answers) on the stage-2 pairs, against α = 1:",
        "",
        *_table(["pair", "α chosen", "chosen by", "accuracy, α auto", "accuracy, α = 1"], auto),
        "",
        "α auto at least as accurate as α = 1 on every stage-2 pair: "
        f"**{'yes' if d['alpha_auto_not_worse'] else 'no'}**.",
        "",
        *_figure("diagnostics", "diagnostics"),
    ]


def _compression(m: dict[str, Any]) -> list[str]:
    comp = m["compressed"]
    pairs = list(next(iter(comp.values())))
    full = {p: m["transfer"][p[:2]][f"M{p[-1]}"] for p in pairs}
    rows: list[list[Any]] = [["full Δ (float32)", "–", "–", *[full[p] for p in pairs]]]
    for spec, by_pair in comp.items():
        ratio = min(v["ratio"] for v in by_pair.values())
        err = max(v["median_error"] for v in by_pair.values())
        label = "dense bf16" if spec == "none" else f"`{spec}`"
        rows.append(
            [
                label,
                f"{ratio:.1f}×",
                str(err),
                *[_sub(v["accuracy"], v["accuracy"] - full[p]) for p, v in by_pair.items()],
            ]
        )
    return [
        "## (g) Compressed deltas (issue: deltas as portable artifacts)",
        "",
        "Δi of the stage-2 pairs stored by `ftrecycle diff --delta-dtype bfloat16 --compress SPEC` and applied "
        "with `ftrecycle apply`. Size ratio against the dense bf16 delta (the smaller of the two pairs), the "
        "median relative reconstruction error of the compressed matrices, and accuracy (change against the full "
        "float32 Δ in brackets):",
        "",
        *_table(["Δ stored as", "ratio", "median rel. error", *[f"{p} accuracy" for p in pairs]], rows),
        "",
        *_by_method(m),
        *_infeasible(m),
        *_figure("compression", "compression"),
    ]


def _infeasible(m: dict[str, Any]) -> list[str]:
    """The (g) settings this model's shapes cannot take (``diff`` refused them), if any."""
    skipped = m.get("compressed_infeasible") or []
    if not skipped:
        return []
    return [f"Not run (the model's matrices are too small for them): {', '.join(f'`{c}`' for c in skipped)}.", ""]


def _by_method(m: dict[str, Any]) -> list[str]:
    """Finding 5's curve read per method: its smallest delta within the allowed loss."""
    f = compression(m)["numbers"]
    rows = [
        [f"`{method}`", "none" if r is None else f"`{r['spec']}`", "–" if r is None else f"{r['ratio']:.1f}×",
         "–" if r is None else _f(r["max_loss"])]
        for method, r in f["by_method"].items()
    ]  # fmt: skip
    return [
        f"Per method, the most compressed setting that loses at most {_f(f['loss_allowed'])} point on both pairs "
        "(none: every setting loses more):",
        "",
        *_table(["method", "setting", "× smaller than dense bf16", "points lost (worse pair)"], rows),
        "",
    ]


def pct2(x: Any) -> str:
    """A percentage of a relative norm: two decimals, since real fine-tuning deltas are a few percent or less."""
    return "–" if x is None else f"{x:.2f}"


def _sizes_text(results: dict[str, Any]) -> str:
    """The comparison with published update sizes and rates, from this run's numbers."""
    cfg, u = results["config"], results["mean"]["update_sizes"]
    pub, lr = u["published"], u["lr"]
    stage2 = {v: u["finetunes"][f"ft-{v}"]["total"] for v in ("M4", "M5")}
    known = [x for x in stage2.values() if x is not None]
    within = bool(known) and max(known) <= STAGE2_LIMIT_PCT
    llama = pub["llama31_instruct_delta_pct"]["value"]
    side = "–" if not known else ("below" if max(known) < llama else "not below")
    return (
        f"Stage-2 fine-tuning deltas: ‖FT(M4) − M4‖/‖M4‖ = {pct2(stage2['M4'])} %, ‖FT(M5) − M5‖/‖M5‖ = "
        f"{pct2(stage2['M5'])} % — at or below {STAGE2_LIMIT_PCT:g} %: **{'yes' if within else 'no'}**; "
        f"{side} the published {llama:g} % ({pub['llama31_instruct_delta_pct']['source']}; also "
        f"{pub['sft_delta_entry_abs']['source']}). Pretraining peak over fine-tuning rate ({cfg['ft_lr']:g}): "
        f"{lr['pretrain_peak_over_ft']:g} for stage 1 ({cfg['pretrain']['lr']:g}), {lr['stage2_peak_over_ft']:g} for "
        f"stage 2 ({cfg['pretrain']['stage2_lr']:g}); the paper's: {lr['olmo2_peak_over_paper_ft']:g}, OLMo 2 7B's "
        f"peak {pub['olmo2_7b_pretrain_peak_lr']['value']} ({pub['olmo2_7b_pretrain_peak_lr']['source']}) over "
        f"the paper's fine-tuning rate {pub['paper_ft_lr']['value']} ({pub['paper_ft_lr']['source']})."
    )


def _sizes(results: dict[str, Any]) -> list[str]:
    u = results["mean"]["update_sizes"]
    rows: list[list[Any]] = [
        [f"FT({name[3:]}) − {name[3:]}", *[pct2(e[k]) for k in SIZE_COLUMNS]] for name, e in u["finetunes"].items()
    ]
    rows += [
        [f"{k.replace('->', ' → ')} (version step)", *[pct2(e[c]) for c in SIZE_COLUMNS]]
        for k, e in u["version_steps"].items()
    ]
    rows.append(["lang-FT(M4) − FT(M4)", *[pct2(u["language"][c]) for c in SIZE_COLUMNS]])
    rows += [
        [f"`{name}` − {name[3:5]}", *[pct2(e[c]) for c in SIZE_COLUMNS]] for name, e in u["sweep_finetunes"].items()
    ]
    return [
        "## Update sizes ‖Δ‖/‖W‖",
        "",
        "Relative Frobenius norm ‖B − A‖/‖A‖ in percent, over all weights and by module type (streamed by "
        "`ftrecycle.diagnose.geometry`): each direct fine-tune against its base, each version step Mi → Mj "
        "against Mi, the second-language fine-tune against FT(M4), and (h)'s fine-tunes at other rates "
        "(`ft-Mi@lrS`: S × ft_lr).",
        "",
        *_table(["update", *[f"{c} (%)" for c in SIZE_COLUMNS]], rows),
        "",
        _sizes_text(results),
        "",
    ]


def _sweep(m: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    sw = m["sweep"]
    rows: list[list[Any]] = []
    for tag, sc in sw.items():
        for pair, p in sc["pairs"].items():
            rows.append(
                [
                    f"×{tag}",
                    pair,
                    pct2(p["delta_rel_pct"]),
                    p["base"],
                    p["finetuned"],
                    p["transfer"],
                    p["recovery_pct"],
                    p["of_ft_pct"],
                ]
            )
    header = [
        "ft_lr ×",
        "pair",
        "‖Δi‖/‖Mi‖ (%)",
        "Mj",
        "FT(Mj) at this rate",
        "Mj + Δi",
        "gain recovered (%)",
        "% of FT(Mj)",
    ]
    return [
        "## (h) Δ-size sweep (issue 13; no published study has it)",
        "",
        f"M4 and M5 fine-tuned directly with the recipe of (a) ({cfg['ft_steps']} steps) at each multiple of "
        f"ft_lr {cfg['ft_lr']:g}; Mj + Δi carried between them without training, as in finding 1. Gain recovered: "
        "(Mj + Δi − Mj) / (FT(Mj) − Mj), with FT(Mj) fine-tuned at the same rate; % of FT(Mj): Mj + Δi / FT(Mj) "
        "(– where FT(Mj) gained nothing).",
        "",
        *_table(header, rows),
        "",
        "Each compression stores Δi as a bf16 delta compressed by that spec; the share of the dense transfer's gain "
        "over the target that it keeps, (compressed − base) / (dense − base) in percent, and its measured size ratio "
        "against dense bf16, per rate and pair:",
        "",
        *_sweep_compressed(sw, list(cfg["sweep_compressions"])),
        "",
        *_figure("Δ-size sweep", "delta_size_sweep"),
    ]


def not_evidence(results: dict[str, Any]) -> str | None:
    """Why a run's numbers are not evidence (None when they may be): a smoke run, or findings with no signal."""
    preset = results["config"].get("preset")
    if preset in NOT_EVIDENCE:
        return (
            f"the `{preset}` preset only exercises every stage with a handful of steps on a toy model; "
            "its accuracies mean nothing and its verdicts are not findings"
        )
    flat = [str(f["id"]) for f in results["findings"] if f.get("no_signal")]
    if flat:
        return (
            f"finding(s) {', '.join(flat)} compare accuracies that are all the same (no signal); "
            "train longer or on a larger test set before reading them"
        )
    return None


def _banner(results: dict[str, Any]) -> list[str]:
    why = not_evidence(results)
    if why is None:
        return []
    return [f"> **NOT EVIDENCE** — {why}.", ""]


def _intro(results: dict[str, Any]) -> list[str]:
    cfg = results["config"]
    seeds = cfg["seeds"]
    return [
        f"# ftrecycle lab report: preset `{cfg['preset']}`",
        "",
        *_banner(results),
        f"One Llama-architecture model ({results['parameters']:,} parameters, hidden {cfg['model']['hidden']}, "
        f"{cfg['model']['layers']} layers, tied embeddings) pretrained here in two stages; versions M1–M3 are saved "
        "along stage 1 (general text, cosine decay) and M4–M5 along stage 2 (math-rich text, linear anneal). "
        f"Every version is fine-tuned on the same {cfg['train_items']:,} GSM8K-format problems; accuracy is "
        f"lm-eval's gsm8k flexible-extract exact match, zero-shot, on {cfg['test_items']:,} held-out problems "
        f"(one problem is {100 / cfg['test_items']:.2f} points). Seeds: {', '.join(map(str, seeds))}; "
        + ("tables show the seed mean, spreads are in results.json." if len(seeds) > 1 else "one seed.")
        + f" Wall time: {results['seconds']:.0f} s.",
        "",
        "The paper's tables (OLMo 2 7B, Llama 3 8B) sit beside ours to compare shapes, not values.",
        "",
        "## Findings",
        "",
        *_banner(results),
        *_seeds_note(results),
        *_findings(results["findings"], results.get("findings_per_seed", {}), results.get("findings_across_seeds", {})),
        "",
    ]


def _sweep_compressed(sw: dict[str, Any], specs: list[str]) -> list[str]:
    """(h)'s compressed transfers: one row per spec, one column per rate and pair."""
    cols = [(tag, pair) for tag, sc in sw.items() for pair in sc["pairs"]]
    rows = []
    for c in [c for c in specs if all(c in sw[t]["pairs"][p]["compressed"] for t, p in cols)]:
        cells = []
        for tag, pair in cols:
            v = sw[tag]["pairs"][pair]["compressed"][c]
            cells.append(f"{_f(v['of_dense_pct'])} ({v['ratio']:.1f}×)")
        rows.append([f"`{c}`", *cells])
    return _table(["Δ stored as", *[f"×{tag} {pair}" for tag, pair in cols]], rows)


def _figure(alt: str, key: str, caption: str | None = None) -> list[str]:
    """A section's plot, and the paper's caption of the figure it mirrors."""
    return [f"![{alt}]({PLOTS[key]})", "", *([caption, ""] if caption is not None else [])]


def _paper(label: str, header: list[str], rows: list[list[Any]]) -> list[str]:
    """The paper's table that a section mirrors, under our own."""
    return [f"{label}:", "", *_table(header, rows), ""]


def _paper_rows(table: dict[str, Any], columns: list[str], names: tuple[tuple[str, str], ...]) -> list[list[Any]]:
    """Rows of a paper table: one per (label, key), one cell per column."""
    return [[name, *[table[k][c] for c in columns]] for name, k in names]


def _direct(m: dict[str, Any], paper: dict[str, Any]) -> list[str]:
    steps = sorted({s for s, _ in m["direct_ft"]["M1"]["curve"]})
    return [
        "## (a) Direct fine-tuning: accuracy against steps (paper Table 12)",
        "",
        *_table(["step", *V], [[s, *[dict(map(tuple, m["direct_ft"][v]["curve"])).get(s) for v in V]] for s in steps]),
        "",
        *_paper(
            "Paper Table 12",
            ["step", *V],
            [[s, *[paper["table12"]["accuracy"][v][k] for v in V]] for k, s in enumerate(paper["table12"]["steps"])],
        ),
        *_figure("direct fine-tuning", "direct_ft_curves"),
    ]


def _measures(m: dict[str, Any], spread: dict[str, Any], paper: dict[str, Any]) -> list[str]:
    """The transfer matrix in the field's two measures, beside the published ones."""
    if "measures" not in m:
        return []
    summ, sp = m["measures"]["summary"], spread.get("measures", {}).get("summary", {})
    names = {"stage2": "second-stage pairs (M4 ↔ M5)", "within": "within-stage pairs", "across": "cross-stage pairs"}
    rows: list[list[Any]] = []
    for key, label in names.items():
        r, s = summ[key], sp.get(key, {})
        rows.append(
            [
                label,
                r["ft_score_pct"],
                s.get("ft_score_pct"),
                r["gain_recovered_pct"],
                s.get("gain_recovered_pct"),
                f"{int(r['gain_defined'])} of {int(r['pairs'])}",  # a seed mean of counts: the same in every seed
            ]
        )
    field = paper.get("field_measures", {})
    theirs = [[name, v["ft_score_pct"], v["gain_recovered_pct"]] for name, v in field.items()]
    return [
        "In the field's two measures: Mj + Δi as % of FT(Mj)'s score, and % of fine-tuning's gain recovered, "
        "(Mj + Δi − Mj) / (FT(Mj) − Mj), undefined where FT(Mj) ≤ Mj. The table computes them from the seed-mean "
        "accuracies, as the findings are, averaged over the pairs where they are defined; the spread is max − min of "
        "the same numbers computed on each seed alone:",
        "",
        *_table(
            ["pairs", "% of FT score", "spread", "% of gain recovered", "spread", "pairs with a gain"],
            rows,
        ),
        "",
        *(
            _paper("Published (quoted in issue 13, from the literature)", ["", "% of FT score", "% of gain"], theirs)
            if theirs
            else []
        ),
    ]


def _transfer(m: dict[str, Any], paper: dict[str, Any], spread: dict[str, Any] | None = None) -> list[str]:
    return [
        "## (b) Transfer matrix Mj + Δi, no training (paper Table 2)",
        "",
        *_table(["", *V], _transfer_table(m)),
        "",
        *_measures(m, spread or {}, paper),
        *_paper("Paper Table 2", ["", *V], _paper_transfer_table(paper["table2"])),
        *_figure("transfer matrix", "transfer_matrix"),
    ]


def _timing(results: dict[str, Any]) -> list[str]:
    """Where the time goes: job seconds by kind, with fine-tuning's split into training, evaluation, start-up."""
    t = results.get("timing")
    if t is None:
        return []
    # by_kind is in the lab's order of kinds (run.JOB_KINDS)
    rows = [
        [kind, r["jobs"], r["seconds"], r["share_pct"], r["train_s"], r["eval_s"], r["setup_s"]]
        for kind, r in t["by_kind"].items()
    ]
    n = t["untimed_jobs"]
    untimed = f" {n} jobs have no time on record (cached by an older version)." if n else ""
    return [
        "## Where the time goes",
        "",
        f"This call took {_f(t['wall_s'])} s of wall time with {t['workers']} worker(s); the jobs' own wall "
        f"seconds (each timed in its worker, kept with its cached result, so a job reused from the cache counts "
        f"the time it took when it ran) add up to {_f(t['job_s'])} s.{untimed} For fine-tuning jobs, training is the "
        "training loop less its periodic evaluations, evaluation is the generation-based scoring every "
        "`eval_every` steps, and start-up is everything else in the job (loading model and data, tokenizing, "
        "writing the output); the iterative chain reports its evaluations only.",
        "",
        *_table(
            ["kind", "jobs", "seconds", "% of job seconds", "training (s)", "evaluation (s)", "start-up (s)"], rows
        ),
        "",
    ]


def _recycle(m: dict[str, Any], paper: dict[str, Any], recycle_steps: int) -> list[str]:
    def cell(i: str, j: str) -> str | None:
        if i == j:
            return None
        r = m["recycle_ft"][j][i]["final"]
        return _sub(r, r - m["transfer"][j][i])

    return [
        "## (c) Recycling-then-fine-tuning FT(Mj + Δi) (paper Table 4, Figure 2)",
        "",
        f"After {recycle_steps} steps; in brackets the gain over Mj + Δi before training.",
        "",
        *_table(
            ["", *V],
            [[f"+ Δ{i[1]} → FT", *[cell(i, j) for j in V]] for i in V]
            + [["Direct FT", *[m["direct_ft"][j]["final"] for j in V]]],
        ),
        "",
        *_paper("Paper Table 4", ["", *V], [[f"+ Δ{i[1]} → FT", *[paper["table4"][i].get(j) for j in V]] for i in V]),
        *_figure("recycling-then-fine-tuning curves", "recycle_curves", paper["figures"]["figure2"]),
    ]


def _iterative(m: dict[str, Any], paper: dict[str, Any]) -> list[str]:
    it = m["iterative"]
    ours = ["", *list(it)]
    theirs = ["", "M3", "M4", "M5"]

    def rows(names: tuple[tuple[str, str], ...]) -> list[list[Any]]:
        return [[name, *[r[k] for r in it.values()]] for name, k in names]

    return [
        "## (d) Iterative vs direct recycling (paper Tables 6 and 11, Figure 3)",
        "",
        "With fine-tuning (Table 6):",
        "",
        *_table(
            ours,
            rows(
                (("base", "base"), ("+ Δ^dir → FT", "dir_ft"), ("+ Δ^iter → FT", "iter_ft"), ("Direct FT", "direct_ft"))
            ),
        ),
        "",
        *_paper(
            "Paper Table 6",
            theirs,
            _paper_rows(
                paper["table6"],
                theirs[1:],
                (("OLMo 2 7B", "base"), ("+ Δ^dir", "dir"), ("+ Δ^iter", "iter"), ("Direct FT", "direct_ft")),
            ),
        ),
        "Without fine-tuning (Table 11):",
        "",
        *_table(ours, rows((("base", "base"), ("+ Δ^dir", "dir_no_ft"), ("+ Δ^iter", "iter_no_ft")))),
        "",
        *_paper(
            "Paper Table 11",
            theirs,
            _paper_rows(
                paper["table11"], theirs[1:], (("OLMo 2 7B", "base"), ("+ Δ^dir", "dir"), ("+ Δ^iter", "iter"))
            ),
        ),
        *_figure("iterative vs direct", "iterative_curves", paper["figures"]["figure3"]),
    ]


def _language(m: dict[str, Any], paper: dict[str, Any]) -> list[str]:
    ml, t3 = m["multilingual"], paper["table3"]
    return [
        "## (e) A second language (paper Table 3)",
        "",
        "The instruction-tuned versions are FT(M4) and FT(M5). FT(M4) is fine-tuned further on the task written "
        "in a second, made-up language (a fixed word-for-word cipher; numbers and the answer format kept), and "
        "that diff is added to FT(M5). Accuracy on the second-language test set:",
        "",
        *_table(
            ["model", "second language"],
            [
                ['FT(M4) ("3.0 Instruct")', ml["M4_instruct"]],
                ["+ FT on the language", ml["M4_instruct_ft"]],
                ['FT(M5) ("3.1 Instruct")', ml["M5_instruct"]],
                ["+ Δ (language)", ml["M5_instruct_plus_delta"]],
            ],
        ),
        "",
        *_paper(
            "Paper Table 3 (Global-MMLU)",
            ["model", *t3],
            [
                [name, *[t3[lang][k] for lang in t3]]
                for name, k in (
                    ("Llama 3.0 8B Instruct", "old"),
                    ("+ FT", "old_ft"),
                    ("Llama 3.1 8B Instruct", "new"),
                    ("+ Δ3.0", "new_plus_delta"),
                )
            ],
        ),
    ]


#: Issue 13's targets for the default preset: direct fine-tuning ends inside the band on every version,
#: stage-2 fine-tuning deltas are at most the limit, (h)'s Δ sizes span the factor, the run takes at most
#: the wall time (the demo's budget on 2 cores).
TARGETS: dict[str, Any] = {
    "no_ceiling_band": [40.0, 90.0],
    "stage2_limit_pct": STAGE2_LIMIT_PCT,
    "sweep_span": 10.0,
    "wall_limit_s": 900.0,
}


def design_targets(results: dict[str, Any]) -> list[str]:
    """Whether a run meets the lab's design targets (no ceiling, small stage-2 deltas, bases above 0, seeds).

    Args:
        results: a lab run's results.json.

    Returns:
        A markdown table, one row per target: what it asks, this run's numbers, met or not met.
    """
    m, cfg, seeds = results["mean"], results["config"], list(results["per_seed"].values())
    t = {**TARGETS, **results.get("targets", {})}
    lo, hi = t["no_ceiling_band"]
    finals = {v: m["direct_ft"][v]["final"] for v in m["direct_ft"]}
    singles = [d["final"] for s in seeds for d in s["direct_ft"].values()]
    stage2 = [
        e["total"]
        for s in seeds
        for k, e in s.get("update_sizes", {}).get("finetunes", {}).items()
        if k in ("ft-M4", "ft-M5") and e["total"] is not None
    ]
    bases = [x for s in seeds for x in s["base"].values()]
    sizes = [p["delta_rel_pct"] for sc in m.get("sweep", {}).values() for p in sc["pairs"].values()]
    sizes = [x for x in sizes if x]
    span = max(sizes) / min(sizes) if sizes else None

    def mark(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    rows = [
        [
            f"no ceiling: direct fine-tuning of every Mi ends within {lo:g}–{hi:g} (seed mean)",
            ", ".join(f"{v} {_f(x)}" for v, x in finals.items()) + f" (single seeds {_f(min(singles))}–"
            f"{_f(max(singles))})",
            mark(all(lo <= x <= hi for x in finals.values())),
        ],
        [
            f"fine-tuning deltas of the stage 2 versions, ‖Δ‖/‖W‖ ≤ {t['stage2_limit_pct']:g} % (every seed)",
            f"{pct2(min(stage2))}–{pct2(max(stage2))} %" if stage2 else "–",
            mark(bool(stage2) and max(stage2) <= t["stage2_limit_pct"]),
        ],
        ["bases' zero-shot scores above 0 (every seed)", f"lowest {_f(min(bases))}", mark(min(bases) > 0)],
        [
            f"(h) Δ sizes span at least {t['sweep_span']:g}×",
            f"{pct2(min(sizes))}–{pct2(max(sizes))} %" if span else "–",
            mark(span is not None and span >= t["sweep_span"]),
        ],
        ["findings on at least 2 seeds", str(len(cfg["seeds"])), mark(len(cfg["seeds"]) >= 2)],
        _wall_row(results, t["wall_limit_s"], mark),
    ]
    return _table(["target", "this run", ""], rows)


def _wall_row(results: dict[str, Any], limit: float, mark: Callable[[bool], str]) -> list[str]:
    """The wall-time target: this call's, or, where the call reused finished jobs, at least their own
    seconds over the workers (what a fresh run could not beat), whichever is larger."""
    seconds = float(results["seconds"])
    t = results.get("timing") or {}
    floor = t["job_s"] / t["workers"] if t.get("job_s") and t.get("workers") else None
    text = f"{_f(seconds)} s"
    if floor is not None and floor > seconds:
        text += f" (reusing finished jobs; a fresh run: at least {floor:.0f} s, their own seconds over {t['workers']})"
    return [
        f"a run's wall time at most {limit:g} s",
        text,
        mark(max(seconds, floor or 0.0) <= limit),
    ]


def _targets(results: dict[str, Any]) -> list[str]:
    return [
        "## Design targets (issue 13)",
        "",
        "What makes the lab able to tell methods apart, checked on this run's numbers.",
        "",
        *design_targets(results),
        "",
    ]


def _gain(x: Any) -> str:
    return "–" if x is None else f"{x:+.1f}"


def _masking(results: dict[str, Any]) -> list[str]:
    """(i): plain against gradient-sign-masked transfer on every pair, and on the pairs plain transfer hurts."""
    mean = results["masking"]["mean"]
    ns = list(mean)
    by_pair = {n: {r["pair"]: r for r in mean[n]["rows"]} for n in ns}
    first = mean[ns[0]]["rows"]
    rows = [
        [r["pair"], _gain(r["plain_gain"]), *[_gain(by_pair[n][r["pair"]]["masked_gain"]) for n in ns],
         *[by_pair[n][r["pair"]]["kept_pct"] for n in ns]]
        for r in first
    ]  # fmt: skip
    out = [
        "## (i) Gradient-sign mask (GradFix) against plain transfer",
        "",
        "Mj + (mask ⊙ Δi): an entry of Δi is kept only where its sign agrees with Mj's descent direction, the "
        "sign of −∇L(Mj) summed over the first N training problems (`transfer --mask grad-sign`), or with "
        "'majority' a majority vote of those N problems' own signs (`ftrecycle mask --vote majority`, GradFix's "
        "few-sample estimator); kept entries are not rescaled. Gains are points over Mj's zero-shot accuracy "
        "(seed mean); 'kept %' is the share of Δi's non-zero entries the mask kept.",
        "",
        *_table(["pair", "plain gain", *[f"masked gain, N={n}" for n in ns], *[f"kept %, N={n}" for n in ns]], rows),
        "",
    ]
    for n in ns:
        a, h = mean[n]["all"], mean[n]["harmful"]
        out.append(
            f"- N = {n}: over all {a['pairs']} pairs the mean gain is {_gain(a['mean_plain_gain'])} plain and "
            f"{_gain(a['mean_masked_gain'])} masked (masked better on {a['masked_better']}, worse on "
            f"{a['masked_worse']}); {mean[n]['made_harmful']} pair(s) that plain transfer helps are hurt when masked."
        )
        if h["pairs"]:
            out.append(
                f"  On the {h['pairs']} pair(s) where plain transfer hurts ({', '.join(h['names'])}): mean gain "
                f"{_gain(h['mean_plain_gain'])} plain, {_gain(h['mean_masked_gain'])} masked; the masked transfer "
                f"loses less on **{h['loses_less']} of {h['pairs']}**."
            )
        else:
            out.append("  Plain transfer hurts no pair here (seed mean).")
        for seed, s in results["masking"]["per_seed"].items():
            sh = s[n]["harmful"]
            out.append(
                f"  Seed {seed}: {sh['pairs']} harmful pair(s), mean gain {_gain(sh['mean_plain_gain'])} plain, "
                f"{_gain(sh['mean_masked_gain'])} masked, masked loses less on {sh['loses_less']}."
            )
    return [*out, ""]


def render(results: dict[str, Any]) -> str:
    """The markdown report of a lab run (headed by a NOT EVIDENCE warning for smoke runs and flat numbers)."""
    m, paper = results["mean"], results["paper"]
    out = [
        *_intro(results),
        *_targets(results),
        *_timing(results),
        *_direct(m, paper),
        *_transfer(m, paper, results.get("spread")),
        *_recycle(m, paper, results["config"]["recycle_steps"]),
        *_iterative(m, paper),
        *_language(m, paper),
        *(_diagnostics(results) if "diagnostics_summary" in results else []),
        *(_masking(results) if "masking" in results else []),
        *(_compression(m) if "compressed" in m else []),
        *(_sizes(results) if "update_sizes" in m else []),
        *(_sweep(m, results["config"]) if "sweep" in m else []),
    ]
    return "\n".join(out)


def _save(fig: Any, path: Path, *, dpi: int) -> None:
    """One PNG, replacing ``path`` only when complete (a link planted in the run directory is not followed)."""
    with replaced_file(path) as f:
        fig.savefig(f, dpi=dpi, format="png")


def _transfer_matrix(plt: Any, results: dict[str, Any]) -> Any:
    m = results["mean"]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    gain = [[m["transfer"][j][i] - m["base"][j] if i != j else 0.0 for j in V] for i in V]
    lim = max(1.0, max(abs(g) for row in gain for g in row))
    im = ax.imshow(gain, cmap="RdBu", vmin=-lim, vmax=lim)
    for a, i in enumerate(V):
        for b, j in enumerate(V):
            ax.text(b, a, "–" if i == j else f"{m['transfer'][j][i]:.1f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(5), [f"target {v}" for v in V], rotation=30)
    ax.set_yticks(range(5), [f"+Δ{v[1]}" for v in V])
    ax.set_title("Mj + Δi accuracy (colour: gain over Mj)")
    fig.colorbar(im, ax=ax, label="points")
    return fig


def _panel(ax: Any, title: str, curves: list[tuple[list[list[float]], str, dict[str, Any]]], legend: int) -> None:
    """One subplot of accuracy against fine-tuning steps: each curve with its format and line settings."""
    for curve, fmt, kw in curves:
        xs, ys = _xy(curve)
        ax.plot(xs, ys, fmt, **kw)
    ax.set_title(title)
    ax.set_xlabel("fine-tuning steps")
    ax.legend(fontsize=legend)


def _recycle_curves(plt: Any, results: dict[str, Any]) -> Any:
    m = results["mean"]
    fig, axes = plt.subplots(1, 5, figsize=(18, 3.6), sharey=True)
    for ax, j in zip(axes, V, strict=True):
        direct = (m["direct_ft"][j]["curve"], "k-o", {"lw": 2, "ms": 3, "label": f"FT({j})"})
        recycled = [
            (m["recycle_ft"][j][i]["curve"], "-", {"marker": ".", "label": f"FT({j}+Δ{i[1]})"}) for i in V if i != j
        ]
        _panel(ax, j, [direct, *recycled], legend=7)
    axes[0].set_ylabel("accuracy (%)")
    return fig


def _iterative_curves(plt: Any, results: dict[str, Any]) -> Any:
    iters = results["mean"]["iterative"]
    fig, axes = plt.subplots(1, len(iters), figsize=(5 * len(iters), 3.6), sharey=True)
    styles = (("direct_curve", "k-o", "direct FT"), ("dir_curve", "b-s", "Δ^dir"), ("iter_curve", "r-^", "Δ^iter"))
    for ax, (v, r) in zip(axes, iters.items(), strict=True):
        _panel(ax, v, [(r[key], style, {"ms": 3, "label": label}) for key, style, label in styles], legend=8)
    axes[0].set_ylabel("accuracy (%)")
    return fig


def _direct_ft_curves(plt: Any, results: dict[str, Any]) -> Any:
    m = results["mean"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for v in V:
        xs, ys = _xy(m["direct_ft"][v]["curve"])
        ax.plot(xs, ys, "-o", ms=3, label=v)
    ax.set_xlabel("fine-tuning steps")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("direct fine-tuning")
    ax.legend()
    return fig


def _diagnostics_plot(plt: Any, results: dict[str, Any]) -> Any:
    rows = results["diagnostics_summary"]["pairs"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in (
        (axes[0], "score", "diagnose score (calibration loss drop at α = 1)"),
        (axes[1], "geometry", "− drift / diff"),
    ):
        for r in rows:
            stage2 = r["source"] in ("M4", "M5") and r["target"] in ("M4", "M5")
            ax.scatter(r[key], r["gain"], c="C3" if stage2 else "C0", s=18)
            ax.annotate(f"{r['target']}+Δ{r['source'][1]}", (r[key], r["gain"]), fontsize=6)
        ax.set_xlabel(label)
        ax.axhline(0, color="k", lw=0.5)
    axes[0].set_ylabel("measured gain of Mj + Δi over Mj (points)")
    return fig


_MARKERS = "osD^v<>pP*Xh"


def _bits_lines(ax: Any, points: dict[str, list[tuple[float, float]]]) -> None:
    """One line per method: y against bits per parameter (16 / the ratio against dense bf16)."""
    for n, (method, pts) in enumerate(points.items()):
        pts = sorted(pts)
        style = "--" if method.endswith("+cal") else "-"
        ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker=_MARKERS[n % len(_MARKERS)], ms=4,
                color=f"C{n % 10}", label=method)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per parameter (16 / × smaller than dense bf16)")


def _compression_plot(plt: Any, results: dict[str, Any]) -> Any:
    m = results["mean"]
    comp = m["compressed"]
    pairs = list(next(iter(comp.values())))
    fig, axes = plt.subplots(1, len(pairs), figsize=(12, 4.4), sharey=True, squeeze=False)
    for ax, p in zip(axes[0], pairs, strict=True):
        full = m["transfer"][p[:2]][f"M{p[-1]}"]
        points: dict[str, list[tuple[float, float]]] = {}
        for spec, by_pair in comp.items():
            if spec != "none":
                points.setdefault(method_of(spec), []).append((16 / by_pair[p]["ratio"], by_pair[p]["accuracy"]))
        _bits_lines(ax, points)
        ax.axhline(full, color="k", lw=0.8, label="full Δ (float32)")
        ax.axhline(full - 1, color="k", lw=0.8, ls=":", label="full Δ − 1 point")
        ax.axhline(m["base"][p[:2]], color="0.5", lw=0.8, ls="--", label=f"{p[:2]} alone")
        ax.set_title(p)
    axes[0][0].set_ylabel("accuracy of Mj + compressed Δi (%)")
    axes[0][-1].legend(fontsize=6, ncol=2, loc="lower right")
    return fig


def _sweep_plot(plt: Any, results: dict[str, Any]) -> Any:
    sw = results["mean"]["sweep"]
    scales = list(sw.values())
    fig, axes = plt.subplots(1, 1 + len(scales), figsize=(4.2 * (1 + len(scales)), 4.2), squeeze=False)
    axes = axes[0]
    for pair in scales[0]["pairs"]:
        rows = [sc["pairs"][pair] for sc in scales]
        pts = sorted(
            (r["delta_rel_pct"], r["recovery_pct"])
            for r in rows
            if r["delta_rel_pct"] is not None and r["recovery_pct"] is not None
        )
        axes[0].plot([x for x, _ in pts], [y for _, y in pts], "o-", label=pair)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("‖Δi‖ / ‖Mi‖ (%)")
    axes[0].set_ylabel("gain recovered by Mj + Δi (%)")
    axes[0].set_title("transfer recovery against Δ size")
    axes[0].legend(fontsize=7)
    for ax, sc in zip(axes[1:], scales, strict=True):
        # one panel per rate: the share of the dense transfer's gain kept, both pairs averaged where defined
        points: dict[str, list[tuple[float, float]]] = {}
        for spec in results["config"]["sweep_compressions"]:
            got = [p["compressed"][spec] for p in sc["pairs"].values() if spec in p["compressed"]]
            shares = [g["of_dense_pct"] for g in got if g["of_dense_pct"] is not None]
            if shares:
                ratio = min(g["ratio"] for g in got)
                points.setdefault(method_of(spec), []).append((16 / ratio, sum(shares) / len(shares)))
        if points:
            _bits_lines(ax, points)
        else:
            # every share undefined: say so on the panel rather than leave it blank
            ax.text(0.5, 0.5, "no defined point\n(fine-tuning gained nothing)", ha="center", transform=ax.transAxes)
        ax.axhline(100, color="k", lw=0.5, ls=":")
        ax.set_title(f"ft_lr × {sc['scale']:g}: ‖Δ‖/‖W‖ ≈ {_pct_of(sc)} %", fontsize=10)
        ax.set_ylabel("% of the dense transfer's gain kept (pair mean)")
    if axes[-1].get_legend_handles_labels()[0]:
        axes[-1].legend(fontsize=6, ncol=2)
    return fig


def _pct_of(sc: dict[str, Any]) -> str:
    sizes = [p["delta_rel_pct"] for p in sc["pairs"].values() if p["delta_rel_pct"] is not None]
    return pct2(sum(sizes) / len(sizes)) if sizes else "–"


#: Each plot: its key in PLOTS, its drawing, its resolution, and whether a results record has its numbers.
_PLOTTERS: tuple[tuple[str, Callable[[Any, dict[str, Any]], Any], int, Callable[[dict[str, Any]], bool]], ...] = (
    ("transfer_matrix", _transfer_matrix, 110, lambda r: True),
    ("recycle_curves", _recycle_curves, 100, lambda r: True),
    ("iterative_curves", _iterative_curves, 100, lambda r: True),
    ("direct_ft_curves", _direct_ft_curves, 100, lambda r: True),
    ("diagnostics", _diagnostics_plot, 100, lambda r: "diagnostics_summary" in r),
    ("compression", _compression_plot, 100, lambda r: "compressed" in r["mean"]),
    ("delta_size_sweep", _sweep_plot, 100, lambda r: "sweep" in r["mean"]),
)


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    """Write the PNG plots into ``out``; returns their paths."""
    import matplotlib  # heavy: only a lab run draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: as matplotlib

    written = []
    for name, draw, dpi, drawn in _PLOTTERS:
        if not drawn(results):
            continue
        fig = draw(plt, results)
        fig.tight_layout()
        written.append(out / PLOTS[name])
        _save(fig, written[-1], dpi=dpi)
        plt.close(fig)
    return written
