"""``lowrank``: a diff matrix stored as the factors of its truncated SVD.

Formula: for a diff ``D`` (m, n) with SVD ``U S V^T``, store ``a = U_r S_r`` (m, r) and
``b = V_r^T`` (r, n), each rounded to the delta's dtype; element ``(i, j)`` decodes as
``sum_k a[i, k] * b[k, j]`` (times ``scale``, a LoRA's ``alpha / r``). By Eckart-Young this
is the best rank-``r`` approximation in Frobenius norm; ``lowrank:energy=E`` picks the
smallest ``r`` with ``sum_{k<r} s_k^2 >= E ||D||^2``.

References: low-rank approximation of fine-tuning residuals — Ryu et al., "Efficient
Storage of Fine-Tuned Models via Low-Rank Approximation of Weight Residuals" (2023,
arXiv:2305.18425); Delta-CoMe (Ping et al. 2024, arXiv:2406.08903) on delta compression by
SVD. Large matrices take a randomized SVD (Halko, Martinsson & Tropp, "Finding structure
with randomness", SIAM Review 2011): a Gaussian sketch of ``rank + 10`` columns and two
power iterations, every product with the diff one pass over its rows; the sketch is
seeded by the tensor name, so a diff compresses the same every time.

Decoding is exact by construction, and fast: the encoder rounds column ``k`` of ``a`` onto
the grid ``2^p_k`` and row ``k`` of ``b`` onto ``2^q_k`` (:func:`factor_grids`, :func:`snap`)
so that, with ``g = min_k (p_k + q_k)`` and ``T = sum_k max|a[:, k]| max|b[k, :]|``,
``T < 2^(52 + g)``. Every product and every partial sum of products is then an integer
times ``2^g`` below ``2^53``: a float64 GEMM (any order, blocking, FMA or thread split)
computes each element's exact sum, and the one rounding to the compute dtype makes bits
that depend on the stored factors alone (:func:`exact_sum`). Entries far below their
column's (row's) largest move by less than 2^-26 of it; bf16 itself rounds by 2^-9. The
decoder checks the bound once per tensor over the whole stored factors
(:func:`factor_plan`); factors that miss it (older deltas, LoRA adapters, hostile files)
decode by the rank-ordered loop of :func:`product_rows`, deterministic too but slower.
"""

from __future__ import annotations

import math
import zlib
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
    Probe,
    Reader,
    Writer,
    blocks,
    float_part,
    measured,
    rescaled,
    row_block_bytes,
    row_gains,
    row_span,
    rows_of,
    squared,
)
from ftrecycle.dtypes import FLOAT_DTYPES, DType, from_storage, to_storage
from ftrecycle.errors import NonFiniteError
from ftrecycle.io.safetensors_format import TensorInfo

#: Matrices with at most this many elements get an exact SVD in memory ...
EXACT_ELEMENTS = 1 << 18
#: ... and so do those whose smaller side is at most this many times the sketch (little to save).
EXACT_SIDE_RATIO = 2
OVERSAMPLE = 10
POWER_ITERATIONS = 2
# Elements of a row block of ``a @ b`` computed at once: two such blocks (the sum and one
# product) stay in a core's L2 cache while the rank loop runs over them.
_BLOCK_ELEMENTS = 1 << 16
# Elements of the float64 row block the tiles fill (1 MiB).
_GEMM_ELEMENTS = 1 << 17
#: :func:`grid_exponents` of a zero: on every grid.
_NO_GRID = 1 << 20
# factor_grids moves its product grid up at most this many bits (one or two suffice).
_GRID_TRIES = 8


def layout(spec: Compression, m: int, n: int, dtype: DType) -> dict[str, PartSpec]:
    """Parts ``a`` (m, r) and ``b`` (r, n) for the rank the spec asks (``lowrank:energy`` is resolved
    to a rank by :func:`resolve` first)."""
    if spec.rank is not None:
        r = spec.rank
    elif spec.ratio is not None:
        r = int(m * n / (spec.ratio * (m + n)))
    else:
        raise ValueError("lowrank:energy needs the rank found for the tensor (resolve it first)")
    r = min(r, m, n)
    return factor_parts(m, n, r, dtype) if r >= 1 else {}


def factor_parts(m: int, n: int, rank: int, dtype: DType) -> dict[str, PartSpec]:
    """Parts of a rank-``rank`` factorisation."""
    return {"a": (dtype, (m, rank)), "b": (dtype, (rank, n))}


