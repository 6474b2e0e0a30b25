"""The delta directory: safetensors shards of ``finetuned - base`` plus a manifest.

Layout (format version 2)::

    delta.safetensors                     (or delta-0000i-of-0000N.safetensors
    delta.safetensors.index.json           with this index when sharded)
    ftrecycle-delta.json                  the manifest (see docs/delta-format.md)
    finetuned/config.json, tokenizer...   the fine-tuned model's non-weight files

Version 2 adds compressed tensors (stored as parts, see :mod:`ftrecycle.delta.codecs`),
per-tensor norms and errors, and a SHA-256 of every stored tensor's bytes. Version 1
directories (dense, no checksums) are still read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ftrecycle.delta.codecs import Packed
from ftrecycle.delta.encode import from_storage
from ftrecycle.errors import CheckpointError
from ftrecycle.io.checkpoint import Checkpoint, open_checkpoint
from ftrecycle.io.safetensors_format import TensorInfo
from ftrecycle.plan import Operand, Term

MANIFEST = "ftrecycle-delta.json"
FORMAT = "ftrecycle-delta"
VERSION = 2
READS = (1, 2)
HASH_BLOCK = 2 << 20  # bytes per read: a float64 copy of a bf16 block is 8 MiB
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
    if manifest.get("version") not in READS:
        raise CheckpointError(
            f"{mpath}: delta format version {manifest.get('version')} is not supported by this ftrecycle "
            f"(reads versions {', '.join(map(str, READS))}); upgrade ftrecycle"
        )
    return manifest


def digest(info: TensorInfo, *, norm: bool = False) -> tuple[str, float | None]:
    """SHA-256 of one stored tensor's bytes and, if asked, the Frobenius norm of its values, in one read."""
    h = hashlib.sha256()
    total = 0.0
    fd = os.open(info.path, os.O_RDONLY)
    try:
        pos, end = info.offset, info.offset + info.nbytes
        while pos < end:
            block = os.pread(fd, min(HASH_BLOCK, end - pos), pos)
            if not block:
                raise CheckpointError(f"{info.path}: truncated inside tensor {info.name!r}; re-download the delta")
            h.update(block)
            if norm:  # HASH_BLOCK is a multiple of every itemsize, so blocks hold whole elements
                x = from_storage(np.frombuffer(block, dtype=info.dtype.storage), info.dtype, np.dtype(np.float64))
                total += float(np.dot(x, x))
            pos += len(block)
    finally:
        os.close(fd)
    return h.hexdigest(), (math.sqrt(total) if norm else None)


def checksums(
    tensors: dict[str, TensorInfo], threads: int, *, norms: frozenset[str] = frozenset()
) -> tuple[dict[str, str], dict[str, float]]:
    """SHA-256 of every tensor, and the norm of those in ``norms``, on ``threads`` threads
    (hashlib and NumPy release the GIL)."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        found = list(pool.map(lambda item: digest(item[1], norm=item[0] in norms), tensors.items()))
    hashes = {n: h for n, (h, _) in zip(tensors, found, strict=True)}
    return hashes, {n: v for n, (_, v) in zip(tensors, found, strict=True) if v is not None}


def verify(ckpt: Checkpoint, manifest: dict[str, Any], threads: int) -> None:
    """Check every stored tensor against the manifest's checksums (version 2).

    Raises:
        CheckpointError: a tensor whose bytes changed, naming its file.
    """
    want = manifest.get("checksums")
    if not want:
        return
    got, _ = checksums({n: ckpt.tensors[n] for n in want if n in ckpt.tensors}, threads)
    for name, digest in got.items():
        if digest != want[name]:
            raise CheckpointError(
                f"{ckpt.tensors[name].path}: tensor {name!r} fails its checksum (the file is corrupt or was "
                "changed); re-download or recreate the delta with `ftrecycle diff`"
            )


def open_delta(
    path: str | Path, *, check: bool = True, threads: int = 1
) -> tuple[Checkpoint, dict[str, Any], dict[str, Term], dict[str, str]]:
    """Open a delta directory.

    Args:
        path: the directory.
        check: verify every tensor's checksum first (one read of the delta).
        threads: threads for the checksums.

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
    try:
        terms = _terms(p, ckpt, manifest)
        if check:
            verify(ckpt, manifest, threads)
    except BaseException:
        ckpt.close()
        raise
    aliases = {str(k): str(v) for k, v in (manifest.get("aliases") or {}).items()}
    return ckpt, manifest, terms, aliases


def _terms(p: Path, ckpt: Checkpoint, manifest: dict[str, Any]) -> dict[str, Term]:
    listed: dict[str, Any] = manifest.get("tensors") or {}
    stored = {part for e in listed.values() for part in (e.get("parts") or {}).values()}
    stored |= {n for n, e in listed.items() if not e.get("parts")}
    missing = sorted(stored - set(ckpt.tensors))
    if missing:
        raise CheckpointError(
            f"{p}: the manifest lists tensors the shards lack: {', '.join(missing[:10])}; "
            "recreate the delta with `ftrecycle diff`"
        )
    terms: dict[str, Term] = {}
    for name, entry in listed.items():
        parts = entry.get("parts")
        shape = tuple(entry["shape"])
        if parts:
            ops = {k: Operand(ckpt, ckpt.tensors[v]) for k, v in parts.items()}
            terms[name] = Term(name, shape, packed=Packed(entry["compression"]["method"], shape, ops))
            continue
        info = ckpt.tensors[name]
        if shape != info.shape:
            raise CheckpointError(
                f"{p}: tensor {name!r} has shape {list(info.shape)} but the manifest says "
                f"{entry['shape']}; recreate the delta"
            )
        terms[name] = Term(name, info.shape, delta=Operand(ckpt, info))
    for name, info in ckpt.tensors.items():  # version 1 lists every stored tensor; keep any it does not
        if name not in terms and name not in stored:
            terms[name] = Term(name, info.shape, delta=Operand(ckpt, info))
    return terms
