"""Writing a copy of a delta with some stored tensors replaced: calibration's output.

The copy keeps every stored tensor's name, dtype and shape (so the manifest's entries, sizes
and ratio stay true), streams the unchanged ones byte for byte, writes the replaced ones from
memory, and recomputes every checksum from the written shards. The new directory appears
atomically (:func:`ftrecycle.io.output.atomic_directory`): a failed run leaves nothing at the output.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ftrecycle.delta.manifest import FINETUNED_DIR, INDEX, MANIFEST, PREFIX
from ftrecycle.delta.store import HASH_BLOCK, Delta, checksums
from ftrecycle.delta.write import delta_card
from ftrecycle.errors import CheckpointError, ConfigError
from ftrecycle.io.card import write_card
from ftrecycle.io.checkpoint import _index_safetensors
from ftrecycle.io.model_files import CONFIG_FILES, TOKENIZER_FILES, copy_files
from ftrecycle.io.output import ShardedWriter, atomic_directory, parse_size, write_json
from ftrecycle.io.provenance import moved_path, portable
from ftrecycle.io.safetensors_format import TensorInfo, pread_exact, pwrite_all
from ftrecycle.options import DEFAULT_SHARD_SIZE

#: The shard size of a rewritten delta when the caller gives none: ``--shard-size``'s default.
DEFAULT_SHARD_BYTES = parse_size(DEFAULT_SHARD_SIZE)


def _check_replacements(delta: Delta, replaced: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each replacement names a stored tensor and has its storage dtype and shape (returned contiguous)."""
    tensors = delta.shards().tensors
    out: dict[str, np.ndarray] = {}
    for name, values in replaced.items():
        info = tensors.get(name)
        if info is None:
            raise ConfigError(f"{delta.path}: cannot replace {name!r}: the delta stores no such tensor")
        if values.dtype != info.dtype.storage or tuple(values.shape) != info.shape:
            raise ConfigError(
                f"{delta.path}: the replacement of {name!r} is {values.dtype} {list(values.shape)}, but the stored "
                f"tensor is {info.dtype} {list(info.shape)}; a rewrite keeps every tensor's dtype and shape"
            )
        out[name] = np.ascontiguousarray(values)
    return out


def _copy_bytes(info: TensorInfo, fd: int, offset: int) -> None:
    """Copy one stored tensor's bytes into ``fd`` at ``offset``, a bounded block at a time."""
    src = os.open(info.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = bytearray(min(HASH_BLOCK, max(info.nbytes, 1)))
        view = memoryview(buf)
        done = 0
        while done < info.nbytes:
            n = min(len(buf), info.nbytes - done)
            pread_exact(src, view[:n], info.offset + done, info.path)
            pwrite_all(fd, view[:n], offset + done)
            done += n
    finally:
        os.close(src)


def rewrite_delta(
    delta: Delta,
    output: str | Path,
    replaced: dict[str, np.ndarray],
    record: dict[str, Any],
    *,
    shard_size: int = DEFAULT_SHARD_BYTES,
    threads: int = 1,
    force: bool = False,
) -> dict[str, Any]:
    """Write ``delta`` to a new directory with some stored tensors replaced, atomically.

    Args:
        delta: an opened delta (:meth:`Delta.open`, checksums verified).
        output: the directory to create (checked by the caller with
            :func:`ftrecycle.io.output.check_output`).
        replaced: stored tensor name (a dense diff or a part ``name::part``) -> its new values,
            in the tensor's storage dtype and shape.
        record: top-level manifest fields to add or replace (e.g. ``{"calibration": {...}}``).
        shard_size: the largest shard, in bytes.
        threads: threads for the checksums.
        force: replace an existing ``output``.

    Returns:
        The new manifest (as written: local paths relative to ``output``).

    Raises:
        ConfigError: a replacement names no stored tensor, or has another dtype or shape.
        CheckpointError: a shard of ``delta`` is truncated.
        OutputError: the output cannot be written; nothing is left at ``output``.
    """
    values = _check_replacements(delta, replaced)
    tensors = delta.shards().tensors
    order = list(delta.manifest.get("checksums") or tensors)
    manifest = copy.deepcopy(delta.manifest)
    for role in ("base", "finetuned"):  # the input's manifest names them relative to the input delta
        described = manifest.get(role)
        if isinstance(described, dict) and isinstance(described.get("path"), str):
            described["path"] = moved_path(described["path"], delta.path)
    manifest.update(record)
    with atomic_directory(output, force=force) as tmp:
        writer = ShardedWriter(
            tmp, [(n, tensors[n].dtype, tensors[n].shape) for n in order], max_shard_bytes=shard_size, prefix=PREFIX
        )
        writer.open()
        try:
            for name in order:
                slot = writer.slots[name]
                if name in values:
                    pwrite_all(slot.fd, values[name].reshape(-1).view(np.uint8).data, slot.offset)
                else:
                    _copy_bytes(tensors[name], slot.fd, slot.offset)
        finally:
            writer.close()
        found = _index_safetensors(tmp, INDEX, PREFIX)
        if found is None:  # cannot happen: the writer made at least one shard
            raise CheckpointError(f"{tmp}: the rewritten delta's shards were not written")
        manifest["checksums"], _ = checksums(found[0], threads)
        src = delta.path / FINETUNED_DIR
        if src.is_dir() and not src.is_symlink():
            (tmp / FINETUNED_DIR).mkdir()
            copy_files(src, tmp / FINETUNED_DIR, CONFIG_FILES + TOKENIZER_FILES)
        manifest = portable(manifest, Path(output))
        write_json(tmp / MANIFEST, manifest)
        write_card(tmp, delta_card(manifest))
    return manifest


def stored_values(delta: Delta, name: str) -> np.ndarray:
    """One stored tensor of an opened delta, whole, in its storage dtype and shape (a fresh array)."""
    info = delta.shards().tensors[name]
    raw = np.empty(info.nbytes, dtype=np.uint8)
    return delta.shards().read(info, 0, math.prod(info.shape), raw).reshape(info.shape).copy()
