"""Keys for every cache, resume and reuse: what decided a stored result, and what changed since.

A stored result (a resumable run, a finished chain step, a score) is reused only when the
settings and the identity of every input it was made from are the same as now. Inputs are
identified by content, not only by path: a data file by its sha256, a model by the sha256 of
its config and index and the sizes and mtimes of its weight files (hashing every shard of a
multi-gigabyte model on each rerun would cost more than the reuse saves).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ftrecycle.errors import ConfigError
from ftrecycle.io.provenance import PROVENANCE

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_identity(path: str | Path | None) -> dict[str, Any] | None:
    """A data file (or hub dataset id) as a key: its resolved path and sha256 (None for None).

    A string that is not a local file (a hub dataset id) is keyed by the string itself.
    """
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        return {"ref": str(path)}
    return {"path": str(p.resolve()), "sha256": sha256_file(p)}


def model_identity(path: str | Path) -> dict[str, Any]:
    """A model directory as a key: its path, the sha256 of its JSON files and the size and mtime of the rest.

    Weight files are identified by size and modification time, not hashed: a rewritten model
    gets a new mtime, and hashing every shard on each rerun would cost more than the reuse saves.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        return {"ref": str(path)}
    files: dict[str, Any] = {}
    for f in sorted(root.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        if f.suffix == ".json" and f.name != PROVENANCE:  # provenance holds a creation time, not content
            files[f.name] = sha256_file(f)
        elif f.suffix in (".safetensors", ".bin", ".pt"):
            st = f.stat()
            files[f.name] = [st.st_size, st.st_mtime_ns]
    return {"path": str(root.resolve()), "files": files}


def settings_hash(settings: Any) -> str:
    """The sha256 of a JSON-ready value, key order ignored."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _short(v: Any) -> str:
    if isinstance(v, list):
        return json.dumps(v)[:60]
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12]  # a sha256
    return str(v)


def describe_changes(old: Any, new: Any, *, limit: int = 4) -> str:
    """What differs between two settings records, e.g. ``learning_rate 0.003 -> 0.0001``."""
    a, b = _flat(old), _flat(new)
    changed = [
        f"{k} {_short(a.get(k, '(none)'))} -> {_short(b.get(k, '(none)'))}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    more = f" (and {len(changed) - limit} more)" if len(changed) > limit else ""
    return "; ".join(changed[:limit]) + more if changed else "nothing"


def read_settings(path: Path) -> dict[str, Any] | None:
    """A settings record written by :func:`write_settings` (None when absent or unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def write_settings(path: Path, settings: dict[str, Any]) -> None:
    """Record the settings a stored result was made with (atomically: a temp file, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(settings, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def check_settings(stored: dict[str, Any] | None, current: dict[str, Any], *, what: str, fix: str) -> None:
    """Refuse to reuse ``what`` when it was made with other settings than ``current``.

    Args:
        stored: the recorded settings (None: unknown, also refused).
        current: the settings of this run.
        what: the stored thing, for the message (e.g. "the unfinished run in DIR").
        fix: how to proceed, for the message.

    Raises:
        ConfigError: one line naming what changed.
    """
    if stored is None:
        raise ConfigError(f"{what} has no record of the settings it was made with; {fix}")
    if json.loads(json.dumps(stored, default=str)) != json.loads(json.dumps(current, default=str)):
        raise ConfigError(f"{what} was made with other settings ({describe_changes(stored, current)}); {fix}")
