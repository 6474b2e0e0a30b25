"""Read and write the safetensors file layout without loading tensors.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of
JSON naming each tensor's dtype, shape and ``[begin, end)`` byte range in the data
section, then the data section. ftrecycle parses the header itself so that it can
validate a shard completely (truncation, overlapping ranges) before any arithmetic,
and then read any element range of any tensor with one positioned read.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ftrecycle.dtypes import BY_CODE, DType
from ftrecycle.errors import CheckpointError

#: Headers larger than this are refused as corrupt (safetensors itself caps at 100 MB).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
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


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors file's header.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        The tensors by name, in file order, and the ``__metadata__`` mapping.

    Raises:
        CheckpointError: the file is unreadable, truncated, or its header is corrupt.
    """
    fix = "re-download or re-save this file"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes); {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n + 8 > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors header (declares {n} header bytes, "
                    f"file has {size}); {fix}"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON: {e}); {fix}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); {fix}")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_size = size - data_start
    tensors: list[TensorInfo] = []
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        try:
            dtype = BY_CODE[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r} ({e!r}); {fix}") from e
        if any(d < 0 for d in shape) or end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} declares shape {list(shape)} of {entry['dtype']} but "
                f"byte range [{begin}, {end}); {fix}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} but the file has "
                f"{size} bytes; {fix}"
            )
        tensors.append(TensorInfo(name, dtype, shape, path, data_start + begin))
        spans.append((begin, end, name))
    spans.sort()
    for (_, e1, n1), (b2, _, n2) in itertools.pairwise(spans):
        if b2 < e1:
            raise CheckpointError(f"{path}: tensors {n1!r} and {n2!r} overlap in the file; {fix}")
    tensors.sort(key=lambda t: t.offset)
    return {t.name: t for t in tensors}, {str(k): str(v) for k, v in metadata.items()}


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
