"""Rank handling under ``accelerate launch``: one process decides and writes, every process agrees.

Under ``accelerate launch`` (or ``torchrun``) with N processes every rank runs the
same command. Anything that touches the file system's shared state (checking,
creating or removing run and output directories, writing provenance, logs and
the final model) must happen once, on the main process, while the others wait;
and a refusal there must reach every rank, or the others would either go on alone
or wait forever at the next collective call. :func:`on_main` is that pattern:
the main process runs a function, its result *or its error* is broadcast, and
every rank returns the same value or raises the same :class:`FtRecycleError`
(so every rank exits with the same code).

Without a launcher (``WORLD_SIZE`` unset or 1) every function here is a plain call:
nothing is initialised and nothing is imported beyond the standard library.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ftrecycle import errors
from ftrecycle.errors import FtRecycleError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the launched ones (from the launcher's environment).

    Attributes:
        rank: global rank, 0 on the main process.
        size: number of processes.
        local_rank: rank on this machine (0 on each machine's first process).
    """

    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Whether this is the process that writes."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Whether this is the first process on its machine (the one that prints)."""
        return self.local_rank == 0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def world() -> World:
    """Rank, size and local rank as set by ``accelerate launch`` / ``torchrun`` (0, 1, 0 without one)."""
    size = max(1, _env_int("WORLD_SIZE", 1))
    rank = _env_int("RANK", 0) if size > 1 else 0
    return World(rank, size, _env_int("LOCAL_RANK", rank) if size > 1 else 0)


def is_main() -> bool:
    """Whether this process writes shared state (always true without a launcher)."""
    return world().is_main


def active() -> bool:
    """Initialise the process group once (as accelerate would, so Trainer shares it); False when alone."""
    if world().size == 1:
        return False
    import torch.distributed as dist  # heavy: kept off the transfer path

    if not dist.is_initialized():
        # PartialState picks the backend accelerate's launcher configured (gloo on CPU, nccl on GPUs)
        # and is the same singleton Trainer and Accelerator use later.
        from accelerate import PartialState  # heavy: kept off the transfer path

        PartialState()
    return dist.is_initialized()


def barrier() -> None:
    """Wait until every process gets here (a no-op without a launcher)."""
    if active():
        import torch.distributed as dist  # heavy: kept off the transfer path

        dist.barrier()


def broadcast(value: T) -> T:
    """The main process's ``value`` on every process (a no-op without a launcher)."""
    if not active():
        return value
    import torch.distributed as dist  # heavy: kept off the transfer path

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: T) -> list[T]:
    """Every process's ``value``, in rank order, on every process (``[value]`` without a launcher)."""
    if not active():
        return [value]
    import torch.distributed as dist  # heavy: kept off the transfer path

    out: list[Any] = [None] * world().size
    dist.all_gather_object(out, value)
    return out


def _payload(e: BaseException) -> tuple[str, str, int]:
    if isinstance(e, FtRecycleError):
        return type(e).__name__, str(e), e.exit_code
    return "", f"the main process failed ({type(e).__name__}: {e})", FtRecycleError.exit_code


def _rebuild(name: str, message: str, code: int) -> FtRecycleError:
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, FtRecycleError)):
        cls = FtRecycleError
    err = cls(message)
    err.exit_code = code
    err.from_main = True  # type: ignore[attr-defined]  # the main process reports it; see reported_elsewhere
    err.agreed = True  # type: ignore[attr-defined]
    return err


def exit_together(e: BaseException, code: int) -> None:
    """End this process with ``code`` at the same moment as the others, if every rank holds ``e``.

    torchrun stops the remaining processes (SIGTERM) as soon as one exits non-zero; a rank
    still unwinding would then report -15 instead of the agreed code. An error that went
    through :func:`on_main` is held by every rank, so they can meet at a barrier and leave
    together. Any other error returns here (it may be this rank's alone: a barrier could hang).
    """
    if not (getattr(e, "agreed", False) and active()):
        return
    import torch.distributed as dist  # heavy: kept off the transfer path

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def reported_elsewhere(e: BaseException) -> bool:
    """Whether ``e`` is the main process's error, re-raised here, so that only the main process prints it."""
    return bool(getattr(e, "from_main", False)) and not is_main()


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main process only; every process returns its result or raises its error.

    The other processes wait meanwhile. The result must be a small picklable value
    (it is broadcast); decisions that every rank must agree on (does this output
    exist yet? is this step done?) belong inside ``fn``, never in a separate check
    each rank makes for itself, since the main process may already have changed
    the answer.

    Raises:
        FtRecycleError: the error ``fn`` raised on the main process (same class, message and
            exit code on every rank). On the main process the original exception propagates.
    """
    if not active():
        return fn()
    if is_main():
        try:
            result = fn()
        except BaseException as e:
            broadcast(("error", _payload(e)))
            with contextlib.suppress(AttributeError):
                e.agreed = True  # type: ignore[attr-defined]  # every rank holds it: see exit_together
            raise
        broadcast(("ok", result))
        return result
    got: tuple[str, Any] = broadcast(("", None))
    status, value = got
    if status == "error":
        raise _rebuild(*value)
    return value
