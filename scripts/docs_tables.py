"""Write the measured-figure tables of README.md and docs/*.md from the committed result files.

A table lives between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` markers; NAME is a key of
TABLES below, which says which result file it is made from and how. A new measurement is then one
command: rerun the benchmark (or the lab) into its result file, and run

    python scripts/docs_tables.py            # rewrite every table
    python scripts/docs_tables.py --check    # exit 1, naming them, when a doc is stale (tests/test_docs.py)

A result file that is not committed yet gives a short note naming the command that makes it, never a
number typed by hand. Only the standard library is used, so this runs before any install.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftrecycle.lab.report import SIZE_COLUMNS, TARGETS, design_targets, pct2

ROOT = Path(__file__).resolve().parents[1]
BENCH = "benchmarks/results"
LAB_TINY = "docs/results/lab-tiny.json"
LAB_COMMAND = (
    "`ftrecycle lab run --preset tiny --out ftrecycle-lab` (what `bash scripts/demo.sh` runs), then "
    f"`cp ftrecycle-lab/results.json {LAB_TINY}`"
)
#: The demo's own run (one seed) gives the time tables; the same directory continued with a second seed
#: (its seed 0 jobs reused from the cache) gives every result table, so findings rest on two seeds.
LAB_SEEDS = "docs/results/lab-tiny-2seeds.json"
LAB_SEEDS_COMMAND = (
    "after the demo, `ftrecycle lab run --preset tiny --out ftrecycle-lab --seeds 0,1` (seed 0 reused, seed 1 "
    f"added), then `cp ftrecycle-lab/results.json {LAB_SEEDS}`"
)
V = ("M1", "M2", "M3", "M4", "M5")
MARKER = re.compile(r"<!-- table:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /table:(?P=name) -->", re.S)


@dataclass(frozen=True)
class Table:
    """One generated table: the result file it is made from, the command that makes that file, the
    renderer (parsed JSON -> markdown lines), and whether a missing file is explained in full here
    (False for the second and later tables of one file on a page, which point to the first)."""

    source: str
    command: str
    render: Callable[[Any], list[str]]
    explain: bool = True


# ---- formatting -----------------------------------------------------------------------------------


def _f(x: Any, digits: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(c if isinstance(c, str) else _f(c) for c in row) + " |" for row in rows]


# ---- benchmarks -----------------------------------------------------------------------------------

_CONTENDERS = {
    "io_floor": "I/O floor (`cat` the inputs, `cp` one model)",
    "ftrecycle": "**ftrecycle**",
    "mergekit_float32": "mergekit task_arithmetic, float32",
    "mergekit_bfloat16": "mergekit task_arithmetic, bf16 (its default)",
}


def _exact(text: str | None) -> str:
    if text is None:
        return "–"
    m = re.match(r"no: (\d+) of (\d+) elements differ \((.*)\)", text)
    if not m:
        return text
    share = 100 * int(m[1]) / int(m[2])
    return f"no: {share:.1f} % of elements differ ({m[3]})"


def transfer_bench(d: dict[str, Any]) -> list[str]:
    """bench_transfer.py's result: one row per contender, then the ratios."""
    res = d["results"]
    rows = [
        [_CONTENDERS.get(k, k), _f(r["median_s"], 2), _f(r["peak_rss_mib"], 0), _exact(r.get("exact"))]
        for k, r in res.items()
    ]
    lines = _table(["contender", "median wall (s)", "peak RSS (MiB)", "exact vs float32 reference"], rows)
    tail = f"ftrecycle took {_f(d['ftrecycle_over_floor'], 2)} × the I/O floor"
    if "mergekit_float32_over_ftrecycle" in d:
        tail += f"; mergekit's float32 run took {_f(d['mergekit_float32_over_ftrecycle'])} × ftrecycle's time"
    return [*lines, "", f"{tail} (layout `{d['layout']}`, medians of {d['rounds']} rounds after a warm-up)."]


