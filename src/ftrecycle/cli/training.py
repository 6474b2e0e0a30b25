"""Commands that train: finetune, recycle-finetune (transfer, then fine-tune), iterate (Algorithm 1).

The training settings are generated from :class:`ftrecycle.finetune.config.FinetuneConfig`'s
fields; recycle-finetune's transfer takes the same option groups as ``transfer``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ftrecycle.cli.args import add_group, bundle_from_args, group_from_args
from ftrecycle.cli.common import MODEL_HELP, Command, add_models, add_resources, resolve_alpha, resources
from ftrecycle.cli.trainfile import add_config_argument
from ftrecycle.evaluate.builtin import check_new_tokens
from ftrecycle.finetune.config import FinetuneConfig
from ftrecycle.finetune.train import finetune
from ftrecycle.options import Inputs, ModelFiles, Output, Policies, Precision, Scaling, TransferOptions
from ftrecycle.recycle import ChainSpec, describe_chain, iterate, plan_chain, recycle_finetune, summary_table


def report(result: Any) -> None:
    """The loss from first to last step, and each evaluation's accuracy."""
    first = result.losses[0][1] if result.losses else float("nan")
    last = result.losses[-1][1] if result.losses else float("nan")
    print(
        f"wrote {result.output}: {result.steps} steps, loss {first:.4f} -> {last:.4f}, "
        f"{result.seconds_per_step:.3f} s/step"
    )
    for e in result.eval_log:
        accuracy = f"  strict {100 * e['strict']:.1f}%  flexible {100 * e['flexible']:.1f}%" if "strict" in e else ""
        print(f"  step {e['step']}: eval loss {e['eval_loss']:.4f}{accuracy}")


def _run_arguments(p: argparse.ArgumentParser, *, allow_pickle: bool) -> None:
    """Data, output and run control of a fine-tuning run, then its generated training settings."""
    p.add_argument("--data", required=True, help="training data, JSONL")
    p.add_argument("-o", "--output", required=True, help="directory to create when training completes")
    p.add_argument(
        "--eval-data",
        default=None,
        help="held-out JSONL in any training format: its loss vs steps goes to eval_log.json "
        "(and GSM8K accuracy when it is GSM8K-format)",
    )
    add_config_argument(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--force", action="store_true", help="replace the output / discard an unfinished run")
    p.add_argument("--progress", action="store_true", help="show the training progress bar")
    add_group(p, Output, only=("record_paths",))
    if allow_pickle:
        p.add_argument(
            "--allow-pickle",
            action="store_true",
            help="accept .bin/.pt weights (transformers then unpickles them); off because pickles can run code",
        )
    add_group(p, FinetuneConfig, title="training settings (defaults follow the paper)", explain=True)


def finetune_config(ns: argparse.Namespace, model: str) -> FinetuneConfig:
    """The training settings the flags gave (each checked while parsing).

    Raises:
        ConfigError: ``--eval-max-new-tokens`` leaves ``model`` no room for a prompt.
    """
    cfg = group_from_args(FinetuneConfig, ns)
    if ns.eval_data is not None:  # refused now, not after training when the first evaluation runs
        check_new_tokens(model, cfg.eval_max_new_tokens, flag="--eval-max-new-tokens")
    return cfg


def _run_keywords(ns: argparse.Namespace) -> dict[str, Any]:
    """The run-control keywords :func:`_run_arguments` parsed, as finetune and recycle_finetune take them."""
    return {
        "eval_data": ns.eval_data,
        "resume": ns.resume,
        "force": ns.force,
        "progress": ns.progress,
        "allow_pickle": ns.allow_pickle,
    }


def _finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=f"the model to fine-tune: {MODEL_HELP}")
    _run_arguments(p, allow_pickle=True)


def _finetune(ns: argparse.Namespace) -> None:
    result = finetune(
        ns.model,
        ns.data,
        ns.output,
        config=finetune_config(ns, ns.model),
        record_paths=ns.record_paths,
        **_run_keywords(ns),
    )
    report(result)


