"""Calibration of a compressed delta: its scales distilled on a few texts, and per-tensor sensitivities.

**Scale distillation** (BitDelta, Liu et al. 2024, "BitDelta: Your Fine-Tune May Only Be Worth
One Bit", arXiv:2402.10193, sec. 3.2). A compressed delta decodes to ``D_hat`` for each matrix;
the student model is ``W_base + diag(g) @ D_hat`` for every compressed matrix (``g`` one gain per
row, or one per matrix, as the codec's ``row_gain`` says; initialised to 1) and
``W_base + D`` for the tensors stored dense (fixed). Only the gains train: Adam for ``steps``
steps, one batch of calibration texts a step, cycling through them in order, to minimise

    KL(teacher || student) = sum_v p_t(v) * (log p_t(v) - log p_s(v)),

averaged over the non-padding tokens, where the teacher is the fine-tuned model. BitDelta
minimises the mean squared error of the logits instead; the KL is used here because it compares
what the models predict (it ignores a shift of all logits at a position, which the softmax
ignores too) and it is the measure the tests and the lab report. The trained gains are folded
into the stored parts by each codec's ``gain`` hook (:class:`ftrecycle.codecs.Codec`), so the
calibrated delta has the same format, size and decoder as the input.

Memory: the teacher's log-probabilities are computed once, written to a scratch file beside the
output (``tokens x vocab`` float32 on disk), and the teacher is freed before the student is
loaded; training then holds the base model, the decoded compressed matrices (``D_hat``, float32,
the size of those matrices), one transient copy of them per step (``W_base + g * D_hat``), the
activations of one batch and one batch's teacher log-probabilities.

**Sensitivity** (:func:`sensitivity`): per 2-D weight, the mean over the calibration texts of
the squared gradient of the language-model loss, averaged over the weight's elements: a diagonal
Fisher estimate (Kirkpatrick et al. 2017, arXiv:1612.00796), as the weights of a size budget
(``--compress auto``'s ``weights`` file: a JSON object of stored tensor name -> weight).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ftrecycle.codecs import CODECS, decode, gains_per_row, parse_compression, part_name
from ftrecycle.delta.rewrite import DEFAULT_SHARD_BYTES, rewrite_delta, stored_values
from ftrecycle.delta.store import Delta
from ftrecycle.dtypes import from_storage, to_storage
from ftrecycle.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    IncompatibleModelsError,
    NonFiniteError,
    OutputError,
)
from ftrecycle.finetune.data import IGNORE_INDEX, encode, load_examples
from ftrecycle.io.checkpoint import open_checkpoint
from ftrecycle.io.hf_load import load_causal_lm, load_tokenizer
from ftrecycle.io.output import check_free_space, check_no_overlap, check_output, replaced_file
from ftrecycle.io.provenance import base_record
from ftrecycle.ops.diff import DiffResult, diff
from ftrecycle.options import DiffOptions
from ftrecycle.pipeline import ProgressFn
from ftrecycle.terms import PackedTerm, Stored, Term

#: BitDelta's settings (sec. 4.1): Adam, learning rate 1e-4, 200 steps of batches of 4 texts.
DEFAULT_STEPS = 200
DEFAULT_LR = 1e-4
DEFAULT_MAX_LENGTH = 512
DEFAULT_BATCH_SIZE = 4
#: The compute dtypes the models may be loaded in for calibration.
CALIBRATION_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class CalibrationResult:
    """What :func:`calibrate` wrote and measured.

    Attributes:
        output: the calibrated delta directory.
        steps: Adam steps taken.
        loss_before: KL(teacher || student) per token on the calibration texts with all gains 1.
        loss_after: the same with the trained gains (measured before they are rounded into the parts).
        calibrated: the compressed tensors whose gains were trained.
        seconds: wall time.
    """

    output: Path
    steps: int
    loss_before: float
    loss_after: float
    calibrated: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------ texts


def calibration_batches(path: str | Path, tokenizer: Any, *, max_length: int, batch_size: int) -> list[dict[str, Any]]:
    """The calibration texts as right-padded batches of token ids (the full examples, prompt included).

    Args:
        path: a JSONL file of the formats :mod:`ftrecycle.finetune.data` reads (prompt/completion,
            messages, question/answer).
        tokenizer: the fine-tuned model's tokenizer.
        max_length: tokens kept per text (the first ones).
        batch_size: texts per batch.

    Returns:
        Batches of ``input_ids``/``attention_mask`` (torch long tensors), in the file's order.

    Raises:
        DataError: a missing, empty or malformed file (naming the line), or no text with tokens.
        ConfigError: ``max_length`` or ``batch_size`` below 1.
    """
    import torch  # heavy: kept off the transfer path

    if max_length < 1 or batch_size < 1:
        raise ConfigError(f"max_length ({max_length}) and batch_size ({batch_size}) must be at least 1")
    rows = load_examples(path)
    texts: list[list[int]] = []
    for row in rows:
        got = encode(row, tokenizer, 1 << 30)  # the whole example, cut below to max_length
        if got is not None and got["input_ids"]:
            texts.append(got["input_ids"][:max_length])
    if not texts:
        raise DataError(f"{path}: no calibration text has any token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for s in range(0, len(texts), batch_size):
        chunk = texts[s : s + batch_size]
        n = max(len(t) for t in chunk)
        ids = torch.full((len(chunk), n), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for i, t in enumerate(chunk):
            ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
            mask[i, : len(t)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (the calibration file, recorded in the manifest)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ models


def pick_device(device: str | None) -> str:
    """``device``, or as fine-tuning picks it: ``cuda`` when available, else ``cpu``."""
    import torch  # heavy: kept off the transfer path

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _torch_dtype(dtype: str) -> Any:
    import torch  # heavy: kept off the transfer path

    if dtype not in CALIBRATION_DTYPES:
        raise ConfigError(f"dtype {dtype!r}: choose one of {', '.join(CALIBRATION_DTYPES)}")
    return getattr(torch, dtype)


def _load(path: Path, dtype: str, device: str) -> Any:
    """A causal LM in ``dtype`` on ``device``, dropout off (eval mode; gradients still flow)."""
    net = load_causal_lm(path, dtype=_torch_dtype(dtype))
    return net.to(device).eval()


def checkpoint_names(model: Any) -> dict[str, str]:
    """Every name a checkpoint may store one of ``model``'s parameters under -> the parameter's name.

    The parameter's own name (each of a tied group's names), and the name with or without the
    model's ``base_model_prefix`` (``transformer.h.0...`` of a GPT-2 LM head model is stored as
    ``h.0...`` by older checkpoints). A tied group maps to the name ``named_parameters`` keeps.
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    every = list(model.named_parameters(remove_duplicate=False))
    names = {n: canonical[id(p)] for n, p in every}
    if prefix:  # the model's own names win over the other spelling of a name
        for n, p in every:
            other = n.removeprefix(prefix + ".") if n.startswith(prefix + ".") else f"{prefix}.{n}"
            names.setdefault(other, canonical[id(p)])
    return names