def compress_bench(d: dict[str, Any]) -> list[str]:
    """bench_compress.py's result: one row per `diff --compress` setting, its `apply` against the dense one's."""
    rows = [
        [
            "dense (no `--compress`)" if r["spec"] == "dense" else f"`--compress {r['spec']}`",
            _f(r["wall_s"]),
            _f(r["peak_rss_mib"], 0),
            f"{r['stored_bytes'] / 2**20:.0f} MiB",
            _f(1.0 if r["ratio_vs_dense_bf16"] is None else r["ratio_vs_dense_bf16"]),
            _f(r["median_rel_error"], 3),
            _f(r.get("apply_wall_s")),
            _f(r.get("apply_peak_rss_mib"), 0),
            "1 (reference)" if r["spec"] == "dense" else _f(r.get("apply_vs_dense"), 2),
        ]
        for r in d["runs"]
    ]
    header = ["`diff` setting", "wall (s)", "peak RSS (MiB)", "stored", "× smaller than dense bf16",
              "median rel. error", "`apply` wall (s)", "`apply` peak RSS (MiB)", "`apply` / dense `apply`"]  # fmt: skip
    out = [*_table(header, rows), "", f"Layout `{d['layout']}`, `--max-memory {d['max_memory']}`."]
    m = d.get("machine")
    if m:
        out[-1] += (
            f" {m['cpu_count']} cores ({m['cpu']}), load average {m.get('load_avg_1min_at_start')} at the start and "
            f"{m.get('load_avg_1min_at_end')} at the end; each `apply` is the faster of two runs, the dense one "
            "the fastest of two runs before the settings and two after."
        )
    for r in d.get("refused") or []:
        out += ["", f"Refused: `--compress {r['spec']}`: {r['error']}"]
    return out


def lossless_bench(d: dict[str, Any]) -> list[str]:
    """bench_lossless_streams.py's result: one row per coder, its ratio and one-thread decode speed."""
    rows = [[r["coder"], _f(r["ratio"], 3), _f(r["decode_mb_s"], 0)] for r in d["runs"]]
    out = _table(["coder", "× smaller than bf16", "decode (MB/s, one thread)"], rows)
    return [*out, "", f"Tensor `{d['tensor']}` of layout `{d['layout']}`; zlib {d['zlib']}, zstd {d['zstd']}."]


def diagnose_bench(d: dict[str, Any]) -> list[str]:
    """bench_diagnose.py's result: the geometry pass's time and memory."""
    t = d["total"]
    rows = [
        ["elements per model", f"{d['elements']:,}"],
        ["rounds (wall s)", ", ".join(_f(r["wall_s"], 2) for r in d["rounds"])],
        ["median wall (s)", _f(d["median_wall_s"], 2)],
        ["peak RSS (MiB)", _f(d["max_peak_rss_mib"])],
        [
            "drift / diff, cos, sign agreement",
            f"{t['drift_over_delta']:.3f}, {t['cos']:.4f}, {t['sign_agreement']:.4f}",
        ],
        ["verdict", d["verdict"]],
    ]
    return _table(["`diagnose` on layout `" + d["layout"] + "`", "value"], rows)


def ddp_bench(d: dict[str, Any]) -> list[str]:
    """bench_ddp.py's result: training tokens/s per process, one process against two."""
    rows = [
        [name, _f(r["seconds_per_step"], 3), _f(r["tokens_per_second_per_process"])]
        for name, r in (("1 process", d["one_process"]), ("2 processes (DDP, gloo)", d["two_processes"]))
    ]
    return [
        *_table(["run", "seconds per step", "tokens/s per process"], rows),
        "",
        f"Two processes over one: {_f(d['ratio_two_over_one'], 3)} of the per-process throughput "
        f"({d['machine']['cpus']} CPUs, {d['steps']} steps, batch {d['batch_per_process']} per process).",
    ]


# ---- the lab (results.json of `ftrecycle lab run`) ---------------------------------------------------


def lab_run(r: dict[str, Any]) -> list[str]:
    """What the committed lab run was: preset, seeds, model size, test set, time."""
    c = r["config"]
    rows = [
        ["preset", f"`{c['preset']}`"],
        ["seeds", ", ".join(map(str, c["seeds"]))],
        ["model parameters", f"{r['parameters']:,} (hidden {c['model']['hidden']}, layers {c['model']['layers']})"],
        ["fine-tuning / test problems", f"{c['train_items']:,} / {c['test_items']:,}"],
        ["one test problem", f"{100 / c['test_items']:.2f} points"],
        ["wall time of the call that wrote it (s)", _f(r["seconds"], 0)],
        ["evidence", "yes" if r.get("evidence") else "**no** (a smoke run, or findings with no signal)"],
    ]
    return _table(["lab run", ""], rows)


