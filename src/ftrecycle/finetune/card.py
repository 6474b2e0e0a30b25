"""The model card of a fine-tuned output (``finetune``, ``recycle-finetune``, a chain's fine-tuned steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftrecycle.io.card import Card, command_line, peft_snippet, transformers_snippet


def finetune_card(record: dict[str, Any], log: list[dict[str, Any]], where: str) -> Card:
    """The card of a fine-tuned model: a ``finetune`` of the model it started from.

    A recycled fine-tune (``recycle-finetune``) started from a temporary ``C + alpha · Δ``; its card
    names the target base C, the model it is a fine-tune of on the Hub. A LoRA adapter output (its record's
    ``lora.output`` is ``adapter``) is carded as a PEFT adapter of its start (``start/`` when recycled).

    Args:
        record: the output's provenance (as written).
        log: the evaluation log (``eval_log.json``); its last entry's numbers are the card's results.
        where: how the snippet names the output (its directory's name).

    Returns:
        The card.
    """
    inputs = record.get("inputs") or {}
    start = inputs.get("model") or inputs.get("target_base") or {}
    name = str(start.get("hub_id") or Path(str(start.get("ref") or "?")).name)
    recycled = "source_finetuned" in inputs
    losses = record.get("losses") or []
    rows = [
        ("optimizer steps", str(record.get("steps"))),
        ("training examples", str(inputs.get("examples"))),
        ("global batch", str(record.get("global_batch"))),
        ("last logged loss", f"{losses[-1][1]:.4g}" if losses else "-"),
    ]
    last = log[-1] if log else {}
    evals = {f"{k} (step {last.get('step')})": float(v) for k, v in last.items() if k != "step" and _number(v)}
    summary = f"This model was fine-tuned with ftrecycle ({record.get('operation')}) from {name}"
    if recycled:
        summary += (
            f", starting from {name} + alpha · (the source fine-tune's diff vector), alpha = {record.get('alpha')}"
        )
    equivalent = _equivalent(record, inputs, where)
    adapter = (record.get("lora") or {}).get("output") == "adapter"
    if adapter:
        summary = summary.replace("was fine-tuned", "is a LoRA adapter trained", 1)
        if recycled:
            summary += f" (that start is kept in {where}/start, the adapter's base)"
    base = f"{where}/start" if recycled else str(start.get("hub_id") or start.get("ref") or "") or None
    return Card(
        title=f"{name} fine-tuned"
        + (" (LoRA adapter)" if adapter else "")
        + (" from a recycled start" if recycled else ""),
        summary=summary + ". Every setting and the loss curve are recorded in ftrecycle.json.",
        relation="adapter" if adapter else "finetune",
        base_models=tuple(b for b in (start.get("hub_id"),) if b),
        library_name="peft" if adapter else "transformers",
        tags=("finetune", str(record.get("operation")), *(("lora",) if record.get("lora") else ())),
        license=start.get("license"),
        load=peft_snippet(base, where) if adapter else transformers_snippet(where),
        command=command_line(record, equivalent),
        table=(("training", "value"), rows),
        table_title="How it was trained",
        evals=evals,
    )


def _equivalent(record: dict[str, Any], inputs: dict[str, Any], where: str) -> list[str]:
    """The command that makes the same output as an API call recorded in ``record``."""

    def ref(d: Any) -> str:
        return str(d.get("hub_id") or d.get("ref") or d.get("path")) if isinstance(d, dict) else str(d)

    data = inputs.get("data") or {}
    if "source_finetuned" in inputs:
        argv = ["ftrecycle", "recycle-finetune"]
        argv += [
            f
            for role in ("source_base", "source_finetuned", "target_base")
            for f in (f"--{role.replace('_', '-')}", ref(inputs[role]))
        ]
        argv += ["--alpha", str(record.get("alpha"))]
    else:
        argv = ["ftrecycle", "finetune", "--model", ref(inputs.get("model"))]
    lora = record.get("lora") or {}
    config = record.get("config") or {}
    if lora:  # the training settings that change what the output is (the rest are in ftrecycle.json)
        argv += ["--qlora" if config.get("qlora") else "--lora", "--lora-rank", str(config.get("lora_rank"))]
        argv += ["--merge"] if lora.get("output") == "merged" else []
    return [*argv, "--data", ref(data), "-o", where]


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
