"""Write ``target + alpha * diff`` as a model directory: the plan, the shards, the non-weight files,
the provenance record and the model card.

Shared by :func:`ftrecycle.transfer` (a diff read from two models) and :func:`ftrecycle.apply_delta`
(a diff read from a delta directory).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from ftrecycle.dtypes import BY_NAME, DType
from ftrecycle.errors import ConfigError, IncompatibleModelsError
from ftrecycle.io.card import Card, command_line, transformers_snippet, write_card
from ftrecycle.io.checkpoint import Checkpoint
from ftrecycle.io.maskfile import open_mask
from ftrecycle.io.model_files import CONFIG_FILES, TOKENIZER_FILES, copy_files, patch_config
from ftrecycle.io.output import write_json
from ftrecycle.io.provenance import PROVENANCE, base_record, portable, weights_fingerprint
from ftrecycle.io.state import sha256_file
from ftrecycle.ops.token_rows import TokenRowChoice
from ftrecycle.options import ModelFiles, Policies, Precision
from ftrecycle.pipeline import ProgressFn, WriteSettings, write_plan
from ftrecycle.plan import mask_terms, plan_transfer, set_token_rows
from ftrecycle.terms import Action, Masked, MaskTally, Plan, Record, Term


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
        mask: the sign mask on the diff and its counts (None: no mask).
    """

    terms: dict[str, Term]
    aliases: dict[str, str]
    records: list[Record]
    inputs: dict[str, Any]
    finetuned_files: Path | None
    token_rows: TokenRowChoice | None = None
    warnings: list[str] = field(default_factory=list)
    mask: MaskUse | None = None


@dataclass(frozen=True)
class MaskUse:
    """A sign mask on the diff: what the provenance says about its file, and the masked terms' counts.

    Attributes:
        described: the file's name, SHA-256 and what it records about how it was made.
        tallies: the counts of every masked term, filled by the engine as it runs.
    """

    described: dict[str, Any]
    tallies: list[MaskTally]

    def record(self) -> dict[str, Any]:
        """The provenance's ``mask``: the file, and the share of the diff's non-zero entries it kept."""
        elements = sum(t.elements for t in self.tallies)
        nonzero = sum(t.nonzero for t in self.tallies)
        kept = sum(t.kept for t in self.tallies)
        return {
            **self.described,
            "masked_tensors": len(self.tallies),
            "elements": elements,
            "nonzero": nonzero,
            "kept": kept,
            "kept_fraction": kept / nonzero if nonzero else None,
        }


def with_mask(
    stack: contextlib.ExitStack, addend: Addend, mask: str | None, target: Checkpoint, meta_left: int
) -> tuple[Addend, int]:
    """``addend`` with its terms masked by the mask file ``mask`` (None: unchanged), and the memory left.

    The file is opened (kept open by ``stack``), checked, and its index counted toward the budget.

    Raises:
        ConfigError: ``mask`` is ``grad-sign``, which the command line resolves to a file first.
        CheckpointError: not a mask file, or a corrupt one.
        IncompatibleModelsError: a mask tensor of another shape than the target's.
    """
    if mask is None:
        return addend, meta_left
    if mask == "grad-sign":
        raise ConfigError(
            "mask='grad-sign' is computed from calibration data: make the mask file with ftrecycle.grad_sign_mask "
            "(or `ftrecycle mask`) and pass its path, or use `ftrecycle transfer --mask grad-sign --calibration FILE`"
        )
    m = open_mask(mask, max_metadata_bytes=meta_left)
    stack.callback(m.close)
    terms, records = mask_terms(addend.terms, m.ckpt, target, mask_name=f"mask file {m.path.name}")
    tallies = [t.tally for t in terms.values() if isinstance(t, Masked)]
    if not tallies:
        raise IncompatibleModelsError(
            f"mask file {m.path.name}: none of its tensors is a tensor of this diff, so it would mask nothing; "
            "make the mask on this target (ftrecycle mask --target-base C ...)"
        )
    described = {"file": m.path.name, "sha256": m.sha256, "made": m.info}
    warnings = [*addend.warnings, *_other_target(m.info, m.path.name, target)]
    masked = replace(
        addend, terms=terms, records=[*addend.records, *records], mask=MaskUse(described, tallies), warnings=warnings
    )
    return masked, meta_left - m.ckpt.metadata_bytes


def _other_target(info: dict[str, Any], name: str, target: Checkpoint) -> list[str]:
    """A warning when the mask file says it was made on another target (its config or its size differs)."""
    made = info.get("target") if isinstance(info, dict) else None
    if not isinstance(made, dict):
        return []
    config = Path(target.path) / "config.json"
    here = {
        "config_sha256": sha256_file(config) if config.is_file() else None,
        "bytes": sum(t.nbytes for t in target.tensors.values()),
        "weights_fingerprint": weights_fingerprint(Path(target.path)),
    }
    differ = [k for k, v in here.items() if made.get(k) is not None and v is not None and made.get(k) != v]
    if not differ:
        return []
    return [
        f"mask file {name} was made on another target than this one ({', '.join(differ)} differ): a mask belongs "
        "to the target its gradient was taken on; make it again on this one (ftrecycle mask --target-base C ...)"
    ]


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
    record = _record(operation, addend, settings, policies, plan, out_dtype, warnings)
    finish = partial(
        _finish_model,
        out=out,
        settings=settings,
        target=target,
        finetuned_files=addend.finetuned_files,
        files=files,
        plan=plan,
        out_dtype=out_dtype,
        record=record,
        mask=addend.mask,
    )
    written = write_plan(plan.tensors, out, settings=settings, prefix="model", progress=progress, finish=finish)
    return TransferResult(out, written, time.perf_counter() - started, plan.records, record, warnings)


