"""Throughput of the built-in GSM8K evaluator against lm-eval on the same items and model.

Usage: .venv/bin/python benchmarks/bench_eval.py [--items 512] [--batch 64] [--max-gen-toks 32]

Makes a tiny Llama and GSM8K-format items locally, then times (a) the built-in
evaluator in process and (b) lm-eval's simple_evaluate on a local task YAML with the
same settings, and checks that the per-item generations agree.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from ftrecycle.evaluate.builtin import evaluate_gsm8k, load_for_eval
from ftrecycle.evaluate.data import read_gsm8k
from ftrecycle.evaluate.harness import run_lm_eval, write_gsm8k_task

import _paths  # noqa: F401  (tests/fixtures on sys.path)
from fixtures.tiny import make_versions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-gen-toks", type=int, default=32)
    args = ap.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        model_dir = make_versions("llama", root / "m")["source_base"]
        rows = []
        for _ in range(args.items):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            rows.append({"question": f"{a} + {b} = ?", "answer": f"The answer is {a + b} #### {a + b}"})
        data = root / "test.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        write_gsm8k_task(root / "tasks", "bench_gsm8k", data, max_gen_toks=args.max_gen_toks)

        t0 = time.perf_counter()
        res = run_lm_eval(
            [str(model_dir)],
            ["bench_gsm8k"],
            task_dir=root / "tasks",
            batch_size=args.batch,
            log_samples=True,
            device="cpu",
        )
        lm_s = time.perf_counter() - t0

        model, tok = load_for_eval(str(model_dir), device="cpu")
        items = read_gsm8k(data)
        evaluate_gsm8k(model, tok, items[: args.batch], batch_size=args.batch, max_gen_toks=args.max_gen_toks)  # warm
        rep = evaluate_gsm8k(model, tok, items, batch_size=args.batch, max_gen_toks=args.max_gen_toks)
        samples = {
            s["doc_id"]: s for s in res["samples"][str(model_dir)]["bench_gsm8k"] if s["filter"] == "strict-match"
        }
        agree = sum(samples[i.index]["resps"][0][0] == i.generation for i in rep.items)
        print(f"items {rep.n}, batch {args.batch}, max_gen_toks {args.max_gen_toks}, tiny Llama on CPU")
        print(f"built-in evaluator: {rep.seconds:.2f} s = {rep.n / rep.seconds:.0f} problems/s (in process)")
        print(
            f"lm-eval simple_evaluate (model load + task build + generation): {lm_s:.2f} s = "
            f"{rep.n / lm_s:.0f} problems/s"
        )
        print(f"identical generations: {agree}/{rep.n}")
        sys.exit(0 if agree == rep.n else 1)


if __name__ == "__main__":
    main()
