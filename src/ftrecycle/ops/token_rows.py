"""Token rows: which embedding rows look untrained, and which rows ``--token-rows`` decides.

A row of an embedding (or of an untied output head) *looks untrained* when its L2 norm is below
:data:`UNTRAINED_FRACTION` of the tensor's median row norm: base models leave the rows of special
tokens they never saw at zero or at a small initialisation (Llama 3 base's ``<|eot_id|>``), while
trained rows sit near the median. A row identical bit for bit in two versions of a model was never
trained between them. Rows are streamed a block at a time; each row's norm is summed over the whole
row in float64, so the result does not depend on the block size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ftrecycle.arch import OUTPUT_EMBEDDING, embedding_name
from ftrecycle.dtypes import from_storage
from ftrecycle.errors import ConfigError, IncompatibleModelsError
from ftrecycle.io.checkpoint import Checkpoint
from ftrecycle.io.safetensors_format import TensorInfo
from ftrecycle.io.tokenizer import special_tokens, vocabulary
from ftrecycle.options import TokenRowPolicy

#: A row whose norm is below this share of the median row norm looks untrained.
UNTRAINED_FRACTION = 0.1
#: Elements read at once while streaming rows (a few MiB of buffers).
BLOCK = 1 << 20


def row_tensors(ckpt: Checkpoint) -> dict[str, TensorInfo]:
    """The model's token-row tensors: its input embedding, and its output head when stored (untied).

    Args:
        ckpt: an opened model.

    Returns:
        Name -> tensor, empty when the model has no embedding.
    """
    out: dict[str, TensorInfo] = {}
    emb = embedding_name(ckpt.tensors)
    if emb is not None:
        out[emb] = ckpt.tensors[emb]
    head = ckpt.tensors.get(OUTPUT_EMBEDDING)
    if head is not None and head.dtype.arithmetic and len(head.shape) == 2:
        out[OUTPUT_EMBEDDING] = head
    return out


def _embedding_rows(ckpt: Checkpoint, role: str) -> int:
    """The rows of a model's input embedding.

    Raises:
        IncompatibleModelsError: the model has none.
    """
    emb = embedding_name(ckpt.tensors)
    if emb is None or not ckpt.tensors[emb].shape:
        raise IncompatibleModelsError(
            f"--token-rows: the {role} {ckpt.path} has no embedding tensor, so it has no token rows to choose"
        )
    return ckpt.tensors[emb].shape[0]


def _blocks(info: TensorInfo) -> tuple[int, int, int]:
    """(rows, elements per row, rows per block) of a 2-D tensor."""
    rows = info.shape[0] if info.shape else 0
    width = info.numel // rows if rows else 0
    return rows, width, max(1, BLOCK // max(width, 1))


def row_norms(ckpt: Checkpoint, info: TensorInfo) -> np.ndarray:
    """Every row's L2 norm (float64), streamed a block of rows at a time.

    Args:
        ckpt: the model.
        info: one of its floating tensors (rows = first dimension).

    Returns:
        One norm per row.
    """
    rows, width, per = _blocks(info)
    raw = np.empty(per * width * info.dtype.itemsize, dtype=np.uint8)
    out = np.empty(rows, dtype=np.float64)
    for r in range(0, rows, per):
        n = min(per, rows - r)
        x = from_storage(ckpt.read(info, r * width, n * width, raw), info.dtype, np.dtype(np.float64))
        x = x.reshape(n, width)
        out[r : r + n] = np.sqrt(np.sum(x * x, axis=1))
    return out


def identical_rows(a: Checkpoint, a_info: TensorInfo, c: Checkpoint, c_info: TensorInfo) -> np.ndarray:
    """Which of the rows two versions share are identical bit for bit (never trained between them).

    Args:
        a: one model. a_info: its tensor.
        c: another version. c_info: its tensor of the same name.

    Returns:
        A boolean per shared row; all False where dtypes or row widths differ (no claim).
    """
    rows_a, width, per = _blocks(a_info)
    rows = min(rows_a, c_info.shape[0] if c_info.shape else 0)
    same = np.zeros(rows, dtype=bool)
    if a_info.dtype != c_info.dtype or a_info.shape[1:] != c_info.shape[1:]:
        return same
    size = per * width * a_info.dtype.itemsize
    ra, rc = np.empty(size, dtype=np.uint8), np.empty(size, dtype=np.uint8)
    for r in range(0, rows, per):
        n = min(per, rows - r)
        x = a.read(a_info, r * width, n * width, ra).reshape(n, width)
        y = c.read(c_info, r * width, n * width, rc).reshape(n, width)
        same[r : r + n] = np.all(x == y, axis=1) if width else True
    return same


def untrained(norms: np.ndarray) -> list[int]:
    """The rows whose norm is below :data:`UNTRAINED_FRACTION` of the median row norm."""
    if norms.size == 0:
        return []
    cut = UNTRAINED_FRACTION * float(np.median(norms))
    return [int(i) for i in np.flatnonzero(norms < cut)]


def resolve_tokens(
    tokens: tuple[str, ...], vocab: dict[int, str] | None, rows: int | None, where: str
) -> dict[int, str | None]:
    """Ids for ``--tokens``: each an id, or a token string of the tokenizer.

    Args:
        tokens: as the option holds them.
        vocab: id -> token of the tokenizer that names them (None: ids only).
        rows: the embedding's rows (None: not known here; the plan checks the ids against each tensor).
        where: the tokenizer's directory, for messages.

    Returns:
        Id -> token string (None where only the id is known), sorted by id.

    Raises:
        ConfigError: a token the tokenizer does not have, or an id out of range.
    """
    by_text = {t: i for i, t in (vocab or {}).items()}
    out: dict[int, str | None] = {}
    for tok in tokens:
        if tok.isdecimal():
            i = int(tok)
            if rows is not None and i >= rows:
                raise ConfigError(f"--tokens: id {i} is out of range: the embedding has {rows} rows (0..{rows - 1})")
            out[i] = (vocab or {}).get(i)
            continue
        if tok not in by_text:
            known = "has no tokenizer.json or vocab.json" if vocab is None else "does not have it"
            raise ConfigError(
                f"--tokens: {tok!r:.60} is not a token of the tokenizer in {where} (it {known}); "
                "check its spelling or give its id"
            )
        i = by_text[tok]
        if rows is not None and i >= rows:
            raise ConfigError(f"--tokens: {tok!r:.60} has id {i}, past the embedding's {rows} rows")
        out[i] = tok
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class TokenRowChoice:
    """The rows ``--token-rows`` decides, and how they were chosen (recorded in ftrecycle.json).

    Attributes:
        policy: ``delta``, ``target`` or ``finetuned``.
        tokens: id -> token string (None where unknown).
        chosen: how: the ``--tokens`` list, or the special tokens untrained in the source base.
        untrained: the special tokens that looked untrained in the source base (default rows only).
    """

    policy: TokenRowPolicy
    tokens: dict[int, str | None]
    chosen: str
    untrained: dict[str, list[int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (ids as lists: JSON object keys are strings)."""
        out: dict[str, Any] = {
            "policy": self.policy,
            "rows": list(self.tokens),
            "tokens": [self.tokens[i] for i in self.tokens],
            "chosen": self.chosen,
        }
        if self.untrained:
            out["untrained_special_rows_in_source_base"] = self.untrained
        return out


