"""The delta manifest, ``ftrecycle-delta.json``: its file names, its schema, and its checks.

Layout of a delta directory (format version 2)::

    delta.safetensors                     (or delta-0000i-of-0000N.safetensors
    delta.safetensors.index.json           with this index when sharded)
    ftrecycle-delta.json                  the manifest (see docs/delta-format.md)
    finetuned/config.json, tokenizer...   the fine-tuned model's non-weight files

Version 2 adds compressed tensors (stored as parts, see :mod:`ftrecycle.codecs`),
per-tensor norms and errors, and a SHA-256 of every stored tensor's bytes. Version 1
directories (dense, no checksums) are still read. :class:`ftrecycle.delta.store.Delta`
reads a delta through this module; :class:`ftrecycle.delta.write.DeltaWriter` writes one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ftrecycle.codecs import CODECS, METHODS, SEP, part_name
from ftrecycle.dtypes import BY_NAME, FLOAT_DTYPES
from ftrecycle.errors import CheckpointError, short
from ftrecycle.io.jsonfile import read_json
from ftrecycle.io.provenance import DELTA_MANIFEST

MANIFEST = DELTA_MANIFEST
FORMAT = "ftrecycle-delta"
VERSION = 2
READS = (1, 2)
PREFIX = "delta"
INDEX = "delta.safetensors.index.json"
FINETUNED_DIR = "finetuned"


#: A manifest larger than this is refused before it is parsed (a 100k-tensor model's is ~40 MiB).
MAX_MANIFEST_BYTES = 256 << 20
#: Each method's parts (the registry's); :func:`ftrecycle.delta.store.check_parts` checks their dtypes and shapes.
PARTS: dict[str, frozenset[str]] = {name: codec.parts for name, codec in CODECS.items()}
_HEX = frozenset("0123456789abcdef")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, int | float) and not isinstance(x, bool)) and math.isfinite(x)


class _Bad:
    """Raise a manifest error that names the file, the field and the fix."""

    def __init__(self, mpath: Path) -> None:
        self.mpath = mpath

    def __call__(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.mpath}: {what}; recreate the delta with `ftrecycle diff`")


def load_manifest(path: Path) -> dict[str, Any]:
    """Read a delta directory's manifest and check its schema (see docs/delta-format.md).

    Every field a reader uses is checked for its type and range; a version 2 manifest must
    name only the public compression methods and carry a checksum for every stored tensor.

    Args:
        path: the delta directory.

    Returns:
        The manifest.

    Raises:
        CheckpointError: missing, unreadable, of an unknown format or version, or malformed.
    """
    mpath = path / MANIFEST
    if not mpath.exists() and not mpath.is_symlink():
        raise CheckpointError(f"{path}: not a delta directory (no {MANIFEST}); make one with `ftrecycle diff`")
    manifest = read_json(
        mpath, what="delta manifest", max_bytes=MAX_MANIFEST_BYTES, fix="recreate the delta with `ftrecycle diff`"
    )
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(
            f'{mpath}: not an ftrecycle delta manifest (no "format": "{FORMAT}"); recreate the delta with '
            "`ftrecycle diff`"
        )
    version = manifest.get("version")
    if not _is_int(version) or version not in READS:
        raise CheckpointError(
            f"{mpath}: delta format version {short(version)} is not supported by this ftrecycle "
            f"(reads versions {', '.join(map(str, READS))}); upgrade ftrecycle or recreate the delta"
        )
    _check_schema(mpath, manifest)
    return manifest


def _check_schema(mpath: Path, m: dict[str, Any]) -> None:
    bad = _Bad(mpath)
    v2 = m["version"] >= 2
    for key in ("base_config", "base", "finetuned", "compression", "policies"):
        if m.get(key) is not None and not isinstance(m[key], dict):
            raise bad(f"{key!r} must be an object, not {type(m[key]).__name__}")
    if m.get("records") is not None and not (
        isinstance(m["records"], list) and all(isinstance(r, dict) for r in m["records"])
    ):
        raise bad("'records' must be a list of objects")
    for key in ("dtype", "compute_dtype"):
        if key in m and not (isinstance(m[key], str) and m[key] in BY_NAME and BY_NAME[m[key]] in FLOAT_DTYPES):
            raise bad(f"{key!r} is {short(m[key])}, not a float dtype name")
    comp = m.get("compression")
    if comp is not None and not isinstance(comp.get("spec", ""), str):
        raise bad("'compression.spec' must be a string")
    tensors = m.get("tensors")
    if tensors is None and not v2:
        tensors = {}
    if not isinstance(tensors, dict) or (v2 and not tensors):
        raise bad("'tensors' must be a non-empty object of tensor name -> entry")
    for name, e in tensors.items():
        _check_entry(bad, name, e, v2)
    aliases = m.get("aliases")
    if aliases is not None:
        if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
            raise bad("'aliases' must be an object of tensor name -> tensor name")
        for alias, target in aliases.items():
            if alias in tensors or (v2 and target not in tensors):
                raise bad(f"alias {short(alias)} -> {short(target)} must name a listed tensor and not be one")
    if not v2 and ("checksums" in m or any(set(e) - {"shape", "dtype"} for e in tensors.values())):
        # version 1 had neither: a version 2 delta relabelled 1 would skip its verification
        raise bad("a version 1 manifest carries version 2 fields (checksums, norms...); its version was changed")
    if v2:
        sums = m.get("checksums")
        if not isinstance(sums, dict) or not sums:
            raise bad(
                "a version 2 manifest has no 'checksums' (every stored tensor must have one; a delta without "
                "them would apply a corrupted tensor unnoticed)"
            )
        for stored, h in sums.items():
            if not (isinstance(h, str) and len(h) == 64 and set(h) <= _HEX):
                raise bad(f"checksum of {short(stored)} is not a SHA-256 hex digest")
        stored = stored_names(m)
        unknown = sorted(set(sums) - stored)
        if unknown:
            raise bad(f"'checksums' names {short(unknown[0])}, which the manifest does not store")
        missing = sorted(stored - set(sums))
        if missing:
            names = ", ".join(map(short, missing[:5]))
            raise bad(f"no checksum for stored tensor(s) {names} (version 2 needs one for each)")


def _check_entry(bad: _Bad, name: str, e: Any, v2: bool) -> None:
    if SEP in name:
        raise bad(f"tensor name {short(name)} contains {SEP!r}, the separator of stored part names")
    if not isinstance(e, dict):
        raise bad(f"entry of tensor {short(name)} must be an object")
    shape = e.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"tensor {short(name)}: 'shape' must be a list of non-negative integers, not {short(shape)}")
    if "dtype" in e and not (isinstance(e["dtype"], str) and BY_NAME.get(e["dtype"]) in FLOAT_DTYPES):
        raise bad(f"tensor {short(name)}: 'dtype' {short(e['dtype'])} is not a float dtype name")
    for key in ("norm", "error"):
        if e.get(key) is not None and not _is_number(e[key]):
            raise bad(f"tensor {short(name)}: {key!r} must be a finite number")
    if e.get("bytes") is not None and not (_is_int(e["bytes"]) and e["bytes"] >= 0):
        raise bad(f"tensor {short(name)}: 'bytes' must be a non-negative integer")
    comp, parts = e.get("compression"), e.get("parts")
    if comp is None:
        if parts:
            raise bad(f"tensor {short(name)} lists parts but no compression method")
        return
    if not v2:
        raise bad(f"tensor {short(name)} is compressed, which version 1 cannot be")
    if not isinstance(comp, dict) or comp.get("method") not in METHODS:
        method = comp.get("method") if isinstance(comp, dict) else comp
        raise bad(f"tensor {short(name)}: compression method {short(method)} is not one of {', '.join(METHODS)}")
    for key in ("norm", "error", "density"):
        if comp.get(key) is not None and not _is_number(comp[key]):
            raise bad(f"tensor {short(name)}: compression {key!r} must be a finite number")
    for key in ("rank", "kept"):
        if comp.get(key) is not None and not (_is_int(comp[key]) and comp[key] >= 0):
            raise bad(f"tensor {short(name)}: compression {key!r} must be a non-negative integer")
    if len(shape) != 2 or 0 in shape:
        raise bad(f"tensor {short(name)} of shape {short(shape)} is compressed, but only non-empty matrices can be")
    want = PARTS[comp["method"]]
    if not isinstance(parts, dict) or set(parts) != want:
        raise bad(f"tensor {short(name)} ({comp['method']}) must list exactly the parts {', '.join(sorted(want))}")
    for k, stored in parts.items():
        if stored != part_name(name, k):
            raise bad(f"tensor {short(name)}: part {k!r} is stored as {short(stored)}, not {short(part_name(name, k))}")


def stored_names(manifest: dict[str, Any]) -> set[str]:
    """The names a (checked) manifest says are stored in the shards: dense tensors and parts."""
    out: set[str] = set()
    for name, e in (manifest.get("tensors") or {}).items():
        out |= set(e["parts"].values()) if e.get("compression") else {name}
    return out


def dense_bytes(entries: dict[str, Any], itemsize: int) -> int:
    """Bytes the listed tensors would take stored dense, ``itemsize`` bytes an element."""
    return sum(math.prod(e["shape"]) * itemsize for e in entries.values())
