"""Compute a diff vector ``finetuned - base`` and store it as a delta directory, dense or compressed."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ftrecycle.arch import check_compatible
from ftrecycle.codecs import (
    Compression,
    PartSpec,
    encode,
    energy_rank,
    layout,
    parse_compression,
    part_name,
    state_bytes,
)
from ftrecycle.delta.manifest import PREFIX
from ftrecycle.delta.store import check_names
from ftrecycle.delta.write import DeltaWriter
from ftrecycle.dtypes import DType, parse_dtype
from ftrecycle.engine import Buffers, Engine, read_term
from ftrecycle.errors import MemoryBudgetError, NonFiniteError
from ftrecycle.io.checkpoint import open_checkpoint
from ftrecycle.io.output import ShardedWriter, check_output
from ftrecycle.io.provenance import describe_input
from ftrecycle.io.safetensors_format import pwrite_all
from ftrecycle.ops.transfer import TransferResult
from ftrecycle.pipeline import DEFAULT_MAX_MEMORY, DEFAULT_SHARD_SIZE, ProgressFn, WriteSettings, write_plan
from ftrecycle.plan import MissingPolicy, Term, VocabPolicy, plan_diff, source_terms


def diff(
    base: str,
    finetuned: str,
    output: str | Path,
    *,
    delta_dtype: str = "float32",
    compress: str | Compression | None = None,
    compute_dtype: str = "float32",
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    vocab: VocabPolicy = "error",
    on_missing: MissingPolicy = "error",
    max_memory: str | int = DEFAULT_MAX_MEMORY,
    threads: int | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    allow_pickle: bool = False,
    fsync: bool = False,
    progress: ProgressFn | None = None,
) -> TransferResult:
    """Write the diff vector ``finetuned - base`` as a delta directory.

    Each floating tensor is ``cast(fl(B) - fl(A))`` in ``compute_dtype``, stored in
    ``delta_dtype``. With a float32 delta of a bf16/fp16 pair, applying it to ``base``
    gives back ``finetuned`` bit for bit (float32 models need a float64 delta and compute).
    Tied embeddings are stored once and listed as aliases in the manifest.

    Args:
        base: the base model (directory or hub id).
        finetuned: the fine-tuned model, or a PEFT LoRA adapter over ``base`` (its merged update
            is the diff, computed tensor by tensor).
        output: delta directory to create.
        delta_dtype: ``float32`` (default), ``float64``, ``bfloat16`` or ``float16``.
        compress: store 2-D tensors compressed: ``lowrank:rank=R``, ``lowrank:energy=E``,
            ``lowrank:ratio=X``, ``sparse:density=D``, ``sparse:ratio=X``, ``int8`` or ``sign``
            (see :mod:`ftrecycle.codecs`); 1-D tensors, and matrices the method would not
            make smaller, stay dense.
        Others: as :func:`ftrecycle.ops.transfer`.

    Returns:
        What was written.

    Raises:
        As :func:`ftrecycle.ops.transfer`.
    """
    from ftrecycle.delta.adapter import adapter_terms, is_adapter

    t0 = time.perf_counter()
    settings = WriteSettings.parse(
        compute_dtype=compute_dtype,
        max_memory=max_memory,
        shard_size=shard_size,
        threads=threads,
        allow_nonfinite=allow_nonfinite,
        fsync=fsync,
    )
    ddt = parse_dtype(delta_dtype, flag="--delta-dtype")
    spec = parse_compression(compress)
    out = Path(output).expanduser()
    with contextlib.ExitStack() as stack:
        # the indexes count toward --max-memory (as in transfer); the encoders and buffers get the rest
        meta = settings.max_memory
        a = stack.enter_context(open_checkpoint(base, allow_pickle=allow_pickle, max_metadata_bytes=meta))
        meta -= a.metadata_bytes
        if is_adapter(finetuned):
            terms, aliases, records, fin_desc, fin_files = adapter_terms(a, finetuned)
        else:
            b = stack.enter_context(open_checkpoint(finetuned, allow_pickle=allow_pickle, max_metadata_bytes=meta))
            meta -= b.metadata_bytes
            check_compatible({"base": a.config, "fine-tuned": b.config})
            terms, aliases, records = source_terms(a, b, vocab=vocab, on_missing=on_missing)
            fin_desc, fin_files = describe_input(b), b.path
        adapter = [Path(finetuned).expanduser()] if is_adapter(finetuned) else []
        check_names([*terms, *aliases], a.path)
        out = check_output(out, [a.path, fin_files, *adapter, base, finetuned], force=force)
        settings = replace(settings, max_memory=meta)
        plan = plan_diff(terms, ddt)
        engine = settings.engine(0, None)
        ranks = _energy_ranks(spec, terms, ddt, settings, engine.chunk) if spec and spec.energy else {}
        packed: dict[str, dict[str, PartSpec]] = {}
        if spec is not None:
            for t in plan.tensors:
                if spec.energy is not None and t.name not in ranks:
                    continue  # no rank smaller than dense keeps the energy
                parts = layout(spec, t.shape, ddt, rank=ranks.get(t.name))
                if parts:
                    packed[t.name] = parts
        delta = DeltaWriter.start(
            plan.tensors,
            packed,
            spec=spec,
            dtype=ddt,
            compute_dtype=settings.compute_dtype,
            inputs={"base": describe_input(a), "finetuned": fin_desc},
            base_config=a.config,
            aliases=aliases,
            policies={"vocab": vocab, "on_missing": on_missing},
            records=records,
            files=fin_files,
            threads=settings.threads,
        )
        stored, manifest = delta.stored, delta.manifest

        def compress_all(writer: ShardedWriter, eng: Engine) -> None:
            if spec is None or not packed:
                return
            total = sum(o.nbytes for o in stored)
            jobs = [terms[name] for name in packed]
            ct = np.dtype(settings.compute_dtype.storage)

            def one(term: Term) -> None:
                found = _compress_one(spec, term, packed[term.name], writer, ddt, ct, eng.chunk, ranks.get(term.name))
                delta.compressed(term.name, found)
                if progress is not None:
                    progress(sum(math.prod(s) * d.itemsize for d, s in packed[term.name].values()), total)

            needs, budget = _needs(spec, {n: (terms[n].shape, packed[n]) for n in packed}, settings, eng.chunk)
            shared = _Budget(budget)

            def held(term: Term) -> None:
                with shared.hold(needs[term.name]):
                    one(term)

            # largest first, so that small tensors fill the gaps beside them
            jobs.sort(key=lambda t: -needs[t.name])
            with ThreadPoolExecutor(settings.threads) as pool:
                list(pool.map(held, jobs))

        written = write_plan(
            stored,
            out,
            settings=settings,
            prefix=PREFIX,
            force=force,
            progress=progress,
            finish=delta.finish,
            extra=compress_all,
        )
    return TransferResult(out, written, time.perf_counter() - t0, records, manifest)


def _reader_bytes(chunk: int, compute: DType) -> int:
    from ftrecycle.engine import _bytes_per_element

    return chunk * (_bytes_per_element(compute) + 2 * compute.itemsize)


def _needs(
    spec: Compression,
    tensors: dict[str, tuple[tuple[int, ...], dict[str, PartSpec]]],
    settings: WriteSettings,
    chunk: int,
) -> tuple[dict[str, int], int]:
    """Each tensor's encoder memory (reader buffers included), and the budget they share.

    Raises:
        MemoryBudgetError: one tensor's encoder alone does not fit.
    """
    from ftrecycle.engine import RESERVE_BYTES

    budget = settings.max_memory - RESERVE_BYTES
    it = settings.compute_dtype.itemsize
    needs = {}
    for name, (shape, parts) in tensors.items():
        rank = parts["a"][1][1] if "a" in parts else 0
        needs[name] = _reader_bytes(chunk, settings.compute_dtype) + state_bytes(
            spec.method, (shape[0], shape[1]), rank, it, max(chunk, shape[1])
        )
    worst = max(needs, key=lambda n: needs[n])
    if needs[worst] > budget:
        raise MemoryBudgetError(
            f"compressing tensor {worst!r} ({spec}) needs about {math.ceil(needs[worst] / 2**20)} MiB but "
            f"--max-memory leaves {max(budget, 0) // 2**20} MiB; raise --max-memory"
            + (" or lower the rank" if spec.method == "lowrank" else "")
        )
    return needs, budget


class _Budget:
    """Bytes shared by the encoder threads: a thread waits until its tensor's estimate fits."""

    def __init__(self, total: int) -> None:
        self.free = total
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, n: int) -> Iterator[None]:
        with self.cond:
            self.cond.wait_for(lambda: self.free >= n)
            self.free -= n
        try:
            yield
        finally:
            with self.cond:
                self.free += n
                self.cond.notify_all()


