"""``sparse``: the ``k`` largest-magnitude entries of a diff matrix, in compressed-sparse-row form.

Formula: keep ``T_k(D) = D * [|D| >= t_k]`` where ``t_k`` is the ``k``-th largest ``|D_ij|``
(ties taken in element order, so exactly ``k`` entries); everything else decodes as 0.
Parts: ``indptr`` (m+1,) int64 row pointers, ``indices`` (k,) columns (uint16 when
n <= 65536, else int32) and ``values`` (k,) in the delta's dtype; element ``(i, j)`` is
``values[e]`` for the entry ``e`` of row ``i`` naming column ``j``, else 0.

``k`` is ``density * m * n`` (``sparse:density=D``) or whatever makes the matrix ``ratio``
times smaller than dense (``sparse:ratio=X``). Selection is exact: a two-level radix select
on the float32 bit patterns of ``|D|`` (two counting passes, then one emitting pass).

Reference: magnitude pruning of the fine-tuning delta, as in the delta-sparsification
literature; unlike DARE (Yu et al., "Language Models are Super Mario", 2023,
arXiv:2311.03099), which drops entries at random and rescales the rest, this keeps the
top-k by magnitude, unscaled — the best ``k``-sparse approximation in Frobenius norm.
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
    Reader,
    blocks,
    float_part,
    measured,
    read_part,
    rescaled,
    row_block_bytes,
    row_gains,
    row_span,
    rows_of,
    squared,
)
from ftrecycle.dtypes import FLOAT_DTYPES, I32, I64, U16, DType, from_storage, to_storage
from ftrecycle.io.safetensors_format import TensorInfo


def index_dtype(n: int) -> DType:
    """The dtype of column indices into rows of ``n`` elements."""
    return U16 if n <= 2**16 else I32


def layout(spec: Compression, m: int, n: int, dtype: DType) -> dict[str, PartSpec]:
    """Parts of the ``k`` entries the spec asks (none when ``k`` < 1)."""
    if spec.density is not None:
        k = max(1, round(spec.density * m * n))
    else:
        if spec.ratio is None:
            raise ValueError("sparse needs density or ratio")
        entry = index_dtype(n).itemsize + dtype.itemsize
        k = int((m * n * dtype.itemsize / spec.ratio - 8 * (m + 1)) // entry)
    return csr_parts(m, n, min(k, m * n), dtype) if k >= 1 else {}


def csr_parts(m: int, n: int, k: int, dtype: DType) -> dict[str, PartSpec]:
    """Parts of ``k`` kept entries in compressed-sparse-row form."""
    return {"indptr": (I64, (m + 1,)), "indices": (index_dtype(n), (k,)), "values": (dtype, (k,))}


def _abs_bits(x: np.ndarray) -> np.ndarray:
    return np.abs(x.astype(np.float32, copy=False)).view(np.uint32)


def _threshold(read: Reader, m: int, n: int, k: int, block: int) -> tuple[int, int, float]:
    """The float32 bit pattern of the ``k``-th largest magnitude, how many entries equal to it
    are kept, and the squared norm (two counting passes)."""
    hist = np.zeros(1 << 16, dtype=np.int64)
    total = 0.0
    for r0, r1 in blocks(m, n, block):
        rows = rows_of(read, n, r0, r1)
        total += squared(rows)
        hist += np.bincount((_abs_bits(rows) >> 16).ravel(), minlength=1 << 16)
    above = np.cumsum(hist[::-1])[::-1]  # above[h]: entries whose high half is >= h
    hi = int(np.flatnonzero(above >= k)[-1])
    over = int(above[hi + 1]) if hi + 1 < len(above) else 0
    low = np.zeros(1 << 16, dtype=np.int64)
    for r0, r1 in blocks(m, n, block):
        bits = _abs_bits(rows_of(read, n, r0, r1)).ravel()
        sel = bits[(bits >> 16) == hi]
        low += np.bincount(sel & 0xFFFF, minlength=1 << 16)
    above_lo = np.cumsum(low[::-1])[::-1]
    lo = int(np.flatnonzero(over + above_lo >= k)[-1])
    ties = k - over - (int(above_lo[lo + 1]) if lo + 1 < len(above_lo) else 0)
    return (hi << 16) | lo, ties, total


def encode(job: Job) -> Encoded:
    """Write the ``k`` largest magnitudes (``k`` from the job's parts) row block by row block."""
    read, write, (m, n), dtype, ct, block = job.read, job.write, job.shape, job.dtype, job.ct, job.block
    k = job.parts["values"][1][0]
    index = job.parts["indices"][0].storage
    threshold, ties, total = _threshold(read, m, n, k, block)
    indptr = np.zeros(m + 1, dtype=np.int64)
    done, err = 0, 0.0
    for r0, r1 in blocks(m, n, block):
        rows = rows_of(read, n, r0, r1)
        bits = _abs_bits(rows)
        keep = bits > threshold
        if ties > 0:
            eq = np.flatnonzero((bits == threshold).ravel())[:ties]
            keep.reshape(-1)[eq] = True
            ties -= eq.size
        r_idx, c_idx = np.nonzero(keep)
        vals = to_storage(rows[r_idx, c_idx], dtype)
        write("indices", done, c_idx.astype(index))
        write("values", done, vals)
        done += r_idx.size
        indptr[r0 + 1 : r1 + 1] = np.bincount(r_idx, minlength=r1 - r0)
        rest = rows.copy()
        rest[r_idx, c_idx] -= from_storage(vals, dtype, ct)
        err += squared(rest)
    np.cumsum(indptr, out=indptr)
    write("indptr", 0, indptr)
    return measured(total, err, kept=done)


def decode(p: Packed, start: int, count: int, out: np.ndarray, cache: dict[Any, Any]) -> np.ndarray:
    """Elements ``[start, start + count)`` into ``out``: the kept entries under them, 0 elsewhere."""
    r0, r1, n = row_span(p, start, count)
    ptr = read_part(p, "indptr", r0, r1 - r0 + 1)
    e0, e1 = int(ptr[0]), int(ptr[-1])
    out.fill(0)
    if e1 > e0:
        cols = read_part(p, "indices", e0, e1 - e0).astype(np.int64)
        vals = float_part(p, "values", e0, e1 - e0, out.dtype)
        rows = np.repeat(np.arange(r0, r1, dtype=np.int64), np.diff(ptr))
        pos = rows * n + cols - start
        keep = (pos >= 0) & (pos < count)
        out[pos[keep]] = vals[keep]
    return out


def state_bytes(parts: dict[str, PartSpec], shape: tuple[int, int], itemsize: int, block: int) -> int:
    """Bytes the encoder holds: the row pointers, the two histograms, and row blocks."""
    rows = row_block_bytes(itemsize, block)
    return 8 * (shape[0] + 1) + 3 * 8 * (1 << 16) + 3 * rows


def expect(m: int, n: int, parts: dict[str, TensorInfo]) -> Expected:
    """``indptr`` (m+1,) int64, ``indices`` (k,) uint16 (n <= 65536) or int32, ``values`` (k,)
    float (k read from ``values``)."""
    k = parts["values"].shape[0] if len(parts["values"].shape) == 1 else -1
    return {
        "indptr": (frozenset({I64}), (m + 1,)),
        "indices": (frozenset({U16, I32} if n <= 1 << 16 else {I32}), (max(k, 0),)),
        "values": (FLOAT_DTYPES, (max(k, 0),)),
    }


def gain(parts: dict[str, np.ndarray], g: np.ndarray) -> dict[str, np.ndarray]:
    """Each kept value times its row's gain (rows from ``indptr``).

    Raises:
        ValueError: ``g`` is not one finite gain per row, or ``indptr`` is no row pointer of ``values``.
    """
    ptr, values = parts["indptr"].astype(np.int64), parts["values"]
    g = row_gains(g, ptr.size - 1)
    steps = np.diff(ptr)
    if ptr.size == 0 or ptr[0] != 0 or ptr[-1] != values.size or bool(np.any(steps < 0)):
        raise ValueError("indptr is not a row pointer of the values (it must start at 0, never decrease, end at k)")
    return {"values": rescaled(values, np.repeat(g, steps))}


CODEC = Codec(
    "sparse",
    ("density", "ratio"),
    frozenset({"indptr", "indices", "values"}),
    layout,
    encode,
    decode,
    state_bytes,
    expect,
    gain=gain,
    row_gain=True,
)