def lab_findings(r: dict[str, Any]) -> list[str]:
    """The five findings, PASS/FAIL from the seed mean, and how many seeds pass alone."""
    per_seed = r.get("findings_per_seed", {})
    rows = []
    for f in r["findings"]:
        verdict = f"**{'PASS' if f['passed'] else 'FAIL'}**" + (" (no signal)" if f.get("no_signal") else "")
        seeds = per_seed.get(str(f["id"]), [])
        rows.append([str(f["id"]), f["claim"], verdict, f"{sum(seeds)} of {len(seeds)}"])
    return _table(["#", "finding", "verdict (seed mean)", "seeds passing"], rows)


NOT_IN_FILE = ["_Not in this results file: rerun the lab._"]


def _across(key: dict[str, dict[str, Any]]) -> str:
    """A finding's key numbers over the seeds: mean (min–max)."""
    return "; ".join(
        f"{name}: –" if st["mean"] is None else f"{name}: {_f(st['mean'])} ({_f(st['min'])}–{_f(st['max'])})"
        for name, st in key.items()
    )


def lab_findings_seeds(r: dict[str, Any]) -> list[str]:
    """Each finding over the seeds: seeds passing and its key numbers as mean of seeds (min–max)."""
    across = r.get("findings_across_seeds")
    if across is None:
        return NOT_IN_FILE
    rows = [[str(f["id"]), f"{across[str(f['id'])]['passed']} of {across[str(f['id'])]['seeds']}",
             _across(across[str(f["id"])]["key"])] for f in r["findings"]]  # fmt: skip
    n = len(r["config"]["seeds"])
    return [
        *_table(["#", "seeds passing", "key numbers: mean of the seeds (min–max over the seeds)"], rows),
        "",
        f"On {n} seed{'s' if n != 1 else ''} ({', '.join(map(str, r['config']['seeds']))}).",
    ]


def lab_measures(r: dict[str, Any]) -> list[str]:
    """The transfer matrix (b) in the field's two measures, by group of pairs, beside the published ones."""
    m = r["mean"].get("measures")
    if m is None:
        return NOT_IN_FILE
    sp = r.get("spread", {}).get("measures", {}).get("summary", {})
    names = {"stage2": "stage-2 pairs (M4 ↔ M5)", "within": "within-stage pairs", "across": "cross-stage pairs"}
    rows = []
    for key, label in names.items():
        g, s = m["summary"][key], sp.get(key, {})
        rows.append(
            [
                label,
                f"{_f(g['ft_score_pct'])} (± {_f(s.get('ft_score_pct'))})",
                f"{_f(g['gain_recovered_pct'])} (± {_f(s.get('gain_recovered_pct'))})",
                f"{int(g['gain_defined'])} of {int(g['pairs'])}",
            ]
        )
    rows += [
        [f"published: {name}", _f(v["ft_score_pct"]), _f(v["gain_recovered_pct"]), "–"]
        for name, v in r["paper"].get("field_measures", {}).items()
    ]
    return [
        *_table(["Mj + Δi", "% of FT(Mj)'s score", "% of FT's gain recovered", "pairs with a gain"], rows),
        "",
        "Computed from the seed-mean accuracies, as the findings are, and averaged over the group's pairs (± the "
        "spread, max − min of the same number computed on each seed alone); the gain share is undefined for a pair "
        "where FT(Mj) ≤ Mj and left out of its group's mean.",
    ]


def lab_timing(r: dict[str, Any]) -> list[str]:
    """Where the lab's time goes: job seconds by kind, fine-tuning's split into training, evaluation, start-up."""
    t = r.get("timing")
    if t is None:
        return NOT_IN_FILE
    rows = [[k, str(v["jobs"]), v["seconds"], v["share_pct"], v["train_s"], v["eval_s"], v["setup_s"]]
            for k, v in t["by_kind"].items()]  # fmt: skip
    return [
        *_table(["job kind", "jobs", "seconds", "% of job seconds", "training", "evaluation", "start-up"], rows),
        "",
        f"Wall time {_f(t['wall_s'], 0)} s with {t['workers']} worker(s); the jobs' own seconds add up to "
        f"{_f(t['job_s'], 0)} s.",
        "",
        *_seeds_floor(t, len(r["config"]["seeds"])),
    ]


