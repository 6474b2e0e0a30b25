"""Time, peak memory, size and error of `ftrecycle diff --compress` on the Llama-3.2-1B-layout trio.

Usage: .venv/bin/python benchmarks/bench_compress.py [--layout 1b] [--specs int8 sign ...] [--json OUT]
Runs `ftrecycle diff --delta-dtype bfloat16 --max-memory 512MiB` (the transfer engine's default
budget, here a bound on the whole command's peak RSS) under GNU time, once per setting after a
dense warm-up run that fills the page cache; records wall time, peak RSS, the size ratio against
the dense bf16 delta and the tensors' relative errors (from the manifest), then deletes the delta.
The synthetic diff is i.i.d. noise (no low-rank structure): lowrank errors here are the worst case,
not what a real fine-tuning diff gives.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _trio import build_trio

HERE = Path(__file__).resolve().parent
SPECS = ["int8", "sign", "sparse:ratio=8", "lowrank:rank=64", "lowrank:ratio=16"]


def run(trio: dict[str, Path], out: Path, spec: str | None, budget: str) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        cmd = ["/usr/bin/time", "-f", "%e %M", "-o", tf.name, sys.executable, "-m", "ftrecycle.cli", "diff"]
        cmd += ["--base", str(trio["source_base"]), "--finetuned", str(trio["source_finetuned"])]
        cmd += ["-o", str(out), "--delta-dtype", "bfloat16", "--max-memory", budget, "-q", "--force"]
        if spec:
            cmd += ["--compress", spec]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        wall, kib = Path(tf.name).read_text().split()[-2:]
    manifest = json.loads((out / "ftrecycle-delta.json").read_text())
    errors = [
        e["compression"]["error"] for e in manifest["tensors"].values() if (e.get("compression") or {}).get("error")
    ]
    stored = sum(f.stat().st_size for f in out.glob("delta*.safetensors"))
    shutil.rmtree(out)
    return {
        "spec": spec or "dense",
        "wall_s": float(wall),
        "peak_rss_mib": round(int(kib) / 1024, 1),
        "stored_bytes": stored,
        "ratio_vs_dense_bf16": (manifest.get("compression") or {}).get("ratio"),
        "compressed_tensors": len(errors),
        "median_rel_error": statistics.median(errors) if errors else None,
        "max_rel_error": max(errors) if errors else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layout", default="1b")
    ap.add_argument("--specs", nargs="*", default=SPECS)
    ap.add_argument("--max-memory", default="512MiB")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    trio = build_trio(HERE / "work", args.layout)
    out = HERE / "work" / "compress-out"
    rows = [run(trio, out, None, args.max_memory)]  # warm-up and the dense baseline
    for spec in args.specs:
        rows.append(run(trio, out, spec, args.max_memory))
        print(json.dumps(rows[-1]), flush=True)
    result = {"layout": args.layout, "max_memory": args.max_memory, "runs": rows}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