def exact(m: int, n: int, k: int) -> bool:
    """Whether an (m, n) matrix gets an exact SVD for a sketch of ``k`` columns."""
    return m * n <= EXACT_ELEMENTS or min(m, n) <= EXACT_SIDE_RATIO * k


def _qr(y: np.ndarray) -> np.ndarray:
    """The Q of a reduced QR, in ``y``'s dtype.

    torch, not NumPy: NumPy's linalg computes in float64 whatever the input (a float32 sketch
    of a 128256-row embedding would take twice its size again in temporaries).
    """
    import torch  # heavy: kept off the transfer path

    return torch.linalg.qr(torch.from_numpy(y))[0].numpy()


def _small_svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import torch  # heavy: kept off the transfer path

    u, s, vt = torch.linalg.svd(torch.from_numpy(x), full_matrices=False)
    return u.numpy(), s.numpy(), vt.numpy()


def _finite(total: float) -> None:
    """Refuse a diff holding NaN or infinity before an SVD of it (which would fail on it unexplained).

    Raises:
        NonFiniteError: ``total``, the diff's squared norm, is not finite.
    """
    if not np.isfinite(total):
        raise NonFiniteError("the diff holds NaN or infinity; check the inputs")


def _exact_svd(read: Reader, m: int, n: int, ct: np.dtype[Any], block: int) -> tuple[np.ndarray, ...]:
    d = np.empty((m, n), dtype=ct)
    for r0, r1 in blocks(m, n, block):
        d[r0:r1] = rows_of(read, n, r0, r1)
    total = float(np.sum(np.square(d, dtype=np.float64)))
    _finite(total)
    u, s, vt = _small_svd(d)
    return u, s, vt, np.array(total)


def _svd(
    read: Reader,
    m: int,
    n: int,
    k: int,
    ct: np.dtype[Any],
    seed: int,
    block: int,
    *,
    start: np.ndarray | None = None,
    iterations: int = POWER_ITERATIONS,
) -> tuple[np.ndarray, ...]:
    """(U, S, Vt) with ``k`` columns (all of them for small matrices), and the squared norm.

    The randomized range finder (Halko, Martinsson and Tropp, 2011) reads the matrix
    ``2 + 2 * iterations`` times. ``start`` (n, r), r <= k: directions known to lie near the top
    right singular subspace (a previous fit's), taking the place of the first ``r`` random
    columns, so that fewer ``iterations`` find the subspace.
    """
    if exact(m, n, k):
        return _exact_svd(read, m, n, ct, block)
    rng = np.random.default_rng(seed)
    omega = rng.standard_normal((n, k)).astype(ct)
    if start is not None:
        norms = np.linalg.norm(start, axis=0)
        omega[:, : start.shape[1]] = start / np.where(norms > 0, norms, 1.0)
    y = np.empty((m, k), dtype=ct)
    total = 0.0
    for r0, r1 in blocks(m, n, block):
        rows = rows_of(read, n, r0, r1)
        total += squared(rows)
        y[r0:r1] = rows @ omega
    _finite(total)
    for _ in range(iterations):
        q = _qr(y)  # peak: y and q (two m x k)
        z = np.zeros((n, k), dtype=ct)
        for r0, r1 in blocks(m, n, block):
            z += rows_of(read, n, r0, r1).T @ q[r0:r1]
        del q
        qz = _qr(z)
        for r0, r1 in blocks(m, n, block):
            y[r0:r1] = rows_of(read, n, r0, r1) @ qz
    q = _qr(y)
    del y
    bk = np.zeros((k, n), dtype=ct)
    for r0, r1 in blocks(m, n, block):
        bk += q[r0:r1].T @ rows_of(read, n, r0, r1)
    ub, s, vt = _small_svd(bk)
    for r0, r1 in blocks(m, k, block):  # u = q @ ub, in place, a row block at a time
        q[r0:r1] = q[r0:r1] @ ub
    return q, s, vt, np.array(total)


