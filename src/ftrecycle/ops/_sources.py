"""Read the diff between a base checkpoint and its fine-tuned model (or a LoRA adapter over it), as terms.

Shared by :func:`ftrecycle.transfer` and :func:`ftrecycle.diff`, which differ only in the roles they
name in messages and in the other models whose architecture must agree.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftrecycle.arch import check_compatible
from ftrecycle.delta.adapter import adapter_terms, is_adapter
from ftrecycle.io.checkpoint import Checkpoint, open_checkpoint
from ftrecycle.io.provenance import describe_input
from ftrecycle.options import Policies
from ftrecycle.plan import source_terms
from ftrecycle.terms import Record, Term


@dataclass(frozen=True)
class SourceDiff:
    """The diff ``finetuned - base`` as terms, and what the operation records and guards about its source.

    Attributes:
        terms: the diff tensor by tensor.
        aliases: names the diff shares through tied embeddings.
        records: tensors adapted or left alone so far, and why.
        finetuned: the provenance description of the fine-tuned model (or adapter).
        files: the directory holding the fine-tuned model's config and tokenizer files.
        paths: what the output must not overlap besides the base (``files`` and an adapter's directory).
        meta_left: what is left of the metadata budget after the fine-tuned model's index.
        model: the opened fine-tuned model (None for an adapter).
    """

    terms: dict[str, Term]
    aliases: dict[str, str]
    records: list[Record]
    finetuned: dict[str, Any]
    files: Path
    paths: list[Path]
    meta_left: int
    model: Checkpoint | None = None


def source_diff(
    stack: contextlib.ExitStack,
    base: Checkpoint,
    finetuned: str,
    *,
    roles: tuple[str, str],
    others: dict[str, Any],
    policies: Policies,
    allow_pickle: bool,
    meta_left: int,
) -> SourceDiff:
    """Open ``finetuned`` (kept open by ``stack``) and read its diff from the open ``base``.

    Args:
        stack: closes the fine-tuned checkpoint when the operation ends.
        base: the opened base checkpoint.
        finetuned: the fine-tuned model's reference, or a local PEFT adapter directory.
        roles: the names of base and fine-tuned in an architecture mismatch's message.
        others: further configs (role -> config.json) that must share the architecture.
        policies: the vocabulary and missing-tensor policies.
        allow_pickle: accept ``.bin``/``.pt`` weights.
        meta_left: the metadata budget left for the fine-tuned model's index.

    Returns:
        The diff and what the operation needs to know about its source.

    Raises:
        CheckpointError: an unreadable model or adapter.
        IncompatibleModelsError: architectures, names or shapes that no chosen policy reconciles.
    """
    base_role, finetuned_role = roles
    if is_adapter(finetuned):
        terms, aliases, records, desc, files = adapter_terms(base, finetuned)
        configs = {base_role: base.config, **others}
        if len(configs) > 1:  # an adapter has the base's architecture by construction
            check_compatible(configs)
        paths = [files, Path(finetuned).expanduser()]
        return SourceDiff(terms, aliases, records, desc, files, paths, meta_left)
    fin = stack.enter_context(open_checkpoint(finetuned, allow_pickle=allow_pickle, max_metadata_bytes=meta_left))
    # architectures first: a name or shape mismatch between two architectures says less
    check_compatible({base_role: base.config, finetuned_role: fin.config, **others})
    terms, aliases, records = source_terms(base, fin, vocab=policies.vocab, on_missing=policies.on_missing)
    return SourceDiff(
        terms, aliases, records, describe_input(fin), fin.path, [fin.path], meta_left - fin.metadata_bytes, fin
    )
