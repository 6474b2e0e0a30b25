"""Decide, tensor by tensor, what each output tensor is made of — before any data is read.

A *term* is one tensor of a diff vector: ``finetuned - base`` (read from two checkpoints),
a stored delta tensor, or a packed one (see :mod:`ftrecycle.terms`). A *plan* lists every
output tensor as pieces over its flattened elements: ``Add`` (target + alpha * term),
``Sub`` (finetuned - base, for ``diff``) or ``Copy`` (the target's own values). Every
adaptation — a tied embedding, a grown vocabulary, a name on one side only, a non-floating
buffer — is decided here, refused unless a policy allows it, and recorded (an
:class:`~ftrecycle.terms.Action`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import get_args

from ftrecycle.arch import OUTPUT_EMBEDDING, VOCAB_NAMES, embedding_name, ties_embeddings, vocab_size
from ftrecycle.dtypes import DType
from ftrecycle.errors import ConfigError, IncompatibleModelsError
from ftrecycle.io.checkpoint import Checkpoint
from ftrecycle.io.safetensors_format import TensorInfo
from ftrecycle.options import MissingPolicy, TiePolicy, TokenRowPolicy, VocabPolicy
from ftrecycle.terms import (
    Action,
    Add,
    Copy,
    Difference,
    Masked,
    Operand,
    OutTensor,
    Piece,
    Plan,
    Record,
    Sub,
    Term,
    record,
)

# the policies' values, as options.py declares them: checked again here for callers of the planner itself
VOCAB_POLICIES: tuple[str, ...] = get_args(VocabPolicy)
MISSING_POLICIES: tuple[str, ...] = get_args(MissingPolicy)
TIE_POLICIES: tuple[str, ...] = get_args(TiePolicy)
TOKEN_ROW_POLICIES: tuple[str, ...] = get_args(TokenRowPolicy)


def _check_policy(value: str, allowed: tuple[str, ...], flag: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{flag} {value!r} is not one of {', '.join(allowed)}")


def logical_names(ckpt: Checkpoint) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The checkpoint's tensors with tied aliases resolved.

    Args:
        ckpt: an indexed model.

    Returns:
        name -> stored tensor (``lm_head.weight`` maps to the embedding when the
        config ties them and it is not stored), and the aliases (alias -> stored name).
    """
    names = dict(ckpt.tensors)
    aliases: dict[str, str] = {}
    emb = embedding_name(names)
    if OUTPUT_EMBEDDING not in names and emb is not None and ties_embeddings(ckpt.config):
        names[OUTPUT_EMBEDDING] = names[emb]
        aliases[OUTPUT_EMBEDDING] = emb
    return names, aliases


def _is_vocab_tensor(name: str, a: tuple[int, ...], b: tuple[int, ...], vocabs: set[int]) -> bool:
    if len(a) != len(b) or not a or a[1:] != b[1:]:
        return False
    return name in VOCAB_NAMES or (a[0] in vocabs and b[0] in vocabs)


def _float8_error(name: str, dtype: DType) -> IncompatibleModelsError:
    return IncompatibleModelsError(
        f"tensor {name!r} is {dtype}: ftrecycle does no arithmetic on float8 weights (their scales live in "
        "other tensors); dequantize the checkpoints to bfloat16 first"
    )


def _vocab_error(name: str, a: tuple[int, ...], b: tuple[int, ...], roles: str) -> IncompatibleModelsError:
    return IncompatibleModelsError(
        f"tensor {name!r} has {a[0]} vocabulary rows in the {roles.split('/')[0]} and {b[0]} in the "
        f"{roles.split('/')[1]}: pass --vocab overlap to apply the diff to the shared rows and keep the "
        "target's other rows"
    )


def _some(names: list[str]) -> str:
    """Up to 20 names, for a message."""
    return f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''}"


