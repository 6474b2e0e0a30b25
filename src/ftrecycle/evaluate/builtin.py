"""The built-in GSM8K-format evaluator: batched greedy generation with a KV cache, in process.

It reproduces lm-eval's ``generate_until`` path item for item: the same prompts,
the same ordering into batches (longest prompt first, then by text), left padding,
greedy decoding with the cache, the same stop strings and the same answer
extraction. What it saves is lm-eval's fixed start-up cost, so it can run every N
training steps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftrecycle.distributed import active, gather, world
from ftrecycle.errors import ConfigError
from ftrecycle.evaluate.gsm8k import STOP, Scored, build_prompt, score, truncate_at_stop
from ftrecycle.evaluate.harness import loading, resolve_eval_model
from ftrecycle.io.hf_load import check_model_json, no_progress_bars

DEFAULT_MAX_LENGTH = 2048


@dataclass
class EvalReport:
    """Accuracy of one model on GSM8K-format items.

    Attributes:
        strict: exact-match accuracy after lm-eval's strict-match filter (``#### N``).
        flexible: the same after flexible-extract (last number).
        n: items evaluated.
        seconds: wall time of generation and scoring.
        items: per-item generations, extractions and correctness, in input order.
    """

    strict: float
    flexible: float
    n: int
    seconds: float
    items: list[Scored] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The numbers without per-item detail."""
        return {"strict": self.strict, "flexible": self.flexible, "n": self.n, "seconds": round(self.seconds, 3)}

    def to_json(self) -> dict[str, Any]:
        """Everything, JSON-ready."""
        return {**self.summary(), "items": [asdict(i) for i in self.items]}


class _StopOnStrings:
    """Per-row stopping: a row is done once its new text holds a stop string (or EOS was produced)."""

    def __init__(self, tokenizer: Any, stops: list[str], start: int) -> None:
        self.tokenizer, self.stops, self.start = tokenizer, stops, start

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch  # heavy: kept off the transfer path

        done = []
        for row in input_ids[:, self.start :].tolist():
            text = self.tokenizer.decode(row, skip_special_tokens=False)
            done.append(any(s and s in text for s in self.stops))
        return torch.tensor(done, device=input_ids.device)


def check_new_tokens(path: str, max_gen_toks: int, *, flag: str = "--max-new-tokens") -> None:
    """Refuse ``max_gen_toks`` that leaves no room for a prompt in the model's context, before loading it.

    Raises:
        ConfigError: ``max_gen_toks`` is not below the context length config.json gives.
    """
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return  # the loader reports an unreadable config; the context is checked again after loading
    if not isinstance(cfg, dict):
        return
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = cfg.get(attr)
        if isinstance(value, int) and not isinstance(value, bool):
            if max_gen_toks >= value:
                raise ConfigError(
                    f"{flag} {max_gen_toks} leaves no room for a prompt in the context of {path} "
                    f"({value} tokens); give fewer than {value}"
                )
            return