def _seeds_floor(t: dict[str, Any], seeds: int) -> list[str]:
    """The least wall time more seeds can take: their jobs' seconds shared over the workers (one core each)."""
    per_seed = t["job_s"] / seeds
    floors = ", ".join(f"{n} seed{'s' * (n > 1)} ≥ {per_seed * n / t['workers']:.0f} s" for n in (1, 2, 3))
    return [
        f"One seed's jobs add up to {per_seed:.0f} s; with {t['workers']} workers on as many cores no run can take "
        f"less than its jobs' seconds over the workers: {floors} (before installing and reporting)."
    ]


def lab_transfer(r: dict[str, Any]) -> list[str]:
    """Table 2's shape: Mj + Δi without training, the bases and direct fine-tuning."""
    m = r["mean"]
    rows: list[list[Any]] = [["base (zero-shot)", *[m["base"][j] for j in V]]]
    rows += [[f"+ Δ{i[1]}", *[m["transfer"][j][i] if i != j else None for j in V]] for i in V]
    rows.append([f"Direct FT ({r['config']['ft_steps']} steps)", *[m["direct_ft"][j]["final"] for j in V]])
    return _table(["Mj + Δi, no training", *V], rows)


def lab_recycle(r: dict[str, Any]) -> list[str]:
    """Table 4's shape: FT(Mj + Δi) after the recycling steps."""
    m = r["mean"]
    rows: list[list[Any]] = [
        [f"+ Δ{i[1]} → FT", *[m["recycle_ft"][j][i]["final"] if i != j else None for j in V]] for i in V
    ]
    rows.append(["Direct FT", *[m["direct_ft"][j]["final"] for j in V]])
    return _table([f"FT(Mj + Δi), {r['config']['recycle_steps']} steps", *V], rows)


def lab_iterative(r: dict[str, Any]) -> list[str]:
    """Tables 6 and 11's shape: iterative against direct recycling, with and without fine-tuning."""
    it = r["mean"]["iterative"]
    keys = (
        ("base", "base"),
        ("+ Δ^dir", "dir_no_ft"),
        ("+ Δ^iter", "iter_no_ft"),
        ("+ Δ^dir → FT", "dir_ft"),
        ("+ Δ^iter → FT", "iter_ft"),
        ("Direct FT", "direct_ft"),
    )
    return _table(["", *it], [[name, *[v[k] for v in it.values()]] for name, k in keys])


def lab_language(r: dict[str, Any]) -> list[str]:
    """Table 3's shape: a second language's diff moved from FT(M4) to FT(M5)."""
    ml = r["mean"]["multilingual"]
    rows = [
        ["FT(M4)", ml["M4_instruct"]],
        ["FT(M4), fine-tuned on the language", ml["M4_instruct_ft"]],
        ["FT(M5)", ml["M5_instruct"]],
        ["FT(M5) + that Δ", ml["M5_instruct_plus_delta"]],
    ]
    return _table(["model", "accuracy, second language"], rows)


def lab_diagnostics(r: dict[str, Any]) -> list[str]:
    """Experiment (f): how well each diagnose signal ranks the measured gains, and --alpha auto."""
    d = r["diagnostics_summary"]
    rho = [[k, _f(v, 3)] for k, v in d["spearman"].items()]
    auto = [[p, _f(v["alpha"], 2), v["accuracy"], v["accuracy_alpha_1"]] for p, v in d["alpha_auto"].items()]
    out = [
        *_table(["signal", "Spearman ρ with the gain"], rho),
        "",
        *_table(["pair", "α chosen by `--alpha auto`", "accuracy, α auto", "accuracy, α = 1"], auto),
    ]
    if "confusion" in d:  # the verdict against the sign of the gain (runs since issue 15)
        c = d["confusion"]
        seeds = [*((f"seed {s}", t) for s, t in c["per_seed"].items()), ("all", c["overall"])]
        rows = [
            [name, v, n["gain > 0"], n["gain ≤ 0"], n["harmful"], f"{t['agree']} / {t['pairs']}"]
            for name, t in seeds
            for v, n in t["table"].items()
        ]
        header = ["seeds", "verdict", "gain > 0", "gain ≤ 0", "harmful (≤ −5)", "sign agrees"]
        out += ["", *_table(header, rows)]
    return out


