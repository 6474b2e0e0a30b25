"""``signlr``: a 1-bit code with one scale per row, plus a low-rank correction (D-QReLO-style).

Formula: ``D ≈ diag(s) sign(R) + a b``, where ``a b`` (m, r), (r, n) is a rank-``r``
factorisation (rounded to the delta's dtype) and ``R = D - a b`` its residual, coded by its
signs (``sign(0) = +1``) and, per row ``i``, the scale ``s_i = mean_j |R_ij|`` that minimises
``||R_i - s_i sign(R_i)||^2``. ``a b`` is first the truncated SVD of ``D`` (as
:mod:`ftrecycle.codecs.lowrank` computes it), then refit :data:`REFINE_ROUNDS` times as the SVD of
``D`` minus the sign code of the current residual (alternating minimisation: each step is the
best fit given the other, so the error does not grow). ``a`` and ``b`` are stored on
lowrank's grids (:func:`ftrecycle.codecs.lowrank.snapped_svd_factors`), so element ``(i, j)`` decodes
as the exact ``sum_k a[i, k] * b[k, j]`` rounded once, through BLAS
(:func:`ftrecycle.codecs.lowrank.product_rows`, ``exact=True``; factors that miss the grids,
such as a row-gained ``a``, take its rank-ordered loop, deterministic too), plus ``+s_i`` if
its bit is set, else ``-s_i``. Parts: ``bits`` (ceil(mn/8),) uint8 (bit
``i*n + j`` little-endian within its byte, as ``sign``), ``scale`` (m,) float32, ``a`` (m, r)
and ``b`` (r, n) in the delta's dtype.

Order: low rank first, then the sign of its residual. The other order (the sign code of ``D``
first, then the SVD of ``D - diag(s) sign(D)``) was measured on 1024 x 1024 matrices with an
exact SVD (relative error ``||D - decoded|| / ||D||``, low rank first / sign first): Gaussian
noise plus a rank-8 component holding 3/4 of the energy, 0.299 / 0.500 at rank 8 and
0.286 / 0.473 at rank 32 — the sign of ``D`` is then mostly the sign of the structure, and
the SVD of what it leaves cannot undo that; pure Gaussian noise, 0.593 / 0.593 and
0.567 / 0.568 (no structure to find). Refits, at rank 32 with bf16 factors (0 / 1 / 2 rounds):
0.288 / 0.279 / 0.276 on the structured matrix, 0.572 / 0.555 / 0.548 on the noise; one round
(one SVD more) is kept. The refit's SVD starts from the first fit's directions and takes no power
iteration (:data:`REFIT_ITERATIONS`): two passes over the matrix instead of six, for errors of
0.2796 / 0.5563 against 0.2791 / 0.5549 with a random start and two iterations (same matrices,
rank 32, bf16 factors). ``tests/test_codecs_svd.py`` holds both comparisons on smaller matrices.

Budget: ``signlr:rank=R``, or ``signlr:ratio=X`` (the largest rank keeping the matrix ``X``
times smaller than dense in the delta's dtype; beside 1 bit per element and the row scales, no
rank is left at ``8 * itemsize`` times or more — 16x for bfloat16 — and the tensor is then
stored dense).

References: D-QReLO (2026), a 1-bit code for the bulk of a large delta plus a low-rank
correction of its residual; BitDelta (Liu et al. 2024, arXiv:2402.10193) for the sign code,
here with one scale per row (per-axis scales, as issue 14 asks) and no scale distillation.
"""

from __future__ import annotations

import zlib
from dataclasses import replace
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
    Writer,
    blocks,
    float_part,
    measured,
    read_part,
    row_block_bytes,
    row_span,
    rows_of,
    squared,
)
from ftrecycle.codecs.lowrank import (
    OVERSAMPLE,
    _svd,
    column_stats,
    exact,
    exact_sum,
    factor_parts,
    factor_plan,
    product_rows,
    snapped_svd_factors,
)
from ftrecycle.dtypes import BF16, F32, FLOAT_DTYPES, U8, DType, from_storage, to_storage
from ftrecycle.io.safetensors_format import TensorInfo

