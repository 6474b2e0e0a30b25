"""``mpsvd``: the truncated SVD of a diff with its singular vectors at mixed precision (Delta-CoMe).

Formula: for a diff ``D`` (m, n) with SVD ``U S V^T``, the factors ``a_k = u_k sqrt(s_k)`` and
``b_k = sqrt(s_k) v_k^T`` of the first ``r`` singular vectors are each quantized round-to-nearest
to ``w_k`` bits with their own step: a ``w``-bit code ``q`` in ``[0, 2^w)`` stands for
``(q - 2^(w-1) + 1/2) * scale`` (a mid-rise grid, ``2^w`` levels symmetric about zero). Element
``(i, j)`` decodes as ``sum_k a[i, k] * b[k, j]`` over the vectors with ``w_k > 0``, through
:func:`ftrecycle.codecs.lowrank.product_rows`.

Decoding is exact and fast by construction: the encoder rounds each step to a short mantissa
(:func:`on_grids`, on lowrank's :func:`ftrecycle.codecs.lowrank.factor_grids`), so that every
level, ``(odd integer) / 2 * step``, and every product and partial sum of a row-column dot
product is exact in float64 (:func:`ftrecycle.codecs.lowrank.exact_sum`): a float64 GEMM then
returns each element's exact sum, rounded once to the compute dtype, whatever the range split,
thread count or BLAS kernel. The decoder decides once per tensor from the stored steps and
widths (:func:`exact_steps`, a bound over every possible code); steps that miss it (older
deltas, hostile files) decode by the rank-ordered loop, deterministic too but slower.
Measured (a 2048 x 8192 and an 8192 x 2048 bf16 diff at ``mpsvd:ratio=8``, 1422 and 1407 kept
vectors, the whole tensor decoded in 2^20-element ranges, one BLAS thread, 2 shared cores):
2.5 s and 1.7 s, against 5.5 s and 11.4 s through the loop; the rounded steps changed the
relative error by at most 1e-6 (0.438317, 0.315847 -> 0.315848). A dense copy of the same
elements takes 0.014 s: at these ranks the ``2 m n r`` flops of the product, not the path,
bound the apply, so ``mpsvd`` stays far above 2x a dense apply where it keeps many vectors.
``mpsvd:ratio=R,rank=K`` caps the vectors at ``K`` (the decode then costs what ``lowrank:rank=K``'s
does; the bytes a row holds are then spent on wider codes), trading error for apply time.

Parts (a fixed set): ``qa`` (m, c) uint8 — row ``i`` packs its codes ``a[i, k]`` in order of
``k``, ``w_k`` bits each, little-endian (so a row range is one contiguous read); ``qb`` (n, c)
uint8 — the same for the columns of ``b``; ``sa``, ``sb`` (r,) float32, the steps of ``a_k``
and ``b_k`` (0 for a vector given no bits); ``widths`` (r,) uint8, each in :data:`WIDTHS`, their
sum at most ``8 c``. Decoding reads the widths back from the parts, never from the spec.

Budget: ``mpsvd:bits=B`` stores ``B`` bits per element of ``D`` on average, every part counted;
``mpsvd:ratio=R`` is ``B = 8 * itemsize / R`` against the delta's dtype. The layout fixes ``c``
(the bytes of a packed row) and ``r = min(m, n, 8c / 2)``, the most vectors ``c`` bytes can hold
at the narrowest nonzero width, or at most ``rank=K`` given by the user; ``r`` never follows
``--max-memory`` (the delta would then depend on it): an encoder that does not fit is refused, as
``lowrank``'s is, and ``rank=K`` is the cap to give. Bit allocation is the encoder's,
from the singular values it computes: each vector's quantization error is measured at every
width (relative squared error ``e_k(w)`` of ``u_k`` and ``v_k`` at the best of a few steps), the
error vector ``k`` leaves is estimated as ``s_k^2 (e_u + e_v)`` (``s_k^2`` when dropped), and a
greedy step raises the width of the vector whose estimated error falls most per stored bit
until the ``8c`` bits of a row are spent — more bits for the large singular values, fewer for
the tail, none beyond.

Measured (1024 x 1024 float32 matrices against bf16, relative error at 8x / 16x; a fixed rule
for the widths against this greedy one, the rest of the codec the same): singular values
``1/(k+1)``: greedy 0.048 / 0.072, Delta-CoMe's schedule (8 bits for 2 vectors, 3 for the next
32, 2 for the rest) 0.143 / 0.147, all at 3 bits 0.268 / 0.271, all at 8 bits 0.066 / 0.096;
``(k+1)^-0.5``: greedy 0.421 / 0.520, Delta-CoMe's 0.459 / 0.536, all at 4 bits 0.455 / 0.546;
Gaussian noise: greedy 0.546 / 0.740, Delta-CoMe's 0.559 / 0.744, all at 2 bits 0.566 / 0.740.
No fixed rule is best on every spectrum, and the greedy one is best or tied on each. A first
pass reading the tensor (to allocate before the layout) would only add a second SVD: the
layout's ``r`` already lets the encoder choose; its cost is an SVD of rank up to ``4c`` where
fewer vectors may get bits (at 8x on ``1/(k+1)``, 286 of 500). A 1-bit width was measured too
and never chosen (a 1-bit ``u_k`` and ``v_k`` leave about 0.72 of the vector's energy, removing
less per bit than 2 bits do, which leave about 0.24).

Reference: Delta-CoMe (Ping et al., "Delta-CoMe: Training-Free Delta-Compression with
Mixed-Precision for Large Language Models", NeurIPS 2024, arXiv:2406.08903). Delta-CoMe
quantizes the singular vectors with GPTQ on calibration data; this codec rounds to nearest
(no calibration), its steps searched per vector for the least squared error.
"""

