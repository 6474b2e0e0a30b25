"""What every written artifact records about its inputs and how it was made, and the files it is kept in."""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import os
import platform
import sys
from pathlib import Path, PurePath
from typing import Any, Literal

from ftrecycle.arch import signature
from ftrecycle.errors import CheckpointError, ConfigError, FtRecycleError
from ftrecycle.io.card import hub_id, read_license
from ftrecycle.io.checkpoint import Checkpoint
from ftrecycle.io.jsonfile import open_regular, read_bytes
from ftrecycle.version import __version__

#: The provenance record written into every model or adapter directory ftrecycle makes.
PROVENANCE = "ftrecycle.json"
#: A delta directory's manifest: its provenance plus the stored tensors' layout.
DELTA_MANIFEST = "ftrecycle-delta.json"
#: How records name local files: ``relative`` (to the output, or by name and hash) or ``absolute``.
RecordPaths = Literal["relative", "absolute"]
RECORD_PATHS: tuple[str, ...] = ("relative", "absolute")
#: What :func:`describe_input` hashes to identify a local input without its path.
_HASHED = ("config.json", "model.safetensors.index.json", "ftrecycle-delta.json", "adapter_config.json")
_MAX_HASHED_BYTES = 64 << 20


def describe_input(ckpt: Checkpoint) -> dict[str, Any]:
    """Identify an input: as given, where it was read from, hub repo and commit, size and architecture.

    Args:
        ckpt: the opened input.

    Returns:
        A JSON-ready description. ``hub_id`` is the Hub repository it came from, or the one its
        config names (``_name_or_path``) for a local copy; ``sha256`` hashes its small JSON files
        (config, index, manifest), which identify a local input once its path is left out of a
        published record (see :func:`portable`); ``license`` is the one its card or config declares.
    """
    return {
        "ref": ckpt.source.ref,
        "path": str(ckpt.path),
        "repo_id": ckpt.source.repo_id,
        "revision": ckpt.source.revision,
        "hub_id": ckpt.source.repo_id or hub_id(ckpt.config.get("_name_or_path")),
        "license": read_license(ckpt.path, ckpt.config),
        "sha256": _hashes(ckpt.path),
        "format": ckpt.format,
        "files": [f.name for f in ckpt.files],
        "tensors": len(ckpt.tensors),
        "bytes": sum(t.nbytes for t in ckpt.tensors.values()),
        "architecture": signature(ckpt.config) if ckpt.config else None,
    }


def _hashes(directory: Path) -> dict[str, str]:
    """SHA-256 of the small JSON files that identify a model or delta directory."""
    found = {}
    for name in _HASHED:
        path = directory / name
        if not path.is_file():
            continue
        try:
            found[name] = hashlib.sha256(read_bytes(path, what=name, max_bytes=_MAX_HASHED_BYTES)).hexdigest()
        except FtRecycleError:
            continue  # the reader of the input reports a bad file; a missing hash only weakens the record
    return found


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def base_record(operation: str) -> dict[str, Any]:
    """The fields every provenance record starts with.

    Args:
        operation: what made the artifact (``transfer``, ``apply``, ``diff``, ``export-lora``, ...).

    Returns:
        The tool and its version, the operation, the time, the command line (when run as
        ``ftrecycle``) and the versions of Python, NumPy and PyTorch.
    """
    return {
        "tool": "ftrecycle",
        "ftrecycle_version": __version__,
        "operation": operation,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "torch": _version("torch"),
    }


def _command() -> list[str] | None:
    """The command line when run as ``ftrecycle`` (or ``python -m ftrecycle.cli``), its program as
    ``ftrecycle``: the script's own path names the virtualenv."""
    argv = sys.argv
    mains = (os.path.join("ftrecycle", "cli", "__main__.py"), os.path.join("ftrecycle", "__main__.py"))
    if not argv or not (argv[0].endswith("ftrecycle") or argv[0].endswith(mains)):
        return None
    # a path argument as typed is relative to the working directory; the record's are relative to the output
    # (see portable()), so an existing relative path is made absolute here and relative to the output there
    return ["ftrecycle", *(_absolute_if_path(a) for a in argv[1:])]


def _absolute_if_path(arg: str) -> str:
    """``arg``, or ``--flag=arg``'s value, made absolute when it names an existing relative path."""
    flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    if value and not os.path.isabs(value) and os.path.exists(value):
        value = os.path.abspath(value)
    return f"{flag}{eq}{value}"


def check_record_paths(value: object, flag: str = "--record-paths") -> RecordPaths:
    """Validate a ``record_paths`` setting.

    Raises:
        ConfigError: not one of :data:`RECORD_PATHS`.
    """
    if value not in RECORD_PATHS:
        raise ConfigError(f"{flag} must be one of {', '.join(RECORD_PATHS)}, got {value!r:.60}")
    return value  # type: ignore[return-value]


