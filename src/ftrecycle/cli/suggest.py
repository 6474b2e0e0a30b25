""" "Did you mean": the closest flag or command to a misspelt one.

argparse (before Python 3.14) names an unknown flag without a hint, and by default accepts any
unambiguous prefix of a flag (``--learning`` for ``--learning-rate``), so a typo can silently pick
another option. The parser (:class:`ftrecycle.cli.args.Parser`) turns prefixes off and asks this
module for a hint: the flag spelt with hyphens (``--source_base``), the name other tools use for the
same thing (``--lr``, ``--output_dir``), or the closest spelling of a flag of that command.
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Sequence

#: Names other tools (transformers' TrainingArguments, lm-eval, mergekit, PEFT scripts) give to
#: ftrecycle's flags; suggested only where the command has the flag on the right.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "--lr": ("--learning-rate",),
    "--output-dir": ("--output",),
    "--out": ("--output",),
    "--out-dir": ("--output",),
    "--outdir": ("--output",),
    "--output-path": ("--output", "--json"),
    "--num-train-epochs": ("--epochs",),
    "--max-seq-length": ("--max-length",),
    "--per-device-train-batch-size": ("--batch-size",),
    "--gradient-accumulation-steps": ("--grad-accum",),
    "--model-name-or-path": ("--model",),
    "--base-model": ("--base", "--source-base", "--model"),
    "--dataset": ("--data",),
    "--train-file": ("--data",),
    "--calibration-data": ("--calibration", "--data"),
    "--data": ("--calibration",),
    "--limit-samples": ("--limit",),
}


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return sorted({o for a in parser._actions for o in a.option_strings if o.startswith("--")})


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def chosen(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The (sub)parser ``argv`` selects: each subcommand named in turn, the last one found."""
    for i, token in enumerate(argv):
        sub = _subparsers(parser).get(token)
        if sub is not None:
            return chosen(sub, argv[i + 1 :])
    return parser


def flag_hint(flag: str, known: Sequence[str]) -> str | None:
    """The flag of ``known`` a misspelt ``flag`` most likely means, or None."""
    name = flag.split("=", 1)[0]
    norm = "--" + name.lstrip("-").replace("_", "-").lower()
    if norm in known and norm != name:
        return norm
    for target in SYNONYMS.get(norm, ()):
        if target in known:
            return target
    prefixed = [k for k in known if k.startswith(norm) and len(norm) > 3]
    if len(prefixed) == 1:
        return prefixed[0]
    close = difflib.get_close_matches(norm, known, n=1, cutoff=0.75)
    return close[0] if close else None


def unknown_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[tuple[str, str | None]]:
    """Each ``--flag`` of ``argv`` that the command it selects does not take, with its hint."""
    target = chosen(parser, argv)
    known = _flags(target)
    out = []
    for token in argv:
        name = token.split("=", 1)[0]
        if token.startswith("--") and name != "--" and name not in known:
            out.append((name, flag_hint(name, known)))
    return out


def explain(message: str, parser: argparse.ArgumentParser, argv: Sequence[str]) -> str:
    """``message`` of an argparse error, with every flag of ``argv`` the command does not take
    (argparse reports a missing required argument first, and names no unknown flag) and a
    "did you mean" for each, or for a misspelt command.

    Args:
        message: argparse's message (``unrecognized arguments: ...``, ``invalid choice: ...``, ...).
        parser: the parser that raised it.
        argv: the command line that parser parsed.

    Returns:
        The message, with the hints appended where there are some.
    """
    hints = []
    unknown = unknown_flags(parser, argv)
    if unknown and not message.startswith("unrecognized arguments:"):
        message += "; unknown flag(s): " + " ".join(name for name, _ in unknown)
    hints += [f"{name} -> {hint}" for name, hint in unknown if hint is not None]
    m = re.search(r"invalid choice: '([^']*)'", message)
    if m is not None:
        close = difflib.get_close_matches(m.group(1), list(_subparsers(parser)), n=1, cutoff=0.6)
        hints += [f"{m.group(1)} -> {close[0]}"] if close else []
    return f"{message}; did you mean: {', '.join(hints)}?" if hints else message
