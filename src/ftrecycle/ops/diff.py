"""Compute a diff vector ``finetuned - base`` and store it as a delta directory, dense or compressed."""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ftrecycle.codecs import (
    AUTO,
    Candidate,
    Compression,
    Encoded,
    PartSpec,
    Probe,
    auto,
    encode,
    layout,
    measure,
    needs_first_pass,
    parse_compression,
    part_name,
    resolve,
    state_bytes,
)
from ftrecycle.delta.manifest import PREFIX
from ftrecycle.delta.store import check_names
from ftrecycle.delta.write import DeltaWriter
from ftrecycle.dtypes import BY_NAME, DType
from ftrecycle.engine import RESERVE_BYTES, Buffers, Engine, _bytes_per_element, read_term
from ftrecycle.errors import ConfigError, MemoryBudgetError, NonFiniteError
from ftrecycle.io.checkpoint import Checkpoint, open_checkpoint
from ftrecycle.io.jsonfile import loads_json, read_bytes
from ftrecycle.io.output import ShardedWriter, check_output, parse_size
from ftrecycle.io.provenance import describe_input
from ftrecycle.io.safetensors_format import pwrite_all
from ftrecycle.ops._sources import SourceDiff, source_diff
from ftrecycle.ops.checks import check_provenance
from ftrecycle.options import DEFAULT_MAX_MEMORY, DiffOptions, Policies
from ftrecycle.pipeline import ProgressFn, WriteSettings, write_plan
from ftrecycle.plan import plan_diff
from ftrecycle.terms import OutTensor, Record, Term


@dataclass
class DiffResult:
    """What :func:`diff` wrote.

    Attributes:
        output: the new delta directory.
        bytes_written: tensor bytes written (compressed parts as stored).
        seconds: wall time.
        records: every tensor that was adapted or left alone while reading the diff, and why.
        provenance: the delta's full manifest (``ftrecycle-delta.json``).
    """

    output: Path
    bytes_written: int
    seconds: float
    records: list[Record] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)


