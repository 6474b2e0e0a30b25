"""Checks for the natural mistakes a transfer's inputs can hide, run before anything is written.

* **Provenance.** A fine-tuned model made by ftrecycle records its base in its ``ftrecycle.json``
  (``inputs.model`` of ``finetune``, ``inputs.target_base`` of ``transfer``/``apply``/``recycle-finetune``,
  followed up the chain a few steps); a PEFT adapter names it as ``base_model_name_or_path``. When every
  base so recorded can be compared with the given source base and none is it, the transfer is refused;
  when the source base's own record names the fine-tuned model as *its* base, the arguments are swapped.
  The comparison is conservative: two hub ids are the same when equal; two existing local directories
  are the same when they resolve to one directory or their weight files agree in size and in their first
  and last 64 KiB (a copy of a model is the model); anything else (a path that no longer exists, a hub
  id against a local directory) makes no claim.
* **Tokenizers.** The vocabularies (``tokenizer.json``, else ``vocab.json``) of the source models and the
  target must map the ids they share to the same tokens, or the diff's rows land on other tokens.
* **A zero diff.** Found *before* the transfer by comparing the source models' tensors bit for bit: the
  first block of every tensor first (a real fine-tune differs there and the check ends after one block
  per tensor), then the rest; an adapter's diff is zero when a LoRA factor is all zeros (PEFT's
  initialisation: an adapter never trained). A stored delta is not checked.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ftrecycle.delta.adapter import ADAPTER_CONFIG, is_adapter
from ftrecycle.errors import IncompatibleModelsError
from ftrecycle.io.checkpoint import Checkpoint
from ftrecycle.io.jsonfile import read_json
from ftrecycle.io.provenance import PROVENANCE
from ftrecycle.io.provenance import weight_files as _fingerprint
from ftrecycle.io.tokenizer import special_tokens, vocabulary
from ftrecycle.terms import Difference, PackedTerm, Term

#: How many records up a chain of ftrecycle outputs a base is looked for.
MAX_CHAIN = 4
#: Elements per block of the zero-diff comparison.
ZERO_BLOCK = 1 << 18
#: A provenance record is small; a larger file is refused as hostile.
MAX_RECORD_BYTES = 16 << 20

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Named:
    """A model as a record names it: as written, and as a hub id or an existing local directory."""

    text: str
    repo_id: str | None = None
    path: Path | None = None


def _named(entry: Any, where: Path | None) -> Named | None:
    """A model from a record's input description (``{"ref", "path", "repo_id"}``) or a string; a relative
    path is taken relative to ``where`` (None: it makes no claim)."""
    if isinstance(entry, str):
        entry = {"ref": entry, "path": entry}
    if not isinstance(entry, dict):
        return None
    repo = entry.get("repo_id")
    raw = entry.get("path") or entry.get("ref")
    text = str(entry.get("ref") or raw or repo)
    path = None
    if isinstance(raw, str) and raw:
        p: Path | None = Path(raw)  # never expanded: "~nobody" would raise, and records hold no "~"
        if p is not None and not p.is_absolute():  # relative to the record's own directory, where known
            p = where / p if where is not None else None
        path = p if p is not None and p.is_dir() else None
    if isinstance(repo, str) and _HUB_ID.match(repo):
        return Named(text, repo_id=repo, path=path)
    if path is None and isinstance(raw, str) and _HUB_ID.match(raw) and not raw.startswith((".", "/")):
        return Named(text, repo_id=raw)
    return Named(text, path=path)


def _read_record(path: Path) -> dict[str, Any] | None:
    """A model directory's ``ftrecycle.json``, or None where it has none."""
    file = path / PROVENANCE
    if not os.path.lexists(file):
        return None
    fix = "repair or remove the file, or pass --ignore-provenance"
    data = read_json(file, what="provenance record", max_bytes=MAX_RECORD_BYTES, fix=fix)
    return data if isinstance(data, dict) else None


def recorded_bases(directory: Path) -> tuple[list[Named], Path | None]:
    """The bases a model directory's own records name (its chain of ftrecycle records, or its adapter config).

    Args:
        directory: a model or adapter directory.

    Returns:
        The named bases (empty: no record), and the file that named the first.

    Raises:
        CheckpointError: a record that is not JSON.
    """
    if is_adapter(directory):
        cfg = read_json(directory / ADAPTER_CONFIG, what="adapter config", fix="restore the file")
        base = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
        # PEFT writes the path as given at training time, relative to a working directory unknown here
        named = _named(base, None) if isinstance(base, str) and base else None
        return ([named] if named else []), directory / ADAPTER_CONFIG
    found: list[Named] = []
    todo, seen = [directory], set()
    for _ in range(MAX_CHAIN):
        nxt = []
        for d in todo:
            key = d.resolve()
            if key in seen:
                continue
            seen.add(key)
            record = _read_record(d)
            inputs = record.get("inputs") if record else None
            if not isinstance(inputs, dict):
                continue
            for role in ("model", "target_base"):
                named = _named(inputs.get(role), d)
                if named is not None:
                    found.append(named)
                    if named.path is not None:
                        nxt.append(named.path)
        todo = nxt
    return found, (directory / PROVENANCE if found else None)


def same_model(named: Named, ckpt: Checkpoint) -> bool | None:
    """Whether a recorded model is the opened ``ckpt``: True, False, or None (no claim)."""
    if named.repo_id and ckpt.source.repo_id:
        return named.repo_id.lower() == ckpt.source.repo_id.lower()
    if named.path is None or ckpt.source.repo_id:
        return None
    if named.path.resolve() == ckpt.path.resolve():
        return True
    mine, theirs = _fingerprint(ckpt.path), _fingerprint(named.path)
    if mine is None or theirs is None:
        return None
    return mine == theirs