def _record(
    operation: str,
    addend: Addend,
    settings: WriteSettings,
    policies: Policies,
    plan: Plan,
    out_dtype: DType | None,
    warnings: list[str],
) -> dict[str, Any]:
    """The provenance of a transfer or apply: inputs, settings, policies, what was adapted, the mask,
    the token rows and the warnings."""
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
    if addend.mask is not None:
        record["mask"] = addend.mask.described
    if addend.token_rows is not None:
        record["token_rows"] = addend.token_rows.to_json()
    if warnings:
        record["warnings"] = warnings
    return record


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
    out: Path,
    settings: WriteSettings,
    target: Checkpoint,
    finetuned_files: Path | None,
    files: ModelFiles,
    plan: Plan,
    out_dtype: DType | None,
    record: dict[str, Any],
    mask: MaskUse | None = None,
) -> None:
    """Write the non-weight files into the output's temporary directory; ``record`` gains what was copied
    (and, once the engine has run, what the mask kept)."""
    if mask is not None:
        record["mask"] = mask.record()
    cfg_src = target.path if files.config_from == "target" or finetuned_files is None else finetuned_files
    tok_src = target.path if files.tokenizer_from == "target" or finetuned_files is None else finetuned_files
    record["config_files"] = {"from": files.config_from, "copied": copy_files(cfg_src, tmp, CONFIG_FILES)}
    record["tokenizer_files"] = {"from": files.tokenizer_from, "copied": copy_files(tok_src, tmp, TOKENIZER_FILES)}
    changes: dict[str, Any] = {"vocab_size": plan.vocab_size, "tie_word_embeddings": plan.ties_embeddings}
    if out_dtype is not None:
        changes["dtype"] = out_dtype.name
    if (tmp / "config.json").is_file():
        record["config_patched"] = patch_config(tmp, changes)
    published = portable(record, out, settings.record_paths)
    write_json(tmp / PROVENANCE, published)
    write_card(tmp, model_card(published, plan, out.name))


def model_card(record: dict[str, Any], plan: Plan, where: str) -> Card:
    """The card of a transfer's or an apply's output: a merge of the target and the fine-tuned model.

    Args:
        record: the output's provenance (as written).
        plan: what was written.
        where: how the snippet names the output (its directory's name).

    Returns:
        The card.
    """
    inputs = record["inputs"]
    target = inputs.get("target_base") or {}
    manifest = (inputs.get("delta") or {}).get("manifest") or {}
    finetuned = inputs.get("source_finetuned") or manifest.get("finetuned") or {}
    base = inputs.get("source_base") or manifest.get("base") or {}
    names = {role: _name(d) for role, d in (("target", target), ("finetuned", finetuned), ("base", base))}
    written = {t.name for t in plan.tensors}
    copied = {r["tensor"] for r in plan.records if r["action"] == Action.COPIED and r["tensor"] in written}
    actions = Counter(str(r["action"]) for r in plan.records)
    rows = [("written to the output", str(len(written))), ("target + alpha × diff", str(len(written - copied)))]
    rows += [(f"record: {a}", str(n)) for a, n in sorted(actions.items())]
    return Card(
        title=f"{names['target']} + {record['alpha']:g} × ({names['finetuned']} − {names['base']})",
        summary=(
            f"This model was made with ftrecycle ({record['operation']}) by adding the diff vector of a fine-tune "
            f"(fine-tuned {names['finetuned']} minus its base {names['base']}) to the new base {names['target']}, "
            f"scaled by alpha = {record['alpha']:g} (m't = m_t + alpha · (m's − m_s)). Compute dtype "
            f"{record['compute_dtype']}; output dtype {record['out_dtype']}. Every input, option and adapted "
            f"tensor is recorded in {PROVENANCE}."
        ),
        relation="merge",
        base_models=tuple(b for b in (target.get("hub_id"), finetuned.get("hub_id")) if b),
        tags=("task-vector", "diff-vector-transfer", record["operation"]),
        license=target.get("license"),
        load=transformers_snippet(where),
        command=command_line(record, _equivalent(record, where)),
        table=(("tensors", "count"), rows),
    )


def _equivalent(record: dict[str, Any], where: str) -> list[str]:
    """The command that makes the same output as an API call recorded in ``record``."""
    inputs = record["inputs"]
    ref = {role: str(d.get("hub_id") or d.get("ref")) for role, d in inputs.items() if isinstance(d, dict)}
    if record["operation"] == "apply":
        argv = ["ftrecycle", "apply", "--delta", ref.get("delta", "?")]
    else:
        argv = ["ftrecycle", record["operation"], "--source-base", ref.get("source_base", "?")]
        argv += ["--source-finetuned", ref.get("source_finetuned", "?")]
    return [*argv, "--target-base", ref.get("target_base", "?"), "--alpha", f"{record['alpha']:g}", "-o", where]


def _name(description: dict[str, Any]) -> str:
    """How a card names an input: its hub id, else its directory's name (never a local path)."""
    return str(description.get("hub_id") or Path(str(description.get("ref") or "?")).name or "?")
