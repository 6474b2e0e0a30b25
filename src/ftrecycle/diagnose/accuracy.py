"""The accuracy probe: exact-answer accuracy of C and of C + αΔ on calibration items that carry answers.

The loss probe can fall while answers break (the lab's M4 + Δ2: calibration loss −4 %, test
accuracy −11 points), so when the calibration data is in GSM8K format (``question`` and an
``answer`` ending in ``#### N``) the probe also generates greedy answers with the built-in
evaluator on the first K items and scores them by exact match (lm-eval's flexible-extract), once
for C and once per α, on the model already loaded by the loss probe (weights swapped in memory).

The gain's standard error is the paired one: the same items are scored for both models, so
SE = sd(y_i − x_i) / √K, with x_i, y_i ∈ {0, 1} the item's correctness under C and C + αΔ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftrecycle.evaluate.builtin import evaluate_gsm8k
from ftrecycle.finetune.data import load_examples

#: calibration items the accuracy probe scores (``diagnose --probe-items``)
PROBE_ITEMS = 64
#: most new tokens per generated answer (lm-eval's GSM8K default)
PROBE_NEW_TOKENS = 256


@dataclass(frozen=True)
class AccuracyProbe:
    """Exact-answer accuracy of C and of C + αΔ on the calibration items with answers.

    Attributes:
        items: items scored (the first ones of the calibration data that have a ``#### N`` answer).
        target: accuracy of C (a fraction).
        by_alpha: (α, accuracy of C + αΔ) for each α evaluated.
        alpha: the α the gain compares (1 for ``diagnose``; the chosen α for ``--alpha auto``).
        gain: accuracy of C + αΔ minus that of C (a fraction; negative = answers break).
        stderr: the paired standard error of ``gain``.
        seconds: wall time of the generations.
    """

    items: int
    target: float
    by_alpha: list[tuple[float, float]]
    alpha: float
    gain: float
    stderr: float
    seconds: float

    @property
    def transfer(self) -> float:
        """Accuracy of C + αΔ at :attr:`alpha`."""
        return self.target + self.gain

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "items": self.items,
            "target": self.target,
            "transfer": self.transfer,
            "by_alpha": self.by_alpha,
            "alpha": self.alpha,
            "gain": self.gain,
            "stderr": self.stderr,
            "seconds": round(self.seconds, 3),
        }


def answer_items(path: str | Path, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` calibration rows in GSM8K format with a ``#### N`` answer (none: an empty list).

    Raises:
        DataError: a malformed calibration file (naming the file and line).
    """
    if limit <= 0:
        return []
    rows = load_examples(path)
    out = [
        {"question": r["question"], "answer": r["answer"]}
        for r in rows
        if isinstance(r.get("question"), str) and isinstance(r.get("answer"), str) and "#### " in r["answer"]
    ]
    return out[:limit]


def correct(model: Any, tokenizer: Any, items: Sequence[dict[str, Any]], *, max_new_tokens: int) -> list[bool]:
    """Per-item exact-answer correctness (flexible-extract) of greedy answers, in item order."""
    report = evaluate_gsm8k(model, tokenizer, items, batch_size=64, max_gen_toks=max_new_tokens)
    return [s.flexible_correct for s in report.items]


def paired_stderr(before: Sequence[bool], after: Sequence[bool]) -> float:
    """The standard error of mean(after) − mean(before) over the same items (0 for fewer than 2)."""
    n = len(before)
    if n < 2:
        return 0.0
    d = [int(b) - int(a) for a, b in zip(before, after, strict=True)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return math.sqrt(var / n)


def summarize(target: Sequence[bool], by_alpha: dict[float, list[bool]], alpha: float, seconds: float) -> AccuracyProbe:
    """The :class:`AccuracyProbe` of per-item results, comparing C + ``alpha``·Δ with C."""
    n = len(target)

    def acc(xs: Sequence[bool]) -> float:
        return sum(xs) / n if n else 0.0

    chosen = by_alpha[alpha]
    return AccuracyProbe(
        items=n,
        target=acc(target),
        by_alpha=[(a, acc(v)) for a, v in sorted(by_alpha.items())],
        alpha=alpha,
        gain=acc(chosen) - acc(target),
        stderr=paired_stderr(target, chosen),
        seconds=seconds,
    )
