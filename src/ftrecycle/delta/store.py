"""Reading a delta directory: the :class:`Delta` owns its checked manifest, its shards and its terms.

The manifest's schema and file names are in :mod:`ftrecycle.delta.manifest`; writing a delta
is :class:`ftrecycle.delta.write.DeltaWriter`. :func:`open_delta` and :func:`read_manifest`
are the module-level conveniences over :class:`Delta`.
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ftrecycle.arch import check_compatible
from ftrecycle.codecs import CODECS, SEP, Packed
from ftrecycle.delta.manifest import (
    FINETUNED_DIR,
    INDEX,
    PREFIX,
    dense_bytes,
    load_manifest,
    stored_names,
)
from ftrecycle.dtypes import BY_NAME, FLOAT_DTYPES, DType, from_storage
from ftrecycle.errors import CheckpointError, ConfigError, IncompatibleModelsError
from ftrecycle.io.checkpoint import Checkpoint, open_checkpoint
from ftrecycle.io.jsonfile import read_json
from ftrecycle.io.model_files import CONFIG_FILES, TOKENIZER_FILES
from ftrecycle.io.safetensors_format import TensorInfo
from ftrecycle.terms import Operand, PackedTerm, Stored, Term

HASH_BLOCK = 2 << 20  # bytes per read: a float64 copy of a bf16 block is 8 MiB


class Delta:
    """A delta directory: its checked manifest and, once opened, its indexed shards and terms.

    Make one with :meth:`read` (the manifest only) or :meth:`open` (shards too); an opened
    delta holds file handles until :meth:`close` (it is a context manager).

    Attributes:
        path: the directory.
        manifest: the manifest, checked against its schema.
        ckpt: the indexed shards (opened deltas only).
        terms: the diff's terms by tensor name (opened deltas only).
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        ckpt: Checkpoint | None = None,
        terms: dict[str, Term] | None = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.ckpt = ckpt
        self.terms: dict[str, Term] = terms or {}

    @classmethod
    def read(cls, path: str | Path) -> Delta:
        """The delta's manifest, checked; no shard is opened.

        Raises:
            CheckpointError: not a delta directory, or a malformed manifest.
        """
        p = Path(path).expanduser()
        return cls(p, load_manifest(p))

    @classmethod
    def open(
        cls, path: str | Path, *, check: bool = True, threads: int = 1, max_metadata_bytes: int | None = None
    ) -> Delta:
        """Open a delta directory: its manifest, its shards, and its terms.

        Args:
            path: the directory.
            check: verify every tensor's checksum first (one read of the delta).
            threads: threads for the checksums.
            max_metadata_bytes: refuse shards whose index would take more memory than this
                (see :func:`ftrecycle.io.checkpoint.open_checkpoint`).

        Returns:
            The opened delta.

        Raises:
            CheckpointError: not a delta, corrupt shards, or shards that disagree with the manifest.
        """
        p = Path(path).expanduser()
        if not p.is_dir():
            raise CheckpointError(f"{path}: no such delta directory")
        manifest = load_manifest(p)
        ckpt = open_checkpoint(
            str(p), require_config=False, index_name=INDEX, prefix=PREFIX, max_metadata_bytes=max_metadata_bytes
        )
        ckpt.config = dict(manifest.get("base_config") or {})
        try:
            terms = _terms(p, ckpt, manifest)
            if check:
                verify(ckpt, manifest, threads, terms)
        except BaseException:
            ckpt.close()
            raise
        return cls(p, manifest, ckpt, terms)

    @property
    def aliases(self) -> dict[str, str]:
        """Tied tensor name -> the stored tensor it shares."""
        return {str(k): str(v) for k, v in (self.manifest.get("aliases") or {}).items()}

    @property
    def entries(self) -> dict[str, Any]:
        """The manifest's entry of each listed tensor."""
        return dict(self.manifest.get("tensors") or {})

    @property
    def dtype(self) -> DType:
        """The dtype dense diffs are stored in (and compressed tensors' float parts)."""
        return BY_NAME[self.manifest.get("dtype", "float32")]

    def dense_bytes(self) -> int:
        """Bytes the listed tensors would take stored dense in the delta's dtype."""
        return dense_bytes(self.entries, self.dtype.itemsize)

    def file_bytes(self) -> int:
        """Bytes the shard files take on disk (headers included)."""
        return sum(f.stat().st_size for f in self.path.glob(f"{PREFIX}*.safetensors"))

    def compression_errors(self) -> list[float]:
        """The relative error ``||d - decoded|| / ||d||`` of every compressed tensor."""
        return [float(e["compression"]["error"]) for e in self.entries.values() if e.get("compression")]

    def finetuned_files(self, *, config: bool, tokenizer: bool) -> Path:
        """The delta's ``finetuned/`` directory, checked (see :func:`finetuned_files`)."""
        return finetuned_files(self.path, self.manifest, config=config, tokenizer=tokenizer)

    def shards(self) -> Checkpoint:
        """The indexed shards of an opened delta.

        Raises:
            ConfigError: the delta was only read (:meth:`read`), not opened.
        """
        if self.ckpt is None:
            raise ConfigError(f"{self.path}: the delta's manifest was read but its shards were not opened")
        return self.ckpt

    def close(self) -> None:
        """Close the shards' files (an opened delta)."""
        if self.ckpt is not None:
            self.ckpt.close()

    def __enter__(self) -> Delta:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_manifest(path: Path) -> dict[str, Any]:
    """Read a delta directory's manifest and check its schema (see docs/delta-format.md).

    Args:
        path: the delta directory.

    Returns:
        The manifest (:attr:`Delta.manifest` of :meth:`Delta.read`).

    Raises:
        CheckpointError: missing, unreadable, of an unknown format or version, or malformed.
    """
    return Delta.read(path).manifest


