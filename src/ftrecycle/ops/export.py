"""Export a delta as a PEFT LoRA adapter.

:func:`export_lora` factorises a delta's matrices at a rank and writes a PEFT
adapter (``adapter_config.json`` + ``adapter_model.safetensors``) that
``peft.PeftModel.from_pretrained(target, ADAPTER)`` loads, so ``target + delta`` can be
served as an adapter.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ftrecycle.arch import CONV1D_MODULES, NOT_LINEAR
from ftrecycle.codecs import Encoded
from ftrecycle.codecs.lowrank import factors as lowrank
from ftrecycle.delta.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX
from ftrecycle.delta.store import open_delta
from ftrecycle.dtypes import F32, DType, parse_dtype
from ftrecycle.engine import chunk_for_budget, default_threads
from ftrecycle.errors import ConfigError
from ftrecycle.io.checkpoint import Checkpoint
from ftrecycle.io.output import atomic_directory, check_output, parse_size, write_json
from ftrecycle.io.provenance import PROVENANCE, base_record, describe_input
from ftrecycle.io.safetensors_format import PlannedTensor, build_header
from ftrecycle.ops.diff import term_reader
from ftrecycle.options import DEFAULT_MAX_MEMORY
from ftrecycle.terms import Term


@dataclass
class ExportResult:
    """What :func:`export_lora` wrote.

    Attributes:
        output: the adapter directory.
        modules: how many linear layers the adapter holds.
        bytes_written: the adapter's tensor bytes.
        seconds: wall time.
        left_out: the diff tensors a LoRA cannot hold, with their shapes and norms.
        errors: each exported matrix's relative error (Frobenius) at the rank.
    """

    output: Path
    modules: int
    bytes_written: int
    seconds: float
    left_out: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)


def _entry_norm(entry: dict[str, Any]) -> float:
    """A manifest entry's diff norm (dense: ``norm``; compressed: its compression record's)."""
    return float(entry.get("norm") or (entry.get("compression") or {}).get("norm") or 0.0)


def lora_module(name: str) -> str | None:
    """The module a LoRA would adapt for a diff tensor, or None (not a linear layer's weight)."""
    if not name.endswith(".weight") or name in NOT_LINEAR or "embed" in name:
        return None
    return name[: -len(".weight")]


def export_lora(
    delta: str | Path,
    output: str | Path,
    *,
    rank: int,
    dtype: str = "float32",
    threads: int | None = None,
    max_memory: str | int = DEFAULT_MAX_MEMORY,
    force: bool = False,
) -> ExportResult:
    """Write a PEFT LoRA adapter approximating a delta's linear-layer updates at ``rank``.

    Each linear weight's diff ``D`` (out x in) becomes ``lora_B @ lora_A`` with
    ``lora_B = U_r S_r`` and ``lora_A = V_r^T`` (its best rank-``rank`` approximation;
    ``lora_alpha = rank``, so PEFT's scaling is 1). Diffs a LoRA cannot hold — embeddings,
    the output head, norms and biases — are left out and listed, with their share of the
    diff's squared norm, in the adapter's ``ftrecycle.json``.

    Args:
        delta: the delta directory.
        output: the adapter directory to create.
        rank: the LoRA rank (matrices smaller than it keep their full rank).
        dtype: the adapter's dtype.
        threads: worker threads (default: available cores).
        max_memory: the readers' buffers' budget, e.g. ``"512MiB"``.
        force: replace an existing ``output``.

    Returns:
        What was written.

    Raises:
        ConfigError: a bad rank or dtype.
        CheckpointError: not a delta directory, or a corrupt one.
        OutputError: the output exists (without ``force``) or overlaps the delta.
    """
    started = time.perf_counter()
    # a bool is an int to Python, and a float or a string rank failed later as a TypeError
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"--rank must be a positive integer, got {rank!r:.60}")
    sdt: DType = parse_dtype(dtype, flag="--dtype")
    workers = threads or default_threads()
    out = Path(output).expanduser()
    ckpt, manifest, terms, _ = open_delta(delta, threads=workers)
    try:
        out = check_output(out, [ckpt.path, delta], force=force)
        chunk = chunk_for_budget(parse_size(max_memory, flag="--max-memory"), workers, F32)
        fan_in_fan_out = (manifest.get("base_config") or {}).get("model_type") == "gpt2"
        mats = {n: t for n, t in terms.items() if len(t.shape) == 2 and lora_module(n)}
        left = _left_out(terms, mats, manifest)
        factorise = partial(_factorise, rank=rank, dtype=sdt, chunk=chunk, fan_in_fan_out=fan_in_fan_out)
        with ThreadPoolExecutor(workers) as pool:
            done = list(pool.map(factorise, sorted(mats.items())))
        tensors = _adapter_tensors(done)
        errors = {name: enc.error for name, _, _, enc in done}
        config = _adapter_config(rank, mats, fan_in_fan_out, manifest)
        record = _export_record(ckpt, manifest, rank, sdt, errors, left)
        written = _write_adapter(out, tensors, sdt, config, record, force=force)
        return ExportResult(out, len(mats), written, time.perf_counter() - started, left, errors)
    finally:
        ckpt.close()


