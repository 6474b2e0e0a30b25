"""Tiny random models in real Hugging Face layouts, made locally for tests, demos and benchmarks.

Three families cover the layouts a transfer meets: Llama (untied embeddings, no
biases), Qwen2 (tied embeddings, q/k/v biases) and GPT-2 (tied, Conv1D weights,
biases everywhere). Versions of one model are made by perturbing a base, which is
what fine-tuning and continued pretraining look like in parameter space.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "qwen2", "gpt2")


def tiny_config(family: str, *, vocab_size: int = 96, tie: bool | None = None) -> Any:
    """A transformers config of a ~50k-parameter model of ``family``.

    Args:
        family: ``llama``, ``qwen2`` or ``gpt2``.
        vocab_size: vocabulary rows.
        tie: tie input and output embeddings (default: the family's usual choice).
    """
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=bool(tie),
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    if family == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True if tie is None else tie,
            bos_token_id=1,
            eos_token_id=2,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=512,
            tie_word_embeddings=True if tie is None else tie,
            bos_token_id=1,
            eos_token_id=2,
        )
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


def make_model(config: Any, *, seed: int, dtype: torch.dtype = torch.bfloat16) -> Any:
    """A randomly initialised causal LM for ``config``, in ``dtype``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():  # larger than the init's 0.02 so versions differ visibly
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(dtype).eval()


def perturbed(model: Any, *, seed: int, scale: float, resize_vocab: int | None = None) -> Any:
    """A copy of ``model`` with every floating parameter moved by ``scale`` Gaussian noise (a new version)."""
    import copy

    new = copy.deepcopy(model)
    if resize_vocab is not None:
        new.resize_token_embeddings(resize_vocab, mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            if p.dtype.is_floating_point:
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale
                p.copy_((p.float() + noise).to(p.dtype))
    return new


def save(model: Any, path: str | Path, *, max_shard_size: str = "20KB", tokenizer: bool = True) -> Path:
    """Save as sharded safetensors (small shards, so sharding is exercised) plus a word-level tokenizer."""
    out = Path(path)
    model.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
    if tokenizer:
        word_tokenizer(model.config.vocab_size).save_pretrained(out)
    return out


#: Words every tiny tokenizer knows, so that GSM8K-format prompts and answers tokenize without <unk>.
TASK_WORDS = ("Question:", "Answer:", "####", "The", "answer", "is", "+", "-", "*", "=", ".", ",", "?")
NUMBERS = 50


def word_tokenizer(vocab_size: int) -> Any:
    """A whitespace word-level fast tokenizer: specials, task words, the numbers 0..49, then made-up words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = specials + list(TASK_WORDS) + [str(i) for i in range(NUMBERS)]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    if len(words) != vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(words)} fixed words")
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_versions(
    family: str,
    root: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    target_vocab: int | None = None,
    max_shard_size: str = "20KB",
) -> dict[str, Path]:
    """Save a base, a fine-tuned copy and a newer base of one tiny model under ``root``.

    Returns:
        ``{"source_base", "source_finetuned", "target_base"}`` -> directory.
    """
    root = Path(root)
    cfg = tiny_config(family)
    base = make_model(cfg, seed=seed, dtype=dtype)
    fin = perturbed(base, seed=seed + 1, scale=0.01)
    new = perturbed(base, seed=seed + 2, scale=0.02, resize_vocab=target_vocab)
    return {
        "source_base": save(base, root / "source_base", max_shard_size=max_shard_size),
        "source_finetuned": save(fin, root / "source_finetuned", max_shard_size=max_shard_size),
        "target_base": save(new, root / "target_base", max_shard_size=max_shard_size),
    }
