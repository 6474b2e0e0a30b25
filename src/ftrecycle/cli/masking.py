"""The gradient-sign mask on the command line: ``ftrecycle mask`` and ``transfer --mask grad-sign``.

``--mask`` itself is generated from :class:`ftrecycle.options.Masking` (a mask file); this module adds
``grad-sign`` (make the mask from ``--calibration`` on the target first, in a scratch directory beside
the output) and ``--mask-examples``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

from ftrecycle.cli.args import add_group, positive_int
from ftrecycle.cli.common import MODEL_HELP, Command
from ftrecycle.errors import ConfigError
from ftrecycle.finetune.gradmask import DEFAULT_MASK_EXAMPLES, DEFAULT_MICRO_BATCH, VOTES, grad_sign_mask
from ftrecycle.io.output import check_output, scratch_directory
from ftrecycle.options import Masking

GRAD_SIGN = "grad-sign"
EXAMPLES_HELP = (
    f"the labelled examples (the first ones of --calibration) the target's gradient is summed over "
    f"(default {DEFAULT_MASK_EXAMPLES}; GradFix uses tens)"
)


def add_mask_arguments(p: argparse.ArgumentParser, *, grad_sign: bool) -> None:
    """``--mask``, and where the command has the target and calibration data ``grad-sign`` and ``--mask-examples``."""
    add_group(p, Masking)
    if grad_sign:
        help = "with --mask grad-sign: " + EXAMPLES_HELP
        p.add_argument("--mask-examples", type=positive_int, default=None, metavar="N", help=help)


def check_mask_request(ns: argparse.Namespace) -> None:
    """Refuse ``--mask`` settings that cannot be carried out, before any model is read.

    Raises:
        ConfigError: ``grad-sign`` without ``--calibration`` (or where the command cannot make it), or
            ``--mask-examples`` without ``grad-sign``.
    """
    grad_sign = ns.mask == GRAD_SIGN
    if grad_sign and not hasattr(ns, "mask_examples"):
        raise ConfigError(
            "--mask grad-sign needs the target and calibration data: make the mask with `ftrecycle mask` "
            "and pass its file here"
        )
    if grad_sign and getattr(ns, "calibration", None) is None:
        raise ConfigError("--mask grad-sign needs --calibration FILE (labelled examples of the task, JSONL)")
    if not grad_sign and getattr(ns, "mask_examples", None) is not None:
        raise ConfigError("--mask-examples is only used with --mask grad-sign")


@contextlib.contextmanager
def resolved_mask(ns: argparse.Namespace) -> Iterator[str | None]:
    """The mask file the operation applies: ``--mask`` itself, or for ``grad-sign`` one made now on
    ``--target-base`` from ``--calibration``, in a scratch directory beside the output (removed at the end)."""
    if ns.mask != GRAD_SIGN:
        yield ns.mask
        return
    out = check_output(ns.output, [ns.target_base, ns.calibration], force=ns.force)
    with scratch_directory(out) as tmp:
        made = grad_sign_mask(ns.target_base, ns.calibration, tmp / "mask.safetensors", examples=_examples(ns))
        yield str(made.output)


def _examples(ns: argparse.Namespace) -> int:
    return DEFAULT_MASK_EXAMPLES if ns.mask_examples is None else int(ns.mask_examples)


# --------------------------------------------------------------------------------------------- mask


def _mask_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-base", required=True, metavar="C", help=f"the new base model: {MODEL_HELP}")
    p.add_argument(
        "--calibration",
        required=True,
        metavar="FILE",
        help="labelled examples of the task: JSONL in the fine-tuning formats (prompt/completion, messages, "
        "question/answer); the loss is on the completion tokens",
    )
    p.add_argument("--mask-examples", type=positive_int, default=None, metavar="N", help=EXAMPLES_HELP)
    p.add_argument("-o", "--output", required=True, metavar="MASK", help="the mask file to write (.safetensors)")
    p.add_argument(
        "--micro-batch",
        type=positive_int,
        default=DEFAULT_MICRO_BATCH,
        metavar="K",
        help=f"examples per forward/backward pass; memory only, the gradient is their sum "
        f"(default {DEFAULT_MICRO_BATCH})",
    )
    p.add_argument(
        "--vote",
        default="sum",
        choices=VOTES,
        help="how the examples' gradients give one sign: 'sum' (default): the sign of their summed gradient; "
        "'majority': a majority vote of each example's own sign (GradFix's few-sample estimator; one backward "
        "pass per example)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")
    p.add_argument("--force", action="store_true", help="replace the mask file if it exists (never an input)")


def _mask(ns: argparse.Namespace) -> None:
    res = grad_sign_mask(
        ns.target_base,
        ns.calibration,
        Path(ns.output),
        examples=_examples(ns),
        device=ns.device,
        micro_batch=ns.micro_batch,
        vote=ns.vote,
        force=ns.force,
    )
    print(
        f"wrote {res.output}: the sign of -grad ({ns.vote}) on {res.examples} example(s) for {res.tensors} tensors in "
        f"{res.seconds:.1f} s" + (f"; {len(res.skipped)} without a gradient (added whole)" if res.skipped else "")
    )


COMMANDS = (
    Command(
        "mask",
        "write the target's gradient-sign mask for `transfer --mask` (GradFix)",
        "Compute the gradient of TARGET's loss on the first N labelled examples of --calibration (the model "
        "loaded once; CUDA when present) and write sign(-gradient) per tensor as an int8 safetensors file. "
        "`transfer --mask MASK` / `apply --mask MASK` then keep each diff entry only where its sign agrees "
        "with the target's descent direction (GradFix, ICLR 2026), and record the mask in ftrecycle.json.",
        _mask_arguments,
        _mask,
    ),
)
