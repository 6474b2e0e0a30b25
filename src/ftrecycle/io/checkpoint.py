"""Index a model's weights (sharded safetensors, or pickles when allowed) and read tensor ranges.

Nothing here loads a whole tensor unless asked: :meth:`Checkpoint.read` fills a
caller's buffer with one element range of one tensor by a positioned read, so a
transfer's memory is bounded by its buffers, not by the model.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ftrecycle.dtypes import from_torch
from ftrecycle.errors import CheckpointError
from ftrecycle.io.hub import ResolvedRef, resolve_ref
from ftrecycle.io.safetensors_format import TensorInfo, pread_exact, read_header

SAFE_INDEX = "model.safetensors.index.json"


@dataclass
class Checkpoint:
    """A model (or delta) directory whose tensors can be read by element range.

    Attributes:
        source: where the directory came from.
        config: the parsed ``config.json`` ({} where there is none).
        tensors: every stored tensor, by name.
        files: the weight files, in order.
        format: ``"safetensors"`` or ``"pickle"``.
    """

    source: ResolvedRef
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    files: list[Path]
    format: str = "safetensors"
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
                    fd = os.open(path, os.O_RDONLY)
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
    """Parse ``config.json`` in ``path``.

    Raises:
        CheckpointError: it is missing (when ``required``) or not a JSON object.
    """
    cfg = path / "config.json"
    if not cfg.is_file():
        if required:
            raise CheckpointError(f"{path}: no config.json; a Hugging Face model directory needs one")
        return {}
    try:
        data = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e}); restore the file") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg}: not a JSON object; restore the file")
    return data


def _index_safetensors(root: Path, index_name: str, prefix: str) -> tuple[dict[str, TensorInfo], list[Path]] | None:
    index = root / index_name
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: corrupt index (no readable weight_map: {e!r}); re-download it") from e
        missing = [s for s in shards if not (root / s).is_file()]
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
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        found, _ = read_header(f)
        for name, info in found.items():
            if name in tensors:
                raise CheckpointError(
                    f"{root}: tensor {name!r} is stored twice ({tensors[name].path.name} and {f.name})"
                )
            tensors[name] = info
    if weight_map is not None:
        for name, shard in sorted(weight_map.items()):
            held = tensors.get(name)
            if held is None or held.path.name != shard:
                raise CheckpointError(
                    f"{index}: says tensor {name!r} is in {shard}, which does not hold it; re-download"
                )
    return tensors, files


def _index_pickles(root: Path) -> tuple[dict[str, TensorInfo], list[Path], dict[str, np.ndarray]]:
    import torch  # only pickles need torch to read

    files = sorted([*root.glob("*.bin"), *root.glob("*.pt")])
    tensors: dict[str, TensorInfo] = {}
    memory: dict[str, np.ndarray] = {}
    for f in files:
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
                raise CheckpointError(f"{root}: tensor {name!r} is stored twice")
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
) -> Checkpoint:
    """Index a model directory (or hub id) without reading any tensor data.

    Args:
        ref: a local directory, a hub id ``org/name[@revision]``, or an already resolved ref.
        allow_pickle: accept ``.bin``/``.pt`` weights, loaded with ``torch.load(weights_only=True)``.
        require_config: fail when there is no ``config.json``.
        index_name: the sharded index file name to look for.
        prefix: the file-name prefix of unindexed safetensors shards.

    Returns:
        The indexed checkpoint; close it (or use it as a context manager) when done.

    Raises:
        CheckpointError: no weights, corrupt or truncated shards, a pickle without ``allow_pickle``.
        HubError: a hub id that cannot be fetched.
    """
    source = ref if isinstance(ref, ResolvedRef) else resolve_ref(ref, allow_pickle=allow_pickle)
    root = source.path
    config = load_config(root, required=require_config)
    found = _index_safetensors(root, index_name, prefix)
    if found is not None:
        tensors, files = found
        return Checkpoint(source, config, tensors, files)
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
