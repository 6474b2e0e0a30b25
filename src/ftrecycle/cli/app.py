"""The ``ftrecycle`` command: a table of subcommands, and the one place that turns errors into exit codes.

Each command module (:mod:`~ftrecycle.cli.models`, :mod:`~ftrecycle.cli.training`,
:mod:`~ftrecycle.cli.evaluation`, :mod:`~ftrecycle.cli.diagnosis`, :mod:`~ftrecycle.cli.lab`) lists
its :class:`~ftrecycle.cli.common.Command` rows; :func:`main` parses, looks the command up and runs
it. Library errors (:class:`FtRecycleError`) become one line on stderr and exit code 2; anything
unexpected one line and exit code 3.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

from ftrecycle.cli import calibration, diagnosis, evaluation, lab, masking, models, training
from ftrecycle.cli.args import Parser, check_paths
from ftrecycle.cli.common import Command
from ftrecycle.cli.trainfile import with_config_file
from ftrecycle.distributed import exit_together, is_main, reported_elsewhere
from ftrecycle.errors import FtRecycleError
from ftrecycle.io.hf_load import no_progress_bars
from ftrecycle.version import __version__

INTERNAL_ERROR_EXIT = 3
#: the commands that load models through transformers (whose progress bars show only with --progress)
HF_COMMANDS = frozenset(
    {"finetune", "recycle-finetune", "iterate", "eval", "diagnose", "calibrate", "mask", "lab", "demo"}
)
DEBUG_ENV = "FTRECYCLE_DEBUG"

#: every subcommand, in the order ``ftrecycle --help`` lists them
COMMANDS: dict[str, Command] = {
    c.name: c for group in (models, masking, calibration, diagnosis, lab, training, evaluation) for c in group.COMMANDS
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ftrecycle`` command: one subparser per row of :data:`COMMANDS`."""
    parser = Parser(
        prog="ftrecycle",
        description="Recycle fine-tuning across versions of a language model: move the diff vector "
        "(fine-tuned minus base) of one version onto the next version's base.",
    )
    parser.add_argument("--version", action="version", version=f"ftrecycle {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS.values():
        c.add_arguments(sub.add_parser(c.name, help=c.help, description=c.description))
    check_paths(parser)
    return parser


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[list[int]]:
    """SIGTERM and SIGINT raise KeyboardInterrupt, so every temporary file is removed on the way out.

    A second signal during that clean-up is ignored rather than cutting it short (SIGKILL still
    works; the next run for the same output removes what a killed run left).
    """
    got: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if got:
            return
        got.append(signum)
        raise KeyboardInterrupt

    old: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, handler)
    try:
        yield got
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ftrecycle`` command; return its exit code.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        0, 2 for a usage or library error, 3 for an internal error, 128+N for signal N, 141 for a closed stdout.
    """
    parser = build_parser()
    try:
        ns = parser.parse_args(with_config_file(parser, sys.argv[1:] if argv is None else argv))
    except FtRecycleError as e:  # argparse's own errors, one line (see args.Parser)
        return _fail(f"ftrecycle: error: {e}", e.exit_code, e)
    if not is_main():  # under `accelerate launch` every process runs this command; the main one reports
        sys.stdout = open(os.devnull, "w")  # for the rest of this process's life
    with _signals_interrupt() as got:
        return _run(ns, got)


def _run(ns: argparse.Namespace, got: list[int]) -> int:
    """Run the parsed command; every way out of it as an exit code and at most one line on stderr."""
    try:
        # transformers' own bars ("Loading weights") only with --progress, on the commands that load models with it
        quiet = ns.command in HF_COMMANDS and not getattr(ns, "progress", False)
        with no_progress_bars() if quiet else contextlib.nullcontext():
            COMMANDS[ns.command].run(ns)
    except FtRecycleError as e:
        # under `accelerate launch` the main process alone prints the main's error; all leave together
        rc = e.exit_code if reported_elsewhere(e) else _fail(f"ftrecycle: error: {e}", e.exit_code, e)
        exit_together(e, rc)
        return rc
    except KeyboardInterrupt:
        name = signal.Signals(got[0]).name if got else "SIGINT"
        print(f"ftrecycle: interrupted ({name}); nothing half-written was left under an output name", file=sys.stderr)
        return 128 + (got[0] if got else int(signal.SIGINT))
    except RecursionError as e:
        return _fail(
            "ftrecycle: error: an input is nested too deeply to process (RecursionError); "
            "check the JSON/YAML files given",
            2,
            e,
        )
    except MemoryError as e:
        return _fail(
            "ftrecycle: error: out of memory (MemoryError); give a smaller --max-memory, --batch-size or "
            "model, or use a machine with more memory",
            2,
            e,
        )
    except BrokenPipeError:
        return _closed_stdout()
    except OSError as e:
        return _fail(f"ftrecycle: error: {_os_error(e)}", 2, e)
    except Exception as e:
        return _fail(
            f"ftrecycle: internal error: {type(e).__name__}{': ' if str(e) else ''}{e} "
            f"(set {DEBUG_ENV}=1 for the traceback)",
            INTERNAL_ERROR_EXIT,
            e,
        )
    return 0


def _closed_stdout() -> int:
    """The reader of stdout went away (`ftrecycle inspect D | head`): not an error of ours; exit as SIGPIPE would."""
    # nothing more can be printed there; point stdout at /dev/null so that Python's exit flush stays quiet
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (captured, in process)
        pass
    return 141


def _one_line(text: str) -> str:
    return " ".join(text.split()) if "\n" in text or "\r" in text else text


def _fail(message: str, code: int, exc: BaseException) -> int:
    """Print one line (and, with FTRECYCLE_DEBUG=1, the traceback before it); return the exit code."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exception(exc, file=sys.stderr)
    print(_one_line(message), file=sys.stderr)
    return code


def _os_error(e: OSError) -> str:
    """An OS error as "PATH: cause", with the fix for the usual ones."""
    cause = e.strerror or str(e) or type(e).__name__
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    hint = {
        errno.ENOSPC: "; free some space or write elsewhere",
        errno.EDQUOT: "; free some space or write elsewhere",
        errno.EROFS: "; write to a writable location",
        errno.EACCES: "; check the permissions",
        errno.EPERM: "; check the permissions",
        errno.EMFILE: "; raise the open-file limit (ulimit -n)",
        errno.ENAMETOOLONG: "; use a shorter name",
    }.get(e.errno or 0, "")
    return f"{where}: {cause}{hint}" if where else f"{cause}{hint}"
