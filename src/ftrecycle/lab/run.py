"""``ftrecycle lab run``: every experiment of a preset, then results.json, report.md and the plots."""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftrecycle.errors import ConfigError
from ftrecycle.io.checkpoint import open_checkpoint
from ftrecycle.io.jsonfile import read_json_object
from ftrecycle.io.output import check_output, os_error, output_lock, replaced_file
from ftrecycle.lab import paper
from ftrecycle.lab.aggregate import combine
from ftrecycle.lab.config import NOT_EVIDENCE, LabConfig
from ftrecycle.lab.experiments import collect_seed, seed_jobs
from ftrecycle.lab.findings import across_seeds, all_findings, transfer_measures
from ftrecycle.lab.jobs import data_files
from ftrecycle.lab.masking import masking_summary
from ftrecycle.lab.report import TARGETS, not_evidence, plots, render
from ftrecycle.lab.scheduler import Job, Progress, StaleCache, job_seconds, run_jobs, stale_jobs, write_json_atomic
from ftrecycle.lab.signals import diagnostics_summary
from ftrecycle.lab.sizes import sweep_of_means

CONFIG_FILE = "lab-config.json"
RESULTS = "results.json"
REPORT = "report.md"


@dataclass
class LabResult:
    """What a lab run wrote.

    Attributes:
        out: the run directory.
        report: report.md.
        results: results.json.
        plots: the PNG files.
        findings: the four findings (id, claim, passed, numbers).
        seconds: wall time of this call.
        jobs_run: jobs computed in this call (the rest came from the cache).
        not_evidence: why the numbers are not evidence (a smoke run, findings with no signal), or None.
    """

    out: Path
    report: Path
    results: Path
    plots: list[Path]
    findings: list[dict[str, Any]]
    seconds: float
    jobs_run: int
    not_evidence: str | None = None


def _cache_key(settings: dict[str, Any]) -> dict[str, Any]:
    # Jobs are per seed and their results do not depend on how many run at once, so a run directory
    # can gain seeds or change --workers and keep its finished jobs. Each job's own arguments and input
    # files are keyed too (scheduler.job_key).
    # The compression settings only add or drop (g) and (h) jobs, each keyed by its own arguments (the
    # calibration steps among them): a run keeps its models when they change.
    kept = ("seeds", "workers", "preset", "sweep_compressions", "calibration_steps")
    return {k: v for k, v in settings.items() if k not in kept}


_DISCARD = "use another --out, or --force to discard the run there"


def _check_config(out: Path, cfg: LabConfig, force: bool) -> None:
    f = out / CONFIG_FILE
    if out.is_dir() and not os.path.lexists(f) and any(out.iterdir()):
        # --force discards a lab run, never a directory of something else (models, data, a home)
        raise ConfigError(
            f"--out {out} is not empty and holds no lab run ({CONFIG_FILE} is missing); choose a new or empty --out"
        )
    old: dict[str, Any] | None = None
    if os.path.lexists(f):
        try:
            old = read_json_object(f, what="lab run settings", error=ConfigError, fix=_DISCARD, allow_nan=True)
        except ConfigError:
            if not force:
                raise
            # unreadable settings are other settings: --force discards the run below
    if os.path.lexists(f) and (old is None or _cache_key(old) != _cache_key(cfg.to_json())):
        if not force:
            raise ConfigError(
                f"{out} holds a lab run with other settings ({f}); use another --out, or --force to discard it"
            )
        check_output(out, [], force=True, what="--out")  # never the current or home directory
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(f, cfg.to_json())


def parameters(model_dir: Path) -> int:
    """Parameter count of a saved model (from its safetensors headers)."""
    ck = open_checkpoint(str(model_dir))
    try:
        total = 0
        for info in ck.tensors.values():
            n = 1
            for d in info.shape:
                n *= d
            total += n
        return total
    finally:
        ck.close()


