"""The lab's small world: a vocabulary, a tokenizer and every text the lab trains or tests on.

Everything is generated from a seed. The task is GSM8K-format multi-step arithmetic
word problems (``"... #### N"``), made hard enough that no version reaches a ceiling:
2–4 steps, amounts 0..MAX_NUMBER, sometimes a doubling, and in half the problems a second
person with the same items whose own amounts are a distractor. The pretraining corpora talk
about the same people and things, stage 2 with far more arithmetic (OLMo 2's math-rich
mid-training, in miniature). A second "language" is a fixed word-for-word cipher of the
English words (numbers and the answer format kept), used for the multilingual experiment.

Texts use the wordings below on purpose:

* SFT answers: ``"12 + 5 = 17 . 17 - 3 = 14 . #### 14"``;
* question/answer text in pretraining: ``"Question: ... Answer: ..."`` solved either in the SFT
  wording (a share ``Mix.sft_format``: GSM-style data sits in real pretraining mixes) or in
  other words, ``"12 and 5 is 17 , 17 take 3 is 14 . #### 14"``; so the bases score above 0
  zero-shot and a fine-tune of realistic size aligns what pretraining taught;
* stories: ``"Mia had 12 pens . then she bought 5 more , so Mia had 17 pens ."``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

NAMES = ("Mia Leo Ann Tom Eva Sam Ivy Max Zoe Ben Ada Kai Lou Ray Uma Dan Eli Fay Gus Nia").split()
ITEMS = "apples pens books coins shells cards stones cups hats kites eggs beads toys maps bells seeds".split()
PLACES = "park school market river garden library farm beach shop forest".split()
ADJECTIVES = "red big small old new blue green happy quiet bright".split()
ACTIONS = "walks runs reads sings waits sleeps plays works jumps swims".split()
LIKES = "likes wants sees keeps finds holds".split()
ADD_VERBS = ("buys", "finds", "gets", "wins")
SUB_VERBS = ("gives away", "loses", "sells", "uses")
ADD_PAST = {"buys": "bought", "finds": "found", "gets": "got", "wins": "won"}
SUB_PAST = {"gives away": "gave away", "loses": "lost", "sells": "sold", "uses": "used"}
FUNCTION_WORDS = (
    "has have had does do how many more then now . , ? the to at in a and with of so is starts make take "
    "times twice doubles double were left there are each his her he she they it this that day"
).split()
FORMAT = ("Question:", "Answer:", "####", "+", "-", "*", "=")
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
MAX_NUMBER = 20
MAX_AMOUNT = 5  # a step adds or takes 1..MAX_AMOUNT
DOUBLING = 0.10  # share of steps that double the amount (when it fits)
TASK_STEPS = (2, 3, 4)  # steps of a fine-tuning or test problem, drawn uniformly
DISTRACTOR = 0.5  # share of problems with a second person holding the same items (a distractor amount)
# the second person's own steps (fewest, most), told between the asked person's; (0, 0): only their amount.
# Steps for them too made the task too hard for the tiny preset's model (zero-shot 24-33 % at M5, measured).
DISTRACTOR_STEPS = (0, 0)
HE = {n: ("she" if i % 2 == 0 else "he") for i, n in enumerate(NAMES)}


def english_words() -> list[str]:
    """Every English word the generators use, in a fixed order."""
    words: list[str] = []
    for group in (NAMES, ITEMS, PLACES, ADJECTIVES, ACTIONS, LIKES, FUNCTION_WORDS):
        words.extend(group)
    for verbs in (ADD_VERBS, SUB_VERBS, tuple(ADD_PAST.values()), tuple(SUB_PAST.values())):
        for v in verbs:
            words.extend(v.split())
    return list(dict.fromkeys(words))  # first occurrence of each, in order


def cipher(seed: int = 7) -> dict[str, str]:
    """The second language: each English word maps to a made-up word (same for every seed of the lab)."""
    rng = random.Random(seed)
    onsets, vowels, codas = "b d f g k l m n p r s t v z".split(), "a e i o u".split(), ["", "n", "r", "s"]
    out: dict[str, str] = {}
    used: set[str] = set()
    for w in english_words():
        if w in {".", ",", "?"}:
            out[w] = w
            continue
        while True:
            cand = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(2)) + rng.choice(codas) + "x"
            if cand not in used:
                used.add(cand)
                out[w] = cand
                break
    return out


def vocabulary() -> list[str]:
    """The tokenizer's words: specials, format tokens, numbers 0..MAX_NUMBER, English, second language."""
    cip = cipher()
    words = list(SPECIALS) + list(FORMAT) + [str(i) for i in range(MAX_NUMBER + 1)] + english_words()
    words += [cip[w] for w in english_words() if cip[w] not in words]
    return words


