"""What config.json says about a model's architecture, checked before any tensor is read, and
the tables of tensor and module names that tell a tensor's role across model families."""

from __future__ import annotations

import re
from typing import Any

from ftrecycle.errors import CheckpointError, IncompatibleModelsError, short

#: Signature fields and the config keys that spell them across model families.
SIGNATURE_KEYS: dict[str, tuple[str, ...]] = {
    "model_type": ("model_type",),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "num_key_value_heads": ("num_key_value_heads", "multi_query_group_num"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim"),
}

#: Names of the input embedding matrix in common families, tried in order.
EMBEDDING_NAMES = (
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "wte.weight",
    "model.decoder.embed_tokens.weight",
    "transformer.word_embeddings.weight",
    "gpt_neox.embed_in.weight",
    "transformer.embedding.word_embeddings.weight",
)
OUTPUT_EMBEDDING = "lm_head.weight"
#: Tensors with one row per vocabulary entry (their rows differ when a vocabulary grew).
VOCAB_NAMES = frozenset((*EMBEDDING_NAMES, OUTPUT_EMBEDDING, "lm_head.bias", "embed_out.weight"))
#: 2-D weights that are not linear layers: left out of an exported adapter.
NOT_LINEAR = (*EMBEDDING_NAMES, OUTPUT_EMBEDDING, "transformer.wpe.weight", "embed_out.weight")
#: GPT-2-style Conv1D modules store weights as (in, out); PEFT marks them fan_in_fan_out.
CONV1D_MODULES = ("c_attn", "c_proj", "c_fc")
#: Model types whose attention/MLP projections are transformers' ``Conv1D`` (weights stored (in, out)).
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
#: Module types by tensor name, tried in order (``other`` when none matches).
MODULE_TYPES = (
    ("embeddings", re.compile(r"embed|lm_head|wte|wpe|shared")),
    ("norms", re.compile(r"norm|ln_")),
    ("attention", re.compile(r"attn|attention|q_proj|k_proj|v_proj|o_proj")),
    ("mlp", re.compile(r"mlp|gate_proj|up_proj|down_proj|fc|c_proj")),
)
#: A transformer block's index in a tensor name (``model.layers.3.``, ``transformer.h.3.``).
LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")

#: Sub-configs of composite (multimodal) models whose architecture is compared too: a Llava or
#: Gemma 3 config keeps its language model's sizes under ``text_config``.
NESTED_CONFIGS = ("text_config", "vision_config", "audio_config")


def _is_count(value: Any) -> bool:
    # 0 is legal: an embeddings-only test model has num_hidden_layers 0.
    return type(value) is int and value >= 0


def _is_size(value: Any) -> bool:
    # A few families (OpenELM) give per-layer sizes as a list.
    return _is_count(value) or (isinstance(value, list) and bool(value) and all(_is_count(v) for v in value))


def check_config_types(config: dict[str, Any], where: str) -> None:
    """Refuse a config whose architecture fields have the wrong type.

    ``model_type`` must be a string, the sizes non-negative integers (a JSON ``true`` is not
    one), ``tie_word_embeddings`` a boolean and the sub-configs objects checked the same way.

    Args:
        config: the parsed config.json.
        where: the file, for the message.

    Raises:
        CheckpointError: a field of the wrong type, naming it.
    """
    fix = "correct the field or restore the file"
    for keys in SIGNATURE_KEYS.values():
        for key in keys:
            value = config.get(key)
            if value is None:
                continue
            ok = isinstance(value, str) if key == "model_type" else _is_size(value)
            if not ok:
                want = "a string" if key == "model_type" else "a non-negative integer (or a list of them)"
                raise CheckpointError(f"{where}: {key} is {short(value)}, not {want}; {fix}")
    for key, want, test in (
        ("vocab_size", "a non-negative integer", _is_count),
        ("tie_word_embeddings", "true or false", lambda v: isinstance(v, bool)),
    ):
        if config.get(key) is not None and not test(config[key]):
            raise CheckpointError(f"{where}: {key} is {short(config[key])}, not {want}; {fix}")
    for sub in NESTED_CONFIGS:
        nested = config.get(sub)
        if nested is None:
            continue
        if not isinstance(nested, dict):
            raise CheckpointError(f"{where}: {sub} is a {type(nested).__name__}, not an object; {fix}")
        check_config_types(nested, f"{where} ({sub})")


def signature(config: dict[str, Any]) -> dict[str, Any]:
    """The architecture fields of a config that must agree between versions.

    ``num_key_value_heads`` defaults to the attention head count, as in transformers.
    Vocabulary size, context length and rope scaling are not part of it: they may
    change between releases (Llama 3.0 -> 3.1) without changing tensor roles.
    A composite model's sub-configs (:data:`NESTED_CONFIGS`) add their own fields,
    prefixed (``text_config.hidden_size``), so that they are compared too.
    """
    sig: dict[str, Any] = {}
    for field, keys in SIGNATURE_KEYS.items():
        sig[field] = next((config[k] for k in keys if config.get(k) is not None), None)
    if sig["num_key_value_heads"] is None:
        sig["num_key_value_heads"] = sig["num_attention_heads"]
    for sub in NESTED_CONFIGS:
        nested = config.get(sub)
        if isinstance(nested, dict):
            sig.update({f"{sub}.{k}": v for k, v in signature(nested).items()})
    return sig


def check_compatible(configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Check that every config has the same architecture signature.

    Args:
        configs: role (``source-base``, ``target-base``...) -> parsed config.json.

    Returns:
        The common signature.

    Raises:
        IncompatibleModelsError: a field differs; the message lists each field and value.
    """
    sigs = {role: signature(cfg) for role, cfg in configs.items()}
    roles = list(sigs)
    first = sigs[roles[0]]
    diffs = []
    fields = list(dict.fromkeys(f for sig in sigs.values() for f in sig))
    for field in fields:
        values = {role: sigs[role].get(field) for role in roles}
        if len({repr(v) for v in values.values()}) > 1:
            diffs.append(f"{field} " + " vs ".join(f"{v} ({r})" for r, v in values.items()))
    if diffs:
        raise IncompatibleModelsError(
            "the models have different architectures: " + "; ".join(diffs) + "; a diff vector only transfers "
            "between versions of one architecture"
        )
    return first


def ties_embeddings(config: dict[str, Any]) -> bool:
    """Whether the config ties the output embedding to the input one (transformers' default is True)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    value = config.get("tie_word_embeddings", (text or {}).get("tie_word_embeddings", True))
    return bool(value)


def embedding_name(names: set[str] | dict[str, Any]) -> str | None:
    """The input embedding's tensor name among ``names``, if a known one is there."""
    return next((n for n in EMBEDDING_NAMES if n in names), None)


def vocab_size(config: dict[str, Any]) -> int | None:
    """The vocabulary size a config declares, if any."""
    v = config.get("vocab_size")
    return int(v) if isinstance(v, int) else None