def diff(
    base: str,
    finetuned: str,
    output: str | Path,
    *,
    options: DiffOptions | None = None,
    progress: ProgressFn | None = None,
    **keywords: Any,
) -> DiffResult:
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
        options: every option, as groups (:class:`ftrecycle.DiffOptions`); default: the defaults.
        progress: called with (bytes written, total bytes).
        **keywords: any field of ``options``' groups by name, overriding it: ``delta_dtype``
            (``float32`` by default, ``float64``, ``bfloat16`` or ``float16``), ``compress`` (store
            2-D tensors compressed: ``lowrank:rank=R``, ``lowrank:energy=E``, ``lowrank:ratio=X``,
            ``sparse:density=D``, ``sparse:ratio=X``, ``int8`` or ``sign``, see
            :mod:`ftrecycle.codecs`; 1-D tensors, and matrices the method would not make smaller,
            stay dense; or a size budget, ``auto:ratio=R`` / ``auto:bits=B``, each 2-D tensor's
            setting chosen by rate-distortion, see :mod:`ftrecycle.codecs.auto`), ``weights`` (with a
            budget: a JSON file of tensor name -> sensitivity, every 2-D tensor given one), and
            ``compute_dtype``, ``shard_size``, ``vocab``, ``on_missing``, ``max_memory``, ``threads``,
            ``force``, ``allow_nonfinite``, ``allow_pickle``, ``fsync``, ``ignore_provenance`` as in
            :func:`ftrecycle.transfer`.

    Returns:
        What was written.

    Raises:
        ConfigError: as :func:`ftrecycle.transfer`; a budget below what the smallest settings take; a
            ``weights`` file without a budget, or not an object of non-negative numbers naming every
            2-D tensor of the diff and nothing else.
        FtRecycleError: otherwise as :func:`ftrecycle.transfer`.
    """
    started = time.perf_counter()
    opts = DiffOptions.merged(options, keywords)
    settings = WriteSettings.of(opts.precision, opts.resources, opts.output)
    out = Path(output).expanduser()
    with contextlib.ExitStack() as stack:
        return _diff(stack, (base, finetuned), out, opts, settings, progress, started)


def _diff(
    stack: contextlib.ExitStack,
    refs: tuple[str, str],
    out: Path,
    opts: DiffOptions,
    settings: WriteSettings,
    progress: ProgressFn | None,
    started: float,
) -> DiffResult:
    """Open the models (kept open by ``stack``), plan the stored layout and write the delta."""
    base, finetuned = refs
    # the indexes count toward --max-memory (as in transfer); the encoders and buffers get the rest
    a = stack.enter_context(
        open_checkpoint(base, allow_pickle=opts.inputs.allow_pickle, max_metadata_bytes=settings.max_memory)
    )
    src = source_diff(
        stack,
        a,
        finetuned,
        roles=("base", "fine-tuned"),
        others={},
        policies=opts.policies,
        allow_pickle=opts.inputs.allow_pickle,
        meta_left=settings.max_memory - a.metadata_bytes,
    )
    if not opts.checks.ignore_provenance:
        check_provenance(a, finetuned, src.model)
    check_names([*src.terms, *src.aliases], a.path)
    out = check_output(out, [a.path, *src.paths, *refs, opts.storage.weights], force=settings.force)
    settings = replace(settings, max_memory=src.meta_left)
    job = _DeltaJob.planned(a, src, opts, settings, progress)
    written = write_plan(
        job.stored,
        out,
        settings=settings,
        prefix=PREFIX,
        progress=progress,
        finish=partial(job.finish, out=out),
        extra=job.compress,
    )
    return DiffResult(out, written, time.perf_counter() - started, src.records, job.manifest)


@dataclass
class _DeltaJob:
    """One delta being written: its stored layout, what compressing it finds, then its manifest.

    Attributes:
        base: the opened base model.
        source: the diff and its source.
        spec: the compression (None: dense).
        dtype: the delta's dtype.
        settings: the run's settings.
        policies: recorded in the manifest.
        tensors: the diff's tensors as the plan has them (dense).
        packed: compressed tensors -> their parts' dtypes and shapes.
        specs: compressed tensors -> their own setting (the spec, or what its first pass resolved it to).
        progress: called with (bytes written, total bytes).
        writer: the delta's manifest, completed as the tensors are encoded and the shards written.
    """

    base: Checkpoint
    source: SourceDiff
    spec: Compression | None
    dtype: DType
    settings: WriteSettings
    policies: Policies
    tensors: list[OutTensor]
    packed: dict[str, dict[str, PartSpec]]
    specs: dict[str, Compression]
    progress: ProgressFn | None
    writer: DeltaWriter

    @classmethod
    def planned(
        cls,
        base: Checkpoint,
        source: SourceDiff,
        opts: DiffOptions,
        settings: WriteSettings,
        progress: ProgressFn | None,
    ) -> _DeltaJob:
        """The job's layout: which tensors are compressed, into which parts."""
        spec = parse_compression(opts.storage.compress)
        ddt = BY_NAME[opts.storage.delta_dtype]
        plan = plan_diff(source.terms, ddt)
        chunk = settings.engine(0, None).chunk
        weights, weights_file = _weights(opts.storage.weights, spec, source)
        specs = _resolved(spec, source.terms, ddt, settings, chunk, weights) if spec else {}
        packed = _packed(specs, plan.tensors, ddt)
        specs = {name: specs[name] for name in packed}
        writer = DeltaWriter.start(
            plan.tensors,
            packed,
            spec=spec,
            specs=specs,
            dtype=ddt,
            compute_dtype=settings.compute_dtype,
            inputs={"base": describe_input(base), "finetuned": source.finetuned},
            base_config=base.config,
            aliases=source.aliases,
            policies={"vocab": opts.policies.vocab, "on_missing": opts.policies.on_missing},
            records=list(source.records),
            files=source.files,
            threads=settings.threads,
        )
        if spec is not None and spec.method == AUTO:
            writer.manifest["compression"].update(_budget_record(spec, plan.tensors, packed, ddt))
        if weights_file is not None:  # the budget's allocation depends on the file: its provenance
            writer.manifest["compression"]["weights"] = weights_file
        return cls(base, source, spec, ddt, settings, opts.policies, plan.tensors, packed, specs, progress, writer)

    @property
    def stored(self) -> list[OutTensor]:
        """What the shards hold: dense tensors, and the (engine-less) parts of compressed ones."""
        return self.writer.stored

    @property
    def manifest(self) -> dict[str, Any]:
        """The delta's manifest (complete once :meth:`finish` ran)."""
        return self.writer.manifest

    def compress(self, writer: ShardedWriter, engine: Engine) -> None:
        """Encode the compressed tensors into their parts' slots, in parallel within the memory budget."""
        if self.spec is None or not self.packed:
            return
        terms = self.source.terms
        needs, budget = _needs(
            {n: (self.specs[n], terms[n].shape, self.packed[n]) for n in self.packed}, self.settings, engine.chunk
        )
        total = sum(o.nbytes for o in self.stored)
        one = partial(self._encode, writer, engine.chunk, _Budget(budget), needs, total)
        # largest first, so that small tensors fill the gaps beside them
        names = sorted(self.packed, key=lambda n: -needs[n])
        with ThreadPoolExecutor(self.settings.threads) as pool:
            for name, found in pool.map(one, names):
                self.writer.compressed(name, found)

    def _encode(
        self,
        writer: ShardedWriter,
        chunk: int,
        shared: _Budget,
        needs: dict[str, int],
        total: int,
        name: str,
    ) -> tuple[str, dict[str, Any]]:
        """Encode tensor ``name`` once its memory estimate fits in ``shared``."""
        with shared.hold(needs[name]):
            parts = self.packed[name]
            compute = self.settings.compute_dtype
            term = self.source.terms[name]
            info = _compress_one(self.specs[name], term, parts, writer, self.dtype, compute, chunk)
            if self.progress is not None:
                self.progress(sum(math.prod(s) * d.itemsize for d, s in parts.values()), total)
        return name, info

    def finish(self, tmp: Path, *, out: Path) -> None:
        """Write the manifest, the card and the fine-tuned model's files into the delta's temporary directory."""
        self.writer.finish(tmp, out, self.settings.record_paths)


