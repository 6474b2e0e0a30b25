"""Time, peak memory, size and error of `ftrecycle diff --compress` for every registered codec, and the
time of `ftrecycle apply` of each compressed delta against the dense bf16 delta's, on the Llama-3.2-1B-layout trio.

Usage: PYTHONPATH=src .venv/bin/python benchmarks/bench_compress.py [--layout 1b] [--specs int8 sign ...] [--json OUT]

Runs `ftrecycle diff --delta-dtype bfloat16 --max-memory 512MiB` (the transfer engine's default
budget, here a bound on the whole command's peak RSS) under GNU time, once per setting after a
dense run that fills the page cache and is the baseline; then `ftrecycle apply` of that delta onto
the target base with the same budget, twice (the faster run counts). Records wall time, peak RSS,
stored bytes, the size ratio against the dense bf16 delta, the tensors' relative errors (from the
manifest), and the apply time against the dense delta's apply (run twice before the codecs and
twice after; the fastest of the four is the reference).

The default settings are every method of ``ftrecycle.codecs.CODECS`` at the representative
settings of :data:`REPRESENTATIVE`; a registered method missing from that table is an error
(add it there), so a new codec cannot go unmeasured. The synthetic diff is i.i.d. noise (no
low-rank structure): lowrank errors here are the worst case, not what a real fine-tuning diff gives.
The machine (cores, load average before and after each run, library versions) is recorded beside
the numbers: on a shared machine the wall times move with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ftrecycle.codecs import AUTO, CODECS, parse_compression
from ftrecycle.errors import ConfigError

from _trio import build_trio

HERE = Path(__file__).resolve().parent
#: Method -> representative ``--compress`` settings (those the registry cannot parse are skipped and listed).
REPRESENTATIVE: dict[str, list[str]] = {
    "int8": ["int8"],
    "sign": ["sign", "sign:axis=row"],
    "sparse": ["sparse:ratio=8"],
    "lowrank": ["lowrank:rank=64"],
    "kbit": ["kbit:bits=4,group=128", "kbit:bits=2,group=64"],
    "mpsvd": ["mpsvd:ratio=16", "mpsvd:ratio=16,rank=64"],
    "signlr": ["signlr:ratio=8"],
    "lossless": ["lossless"],
    "auto": ["auto:ratio=8"],
}


def default_specs() -> tuple[list[str], list[dict[str, str]]]:
    """The settings to run for every registered method, and those skipped (with why).

    Raises:
        SystemExit: a registered method has no representative setting that parses.
    """
    specs, skipped = [], []
    for method in (*CODECS, AUTO):  # the size budget is not a stored method, but a setting users give
        usable = []
        for spec in REPRESENTATIVE.get(method, []):
            try:
                parse_compression(spec)
            except ConfigError as e:
                skipped.append({"spec": spec, "why": str(e)})
                continue
            usable.append(spec)
        if not usable:
            sys.exit(f"bench_compress: method {method!r} is registered but has no setting in REPRESENTATIVE")
        specs += usable
    return specs, skipped


class Refused(Exception):
    """ftrecycle refused a setting (its one-line error): recorded as such, the other settings still run."""


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run an ftrecycle subcommand under GNU time: (wall seconds, peak RSS MiB)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        full = ["/usr/bin/time", "-f", "%e %M", "-o", tf.name, sys.executable, "-m", "ftrecycle.cli", *cmd]
        run = subprocess.run(full, capture_output=True, text=True)
        if run.returncode != 0:
            raise Refused(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}")
        wall, kib = Path(tf.name).read_text().split()[-2:]
    return float(wall), round(int(kib) / 1024, 1)


#: `ftrecycle apply` runs per delta; the fastest counts (an apply writes 2.3 GiB, and the page cache's
#: write-back makes single runs vary by up to twice on this machine)
APPLY_RUNS = 2


def apply_time(trio: dict[str, Path], delta: Path, out: Path, budget: str) -> dict:
    """`ftrecycle apply` of ``delta`` onto the target base, :data:`APPLY_RUNS` times: the fastest run's
    wall seconds, every run's, and the largest peak RSS."""
    cmd = ["apply", "--delta", str(delta), "--target-base", str(trio["target_base"]), "-o", str(out)]
    walls, peak = [], 0.0
    for _ in range(APPLY_RUNS):
        wall, rss = timed([*cmd, "--max-memory", budget, "-q", "--force"])
        shutil.rmtree(out)
        walls.append(wall)
        peak = max(peak, rss)
    return {"apply_wall_s": min(walls), "apply_wall_s_runs": walls, "apply_peak_rss_mib": peak}