def max_context(model: Any, tokenizer: Any) -> int:
    """The longest sequence the model takes, as lm-eval resolves it."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int):
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 10**9 else DEFAULT_MAX_LENGTH


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int = 64,
    max_gen_toks: int = 256,
    stops: Sequence[str] = STOP,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts``, cut at the stop strings, in input order."""
    import torch  # heavy: kept off the transfer path

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = (
        tokenizer.decode(tokenizer.eos_token_id, skip_special_tokens=False)
        if tokenizer.eos_token_id is not None
        else None
    )
    until = list(stops) + ([eos] if eos and eos not in stops else [])
    if batch_size < 1 or max_gen_toks < 1:
        raise ConfigError(f"batch size and new tokens must be at least 1, got {batch_size} and {max_gen_toks}")
    context = max_context(model, tokenizer)
    max_ctx = context - max_gen_toks
    if max_ctx <= 0:
        raise ConfigError(
            f"--max-new-tokens {max_gen_toks} leaves no room for a prompt in the model's context of "
            f"{context} tokens; give fewer than {context}"
        )
    order = sorted(range(len(prompts)), key=lambda i: (-len(tokenizer.encode(prompts[i])), prompts[i]))
    batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    # Under `accelerate launch` process r takes batches r, r+N, ...: the batches themselves are
    # the single-process ones, so every item is generated exactly as it would be alone. Every
    # process makes the same number of generate calls (padding with a repeat whose result is
    # dropped), and synced_gpus keeps their forward passes in step: a sharded model (FSDP,
    # ZeRO-3) gathers its weights collectively in each one.
    w = world()
    parallel = w.size > 1 and active()
    mine = batches[w.rank :: w.size] if parallel else batches
    rounds = -(-len(batches) // w.size) if parallel else len(batches)
    work = mine + batches[:1] * (rounds - len(mine))
    done: dict[int, str] = {}
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for k, idx in enumerate(work):
            enc = tokenizer([prompts[i] for i in idx], padding="longest", return_tensors="pt")
            ids = enc["input_ids"][:, -max_ctx:].to(device)
            mask = enc["attention_mask"][:, -max_ctx:].to(device)
            with torch.no_grad():
                gen = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_length=ids.shape[1] + max_gen_toks,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=True,
                    stopping_criteria=[_StopOnStrings(tokenizer, until, ids.shape[1])],
                    synced_gpus=parallel,
                )
            if k >= len(mine):
                continue
            for row, i in zip(gen[:, ids.shape[1] :].tolist(), idx, strict=True):
                done[i] = truncate_at_stop(tokenizer.decode(row, skip_special_tokens=True), until)
            if progress is not None:
                progress(len(idx), len(prompts))
    finally:
        tokenizer.padding_side = old_side
    if parallel:
        for part in gather(done):
            done.update(part)
    out = [done[i] for i in range(len(prompts))]
    return out


def evaluate_gsm8k(
    model: Any,
    tokenizer: Any,
    items: Sequence[dict[str, Any]],
    *,
    shots: Sequence[dict[str, Any]] = (),
    batch_size: int = 64,
    max_gen_toks: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Score a model on GSM8K-format items.

    Args:
        model: a loaded causal LM (eval mode is set here).
        tokenizer: its tokenizer.
        items: ``{"question", "answer"}`` dicts.
        shots: few-shot examples put before every question.
        batch_size: prompts per generate call.
        max_gen_toks: most new tokens per item (lm-eval's default is 256).
        progress: called with (items done in this batch, total).

    Returns:
        Accuracy both ways and per-item detail.
    """
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        prompts = [build_prompt(it["question"], list(shots)) for it in items]
        gens = generate(model, tokenizer, prompts, batch_size=batch_size, max_gen_toks=max_gen_toks, progress=progress)
    finally:
        model.train(was_training)
    scored = [score(i, g, it["answer"]) for i, (g, it) in enumerate(zip(gens, items, strict=True))]
    n = len(scored)
    return EvalReport(
        strict=sum(s.strict_correct for s in scored) / n if n else 0.0,
        flexible=sum(s.flexible_correct for s in scored) / n if n else 0.0,
        n=n,
        seconds=time.perf_counter() - t0,
        items=scored,
    )


def load_for_eval(path: str, *, device: str | None = None, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Load a model and tokenizer the way lm-eval's hf backend does (checkpoint dtype, eval mode).

    Raises:
        CheckpointError: ``path`` is not a model directory with safetensors weights (checked first).
    """
    import torch  # heavy: kept off the transfer path
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: kept off the transfer path

    path = resolve_eval_model(path)
    # under `accelerate launch` each process evaluates its share of the items on its own GPU
    dev = device or (f"cuda:{world().local_rank}" if torch.cuda.is_available() else "cpu")
    check_model_json(path)
    with loading(path), no_progress_bars():
        model: Any = AutoModelForCausalLM.from_pretrained(
            path, dtype="auto", use_safetensors=True, trust_remote_code=trust_remote_code
        )
    model = model.to(dev)
    with loading(path, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer
