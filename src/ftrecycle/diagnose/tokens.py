"""What ``diagnose`` says about token rows and about inputs that look mistaken.

* :func:`token_rows` lists, for each model, the rows of its input embedding and untied output head that
  look untrained (norm below :data:`~ftrecycle.ops.token_rows.UNTRAINED_FRACTION` of the median row norm),
  the rows identical bit for bit in the source base and the target (never trained across the versions),
  and the special tokens among them — the rows ``transfer --token-rows`` decides. Only those tensors are
  read, a block of rows at a time.
* :func:`input_warnings` names what looks like a mistake in the three inputs: a fine-tuned model whose
  record names another base, swapped source models (their records, or the geometry: cos(diff, drift) of at
  least :data:`SWAP_COS` with the fine-tuned model closer to the target than the base is, ‖C − B‖ at
  most :data:`SWAP_RATIO` × ‖C − A‖, as when B is the base and A its fine-tune), tokenizers that map
  shared ids to other tokens, and a zero diff. ``transfer`` refuses the first three when the records or
  the tokenizer files prove them; the geometry alone only warns.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ftrecycle.delta.adapter import is_adapter
from ftrecycle.errors import CheckpointError
from ftrecycle.io.checkpoint import Checkpoint, open_checkpoint
from ftrecycle.io.tokenizer import special_tokens
from ftrecycle.ops.checks import provenance_problems, tokenizer_conflicts
from ftrecycle.ops.token_rows import UNTRAINED_FRACTION, identical_rows, row_norms, row_tensors, untrained
from ftrecycle.plan import row_list

#: cos(diff, drift) from which swapped source models are suspected (with :data:`SWAP_RATIO`).
SWAP_COS = 0.5
#: ‖C − B‖ / ‖C − A‖ up to which the fine-tuned model is "closer" to the target than its base. With
#: SWAP_COS, measured on the lab's 20 pairs × 2 seeds: 0 of 40 right-way-round pairs flagged (their cos is at
#: most 0.25, their ratio at least 1.00), 11 of 40 swapped ones (the rest are caught by the models' records).
SWAP_RATIO = 0.9
#: Untrained rows listed by id in the table (the JSON has them all).
SHOWN_ROWS = 12


@dataclass
class RowFinding:
    """One token-row tensor of one model.

    Attributes:
        model: the model's role (``source base``, ``source fine-tuned``, ``target base``).
        tensor: the tensor's name.
        rows: its number of rows.
        median_norm: the median row norm.
        untrained: the rows whose norm is below the threshold.
        special: the special tokens among them (id -> token).
        same_as_base: for the target, the rows identical bit for bit to the source base's (None otherwise).
    """

    model: str
    tensor: str
    rows: int
    median_norm: float
    untrained: list[int]
    special: dict[int, str] = field(default_factory=dict)
    same_as_base: list[int] | None = None


@dataclass
class TokenRowReport:
    """What :func:`token_rows` found.

    Attributes:
        fraction: the threshold, as a share of the median row norm.
        special: the special tokens the models' tokenizer files name (id -> token).
        findings: one per model and token-row tensor.
        skipped: models not read, with the reason (an adapter has no embedding rows of its own).
    """

    fraction: float
    special: dict[int, str]
    findings: list[RowFinding]
    skipped: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (ids as strings where they are keys)."""
        return {
            "fraction": self.fraction,
            "special": {str(k): v for k, v in self.special.items()},
            "findings": [{**asdict(f), "special": {str(k): v for k, v in f.special.items()}} for f in self.findings],
            "skipped": self.skipped,
        }


def token_rows(source_base: str, source_finetuned: str, target_base: str) -> TokenRowReport:
    """The embedding and head rows that look untrained in each model, and the special tokens among them.

    Args:
        source_base: A. source_finetuned: B (a PEFT adapter is skipped). target_base: C.

    Returns:
        The report.

    Raises:
        CheckpointError: an unreadable model or tokenizer file.
    """
    roles = {"source base": source_base, "source fine-tuned": source_finetuned, "target base": target_base}
    skipped = {}
    if is_adapter(source_finetuned):
        skipped["source fine-tuned"] = "a LoRA adapter: it has no embedding rows of its own"
        del roles["source fine-tuned"]
    with contextlib.ExitStack() as stack:
        cks = {role: stack.enter_context(open_checkpoint(ref)) for role, ref in roles.items()}
        special: dict[int, str] = {}
        for ck in cks.values():
            special.update(special_tokens(ck.path))
        findings = [f for role, ck in cks.items() for f in _findings(role, ck, cks["source base"], special)]
    return TokenRowReport(UNTRAINED_FRACTION, dict(sorted(special.items())), findings, skipped)


