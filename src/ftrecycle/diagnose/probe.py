"""A connectivity probe on calibration data: the loss along A → C and the loss of C + αΔ.

* **Path**: the mean completion-token loss of (1 − t)·A + t·C for t on a grid; the barrier is the
  largest excess over the straight line between the end points' losses (Frankle et al. 2020,
  "Linear Mode Connectivity and the Lottery Ticket Hypothesis"). A low barrier means A and C sit in
  one linearly connected basin, where the paper finds diffs transfer.
* **α**: the loss of C + α(B − A) on a grid of α; the best α is the grid point of lowest loss.
* **Accuracy** (when the calibration items carry ``#### N`` answers and ``probe_items`` > 0): the
  exact-answer accuracy of C and of C + αΔ on the first items (:mod:`ftrecycle.diagnose.accuracy`),
  at α = 1, or for ``--alpha auto`` at the :data:`ALPHA_CANDIDATES` grid points of lowest loss, the
  best α then being the one of highest accuracy (ties broken by loss).

The models are loaded in float32 (one working copy plus A, C and Δ): the probe is meant for the
calibration set a user has, a few hundred examples; the geometry is the part streamed in bounded memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftrecycle.diagnose.accuracy import PROBE_NEW_TOKENS, AccuracyProbe, answer_items, correct, summarize
from ftrecycle.errors import DataError
from ftrecycle.finetune.data import Collator, encode, load_examples
from ftrecycle.io.checkpoint import open_checkpoint
from ftrecycle.io.hf_load import load_causal_lm, load_tokenizer

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
PATH = (0.0, 0.25, 0.5, 0.75, 1.0)
#: ``--alpha auto`` with answers scores the accuracy of this many grid points (those of lowest loss):
#: generation costs far more than a loss pass, and the loss already rules out the far ends of the grid
ALPHA_CANDIDATES = 3


@dataclass
class Probe:
    """What the probe measured (losses are mean completion-token cross-entropy, nats).

    Attributes:
        path: (t, loss) along (1 − t)·A + t·C.
        barrier: max over t of loss(t) − [(1 − t)·loss(A) + t·loss(C)] (≥ 0 up to noise).
        alphas: (α, loss) of C + αΔ.
        best_alpha: the α of lowest loss.
        loss_target: loss of C.
        loss_transfer: loss of C + Δ (α = 1).
        examples: calibration examples used.
        accuracy: the accuracy probe (None: no item with a ``#### N`` answer, or not asked for).
        alpha_method: how ``best_alpha`` was chosen: ``loss`` (lowest loss) or ``accuracy`` (highest
            accuracy on the accuracy probe's items among the lowest-loss grid points, ties by loss).
    """

    path: list[tuple[float, float]]
    barrier: float
    alphas: list[tuple[float, float]]
    best_alpha: float
    loss_target: float
    loss_transfer: float
    examples: int
    accuracy: AccuracyProbe | None = None
    alpha_method: str = "loss"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "path": self.path,
            "barrier": self.barrier,
            "alphas": self.alphas,
            "best_alpha": self.best_alpha,
            "loss_target": self.loss_target,
            "loss_transfer": self.loss_transfer,
            "examples": self.examples,
            "accuracy": self.accuracy.to_json() if self.accuracy else None,
            "alpha_method": self.alpha_method,
        }


def calibration_batches(
    path: str | Path, tokenizer: Any, *, max_examples: int, batch_size: int, max_length: int = 1024
) -> list[dict[str, Any]]:
    """Tokenized calibration batches (prompt tokens masked), from the fine-tuning data formats.

    Raises:
        DataError: a missing or malformed file (naming the file and line), or no usable example.
    """
    if not Path(path).is_file():
        raise DataError(f"calibration file {path} does not exist")
    rows = load_examples(path)[:max_examples]
    feats = [f for r in rows if (f := encode(r, tokenizer, max_length)) is not None]
    if not feats:
        raise DataError(f"{path}: no calibration example has a completion token within {max_length} tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = Collator(pad)
    return [collate(feats[i : i + batch_size]) for i in range(0, len(feats), batch_size)]


def mean_loss(model: Any, batches: Sequence[dict[str, Any]]) -> float:
    """Mean cross-entropy over every completion token of the batches."""
    import torch  # heavy: kept off the transfer path

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            ids, labels, mask = (b[k].to(device) for k in ("input_ids", "labels", "attention_mask"))
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            tgt = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += float(loss)
            count += int((tgt != -100).sum())
    return total / max(1, count)


@contextmanager
def _models(source_base: str, source_finetuned: str, target_base: str, device: str | None) -> Iterator[Any]:
    import torch  # heavy: kept off the transfer path (the package root imports diagnose)

    paths = []
    for ref in (source_base, source_finetuned, target_base):
        ck = open_checkpoint(ref)
        paths.append(str(ck.path))
        ck.close()
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")

    def load(p: str) -> Any:
        # safetensors only: open_checkpoint above refused pickles, and transformers must not fall back to them
        model: Any = load_causal_lm(p, dtype=torch.float32)
        return model.to(dev).eval()

    work = load(paths[2])
    a = {k: v.detach().clone() for k, v in load(paths[0]).state_dict().items()}
    b = load(paths[1]).state_dict()
    c = {k: v.detach().clone() for k, v in work.state_dict().items()}
    delta = {
        k: b[k] - a[k]
        for k in c
        if k in a and k in b and a[k].shape == c[k].shape == b[k].shape and a[k].is_floating_point()
    }
    del b
    yield work, load_tokenizer(paths[2]), a, c, delta


def _set(work: Any, values: dict[str, Any]) -> None:
    import torch  # heavy: kept off the transfer path

    with torch.no_grad():
        state = work.state_dict()
        for k, v in values.items():
            state[k].copy_(v)


def _accuracy(
    work: Any,
    tok: Any,
    items: list[dict[str, Any]],
    c: dict[str, Any],
    delta: dict[str, Any],
    alphas: Sequence[float],
    max_new_tokens: int,
) -> dict[float, list[bool]]:
    """Per-item correctness of C + αΔ for each α, and of C itself (α = 0, always scored: the baseline)."""
    out: dict[float, list[bool]] = {}
    for al in sorted({0.0, *alphas}):
        _set(work, {k: c[k] + al * delta[k] for k in delta})
        out[float(al)] = correct(work, tok, items, max_new_tokens=max_new_tokens)
    return out


def _choose(
    losses: list[tuple[float, float]], accuracy: dict[float, list[bool]] | None, candidates: Sequence[float]
) -> tuple[float, str]:
    """The best α: highest accuracy among ``candidates`` (ties: lower loss), else lowest loss."""
    loss = dict(losses)
    if accuracy is None or not candidates:
        return min(losses, key=lambda p: p[1])[0], "loss"
    return max(candidates, key=lambda a: (sum(accuracy[a]), -loss[a])), "accuracy"


def probe(
    source_base: str,
    source_finetuned: str,
    target_base: str,
    calibration: str | Path,
    *,
    alphas: Sequence[float] = ALPHAS,
    path: Sequence[float] = PATH,
    max_examples: int = 256,
    batch_size: int = 16,
    device: str | None = None,
    probe_items: int = 0,
    max_new_tokens: int = PROBE_NEW_TOKENS,
    choose_by_accuracy: bool = False,
) -> Probe:
    """Measure the A → C path barrier, the loss of C + αΔ and (optionally) its accuracy on calibration data.

    Args:
        source_base: A. source_finetuned: B. target_base: C (directories or hub ids).
        calibration: JSONL in a fine-tuning format (prompt/completion, messages, question/answer).
        alphas: α grid; path: t grid (empty: skip the path).
        max_examples: calibration examples used for the losses (the first ones).
        batch_size: examples per forward pass.
        device: default CUDA when available.
        probe_items: GSM8K-format items (with ``#### N`` answers) whose greedy answers are scored for C
            and C + αΔ; 0, or data without answers, skips the accuracy probe.
        max_new_tokens: most new tokens per generated answer.
        choose_by_accuracy: score the accuracy at the :data:`ALPHA_CANDIDATES` grid points of lowest
            loss and choose the best α by it (``--alpha auto``); otherwise score α = 1 only.

    Returns:
        The measurements; ``best_alpha`` and ``alpha_method`` say how α was chosen.

    Raises:
        DataError: a bad calibration file.
        CheckpointError: an unreadable model.
    """
    with _models(source_base, source_finetuned, target_base, device) as (work, tok, a, c, delta):
        batches = calibration_batches(calibration, tok, max_examples=max_examples, batch_size=batch_size)
        items = answer_items(calibration, probe_items)  # after the batches: they report a missing file
        losses_path: list[tuple[float, float]] = []
        for t in path:
            _set(work, {k: a[k] + t * (c[k] - a[k]) for k in delta})
            losses_path.append((float(t), mean_loss(work, batches)))
        losses_alpha: list[tuple[float, float]] = []
        for al in alphas:
            _set(work, {k: c[k] + al * delta[k] for k in delta})
            losses_alpha.append((float(al), mean_loss(work, batches)))
        at_one = dict(losses_alpha).get(1.0)
        if at_one is None:  # the plain transfer's loss is always reported
            _set(work, {k: c[k] + delta[k] for k in delta})
            at_one = mean_loss(work, batches)
        candidates = [al for al, _ in sorted(losses_alpha, key=lambda p: p[1])[:ALPHA_CANDIDATES]]
        acc, started = None, time.perf_counter()
        if items:
            acc = _accuracy(work, tok, items, c, delta, candidates if choose_by_accuracy else (1.0,), max_new_tokens)
        seconds = time.perf_counter() - started
        _set(work, c)
        loss_c = mean_loss(work, batches)
    barrier = 0.0
    if len(losses_path) >= 2:
        (t0, l0), (t1, l1) = losses_path[0], losses_path[-1]
        barrier = max(lt - (l0 + (t - t0) / (t1 - t0) * (l1 - l0)) for t, lt in losses_path)
    best, method = _choose(losses_alpha, acc, candidates if choose_by_accuracy else ())
    accuracy = None if acc is None else summarize(acc[0.0], acc, best if choose_by_accuracy else 1.0, seconds)
    return Probe(
        losses_path,
        float(barrier),
        losses_alpha,
        float(best),
        loss_c,
        float(at_one),
        sum(len(b["input_ids"]) for b in batches),
        accuracy,
        method,
    )
