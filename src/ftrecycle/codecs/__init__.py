"""Compressed diff tensors: the specs users give, the stored parts, and decoding by element range.

A compressed 2-D tensor of shape ``(m, n)`` is stored as *parts*, safetensors tensors
named ``{name}::{part}``:

================  ==========================================  ==================================
method            parts                                       value of element ``(i, j)``
================  ==========================================  ==================================
``lowrank``       ``a`` (m, r), ``b`` (r, n)                  ``sum_k a[i, k] * b[k, j]``
``sparse``        ``indptr`` (m+1,) int64, ``indices`` (k,)   ``values[e]`` where row ``i``'s
                  uint16/int32 columns, ``values`` (k,)       entries ``e`` name column ``j``; else 0
``int8``          ``q`` (m, n) int8, ``scale`` (m,) float32   ``q[i, j] * scale[i]``
``sign``          ``bits`` (ceil(mn/8),) uint8, ``scale``     ``+scale`` if bit ``i*n+j`` is set
                  (1,) float32                                (little-endian in its byte) else
                                                              ``-scale``
================  ==========================================  ==================================

Decoding works on any flat element range, so the transfer engine streams a
compressed delta exactly as it streams a dense one: only the rows under the range
(and, for ``lowrank``, the small ``b``) are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ftrecycle.dtypes import BF16, F32, I8, I32, I64, U8, U16, DType
from ftrecycle.errors import ConfigError

METHODS = ("lowrank", "sparse", "int8", "sign")
SEP = "::"


@dataclass(frozen=True)
class Compression:
    """A ``--compress`` setting.

    Attributes:
        method: ``lowrank``, ``sparse``, ``int8`` or ``sign``.
        rank: lowrank: the rank of every matrix.
        energy: lowrank: the smallest rank keeping this fraction of each matrix's squared norm.
        ratio: lowrank or sparse: the rank or density that makes each matrix this many times
            smaller than it is dense in the delta's dtype.
        density: sparse: the fraction of entries kept (largest magnitudes).
    """

    method: str
    rank: int | None = None
    energy: float | None = None
    ratio: float | None = None
    density: float | None = None

    def __str__(self) -> str:
        opts = [f"{k}={v:g}" for k, v in self.options().items()]
        return self.method + (":" + ",".join(opts) if opts else "")

    def options(self) -> dict[str, float]:
        """The parameters that are set."""
        found = {"rank": self.rank, "energy": self.energy, "ratio": self.ratio, "density": self.density}
        return {k: v for k, v in found.items() if v is not None}


#: the largest lowrank rank and compression ratio a spec may ask (beyond them a number is a typo)
MAX_RANK = 2**20
MAX_RATIO = 1e6
_ALLOWED = {"lowrank": ("rank", "energy", "ratio"), "sparse": ("density", "ratio"), "int8": (), "sign": ()}


def parse_compression(text: str | Compression | None) -> Compression | None:
    """Parse ``lowrank:rank=64``, ``lowrank:energy=0.9``, ``lowrank:ratio=16``, ``sparse:density=0.05``,
    ``sparse:ratio=16``, ``int8``, ``sign`` or ``none``.

    Raises:
        ConfigError: an unknown method, a missing or extra parameter, or a value out of range.
    """
    if text is None or isinstance(text, Compression):
        return text
    method, _, rest = text.strip().partition(":")
    if method == "none" and not rest:
        return None
    if method not in _ALLOWED:
        raise ConfigError(f"--compress {text!r}: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    opts: dict[str, float] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in _ALLOWED[method]:
            allowed = ", ".join(f"{k}=" for k in _ALLOWED[method]) or "no parameters"
            raise ConfigError(f"--compress {text!r}: {method} takes {allowed}")
        if key in opts:
            raise ConfigError(f"--compress {text!r}: {key} is given twice; give it once")
        try:
            opts[key] = float(value)
        except ValueError as e:
            raise ConfigError(f"--compress {text!r}: {key} must be a number") from e
        if not math.isfinite(opts[key]):
            raise ConfigError(f"--compress {text!r}: {key} must be a finite number")
    if _ALLOWED[method] and len(opts) != 1:
        raise ConfigError(f"--compress {text!r}: give exactly one of {', '.join(_ALLOWED[method])}")
    rank = opts.get("rank")
    if rank is not None and not (rank.is_integer() and 1 <= rank <= MAX_RANK):
        raise ConfigError(f"--compress {text!r}: rank must be a positive integer of at most {MAX_RANK}")
    ratio = opts.get("ratio")
    if ratio is not None and ratio > MAX_RATIO:
        raise ConfigError(f"--compress {text!r}: ratio must be at most {MAX_RATIO:g}")
    c = Compression(method, **{k: (int(v) if k == "rank" else v) for k, v in opts.items()})  # type: ignore[arg-type]
    if c.rank is not None and (c.rank < 1 or c.rank != opts.get("rank")):
        raise ConfigError(f"--compress {text!r}: rank must be a positive integer")
    if c.energy is not None and not 0 < c.energy <= 1:
        raise ConfigError(f"--compress {text!r}: energy must be in (0, 1]")
    if c.density is not None and not 0 < c.density < 1:
        raise ConfigError(f"--compress {text!r}: density must be in (0, 1)")
    if c.ratio is not None and not c.ratio > 1:
        raise ConfigError(f"--compress {text!r}: ratio must be above 1")
    return c


def part_name(name: str, part: str) -> str:
    """The stored name of one part of a compressed tensor."""
    return f"{name}{SEP}{part}"


PartSpec = tuple[DType, tuple[int, ...]]


def _nbytes(parts: dict[str, PartSpec]) -> int:
    return sum(dt.itemsize * math.prod(shape) for dt, shape in parts.values())


def lowrank_parts(m: int, n: int, rank: int, dtype: DType) -> dict[str, PartSpec]:
    """Parts of a rank-``rank`` factorisation."""
    return {"a": (dtype, (m, rank)), "b": (dtype, (rank, n))}


def sparse_parts(m: int, n: int, k: int, dtype: DType) -> dict[str, PartSpec]:
    """Parts of ``k`` kept entries in compressed-sparse-row form."""
    return {"indptr": (I64, (m + 1,)), "indices": (U16 if n <= 2**16 else I32, (k,)), "values": (dtype, (k,))}


def layout(spec: Compression, shape: tuple[int, ...], dtype: DType, *, rank: int | None = None) -> dict[str, PartSpec]:
    """The parts storing a tensor of ``shape`` under ``spec`` ({} when stored dense).

    A tensor stays dense when it is not 2-D or when the compressed form would not be
    smaller. ``rank`` is the rank found for a ``lowrank:energy`` spec.
    """
    if len(shape) != 2 or 0 in shape:
        return {}
    m, n = shape
    dense = m * n * dtype.itemsize
    parts: dict[str, PartSpec]
    if spec.method == "lowrank":
        if spec.rank is not None:
            r = spec.rank
        elif spec.ratio is not None:
            r = int(m * n / (spec.ratio * (m + n)))
        elif rank is not None:
            r = rank
        else:
            raise ValueError("lowrank:energy needs the rank found for the tensor")
        r = min(r, m, n)
        if r < 1:
            return {}
        parts = lowrank_parts(m, n, r, dtype)
    elif spec.method == "sparse":
        entry = (2 if n <= 2**16 else 4) + dtype.itemsize
        if spec.density is not None:
            k = max(1, round(spec.density * m * n))
        else:
            assert spec.ratio is not None
            k = int((dense / spec.ratio - 8 * (m + 1)) // entry)
        if k < 1:
            return {}
        parts = sparse_parts(m, n, min(k, m * n), dtype)
    elif spec.method == "int8":
        parts = {"q": (I8, (m, n)), "scale": (F32, (m,))}
    elif spec.method == "sign":
        parts = {"bits": (U8, ((m * n + 7) // 8,)), "scale": (F32, (1,))}
    else:
        raise ConfigError(f"unknown compression method {spec.method!r}")
    return parts if _nbytes(parts) < dense else {}


# ---------------------------------------------------------------- decoding


@dataclass(frozen=True)
class Packed:
    """A diff tensor held in a form other than dense values.

    Attributes:
        method: ``lowrank``, ``sparse``, ``int8``, ``sign``, or ``zero`` (all zeros).
        shape: the dense tensor's shape, ``(m, n)``.
        parts: each part as a stored tensor (an ``Operand``) or an array in memory (a LoRA's factors).
        scale: lowrank: a factor applied to ``a @ b`` (a LoRA's ``alpha / r``).
    """

    method: str
    shape: tuple[int, ...]
    parts: dict[str, Any] = field(default_factory=dict)
    scale: float = 1.0


def _part(p: Packed, name: str, start: int, count: int) -> np.ndarray:
    """Elements ``[start, start + count)`` of a part, as its storage dtype (a fresh array)."""
    src = p.parts[name]
    if isinstance(src, np.ndarray):
        return src.reshape(-1)[start : start + count]
    raw = np.empty(count * src.info.dtype.itemsize, dtype=np.uint8)
    return src.ckpt.read(src.info, start, count, raw)


def _as_float(x: np.ndarray, dtype: DType | None, out_dtype: np.dtype[Any]) -> np.ndarray:
    if dtype is BF16:
        return (x.astype(np.uint32) << 16).view(np.float32).astype(out_dtype, copy=False)
    return x.astype(out_dtype, copy=False)


def _part_dtype(p: Packed, name: str) -> DType | None:
    src = p.parts[name]
    return None if isinstance(src, np.ndarray) else src.info.dtype


def _whole(p: Packed, name: str, ct: np.dtype[Any], cache: dict[Any, Any]) -> np.ndarray:
    """A whole (small) part widened to ``ct``, kept in the caller's one-entry cache."""
    key = (id(p), name, ct.str)
    got = cache.get(key)
    if got is None:
        src = p.parts[name]
        shape = src.shape if isinstance(src, np.ndarray) else src.info.shape
        got = _as_float(_part(p, name, 0, math.prod(shape)), _part_dtype(p, name), ct).reshape(shape)
        cache.clear()
        cache[key] = got
    return got


def decode(p: Packed, start: int, count: int, out: np.ndarray, cache: dict[Any, Any]) -> np.ndarray:
    """Write elements ``[start, start + count)`` of the dense tensor into ``out`` (float32/64).

    ``cache`` is the caller's (one per thread) and keeps the last lowrank ``b`` between calls.
    """
    ct = out.dtype
    if p.method == "zero":
        out.fill(0)
        return out
    n = p.shape[1]
    r0, r1 = start // n, -(-(start + count) // n)
    skip = start - r0 * n
    if p.method == "lowrank":
        b = _whole(p, "b", ct, cache)
        rank = b.shape[0]
        a = _as_float(_part(p, "a", r0 * rank, (r1 - r0) * rank), _part_dtype(p, "a"), ct)
        _lowrank_rows(a.reshape(r1 - r0, rank), b, skip, count, out)
        if p.scale != 1.0:
            np.multiply(out, ct.type(p.scale), out=out)
    elif p.method == "int8":
        q = _part(p, "q", start, count)
        scale = _part(p, "scale", r0, r1 - r0)
        rows = np.arange(start, start + count, dtype=np.int64) // n - r0
        np.multiply(q, scale[rows], out=out, casting="unsafe")
    elif p.method == "sign":
        mag = float(_part(p, "scale", 0, 1)[0])
        lo = start // 8
        raw = _part(p, "bits", lo, (start + count + 7) // 8 - lo)
        bits = np.unpackbits(raw, bitorder="little")[start - 8 * lo : start - 8 * lo + count]
        np.multiply(bits, ct.type(2 * mag), out=out, casting="unsafe")
        np.subtract(out, ct.type(mag), out=out)
    elif p.method == "sparse":
        ptr = _part(p, "indptr", r0, r1 - r0 + 1)
        e0, e1 = int(ptr[0]), int(ptr[-1])
        out.fill(0)
        if e1 > e0:
            cols = _part(p, "indices", e0, e1 - e0).astype(np.int64)
            vals = _as_float(_part(p, "values", e0, e1 - e0), _part_dtype(p, "values"), ct)
            rows = np.repeat(np.arange(r0, r1, dtype=np.int64), np.diff(ptr))
            pos = rows * n + cols - start
            keep = (pos >= 0) & (pos < count)
            out[pos[keep]] = vals[keep]
    else:
        raise ValueError(f"unknown packed method {p.method!r}")
    return out


# Elements of a row block of ``a @ b`` computed at once: two such blocks (the sum and one
# product) stay in a core's L2 cache while the rank loop runs over them.
_BLOCK_ELEMENTS = 1 << 16


def _lowrank_rows(a: np.ndarray, b: np.ndarray, skip: int, count: int, out: np.ndarray) -> None:
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


def packed_nbytes(p: Packed) -> int:
    """Bytes the parts take."""
    return sum(src.nbytes if isinstance(src, np.ndarray) else src.info.nbytes for src in p.parts.values())
