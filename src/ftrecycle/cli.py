"""The ``ftrecycle`` command: parse, validate, call the library, print.

Only this module prints or exits. Library errors (:class:`FtRecycleError`) become
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ftrecycle import __version__
from ftrecycle.argtypes import (
    Parser,
    alpha_type,
    batch_size,
    bounded,
    check_paths,
    compression_type,
    device_type,
    finite_float,
    png_path,
    positive_int,
    seeds_type,
    size_type,
    thread_count,
    token_count,
)
from ftrecycle.errors import ConfigError, FtRecycleError
from ftrecycle.options import DEFAULT_MAX_MEMORY, DEFAULT_SHARD_SIZE, Bound

MODEL_HELP = "a local model directory, or a Hugging Face Hub id org/name[@revision]"
INTERNAL_ERROR_EXIT = 3
DEBUG_ENV = "FTRECYCLE_DEBUG"
#: `diagnose --data`'s default --max-examples
DEFAULT_PROBE_EXAMPLES = 256
#: `eval --builtin`'s default --max-new-tokens (lm-eval's default generation length)
DEFAULT_NEW_TOKENS = 256


def _progress(quiet: bool) -> Callable[[int, int], None] | None:
    if quiet:
        return None
    bar: list[Any] = []

    def update(n: int, total: int) -> None:
        if not bar:
            from tqdm import tqdm

            bar.append(
                tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc="writing",
                    disable=None,
                    file=sys.stderr,
                )
            )
        bar[0].update(n)
        if bar[0].n >= total:
            bar[0].close()

    return update


def _write_options(p: argparse.ArgumentParser, *, delta: bool = False) -> None:
    g = p.add_argument_group("numerics")
    if not delta:
        g.add_argument(
            "--alpha",
            type=alpha_type,
            default=1.0,
            help="scale of the diff: out = target + alpha * diff (default 1.0); `transfer` also takes 'auto': "
            "the alpha of lowest loss on --calibration data (see `ftrecycle diagnose`)",
        )
    g.add_argument(
        "--compute-dtype",
        default="float32",
        choices=["float32", "float64"],
        help="dtype of the arithmetic; each operation is rounded to it (default float32)",
    )
    if delta:
        g.add_argument(
            "--delta-dtype",
            default="float32",
            choices=["float32", "float64", "bfloat16", "float16"],
            help="dtype the diff is stored in; float32 makes `apply` to the base give back the "
            "fine-tuned bf16/fp16 model bit for bit (default float32)",
        )
        g.add_argument(
            "--compress",
            default=None,
            type=compression_type,
            metavar="SPEC",
            help="store each 2-D tensor compressed: lowrank:rank=R, lowrank:energy=E (smallest rank keeping "
            "that share of the squared norm), lowrank:ratio=X or sparse:ratio=X (X times smaller than dense), "
            "sparse:density=D (largest-magnitude entries), int8 (per-row scale) or sign (1 bit + one scale, "
            "as BitDelta); 1-D tensors stay dense. `inspect` shows each tensor's error (default: dense)",
        )
    else:
        g.add_argument(
            "--out-dtype",
            default=None,
            choices=["float32", "float64", "bfloat16", "float16"],
            help="dtype of floating output tensors (default: each target tensor's own dtype)",
        )
    g.add_argument(
        "--allow-nonfinite", action="store_true", help="write results containing NaN or infinity instead of failing"
    )
    m = p.add_argument_group("mismatches between the models")
    m.add_argument(
        "--vocab",
        default="error",
        choices=["error", "overlap"],
        help="when embedding/lm_head rows differ (a vocabulary that grew): 'error' (default) or "
        "'overlap': apply the diff to the shared rows and keep the target's other rows; recorded",
    )
    m.add_argument(
        "--on-missing",
        default="error",
        choices=["error", "keep-target"],
        help="when tensor names differ: 'error' (default, lists them) or 'keep-target': copy "
        "target-only tensors, drop diff-only ones; recorded",
    )
    if not delta:
        m.add_argument(
            "--tie-mismatch",
            default="error",
            choices=["error", "untie", "embed-only"],
            help="when the source has its own lm_head but the target ties it to the embedding: "
            "'untie' writes lm_head = target embedding + its diff and sets tie_word_embeddings "
            "false; 'embed-only' keeps the target tied and drops lm_head's diff (default: error)",
        )
        f = p.add_argument_group("non-weight files")
        f.add_argument(
            "--config-from",
            default="target",
            choices=["target", "finetuned"],
            help="copy config.json and generation_config.json from the target (default: right rope "
            "and context settings of the new version) or from the fine-tuned model",
        )
        f.add_argument(
            "--tokenizer-from",
            default="target",
            choices=["target", "finetuned"],
            help="copy tokenizer files from the target (default) or the fine-tuned model; for an "
            "instruct source, 'finetuned' brings its chat template, which is often what you want",
        )
    r = p.add_argument_group("resources and output")
    r.add_argument(
        "--shard-size",
        default=DEFAULT_SHARD_SIZE,
        type=size_type("--shard-size"),
        help=f"largest output shard, e.g. 5GB or 500MiB (default {DEFAULT_SHARD_SIZE})",
    )
    r.add_argument(
        "--max-memory",
        default=None,
        type=size_type("--max-memory"),
        help="peak resident memory of this command; buffers are sized to fit it "
        f"(default: {DEFAULT_MAX_MEMORY} of buffers on top of what the process already holds)",
    )
    r.add_argument(
        "--threads", type=thread_count, default=None, help="worker threads (default: available cores, at most 1024)"
    )
    r.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    r.add_argument("--fsync", action="store_true", help="flush the output to disk before the final rename")
    r.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept .bin/.pt weights, loaded with torch.load(weights_only=True); off because pickles can run code",
    )
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ftrecycle`` command."""
    parser = Parser(
        prog="ftrecycle",
        description="Recycle fine-tuning across versions of a language model: move the diff vector "
        "(fine-tuned minus base) of one version onto the next version's base.",
    )
    parser.add_argument("--version", action="version", version=f"ftrecycle {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "transfer",
        help="write target + alpha * (finetuned - base)",
        description="Write TARGET + alpha * (FINETUNED - BASE) as a new Hugging Face model "
        "directory, tensor by tensor with bounded memory. The output appears only when "
        "complete; ftrecycle.json in it records inputs, options and every adapted tensor.",
    )
    t.add_argument("--source-base", required=True, metavar="A", help=f"the source version's base model: {MODEL_HELP}")
    t.add_argument(
        "--source-finetuned",
        required=True,
        metavar="B",
        help="the source version's fine-tuned model, or a PEFT LoRA adapter directory over A",
    )
    t.add_argument("--target-base", required=True, metavar="C", help="the new version's base model")
    t.add_argument("-o", "--output", required=True, metavar="OUT", help="the directory to create")
    _write_options(t)
    t.add_argument(
        "--calibration",
        default=None,
        metavar="CALIB",
        help="with --alpha auto: JSONL examples of the task (fine-tuning formats) to choose alpha on",
    )
    t.add_argument(
        "--compress",
        default=None,
        type=compression_type,
        metavar="SPEC",
        help="transfer the diff as it would be shipped compressed (a `diff --compress` SPEC, bf16 parts): "
        "shows what a compressed delta costs in quality before you share one",
    )

    d = sub.add_parser(
        "diff",
        help="store finetuned - base as a delta directory",
        description="Write the diff vector FINETUNED - BASE as a delta directory (safetensors "
        "shards + ftrecycle-delta.json manifest) for `ftrecycle apply`.",
    )
    d.add_argument("--base", required=True, metavar="A", help=f"the base model: {MODEL_HELP}")
    d.add_argument(
        "--finetuned", required=True, metavar="B", help="the fine-tuned model, or a PEFT LoRA adapter directory over A"
    )
    d.add_argument("-o", "--output", required=True, metavar="DELTA", help="the delta directory to create")
    _write_options(d, delta=True)

    a = sub.add_parser(
        "apply",
        help="write target + alpha * delta",
        description="Write TARGET + alpha * DELTA as a new model directory, for a delta made by "
        "`ftrecycle diff`. --config-from/--tokenizer-from finetuned use the fine-tuned "
        "model's files stored in the delta.",
    )
    a.add_argument("--delta", required=True, metavar="DELTA", help="a delta directory made by `ftrecycle diff`")
    a.add_argument("--target-base", required=True, metavar="C", help=f"the new base model: {MODEL_HELP}")
    a.add_argument("-o", "--output", required=True, metavar="OUT", help="the directory to create")
    a.add_argument(
        "--no-verify", action="store_true", help="skip checking the delta's SHA-256 checksums (one read of the delta)"
    )
    _write_options(a)

    ins = sub.add_parser(
        "inspect",
        help="describe a delta: provenance, compression, sizes, per-tensor norms and errors",
        description="Print a delta directory's manifest: the base and fine-tuned models (ids, revisions, "
        "architecture), dtype, compression and size ratio, and each tensor's shape, storage, norm and "
        "relative reconstruction error. Every tensor's checksum is verified first.",
    )
    ins.add_argument("delta", metavar="DELTA", help="a delta directory")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.add_argument("--all", action="store_true", help="list every tensor (default: the first 40)")
    ins.add_argument("--no-verify", action="store_true", help="skip the checksums")

    ex = sub.add_parser(
        "export-lora",
        help="write a delta's linear-layer updates as a PEFT LoRA adapter",
        description="Factorise each linear weight's diff at RANK (truncated SVD) and write a PEFT LoRA adapter "
        "directory that peft.PeftModel.from_pretrained(target, ADAPTER) loads, so target + delta can be "
        "served as an adapter (vLLM, lm-eval peft=). Embeddings, the output head and 1-D tensors cannot be "
        "held by a LoRA: they are left out and listed, with their share of the diff, in ftrecycle.json.",
    )
    ex.add_argument("--delta", required=True, metavar="DELTA", help="a delta directory made by `ftrecycle diff`")
    ex.add_argument("--rank", required=True, type=positive_int, metavar="R", help="the LoRA rank")
    ex.add_argument("-o", "--output", required=True, metavar="ADAPTER", help="the adapter directory to create")
    ex.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="factor dtype")
    ex.add_argument(
        "--threads", type=thread_count, default=None, help="worker threads (default: available cores, at most 1024)"
    )
    ex.add_argument("--force", action="store_true", help="replace the output directory if it exists")

    dg = sub.add_parser(
        "diagnose",
        help="predict whether a transfer will help, before evaluating it",
        description="Measure how the source's diff relates to the version drift (streamed, bounded memory): "
        "relative drift |C-A|/|A|, diff size |B-A|/|A|, cos(diff, drift) and sign agreement, in total, by "
        "module type and by layer. With --data (a few hundred examples of your task, in a fine-tuning "
        "format) also probe the loss along the straight path A -> C (barrier) and the loss of C + alpha*diff "
        "on a grid of alpha. Prints a verdict (likely helps / uncertain / likely hurts) with its reasons.",
    )
    dg.add_argument("--source-base", required=True, metavar="A", help=f"the source's base model: {MODEL_HELP}")
    dg.add_argument("--source-finetuned", required=True, metavar="B", help="the source's fine-tuned model")
    dg.add_argument("--target-base", required=True, metavar="C", help="the new base model")
    dg.add_argument("--data", default=None, metavar="CALIB", help="calibration JSONL (enables the loss probe)")
    dg.add_argument("--max-examples", type=positive_int, default=None, help="calibration examples used (default 256)")
    dg.add_argument(
        "--device", type=device_type, default=None, help="the probe's device (default: CUDA when available)"
    )
    dg.add_argument(
        "--plot",
        type=png_path,
        default=None,
        metavar="PNG",
        help="also draw drift, diff size and cos by layer into this PNG (its directory must exist)",
    )
    dg.add_argument("--json", action="store_true", help="print JSON instead of markdown")

    demo = sub.add_parser(
        "demo",
        help="make three tiny models here and transfer between them",
        description="Make a tiny base model, a fine-tuned copy and a newer base (random Llama-style "
        "weights, saved as safetensors), run `transfer`, then load the result with "
        "transformers and generate. Needs no network.",
    )
    demo.add_argument("--out", default="ftrecycle-demo", help="working directory (default ./ftrecycle-demo)")
    demo.add_argument("--force", action="store_true", help="replace an existing demo directory")

    ft = sub.add_parser(
        "finetune",
        help="supervised fine-tuning (Trainer; `accelerate launch` scales it)",
        description="Fine-tune MODEL on JSONL data: prompt/completion, chat messages, or GSM8K "
        "question/answer lines; the loss is on completion tokens only, through the "
        "tokenizer's chat template when it has one. Checkpoints sit beside the output "
        "until it completes (--resume continues them).",
    )
    ft.add_argument("--model", required=True, help=f"the model to fine-tune: {MODEL_HELP}")
    _finetune_options(ft)

    rf = sub.add_parser(
        "recycle-finetune",
        help="transfer, then fine-tune the result",
        description="FT(TARGET + alpha * (FINETUNED - BASE)): the paper's recycling-then-fine-tuning. "
        "Resumable: a finished transfer is kept until fine-tuning completes.",
    )
    rf.add_argument("--source-base", required=True, metavar="A", help=f"source base: {MODEL_HELP}")
    rf.add_argument("--source-finetuned", required=True, metavar="B", help="source fine-tuned model")
    rf.add_argument("--target-base", required=True, metavar="C", help="the new base model")
    rf.add_argument("--alpha", type=finite_float, default=1.0, help="scale of the diff (default 1.0)")
    _finetune_options(rf)

    it = sub.add_parser(
        "iterate",
        help="Algorithm 1: recycling-then-fine-tuning along a chain of versions",
        description="Run the paper's iterative recycling-then-fine-tuning over versions M1..Mn named "
        "in CHAIN.yaml (keys: versions, data, output, mode: iterative|direct, eval_data, "
        "alpha, finetune: {settings}). Every M*i and delta is kept; rerunning resumes at "
        "the first unfinished version; summary.md/json tabulate the chain.",
    )
    it.add_argument("chain", metavar="CHAIN.yaml", help="the chain file")
    it.add_argument("-o", "--output", default=None, help="override the chain file's output directory")
    it.add_argument("--progress", action="store_true", help="show training progress bars")
    it.add_argument(
        "--force", action="store_true", help="recompute the versions made with other settings instead of refusing"
    )

    ev = sub.add_parser(
        "eval",
        help="benchmarks through lm-evaluation-harness, or the fast built-in GSM8K scorer",
        description="Evaluate models with lm-eval's Python API using the paper's settings "
        "(gsm8k: 8-shot CoT; math500: 4-shot; arc_challenge: 25-shot; gpqa: 0-shot "
        "diamond; mmlu: 5-shot; ifeval; global_mmlu:LANG), or tasks defined in "
        "--task-dir YAMLs over local files. --builtin FILE scores GSM8K-format JSONL in "
        "process instead. Prints models as rows and tasks as columns.",
    )
    ev.add_argument("--model", action="append", required=True, help="a model (repeat for a side-by-side table)")
    ev.add_argument("--tasks", default="", help="comma-separated task names")
    ev.add_argument("--task-dir", default=None, help="directory of lm-eval task YAMLs (offline use)")
    ev.add_argument(
        "--builtin",
        default=None,
        metavar="FILE",
        help="score GSM8K-format JSONL with the built-in evaluator instead of lm-eval",
    )
    ev.add_argument("--batch-size", type=batch_size, default=16, help="generation batch size (at most 65536)")
    ev.add_argument("--limit", type=positive_int, default=None, help="only the first N items of each task")
    ev.add_argument(
        "--max-new-tokens",
        type=token_count,
        default=None,
        help="built-in evaluator: most new tokens (default 256; at most 131072, and less than the model's "
        "context); lm-eval tasks keep their own generation length",
    )
    ev.add_argument("--device", type=device_type, default=None, help="cpu, cuda, ... (default: CUDA when available)")
    ev.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "hf", "vllm"],
        help="lm-eval model backend: auto takes vLLM when it is installed and a GPU is present",
    )
    ev.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    ev.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off)")
    _lab_parser(sub)
    check_paths(parser)
    return parser


