"""Time and peak memory of `ftrecycle diagnose` (geometry only) on the Llama-3.2-1B-layout trio.

Usage: .venv/bin/python benchmarks/bench_diagnose.py [--layout 1b] [--rounds 3] [--json OUT]
Runs the CLI under GNU time (peak RSS) after a warm-up round; prints the median wall time and the
largest peak RSS, and the geometry totals (drift and diff of the synthetic versions).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _trio import build_trio

HERE = Path(__file__).resolve().parent


def run_once(trio: dict[str, Path]) -> tuple[float, float, dict]:
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        cmd = [
            "/usr/bin/time",
            "-f",
            "%e %M",
            "-o",
            tf.name,
            sys.executable,
            "-m",
            "ftrecycle.cli",
            "diagnose",
            "--source-base",
            str(trio["source_base"]),
            "--source-finetuned",
            str(trio["source_finetuned"]),
            "--target-base",
            str(trio["target_base"]),
            "--json",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        wall, kib = Path(tf.name).read_text().split()[-2:]
    return float(wall), int(kib) / 1024, json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layout", default="1b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    trio = build_trio(HERE / "work", args.layout)
    run_once(trio)  # warm-up: page cache
    runs = [run_once(trio) for _ in range(args.rounds)]
    result = {
        "layout": args.layout,
        "rounds": [{"wall_s": w, "peak_rss_mib": round(m, 1)} for w, m, _ in runs],
        "median_wall_s": statistics.median(w for w, _, _ in runs),
        "max_peak_rss_mib": round(max(m for _, m, _ in runs), 1),
        "elements": runs[0][2]["geometry"]["total"]["elements"],
        "total": runs[0][2]["geometry"]["total"],
        "verdict": runs[0][2]["verdict"],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
