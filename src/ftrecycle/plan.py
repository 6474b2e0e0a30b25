"""Decide, tensor by tensor, what each output tensor is made of — before any data is read.

A *term* is one tensor of a diff vector: either ``finetuned - base`` (read from two
checkpoints) or a stored delta tensor. A *plan* lists every output tensor as pieces
over its flattened elements: ``add`` (target + alpha * term), ``sub`` (finetuned -
base, for ``diff``) or ``copy`` (the target's own values). Every adaptation — a tied
embedding, a grown vocabulary, a name on one side only, a non-floating buffer — is
decided here, refused unless a policy allows it, and recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from ftrecycle.arch import OUTPUT_EMBEDDING, VOCAB_NAMES, embedding_name, ties_embeddings, vocab_size
from ftrecycle.codecs import Packed
from ftrecycle.dtypes import DType
from ftrecycle.errors import ConfigError, IncompatibleModelsError
from ftrecycle.io.checkpoint import Checkpoint
from ftrecycle.io.safetensors_format import TensorInfo

VocabPolicy = Literal["error", "overlap"]
MissingPolicy = Literal["error", "keep-target"]
TiePolicy = Literal["error", "untie", "embed-only"]
VOCAB_POLICIES: tuple[str, ...] = ("error", "overlap")
MISSING_POLICIES: tuple[str, ...] = ("error", "keep-target")
TIE_POLICIES: tuple[str, ...] = ("error", "untie", "embed-only")


@dataclass(frozen=True)
class Operand:
    """One stored tensor of one checkpoint."""

    ckpt: Checkpoint
    info: TensorInfo


@dataclass(frozen=True)
class Term:
    """One tensor of a diff vector, of ``shape``: ``fin - base``, a stored dense ``delta``,
    or a ``packed`` one (compressed parts, a LoRA's factors, or zeros)."""

    name: str
    shape: tuple[int, ...]
    fin: Operand | None = None
    base: Operand | None = None
    delta: Operand | None = None
    packed: Packed | None = None


@dataclass(frozen=True)
class Piece:
    """A contiguous element range of one output tensor and how to compute it."""

    start: int
    count: int
    kind: Literal["add", "sub", "copy"]
    target: Operand | None = None
    term: Term | None = None


@dataclass
class OutTensor:
    """One tensor to write."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    pieces: list[Piece]

    @property
    def nbytes(self) -> int:
        """Output size in bytes."""
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass
class Plan:
    """Everything to write, and what was adapted and why."""

    tensors: list[OutTensor]
    records: list[dict[str, str]] = field(default_factory=list)
    ties_embeddings: bool | None = None
    vocab_size: int | None = None


def _check_policy(value: str, allowed: tuple[str, ...], flag: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{flag} {value!r} is not one of {', '.join(allowed)}")


def logical_names(ckpt: Checkpoint) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The checkpoint's tensors with tied aliases resolved.

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


def source_terms(
    base: Checkpoint, fin: Checkpoint, *, vocab: VocabPolicy = "error", on_missing: MissingPolicy = "error"
) -> tuple[dict[str, Term], dict[str, str], list[dict[str, str]]]:
    """The diff vector between a base and its fine-tuned model, as terms.

    Returns:
        terms by name, aliases (names the diff shares through tied embeddings), records.

    Raises:
        IncompatibleModelsError: names on one side only (unless ``keep-target``), shape mismatches
            (a vocabulary mismatch unless ``overlap``).
    """
    _check_policy(vocab, VOCAB_POLICIES, "--vocab")
    _check_policy(on_missing, MISSING_POLICIES, "--on-missing")
    bnames, baliases = logical_names(base)
    fnames, faliases = logical_names(fin)
    records: list[dict[str, str]] = []
    only_base = sorted(set(bnames) - set(fnames))
    only_fin = sorted(set(fnames) - set(bnames))
    if (only_base or only_fin) and on_missing == "error":
        raise IncompatibleModelsError(
            "tensor names differ between source base and source fine-tuned: "
            + "; ".join(
                f"only in {role}: {', '.join(ns[:20])}{' ...' if len(ns) > 20 else ''}"
                for role, ns in (("source base", only_base), ("source fine-tuned", only_fin))
                if ns
            )
            + "; pass --on-missing keep-target to leave those tensors out of the diff"
        )
    for n in only_base + only_fin:
        records.append({"tensor": n, "action": "no-delta", "reason": "present in only one of the source models"})
    vocabs = {v for v in (vocab_size(base.config), vocab_size(fin.config)) if v}
    shared_aliases = {a: s for a, s in baliases.items() if faliases.get(a) == s}
    for a, s in shared_aliases.items():
        records.append(
            {"tensor": a, "action": "tied", "reason": f"both source models tie it to {s}; its diff is {s}'s"}
        )
    for a in sorted(set(baliases) ^ set(faliases)):
        records.append(
            {
                "tensor": a,
                "action": "untied-diff",
                "reason": "one source model ties it to the embedding; the diff uses the embedding as its value there",
            }
        )
    terms: dict[str, Term] = {}
    for name in [n for n in bnames if n in fnames]:
        if name in shared_aliases:
            continue
        b, f = bnames[name], fnames[name]
        if not (b.dtype.is_floating and f.dtype.is_floating):
            records.append({"tensor": name, "action": "no-delta", "reason": f"non-floating ({b.dtype}); not diffed"})
            continue
        if not (b.dtype.arithmetic and f.dtype.arithmetic):
            raise _float8_error(name, b.dtype if not b.dtype.arithmetic else f.dtype)
        shape = b.shape
        if b.shape != f.shape:
            if not _is_vocab_tensor(name, b.shape, f.shape, vocabs):
                raise IncompatibleModelsError(
                    f"tensor {name!r} has shape {list(b.shape)} in the source base but {list(f.shape)} in the "
                    "source fine-tuned model; these are not versions of one model"
                )
            if vocab == "error":
                raise _vocab_error(name, b.shape, f.shape, "source base/source fine-tuned model")
            shape = (min(b.shape[0], f.shape[0]), *b.shape[1:])
            records.append(
                {
                    "tensor": name,
                    "action": "vocab-overlap",
                    "reason": f"diff over the {shape[0]} shared rows (base {b.shape[0]}, fine-tuned {f.shape[0]})",
                }
            )
        terms[name] = Term(name, shape, fin=Operand(fin, f), base=Operand(base, b))
    return terms, shared_aliases, records


def plan_transfer(
    target: Checkpoint,
    terms: dict[str, Term],
    source_aliases: dict[str, str],
    *,
    out_dtype: DType | None = None,
    vocab: VocabPolicy = "error",
    on_missing: MissingPolicy = "error",
    tie_mismatch: TiePolicy = "error",
    records: list[dict[str, str]] | None = None,
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

    Raises:
        IncompatibleModelsError: a mismatch that no chosen policy allows.
    """
    _check_policy(vocab, VOCAB_POLICIES, "--vocab")
    _check_policy(on_missing, MISSING_POLICIES, "--on-missing")
    _check_policy(tie_mismatch, TIE_POLICIES, "--tie-mismatch")
    recs = list(records or [])
    tnames, taliases = logical_names(target)
    vocabs = {v for v in (vocab_size(target.config),) if v} | {t.shape[0] for n, t in terms.items() if n in VOCAB_NAMES}
    used: set[str] = set()
    missing: list[str] = []
    out: list[OutTensor] = []
    ties = bool(taliases)

    def term_for(name: str) -> Term | None:
        if name in terms:
            used.add(name)
            return terms[name]
        alias = source_aliases.get(name)
        if alias is not None and alias in terms:
            used.add(alias)
            recs.append(
                {
                    "tensor": name,
                    "action": "tied-source",
                    "reason": f"the source ties it to {alias}: {alias}'s diff applied to it",
                }
            )
            return terms[alias]
        return None

    def build(name: str, info: TensorInfo) -> OutTensor:
        op = Operand(target, info)
        numel = info.numel
        dtype = out_dtype if (out_dtype is not None and info.dtype.arithmetic) else info.dtype
        if not info.dtype.arithmetic and (name in terms or name in source_aliases):
            raise _float8_error(name, info.dtype)
        if not info.dtype.arithmetic:
            if name in terms:
                used.add(name)
            recs.append(
                {"tensor": name, "action": "copied", "reason": f"{info.dtype}, no arithmetic; copied from target"}
            )
            return OutTensor(name, dtype, info.shape, [Piece(0, numel, "copy", op)])
        term = term_for(name)
        if term is None:
            missing.append(name)
            recs.append(
                {"tensor": name, "action": "copied", "reason": "no diff for it in the source; copied from target"}
            )
            return OutTensor(name, dtype, info.shape, [Piece(0, numel, "copy", op)])
        if term.shape == info.shape:
            return OutTensor(name, dtype, info.shape, [Piece(0, numel, "add", op, term)])
        if not _is_vocab_tensor(name, term.shape, info.shape, vocabs):
            raise IncompatibleModelsError(
                f"tensor {name!r} has shape {list(info.shape)} in the target but {list(term.shape)} in the "
                "diff; these are not versions of one model"
            )
        if vocab == "error":
            raise _vocab_error(name, term.shape, info.shape, "diff/target")
        rows = min(term.shape[0], info.shape[0])
        row = numel // info.shape[0] if info.shape[0] else 0
        recs.append(
            {
                "tensor": name,
                "action": "vocab-overlap",
                "reason": f"diff applied to the {rows} shared rows; target rows {rows}..{info.shape[0] - 1} "
                f"kept (diff has {term.shape[0]} rows)",
            }
        )
        if rows == info.shape[0]:
            return OutTensor(name, dtype, info.shape, [Piece(0, numel, "add", op, _narrow(term, rows))])
        split = rows * row
        return OutTensor(
            name,
            dtype,
            info.shape,
            [Piece(0, split, "add", op, _narrow(term, rows)), Piece(split, numel - split, "copy", op)],
        )

    for name, info in target.tensors.items():
        out.append(build(name, info))
    for alias, stored in taliases.items():
        term = terms.get(alias)
        if term is None or alias in source_aliases:
            if stored in terms or stored in source_aliases.values():
                recs.append(
                    {
                        "tensor": alias,
                        "action": "tied",
                        "reason": f"the target ties it to {stored}; the diff is applied once, to the stored matrix",
                    }
                )
            continue
        used.add(alias)
        if tie_mismatch == "error":
            raise IncompatibleModelsError(
                f"the source has a separate {alias} but the target ties it to {stored}: pass --tie-mismatch untie "
                f"(write {alias} = target {stored} + its own diff, set tie_word_embeddings false) or "
                f"--tie-mismatch embed-only (keep the target tied; {alias}'s diff is dropped)"
            )
        if tie_mismatch == "embed-only":
            recs.append(
                {
                    "tensor": alias,
                    "action": "dropped",
                    "reason": f"target ties it to {stored}; --tie-mismatch embed-only drops its diff",
                }
            )
            continue
        ties = False
        recs.append(
            {
                "tensor": alias,
                "action": "untied",
                "reason": f"target ties it to {stored}; --tie-mismatch "
                f"untie writes it as target {stored} + its own diff",
            }
        )
        out.append(build(alias, tnames[alias]))
    unused = sorted(set(terms) - used)
    for n in unused:
        recs.append({"tensor": n, "action": "dropped", "reason": "not in the target model; its diff is not applied"})
    if (missing or unused) and on_missing == "error":
        parts = []
        if missing:
            parts.append(f"only in the target: {', '.join(sorted(missing)[:20])}{' ...' if len(missing) > 20 else ''}")
        if unused:
            parts.append(f"only in the diff: {', '.join(unused[:20])}{' ...' if len(unused) > 20 else ''}")
        raise IncompatibleModelsError(
            "tensor names differ between the diff and the target: "
            + "; ".join(parts)
            + "; pass --on-missing keep-target to copy target-only tensors and drop diff-only ones"
        )
    emb = embedding_name(target.tensors)
    vsize = target.tensors[emb].shape[0] if emb else None
    return Plan(out, recs, ties_embeddings=ties, vocab_size=vsize)


def _narrow(term: Term, rows: int) -> Term:
    if term.shape[0] == rows:
        return term
    return replace(term, shape=(rows, *term.shape[1:]))


def plan_diff(terms: dict[str, Term], delta_dtype: DType) -> Plan:
    """Plan writing ``finetuned - base`` for every term, in ``delta_dtype``."""
    out = []
    for name in terms:
        t = terms[name]
        n = 1
        for d in t.shape:
            n *= d
        out.append(OutTensor(name, delta_dtype, t.shape, [Piece(0, n, "sub", None, t)]))
    return Plan(out)
