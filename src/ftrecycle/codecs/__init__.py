"""Compressed diff tensors: a registry of codecs, the specs users give, and decoding by element range.

A compressed 2-D tensor of shape ``(m, n)`` is stored as *parts*, safetensors tensors
named ``{name}::{part}``. Each method is one module holding its encoder and decoder, with
its formula and paper reference:

================  ==========================================  ==================================
method (module)   parts                                       value of element ``(i, j)``
================  ==========================================  ==================================
``lowrank``       ``a`` (m, r), ``b`` (r, n)                  ``sum_k a[i, k] * b[k, j]``
``sparse``        ``indptr`` (m+1,) int64, ``indices`` (k,)   ``values[e]`` where row ``i``'s
                  uint16/int32 columns, ``values`` (k,)       entries ``e`` name column ``j``; else 0
``int8``          ``q`` (m, n) int8, ``scale`` (m,) float32   ``q[i, j] * scale[i]``
``sign``          ``bits`` (ceil(mn/8),) uint8, ``scale``     ``+s`` if bit ``i*n+j`` is set
                  float32: (1,) per matrix, (m, 1) per row,   (little-endian in its byte) else
                  (1, n) per column (``axis=row|col``)        ``-s``; ``s`` the scale of the
                                                              matrix, row ``i`` or column ``j``
``kbit``          ``q`` (ceil(mn/8), K) uint8 bit planes,     ``(c_ij - (2^K-1)/2) * scale[i,
                  ``scale`` (m, ceil(n/G)) bfloat16           j // g]``, ``c_ij`` the K-bit code
                  (``bits=K`` in 2..8, ``group=G``)           (bit b: bit ``e % 8`` of ``q[e //
                                                              8, b]``, ``e = i*n+j``),
                                                              ``g = ceil(n / ceil(n/G))``
``lossless``      ``data`` (nbytes,) uint8, ``offsets``       element ``i*n+j - f*F`` of frame
                  (frames+1,) int64, ``dtype`` (0,) of the    ``f = (i*n+j) // F`` (``F = 2**16``
                  values' dtype                               elements): ``data[offsets[f]:
                                                              offsets[f+1]]``: one Zstandard
                                                              frame per byte plane, regrouped;
                                                              exact
``mpsvd``         ``qa`` (m, c), ``qb`` (n, c) uint8: codes   ``sum_k a[i, k] * b[k, j]`` over
                  packed at ``widths`` (r,) uint8 bits each,  ``w_k > 0``, ``a[i, k] = (q - 2^(w_k
                  ``sa``, ``sb`` (r,) float32 steps           - 1) + 1/2) * sa[k]`` (``q``: row
                                                              ``i``'s k-th code), ``b`` alike
``signlr``        ``bits`` (ceil(mn/8),) uint8, ``scale``     ``sum_k a[i, k] * b[k, j]`` plus
                  (m,) float32, ``a`` (m, r), ``b`` (r, n)    ``+scale[i]`` if bit ``i*n+j`` is
                                                              set, else ``-scale[i]``
``auto`` (auto)   those of the method chosen for the tensor   as that method decodes it
================  ==========================================  ==================================

``auto:ratio=R`` and ``auto:bits=B`` (:mod:`ftrecycle.codecs.auto`) are a size budget, not a
method: each 2-D tensor gets one of the settings above (or stays dense), chosen by
rate–distortion across the model's tensors (:func:`measure`, then :func:`auto.allocate`).

Decoding works on any flat element range, so the transfer engine streams a
compressed delta exactly as it streams a dense one: only the rows under the range
(and, for ``lowrank``, the small ``b``) are read.

Every encoder reads the dense diff through ``read(start, count)`` (flat element ranges,
in the compute dtype), writes its parts through ``write(part, start, values)`` at element
offsets, and returns the diff's norm and the relative error of what was stored
(``||d - decoded|| / ||d||``, measured against the stored, rounded parts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ftrecycle.codecs import auto, int8, kbit, lossless, lowrank, mpsvd, sign, signlr, sparse
from ftrecycle.codecs.auto import AUTO, Candidate
from ftrecycle.codecs.base import (
    SEP,
    Codec,
    Compression,
    Encoded,
    Job,
    Packed,
    PartSpec,
    Probe,
    Reader,
    Writer,
    part_name,
)
from ftrecycle.codecs.lowrank import energy_rank
from ftrecycle.dtypes import DType
from ftrecycle.errors import ConfigError, MemoryBudgetError, NonFiniteError

__all__ = [
    "AUTO",
    "AUTO_MENU",
    "CODECS",
    "MAX_RANK",
    "MAX_RATIO",
    "METHODS",
    "SEP",
    "Candidate",
    "Codec",
    "Compression",
    "Encoded",
    "Job",
    "Packed",
    "PartSpec",
    "Probe",
    "Reader",
    "Writer",
    "decode",
    "encode",
    "energy_rank",
    "gains_per_row",
    "layout",
    "measure",
    "needs_first_pass",
    "packed_nbytes",
    "parse_compression",
    "part_name",
    "resolve",
    "state_bytes",
]

#: The compression methods, by name.
CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        lowrank.CODEC,
        sparse.CODEC,
        int8.CODEC,
        sign.CODEC,
        kbit.CODEC,
        mpsvd.CODEC,
        signlr.CODEC,
        lossless.CODEC,
    )
}
METHODS = tuple(CODECS)

#: the largest lowrank rank and compression ratio a spec may ask (beyond them a number is a typo)
MAX_RANK = 2**20
MAX_RATIO = 1e6


#: parameters whose values are whole numbers, and those whose values are words
INT_PARAMS = frozenset({"rank", "group"})
WORD_PARAMS: dict[str, tuple[str, ...]] = {"axis": ("row", "col")}


def _value(text: str, key: str, value: str) -> float | str:
    """One parameter's value: a finite number, or one of the words the parameter takes."""
    if key in WORD_PARAMS:
        if value not in WORD_PARAMS[key]:
            raise ConfigError(f"--compress {text!r:.80}: {key} must be one of {', '.join(WORD_PARAMS[key])}")
        return value
    try:
        number = float(value)
    except ValueError as e:
        raise ConfigError(f"--compress {text!r:.80}: {key} must be a number") from e
    if not math.isfinite(number):
        raise ConfigError(f"--compress {text!r:.80}: {key} must be a finite number")
    if key in INT_PARAMS and not (number.is_integer() and 1 <= number <= MAX_RANK):
        raise ConfigError(f"--compress {text!r:.80}: {key} must be a positive integer of at most {MAX_RANK}")
    return int(number) if key in INT_PARAMS else number