def run_diff(trio: dict[str, Path], out: Path, spec: str | None, budget: str) -> dict:
    """`ftrecycle diff` (dense when ``spec`` is None): time, memory, size and the manifest's errors."""
    cmd = ["diff", "--base", str(trio["source_base"]), "--finetuned", str(trio["source_finetuned"]), "-o", str(out)]
    cmd += ["--delta-dtype", "bfloat16", "--max-memory", budget, "-q", "--force"]
    load = os.getloadavg()[0]
    wall, rss = timed(cmd + (["--compress", spec] if spec else []))
    manifest = json.loads((out / "ftrecycle-delta.json").read_text())
    errors = [
        e["compression"]["error"] for e in manifest["tensors"].values() if (e.get("compression") or {}).get("error")
    ]
    return {
        "spec": spec or "dense",
        "wall_s": wall,
        "peak_rss_mib": rss,
        "stored_bytes": sum(f.stat().st_size for f in out.glob("delta*.safetensors")),
        "ratio_vs_dense_bf16": (manifest.get("compression") or {}).get("ratio"),
        "compressed_tensors": len(errors),
        "median_rel_error": statistics.median(errors) if errors else None,
        "max_rel_error": max(errors) if errors else None,
        "load_avg_1min_before": round(load, 2),
    }


def machine() -> dict:
    """What the numbers were measured on."""
    import numpy  # heavy: only for its version
    import torch  # heavy: only for its version

    model = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        platform.processor(),
    )
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "load_avg_1min_at_start": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default="1b")
    ap.add_argument("--specs", nargs="*", default=None, help="settings to run (default: every registered method)")
    ap.add_argument("--max-memory", default="512MiB")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    specs, skipped = (args.specs, []) if args.specs is not None else default_specs()
    info = machine()
    trio = build_trio(HERE / "work", args.layout)
    work = HERE / "work"
    dense_dir, out, applied = work / "compress-dense", work / "compress-out", work / "compress-applied"
    dense = run_diff(trio, dense_dir, None, args.max_memory)  # warm-up, and the dense baseline
    dense_apply = apply_time(trio, dense_dir, applied, args.max_memory)["apply_wall_s_runs"]
    rows = []
    refused = []
    for spec in specs:
        try:
            row = run_diff(trio, out, spec, args.max_memory)
        except Refused as e:
            refused.append({"spec": spec, "error": str(e)})
            print(json.dumps(refused[-1]), flush=True)
            continue
        row.update(apply_time(trio, out, applied, args.max_memory))
        shutil.rmtree(out)
        rows.append(row)
        print(json.dumps(row), flush=True)
    dense_apply += apply_time(trio, dense_dir, applied, args.max_memory)["apply_wall_s_runs"]
    shutil.rmtree(dense_dir)
    reference = min(dense_apply)
    dense.update({"apply_wall_s": reference, "apply_wall_s_runs": dense_apply})
    for row in rows:
        row["apply_vs_dense"] = round(row["apply_wall_s"] / reference, 3)
    info["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    result = {
        "layout": args.layout,
        "max_memory": args.max_memory,
        "machine": info,
        "skipped": skipped,
        "refused": refused,
        "runs": [dense, *rows],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
