"""``int8``: a diff matrix quantized to int8 with one absmax scale per row.

Formula: for row ``i``, ``scale_i = max_j |D_ij| / 127`` (float32) and
``q_ij = clip(round(D_ij / scale_i), -127, 127)`` (int8, round half to even; a zero row
keeps ``scale_i = 0``); element ``(i, j)`` decodes as ``q_ij * scale_i``. Parts: ``q`` (m, n)
int8 and ``scale`` (m,) float32. One pass over the diff.

Reference: symmetric absmax quantization with one scale per row (vector-wise), as in
LLM.int8() (Dettmers et al. 2022, arXiv:2208.07339), applied to the diff rather than the weights.
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
    blocks,
    measured,
    read_part,
    rescaled,
    row_block_bytes,
    row_gains,
    row_span,
    rows_of,
    squared,
)
from ftrecycle.dtypes import F32, I8, DType
from ftrecycle.io.safetensors_format import TensorInfo


def layout(spec: Compression, m: int, n: int, dtype: DType) -> dict[str, PartSpec]:
    """Parts ``q`` (m, n) int8 and ``scale`` (m,) float32."""
    return {"q": (I8, (m, n)), "scale": (F32, (m,))}


def encode(job: Job) -> Encoded:
    """Quantize row block by row block; the scales are written last."""
    read, write, (m, n), ct, block = job.read, job.write, job.shape, job.ct, job.block
    scales = np.zeros(m, dtype=np.float32)
    total = err = 0.0
    for r0, r1 in blocks(m, n, block):
        rows = rows_of(read, n, r0, r1)
        total += squared(rows)
        sc = (np.max(np.abs(rows), axis=1) / 127).astype(np.float32)
        safe = np.where(sc > 0, sc, 1).astype(ct)
        q = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(np.int8)
        write("q", r0 * n, q.reshape(-1))
        scales[r0:r1] = sc
        err += squared(rows - q * sc.astype(ct)[:, None])
    write("scale", 0, scales)
    return measured(total, err)


def decode(p: Packed, start: int, count: int, out: np.ndarray, cache: dict[Any, Any]) -> np.ndarray:
    """Elements ``[start, start + count)`` of ``q * scale[row]`` into ``out``."""
    r0, r1, n = row_span(p, start, count)
    q = read_part(p, "q", start, count)
    scale = read_part(p, "scale", r0, r1 - r0)
    rows = np.arange(start, start + count, dtype=np.int64) // n - r0
    np.multiply(q, scale[rows], out=out, casting="unsafe")
    return out


def state_bytes(parts: dict[str, PartSpec], shape: tuple[int, int], itemsize: int, block: int) -> int:
    """Bytes the encoder holds: the scales and row blocks."""
    rows = row_block_bytes(itemsize, block)
    return 4 * shape[0] + 2 * rows


def expect(m: int, n: int, parts: dict[str, TensorInfo]) -> Expected:
    """``q`` (m, n) int8 and ``scale`` (m,) float32."""
    return {"q": (frozenset({I8}), (m, n)), "scale": (frozenset({F32}), (m,))}


def gain(parts: dict[str, np.ndarray], g: np.ndarray) -> dict[str, np.ndarray]:
    """The scale of row ``i`` times ``g[i]`` (the codes stay).

    Raises:
        ValueError: ``g`` is not one finite gain per row.
    """
    scale = parts["scale"]
    return {"scale": rescaled(scale, row_gains(g, scale.shape[0]))}


CODEC = Codec(
    "int8", (), frozenset({"q", "scale"}), layout, encode, decode, state_bytes, expect, gain=gain, row_gain=True
)