def _left_out(terms: dict[str, Term], mats: dict[str, Term], manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The diff tensors a LoRA cannot hold, with their shapes and norms."""
    return [
        {"tensor": n, "shape": list(t.shape), "norm": _entry_norm(manifest["tensors"].get(n) or {})}
        for n, t in terms.items()
        if n not in mats
    ]


class _ArrayParts:
    """The encoder's ``write(part, start, values)`` into two flat arrays ``a`` (m x r) and ``b`` (r x n)."""

    def __init__(self, m: int, n: int, r: int, dtype: DType) -> None:
        self.parts = {"a": np.empty(m * r, dtype=dtype.storage), "b": np.empty(r * n, dtype=dtype.storage)}

    def __call__(self, part: str, start: int, values: np.ndarray) -> None:
        self.parts[part][start : start + values.size] = values


def _factorise(
    item: tuple[str, Term], *, rank: int, dtype: DType, chunk: int, fan_in_fan_out: bool
) -> tuple[str, np.ndarray, np.ndarray, Encoded]:
    """One matrix's diff as LoRA factors: (name, lora_A, lora_B, what the encoder measured)."""
    name, term = item
    m, n = term.shape
    read = term_reader(term, chunk, np.dtype(np.float32), F32)
    r = min(rank, m, n)
    sink = _ArrayParts(m, n, r, dtype)
    enc = lowrank(read, sink, (m, n), r, dtype, np.dtype(np.float32), name, chunk)  # error of the rounded factors
    big, small = sink.parts["a"].reshape(m, r), sink.parts["b"].reshape(r, n)
    if fan_in_fan_out and name.rsplit(".", 2)[-2] in CONV1D_MODULES:  # stored (in, out)
        lora_b, lora_a = small.T, big.T
    else:
        lora_b, lora_a = big, small
    return name, np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b), enc


def _adapter_tensors(done: list[tuple[str, np.ndarray, np.ndarray, Encoded]]) -> dict[str, np.ndarray]:
    """The adapter's tensors by PEFT name."""
    tensors: dict[str, np.ndarray] = {}
    for name, lora_a, lora_b, _ in done:
        module = PEFT_PREFIX + (lora_module(name) or "")
        tensors[module + ".lora_A.weight"] = lora_a
        tensors[module + ".lora_B.weight"] = lora_b
    return tensors


def _adapter_config(rank: int, mats: dict[str, Term], fan_in_fan_out: bool, manifest: dict[str, Any]) -> dict[str, Any]:
    """``adapter_config.json``: PEFT's settings for the exported matrices."""
    base = manifest.get("base") or {}
    # a matrix smaller than the rank keeps its full rank, and its alpha so that PEFT's scaling stays 1
    smaller = {(lora_module(n) or ""): min(rank, *mats[n].shape) for n in mats if min(mats[n].shape) < rank}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": sorted(lora_module(n) or "" for n in mats),
        "rank_pattern": smaller,
        "alpha_pattern": dict(smaller),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": base.get("repo_id") or base.get("ref"),
    }


def _export_record(
    ckpt: Checkpoint,
    manifest: dict[str, Any],
    rank: int,
    dtype: DType,
    errors: dict[str, float],
    left: list[dict[str, Any]],
) -> dict[str, Any]:
    """The adapter's provenance: its delta, rank and dtype, each matrix's error, and what was left out."""
    total2 = sum(_entry_norm(e) ** 2 for e in manifest["tensors"].values())
    left_sq = sum(float(e["norm"]) ** 2 for e in left)
    record = base_record("export-lora")
    record.update(
        {
            "delta": describe_input(ckpt),
            "rank": rank,
            "dtype": dtype.name,
            "relative_error": errors,
            "left_out": left,
            "left_out_share_of_squared_norm": left_sq / total2 if total2 else 0.0,
        }
    )
    return record


def _write_adapter(
    out: Path,
    tensors: dict[str, np.ndarray],
    dtype: DType,
    config: dict[str, Any],
    record: dict[str, Any],
    *,
    force: bool,
) -> int:
    """Write the adapter directory atomically; the tensor bytes written."""
    planned, offset = [], 0
    for key, arr in tensors.items():
        planned.append(PlannedTensor(key, dtype, arr.shape, offset))
        offset += arr.nbytes
    with atomic_directory(out, force=force) as tmp:
        with open(tmp / ADAPTER_WEIGHTS, "wb") as f:
            f.write(build_header(planned, {"format": "pt"}))
            for arr in tensors.values():
                f.write(arr.tobytes())
        write_json(tmp / ADAPTER_CONFIG, config)
        write_json(tmp / PROVENANCE, record)
    return offset