def tokenizer() -> Any:
    """A word-level fast tokenizer over :func:`vocabulary` (numbers are single tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # heavy: kept off the CLI's start-up path
    from transformers import PreTrainedTokenizerFast  # heavy: as tokenizers

    words = vocabulary()
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )


@dataclass(frozen=True)
class Problem:
    """One multi-step word problem: a start amount and a list of (op, amount, verb) steps.

    ``other`` is a distractor: a second person with the same kind of item, their own start amount
    and steps, told interleaved with the asked person's (``order``: 0 = the next step of the asked
    person, 1 = the next step of the other). The question asks about ``name`` only.
    """

    name: str
    item: str
    start: int
    steps: tuple[tuple[str, int, str], ...]  # (op "+", "-" or "*", amount, verb)
    other: str | None = None
    other_start: int = 0
    other_steps: tuple[tuple[str, int, str], ...] = ()
    order: tuple[int, ...] = ()

    def values(self) -> list[int]:
        """The running amount after each step, starting value first."""
        return _run(self.start, self.steps)

    @property
    def answer_value(self) -> int:
        """The asked person's amount at the end: the answer after ``####``."""
        return self.values()[-1]


def _run(start: int, steps: tuple[tuple[str, int, str], ...]) -> list[int]:
    vals = [start]
    for op, b, _ in steps:
        v = vals[-1]
        vals.append(v + b if op == "+" else v - b if op == "-" else v * b)
    return vals


def _steps(rng: random.Random, start: int, n_steps: int) -> tuple[tuple[str, int, str], ...]:
    """``n_steps`` steps from ``start`` that keep the amount within 0..MAX_NUMBER (doubling when it fits)."""
    v, steps = start, list[tuple[str, int, str]]()
    while len(steps) < n_steps:
        r, b = rng.random(), rng.randint(1, MAX_AMOUNT)
        if r < DOUBLING and 0 < v <= MAX_NUMBER // 2:
            steps.append(("*", 2, "doubles"))
            v *= 2
        elif r < 0.55 and v + b <= MAX_NUMBER:
            steps.append(("+", b, rng.choice(ADD_VERBS)))
            v += b
        elif v - b >= 0:
            steps.append(("-", b, rng.choice(SUB_VERBS)))
            v -= b
    return tuple(steps)


