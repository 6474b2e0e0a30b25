"""Index a model's weights (sharded safetensors, or pickles when allowed) and read tensor ranges.

Nothing here loads a whole tensor unless asked: :meth:`Checkpoint.read` fills a
caller's buffer with one element range of one tensor by a positioned read, so a
transfer's memory is bounded by its buffers, not by the model.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ftrecycle.arch import check_config_types
from ftrecycle.dtypes import from_torch
from ftrecycle.errors import CheckpointError, MemoryBudgetError, short
from ftrecycle.io.hub import ResolvedRef, containment_root, inside, link_target, resolve_ref
from ftrecycle.io.jsonfile import open_regular, read_json_object
from ftrecycle.io.safetensors_format import (
    TensorInfo,
    count_entries,
    pread_exact,
    read_header,
    read_header_length,
)

SAFE_INDEX = "model.safetensors.index.json"
#: Size caps of the JSON files of a model directory (real ones are a few kB and a few MB).
MAX_CONFIG_BYTES = 16 << 20
MAX_INDEX_BYTES = 64 << 20
#: Peak memory that indexing a safetensors header takes: per header byte (the raw bytes, then the
#: text) and per tensor entry (its parsed JSON, then its TensorInfo). Fitted to VmHWM on
#: 100,000-tensor headers (+95 MiB for a 7.4 MB header of 1-5 character names, +107 MiB for a
#: 12.3 MB one of 48-character names: 2.6 bytes per byte + 800 per tensor), then rounded up.
METADATA_BYTES_PER_HEADER_BYTE = 4
METADATA_BYTES_PER_TENSOR = 1024


@dataclass
class Checkpoint:
    """A model (or delta) directory whose tensors can be read by element range.

    Attributes:
        source: where the directory came from.
        config: the parsed ``config.json`` ({} where there is none).
        tensors: every stored tensor, by name.
        files: the weight files, in order.
        format: ``"safetensors"`` or ``"pickle"``.
        metadata_bytes: the memory its index may have taken (see :func:`metadata_cost`), which a
            caller counts toward its memory budget.
    """

    source: ResolvedRef
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    files: list[Path]
    format: str = "safetensors"
    metadata_bytes: int = 0
    _memory: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _fds: dict[Path, int] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def path(self) -> Path:
        """The local directory."""
        return self.source.path

    def read(self, info: TensorInfo, start: int, count: int, raw: np.ndarray) -> np.ndarray:
        """Read ``count`` elements of a tensor from element ``start``.

        Args:
            info: the tensor (one of :attr:`tensors`).
            start: first element, in the flattened tensor.
            count: number of elements.
            raw: a uint8 buffer of at least ``count * itemsize`` bytes to read into.

        Returns:
            A 1-D array of the tensor's storage dtype (a view of ``raw``, or of the in-memory tensor).
        """
        size = info.dtype.itemsize
        if self.format == "pickle":
            return self._memory[info.name][start * size : (start + count) * size].view(info.dtype.storage)
        view = raw[: count * size]
        pread_exact(self._fd(info.path), view.data, info.offset + start * size, info.path)
        return view.view(info.dtype.storage)

    def copy_into(self, info: TensorInfo, start: int, count: int, fd: int, offset: int) -> bool:
        """Copy elements straight into another file with ``copy_file_range`` (no user-space copy).

        Returns:
            False where the kernel cannot do it (pickles, other filesystems); the caller then reads and writes.
        """
        if self.format == "pickle" or not hasattr(os, "copy_file_range"):
            return False
        size = info.dtype.itemsize
        src, todo, done = info.offset + start * size, count * size, 0
        try:
            while done < todo:
                n = os.copy_file_range(self._fd(info.path), fd, todo - done, src + done, offset + done)
                if n <= 0:
                    return False
                done += n
        except OSError:
            return False
        return True

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = open_regular(path, what="safetensors file")
                    self._fds[path] = fd
        return fd

    def close(self) -> None:
        """Close the open files."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_config(path: Path, *, required: bool = True) -> dict[str, Any]:
    """Parse and check ``config.json`` in ``path``.

    Raises:
        CheckpointError: it is missing (when ``required``), not a regular file, not a JSON
            object, nested too deeply, or an architecture field has the wrong type.
    """
    cfg = path / "config.json"
    if not os.path.lexists(cfg):
        if required:
            raise CheckpointError(f"{path}: no config.json; a Hugging Face model directory needs one")
        return {}
    _check_inside(cfg, containment_root(path), "config.json")
    # transformers writes float("inf") as Infinity (Mamba's time_step_limit), so a config may hold it.
    data = read_json_object(cfg, what="config", max_bytes=MAX_CONFIG_BYTES, fix="restore the file", allow_nan=True)
    check_config_types(data, str(cfg))
    return data