# Elements of ``a`` whose float64 statistics are taken at once (see :func:`passes`).
_STATS_ELEMENTS = 1 << 16
#: Refits of the low-rank part to ``D`` minus the sign code of its residual (each an SVD more).
REFINE_ROUNDS = 1
#: Power iterations of a refit's SVD, which starts from the previous fit's directions (the first
#: fit takes lowrank's :data:`~ftrecycle.codecs.lowrank.POWER_ITERATIONS` from random ones): the
#: target moved little, so its top subspace is found in two passes over it instead of six.
REFIT_ITERATIONS = 0


def rank_for(spec: Compression, m: int, n: int, dtype: DType) -> int:
    """The rank of the correction: ``spec.rank``, or the largest that ``spec.ratio`` leaves room
    for beside the bits and row scales (may be < 1: no room)."""
    if spec.rank is not None:
        return min(spec.rank, m, n)
    total = m * n * dtype.itemsize / (spec.ratio or 1.0)
    left = total - (m * n + 7) // 8 - 4 * m
    return min(int(left // ((m + n) * dtype.itemsize)), m, n)


def layout(spec: Compression, m: int, n: int, dtype: DType) -> dict[str, PartSpec]:
    """Parts ``bits`` (ceil(mn/8),) uint8, ``scale`` (m,) float32, ``a`` (m, r), ``b`` (r, n)
    ({} when the budget leaves no rank >= 1)."""
    r = rank_for(spec, m, n, dtype)
    if r < 1:
        return {}
    return {"bits": (U8, ((m * n + 7) // 8,)), "scale": (F32, (m,)), **factor_parts(m, n, r, dtype)}


def _factors(job: Job, rank: int, start: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """The rank-``rank`` factors of the SVD, rounded to the dtype and onto lowrank's grids
    (:func:`ftrecycle.codecs.lowrank.snapped_svd_factors`: they decode through the exact BLAS path),
    written; widened to ``ct``; and ``||D||^2``. ``start``: the previous fit's ``b`` (r, n), a refit's
    starting directions (its range finder then takes :data:`REFIT_ITERATIONS` power iterations)."""
    (m, n), ct, dtype = job.shape, job.ct, job.dtype
    k, seed = min(rank + OVERSAMPLE, m, n), zlib.crc32(job.name.encode())
    if start is None:
        u, s, vt, total = _svd(job.read, m, n, k, ct, seed, job.block)
    else:
        u, s, vt, total = _svd(job.read, m, n, k, ct, seed, job.block, start=start.T, iterations=REFIT_ITERATIONS)
    a, b = snapped_svd_factors(u, s, vt, rank, dtype)
    del u
    job.write("b", 0, b.reshape(-1))
    job.write("a", 0, a.reshape(-1))
    return from_storage(a, dtype, ct), from_storage(b, dtype, ct), float(total)


def residual_reader(read: Reader, a: np.ndarray, b: np.ndarray) -> Reader:
    """``read`` minus the product ``a @ b``, by flat element range, computed as :func:`decode`
    computes it (the exact BLAS path where the factors pass, so the signs fit what is decoded)."""
    n = b.shape[1]
    ok = passes(a, b)
    b_used = b.astype(np.float64) if ok else b  # widening is exact: the values are the stored ones

    def residual(start: int, count: int) -> np.ndarray:
        x = read(start, count)
        lowrank = np.empty(count, dtype=x.dtype)
        rows = a[start // n : -(-(start + count) // n)]
        product_rows(rows.astype(np.float64) if ok else rows, b_used, start % n, count, lowrank, exact=ok)
        return x - lowrank

    return residual


def passes(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether factors ``a`` (m, r) and ``b`` (r, n) pass :func:`ftrecycle.codecs.lowrank.exact_sum`,
    ``a``'s statistics taken a row block at a time (its float64 temporaries stay small).

    Args:
        a: the left factor (m, r), its stored values in any float dtype.
        b: the right factor (r, n).

    Returns:
        True where their product may go through the exact BLAS path.
    """
    r = a.shape[1]
    amax, agrid = np.zeros(r), np.full(r, np.iinfo(np.int64).max, dtype=np.int64)
    for r0, r1 in blocks(a.shape[0], r, _STATS_ELEMENTS):
        bmax, bgrid = column_stats(a[r0:r1])
        np.maximum(amax, bmax, out=amax)
        np.minimum(agrid, bgrid, out=agrid)
    return exact_sum(amax, agrid, *column_stats(b.T))


def sign_rows(read: Reader, write: Writer, shape: tuple[int, int], block: int) -> float:
    """Write the sign bits and per-row scales of the matrix ``read`` gives; the squared error left.

    Rows are read in blocks of whole bytes of bits (a block's rows times ``n`` a multiple of 8).
    """
    m, n = shape
    rows = max(8, (block // max(n, 1)) // 8 * 8)  # 8 rows always end on a byte
    scales = np.zeros(m, dtype=np.float32)
    err = 0.0
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        x = rows_of(read, n, r0, r1)
        sc = np.mean(np.abs(x), axis=1, dtype=np.float64).astype(np.float32)
        pos = x >= 0
        write("bits", r0 * n // 8, np.packbits(pos.reshape(-1), bitorder="little"))
        scales[r0:r1] = sc
        mag = sc.astype(x.dtype)[:, None]
        err += squared(x - np.where(pos, mag, -mag))
    write("scale", 0, scales)
    return err


def without_signs(read: Reader, a: np.ndarray, b: np.ndarray) -> Reader:
    """``read`` minus the sign code (per-row scales) of its residual from ``a @ b``: what a new
    low-rank fit should approximate, by flat element range (whole rows are computed)."""
    n = b.shape[1]

    def residual(start: int, count: int) -> np.ndarray:
        r0, r1 = start // n, -(-(start + count) // n)
        rows = rows_of(read, n, r0, r1)
        res = rows - a[r0:r1] @ b  # BLAS: an encoder's intermediate, not what is decoded
        mag = np.mean(np.abs(res), axis=1, dtype=np.float64).astype(np.float32).astype(rows.dtype)[:, None]
        rest = rows - np.where(res >= 0, mag, -mag)
        return rest.reshape(-1)[start - r0 * n : start - r0 * n + count]

    return residual


def encode(job: Job) -> Encoded:
    """The low-rank factors first, then :data:`REFINE_ROUNDS` refits of them to ``D`` minus the
    sign code of their residual, then the sign code of the last residual (see the module's
    measurement). Each round lowers the error: each step is the best fit given the other."""
    rank = job.parts["a"][1][1]
    a, b, total = _factors(job, rank)
    for _ in range(REFINE_ROUNDS):
        a, b, _ = _factors(replace(job, read=without_signs(job.read, a, b)), rank, start=b)
    err = sign_rows(residual_reader(job.read, a, b), job.write, job.shape, job.block)
    return measured(total, err, rank=rank)


def decode(p: Packed, start: int, count: int, out: np.ndarray, cache: dict[Any, Any]) -> np.ndarray:
    """Elements ``[start, start + count)`` of ``a @ b + diag(scale) (2 bits - 1)`` into ``out``;
    ``b`` and the low-rank part's path (:func:`ftrecycle.codecs.lowrank.factor_plan`: BLAS where
    the stored factors pass ``exact_sum``, the rank-ordered loop otherwise) are kept in ``cache``."""
    ct = out.dtype
    r0, r1, n = row_span(p, start, count)
    b, exact_path = factor_plan(p, ct, cache)
    rank = b.shape[0]
    a = float_part(p, "a", r0 * rank, (r1 - r0) * rank, b.dtype)
    product_rows(a.reshape(r1 - r0, rank), b, start - r0 * n, count, out, exact=exact_path)
    scale = read_part(p, "scale", r0, r1 - r0).astype(ct)
    lo = start // 8
    raw = read_part(p, "bits", lo, (start + count + 7) // 8 - lo)
    bits = np.unpackbits(raw, bitorder="little")[start - 8 * lo : start - 8 * lo + count]
    signed = np.empty(count, dtype=ct)
    np.multiply(bits, ct.type(2), out=signed, dtype=ct)
    np.subtract(signed, ct.type(1), out=signed)  # 2 bit - 1
    _times_row_scales(signed, scale, start - r0 * n, n)  # exact: a product by +-1
    np.add(out, signed, out=out)
    return out


def _times_row_scales(x: np.ndarray, scale: np.ndarray, first: int, n: int) -> None:
    """``x`` (elements from column ``first`` of the first row on, rows of ``n``) times each element's row
    scale, in place: a partial first row, the whole rows as one broadcast product, a partial last row."""
    head = min(x.size, (n - first) % n)
    x[:head] *= scale[0]
    rows = (x.size - head) // n
    body = x[head : head + rows * n].reshape(rows, n)
    k = 1 if head else 0
    body *= scale[k : k + rows, None]
    if head + rows * n < x.size:
        x[head + rows * n :] *= scale[k + rows]


def state_bytes(parts: dict[str, PartSpec], shape: tuple[int, int], itemsize: int, block: int) -> int:
    """Bytes the encoder holds: lowrank's SVD at the rank, the widened factors (a refit's and the
    previous fit's), the row scales, the residual's row blocks (8 rows at least) and its float64 ``b``."""
    m, n = shape
    rank = parts["a"][1][1]
    k = min(rank + OVERSAMPLE, m, n)
    svd = 5 * m * n * itemsize if exact(m, n, k) else (3 * m + 4 * n) * k * itemsize
    rows = row_block_bytes(itemsize, max(block, 8 * n))
    exact_b = 4 * rank * n * 8  # the residual's float64 b and column_stats' temporaries of it
    return svd + 2 * (m + n) * rank * itemsize + 4 * m + 3 * rows + exact_b


def expect(m: int, n: int, parts: dict[str, TensorInfo]) -> Expected:
    """``bits`` (ceil(mn/8),) uint8, ``scale`` (m,) float32, ``a`` (m, r) and ``b`` (r, n) of one
    float dtype, r >= 1 (read from ``a``)."""
    a = parts["a"]
    r = a.shape[1] if len(a.shape) == 2 else 0
    return {
        "bits": (frozenset({U8}), ((m * n + 7) // 8,)),
        "scale": (frozenset({F32}), (m,)),
        "a": (FLOAT_DTYPES, (m, max(r, 1))),
        "b": (frozenset({a.dtype}), (r, n)),
    }


def _storage_dtype(x: np.ndarray) -> DType:
    """The float dtype of a part held in its storage form (bfloat16 is held as uint16 bits)."""
    if x.dtype == np.uint16:
        return BF16
    return next(d for d in FLOAT_DTYPES if d.storage == x.dtype and d is not BF16)


def gain(parts: dict[str, np.ndarray], g: np.ndarray) -> dict[str, np.ndarray]:
    """Row gains: each row's scale and its row of ``a`` times its gain (``a`` rounded to its dtype)."""
    dt = _storage_dtype(parts["a"])
    a = from_storage(parts["a"], dt, np.dtype(np.float64)) * g[:, None]
    scale = (parts["scale"].astype(np.float64) * g).astype(np.float32)
    return {"a": to_storage(a, dt), "scale": scale}


CODEC = Codec(
    "signlr",
    ("rank", "ratio"),
    frozenset({"bits", "scale", "a", "b"}),
    layout,
    encode,
    decode,
    state_bytes,
    expect,
    gain=gain,
    row_gain=True,
)
