"""Compress one 2-D diff tensor, streaming its rows: memory is a few row blocks plus the result.

Every encoder reads the dense diff through ``read(start, count)`` (flat element ranges,
in the compute dtype), writes its parts through ``write(part, start, values)`` at element
offsets, and returns the diff's norm and the relative error of what was stored
(``||d - decoded|| / ||d||``, measured against the stored, rounded parts).

- ``lowrank``: exact SVD for small matrices (:func:`exact`), otherwise a
  randomized SVD (Halko et al. 2011: Gaussian sketch of ``rank + 10`` columns, two
  power iterations) whose every product with the diff is one pass over its rows.
  The sketch is seeded by the tensor name, so a diff compresses the same every time.
- ``sparse``: the ``k`` largest magnitudes, exactly, by a two-level radix select on
  the float32 bit patterns (two counting passes, then one emitting pass; ties are
  taken in element order).
- ``int8``: per-row absmax scale, round to nearest; one pass.
- ``sign``: BitDelta's sign bits with one scale, the mean magnitude (the scale that
  minimises the squared error); two passes.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ftrecycle.codecs import Compression, layout
from ftrecycle.dtypes import BF16, DType

#: Matrices with at most this many elements get an exact SVD in memory ...
EXACT_ELEMENTS = 1 << 18
#: ... and so do those whose smaller side is at most this many times the sketch (little to save).
EXACT_SIDE_RATIO = 2
OVERSAMPLE = 10
POWER_ITERATIONS = 2

Reader = Callable[[int, int], np.ndarray]
Writer = Callable[[str, int, np.ndarray], None]


@dataclass
class Encoded:
    """What one encoder measured."""

    norm: float
    error: float
    rank: int | None = None
    kept: int | None = None


#: Elements converted at a time by :func:`to_storage`/:func:`from_storage` (bounds their temporaries).
CONVERT_BLOCK = 1 << 20


def to_storage(x: np.ndarray, dtype: DType) -> np.ndarray:
    """Round float values to ``dtype``'s storage form (bfloat16: nearest-even bits in uint16)."""
    if dtype is not BF16:
        return np.ascontiguousarray(x, dtype=dtype.storage)
    out = np.empty(x.shape, dtype=np.uint16)
    flat_in, flat_out = x.reshape(-1), out.reshape(-1)
    for s in range(0, flat_in.size, CONVERT_BLOCK):
        bits = np.ascontiguousarray(flat_in[s : s + CONVERT_BLOCK], dtype=np.float32).view(np.uint32)
        t = (bits >> 16) & 1
        t += 0x7FFF
        t += bits  # ties to even; a NaN's payload may round, it stays a NaN
        t >>= 16
        flat_out[s : s + CONVERT_BLOCK] = t
    return out


def from_storage(x: np.ndarray, dtype: DType, ct: np.dtype) -> np.ndarray:
    """Widen storage values to ``ct``."""
    if dtype is not BF16:
        return x.astype(ct)
    out = np.empty(x.shape, dtype=ct)
    flat_in, flat_out = x.reshape(-1), out.reshape(-1)
    for s in range(0, flat_in.size, CONVERT_BLOCK):
        flat_out[s : s + CONVERT_BLOCK] = (flat_in[s : s + CONVERT_BLOCK].astype(np.uint32) << 16).view(np.float32)
    return out


