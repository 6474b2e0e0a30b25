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
from pathlib import Path
from typing import Any

import numpy as np

from ftrecycle.arch import CONV1D_MODULES, NOT_LINEAR
from ftrecycle.codecs import Encoded
from ftrecycle.delta.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX
from ftrecycle.dtypes import DType, parse_dtype
from ftrecycle.errors import ConfigError
from ftrecycle.pipeline import DEFAULT_MAX_MEMORY
from ftrecycle.plan import Term


@dataclass
class ExportResult:
    """What :func:`export_lora` wrote."""

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

    Raises:
        ConfigError: a bad rank or dtype.
        CheckpointError: not a delta directory, or a corrupt one.
        OutputError: the output exists (without ``force``) or overlaps the delta.
    """
    from ftrecycle.codecs.lowrank import factors as lowrank
    from ftrecycle.delta.store import open_delta
    from ftrecycle.engine import chunk_for_budget, default_threads
    from ftrecycle.io.output import atomic_directory, check_output, parse_size, write_json
    from ftrecycle.io.provenance import base_record, describe_input
    from ftrecycle.io.safetensors_format import PlannedTensor, build_header
    from ftrecycle.ops.diff import _reader

    t0 = time.perf_counter()
    if rank < 1:
        raise ConfigError(f"--rank must be a positive integer, got {rank}")
    sdt: DType = parse_dtype(dtype, flag="--dtype")
    workers = threads or default_threads()
    out = Path(output).expanduser()
    ckpt, manifest, terms, _ = open_delta(delta, threads=workers)
    try:
        out = check_output(out, [ckpt.path, delta], force=force)
        ct = np.dtype(np.float32)
        compute = parse_dtype("float32")
        chunk = chunk_for_budget(parse_size(max_memory, flag="--max-memory"), workers, compute)
        fan_in_fan_out = (manifest.get("base_config") or {}).get("model_type") == "gpt2"
        mats = {n: t for n, t in terms.items() if len(t.shape) == 2 and lora_module(n)}
        left: list[dict[str, Any]] = []
        for n, t in terms.items():
            if n not in mats:
                left.append(
                    {"tensor": n, "shape": list(t.shape), "norm": _entry_norm(manifest["tensors"].get(n) or {})}
                )

        def one(item: tuple[str, Term]) -> tuple[str, np.ndarray, np.ndarray, Encoded]:
            name, term = item
            m, n = term.shape
            read = _reader(term, chunk, ct, compute)
            r = min(rank, m, n)
            parts = {"a": np.empty(m * r, dtype=sdt.storage), "b": np.empty(r * n, dtype=sdt.storage)}

            def write(part: str, start: int, values: np.ndarray) -> None:
                parts[part][start : start + values.size] = values

            enc = lowrank(read, write, (m, n), r, sdt, ct, name, chunk)  # error measured on the rounded factors
            big, small = parts["a"].reshape(m, r), parts["b"].reshape(r, n)
            if fan_in_fan_out and name.rsplit(".", 2)[-2] in CONV1D_MODULES:  # stored (in, out)
                lora_b, lora_a = small.T, big.T
            else:
                lora_b, lora_a = big, small
            return name, np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b), enc

        with ThreadPoolExecutor(workers) as pool:
            done = list(pool.map(one, sorted(mats.items())))
        tensors: dict[str, np.ndarray] = {}
        errors: dict[str, float] = {}
        for name, lora_a, lora_b, enc in done:
            module = PEFT_PREFIX + (lora_module(name) or "")
            tensors[module + ".lora_A.weight"] = lora_a
            tensors[module + ".lora_B.weight"] = lora_b
            errors[name] = enc.error
        planned, offset = [], 0
        for key, arr in tensors.items():
            planned.append(PlannedTensor(key, sdt, arr.shape, offset))
            offset += arr.nbytes
        base_ref = (manifest.get("base") or {}).get("repo_id") or (manifest.get("base") or {}).get("ref")
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": rank,
            "lora_alpha": rank,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": fan_in_fan_out,
            "target_modules": sorted(lora_module(n) or "" for n in mats),
            "rank_pattern": {
                (lora_module(n) or ""): min(rank, *mats[n].shape) for n in mats if min(mats[n].shape) < rank
            },
            "alpha_pattern": {
                (lora_module(n) or ""): min(rank, *mats[n].shape) for n in mats if min(mats[n].shape) < rank
            },
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "base_model_name_or_path": base_ref,
        }
        total2 = sum(_entry_norm(e) ** 2 for e in manifest["tensors"].values())
        left_sq = sum(float(e["norm"]) ** 2 for e in left)
        record = base_record("export-lora")
        record.update(
            {
                "delta": describe_input(ckpt),
                "rank": rank,
                "dtype": sdt.name,
                "relative_error": errors,
                "left_out": left,
                "left_out_share_of_squared_norm": left_sq / total2 if total2 else 0.0,
            }
        )
        with atomic_directory(out, force=force) as tmp:
            with open(tmp / ADAPTER_WEIGHTS, "wb") as f:
                f.write(build_header(planned, {"format": "pt"}))
                for arr in tensors.values():
                    f.write(arr.tobytes())
            write_json(tmp / ADAPTER_CONFIG, config)
            write_json(tmp / "ftrecycle.json", record)
        return ExportResult(out, len(mats), offset, time.perf_counter() - t0, left, errors)
    finally:
        ckpt.close()
