"""What config.json says about a model's architecture, checked before any tensor is read."""

from __future__ import annotations

from typing import Any

from ftrecycle.errors import IncompatibleModelsError

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


def signature(config: dict[str, Any]) -> dict[str, Any]:
    """The architecture fields of a config that must agree between versions.

    ``num_key_value_heads`` defaults to the attention head count, as in transformers.
    Vocabulary size, context length and rope scaling are not part of it: they may
    change between releases (Llama 3.0 -> 3.1) without changing tensor roles.
    """
    sig: dict[str, Any] = {}
    for field, keys in SIGNATURE_KEYS.items():
        sig[field] = next((config[k] for k in keys if config.get(k) is not None), None)
    if sig["num_key_value_heads"] is None:
        sig["num_key_value_heads"] = sig["num_attention_heads"]
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
    for field in SIGNATURE_KEYS:
        values = {role: sigs[role][field] for role in roles}
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
