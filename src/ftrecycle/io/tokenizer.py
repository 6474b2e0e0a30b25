"""What a model directory's tokenizer files say about token ids, read without loading a tokenizer.

Two questions need no ``transformers``: which ids are *special* tokens (``tokenizer_config.json``'s
``added_tokens_decoder`` entries marked ``special: true``, the strings of ``special_tokens_map.json``,
``tokenizer.json``'s special ``added_tokens``), and which token string each id stands for
(``tokenizer.json``'s ``model.vocab`` and ``added_tokens``, or a GPT-2 style ``vocab.json``). Every
file is read with :func:`~ftrecycle.io.jsonfile.read_json` (hostile files are refused with one line
naming the file); a file that is absent gives no answer rather than an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ftrecycle.errors import CheckpointError
from ftrecycle.io.hub import containment_root, inside
from ftrecycle.io.jsonfile import read_json

_FIX = "restore the model's tokenizer files (or remove the broken one)"


def _load(path: Path) -> Any | None:
    """The parsed file, or None where it does not exist or is a symlink out of its model directory
    (copying the tokenizer files refuses that one, naming it; it is not read here)."""
    if not os.path.lexists(path) or not inside(path, containment_root(path.parent)):
        return None
    return read_json(path, what=path.name, fix=_FIX)


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; {_FIX}")


def _token_id(value: Any, path: Path) -> int:
    """An id as the files write it: an int, or a decimal string (``added_tokens_decoder``'s keys)."""
    if isinstance(value, str) and value.isdecimal() and len(value) < 12:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _bad(path, f"token id {value!r:.40} is not a non-negative integer")
    return value


def _added_tokens(tok: Any, path: Path) -> list[tuple[int, str, bool]]:
    """``tokenizer.json``'s ``added_tokens``: (id, content, special)."""
    added = tok.get("added_tokens") or []
    if not isinstance(added, list):
        raise _bad(path, "added_tokens is not a list")
    out = []
    for entry in added:
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise _bad(path, "an added_tokens entry is not an object with a string content")
        out.append((_token_id(entry.get("id"), path), entry["content"], entry.get("special") is True))
    return out


def vocabulary(directory: Path) -> dict[int, str] | None:
    """Id -> token string, from ``tokenizer.json`` (else ``vocab.json``); None when neither is there.

    Args:
        directory: a model directory.

    Returns:
        The map (added tokens included), or None.

    Raises:
        CheckpointError: a file that is not the JSON its format says.
    """
    path = directory / "tokenizer.json"
    tok = _load(path)
    if tok is not None:
        if not isinstance(tok, dict) or not isinstance(tok.get("model"), dict):
            raise _bad(path, "not a tokenizers file (no model object)")
        out = _model_vocab(tok["model"].get("vocab"), path)
        out.update({i: content for i, content, _ in _added_tokens(tok, path)})
        return out
    path = directory / "vocab.json"
    vocab = _load(path)
    if vocab is None:
        return None
    return _model_vocab(vocab, path)


def _model_vocab(vocab: Any, path: Path) -> dict[int, str]:
    """A vocabulary as BPE/WordLevel/WordPiece (token -> id) or Unigram ([token, score] by id) write it."""
    if vocab is None:
        return {}
    if isinstance(vocab, dict):
        return {_token_id(i, path): str(t) for t, i in vocab.items()}
    if isinstance(vocab, list):
        out = {}
        for i, entry in enumerate(vocab):
            if not isinstance(entry, list) or not entry or not isinstance(entry[0], str):
                raise _bad(path, f"vocab entry {i} is not [token, score]")
            out[i] = entry[0]
        return out
    raise _bad(path, "model.vocab is neither an object nor a list")


def special_tokens(directory: Path) -> dict[int, str]:
    """The special tokens the directory's tokenizer files name, by id.

    Args:
        directory: a model directory.

    Returns:
        Id -> token string (empty when there are no tokenizer files). A string of
        ``special_tokens_map.json`` counts where an id for it is known.

    Raises:
        CheckpointError: a file that is not the JSON its format says.
    """
    out: dict[int, str] = {}
    known: dict[str, int] = {}
    cfg_path = directory / "tokenizer_config.json"
    cfg = _load(cfg_path)
    if cfg is not None:
        decoder = cfg.get("added_tokens_decoder") if isinstance(cfg, dict) else None
        if decoder is not None and not isinstance(decoder, dict):
            raise _bad(cfg_path, "added_tokens_decoder is not an object")
        for key, entry in (decoder or {}).items():
            if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
                raise _bad(cfg_path, f"added_tokens_decoder[{key!r:.20}] is not an object with a string content")
            i = _token_id(key, cfg_path)
            known[entry["content"]] = i
            if entry.get("special") is True:
                out[i] = entry["content"]
    tok_path = directory / "tokenizer.json"
    tok = _load(tok_path)
    if isinstance(tok, dict):
        for i, content, special in _added_tokens(tok, tok_path):
            known.setdefault(content, i)
            if special:
                out[i] = content
    vocab: dict[str, int] | None = None
    for text in _map_strings(directory / "special_tokens_map.json"):
        found = known.get(text)
        if found is None:  # a special token in the base vocabulary (GPT-2's <|endoftext|>)
            if vocab is None:
                vocab = {t: k for k, t in (vocabulary(directory) or {}).items()}
            found = vocab.get(text)
        if found is not None:
            out[found] = text
    return dict(sorted(out.items()))


def _map_strings(path: Path) -> list[str]:
    """The token strings of ``special_tokens_map.json`` (a value is a string, ``{"content": ...}`` or a list)."""
    data = _load(path)
    if data is None:
        return []
    if not isinstance(data, dict):
        raise _bad(path, "not a JSON object")
    out: list[str] = []
    for value in data.values():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                out.append(v)
    return out
