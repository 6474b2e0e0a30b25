"""A small dependency-ordered job runner with a result cache, for the lab's many short runs.

Each job is a module-level function returning a JSON-ready dict. A finished job's result is
written (atomically) to ``CACHE/<job id>.json``; a rerun loads it instead of running the job.
Independent jobs run at once in worker processes (``spawn``, each with its share of the
cores), because the lab's models are too small for one process to keep two cores busy.
Each job's wall seconds, measured around the call in the process that runs it, are kept in
``CACHE/<job id>.time.json``; a cached job keeps the time it took when it ran.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ftrecycle.errors import ConfigError, FtRecycleError
from ftrecycle.io.jsonfile import read_json_object
from ftrecycle.io.provenance import portable
from ftrecycle.io.state import describe_changes, read_settings, sha256_file

JobFn = Callable[..., dict[str, Any]]
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Job:
    """One unit of work.

    Attributes:
        id: unique name; also the cache file's name.
        fn: a module-level function (so worker processes can import it).
        kwargs: its arguments (picklable).
        deps: ids of jobs that must finish first.
        threads: torch threads for this job (default: the runner's per-worker share); a job that others
            wait for, like pretraining, takes every core.
    """

    id: str
    fn: JobFn
    kwargs: dict[str, Any] = field(default_factory=dict)
    deps: tuple[str, ...] = ()
    threads: int | None = None


class JobFailed(FtRecycleError):
    """A lab job raised; the message names the job and the cause."""


class StaleCache(ConfigError):
    """A cached job result was computed from other arguments or input files than the job has now."""


def job_key(job: Job) -> dict[str, Any]:
    """Everything that decides a job's result: its function, its arguments and the content of its input files.

    An argument that names an existing file (the lab's data sets) is keyed by the file's sha256 too, so
    an edited data file does not reuse results computed from the old one.
    """
    files = {k: sha256_file(Path(v)) for k, v in sorted(job.kwargs.items()) if isinstance(v, str) and Path(v).is_file()}
    key = {
        "fn": f"{job.fn.__module__}.{job.fn.__qualname__}",
        "kwargs": json.loads(json.dumps(job.kwargs, sort_keys=True, default=str)),
        "files": files,
    }
    if job.threads is not None:  # float sums depend on the thread count: another count is another result
        key["threads"] = job.threads
    return key


def _init_worker(threads: int) -> Callable[[], None]:
    """Set torch's threads and silence transformers' own progress bars; returns an undo."""
    import torch  # heavy: kept off the CLI's start-up path
    from transformers.utils import logging as hf_logging  # heavy: as torch

    old_threads, bars_on, verbosity = (
        torch.get_num_threads(),
        hf_logging.is_progress_bar_enabled(),
        hf_logging.get_verbosity(),
    )
    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    def undo() -> None:
        torch.set_num_threads(old_threads)
        hf_logging.set_verbosity(verbosity)
        if bars_on:
            hf_logging.enable_progress_bar()

    return undo


def _call(fn: JobFn, kwargs: dict[str, Any], threads: int | None) -> tuple[dict[str, Any], float]:
    """Run one job; returns its result and its wall seconds (timed here, in the process that runs it, so a
    worker's queueing and the result's transfer back are not counted)."""
    import torch  # heavy: kept off the CLI's start-up path

    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        return fn(**kwargs), time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)


def time_file(cache: Path, job_id: str) -> Path:
    """Where the wall seconds of job ``job_id`` are kept, beside its cached result.

    Args:
        cache: the run's job cache directory.
        job_id: the job's id.

    Returns:
        ``CACHE/<job id>.time.json`` (holding ``{"seconds": ...}``).
    """
    return cache / f"{job_id}.time.json"


def job_seconds(jobs: list[Job], cache: Path) -> dict[str, float | None]:
    """The wall seconds each job took when it ran (None: not on record, e.g. cached by an older version).

    Returns:
        Job id -> seconds, for every job in ``jobs``.
    """
    out: dict[str, float | None] = {}
    for j in jobs:
        rec = read_settings(time_file(cache, j.id))
        seconds = rec.get("seconds") if rec is not None else None
        out[j.id] = float(seconds) if isinstance(seconds, (int, float)) else None
    return out


def stale_jobs(jobs: list[Job], cache: Path) -> str | None:
    """The first cached result computed from other inputs than its job has now (None: every one matches).

    Returns:
        A message naming the job and what changed, or None.
    """
    for j in jobs:
        if not (cache / f"{j.id}.json").is_file():
            continue
        stored = read_settings(cache / f"{j.id}.key.json")
        # keys are on record with paths relative to the run directory (no absolute path in a published run);
        # one recorded with absolute paths, as earlier versions did, compares the same
        want = recorded_key(job_key(j), cache)
        if stored is not None and recorded_key(stored, cache) != want:
            return f"lab job {j.id} in {cache} was computed from other inputs ({describe_changes(stored, want)})"
    return None


def recorded_key(key: Any, cache: Path) -> Any:
    """A job's key as the cache records it: local paths relative to the run directory (``cache``'s parent)."""
    return portable(key, cache.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _check_graph(jobs: list[Job]) -> None:
    """Refuse duplicate ids and unknown dependencies (cycles are found while running)."""
    ids = {j.id for j in jobs}
    if len(ids) != len(jobs):
        raise ConfigError("lab jobs have duplicate ids")
    for j in jobs:
        missing = [d for d in j.deps if d not in ids]
        if missing:
            raise ConfigError(f"lab job {j.id} depends on unknown job(s) {', '.join(missing)}")


def _cached(jobs: list[Job], cache: Path) -> dict[str, dict[str, Any]]:
    """The finished jobs' results found in ``cache``."""
    results: dict[str, dict[str, Any]] = {}
    for j in jobs:
        f = cache / f"{j.id}.json"
        if f.is_file() and read_settings(cache / f"{j.id}.key.json") is not None:
            # a result with no key on record is not trusted: the job runs again; so does one that
            # cannot be read back (cut short, or edited by hand)
            try:
                results[j.id] = read_json_object(f, what="lab job result", error=ConfigError, allow_nan=True)
            except ConfigError:
                pass
    return results


@dataclass
class _Run:
    """The state of one :func:`run_jobs` call: the jobs still to run and the results so far."""

    cache: Path
    pending: list[Job]
    results: dict[str, dict[str, Any]]
    keys: dict[str, dict[str, Any]]
    total: int
    progress: Progress | None

    def ready(self) -> list[Job]:
        """Pending jobs whose dependencies have all finished, in submission order."""
        return [j for j in self.pending if all(d in self.results for d in j.deps)]

    def no_cycle(self, startable: bool) -> None:
        """Raise if nothing can start while jobs are pending.

        Raises:
            ConfigError: naming the jobs in the cycle.
        """
        if not startable:
            raise ConfigError(f"lab jobs have a dependency cycle among {', '.join(j.id for j in self.pending)}")

    def finish(self, job: Job, result: dict[str, Any], seconds: float) -> None:
        """Record a finished job: its time, result and key in the cache, then progress."""
        # the time first: a result on record always has its time beside it
        write_json_atomic(time_file(self.cache, job.id), {"seconds": round(seconds, 3)})
        write_json_atomic(self.cache / f"{job.id}.json", result)
        write_json_atomic(self.cache / f"{job.id}.key.json", recorded_key(self.keys[job.id], self.cache))
        self.results[job.id] = result
        if self.progress is not None:
            self.progress(len(self.results), self.total, job.id)


def _run_here(run: _Run, threads: int) -> None:
    """Run the pending jobs one after another in this process."""
    undo = _init_worker(threads)
    try:
        while run.pending:
            batch = run.ready()
            run.no_cycle(bool(batch))
            job = batch[0]
            run.pending.remove(job)
            try:
                run.finish(job, *_call(job.fn, job.kwargs, job.threads))
            except FtRecycleError as e:
                raise JobFailed(f"lab job {job.id} failed: {e}") from e
    finally:
        undo()


def _run_pool(run: _Run, workers: int, threads: int) -> None:
    """Run the pending jobs in ``workers`` worker processes, each job as soon as its dependencies are done."""
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(threads,))
    try:
        running: dict[Future[tuple[dict[str, Any], float]], Job] = {}
        while run.pending or running:
            for job in run.ready():
                if len(running) >= workers:
                    break
                run.pending.remove(job)
                running[pool.submit(_call, job.fn, job.kwargs, job.threads)] = job
            run.no_cycle(bool(running))
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                job = running.pop(fut)
                try:
                    result, seconds = fut.result()
                except Exception as e:
                    raise JobFailed(f"lab job {job.id} failed: {type(e).__name__}: {e}") from e
                run.finish(job, result, seconds)
    except BaseException:
        # A failure or an interrupt stops the other workers too, instead of waiting for (or orphaning) their
        # jobs: finished jobs are cached, and an unfinished one leaves only its temporary or resumable state.
        # The executor has no public way to stop running work; _processes is its map of worker processes.
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def run_jobs(
    jobs: list[Job],
    cache: Path,
    *,
    workers: int = 1,
    threads: int | None = None,
    progress: Progress | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``jobs`` in dependency order, reusing cached results.

    Args:
        jobs: the work; every dependency must be one of these ids.
        cache: directory of finished jobs' results.
        workers: jobs at once (1: in this process).
        threads: torch threads per worker (default: cores / workers).
        progress: called with (jobs finished, jobs in total, id of the job just finished).

    Returns:
        Job id -> result.

    Raises:
        ConfigError: duplicate ids, an unknown dependency or a cycle.
        StaleCache: a cached result was computed from other arguments or input files (see :func:`job_key`).
        JobFailed: a job raised (the others are cancelled; finished ones stay cached).
    """
    _check_graph(jobs)
    stale = stale_jobs(jobs, cache)
    if stale is not None:
        raise StaleCache(f"{stale}; use another --out, or --force to discard the run")
    cache.mkdir(parents=True, exist_ok=True)
    results = _cached(jobs, cache)
    keys = {j.id: job_key(j) for j in jobs}
    if progress is not None:
        progress(len(results), len(jobs), "")
    run = _Run(cache, [j for j in jobs if j.id not in results], results, keys, len(jobs), progress)
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, workers))
    if workers <= 1:
        _run_here(run, threads)
    else:
        _run_pool(run, workers, threads)
    return results