from __future__ import annotations

import heapq
import zlib
from dataclasses import dataclass
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
    exact_rows,
    exact_sum,
    factor_grids,
    product_rows,
    snap,
)
from ftrecycle.dtypes import F32, U8, DType
from ftrecycle.errors import CheckpointError
from ftrecycle.io.safetensors_format import TensorInfo

#: The widths a singular vector may be stored at (0: dropped).
WIDTHS = (0, 2, 3, 4, 8)
#: Bytes per vector besides its codes: the two float32 steps and the width.
VECTOR_BYTES = 9
#: Candidate steps, as fractions of the absmax step (the grid spanning ``[-max, max]``): the
#: best of them is kept per vector and width (clipping the tails pays at 2-4 bits).
STEP_FRACTIONS = (1.0, 0.85, 0.72, 0.61, 0.52, 0.44, 0.37, 0.31, 0.26)
# on_grids moves a's grid up at most this many bits (one suffices: a step rounds up by a hair).
_GRID_TRIES = 8
# Vectors whose quantization errors are measured at once (bounds the temporaries).
_CHUNK = 64
#: ... and at most this many elements of them (a 128256-row embedding searches 8 vectors at a time)
_CHUNK_ELEMENTS = 1 << 20


def _chunk(rows: int) -> int:
    """Vectors searched at once for vectors of ``rows`` elements (the search holds ~8 float64 copies)."""
    return max(1, min(_CHUNK, _CHUNK_ELEMENTS // max(rows, 1)))


def budget_bytes(spec: Compression, m: int, n: int, dtype: DType) -> int:
    """The bytes an (m, n) matrix may take under ``spec`` (``bits`` or ``ratio``)."""
    bits = spec.bits if spec.bits is not None else 8 * dtype.itemsize / (spec.ratio or 1.0)
    return int(bits * m * n) // 8


def layout(spec: Compression, m: int, n: int, dtype: DType) -> dict[str, PartSpec]:
    """Parts ``qa`` (m, c), ``qb`` (n, c) uint8, ``sa``, ``sb`` (r,) float32 and ``widths`` (r,) uint8,
    the largest ``c`` the budget holds with ``r = min(m, n, 8c / WIDTHS[1])`` vectors, at most
    ``spec.rank`` when given ({} when not one byte a row)."""
    total = budget_bytes(spec, m, n, dtype)
    per_byte = 8 // WIDTHS[1]  # vectors a byte of a packed row holds at the narrowest width
    c = total // (m + n + per_byte * VECTOR_BYTES)
    r = min(m, n, per_byte * c, spec.rank or m)
    c = min(r, (total - VECTOR_BYTES * r) // (m + n))  # r capped by the matrix: the bytes left widen c
    if c < 1:
        return {}
    return {
        "qa": (U8, (m, c)),
        "qb": (U8, (n, c)),
        "sa": (F32, (r,)),
        "sb": (F32, (r,)),
        "widths": (U8, (r,)),
    }


# ---------------------------------------------------------------- quantization


def _codes(x: np.ndarray, step: np.ndarray, w: int) -> np.ndarray:
    """Mid-rise codes of ``x`` (columns scaled by ``step``) at ``w`` bits, as int64."""
    half = 1 << (w - 1)
    safe = np.where(step > 0, step, 1)
    return np.clip(np.floor(x / safe) + half, 0, 2 * half - 1).astype(np.int64)


def _levels(q: np.ndarray, step: np.ndarray, w: int, ct: np.dtype[Any]) -> np.ndarray:
    """The values of codes ``q`` at ``w`` bits (exact but for one rounding of the product)."""
    return (q.astype(ct) - ct.type((1 << (w - 1)) - 0.5)) * step.astype(ct)


def search_steps(x: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Per column of ``x`` (unit-norm vectors), the step of least squared error at ``w`` bits among
    :data:`STEP_FRACTIONS` of the absmax step, and that error (relative: ``x`` has unit columns).

    Args:
        x: (length, k) columns.
        w: the width, in bits.

    Returns:
        Steps (k,) float32 and squared errors (k,) float64.
    """
    top = np.max(np.abs(x), axis=0).astype(np.float64)
    best_err = np.full(x.shape[1], np.inf)
    best = np.zeros(x.shape[1], dtype=np.float32)
    for f in STEP_FRACTIONS:
        step = (top * f / (1 << (w - 1))).astype(np.float32)
        err = np.sum(np.square(x - _levels(_codes(x, step, w), step, w, x.dtype), dtype=np.float64), axis=0)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, step, best)
    return best, best_err


def allocate(s: np.ndarray, errors: np.ndarray, capacity: int) -> np.ndarray:
    """Widths (from :data:`WIDTHS`) for vectors of singular values ``s``, at most ``capacity`` bits in all.

    Greedy: the error of vector ``k`` at width ``WIDTHS[j]`` is estimated as ``s_k^2 errors[k, j]``
    (``errors[k, 0] = 1``: dropped); each step raises the one vector's width whose estimated
    error falls most per added bit, while the bits fit. Ties go to the smaller ``k``.

    Args:
        s: singular values (r,), non-increasing.
        errors: (r, len(WIDTHS)) relative squared errors.
        capacity: the bits of a packed row.

    Returns:
        Widths (r,) uint8.
    """
    s2 = np.square(s.astype(np.float64))
    level = np.zeros(len(s), dtype=np.int64)

    def step(k: int) -> tuple[float, int, int]:
        j = int(level[k])
        dw = WIDTHS[j + 1] - WIDTHS[j]
        return -s2[k] * (errors[k, j] - errors[k, j + 1]) / dw, k, dw

    heap = [step(k) for k in range(len(s))]
    heapq.heapify(heap)
    used = 0
    while heap:
        _, k, dw = heapq.heappop(heap)
        if used + dw > capacity:
            continue  # this step no longer fits; a narrower one of another vector may
        used += dw
        level[k] += 1
        if level[k] + 1 < len(WIDTHS):
            heapq.heappush(heap, step(k))
    return np.array(WIDTHS, dtype=np.uint8)[level]


def _errors(x: np.ndarray) -> np.ndarray:
    """Squared errors (k, len(WIDTHS)) of the unit columns of ``x`` at every width (column 0: dropped)."""
    errors = np.zeros((x.shape[1], len(WIDTHS)))
    step = _chunk(x.shape[0])
    for c0 in range(0, x.shape[1], step):
        for j, w in enumerate(WIDTHS[1:], start=1):
            errors[c0 : c0 + step, j] = search_steps(x[:, c0 : c0 + step], w)[1]
    return errors


def _steps(x: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The searched step of every column of ``x`` at its width (0 where the width is 0)."""
    steps = np.zeros(x.shape[1], dtype=np.float32)
    for w in set(widths.tolist()) - {0}:
        ks = np.flatnonzero(widths == w)
        step = _chunk(x.shape[0])
        for c0 in range(0, len(ks), step):
            part = ks[c0 : c0 + step]
            steps[part] = search_steps(x[:, part], w)[0]
    return steps


def pack(codes: np.ndarray, widths: np.ndarray, nbytes: int) -> np.ndarray:
    """Rows of codes (R, r) packed at their columns' widths, little-endian, into (R, nbytes) uint8."""
    offsets = np.concatenate([[0], np.cumsum(widths.astype(np.int64))])
    bits = np.zeros((codes.shape[0], 8 * nbytes), dtype=np.uint8)
    for w in set(widths.tolist()) - {0}:
        ks = np.flatnonzero(widths == w)
        idx = offsets[ks][:, None] + np.arange(w)
        bits[:, idx] = (codes[:, ks, None] >> np.arange(w)) & 1
    return np.packbits(bits, axis=1, bitorder="little")


def unpack(raw: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Codes (R, r) uint8 of packed rows ``raw`` (R, c) (0 for zero-width columns); integer arithmetic.

    The widths must be checked first (each at most 8, their sum at most ``8 c``)."""
    offsets = np.concatenate([[0], np.cumsum(widths.astype(np.int64))])
    bits = np.unpackbits(raw, axis=1, bitorder="little")
    codes = np.zeros((raw.shape[0], len(widths)), dtype=np.uint8)
    for w in set(widths.tolist()) - {0}:
        ks = np.flatnonzero(widths == w)
        idx = offsets[ks][:, None] + np.arange(w)
        codes[:, ks] = np.sum(bits[:, idx] << np.arange(w, dtype=np.uint8), axis=-1, dtype=np.uint8)
    return codes


def dequantize(codes: np.ndarray, widths: np.ndarray, scales: np.ndarray, ct: np.dtype[Any]) -> np.ndarray:
    """The values (R, r) of codes at their columns' widths and scales (0 for zero-width columns)."""
    out = np.zeros(codes.shape, dtype=ct)
    for w in set(widths.tolist()) - {0}:
        ks = np.flatnonzero(widths == w)
        out[:, ks] = _levels(codes[:, ks], scales[ks], w, ct)
    return out


# ---------------------------------------------------------------- encoding


def encode(job: Job) -> Encoded:
    """SVD at the layout's rank, widths allocated from the singular values, the codes written
    (``a`` a row block at a time) and the error measured against the stored parts."""
    read, write, (m, n), ct, block = job.read, job.write, job.shape, job.ct, job.block
    r, c = job.parts["widths"][1][0], job.parts["qa"][1][1]
    u, s, vt, total = _svd(read, m, n, min(r + OVERSAMPLE, m, n), ct, zlib.crc32(job.name.encode()), block)
    u, s, v = u[:, :r], s[:r].astype(np.float64), np.ascontiguousarray(vt[:r].T)
    errors = _errors(u) + _errors(v)
    errors[:, 0] = 1.0  # a dropped vector leaves its whole s_k^2
    widths = allocate(s, errors, 8 * c)
    root = np.sqrt(np.maximum(s, 0))
    sa, sb = on_grids(
        (_steps(u, widths) * root).astype(np.float32), (_steps(v, widths) * root).astype(np.float32), widths
    )
    # the codes are taken at the steps stored (snapped), seen from the unit vectors
    su, sv = (np.divide(x, root, out=np.zeros_like(root), where=root > 0) for x in (sa, sb))
    qb = _side_codes(v, sv, widths)
    write("qb", 0, pack(qb, widths, c).reshape(-1))
    b = dequantize(qb, widths, sb, ct).T
    err = 0.0
    for r0, r1 in blocks(m, n, block):
        qa = _side_codes(u[r0:r1], su, widths)
        write("qa", r0 * c, pack(qa, widths, c).reshape(-1))
        err += squared(rows_of(read, n, r0, r1) - dequantize(qa, widths, sa, ct) @ b)
    write("sa", 0, sa)
    write("sb", 0, sb)
    write("widths", 0, widths)
    return measured(float(total), err, rank=int(np.count_nonzero(widths)))


def _side_codes(x: np.ndarray, steps: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Codes (R, r) of rows of a factor side, each column at its width and step (0 where dropped)."""
    codes = np.zeros(x.shape, dtype=np.int64)
    for w in set(widths.tolist()) - {0}:
        ks = np.flatnonzero(widths == w)
        codes[:, ks] = _codes(x[:, ks], steps[ks], w)
    return codes


def bounds(sa: np.ndarray, sb: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`ftrecycle.codecs.lowrank.column_stats` bounds of the dequantized factors, from their
    steps and widths alone (no code is read).

    A level of column ``k`` is ``(2q - 2^w + 1) / 2 * sa[k]``: an odd integer below ``2^w`` in
    magnitude times ``sa[k] / 2`` (exact in float64: ``w + 24 <= 53`` bits), so every level is
    at most ``(2^w - 1) / 2 |sa[k]|`` and on the grid of ``sa[k] / 2``. The statistics of the two
    levels ``(2^w - 1) / 2 sa[k]`` and ``sa[k] / 2`` are therefore bounds for every stored code:
    a largest magnitude at least as large and a grid at least as fine, which keeps
    :func:`ftrecycle.codecs.lowrank.exact_sum` sound for any ``qa``/``qb`` (hostile ones too).

    Args:
        sa, sb: the steps (r,) as stored (float32).
        widths: the widths (r,), each in :data:`WIDTHS`.

    Returns:
        ``(amax, agrid, bmax, bgrid)`` per vector (zero-width vectors count as zero columns).
    """
    w = widths.astype(np.int64)
    top = np.where(w > 0, (np.ldexp(1.0, w) - 1) / 2, 0.0)
    low = np.where(w > 0, 0.5, 0.0)
    sides: list[np.ndarray] = []
    for x in (sa, sb):
        x64 = x.astype(np.float64)
        sides.extend(column_stats(np.stack([top * x64, low * x64])))
    return tuple(sides)


def exact_steps(sa: np.ndarray, sb: np.ndarray, widths: np.ndarray) -> bool:
    """Whether the factors of these steps and widths, dequantized in float64, pass
    :func:`ftrecycle.codecs.lowrank.exact_sum` whatever their codes (see :func:`bounds`): then a
    float64 GEMM of them gives each element's exact sum, in any order or thread split.

    Args:
        sa, sb: the steps (r,) as stored (float32).
        widths: the widths (r,), already checked.

    Returns:
        True where :func:`decode` may take the BLAS path.
    """
    return exact_sum(*bounds(sa, sb, widths))


def on_grids(sa: np.ndarray, sb: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Steps rounded to short mantissas so that :func:`exact_steps` holds.

    The grids are lowrank's (:func:`ftrecycle.codecs.lowrank.factor_grids`) for the largest
    levels, ``2^p_k`` for column ``k`` of ``a``; a level is an odd multiple of ``sa[k] / 2``, so
    ``sa[k]`` is rounded to a multiple of ``2^(p_k + 1)``. The largest vectors keep about
    ``25 - w_k`` bits of their step (a relative change below ``2^-16``, under the ``2^-w`` of
    the quantization itself); vectors far smaller than the largest are rounded more coarsely,
    their contribution to any element staying below ``2^-50`` of the largest sum. Where the
    rounded steps miss the bound by a hair (a step rounded up), ``a``'s grid moves up a bit.

    Args:
        sa, sb: the steps (r,) float32.
        widths: the widths (r,).

    Returns:
        ``(sa, sb)`` float32 on their grids (representable: rounding to a coarser grid keeps
        a float32's bits).
    """
    amax, _, bmax, _ = bounds(sa, sb, widths)
    p, q = factor_grids(amax, bmax)
    sa64, sb64 = sa.astype(np.float64), sb.astype(np.float64)
    new_sb = snap(sb64, q + 1).astype(np.float32)
    for shift in range(_GRID_TRIES):
        new_sa = snap(sa64, p + 1 + shift).astype(np.float32)
        if exact_steps(new_sa, new_sb, widths):
            break
    return new_sa, new_sb


def state_bytes(parts: dict[str, PartSpec], shape: tuple[int, int], itemsize: int, block: int) -> int:
    """Bytes the encoder holds: the SVD's (as lowrank's at rank r), the factors' error search and
    codes, and the unpacked ``b``."""
    m, n = shape
    r = parts["widths"][1][0]
    k = min(r + OVERSAMPLE, m, n)
    svd = 5 * m * n * itemsize if exact(m, n, k) else (3 * m + 4 * n) * k * itemsize
    c = parts["qb"][1][1]
    search = 8 * max(m, n) * min(r, _chunk(max(m, n))) * 8
    side = n * r * (2 * itemsize + 8) + 8 * n * c
    rows = max(1, block // n) * (r * (16 + itemsize) + 8 * c)
    return svd + (m + n) * r * itemsize + search + side + rows + row_block_bytes(itemsize, block)


# ---------------------------------------------------------------- decoding


@dataclass(frozen=True)
class _Side:
    """What decoding a row range needs besides its rows of ``qa``: the kept vectors, ``b`` and the
    path (``exact``: BLAS on float64 factors, see :func:`exact_steps`; else the rank-ordered loop in ``ct``)."""

    widths: np.ndarray
    sa: np.ndarray
    keep: np.ndarray
    b: np.ndarray
    exact: bool


def _side(p: Packed, ct: np.dtype[Any], cache: dict[Any, Any]) -> _Side:
    """The widths (checked), ``sa``, the decoded ``b`` of the kept vectors and the decoding path
    (decided once over the whole stored steps and widths by :func:`exact_steps`), in the caller's
    one-entry cache.

    Raises:
        CheckpointError: a width not in :data:`WIDTHS`, widths that overflow a packed row, or a
            non-finite step.
    """
    key = (id(p), "mpsvd", ct.str)
    got = cache.get(key)
    if isinstance(got, _Side):
        return got
    r, c = _count(p, "widths"), _shape(p, "qa")[1]
    widths = read_part(p, "widths", 0, r).astype(np.uint8)
    sa = read_part(p, "sa", 0, r).astype(np.float32)
    sb = read_part(p, "sb", 0, r).astype(np.float32)
    if not np.all(np.isin(widths, WIDTHS)) or int(np.sum(widths, dtype=np.int64)) > 8 * c:
        raise CheckpointError(
            f"mpsvd part 'widths' holds a width outside {WIDTHS} or more bits than a packed row of {c} "
            "bytes holds; the delta is corrupt: recreate it with `ftrecycle diff`"
        )
    if not (np.all(np.isfinite(sa)) and np.all(np.isfinite(sb))):
        raise CheckpointError("mpsvd parts 'sa'/'sb' hold a non-finite step; recreate the delta with `ftrecycle diff`")
    n = p.shape[1]
    qb = read_part(p, "qb", 0, n * c).reshape(n, c)
    keep = np.flatnonzero(widths)
    exact_path = exact_steps(sa, sb, widths)
    wide = np.dtype(np.float64) if exact_path else ct  # float64 levels are exact: (odd / 2) * step
    b = np.ascontiguousarray(dequantize(unpack(qb, widths), widths, sb, wide)[:, keep].T)
    side = _Side(widths, sa, keep, b, exact_path)
    cache.clear()
    cache[key] = side
    return side


def _shape(p: Packed, name: str) -> tuple[int, ...]:
    src = p.parts[name]
    return tuple(src.shape) if isinstance(src, np.ndarray) else tuple(src.info.shape)


def _count(p: Packed, name: str) -> int:
    return _shape(p, name)[0]


def decode(p: Packed, start: int, count: int, out: np.ndarray, cache: dict[Any, Any]) -> np.ndarray:
    """Elements ``[start, start + count)`` of ``a @ b`` (the dequantized factors) into ``out``;
    only the range's rows of ``qa`` are read, the rest is kept in ``cache``. Factors whose steps
    pass :func:`exact_steps` are dequantized in float64 (exactly) and multiplied through BLAS, each
    element the exact sum rounded once; others by the rank-ordered loop in ``out``'s dtype."""
    ct = out.dtype
    side = _side(p, ct, cache)
    r0, r1, n = row_span(p, start, count)
    c = _shape(p, "qa")[1]
    raw = read_part(p, "qa", r0 * c, (r1 - r0) * c).reshape(r1 - r0, c)
    a = np.ascontiguousarray(dequantize(unpack(raw, side.widths), side.widths, side.sa, side.b.dtype)[:, side.keep])
    if side.exact:
        exact_rows(a, side.b, start - r0 * n, count, out)
    else:
        product_rows(a, side.b, start - r0 * n, count, out)
    return out


def expect(m: int, n: int, parts: dict[str, TensorInfo]) -> Expected:
    """``qa`` (m, c), ``qb`` (n, c) uint8, ``sa``, ``sb`` (r,) float32, ``widths`` (r,) uint8, with
    ``c >= 1`` read from ``qa`` and ``1 <= r <= min(m, n, 8c / WIDTHS[1])`` from ``widths``; the
    widths' values are checked when read."""
    qa, wd = parts["qa"], parts["widths"]
    c = max(qa.shape[1] if len(qa.shape) == 2 else 0, 1)
    # no more vectors than the matrix has, nor than a packed row holds: a row range's decode
    # holds (rows, r) values, so r must not grow with anything but the matrix
    r = min(max(wd.shape[0] if len(wd.shape) == 1 else 0, 1), m, n, 8 * c // WIDTHS[1])
    u8, f32 = frozenset({U8}), frozenset({F32})
    return {"qa": (u8, (m, c)), "qb": (u8, (n, c)), "widths": (u8, (r,)), "sa": (f32, (r,)), "sb": (f32, (r,))}


def gain(parts: dict[str, np.ndarray], g: np.ndarray) -> dict[str, np.ndarray]:
    """One gain for the matrix, folded into the steps of ``a`` (a row's gain cannot be: a step is
    shared by a whole column of ``a``), the steps then put back on their grids (:func:`on_grids`)
    so that the delta still decodes through the exact path."""
    sa = (parts["sa"].astype(np.float64) * float(g[0])).astype(np.float32)
    sa, sb = on_grids(sa, parts["sb"].astype(np.float32), parts["widths"].astype(np.uint8))
    return {"sa": sa, "sb": sb}


CODEC = Codec(
    "mpsvd",
    ("bits", "ratio"),
    frozenset({"qa", "qb", "sa", "sb", "widths"}),
    layout,
    encode,
    decode,
    state_bytes,
    expect,
    extra=("rank",),
    gain=gain,
)
