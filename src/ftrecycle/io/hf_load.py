"""Load a model through transformers without ever unpickling weights unless the user allowed it.

``from_pretrained`` falls back to ``pytorch_model.bin`` whenever it finds no ``model.safetensors``
(or its index) — for instance beside unindexed safetensors shards that :mod:`ftrecycle.io.checkpoint`
accepts. A pickle can run code when loaded, so every transformers load in ftrecycle goes through
here and passes ``use_safetensors=True`` unless ``allow_pickle``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftrecycle.errors import CheckpointError, FtRecycleError
from ftrecycle.io.jsonfile import read_json_object

#: JSON files transformers reads beside the weights, and silently ignores or fails deep inside on
#: when they are broken (a cut-short generation_config.json is dropped: generation falls back to defaults)
MODEL_JSON_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
)


def check_model_json(path: str | Path) -> None:
    """Read every JSON file of :data:`MODEL_JSON_FILES` in ``path`` strictly, before transformers does.

    Raises:
        CheckpointError: one is not a regular file, not UTF-8, not JSON, nested too deeply or not an
            object, naming the file.
    """
    for name in MODEL_JSON_FILES:
        f = Path(path) / name
        if f.exists() or f.is_symlink():
            read_json_object(
                f, what=name, error=CheckpointError, fix=f"repair or remove {name} (copy it from the model's source)"
            )


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Silence transformers' own progress bars ("Loading weights") for the block, then restore them.

    The library does not print: a bar left on stderr before an error makes the CLI's one-line
    error three lines.
    """
    from transformers.utils import logging as hf_logging  # heavy: kept off the transfer path

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def load_causal_lm(
    path: str | Path,
    *,
    dtype: Any = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool = False,
) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` restricted to safetensors (pickles only with ``allow_pickle``).

    Args:
        path: a local model directory.
        dtype: the dtype to load in ("auto": the checkpoint's).
        allow_pickle: let transformers read ``pytorch_model.bin`` when there is no safetensors file.
        trust_remote_code: run model code from the directory (off unless the user asked).
        progress: show transformers' loading bar (off: the library does not print).

    Returns:
        The model.

    Raises:
        CheckpointError: transformers cannot load the directory (e.g. only pickle weights without
            ``allow_pickle``), naming the directory and the fix.
    """
    from transformers import AutoModelForCausalLM  # heavy: kept off the transfer path

    check_model_json(path)
    try:
        with contextlib.nullcontext() if progress else no_progress_bars():
            return AutoModelForCausalLM.from_pretrained(
                str(path),
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                use_safetensors=None if allow_pickle else True,
            )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        fix = (
            "it has no model.safetensors (or model.safetensors.index.json) that transformers can load; pickle "
            "weights (pytorch_model.bin) are read only with --allow-pickle, or convert them to safetensors"
            if not allow_pickle
            else "check that it is a complete transformers model directory"
        )
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot load the model ({first[:200]}); {fix}") from e


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> Any:
    """``AutoTokenizer.from_pretrained`` on a local model directory whose JSON files are checked first.

    Raises:
        CheckpointError: a broken tokenizer file, or transformers cannot load the tokenizer, naming
            the directory.
    """
    from transformers import AutoTokenizer  # heavy: kept off the transfer path

    check_model_json(path)
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except FtRecycleError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path}: transformers cannot load the tokenizer ({type(e).__name__}: {first[:200]}); "
            "check its tokenizer files"
        ) from e
