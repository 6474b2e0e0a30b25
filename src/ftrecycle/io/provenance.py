"""What every written artifact records about its inputs and how it was made, and the files it is kept in."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import sys
from typing import Any

from ftrecycle.arch import signature
from ftrecycle.io.checkpoint import Checkpoint
from ftrecycle.version import __version__

#: The provenance record written into every model or adapter directory ftrecycle makes.
PROVENANCE = "ftrecycle.json"
#: A delta directory's manifest: its provenance plus the stored tensors' layout.
DELTA_MANIFEST = "ftrecycle-delta.json"


def describe_input(ckpt: Checkpoint) -> dict[str, Any]:
    """Identify an input: as given, where it was read from, hub repo and commit, size and architecture.

    Args:
        ckpt: the opened input.

    Returns:
        A JSON-ready description.
    """
    return {
        "ref": ckpt.source.ref,
        "path": str(ckpt.path),
        "repo_id": ckpt.source.repo_id,
        "revision": ckpt.source.revision,
        "format": ckpt.format,
        "files": [f.name for f in ckpt.files],
        "tensors": len(ckpt.tensors),
        "bytes": sum(t.nbytes for t in ckpt.tensors.values()),
        "architecture": signature(ckpt.config) if ckpt.config else None,
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def base_record(operation: str) -> dict[str, Any]:
    """The fields every provenance record starts with.

    Args:
        operation: what made the artifact (``transfer``, ``apply``, ``diff``, ``export-lora``, ...).

    Returns:
        The tool and its version, the operation, the time, the command line (when run as
        ``ftrecycle``) and the versions of Python, NumPy and PyTorch.
    """
    return {
        "tool": "ftrecycle",
        "ftrecycle_version": __version__,
        "operation": operation,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv if sys.argv and sys.argv[0].endswith("ftrecycle") else None,
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "torch": _version("torch"),
    }