def _check_inside(file: Path, root: Path, what: str) -> None:
    if not inside(file, root):
        raise CheckpointError(
            f"{file}: the {what} is a symlink that leads out of the model directory ({link_target(file)}); "
            "replace it with the file itself"
        )


def _shard_name(index: Path, name: object) -> str:
    """A shard named by an index must be a plain ``*.safetensors`` file name in the model directory."""
    if (
        not isinstance(name, str)
        or not name.endswith(".safetensors")
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or name.startswith(".")
    ):
        raise CheckpointError(
            f"{index}: names shard {short(name)}, which is not a plain *.safetensors file name in the model "
            "directory (no path separators, no '..', not absolute); re-download the index"
        )
    return name


def _read_index(index: Path) -> dict[str, str]:
    data = read_json_object(index, what="shard index", max_bytes=MAX_INDEX_BYTES, fix="re-download it")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        got = "missing" if weight_map is None else ("empty" if weight_map == {} else f"a {type(weight_map).__name__}")
        raise CheckpointError(
            f"{index}: corrupt index (weight_map is {got}; it must map every tensor name to its shard); re-download it"
        )
    for shard in weight_map.values():
        _shard_name(index, shard)
    return weight_map


def metadata_cost(files: list[Path]) -> int:
    """The peak memory that indexing these safetensors files will take, known without parsing them.

    Raises:
        CheckpointError: a file is not a regular file or its header length is corrupt.
    """
    total = 0
    for f in files:
        fd = open_regular(f, what="safetensors file")
        try:
            n = read_header_length(fd, f, os.fstat(fd).st_size)
            total += n * METADATA_BYTES_PER_HEADER_BYTE + count_entries(fd, n) * METADATA_BYTES_PER_TENSOR
        except OSError as e:
            raise CheckpointError(f"{f}: cannot read ({e.strerror or e}); check the file") from e
        finally:
            os.close(fd)
    return total


def _check_metadata_budget(root: Path, files: list[Path], max_metadata_bytes: int | None) -> int:
    """The memory indexing ``files`` will take, refused up front when it exceeds the budget."""
    cost = metadata_cost(files)
    if max_metadata_bytes is not None and cost > max_metadata_bytes:
        raise MemoryBudgetError(
            f"{root}: indexing its safetensors headers takes about {cost / 2**20:.0f} MiB, more than the "
            f"{max(max_metadata_bytes, 0) / 2**20:.0f} MiB that --max-memory leaves for it; "
            f"raise --max-memory by at least {math.ceil((cost - max_metadata_bytes) / 2**20)} MiB"
        )
    return cost


