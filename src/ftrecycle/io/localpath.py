"""Tell a mistyped local path from a hub id, so that it is reported as missing, not as unreachable."""

from __future__ import annotations

from pathlib import Path

#: File endings no hub repository id has: an argument ending in one names a local file.
LOCAL_SUFFIXES = (".jsonl", ".json", ".yaml", ".yml", ".txt", ".csv", ".parquet", ".safetensors", ".bin", ".pt")


def looks_local(ref: str, base: Path | None = None) -> bool:
    """Whether ``ref`` is meant as a local path (so a missing one is an error, not a hub lookup).

    True for absolute, home and dot-relative paths, backslashes, a trailing ``/``, more than one
    ``/`` before any ``@revision`` or ``:split``, a file ending such as ``.jsonl``, or a first
    component that exists locally (``models/M9`` beside a ``models/`` folder). A bare name
    (``gsm8k``) may be a hub data set, so it is not taken as local.

    Args:
        ref: the argument as given.
        base: the directory relative paths are taken from (default: the working directory).
    """
    if ref.startswith((".", "/", "~")) or "\\" in ref or ref.endswith("/"):
        return True
    name = ref.partition("@")[0].partition(":")[0]
    if name.count("/") != 1:
        return name.count("/") > 1
    if name.lower().endswith(LOCAL_SUFFIXES):
        return True
    first = name.split("/", 1)[0]
    return (Path(base or ".") / first).exists()
