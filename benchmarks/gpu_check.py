"""The GPU check: bf16 FSDP recycle-then-fine-tune of the lab's ``gpu`` preset model, then evaluation.

Usage (where GPUs are present; one command, a few minutes on one H100/H200):

    .venv/bin/python benchmarks/gpu_check.py [--steps 300] [--gpus N] [--out benchmarks/results/gpu-check.json]

What it does, all local (no network):
1. makes the three versions (source base, source fine-tuned, newer target base) of a Llama with
   the lab ``gpu`` preset's shape (hidden 256, 4 layers, 8 heads, intermediate 1024; tiny's
   word tokenizer), bf16, and GSM8K-format arithmetic data;
2. ``accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes N -m
   ftrecycle.cli recycle-finetune ... --bf16 on --max-steps STEPS`` (as shipped apart from the
   process count), while sampling ``nvidia-smi`` for the peak GPU memory;
3. checks that the output is an ordinary safetensors model directory (transformers loads it, and
   ``ftrecycle transfer`` reads it back) recorded as FSDP with N processes;
4. scores it with the built-in evaluator, and with lm-eval's vLLM backend when vLLM is installed;
5. prints and writes throughput (training tokens/s, all GPUs and per GPU; eval items/s) and peak memory.

``--cpu-smoke`` runs the same steps on 2 CPU processes with the DDP config, float32 and a few
steps, to check the script itself where no GPU is lent (its figures mean nothing).
Exit status: 0 when every check passed, 1 otherwise (the failing step is printed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import _paths  # noqa: F401  (tests/fixtures on sys.path)

ROOT = Path(__file__).resolve().parents[1]


class PeakGpuMemory:
    """Samples ``nvidia-smi`` every 0.2 s: the highest memory in use on any GPU, in MiB."""

    def __init__(self) -> None:
        self.peak_mib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                used = [int(x) for x in out.split() if x.strip().isdigit()]
                self.peak_mib = max([self.peak_mib, *used])
            except (OSError, subprocess.SubprocessError, ValueError):
                return
            self._stop.wait(0.2)

    def __enter__(self) -> PeakGpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _sh(cmd: list[str], env: dict[str, str], what: str) -> str:
    print(f"[gpu_check] {what}: {' '.join(cmd[:8])} ...", flush=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-6000:], sep="\n", file=sys.stderr)
        sys.exit(f"[gpu_check] FAILED: {what} (exit {r.returncode})")
    return r.stdout


def _versions(root: Path, *, cpu: bool) -> dict[str, Path]:
    import torch

    from ftrecycle.lab.config import PRESETS
    from ftrecycle.lab.pretrain import llama_config

    from fixtures.tiny import make_model, perturbed, save

    spec = PRESETS["gpu"].model
    if cpu:  # the smoke run: one layer of the same width
        spec = replace(spec, layers=1)
    cfg = llama_config(spec, vocab_size=96)  # the lab's own model config (96: the tiny word tokenizer)
    base = make_model(cfg, seed=0, dtype=torch.bfloat16)
    return {
        "source_base": save(base, root / "source_base", max_shard_size="2GB"),
        "source_finetuned": save(perturbed(base, seed=1, scale=0.01), root / "source_finetuned", max_shard_size="2GB"),
        "target_base": save(perturbed(base, seed=2, scale=0.02), root / "target_base", max_shard_size="2GB"),
    }


def _data(root: Path, n_train: int, n_test: int) -> tuple[Path, Path]:
    rng = random.Random(0)

    def item() -> dict[str, str]:
        a, b = rng.randint(0, 24), rng.randint(0, 24)
        return {"question": f"{a} + {b} = ?", "answer": f"{a} + {b} = {a + b} . The answer is {a + b} #### {a + b}"}

    train, test = root / "train.jsonl", root / "test.jsonl"
    train.write_text("".join(json.dumps(item()) + "\n" for _ in range(n_train)))
    test.write_text("".join(json.dumps(item()) + "\n" for _ in range(n_test)))
    return train, test


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32, help="examples per GPU per step")
    ap.add_argument("--gpus", type=int, default=0, help="processes (default: every visible GPU)")
    ap.add_argument("--eval-items", type=int, default=500)
    ap.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu-check.json")
    ap.add_argument("--cpu-smoke", action="store_true", help="check this script on 2 CPU processes")
    args = ap.parse_args()

    import tempfile

    import torch

    cpu = args.cpu_smoke
    if not cpu and not torch.cuda.is_available():
        sys.exit("[gpu_check] no GPU visible: run on a GPU machine, or pass --cpu-smoke to check the script")
    procs = 2 if cpu else (args.gpus or torch.cuda.device_count())
    steps = min(args.steps, 4) if cpu else args.steps
    batch = min(args.batch, 2) if cpu else args.batch
    eval_items = min(args.eval_items, 6) if cpu else args.eval_items
    tmp = tempfile.TemporaryDirectory() if args.work is None else None
    root = Path(tmp.name) if tmp is not None else args.work
    root.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    if cpu:
        env["OMP_NUM_THREADS"] = "1"
    result: dict[str, Any] = {"benchmark": "gpu_check", "processes": procs, "steps": steps, "batch_per_process": batch}
    result["device"] = "cpu (smoke)" if cpu else torch.cuda.get_device_name(0)

    v = _versions(root, cpu=cpu)
    train, test = _data(root, max(2000, batch * procs * 4), eval_items)
    out = root / "recycled"
    config = "ddp.yaml" if cpu else "fsdp.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(ROOT / "examples" / "accelerate" / config), "--num_processes", str(procs)]
    if cpu:
        launch += ["--mixed_precision", "no"]
    cmd = [*launch, "-m", "ftrecycle.cli", "recycle-finetune"]
    cmd += ["--source-base", str(v["source_base"]), "--source-finetuned", str(v["source_finetuned"])]
    cmd += ["--target-base", str(v["target_base"]), "--data", str(train), "-o", str(out), "--force"]
    cmd += ["--max-steps", str(steps), "--batch-size", str(batch), "--learning-rate", "5e-4"]
    cmd += ["--save-every", str(max(1, steps // 2)), "--logging-every", "10", "--bf16", "off" if cpu else "on"]
    t0 = time.perf_counter()
    with PeakGpuMemory() as mem:
        text = _sh(cmd, env, f"recycle-finetune, {config}, {procs} processes")
    wall = time.perf_counter() - t0
    m = re.search(r"([0-9.]+) s/step", text)
    per_step = float(m.group(1)) if m else wall / steps

    from ftrecycle.finetune.data import encode, load_examples

    from fixtures.tiny import word_tokenizer

    tok = word_tokenizer(96)
    lengths = [len(f["input_ids"]) for r in load_examples(train)[:200] if (f := encode(r, tok, 2048)) is not None]
    tokens_per_step = batch * procs * sum(lengths) / len(lengths)
    rec = json.loads((out / "ftrecycle.json").read_text())
    result["train"] = {
        "wall_seconds": round(wall, 1),
        "seconds_per_step": per_step,
        "tokens_per_second": round(tokens_per_step / per_step, 1),
        "tokens_per_second_per_process": round(tokens_per_step / per_step / procs, 1),
        "peak_gpu_memory_mib": mem.peak_mib if not cpu else None,
        "distributed": rec.get("distributed"),
        "loss_first_last": [rec["losses"][0][1], rec["losses"][-1][1]] if rec.get("losses") else None,
    }
    checks = {
        "ordinary safetensors dir": bool(list(out.glob("*.safetensors"))) and not list(out.glob("*.bin")),
        "recorded as distributed": rec.get("processes") == procs
        and (cpu or procs == 1 or rec.get("distributed") == "FSDP"),
    }
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    checks["transformers loads it"] = True
    _sh(
        [sys.executable, "-m", "ftrecycle.cli", "transfer", "--source-base", str(v["source_base"]),
         "--source-finetuned", str(out), "--target-base", str(v["target_base"]), "-o", str(root / "moved")],
        env,
        "ftrecycle transfer reads the output",
    )  # fmt: skip
    checks["transfer reads it"] = True

    t1 = time.perf_counter()
    ev = _sh(
        [*launch, "-m", "ftrecycle.cli", "eval", "--model", str(out), "--builtin", str(test), "--json",
         "--max-new-tokens", "24", "--batch-size", "64"],
        env,
        f"built-in eval, {procs} processes",
    )  # fmt: skip
    result["eval_builtin"] = {
        "items": eval_items,
        "items_per_second": round(eval_items / (time.perf_counter() - t1), 2),
        "scores": json.loads(ev[ev.index("{") :])["table"],
    }
    if importlib.util.find_spec("vllm") is not None and not cpu:
        from ftrecycle.evaluate.harness import write_gsm8k_task

        write_gsm8k_task(root / "tasks", "gsm8k_local", test, max_gen_toks=24)
        t2 = time.perf_counter()
        vl = _sh(
            [sys.executable, "-m", "ftrecycle.cli", "eval", "--model", str(out), "--tasks", "gsm8k_local",
             "--task-dir", str(root / "tasks"), "--backend", "vllm", "--json"],
            env,
            "lm-eval with the vLLM backend",
        )  # fmt: skip
        result["eval_vllm"] = {
            "items_per_second": round(eval_items / (time.perf_counter() - t2), 2),
            "scores": json.loads(vl[vl.index("{") :])["table"],
        }
    else:
        result["eval_vllm"] = "skipped: vLLM is not installed" if not cpu else "skipped: --cpu-smoke"
    result["checks"] = checks
    print(json.dumps(result, indent=2))
    if not cpu:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
