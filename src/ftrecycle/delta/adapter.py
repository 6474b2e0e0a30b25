"""A PEFT LoRA adapter read as a diff vector.

A fine-tuned source given as a LoRA adapter over the source base. Its diff is the
adapter's merged update, ``scaling * B @ A`` per adapted module (transposed for GPT-2's
Conv1D and for embeddings, as PEFT merges them), held as factors and expanded range by
range like any compressed tensor — no merged model is written. Every other tensor's
diff is zero.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ftrecycle.arch import CONV1D_MODEL_TYPES, CONV1D_MODULES
from ftrecycle.codecs import Packed
from ftrecycle.dtypes import from_storage
from ftrecycle.errors import CheckpointError, IncompatibleModelsError
from ftrecycle.io.checkpoint import Checkpoint, open_checkpoint
from ftrecycle.io.jsonfile import read_json
from ftrecycle.io.safetensors_format import TensorInfo
from ftrecycle.plan import logical_names
from ftrecycle.terms import Action, PackedTerm, Record, Term, record

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def is_adapter(ref: str | Path) -> bool:
    """Whether ``ref`` is a local PEFT adapter directory."""
    p = Path(ref).expanduser()
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


def _load_config(path: Path) -> dict[str, Any]:
    """Read and check ``adapter_config.json``: the types of every field ftrecycle uses, and the
    settings whose update it cannot compute (or PEFT would refuse) refused with how to proceed.

    Raises:
        CheckpointError: unreadable, malformed, or an adapter ftrecycle does not read.
    """
    cpath = path / ADAPTER_CONFIG
    cfg = read_json(cpath, what="adapter config", fix="restore the file, or save the adapter again with PEFT")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cpath}: not a JSON object; save the adapter again with PEFT")
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{path}: a {cfg.get('peft_type')!r} adapter; ftrecycle reads LoRA adapters only (merge others with PEFT "
            "and pass the merged model)"
        )

    def bad(key: str, want: str) -> CheckpointError:
        return CheckpointError(f"{cpath}: {key!r} is {cfg[key]!r}, not {want}; fix the file or save the adapter again")

    if not (_is_int(cfg.get("r", 8)) and cfg.get("r", 8) > 0):
        raise bad("r", "a positive integer")
    if not _is_number(cfg.get("lora_alpha", 8)):
        raise bad("lora_alpha", "a number")
    for key in ("use_rslora", "fan_in_fan_out", "use_dora", "use_qalora", "lora_bias", "inference_mode"):
        if key in cfg and cfg[key] is not None and not isinstance(cfg[key], bool):
            raise bad(key, "true or false")
    tm = cfg.get("target_modules")
    if tm is not None and not (isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))):
        raise bad("target_modules", "a string or a list of strings")
    for key, ok, want in (
        ("rank_pattern", lambda v: _is_int(v) and v > 0, "an object of pattern -> positive integer"),
        ("alpha_pattern", _is_number, "an object of pattern -> number"),
    ):
        pat = cfg.get(key)
        if pat is None:
            continue
        if not isinstance(pat, dict) or not all(ok(v) for v in pat.values()):
            raise bad(key, want)
        for k in pat:
            try:
                re.compile(rf"(.*\.)?({k})$")
            except re.error as e:
                raise CheckpointError(f"{cpath}: {key} key {k!r} is not a valid pattern ({e}); fix the file") from e
    for key, why in (("use_dora", "DoRA"), ("use_qalora", "QALoRA")):
        if cfg.get(key):
            raise CheckpointError(f"{path}: a {why} adapter; merge it with PEFT and pass the merged model instead")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: the adapter trains biases (bias={cfg['bias']!r}); merge it with PEFT first")
    if cfg.get("lora_bias"):
        raise CheckpointError(
            f"{path}: the adapter trains a bias on its lora_B layers (lora_bias: true), which ftrecycle does not "
            "read; merge it with PEFT and pass the merged model"
        )
    for key in ("target_parameters", "trainable_token_indices", "layer_replication", "modules_to_save"):
        if cfg.get(key):
            raise CheckpointError(
                f"{path}: the adapter uses {key} ({cfg[key]!r}), which ftrecycle does not read; merge it with PEFT "
                "and pass the merged model"
            )
    return cfg


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _pattern(patterns: dict[str, Any], module: str) -> Any:
    """PEFT's ``get_pattern_key`` lookup: the value of the first key matching the module name's
    tail, or None. A value of 0 is a value (PEFT's ``dict.get``), not a miss."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _whole(ckpt: Checkpoint, info: TensorInfo) -> np.ndarray:
    raw = np.empty(info.nbytes, dtype=np.uint8)
    x = ckpt.read(info, 0, info.numel, raw)
    return from_storage(x, info.dtype, np.dtype(np.float32)).reshape(info.shape)


def adapter_terms(
    base: Checkpoint, ref: str | Path
) -> tuple[dict[str, Term], dict[str, str], list[Record], dict[str, Any], Path]:
    """The diff vector of ``base`` + a LoRA adapter, as terms.

    Returns:
        terms (every floating base tensor: the adapter's update or zeros), the base's tied
        aliases, records, a description of the adapter, and the directory to take config and
        tokenizer files from (the base's: an adapter changes neither).

    Raises:
        CheckpointError: not a LoRA adapter ftrecycle can read, or unreadable weights.
        IncompatibleModelsError: the adapter does not fit the base model's tensors.
    """
    path = Path(ref).expanduser()
    cfg = _load_config(path)
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(
            f"{path}: no {ADAPTER_WEIGHTS} (pickled adapter_model.bin is not read); save the adapter with "
            "safe_serialization=True"
        )
    names, aliases = logical_names(base)
    ad = open_checkpoint(str(path), require_config=False, prefix="adapter_model")
    try:
        shapes = {n: i.shape for n, i in names.items()}
        found = _factors(ad, cfg, path, shapes, (base.config or {}).get("model_type"))
    finally:
        ad.close()
    records: list[Record] = []
    terms: dict[str, Term] = {}
    for target in found:
        if target not in names:
            raise IncompatibleModelsError(
                f"{path}: the adapter changes {target!r}, which the base model {base.path} does not have; "
                "pass the base model the adapter was trained on"
            )
        if target in aliases:
            raise IncompatibleModelsError(
                f"{path}: the adapter changes {target!r}, which the base model ties to {aliases[target]}; "
                "merge the adapter with PEFT and pass the merged model"
            )
    for name, info in names.items():
        if name in aliases:
            continue
        if not info.dtype.arithmetic:
            records.append(record(name, Action.NO_DELTA, f"non-floating ({info.dtype}); not diffed"))
            continue
        packed = found.get(name)
        if packed is None:
            terms[name] = PackedTerm(name, info.shape, Packed("zero", info.shape))
            continue
        if packed.shape != info.shape:
            raise IncompatibleModelsError(
                f"{path}: the adapter's update of {name!r} has shape {list(packed.shape)} but the base model's "
                f"tensor is {list(info.shape)}; pass the base model the adapter was trained on"
            )
        terms[name] = PackedTerm(name, info.shape, packed)
    records.append(
        record(
            "*", Action.LORA_SOURCE, f"diff = the LoRA adapter's merged update on {len(found)} tensors; zero elsewhere"
        )
    )
    desc = {
        "ref": str(ref),
        "path": str(path),
        "format": "peft-lora",
        "peft": {k: cfg.get(k) for k in ("r", "lora_alpha", "use_rslora", "target_modules", "base_model_name_or_path")},
        "adapted_tensors": len(found),
    }
    return terms, aliases, records, desc, base.path


_SUFFIXES = (
    ("linear", ".lora_A.weight", ".lora_B.weight"),
    ("embedding", ".lora_embedding_A", ".lora_embedding_B"),
)


def _is_conv1d(module: str, out_in: tuple[int, int], base_shape: tuple[int, ...] | None, model_type: Any) -> bool:
    """Whether PEFT wraps this module as a ``Conv1D`` (fan_in_fan_out forced on) or an
    ``nn.Linear`` (fan_in_fan_out forced off, whatever adapter_config.json says).

    PEFT decides by the module's class; the weight's shape tells it apart unless it is square,
    where the model type does.
    """
    linear, conv = out_in, out_in[::-1]
    if base_shape is not None and linear != conv:
        if base_shape == conv:
            return True
        if base_shape == linear:
            return False
    return model_type in CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] in (*CONV1D_MODULES, "q_attn")