def _auto_alpha(ns: argparse.Namespace) -> float:
    from ftrecycle.errors import ConfigError

    if ns.alpha != "auto":
        if ns.calibration is not None:
            raise ConfigError("--calibration is only used with --alpha auto")
        return float(ns.alpha)
    if ns.calibration is None:
        raise ConfigError("--alpha auto needs --calibration CALIB (JSONL examples of the task)")
    from ftrecycle.diagnose.verdict import best_alpha
    from ftrecycle.io.output import check_output

    # before the search: the calibration file is an input the output must not touch either
    inputs = [ns.source_base, ns.source_finetuned, ns.target_base, ns.calibration]
    check_output(ns.output, inputs, force=ns.force)

    pr = best_alpha(ns.source_base, ns.source_finetuned, ns.target_base, ns.calibration)
    losses = ", ".join(f"{a:g}: {lo:.4f}" for a, lo in pr.alphas)
    print(f"alpha auto: {pr.best_alpha:g} (calibration loss by alpha: {losses})", file=sys.stderr)
    return pr.best_alpha


def _diagnose(ns: argparse.Namespace) -> None:
    import json

    from ftrecycle.diagnose.verdict import diagnose, format_diagnosis

    if ns.data is None:
        probe_only = [f for f, v in (("--device", ns.device), ("--max-examples", ns.max_examples)) if v is not None]
        if probe_only:
            raise ConfigError(f"{' and '.join(probe_only)} set(s) the loss probe, which needs --data CALIB")
    if ns.plot:
        from ftrecycle.io.output import check_no_overlap

        # the plot replaces its path: it must not be, or be inside, a model or the data
        check_no_overlap(ns.plot, [ns.source_base, ns.source_finetuned, ns.target_base, ns.data], what="plot")
    d = diagnose(
        ns.source_base,
        ns.source_finetuned,
        ns.target_base,
        data=ns.data,
        max_examples=DEFAULT_PROBE_EXAMPLES if ns.max_examples is None else ns.max_examples,
        device=ns.device,
    )
    if ns.plot:
        from ftrecycle.diagnose.plot import plot_layers

        plot_layers(d.geometry, ns.plot)
    print(json.dumps(d.to_json(), indent=1) if ns.json else format_diagnosis(d), end="" if not ns.json else "\n")


