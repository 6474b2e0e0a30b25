"""Training tokens per second per process: DDP on 2 CPU processes against 1 process, in one run.

Usage: .venv/bin/python benchmarks/bench_ddp.py [--steps 30] [--batch 8] [--hidden 128]
           [--out benchmarks/results/ddp-cpu.json]

Makes a small Llama (ftrecycle.tiny's tokenizer, ``--hidden`` wide) and fixed-length
GSM8K-format items, then runs the same ``ftrecycle finetune`` twice, one after the other:
one plain process, and ``accelerate launch --config_file examples/accelerate/ddp.yaml
--num_processes 2`` (CPU processes over gloo), both with one thread per process
(``OMP_NUM_THREADS=1``) and the same per-process batch. Tokens per second per process
is (per-process batch x tokens per example) / (seconds per step), seconds per step as
``finetune`` reports it (training only). The ratio is 2-process over 1-process: 1.0 is
perfect scaling, less is what gradient all-reduce and a shared machine cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _paths  # noqa: F401  (tests/fixtures on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], env: dict[str, str]) -> float:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench_ddp: {' '.join(cmd[:6])}... failed:\n{r.stderr[-2000:]}")
    m = re.search(r"([0-9.]+) s/step", r.stdout)
    if m is None:
        sys.exit(f"bench_ddp: no s/step in the output:\n{r.stdout}")
    return float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="examples per process per step")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ddp-cpu.json")
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig

    from ftrecycle.finetune.data import encode, load_examples

    from fixtures.tiny import make_model, save, word_tokenizer

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        cfg = LlamaConfig(
            vocab_size=96,
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )
        model = save(make_model(cfg, seed=0, dtype=torch.float32), root / "m")
        rng = random.Random(0)
        rows = []
        for _ in range(args.batch * 2 * args.steps):
            a, b = rng.randint(10, 49), rng.randint(10, 49)  # two-digit operands: every item has the same length
            rows.append({"question": f"{a} + {b} = ?", "answer": f"{a} + {b} = {a + b} . The answer is {a + b}"})
        data = root / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tok = word_tokenizer(96)
        lengths = [len(f["input_ids"]) for r in load_examples(data) if (f := encode(r, tok, 2048)) is not None]
        tokens = sum(lengths) / len(lengths)

        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        }
        flags = ["--model", str(model), "--data", str(data), "--max-steps", str(args.steps)]
        flags += ["--batch-size", str(args.batch), "--save-every", str(10 * args.steps), "--bf16", "off"]
        t0 = time.time()
        one = _run([sys.executable, "-m", "ftrecycle.cli", "finetune", *flags, "-o", str(root / "one")], env)
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
        launch += [str(ROOT / "examples" / "accelerate" / "ddp.yaml"), "--num_processes", "2"]
        launch += ["--mixed_precision", "no"]
        two = _run([*launch, "-m", "ftrecycle.cli", "finetune", *flags, "-o", str(root / "two")], env)
        wall = time.time() - t0

    tps_one = args.batch * tokens / one
    tps_two = args.batch * tokens / two
    result = {
        "benchmark": "bench_ddp",
        "what": "finetune training tokens/s per process, DDP over gloo on CPU processes, OMP_NUM_THREADS=1",
        "model": {"family": "llama", "hidden": args.hidden, "layers": 2, "dtype": "float32"},
        "steps": args.steps,
        "batch_per_process": args.batch,
        "tokens_per_example": round(tokens, 2),
        "one_process": {"seconds_per_step": one, "tokens_per_second_per_process": round(tps_one, 1)},
        "two_processes": {"seconds_per_step": two, "tokens_per_second_per_process": round(tps_two, 1)},
        "ratio_two_over_one": round(tps_two / tps_one, 3),
        "wall_seconds": round(wall, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "note": "both runs in one invocation, one after the other, on a machine other jobs may share",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
