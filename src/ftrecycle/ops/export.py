"""Export a delta as a PEFT LoRA adapter.

:func:`export_lora` factorises a delta's matrices at a rank and writes a PEFT
adapter (``adapter_config.json`` + ``adapter_model.safetensors``) that
``peft.PeftModel.from_pretrained(target, ADAPTER)`` loads, so ``target + delta`` can be
served as an adapter.

A LoRA holds only linear layers' updates. Embeddings, the output head and norms can ride along
as PEFT ``modules_to_save``: PEFT stores such a module's *whole* weight and loads it in place of
the base's, so for a transfer the stored weight must be the new base's plus the diff (``C + Δ``),
which is why carrying them needs the target base (``target_base``).
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
from ftrecycle.dtypes import F32, DType, from_storage, parse_dtype, to_storage
from ftrecycle.engine import chunk_for_budget, default_threads
from ftrecycle.errors import ConfigError, IncompatibleModelsError
from ftrecycle.io.card import Card, command_line, hub_id, peft_snippet, write_card
from ftrecycle.io.checkpoint import Checkpoint, open_checkpoint
from ftrecycle.io.output import atomic_directory, check_output, parse_size, write_json
from ftrecycle.io.provenance import (
    PROVENANCE,
    RecordPaths,
    base_record,
    check_record_paths,
    describe_input,
    moved_path,
    portable,
)
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
        left_out: the diff tensors the adapter does not hold, with their shapes and norms.
        errors: each exported matrix's relative error (Frobenius) at the rank.
        left_out_share: the share of the diff's squared norm in ``left_out`` (0 to 1).
        carried: the modules stored whole (``C + Δ``) as PEFT ``modules_to_save``.
        base_model: the adapter's ``base_model_name_or_path``.
        warnings: what the user should know before serving the adapter (the CLI prints them).
    """

    output: Path
    modules: int
    bytes_written: int
    seconds: float
    left_out: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)
    left_out_share: float = 0.0
    carried: list[str] = field(default_factory=list)
    base_model: str | None = None
    warnings: list[str] = field(default_factory=list)


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
    target_base: str | None = None,
    full_modules: bool = False,
    record_paths: RecordPaths = "relative",
) -> ExportResult:
    """Write a PEFT LoRA adapter approximating a delta's linear-layer updates at ``rank``.

    Each linear weight's diff ``D`` (out x in) becomes ``lora_B @ lora_A`` with
    ``lora_B = U_r S_r`` and ``lora_A = V_r^T`` (its best rank-``rank`` approximation;
    ``lora_alpha = rank``, so PEFT's scaling is 1). Diffs a LoRA cannot hold — embeddings,
    the output head, norms and biases — are left out and listed, with their share of the
    diff's squared norm, in the adapter's ``ftrecycle.json``; with ``full_modules`` the modules
    that hold no LoRA (embeddings, head, norms) are stored whole instead, as ``C + Δ``, and the
    adapted layers' bias diffs as ``lora_B.bias`` (PEFT's ``lora_bias``).

    Args:
        delta: the delta directory.
        output: the adapter directory to create.
        rank: the LoRA rank (matrices smaller than it keep their full rank).
        dtype: the adapter's dtype.
        threads: worker threads (default: available cores).
        max_memory: the readers' buffers' budget, e.g. ``"512MiB"``.
        force: replace an existing output.
        target_base: the new base C the adapter is for: its ``base_model_name_or_path`` (its hub id,
            else its path), so that PEFT's auto-loader builds C + LoRA. Without it the adapter names
            the delta's base A, as before, and a warning says so.
        full_modules: store the modules a LoRA cannot hold as PEFT ``modules_to_save`` (needs
            ``target_base``: their stored weight is C's plus the diff), and bias diffs in ``lora_B.bias``.
        record_paths: ``relative`` (default) or ``absolute``: how ftrecycle.json and the adapter
            config name local models (see :func:`ftrecycle.io.provenance.portable`).

    Returns:
        What was written.

    Raises:
        ConfigError: a bad rank or dtype, or ``full_modules`` without ``target_base``.
        CheckpointError: not a delta directory, or a corrupt one.
        IncompatibleModelsError: a carried module missing from ``target_base`` or of another shape.
        OutputError: the output exists (without ``force``) or overlaps the delta.
    """
    started = time.perf_counter()
    # a bool is an int to Python, and a float or a string rank failed later as a TypeError
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"--rank must be a positive integer, got {rank!r:.60}")
    sdt: DType = parse_dtype(dtype, flag="--dtype")
    check_record_paths(record_paths)
    if full_modules and target_base is None:
        raise ConfigError("--full-modules stores C + diff for embeddings, head and norms: it needs --target-base C")
    workers = threads or default_threads()
    out = Path(output).expanduser()
    ckpt, manifest, terms, _ = open_delta(delta, threads=workers)
    target = open_checkpoint(target_base) if target_base is not None else None
    try:
        out = check_output(out, [ckpt.path, delta, target.path if target else None], force=force)
        chunk = chunk_for_budget(parse_size(max_memory, flag="--max-memory"), workers, F32)
        settings = _Settings(rank, sdt, workers, chunk, full_modules, record_paths, force)
        return _export(ckpt, manifest, terms, target, out, settings, started)
    finally:
        ckpt.close()
        if target is not None:
            target.close()


