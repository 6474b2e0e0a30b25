"""GSM8K-format tasks: prompts, answer extraction and scoring identical to lm-eval's ``gsm8k``.

Data items are ``{"question": ..., "answer": "... #### N"}``. The prompt is lm-eval's
``"Question: {question}\\nAnswer:"`` with few-shot examples joined by blank lines; the
two filters are lm-eval's ``strict-match`` (``#### N``, first match) and
``flexible-extract`` (last number), and ``exact_match`` ignores case, commas, ``$``,
everything up to ``#### `` and a final period, on both sides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]
FALLBACK = "[invalid]"
STOP = ["Question:", "</s>", "<|im_end|>"]
FEWSHOT_DELIMITER = "\n\n"
TARGET_DELIMITER = " "


def doc_to_text(question: str) -> str:
    """The prompt of one item, as lm-eval's gsm8k task writes it."""
    return f"Question: {question}\nAnswer:"


def build_prompt(question: str, shots: list[dict[str, str]]) -> str:
    """A few-shot prompt: each shot with its answer, then the question."""
    parts = [doc_to_text(s["question"]) + TARGET_DELIMITER + s["answer"] for s in shots]
    return FEWSHOT_DELIMITER.join([*parts, doc_to_text(question)])


def _regex(pattern: re.Pattern[str], text: str, group_select: int) -> str:
    found = pattern.findall(text)
    if not found:
        return FALLBACK
    match = found[group_select]
    if isinstance(match, tuple):
        kept = [m for m in match if m]
        match = kept[0] if kept else FALLBACK
    return str(match).strip()


def extract_strict(text: str) -> str:
    """lm-eval's strict-match filter: the first ``#### N``."""
    return _regex(STRICT, text, 0)


def extract_flexible(text: str) -> str:
    """lm-eval's flexible-extract filter: the last number-like run."""
    return _regex(FLEXIBLE, text, -1)


def normalise(text: str) -> str:
    """lm-eval's exact_match preprocessing for gsm8k (regexes_to_ignore, ignore_case)."""
    for pattern in IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def is_correct(prediction: str, answer: str) -> bool:
    """exact_match of an extracted prediction against an item's full answer."""
    return normalise(prediction) == normalise(answer)


def truncate_at_stop(text: str, stops: list[str]) -> str:
    """Cut a generation at the first occurrence of each stop string, in order, as lm-eval does."""
    for term in stops:
        if term:
            text = text.split(term)[0]
    return text


@dataclass(frozen=True)
class Scored:
    """One item's result."""

    index: int
    generation: str
    strict: str
    flexible: str
    strict_correct: bool
    flexible_correct: bool


def score(index: int, generation: str, answer: str) -> Scored:
    """Extract both ways and score against the reference answer."""
    s, f = extract_strict(generation), extract_flexible(generation)
    return Scored(index, generation, s, f, is_correct(s, answer), is_correct(f, answer))
