"""Apply a stored delta to a new base: ``out = target + alpha * delta``."""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ftrecycle.arch import check_compatible
from ftrecycle.delta.store import finetuned_files, open_delta
from ftrecycle.errors import ConfigError
from ftrecycle.io.checkpoint import Checkpoint, open_checkpoint
from ftrecycle.io.output import check_output
from ftrecycle.io.provenance import describe_input
from ftrecycle.ops._model import Addend, TransferResult, with_mask, write_model
from ftrecycle.ops.token_rows import TokenRowChoice, choose_token_rows
from ftrecycle.options import ApplyOptions
from ftrecycle.pipeline import ProgressFn, WriteSettings

#: The manifest fields an applied model's provenance repeats about its delta.
MANIFEST_SUMMARY = ("base", "finetuned", "dtype", "compute_dtype", "compression")


def apply_delta(
    delta: str | Path,
    target_base: str,
    output: str | Path,
    *,
    options: ApplyOptions | None = None,
    verify: bool = True,
    progress: ProgressFn | None = None,
    **keywords: Any,
) -> TransferResult:
    """Write ``target_base + alpha * delta`` for a delta directory made by :func:`ftrecycle.diff`.

    A compressed delta is expanded range by range as it is applied.

    Args:
        delta: the delta directory.
        target_base: the new base model (directory or hub id).
        output: directory to create.
        options: every option, as groups (:class:`ftrecycle.ApplyOptions`); default: the defaults.
            ``config_from``/``tokenizer_from`` ``finetuned`` use the fine-tuned model's files
            stored in the delta.
        verify: check every stored tensor's SHA-256 first (one extra read of the delta).
        progress: called with (bytes written, total bytes).
        **keywords: any field of ``options``' groups by name, overriding it (those of
            :func:`ftrecycle.transfer` but ``compress`` and the checks' overrides; ``token_rows`` is
            ``target`` or ``delta`` with a ``tokens`` list: a delta holds neither the fine-tuned model's
            rows nor the source base that would show which rows are untrained; ``mask``: a sign mask
            file, as there).

    Returns:
        What was written.

    Raises:
        As :func:`ftrecycle.transfer`; CheckpointError also for a delta that is not one, or corrupt.
    """
    started = time.perf_counter()
    opts = ApplyOptions.merged(options, keywords)
    settings = WriteSettings.of(opts.precision, opts.resources, opts.output, opts.scaling)
    out = Path(output).expanduser()
    with contextlib.ExitStack() as stack:
        # the indexes count toward --max-memory, as in transfer()
        meta = settings.max_memory
        d, manifest, terms, aliases = open_delta(delta, check=verify, threads=settings.threads, max_metadata_bytes=meta)
        stack.callback(d.close)
        meta -= d.metadata_bytes
        c = stack.enter_context(
            open_checkpoint(target_base, allow_pickle=opts.inputs.allow_pickle, max_metadata_bytes=meta)
        )
        meta -= c.metadata_bytes
        out = check_output(out, [d.path, c.path, delta, target_base, opts.masking.mask], force=settings.force)
        check_compatible({"delta's base": d.config, "target base": c.config})
        files = finetuned_files(
            d.path,
            manifest,
            config=opts.files.config_from == "finetuned",
            tokenizer=opts.files.tokenizer_from == "finetuned",
        )
        choice = _token_rows(opts, c, [files, c.path])
        addend = Addend(terms, aliases, list(manifest.get("records") or []), _inputs(d, manifest, c), files, choice)
        addend, meta = with_mask(stack, addend, opts.masking.mask, c, meta)
        return write_model(
            "apply",
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


def _token_rows(opts: ApplyOptions, target: Checkpoint, tokenizer_dirs: list[Path]) -> TokenRowChoice | None:
    """The rows ``--token-rows`` decides on ``apply``: only those ``--tokens`` names (no source base here).

    Raises:
        ConfigError: ``finetuned`` (a delta does not hold the fine-tuned model's rows), ``target`` without
            ``--tokens``, or tokens that cannot be resolved.
    """
    rows = opts.token_rows
    if rows.token_rows == "delta" and rows.tokens is None:
        return None
    if rows.token_rows == "finetuned":
        raise ConfigError(
            "--token-rows finetuned: a delta holds the diff, not the fine-tuned model's rows; use `ftrecycle "
            "transfer` with the source models, or --token-rows target|delta"
        )
    return choose_token_rows(rows.token_rows, rows.tokens, None, target, tokenizer_dirs)


def _inputs(delta: Checkpoint, manifest: dict[str, Any], target: Checkpoint) -> dict[str, Any]:
    """The provenance's inputs: the delta (with its manifest's summary) and the target."""
    described = describe_input(delta)
    described["manifest"] = {k: manifest.get(k) for k in MANIFEST_SUMMARY}
    return {"delta": described, "target_base": describe_input(target)}
