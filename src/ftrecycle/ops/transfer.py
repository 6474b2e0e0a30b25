"""Move a diff vector onto a new base: ``out = target + alpha * (finetuned - base)``.

:func:`transfer` reads the diff from the two source models; :func:`apply_delta`
reads it from a delta directory written by :func:`ftrecycle.diff`. Both give the
same bits when the delta is stored in the compute dtype.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ftrecycle.arch import check_compatible
from ftrecycle.delta.adapter import adapter_terms, is_adapter
from ftrecycle.delta.store import finetuned_files, open_delta
from ftrecycle.dtypes import DType, parse_dtype
from ftrecycle.io.checkpoint import Checkpoint, open_checkpoint
from ftrecycle.io.model_files import CONFIG_FILES, TOKENIZER_FILES, check_source, copy_files, model_card, patch_config
from ftrecycle.io.output import check_output, scratch_directory, write_json
from ftrecycle.io.provenance import base_record, describe_input
from ftrecycle.pipeline import DEFAULT_MAX_MEMORY, DEFAULT_SHARD_SIZE, ProgressFn, WriteSettings, write_plan
from ftrecycle.plan import MissingPolicy, Plan, Term, TiePolicy, VocabPolicy, plan_transfer, source_terms
from ftrecycle.terms import Record

PROVENANCE = "ftrecycle.json"


@dataclass
class TransferResult:
    """What a transfer wrote.

    Attributes:
        output: the new model directory.
        bytes_written: tensor bytes written.
        seconds: wall time.
        records: every tensor that was adapted or left alone, and why.
        provenance: the full ``ftrecycle.json`` record.
    """

    output: Path
    bytes_written: int
    seconds: float
    records: list[Record] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)


def _out_dtype(out_dtype: str | None) -> DType | None:
    return None if out_dtype is None else parse_dtype(out_dtype, flag="--out-dtype")


def _finish_model(
    tmp: Path,
    *,
    target: Checkpoint,
    finetuned_files: Path | None,
    config_from: str,
    tokenizer_from: str,
    plan: Plan,
    out_dtype: DType | None,
    record: dict[str, Any],
) -> None:
    cfg_src = target.path if config_from == "target" or finetuned_files is None else finetuned_files
    tok_src = target.path if tokenizer_from == "target" or finetuned_files is None else finetuned_files
    record["config_files"] = {"from": config_from, "copied": copy_files(cfg_src, tmp, CONFIG_FILES)}
    record["tokenizer_files"] = {"from": tokenizer_from, "copied": copy_files(tok_src, tmp, TOKENIZER_FILES)}
    changes: dict[str, Any] = {"vocab_size": plan.vocab_size, "tie_word_embeddings": plan.ties_embeddings}
    if out_dtype is not None:
        changes["dtype"] = out_dtype.name
    if (tmp / "config.json").is_file():
        record["config_patched"] = patch_config(tmp, changes)
    write_json(tmp / PROVENANCE, record)
    inputs = record["inputs"]
    lines = [
        "This model was made by ftrecycle by recycling a fine-tuning diff vector "
        "onto a new base model (m't ~ m_t + alpha * (m'_s - m_s)).",
        "",
        "| role | model | revision |",
        "|---|---|---|",
    ]
    for role, d in inputs.items():
        lines.append(f"| {role} | {d.get('repo_id') or d.get('ref')} | {d.get('revision') or ''} |")
    lines += [
        "",
        f"alpha = {record['alpha']}; compute dtype {record['compute_dtype']}; "
        f"{len(plan.records)} tensors adapted or left alone (see {PROVENANCE}).",
    ]
    base = inputs.get("target_base", {})
    (tmp / "README.md").write_text(
        model_card(
            title="Recycled fine-tuning", base_model=base.get("repo_id") or base.get("ref"), body="\n".join(lines)
        )
    )


def _prepare(
    alpha: float,
    compute_dtype: str,
    out_dtype: str | None,
    max_memory: str | int,
    shard_size: str | int,
    threads: int | None,
    allow_nonfinite: bool,
    fsync: bool,
    config_from: str,
    tokenizer_from: str,
    output: str | Path,
) -> tuple[WriteSettings, DType | None, Path]:
    """Validate every option before any input is opened."""
    settings = WriteSettings.parse(
        alpha=alpha,
        compute_dtype=compute_dtype,
        max_memory=max_memory,
        shard_size=shard_size,
        threads=threads,
        allow_nonfinite=allow_nonfinite,
        fsync=fsync,
    )
    check_source(config_from, "--config-from")
    check_source(tokenizer_from, "--tokenizer-from")
    return settings, _out_dtype(out_dtype), Path(output).expanduser()


def _recycle(
    operation: str,
    target: Checkpoint,
    terms: dict[str, Term],
    aliases: dict[str, str],
    records: list[Record],
    inputs: dict[str, Any],
    finetuned_files: Path,
    out: Path,
    settings: WriteSettings,
    odt: DType | None,
    *,
    vocab: VocabPolicy,
    on_missing: MissingPolicy,
    tie_mismatch: TiePolicy,
    config_from: str,
    tokenizer_from: str,
    force: bool,
    progress: ProgressFn | None,
    t0: float,
) -> TransferResult:
    """Plan target + alpha * terms, write it atomically with its non-weight files and provenance."""
    plan = plan_transfer(
        target,
        terms,
        aliases,
        out_dtype=odt,
        vocab=vocab,
        on_missing=on_missing,
        tie_mismatch=tie_mismatch,
        records=records,
    )
    record = base_record(operation)
    record.update(
        {
            "inputs": inputs,
            "alpha": settings.alpha,
            "compute_dtype": settings.compute_dtype.name,
            "out_dtype": odt.name if odt else "target",
            "policies": {"vocab": vocab, "on_missing": on_missing, "tie_mismatch": tie_mismatch},
            "records": plan.records,
        }
    )

    def finish(tmp: Path) -> None:
        _finish_model(
            tmp,
            target=target,
            finetuned_files=finetuned_files,
            config_from=config_from,
            tokenizer_from=tokenizer_from,
            plan=plan,
            out_dtype=odt,
            record=record,
        )

    written = write_plan(
        plan.tensors, out, settings=settings, prefix="model", force=force, progress=progress, finish=finish
    )
    return TransferResult(out, written, time.perf_counter() - t0, plan.records, record)


def transfer(
    source_base: str,
    source_finetuned: str,
    target_base: str,
    output: str | Path,
    *,
    alpha: float = 1.0,
    compute_dtype: str = "float32",
    out_dtype: str | None = None,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    config_from: str = "target",
    tokenizer_from: str = "target",
    vocab: VocabPolicy = "error",
    on_missing: MissingPolicy = "error",
    tie_mismatch: TiePolicy = "error",
    max_memory: str | int = DEFAULT_MAX_MEMORY,
    threads: int | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    allow_pickle: bool = False,
    fsync: bool = False,
    progress: ProgressFn | None = None,
    compress: str | None = None,
) -> TransferResult:
    """Write ``target_base + alpha * (source_finetuned - source_base)`` as a new model directory.

    Every floating tensor is ``cast(fl(C) + fl(alpha * fl(B - A)))`` computed in
    ``compute_dtype`` and rounded to nearest-even into the output dtype; non-floating
    tensors are the target's. Tensors stream through bounded buffers; the output
    appears under ``output`` only when complete.

    Args:
        source_base: the source version's base model (directory or hub id ``org/name[@rev]``).
        source_finetuned: its fine-tuned model.
        target_base: the new base model.
        output: directory to create.
        alpha: scale of the diff.
        compute_dtype: ``float32`` or ``float64``.
        out_dtype: dtype of floating outputs; default: each target tensor's dtype.
        shard_size: largest shard, e.g. ``"5GB"``.
        config_from: ``target`` or ``finetuned``: whose config.json/generation_config.json to copy.
        tokenizer_from: ``target`` or ``finetuned``: whose tokenizer files (and chat template) to copy.
        vocab: ``error`` or ``overlap`` when vocabulary rows differ.
        on_missing: ``error`` or ``keep-target`` when tensor names differ.
        tie_mismatch: ``error``, ``untie`` or ``embed-only`` when the source has its own lm_head
            and the target ties it.
        max_memory: memory the operation may add to this process (its buffers), e.g. ``"512MiB"``;
            the command line passes its budget minus what the process already holds.
        threads: worker threads (default: available cores).
        force: replace an existing ``output``.
        allow_nonfinite: write NaN/inf results instead of failing.
        allow_pickle: accept ``.bin``/``.pt`` inputs (loaded with ``weights_only=True``).
        fsync: flush the output to disk before the final rename.
        progress: called with (bytes written, total bytes).
        compress: transfer the diff as it would be shipped compressed (``lowrank:rank=R``, ``sign``, ...;
            see :func:`ftrecycle.diff`): the diff is compressed into a temporary bf16 delta beside the
            output, applied, and removed; the provenance records the compression.

    Returns:
        What was written.

    Raises:
        ConfigError: bad option values.
        CheckpointError: unreadable or refused inputs.
        IncompatibleModelsError: architectures, names or shapes that no chosen policy reconciles.
        OutputError: the output exists, overlaps an input, or does not fit the disk.
        NonFiniteError: a result holds NaN or infinity.
    """
    t0 = time.perf_counter()
    settings, odt, out = _prepare(
        alpha,
        compute_dtype,
        out_dtype,
        max_memory,
        shard_size,
        threads,
        allow_nonfinite,
        fsync,
        config_from,
        tokenizer_from,
        output,
    )
    if compress is not None:
        return _transfer_compressed(
            source_base,
            source_finetuned,
            target_base,
            out,
            compress,
            dict(
                alpha=alpha,
                compute_dtype=compute_dtype,
                out_dtype=out_dtype,
                shard_size=shard_size,
                config_from=config_from,
                tokenizer_from=tokenizer_from,
                vocab=vocab,
                on_missing=on_missing,
                tie_mismatch=tie_mismatch,
                max_memory=max_memory,
                threads=threads,
                force=force,
                allow_nonfinite=allow_nonfinite,
                allow_pickle=allow_pickle,
                fsync=fsync,
                progress=progress,
            ),
        )
    with contextlib.ExitStack() as stack:
        # What the inputs' indexes take counts toward --max-memory: each is refused up front when it
        # does not fit what is left, and the engine's buffers get the rest.
        meta = settings.max_memory
        a = stack.enter_context(open_checkpoint(source_base, allow_pickle=allow_pickle, max_metadata_bytes=meta))
        meta -= a.metadata_bytes
        c = stack.enter_context(open_checkpoint(target_base, allow_pickle=allow_pickle, max_metadata_bytes=meta))
        meta -= c.metadata_bytes
        if is_adapter(source_finetuned):
            terms, aliases, records, fin_desc, fin_files = adapter_terms(a, source_finetuned)
            check_compatible({"source base": a.config, "target base": c.config})
        else:
            b = stack.enter_context(
                open_checkpoint(source_finetuned, allow_pickle=allow_pickle, max_metadata_bytes=meta)
            )
            meta -= b.metadata_bytes
            check_compatible({"source base": a.config, "source fine-tuned": b.config, "target base": c.config})
            terms, aliases, records = source_terms(a, b, vocab=vocab, on_missing=on_missing)
            fin_desc, fin_files = describe_input(b), b.path
        adapter = [Path(source_finetuned).expanduser()] if is_adapter(source_finetuned) else []
        out = check_output(
            out, [a.path, fin_files, *adapter, c.path, source_base, source_finetuned, target_base], force=force
        )
        inputs = {"source_base": describe_input(a), "source_finetuned": fin_desc, "target_base": describe_input(c)}
        return _recycle(
            "transfer",
            c,
            terms,
            aliases,
            records,
            inputs,
            fin_files,
            out,
            replace(settings, max_memory=meta),
            odt,
            vocab=vocab,
            on_missing=on_missing,
            tie_mismatch=tie_mismatch,
            config_from=config_from,
            tokenizer_from=tokenizer_from,
            force=force,
            progress=progress,
            t0=t0,
        )


def _transfer_compressed(
    source_base: str, source_finetuned: str, target_base: str, out: Path, compress: str, opts: dict[str, Any]
) -> TransferResult:
    from ftrecycle.codecs import parse_compression
    from ftrecycle.ops.diff import diff

    parse_compression(compress)  # a bad spec fails before any work
    inputs: list[str | Path | None] = [source_base, source_finetuned, target_base]
    out = check_output(out, inputs, force=bool(opts["force"]))
    # The temporary delta lives in a locked hidden directory beside OUT: removed at the end, on an
    # error or a signal, or (after a kill) by the next run for OUT.
    with scratch_directory(out) as tmp:
        keys = ("compute_dtype", "vocab", "on_missing", "max_memory", "threads", "allow_nonfinite", "allow_pickle")
        d = diff(
            source_base,
            source_finetuned,
            tmp / "delta",
            delta_dtype="bfloat16",
            compress=compress,
            **{k: opts[k] for k in keys},
        )
        # the sources as resolved by diff (hub ids become cache paths) are inputs of this write too
        resolved = [d.provenance.get(k, {}).get("path") for k in ("base", "finetuned")]
        check_output(out, [*inputs, *resolved], force=bool(opts["force"]))
        result = apply_delta(d.output, target_base, out, verify=False, **opts)
    return result  # its provenance names the (removed) temporary delta and its compression


def apply_delta(
    delta: str | Path,
    target_base: str,
    output: str | Path,
    *,
    alpha: float = 1.0,
    compute_dtype: str = "float32",
    out_dtype: str | None = None,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    config_from: str = "target",
    tokenizer_from: str = "target",
    vocab: VocabPolicy = "error",
    on_missing: MissingPolicy = "error",
    tie_mismatch: TiePolicy = "error",
    max_memory: str | int = DEFAULT_MAX_MEMORY,
    threads: int | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    allow_pickle: bool = False,
    fsync: bool = False,
    progress: ProgressFn | None = None,
    verify: bool = True,
) -> TransferResult:
    """Write ``target_base + alpha * delta`` for a delta directory made by :func:`ftrecycle.diff`.

    Arguments are those of :func:`transfer`, with ``delta`` in place of the two source
    models; ``config_from="finetuned"`` and ``tokenizer_from="finetuned"`` use the
    fine-tuned model's files stored in the delta. A compressed delta is expanded range by
    range as it is applied. ``verify`` checks every stored tensor's SHA-256 first (one
    extra read of the delta).

    Raises:
        As :func:`transfer`.
    """
    t0 = time.perf_counter()
    settings, odt, out = _prepare(
        alpha,
        compute_dtype,
        out_dtype,
        max_memory,
        shard_size,
        threads,
        allow_nonfinite,
        fsync,
        config_from,
        tokenizer_from,
        output,
    )
    with contextlib.ExitStack() as stack:
        # the indexes count toward --max-memory, as in transfer()
        meta = settings.max_memory
        d, manifest, terms, aliases = open_delta(delta, check=verify, threads=settings.threads, max_metadata_bytes=meta)
        stack.callback(d.close)
        meta -= d.metadata_bytes
        c = stack.enter_context(open_checkpoint(target_base, allow_pickle=allow_pickle, max_metadata_bytes=meta))
        meta -= c.metadata_bytes
        out = check_output(out, [d.path, c.path, delta, target_base], force=force)
        check_compatible({"delta's base": d.config, "target base": c.config})
        files = finetuned_files(
            d.path, manifest, config=config_from == "finetuned", tokenizer=tokenizer_from == "finetuned"
        )
        delta_input = describe_input(d)
        delta_input["manifest"] = {
            k: manifest.get(k) for k in ("base", "finetuned", "dtype", "compute_dtype", "compression")
        }
        inputs = {"delta": delta_input, "target_base": describe_input(c)}
        return _recycle(
            "apply",
            c,
            terms,
            aliases,
            list(manifest.get("records") or []),
            inputs,
            files,
            out,
            replace(settings, max_memory=meta),
            odt,
            vocab=vocab,
            on_missing=on_missing,
            tie_mismatch=tie_mismatch,
            config_from=config_from,
            tokenizer_from=tokenizer_from,
            force=force,
            progress=progress,
            t0=t0,
        )