def portable_path(path: str, out: Path) -> str:
    """An absolute local path as a published record may hold it.

    Relative to the output directory when both lie under a common directory other than the
    filesystem's root (``../models/A``); otherwise only its last component, marked
    ``<local>/NAME`` — the input's ``sha256`` in its description still identifies it.

    Args:
        path: an absolute path.
        out: the output directory (the final one, not its temporary sibling).

    Returns:
        The path to record.
    """
    # both resolved: a relative path between a resolved input and an output spelled through a symlink is wrong
    p, o = os.path.realpath(path), os.path.realpath(out)
    common = os.path.commonpath([p, o])
    if common == os.path.abspath(os.sep):
        return f"<local>/{os.path.basename(p)}"
    return os.path.relpath(p, o)


def moved_path(recorded: str, recorded_from: Path) -> str:
    """A path read from a record written in ``recorded_from``, absolute again where it can be.

    Records name local paths relative to their own directory (:func:`portable`); a record copied
    into another output (a rewritten delta) must name them from there instead.

    Args:
        recorded: the path as the record holds it.
        recorded_from: the directory the record was read from.

    Returns:
        The absolute path, or ``recorded`` unchanged (already absolute, or ``<local>/NAME``).
    """
    if os.path.isabs(recorded) or recorded.startswith("<local>/"):
        return recorded
    return os.path.normpath(os.path.join(os.path.abspath(recorded_from), recorded))


#: record fields whose strings are data, never paths (a token may be spelt "/usr")
NOT_PATHS = frozenset({"tokens"})
#: command-line flags whose value is never a path
NOT_PATH_FLAGS = frozenset({"--tokens"})


def portable(value: Any, out: Path, record_paths: RecordPaths = "relative") -> Any:
    """A copy of a record (``ftrecycle.json``, a manifest, a log) without absolute local paths.

    Every string that is an absolute path, or a ``--flag=/abs/path`` argument, is rewritten by
    :func:`portable_path`, so that a record uploaded with its output names no user's home,
    virtualenv or temporary directory. ``record_paths="absolute"`` returns ``value`` unchanged,
    for private use.

    Args:
        value: a JSON-ready value (paths may be :class:`~pathlib.PurePath`).
        out: the output directory the record describes.
        record_paths: ``relative`` (default) or ``absolute``.

    Returns:
        The value to write.
    """
    if record_paths == "absolute":
        return value
    if isinstance(value, dict):
        return {k: v if k in NOT_PATHS else portable(v, out, record_paths) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        # a command line: the value of a flag that takes no path (`--tokens /usr`) is kept as given
        return [v if _flag_value(value, i) else portable(v, out, record_paths) for i, v in enumerate(value)]
    if isinstance(value, PurePath):
        value = str(value)
    if isinstance(value, str):
        return _portable_str(value, out)
    return value


def _flag_value(items: list[Any] | tuple[Any, ...], i: int) -> bool:
    """Whether ``items[i]`` is the value of a flag of :data:`NOT_PATH_FLAGS` (``--tokens X``, ``--tokens=X``)."""
    v, before = items[i], items[i - 1] if i else None
    return (isinstance(before, str) and before in NOT_PATH_FLAGS) or (
        isinstance(v, str) and v.split("=", 1)[0] in NOT_PATH_FLAGS
    )


def _portable_str(text: str, out: Path) -> str:
    if text.startswith("-") and "=" in text:
        flag, _, rest = text.partition("=")
        return f"{flag}={_portable_str(rest, out)}" if os.path.isabs(rest) else text
    if len(text) > 2 and text[0] == "-" and text[1] != "-" and os.path.isabs(text[2:]):  # -o/abs/path, joined
        return text[:2] + portable_path(text[2:], out)
    if os.path.isabs(text) and "\n" not in text:
        return portable_path(text, out)
    return text


#: bytes hashed at each end of a weight file by :func:`weight_files`
FINGERPRINT_BYTES = 64 << 10


def weight_files(directory: Path) -> list[tuple[str, int, str]] | None:
    """Each weight file's name, size and the hash of its first and last :data:`FINGERPRINT_BYTES` (None: none
    readable): a cheap identity of a model's weights, the same for a copy."""
    out = []
    try:
        files = sorted(f for f in directory.iterdir() if f.suffix == ".safetensors")
    except OSError:
        return None
    for f in files:
        try:
            fd = open_regular(f, what="weight file")
        except CheckpointError:
            return None
        try:
            size = os.fstat(fd).st_size
            h = hashlib.sha256(os.pread(fd, FINGERPRINT_BYTES, 0))
            h.update(os.pread(fd, FINGERPRINT_BYTES, max(0, size - FINGERPRINT_BYTES)))
        finally:
            os.close(fd)
        out.append((f.name, size, h.hexdigest()))
    return out or None


def weights_fingerprint(directory: Path) -> str | None:
    """One SHA-256 over :func:`weight_files` (None: no readable weight file)."""
    files = weight_files(directory)
    return None if files is None else hashlib.sha256(repr(files).encode()).hexdigest()