def _blocks(m: int, n: int, block: int) -> Iterator[tuple[int, int]]:
    rows = max(1, block // max(n, 1))
    for r0 in range(0, m, rows):
        yield r0, min(m, r0 + rows)


def _rows(read: Reader, n: int, r0: int, r1: int) -> np.ndarray:
    return read(r0 * n, (r1 - r0) * n).reshape(r1 - r0, n)


def exact(m: int, n: int, k: int) -> bool:
    """Whether an (m, n) matrix gets an exact SVD for a sketch of ``k`` columns."""
    return m * n <= EXACT_ELEMENTS or min(m, n) <= EXACT_SIDE_RATIO * k


def _qr(y: np.ndarray) -> np.ndarray:
    """The Q of a reduced QR, in ``y``'s dtype.

    torch, not NumPy: NumPy's linalg computes in float64 whatever the input (a float32 sketch
    of a 128256-row embedding would take twice its size again in temporaries).
    """
    import torch

    return torch.linalg.qr(torch.from_numpy(y))[0].numpy()


def _small_svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import torch

    u, s, vt = torch.linalg.svd(torch.from_numpy(x), full_matrices=False)
    return u.numpy(), s.numpy(), vt.numpy()


def _svd(read: Reader, m: int, n: int, k: int, ct: np.dtype, seed: int, block: int) -> tuple[np.ndarray, ...]:
    """(U, S, Vt) with ``k`` columns (all of them for small matrices), and the squared norm."""
    if exact(m, n, k):
        d = np.empty((m, n), dtype=ct)
        for r0, r1 in _blocks(m, n, block):
            d[r0:r1] = _rows(read, n, r0, r1)
        total = float(np.sum(np.square(d, dtype=np.float64)))
        u, s, vt = _small_svd(d)
        return u, s, vt, np.array(total)
    rng = np.random.default_rng(seed)
    omega = rng.standard_normal((n, k)).astype(ct)
    y = np.empty((m, k), dtype=ct)
    total = 0.0
    for r0, r1 in _blocks(m, n, block):
        rows = _rows(read, n, r0, r1)
        total += float(np.sum(np.square(rows, dtype=np.float64)))
        y[r0:r1] = rows @ omega
    for _ in range(POWER_ITERATIONS):
        q = _qr(y)  # peak: y and q (two m x k)
        z = np.zeros((n, k), dtype=ct)
        for r0, r1 in _blocks(m, n, block):
            z += _rows(read, n, r0, r1).T @ q[r0:r1]
        del q
        qz = _qr(z)
        for r0, r1 in _blocks(m, n, block):
            y[r0:r1] = _rows(read, n, r0, r1) @ qz
    q = _qr(y)
    del y
    bk = np.zeros((k, n), dtype=ct)
    for r0, r1 in _blocks(m, n, block):
        bk += q[r0:r1].T @ _rows(read, n, r0, r1)
    ub, s, vt = _small_svd(bk)
    for r0, r1 in _blocks(m, k, block):  # u = q @ ub, in place, a row block at a time
        q[r0:r1] = q[r0:r1] @ ub
    return q, s, vt, np.array(total)


def state_bytes(method: str, shape: tuple[int, int], rank: int, itemsize: int, block: int) -> int:
    """Bytes an encoder holds for one tensor, beyond the reader's buffers (an upper estimate)."""
    m, n = shape
    rows = 4 * block * itemsize + 16 * block  # a row block, its products and index arrays
    if method == "lowrank":
        k = min(rank + OVERSAMPLE, m, n)
        if exact(m, n, k):
            return 5 * m * n * itemsize + rows
        return (3 * m + 4 * n) * k * itemsize + rows
    if method == "sparse":
        return 8 * (m + 1) + 3 * 8 * (1 << 16) + 3 * rows
    if method == "int8":
        return 4 * m + 2 * rows
    return 2 * rows


def energy_rank(
    read: Reader,
    shape: tuple[int, int],
    energy: float,
    dtype: DType,
    ct: np.dtype,
    name: str,
    block: int,
    max_k: int,
) -> int | None:
    """The smallest rank keeping ``energy`` of the squared norm, or None where no rank smaller
    than dense storage does, or none whose sketch fits ``max_k`` columns (the memory budget):
    the tensor is then stored dense."""
    m, n = shape
    limit = m * n // (m + n)  # at this rank the factors are as large as the matrix
    k = min(64, m, n, max(1, max_k - OVERSAMPLE))
    while True:
        sketch = min(k + OVERSAMPLE, m, n)
        _, s, _, total = _svd(read, m, n, sketch, ct, zlib.crc32(name.encode()), block)
        t = float(total)
        if t == 0:
            return 1
        cum = np.cumsum(np.square(s.astype(np.float64))) / t
        hit = np.flatnonzero(cum >= energy * (1 - 1e-12))
        if hit.size and hit[0] + 1 < limit:
            return int(hit[0]) + 1
        if hit.size or k >= min(m, n, limit) or exact(m, n, sketch) or 2 * k + OVERSAMPLE > max_k:
            return None
        k = min(2 * k, m, n)


def lowrank(
    read: Reader, write: Writer, shape: tuple[int, int], rank: int, dtype: DType, ct: np.dtype, name: str, block: int
) -> Encoded:
    """Rank-``rank`` factors ``a`` (m, r) and ``b`` (r, n) of the truncated SVD, written as stored."""
    m, n = shape
    u, s, vt, total = _svd(read, m, n, min(rank + OVERSAMPLE, m, n), ct, zlib.crc32(name.encode()), block)
    b = to_storage(vt[:rank], dtype)
    write("b", 0, b.reshape(-1))
    b_f = from_storage(b, dtype, ct)
    err = 0.0
    for r0, r1 in _blocks(m, n, block):  # a = u_r s_r, written and measured a row block at a time
        a = to_storage(u[r0:r1, :rank] * s[:rank], dtype)
        write("a", r0 * rank, a.reshape(-1))
        diff = _rows(read, n, r0, r1) - from_storage(a, dtype, ct) @ b_f
        err += float(np.sum(np.square(diff, dtype=np.float64)))
    return _measured(float(total), err, rank=rank)


def _measured(total: float, err: float, **extra: int) -> Encoded:
    norm = math.sqrt(total)
    return Encoded(norm, math.sqrt(err) / norm if norm else 0.0, **extra)


def _abs_bits(x: np.ndarray) -> np.ndarray:
    return np.abs(x.astype(np.float32, copy=False)).view(np.uint32)


def _sparse(
    read: Reader,
    write: Writer,
    shape: tuple[int, int],
    k: int,
    dtype: DType,
    ct: np.dtype,
    block: int,
    index_dtype: np.dtype,
) -> Encoded:
    m, n = shape
    hist = np.zeros(1 << 16, dtype=np.int64)
    total = 0.0
    for r0, r1 in _blocks(m, n, block):
        rows = _rows(read, n, r0, r1)
        total += float(np.sum(np.square(rows, dtype=np.float64)))
        hist += np.bincount((_abs_bits(rows) >> 16).ravel(), minlength=1 << 16)
    above = np.cumsum(hist[::-1])[::-1]  # above[h]: entries whose high half is >= h
    hi = int(np.flatnonzero(above >= k)[-1])
    over = int(above[hi + 1]) if hi + 1 < len(above) else 0
    low = np.zeros(1 << 16, dtype=np.int64)
    for r0, r1 in _blocks(m, n, block):
        bits = _abs_bits(_rows(read, n, r0, r1)).ravel()
        sel = bits[(bits >> 16) == hi]
        low += np.bincount(sel & 0xFFFF, minlength=1 << 16)
    above_lo = np.cumsum(low[::-1])[::-1]
    lo = int(np.flatnonzero(over + above_lo >= k)[-1])
    threshold = (hi << 16) | lo
    ties = k - over - (int(above_lo[lo + 1]) if lo + 1 < len(above_lo) else 0)
    indptr = np.zeros(m + 1, dtype=np.int64)
    done, err = 0, 0.0
    for r0, r1 in _blocks(m, n, block):
        rows = _rows(read, n, r0, r1)
        bits = _abs_bits(rows)
        keep = bits > threshold
        if ties > 0:
            eq = np.flatnonzero((bits == threshold).ravel())[:ties]
            keep.reshape(-1)[eq] = True
            ties -= eq.size
        r_idx, c_idx = np.nonzero(keep)
        vals = to_storage(rows[r_idx, c_idx], dtype)
        write("indices", done, c_idx.astype(index_dtype))
        write("values", done, vals)
        done += r_idx.size
        indptr[r0 + 1 : r1 + 1] = np.bincount(r_idx, minlength=r1 - r0)
        rest = rows.copy()
        rest[r_idx, c_idx] -= from_storage(vals, dtype, ct)
        err += float(np.sum(np.square(rest, dtype=np.float64)))
    np.cumsum(indptr, out=indptr)
    write("indptr", 0, indptr)
    return _measured(total, err, kept=done)


def _int8(read: Reader, write: Writer, shape: tuple[int, int], ct: np.dtype, block: int) -> Encoded:
    m, n = shape
    scales = np.zeros(m, dtype=np.float32)
    total = err = 0.0
    for r0, r1 in _blocks(m, n, block):
        rows = _rows(read, n, r0, r1)
        total += float(np.sum(np.square(rows, dtype=np.float64)))
        sc = (np.max(np.abs(rows), axis=1) / 127).astype(np.float32)
        safe = np.where(sc > 0, sc, 1).astype(ct)
        q = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(np.int8)
        write("q", r0 * n, q.reshape(-1))
        scales[r0:r1] = sc
        err += float(np.sum(np.square(rows - q * sc.astype(ct)[:, None], dtype=np.float64)))
    write("scale", 0, scales)
    return _measured(total, err)


def _sign(read: Reader, write: Writer, shape: tuple[int, int], ct: np.dtype, block: int) -> Encoded:
    numel = shape[0] * shape[1]
    step = max(8, block - block % 8)
    total = absum = 0.0
    for s in range(0, numel, step):
        x = read(s, min(step, numel - s))
        total += float(np.sum(np.square(x, dtype=np.float64)))
        absum += float(np.sum(np.abs(x), dtype=np.float64))
    scale = np.float32(absum / numel)
    err = 0.0
    for s in range(0, numel, step):
        x = read(s, min(step, numel - s))
        pos = x >= 0
        write("bits", s // 8, np.packbits(pos, bitorder="little"))
        err += float(np.sum(np.square(x - np.where(pos, ct.type(scale), -ct.type(scale)), dtype=np.float64)))
    write("scale", 0, np.array([scale], dtype=np.float32))
    return _measured(total, err)


def encode(
    spec: Compression,
    read: Reader,
    write: Writer,
    name: str,
    shape: tuple[int, int],
    dtype: DType,
    ct: np.dtype,
    block: int,
    *,
    rank: int | None = None,
) -> Encoded:
    """Compress one diff tensor laid out by :func:`~ftrecycle.codecs.layout` (non-empty)."""
    parts = layout(spec, shape, dtype, rank=rank)
    if spec.method == "lowrank":
        return lowrank(read, write, shape, parts["a"][1][1], dtype, ct, name, block)
    if spec.method == "sparse":
        idx = parts["indices"][0].storage
        return _sparse(read, write, shape, parts["values"][1][0], dtype, ct, block, idx)
    if spec.method == "int8":
        return _int8(read, write, shape, ct, block)
    return _sign(read, write, shape, ct, block)