def _packed(specs: dict[str, Compression], tensors: list[OutTensor], ddt: DType) -> dict[str, dict[str, PartSpec]]:
    """The tensors stored compressed (those with a setting whose layout is smaller than dense), and
    their parts' dtypes and shapes."""
    packed: dict[str, dict[str, PartSpec]] = {}
    for t in tensors:
        spec = specs.get(t.name)
        parts = layout(spec, t.shape, ddt) if spec is not None else {}
        if parts:
            packed[t.name] = parts
    return packed


def _budget_record(
    spec: Compression, tensors: list[OutTensor], packed: dict[str, dict[str, PartSpec]], ddt: DType
) -> dict[str, int]:
    """What a budget allowed and what its 2-D tensors take as laid out (their parts, or dense):
    ``budget_bytes`` and ``matrix_bytes`` (the file-level ``ratio`` also counts the 1-D tensors)."""
    mats = [t for t in tensors if len(t.shape) == 2 and 0 not in t.shape]
    used = sum(
        sum(d.itemsize * math.prod(s) for d, s in packed[t.name].values())
        if t.name in packed
        else math.prod(t.shape) * ddt.itemsize
        for t in mats
    )
    budget = auto.budget_bytes(spec, [(t.shape[0], t.shape[1]) for t in mats], ddt.itemsize)
    return {"budget_bytes": budget, "matrix_bytes": used}


def _reader_bytes(chunk: int, compute: DType) -> int:
    return chunk * (_bytes_per_element(compute) + 2 * compute.itemsize)


#: The row block every encoder and first pass reads (``Job.block``, ``Probe.block``): fixed, not the
#: engine's chunk (which follows --max-memory and --threads), so that the stored parts depend on the
#: diff alone (a randomized SVD sums over row blocks; the reader still reads ``chunk`` at a time)
ENCODE_BLOCK = 1 << 18