def sample_problem(rng: random.Random, n_steps: int, *, distractor: float = 0.0) -> Problem:
    """A problem whose every amount stays within 0..MAX_NUMBER; with probability ``distractor``, a second person."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(2, MAX_NUMBER - 5)
    steps = _steps(rng, start, n_steps)
    if rng.random() >= distractor:
        return Problem(name, item, start, steps)
    other = rng.choice([n for n in NAMES if n != name])
    other_start = rng.randint(2, MAX_NUMBER - 5)
    other_steps = _steps(rng, other_start, rng.randint(*DISTRACTOR_STEPS))
    order = [0] * n_steps + [1] * len(other_steps)
    rng.shuffle(order)
    return Problem(name, item, start, steps, other, other_start, other_steps, tuple(order))


def _step_text(who: str, item: str, step: tuple[str, int, str]) -> str:
    op, b, verb = step
    if op == "*":
        return f"{who} doubles the {item} ."
    if op == "+":
        return f"{who} {verb} {b} more {item} ."
    return f"{who} {verb} {b} {item} ."


def question(p: Problem) -> str:
    """The problem statement (people named in every step, so a distractor's steps are unambiguous)."""
    parts = [f"{p.name} has {p.start} {p.item} ."]
    if p.other is None:
        he = HE[p.name]
        for k, step in enumerate(p.steps):
            parts.append(_step_text(he if k == 0 else f"then {he}", p.item, step))
    else:
        parts.append(f"{p.other} has {p.other_start} {p.item} .")
        mine, theirs = iter(p.steps), iter(p.other_steps)
        for who in p.order:
            name, step = (p.name, next(mine)) if who == 0 else (p.other, next(theirs))
            parts.append(_step_text(name, p.item, step))
    parts.append(f"how many {p.item} does {p.name} have now ?")
    return " ".join(parts)


def sft_answer(p: Problem) -> str:
    """The fine-tuning data's step-by-step solution, ending in ``#### N``."""
    vals = p.values()
    parts = [f"{vals[k]} {op} {b} = {vals[k + 1]} ." for k, (op, b, _) in enumerate(p.steps)]
    return " ".join(parts) + f" #### {p.answer_value}"


def pretrain_answer(p: Problem) -> str:
    """Stage-2 question/answer text: the same arithmetic in other words."""
    vals = p.values()
    words = {"+": "and", "-": "take", "*": "times"}
    joins = [f"{vals[k]} {words[op]} {b} is {vals[k + 1]}" for k, (op, b, _) in enumerate(p.steps)]
    return " , ".join(joins) + f" . #### {p.answer_value}"


def story(p: Problem) -> str:
    """A worked story: the problem told in the past tense with every amount spelled out."""
    vals = p.values()
    parts = [f"{p.name} had {p.start} {p.item} ."]
    for k, (op, b, verb) in enumerate(p.steps):
        if op == "*":
            parts.append(f"then the {p.item} double , so there were {vals[k + 1]} .")
        elif op == "+":
            parts.append(f"then {HE[p.name]} {ADD_PAST[verb]} {b} more , so {p.name} had {vals[k + 1]} {p.item} .")
        else:
            parts.append(f"then {HE[p.name]} {SUB_PAST[verb]} {b} , so {vals[k + 1]} were left .")
    return " ".join(parts)


def fact(rng: random.Random) -> str:
    """One arithmetic fact (a sum, a difference or a doubling), as an equation or in words."""
    b = rng.randint(1, MAX_AMOUNT)
    equation = rng.random() < 0.5
    kind = rng.random()
    if kind < DOUBLING:
        a = rng.randint(1, MAX_NUMBER // 2)
        return f"{a} * 2 = {2 * a} ." if equation else f"{a} times 2 is {2 * a} ."
    if kind < 0.55:
        a = rng.randint(0, MAX_NUMBER - b)
        return f"{a} + {b} = {a + b} ." if equation else f"{a} and {b} make {a + b} ."
    a = rng.randint(b, MAX_NUMBER)
    return f"{a} - {b} = {a - b} ." if equation else f"{a} take {b} is {a - b} ."


def filler(rng: random.Random) -> str:
    """A general-text sentence about the world's people, things and places."""
    name, other = rng.choice(NAMES), rng.choice(NAMES)
    kind = rng.randrange(4)
    if kind == 0:
        return f"{name} {rng.choice(ACTIONS)} in the {rng.choice(PLACES)} with {other} ."
    if kind == 1:
        return f"{name} {rng.choice(LIKES)} the {rng.choice(ADJECTIVES)} {rng.choice(ITEMS)} ."
    if kind == 2:
        return f"there are {rng.randint(2, 20)} {rng.choice(ITEMS)} at the {rng.choice(PLACES)} ."
    return f"{HE[name]} {rng.choice(ACTIONS)} at the {rng.choice(PLACES)} each day ."


def translate(text: str, table: dict[str, str]) -> str:
    """Word-for-word into the second language; numbers and format tokens are kept."""
    return " ".join(table.get(w, w) for w in text.split())


@dataclass(frozen=True)
class Mix:
    """Shares of a pretraining stage's documents (they need not sum to 1; they are normalised)."""

    filler: float
    facts: float
    stories: float
    qa: float
    second_language: float
    sft_format: float = 0.0  # share of question/answer documents solved in the fine-tuning data's wording


STAGE1 = Mix(filler=0.25, facts=0.30, stories=0.10, qa=0.30, second_language=0.05, sft_format=0.5)
STAGE2 = Mix(filler=0.10, facts=0.20, stories=0.25, qa=0.40, second_language=0.05, sft_format=0.5)


def documents(rng: random.Random, mix: Mix) -> Iterator[str]:
    """An endless stream of pretraining documents drawn from ``mix``."""
    table = cipher()
    kinds = ("filler", "facts", "stories", "qa", "second_language")
    weights = [getattr(mix, k) for k in kinds]
    while True:
        kind = rng.choices(kinds, weights)[0]
        if kind == "filler":
            yield " ".join(filler(rng) for _ in range(rng.randint(2, 5)))
        elif kind == "facts":
            yield " ".join(fact(rng) for _ in range(rng.randint(2, 5)))
        elif kind == "stories":
            yield story(sample_problem(rng, rng.randint(1, 4)))
        elif kind == "qa":
            p = sample_problem(rng, rng.randint(1, 4), distractor=DISTRACTOR)
            answer = sft_answer(p) if rng.random() < mix.sft_format else pretrain_answer(p)
            yield f"Question: {question(p)}\nAnswer: {answer}"
        else:
            yield translate(" ".join(filler(rng) for _ in range(rng.randint(2, 4))), table)


def sft_items(
    rng: random.Random, n: int, *, steps: tuple[int, ...] = TASK_STEPS, language: bool = False
) -> list[dict[str, str]]:
    """``n`` GSM8K-format items ``{"question", "answer"}`` (optionally in the second language)."""
    table = cipher() if language else None
    out = []
    for _ in range(n):
        p = sample_problem(rng, rng.choice(steps), distractor=DISTRACTOR)
        q, a = question(p), sft_answer(p)
        if table is not None:
            q, a = translate(q, table), translate(a, table)
        out.append({"question": q, "answer": a})
    return out


def fingerprint() -> str:
    """A digest of what this world generates (vocabulary, both corpora, the task), for the lab's job cache.

    Pretraining is keyed by it, so a changed generator is never served models pretrained on the old texts.
    """
    h = hashlib.sha256("\n".join(vocabulary()).encode())
    for mix in (STAGE1, STAGE2):
        docs = documents(random.Random(0), mix)
        h.update("\n".join(next(docs) for _ in range(200)).encode())
    h.update(repr(sft_items(random.Random(0), 100)).encode())
    return h.hexdigest()[:16]