def source_terms(
    base: Checkpoint, fin: Checkpoint, *, vocab: VocabPolicy = "error", on_missing: MissingPolicy = "error"
) -> tuple[dict[str, Term], dict[str, str], list[Record]]:
    """The diff vector between a base and its fine-tuned model, as terms.

    Args:
        base: the source base model.
        fin: the source fine-tuned model.
        vocab: what to do when vocabulary rows differ.
        on_missing: what to do with names on one side only.

    Returns:
        terms by name (each a :class:`~ftrecycle.terms.Difference`), aliases (names the diff
        shares through tied embeddings), records.

    Raises:
        ConfigError: a policy that is not one of its values.
        IncompatibleModelsError: names on one side only (unless ``keep-target``), shape mismatches
            (a vocabulary mismatch unless ``overlap``).
    """
    _check_policy(vocab, VOCAB_POLICIES, "--vocab")
    _check_policy(on_missing, MISSING_POLICIES, "--on-missing")
    bnames, baliases = logical_names(base)
    fnames, faliases = logical_names(fin)
    records = _one_sided_sources(bnames, fnames, on_missing)
    shared_aliases = {a: s for a, s in baliases.items() if faliases.get(a) == s}
    records += _source_alias_records(shared_aliases, set(baliases) ^ set(faliases))
    vocabs = {v for v in (vocab_size(base.config), vocab_size(fin.config)) if v}
    terms: dict[str, Term] = {}
    for name in [n for n in bnames if n in fnames]:
        if name in shared_aliases:
            continue
        b, f = bnames[name], fnames[name]
        if not (b.dtype.is_floating and f.dtype.is_floating):
            records.append(record(name, Action.NO_DELTA, f"non-floating ({b.dtype}); not diffed"))
            continue
        if not (b.dtype.arithmetic and f.dtype.arithmetic):
            raise _float8_error(name, b.dtype if not b.dtype.arithmetic else f.dtype)
        shape = _source_shape(name, b.shape, f.shape, vocab, vocabs, records)
        terms[name] = Difference(name, shape, fin=Operand(fin, f), base=Operand(base, b))
    return terms, shared_aliases, records


def _one_sided_sources(
    bnames: dict[str, TensorInfo], fnames: dict[str, TensorInfo], on_missing: MissingPolicy
) -> list[Record]:
    """Records of the names in only one source model, or the error that refuses them."""
    only_base = sorted(set(bnames) - set(fnames))
    only_fin = sorted(set(fnames) - set(bnames))
    if (only_base or only_fin) and on_missing == "error":
        raise IncompatibleModelsError(
            "tensor names differ between source base and source fine-tuned: "
            + "; ".join(
                f"only in {role}: {_some(ns)}"
                for role, ns in (("source base", only_base), ("source fine-tuned", only_fin))
                if ns
            )
            + "; pass --on-missing keep-target to leave those tensors out of the diff"
        )
    return [record(n, Action.NO_DELTA, "present in only one of the source models") for n in only_base + only_fin]


def _source_alias_records(shared: dict[str, str], one_sided: set[str]) -> list[Record]:
    """Records of the tied aliases: shared by both source models, or tied in only one."""
    recs = [record(a, Action.TIED, f"both source models tie it to {s}; its diff is {s}'s") for a, s in shared.items()]
    recs += [
        record(
            a,
            Action.UNTIED_DIFF,
            "one source model ties it to the embedding; the diff uses the embedding as its value there",
        )
        for a in sorted(one_sided)
    ]
    return recs


def _source_shape(
    name: str, b: tuple[int, ...], f: tuple[int, ...], vocab: VocabPolicy, vocabs: set[int], records: list[Record]
) -> tuple[int, ...]:
    """The shape of the diff of tensors of shapes ``b`` and ``f``: their shared vocabulary rows
    (recorded) when a policy allows it."""
    if b == f:
        return b
    if not _is_vocab_tensor(name, b, f, vocabs):
        raise IncompatibleModelsError(
            f"tensor {name!r} has shape {list(b)} in the source base but {list(f)} in the "
            "source fine-tuned model; these are not versions of one model"
        )
    if vocab == "error":
        raise _vocab_error(name, b, f, "source base/source fine-tuned model")
    shape = (min(b[0], f[0]), *b[1:])
    records.append(
        record(name, Action.VOCAB_OVERLAP, f"diff over the {shape[0]} shared rows (base {b[0]}, fine-tuned {f[0]})")
    )
    return shape