def choose_token_rows(
    policy: TokenRowPolicy,
    tokens: tuple[str, ...] | None,
    source_base: Checkpoint | None,
    target: Checkpoint,
    tokenizer_dirs: list[Path],
) -> TokenRowChoice:
    """The rows ``--token-rows`` decides: ``tokens``, or the special tokens untrained in the source base.

    Args:
        policy: what the rows become.
        tokens: the ``--tokens`` list (None: the default rows).
        source_base: the opened source base (None where there is none, as for ``apply``).
        target: the opened target, whose embedding's rows the ids must lie in.
        tokenizer_dirs: directories whose tokenizer files name the tokens, first found first.

    Returns:
        The choice (possibly no rows: no special token looks untrained).

    Raises:
        ConfigError: a token or id that cannot be resolved; default rows without a source base.
        IncompatibleModelsError: the source base or the target has no embedding.
    """
    vocab = next((v for v in (vocabulary(d) for d in tokenizer_dirs) if v is not None), None)
    where = str(tokenizer_dirs[0]) if tokenizer_dirs else "the model"
    rows = _embedding_rows(target, "target")
    if tokens is not None:
        return TokenRowChoice(policy, resolve_tokens(tokens, vocab, rows, where), "--tokens")
    if source_base is None:
        raise ConfigError(
            f"--token-rows {policy} needs --tokens LIST here: without the source base the rows that look "
            "untrained in it cannot be found"
        )
    _embedding_rows(source_base, "source base")
    found = row_tensors(source_base)
    specials: dict[int, str] = {}
    for d in reversed(tokenizer_dirs):
        specials.update(special_tokens(d))
    flagged: dict[str, list[int]] = {}
    chosen: dict[int, str | None] = {}
    for name, info in found.items():
        low = [i for i in untrained(row_norms(source_base, info)) if i in specials]
        flagged[name] = low
        chosen.update({i: specials[i] for i in low})
    how = f"the special tokens whose rows look untrained in the source base (norm < {UNTRAINED_FRACTION:g} x median)"
    return TokenRowChoice(policy, dict(sorted(chosen.items())), how, flagged)