def energy_rank(
    read: Reader,
    shape: tuple[int, int],
    energy: float,
    dtype: DType,
    ct: np.dtype[Any],
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


def factors(
    read: Reader,
    write: Writer,
    shape: tuple[int, int],
    rank: int,
    dtype: DType,
    ct: np.dtype[Any],
    name: str,
    block: int,
) -> Encoded:
    """Rank-``rank`` factors ``a`` (m, r) and ``b`` (r, n) of the truncated SVD, written as stored.

    Each column of ``a`` and row of ``b`` is rounded to ``dtype`` and then onto the grid of
    :func:`factor_grids`, so the stored factors pass :func:`exact_sum` and decode through BLAS.

    Args:
        read: the dense diff, by element range.
        write: where the parts go.
        shape: (m, n).
        rank: r.
        dtype: the parts' storage dtype.
        ct: the compute dtype.
        name: the tensor's name (seeds the sketch).
        block: elements per row block.

    Returns:
        The diff's norm and the relative error of the rounded factors.
    """
    m, n = shape
    u, s, vt, total = _svd(read, m, n, min(rank + OVERSAMPLE, m, n), ct, zlib.crc32(name.encode()), block)
    b64 = _rounded(vt[:rank], dtype)
    # the stored a's largest magnitudes first (a pass over u, not over the diff): the grids need them
    amax = np.zeros(rank)
    for r0, r1 in blocks(m, rank, _BLOCK_ELEMENTS):  # small blocks: float64 temporaries
        np.maximum(amax, column_stats(_rounded(u[r0:r1, :rank] * s[:rank], dtype))[0], out=amax)
    p, q = factor_grids(amax, column_stats(b64.T)[0])
    b = to_storage(snap(b64, q[:, None]), dtype)  # on the grid, so exactly representable
    write("b", 0, b.reshape(-1))
    b_f = from_storage(b, dtype, ct)
    err = 0.0
    for r0, r1 in blocks(m, n, block):  # a = u_r s_r, written and measured a row block at a time
        a = to_storage(snap(_rounded(u[r0:r1, :rank] * s[:rank], dtype), p[None, :]), dtype)
        write("a", r0 * rank, a.reshape(-1))
        diff = rows_of(read, n, r0, r1) - from_storage(a, dtype, ct) @ b_f
        err += squared(diff)
    return measured(float(total), err, rank=rank)


def _rounded(x: np.ndarray, dtype: DType) -> np.ndarray:
    """``x`` rounded to ``dtype``, as float64."""
    return from_storage(to_storage(x, dtype), dtype, np.dtype(np.float64))


def encode(job: Job) -> Encoded:
    """:func:`factors` at the rank of the job's parts."""
    return factors(job.read, job.write, job.shape, job.parts["a"][1][1], job.dtype, job.ct, job.name, job.block)


def decode(p: Packed, start: int, count: int, out: np.ndarray, cache: dict[Any, Any]) -> np.ndarray:
    """Elements ``[start, start + count)`` of ``scale * a @ b`` into ``out``.

    ``b`` and the tensor's path (:func:`factor_plan`) are kept in ``cache``; the path is
    BLAS where the stored factors pass :func:`exact_sum`, the rank-ordered loop otherwise.
    """
    ct = out.dtype
    r0, r1, n = row_span(p, start, count)
    b, exact_path = factor_plan(p, ct, cache)
    rank = b.shape[0]
    a = float_part(p, "a", r0 * rank, (r1 - r0) * rank, b.dtype)
    product_rows(a.reshape(r1 - r0, rank), b, start - r0 * n, count, out, exact=exact_path)
    if p.scale != 1.0:
        np.multiply(out, ct.type(p.scale), out=out)
    return out


def product_rows(a: np.ndarray, b: np.ndarray, skip: int, count: int, out: np.ndarray, *, exact: bool = False) -> None:
    """Write elements ``[skip, skip + count)`` of the row-major product ``a @ b`` into ``out``.

    Two paths, each giving bits that depend only on the factors (the same for any range
    split, ``--threads``, ``--max-memory``, BLAS kernel and IEEE-754 CPU):

    - ``exact=True`` (the caller has checked the *whole* factors with :func:`exact_sum`,
      and passes them in float64): one float64 GEMM through BLAS, each result rounded once
      to ``out``'s dtype. Every product and partial sum is then exact in float64 (see
      :func:`exact_sum`), so whatever order, blocking, FMA or threading the GEMM uses, it
      returns the exact sum, and its single rounding is a function of the factors alone.
    - otherwise: not through BLAS, since a GEMM's summation order (blocking, FMA, SIMD
      width) depends on the matrix sizes, the thread count and the CPU's kernel, so a row
      decoded as part of a small range could differ in its last bit from the same row
      decoded in a large one. Here every element is
      ``fl(...fl(fl(a0*b0) + fl(a1*b1)) + ... + fl(ak*bk))``, one correctly rounded multiply
      and add per rank in rank order, in ``out``'s dtype.

    Args:
        a: rows ``skip // n`` to ``ceil((skip + count) / n)`` (at least) of the left factor.
        b: the right factor (r, n).
        skip: the first element, counted from ``a``'s first row.
        count: how many elements.
        out: where they go (at least ``count`` long).
        exact: take the BLAS path (only for factors that pass :func:`exact_sum`, in float64).
    """
    n = b.shape[1]
    if b.shape[0] == 0:
        out[:count] = 0
        return
    first, last = skip // n, -(-(skip + count) // n)
    if exact:
        exact_rows(a, b, skip, count, out)
        return
    rows = max(1, _BLOCK_ELEMENTS // n)
    acc = np.empty((rows, n), dtype=out.dtype)
    tmp = np.empty((rows, n), dtype=out.dtype)
    for i in range(first, last, rows):
        j = min(last, i + rows)
        s, t = acc[: j - i], tmp[: j - i]
        np.multiply(a[i:j, 0:1], b[0], out=s)
        for k in range(1, b.shape[0]):
            np.multiply(a[i:j, k : k + 1], b[k], out=t)
            np.add(s, t, out=s)
        lo, hi = max(i * n, skip), min(j * n, skip + count)
        out[lo - skip : hi - skip] = s.reshape(-1)[lo - i * n : hi - i * n]


def exact_rows(a: np.ndarray, b: np.ndarray, skip: int, count: int, out: np.ndarray) -> None:
    """:func:`product_rows`' exact path (factors that pass :func:`exact_sum`, in float64): one
    float64 GEMM per block of rows, over the whole rank, rounded once into ``out``.

    The bits do not depend on the blocking (every partial sum is exact, see :func:`exact_sum`);
    the speed does. Run under a single-threaded BLAS (the engine runs its workers so:
    :meth:`ftrecycle.engine.Engine.run`): a GEMM this size would otherwise start BLAS's own
    threads beside the engine's, and those spin-wait (8x slower measured on 2 loaded cores).
    Single-threaded, whole-rank blocks of :data:`_GEMM_ELEMENTS` outputs beat the small tiles this
    path used before at every rank measured, 64 to 1400 (``benchmarks/bench_exact_gemm.py``,
    ``benchmarks/results/exact-gemm.json``).

    Args:
        a: rows ``skip // n`` to ``ceil((skip + count) / n)`` (at least) of the left factor, float64.
        b: the right factor (r, n), float64.
        skip: the first element, counted from ``a``'s first row.
        count: how many elements.
        out: where they go (at least ``count`` long).
    """
    n, r = b.shape[1], b.shape[0]
    if r == 0:
        out[:count] = 0
        return
    first, last = skip // n, -(-(skip + count) // n)
    rows = max(1, min(last - first, _GEMM_ELEMENTS // n))
    buf = np.empty((rows, n), dtype=np.float64)
    for i in range(first, last, rows):
        j = min(last, i + rows)
        s = buf[: j - i]
        np.matmul(a[i:j], b, out=s)
        lo, hi = max(i * n, skip), min(j * n, skip + count)
        out[lo - skip : hi - skip] = s.reshape(-1)[lo - i * n : hi - i * n]  # the one rounding


def factor_plan(
    p: Packed, ct: np.dtype[Any], cache: dict[Any, Any], a_name: str = "a", b_name: str = "b"
) -> tuple[np.ndarray, bool]:
    """A low-rank tensor's right factor and decoding path, decided once over the whole factors.

    The decision reads all of ``a`` (a row block at a time) and ``b``, so it depends only
    on the stored factors, never on the range being decoded; it is kept in the caller's
    one-entry cache (one per worker thread) with ``b``.

    Args:
        p: the packed tensor.
        ct: the compute dtype.
        cache: the caller's cache.
        a_name: the left factor's part name (m, r).
        b_name: the right factor's part name (r, n).

    Returns:
        ``b`` widened to float64 and True when the factors pass :func:`exact_sum` (decode
        through :func:`product_rows` with ``exact=True`` and ``a`` in float64), else ``b`` in
        ``ct`` and False.
    """
    key = (id(p), "factor_plan", a_name, b_name, ct.str)
    got = cache.get(key)
    if got is None:
        b = _whole_part(p, b_name)
        amax, agrid = _streamed_column_stats(p, a_name, b.shape[0])
        bmax, bgrid = column_stats(b.T)
        ok = exact_sum(amax, agrid, bmax, bgrid)
        got = (b if ok else b.astype(ct), ok)
        cache.clear()
        cache[key] = got
    return got


def _whole_part(p: Packed, name: str) -> np.ndarray:
    src = p.parts[name]
    shape = src.shape if isinstance(src, np.ndarray) else src.info.shape
    return float_part(p, name, 0, math.prod(shape), np.dtype(np.float64)).reshape(shape)


def _streamed_column_stats(p: Packed, name: str, r: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`column_stats` of an (m, r) part, read a row block at a time (bounded memory)."""
    m = p.shape[0]
    amax = np.zeros(r, dtype=np.float64)
    agrid = np.full(r, _NO_GRID, dtype=np.int64)
    for r0, r1 in blocks(m, r, _BLOCK_ELEMENTS):
        x = float_part(p, name, r0 * r, (r1 - r0) * r, np.dtype(np.float64)).reshape(r1 - r0, r)
        bmax, bgrid = column_stats(x)
        np.maximum(amax, bmax, out=amax)
        np.minimum(agrid, bgrid, out=agrid)
    return amax, agrid


# ---------------------------------------------------------------- exact sums by construction


def grid_exponents(x: np.ndarray) -> np.ndarray:
    """For each float64 value, the ``e`` such that it is an odd multiple of ``2^e``.

    Zeros (on every grid) get a huge exponent, NaN and infinities a hugely negative one (so
    that :func:`exact_sum` refuses them).
    """
    bits = np.ascontiguousarray(x, dtype=np.float64).view(np.uint64) & np.uint64(0x7FFF_FFFF_FFFF_FFFF)
    e = (bits >> np.uint64(52)).astype(np.int64)
    mant = bits & np.uint64((1 << 52) - 1)
    mant = np.where(e > 0, mant | np.uint64(1 << 52), mant)
    low = mant & (~mant + np.uint64(1))  # the lowest set bit, a power of two <= 2^52 (exact as a float)
    tz = np.frexp(low.astype(np.float64))[1].astype(np.int64) - 1
    out = np.where(e > 0, e - 1075, -1074) + tz
    out[mant == 0] = _NO_GRID
    out[e == 0x7FF] = -_NO_GRID
    return out


def column_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The largest magnitude and the grid (:func:`grid_exponents`' minimum) of each column.

    A column whose grid is finer than ``2^(e - 52)`` (``e``: the exponent of its largest
    magnitude, below ``2^e``) gets ``-2^19``: such factors can never pass :func:`exact_sum`
    (a passing column has ``max |a[:, k]| < 2^(52 + p_k)``), so the exact value is not needed,
    and the others are found by one OR of their integers at that scale.

    Args:
        x: a 2-D float array (a block of rows of ``a``, or ``b.T``).

    Returns:
        ``(max |x[:, k]|, min_i grid(x[i, k]))`` per column, float64 and int64.
    """
    x64 = np.abs(np.asarray(x, dtype=np.float64))
    if x64.shape[0] == 0:
        return np.zeros(x64.shape[1]), np.full(x64.shape[1], _NO_GRID, dtype=np.int64)
    with np.errstate(invalid="ignore"):
        amax = np.max(x64, axis=0)
    e = np.frexp(amax)[1].astype(np.int64)
    if not np.all(np.isfinite(amax)) or e.max() > 52:
        return amax, np.min(grid_exponents(x64), axis=0)  # rare: the element by element way
    # at the scale 2^(52 - e) (>= 1: no underflow) values on a grid >= 2^(e - 52) are integers < 2^52
    scaled = np.ldexp(x64, (52 - e).astype(np.int32)[None, :])
    ints = scaled.astype(np.int64)
    fine = ~np.all(ints == scaled, axis=0)
    joined = np.bitwise_or.reduce(ints, axis=0)
    grid = grid_exponents(joined.astype(np.float64)) + e - 52  # the lowest bit of the OR: the min
    grid[joined == 0] = _NO_GRID
    grid[fine] = -_NO_GRID // 2
    return amax, grid


def exact_sum(amax: np.ndarray, agrid: np.ndarray, bmax: np.ndarray, bgrid: np.ndarray) -> bool:
    """Whether every float64 GEMM of these factors computes each element's exact sum.

    With ``a``'s column ``k`` on the grid ``2^p_k`` and ``b``'s row ``k`` on ``2^q_k``, every
    product ``a_ik b_kj`` is a multiple of ``2^g``, ``g = min_k (p_k + q_k)``, and every sum of
    any subset of them is a multiple of ``2^g`` bounded by
    ``T = sum_k max|a_:k| max|b_k:| >= sum_k |a_ik| |b_kj|``. If ``T < 2^(53 + g)`` (and
    ``g >= -1074``, the float64 grid) all of those numbers are integers times ``2^g`` below
    ``2^53`` in magnitude: float64 holds them exactly, so every product, add and FMA a GEMM
    does, in any order, blocking or thread split, is exact. ``T`` is checked against
    ``2^(52 + g)``: its float64 sum is within a relative ``r 2^-52`` of the true one, far
    less than the factor 2 kept.

    Args:
        amax, agrid: :func:`column_stats` of ``a`` (m, r).
        bmax, bgrid: :func:`column_stats` of ``b.T`` (``b`` is (r, n)).

    Returns:
        True where the BLAS path is exact (also for all-zero factors).
    """
    if np.any(agrid == -_NO_GRID) or np.any(bgrid == -_NO_GRID):
        return False  # a NaN or an infinity: its bits need not be reproducible through BLAS
    live = (agrid < _NO_GRID) & (bgrid < _NO_GRID)  # a zero column or row adds nothing
    if not live.any():
        return True
    g = int(np.min(agrid[live] + bgrid[live]))
    if g < -1074:
        return False
    with np.errstate(over="ignore", invalid="ignore"):
        total = math.fsum((amax[live] * bmax[live]).tolist())
    return math.isfinite(total) and total < math.ldexp(1.0, min(52 + g, 1023))


def factor_grids(amax: np.ndarray, bmax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grid exponents ``p`` (per column of ``a``) and ``q`` (per row of ``b``) that make
    factors with these largest magnitudes pass :func:`exact_sum` once snapped onto them.

    All terms share one product grid ``G = p_k + q_k``, set 51 bits below the bound ``T``:
    each term gets the bits it has above ``G`` (its ``slack``), split evenly between its
    two factors; so the largest term keeps ~25 bits per factor (entries below 2^-25 of
    their column's largest move by < 2^-26 of it, far under bf16's 2^-9) and terms far
    below the largest are rounded coarsely (their absolute error stays < 2^-50 of ``T``).
    Snapping rounds the largest magnitudes too (to the nearest multiple, so they may grow):
    ``G`` moves up a bit until the snapped maxima pass.

    Args:
        amax: ``max |a[:, k]|`` per k (finite).
        bmax: ``max |b[k, :]|`` per k (finite).

    Returns:
        ``(p, q)``, int64 of shape (r,).
    """
    ea = np.frexp(amax)[1].astype(np.int64)  # amax < 2^ea
    eb = np.frexp(bmax)[1].astype(np.int64)
    live = (amax > 0) & (bmax > 0)
    total = math.fsum((amax * bmax).tolist())
    top = math.frexp(total)[1] if total > 0 else 0
    for shift in range(_GRID_TRIES):
        big = max(top - 51 + shift, -1074)
        slack = ea + eb - big
        p = np.where(live, ea - slack // 2, ea - 60)  # a zero term: any grid, leave its factors alone
        q = np.where(live, big - p, eb - 60)
        if total == 0 or exact_sum(snap(amax, p), np.where(live, p, _NO_GRID), snap(bmax, q), q):
            break
    return p, q


def snap(x: np.ndarray, exps: np.ndarray) -> np.ndarray:
    """``x`` (float64) rounded to the nearest multiple of ``2^exps`` (broadcast), ties to even.

    A value of ``t`` significant bits either is already on the grid (its last bit at or
    above ``2^exps``) or is below ``2^(exps + t)``: rounded, it is an integer of at most
    ``t`` bits times ``2^exps``, so it stays representable in the dtype it came from.
    """
    e = np.asarray(exps).astype(np.int32)
    return np.ldexp(np.rint(np.ldexp(x, -e)), e)


def snapped_svd_factors(
    u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int, dtype: DType
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`snap_factors` of ``a = u[:, :rank] s[:rank]`` and ``b = vt[:rank]``, with ``a`` made a row
    block at a time: its float64 temporaries stay small (``snap_factors`` of a 128256-row ``a`` holds
    several float64 copies of it). The same values as :func:`factors` stores.

    Returns:
        ``a`` (m, rank) and ``b`` (rank, n) in ``dtype``'s storage form, passing :func:`exact_sum`.
    """
    m = u.shape[0]
    b64 = _rounded(vt[:rank], dtype)
    amax = np.zeros(rank)
    for r0, r1 in blocks(m, rank, _BLOCK_ELEMENTS):
        np.maximum(amax, column_stats(_rounded(u[r0:r1, :rank] * s[:rank], dtype))[0], out=amax)
    p, q = factor_grids(amax, column_stats(b64.T)[0])
    a = np.empty((m, rank), dtype=dtype.storage)
    for r0, r1 in blocks(m, rank, _BLOCK_ELEMENTS):
        a[r0:r1] = to_storage(snap(_rounded(u[r0:r1, :rank] * s[:rank], dtype), p[None, :]), dtype)
    return a, to_storage(snap(b64, q[:, None]), dtype)


def snap_factors(a: np.ndarray, b: np.ndarray, dtype: DType) -> tuple[np.ndarray, np.ndarray]:
    """Low-rank factors rounded to ``dtype`` and onto :func:`factor_grids`, for a codec with
    a low-rank part to store (they then decode through the exact BLAS path).

    Args:
        a: the left factor (m, r), any float dtype.
        b: the right factor (r, n).
        dtype: the storage dtype.

    Returns:
        ``a`` and ``b`` in ``dtype``'s storage form, passing :func:`exact_sum`.
    """
    af = from_storage(to_storage(a, dtype), dtype, np.dtype(np.float64))
    bf = from_storage(to_storage(b, dtype), dtype, np.dtype(np.float64))
    p, q = factor_grids(column_stats(af)[0], column_stats(bf.T)[0])
    return to_storage(snap(af, p[None, :]), dtype), to_storage(snap(bf, q[:, None]), dtype)


def state_bytes(parts: dict[str, PartSpec], shape: tuple[int, int], itemsize: int, block: int) -> int:
    """Bytes the encoder holds: the sketch and its QR factors, or the whole matrix for an exact SVD."""
    m, n = shape
    rank = parts["a"][1][1]
    rows = row_block_bytes(itemsize, block)
    k = min(rank + OVERSAMPLE, m, n)
    if exact(m, n, k):
        return 5 * m * n * itemsize + rows
    return (3 * m + 4 * n) * k * itemsize + rows


def expect(m: int, n: int, parts: dict[str, TensorInfo]) -> Expected:
    """``a`` (m, r) and ``b`` (r, n), one float dtype, r >= 1 (r read from ``a``)."""
    a = parts["a"]
    r = a.shape[1] if len(a.shape) == 2 else 0
    return {"a": (FLOAT_DTYPES, (m, max(r, 1))), "b": (frozenset({a.dtype}), (r, n))}


def resolve(spec: Compression, probe: Probe) -> Compression | None:
    """``lowrank:energy``: the rank found by :func:`energy_rank` within the probe's memory (None:
    store the tensor dense); other specs as they are."""
    if spec.energy is None:
        return spec
    m, n = probe.shape
    it, wide = probe.ct.itemsize, max(probe.block, n)
    max_k = max(0, probe.memory - 4 * wide * it - 16 * wide) // ((4 * m + 4 * n) * it)
    r = energy_rank(probe.read, (m, n), spec.energy, probe.dtype, probe.ct, probe.name, probe.block, max_k)
    return None if r is None else Compression("lowrank", rank=r)


def gain(parts: dict[str, np.ndarray], g: np.ndarray) -> dict[str, np.ndarray]:
    """Row ``i`` of ``a`` times ``g[i]``: ``diag(g) @ a @ b`` (``b`` stays).

    Raises:
        ValueError: ``g`` is not one finite gain per row.
    """
    a = parts["a"]
    return {"a": rescaled(a, row_gains(g, a.shape[0])[:, None])}


CODEC = Codec(
    "lowrank",
    ("rank", "energy", "ratio"),
    frozenset({"a", "b"}),
    layout,
    encode,
    decode,
    state_bytes,
    expect,
    resolve=resolve,
    gain=gain,
    row_gain=True,
)
