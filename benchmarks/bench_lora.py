"""Tokens per second of LoRA vs full fine-tuning (``ftrecycle.finetune``) on the lab's tiny-preset model size.

Usage: PYTHONPATH=src .venv/bin/python benchmarks/bench_lora.py [--steps 40] [--batch 16] [--repeats 5] [--out FILE]

Builds a random Llama of the tiny preset's dimensions (src/ftrecycle/lab/config.py: ModelSpec(), the lab
tokenizer's 293 tokens), GSM8K-shaped training lines of lab length, then runs ``finetune`` twice with the
same settings — full fine-tuning, and LoRA (rank 16 on every attention and MLP projection) — and reports
trained tokens (prompt and completion, padding excluded) per second of training wall time, from the
result's seconds per step. Writes benchmarks/results/lora-vs-full.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ftrecycle.finetune.config import FinetuneConfig
from ftrecycle.finetune.data import encode, load_examples
from ftrecycle.finetune.train import finetune
from ftrecycle.io.hf_load import load_tokenizer
from ftrecycle.lab.config import ModelSpec
from ftrecycle.lab.pretrain import llama_config

import _paths  # noqa: F401  (tests/fixtures on sys.path)
from fixtures.tiny import word_tokenizer

VOCAB = 293  # the lab tokenizer's size (seed-0/models/*/config.json of a tiny run)
RESULTS = Path(__file__).resolve().parent / "results" / "lora-vs-full.json"


def _data(path: Path, n: int, rng: random.Random) -> None:
    lines = []
    for _ in range(n):
        a, b, c = rng.randint(0, 20), rng.randint(0, 20), rng.randint(0, 9)
        q = f"{a} + {b} + {c} = ?"
        lines.append({"question": q, "answer": f"{a} + {b} = {a + b} . {a + b} + {c} = {a + b + c} #### {a + b + c}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="runs of each kind, alternating; the fastest is reported")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        spec = ModelSpec()
        net = AutoModelForCausalLM.from_config(llama_config(spec, VOCAB))
        net.save_pretrained(root / "base", safe_serialization=True)
        word_tokenizer(VOCAB).save_pretrained(root / "base")
        _data(root / "train.jsonl", args.steps * args.batch, random.Random(0))
        tok = load_tokenizer(root / "base")
        tokens = sum(len(f["input_ids"]) for r in load_examples(root / "train.jsonl") if (f := encode(r, tok, 2048)))
        per_step = tokens / args.steps  # steps * batch lines, each trained once (one epoch)
        runs: dict[str, dict[str, Any]] = {}
        # alternating repeats: the first run of a process pays start-up costs that would favour the second kind
        for rep in range(args.repeats):
            for name, extra in (("full", {}), ("lora", {"lora": True, "lora_rank": 16, "learning_rate": 1e-3})):
                cfg = FinetuneConfig(
                    max_steps=args.steps, batch_size=args.batch, logging_every=10, save_every=10**6, **extra
                )
                out = root / f"{name}-{rep}"
                res = finetune(str(root / "base"), root / "train.jsonl", out, config=cfg)
                rec = json.loads((out / "ftrecycle.json").read_text())
                run = runs.setdefault(name, {"seconds_per_step_each": [], "last_loss_each": []})
                run["seconds_per_step_each"].append(res.seconds_per_step)
                run["last_loss_each"].append(res.losses[-1][1])
                run["first_loss"] = res.losses[0][1]
                run["trainable_parameters"] = (rec.get("lora") or {}).get("trainable_parameters") or sum(
                    p.numel() for p in net.parameters()
                )
        for run in runs.values():
            # the least-disturbed run: on a shared machine other processes only ever add time
            run["seconds_per_step"] = min(run["seconds_per_step_each"])
            run["tokens_per_second"] = per_step / run["seconds_per_step"]
    report = {
        "what": "finetune tokens/s, full vs LoRA (r=16, attention+MLP projections), lab tiny-preset model size",
        "model": {**asdict(spec), "vocab_size": VOCAB, "parameters": sum(p.numel() for p in net.parameters())},
        "steps": args.steps,
        "batch": args.batch,
        "repeats": args.repeats,
        "tokens_per_step": per_step,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "runs": runs,
        "lora_speedup": runs["lora"]["tokens_per_second"] / runs["full"]["tokens_per_second"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
