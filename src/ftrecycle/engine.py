"""Run a plan: stream every output tensor through fixed-size buffers on worker threads.

Each work item is one element range of one output tensor. A worker reads the
inputs' bytes for that range with positioned reads into its own buffers, widens
them to the compute dtype, does the arithmetic one rounded operation at a time,
narrows to the output dtype (round-to-nearest-even) and writes the bytes at their
final offset with a positioned write. Items are independent, so threads need no
ordering; torch releases the GIL in every kernel and syscall, so two cores are two
workers. Memory is the workers' buffers, whatever the model size.

Exactness: for ``add`` the value is ``cast(fl(fl(C) + fl(alpha * fl(B - A))))`` with
every ``fl`` a rounding to the compute dtype. The multiply is skipped when alpha is 1
(multiplying by 1 is exact), and the addition is a plain add, never a fused
multiply-add, so the result is the same on every machine.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ftrecycle.errors import MemoryBudgetError, NonFiniteError
from ftrecycle.io.output import ShardedWriter, Slot
from ftrecycle.io.safetensors_format import pwrite_all
from ftrecycle.plan import OutTensor, Piece

#: Elements per work item: large enough to amortise Python overhead, small enough to stay in L2.
DEFAULT_CHUNK = 1 << 18
MIN_CHUNK = 1 << 12
#: What the process may still grow by beyond the workers' buffers (allocator slack, headers).
RESERVE_BYTES = 48 * 2**20


@dataclass(frozen=True)
class Item:
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


def _bytes_per_element(compute_dtype: torch.dtype) -> int:
    # three raw input buffers and one raw output buffer of up to 8-byte elements, three compute buffers
    return 4 * 8 + 3 * compute_dtype.itemsize


def chunk_for_budget(max_memory: int, threads: int, compute_dtype: torch.dtype) -> int:
    """Elements per work item so that all workers' buffers fit the memory budget.

    Raises:
        MemoryBudgetError: the budget is below what the process already uses plus minimal buffers.
    """
    rss = current_rss()
    avail = max_memory - rss - RESERVE_BYTES
    per = _bytes_per_element(compute_dtype) * threads
    chunk = min(DEFAULT_CHUNK, avail // per if avail > 0 else 0)
    if chunk < MIN_CHUNK:
        need = rss + RESERVE_BYTES + MIN_CHUNK * per
        raise MemoryBudgetError(
            f"--max-memory {max_memory / 2**20:.0f} MiB is too small: this process already uses "
            f"{rss / 2**20:.0f} MiB; allow at least {math.ceil(need / 2**20)} MiB"
        )
    return int(chunk)


class _Buffers:
    def __init__(self, chunk: int, compute_dtype: torch.dtype) -> None:
        self.raw = [torch.empty(chunk * 8, dtype=torch.uint8) for _ in range(4)]
        self.out = self.raw[3]
        self.out_np = self.out.numpy()
        self.f = [torch.empty(chunk, dtype=compute_dtype) for _ in range(3)]


def _finite(x: torch.Tensor) -> bool:
    # A sum is ~20x cheaper than isfinite().all() and is non-finite whenever an element is;
    # only then (or on overflow of the sum itself) is the exact test run.
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if math.isfinite(float(x.sum(dtype=acc))):
        return True
    return bool(torch.isfinite(x).all())


class Engine:
    """Executes plans with a pool of worker threads and bounded buffers.

    Args:
        alpha: scale of the diff in ``add`` pieces.
        compute_dtype: float32 (default) or float64.
        threads: worker threads (default: the available cores).
        chunk: elements per work item (see :func:`chunk_for_budget`).
        allow_nonfinite: accept NaN/inf in results instead of raising.
        progress: called with the number of output bytes each finished item wrote.
    """

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        compute_dtype: torch.dtype = torch.float32,
        threads: int | None = None,
        chunk: int = DEFAULT_CHUNK,
        allow_nonfinite: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.alpha = alpha
        self.compute_dtype = compute_dtype
        self.threads = threads or default_threads()
        self.chunk = chunk
        self.allow_nonfinite = allow_nonfinite
        self.progress = progress

    def items(self, tensors: list[OutTensor], writer: ShardedWriter) -> list[Item]:
        """Split every piece of every tensor into work items of at most ``chunk`` elements."""
        items = []
        for t in tensors:
            slot = writer.slots[t.name]
            for p in t.pieces:
                for s in range(p.start, p.start + p.count, self.chunk):
                    items.append(Item(t, slot, p, s, min(self.chunk, p.start + p.count - s)))
        return items

    def run(self, tensors: list[OutTensor], writer: ShardedWriter) -> None:
        """Compute and write every tensor.

        Raises:
            NonFiniteError: a result holds NaN or infinity (unless allowed).
            CheckpointError: an input became unreadable during the run.
        """
        items = self.items(tensors, writer)
        lock = threading.Lock()
        nxt = [0]
        errors: list[BaseException] = []
        stop = threading.Event()

        def worker() -> None:
            bufs = _Buffers(self.chunk, self.compute_dtype)
            while not stop.is_set():
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= len(items):
                    return
                try:
                    self._run_item(items[i], bufs)
                except BaseException as e:  # handed to the main thread
                    with lock:
                        errors.append(e)
                    stop.set()
                    return

        previous = torch.get_num_threads()
        torch.set_num_threads(1)  # parallelism comes from the workers, not from intra-op threads
        try:
            workers = [threading.Thread(target=worker, daemon=True) for _ in range(min(self.threads, len(items)) or 1)]
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
        finally:
            torch.set_num_threads(previous)
        if errors:
            raise errors[0]

    def _run_item(self, item: Item, b: _Buffers) -> None:
        p, n, s = item.piece, item.count, item.start
        dtype = item.tensor.dtype
        out = b.out[: n * dtype.itemsize].view(dtype)
        if p.kind == "copy":
            assert p.target is not None
            x = p.target.ckpt.read(p.target.info, s, n, b.raw[0])
            out.copy_(x)
        else:
            term = p.term
            assert term is not None
            d = b.f[1][:n]
            if term.delta is not None:
                d.copy_(term.delta.ckpt.read(term.delta.info, s, n, b.raw[1]))
            else:
                assert term.fin is not None and term.base is not None
                a = b.f[2][:n]
                d.copy_(term.fin.ckpt.read(term.fin.info, s, n, b.raw[1]))
                a.copy_(term.base.ckpt.read(term.base.info, s, n, b.raw[2]))
                d.sub_(a)
            if p.kind == "sub":
                out.copy_(d)
            else:
                assert p.target is not None
                c = b.f[0][:n]
                c.copy_(p.target.ckpt.read(p.target.info, s, n, b.raw[0]))
                if self.alpha != 1.0:
                    d.mul_(self.alpha)
                c.add_(d)
                out.copy_(c)
        if dtype.is_floating_point and not self.allow_nonfinite and not _finite(out):
            bad = int((~torch.isfinite(out)).nonzero()[0, 0]) + s
            raise NonFiniteError(
                f"tensor {item.tensor.name!r}: the result is NaN or infinite at element {bad}; check the inputs "
                "(and --alpha), or pass --allow-nonfinite to write it anyway"
            )
        pwrite_all(item.slot.fd, b.out_np[: n * dtype.itemsize].data, item.slot.offset + s * dtype.itemsize)
        if self.progress is not None:
            self.progress(n * dtype.itemsize)