def _index_safetensors(
    root: Path, index_name: str, prefix: str, max_metadata_bytes: int | None = None
) -> tuple[dict[str, TensorInfo], list[Path], int] | None:
    index = root / index_name
    jail = containment_root(root)
    if os.path.lexists(index):
        _check_inside(index, jail, "shard index")
        weight_map = _read_index(index)
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.lexists(root / s)]
        if missing:
            raise CheckpointError(
                f"{index}: names shard(s) {', '.join(missing)} that are not in {root}; re-download them"
            )
        files = [root / s for s in shards]
    else:
        files = sorted(root.glob(f"{prefix}*.safetensors"))
        if not files:
            return None
        weight_map = None
    for f in files:
        _check_inside(f, jail, "shard")
    cost = _check_metadata_budget(root, files, max_metadata_bytes)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        found, _ = read_header(f)
        for name, info in found.items():
            if name in tensors:
                raise CheckpointError(
                    f"{root}: tensor {short(name)} is stored twice ({tensors[name].path.name} and {f.name})"
                )
            tensors[name] = info
    if weight_map is not None:
        for name, shard in sorted(weight_map.items()):
            held = tensors.get(name)
            if held is None or held.path.name != shard:
                raise CheckpointError(
                    f"{index}: says tensor {short(name)} is in {shard}, which does not hold it; re-download"
                )
    return tensors, files, cost


def _index_pickles(root: Path) -> tuple[dict[str, TensorInfo], list[Path], dict[str, np.ndarray]]:
    import torch  # only pickles need torch to read

    files = sorted([*root.glob("*.bin"), *root.glob("*.pt")])
    tensors: dict[str, TensorInfo] = {}
    memory: dict[str, np.ndarray] = {}
    jail = containment_root(root)
    for f in files:
        _check_inside(f, jail, "weights file")
        os.close(open_regular(f, what="weights file"))  # torch.load would block on a FIFO
        try:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{f}: cannot load as a weights-only pickle ({type(e).__name__}: {e})") from e
        if not isinstance(state, dict):
            raise CheckpointError(f"{f}: holds a {type(state).__name__}, not a state dict of tensors")
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                continue
            if name in tensors:
                raise CheckpointError(f"{root}: tensor {short(name)} is stored twice")
            memory[name] = t.contiguous().reshape(-1).view(torch.uint8).numpy()
            tensors[name] = TensorInfo(name, from_torch(t.dtype), tuple(t.shape), f, -1)
    return tensors, files, memory


def open_checkpoint(
    ref: str | ResolvedRef,
    *,
    allow_pickle: bool = False,
    require_config: bool = True,
    index_name: str = SAFE_INDEX,
    prefix: str = "",
    max_metadata_bytes: int | None = None,
) -> Checkpoint:
    """Index a model directory (or hub id) without reading any tensor data.

    Args:
        ref: a local directory, a hub id ``org/name[@revision]``, or an already resolved ref.
        allow_pickle: accept ``.bin``/``.pt`` weights, loaded with ``torch.load(weights_only=True)``.
        require_config: fail when there is no ``config.json``.
        index_name: the sharded index file name to look for.
        prefix: the file-name prefix of unindexed safetensors shards.
        max_metadata_bytes: memory the index of this checkpoint may take; larger headers are
            refused before they are parsed (None: no limit but safetensors' 100 MB per header).

    Returns:
        The indexed checkpoint; close it (or use it as a context manager) when done.

    Raises:
        CheckpointError: no weights, corrupt or truncated shards, a pickle without ``allow_pickle``.
        HubError: a hub id that cannot be fetched.
        MemoryBudgetError: the headers would take more than ``max_metadata_bytes`` to index.
    """
    source = ref if isinstance(ref, ResolvedRef) else resolve_ref(ref, allow_pickle=allow_pickle)
    root = source.path
    config = load_config(root, required=require_config)
    found = _index_safetensors(root, index_name, prefix, max_metadata_bytes)
    if found is not None:
        tensors, files, cost = found
        return Checkpoint(source, config, tensors, files, metadata_bytes=cost)
    pickles = sorted([*root.glob("*.bin"), *root.glob("*.pt")])
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{root}: holds only pickle weights ({pickles[0].name}); pickles can run code when loaded: "
                "pass --allow-pickle to load them with torch.load(weights_only=True), or convert to safetensors"
            )
        tensors, files, memory = _index_pickles(root)
        return Checkpoint(source, config, tensors, files, format="pickle", _memory=memory)
    raise CheckpointError(
        f"{root}: no weights found; expected model.safetensors, {index_name} with its shards, "
        "or (with --allow-pickle) pytorch_model.bin"
    )