def plan_transfer(
    target: Checkpoint,
    terms: dict[str, Term],
    source_aliases: dict[str, str],
    *,
    out_dtype: DType | None = None,
    vocab: VocabPolicy = "error",
    on_missing: MissingPolicy = "error",
    tie_mismatch: TiePolicy = "error",
    records: list[Record] | None = None,
) -> Plan:
    """Plan ``target + alpha * diff`` for every tensor the target stores.

    Args:
        target: the new base model.
        terms: the diff vector (from :func:`source_terms` or a stored delta).
        source_aliases: names the diff shares through tied embeddings.
        out_dtype: dtype of floating outputs; None keeps each target tensor's dtype.
        vocab: what to do when vocabulary rows differ.
        on_missing: what to do with names on one side only.
        tie_mismatch: what to do when the source unties embeddings and the target ties them.
        records: earlier records to extend.

    Returns:
        The output tensors, the records (``records`` first), whether the output still ties its
        embeddings, and its vocabulary size.

    Raises:
        ConfigError: a policy that is not one of its values.
        IncompatibleModelsError: a mismatch that no chosen policy allows.
    """
    _check_policy(vocab, VOCAB_POLICIES, "--vocab")
    _check_policy(on_missing, MISSING_POLICIES, "--on-missing")
    _check_policy(tie_mismatch, TIE_POLICIES, "--tie-mismatch")
    tnames, taliases = logical_names(target)
    vocabs = {v for v in (vocab_size(target.config),) if v} | {t.shape[0] for n, t in terms.items() if n in VOCAB_NAMES}
    planner = _TransferPlanner(target, terms, source_aliases, out_dtype, vocab, vocabs, list(records or []))
    out = [planner.tensor(name, info) for name, info in target.tensors.items()]
    ties = bool(taliases)
    for alias, stored in taliases.items():
        if planner.target_alias(alias, stored, tie_mismatch):
            ties = False
            out.append(planner.tensor(alias, tnames[alias]))
    unused = sorted(set(terms) - planner.used)
    planner.records += [record(n, Action.DROPPED, "not in the target model; its diff is not applied") for n in unused]
    if on_missing == "error":
        _check_same_names(planner.missing, unused)
    emb = embedding_name(target.tensors)
    vsize = target.tensors[emb].shape[0] if emb else None
    return Plan(out, planner.records, ties_embeddings=ties, vocab_size=vsize)


@dataclass
class _TransferPlanner:
    """One pass of :func:`plan_transfer`: its inputs, and what it has found so far — the records,
    the terms it used, and the target tensors the diff has no term for."""

    target: Checkpoint
    terms: dict[str, Term]
    source_aliases: dict[str, str]
    out_dtype: DType | None
    vocab: VocabPolicy
    vocabs: set[int]
    records: list[Record]
    used: set[str] = field(default_factory=set)
    missing: list[str] = field(default_factory=list)

    def tensor(self, name: str, info: TensorInfo) -> OutTensor:
        """The output tensor ``name``, stored in the target as ``info``."""
        op = Operand(self.target, info)
        dtype = self.out_dtype if (self.out_dtype is not None and info.dtype.arithmetic) else info.dtype
        if not info.dtype.arithmetic:
            if name in self.terms or name in self.source_aliases:
                raise _float8_error(name, info.dtype)
            self.records.append(record(name, Action.COPIED, f"{info.dtype}, no arithmetic; copied from target"))
            return OutTensor(name, dtype, info.shape, [Copy(0, info.numel, op)])
        term = self.term_for(name)
        if term is None:
            self.missing.append(name)
            self.records.append(record(name, Action.COPIED, "no diff for it in the source; copied from target"))
            return OutTensor(name, dtype, info.shape, [Copy(0, info.numel, op)])
        return OutTensor(name, dtype, info.shape, self.pieces(name, op, term))

    def term_for(self, name: str) -> Term | None:
        """The diff's term for ``name``: its own, or that of the tensor the source ties it to."""
        if name in self.terms:
            self.used.add(name)
            return self.terms[name]
        alias = self.source_aliases.get(name)
        if alias is not None and alias in self.terms:
            self.used.add(alias)
            self.records.append(
                record(name, Action.TIED_SOURCE, f"the source ties it to {alias}: {alias}'s diff applied to it")
            )
            return self.terms[alias]
        return None

    def pieces(self, name: str, op: Operand, term: Term) -> list[Piece]:
        """``op + alpha * term``; where the vocabularies differ (and ``overlap`` allows it), over
        the shared rows, the target's other rows copied."""
        info = op.info
        numel = info.numel
        if term.shape == info.shape:
            return [Add(0, numel, op, term)]
        if not _is_vocab_tensor(name, term.shape, info.shape, self.vocabs):
            raise IncompatibleModelsError(
                f"tensor {name!r} has shape {list(info.shape)} in the target but {list(term.shape)} in the "
                "diff; these are not versions of one model"
            )
        if self.vocab == "error":
            raise _vocab_error(name, term.shape, info.shape, "diff/target")
        rows = min(term.shape[0], info.shape[0])
        row = numel // info.shape[0] if info.shape[0] else 0
        self.records.append(
            record(
                name,
                Action.VOCAB_OVERLAP,
                f"diff applied to the {rows} shared rows; target rows {rows}..{info.shape[0] - 1} "
                f"kept (diff has {term.shape[0]} rows)",
            )
        )
        if rows == info.shape[0]:
            return [Add(0, numel, op, _narrow(term, rows))]
        split = rows * row
        return [Add(0, split, op, _narrow(term, rows)), Copy(split, numel - split, op)]

    def target_alias(self, alias: str, stored: str, tie_mismatch: TiePolicy) -> bool:
        """Decide a name the target ties to ``stored``; True when it is to be written as its own
        tensor (``--tie-mismatch untie``).

        Raises:
            IncompatibleModelsError: the diff has a separate term for it and ``tie_mismatch`` is ``error``.
        """
        if alias not in self.terms or alias in self.source_aliases:
            if stored in self.terms or stored in self.source_aliases.values():
                self.records.append(
                    record(
                        alias,
                        Action.TIED,
                        f"the target ties it to {stored}; the diff is applied once, to the stored matrix",
                    )
                )
            return False
        self.used.add(alias)
        if tie_mismatch == "error":
            raise IncompatibleModelsError(
                f"the source has a separate {alias} but the target ties it to {stored}: pass --tie-mismatch untie "
                f"(write {alias} = target {stored} + its own diff, set tie_word_embeddings false) or "
                f"--tie-mismatch embed-only (keep the target tied; {alias}'s diff is dropped)"
            )
        if tie_mismatch == "embed-only":
            self.records.append(
                record(alias, Action.DROPPED, f"target ties it to {stored}; --tie-mismatch embed-only drops its diff")
            )
            return False
        self.records.append(
            record(
                alias,
                Action.UNTIED,
                f"target ties it to {stored}; --tie-mismatch untie writes it as target {stored} + its own diff",
            )
        )
        return True