#: Job kinds for the timing table, each with the rule on a job's name (its id after the ``sN:`` prefix);
#: the first rule that matches decides, and a name none matches is "other".
JOB_KINDS: tuple[tuple[str, str], ...] = (
    ("pretrain", r"pretrain"),
    ("direct fine-tune", r"ft-M\d"),
    ("Δ-size sweep", r"(ft-)?M\d(\+d\d)?@lr.+"),  # experiment (h)
    ("update sizes", r"sizes"),
    ("recycling fine-tune", r"ft-.*\+.*(?<!lang)"),  # not ft-M5+dlang: a transfer, of experiment (e)
    ("iterative", r"iterative"),
    ("transfer+score", r"M\d\+d\d"),
    ("masked (i)", r"M\d\+d\d@mask\d+(maj)?"),  # before compressed: the same shape of name
    ("compressed", r"M\d\+d\d@.+"),
    ("diagnose", r"diag-.+"),
    ("auto-alpha", r"M\d\+d\dauto"),
    ("language", r".*lang.*"),
    ("other", r".*"),
)
#: The parts a fine-tuning job's time is split into (see :func:`ftrecycle.lab.jobs.time_split`).
SPLIT = ("train_s", "eval_s", "setup_s")


def job_kind(job_id: str) -> str:
    """The kind of a lab job, from its id.

    Args:
        job_id: a job id, with or without its ``sN:`` seed prefix.

    Returns:
        The first kind of :data:`JOB_KINDS` whose rule matches the name ("other" when none does).
    """
    name = re.sub(r"^s\d+:", "", job_id)
    return next(kind for kind, rule in JOB_KINDS if re.fullmatch(rule, name))


def timing(
    seconds: dict[str, float | None], results: dict[str, dict[str, Any]], *, wall_s: float, workers: int
) -> dict[str, Any]:
    """Where a lab run's time went: job seconds summed by kind, with fine-tuning's split.

    Args:
        seconds: job id -> wall seconds of the job when it ran (None: not on record).
        results: job id -> the job's result (fine-tuning jobs carry ``train_s``/``eval_s``/``setup_s``,
            the iterative job ``eval_s``).
        wall_s: this call's wall time.
        workers: jobs at once.

    Returns:
        ``{"wall_s", "workers", "job_s", "untimed_jobs", "by_kind": {kind: {"jobs", "seconds", "share_pct",
        "train_s", "eval_s", "setup_s"}}}``; a split part is None for a kind none of whose jobs report it.
    """
    total = sum(s for s in seconds.values() if s is not None)
    by_kind: dict[str, dict[str, Any]] = {}
    for kind, _ in JOB_KINDS:
        ids = [j for j in seconds if job_kind(j) == kind]
        if not ids:
            continue
        secs = sum(seconds[j] or 0.0 for j in ids)
        row: dict[str, Any] = {
            "jobs": len(ids),
            "seconds": round(secs, 1),
            "share_pct": round(100 * secs / total, 1) if total > 0 else None,
        }
        for part in SPLIT:
            known = [float(results[j][part]) for j in ids if results.get(j, {}).get(part) is not None]
            row[part] = round(sum(known), 1) if known else None
        by_kind[kind] = row
    return {
        "wall_s": round(wall_s, 1),
        "workers": workers,
        "job_s": round(total, 1),
        "untimed_jobs": sum(s is None for s in seconds.values()),
        "by_kind": by_kind,
    }


def _all_jobs(cfg: LabConfig, root: Path) -> list[Job]:
    """Every seed's data files (written once) and jobs."""
    jobs: list[Job] = []
    for seed in cfg.seeds:
        sroot = root / f"seed-{seed}"
        data = data_files(
            sroot / "data",
            seed=seed,
            train_items=cfg.train_items,
            test_items=cfg.test_items,
            language_items=cfg.language_items,
        )
        jobs += seed_jobs(cfg, seed, sroot, data)
    return jobs


def run_lab(
    cfg: LabConfig,
    out: str | Path,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> LabResult:
    """Run (or finish, or just re-report) the lab under ``out``.

    Args:
        cfg: the settings (see :data:`ftrecycle.lab.config.PRESETS`).
        out: run directory; finished jobs found there are reused.
        force: discard a run made with other settings.
        progress: called with (jobs finished, jobs in total, job id).

    Returns:
        Paths of the report, results and plots, the findings and timing.

    Raises:
        ConfigError: ``out`` holds a run of other settings, or jobs computed from other inputs (StaleCache),
            without ``force``.
        JobFailed: an experiment failed (finished jobs stay cached; rerun to continue).
    """
    t0 = time.perf_counter()
    cfg = cfg.validate()
    root = Path(out).expanduser().resolve()
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, root) from e
    with output_lock(root):  # a second run on the same --out fails fast instead of mixing in
        return _run_locked(cfg, root, force, progress, t0)


