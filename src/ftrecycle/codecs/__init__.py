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
``sign``          ``bits`` (ceil(mn/8),) uint8, ``scale``     ``+scale`` if bit ``i*n+j`` is set
                  (1,) float32                                (little-endian in its byte) else
                                                              ``-scale``
================  ==========================================  ==================================

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
from typing import Any

import numpy as np

from ftrecycle.codecs import int8, lowrank, sign, sparse
from ftrecycle.codecs.base import (
    SEP,
    Codec,
    Compression,
    Encoded,
    Job,
    Packed,
    PartSpec,
    Reader,
    Writer,
    part_name,
)
from ftrecycle.codecs.lowrank import energy_rank
from ftrecycle.dtypes import DType
from ftrecycle.errors import ConfigError

__all__ = [
    "CODECS",
    "MAX_RANK",
    "MAX_RATIO",
    "METHODS",
    "SEP",
    "Codec",
    "Compression",
    "Encoded",
    "Job",
    "Packed",
    "PartSpec",
    "Reader",
    "Writer",
    "decode",
    "encode",
    "energy_rank",
    "layout",
    "packed_nbytes",
    "parse_compression",
    "part_name",
    "state_bytes",
]

#: The compression methods, by name.
CODECS: dict[str, Codec] = {c.name: c for c in (lowrank.CODEC, sparse.CODEC, int8.CODEC, sign.CODEC)}
METHODS = tuple(CODECS)

#: the largest lowrank rank and compression ratio a spec may ask (beyond them a number is a typo)
MAX_RANK = 2**20
MAX_RATIO = 1e6


def _options(text: str, method: str, rest: str) -> dict[str, float]:
    """The ``key=value`` parameters of a spec, each allowed for its method, given once, finite."""
    allowed = CODECS[method].params
    opts: dict[str, float] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            names = ", ".join(f"{k}=" for k in allowed) or "no parameters"
            raise ConfigError(f"--compress {text!r:.80}: {method} takes {names}")
        if key in opts:
            raise ConfigError(f"--compress {text!r:.80}: {key} is given twice; give it once")
        try:
            opts[key] = float(value)
        except ValueError as e:
            raise ConfigError(f"--compress {text!r:.80}: {key} must be a number") from e
        if not math.isfinite(opts[key]):
            raise ConfigError(f"--compress {text!r:.80}: {key} must be a finite number")
    if allowed and len(opts) != 1:
        raise ConfigError(f"--compress {text!r:.80}: give exactly one of {', '.join(allowed)}")
    return opts


def parse_compression(text: str | Compression | None) -> Compression | None:
    """Parse ``lowrank:rank=64``, ``lowrank:energy=0.9``, ``lowrank:ratio=16``, ``sparse:density=0.05``,
    ``sparse:ratio=16``, ``int8``, ``sign`` or ``none``.

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
    if method not in CODECS:
        raise ConfigError(f"--compress {text!r:.80}: unknown method {method!r:.40}; choose one of {', '.join(METHODS)}")
    opts = _options(text, method, rest)
    rank = opts.get("rank")
    if rank is not None and not (rank.is_integer() and 1 <= rank <= MAX_RANK):
        raise ConfigError(f"--compress {text!r:.80}: rank must be a positive integer of at most {MAX_RANK}")
    ratio = opts.get("ratio")
    if ratio is not None and ratio > MAX_RATIO:
        raise ConfigError(f"--compress {text!r:.80}: ratio must be at most {MAX_RATIO:g}")
    c = Compression(method, **{k: (int(v) if k == "rank" else v) for k, v in opts.items()})  # type: ignore[arg-type]
    if c.rank is not None and (c.rank < 1 or c.rank != opts.get("rank")):
        raise ConfigError(f"--compress {text!r:.80}: rank must be a positive integer")
    if c.energy is not None and not 0 < c.energy <= 1:
        raise ConfigError(f"--compress {text!r:.80}: energy must be in (0, 1]")
    if c.density is not None and not 0 < c.density < 1:
        raise ConfigError(f"--compress {text!r:.80}: density must be in (0, 1)")
    if c.ratio is not None and not c.ratio > 1:
        raise ConfigError(f"--compress {text!r:.80}: ratio must be above 1")
    return c


def _nbytes(parts: dict[str, PartSpec]) -> int:
    return sum(dt.itemsize * math.prod(shape) for dt, shape in parts.values())


def layout(spec: Compression, shape: tuple[int, ...], dtype: DType, *, rank: int | None = None) -> dict[str, PartSpec]:
    """The parts storing a tensor of ``shape`` under ``spec`` ({} when stored dense).

    A tensor stays dense when it is not 2-D or when the compressed form would not be
    smaller.

    Args:
        spec: the setting.
        shape: the tensor's shape.
        dtype: the delta's dtype (of the float parts).
        rank: the rank found for a ``lowrank:energy`` spec.

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
    parts = codec.layout(spec, m, n, dtype, rank)
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
    *,
    rank: int | None = None,
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
        rank: the rank found for a ``lowrank:energy`` spec.

    Returns:
        The diff's norm and the relative error of what was stored.
    """
    parts = layout(spec, shape, dtype, rank=rank)
    return CODECS[spec.method].encode(Job(read, write, name, shape, parts, dtype, ct, block))


def state_bytes(method: str, shape: tuple[int, int], rank: int, itemsize: int, block: int) -> int:
    """Bytes an encoder holds for one tensor, beyond the reader's buffers (an upper estimate)."""
    return CODECS[method].state_bytes(shape, rank, itemsize, block)


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
