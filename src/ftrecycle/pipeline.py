"""The write pipeline shared by the operations that write tensors: settings, engine, shards, atomic output."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ftrecycle.dtypes import BY_NAME, DType
from ftrecycle.engine import Engine, chunk_for_budget, default_threads
from ftrecycle.io.output import ShardedWriter, atomic_directory, check_free_space
from ftrecycle.io.provenance import RecordPaths
from ftrecycle.options import Output, Precision, Resources, Scaling
from ftrecycle.terms import OutTensor

#: Called with (bytes just written, total bytes to write).
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class WriteSettings:
    """The settings of one tensor-writing run, in the engine's terms (sizes in bytes, dtypes resolved).

    Built from option groups that were checked when they were made (:meth:`of`); nothing here
    checks them again.
    """

    alpha: float
    compute_dtype: DType
    max_memory: int
    shard_size: int
    threads: int
    allow_nonfinite: bool
    fsync: bool
    force: bool
    record_paths: RecordPaths = "relative"

    @classmethod
    def of(
        cls, precision: Precision, resources: Resources, output: Output, scaling: Scaling | None = None
    ) -> WriteSettings:
        """The settings of a run from its option groups (no ``scaling``: alpha 1, as for ``diff``).

        Raises:
            ConfigError: ``scaling.alpha`` is still ``auto``.
        """
        return cls(
            alpha=1.0 if scaling is None else scaling.resolved_alpha(),
            compute_dtype=BY_NAME[precision.compute_dtype],
            max_memory=int(resources.max_memory),
            shard_size=int(output.shard_size),
            threads=resources.threads or default_threads(),
            allow_nonfinite=precision.allow_nonfinite,
            fsync=output.fsync,
            force=output.force,
            record_paths=output.record_paths,
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
    progress: ProgressFn | None,
    finish: Callable[[Path], None],
    extra: Callable[[ShardedWriter, Engine], None] | None = None,
) -> int:
    """Compute ``tensors`` into shards of a new directory ``out``, atomically.

    Args:
        tensors: what to write, with the pieces each is computed from.
        out: the directory to create (replaced when ``settings.force``).
        settings: the run's settings.
        prefix: the shards' file name prefix.
        progress: called with (bytes written, total bytes).
        finish: writes the non-weight files into the temporary directory before the rename.
        extra: fills the tensors that have no pieces (compressed parts) after the engine ran.

    Returns:
        The number of tensor bytes written.

    Raises:
        OutputError: not enough disk space, or ``out`` appeared meanwhile.
        MemoryBudgetError: the budget cannot hold the minimal buffers.
        NonFiniteError, CheckpointError: from the engine; nothing is left under ``out``.
    """
    total = sum(t.nbytes for t in tensors)
    check_free_space(existing_ancestor(out.parent), total)
    engine = settings.engine(total, progress)
    with atomic_directory(out, force=settings.force) as tmp:
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
