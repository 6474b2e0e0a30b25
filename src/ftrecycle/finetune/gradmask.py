"""The gradient-sign mask of a target model (GradFix: Rinaldi et al., "Gradient-Sign Masking for Task
Vector Transport Across Pre-Trained Models", ICLR 2026, arXiv:2510.09658).

A diff ``Delta = B - A`` made on an old base often fails on a new base ``C`` because part of it
points uphill in ``C``'s loss. GradFix keeps an entry of ``Delta`` only where it agrees in sign with
the descent direction ``-g``, ``g = grad L(C)`` on a few labelled examples of the task
(``Delta_ij * (-g_ij) > 0``), and zeroes the rest: ``C + alpha * (m * Delta)``. The kept entries are
not rescaled (the paper's update is ``alpha * (m * tau)``; alpha is the only scale).

Here ``g`` is the gradient of the summed next-token cross-entropy over the completion tokens of the
first ``examples`` examples (the fine-tuning formats; prompt tokens carry no loss), accumulated over
micro-batches with the model loaded once, in float32 (on CUDA, with bfloat16 autocast where the GPU
has it, as fine-tuning does). ``vote="sum"`` (the default) takes the sign of the summed gradient,
which weighs each example by its gradient's size; ``vote="majority"`` takes a majority vote of the
examples' own gradient signs (the sign of the sum of their signs, 0 on a tie), the paper's
few-sample estimator (its code's ``sign_mode max``): one backward pass per example.

The mask is ``sign(-g)`` as int8 (-1, 0, +1) for every floating tensor the checkpoint stores that is
a parameter with a gradient, under the checkpoint's own names (a tied embedding under each name the
checkpoint stores it), written with :func:`ftrecycle.io.maskfile.write_mask`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ftrecycle.errors import CheckpointError, ConfigError, DataError, OutputError
from ftrecycle.finetune.calibrate import checkpoint_names, file_sha256, pick_device
from ftrecycle.finetune.data import IGNORE_INDEX, Collator, encode, load_examples
from ftrecycle.io.checkpoint import Checkpoint, open_checkpoint
from ftrecycle.io.hf_load import load_causal_lm, load_tokenizer
from ftrecycle.io.maskfile import write_mask
from ftrecycle.io.output import check_no_overlap
from ftrecycle.io.provenance import weights_fingerprint
from ftrecycle.version import __version__

#: GradFix's regime: tens of labelled examples.
DEFAULT_MASK_EXAMPLES = 64
#: Examples per forward/backward pass (the gradient is their sum whatever the split).
DEFAULT_MICRO_BATCH = 8
DEFAULT_MAX_LENGTH = 1024
#: How the examples' gradients become one sign: that of their sum, or a majority vote of their signs.
VOTES = ("sum", "majority")


@dataclass(frozen=True)
class MaskResult:
    """A written gradient-sign mask.

    Attributes:
        output: the mask file.
        examples: the labelled examples the gradient was summed over.
        tensors: the tensors the mask has an entry for.
        skipped: stored floating tensors without one (no parameter of the model, or no gradient).
        seconds: wall time.
        info: what the file records about how it was made.
    """

    output: Path
    examples: int
    tensors: int
    skipped: list[str]
    seconds: float
    info: dict[str, Any]


def _features(calibration: str | Path, tokenizer: Any, examples: int, max_length: int) -> list[dict[str, list[int]]]:
    """The first ``examples`` examples with a completion token, tokenized (prompt tokens masked)."""
    if not Path(calibration).is_file():
        raise DataError(f"calibration file {calibration} does not exist; pass a JSONL file of labelled examples")
    feats = []
    for row in load_examples(calibration):
        f = encode(row, tokenizer, max_length)
        if f is not None:
            feats.append(f)
        if len(feats) == examples:
            break
    if not feats:
        raise DataError(f"{calibration}: no example has a completion token within {max_length} tokens")
    return feats


def _summed_gradient(net: Any, batches: list[dict[str, Any]], device: str) -> None:
    """Accumulate into each parameter's ``.grad`` the gradient of the loss summed over every completion token."""
    import torch  # heavy: kept off the transfer path

    autocast = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    net.zero_grad(set_to_none=True)
    for b in batches:
        ids, labels, mask = (b[k].to(device) for k in ("input_ids", "labels", "attention_mask"))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = net(input_ids=ids, attention_mask=mask).logits[:, :-1]
        # a sum, not a mean per batch: the total is then the same whatever the micro-batch split
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        loss.backward()


def _voted_gradient(net: Any, feats: list[dict[str, list[int]]], collate: Collator, device: str) -> None:
    """Leave in each parameter's ``.grad`` minus the sum of the examples' own signs of ``-grad`` (one
    backward pass per example; integers, so the vote is exact), so that :func:`_signs` reads the majority."""
    import torch  # heavy: kept off the transfer path

    votes = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    seen: set[str] = set()
    for f in feats:
        _summed_gradient(net, [collate([f])], device)
        for n, p in net.named_parameters():
            if p.grad is not None:
                votes[n] -= torch.sign(-p.grad)
                seen.add(n)
    for n, p in net.named_parameters():
        p.grad = votes[n] if n in seen else None


