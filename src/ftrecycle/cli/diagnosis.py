"""``ftrecycle diagnose``: will a transfer help? Geometry of the diff and the drift, and a loss probe."""

from __future__ import annotations

import argparse
import json
import math
import sys

from ftrecycle.cli.args import bounded, device_type, png_path, positive_int, token_count
from ftrecycle.cli.common import Command, Once, add_models
from ftrecycle.diagnose.accuracy import PROBE_ITEMS, PROBE_NEW_TOKENS
from ftrecycle.diagnose.plot import plot_layers
from ftrecycle.diagnose.probe import ALPHAS
from ftrecycle.diagnose.tokens import format_token_rows, input_warnings, token_rows
from ftrecycle.diagnose.verdict import diagnose, format_diagnosis
from ftrecycle.errors import ConfigError
from ftrecycle.io.output import check_no_overlap
from ftrecycle.options import NONNEGATIVE_INT

#: `diagnose --data`'s default --max-examples
DEFAULT_PROBE_EXAMPLES = 256
#: the most points of an --alphas grid
MAX_ALPHAS = 64


def alpha_grid(text: str) -> tuple[float, ...]:
    """``--alphas``: comma-separated finite numbers, at least two and at most :data:`MAX_ALPHAS`, each once."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 0,1,2") from None
    if not 2 <= len(values) <= MAX_ALPHAS or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give 2 to {MAX_ALPHAS} finite numbers")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r} names a value twice")
    return tuple(sorted(values))


def _arguments(p: argparse.ArgumentParser) -> None:
    add_models(p)
    p.add_argument(
        "--calibration",
        "--data",
        dest="data",
        action=Once,
        default=None,
        metavar="CALIB",
        help="calibration JSONL, as transfer --calibration takes it (enables the loss probe; --data: the older name)",
    )
    p.add_argument(
        "--max-examples", type=positive_int, default=None, help="calibration examples the loss probe uses (default 256)"
    )
    p.add_argument(
        "--probe-items",
        type=bounded(NONNEGATIVE_INT),
        default=None,
        metavar="K",
        help=f"calibration items with GSM8K-style '#### N' answers on which C and C + diff answer greedily, "
        f"scored by exact match: the accuracy probe the verdict rests on beside the loss (default {PROBE_ITEMS}; "
        "0 turns it off; ignored for data without answers)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=token_count,
        default=None,
        help=f"most new tokens per answer the accuracy probe generates (default {PROBE_NEW_TOKENS})",
    )
    p.add_argument(
        "--alphas",
        type=alpha_grid,
        default=None,
        metavar="A,B,...",
        help=f"the α grid of the loss probe (default {','.join(f'{a:g}' for a in ALPHAS)}); a warning says when the "
        "best α is at its edge",
    )
    p.add_argument("--device", type=device_type, default=None, help="the probe's device (default: CUDA when available)")
    p.add_argument(
        "--plot",
        type=png_path,
        default=None,
        metavar="PNG",
        help="also draw drift, diff size and cos by layer into this PNG (its directory must exist)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")


def _run(ns: argparse.Namespace) -> None:
    if ns.data is None:
        flags = (
            ("--device", ns.device),
            ("--max-examples", ns.max_examples),
            ("--probe-items", ns.probe_items),
            ("--max-new-tokens", ns.max_new_tokens),
            ("--alphas", ns.alphas),
        )
        probe_only = [f for f, v in flags if v is not None]
        if probe_only:
            raise ConfigError(f"{' and '.join(probe_only)} set(s) the loss probe, which needs --calibration CALIB")
    if ns.plot:
        # the plot replaces its path: it must not be, or be inside, a model or the data
        check_no_overlap(ns.plot, [ns.source_base, ns.source_finetuned, ns.target_base, ns.data], what="plot")
    d = diagnose(
        ns.source_base,
        ns.source_finetuned,
        ns.target_base,
        data=ns.data,
        max_examples=DEFAULT_PROBE_EXAMPLES if ns.max_examples is None else ns.max_examples,
        device=ns.device,
        probe_items=PROBE_ITEMS if ns.probe_items is None else ns.probe_items,
        max_new_tokens=PROBE_NEW_TOKENS if ns.max_new_tokens is None else ns.max_new_tokens,
        alphas=ALPHAS if ns.alphas is None else ns.alphas,
    )
    if ns.plot:
        plot_layers(d.geometry, ns.plot, d.probe)
    rows = token_rows(ns.source_base, ns.source_finetuned, ns.target_base)
    warnings = input_warnings(ns.source_base, ns.source_finetuned, ns.target_base, d.geometry.total)
    for w in warnings:
        print(f"ftrecycle: warning: {w}", file=sys.stderr)
    if ns.json:
        print(json.dumps({**d.to_json(), "token_rows": rows.to_json(), "warnings": warnings}, indent=1))
    else:
        print(format_diagnosis(d) + "\n" + format_token_rows(rows), end="")


COMMANDS = (
    Command(
        "diagnose",
        "predict whether a transfer will help, before evaluating it",
        "Measure how the source's diff relates to the version drift (streamed, bounded memory): relative "
        "drift |C-A|/|A|, diff size |B-A|/|A|, cos(diff, drift) and sign agreement, in total, by module type "
        "and by layer. With --data (a few hundred examples of your task, in a fine-tuning format) also probe "
        "the loss along the straight path A -> C (barrier) and the loss of C + alpha*diff on a grid of alpha; "
        "when the data's items carry GSM8K-style answers ('#### N'), also the accuracy of C and of C + diff on "
        "the first --probe-items of them (greedy answers, exact match). Prints a verdict (likely helps / "
        "uncertain / likely hurts) with its reasons and two scores: 'score' (the calibration loss's relative "
        "drop) and 'accuracy_gain'. 'likely helps' needs the loss to fall and the accuracy not to; without "
        "answers in the data, 'likely helps' also needs the geometry to agree. Also: the embedding and head rows "
        "that look untrained in each model (norm < 10 % of the median row norm, or identical in the source base "
        "and the target) with the special tokens among them (see `transfer --token-rows`); and warnings where "
        "the inputs look mistaken: a fine-tuned model whose record names another base, swapped source models, "
        "tokenizers that map shared ids to other tokens, a zero diff.",
        _arguments,
        _run,
    ),
)
