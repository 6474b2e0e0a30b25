"""Apply a stored delta to a new base: ``out = target + alpha * delta``."""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ftrecycle.arch import check_compatible
from ftrecycle.delta.store import finetuned_files, open_delta
from ftrecycle.io.checkpoint import Checkpoint, open_checkpoint
from ftrecycle.io.output import check_output
from ftrecycle.io.provenance import describe_input
from ftrecycle.ops._model import Addend, TransferResult, with_mask, write_model
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
            :func:`ftrecycle.transfer` but ``compress``; ``mask``: a sign mask file, as there).

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
        addend = Addend(terms, aliases, list(manifest.get("records") or []), _inputs(d, manifest, c), files)
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


def _inputs(delta: Checkpoint, manifest: dict[str, Any], target: Checkpoint) -> dict[str, Any]:
    """The provenance's inputs: the delta (with its manifest's summary) and the target."""
    described = describe_input(delta)
    described["manifest"] = {k: manifest.get(k) for k in MANIFEST_SUMMARY}
    return {"delta": described, "target_base": describe_input(target)}