def _run_locked(cfg: LabConfig, root: Path, force: bool, progress: Progress | None, t0: float) -> LabResult:
    _check_config(root, cfg, force)
    jobs = _all_jobs(cfg, root)
    # One cache for every seed's jobs, so that seeds overlap in the worker pool.
    cache = root / "jobs"
    stale = stale_jobs(jobs, cache)
    if stale is not None:
        if not force:
            raise StaleCache(f"{stale}; use another --out, or --force to discard the run")
        # Job outputs (models) sit beside their cached results: a stale run is discarded whole, never patched.
        check_output(root, [], force=True, what="--out")  # never the current or home directory
        shutil.rmtree(root)
        _check_config(root, cfg, force)
        jobs = _all_jobs(cfg, root)
    cached = sum((cache / f"{j.id}.json").is_file() for j in jobs)
    res = run_jobs(jobs, cache, workers=cfg.workers, progress=progress)
    jobs_run = len(jobs) - cached
    per_seed = {str(seed): collect_seed(cfg, seed, res) for seed in cfg.seeds}
    for rec in per_seed.values():
        rec["measures"] = transfer_measures(rec)
    seeds = list(per_seed.values())
    mean = combine(seeds, "mean")
    # the measures of the mean are computed from the mean accuracies, as the findings are (a mean of per-seed
    # shares would skip a seed where a gain is undefined and disagree with finding 1 on the same pair)
    mean["measures"] = transfer_measures(mean)
    if "sweep" in mean:
        mean["sweep"] = sweep_of_means(mean["sweep"], cfg.test_items)
    findings = all_findings(mean, cfg.ft_steps)
    seed_findings = [all_findings(s, cfg.ft_steps) for s in seeds]
    by_seed: dict[str, list[bool]] = {str(f["id"]): [] for f in findings}
    for found in seed_findings:
        for f in found:
            by_seed[str(f["id"])].append(bool(f["passed"]))
    wall = time.perf_counter() - t0
    results = {
        "config": cfg.to_json(),
        "parameters": parameters(root / f"seed-{cfg.seeds[0]}" / "models" / "pretrain" / "M1"),
        "mean": mean,
        "spread": combine(seeds, "spread"),
        "per_seed": per_seed,
        "findings": findings,
        "findings_per_seed": by_seed,
        "findings_across_seeds": across_seeds(seed_findings),
        "timing": timing(job_seconds(jobs, cache), res, wall_s=wall, workers=cfg.workers),
        "diagnostics_summary": diagnostics_summary(mean, per_seed),
        "masking": {"mean": masking_summary(mean), "per_seed": {k: masking_summary(s) for k, s in per_seed.items()}},
        "evidence": cfg.preset not in NOT_EVIDENCE and not any(f.get("no_signal") for f in findings),
        "paper": paper.as_json(),
        "targets": TARGETS,
        "seconds": round(wall, 1),
    }
    write_json_atomic(root / RESULTS, results)
    pngs = _write_report(results, root)
    return LabResult(
        root,
        root / REPORT,
        root / RESULTS,
        pngs,
        findings,
        time.perf_counter() - t0,
        jobs_run,
        not_evidence(results),
    )


def _write_report(results: dict[str, Any], root: Path) -> list[Path]:
    """The plots, then report.md (each file atomically); returns the plots' paths."""
    text = render(results)
    pngs = plots(results, root)
    with replaced_file(root / REPORT) as f:
        f.write(text.encode())
    return pngs


def rebuild_report(out: str | Path) -> Path:
    """Rewrite report.md and the plots of a finished run from its results.json.

    Raises:
        ConfigError: no results.json in ``out``, or one that is not a lab run's results (not
            JSON, or missing or mistyped fields: it is read back as the lab wrote it).
        OutputError: the report or a plot could not be written.
    """
    root = Path(out).expanduser()
    f = root / RESULTS
    if not f.is_file():
        raise ConfigError(f"{f} does not exist: run `ftrecycle lab run --out {out}` first")
    fix = f"rerun `ftrecycle lab run --out {out}` to remake it"
    # the lab writes NaN for a spread it could not measure, so NaN is read back
    results = read_json_object(f, what="lab results", error=ConfigError, fix=fix, allow_nan=True)
    try:
        _write_report(results, root)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        # every field is read where it is drawn: a missing or mistyped one surfaces here, before report.md
        raise ConfigError(f"{f}: not the results of a lab run of this version ({type(e).__name__}: {e}); {fix}") from e
    return root / REPORT
