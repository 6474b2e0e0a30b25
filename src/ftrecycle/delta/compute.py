"""Compute a diff vector ``finetuned - base`` and store it as a delta directory."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from ftrecycle.arch import check_compatible
from ftrecycle.delta.store import FINETUNED_DIR, FORMAT, MANIFEST, PREFIX, VERSION
from ftrecycle.dtypes import parse_dtype
from ftrecycle.io.checkpoint import open_checkpoint
from ftrecycle.io.model_files import CONFIG_FILES, TOKENIZER_FILES, copy_files
from ftrecycle.io.output import check_output_path, write_json
from ftrecycle.io.provenance import base_record, describe_input
from ftrecycle.plan import MissingPolicy, VocabPolicy, plan_diff, source_terms
from ftrecycle.settings import DEFAULT_MAX_MEMORY, DEFAULT_SHARD_SIZE, ProgressFn, WriteSettings, write_plan
from ftrecycle.transfer import TransferResult


def diff(
    base: str,
    finetuned: str,
    output: str | Path,
    *,
    delta_dtype: str = "float32",
    compute_dtype: str = "float32",
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    vocab: VocabPolicy = "error",
    on_missing: MissingPolicy = "error",
    max_memory: str | int = DEFAULT_MAX_MEMORY,
    threads: int | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    allow_pickle: bool = False,
    fsync: bool = False,
    progress: ProgressFn | None = None,
) -> TransferResult:
    """Write the diff vector ``finetuned - base`` as a delta directory.

    Each floating tensor is ``cast(fl(B) - fl(A))`` in ``compute_dtype``, stored in
    ``delta_dtype``. With a float32 delta of a bf16/fp16 pair, applying it to ``base``
    gives back ``finetuned`` bit for bit (float32 models need a float64 delta and compute).
    Tied embeddings are stored once and listed as aliases in the manifest.

    Args:
        base: the base model (directory or hub id).
        finetuned: the fine-tuned model.
        output: delta directory to create.
        delta_dtype: ``float32`` (default), ``float64``, ``bfloat16`` or ``float16``.
        Others: as :func:`ftrecycle.transfer`.

    Returns:
        What was written.

    Raises:
        As :func:`ftrecycle.transfer`.
    """
    t0 = time.perf_counter()
    settings = WriteSettings.parse(
        compute_dtype=compute_dtype,
        max_memory=max_memory,
        shard_size=shard_size,
        threads=threads,
        allow_nonfinite=allow_nonfinite,
        fsync=fsync,
    )
    ddt = parse_dtype(delta_dtype, flag="--delta-dtype")
    out = Path(output).expanduser()
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(open_checkpoint(base, allow_pickle=allow_pickle))
        b = stack.enter_context(open_checkpoint(finetuned, allow_pickle=allow_pickle))
        check_output_path(out, [a.path, b.path], force=force)
        check_compatible({"base": a.config, "fine-tuned": b.config})
        terms, aliases, records = source_terms(a, b, vocab=vocab, on_missing=on_missing)
        plan = plan_diff(terms, ddt)
        manifest = base_record("diff")
        manifest.update(
            {
                "format": FORMAT,
                "version": VERSION,
                "base": describe_input(a),
                "finetuned": describe_input(b),
                "base_config": a.config,
                "dtype": ddt.name,
                "compute_dtype": settings.compute_dtype.name,
                "compression": None,
                "aliases": aliases,
                "policies": {"vocab": vocab, "on_missing": on_missing},
                "records": records,
                "tensors": {t.name: {"shape": list(t.shape), "dtype": t.dtype.name} for t in plan.tensors},
            }
        )

        def finish(tmp: Path) -> None:
            (tmp / FINETUNED_DIR).mkdir()
            copy_files(b.path, tmp / FINETUNED_DIR, CONFIG_FILES + TOKENIZER_FILES)
            write_json(tmp / MANIFEST, manifest)

        written = write_plan(
            plan.tensors, out, settings=settings, prefix=PREFIX, force=force, progress=progress, finish=finish
        )
    return TransferResult(out, written, time.perf_counter() - t0, records, manifest)