def _needs(
    tensors: dict[str, tuple[Compression, tuple[int, ...], dict[str, PartSpec]]],
    settings: WriteSettings,
    chunk: int,
) -> tuple[dict[str, int], int]:
    """Each tensor's encoder memory (reader buffers included), and the budget they share.

    Raises:
        MemoryBudgetError: one tensor's encoder alone does not fit.
    """
    budget = settings.max_memory - RESERVE_BYTES
    it = settings.compute_dtype.itemsize
    needs = {}
    for name, (spec, shape, parts) in tensors.items():
        needs[name] = _reader_bytes(chunk, settings.compute_dtype) + state_bytes(
            spec.method, parts, (shape[0], shape[1]), it, max(ENCODE_BLOCK, shape[1])
        )
    worst = max(needs, key=lambda n: needs[n])
    if needs[worst] > budget:
        spec = tensors[worst][0]
        raise MemoryBudgetError(
            f"compressing tensor {worst!r} ({spec}) needs about {math.ceil(needs[worst] / 2**20)} MiB but "
            f"--max-memory leaves {max(budget, 0) // 2**20} MiB; raise --max-memory"
            + (" or lower the rank" if "a" in tensors[worst][2] else "")
            + (" or cap its vectors (mpsvd:...,rank=K)" if "widths" in tensors[worst][2] else "")
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


def term_reader(term: Term, chunk: int, ct: np.dtype, compute: DType) -> Callable[[int, int], np.ndarray]:
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
    compute: DType,
    chunk: int,
) -> dict[str, Any]:
    """Encode one tensor's diff into its parts' slots; what the encoder measured, for the manifest.

    Raises:
        NonFiniteError: the diff holds NaN or infinity.
    """
    ct = np.dtype(compute.storage)
    read = term_reader(term, chunk, ct, compute)

    def write(part: str, start: int, values: np.ndarray) -> None:
        pdt = parts[part][0]
        slot = writer.slots[part_name(term.name, part)]
        data = np.ascontiguousarray(values, dtype=pdt.storage)
        pwrite_all(slot.fd, data.view(np.uint8).data, slot.offset + start * pdt.itemsize)

    m, n = term.shape
    try:
        with np.errstate(all="ignore"):  # a NaN in the diff is reported below, not warned about on stderr
            found = encode(spec, read, write, term.name, (m, n), ddt, ct, ENCODE_BLOCK)
    except NonFiniteError:
        found = Encoded(math.nan, math.nan)
    if not math.isfinite(found.norm) or not math.isfinite(found.error):
        raise NonFiniteError(f"tensor {term.name!r}: the diff holds NaN or infinity; check the inputs")
    info: dict[str, Any] = {"norm": found.norm, "error": found.error}
    if found.rank is not None:
        info["rank"] = found.rank
    if found.kept is not None:
        info["kept"] = found.kept
        info["density"] = found.kept / (m * n)
    return info


def _weights(
    path: str | None, spec: Compression | None, source: SourceDiff
) -> tuple[dict[str, float] | None, dict[str, Any] | None]:
    """The ``--weights`` file's weight of each 2-D tensor, and what the manifest records of the
    file (its path and SHA-256); (None, None) without a file.

    Raises:
        ConfigError: a file without a budget (``--compress auto:...``), or a file that is not a JSON
            object of tensor name -> non-negative finite number covering every 2-D tensor of the diff
            (see :mod:`ftrecycle.codecs.auto`); a huge or deeply nested file is refused unread or unparsed.
    """
    if path is None:
        return None, None
    if spec is None or spec.method != AUTO:
        raise ConfigError("--weights applies to a size budget: give --compress auto:ratio=R or auto:bits=B")
    fix = "give --weights a JSON object of tensor name -> non-negative number"
    file = Path(path).expanduser()
    raw = read_bytes(file, what="weights file", max_bytes=auto.MAX_WEIGHTS_BYTES, error=ConfigError)
    value = loads_json(raw, source=str(file), error=ConfigError, fix=fix)
    terms = source.terms.values()
    mats = [t.name for t in terms if _is_matrix(t)]
    others = [t.name for t in terms if not _is_matrix(t)] + list(source.aliases)
    record = {"file": str(file), "sha256": hashlib.sha256(raw).hexdigest()}
    return auto.check_weights(value, mats, others, path), record


