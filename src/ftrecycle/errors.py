"""The one error hierarchy of ftrecycle.

Library code raises these and never prints or exits; the command line catches
:class:`FtRecycleError`, prints its message on one line and exits with
:attr:`FtRecycleError.exit_code`.
"""

from __future__ import annotations

import errno
import reprlib
from typing import Any

_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 80, 80, 8, 4, 3


def short(value: Any) -> str:
    """A repr for error messages that stays short: hostile values can be megabytes long or nested 900 deep."""
    return _REPR.repr(value)


class FtRecycleError(Exception):
    """Base class of every error ftrecycle raises on purpose."""

    exit_code: int = 2


class ConfigError(FtRecycleError):
    """An option or argument value is invalid (a bad dtype name, a negative size...)."""


class DataError(FtRecycleError):
    """A data file is missing, empty or malformed (the message names the file and line)."""


class CheckpointError(FtRecycleError):
    """A checkpoint cannot be read: missing, truncated, corrupt, or of a refused format."""


class HubError(CheckpointError):
    """A hub id could not be resolved (no network, unknown id or revision)."""


class IncompatibleModelsError(FtRecycleError):
    """The models do not share an architecture, tensor names or shapes the operation needs."""


class OutputError(FtRecycleError):
    """The output cannot be written: it exists, lies inside an input, or the disk is full."""


class NonFiniteError(FtRecycleError):
    """A result tensor holds NaN or infinity."""


class MemoryBudgetError(ConfigError):
    """The memory budget is too small for the work asked."""


# Causes whose fix is the same whatever file met them: the process or the machine, not the path.
_RESOURCE_HINTS = {
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or use a larger --shard-size",
    errno.ENFILE: "the system ran out of open files: retry later",
    errno.ENOMEM: "out of memory: lower --max-memory or --threads",
    errno.EIO: "an I/O error: check the disk",
}


def os_reason(e: OSError, fix: str) -> str:
    """``"<cause> [ERRNO]; <fix>"`` for an OS error, with the fix for process-wide causes (EMFILE...)
    in place of ``fix`` (which is about the path: "check the permissions")."""
    code = errno.errorcode.get(e.errno or 0, "")
    return f"{e.strerror or e}{f' [{code}]' if code else ''}; {_RESOURCE_HINTS.get(e.errno or 0, fix)}"
