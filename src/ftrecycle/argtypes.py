"""The argparse side of option checking: `type=` validators and a parser whose errors are one line.

Every numeric flag of every subcommand gets one of these (a test walks the parser to hold it);
the ranges themselves are data in :mod:`ftrecycle.options`, shared with the typed configs.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any, NoReturn

from ftrecycle.errors import ConfigError
from ftrecycle.options import FINITE, MAX_SEED, POSITIVE_INT, THREADS, TOKENS, Bound


class UsageError(ConfigError):
    """A command line argparse refuses: a missing argument, an unknown flag, a value of the wrong kind."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (raised, so that ``main`` prints and returns 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


#: the largest --batch-size of `eval`
MAX_BATCH = 65536


def bounded(bound: Bound) -> Callable[[str], Any]:
    """An argparse type that parses a number and checks it against ``bound``."""

    def parse(text: str) -> Any:
        try:
            return bound.check(text, "value")
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("value ")) from None

    parse.__name__ = bound.describe()
    return parse


positive_int = bounded(POSITIVE_INT)
thread_count = bounded(THREADS)
token_count = bounded(TOKENS)
batch_size = bounded(Bound(int, lo=1, hi=MAX_BATCH))
finite_float = bounded(FINITE)


def size_type(flag: str) -> Callable[[str], int]:
    """A byte size (``5GB``, ``512MiB``), checked by :func:`ftrecycle.io.output.parse_size`."""
    from ftrecycle.io.output import parse_size

    def parse(text: str) -> int:
        try:
            return parse_size(text, flag=flag)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(flag + " ")) from None

    parse.__name__ = "size"
    return parse


def compression_type(text: str) -> str:
    """A ``--compress`` SPEC, checked by :func:`ftrecycle.codecs.parse_compression`; kept as text."""
    from ftrecycle.codecs import parse_compression

    try:
        parse_compression(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--compress ")) from None
    return text


def device_type(text: str) -> str:
    """A torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``), refused unless torch knows it."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine; use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; use cpu")
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise argparse.ArgumentTypeError(f"{text!r}: not a device this command runs on; use cpu, cuda or mps")
    return text


def png_path(text: str) -> str:
    """An output PNG path whose directory exists (nothing is created for it)."""
    from pathlib import Path

    p = Path(text).expanduser()
    if not text or p.name in ("", ".", ".."):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file name; give e.g. plots/layers.png")
    parent = p.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text}: directory {parent} does not exist; create it first (mkdir -p {parent})"
        )
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a directory; give a file name such as {p / 'layers.png'}")
    if p.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"{text}: the plot is a PNG; give a name ending in .png")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: directory {parent} is not writable")
    return str(p)


def seeds_type(text: str) -> tuple[int, ...]:
    """Comma-separated distinct seeds, each a 32-bit unsigned integer."""
    seed = Bound(int, lo=0, hi=MAX_SEED)
    items = [s for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}")
    try:
        out = tuple(int(seed.check(s, "seed")) for s in items)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(f"{e} in {text!r}") from None
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a seed")
    return out


def alpha_type(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(FINITE.check(text, "alpha"))
    except ConfigError:
        raise argparse.ArgumentTypeError(f"must be a finite number or 'auto', got {text!r}") from None


#: arguments that name a file, directory or model: an empty name would silently mean the current directory
PATH_ARGS = frozenset(
    {
        "source_base",
        "source_finetuned",
        "target_base",
        "base",
        "finetuned",
        "delta",
        "output",
        "out",
        "calibration",
        "data",
        "eval_data",
        "model",
        "chain",
        "task_dir",
        "builtin",
    }
)


def path_arg(text: str) -> str:
    """A path or model id: not empty (which would mean the current directory), no NUL byte."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a path (use . for the current directory)")
    if "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r} holds a NUL byte, which no path can")
    return text


def check_paths(parser: argparse.ArgumentParser) -> None:
    """Give every path argument of every subcommand the :func:`path_arg` check."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                check_paths(sub)
        elif action.dest in PATH_ARGS and action.type is None and action.nargs != 0:
            action.type = path_arg