@dataclass(frozen=True)
class _Settings:
    rank: int
    dtype: DType
    workers: int
    chunk: int
    full_modules: bool
    record_paths: RecordPaths
    force: bool


def _export(
    ckpt: Checkpoint,
    manifest: dict[str, Any],
    terms: dict[str, Term],
    target: Checkpoint | None,
    out: Path,
    s: _Settings,
    started: float,
) -> ExportResult:
    """Factorise, gather the modules stored whole, and write the adapter (see :func:`export_lora`)."""
    fan_in_fan_out = (manifest.get("base_config") or {}).get("model_type") == "gpt2"
    mats = {n: t for n, t in terms.items() if len(t.shape) == 2 and lora_module(n)}
    full = _full_modules(terms, mats, manifest, target, s.dtype, s.chunk) if s.full_modules and target else {}
    biases = _lora_biases(terms, mats, s.dtype, s.chunk, fan_in_fan_out) if s.full_modules else {}
    held = {*mats, *full, *(m + ".bias" for m in biases)}
    left = _left_out(terms, {n: t for n, t in terms.items() if n in held}, manifest)
    factorise = partial(_factorise, rank=s.rank, dtype=s.dtype, chunk=s.chunk, fan_in_fan_out=fan_in_fan_out)
    with ThreadPoolExecutor(s.workers) as pool:
        done = list(pool.map(factorise, sorted(mats.items())))
    tensors = {**_adapter_tensors(done), **{PEFT_PREFIX + n: v for n, v in sorted(full.items())}}
    tensors.update({PEFT_PREFIX + m + ".lora_B.bias": v for m, v in sorted(biases.items())})
    errors = {name: enc.error for name, _, _, enc in done}
    carried = sorted({_module_of(n) for n in full})
    base = _adapter_base(manifest, ckpt.path, target, out, s.record_paths)
    config = _adapter_config(s.rank, mats, fan_in_fan_out, base, carried)
    config["lora_bias"] = bool(biases)
    record = _export_record(ckpt, manifest, s.rank, s.dtype, errors, left)
    record.update(base_model_name_or_path=base, modules_to_save=carried)
    if target is not None:
        record["target_base"] = describe_input(target)
    notes = _warnings(record, target is not None, s.full_modules)
    record["warnings"] = notes
    written = _write_adapter(out, tensors, s.dtype, config, record, force=s.force, record_paths=s.record_paths)
    share = record["left_out_share_of_squared_norm"]
    seconds = time.perf_counter() - started
    return ExportResult(out, len(mats), written, seconds, left, errors, share, carried, base, notes)


def _module_of(tensor: str) -> str:
    """The module a parameter belongs to: ``model.norm.weight`` -> ``model.norm``."""
    return tensor.rsplit(".", 1)[0]