def _takes(method: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A method's parameters (exactly one of them when any) and its optional ones."""
    if method == AUTO:
        return auto.PARAMS, ()
    return CODECS[method].params, CODECS[method].extra


def _options(text: str, method: str, rest: str) -> dict[str, float | str]:
    """The ``key=value`` parameters of a spec, each allowed for its method, given once, valid.

    Exactly one of the method's ``params`` (when it has any), any of its ``extra`` ones.
    """
    params, extra = _takes(method)
    allowed = params + extra
    opts: dict[str, float | str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            names = ", ".join(f"{k}=" for k in allowed) or "no parameters"
            raise ConfigError(f"--compress {text!r:.80}: {method} takes {names}")
        if key in opts:
            raise ConfigError(f"--compress {text!r:.80}: {key} is given twice; give it once")
        opts[key] = _value(text, key, value)
    if params and sum(k in opts for k in params) != 1:
        raise ConfigError(f"--compress {text!r:.80}: give exactly one of {', '.join(params)}")
    return opts


def parse_compression(text: str | Compression | None) -> Compression | None:
    """Parse a ``--compress`` spec: ``METHOD`` or ``METHOD:key=value,...`` (see :data:`METHODS`
    and each codec's module), or ``none``.

    Examples: ``lowrank:rank=64``, ``lowrank:energy=0.9``, ``lowrank:ratio=16``,
    ``sparse:density=0.05``, ``int8``, ``sign``, ``sign:axis=row``, ``kbit:bits=3,group=128``,
    ``mpsvd:ratio=16``, ``mpsvd:bits=1``, ``signlr:rank=16``, ``signlr:ratio=8``; the budgets
    ``auto:ratio=8`` and ``auto:bits=2`` (:mod:`ftrecycle.codecs.auto`).

    Args:
        text: the spec, a parsed one (returned as is), or None.

    Returns:
        The setting, or None for ``none``/None (store dense).

    Raises:
        ConfigError: an unknown method, a missing or extra parameter, or a value out of range.
    """
    if text is None or isinstance(text, Compression):
        return text
    method, _, rest = text.strip().partition(":")
    if method == "none" and not rest:
        return None
    if method not in CODECS and method != AUTO:
        raise ConfigError(
            f"--compress {text!r:.80}: unknown method {method!r:.40}; choose one of {', '.join(METHODS)} or {AUTO}"
        )
    opts = _options(text, method, rest)
    ratio = opts.get("ratio")
    if isinstance(ratio, float) and not 1 < ratio <= MAX_RATIO:
        raise ConfigError(f"--compress {text!r:.80}: ratio must be above 1 and at most {MAX_RATIO:g}")
    c = Compression(method, **opts)  # type: ignore[arg-type]
    if c.energy is not None and not 0 < c.energy <= 1:
        raise ConfigError(f"--compress {text!r:.80}: energy must be in (0, 1]")
    if c.density is not None and not 0 < c.density < 1:
        raise ConfigError(f"--compress {text!r:.80}: density must be in (0, 1)")
    if c.bits is not None and not 0 < c.bits <= 32:
        raise ConfigError(f"--compress {text!r:.80}: bits must be in (0, 32]")
    check = CODECS[method].check if method != AUTO else None
    if check is not None:
        check(c)
    return c


def _nbytes(parts: dict[str, PartSpec]) -> int:
    return sum(dt.itemsize * math.prod(shape) for dt, shape in parts.values())


def layout(spec: Compression, shape: tuple[int, ...], dtype: DType) -> dict[str, PartSpec]:
    """The parts storing a tensor of ``shape`` under ``spec`` ({} when stored dense).

    A tensor stays dense when it is not 2-D or when the compressed form would not be
    smaller.

    Args:
        spec: the setting, as :func:`resolve` gave it for this tensor.
        shape: the tensor's shape.
        dtype: the delta's dtype (of the float parts).

    Returns:
        Part name -> (dtype, shape).

    Raises:
        ConfigError: an unknown method.
    """
    if len(shape) != 2 or 0 in shape:
        return {}
    codec = CODECS.get(spec.method)
    if codec is None:
        raise ConfigError(f"unknown compression method {spec.method!r}")
    m, n = shape
    parts = codec.layout(spec, m, n, dtype)
    return parts if parts and _nbytes(parts) < m * n * dtype.itemsize else {}


def encode(
    spec: Compression,
    read: Reader,
    write: Writer,
    name: str,
    shape: tuple[int, int],
    dtype: DType,
    ct: np.dtype[Any],
    block: int,
) -> Encoded:
    """Compress one diff tensor laid out by :func:`layout` (non-empty), streaming its rows.

    Args:
        spec: the setting.
        read: the dense diff, by flat element range, in ``ct``.
        write: where each part's values go.
        name: the tensor's name.
        shape: (m, n).
        dtype: the delta's dtype.
        ct: the compute dtype.
        block: elements per row block (memory is a few blocks plus the result).

    Returns:
        The diff's norm and the relative error of what was stored.
    """
    parts = layout(spec, shape, dtype)
    return CODECS[spec.method].encode(Job(read, write, name, shape, parts, dtype, ct, block))


def state_bytes(method: str, parts: dict[str, PartSpec], shape: tuple[int, int], itemsize: int, block: int) -> int:
    """Bytes an encoder holds for one tensor laid out as ``parts``, beyond the reader's buffers (an upper estimate)."""
    return CODECS[method].state_bytes(parts, shape, itemsize, block)


def resolve(spec: Compression, probe: Probe) -> Compression | None:
    """The setting of one tensor: its codec's first pass (``resolve``) where it has one, else ``spec``.

    Args:
        spec: the user's setting.
        probe: the tensor.

    Returns:
        The tensor's concrete setting, or None to store it dense.

    Raises:
        ConfigError: ``spec`` is a budget (``auto``), which is allocated across tensors, not resolved
            one at a time (:func:`measure`, then :func:`auto.allocate`).
    """
    if spec.method == AUTO:
        raise ConfigError(f"--compress {spec}: a budget is allocated across the tensors, not per tensor")
    first = CODECS[spec.method].resolve
    return spec if first is None else first(spec, probe)


def gains_per_row(method: str, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether calibration trains one gain per row of a tensor stored by ``method`` with parts of
    ``shapes`` (else one per matrix); see :attr:`Codec.row_gain`."""
    rg = CODECS[method].row_gain
    return rg(shapes) if callable(rg) else rg


def needs_first_pass(spec: Compression) -> bool:
    """Whether the settings of the tensors need a pass over them before the layout is planned
    (a codec's :func:`resolve`, or a budget's :func:`measure`)."""
    return spec.method == AUTO or CODECS[spec.method].resolve is not None


def decode(p: Packed, start: int, count: int, out: np.ndarray, cache: dict[Any, Any]) -> np.ndarray:
    """Write elements ``[start, start + count)`` of the dense tensor into ``out`` (float32/64).

    Args:
        p: the packed tensor (``zero``: all zeros).
        start: the first element, in row-major order.
        count: how many.
        out: where they go.
        cache: the caller's (one per thread); keeps the last lowrank ``b`` between calls.

    Returns:
        ``out``.

    Raises:
        ValueError: an unknown method.
    """
    if p.method == "zero":
        out.fill(0)
        return out
    codec = CODECS.get(p.method)
    if codec is None:
        raise ValueError(f"unknown packed method {p.method!r}")
    return codec.decode(p, start, count, out, cache)


def packed_nbytes(p: Packed) -> int:
    """Bytes the parts take."""
    return sum(src.nbytes if isinstance(src, np.ndarray) else src.info.nbytes for src in p.parts.values())


# ---------------------------------------------------------------- the budget's menu, measured

#: The settings ``auto`` chooses from: :data:`auto.MENU`'s entries whose method is registered and
#: takes every parameter they give (so a codec merged later joins the menu by its name).
AUTO_MENU: tuple[Compression, ...] = tuple(
    c
    for c in (
        parse_compression(t)
        for t in auto.MENU
        if auto.available(t, {name: codec.params + codec.extra for name, codec in CODECS.items()})
    )
    if c is not None
)


def _sample(probe: Probe, rows: int) -> np.ndarray:
    """The rows of :func:`auto.sample_blocks` as one (rows, n) array in the compute dtype."""
    m, n = probe.shape
    out = np.empty((rows, n), dtype=probe.ct)
    at = 0
    for r0, r1 in auto.sample_blocks(m, rows):
        out[at : at + r1 - r0] = probe.read(r0 * n, (r1 - r0) * n).reshape(r1 - r0, n)
        at += r1 - r0
    return out


def _discard(part: str, start: int, values: np.ndarray) -> None:
    """A writer that keeps nothing: a candidate is encoded for the error it measures."""


def _on_rows(spec: Compression, parts: dict[str, PartSpec], probe: Probe, sample: np.ndarray) -> float | None:
    """The squared error of ``spec`` (laid out as ``parts`` on the whole tensor) over the whole
    tensor, estimated from ``sample``: None where it cannot be measured there (a low-rank rank too
    large for the sample, a setting no spec fixes on a sample, an encoder beyond the probe's
    memory, a variable-size setting)."""
    m, n = probe.shape
    rows = sample.shape[0]
    rank = auto.rank_of(parts)
    if rank is not None and rows < m and auto.LOWRANK_ROWS * rank > rows:
        return None
    on = auto.on_sample(spec, parts, m, n)
    if on is None and rows < m:
        return None
    on = spec if on is None else on
    flat = sample.reshape(-1)

    def read(start: int, count: int) -> np.ndarray:
        return flat[start : start + count].copy()

    sub = Probe(read, probe.name, (rows, n), probe.dtype, probe.ct, probe.block, probe.memory)
    codec = CODECS[on.method]
    if codec.resolve is not None and codec.resolve(on, sub) != on:
        return None  # its size is known only after a pass over the whole tensor
    sparts = codec.layout(on, rows, n, probe.dtype)
    need = sample.nbytes + codec.state_bytes(sparts, (rows, n), probe.ct.itemsize, max(probe.block, n))
    if not sparts or need > probe.memory:
        return None
    found = codec.encode(Job(read, _discard, probe.name, (rows, n), sparts, probe.dtype, probe.ct, probe.block))
    if not math.isfinite(found.norm) or not math.isfinite(found.error):
        raise NonFiniteError(f"tensor {probe.name!r}: the diff holds NaN or infinity; check the inputs")
    return (found.error * found.norm) ** 2 * (m / rows)


def measure(probe: Probe, menu: Sequence[Compression] = AUTO_MENU) -> list[Candidate]:
    """The candidates of one tensor for a budget: dense, and each setting of ``menu`` that makes it
    smaller, with its bytes and its squared error estimated on a row sample (see :mod:`auto`).

    Args:
        probe: the tensor (``memory``: what the sample and one encoder may hold).
        menu: the settings to try.

    Returns:
        Dense first (error 0), then the menu's settings in order (those that could be measured).

    Raises:
        MemoryBudgetError: even the smallest sample does not fit the probe's memory.
        NonFiniteError: the diff holds NaN or infinity.
    """
    m, n = probe.shape
    full = [(c, layout(c, (m, n), probe.dtype)) for c in menu]
    full = [(c, p) for c, p in full if p]
    ranks = sorted(r for _, p in full if (r := auto.rank_of(p)) is not None)
    whole = any(auto.on_sample(c, p, m, n) is None for c, p in full)
    # the sample never shrinks to fit the memory: what the budget chooses may not depend on --max-memory
    rows = auto.sample_rows(m, n, ranks, whole)
    if 2 * rows * n * probe.ct.itemsize > probe.memory:
        raise MemoryBudgetError(
            f"measuring tensor {probe.name!r} for --compress auto needs about "
            f"{math.ceil(2 * rows * n * probe.ct.itemsize / 2**20)} MiB per thread; "
            "raise --max-memory or lower --threads"
        )
    sample = _sample(probe, rows)
    out = [Candidate(None, m * n * probe.dtype.itemsize, 0.0)]
    for spec, parts in full:
        err = _on_rows(spec, parts, probe, sample)
        if err is not None:
            out.append(Candidate(spec, _nbytes(parts), err))
    return out
