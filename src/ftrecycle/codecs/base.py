"""What every codec shares: the ``--compress`` setting, a packed tensor, part names, and the
streaming helpers its encoder and decoder are written with.

A codec (one module per method, registered in :mod:`ftrecycle.codecs`) is a :class:`Codec`:
the spec parameters it takes, the parts it stores, and four functions — ``layout`` (the
parts for a matrix), ``encode`` (streamed by row blocks through a :data:`Reader` and a
:data:`Writer`), ``decode`` (any flat element range) and ``state_bytes`` (the encoder's memory).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ftrecycle.dtypes import BF16, FLOAT_DTYPES, DType, bf16_to_float32, from_storage, to_storage
from ftrecycle.io.safetensors_format import TensorInfo

SEP = "::"

#: A part's storage dtype and shape.
PartSpec = tuple[DType, tuple[int, ...]]
#: ``read(start, count)``: elements of the dense diff, in the compute dtype.
Reader = Callable[[int, int], np.ndarray]
#: ``write(part, start, values)``: values of a part at an element offset.
Writer = Callable[[str, int, np.ndarray], None]
#: Part name -> the dtypes and the shape a stored part may have.
Expected = dict[str, tuple[frozenset[DType], tuple[int, ...]]]


@dataclass(frozen=True)
class Compression:
    """A ``--compress`` setting.

    A user's spec names a method and its parameters; the first pass over a tensor (a codec's
    ``resolve``) may turn it into the concrete setting of that one tensor (``lowrank:energy``
    -> the rank found; ``auto`` -> the method and parameters chosen; a variable-size codec ->
    ``nbytes``).

    Attributes:
        method: a registered method (see :data:`ftrecycle.codecs.METHODS`).
        rank: lowrank (and methods with a low-rank part): the rank of every matrix.
        energy: lowrank: the smallest rank keeping this fraction of each matrix's squared norm.
        ratio: the setting that makes each matrix this many times smaller than it is dense in
            the delta's dtype.
        density: sparse: the fraction of entries kept (largest magnitudes).
        bits: bits per stored value (quantizing methods), or per parameter on average (budgets).
        group: quantizing methods: values sharing one scale.
        axis: sign: ``row`` or ``col``, one scale per row or column (default: one per matrix).
        nbytes: found by a first pass, not given by users: the bytes a variable-size part takes.
    """

    method: str
    rank: int | None = None
    energy: float | None = None
    ratio: float | None = None
    density: float | None = None
    bits: float | None = None
    group: int | None = None
    axis: str | None = None
    nbytes: int | None = None

    def __str__(self) -> str:
        opts = [f"{k}={v:g}" if isinstance(v, float | int) else f"{k}={v}" for k, v in self.options().items()]
        return self.method + (":" + ",".join(opts) if opts else "")

    def options(self) -> dict[str, float | str]:
        """The parameters that are set (``nbytes`` included)."""
        found = {
            "rank": self.rank,
            "energy": self.energy,
            "ratio": self.ratio,
            "density": self.density,
            "bits": self.bits,
            "group": self.group,
            "axis": self.axis,
            "nbytes": self.nbytes,
        }
        return {k: v for k, v in found.items() if v is not None}


@dataclass(frozen=True)
class Probe:
    """One tensor as a codec's first pass (``resolve``) sees it.

    Attributes:
        read: the dense diff, by flat element range, in ``ct``.
        name: the tensor's name.
        shape: (m, n).
        dtype: the delta's dtype (of the float parts).
        ct: the compute dtype.
        block: elements per row block.
        memory: bytes the first pass may hold for this tensor (beyond the reader's buffers).
    """

    read: Reader
    name: str
    shape: tuple[int, int]
    dtype: DType
    ct: np.dtype[Any]
    block: int
    memory: int


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


@dataclass
class Encoded:
    """What one encoder measured.

    Attributes:
        norm: the diff's Frobenius norm.
        error: ``||d - decoded|| / ||d||``, measured against the stored, rounded parts.
        rank: lowrank: the rank stored.
        kept: sparse: the entries stored.
    """

    norm: float
    error: float
    rank: int | None = None
    kept: int | None = None


@dataclass(frozen=True)
class Job:
    """One diff tensor to encode, laid out by :func:`ftrecycle.codecs.layout` (non-empty).

    Attributes:
        read: the dense diff, by flat element range, in ``ct``.
        write: where each part's values go.
        name: the tensor's name.
        shape: (m, n).
        parts: the parts to write, as laid out.
        dtype: the delta's dtype (of the float parts).
        ct: the compute dtype.
        block: elements per row block (memory is a few blocks plus the result).
    """

    read: Reader
    write: Writer
    name: str
    shape: tuple[int, int]
    parts: dict[str, PartSpec]
    dtype: DType
    ct: np.dtype[Any]
    block: int


@dataclass(frozen=True)
class Codec:
    """One compression method, as the registry holds it.

    Attributes:
        name: the method's name in ``--compress`` and in the manifest.
        params: the spec parameters it takes (exactly one of them when any).
        parts: the names of the parts it stores.
        layout: ``(spec, m, n, dtype) -> parts`` for an (m, n) matrix, {} when it cannot store
            one (the spec as :attr:`resolve` gave it for this tensor).
        encode: ``(job) -> Encoded``, the parts written through ``job.write``.
        decode: ``(packed, start, count, out, cache) -> out``, elements ``[start, start + count)``.
        state_bytes: ``(parts, shape, itemsize, block) -> bytes`` the encoder holds (an upper estimate).
        expect: ``(m, n, stored parts) -> Expected``: the dtypes and shape each stored part must
            have (the rank or entry count read from the parts themselves), checked before any read.
        extra: optional spec parameters, besides the one of ``params`` (``group``, ``axis``).
        check: ``(spec) -> None`` raising :class:`~ftrecycle.errors.ConfigError` on parameter
            values out of this method's range (the parser checks the common ones).
        resolve: ``(spec, probe) -> spec or None``: a first pass over one tensor before the
            layout is planned, giving its concrete setting (None: store it dense); absent: the
            spec applies as is.
        gain: ``(parts, g) -> changed parts``, for calibration: the stored parts (arrays in their
            storage dtypes, by part name) rescaled so that they decode to ``diag(g) @ D`` where they
            decoded to ``D`` (up to rounding the changed parts to their dtypes); ``g`` is float64,
            of shape (m,) when :attr:`row_gain`, else (1,) (one gain for the matrix). Absent: the
            codec has nothing to calibrate (``lossless``).
        row_gain: whether :attr:`gain` takes one gain per row (else one per matrix), or a function
            of the stored parts' shapes saying it (see :func:`ftrecycle.codecs.gains_per_row`).

    Decoding depends only on the stored parts (their dtypes, shapes and values), never on
    the manifest's spec: a codec's parameters are read back from its parts.
    """

    name: str
    params: tuple[str, ...]
    parts: frozenset[str]
    layout: Callable[[Compression, int, int, DType], dict[str, PartSpec]]
    encode: Callable[[Job], Encoded]
    decode: Callable[[Packed, int, int, np.ndarray, dict[Any, Any]], np.ndarray]
    state_bytes: Callable[[dict[str, PartSpec], tuple[int, int], int, int], int]
    expect: Callable[[int, int, dict[str, TensorInfo]], Expected]
    extra: tuple[str, ...] = ()
    check: Callable[[Compression], None] | None = None
    resolve: Callable[[Compression, Probe], Compression | None] | None = None
    gain: Callable[[dict[str, np.ndarray], np.ndarray], dict[str, np.ndarray]] | None = None
    row_gain: bool | Callable[[dict[str, tuple[int, ...]]], bool] = False


def part_name(name: str, part: str) -> str:
    """The stored name of one part of a compressed tensor."""
    return f"{name}{SEP}{part}"


# ---------------------------------------------------------------- encoding helpers


def blocks(m: int, n: int, block: int) -> Iterator[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` of an (m, n) matrix holding about ``block`` elements each."""
    rows = max(1, block // max(n, 1))
    for r0 in range(0, m, rows):
        yield r0, min(m, r0 + rows)


def rows_of(read: Reader, n: int, r0: int, r1: int) -> np.ndarray:
    """Rows ``[r0, r1)`` of the dense diff, as an (r1 - r0, n) array."""
    return read(r0 * n, (r1 - r0) * n).reshape(r1 - r0, n)


def measured(total: float, err: float, **extra: int) -> Encoded:
    """An :class:`Encoded` from the squared norm and the squared error."""
    norm = math.sqrt(total)
    return Encoded(norm, math.sqrt(err) / norm if norm else 0.0, **extra)


def row_block_bytes(itemsize: int, block: int) -> int:
    """Bytes of a row block of ``block`` elements, its products and index arrays (for ``state_bytes``)."""
    return 4 * block * itemsize + 16 * block


def squared(x: np.ndarray) -> float:
    """The sum of squares of ``x``, accumulated in float64."""
    return float(np.sum(np.square(x, dtype=np.float64)))


# ---------------------------------------------------------------- decoding helpers


def read_part(p: Packed, name: str, start: int, count: int) -> np.ndarray:
    """Elements ``[start, start + count)`` of a part, as its storage dtype (a fresh array)."""
    src = p.parts[name]
    if isinstance(src, np.ndarray):
        return src.reshape(-1)[start : start + count]
    raw = np.empty(count * src.info.dtype.itemsize, dtype=np.uint8)
    return src.ckpt.read(src.info, start, count, raw)


def as_float(x: np.ndarray, dtype: DType | None, out_dtype: np.dtype[Any]) -> np.ndarray:
    """Storage values of ``dtype`` (None: an in-memory array) widened to ``out_dtype``."""
    if dtype is BF16:
        return bf16_to_float32(x).astype(out_dtype, copy=False)
    return x.astype(out_dtype, copy=False)


def part_dtype(p: Packed, name: str) -> DType | None:
    """A stored part's dtype (None for an array in memory)."""
    src = p.parts[name]
    return None if isinstance(src, np.ndarray) else src.info.dtype


def float_part(p: Packed, name: str, start: int, count: int, ct: np.dtype[Any]) -> np.ndarray:
    """Elements of a float part widened to ``ct``."""
    return as_float(read_part(p, name, start, count), part_dtype(p, name), ct)


def whole(p: Packed, name: str, ct: np.dtype[Any], cache: dict[Any, Any]) -> np.ndarray:
    """A whole (small) part widened to ``ct``, kept in the caller's one-entry cache."""
    key = (id(p), name, ct.str)
    got = cache.get(key)
    if got is None:
        src = p.parts[name]
        shape = src.shape if isinstance(src, np.ndarray) else src.info.shape
        got = float_part(p, name, 0, math.prod(shape), ct).reshape(shape)
        cache.clear()
        cache[key] = got
    return got


def row_span(p: Packed, start: int, count: int) -> tuple[int, int, int]:
    """The rows ``[r0, r1)`` under elements ``[start, start + count)``, and the row length n."""
    n = p.shape[1]
    return start // n, -(-(start + count) // n), n


# ---------------------------------------------------------------- gain helpers (calibration)


def rescaled(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Float storage values ``x`` (uint16: bfloat16 bits) times ``factor`` (broadcast), rounded
    back to their dtype: the arithmetic of every codec's ``gain`` hook.

    Raises:
        ValueError: ``x`` is not a float part.
    """
    if x.dtype == np.uint16:
        dtype = BF16
    else:
        found = [d for d in FLOAT_DTYPES if d is not BF16 and d.storage == x.dtype]
        if not found:
            raise ValueError(f"a gain scales float parts, not {x.dtype}")
        dtype = found[0]
    return to_storage(from_storage(x, dtype, np.dtype(np.float64)) * factor, dtype)


def row_gains(g: np.ndarray, m: int) -> np.ndarray:
    """``g`` checked to hold one finite gain per row, as float64 (m,).

    Raises:
        ValueError: another shape, or a gain that is not finite.
    """
    g = np.asarray(g, dtype=np.float64)
    if g.shape != (m,) or not np.all(np.isfinite(g)):
        raise ValueError(f"a gain per row needs {m} finite values, got shape {g.shape}")
    return g