def lab_masking(r: dict[str, Any]) -> list[str]:
    """Experiment (i): the gradient-sign mask against plain transfer, overall and on the pairs plain transfer hurts."""
    rows = []
    for setting, m in r["masking"]["mean"].items():
        a, h = m["all"], m["harmful"]
        rows.append(
            [
                setting,
                _f(a["mean_plain_gain"], 2),
                _f(a["mean_masked_gain"], 2),
                f"{a['masked_better']} / {a['masked_worse']}",
                h["pairs"],
                _f(h["mean_plain_gain"], 2),
                _f(h["mean_masked_gain"], 2),
                f"{h['loses_less']} of {h['pairs']}",
                m["made_harmful"],
                _f(m["mean_kept_pct"], 1),
            ]
        )
    header = [
        "mask (N examples)",
        "mean gain, plain (20 pairs)",
        "mean gain, masked",
        "masked better / worse",
        "pairs plain hurts",
        "their mean gain, plain",
        "their mean gain, masked",
        "masked loses less on",
        "helped pairs made harmful",
        "Δ entries kept (%)",
    ]
    return _table(header, rows)


def lab_compression(r: dict[str, Any]) -> list[str]:
    """Experiment (g) as finding (5) reads it: per stored form and stage-2 pair, how many times smaller
    than the dense bf16 delta, and the points gained or lost against the full float32 Δ."""
    m = r["mean"]
    rows: list[list[Any]] = []
    for spec, by_pair in m["compressed"].items():
        cells = [
            f"{v['ratio']:.1f}× / {v['accuracy'] - m['transfer'][pair[:2]][f'M{pair[-1]}']:+.1f}"
            for pair, v in by_pair.items()
        ]
        worst_error = max(v["median_error"] for v in by_pair.values())
        rows.append(["dense bf16" if spec == "none" else f"`{spec}`", _f(worst_error, 3), *cells])
    pairs = list(next(iter(m["compressed"].values())))
    return _table(["Δ stored as", "median rel. error", *[f"{p}: × smaller / points vs full Δ" for p in pairs]], rows)


def lab_targets(r: dict[str, Any]) -> list[str]:
    """Issue 13's design targets (no ceiling, stage-2 deltas ≤ 5 %, bases above 0, seeds), as in the report."""
    if "targets" not in r:
        return NOT_IN_FILE
    return design_targets(r)


def lab_sizes(r: dict[str, Any]) -> list[str]:
    """‖Δ‖/‖W‖ in percent of every direct fine-tune and version step, and the stage-2 check against 5 %."""
    if "update_sizes" not in r["mean"]:
        return NOT_IN_FILE
    u = r["mean"]["update_sizes"]
    rows: list[list[Any]] = [
        [f"FT({k[3:]}) − {k[3:]}", *[pct2(e[c]) for c in SIZE_COLUMNS]] for k, e in u["finetunes"].items()
    ]
    rows += [[k.replace("->", " → "), *[pct2(e[c]) for c in SIZE_COLUMNS]] for k, e in u["version_steps"].items()]
    rows.append(["second-language FT of FT(M4)", *[pct2(u["language"][c]) for c in SIZE_COLUMNS]])
    rows += [[f"`{k}` − {k[3:5]} ((h))", *[pct2(e[c]) for c in SIZE_COLUMNS]] for k, e in u["sweep_finetunes"].items()]
    stage2 = [u["finetunes"][f"ft-{v}"]["total"] for v in ("M4", "M5")]
    known = [x for x in stage2 if x is not None]
    c, limit = r["config"], r.get("targets", TARGETS)["stage2_limit_pct"]
    return [
        *_table(["‖B − A‖/‖A‖ (%)", *SIZE_COLUMNS], rows),
        "",
        f"Stage-2 fine-tuning deltas at or below {limit:g} %: **{_f(bool(known) and max(known) <= limit)}** "
        f"(fine-tuning at {c['ft_lr']:g} against pretraining peaks {c['pretrain']['lr']:g} and "
        f"{c['pretrain']['stage2_lr']:g}).",
    ]


