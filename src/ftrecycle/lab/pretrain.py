"""Pretraining of the lab's model: one small Llama, five saved versions along two stages.

Stage 1 (general text, cosine decay to ``min_lr_ratio`` of the peak) saves M1, M2 and M3 at
three fifths, four fifths and its end; stage 2 (math-rich text, a linear anneal to zero as in
OLMo 2's mid-training) continues from M3 and saves M4 halfway and M5 at its end.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftrecycle.lab import world

VERSIONS = ("M1", "M2", "M3", "M4", "M5")


@dataclass(frozen=True)
class ModelSpec:
    """Size of the lab's Llama-architecture model."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 256


@dataclass(frozen=True)
class PretrainSpec:
    """Both pretraining stages."""

    stage1_steps: int = 1200
    stage2_steps: int = 600
    batch: int = 16
    seq_len: int = 128  # a whole problem with its worked answer fits in one block
    lr: float = 3e-3
    min_lr_ratio: float = 0.25
    stage2_lr: float = 5e-4
    warmup: int = 50
    weight_decay: float = 0.01


def llama_config(spec: ModelSpec, vocab_size: int) -> Any:
    """The transformers config of the lab model (tied embeddings, no dropout)."""
    from transformers import LlamaConfig  # heavy: kept off the CLI's start-up path

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _blocks(tok: Any, docs: Iterator[str], seq_len: int) -> Iterator[list[int]]:
    """Documents packed end to end (each closed by EOS) into blocks of ``seq_len`` tokens."""
    buf: list[int] = []
    while True:
        while len(buf) < seq_len:
            buf.extend(tok(next(docs), add_special_tokens=False)["input_ids"])
            buf.append(tok.eos_token_id)
        yield buf[:seq_len]
        buf = buf[seq_len:]


def lr_at(step: int, total: int, peak: float, *, warmup: int, floor_ratio: float, shape: str) -> float:
    """Warm-up then cosine decay to ``floor_ratio * peak`` (``shape="cosine"``) or linear to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    if shape == "cosine":
        return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
    return peak * (1 - frac)


def pretrain(
    out: Path,
    model_spec: ModelSpec,
    spec: PretrainSpec,
    *,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Train from scratch and save M1..M5 under ``out`` (float32 safetensors plus the tokenizer).

    Args:
        out: directory that receives ``M1`` .. ``M5``.
        model_spec: model size.
        spec: the two stages.
        seed: initialisation and data seed.
        progress: called with (steps done, total steps).

    Returns:
        The loss curve ``{"stage1": [(step, loss)], "stage2": [...]}`` and seconds taken.
    """
    import torch  # heavy: kept off the CLI's start-up path
    from transformers import AutoModelForCausalLM  # heavy: as torch

    t0 = time.perf_counter()
    tok = world.tokenizer()
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_config(llama_config(model_spec, len(tok)), dtype=torch.float32).to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.95),
    )
    total = spec.stage1_steps + spec.stage2_steps
    saves = {
        3 * spec.stage1_steps // 5: "M1",
        4 * spec.stage1_steps // 5: "M2",
        spec.stage1_steps: "M3",
        spec.stage1_steps + spec.stage2_steps // 2: "M4",
        total: "M5",
    }
    curves: dict[str, list[tuple[int, float]]] = {"stage1": [], "stage2": []}
    done = 0
    for stage, steps, mix, peak, shape in (
        ("stage1", spec.stage1_steps, world.STAGE1, spec.lr, "cosine"),
        ("stage2", spec.stage2_steps, world.STAGE2, spec.stage2_lr, "linear"),
    ):
        blocks = _blocks(tok, world.documents(random.Random(f"{seed}-{stage}"), mix), spec.seq_len)
        for step in range(steps):
            lr = lr_at(step, steps, peak, warmup=spec.warmup, floor_ratio=spec.min_lr_ratio, shape=shape)
            for g in opt.param_groups:
                g["lr"] = lr
            ids = torch.tensor([next(blocks) for _ in range(spec.batch)], device=device)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            if step % 25 == 0 or step == steps - 1:
                curves[stage].append((done, round(loss.item(), 4)))
            if done in saves:
                name = saves[done]
                model.eval()
                model.save_pretrained(out / name, safe_serialization=True)
                tok.save_pretrained(out / name)
                model.train()
            if progress is not None:
                progress(done, total)
    return {"loss": curves, "seconds": round(time.perf_counter() - t0, 1), "saves": {v: k for k, v in saves.items()}}
