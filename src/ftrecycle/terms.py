"""The vocabulary of a plan: terms (tensors of a diff vector), pieces (how an output range is
computed), output tensors, and the records of every adaptation.

Each "one of several kinds" is a union of small frozen classes rather than one class with
optional fields, so that a term without operands or an ``add`` without a target cannot be
built, and the engine dispatches with ``match`` (mypy checks that every kind is handled).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeAlias, TypedDict

from ftrecycle.codecs import Packed
from ftrecycle.dtypes import DType
from ftrecycle.io.checkpoint import Checkpoint
from ftrecycle.io.safetensors_format import TensorInfo


@dataclass(frozen=True)
class Operand:
    """One stored tensor of one checkpoint."""

    ckpt: Checkpoint
    info: TensorInfo


# ---------------------------------------------------------------- terms


@dataclass(frozen=True)
class Difference:
    """A diff tensor read from two checkpoints: ``fin - base``, over the first elements of both
    (``shape`` may have fewer rows than either when vocabularies differ)."""

    name: str
    shape: tuple[int, ...]
    fin: Operand
    base: Operand


@dataclass(frozen=True)
class Stored:
    """A diff tensor stored dense in a delta directory."""

    name: str
    shape: tuple[int, ...]
    delta: Operand


@dataclass(frozen=True)
class PackedTerm:
    """A diff tensor held in another form: compressed parts, a LoRA's factors, or zeros."""

    name: str
    shape: tuple[int, ...]
    packed: Packed


class MaskTally:
    """What a masked term kept, counted by the engine's workers as they compute it.

    Integer counts, so their sum is the same in any order, thread count or chunk size.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.elements = 0
        self.nonzero = 0
        self.kept = 0

    def add(self, elements: int, nonzero: int, kept: int) -> None:
        """Count one element range: its size, its non-zero diff entries, and the non-zero ones kept."""
        with self._lock:
            self.elements += elements
            self.nonzero += nonzero
            self.kept += kept


@dataclass(frozen=True)
class Masked:
    """A diff tensor kept only where its sign agrees with a sign mask (GradFix, ICLR 2026):
    ``term * (sign(term) == mask)``, elementwise; ``mask`` is an int8 tensor of -1/0/+1 read over
    the same elements (see :mod:`ftrecycle.io.maskfile`)."""

    name: str
    shape: tuple[int, ...]
    term: Term
    mask: Operand
    tally: MaskTally = field(default_factory=MaskTally, compare=False, repr=False)


#: One tensor of a diff vector, of ``shape``.
Term: TypeAlias = Difference | Stored | PackedTerm | Masked


# ---------------------------------------------------------------- pieces


@dataclass(frozen=True)
class Add:
    """Elements ``[start, start + count)``: ``target + alpha * term``."""

    start: int
    count: int
    target: Operand
    term: Term


@dataclass(frozen=True)
class Sub:
    """Elements ``[start, start + count)``: the term itself (``finetuned - base``, for ``diff``)."""

    start: int
    count: int
    term: Term


@dataclass(frozen=True)
class Copy:
    """Elements ``[start, start + count)``: the target's own values (cast to the output dtype)."""

    start: int
    count: int
    target: Operand


#: A contiguous element range of one output tensor and how to compute it.
Piece: TypeAlias = Add | Sub | Copy


@dataclass
class OutTensor:
    """One tensor to write; ``pieces`` is empty for tensors filled outside the engine
    (compressed parts)."""

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


# ---------------------------------------------------------------- records


class Action(StrEnum):
    """What was done to a tensor that was not simply ``target + alpha * diff``.

    Written as the ``action`` of each record in ``ftrecycle.json`` and in a delta's manifest.
    """

    NO_DELTA = "no-delta"
    """The diff has no term for it: present in only one source model, or not floating."""
    TIED = "tied"
    """An alias of a tied embedding; its diff is the stored matrix's, applied once."""
    UNTIED_DIFF = "untied-diff"
    """One source model ties it to the embedding and the other does not; the diff uses the
    embedding as its value where tied."""
    VOCAB_OVERLAP = "vocab-overlap"
    """Vocabulary rows differ; the diff covers the shared rows and the target keeps its others."""
    TIED_SOURCE = "tied-source"
    """The source ties it to another tensor, whose diff is applied to it."""
    COPIED = "copied"
    """Copied from the target: no diff for it, or a dtype without arithmetic (float8, integers)."""
    DROPPED = "dropped"
    """A diff not applied: its tensor is not in the target, or ``--tie-mismatch embed-only``."""
    UNTIED = "untied"
    """The target ties it; ``--tie-mismatch untie`` writes it as its own tensor with its own diff."""
    LORA_SOURCE = "lora-source"
    """The diff is a LoRA adapter's merged update (one record for the whole model, tensor ``*``)."""
    UNMASKED = "unmasked"
    """``--mask``: the mask file has no entry for it; its diff is added whole."""
    TOKEN_ROWS = "token-rows"
    """Chosen token rows of an embedding or head (``--token-rows``): the target's row, the fine-tuned
    model's row, or target + alpha * diff as every other row (the record lists the rows and the policy)."""


class Record(TypedDict):
    """One adaptation: a plain dict, so that it is written to JSON and compared as such."""

    tensor: str
    action: Action
    reason: str


def record(tensor: str, action: Action, reason: str) -> Record:
    """A record of ``action`` on ``tensor``, and why."""
    return {"tensor": tensor, "action": action, "reason": reason}


@dataclass
class Plan:
    """Everything to write, and what was adapted and why."""

    tensors: list[OutTensor]
    records: list[Record] = field(default_factory=list)
    ties_embeddings: bool | None = None
    vocab_size: int | None = None