def _recycle_arguments(p: argparse.ArgumentParser) -> None:
    add_models(p)
    add_group(p, Scaling)
    add_group(p, Precision)
    add_group(p, Policies)
    add_group(p, ModelFiles)
    add_resources(p)
    add_group(p, Inputs)  # --allow-pickle: for the transfer's and the training's reads alike
    _run_arguments(p, allow_pickle=False)


def _recycle(ns: argparse.Namespace) -> None:
    config = finetune_config(ns, ns.target_base)
    alpha = resolve_alpha(ns, inputs=(ns.data, ns.eval_data))
    # --force is the fine-tuning run's (replace its output); the transfer writes a fresh start directory
    options = bundle_from_args(
        TransferOptions,
        ns,
        scaling=Scaling(alpha=alpha),
        resources=resources(ns),
        output=Output(record_paths=ns.record_paths),
    )
    result = recycle_finetune(
        ns.source_base,
        ns.source_finetuned,
        ns.target_base,
        ns.data,
        ns.output,
        alpha=alpha,
        transfer=options,
        config=config,
        **_run_keywords(ns),
    )
    report(result)


def _iterate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("chain", metavar="CHAIN.yaml", help="the chain file")
    p.add_argument("-o", "--output", default=None, help="override the chain file's output directory")
    p.add_argument("--progress", action="store_true", help="show training (and transformers' loading) progress bars")
    p.add_argument(
        "--force", action="store_true", help="recompute the versions made with other settings instead of refusing"
    )
    p.add_argument(
        "--plan", action="store_true", help="list the steps: which would run and which are reused; run nothing"
    )


def _iterate(ns: argparse.Namespace) -> None:
    spec = ChainSpec.load(ns.chain, output=ns.output)
    if ns.plan:
        steps = plan_chain(spec)
        print("| step | what | output | status |\n|---|---|---|---|")
        for i, st in enumerate(steps, 1):
            print(f"| {i}/{len(steps)} | {st.what} | {st.output} | {st.status} |")
        return
    rows = iterate(spec, progress=ns.progress, force=ns.force, say=lambda line: print(line, file=sys.stderr))
    print(summary_table(rows, spec.mode, describe_chain(spec)), end="")


COMMANDS = (
    Command(
        "finetune",
        "supervised fine-tuning (Trainer; `accelerate launch` scales it)",
        "Fine-tune MODEL on JSONL data: prompt/completion, chat messages, or GSM8K question/answer lines; "
        "the loss is on completion tokens only, through the tokenizer's chat template when it has one. "
        "Checkpoints sit beside the output until it completes (--resume continues them).",
        _finetune_arguments,
        _finetune,
    ),
    Command(
        "recycle-finetune",
        "transfer, then fine-tune the result",
        "FT(TARGET + alpha * (FINETUNED - BASE)): the paper's recycling-then-fine-tuning. The transfer takes "
        "`ftrecycle transfer`'s options (--alpha auto with --calibration, --vocab overlap, ...). "
        "Resumable: a finished transfer is kept until fine-tuning completes.",
        _recycle_arguments,
        _recycle,
    ),
    Command(
        "iterate",
        "Algorithm 1: recycling-then-fine-tuning along a chain of versions",
        "Run the paper's iterative recycling-then-fine-tuning over versions M1..Mn named in CHAIN.yaml "
        "(keys: versions, data, output, mode: iterative|direct, eval_data, alpha: a number or auto with "
        "calibration: FILE, finetune: {settings}, transfer: {`ftrecycle transfer`'s options}, finetuned: an "
        "existing fine-tuning of M1 to use as M*1). "
        "Every M*i and delta is kept; rerunning resumes at the first unfinished version; summary.md/json "
        "tabulate the chain.",
        _iterate_arguments,
        _iterate,
    ),
)