def _full_modules(
    terms: dict[str, Term],
    mats: dict[str, Term],
    manifest: dict[str, Any],
    target: Checkpoint,
    dtype: DType,
    chunk: int,
) -> dict[str, np.ndarray]:
    """The parameters of the modules a LoRA cannot hold, as ``C + Δ`` in the adapter's dtype.

    A module that holds a LoRA (a linear layer's bias) cannot also be a ``modules_to_save``; its
    bias stays left out. A tied alias (``lm_head`` sharing the embedding's diff) is stored too,
    with the values of the tensor it shares, since PEFT copies each saved module on its own.

    Raises:
        IncompatibleModelsError: a parameter missing from the target, or of another shape.
    """
    lora = {lora_module(n) for n in mats}
    aliases = {a: s for a, s in (manifest.get("aliases") or {}).items() if s in terms}
    names = [n for n in terms if n not in mats and _module_of(n) not in lora]
    # a target that ties the head to the embedding stores no lm_head, but PEFT wraps each module apart
    tied = bool(target.config.get("tie_word_embeddings"))
    names += [
        a for a, s in aliases.items() if s in names and (a in target.tensors or tied) and _module_of(a) not in lora
    ]
    found: dict[str, np.ndarray] = {}
    for name in names:
        term = terms[aliases.get(name, name)]
        info = target.tensors.get(name) or target.tensors.get(aliases.get(name, name))
        if info is None or tuple(info.shape) != tuple(term.shape):
            got = "missing" if info is None else f"of shape {list(info.shape)}"
            raise IncompatibleModelsError(
                f"{name}: the target base's tensor is {got}, the diff's has shape {list(term.shape)}; "
                "--full-modules cannot store C + diff for it: use `ftrecycle apply` (its --vocab policies) instead"
            )
        count = int(np.prod(term.shape, dtype=np.int64))
        raw = np.empty(count * info.dtype.itemsize, dtype=np.uint8)
        values = from_storage(target.read(info, 0, count, raw), info.dtype, np.dtype(np.float32))
        values = values + term_reader(term, chunk, np.dtype(np.float32), F32)(0, count)
        found[name] = to_storage(values.astype(np.float32), dtype).reshape(term.shape)
    return found


def _lora_biases(
    terms: dict[str, Term], mats: dict[str, Term], dtype: DType, chunk: int, fan_in_fan_out: bool
) -> dict[str, np.ndarray]:
    """The bias diffs of the LoRA'd layers, as PEFT's ``lora_B.bias`` (``lora_bias=True``), by module.

    With ``lora_bias`` PEFT gives every adapted layer's ``lora_B`` a bias, added to the layer's output
    (scaled by ``lora_alpha / r`` = 1 here): the diff of the layer's bias. A layer whose bias did not
    change (or that has none) gets zeros, so that no value is left to PEFT's initialisation. Empty when
    no adapted layer's bias changed: the adapter then stays a plain LoRA, which every server loads.
    """
    modules = {lora_module(n) or "": t for n, t in mats.items()}
    if not any(m + ".bias" in terms for m in modules):
        return {}
    found: dict[str, np.ndarray] = {}
    for module, weight in modules.items():
        # a Conv1D weight is stored (in, out); its bias, like a Linear's, has the output's length
        out_features = (
            weight.shape[1] if fan_in_fan_out and module.rsplit(".", 1)[-1] in CONV1D_MODULES else weight.shape[0]
        )
        term = terms.get(module + ".bias")
        values = np.zeros(out_features, dtype=np.float32)
        if term is not None:
            values = term_reader(term, chunk, np.dtype(np.float32), F32)(0, int(term.shape[0]))
        found[module] = to_storage(values, dtype)
    return found


def _adapter_base(
    manifest: dict[str, Any], delta: Path, target: Checkpoint | None, out: Path, record_paths: RecordPaths
) -> str | None:
    """The adapter's ``base_model_name_or_path``: the target's (else the delta base's) hub id, else its path.

    A delta's manifest names its base relative to the delta directory (or, outside its tree, as
    ``<local>/NAME``): such a path is made relative to the adapter instead.
    """
    if target is not None:
        described = describe_input(target)
        found = described["hub_id"] or described["path"]
    else:
        base = manifest.get("base") or {}
        found = base.get("hub_id") or base.get("repo_id") or base.get("path") or base.get("ref")
        if found and not hub_id(found):
            found = moved_path(str(found), delta)
    if found is None:
        return None
    if hub_id(str(found)):
        return str(found)
    # a local model: PEFT reads a relative base_model_name_or_path from the working directory, not from the
    # adapter's, so only its absolute path names it — and that is not written unless asked for
    return str(Path(str(found)).resolve()) if record_paths == "absolute" else None


