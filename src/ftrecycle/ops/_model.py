"""Write ``target + alpha * diff`` as a model directory: the plan, the shards, the non-weight files,
the provenance record and the model card.

Shared by :func:`ftrecycle.transfer` (a diff read from two models) and :func:`ftrecycle.apply_delta`
(a diff read from a delta directory).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ftrecycle.dtypes import BY_NAME, DType
from ftrecycle.io.checkpoint import Checkpoint
from ftrecycle.io.model_files import CONFIG_FILES, TOKENIZER_FILES, copy_files, model_card, patch_config
from ftrecycle.io.output import write_json
from ftrecycle.io.provenance import PROVENANCE, base_record
from ftrecycle.ops.token_rows import TokenRowChoice
from ftrecycle.options import ModelFiles, Policies, Precision
from ftrecycle.pipeline import ProgressFn, WriteSettings, write_plan
from ftrecycle.plan import plan_transfer, set_token_rows
from ftrecycle.terms import Plan, Record, Term


@dataclass
class TransferResult:
    """What a transfer (or an apply) wrote.

    Attributes:
        output: the new model directory.
        bytes_written: tensor bytes written.
        seconds: wall time.
        records: every tensor that was adapted or left alone, and why.
        provenance: the full ``ftrecycle.json`` record.
        warnings: what the inputs suggest may be a mistake though nothing refused it (a zero diff...);
            also in the provenance.
    """

    output: Path
    bytes_written: int
    seconds: float
    records: list[Record] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Addend:
    """The diff to add to a target, and what the output records about where it came from.

    Attributes:
        terms: the diff tensor by tensor.
        aliases: names the diff shares through tied embeddings.
        records: tensors adapted or left alone so far (by the source's reader), and why.
        inputs: role -> description of every input, for the provenance.
        finetuned_files: where ``--config-from``/``--tokenizer-from finetuned`` copy from.
        token_rows: the rows ``--token-rows`` decides (None: the default, every row target + alpha * diff).
        warnings: what the checks of the inputs found suspicious but did not refuse.
    """

    terms: dict[str, Term]
    aliases: dict[str, str]
    records: list[Record]
    inputs: dict[str, Any]
    finetuned_files: Path | None
    token_rows: TokenRowChoice | None = None
    warnings: list[str] = field(default_factory=list)


def write_model(
    operation: str,
    target: Checkpoint,
    addend: Addend,
    out: Path,
    settings: WriteSettings,
    *,
    precision: Precision,
    policies: Policies,
    files: ModelFiles,
    progress: ProgressFn | None,
    started: float,
) -> TransferResult:
    """Plan ``target + alpha * addend``, write it atomically with its non-weight files and provenance.

    Args:
        operation: the provenance's operation name (``transfer``, ``apply``).
        target: the opened target base.
        addend: the diff and its inputs.
        out: the checked output directory.
        settings: the run's settings (its memory budget is what the inputs' indexes left).
        precision: for the output dtype.
        policies: how mismatches are reconciled.
        files: where config and tokenizer files come from.
        progress: called with (bytes written, total bytes).
        started: ``time.perf_counter()`` when the operation began.

    Returns:
        What was written.

    Raises:
        IncompatibleModelsError: names or shapes that no chosen policy reconciles.
        OutputError, MemoryBudgetError, NonFiniteError, CheckpointError: from the write.
    """
    out_dtype = None if precision.out_dtype is None else BY_NAME[precision.out_dtype]
    plan = plan_transfer(
        target,
        addend.terms,
        addend.aliases,
        out_dtype=out_dtype,
        vocab=policies.vocab,
        on_missing=policies.on_missing,
        tie_mismatch=policies.tie_mismatch,
        records=addend.records,
    )
    warnings = list(addend.warnings)
    if addend.token_rows is not None:
        warnings += _token_rows(plan, addend.token_rows)
    record = base_record(operation)
    record.update(
        {
            "inputs": addend.inputs,
            "alpha": settings.alpha,
            "compute_dtype": settings.compute_dtype.name,
            "out_dtype": out_dtype.name if out_dtype else "target",
            "policies": {
                "vocab": policies.vocab,
                "on_missing": policies.on_missing,
                "tie_mismatch": policies.tie_mismatch,
            },
            "records": plan.records,
        }
    )
    if addend.token_rows is not None:
        record["token_rows"] = addend.token_rows.to_json()
    if warnings:
        record["warnings"] = warnings
    finish = partial(
        _finish_model,
        target=target,
        finetuned_files=addend.finetuned_files,
        files=files,
        plan=plan,
        out_dtype=out_dtype,
        record=record,
    )
    written = write_plan(plan.tensors, out, settings=settings, prefix="model", progress=progress, finish=finish)
    return TransferResult(out, written, time.perf_counter() - started, plan.records, record, warnings)


def _token_rows(plan: Plan, choice: TokenRowChoice) -> list[str]:
    """Apply ``--token-rows`` to the plan; the warning when it has no row to decide."""
    if choice.tokens:
        set_token_rows(plan, list(choice.tokens), choice.policy, chosen=choice.chosen)
        return []
    if choice.policy == "delta":
        return []
    return [
        f"--token-rows {choice.policy} changed no row: no special token's row looks untrained in the source "
        "base; name the rows with --tokens"
    ]


def _finish_model(
    tmp: Path,
    *,
    target: Checkpoint,
    finetuned_files: Path | None,
    files: ModelFiles,
    plan: Plan,
    out_dtype: DType | None,
    record: dict[str, Any],
) -> None:
    """Write the non-weight files into the output's temporary directory; ``record`` gains what was copied."""
    cfg_src = target.path if files.config_from == "target" or finetuned_files is None else finetuned_files
    tok_src = target.path if files.tokenizer_from == "target" or finetuned_files is None else finetuned_files
    record["config_files"] = {"from": files.config_from, "copied": copy_files(cfg_src, tmp, CONFIG_FILES)}
    record["tokenizer_files"] = {"from": files.tokenizer_from, "copied": copy_files(tok_src, tmp, TOKENIZER_FILES)}
    changes: dict[str, Any] = {"vocab_size": plan.vocab_size, "tie_word_embeddings": plan.ties_embeddings}
    if out_dtype is not None:
        changes["dtype"] = out_dtype.name
    if (tmp / "config.json").is_file():
        record["config_patched"] = patch_config(tmp, changes)
    write_json(tmp / PROVENANCE, record)
    (tmp / "README.md").write_text(_model_card(record, plan))


def _model_card(record: dict[str, Any], plan: Plan) -> str:
    """The output's README: how it was made, from which models."""
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
    return model_card(
        title="Recycled fine-tuning", base_model=base.get("repo_id") or base.get("ref"), body="\n".join(lines)
    )
