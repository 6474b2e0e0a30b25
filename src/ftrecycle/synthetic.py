"""Synthetic checkpoints with the exact tensor names, shapes and dtype of real models.

Used by benchmarks and memory tests: a model of any size is written tensor by
tensor (never whole in memory), and *versions* of it share a base plus small
per-version noise, as fine-tuned and continued-pretrained checkpoints do.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ftrecycle.dtypes import from_torch
from ftrecycle.io.output import ShardedWriter
from ftrecycle.io.safetensors_format import pwrite_all

Layout = list[tuple[str, tuple[int, ...]]]

#: Llama 3.2 1B (meta-llama/Llama-3.2-1B config.json).
LLAMA_3_2_1B = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": True,
}


def llama_layout(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    tie_word_embeddings: bool,
) -> Layout:
    """Tensor names and shapes of a Llama checkpoint, in ``save_pretrained`` order."""
    head = hidden_size // num_attention_heads
    kv = num_key_value_heads * head
    out: Layout = [("model.embed_tokens.weight", (vocab_size, hidden_size))]
    for i in range(num_hidden_layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (hidden_size,)),
            (p + "mlp.down_proj.weight", (hidden_size, intermediate_size)),
            (p + "mlp.gate_proj.weight", (intermediate_size, hidden_size)),
            (p + "mlp.up_proj.weight", (intermediate_size, hidden_size)),
            (p + "post_attention_layernorm.weight", (hidden_size,)),
            (p + "self_attn.k_proj.weight", (kv, hidden_size)),
            (p + "self_attn.o_proj.weight", (hidden_size, hidden_size)),
            (p + "self_attn.q_proj.weight", (hidden_size, hidden_size)),
            (p + "self_attn.v_proj.weight", (kv, hidden_size)),
        ]
    out.append(("model.norm.weight", (hidden_size,)))
    if not tie_word_embeddings:
        out.append(("lm_head.weight", (vocab_size, hidden_size)))
    return out


def llama_config(**arch: int | bool) -> dict[str, object]:
    """A config.json for :func:`llama_layout`'s arguments."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 2048,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        **arch,
    }


def _seed(name: str, version: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{name}:{version}".encode()).digest()[:7], "little")


def tensor_values(name: str, shape: tuple[int, ...], noise: list[tuple[int, float]]) -> torch.Tensor:
    """Deterministic float32 values: a base draw (scale 0.02) plus each ``(version, scale)`` noise draw."""
    rows = shape[0]
    row = 1
    for d in shape[1:]:
        row *= d
    out = torch.empty(shape, dtype=torch.float32)
    flat = out.view(rows, row) if shape else out.view(1)
    gens = [(torch.Generator().manual_seed(_seed(name, v)), s) for v, s in [(0, 0.02), *noise]]
    step = max(1, (1 << 24) // max(row, 1))
    for r in range(0, rows if shape else 1, step):
        block = flat[r : r + step]
        block.zero_()
        for g, s in gens:
            block.add_(torch.randn(block.shape, generator=g) * s)
    if len(shape) == 1 and "norm" in name:
        out.add_(1.0)
    return out


def write_synthetic(
    path: str | Path,
    layout: Layout,
    config: dict[str, object],
    *,
    noise: list[tuple[int, float]],
    dtype: torch.dtype = torch.bfloat16,
    shard_size: int = 1 << 30,
) -> Path:
    """Write one version of a synthetic model, one tensor in memory at a time."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(out, [(n, from_torch(dtype), s) for n, s in layout], max_shard_bytes=shard_size)
    writer.open()
    try:
        for name, shape in layout:
            t = tensor_values(name, shape, noise).to(dtype).reshape(-1)
            slot = writer.slots[name]
            pwrite_all(slot.fd, t.view(torch.uint8).numpy().data, slot.offset)
    finally:
        writer.close(sync=False)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