def _lab_parser(sub: Any) -> None:
    from ftrecycle.lab.config import PRESETS

    lab = sub.add_parser(
        "lab",
        help="reproduce the paper's controlled experiments on small models made here",
        description="The paper's controlled study in miniature, fully local: a tokenizer, two pretraining "
        "corpora and one small Llama pretrained here (versions M1-M3 along stage 1, M4-M5 along a math-rich "
        "stage 2), a GSM8K-format task, then (a) direct fine-tuning of every version, (b) the transfer matrix "
        "Mj + Δi, (c) recycling-then-fine-tuning for every pair, (d) iterative vs direct recycling, (e) a "
        "second language. Writes report.md (tables beside the paper's, four findings marked PASS/FAIL from "
        "this run's numbers), PNG plots and results.json.",
    )
    labsub = lab.add_subparsers(
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
    run.add_argument("--out", default="ftrecycle-lab", help="run directory (default ./ftrecycle-lab)")
    run.add_argument("--seeds", type=seeds_type, default=None, help="comma-separated seeds, overriding the preset's")
    run.add_argument(
        "--workers", type=bounded(Bound(int, lo=1, hi=256)), default=None, help="jobs at once (default: the preset's)"
    )
    run.add_argument("--force", action="store_true", help="discard a run of other settings in --out")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    rep = labsub.add_parser("report", help="rebuild report.md and the plots from a run's results.json")
    rep.add_argument("out", metavar="DIR", help="a lab run directory")


def _lab(ns: argparse.Namespace) -> None:
    if ns.lab_command == "report":
        from ftrecycle.lab.run import rebuild_report

        print(rebuild_report(ns.out))
        return
    from ftrecycle.lab import preset, run_lab

    overrides: dict[str, Any] = {}
    if ns.seeds:
        overrides["seeds"] = ns.seeds
    if ns.workers is not None:
        overrides["workers"] = ns.workers
    cfg = preset(ns.preset, **overrides)
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # so that `kill` stops the worker processes too

    signal.signal(signal.SIGTERM, stop)
    bar: list[Any] = []

    def progress(done: int, total: int, job: str) -> None:
        if ns.quiet:
            return
        if not bar:
            from tqdm import tqdm

            bar.append(tqdm(total=total, desc=f"lab {cfg.preset}", unit="job", file=sys.stderr))
        bar[0].total = total
        bar[0].n = done
        bar[0].set_postfix_str(job.split(":", 1)[-1])
        bar[0].refresh()

    result = run_lab(cfg, ns.out, force=ns.force, progress=progress)
    if bar:
        bar[0].close()
    if result.not_evidence:
        print(f"NOT EVIDENCE: {result.not_evidence}")
    for f in result.findings:
        print(f"finding {f['id']}: {'PASS' if f['passed'] else 'FAIL'}  {f['claim']}")
    print(f"report: {result.report}  ({result.jobs_run} jobs run, {result.seconds:.0f} s)")


def _finetune_options(p: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from ftrecycle.finetune.config import FinetuneConfig, flag_name

    p.add_argument("--data", required=True, help="training data, JSONL")
    p.add_argument("-o", "--output", required=True, help="directory to create when training completes")
    p.add_argument("--eval-data", default=None, help="GSM8K-format JSONL: accuracy vs steps goes to eval_log.json")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--force", action="store_true", help="replace the output / discard an unfinished run")
    p.add_argument("--progress", action="store_true", help="show the training progress bar")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept .bin/.pt weights (transformers then unpickles them); off because pickles can run code",
    )
    g = p.add_argument_group("training settings (defaults follow the paper)")
    defaults = FinetuneConfig()
    for f in fields(FinetuneConfig):
        flag = flag_name(f.name)
        value = getattr(defaults, f.name)
        bound: Bound | None = f.metadata.get("bound")
        if isinstance(value, bool):
            g.add_argument(flag, action="store_true", help=f.metadata["help"])
        elif bound is not None:
            text = f"{f.metadata['help']}: {bound.describe()} (default {value})"
            g.add_argument(flag, type=bounded(bound), default=value, help=text)
        else:
            g.add_argument(
                flag, choices=f.metadata.get("choices"), default=value, help=f"{f.metadata['help']} (default {value})"
            )


def _finetune_config(ns: argparse.Namespace) -> Any:
    from dataclasses import fields

    from ftrecycle.evaluate.builtin import check_new_tokens
    from ftrecycle.finetune.config import FinetuneConfig

    cfg = FinetuneConfig(**{f.name: getattr(ns, f.name) for f in fields(FinetuneConfig)}).validate()
    if ns.eval_data is not None:  # refused now, not after training when the first evaluation runs
        model = ns.model if ns.command == "finetune" else ns.target_base
        check_new_tokens(model, cfg.eval_max_new_tokens, flag="--eval-max-new-tokens")
    return cfg


def _common(ns: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "compute_dtype",
        "shard_size",
        "vocab",
        "on_missing",
        "max_memory",
        "threads",
        "force",
        "allow_nonfinite",
        "allow_pickle",
        "fsync",
    )
    out = {k: getattr(ns, k) for k in keys}
    out["progress"] = _progress(ns.quiet)
    out["max_memory"] = _operation_budget(ns.max_memory)
    return out


def _operation_budget(text: int | str | None) -> int | str:
    """--max-memory bounds the command's peak RSS: the library gets what the process does not hold yet.

    Without the flag the operation gets the library's default budget on top of
    what the process holds (imports, and the models ``--alpha auto`` loaded).
    """
    from ftrecycle.engine import current_rss
    from ftrecycle.errors import MemoryBudgetError
    from ftrecycle.io.output import parse_size

    if text is None:
        return DEFAULT_MAX_MEMORY
    budget = parse_size(text, flag="--max-memory")
    held = current_rss()
    if budget <= held:
        raise MemoryBudgetError(
            f"--max-memory {budget / 2**20:.0f} MiB is below what this process already holds "
            f"({held / 2**20:.0f} MiB); allow more"
        )
    return budget - held


def _report(result: Any) -> None:
    adapted = [r for r in result.records if r.get("action") not in ("tied",)]
    print(
        f"wrote {result.output} ({result.bytes_written / 2**30:.2f} GiB of tensors) in {result.seconds:.1f} s"
        + (f"; {len(adapted)} tensor records (see ftrecycle.json)" if adapted else "")
    )


def _report_ft(result: Any) -> None:
    first = result.losses[0][1] if result.losses else float("nan")
    last = result.losses[-1][1] if result.losses else float("nan")
    print(
        f"wrote {result.output}: {result.steps} steps, loss {first:.4f} -> {last:.4f}, "
        f"{result.seconds_per_step:.3f} s/step"
    )
    for e in result.eval_log:
        print(f"  step {e['step']}: strict {100 * e['strict']:.1f}%  flexible {100 * e['flexible']:.1f}%")


def _eval(ns: argparse.Namespace) -> None:
    import json

    from ftrecycle.errors import ConfigError

    if ns.builtin:
        from ftrecycle.evaluate.builtin import check_new_tokens, evaluate_gsm8k, load_for_eval
        from ftrecycle.evaluate.data import read_gsm8k
        from ftrecycle.evaluate.harness import resolve_eval_model

        ignored = [
            flag
            for flag, given in (("--tasks", ns.tasks), ("--task-dir", ns.task_dir), ("--backend", ns.backend != "auto"))
            if given
        ]
        if ignored:
            raise ConfigError(
                f"{', '.join(ignored)} with --builtin: the built-in evaluator scores only the --builtin FILE; "
                "drop --builtin to run tasks through lm-eval, or drop " + " and ".join(ignored)
            )
        items = read_gsm8k(ns.builtin)[: ns.limit]
        paths = {m: resolve_eval_model(m) for m in ns.model}  # every model checked before the first loads
        max_new_tokens = DEFAULT_NEW_TOKENS if ns.max_new_tokens is None else ns.max_new_tokens
        for m in paths.values():
            check_new_tokens(m, max_new_tokens)
        table = {}
        for m in ns.model:
            model, tok = load_for_eval(paths[m], device=ns.device, trust_remote_code=ns.trust_remote_code)
            rep = evaluate_gsm8k(model, tok, items, batch_size=ns.batch_size, max_gen_toks=max_new_tokens)
            table[m] = {"strict": rep.strict, "flexible": rep.flexible}
        result: dict[str, Any] = {"table": table}
    else:
        from ftrecycle.evaluate.harness import run_lm_eval

        tasks = [t.strip() for t in ns.tasks.split(",") if t.strip()]
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"--tasks {ns.tasks!r} names a task twice")
        if not tasks:
            raise ConfigError("--tasks is empty: name tasks (e.g. gsm8k,mmlu) or use --builtin FILE")
        if ns.max_new_tokens is not None:
            raise ConfigError(
                "--max-new-tokens is for --builtin only: lm-eval tasks use their own generation length "
                "(the paper's); drop it, or use --builtin FILE"
            )
        if ns.task_dir is not None and not os.path.isdir(ns.task_dir):
            raise ConfigError(f"--task-dir {ns.task_dir}: no such directory of task YAMLs")
        result = run_lm_eval(
            ns.model,
            tasks,
            backend=ns.backend,
            task_dir=ns.task_dir,
            batch_size=ns.batch_size,
            limit=ns.limit,
            device=ns.device,
            trust_remote_code=ns.trust_remote_code,
        )
    if ns.json:
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2, default=str))
    else:
        from ftrecycle.evaluate.harness import format_table

        print(format_table(result["table"]), end="")


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[list[int]]:
    """SIGTERM and SIGINT raise KeyboardInterrupt, so every temporary file is removed on the way out.

    A second signal during that clean-up is ignored rather than cutting it short (SIGKILL still
    works; the next run for the same output removes what a killed run left).
    """
    got: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if got:
            return
        got.append(signum)
        raise KeyboardInterrupt

    old: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, handler)
    try:
        yield got
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ftrecycle`` command; return its exit code."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except FtRecycleError as e:  # argparse's own errors, one line (see argtypes.Parser)
        return _fail(f"ftrecycle: error: {e}", e.exit_code, e)
    from ftrecycle.distributed import is_main

    if not is_main():  # under `accelerate launch` every process runs this command; the main one reports
        sys.stdout = open(os.devnull, "w")  # for the rest of this process's life
    with _signals_interrupt() as got:
        return _run(ns, got)


