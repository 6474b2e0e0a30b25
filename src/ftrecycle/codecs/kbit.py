"""``kbit``: a diff matrix quantized to ``K`` bits per value, one scale per group of a row.

Formula (``kbit:bits=K[,group=G]``, ``K`` in 2..8, ``G`` default 64): each row of ``D`` (m, n) is
cut into ``c = ceil(n / G)`` groups of ``g = ceil(n / c)`` consecutive values (the last one
shorter; ``g <= G``, and the same ``c`` scales as ``G`` would take, so the same bytes). With
``h = (2^K - 1) / 2``, a value of group ``(i, t)`` decodes as ``(q_ij - h) * s_it``: ``2^K``
symmetric levels, no zero point and no level at 0 (a zero group takes ``s = 0``). The encoder
tries the scales ``s = ratio * max|group| / h`` for the clip ratios of :data:`CLIP_RATIOS`, each
rounded to its stored bfloat16 value, and keeps per group the one of least squared error
(``q = clip(rint(x / s + h), 0, 2^K - 1)``, round half to even): deterministic, one pass.

Parts (self-describing: the decoder reads ``K`` and ``g`` from the shapes alone):

- ``q`` (ceil(mn/8), K) uint8: bit planes interleaved by byte — bit ``b`` of element ``e``'s
  code is bit ``e % 8`` (little-endian) of ``q[e // 8, b]``. Its second dimension is ``K``
  for every m, n, and elements ``[s, s + count)`` lie in the contiguous rows
  ``[s // 8, ceil((s + count) / 8))``, so a range decodes from the bytes under it alone.
- ``scale`` (m, c) bfloat16. ``g = ceil(n / c)``; a ``c`` that no group size gives (where
  ``ceil(n / ceil(n / c)) != c``) is refused by :func:`expect`.

The scale is bfloat16, not float16: a fine-tuning diff's values are often 1e-5 or smaller, and
their scales would fall among float16's subnormals (spacing 6e-8, a relative error of several
percent), while bfloat16 keeps float32's range; its coarser mantissa (a relative rounding of
at most 2^-9) is taken into account, since each candidate scale is rounded before its error is
measured. Storage is ``K + 16 / g`` bits per value (4.25 at ``K = 4, G = 64``).

Reference: round-to-nearest group-wise quantization as in GPTQ (Frantar et al., "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers", 2022,
arXiv:2210.17323) and DeltaZip (Yao et al., "DeltaZip: Efficient Serving of Multiple
Full-Model-Tuned LLMs", 2023, arXiv:2312.05215), applied to the diff. Unlike them there is no
error compensation from calibration activations (GPTQ's Hessian-based update of the remaining
columns): every value is rounded on its own, with a per-group clip search instead.
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
from ftrecycle.dtypes import BF16, U8, DType, bf16_to_float32, float32_to_bf16
from ftrecycle.errors import ConfigError
from ftrecycle.io.safetensors_format import TensorInfo

DEFAULT_GROUP = 64
MIN_BITS, MAX_BITS = 2, 8
#: The clip ratios tried per group (of the group's largest magnitude at the outer level): a few
#: large values then saturate, and the many small ones get finer steps. 0.5 is about the best
#: ratio for 2 bits on Gaussian groups of 64; 1.0 (no clipping) is best for 8 bits.
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))


def groups(n: int, group: int) -> tuple[int, int]:
    """The group length ``g`` and the groups per row ``c`` for rows of ``n`` values and ``group=G``.

    Args:
        n: the row length (>= 1).
        group: the largest group length asked.

    Returns:
        ``(g, c)`` with ``c = ceil(n / G)`` and ``g = ceil(n / c)``, so ``ceil(n / g) == c``.
    """
    c = -(-n // max(1, group))
    return -(-n // c), c


def check(spec: Compression) -> None:
    """A whole ``bits`` from 2 to 8 and a positive ``group``.

    Raises:
        ConfigError: either is out of range.
    """
    k = spec.bits
    if k is None or not float(k).is_integer() or not MIN_BITS <= k <= MAX_BITS:
        raise ConfigError(f"--compress {spec}: kbit takes bits=K, a whole number from {MIN_BITS} to {MAX_BITS}")
    if spec.group is not None and spec.group < 1:
        raise ConfigError(f"--compress {spec}: group must be a positive integer")


def layout(spec: Compression, m: int, n: int, dtype: DType) -> dict[str, PartSpec]:
    """Parts ``q`` (ceil(mn/8), K) uint8 and ``scale`` (m, ceil(n/G)) bfloat16."""
    check(spec)
    _, c = groups(n, spec.group or DEFAULT_GROUP)
    return {"q": (U8, (-(-m * n // 8), int(spec.bits or 0))), "scale": (BF16, (m, c))}


def pack(codes: np.ndarray, k: int) -> np.ndarray:
    """Codes (count,) uint8 below ``2^k`` as the rows of ``q`` holding them, (ceil(count/8), k)."""
    bits = np.unpackbits(codes.reshape(-1, 1), axis=1, count=k, bitorder="little")
    return np.packbits(bits, axis=0, bitorder="little")


def unpack(raw: np.ndarray, skip: int, count: int) -> np.ndarray:
    """Codes ``[skip, skip + count)`` of rows ``raw`` (r, k) of ``q``, as (count,) uint8."""
    codes = np.zeros(8 * raw.shape[0], dtype=np.uint8)
    for b in range(raw.shape[1]):
        codes |= np.left_shift(np.unpackbits(raw[:, b], bitorder="little"), np.uint8(b))
    return codes[skip : skip + count]


def quantize(x: np.ndarray, k: int, g: int, c: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Rows ``x`` (r, n) as codes (r, n) uint8, scales (r, c) as bfloat16 bits, and the squared error.

    Each group keeps the candidate scale (of :data:`CLIP_RATIOS`, rounded to bfloat16) of least
    squared error; the zero padding of a short last group counts for nothing.
    """
    r, n = x.shape
    ct = x.dtype
    h = (2**k - 1) / 2
    xg = np.zeros((r, c * g), dtype=ct)
    xg[:, :n] = x
    xg = xg.reshape(r, c, g)
    top = np.max(np.abs(xg), axis=2).astype(np.float32)
    best_err = np.full((r, c), np.inf)
    best_scale = np.zeros((r, c), dtype=np.uint16)
    best_q = np.zeros((r, c, g), dtype=np.uint8)
    # three buffers for every candidate: codes, residual, its squares (float64: tiny diffs stay normal)
    q, res, sq = np.empty_like(xg), np.empty_like(xg), np.empty(xg.shape)
    for ratio in CLIP_RATIOS:
        bits = float32_to_bf16(np.ascontiguousarray(top * np.float32(ratio / h)))
        s = bf16_to_float32(bits).astype(ct)
        np.divide(xg, np.where(s > 0, s, 1)[..., None], out=q)
        np.add(q, ct.type(h), out=q)
        np.clip(np.rint(q, out=q), 0, 2**k - 1, out=q)
        np.subtract(q, ct.type(h), out=res)
        np.multiply(res, s[..., None], out=res)
        np.subtract(res, xg, out=res)
        res.reshape(r, c * g)[:, n:] = 0
        err = np.sum(np.square(res, out=sq, dtype=np.float64), axis=2)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, bits, best_scale)
        np.copyto(best_q, q, casting="unsafe", where=better[..., None])
    codes = best_q.reshape(r, c * g)[:, :n]
    return codes, best_scale, float(np.sum(best_err[np.isfinite(best_err)]))


