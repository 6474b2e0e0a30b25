"""The argparse side of option checking: `type=` validators, a parser whose errors are one line, and
the generator that turns an option group's declared fields into arguments.

Every numeric flag of every subcommand gets one of these (a test walks the parser to hold it);
the ranges themselves are data in :mod:`ftrecycle.options`, shared with the API's typed groups,
so a flag and the keyword it becomes are checked by the same declaration.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from ftrecycle.cli.suggest import chosen, explain
from ftrecycle.errors import ConfigError
from ftrecycle.options import (
    FINITE,
    MAX_SEED,
    POSITIVE_INT,
    THREADS,
    TOKENS,
    Bound,
    Check,
    check_alpha,
    check_compression,
    check_size,
    flag_of,
)


class UsageError(ConfigError):
    """A command line argparse refuses: a missing argument, an unknown flag, a value of the wrong kind."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (raised, so that ``main`` prints and returns 2),
    that takes no abbreviation of a flag and says which flag a misspelt one probably means."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--learning` must not silently mean `--learning-rate`
        super().__init__(*args, **kwargs)
        self._argv: list[str] = []

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        prog = chosen(self, self._argv).prog if message.startswith("unrecognized arguments:") else self.prog
        raise UsageError(f"{explain(message, self, self._argv)} (see `{prog} --help`)")


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
non_negative_int = bounded(Bound(int, lo=0, hi=10_000))  # --num-fewshot


def checked(check: Check, flag: str) -> Callable[[str], Any]:
    """An argparse type from an option's ``check(value, flag)``; its message less the flag argparse names."""

    def parse(text: str) -> Any:
        try:
            return check(text, flag)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(flag + " ")) from None

    parse.__name__ = getattr(check, "__name__", "value").removeprefix("check_")
    return parse


def size_type(flag: str) -> Callable[[str], int]:
    """A byte size (``5GB``, ``512MiB``), checked by :func:`ftrecycle.options.check_size`."""
    return checked(check_size, flag)


#: a ``--compress`` SPEC, checked by :func:`ftrecycle.options.check_compression`; kept as text
compression_type = checked(check_compression, "--compress")


def device_type(text: str) -> str:
    """A torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``), refused unless torch knows it."""
    import torch  # heavy: only when --device is given

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
    """A finite scale or ``auto`` (the check of :class:`ftrecycle.options.Scaling`'s ``alpha``)."""
    return checked(check_alpha, "--alpha")(text)


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


# --------------------------------------------------------------------------------------------- generator

G = TypeVar("G")


def add_group(
    parser: argparse.ArgumentParser,
    group: type,
    *,
    only: Collection[str] | None = None,
    exclude: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
    title: str | None = None,
    explain: bool = False,
) -> None:
    """Add one argument per field of an option group (a dataclass of :func:`ftrecycle.options.option` fields).

    Args:
        parser: the subcommand's parser.
        group: the dataclass, e.g. :class:`ftrecycle.options.Policies`.
        only: the fields to add (default: all).
        exclude: fields to leave out.
        defaults: command-line defaults that differ from the field's (``max_memory``: not given).
        title: the help section's title (default: the group's name and docstring).
        explain: append the range and default to the help (for fields whose help does not say them).
    """
    chosen = [f for f in fields(group) if (only is None or f.name in only) and f.name not in exclude]
    unknown = (set(only or ()) | set(exclude)) - {f.name for f in fields(group)}
    if unknown:
        raise ValueError(f"{group.__name__} has no field(s) {', '.join(sorted(unknown))}")
    summary = (group.__doc__ or "").strip().split("\n", 1)[0] or None
    name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", group.__name__).lower()  # DeltaStorage -> delta storage
    section = parser.add_argument_group(title or name, None if title else summary)
    for f in chosen:
        default = (defaults or {}).get(f.name, _default(f))
        section.add_argument(flag_of(f), **argument_spec(f, default, explain=explain))


def argument_spec(f: Field[Any], default: Any, *, explain: bool = False) -> dict[str, Any]:
    """``add_argument`` keywords for one field: its help, and the type or choices that check it at parse time.

    Args:
        f: a dataclass field with :func:`ftrecycle.options.option` metadata.
        default: the command-line default.
        explain: append the range and default to the help.

    Returns:
        Keywords for :meth:`argparse.ArgumentParser.add_argument`.
    """
    meta = f.metadata
    text: str = meta["help"]
    if isinstance(default, bool):
        return {"action": "store_true", "help": text}
    spec: dict[str, Any] = {"default": default}
    if meta.get("metavar"):
        spec["metavar"] = meta["metavar"]
    bound: Bound | None = meta.get("bound")
    if bound is not None:
        spec["type"] = bounded(bound)
        text = f"{text}: {bound.describe()}" if explain else text
    elif meta.get("choices") is not None:
        spec["choices"] = list(meta["choices"])  # argparse's own message lists them
    elif meta.get("check") is not None:
        spec["type"] = checked(meta["check"], flag_of(f))
    elif meta.get("path"):
        spec["type"] = path_arg
    spec["help"] = f"{text} (default {default})" if explain else text
    return spec


def group_from_args(group: type[G], ns: argparse.Namespace, **given: Any) -> G:
    """The group back from a parsed namespace: the fields the command added, ``given`` over them.

    Fields the command did not add take the group's defaults; the group checks every value again.
    """
    values = {f.name: getattr(ns, f.name) for f in fields(group) if hasattr(ns, f.name)}  # type: ignore[arg-type]
    return group(**{**values, **given})


def bundle_from_args(bundle: type[G], ns: argparse.Namespace, **groups: Any) -> G:
    """A bundle of groups (:class:`ftrecycle.options.TransferOptions`) from a namespace; ``groups`` given whole."""
    hints = typing.get_type_hints(bundle)
    made = {
        g.name: groups[g.name] if g.name in groups else group_from_args(hints[g.name], ns)
        for g in fields(bundle)  # type: ignore[arg-type]
    }
    return bundle(**made)


def _default(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None
