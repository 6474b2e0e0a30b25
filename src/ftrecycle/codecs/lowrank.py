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
"""

from __future__ import annotations

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
    row_block_bytes,
    row_span,
    rows_of,
    squared,
    whole,
)
from ftrecycle.codecs.kbit import rescaled, row_gains
from ftrecycle.dtypes import FLOAT_DTYPES, DType, from_storage, to_storage
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


def _exact_svd(read: Reader, m: int, n: int, ct: np.dtype[Any], block: int) -> tuple[np.ndarray, ...]:
    d = np.empty((m, n), dtype=ct)
    for r0, r1 in blocks(m, n, block):
        d[r0:r1] = rows_of(read, n, r0, r1)
    total = float(np.sum(np.square(d, dtype=np.float64)))
    u, s, vt = _small_svd(d)
    return u, s, vt, np.array(total)


def _svd(read: Reader, m: int, n: int, k: int, ct: np.dtype[Any], seed: int, block: int) -> tuple[np.ndarray, ...]:
    """(U, S, Vt) with ``k`` columns (all of them for small matrices), and the squared norm."""
    if exact(m, n, k):
        return _exact_svd(read, m, n, ct, block)
    rng = np.random.default_rng(seed)
    omega = rng.standard_normal((n, k)).astype(ct)
    y = np.empty((m, k), dtype=ct)
    total = 0.0
    for r0, r1 in blocks(m, n, block):
        rows = rows_of(read, n, r0, r1)
        total += squared(rows)
        y[r0:r1] = rows @ omega
    for _ in range(POWER_ITERATIONS):
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
    b = to_storage(vt[:rank], dtype)
    write("b", 0, b.reshape(-1))
    b_f = from_storage(b, dtype, ct)
    err = 0.0
    for r0, r1 in blocks(m, n, block):  # a = u_r s_r, written and measured a row block at a time
        a = to_storage(u[r0:r1, :rank] * s[:rank], dtype)
        write("a", r0 * rank, a.reshape(-1))
        diff = rows_of(read, n, r0, r1) - from_storage(a, dtype, ct) @ b_f
        err += squared(diff)
    return measured(float(total), err, rank=rank)


def encode(job: Job) -> Encoded:
    """:func:`factors` at the rank of the job's parts."""
    return factors(job.read, job.write, job.shape, job.parts["a"][1][1], job.dtype, job.ct, job.name, job.block)


def decode(p: Packed, start: int, count: int, out: np.ndarray, cache: dict[Any, Any]) -> np.ndarray:
    """Elements ``[start, start + count)`` of ``scale * a @ b`` into ``out``; ``b`` is kept in ``cache``."""
    ct = out.dtype
    r0, r1, n = row_span(p, start, count)
    b = whole(p, "b", ct, cache)
    rank = b.shape[0]
    a = float_part(p, "a", r0 * rank, (r1 - r0) * rank, ct)
    product_rows(a.reshape(r1 - r0, rank), b, start - r0 * n, count, out)
    if p.scale != 1.0:
        np.multiply(out, ct.type(p.scale), out=out)
    return out


def product_rows(a: np.ndarray, b: np.ndarray, skip: int, count: int, out: np.ndarray) -> None:
    """Write elements ``[skip, skip + count)`` of the row-major product ``a @ b`` into ``out``.

    Not through BLAS: a GEMM's summation order (blocking, FMA, SIMD width) depends on the
    matrix sizes, the thread count and the CPU's kernel, so a row decoded as part of a
    small range could differ in its last bit from the same row decoded in a large one.
    Here every element is ``fl(...fl(fl(a0*b0) + fl(a1*b1)) + ... + fl(ak*bk))``, one
    correctly rounded multiply and add per rank in rank order, so its bits depend only on
    the stored factors: the same for any range split, ``--threads``, ``--max-memory``, BLAS
    kernel and IEEE-754 CPU.
    """
    n = b.shape[1]
    if b.shape[0] == 0:
        out[:count] = 0
        return
    rows = max(1, _BLOCK_ELEMENTS // n)
    acc = np.empty((rows, n), dtype=out.dtype)
    tmp = np.empty((rows, n), dtype=out.dtype)
    first, last = skip // n, -(-(skip + count) // n)
    for i in range(first, last, rows):
        j = min(last, i + rows)
        s, t = acc[: j - i], tmp[: j - i]
        np.multiply(a[i:j, 0:1], b[0], out=s)
        for k in range(1, b.shape[0]):
            np.multiply(a[i:j, k : k + 1], b[k], out=t)
            np.add(s, t, out=s)
        lo, hi = max(i * n, skip), min(j * n, skip + count)
        out[lo - skip : hi - skip] = s.reshape(-1)[lo - i * n : hi - i * n]


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