def _teacher_logprobs(path: Path, batches: list[dict[str, Any]], scratch: Path, dtype: str, device: str) -> Any:
    """The fine-tuned model's log-probabilities at every non-padding token, in a float32 file (a memmap)."""
    import torch  # heavy: kept off the transfer path

    teacher = _load(path, dtype, device)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    vocab = int(teacher.get_output_embeddings().weight.shape[0])
    need = 4 * tokens * vocab
    check_free_space(scratch, need)
    store = np.lib.format.open_memmap(scratch / "teacher.npy", mode="w+", dtype=np.float32, shape=(tokens, vocab))
    try:
        # the file's blocks now, not as the memmap's pages are first written: a full disk is then an
        # error here, not a SIGBUS in the middle of the teacher's pass
        with open(scratch / "teacher.npy", "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except OSError as e:
        raise OutputError(
            f"{scratch}: no room for the teacher's log-probabilities ({math.ceil(need / 2**20)} MiB: calibration "
            f"tokens x vocabulary x 4 bytes): {e.strerror}; free space beside the output or use fewer or shorter texts"
        ) from None
    at = 0
    with torch.no_grad():
        for b in batches:
            logits = teacher(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
            keep = b["attention_mask"].to(device).bool()
            lp = torch.log_softmax(logits[keep].float(), dim=-1).cpu().numpy()
            store[at : at + len(lp)] = lp
            at += len(lp)
    store.flush()
    del teacher
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return store


# ------------------------------------------------------------------------------------------ student


@dataclass
class _Student:
    """The base model with the delta's dense tensors added, and the gains of its compressed matrices.

    Attributes:
        net: the base model (its parameters frozen; dense diffs added in place).
        base: parameter name -> the base weight of each calibrated matrix.
        decoded: parameter name -> ``D_hat`` (float32, on the device).
        gains: parameter name -> the trainable gains, shape (m,) or (1,).
        tensors: parameter name -> the delta's tensor name.
    """

    net: Any
    base: dict[str, Any] = field(default_factory=dict)
    decoded: dict[str, Any] = field(default_factory=dict)
    gains: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, str] = field(default_factory=dict)

    def logits(self, batch: dict[str, Any], device: str) -> Any:
        """The student's logits on one batch: ``W_base + g[:, None] * D_hat`` for every calibrated matrix."""
        from torch.func import functional_call  # heavy: kept off the transfer path

        weights = {n: self.base[n] + self.gains[n][:, None] * self.decoded[n] for n in self.decoded}
        kwargs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        return functional_call(self.net, weights, args=(), kwargs=kwargs, tie_weights=True).logits


def _dense_values(term: Term) -> np.ndarray:
    """A delta tensor decoded whole to float32: a dense diff's values, or a compressed one's ``D_hat``."""
    if not isinstance(term, Stored | PackedTerm):  # a delta directory holds no other kind
        raise CheckpointError(f"tensor {term.name!r}: not a stored diff")
    numel = math.prod(term.shape)
    out = np.empty(numel, dtype=np.float32)
    if isinstance(term, PackedTerm):
        decode(term.packed, 0, numel, out, {})
    else:
        info = term.delta.info
        raw = np.empty(info.nbytes, dtype=np.uint8)
        out[:] = from_storage(term.delta.ckpt.read(info, 0, numel, raw), info.dtype, np.dtype(np.float32))
    return out.reshape(term.shape)


def _student(net: Any, delta: Delta, device: str) -> _Student:
    """The student: dense diffs added to ``net``'s parameters, compressed ones held as ``D_hat`` with gains.

    Raises:
        IncompatibleModelsError: a delta tensor the model lacks, of another shape, or two delta tensors
            that are one tied parameter of the model.
    """
    import torch  # heavy: kept off the transfer path

    names = checkpoint_names(net)
    params = dict(net.named_parameters())
    for p in params.values():
        p.requires_grad_(False)
    student = _Student(net)
    seen: dict[str, str] = {}
    for name, term in delta.terms.items():
        pname = names.get(name)
        if pname is None:
            raise IncompatibleModelsError(f"{delta.path}: tensor {name!r} of the delta is not a parameter of the base")
        if pname in seen:
            raise IncompatibleModelsError(
                f"{delta.path}: tensors {seen[pname]!r} and {name!r} are one tied parameter of the base model, but "
                "the delta stores a diff for each; calibrate against a base with untied weights"
            )
        seen[pname] = name
        p = params[pname]
        if tuple(p.shape) != tuple(term.shape):
            raise IncompatibleModelsError(
                f"{delta.path}: tensor {name!r} is {list(term.shape)} in the delta but {list(p.shape)} in the base"
            )
        values = torch.from_numpy(_dense_values(term)).to(device=device, dtype=p.dtype)
        packed = term.packed if isinstance(term, PackedTerm) else None
        codec = CODECS.get(packed.method) if packed is not None else None
        if packed is None or codec is None or codec.gain is None:  # dense, or nothing to calibrate: added as it is
            with torch.no_grad():
                p.add_(values)
            continue
        shapes = {k: tuple(v.shape if isinstance(v, np.ndarray) else v.info.shape) for k, v in packed.parts.items()}
        rows = term.shape[0] if gains_per_row(packed.method, shapes) else 1
        student.base[pname] = p.detach()
        student.decoded[pname] = values
        student.gains[pname] = torch.ones(rows, dtype=p.dtype, device=device, requires_grad=True)
        student.tensors[pname] = name
    return student


def _kl(student: _Student, batch: dict[str, Any], teacher: Any, at: int, device: str) -> tuple[Any, int]:
    """Summed KL(teacher || student) over one batch's non-padding tokens, and how many there are."""
    import torch  # heavy: kept off the transfer path

    keep = batch["attention_mask"].to(device).bool()
    s = torch.log_softmax(student.logits(batch, device)[keep].float(), dim=-1)
    t = torch.from_numpy(np.asarray(teacher[at : at + s.shape[0]])).to(device)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="sum"), int(s.shape[0])