def _findings(role: str, ck: Checkpoint, base: Checkpoint, special: dict[int, str]) -> list[RowFinding]:
    """One model's token-row tensors."""
    out = []
    base_rows = row_tensors(base)
    for name, info in row_tensors(ck).items():
        norms = row_norms(ck, info)
        low = untrained(norms)
        median = float(np.median(norms)) if norms.size else 0.0
        finding = RowFinding(role, name, int(norms.size), median, low, {i: special[i] for i in low if i in special})
        if role == "target base" and name in base_rows:
            same = identical_rows(base, base_rows[name], ck, info)
            finding.same_as_base = [int(i) for i in same.nonzero()[0]]
            finding.special.update({i: special[i] for i in finding.same_as_base if i in special})
        out.append(finding)
    return out


def format_token_rows(report: TokenRowReport) -> str:
    """A markdown table of the report."""
    lines = [
        f"token rows that look untrained (norm < {report.fraction:g} × the median row norm; "
        "`transfer --token-rows` decides what special ones become):",
        "",
        "| model | tensor | rows | median norm | untrained rows | identical in source base and target | "
        "special tokens among them |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in report.findings:
        same = "–" if f.same_as_base is None else (row_list(f.same_as_base, SHOWN_ROWS) or "none")
        specials = ", ".join(f"{i} {t}" for i, t in sorted(f.special.items())[:SHOWN_ROWS]) or "none"
        lines.append(
            f"| {f.model} | {f.tensor} | {f.rows} | {f.median_norm:.4g} | "
            f"{row_list(f.untrained, SHOWN_ROWS) or 'none'} | {same} | {specials} |"
        )
    lines += [f"- {role} not read: {why}" for role, why in report.skipped.items()]
    return "\n".join(lines) + "\n"


def input_warnings(source_base: str, source_finetuned: str, target_base: str, total: dict[str, Any]) -> list[str]:
    """What in the three inputs looks like a mistake (see the module docstring).

    Args:
        source_base: A. source_finetuned: B. target_base: C.
        total: the geometry's totals (:attr:`ftrecycle.diagnose.geometry.Geometry.total`).

    Returns:
        One line per finding (empty: none).

    Raises:
        CheckpointError: an unreadable model, record or tokenizer file.
    """
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(open_checkpoint(source_base))
        c = stack.enter_context(open_checkpoint(target_base))
        fin = None if is_adapter(source_finetuned) else stack.enter_context(open_checkpoint(source_finetuned))
        files = fin.path if fin is not None else a.path
        sources = {"source base": a.path, "source fine-tuned model": files}
        warnings: list[str] = []
        for check, what in (
            (lambda: provenance_problems(a, source_finetuned, fin), "a model's own record"),
            (lambda: tokenizer_conflicts(sources, c.path), "a tokenizer file"),
        ):
            try:
                warnings += check()
            except CheckpointError as e:  # a broken file is said, and the other checks still run
                warnings.append(f"{what} could not be read: {e}")
    swapped = _swap_ratio(total)
    if swapped is not None and not any("swapped" in w for w in warnings):
        warnings.append(
            f"the source models may be swapped: cos(diff, drift) = {total['cos']:+.2f} and the fine-tuned model is "
            f"{swapped:.2f}× as far from the target as the base is (a base is usually the farther); check that "
            "--source-base is the model the fine-tune started from"
        )
    if total.get("delta_rel") == 0.0:
        warnings.append("the diff is zero: the fine-tuned model equals the source base; a transfer copies the target")
    return warnings


def _swap_ratio(total: dict[str, Any]) -> float | None:
    """‖C − B‖ / ‖C − A‖ when it and cos(diff, drift) point to swapped source models, else None."""
    drift, delta, cos = total.get("drift_rel"), total.get("delta_rel"), total.get("cos")
    if drift is None or delta is None or cos is None or drift <= 0 or cos < SWAP_COS:
        return None
    # ‖C − B‖² = ‖D‖² + ‖Δ‖² − 2 cos ‖D‖‖Δ‖, all relative to ‖A‖: no further pass over the weights
    ratio = math.sqrt(max(0.0, drift * drift + delta * delta - 2 * cos * drift * delta)) / drift
    return ratio if ratio <= SWAP_RATIO else None