def encode(job: Job) -> Encoded:
    """Quantize row block by row block; codes are written in whole bytes (a tail under 8 waits)."""
    read, write, (m, n), block = job.read, job.write, job.shape, job.block
    k, c = job.parts["q"][1][1], job.parts["scale"][1][1]
    g = -(-n // c)
    total = err = 0.0
    pending = np.empty(0, dtype=np.uint8)
    done = 0  # rows of q written
    for r0, r1 in blocks(m, n, block):
        rows = rows_of(read, n, r0, r1)
        total += squared(rows)
        codes, scale, e = quantize(rows, k, g, c)
        err += e
        write("scale", r0 * c, scale.reshape(-1))
        flat = np.concatenate([pending, codes.reshape(-1)])
        whole = flat.size - flat.size % 8 if r1 < m else flat.size
        if whole:
            write("q", done * k, pack(flat[:whole], k).reshape(-1))
            done += -(-whole // 8)
        pending = flat[whole:]
    return measured(total, err)


def part_shape(p: Packed, name: str) -> tuple[int, ...]:
    """A part's shape (stored or in memory)."""
    src = p.parts[name]
    return tuple(src.shape) if isinstance(src, np.ndarray) else tuple(src.info.shape)


def decode(p: Packed, start: int, count: int, out: np.ndarray, cache: dict[Any, Any]) -> np.ndarray:
    """Elements ``[start, start + count)`` of ``(q - h) * scale[row, group]`` into ``out``.

    Reads only the rows of ``q`` under the range and the scales of its rows; every element is
    one exact subtraction and one rounded product, so its bits depend on the parts alone.
    """
    ct = out.dtype
    k, c = part_shape(p, "q")[1], part_shape(p, "scale")[1]
    r0, r1, n = row_span(p, start, count)
    g = -(-n // c)
    b0, b1 = start // 8, -(-(start + count) // 8)
    raw = read_part(p, "q", b0 * k, (b1 - b0) * k).reshape(b1 - b0, k)
    scale = float_part(p, "scale", r0 * c, (r1 - r0) * c, ct).reshape(r1 - r0, c)
    # each row's group scales spread over its values (the rows under the range only)
    each = np.repeat(scale, g, axis=1)[:, :n].reshape(-1)[start - r0 * n : start - r0 * n + count]
    out[:count] = unpack(raw, start - 8 * b0, count)
    np.subtract(out[:count], ct.type((2**k - 1) / 2), out=out[:count])
    np.multiply(out[:count], each, out=out[:count])
    return out


def state_bytes(parts: dict[str, PartSpec], shape: tuple[int, int], itemsize: int, block: int) -> int:
    """Bytes the encoder holds: a row block, its padded groups, candidates and best codes."""
    n = shape[1]
    g = -(-n // parts["scale"][1][1])
    rows = row_block_bytes(itemsize, max(block, n + g))
    return 3 * rows


def expect(m: int, n: int, parts: dict[str, TensorInfo]) -> Expected:
    """``q`` (ceil(mn/8), K) uint8 with K in 2..8, and ``scale`` (m, c) bfloat16 with ``c`` a group
    count some group size gives (K and c read from the parts)."""
    q, s = parts["q"].shape, parts["scale"].shape
    k = min(max(q[1], MIN_BITS), MAX_BITS) if len(q) == 2 else MIN_BITS
    c = s[1] if len(s) == 2 else 1
    _, c_ok = groups(n, -(-n // max(c, 1)))
    return {"q": (frozenset({U8}), (-(-m * n // 8), k)), "scale": (frozenset({BF16}), (m, c_ok))}


def gain(parts: dict[str, np.ndarray], g: np.ndarray) -> dict[str, np.ndarray]:
    """The group scales of row ``i`` times ``g[i]``.

    Raises:
        ValueError: ``g`` is not one finite gain per row.
    """
    scale = parts["scale"]
    return {"scale": rescaled(scale, row_gains(g, scale.shape[0])[:, None])}


CODEC = Codec(
    "kbit",
    ("bits",),
    frozenset({"q", "scale"}),
    layout,
    encode,
    decode,
    state_bytes,
    expect,
    extra=("group",),
    check=check,
    gain=gain,
    row_gain=True,
)
