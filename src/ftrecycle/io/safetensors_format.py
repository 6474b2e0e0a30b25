"""Read and write the safetensors file layout without loading tensors.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of
JSON naming each tensor's dtype, shape and ``[begin, end)`` byte range in the data
section, then the data section. ftrecycle parses the header itself so that it can
validate a shard completely (truncation, overlapping ranges) before any arithmetic,
and then read any element range of any tensor with one positioned read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ftrecycle.dtypes import BY_CODE, DType
from ftrecycle.errors import CheckpointError, os_reason, short
from ftrecycle.io.jsonfile import loads_json, open_regular

#: Headers larger than this are refused as corrupt (safetensors itself caps at 100 MB).
MAX_HEADER_BYTES = 100_000_000
#: Most dimensions a tensor may declare (torch allows 64 too).
MAX_RANK = 64
_USIZE_LIMIT = 1 << 64
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_FIX = "re-download or re-save this file"


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lies in one safetensors file.

    Attributes:
        name: the tensor's name in the checkpoint.
        dtype: its dtype.
        shape: its shape.
        path: the file holding it.
        offset: absolute byte offset of its first element in ``path``.
    """

    name: str
    dtype: DType
    shape: tuple[int, ...]
    path: Path
    offset: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the data in bytes."""
        return self.numel * self.dtype.itemsize


def read_header_length(fd: int, path: Path, size: int) -> int:
    """The header length a safetensors file declares, checked against the file size.

    Raises:
        CheckpointError: fewer than 8 bytes, or a length that is absurd or runs past the end of the file.
    """
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes); {_FIX}")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: corrupt safetensors header (declares {n} header bytes, more than the "
            f"{MAX_HEADER_BYTES} safetensors accepts); {_FIX}"
        )
    if n < 2 or n + 8 > size:
        raise CheckpointError(
            f"{path}: corrupt or truncated safetensors header (declares {n} header bytes, file has {size}); {_FIX}"
        )
    return int(n)


def count_entries(fd: int, n: int) -> int:
    """An upper bound on the tensors a header of ``n`` bytes declares, read 1 MiB at a time.

    Every entry has a ``"data_offsets"`` key, so counting that string bounds the entries
    (a name that contains it only makes the bound larger) without parsing the header.
    """
    key, step = b'"data_offsets"', 1 << 20
    count, at, tail = 0, 8, b""
    while at < 8 + n:
        chunk = tail + os.pread(fd, min(step, 8 + n - at), at)
        if len(chunk) == len(tail):
            break
        count += chunk.count(key)
        at += len(chunk) - len(tail)
        # keep a tail shorter than the key, so that a key cut by the chunk edge is counted once
        tail = chunk[-(len(key) - 1) :]
    return count


def _is_uint(value: object) -> bool:
    # bool is an int in Python but not in JSON; safetensors (serde usize) refuses it, so do we.
    return type(value) is int and 0 <= value < _USIZE_LIMIT


def _entry(path: Path, name: str, entry: object) -> tuple[DType, tuple[int, ...], int, int]:
    """Validate one tensor entry as safetensors' serde types do: dtype, shape: [usize], data_offsets: [usize; 2]."""
    where = f"{path}: corrupt safetensors header entry for tensor {short(name)}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where} (not an object); {_FIX}")
    # Unknown keys are ignored, as safetensors' serde types do.
    missing = sorted(_ENTRY_KEYS - set(entry))
    if missing:
        raise CheckpointError(f"{where} (no {', '.join(missing)}); {_FIX}")
    code = entry["dtype"]
    if not isinstance(code, str) or code not in BY_CODE:
        raise CheckpointError(f"{where} (dtype {short(code)} is not one of {', '.join(sorted(BY_CODE))}); {_FIX}")
    dims = entry["shape"]
    if not isinstance(dims, list) or len(dims) > MAX_RANK or not all(_is_uint(d) for d in dims):
        raise CheckpointError(
            f"{where} (shape {short(dims)} is not a list of at most {MAX_RANK} non-negative integers); {_FIX}"
        )
    offsets = entry["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(x) for x in offsets):
        raise CheckpointError(
            f"{where} (data_offsets {short(offsets)} is not [begin, end] of non-negative integers); {_FIX}"
        )
    dtype = BY_CODE[code]
    shape = tuple(dims)
    begin, end = offsets
    # Python integers do not overflow; the comparison with end (< 2**64) is safetensors' checked_mul.
    if end < begin or end - begin != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(
            f"{path}: tensor {short(name)} declares shape {list(shape)} of {code} "
            f"({math.prod(shape) * dtype.itemsize} bytes) but byte range [{begin}, {end}); {_FIX}"
        )
    return dtype, shape, begin, end


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors file's header, as strictly as the safetensors library.

    The file must be a regular file (a FIFO or device is refused without blocking);
    the header a UTF-8 JSON object of at most :data:`MAX_HEADER_BYTES` without duplicate
    names (nesting is bounded by the entry types); each entry a known dtype, a shape of
    non-negative integers and ``[begin, end]`` offsets that match it; the tensors must
    tile the data section exactly (no overlap, no gap, nothing after the last one) and
    ``__metadata__`` must map strings to strings.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        The tensors by name, in file order, and the ``__metadata__`` mapping.

    Raises:
        CheckpointError: the file is unreadable, not a regular file, truncated, or its header is corrupt.
    """
    fd = open_regular(path, what="safetensors file")
    try:
        size = os.fstat(fd).st_size
        n = read_header_length(fd, path, size)
        raw = bytearray(n)
        pread_exact(fd, memoryview(raw), 8, path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {os_reason(e, 'check the path and permissions')}") from e
    finally:
        os.close(fd)
    if not raw.lstrip()[:1] == b"{":
        raise CheckpointError(f"{path}: corrupt safetensors header (does not start with '{{'); {_FIX}")
    # No depth walk: every value kept is type-checked below, so nesting cannot reach later code.
    header = loads_json(raw, source=f"{path} (safetensors header)", max_depth=None, fix=_FIX)
    del raw
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); {_FIX}")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings); {_FIX}")
    data_start = 8 + n
    data_size = size - data_start
    spans: list[tuple[int, int, str, DType, tuple[int, ...]]] = []
    for name, entry in header.items():
        dtype, shape, begin, end = _entry(path, name, entry)
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor {short(name)} ends at byte {data_start + end} but the file has "
                f"{size} bytes; {_FIX}"
            )
        spans.append((begin, end, name, dtype, shape))
    del header
    spans.sort(key=lambda s: (s[0], s[1]))
    at, previous = 0, None
    for begin, end, name, _, _ in spans:
        if begin < at:
            raise CheckpointError(f"{path}: tensors {short(previous)} and {short(name)} overlap in the file; {_FIX}")
        if begin > at:
            raise CheckpointError(
                f"{path}: corrupt safetensors header ({begin - at} bytes before tensor {short(name)} belong to no "
                f"tensor); {_FIX}"
            )
        at, previous = end, name
    if at != data_size:
        raise CheckpointError(
            f"{path}: corrupt safetensors file ({data_size - at} bytes after the last tensor belong to no "
            f"tensor); {_FIX}"
        )
    tensors = {name: TensorInfo(name, dtype, shape, path, data_start + begin) for begin, _, name, dtype, shape in spans}
    return tensors, metadata


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to be written: name, dtype, shape, and its byte offset in the data section."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    begin: int

    @property
    def nbytes(self) -> int:
        """Size of the data in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize


def build_header(tensors: list[PlannedTensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a header (with its 8-byte length prefix) for tensors laid out back to back.

    The JSON is padded with spaces so that the data section starts 8-byte aligned,
    as the safetensors library does.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype.code,
            "shape": list(t.shape),
            "data_offsets": [t.begin, t.begin + t.nbytes],
        }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def pread_exact(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    """Fill ``buf`` from ``fd`` at ``offset``; a short read means the file shrank or is truncated."""
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n <= 0:
            raise CheckpointError(
                f"{path}: truncated while reading at byte {offset + got}; the file changed or is "
                "incomplete: re-download it"
            )
        got += n


def pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    """Write all of ``buf`` at ``offset``."""
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:], offset + done)