#: ``--compress auto``: the row block its measurements read, and the memory its candidates must fit,
#: fixed so that what the budget chooses depends on the diff alone
AUTO_BLOCK = 1 << 16
AUTO_MEMORY = parse_size(DEFAULT_MAX_MEMORY)


def _is_matrix(t: Term) -> bool:
    return len(t.shape) == 2 and 0 not in t.shape


def _resolved(
    spec: Compression,
    terms: dict[str, Term],
    ddt: DType,
    settings: WriteSettings,
    chunk: int,
    weights: dict[str, float] | None = None,
) -> dict[str, Compression]:
    """Each 2-D tensor's own setting: ``spec``, what its codec's first pass resolves it to, or (a
    budget, ``auto``) what the allocation chose for it (one pass over the tensors, in parallel; a
    tensor left out is stored dense). ``weights``: each 2-D tensor's, for a budget (default 1)."""
    mats = [t for t in terms.values() if _is_matrix(t)]
    if not needs_first_pass(spec):
        return {t.name: spec for t in mats}
    ct = np.dtype(settings.compute_dtype.storage)
    share = (settings.max_memory - RESERVE_BYTES) // settings.threads - _reader_bytes(chunk, settings.compute_dtype)

    def probe(t: Term, block: int = ENCODE_BLOCK) -> Probe:
        read = term_reader(t, chunk, ct, settings.compute_dtype)
        return Probe(read, t.name, (t.shape[0], t.shape[1]), ddt, ct, block, max(0, share))

    def named(first: Callable[[Term], Any]) -> Callable[[Term], Any]:
        def run(t: Term) -> Any:
            try:
                with np.errstate(all="ignore"):
                    return first(t)
            except NonFiniteError:
                raise NonFiniteError(f"tensor {t.name!r}: the diff holds NaN or infinity; check the inputs") from None

        return run

    with ThreadPoolExecutor(settings.threads) as pool:
        if spec.method == AUTO:
            # measured in fixed row blocks, among the settings that fit the default budget: the choice
            # depends on the diff alone, never on --max-memory, --threads or the engine's chunk
            table = list(pool.map(named(lambda t: _encodable(measure(probe(t, AUTO_BLOCK)), t, ddt, settings)), mats))
            return _allocated(spec, mats, table, ddt, weights)
        found = pool.map(named(lambda t: (t.name, resolve(spec, probe(t)))), mats)
        return {name: r for name, r in found if r is not None}


def _encodable(cands: list[Candidate], t: Term, ddt: DType, settings: WriteSettings) -> list[Candidate]:
    """The candidates whose encoder fits the default ``--max-memory`` on the whole tensor, dense always
    among them. A fixed budget, not the run's: with a smaller ``--max-memory`` the one chosen may not
    fit, and :func:`_needs` then refuses (raise --max-memory) rather than the choice changing."""
    budget = AUTO_MEMORY - RESERVE_BYTES - _reader_bytes(AUTO_BLOCK, settings.compute_dtype)
    shape = (t.shape[0], t.shape[1])
    it = settings.compute_dtype.itemsize

    def fits(c: Compression) -> bool:
        parts = layout(c, shape, ddt)
        return state_bytes(c.method, parts, shape, it, max(AUTO_BLOCK, shape[1])) <= budget

    return [c for c in cands if c.spec is None or fits(c.spec)]


def _allocated(
    spec: Compression, mats: list[Term], table: list[list[Candidate]], ddt: DType, weights: dict[str, float] | None
) -> dict[str, Compression]:
    """The setting the budget gives each 2-D tensor (those left dense omitted).

    Raises:
        ConfigError: the budget is below what the smallest settings take.
    """
    budget = auto.budget_bytes(spec, [(t.shape[0], t.shape[1]) for t in mats], ddt.itemsize)
    w = [1.0 if weights is None else weights[t.name] for t in mats]
    try:
        pick = auto.allocate(table, w, budget)
    except ConfigError as e:
        raise ConfigError(f"--compress {spec}: {e}") from e
    chosen = {t.name: table[i][pick[i]].spec for i, t in enumerate(mats)}
    return {name: c for name, c in chosen.items() if c is not None}