def provenance_problems(base: Checkpoint, finetuned: str, fin: Checkpoint | None) -> list[str]:
    """What the models' own records say against the roles given (empty: nothing, or no claim).

    Args:
        base: the opened source base.
        finetuned: the fine-tuned model's reference (a model or adapter directory, or a hub id).
        fin: the opened fine-tuned model (None for an adapter).

    Returns:
        One message per problem: the fine-tuned model records another base; the source base records the
        fine-tuned model as its own base (swapped).

    Raises:
        CheckpointError: a record that is not JSON.
    """
    problems = []
    fdir = fin.path if fin is not None else Path(finetuned).expanduser()
    if fdir.is_dir():
        named, file = recorded_bases(fdir)
        claims = [same_model(n, base) for n in named]
        if named and all(c is False for c in claims):
            problems.append(
                f"the fine-tuned model's record {file} names its base as {', '.join(n.text for n in named)}, "
                f"not the source base {base.source.ref}: the diff would be taken from the wrong model; give its "
                "base as the source base"
            )
    if fin is not None:
        named, file = recorded_bases(base.path)
        if any(same_model(n, fin) for n in named):
            problems.append(
                f"the source base {base.source.ref} is itself made from the source fine-tuned model "
                f"{fin.source.ref} (its record {file} says so): the two look swapped; exchange them"
            )
    return problems


def check_provenance(base: Checkpoint, finetuned: str, fin: Checkpoint | None) -> None:
    """Refuse a fine-tuned model whose own record names another base, or swapped source models.

    Args:
        base: the opened base. finetuned: the fine-tuned model's reference. fin: it opened (None: an adapter).

    Raises:
        IncompatibleModelsError: the first of :func:`provenance_problems`, with the override flag.
        CheckpointError: a record that is not JSON.
    """
    problems = provenance_problems(base, finetuned, fin)
    if problems:
        raise IncompatibleModelsError(f"{problems[0]}; or pass --ignore-provenance if the record is wrong")


def tokenizer_conflicts(sources: dict[str, Path], target: Path) -> list[str]:
    """Where a source's tokenizer and the target's map an id they share to different tokens.

    Args:
        sources: role -> directory holding that model's tokenizer files.
        target: the target's directory.

    Returns:
        One message per disagreeing source (empty where they agree, or a vocabulary is not there).

    Raises:
        CheckpointError: a tokenizer file that is not JSON.
    """
    theirs = vocabulary(target)
    if theirs is None:
        return []
    out = []
    their_special = set(special_tokens(target))
    for role, directory in sources.items():
        mine = vocabulary(directory)
        if mine is None:
            continue
        # a special token renamed in place (Llama 3.1 gave reserved ids of Llama 3 new names) is not a remapped
        # vocabulary: such rows are untrained placeholders in the base, and --token-rows decides what they become
        special = their_special | set(special_tokens(directory))
        shared = sorted(set(mine) & set(theirs))
        bad = [i for i in shared if mine[i] != theirs[i] and i not in special]
        if bad:
            shown = "; ".join(f"id {i}: {mine[i]!r:.30} vs {theirs[i]!r:.30}" for i in bad[:3])
            out.append(
                f"the target's tokenizer ({target}) maps {len(bad)} of the {len(shared)} token ids it shares with "
                f"the {role}'s ({directory}) to other tokens ({shown}): the diff's rows would land on other tokens"
            )
    return out


def diff_is_zero(terms: dict[str, Term]) -> bool:
    """Whether the diff is zero everywhere (the output would copy the target).

    Args:
        terms: the diff, tensor by tensor.

    Returns:
        True only when every term is provably zero: a diff of two stored tensors equal bit for bit, or a
        LoRA update with a factor of zeros (PEFT's initialisation: an adapter never trained) or a scale
        of zero; False as soon as one is not (a stored delta's term makes no claim).
    """
    diffs = [t for t in terms.values() if isinstance(t, Difference)]
    packed = [t for t in terms.values() if isinstance(t, PackedTerm)]
    if not terms or len(diffs) + len(packed) != len(terms) or not all(_packed_zero(t) for t in packed):
        return False
    if any(t.fin.info.dtype != t.base.info.dtype for t in diffs):
        return False
    raw = (np.empty(ZERO_BLOCK * 8, dtype=np.uint8), np.empty(ZERO_BLOCK * 8, dtype=np.uint8))
    # every tensor's first block, then the rest: a real fine-tune is found different after one block each
    for first in (True, False):
        for t in diffs:
            numel = int(np.prod(t.shape)) if t.shape else 1
            starts = [0] if first else range(ZERO_BLOCK, numel, ZERO_BLOCK)
            for s in starts:
                n = min(ZERO_BLOCK, numel - s)
                x = t.fin.ckpt.read(t.fin.info, s, n, raw[0]).view(np.uint8)
                y = t.base.ckpt.read(t.base.info, s, n, raw[1]).view(np.uint8)
                if not np.array_equal(x, y):
                    return False
    return True


def _packed_zero(term: PackedTerm) -> bool:
    """Whether a packed term is zero: ``zero``, or a LoRA product with a factor of zeros or a zero scale."""
    p = term.packed
    if p.method == "zero":
        return True
    factors = [p.parts.get(k) for k in ("a", "b")]
    if p.method != "lowrank" or not all(isinstance(f, np.ndarray) for f in factors):
        return False  # factors stored in a delta's shards: not read here
    return p.scale == 0 or any(not np.any(f) for f in factors)
