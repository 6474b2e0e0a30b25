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

from ftrecycle.errors import ConfigError, IncompatibleModelsError
from ftrecycle.io.checkpoint import Checkpoint, open_checkpoint
from ftrecycle.io.output import check_output, scratch_directory
from ftrecycle.io.provenance import describe_input
from ftrecycle.ops._model import Addend, TransferResult, with_mask, write_model
from ftrecycle.ops._sources import SourceDiff, source_diff
from ftrecycle.ops.apply import apply_delta
from ftrecycle.ops.checks import check_provenance, diff_is_zero, tokenizer_conflicts
from ftrecycle.ops.diff import diff
from ftrecycle.ops.token_rows import TokenRowChoice, choose_token_rows
from ftrecycle.options import ApplyOptions, DeltaStorage, DiffOptions, Output, TokenRows, TransferOptions
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
            mask's; recorded), ``compress`` (transfer the diff as it would be shipped
            compressed: it is compressed into a temporary bf16 delta beside the output, applied,
            and removed; the provenance records the compression), ``token_rows`` and ``tokens`` (what
            chosen token rows become), ``ignore_provenance`` and ``allow_tokenizer_mismatch`` (overrides
            of the checks of the inputs). See :mod:`ftrecycle.options`.

    Returns:
        What was written.

    Raises:
        ConfigError: bad option values, an unknown keyword, or ``alpha`` still ``auto``.
        CheckpointError: unreadable or refused inputs.
        IncompatibleModelsError: architectures, names or shapes that no chosen policy reconciles; the
            fine-tuned model's record names another base, the source models look swapped (their records),
            or the tokenizers map shared ids to other tokens, unless overridden.
        OutputError: the output exists, overlaps an input, or does not fit the disk.
        NonFiniteError: a result holds NaN or infinity.
    """
    started = time.perf_counter()
    opts = TransferOptions.merged(options, keywords)
    settings = WriteSettings.of(opts.precision, opts.resources, opts.output, opts.scaling)
    out = Path(output).expanduser()
    if opts.storage.compress is not None:
        if opts.token_rows != TokenRows():
            raise ConfigError(
                "--token-rows/--tokens do not apply with --compress: transfer without --compress, or `diff "
                "--compress` then `apply --token-rows target --tokens LIST`"
            )
        with contextlib.ExitStack() as stack:  # the checks of the inputs, on the models themselves
            a, c, src = _open_inputs(stack, (source_base, source_finetuned, target_base), opts, settings.max_memory)
            warnings, _ = _preflight(a, c, src, source_finetuned, opts)
        result = _transfer_compressed(source_base, source_finetuned, target_base, out, opts, progress)
        result.warnings[:0] = warnings
        return result
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
    source_finetuned = refs[1]
    a, c, src = _open_inputs(stack, refs, opts, settings.max_memory)
    out = check_output(out, [a.path, *src.paths, c.path, *refs, opts.masking.mask], force=settings.force)
    warnings, choice = _preflight(a, c, src, source_finetuned, opts)
    inputs = {"source_base": describe_input(a), "source_finetuned": src.finetuned, "target_base": describe_input(c)}
    addend = Addend(src.terms, src.aliases, src.records, inputs, src.files, choice, warnings)
    addend, meta = with_mask(stack, addend, opts.masking.mask, c, src.meta_left)
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


def _open_inputs(
    stack: contextlib.ExitStack, refs: tuple[str, str, str], opts: TransferOptions, meta: int
) -> tuple[Checkpoint, Checkpoint, SourceDiff]:
    """Open the source base, the target and the diff (kept open by ``stack``) within ``meta`` bytes of indexes."""
    source_base, source_finetuned, target_base = refs
    pickle = opts.inputs.allow_pickle
    # What the inputs' indexes take counts toward --max-memory: each is refused up front when it
    # does not fit what is left, and the engine's buffers get the rest.
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
    return a, c, src


def _preflight(
    a: Checkpoint, c: Checkpoint, src: SourceDiff, finetuned: str, opts: TransferOptions
) -> tuple[list[str], TokenRowChoice | None]:
    """The checks of a transfer's inputs before anything is written, and the rows ``--token-rows`` decides.

    Args:
        a: the opened source base. c: the opened target base.
        src: the diff read from the source models.
        finetuned: the fine-tuned model's reference as given.
        opts: the transfer's options (its checks' overrides, its token rows).

    Returns:
        The warnings (a zero diff), and the token-row choice (None: the default, every row target + alpha * diff).

    Raises:
        IncompatibleModelsError: the fine-tuned model's record names another base, the source models are
            swapped, or the tokenizers disagree on shared ids, each unless its override is set.
        ConfigError: ``--tokens`` that cannot be resolved.
    """
    if not opts.checks.ignore_provenance:
        check_provenance(a, finetuned, src.model)
    if not opts.checks.allow_tokenizer_mismatch:
        conflicts = tokenizer_conflicts({"source base": a.path, "source fine-tuned model": src.files}, c.path)
        if conflicts:
            raise IncompatibleModelsError(
                f"{conflicts[0]}; use a target with the source's tokenizer, or pass --allow-tokenizer-mismatch"
            )
    warnings = []
    if diff_is_zero(src.terms):
        why = (
            "the source fine-tuned model equals the source base bit for bit (compared tensor by tensor before "
            "the transfer)"
            if src.model is not None
            else "every LoRA update of the adapter has a factor of zeros (an adapter never trained)"
        )
        warnings.append(f"the diff is zero: {why}, so the output is a copy of the target; check --source-finetuned")
    rows = opts.token_rows
    if rows.token_rows == "delta" and rows.tokens is None:
        return warnings, None
    return warnings, choose_token_rows(rows.token_rows, rows.tokens, a, c, [src.files, a.path])


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