def open_delta(
    path: str | Path, *, check: bool = True, threads: int = 1, max_metadata_bytes: int | None = None
) -> tuple[Checkpoint, dict[str, Any], dict[str, Term], dict[str, str]]:
    """Open a delta directory (:meth:`Delta.open`), as a tuple.

    Args:
        path: the directory.
        check: verify every tensor's checksum first (one read of the delta).
        threads: threads for the checksums.
        max_metadata_bytes: refuse shards whose index would take more memory than this.

    Returns:
        The indexed shards, the manifest, the diff's terms, and its tied aliases.

    Raises:
        CheckpointError: not a delta, corrupt shards, or shards that disagree with the manifest.
    """
    d = Delta.open(path, check=check, threads=threads, max_metadata_bytes=max_metadata_bytes)
    return d.shards(), d.manifest, d.terms, d.aliases


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


def verify(ckpt: Checkpoint, manifest: dict[str, Any], threads: int, terms: dict[str, Term] | None = None) -> None:
    """Check every stored tensor against the manifest's checksums (version 2), and the column
    indices of every sparse tensor in ``terms`` against its width.

    :func:`~ftrecycle.delta.manifest.load_manifest` has made sure a version 2 manifest has a checksum for every stored
    tensor, and :func:`open_delta` that the shards store exactly those tensors.

    Raises:
        CheckpointError: a tensor whose bytes changed, naming its file.
    """
    want = manifest.get("checksums") if manifest["version"] >= 2 else None
    if not want:
        return
    got, _ = checksums({n: ckpt.tensors[n] for n in want}, threads)
    for name, digest in got.items():
        if digest != want[name]:
            raise CheckpointError(
                f"{ckpt.tensors[name].path}: tensor {name!r} fails its checksum (the file is corrupt or was "
                "changed); re-download or recreate the delta with `ftrecycle diff`"
            )
    for term in (terms or {}).values():
        if isinstance(term, PackedTerm) and term.packed.method == "sparse":
            _check_indices(term.name, term.packed)


#: Elements of a sparse tensor's indices checked at a time.
INDEX_BLOCK = 1 << 20


def _check_indices(name: str, p: Packed) -> None:
    """Every column index of a sparse tensor lies in ``[0, n)`` (one read of ``indices``)."""
    src: Operand = p.parts["indices"]
    n, k = p.shape[1], src.info.numel
    raw = np.empty(min(k, INDEX_BLOCK) * src.info.dtype.itemsize, dtype=np.uint8)
    for s in range(0, k, INDEX_BLOCK):
        idx = src.ckpt.read(src.info, s, min(INDEX_BLOCK, k - s), raw)
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise CheckpointError(
                f"{src.info.path}: {src.info.name!r} holds a column index outside [0, {n}) of tensor {name!r}; "
                "recreate the delta with `ftrecycle diff`"
            )


