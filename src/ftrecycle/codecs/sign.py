"""``sign``: a diff matrix stored as its sign bits and one scale (BitDelta).

Formula: ``D ≈ s * sign(D)`` with ``s = mean |D_ij|``, the scale that minimises
``||D - s * sign(D)||_F^2``; ``sign(0)`` is taken as +1. Parts: ``bits`` (ceil(mn/8),) uint8,
bit ``i*n + j`` set (little-endian within its byte) where ``D_ij >= 0``, and ``scale`` (1,)
float32; element ``(i, j)`` decodes as ``+s`` if its bit is set, else ``-s``. Two passes.

Reference: BitDelta (Liu et al., "BitDelta: Your Fine-Tune May Only Be Worth One Bit",
2024, arXiv:2402.10193), without its scale distillation step: one scale per matrix.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ftrecycle.codecs.base import (
    Codec,
    Compression,
    Encoded,
    Expected,
    Job,
    Packed,
    PartSpec,
    measured,
    read_part,
    row_block_bytes,
    squared,
)
from ftrecycle.dtypes import F32, U8, DType
from ftrecycle.io.safetensors_format import TensorInfo


def layout(spec: Compression, m: int, n: int, dtype: DType) -> dict[str, PartSpec]:
    """Parts ``bits`` (one bit per element) and ``scale`` (1,) float32."""
    return {"bits": (U8, ((m * n + 7) // 8,)), "scale": (F32, (1,))}


def encode(job: Job) -> Encoded:
    """One pass for the mean magnitude, one for the bits (whole bytes per read)."""
    read, write, ct, block = job.read, job.write, job.ct, job.block
    numel = job.shape[0] * job.shape[1]
    step = max(8, block - block % 8)
    total = absum = 0.0
    for s in range(0, numel, step):
        x = read(s, min(step, numel - s))
        total += squared(x)
        absum += float(np.sum(np.abs(x), dtype=np.float64))
    scale = np.float32(absum / numel)
    err = 0.0
    for s in range(0, numel, step):
        x = read(s, min(step, numel - s))
        pos = x >= 0
        write("bits", s // 8, np.packbits(pos, bitorder="little"))
        err += squared(x - np.where(pos, ct.type(scale), -ct.type(scale)))
    write("scale", 0, np.array([scale], dtype=np.float32))
    return measured(total, err)


def decode(p: Packed, start: int, count: int, out: np.ndarray, cache: dict[Any, Any]) -> np.ndarray:
    """Elements ``[start, start + count)`` of ``±scale`` into ``out`` (``2 * scale * bit - scale``)."""
    ct = out.dtype
    mag = float(read_part(p, "scale", 0, 1)[0])
    lo = start // 8
    raw = read_part(p, "bits", lo, (start + count + 7) // 8 - lo)
    bits = np.unpackbits(raw, bitorder="little")[start - 8 * lo : start - 8 * lo + count]
    np.multiply(bits, ct.type(2 * mag), out=out, casting="unsafe")
    np.subtract(out, ct.type(mag), out=out)
    return out


def state_bytes(parts: dict[str, PartSpec], shape: tuple[int, int], itemsize: int, block: int) -> int:
    """Bytes the encoder holds: two row blocks."""
    rows = row_block_bytes(itemsize, block)
    return 2 * rows


def expect(m: int, n: int, parts: dict[str, TensorInfo]) -> Expected:
    """``bits`` (ceil(mn/8),) uint8 and ``scale`` (1,) float32."""
    return {"bits": (frozenset({U8}), ((m * n + 7) // 8,)), "scale": (frozenset({F32}), (1,))}


CODEC = Codec("sign", (), frozenset({"bits", "scale"}), layout, encode, decode, state_bytes, expect)