def _warnings(record: dict[str, Any], has_target: bool, full_modules: bool) -> list[str]:
    """What the user should know: which base PEFT will load, and how much of the diff is left out."""
    notes = []
    if not has_target:
        notes.append(
            f"the adapter is made for the delta's base A ({record['base_model_name_or_path'] or 'a local model'}): "
            "PEFT's auto-loader would build A + LoRA; pass --target-base C to name the new base"
        )
    elif record["base_model_name_or_path"] is None:
        notes.append(
            "the new base is a local model, so the adapter's base_model_name_or_path is left empty (PEFT would read a "
            "relative path from your working directory): load it with PeftModel.from_pretrained on C loaded yourself, "
            "or pass --record-paths absolute to write C's absolute path"
        )
    share = float(record["left_out_share_of_squared_norm"])
    if share >= 0.01:
        fix = "" if full_modules else "; --full-modules (with --target-base) stores embeddings, head and norms too"
        notes.append(
            f"left out {len(record['left_out'])} tensors holding {100 * share:.1f} % of the diff's squared norm{fix}"
        )
    return notes


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


def _adapter_config(
    rank: int, mats: dict[str, Term], fan_in_fan_out: bool, base: str | None, carried: list[str]
) -> dict[str, Any]:
    """``adapter_config.json``: PEFT's settings for the exported matrices and the modules stored whole."""
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
        "modules_to_save": carried or None,
        "base_model_name_or_path": base,
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
    record_paths: RecordPaths,
) -> int:
    """Write the adapter directory atomically, with its provenance and card; the tensor bytes written."""
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
        published = portable(record, out, record_paths)
        write_json(tmp / PROVENANCE, published)
        write_card(tmp, adapter_card(published, config, out.name))
    return offset


def adapter_card(record: dict[str, Any], config: dict[str, Any], where: str) -> Card:
    """The card of an exported adapter: a PEFT LoRA on the model named by its config.

    Args:
        record: the adapter's provenance (as written).
        config: its ``adapter_config.json``.
        where: how the snippet names the adapter (its directory's name).

    Returns:
        The card.
    """
    target = record.get("target_base") or {}
    base = ((record.get("delta") or {}).get("manifest") or {}).get("base") or {}
    on = target or base
    errors = record["relative_error"].values()
    rows = [
        ("LoRA modules (rank {})".format(record["rank"]), str(len(config["target_modules"]))),
        ("largest relative error of a LoRA matrix", f"{max(errors, default=0.0):.3g}"),
        ("modules stored whole (C + diff)", str(len(record["modules_to_save"]))),
        ("tensors left out", str(len(record["left_out"]))),
        ("share of the diff's squared norm left out", f"{100 * record['left_out_share_of_squared_norm']:.2f} %"),
    ]
    delta = record.get("delta") or {}
    equivalent = ["ftrecycle", "export-lora", "--delta", str(delta.get("ref")), "--rank", str(record["rank"])]
    equivalent += ["-o", where, *(["--full-modules"] if record["modules_to_save"] else [])]
    if target:
        equivalent[4:4] = ["--target-base", str(target.get("hub_id") or target.get("ref"))]
    return Card(
        title=f"LoRA export of a diff vector (rank {record['rank']})",
        summary=(
            "A PEFT LoRA adapter written by ftrecycle export-lora: each linear layer's diff (fine-tuned minus base) "
            f"as its best rank-{record['rank']} approximation"
            + (
                ", made for a new base model (target_base in ftrecycle.json)"
                if target
                else ", for the delta's own base"
            )
            + ". Loaded on a base model it adds the fine-tune's update; what it leaves out is listed in "
            f"{PROVENANCE}."
        ),
        relation="adapter",
        base_models=tuple(b for b in (on.get("hub_id"),) if b),
        library_name="peft",
        tags=("lora", "task-vector", "export-lora"),
        license=on.get("license"),
        load=peft_snippet(on.get("hub_id") or config.get("base_model_name_or_path"), where),
        command=command_line(record, equivalent),
        table=(("adapter", "value"), rows),
        table_title="What it holds",
        notes=tuple(f"Warning: {w}" for w in record.get("warnings") or ()),
    )