def _mean_kl(student: _Student, batches: list[dict[str, Any]], teacher: Any, starts: list[int], device: str) -> float:
    """KL(teacher || student) per token over all the calibration texts."""
    import torch  # heavy: kept off the transfer path

    total, count = 0.0, 0
    with torch.no_grad():
        for b, at in zip(batches, starts, strict=True):
            kl, n = _kl(student, b, teacher, at, device)
            total += float(kl)
            count += n
    return total / max(count, 1)


def _train(
    student: _Student, batches: list[dict[str, Any]], teacher: Any, *, steps: int, lr: float, device: str
) -> None:
    """Adam on the gains for ``steps`` steps, batch ``step % len(batches)`` at each."""
    import torch  # heavy: kept off the transfer path

    if not student.gains or steps == 0:
        return
    starts = _starts(batches)
    opt = torch.optim.Adam(list(student.gains.values()), lr=lr)
    for step in range(steps):
        i = step % len(batches)
        opt.zero_grad(set_to_none=True)
        kl, n = _kl(student, batches[i], teacher, starts[i], device)
        (kl / max(n, 1)).backward()
        opt.step()


def _starts(batches: list[dict[str, Any]]) -> list[int]:
    """Each batch's first row in the teacher's token-by-vocabulary file."""
    sizes = [int(b["attention_mask"].sum()) for b in batches]
    return [int(x) for x in np.concatenate([[0], np.cumsum(sizes)[:-1]])]


