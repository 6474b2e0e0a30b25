"""Options shared by the commands that write tensors, validated once up front."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ftrecycle.dtypes import COMPUTE_DTYPES, DType, parse_dtype
from ftrecycle.engine import Engine, chunk_for_budget, default_threads
from ftrecycle.errors import ConfigError
from ftrecycle.io.output import ShardedWriter, parse_size
from ftrecycle.plan import OutTensor

#: Called with (bytes just written, total bytes to write).
ProgressFn = Callable[[int, int], None]

DEFAULT_MAX_MEMORY = "512MiB"
DEFAULT_SHARD_SIZE = "5GB"


@dataclass(frozen=True)
class WriteSettings:
    """Validated settings of one tensor-writing run."""

    alpha: float
    compute_dtype: DType
    max_memory: int
    shard_size: int
    threads: int
    allow_nonfinite: bool
    fsync: bool

    @classmethod
    def parse(
        cls,
        *,
        alpha: float = 1.0,
        compute_dtype: str = "float32",
        max_memory: str | int = DEFAULT_MAX_MEMORY,
        shard_size: str | int = DEFAULT_SHARD_SIZE,
        threads: int | None = None,
        allow_nonfinite: bool = False,
        fsync: bool = False,
    ) -> WriteSettings:
        """Validate user values.

        Raises:
            ConfigError: any value out of range.
        """
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ConfigError(f"--alpha must be a finite number, got {alpha!r}")
        if threads is not None and threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {threads}")
        return cls(
            alpha=float(alpha),
            compute_dtype=parse_dtype(compute_dtype, allowed=COMPUTE_DTYPES, flag="--compute-dtype"),
            max_memory=parse_size(max_memory, flag="--max-memory"),
            shard_size=parse_size(shard_size, flag="--shard-size"),
            threads=threads or default_threads(),
            allow_nonfinite=allow_nonfinite,
            fsync=fsync,
        )

    def engine(self, total: int, progress: ProgressFn | None) -> Engine:
        """An engine sized to the memory budget."""
        chunk = chunk_for_budget(self.max_memory, self.threads, self.compute_dtype)
        report = None if progress is None else (lambda n: progress(n, total))
        return Engine(
            alpha=self.alpha,
            compute=self.compute_dtype,
            threads=self.threads,
            chunk=chunk,
            allow_nonfinite=self.allow_nonfinite,
            progress=report,
        )


def make_writer(directory: Path, tensors: list[OutTensor], settings: WriteSettings, prefix: str) -> ShardedWriter:
    """The shard layout for ``tensors`` (files are created by :meth:`ShardedWriter.open`)."""
    return ShardedWriter(
        directory,
        [(t.name, t.dtype, t.shape) for t in tensors],
        max_shard_bytes=settings.shard_size,
        prefix=prefix,
    )


def existing_ancestor(path: Path) -> Path:
    """The nearest directory at or above ``path`` that exists."""
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return p


def write_plan(
    tensors: list[OutTensor],
    out: Path,
    *,
    settings: WriteSettings,
    prefix: str,
    force: bool,
    progress: ProgressFn | None,
    finish: Callable[[Path], None],
    extra: Callable[[ShardedWriter, Engine], None] | None = None,
) -> int:
    """Compute ``tensors`` into shards of a new directory ``out``, atomically.

    ``finish`` writes the non-weight files into the temporary directory before the rename;
    ``extra`` fills the tensors that have no pieces (compressed parts) after the engine ran.

    Returns:
        The number of tensor bytes written.

    Raises:
        OutputError: not enough disk space, or ``out`` appeared meanwhile.
        MemoryBudgetError: the budget cannot hold the minimal buffers.
        NonFiniteError, CheckpointError: from the engine; nothing is left under ``out``.
    """
    from ftrecycle.io.output import atomic_directory, check_free_space

    total = sum(t.nbytes for t in tensors)
    check_free_space(existing_ancestor(out.parent), total)
    engine = settings.engine(total, progress)
    with atomic_directory(out, force=force) as tmp:
        writer = make_writer(tmp, tensors, settings, prefix)
        writer.open()
        try:
            engine.run(tensors, writer)
            if extra is not None:
                extra(writer, engine)
        finally:
            writer.close(sync=settings.fsync)
        finish(tmp)
    return total
