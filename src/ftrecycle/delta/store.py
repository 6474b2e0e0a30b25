"""The delta directory: safetensors shards of ``finetuned - base`` plus a manifest.

Layout (format version 1)::

    delta.safetensors                     (or delta-0000i-of-0000N.safetensors
    delta.safetensors.index.json           with this index when sharded)
    ftrecycle-delta.json                  the manifest (see docs/delta-format.md)
    finetuned/config.json, tokenizer...   the fine-tuned model's non-weight files
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftrecycle.errors import CheckpointError
from ftrecycle.io.checkpoint import Checkpoint, open_checkpoint
from ftrecycle.plan import Operand, Term

MANIFEST = "ftrecycle-delta.json"
FORMAT = "ftrecycle-delta"
VERSION = 1
PREFIX = "delta"
INDEX = "delta.safetensors.index.json"
FINETUNED_DIR = "finetuned"


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and check a delta directory's manifest.

    Raises:
        CheckpointError: missing, unreadable, or of an unknown format or version.
    """
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path}: not a delta directory (no {MANIFEST}); make one with `ftrecycle diff`")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mpath}: not valid JSON ({e}); recreate the delta with `ftrecycle diff`") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: not an ftrecycle delta manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{mpath}: delta format version {manifest.get('version')} is not supported by this ftrecycle "
            f"(reads version {VERSION}); upgrade ftrecycle"
        )
    return manifest


def open_delta(path: str | Path) -> tuple[Checkpoint, dict[str, Any], dict[str, Term], dict[str, str]]:
    """Open a delta directory.

    Returns:
        The indexed shards, the manifest, the diff's terms, and its tied aliases.

    Raises:
        CheckpointError: not a delta, corrupt shards, or shards that disagree with the manifest.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"{path}: no such delta directory")
    manifest = read_manifest(p)
    ckpt = open_checkpoint(str(p), require_config=False, index_name=INDEX, prefix=PREFIX)
    ckpt.config = dict(manifest.get("base_config") or {})
    listed = manifest.get("tensors") or {}
    missing = sorted(set(listed) - set(ckpt.tensors))
    if missing:
        raise CheckpointError(
            f"{p}: the manifest lists tensors the shards lack: {', '.join(missing[:10])}; "
            "recreate the delta with `ftrecycle diff`"
        )
    terms: dict[str, Term] = {}
    for name, info in ckpt.tensors.items():
        entry = listed.get(name)
        if entry is not None and tuple(entry["shape"]) != info.shape:
            raise CheckpointError(
                f"{p}: tensor {name!r} has shape {list(info.shape)} but the manifest says "
                f"{entry['shape']}; recreate the delta"
            )
        terms[name] = Term(name, info.shape, delta=Operand(ckpt, info))
    aliases = {str(k): str(v) for k, v in (manifest.get("aliases") or {}).items()}
    return ckpt, manifest, terms, aliases
