"""Write outputs atomically: a temporary directory beside the destination, renamed at the end."""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftrecycle.dtypes import DType
from ftrecycle.errors import ConfigError, OutputError
from ftrecycle.io.safetensors_format import PlannedTensor, build_header

TMP_MARK = ".ftrecycle-tmp-"
#: the largest size --shard-size or --max-memory accept (1 PiB): beyond it a number is a typo
MAX_SIZE = 2**50
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int, *, flag: str = "size") -> int:
    """Parse ``"5GB"``, ``"512MiB"`` or a plain byte count.

    Raises:
        ConfigError: not a finite positive size, or one above ``MAX_SIZE`` (1 PiB).
    """
    if isinstance(text, bool):
        raise ConfigError(f"{flag} {text!r} is not a size like 5GB, 512MiB or 1000000")
    if isinstance(text, int):
        value = text
    else:
        s = text.strip().upper().replace(" ", "")
        num = s.rstrip("KMGTIB")
        unit = s[len(num) :]
        try:
            number = float(num)
            factor = _UNITS[unit]
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{flag} {text!r} is not a size like 5GB, 512MiB or 1000000") from e
        if not math.isfinite(number) or number * factor > MAX_SIZE:
            raise ConfigError(f"{flag} {text!r} is not a finite size of at most 1PiB")
        value = int(number * factor)
    if value <= 0:
        raise ConfigError(f"{flag} must be positive, got {text!r}")
    if value > MAX_SIZE:
        raise ConfigError(f"{flag} {text!r} is above the largest size accepted, 1PiB")
    return value


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output_path(out: Path, inputs: list[Path], *, force: bool) -> None:
    """Refuse an existing output (without ``force``) and an output inside an input or around one.

    Raises:
        OutputError: with the fix in the message.
    """
    o = out.resolve()
    for i in inputs:
        i = i.resolve()
        if o == i or i in o.parents or o in i.parents:
            raise OutputError(f"output {out} overlaps input {i}: choose an output path outside the inputs")
    if out.exists() and not force:
        raise OutputError(f"output {out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory; remove it or choose another path")


def check_free_space(directory: Path, needed: int) -> None:
    """Refuse to start a write that cannot fit (with 1% + 64 MiB to spare).

    Raises:
        OutputError: not enough free space.
    """
    free = shutil.disk_usage(directory).free
    want = int(needed * 1.01) + 64 * 2**20
    if free < want:
        raise OutputError(
            f"not enough free space in {directory}: the output needs {needed / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB are free; free some space or write elsewhere with -o"
        )


@contextlib.contextmanager
def atomic_directory(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``out`` only if the block succeeds.

    The temporary directory is a hidden sibling of ``out`` (same filesystem, so the
    final rename is atomic). On any exception it is removed; if the process is killed
    it stays behind under a hidden name and is removed by the next run for ``out``.
    """
    parent = out.parent.resolve()
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{out.name}{TMP_MARK}*"):
        try:
            pid = int(stale.name.rsplit(TMP_MARK, 1)[1].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".{out.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        if out.exists():
            if not force:
                raise OutputError(f"output {out} appeared while writing; pass --force to replace it")
            trash = parent / f".{out.name}{TMP_MARK}{os.getpid()}-old-{secrets.token_hex(4)}"
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: Path, data: Any) -> None:
    """Write pretty JSON with a trailing newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@dataclass(frozen=True)
class Slot:
    """Where one tensor's data goes: an open file descriptor and a byte offset."""

    fd: int
    offset: int


class ShardedWriter:
    """Lay tensors out in safetensors shards with Hugging Face names, then accept positioned writes.

    Shards are ``{prefix}-00001-of-0000N.safetensors`` with ``{prefix}.safetensors.index.json``,
    or a single ``{prefix}.safetensors`` when everything fits one shard, as
    ``save_pretrained`` does.
    """

    def __init__(
        self,
        directory: Path,
        tensors: list[tuple[str, DType, tuple[int, ...]]],
        *,
        max_shard_bytes: int,
        prefix: str = "model",
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.directory = directory
        self.prefix = prefix
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for name, dtype, shape in tensors:
            nbytes = PlannedTensor(name, dtype, shape, 0).nbytes
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(PlannedTensor(name, dtype, shape, size))
            size += nbytes
        self.shards = shards
        n = len(shards)
        self.names = (
            [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.metadata = metadata
        self.total_bytes = sum(t.nbytes for s in shards for t in s)
        self._fds: list[int] = []
        self.slots: dict[str, Slot] = {}

    def open(self) -> None:
        """Create the shard files with their headers and full sizes."""
        for fname, shard in zip(self.names, self.shards, strict=True):
            header = build_header(shard, self.metadata)
            fd = os.open(self.directory / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.write(fd, header)
            data = sum(t.nbytes for t in shard)
            os.ftruncate(fd, len(header) + data)
            for t in shard:
                self.slots[t.name] = Slot(fd, len(header) + t.begin)

    def close(self, *, sync: bool = True) -> None:
        """Flush and close the shards, and write the index when there are several."""
        for fd in self._fds:
            if sync:
                os.fsync(fd)
            os.close(fd)
        self._fds = []
        if len(self.names) > 1:
            weight_map = {t.name: fname for fname, shard in zip(self.names, self.shards, strict=True) for t in shard}
            write_json(
                self.directory / f"{self.prefix}.safetensors.index.json",
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
            )