def _run(ns: argparse.Namespace, got: list[int]) -> int:
    try:
        if ns.command == "transfer":
            from ftrecycle.ops.transfer import transfer

            _report(
                transfer(
                    ns.source_base,
                    ns.source_finetuned,
                    ns.target_base,
                    ns.output,
                    alpha=_auto_alpha(ns),
                    compress=ns.compress,
                    out_dtype=ns.out_dtype,
                    config_from=ns.config_from,
                    tokenizer_from=ns.tokenizer_from,
                    tie_mismatch=ns.tie_mismatch,
                    **_common(ns),
                )
            )
        elif ns.command == "diff":
            from ftrecycle.ops.diff import diff

            _report(
                diff(
                    ns.base,
                    ns.finetuned,
                    ns.output,
                    delta_dtype=ns.delta_dtype,
                    compress=ns.compress,
                    **_common(ns),
                )
            )
        elif ns.command == "inspect":
            from ftrecycle.engine import default_threads
            from ftrecycle.ops.inspect import format_inspection, inspect_delta

            found = inspect_delta(ns.delta, check=not ns.no_verify, threads=default_threads())
            if ns.json:
                print(json.dumps(found, indent=2))
            else:
                print(format_inspection(found, limit=None if ns.all else 40), end="")
        elif ns.command == "export-lora":
            from ftrecycle.ops.export import export_lora

            res = export_lora(ns.delta, ns.output, rank=ns.rank, dtype=ns.dtype, threads=ns.threads, force=ns.force)
            print(
                f"wrote {res.output}: LoRA rank {ns.rank} on {res.modules} modules, {res.bytes_written / 2**20:.2f} "
                f"MiB in {res.seconds:.1f} s; left out {len(res.left_out)} tensors (see ftrecycle.json)"
            )
        elif ns.command == "apply":
            from ftrecycle.ops.apply import apply_delta

            if ns.alpha == "auto":
                raise ConfigError("--alpha auto needs the source models: use `ftrecycle transfer`")

            _report(
                apply_delta(
                    ns.delta,
                    ns.target_base,
                    ns.output,
                    alpha=ns.alpha,
                    out_dtype=ns.out_dtype,
                    config_from=ns.config_from,
                    tokenizer_from=ns.tokenizer_from,
                    tie_mismatch=ns.tie_mismatch,
                    verify=not ns.no_verify,
                    **_common(ns),
                )
            )
        elif ns.command == "finetune":
            from ftrecycle.finetune.train import finetune

            _report_ft(
                finetune(
                    ns.model,
                    ns.data,
                    ns.output,
                    config=_finetune_config(ns),
                    eval_data=ns.eval_data,
                    resume=ns.resume,
                    force=ns.force,
                    progress=ns.progress,
                    allow_pickle=ns.allow_pickle,
                )
            )
        elif ns.command == "recycle-finetune":
            from ftrecycle.recycle import recycle_finetune

            _report_ft(
                recycle_finetune(
                    ns.source_base,
                    ns.source_finetuned,
                    ns.target_base,
                    ns.data,
                    ns.output,
                    alpha=ns.alpha,
                    config=_finetune_config(ns),
                    eval_data=ns.eval_data,
                    resume=ns.resume,
                    force=ns.force,
                    progress=ns.progress,
                    allow_pickle=ns.allow_pickle,
                )
            )
        elif ns.command == "iterate":
            from ftrecycle.recycle import ChainSpec, iterate, summary_table

            spec = ChainSpec.load(ns.chain, output=ns.output)
            print(summary_table(iterate(spec, progress=ns.progress, force=ns.force), spec.mode), end="")
        elif ns.command == "eval":
            _eval(ns)
        elif ns.command == "diagnose":
            _diagnose(ns)
        elif ns.command == "lab":
            _lab(ns)
        elif ns.command == "demo":
            from ftrecycle.demo import run_demo

            for line in run_demo(ns.out, force=ns.force):
                print(line)
    except FtRecycleError as e:
        from ftrecycle.distributed import exit_together, reported_elsewhere

        # under `accelerate launch` the main process alone prints the main's error; all leave together
        rc = e.exit_code if reported_elsewhere(e) else _fail(f"ftrecycle: error: {e}", e.exit_code, e)
        exit_together(e, rc)
        return rc
    except KeyboardInterrupt:
        name = signal.Signals(got[0]).name if got else "SIGINT"
        print(f"ftrecycle: interrupted ({name}); nothing half-written was left under an output name", file=sys.stderr)
        return 128 + (got[0] if got else int(signal.SIGINT))
    except RecursionError as e:
        return _fail(
            "ftrecycle: error: an input is nested too deeply to process (RecursionError); "
            "check the JSON/YAML files given",
            2,
            e,
        )
    except MemoryError as e:
        return _fail(
            "ftrecycle: error: out of memory (MemoryError); give a smaller --max-memory, --batch-size or "
            "model, or use a machine with more memory",
            2,
            e,
        )
    except BrokenPipeError:
        # the reader of stdout went away (`ftrecycle inspect D | head`): not an error of ours, and nothing
        # more can be printed there; point stdout at /dev/null so that Python's exit flush stays quiet
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file descriptor (captured, in process)
            pass
        return 141
    except OSError as e:
        return _fail(f"ftrecycle: error: {_os_error(e)}", 2, e)
    except Exception as e:
        return _fail(
            f"ftrecycle: internal error: {type(e).__name__}{': ' if str(e) else ''}{e} "
            f"(set {DEBUG_ENV}=1 for the traceback)",
            INTERNAL_ERROR_EXIT,
            e,
        )
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.split()) if "\n" in text or "\r" in text else text


def _fail(message: str, code: int, exc: BaseException) -> int:
    """Print one line (and, with FTRECYCLE_DEBUG=1, the traceback before it); return the exit code."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    print(_one_line(message), file=sys.stderr)
    return code


def _os_error(e: OSError) -> str:
    """An OS error as "PATH: cause", with the fix for the usual ones."""
    cause = e.strerror or str(e) or type(e).__name__
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    hint = {
        errno.ENOSPC: "; free some space or write elsewhere",
        errno.EDQUOT: "; free some space or write elsewhere",
        errno.EROFS: "; write to a writable location",
        errno.EACCES: "; check the permissions",
        errno.EPERM: "; check the permissions",
        errno.EMFILE: "; raise the open-file limit (ulimit -n)",
        errno.ENAMETOOLONG: "; use a shorter name",
    }.get(e.errno or 0, "")
    return f"{where}: {cause}{hint}" if where else f"{cause}{hint}"


if __name__ == "__main__":
    sys.exit(main())