# ------------------------------------------------------------------------------------------ parts


def gained_parts(delta: Delta, name: str, g: np.ndarray) -> dict[str, np.ndarray]:
    """The stored parts of compressed tensor ``name`` rescaled by its codec's ``gain`` hook, in their storage form.

    Args:
        delta: the opened delta.
        name: a compressed tensor.
        g: its gains, float64, shape (m,) or (1,).

    Returns:
        Stored part name (``name::part``) -> new values, each in its stored dtype and shape.

    Raises:
        NonFiniteError: a gain is NaN or infinite (the learning rate is too high).
        ConfigError: the codec has no gain hook, or returned a part it does not store.
    """
    if not np.all(np.isfinite(g)):
        raise NonFiniteError(f"calibration of {name!r} diverged (a gain is not finite); give a lower learning rate")
    entry = delta.entries[name]
    method = entry["compression"]["method"]
    hook = CODECS[method].gain
    if hook is None:
        raise ConfigError(f"tensor {name!r}: the {method} codec has nothing to calibrate")
    tensors = delta.shards().tensors
    parts = {k: stored_values(delta, stored) for k, stored in entry["parts"].items()}
    out: dict[str, np.ndarray] = {}
    for k, values in hook(parts, g).items():
        if k not in parts:
            raise ConfigError(f"tensor {name!r}: the {method} codec's gain returned a part {k!r} it does not store")
        stored = part_name(name, k)
        info = tensors[stored]
        arr = np.asarray(values)
        out[stored] = arr if arr.dtype == info.dtype.storage else to_storage(arr, info.dtype)
    return out


