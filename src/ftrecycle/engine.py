"""Run a plan: stream every output tensor through fixed-size buffers on worker threads.

Each work item is one element range of one output tensor. A worker reads the
inputs' bytes for that range with positioned reads into its own buffers, widens
them to the compute dtype, does the arithmetic one rounded operation at a time,
narrows to the output dtype and writes the bytes at their final offset with a
positioned write. Items are independent, so threads need no ordering; NumPy
releases the GIL in its loops and the syscalls do too, so two cores are two
workers. Memory is the workers' buffers, whatever the model size.

Exactness: an ``add`` element is ``narrow(fl(fl(C) + fl(alpha * fl(B - A))))``, each
``fl`` a rounding to the compute dtype; the multiply is skipped when alpha is 1
(multiplying by 1 is exact), and no operation is fused, so the result is the same on
every machine. ``narrow`` rounds to nearest-even; from float64 to a 16-bit float it
goes through float32, as torch's conversions do. NaN narrows to the canonical
bfloat16 NaN 0x7FC0 (torch's scalar conversion; its vector path keeps other payloads).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, assert_never

import numpy as np
from threadpoolctl import threadpool_limits

from ftrecycle.codecs import decode
from ftrecycle.dtypes import BF16, F32, F64, DType, bf16_to_float32, float32_to_bf16
from ftrecycle.errors import MemoryBudgetError, NonFiniteError
from ftrecycle.io.output import ShardedWriter, Slot
from ftrecycle.io.safetensors_format import pwrite_all
from ftrecycle.terms import Add, Copy, Difference, Masked, MaskTally, OutTensor, PackedTerm, Piece, Stored, Sub, Term

#: Elements per work item: large enough to amortise Python overhead, small enough to stay in L2.
DEFAULT_CHUNK = 1 << 18
MIN_CHUNK = 1 << 12
#: What an operation may still grow by beyond the workers' buffers (allocator slack, headers, plan).
RESERVE_BYTES = 16 * 2**20
#: Raw byte buffers per worker (three inputs, one output, one scratch), each ``chunk * 8`` bytes.
RAW_BUFFERS = 5


@dataclass(frozen=True)
class Item:
    """One element range of one output tensor."""

    tensor: OutTensor
    slot: Slot
    piece: Piece
    start: int
    count: int


def current_rss() -> int:
    """Resident memory of this process in bytes (0 where /proc is not available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def default_threads() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _bytes_per_element(compute: DType) -> int:
    return RAW_BUFFERS * 8 + 3 * compute.itemsize + 4


def chunk_for_budget(max_memory: int, threads: int, compute: DType) -> int:
    """Elements per work item so that all workers' buffers fit ``max_memory`` bytes.

    The budget is what the operation may add to the process; the command line
    subtracts what the process already holds, so that there it bounds peak RSS.

    Raises:
        MemoryBudgetError: the budget cannot hold even minimal buffers.
    """
    avail = max_memory - RESERVE_BYTES
    per = _bytes_per_element(compute) * threads
    chunk = min(DEFAULT_CHUNK, avail // per if avail > 0 else 0)
    if chunk < MIN_CHUNK:
        need = RESERVE_BYTES + MIN_CHUNK * per
        raise MemoryBudgetError(
            f"--max-memory leaves {max(avail, 0) / 2**20:.0f} MiB for buffers; {threads} worker(s) need at least "
            f"{math.ceil(need / 2**20)} MiB more than the process holds"
        )
    return int(chunk)


class Buffers:
    """One worker's buffers, allocated once: raw read buffers, compute-dtype arrays, a float32 scratch."""

    def __init__(self, chunk: int, compute: DType) -> None:
        self.raw = [np.empty(chunk * 8, dtype=np.uint8) for _ in range(RAW_BUFFERS)]
        self.f = [np.empty(chunk, dtype=compute.storage) for _ in range(3)]
        self.f32 = np.empty(chunk, dtype=np.float32)  # float64 <-> bfloat16 goes through float32
        self.cache: dict[Any, Any] = {}  # a compressed tensor's small factor, between items

    def scratch(self, dtype: np.dtype, n: int) -> np.ndarray:
        return self.raw[4][: n * dtype.itemsize].view(dtype)


def widen(x: np.ndarray, src: DType, out: np.ndarray, b: Buffers) -> np.ndarray:
    """Convert storage values of ``src`` into ``out`` (float32 or float64), exactly where it widens."""
    if src is BF16:
        f32 = bf16_to_float32(x, out if out.dtype == np.float32 else b.f32[: out.size])
        if f32 is not out:
            np.copyto(out, f32)
        return out
    np.copyto(out, x, casting="unsafe")
    return out


def narrow(x: np.ndarray, dst: DType, out: np.ndarray, b: Buffers) -> np.ndarray:
    """Round compute values ``x`` to ``dst`` (nearest-even) into ``out``, a storage view; return it.

    A NaN narrows to a NaN (bfloat16: the canonical 0x7FC0, see :func:`~ftrecycle.dtypes.float32_to_bf16`).
    """
    n = x.size
    if x.dtype == np.float64 and dst.itemsize == 2:
        f32 = b.f32[:n]
        with np.errstate(over="ignore", invalid="ignore"):
            np.copyto(f32, x, casting="unsafe")
        x = f32
    if dst is not BF16:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is refused later, by choice
            np.copyto(out, x, casting="unsafe")
        return out
    return float32_to_bf16(x, out, b.scratch(np.dtype(np.uint32), n))


def first_nonfinite(out: np.ndarray, dtype: DType, b: Buffers) -> int | None:
    """Index of the first NaN or infinity among floating storage values, or None.

    Masks off the sign and compares with the exponent mask: two passes over the
    output bytes, ~20x cheaper than isfinite on the compute values.
    """
    bits = out.view(dtype.bits)
    t = b.scratch(dtype.bits, bits.size)
    np.bitwise_and(bits, dtype.abs_mask, out=t)
    if bits.size == 0 or int(t.max()) < dtype.exponent_mask:
        return None
    return int(np.flatnonzero(t >= dtype.exponent_mask)[0])


def read_term(term: Term, s: int, n: int, d: np.ndarray, b: Buffers) -> np.ndarray:
    """Elements ``[s, s + n)`` of a diff tensor into ``d`` (compute dtype), through ``b``'s buffers."""
    match term:
        case PackedTerm(packed=packed):
            return decode(packed, s, n, d, b.cache)
        case Stored(delta=op):
            return widen(op.ckpt.read(op.info, s, n, b.raw[1]), op.info.dtype, d, b)
        case Difference(fin=fin, base=base):
            a = b.f[2][:n]
            widen(fin.ckpt.read(fin.info, s, n, b.raw[1]), fin.info.dtype, d, b)
            widen(base.ckpt.read(base.info, s, n, b.raw[2]), base.info.dtype, a, b)
            return np.subtract(d, a, out=d)
        case Masked(term=inner, mask=op, tally=tally):
            return _masked(read_term(inner, s, n, d, b), op.ckpt.read(op.info, s, n, b.raw[2]), tally, b)
        case _:
            assert_never(term)


def _masked(d: np.ndarray, mask: np.ndarray, tally: MaskTally, b: Buffers) -> np.ndarray:
    """``d * (sign(d) == mask)`` in place: elementwise, no reduction, so it is the same bits in any chunking.

    ``mask`` is the int8 -1/0/+1 range (in ``b.raw[2]``, free once the inner term is read); the sign
    goes to ``b.f[2]`` and the comparison to the scratch buffer. A multiply rather than a select so
    that a dropped negative entry is -0.0 and a NaN stays NaN (and is refused like any other).
    """
    n = d.size
    sign = np.sign(d, out=b.f[2][:n])
    keep = np.equal(sign, mask, out=b.scratch(np.dtype(np.bool_), n))
    nonzero = int(np.count_nonzero(d))
    np.multiply(d, keep, out=d)
    tally.add(n, nonzero, int(np.count_nonzero(d)))
    return d


class Engine:
    """Executes plans with a pool of worker threads and bounded buffers.

    Args:
        alpha: scale of the diff in ``add`` pieces.
        compute: float32 (default) or float64.
        threads: worker threads (default: the available cores).
        chunk: elements per work item (see :func:`chunk_for_budget`).
        allow_nonfinite: accept NaN/inf in results instead of raising.
        progress: called with the number of output bytes each finished item wrote.
    """

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        compute: DType = F32,
        threads: int | None = None,
        chunk: int = DEFAULT_CHUNK,
        allow_nonfinite: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if compute not in (F32, F64):
            raise ValueError(f"compute dtype must be float32 or float64, not {compute}")
        self.alpha = alpha
        self.compute = compute
        self.threads = threads or default_threads()
        self.chunk = chunk
        self.allow_nonfinite = allow_nonfinite
        self.progress = progress

    def items(self, tensors: list[OutTensor], writer: ShardedWriter) -> Iterator[Item]:
        """Every piece of every tensor as work items of at most ``chunk`` elements, made lazily
        (a 70B model has ~270,000 of them)."""
        for t in tensors:
            slot = writer.slots[t.name]
            for p in t.pieces:
                for s in range(p.start, p.start + p.count, self.chunk):
                    yield Item(t, slot, p, s, min(self.chunk, p.start + p.count - s))

    def run(self, tensors: list[OutTensor], writer: ShardedWriter) -> None:
        """Compute and write every tensor.

        Raises:
            NonFiniteError: a result holds NaN or infinity (unless allowed).
            CheckpointError: an input became unreadable during the run.
        """
        items = self.items(tensors, writer)
        lock = threading.Lock()
        errors: list[BaseException] = []
        stop = threading.Event()

        def worker() -> None:
            bufs = Buffers(self.chunk, self.compute)
            while not stop.is_set():
                with lock:
                    item = next(items, None)
                if item is None:
                    return
                try:
                    # overflow and NaN are found on the written bits (first_nonfinite), not by NumPy warnings
                    with np.errstate(all="ignore"):
                        self._run_item(item, bufs)
                except BaseException as e:  # handed to the main thread
                    with lock:
                        errors.append(e)
                    stop.set()
                    return

        workers = [threading.Thread(target=worker, daemon=True) for _ in range(self.threads)]
        # The workers are the parallelism: a BLAS call inside one (a low-rank decode's GEMM) runs on
        # its own thread, not on BLAS threads that would spin-wait beside the other workers (see
        # ftrecycle.codecs.lowrank.exact_rows). Process-wide while the plan runs, restored after.
        with threadpool_limits(limits=1, user_api="blas"):
            for w in workers:
                w.start()
            try:
                for w in workers:
                    while w.is_alive():
                        w.join(0.2)
            except BaseException:
                stop.set()
                for w in workers:
                    w.join()
                raise
        if errors:
            raise errors[0]

    def _run_item(self, item: Item, b: Buffers) -> None:
        n, s = item.count, item.start
        dtype = item.tensor.dtype
        offset = item.slot.offset + s * dtype.itemsize
        out = b.raw[3][: n * dtype.itemsize].view(dtype.storage)
        match item.piece:
            case Copy(target=src):
                if src.info.dtype == dtype and src.ckpt.copy_into(src.info, s, n, item.slot.fd, offset):
                    self._done(n * dtype.itemsize)
                    return
                x = src.ckpt.read(src.info, s, n, b.raw[0])
                if src.info.dtype == dtype:
                    out = x
                else:  # a float cast asked for by --out-dtype
                    narrow(widen(x, src.info.dtype, b.f[0][:n], b), dtype, out, b)
            case Sub(term=term):
                d = read_term(term, s, n, b.f[1][:n], b)
                narrow(d, dtype, out, b)
            case Add(target=tgt, term=term):
                d = read_term(term, s, n, b.f[1][:n], b)
                c = widen(tgt.ckpt.read(tgt.info, s, n, b.raw[0]), tgt.info.dtype, b.f[0][:n], b)
                if self.alpha != 1.0:
                    np.multiply(d, d.dtype.type(self.alpha), out=d)
                np.add(c, d, out=c)
                narrow(c, dtype, out, b)
            case _:
                assert_never(item.piece)
        if dtype.is_floating and not self.allow_nonfinite:
            bad = first_nonfinite(out, dtype, b)
            if bad is not None:
                raise NonFiniteError(
                    f"tensor {item.tensor.name!r}: the result is NaN or infinite at element {s + bad}; check the "
                    "inputs (and --alpha), or pass --allow-nonfinite to write it anyway"
                )
        pwrite_all(item.slot.fd, out.view(np.uint8).data, offset)
        self._done(n * dtype.itemsize)

    def _done(self, nbytes: int) -> None:
        if self.progress is not None:
            self.progress(nbytes)