def _check_same_names(missing: list[str], unused: list[str]) -> None:
    """Refuse names in only the target or only the diff (``--on-missing error``)."""
    if not (missing or unused):
        return
    parts = []
    if missing:
        parts.append(f"only in the target: {_some(sorted(missing))}")
    if unused:
        parts.append(f"only in the diff: {_some(unused)}")
    raise IncompatibleModelsError(
        "tensor names differ between the diff and the target: "
        + "; ".join(parts)
        + "; pass --on-missing keep-target to copy target-only tensors and drop diff-only ones"
    )


def _narrow(term: Term, rows: int) -> Term:
    """``term`` over its first ``rows`` rows (read as the first elements of its operands)."""
    if term.shape[0] == rows:
        return term
    return replace(term, shape=(rows, *term.shape[1:]))


def mask_terms(
    terms: dict[str, Term], mask: Checkpoint, target: Checkpoint, *, mask_name: str = "the mask"
) -> tuple[dict[str, Term], list[Record]]:
    """The diff's terms, each kept only where its sign agrees with the mask's tensor of its name.

    A mask tensor has the shape of the target's tensor of that name (it was computed on the target);
    the term is read over its first elements, as the target is where vocabularies differ. A term
    the mask has no tensor for is added whole, and recorded; a term whose tensor the target does
    not have is left as it is (the planner drops it).

    Args:
        terms: the diff vector.
        mask: the opened mask file (int8 tensors of -1/0/+1; see :mod:`ftrecycle.io.maskfile`).
        target: the new base model.
        mask_name: the mask file, for messages.

    Returns:
        The terms (masked ones as :class:`~ftrecycle.terms.Masked`) and the records of the unmasked ones.

    Raises:
        IncompatibleModelsError: a mask tensor whose shape is not the target's.
    """
    tnames, _ = logical_names(target)
    out: dict[str, Term] = {}
    records: list[Record] = []
    for name, term in terms.items():
        m, t = mask.tensors.get(name), tnames.get(name)
        if t is None:
            out[name] = term
        elif m is None:
            out[name] = term
            records.append(record(name, Action.UNMASKED, f"{mask_name} has no entry for it; its diff is added whole"))
        elif m.shape != t.shape:
            raise IncompatibleModelsError(
                f"tensor {name!r} has shape {list(m.shape)} in {mask_name} but {list(t.shape)} in the target: "
                "the mask was computed for another model; make it on this target with `ftrecycle mask`"
            )
        else:
            out[name] = Masked(name, term.shape, term, Operand(mask, m))
    return out, records


def plan_diff(terms: dict[str, Term], delta_dtype: DType) -> Plan:
    """Plan writing ``finetuned - base`` for every term, in ``delta_dtype``.

    Args:
        terms: the diff vector (from :func:`source_terms` or a LoRA adapter).
        delta_dtype: the stored dtype.

    Returns:
        One output tensor per term, each a single ``Sub`` piece.
    """
    out = []
    for name in terms:
        t = terms[name]
        n = 1
        for d in t.shape:
            n *= d
        out.append(OutTensor(name, delta_dtype, t.shape, [Sub(0, n, t)]))
    return Plan(out)


