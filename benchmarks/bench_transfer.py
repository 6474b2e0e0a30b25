"""Benchmark ``ftrecycle transfer`` against mergekit and the I/O floor on the Llama 3.2 1B layout.

Usage::

    .venv/bin/python benchmarks/bench_transfer.py [--layout 1b] [--rounds 5]
    (mergekit: run benchmarks/setup_mergekit.sh once; it installs into benchmarks/.venv-mergekit)

Builds (once, under benchmarks/work/) a synthetic bf16 trio with the exact tensor names
and shapes of Llama 3.2 1B, sharded at 1 GiB. Each round runs every contender once, in
an order rotated between rounds; page cache is warm for all after round 0, which is
discarded. Reports median wall time, peak RSS (the child's ru_maxrss) and GB/s of input
read, and checks every output against an independent NumPy float32 reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _trio import build_trio  # noqa: E402
from reference import compare  # noqa: E402

TIME = shutil.which("time", path="/usr/bin:/bin") or "/usr/bin/time"  # GNU time (Debian package "time")

MERGEKIT_YAML = """merge_method: task_arithmetic
base_model: {c}
models:
  - model: {b}
    parameters: {{weight: 1.0}}
  - model: {a}
    parameters: {{weight: -1.0}}
dtype: {dtype}
out_dtype: bfloat16
"""


def run(cmd: list[str] | str, *, shell: bool = False) -> tuple[float, int]:
    """Run a command; return (wall seconds, peak RSS bytes).

    GNU time measures the peak: Linux carries a forked child's pre-exec high-water
    mark (here: this Python process) into its ru_maxrss, so wait4 on a direct child
    would report this process's size, not the command's.
    """
    argv = ["sh", "-c", cmd] if shell else cmd
    assert isinstance(argv, list)
    with tempfile.NamedTemporaryFile("r") as rss_file:
        t0 = time.perf_counter()
        p = subprocess.run(
            [TIME, "-f", "%M", "-o", rss_file.name, *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=False,
        )
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"command failed: {cmd}\n{p.stderr.decode()[-2000:]}")
        peak_kib = int(rss_file.read().strip().splitlines()[-1])
    return wall, peak_kib * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default="1b", choices=["1b", "small"])
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds (a warm-up round is added)")
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--mergekit", type=Path, default=HERE / ".venv-mergekit" / "bin" / "mergekit-yaml")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = ap.parse_args()

    trio = build_trio(args.work, args.layout)
    a, b, c = trio["source_base"], trio["source_finetuned"], trio["target_base"]
    outs = args.work / "outputs"
    shutil.rmtree(outs, ignore_errors=True)
    outs.mkdir(parents=True)
    ftr = shutil.which("ftrecycle") or str(Path(sys.executable).parent / "ftrecycle")
    inputs = [str(p) for m in (a, b, c) for p in sorted(m.glob("*.safetensors"))]
    in_bytes = sum(os.path.getsize(p) for p in inputs)

    contenders: dict[str, list[str] | str] = {
        "io_floor": f"cat {' '.join(inputs)} > /dev/null && cp -r {c} {outs / 'floor'}",
        "ftrecycle": [
            ftr,
            "transfer",
            "--source-base",
            str(a),
            "--source-finetuned",
            str(b),
            "--target-base",
            str(c),
            "-o",
            str(outs / "ftrecycle"),
            "-q",
        ],
    }
    use_mk = not args.no_mergekit and args.mergekit.exists()
    if use_mk:
        for dtype in ("float32", "bfloat16"):
            cfg = outs / f"mergekit-{dtype}.yml"
            cfg.write_text(MERGEKIT_YAML.format(a=a, b=b, c=c, dtype=dtype))
            contenders[f"mergekit_{dtype}"] = [
                str(args.mergekit),
                str(cfg),
                str(outs / f"mergekit_{dtype}"),
                "--no-copy-tokenizer",
                "--quiet",
            ]
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    rss: dict[str, list[int]] = {n: [] for n in names}
    for r in range(args.rounds + 1):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            # Each run starts with no other output in the page cache and no writeback in flight:
            # outputs are deleted as soon as measured, except in the last round (kept for the check).
            os.sync()
            time.sleep(1)
            wall, peak = run(contenders[n], shell=isinstance(contenders[n], str))
            shutil.rmtree(outs / "floor", ignore_errors=True)
            if r < args.rounds:
                shutil.rmtree(outs / n, ignore_errors=True)
            if r > 0:
                times[n].append(wall)
                rss[n].append(peak)
            print(f"round {r} {n:18s} {wall:7.2f} s  {peak / 2**20:7.0f} MiB", file=sys.stderr)

    results: dict[str, dict[str, float | int | str]] = {}
    for n in names:
        med = statistics.median(times[n])
        results[n] = {
            "median_s": round(med, 3),
            "peak_rss_mib": round(max(rss[n]) / 2**20),
            "input_GBps": round(in_bytes / med / 1e9, 2),
            "runs": [round(t, 3) for t in times[n]],
        }
    for n in names:
        if n == "io_floor":
            continue
        check = compare(a, b, c, outs / n)
        results[n]["exact"] = (
            "yes"
            if check["mismatched"] == 0 and not check["missing_tensors"]
            else (
                f"no: {check['mismatched']} of {check['elements']} elements differ "
                f"(mean {check['mean_ulp_of_mismatched']} ulp, max {check['max_ulp']})"
            )
        )
    floor = results["io_floor"]["median_s"]
    ftr_s = results["ftrecycle"]["median_s"]
    summary = {
        "layout": args.layout,
        "rounds": args.rounds,
        "input_bytes": in_bytes,
        "results": results,
        "ftrecycle_over_floor": round(float(ftr_s) / float(floor), 2),
    }
    if use_mk:
        summary["mergekit_float32_over_ftrecycle"] = round(
            float(results["mergekit_float32"]["median_s"]) / float(ftr_s), 2
        )
    print("\n| contender | median wall (s) | peak RSS (MiB) | input GB/s | exact vs float32 reference |")
    print("|---|---|---|---|---|")
    for n in names:
        r_ = results[n]
        print(f"| {n} | {r_['median_s']} | {r_['peak_rss_mib']} | {r_['input_GBps']} | {r_.get('exact', '-')} |")
    print(
        f"\nftrecycle / I/O floor = {summary['ftrecycle_over_floor']}"
        + (f"; mergekit float32 / ftrecycle = {summary['mergekit_float32_over_ftrecycle']}" if use_mk else "")
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
