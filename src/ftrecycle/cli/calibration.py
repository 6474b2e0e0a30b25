"""Calibration on the command line: ``ftrecycle calibrate`` and ``ftrecycle diff --calibration FILE``.

``calibrate`` distils a compressed delta's scales (BitDelta) into a new delta, or, with
``--sensitivity OUT.json``, writes each weight's sensitivity for ``--compress auto``'s budget.
The library side is :mod:`ftrecycle.finetune.calibrate`.
"""

from __future__ import annotations

import argparse
from typing import Any

from ftrecycle.cli.args import batch_size, bounded, bundle_from_args, device_type, thread_count, token_count
from ftrecycle.cli.common import MODEL_HELP, Command, add_source_pair, resources, write_progress
from ftrecycle.errors import ConfigError
from ftrecycle.finetune.calibrate import (
    CALIBRATION_DTYPES,
    DEFAULT_BATCH_SIZE,
    DEFAULT_LR,
    DEFAULT_MAX_LENGTH,
    DEFAULT_STEPS,
    CalibrationResult,
    calibrate,
    calibrated_diff,
    sensitivity,
    write_sensitivity,
)
from ftrecycle.io.output import check_no_overlap
from ftrecycle.options import NONNEGATIVE_INT, POSITIVE_FLOAT, DiffOptions

CALIBRATION_HELP = (
    "JSONL calibration texts (prompt/completion, messages or question/answer lines; each whole example is one text)"
)


def add_training(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The distillation's settings (BitDelta's defaults), shared by ``calibrate`` and ``diff --calibration``."""
    p.add_argument(
        "--steps", type=bounded(NONNEGATIVE_INT), default=DEFAULT_STEPS, help=f"Adam steps (default {DEFAULT_STEPS})"
    )
    p.add_argument(
        "--lr", type=bounded(POSITIVE_FLOAT), default=DEFAULT_LR, help=f"Adam's learning rate (default {DEFAULT_LR:g})"
    )
    p.add_argument(
        "--max-length",
        type=token_count,
        default=DEFAULT_MAX_LENGTH,
        help=f"tokens kept per calibration text (default {DEFAULT_MAX_LENGTH})",
    )
    p.add_argument(
        "--calibration-batch-size",
        type=batch_size,
        default=DEFAULT_BATCH_SIZE,
        help=f"texts per step (default {DEFAULT_BATCH_SIZE})",
    )
    p.add_argument("--device", type=device_type, default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument(
        "--calibration-dtype",
        choices=CALIBRATION_DTYPES,
        default="float32",
        help="the models' compute dtype while calibrating (default float32)",
    )


def _training(ns: argparse.Namespace) -> dict[str, Any]:
    return {
        "steps": ns.steps,
        "lr": ns.lr,
        "max_length": ns.max_length,
        "batch_size": ns.calibration_batch_size,
        "device": ns.device,
        "dtype": ns.calibration_dtype,
    }


def report(result: CalibrationResult) -> None:
    """One line: the output, the steps, the KL before and after."""
    print(
        f"wrote {result.output}: {len(result.calibrated)} tensors calibrated in {result.steps} steps, "
        f"KL {result.loss_before:.5f} -> {result.loss_after:.5f} per token ({result.seconds:.1f} s)"
    )


# --------------------------------------------------------------------------------------------- calibrate


def _calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", required=True, metavar="FILE", help=CALIBRATION_HELP)
    p.add_argument("--delta", default=None, metavar="DELTA", help="the compressed delta to calibrate")
    add_source_pair(
        p, required=False, base_help=f"the delta's base model: {MODEL_HELP}", finetuned_help="the fine-tuned model"
    )
    p.add_argument("-o", "--output", default=None, metavar="OUT", help="the calibrated delta directory to create")
    p.add_argument(
        "--sensitivity",
        default=None,
        metavar="OUT.json",
        help="instead: write each 2-D weight's sensitivity (mean squared gradient of the LM loss on the "
        "calibration texts) of --model, the weights file of --compress auto",
    )
    p.add_argument("--model", default=None, metavar="M", help="--sensitivity: the model (the fine-tuned one)")
    p.add_argument("--threads", type=thread_count, default=1, help="threads for the checksums (default 1)")
    p.add_argument("--force", action="store_true", help="replace the output")
    add_training(p)


def _calibrate(ns: argparse.Namespace) -> None:
    train = _training(ns)
    if ns.sensitivity is not None:
        if ns.model is None or any(x is not None for x in (ns.delta, ns.base, ns.finetuned, ns.output)):
            raise ConfigError("--sensitivity takes --model and --calibration (not --delta/--base/--finetuned/-o)")
        inputs = (ns.model, ns.calibration)
        check_no_overlap(ns.sensitivity, inputs, what="--sensitivity")  # before the work, not after
        weights = sensitivity(
            ns.model,
            ns.calibration,
            max_length=train["max_length"],
            device=train["device"],
            dtype=train["dtype"],
        )
        out = write_sensitivity(ns.sensitivity, weights, inputs=inputs, force=ns.force)
        print(f"wrote {out}: the sensitivities of {len(weights)} tensors")
        return
    given = (("--delta", ns.delta), ("--source-base", ns.base), ("--source-finetuned", ns.finetuned))
    missing = [f for f, v in given if v is None]
    if ns.output is None:
        missing.append("-o/--output")
    if missing or ns.model is not None:
        raise ConfigError(
            "calibrate takes --delta, --source-base, --source-finetuned, -o and --calibration "
            "(or --sensitivity with --model); "
            f"missing: {', '.join(missing) or 'none'}"
        )
    result = calibrate(
        ns.delta, ns.base, ns.finetuned, ns.calibration, ns.output, threads=ns.threads, force=ns.force, **train
    )
    report(result)


# --------------------------------------------------------------------------------------------- diff --calibration


def add_diff_calibration(p: argparse.ArgumentParser) -> None:
    """``diff``'s ``--calibration FILE`` and the distillation's settings."""
    g = p.add_argument_group("calibration (a compressed delta's scales distilled on texts, as BitDelta)")
    g.add_argument(
        "--calibration",
        default=None,
        metavar="FILE",
        help=CALIBRATION_HELP + "; with --compress: the delta's scales are then tuned so the compressed model's "
        "logits match the fine-tuned model's (and --compress auto weighs tensors by their sensitivity)",
    )
    add_training(g)


def diff_calibrated(ns: argparse.Namespace) -> None:
    """Run ``diff --calibration``: diff into a scratch directory, calibrate into the output, report."""
    options = bundle_from_args(DiffOptions, ns, resources=resources(ns))
    progress = write_progress(ns.quiet)
    _, result = calibrated_diff(
        ns.base, ns.finetuned, ns.output, ns.calibration, options=options, progress=progress, **_training(ns)
    )
    report(result)


COMMANDS = (
    Command(
        "calibrate",
        "distil a compressed delta's scales on calibration texts (BitDelta), or write sensitivities",
        "Tune the scales of a compressed delta (one gain per row or per matrix, as each codec stores them) "
        "with Adam so that BASE + delta's logits match FINETUNED's on the calibration texts (KL per token), "
        "and write the calibrated delta (same format and size) with the settings and losses in its manifest. "
        "With --sensitivity OUT.json --model M: write each 2-D weight's mean squared gradient of the LM loss "
        "(a diagonal Fisher estimate), the weights file of --compress auto.",
        _calibrate_arguments,
        _calibrate,
    ),
)
