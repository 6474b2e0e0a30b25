"""Held-out data for ``finetune --eval-data``: loss on any training format, accuracy on GSM8K-format files.

The loss is the mean cross-entropy over completion tokens (the tokens training is scored on), summed
over every item and divided by their count, so every token weighs the same whatever batch it falls in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftrecycle.errors import DataError
from ftrecycle.evaluate.data import read_gsm8k
from ftrecycle.finetune.data import IGNORE_INDEX, Collator, encode, load_examples


@dataclass
class EvalSet:
    """Held-out data: its rows (for the loss) and, when every row is a GSM8K item, the items scored for accuracy."""

    rows: list[dict[str, Any]]
    gsm8k: list[dict[str, Any]] | None


def read_eval_set(path: str | Path) -> EvalSet:
    """Read held-out data in any format :func:`ftrecycle.finetune.data.load_examples` accepts.

    Args:
        path: a JSONL file (prompt/completion, messages, or question/answer lines) or a hub dataset id.

    Returns:
        The rows, and the GSM8K items when every row is one (those are also scored for accuracy).

    Raises:
        DataError: a bad line, naming the file and line.
    """
    rows = load_examples(path)
    gsm8k = read_gsm8k(path) if rows and all(r["_kind"] == "gsm8k" for r in rows) and Path(str(path)).exists() else None
    return EvalSet(rows, gsm8k)


def eval_features(rows: list[dict[str, Any]], tok: Any, max_length: int, where: str | Path) -> list[dict[str, Any]]:
    """The tokenized held-out examples (as training tokenizes them).

    Raises:
        DataError: no example keeps a completion token within ``max_length``.
    """
    features = [f for r in rows if (f := encode(r, tok, max_length)) is not None]
    if not features:
        raise DataError(f"{where}: no held-out example keeps any completion token within --max-length {max_length}")
    return features


def eval_loss(model: Any, features: list[dict[str, Any]], pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy per completion token of ``model`` on ``features`` (the model is put back as it was).

    Args:
        model: a causal LM (a PEFT model too).
        features: tokenized examples (:func:`eval_features`).
        pad_id: the padding token id.
        batch_size: examples per forward pass.

    Returns:
        The loss, in nats per token.
    """
    import torch  # heavy: kept off the transfer path

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate = Collator(pad_id)
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, len(features), batch_size):
                batch = {k: v.to(device) for k, v in collate(features[i : i + batch_size]).items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]
                losses = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
                )
                total += float(losses.double().sum())
                count += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total / max(1, count)