def _terms(p: Path, ckpt: Checkpoint, manifest: dict[str, Any]) -> dict[str, Term]:
    """The diff's terms, each stored tensor checked against its manifest entry before any read."""
    listed: dict[str, Any] = manifest.get("tensors") or {}
    stored = stored_names(manifest)
    missing = sorted(stored - set(ckpt.tensors))
    if missing:
        raise CheckpointError(
            f"{p}: the manifest lists tensors the shards lack: {', '.join(missing[:10])}; "
            "recreate the delta with `ftrecycle diff`"
        )
    extra = sorted(set(ckpt.tensors) - stored)
    if manifest["version"] >= 2 and extra:
        raise CheckpointError(
            f"{ckpt.tensors[extra[0]].path}: the shards store tensors the manifest does not list (and has no "
            "checksum for): "
            f"{', '.join(map(repr, extra[:10]))}; recreate the delta with `ftrecycle diff`"
        )
    for name in extra:
        if SEP in name:
            raise CheckpointError(
                f"{ckpt.tensors[name].path}: stored tensor {name!r} contains {SEP!r}, the separator of compressed "
                "parts, but the manifest lists no such part; recreate the delta with `ftrecycle diff`"
            )
    terms: dict[str, Term] = {}
    for name, entry in listed.items():
        shape = tuple(entry["shape"])
        if entry.get("compression"):
            method = entry["compression"]["method"]
            infos = {k: ckpt.tensors[v] for k, v in entry["parts"].items()}
            check_parts(name, method, shape, infos, BY_NAME.get(manifest.get("dtype", "float32")))
            ops = {k: Operand(ckpt, info) for k, info in infos.items()}
            packed = Packed(method, shape, ops)
            if method == "sparse":
                _check_indptr(name, packed)
            terms[name] = PackedTerm(name, shape, packed)
            continue
        info = ckpt.tensors[name]
        if shape != info.shape:
            raise CheckpointError(
                f"{info.path}: tensor {name!r} has shape {list(info.shape)} but the manifest says "
                f"{entry['shape']}; recreate the delta"
            )
        _check_dtype(info, entry.get("dtype"))
        terms[name] = Stored(name, info.shape, Operand(ckpt, info))
    for name in extra:  # version 1 lists every stored tensor; keep any it does not
        _check_dtype(ckpt.tensors[name], None)
        terms[name] = Stored(name, ckpt.tensors[name].shape, Operand(ckpt, ckpt.tensors[name]))
    return terms


def _check_dtype(info: TensorInfo, listed: str | None) -> None:
    if info.dtype not in FLOAT_DTYPES or (listed is not None and info.dtype.name != listed):
        raise CheckpointError(
            f"{info.path}: tensor {info.name!r} is stored as {info.dtype}, but a delta stores dense diffs as "
            f"{listed or 'a float dtype'}; recreate the delta with `ftrecycle diff`"
        )


def check_parts(
    name: str, method: str, shape: tuple[int, ...], parts: dict[str, TensorInfo], values: DType | None = None
) -> None:
    """Check every part's dtype and shape against its tensor's shape and method, before any read.

    What each method's parts must be is its codec's ``expect`` (see :mod:`ftrecycle.codecs`). A
    part that may take several float dtypes holds values in the delta's dtype (its factors, its
    exact values), which the manifest records: a header naming another one (whose bytes, and so
    whose checksum, are the same) would decode to other numbers.

    Args:
        name: the tensor.
        method: its compression method.
        shape: its (dense) shape.
        parts: part name -> the stored part.
        values: the delta's dtype, from the manifest (None: not checked).

    Raises:
        CheckpointError: a part of another dtype or shape (an exchanged or corrupt part), naming it.
    """
    m, n = shape
    codec = CODECS.get(method)
    if codec is None:  # load_manifest lets no other method through
        raise CheckpointError(f"tensor {name!r}: unknown compression method {method!r}")
    for part, (dtypes, pshape) in codec.expect(m, n, parts).items():
        info = parts[part]
        if info.dtype not in dtypes or info.shape != pshape:
            names = "/".join(sorted(d.name for d in dtypes)) if len(dtypes) < 4 else "float"
            raise CheckpointError(
                f"{info.path}: part {info.name!r} of {method} tensor {name!r} {list(shape)} is "
                f"{info.dtype} {list(info.shape)}, not {names} {list(pshape)}; the part is corrupt or belongs to "
                "another tensor; recreate the delta with `ftrecycle diff`"
            )
        if values is not None and len(dtypes) > 1 and dtypes <= FLOAT_DTYPES and info.dtype is not values:
            raise CheckpointError(
                f"{info.path}: part {info.name!r} of {method} tensor {name!r} is {info.dtype}, but the manifest "
                f"says the delta stores its values as {values}; the part is corrupt; recreate the delta with "
                "`ftrecycle diff`"
            )


