"""The non-weight files of a model directory: configs and tokenizer files (the card: :mod:`ftrecycle.io.card`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ftrecycle.errors import CheckpointError, ConfigError, OutputError
from ftrecycle.io.hub import containment_root, inside, link_target
from ftrecycle.io.jsonfile import open_regular, read_json_object

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
SOURCES = ("target", "finetuned")


def check_source(value: str, flag: str) -> None:
    """Validate ``--config-from`` / ``--tokenizer-from``."""
    if value not in SOURCES:
        raise ConfigError(f"{flag} {value!r} is not one of {', '.join(SOURCES)}")


def copy_files(src: Path, dst: Path, names: tuple[str, ...]) -> list[str]:
    """Copy those of ``names`` that exist in ``src`` into ``dst``; return the copied names.

    Only regular files are copied, and a symlink is followed only when it stays inside
    the model directory (or, for a Hugging Face cache snapshot, inside its repository's
    ``blobs/``): a link to ``~/.ssh/id_rsa`` named ``tokenizer.json`` must not leak
    that file into an output that may be published.

    Raises:
        CheckpointError: a name that is a symlink leading out of ``src``, a directory, a
            FIFO, a device, or unreadable; the message names it.
    """
    jail = containment_root(src)
    copied = []
    for name in names:
        path = src / name
        if not os.path.lexists(path):
            continue
        if not inside(path, jail):
            raise CheckpointError(
                f"{path}: is a symlink that leads out of the model directory ({link_target(path)}); "
                "replace it with the file itself or remove it"
            )
        with os.fdopen(open_regular(path, what=name), "rb") as fin:
            try:
                fout = open(dst / name, "wb")  # closed by the with below; its errors are the output's
            except OSError as e:
                raise OutputError(f"{dst / name}: cannot create ({e.strerror or e})") from e
            with fout:
                while True:
                    try:
                        chunk = fin.read(1 << 20)
                    except OSError as e:
                        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
                    if not chunk:
                        break
                    try:
                        fout.write(chunk)
                    except OSError as e:
                        raise OutputError(f"{dst / name}: cannot write ({e.strerror or e})") from e
        copied.append(name)
    return copied


def patch_config(path: Path, changes: dict[str, Any]) -> dict[str, Any]:
    """Set keys of ``config.json`` in ``path`` where they differ; return the keys changed (old -> new).

    ``dtype`` is written as ``torch_dtype`` in a config that spells it so (transformers 4.x;
    5.x reads ``dtype``).
    """
    cfg_path = path / "config.json"
    cfg = read_json_object(cfg_path, what="config", allow_nan=True)
    done = {}
    for key, value in changes.items():
        if key == "dtype" and "dtype" not in cfg and "torch_dtype" in cfg:
            key = "torch_dtype"
        if value is not None and cfg.get(key) != value:
            done[key] = {"from": cfg.get(key), "to": value}
            cfg[key] = value
    if done:
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return done