def lab_sweep(r: dict[str, Any]) -> list[str]:
    """Experiment (h): per fine-tuning rate and stage-2 pair, Δ size, recovery and % of FT."""
    if "sweep" not in r["mean"]:
        return NOT_IN_FILE
    rows: list[list[Any]] = []
    for tag, sc in r["mean"]["sweep"].items():
        for pair, p in sc["pairs"].items():
            rows.append([f"×{tag}", pair, pct2(p["delta_rel_pct"]), _f(p["transfer"]), _f(p["finetuned"]),
                         _f(p["recovery_pct"]), _f(p["of_ft_pct"])])  # fmt: skip
    header = ["ft_lr ×", "pair", "‖Δi‖/‖Mi‖ (%)", "Mj + Δi", "FT(Mj), same rate", "gain recovered (%)",
              "% of FT(Mj)"]  # fmt: skip
    return _table(header, rows)


def lab_sweep_compressed(r: dict[str, Any]) -> list[str]:
    """Experiment (h)'s compressed transfers: per spec, the share of the dense transfer's gain kept at each
    rate and pair, and the size ratio against dense bf16."""
    if "sweep" not in r["mean"]:
        return NOT_IN_FILE
    sw = r["mean"]["sweep"]
    cols = [(tag, pair) for tag, sc in sw.items() for pair in sc["pairs"]]
    rows = []
    for c in r["config"]["sweep_compressions"]:
        if not all(c in sw[tag]["pairs"][pair]["compressed"] for tag, pair in cols):
            continue  # a setting the model cannot take
        got = [sw[tag]["pairs"][pair]["compressed"][c] for tag, pair in cols]
        rows.append([f"`{c}`", *[f"{_f(v['of_dense_pct'])} ({v['ratio']:.1f}×)" for v in got]])
    return _table(["Δ stored as", *[f"×{tag} {pair}: % of dense gain" for tag, pair in cols]], rows)


def lab_compression_methods(r: dict[str, Any]) -> list[str]:
    """Finding 5 per method: the most compressed setting losing at most the allowed points on both pairs."""
    f = next((f for f in r["findings"] if f["id"] == 5), None)
    if f is None or "by_method" not in f["numbers"]:
        return NOT_IN_FILE
    n = f["numbers"]
    rows = [
        [f"`{k}`", "none" if v is None else f"`{v['spec']}`", "–" if v is None else f"{v['ratio']:.1f}×",
         "–" if v is None else _f(v["max_loss"])]
        for k, v in n["by_method"].items()
    ]  # fmt: skip
    allowed = _f(n["loss_allowed"])
    return _table(["method", f"most compressed within {allowed} point", "× smaller", "points lost (worse pair)"], rows)


def _bench(name: str, script: str, render: Callable[[Any], list[str]]) -> Table:
    return Table(f"{BENCH}/{name}.json", f"`.venv/bin/python benchmarks/{script}`", render)


def _two_seeds(render: Callable[[Any], list[str]]) -> Table:
    """A table of the two-seed lab run, after the first one on its page."""
    return Table(LAB_SEEDS, LAB_SEEDS_COMMAND, render, explain=False)