def _reader(term: Term, chunk: int, ct: np.dtype, compute: DType) -> Any:
    """``read(start, count)``: elements of the dense diff in the compute dtype, ``chunk`` at a time."""
    bufs = Buffers(chunk, compute)

    def read(start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=ct)
        for s in range(0, count, chunk):
            n = min(chunk, count - s)
            read_term(term, start + s, n, out[s : s + n], bufs)
        return out

    return read


def _compress_one(
    spec: Compression,
    term: Term,
    parts: dict[str, PartSpec],
    writer: ShardedWriter,
    ddt: DType,
    ct: np.dtype,
    chunk: int,
    rank: int | None,
) -> dict[str, Any]:
    compute = parse_dtype(ct.name, allowed=("float32", "float64"))
    read = _reader(term, chunk, ct, compute)

    def write(part: str, start: int, values: np.ndarray) -> None:
        pdt = parts[part][0]
        slot = writer.slots[part_name(term.name, part)]
        data = np.ascontiguousarray(values, dtype=pdt.storage)
        pwrite_all(slot.fd, data.view(np.uint8).data, slot.offset + start * pdt.itemsize)

    m, n = term.shape
    found = encode(spec, read, write, term.name, (m, n), ddt, ct, chunk, rank=rank)
    if not math.isfinite(found.norm) or not math.isfinite(found.error):
        raise NonFiniteError(f"tensor {term.name!r}: the diff holds NaN or infinity; check the inputs")
    info: dict[str, Any] = {"norm": found.norm, "error": found.error}
    if found.rank is not None:
        info["rank"] = found.rank
    if found.kept is not None:
        info["kept"] = found.kept
        info["density"] = found.kept / (m * n)
    return info


def _energy_ranks(
    spec: Compression, terms: dict[str, Term], ddt: DType, settings: WriteSettings, chunk: int
) -> dict[str, int]:
    """The rank each 2-D tensor needs for ``lowrank:energy`` (a first pass; absent: store dense)."""
    assert spec.energy is not None
    ct = np.dtype(settings.compute_dtype.storage)
    mats = [t for t in terms.values() if len(t.shape) == 2 and 0 not in t.shape]

    from ftrecycle.engine import RESERVE_BYTES

    share = (settings.max_memory - RESERVE_BYTES) // settings.threads - _reader_bytes(chunk, settings.compute_dtype)
    it = settings.compute_dtype.itemsize

    def one(t: Term) -> tuple[str, int | None]:
        m, n = t.shape
        max_k = max(0, share - 4 * max(chunk, n) * it - 16 * max(chunk, n)) // ((4 * m + 4 * n) * it)
        read = _reader(t, chunk, ct, settings.compute_dtype)
        return t.name, energy_rank(read, (m, n), spec.energy or 1.0, ddt, ct, t.name, chunk, max_k)

    with ThreadPoolExecutor(settings.threads) as pool:
        return {name: r for name, r in pool.map(one, mats) if r is not None}
