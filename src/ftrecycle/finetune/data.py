"""Turn JSONL training data into token ids with the loss on completion tokens only.

Accepted lines (one JSON object each):

* ``{"prompt": ..., "completion": ...}``
* ``{"messages": [{"role": ..., "content": ...}, ...]}`` — the last message (the assistant's) is the completion
* ``{"question": ..., "answer": ...}`` — GSM8K format, prompted exactly as the evaluator prompts it

With a chat template, prompt/completion pairs and message lists go through it;
GSM8K items keep lm-eval's plain ``Question: ...\\nAnswer:`` format either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftrecycle.errors import DataError
from ftrecycle.evaluate.data import read_jsonl
from ftrecycle.evaluate.gsm8k import TARGET_DELIMITER, doc_to_text
from ftrecycle.io.hub import HUB_ID
from ftrecycle.io.localpath import looks_local

IGNORE_INDEX = -100


def _kind(row: dict[str, Any], where: str) -> str:
    if "messages" in row:
        msgs = row["messages"]
        if (
            not isinstance(msgs, list)
            or len(msgs) < 2
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs
            )
        ):
            raise DataError(f"{where}: 'messages' must be a list of at least two {{role, content}} objects")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's (it is what is trained on)")
        return "messages"
    if "prompt" in row or "completion" in row:
        for k in ("prompt", "completion"):
            if not isinstance(row.get(k), str) or not row[k]:
                raise DataError(f"{where}: missing field {k!r} (a non-empty string)")
        return "prompt"
    if "question" in row or "answer" in row:
        for k in ("question", "answer"):
            if not isinstance(row.get(k), str) or not row[k]:
                raise DataError(f"{where}: missing field {k!r} (a non-empty string)")
        return "gsm8k"
    raise DataError(f"{where}: needs prompt/completion, messages, or question/answer fields")


def _hub_rows(ref: str) -> list[dict[str, Any]]:
    """Rows of a hub dataset ``org/name[@revision][:split]`` (default split: train)."""
    name, _, split = ref.partition(":")
    repo, _, revision = name.partition("@")
    try:
        from datasets import load_dataset  # heavy: kept off the transfer path

        ds = load_dataset(repo, split=split or "train", revision=revision or None)
    except Exception as e:  # datasets raises many types for "offline" and "not found"
        raise DataError(
            f"{ref}: cannot load this hub dataset ({type(e).__name__}); with no network, pass a local "
            "JSONL file instead"
        ) from e
    return [{**dict(r), "_line": i + 1} for i, r in enumerate(ds)]


def load_examples(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate training data: a JSONL file, or a hub dataset id ``org/name[@rev][:split]``.

    A missing path that looks local (``data/trian.jsonl``, ``./x``) is reported as missing, not looked up.

    Raises:
        DataError: naming the file and line (or dataset and row) of the first bad example.
    """
    ref = str(path)
    if not Path(ref).exists() and looks_local(ref):
        raise DataError(f"{ref}: no such data file (a local path; hub datasets are named org/name[:split])")
    if not Path(ref).exists() and HUB_ID.match(ref.partition(":")[0]):
        rows = _hub_rows(ref)
        if not rows:
            raise DataError(f"{ref}: the dataset split is empty")
    else:
        rows = read_jsonl(path)
    for r in rows:
        r["_kind"] = _kind(r, f"{path}:{r['_line']}")
    return rows


def _template(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def encode(row: dict[str, Any], tokenizer: Any, max_length: int) -> dict[str, list[int]] | None:
    """Token ids and labels (prompt tokens masked) of one example; None if nothing of the completion fits."""
    kind = row["_kind"]
    chat = getattr(tokenizer, "chat_template", None) and kind != "gsm8k"
    if chat:
        msgs = (
            row["messages"]
            if kind == "messages"
            else [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
        )
        prompt_ids = _template(tokenizer, msgs[:-1], True)
        full = _template(tokenizer, msgs, False)
        if full[: len(prompt_ids)] != prompt_ids:  # a template that rewrites earlier turns: mask by length
            prompt_ids = full[: len(prompt_ids)]
        completion_ids = full[len(prompt_ids) :]
    else:
        if kind == "gsm8k":
            prompt, completion = doc_to_text(row["question"]), TARGET_DELIMITER + row["answer"]
        elif kind == "prompt":
            prompt, completion = row["prompt"], row["completion"]
        else:
            msgs = row["messages"]
            prompt = "".join(f"{m['role']}: {m['content']}\n" for m in msgs[:-1]) + "assistant:"
            completion = " " + msgs[-1]["content"]
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion_ids = [*completion_ids, tokenizer.eos_token_id]
    ids = (list(prompt_ids) + list(completion_ids))[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + list(completion_ids))[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


class Collator:
    """Right-pad a batch; labels pad with -100 so padding carries no loss."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch  # heavy: kept off the transfer path

        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