TABLES: dict[str, Table] = {
    "transfer-1b": _bench("transfer-1b", "bench_transfer.py --rounds 5 --json ...", transfer_bench),
    "transfer-1b-no-mergekit": _bench(
        "transfer-1b-no-mergekit", "bench_transfer.py --no-mergekit --json ...", transfer_bench
    ),
    "compress-1b": _bench("compress-1b", "bench_compress.py --json ...", compress_bench),
    "lossless-streams": _bench("lossless-streams", "bench_lossless_streams.py --json ...", lossless_bench),
    "diagnose-1b": _bench("diagnose-1b", "bench_diagnose.py --json ...", diagnose_bench),
    "ddp-cpu": _bench("ddp-cpu", "bench_ddp.py", ddp_bench),
    "lab-run": Table(LAB_TINY, LAB_COMMAND, lab_run),
    "lab-demo-targets": Table(LAB_TINY, LAB_COMMAND, lab_targets, explain=False),
    "lab-seeds-run": Table(LAB_SEEDS, LAB_SEEDS_COMMAND, lab_run),
    "lab-findings": _two_seeds(lab_findings),
    "lab-transfer": _two_seeds(lab_transfer),
    "lab-recycle": _two_seeds(lab_recycle),
    "lab-iterative": _two_seeds(lab_iterative),
    "lab-language": _two_seeds(lab_language),
    "lab-diagnostics": _two_seeds(lab_diagnostics),
    "lab-masking": _two_seeds(lab_masking),
    "lab-compression": _two_seeds(lab_compression),
    "lab-compression-methods": _two_seeds(lab_compression_methods),
    "lab-targets": _two_seeds(lab_targets),
    "lab-sizes": _two_seeds(lab_sizes),
    "lab-sweep": _two_seeds(lab_sweep),
    "lab-sweep-compressed": _two_seeds(lab_sweep_compressed),
    "lab-findings-seeds": _two_seeds(lab_findings_seeds),
    "lab-measures": _two_seeds(lab_measures),
    "lab-timing": Table(LAB_TINY, LAB_COMMAND, lab_timing, explain=False),
}


# ---- the command ----------------------------------------------------------------------------------


def render(name: str, root: Path = ROOT, source: Path | None = None) -> str:
    """The text between the markers of table ``name``: the table, or a note when its file is missing.

    Args:
        name: a key of TABLES.
        root: the repository root the table's source is under.
        source: read this result file instead of the table's own (to check a table on another run's results).

    Raises:
        KeyError: ``name`` is not in TABLES.
    """
    t = TABLES[name]
    path = source if source is not None else root / t.source
    if not path.is_file() and t.explain:
        lines = [f"_Not measured yet: `{t.source}` is not committed. Make it with {t.command}, then run "
                 "`python scripts/docs_tables.py`._"]  # fmt: skip
    elif not path.is_file():
        lines = [f"_Not measured yet (`{t.source}`, see above)._"]
    else:
        shown = t.source if source is None else str(source)
        lines = [*t.render(json.loads(path.read_text())), "", f"<sub>Generated from `{shown}`.</sub>"]
    return "\n".join(lines) + "\n"


def docs(root: Path = ROOT) -> list[Path]:
    """The files that may hold tables: README.md and every page under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def regenerate(text: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """``text`` with every marked table rewritten; returns it and the unknown table names found."""
    unknown: list[str] = []

    def fill(m: re.Match[str]) -> str:
        name = m["name"]
        if name not in TABLES:
            unknown.append(name)
            return m[0]
        return f"<!-- table:{name} -->\n{render(name, root)}<!-- /table:{name} -->"

    return MARKER.sub(fill, text), unknown


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or, with --check, compare) every doc's tables; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table is stale")
    ap.add_argument(
        "--lab-results",
        type=Path,
        default=None,
        help="print every lab table made from this results.json (a lab run's) instead; change nothing",
    )
    args = ap.parse_args(argv)
    if args.lab_results is not None:
        for name, t in TABLES.items():
            if t.source in (LAB_TINY, LAB_SEEDS):
                print(f"## {name}\n\n{render(name, source=args.lab_results)}")
        return 0
    stale, problems = [], []
    for path in docs():
        text = path.read_text()
        new, unknown = regenerate(text)
        rel = path.relative_to(ROOT)
        problems += [f"{rel}: unknown table `{n}` (known: {', '.join(TABLES)})" for n in unknown]
        if new != text:
            stale.append(str(rel))
            if not args.check:
                path.write_text(new)
    for p in problems:
        print(f"docs_tables: {p}", file=sys.stderr)
    if args.check and stale:
        print(f"docs_tables: stale tables in {', '.join(stale)}; run `python scripts/docs_tables.py`", file=sys.stderr)
    elif stale:
        print(f"docs_tables: rewrote {', '.join(stale)}")
    return 1 if problems or (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
