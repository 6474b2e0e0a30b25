"""The one way ftrecycle reads a JSON file it did not just write.

Every JSON input (config.json, a shard index, a delta manifest, an adapter config,
a JSONL line, a cache) can be hostile or broken. :func:`read_json` refuses what is
not a regular file (a FIFO would block, a device could be endless) without
blocking, caps the size before reading, and :func:`loads_json` refuses non-UTF-8
text, duplicate keys, ``NaN``/``Infinity`` and nesting deeper than
:data:`MAX_DEPTH` -- Python's own parser raises ``RecursionError`` near a depth of
1,000, and code that walks a parsed value recursively fails far earlier -- each as
one error that names the file and the fix.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from ftrecycle.errors import CheckpointError, FtRecycleError, os_reason, short

#: Deepest nesting of arrays/objects accepted; real configs and manifests stay under 10.
MAX_DEPTH = 64
#: Default size cap of a JSON file (configs and indexes are kilobytes; tokenizer.json tens of MB).
DEFAULT_MAX_BYTES = 64 << 20

_FIX = "restore or re-download the file"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path, *, what: str, error: type[FtRecycleError] = CheckpointError) -> int:
    """Open a regular file for reading without ever blocking on a FIFO or device.

    The path is stat'ed before it is opened (opening a device can have effects) and
    opened with ``O_NONBLOCK`` so that a FIFO swapped in between cannot hang; the
    open file is checked again with ``fstat``.

    Args:
        path: the file.
        what: what the file is, for the message ("config", "shard index", ...).
        error: the error class to raise.

    Returns:
        A read-only file descriptor; the caller closes it.

    Raises:
        error: the file is missing, unreadable, or not a regular file.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise error(f"{path}: cannot read the {what}: {os_reason(e, 'check the path')}") from e
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: the {what} is {_kind(st.st_mode)}, not a regular file; replace it with the real file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"{path}: cannot open the {what}: {os_reason(e, 'check the permissions')}") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise error(f"{path}: the {what} is {_kind(st.st_mode)}, not a regular file; replace it with the real file")
    # Regular files ignore O_NONBLOCK for reads, but clear it so later reads never see EAGAIN.
    os.set_blocking(fd, True)
    return fd


def read_bytes(
    path: Path, *, what: str, max_bytes: int = DEFAULT_MAX_BYTES, error: type[FtRecycleError] = CheckpointError
) -> bytes:
    """Read a whole regular file of at most ``max_bytes`` bytes.

    Raises:
        error: not a regular file, unreadable, or larger than ``max_bytes``.
    """
    fd = open_regular(path, what=what, error=error)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise error(f"{path}: the {what} has {size} bytes, more than the {max_bytes} accepted; {_FIX}")
        chunks, got = [], 0
        while True:
            # Read one byte past the cap so that a file growing under us is still refused.
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
            if got > max_bytes:
                raise error(f"{path}: the {what} grew past the {max_bytes} bytes accepted while read; {_FIX}")
    except OSError as e:
        raise error(f"{path}: cannot read the {what}: {os_reason(e, 'check the file')}") from e
    finally:
        os.close(fd)
    return b"".join(chunks)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"key {short(key)} appears twice in one object")
            seen.add(key)
    return out


def json_depth(value: Any) -> int:
    """The nesting depth of a parsed JSON value (a scalar is 0, ``[]`` is 1), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((c, depth) for c in children if isinstance(c, (dict, list)))
    return deepest


def loads_json(
    text: str | bytes | bytearray,
    *,
    source: str,
    max_depth: int | None = MAX_DEPTH,
    error: type[FtRecycleError] = CheckpointError,
    fix: str = _FIX,
    allow_nan: bool = False,
) -> Any:
    """Parse JSON text strictly.

    Args:
        text: the JSON (bytes must be UTF-8).
        source: where it came from, for the message (``path`` or ``path:line``).
        max_depth: deepest nesting accepted; None for a caller that checks the value's whole
            structure itself (only Python's own recursion limit, turned into ``error``, then applies).
        error: the error class to raise.
        fix: how the user can fix it, appended to the message.
        allow_nan: accept ``NaN``/``Infinity``, which are not JSON but which transformers writes
            into configs (Mamba's ``time_step_limit: [0.0, Infinity]``).

    Returns:
        The parsed value.

    Raises:
        error: not UTF-8, not JSON, a duplicate key, NaN/Infinity, or nested deeper than ``max_depth``.
    """
    if not isinstance(text, str):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{source}: not UTF-8 text (byte {e.start}: {e.reason}); {fix}") from e
    try:
        constant = float if allow_nan else _no_constant
        value = json.loads(text, parse_constant=constant, object_pairs_hook=_unique_pairs)
    except RecursionError as e:
        raise error(f"{source}: JSON nested too deeply (more than {max_depth or MAX_DEPTH} levels); {fix}") from e
    except ValueError as e:  # JSONDecodeError, and ours from the hooks
        raise error(f"{source}: not valid JSON ({e}); {fix}") from e
    if max_depth is not None and json_depth(value) > max_depth:
        raise error(f"{source}: JSON nested too deeply (more than {max_depth} levels); {fix}")
    return value


def read_json(
    path: Path,
    *,
    what: str,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    error: type[FtRecycleError] = CheckpointError,
    fix: str = _FIX,
    allow_nan: bool = False,
) -> Any:
    """Read and parse a JSON file: a regular file only, at most ``max_bytes``, strictly parsed.

    Args:
        path: the file.
        what: what the file is, for messages ("config", "shard index", "delta manifest", ...).
        max_bytes: size cap.
        max_depth: deepest nesting accepted.
        error: the error class to raise (CheckpointError for model files, DataError for data...).
        fix: how the user can fix it, appended to parse errors.
        allow_nan: accept ``NaN``/``Infinity`` (see :func:`loads_json`).

    Returns:
        The parsed value (check its type: it may be any JSON value).

    Raises:
        error: see :func:`read_bytes` and :func:`loads_json`.
    """
    raw = read_bytes(path, what=what, max_bytes=max_bytes, error=error)
    return loads_json(raw, source=str(path), max_depth=max_depth, error=error, fix=fix, allow_nan=allow_nan)


def read_json_object(
    path: Path,
    *,
    what: str,
    max_bytes: int = DEFAULT_MAX_BYTES,
    error: type[FtRecycleError] = CheckpointError,
    fix: str = _FIX,
    allow_nan: bool = False,
) -> dict[str, Any]:
    """:func:`read_json`, and the value must be a JSON object.

    Raises:
        error: as :func:`read_json`, or the value is not an object.
    """
    value = read_json(path, what=what, max_bytes=max_bytes, error=error, fix=fix, allow_nan=allow_nan)
    if not isinstance(value, dict):
        raise error(f"{path}: the {what} is a JSON {_json_type(value)}, not an object; {fix}")
    return value


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )
