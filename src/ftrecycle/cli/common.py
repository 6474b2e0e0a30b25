"""What the command modules share: the command record, progress bars, the memory budget, `--alpha auto`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from ftrecycle.cli.args import add_group
from ftrecycle.diagnose.verdict import AlphaChoice, best_alpha, check_alpha_request
from ftrecycle.engine import current_rss
from ftrecycle.errors import ConfigError, MemoryBudgetError
from ftrecycle.io.output import check_output, parse_size
from ftrecycle.options import DEFAULT_MAX_MEMORY, Resources

MODEL_HELP = "a local model directory, or a Hugging Face Hub id org/name[@revision]"


@dataclass(frozen=True)
class Command:
    """One row of the command table: how a subcommand is described, parsed and run.

    Attributes:
        name: the subcommand (``transfer``).
        help: the line in ``ftrecycle --help``.
        description: the paragraph of ``ftrecycle NAME --help``.
        add_arguments: adds the subcommand's arguments to its parser.
        run: does the work for a parsed namespace, printing results; raises the library's errors.
    """

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


class ProgressBar:
    """A tqdm bar on stderr made at the first update (so a command that fails early draws none).

    Called as ``bar(n, total)`` it advances by ``n`` bytes (the library's write progress); its
    :meth:`jobs` form sets the count of finished jobs (the lab's).
    """

    def __init__(self, desc: str, unit: str, **options: Any) -> None:
        self.desc, self.unit, self.options = desc, unit, options
        self.bar: Any = None

    def _open(self, total: int) -> Any:
        if self.bar is None:
            from tqdm import tqdm  # heavy: only once there is something to draw

            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr, **self.options)
        return self.bar

    def __call__(self, n: int, total: int) -> None:
        bar = self._open(total)
        bar.update(n)
        if bar.n >= total:
            bar.close()

    def jobs(self, done: int, total: int, job: str) -> None:
        """Show ``done`` of ``total`` jobs, naming the last one."""
        bar = self._open(total)
        bar.total, bar.n = total, done
        bar.set_postfix_str(job.split(":", 1)[-1])
        bar.refresh()

    def close(self) -> None:
        """Close the bar if one was drawn."""
        if self.bar is not None:
            self.bar.close()


def write_progress(quiet: bool) -> ProgressBar | None:
    """The byte progress bar of a writing command, or none with ``-q``."""
    if quiet:
        return None
    return ProgressBar("writing", "B", unit_scale=True, unit_divisor=1024, disable=None)


def add_models(p: argparse.ArgumentParser, *, adapter: bool = False) -> None:
    """The three models of a transfer: A and B of the source version, C the new version's base.

    Args:
        p: the subcommand's parser.
        adapter: B may be a PEFT LoRA adapter over A (the commands that read B through ``transfer``).
    """
    p.add_argument("--source-base", required=True, metavar="A", help=f"the source version's base model: {MODEL_HELP}")
    finetuned = "the source version's fine-tuned model"
    if adapter:
        finetuned += ", or a PEFT LoRA adapter directory over A"
    p.add_argument("--source-finetuned", required=True, metavar="B", help=finetuned)
    p.add_argument("--target-base", required=True, metavar="C", help="the new version's base model")


def add_quiet(p: argparse.ArgumentParser) -> None:
    """``-q/--quiet`` of the writing commands."""
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_resources(p: argparse.ArgumentParser) -> None:
    """:class:`~ftrecycle.options.Resources`, with ``--max-memory`` read as this command's peak memory."""
    add_group(p, Resources, defaults={"max_memory": None})


def resources(ns: argparse.Namespace) -> Resources:
    """The group :func:`add_resources` parsed, its budget what this process does not hold yet."""
    return Resources(max_memory=operation_budget(ns.max_memory), threads=ns.threads)


def operation_budget(text: int | str | None) -> int | str:
    """--max-memory bounds the command's peak RSS: the library gets what the process does not hold yet.

    Without the flag the operation gets the library's default budget on top of
    what the process holds (imports, and the models ``--alpha auto`` loaded).

    Raises:
        MemoryBudgetError: the budget is below what the process already holds.
    """
    if text is None:
        return DEFAULT_MAX_MEMORY
    budget = parse_size(text, flag="--max-memory")
    held = current_rss()
    if budget <= held:
        raise MemoryBudgetError(
            f"--max-memory {budget / 2**20:.0f} MiB is below what this process already holds "
            f"({held / 2**20:.0f} MiB); allow more"
        )
    return budget - held


def resolve_alpha(ns: argparse.Namespace, inputs: Collection[str | None] = ()) -> float:
    """``--alpha`` as a number: ``auto`` is chosen on calibration data (by accuracy on items with answers,
    else by loss: :func:`ftrecycle.diagnose.verdict.best_alpha`), the choice printed to stderr.

    Args:
        ns: a namespace with ``alpha``, ``calibration``, the three models, ``output`` and ``force``.
        inputs: the command's other inputs, which the output must not touch either.

    Raises:
        ConfigError: ``--calibration`` without ``--alpha auto`` or ``--mask grad-sign``, or ``auto`` without it.
    """
    if ns.alpha != "auto":
        if ns.calibration is not None and getattr(ns, "mask", None) != "grad-sign":
            raise ConfigError("--calibration is only used with --alpha auto or --mask grad-sign")
        return float(ns.alpha)
    check_alpha_request(ns.alpha, ns.calibration, mask=getattr(ns, "mask", None))
    # before the search: the calibration file is an input the output must not touch either
    models = [ns.source_base, ns.source_finetuned, ns.target_base]
    check_output(ns.output, [*models, ns.calibration, *inputs], force=ns.force)
    pr = best_alpha(ns.source_base, ns.source_finetuned, ns.target_base, ns.calibration)
    print(AlphaChoice(pr.best_alpha, pr).describe(), file=sys.stderr)
    return pr.best_alpha


class Once(argparse.Action):
    """A flag with several names (``--source-base``/``--base``) that may be given once: two different values
    under its two names is an error, not the last one silently winning."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, value: Any, flag: Any = None) -> None:
        seen = f"_once_{self.dest}"
        if getattr(ns, seen, None) is not None and getattr(ns, self.dest) != value:
            parser.error(f"{'/'.join(self.option_strings)} given twice ({getattr(ns, seen)} and {flag}); give it once")
        setattr(ns, seen, flag)
        setattr(ns, self.dest, value)


def add_source_pair(p: argparse.ArgumentParser, *, required: bool, base_help: str, finetuned_help: str) -> None:
    """A and B under transfer's names, ``--source-base``/``--source-finetuned``, with the older ``--base``/
    ``--finetuned`` still read (``ns.base``, ``ns.finetuned``; both names with two values is an error)."""
    for names, dest, metavar, text in (
        (("--source-base", "--base"), "base", "A", base_help),
        (("--source-finetuned", "--finetuned"), "finetuned", "B", finetuned_help),
    ):
        p.add_argument(*names, dest=dest, action=Once, required=required, default=None, metavar=metavar, help=text)
