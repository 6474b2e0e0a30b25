"""Move a diff vector onto a new base: ``out = target + alpha * (finetuned - base)``.

:func:`transfer` reads the diff from the two source models; :func:`ftrecycle.apply_delta`
reads it from a delta directory written by :func:`ftrecycle.diff`. Both give the
same bits when the delta is stored in the compute dtype.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ftrecycle.io.checkpoint import open_checkpoint
from ftrecycle.io.output import check_output, scratch_directory
from ftrecycle.io.provenance import describe_input
from ftrecycle.ops._model import Addend, TransferResult, with_mask, write_model
from ftrecycle.ops._sources import source_diff
from ftrecycle.ops.apply import apply_delta
from ftrecycle.ops.diff import diff
from ftrecycle.options import ApplyOptions, DeltaStorage, DiffOptions, Output, TransferOptions
from ftrecycle.pipeline import ProgressFn, WriteSettings


def transfer(
    source_base: str,
    source_finetuned: str,
    target_base: str,
    output: str | Path,
    *,
    options: TransferOptions | None = None,
    progress: ProgressFn | None = None,
    **keywords: Any,
) -> TransferResult:
    """Write ``target_base + alpha * (source_finetuned - source_base)`` as a new model directory.

    Every floating tensor is ``cast(fl(C) + fl(alpha * fl(B - A)))`` computed in
    ``compute_dtype`` and rounded to nearest-even into the output dtype; non-floating
    tensors are the target's. Tensors stream through bounded buffers; the output
    appears under ``output`` only when complete.

    Args:
        source_base: the source version's base model (directory or hub id ``org/name[@rev]``).
        source_finetuned: its fine-tuned model, or a PEFT LoRA adapter over ``source_base``.
        target_base: the new base model.
        output: directory to create.
        options: every option, as groups (:class:`ftrecycle.TransferOptions`); default: the defaults.
        progress: called with (bytes written, total bytes).
        **keywords: any field of ``options``' groups by name, overriding it: ``alpha`` (a number;
            ``auto`` must be resolved first, e.g. with :func:`ftrecycle.best_alpha`),
            ``compute_dtype``, ``out_dtype``, ``shard_size``, ``config_from``, ``tokenizer_from``,
            ``vocab``, ``on_missing``, ``tie_mismatch``, ``max_memory`` (what the operation's buffers
            and the inputs' indexes may use), ``threads``, ``force``, ``allow_nonfinite``,
            ``allow_pickle``, ``fsync``, ``mask`` (a sign mask file made by
            :func:`ftrecycle.grad_sign_mask`: each diff entry kept only where its sign equals the
            mask's; recorded), and ``compress`` (transfer the diff as it would be shipped compressed:
            it is compressed into a temporary bf16 delta beside the output, applied, and removed; the
            provenance records the compression). See :mod:`ftrecycle.options`.

    Returns:
        What was written.

    Raises:
        ConfigError: bad option values, an unknown keyword, or ``alpha`` still ``auto``.
        CheckpointError: unreadable or refused inputs.
        IncompatibleModelsError: architectures, names or shapes that no chosen policy reconciles.
        OutputError: the output exists, overlaps an input, or does not fit the disk.
        NonFiniteError: a result holds NaN or infinity.
    """
    started = time.perf_counter()
    opts = TransferOptions.merged(options, keywords)
    settings = WriteSettings.of(opts.precision, opts.resources, opts.output, opts.scaling)
    out = Path(output).expanduser()
    if opts.storage.compress is not None:
        return _transfer_compressed(source_base, source_finetuned, target_base, out, opts, progress)
    with contextlib.ExitStack() as stack:
        return _transfer(stack, (source_base, source_finetuned, target_base), out, opts, settings, progress, started)


def _transfer(
    stack: contextlib.ExitStack,
    refs: tuple[str, str, str],
    out: Path,
    opts: TransferOptions,
    settings: WriteSettings,
    progress: ProgressFn | None,
    started: float,
) -> TransferResult:
    """Open the three models (kept open by ``stack``) and write the output."""
    source_base, source_finetuned, target_base = refs
    pickle = opts.inputs.allow_pickle
    # What the inputs' indexes take counts toward --max-memory: each is refused up front when it
    # does not fit what is left, and the engine's buffers get the rest.
    meta = settings.max_memory
    a = stack.enter_context(open_checkpoint(source_base, allow_pickle=pickle, max_metadata_bytes=meta))
    meta -= a.metadata_bytes
    c = stack.enter_context(open_checkpoint(target_base, allow_pickle=pickle, max_metadata_bytes=meta))
    meta -= c.metadata_bytes
    src = source_diff(
        stack,
        a,
        source_finetuned,
        roles=("source base", "source fine-tuned"),
        others={"target base": c.config},
        policies=opts.policies,
        allow_pickle=pickle,
        meta_left=meta,
    )
    out = check_output(out, [a.path, *src.paths, c.path, *refs, opts.masking.mask], force=settings.force)
    inputs = {"source_base": describe_input(a), "source_finetuned": src.finetuned, "target_base": describe_input(c)}
    addend, meta = with_mask(
        stack, Addend(src.terms, src.aliases, src.records, inputs, src.files), opts.masking.mask, c, src.meta_left
    )
    return write_model(
        "transfer",
        c,
        addend,
        out,
        replace(settings, max_memory=meta),
        precision=opts.precision,
        policies=opts.policies,
        files=opts.files,
        progress=progress,
        started=started,
    )


def _compressed_steps(opts: TransferOptions) -> tuple[DiffOptions, ApplyOptions]:
    """The options of the two steps of a compressed transfer: a bf16 compressed diff, then its apply."""
    diff_options = DiffOptions.sharing(
        opts,
        precision=replace(opts.precision, out_dtype=None),
        storage=DeltaStorage(delta_dtype="bfloat16", compress=opts.storage.compress),
        output=Output(),  # a fresh scratch directory: the output's own settings do not apply
    )
    return diff_options, ApplyOptions.sharing(opts)


def _transfer_compressed(
    source_base: str,
    source_finetuned: str,
    target_base: str,
    out: Path,
    opts: TransferOptions,
    progress: ProgressFn | None,
) -> TransferResult:
    """Transfer the diff as it would be shipped: compress it into a temporary delta, apply that."""
    diff_options, apply_options = _compressed_steps(opts)
    inputs: list[str | Path | None] = [source_base, source_finetuned, target_base, opts.masking.mask]
    force = opts.output.force
    out = check_output(out, inputs, force=force)
    # The temporary delta lives in a locked hidden directory beside OUT: removed at the end, on an
    # error or a signal, or (after a kill) by the next run for OUT.
    with scratch_directory(out) as tmp:
        d = diff(source_base, source_finetuned, tmp / "delta", options=diff_options)
        # the sources as resolved by diff (hub ids become cache paths) are inputs of this write too
        resolved = [d.provenance.get(k, {}).get("path") for k in ("base", "finetuned")]
        check_output(out, [*inputs, *resolved], force=force)
        result = apply_delta(d.output, target_base, out, options=apply_options, verify=False, progress=progress)
    return result  # its provenance names the (removed) temporary delta and its compression