def _factors(
    ad: Checkpoint, cfg: dict[str, Any], path: Path, shapes: dict[str, tuple[int, ...]], model_type: Any
) -> dict[str, Packed]:
    """Adapted base tensor name -> its update as factors, as PEFT's ``get_delta_weight`` computes it.

    Per module: rank and alpha from ``rank_pattern``/``alpha_pattern`` (first matching key, a
    value of 0 included) else ``r``/``lora_alpha``; scaling ``alpha / r`` (``alpha / sqrt(r)``
    with ``use_rslora``); ``B @ A``, transposed for embeddings and Conv1D layers only —
    PEFT ignores ``fan_in_fan_out`` on ``nn.Linear`` (it warns and resets it).
    """
    r_default, alpha_default = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    out: dict[str, Packed] = {}
    keys = set(ad.tensors)
    used: set[str] = set()
    for key in sorted(keys):
        for kind, a_suffix, b_suffix in _SUFFIXES:
            if not key.endswith(a_suffix):
                continue
            module = key[: -len(a_suffix)].removeprefix(PEFT_PREFIX)
            bkey = key[: -len(a_suffix)] + b_suffix
            if bkey not in keys:
                raise CheckpointError(f"{path}: {key} has no matching {bkey}; the adapter is incomplete")
            used |= {key, bkey}
            ia, ib = ad.tensors[key], ad.tensors[bkey]
            for info in (ia, ib):
                if len(info.shape) != 2 or not info.dtype.arithmetic or 0 in info.shape:
                    raise CheckpointError(
                        f"{path / ADAPTER_WEIGHTS}: {info.name} is {info.dtype} {list(info.shape)}, not a non-empty "
                        "float matrix; the adapter is corrupt"
                    )
            r = ia.shape[0]
            if ib.shape[1] != r:
                raise CheckpointError(
                    f"{path / ADAPTER_WEIGHTS}: {key} {list(ia.shape)} and {bkey} {list(ib.shape)} disagree on the "
                    "rank; the adapter is corrupt"
                )
            want_r = _pattern(rank_pattern, module)
            want_r = r_default if want_r is None else want_r
            if want_r != r:
                raise CheckpointError(
                    f"{path}: {key} has rank {r}, but adapter_config.json says {want_r} for {module}; the adapter and "
                    "its config do not belong together"
                )
            alpha = _pattern(alpha_pattern, module)
            alpha = alpha_default if alpha is None else alpha
            scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            a, b = _whole(ad, ia), _whole(ad, ib)
            if kind == "embedding":
                transpose = True
            else:
                base_shape = shapes.get(module + ".weight")
                transpose = _is_conv1d(module, (b.shape[0], a.shape[1]), base_shape, model_type)
            if transpose:  # update = scaling * (B @ A).T = scaling * A.T @ B.T
                fa, fb = np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
            else:  # update = scaling * B @ A
                fa, fb = b, a
            out[module + ".weight"] = Packed("lowrank", (fa.shape[0], fb.shape[1]), {"a": fa, "b": fb}, scaling)
    unknown = sorted(keys - used)
    if unknown:
        biases = [k for k in unknown if ".lora_" in k and k.endswith(".bias")]
        why = "trained lora_B biases (lora_bias)" if biases else "full tensors (modules_to_save?) or unknown keys"
        raise CheckpointError(
            f"{path}: the adapter also stores {why}: {', '.join(unknown[:5])}; merge it with PEFT and pass the "
            "merged model"
        )
    if not out:
        raise CheckpointError(f"{path}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    return out
