"""Resolve a model argument: a local directory or a Hugging Face Hub id ``org/name[@revision]``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ftrecycle.errors import CheckpointError, HubError
from ftrecycle.io.localpath import looks_local

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")

#: What is fetched from the hub: weights as safetensors, configs, tokenizer files.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
PICKLE_PATTERNS = ["*.bin", "*.pt"]


@dataclass(frozen=True)
class ResolvedRef:
    """Where a model argument points.

    Attributes:
        ref: the argument as the user gave it.
        path: the local directory holding the files.
        repo_id: the hub repository, if it came from the hub.
        revision: the resolved hub commit, if it came from the hub.
    """

    ref: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None


def containment_root(path: Path) -> Path:
    """The directory a model directory's symlinks may point into.

    That is the directory itself, except for a Hugging Face cache snapshot
    (``.../models--org--name/snapshots/<commit>``), whose files are symlinks into the
    repository's ``blobs/``: there it is that repository folder.
    """
    path = path.resolve()
    if path.parent.name == "snapshots" and (path.parent.parent / "blobs").is_dir():
        return path.parent.parent
    return path


def link_target(path: Path) -> str:
    """Where a symlink finally leads, for messages (a loop says so instead of raising)."""
    try:
        return str(path.resolve())
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return "a symlink loop"


def inside(target: Path, root: Path) -> bool:
    """Whether ``target`` (followed through every symlink) lies in ``root`` (already resolved)."""
    try:
        target.resolve().relative_to(root)
    except (ValueError, OSError, RuntimeError):  # RuntimeError: a symlink loop
        return False
    return True


def resolve_ref(ref: str, *, allow_pickle: bool = False) -> ResolvedRef:
    """Find the local directory for a model argument, downloading from the hub if needed.

    A path that exists is used as it is. Otherwise an ``org/name[@revision]`` id is
    fetched with :func:`huggingface_hub.snapshot_download` (safetensors, json and
    tokenizer files only; pickles only with ``allow_pickle``).

    Raises:
        CheckpointError: the argument is neither an existing directory nor a hub id.
        HubError: the hub could not be reached or has no such repository or revision.
    """
    p = Path(ref).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(
                f"{ref}: is {'a file' if p.is_file() else 'not a directory'}; pass the model's directory "
                "(the one holding config.json)"
            )
        return ResolvedRef(ref, p.resolve())
    m = HUB_ID.match(ref)
    if m is None or looks_local(ref):
        raise CheckpointError(
            f"no such directory: {ref} (a local path, not a hub id of the form org/name[@revision]); check the path"
        )
    repo_id, revision = m.group("repo"), m.group("rev")
    try:
        from huggingface_hub import snapshot_download  # heavy: only for hub ids

        local = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=HUB_PATTERNS + (PICKLE_PATTERNS if allow_pickle else []),
        )
    except Exception as e:  # huggingface_hub raises many unrelated types for "offline"
        raise HubError(
            f"{ref}: cannot fetch from the Hugging Face Hub ({type(e).__name__}); with no network, "
            "download it elsewhere and pass the local directory instead"
        ) from e
    path = Path(local)
    return ResolvedRef(ref, path, repo_id=repo_id, revision=path.name)