# --------------------------------------------------------------------------------------------- token rows

_ROW_SOURCES = {
    "delta": "target + alpha * diff, as every other row",
    "target": "the target's own rows",
    "finetuned": "the fine-tuned model's rows",
}


def row_list(rows: Sequence[int], limit: int = 12) -> str:
    """``3, 7..9, 12``: sorted ids with their runs joined, up to ``limit`` runs (for messages and records)."""
    runs = _runs(rows)
    text = ", ".join(str(a) if b == a + 1 else f"{a}..{b - 1}" for a, b in runs[:limit])
    return text + (f", ... ({len(rows)} rows)" if len(runs) > limit else "")


def _runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted unique ids as half-open runs ``[a, b)`` of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for r in sorted(set(rows)):
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def set_token_rows(plan: Plan, rows: Sequence[int], policy: TokenRowPolicy, *, chosen: str) -> None:
    """Make ``rows`` of every vocabulary tensor of a transfer's plan what ``policy`` says, and record it.

    The rows become ``Copy`` pieces of the target's tensor (``target``) or of the fine-tuned model's
    (``finetuned``, Chat Vector), read at the same element offsets, so that they are those rows bit for bit
    (cast only where the output dtype differs); ``delta`` leaves the plan as it is and records the rows.

    Args:
        plan: from :func:`plan_transfer` (changed in place).
        rows: token ids.
        policy: ``delta``, ``target`` or ``finetuned``.
        chosen: how the rows were chosen, for the record.

    Raises:
        ConfigError: an unknown policy.
        IncompatibleModelsError: no vocabulary tensor in the plan, an id past a tensor's rows, or
            ``finetuned`` where the fine-tuned model's row is not read (a stored delta, a row the diff
            does not cover).
    """
    _check_policy(policy, TOKEN_ROW_POLICIES, "--token-rows")
    vocab = [t for t in plan.tensors if t.name in VOCAB_NAMES and t.shape and t.pieces]
    if not vocab:
        raise IncompatibleModelsError(
            "--token-rows: the target has no embedding or output head tensor to take token rows from"
        )
    for t in vocab:
        if rows and max(rows) >= t.shape[0]:
            raise IncompatibleModelsError(
                f"--tokens: id {max(rows)} is past the {t.shape[0]} rows of {t.name}; give ids below {t.shape[0]}"
            )
        width = 1
        for d in t.shape[1:]:
            width *= d
        spans = [(a * width, b * width) for a, b in _runs(rows)]
        if policy != "delta":
            t.pieces = [q for p in t.pieces for q in _carve(t.name, p, spans, policy, width)]
        plan.records.append(
            record(
                t.name,
                Action.TOKEN_ROWS,
                f"rows {row_list(rows)} are {_ROW_SOURCES[policy]} (--token-rows {policy}; {chosen})",
            )
        )


def _carve(name: str, piece: Piece, spans: list[tuple[int, int]], policy: TokenRowPolicy, width: int) -> list[Piece]:
    """``piece`` with the element ranges ``spans`` taken from the target or the fine-tuned model."""
    out: list[Piece] = []
    at, end = piece.start, piece.start + piece.count
    for s, e in spans:
        s, e = max(s, at), min(e, end)
        if s >= e:
            continue
        if s > at:
            out.append(replace(piece, start=at, count=s - at))
        out.append(_row_source(name, piece, s, e - s, policy, width))
        at = e
    if at < end:
        out.append(replace(piece, start=at, count=end - at))
    return out


def _row_source(name: str, piece: Piece, start: int, count: int, policy: TokenRowPolicy, width: int) -> Piece:
    """The piece that reads elements ``[start, start + count)`` from where ``policy`` says."""
    if policy == "target" and isinstance(piece, Add | Copy):
        return Copy(start, count, piece.target)
    if isinstance(piece, Add) and isinstance(piece.term, Difference):
        return Copy(start, count, piece.term.fin)
    row = start // width
    why = (
        "the diff comes from a stored delta, which does not hold the fine-tuned model's rows (use `transfer`)"
        if isinstance(piece, Add)
        else "the diff does not cover it (the target's vocabulary is larger)"
    )
    raise IncompatibleModelsError(f"--token-rows finetuned: row {row} of {name} has no fine-tuned value: {why}")