def _signs(net: Any, stored: dict[str, tuple[int, ...]]) -> tuple[dict[str, np.ndarray], list[str]]:
    """``sign(-grad)`` as int8 for each stored tensor name whose parameter has a gradient; the names without one."""
    import torch  # heavy: kept off the transfer path

    names = checkpoint_names(net)
    params = dict(net.named_parameters())
    signs: dict[str, np.ndarray] = {}
    skipped = []
    for s, shape in stored.items():
        p = params.get(names.get(s, ""))
        if p is None or p.grad is None:
            skipped.append(s)
            continue
        if tuple(p.shape) != shape:
            raise CheckpointError(
                f"stored tensor {s!r} has shape {list(shape)} but the loaded model's parameter has "
                f"{list(p.shape)}; the checkpoint and its config disagree"
            )
        signs[s] = torch.sign(-p.grad.detach()).to(torch.int8).cpu().numpy()
    return signs, skipped


def _identity(ckpt: Checkpoint) -> dict[str, Any]:
    """The target by name and content, never by an absolute path (a mask file may be shared)."""
    config = Path(ckpt.path) / "config.json"
    return {
        "name": ckpt.source.repo_id or Path(ckpt.path).name,
        "revision": ckpt.source.revision,
        "config_sha256": file_sha256(config) if config.is_file() else None,
        "tensors": len(ckpt.tensors),
        "bytes": sum(t.nbytes for t in ckpt.tensors.values()),
        "weights_fingerprint": weights_fingerprint(Path(ckpt.path)),
    }


def grad_sign_mask(
    target_base: str | Path,
    calibration: str | Path,
    output: str | Path,
    *,
    examples: int = DEFAULT_MASK_EXAMPLES,
    device: str | None = None,
    micro_batch: int = DEFAULT_MICRO_BATCH,
    max_length: int = DEFAULT_MAX_LENGTH,
    vote: str = "sum",
    force: bool = False,
) -> MaskResult:
    """Write the sign of the target's descent direction on labelled examples as a mask file (GradFix).

    Args:
        target_base: the new base model C (directory or hub id), the one the diff will be added to.
        calibration: labelled examples of the task (JSONL in the fine-tuning formats, or a hub dataset).
        output: the mask file to write (``.safetensors``); it appears only when complete.
        examples: how many examples (the first ones with a completion token) the gradient is summed over.
        device: ``cpu``, ``cuda``... (default: CUDA when available).
        micro_batch: examples per forward/backward pass (memory only: the gradient is their sum).
        max_length: tokens kept per example.
        vote: ``sum`` (the sign of the summed gradient) or ``majority`` (a majority vote of the examples'
            own gradient signs, GradFix's few-sample estimator; ``micro_batch`` does not apply).
        force: replace an existing file.

    Returns:
        What was written.

    Raises:
        ConfigError: ``examples``, ``micro_batch`` or ``max_length`` below 1, or another ``vote``.
        DataError: a missing or malformed calibration file, or no example with a completion token.
        CheckpointError: the model cannot be read.
        OutputError: the file exists (without ``force``), overlaps an input, or cannot be written.
    """
    import torch  # heavy: kept off the transfer path

    started = time.perf_counter()
    if min(examples, micro_batch, max_length) < 1:
        raise ConfigError(f"examples ({examples}), micro_batch and max_length must be at least 1")
    if vote not in VOTES:
        raise ConfigError(f"vote {vote!r} is not one of {', '.join(VOTES)}")
    with open_checkpoint(str(target_base)) as ckpt:
        path = Path(ckpt.path)
        stored = {n: t.shape for n, t in ckpt.tensors.items() if t.dtype.is_floating}
        target = _identity(ckpt)
    out = check_no_overlap(output, [path, calibration], what="mask file")
    if os.path.lexists(out) and not force:
        raise OutputError(f"mask file {output} exists; remove it, choose another path, or pass --force")
    tokenizer = load_tokenizer(path)
    feats = _features(calibration, tokenizer, examples, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = Collator(pad if pad is not None else 0)
    batches = [collate(feats[i : i + micro_batch]) for i in range(0, len(feats), micro_batch)]
    dev = pick_device(device)
    net = load_causal_lm(path, dtype=torch.float32).to(dev).eval()  # eval: dropout off, gradients still flow
    if vote == "majority":
        _voted_gradient(net, feats, collate, dev)
    else:
        _summed_gradient(net, batches, dev)
    signs, skipped = _signs(net, stored)
    del net
    info = {
        "tool": "ftrecycle",
        "version": __version__,
        "method": "grad-sign (GradFix): sign of -grad of the completion-token loss on the target",
        "vote": vote,
        "calibration": {"file": Path(calibration).name, "sha256": file_sha256(calibration)},
        "examples": len(feats),
        "examples_requested": examples,
        "target": target,
        "device": dev,
        "skipped": skipped,
    }
    write_mask(out, signs, info)
    return MaskResult(out, len(feats), len(signs), skipped, time.perf_counter() - started, info)
