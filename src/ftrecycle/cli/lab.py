"""The local experiments: ``ftrecycle lab run|report`` (the paper's study in miniature) and ``ftrecycle demo``."""

from __future__ import annotations

import argparse
import signal
from typing import Any

from ftrecycle.cli.args import bounded, seeds_type
from ftrecycle.cli.common import Command, Once, ProgressBar
from ftrecycle.demo import run_demo
from ftrecycle.lab import preset, run_lab
from ftrecycle.lab.config import PRESETS
from ftrecycle.lab.run import rebuild_report
from ftrecycle.options import Bound

#: the most lab jobs at once
MAX_WORKERS = 256


def _arguments(p: argparse.ArgumentParser) -> None:
    labsub = p.add_subparsers(
        dest="lab_command", required=True, metavar="COMMAND", help="run: run the experiments; report: rebuild"
    )
    run = labsub.add_parser(
        "run",
        help="run every experiment (finished work in --out is reused)",
        description="Run the lab. Presets: tiny (one seed, minutes on a 2-core laptop: the README's main "
        "command), small (three seeds, larger sets; CPU, tens of minutes), gpu (a larger model, five seeds; "
        "sized for one GPU), smoke (seconds; checks the pipeline, its numbers mean nothing). Every finished "
        "job is cached under --out, so an interrupted run continues and a finished one only re-reports.",
    )
    run.add_argument("--preset", default="tiny", choices=list(PRESETS), help="size of the run (default tiny)")
    run.add_argument(
        "-o",
        "--output",
        "--out",
        dest="out",
        action=Once,
        default="ftrecycle-lab",
        help="run directory (default ./ftrecycle-lab)",
    )
    run.add_argument("--seeds", type=seeds_type, default=None, help="comma-separated seeds, overriding the preset's")
    run.add_argument(
        "--workers",
        type=bounded(Bound(int, lo=1, hi=MAX_WORKERS)),
        default=None,
        help="jobs at once (default: the preset's)",
    )
    run.add_argument("--force", action="store_true", help="discard a run of other settings in --out")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    rep = labsub.add_parser("report", help="rebuild report.md and the plots from a run's results.json")
    rep.add_argument("out", metavar="DIR", help="a lab run directory")


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # so that `kill` stops the worker processes too


def _lab_run(ns: argparse.Namespace) -> None:
    overrides: dict[str, Any] = {}
    if ns.seeds:
        overrides["seeds"] = ns.seeds
    if ns.workers is not None:
        overrides["workers"] = ns.workers
    cfg = preset(ns.preset, **overrides)
    signal.signal(signal.SIGTERM, _stop)
    bar = ProgressBar(f"lab {cfg.preset}", "job")
    try:
        result = run_lab(cfg, ns.out, force=ns.force, progress=None if ns.quiet else bar.jobs)
    finally:
        bar.close()
    if result.not_evidence:
        print(f"NOT EVIDENCE: {result.not_evidence}")
    for f in result.findings:
        print(f"finding {f['id']}: {'PASS' if f['passed'] else 'FAIL'}  {f['claim']}")
    print(f"report: {result.report}  ({result.jobs_run} jobs run, {result.seconds:.0f} s)")


def _lab(ns: argparse.Namespace) -> None:
    if ns.lab_command == "report":
        print(rebuild_report(ns.out))
    else:
        _lab_run(ns)


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o",
        "--output",
        "--out",
        dest="out",
        action=Once,
        default="ftrecycle-demo",
        help="working directory (default ./ftrecycle-demo)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing demo directory")


def _demo(ns: argparse.Namespace) -> None:
    for line in run_demo(ns.out, force=ns.force):
        print(line)


COMMANDS = (
    Command(
        "lab",
        "reproduce the paper's controlled experiments on small models made here",
        "The paper's controlled study in miniature, fully local: a tokenizer, two pretraining corpora and one "
        "small Llama pretrained here (versions M1-M3 along stage 1, M4-M5 along a math-rich stage 2), a "
        "GSM8K-format task, then (a) direct fine-tuning of every version, (b) the transfer matrix Mj + Δi, "
        "(c) recycling-then-fine-tuning for every pair, (d) iterative vs direct recycling, (e) a second "
        "language. Writes report.md (tables beside the paper's, four findings marked PASS/FAIL from this "
        "run's numbers), PNG plots and results.json.",
        _arguments,
        _lab,
    ),
    Command(
        "demo",
        "make three tiny models here and transfer between them",
        "Make a tiny base model, a fine-tuned copy and a newer base (random Llama-style weights, saved as "
        "safetensors), run `transfer`, then load the result with transformers and generate. Needs no network.",
        _demo_arguments,
        _demo,
    ),
)