# ------------------------------------------------------------------------------------------ calibrate


@contextlib.contextmanager
def _scratch(output: Path) -> Iterator[Path]:
    """A temporary directory beside ``output`` (same disk as the result) for the teacher's log-probabilities."""
    parent = output.parent
    while not parent.exists():
        parent = parent.parent
    with tempfile.TemporaryDirectory(prefix=f".{output.name[:64]}.calibrate-", dir=parent) as tmp:
        yield Path(tmp)


def _model_path(ref: str | Path) -> Path:
    """A model's local directory (a hub id is resolved as every command resolves it)."""
    with open_checkpoint(str(ref)) as ckpt:
        return Path(ckpt.path)


def _record(calibration: str | Path, delta: str | Path, **settings: Any) -> dict[str, Any]:
    """The manifest's ``calibration`` field: what made the gains, and from which inputs."""
    return {
        **base_record("calibrate"),
        "file": str(calibration),
        "sha256": file_sha256(calibration),
        "input": str(delta),
        **settings,
        "loss": "KL(teacher || student) per token",
        "errors": "each tensor's compression error in the manifest is the input delta's, before calibration",
    }


def _check_student(student: _Student, d: Delta, teacher_vocab: int, finetuned: str | Path) -> None:
    """Something to calibrate, and a base that predicts the teacher's vocabulary.

    Raises:
        ConfigError: no compressed tensor's codec has a gain hook.
        IncompatibleModelsError: the two models' vocabularies differ.
    """
    if not student.gains:
        methods = sorted({e["compression"]["method"] for e in d.entries.values() if e.get("compression")})
        raise ConfigError(
            f"{d.path}: nothing to calibrate: the codecs of its compressed tensors ({', '.join(methods)}) "
            "have no gain hook"
        )
    vocab = int(student.net.get_output_embeddings().weight.shape[0])
    if vocab != teacher_vocab:
        raise IncompatibleModelsError(
            f"{finetuned}: the fine-tuned model predicts {teacher_vocab} tokens but the base {vocab}; "
            "calibration compares the two models' predictions token by token"
        )


def calibrate(
    delta: str | Path,
    base: str | Path,
    finetuned: str | Path,
    calibration: str | Path,
    output: str | Path,
    *,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | None = None,
    dtype: str = "float32",
    threads: int = 1,
    shard_size: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
) -> CalibrationResult:
    """Distil a compressed delta's scales on calibration texts (BitDelta) and write the calibrated delta.

    Args:
        delta: a compressed delta directory made by ``ftrecycle diff --compress``.
        base: the base model the delta was made from.
        finetuned: the fine-tuned model (the teacher; its tokenizer tokenizes the texts).
        calibration: a JSONL file of texts (prompt/completion, messages or question/answer lines).
        output: the calibrated delta directory to create.
        steps: Adam steps (0: the gains stay 1 and the parts are rewritten as they are).
        lr: Adam's learning rate.
        max_length: tokens kept per text.
        batch_size: texts per step.
        device: ``cpu``, ``cuda``, ``cuda:1``... (default: cuda when available).
        dtype: the models' compute dtype, ``float32`` or ``bfloat16``.
        threads: threads for the checksums.
        shard_size: the largest shard of the output, in bytes.
        force: replace an existing ``output``.

    Returns:
        What was written and the KL before and after.

    Raises:
        DataError: a bad calibration file.
        ConfigError: a bad setting, or a delta with no compressed tensor to calibrate.
        IncompatibleModelsError: the delta does not fit the base model.
        NonFiniteError: the training diverged.
        CheckpointError, OutputError: unreadable inputs, an unwritable output (nothing is left there).
    """
    started = time.perf_counter()
    if steps < 0 or not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"steps ({steps}) must be at least 0 and lr ({lr}) a positive number")
    out = check_output(output, [delta, base, finetuned, calibration], force=force)
    dev = pick_device(device)
    _torch_dtype(dtype)
    base_path, fin_path = _model_path(base), _model_path(finetuned)
    batches = calibration_batches(calibration, load_tokenizer(fin_path), max_length=max_length, batch_size=batch_size)
    with Delta.open(delta, threads=threads) as d, _scratch(out) as scratch:
        if not any(isinstance(t, PackedTerm) for t in d.terms.values()):
            raise ConfigError(f"{delta}: the delta has no compressed tensor; make it with `ftrecycle diff --compress`")
        teacher = _teacher_logprobs(fin_path, batches, scratch, dtype, dev)
        student = _student(_load(base_path, dtype, dev), d, dev)
        _check_student(student, d, teacher.shape[1], finetuned)
        starts = _starts(batches)
        before = _mean_kl(student, batches, teacher, starts, dev)
        _train(student, batches, teacher, steps=steps, lr=lr, device=dev)
        after = _mean_kl(student, batches, teacher, starts, dev)
        replaced: dict[str, np.ndarray] = {}
        for pname, name in student.tensors.items():
            g = student.gains[pname].detach().to("cpu").double().numpy()
            replaced.update(gained_parts(d, name, g))
        record = _record(calibration, delta, steps=steps, lr=lr, max_length=max_length, batch_size=batch_size)
        record.update(dtype=dtype, loss_before=before, loss_after=after, tensors=sorted(student.tensors.values()))
        rewrite_delta(d, out, replaced, {"calibration": record}, shard_size=shard_size, threads=threads, force=force)
    return CalibrationResult(out, steps, before, after, sorted(student.tensors.values()), time.perf_counter() - started)