def _check_indptr(name: str, p: Packed) -> None:
    """A sparse tensor's row pointers start at 0, never decrease, and end at its entry count:
    decoding then never reads outside its ``indices``/``values`` (one read of ``indptr``)."""
    src: Operand = p.parts["indptr"]
    k = p.parts["values"].info.numel
    ptr = src.ckpt.read(src.info, 0, src.info.numel, np.empty(src.info.nbytes, dtype=np.uint8))
    if int(ptr[0]) != 0 or int(ptr[-1]) != k or bool(np.any(np.diff(ptr) < 0)):
        raise CheckpointError(
            f"{src.info.path}: {src.info.name!r} is not a valid row pointer of tensor {name!r} (it must start at 0, "
            f"never decrease and end at {k}); recreate the delta with `ftrecycle diff`"
        )


def finetuned_files(path: Path, manifest: dict[str, Any], *, config: bool, tokenizer: bool) -> Path:
    """The delta's ``finetuned/`` directory, checked before ``--config-from``/``--tokenizer-from
    finetuned`` copy from it.

    Only regular files are copied: a symlink (which could point at any file on the machine) or
    a FIFO in ``finetuned/`` is refused, not followed. ``--config-from finetuned`` needs a
    ``config.json`` whose architecture agrees with the delta's ``base_config``;
    the tokenizer files are copied where they exist (as from a model directory; the output's
    provenance lists them).

    Args:
        path: the delta directory.
        manifest: its (checked) manifest.
        config: config files will be copied from it.
        tokenizer: tokenizer files will be copied from it.

    Raises:
        ConfigError: the delta has no finetuned/ (or, for --config-from, no config.json there).
        CheckpointError: a file there is a symlink or not a regular file.
        IncompatibleModelsError: its config.json is of another architecture than the delta's base.
    """
    src = path / FINETUNED_DIR
    if not (config or tokenizer):
        return src
    flags = " and ".join(f"--{k}-from finetuned" for k, on in (("config", config), ("tokenizer", tokenizer)) if on)
    if src.is_symlink() or (src.exists() and not src.is_dir()):
        raise CheckpointError(
            f"{src}: not a directory of the delta (a symlink or a file); {flags} copies only regular files from "
            "inside the delta; recreate the delta with `ftrecycle diff`"
        )
    if not src.exists():
        raise ConfigError(
            f"{flags}: the delta {path} has no {FINETUNED_DIR}/ directory to copy from; use target instead, or "
            "recreate the delta with `ftrecycle diff`"
        )
    for name in CONFIG_FILES + TOKENIZER_FILES:
        f = src / name
        if f.is_symlink() or (f.exists() and not f.is_file()):
            raise CheckpointError(
                f"{f}: a symlink or not a regular file; ftrecycle copies only regular files from a delta's "
                f"{FINETUNED_DIR}/ (replace it with the file itself, or use --config-from/--tokenizer-from target)"
            )
    if config:
        if not (src / "config.json").is_file():
            raise ConfigError(
                f"--config-from finetuned: the delta {path} stores no {FINETUNED_DIR}/config.json; use "
                "--config-from target, or recreate the delta with `ftrecycle diff`"
            )
        cfg = read_json(src / "config.json", what="fine-tuned config", fix="use --config-from target")
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{src / 'config.json'}: not a JSON object; use --config-from target")
        try:
            check_compatible({"delta's base": manifest.get("base_config") or {}, "delta's fine-tuned config": cfg})
        except IncompatibleModelsError as e:
            raise IncompatibleModelsError(f"{src / 'config.json'}: {e}; use --config-from target") from e
    return src


def check_names(names: Any, where: Path) -> None:
    """Refuse model tensor names that contain the part separator ``::``: stored in a delta, such a
    name (``w.weight::a``) would collide with a compressed tensor's part names.

    Raises:
        CheckpointError: naming the first such tensor and ``where`` it comes from.
    """
    bad = sorted(n for n in names if SEP in n)
    if bad:
        raise CheckpointError(
            f"{where}: tensor {bad[0]!r}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''} contains {SEP!r}, "
            "which a delta uses to name the parts of compressed tensors; rename the tensor in the model's "
            "safetensors files before diffing it"
        )