# ------------------------------------------------------------------------------------------ sensitivity


def sensitivity(
    model: str | Path,
    calibration: str | Path,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = 1,
    device: str | None = None,
    dtype: str = "float32",
) -> dict[str, float]:
    """Each 2-D weight's mean squared gradient of the LM loss on calibration texts (a diagonal Fisher estimate).

    The loss is the next-token cross-entropy over every non-padding token of each batch; the
    squared gradient of each batch is averaged over the batches and over the weight's elements.
    With ``batch_size`` 1 (the default) each text's gradient is squared on its own, as the
    Fisher's definition asks.

    Args:
        model: the model (the fine-tuned one, whose loss the compressed delta should keep).
        calibration: a JSONL file of texts (prompt/completion, messages or question/answer lines).
        max_length: tokens kept per text.
        batch_size: texts per gradient.
        device: ``cpu``, ``cuda``... (default: cuda when available).
        dtype: ``float32`` or ``bfloat16``.

    Returns:
        Stored tensor name (as in the model's safetensors files) -> sensitivity, for every 2-D
        tensor the checkpoint stores (a tied weight under each name the checkpoint stores it).

    Raises:
        DataError: a bad calibration file.
        CheckpointError: the model cannot be read, or a stored 2-D tensor is no parameter of it.
    """
    import torch  # heavy: kept off the transfer path

    path = _model_path(model)
    with open_checkpoint(str(model)) as ckpt:
        stored = {n: info.shape for n, info in ckpt.tensors.items() if len(info.shape) == 2}
    dev = pick_device(device)
    batches = calibration_batches(calibration, load_tokenizer(path), max_length=max_length, batch_size=batch_size)
    net = _load(path, dtype, dev)
    names = checkpoint_names(net)
    params = dict(net.named_parameters())
    missing = sorted(n for n in stored if n not in names)
    if missing:
        raise CheckpointError(f"{model}: stored tensor {missing[0]!r} is no parameter of the loaded model")
    total = {n: torch.zeros((), dtype=torch.float64, device=dev) for n in {names[s] for s in stored}}
    for b in batches:
        net.zero_grad(set_to_none=True)
        ids, mask = b["input_ids"].to(dev), b["attention_mask"].to(dev)
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        net(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        for n in total:
            grad = params[n].grad
            if grad is not None:
                total[n] += grad.double().square().mean()
    return {s: float(total[names[s]]) / len(batches) for s in sorted(stored)}


def write_sensitivity(
    path: str | Path, weights: dict[str, float], *, inputs: tuple[str | Path, ...] = (), force: bool = False
) -> Path:
    """Write sensitivities as the JSON object ``--compress auto``'s weights file is (replaced atomically).

    Args:
        path: the file to write.
        weights: tensor name -> sensitivity.
        inputs: the model and calibration file it was computed from: the output may not be, hold or
            be inside one of them, ``force`` or not.
        force: replace an existing file.

    Raises:
        NonFiniteError: a weight is NaN or infinite.
        OutputError: the file exists (without ``force``), overlaps an input, or cannot be written.
    """
    bad = sorted(n for n, w in weights.items() if not math.isfinite(w))
    if bad:
        raise NonFiniteError(f"the sensitivity of {bad[0]!r} is not finite; check the model and the calibration texts")
    out = check_no_overlap(path, inputs, what="--sensitivity")
    if os.path.lexists(out) and not force:
        raise OutputError(f"--sensitivity {path} exists; remove it, choose another path, or pass --force")
    with replaced_file(out) as f:
        f.write((json.dumps(weights, indent=2, sort_keys=True) + "\n").encode())
    return out


# ------------------------------------------------------------------------------------------ diff, then calibrate


def calibrated_diff(
    base: str | Path,
    finetuned: str | Path,
    output: str | Path,
    calibration: str | Path,
    *,
    options: DiffOptions | None = None,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | None = None,
    dtype: str = "float32",
    progress: ProgressFn | None = None,
    **keywords: Any,
) -> tuple[DiffResult, CalibrationResult]:
    """``ftrecycle diff --compress SPEC --calibration FILE``: diff into a scratch directory, then calibrate.

    With a size budget (``--compress auto:...``) the sensitivities of the fine-tuned model on the
    calibration texts (:func:`sensitivity`) are the budget's per-tensor weights.

    Args:
        base: the base model.
        finetuned: the fine-tuned model.
        output: the calibrated delta directory to create.
        calibration: a JSONL file of texts.
        options: the diff's options (``compress`` must be set); ``force`` replaces ``output``.
        steps: Adam steps of the calibration.
        lr: its learning rate.
        max_length: tokens kept per text.
        batch_size: texts per step.
        device: ``cpu``, ``cuda``... (default: cuda when available).
        dtype: the models' compute dtype.
        progress: the diff's progress callback.
        **keywords: any field of ``options``' groups, as :func:`ftrecycle.diff` takes them.

    Returns:
        What the diff wrote (into the scratch directory, since removed) and what the calibration wrote.

    Raises:
        ConfigError: no ``compress`` setting (a dense delta has no scales to calibrate).
        As :func:`ftrecycle.diff` and :func:`calibrate`.
    """
    opts = DiffOptions.merged(options, keywords)
    spec = parse_compression(opts.storage.compress)
    if spec is None:
        raise ConfigError("--calibration tunes a compressed delta's scales; give --compress too")
    if spec.method in CODECS and CODECS[spec.method].gain is None:  # refused before the diff, not after it
        raise ConfigError(f"--calibration: {spec.method} stores exact values, with no scale to calibrate")
    out = check_output(output, [base, finetuned, calibration, opts.storage.weights], force=opts.output.force)
    with _scratch(out) as tmp:
        extra: dict[str, Any] = {}
        if spec.method == "auto":  # the budget weighs each tensor's error by its sensitivity
            weights = sensitivity(finetuned, calibration, max_length=max_length, device=device, dtype=dtype)
            extra["weights"] = str(write_sensitivity(tmp / "weights.json", weights))
        made = diff(str(base), str(finetuned), tmp / "delta", options=opts, progress=progress, force=False, **extra)
        result = calibrate(
            tmp / "delta",
            base,
            finetuned,
            calibration,
            out,
            steps=steps,
            lr=lr,
            max_length=max_length,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            threads=opts.resources.threads or 1,
            shard_size=int(opts.output.shard_size),
            force=opts.output.force,
        )
    return made, result
