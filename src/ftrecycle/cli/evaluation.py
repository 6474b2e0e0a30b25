"""``ftrecycle eval``: tasks through lm-evaluation-harness, or GSM8K-format JSONL with the built-in scorer."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ftrecycle.cli.args import batch_size, device_type, non_negative_int, positive_int, token_count
from ftrecycle.cli.common import Command
from ftrecycle.errors import ConfigError
from ftrecycle.evaluate import builtin  # looked up per call: tests substitute evaluate_gsm8k
from ftrecycle.evaluate.data import read_gsm8k
from ftrecycle.evaluate.harness import HarnessSettings, format_table, parse_model_args, resolve_eval_model, run_lm_eval
from ftrecycle.evaluate.results import BUILTIN_TASK, FILTERS, builtin_results, builtin_samples, write_results
from ftrecycle.io.output import check_no_overlap

#: `eval --builtin`'s default --max-new-tokens (lm-eval's default generation length)
DEFAULT_NEW_TOKENS = 256


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, help="a model (repeat for a side-by-side table)")
    p.add_argument(
        "--tasks",
        default="",
        help="comma-separated task names, as lm-eval names them (gsm8k is lm-eval's 5-shot gsm8k); the paper's "
        "settings are paper:gsm8k (8-shot CoT, flexible extract), paper:math500, paper:arc_challenge, paper:gpqa, "
        "paper:mmlu, paper:ifeval, paper:global_mmlu:LANG",
    )
    p.add_argument("--task-dir", default=None, help="directory of lm-eval task YAMLs (offline use)")
    p.add_argument(
        "--builtin",
        default=None,
        metavar="FILE",
        help="score GSM8K-format JSONL with the built-in evaluator instead of lm-eval",
    )
    p.add_argument("--batch-size", type=batch_size, default=16, help="generation batch size (at most 65536)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N items of each task")
    p.add_argument(
        "--max-new-tokens",
        type=token_count,
        default=None,
        help="built-in evaluator: most new tokens (default 256; at most 131072, and less than the model's "
        "context); lm-eval tasks keep their own generation length",
    )
    p.add_argument("--device", type=device_type, default=None, help="cpu, cuda, ... (default: CUDA when available)")
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "hf", "vllm"],
        help="lm-eval model backend: auto takes vLLM when it is installed and a GPU is present",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    p.add_argument(
        "--output-path",
        default=None,
        metavar="DIR",
        help="write results as lm-eval does: DIR/<model>/results_<date>.json (scores, stderr, task configs, "
        "versions, settings)",
    )
    p.add_argument(
        "--log-samples",
        action="store_true",
        help="with --output-path: also DIR/<model>/samples_<task>_<date>.jsonl, one record per item",
    )
    p.add_argument(
        "--num-fewshot", type=non_negative_int, default=None, help="shots for every task (default: each task's own)"
    )
    p.add_argument(
        "--apply-chat-template", action="store_true", help="format prompts with the tokenizer's chat template"
    )
    p.add_argument(
        "--model-args",
        default=None,
        metavar="K=V,...",
        help="extra model arguments, as lm-eval's: dtype=bfloat16, peft=ADAPTER (evaluate an adapter on --model), "
        "revision=...",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off)")


def _builtin(ns: argparse.Namespace) -> dict[str, Any]:
    """Score every model on the --builtin file in process."""
    given = (
        ("--tasks", ns.tasks),
        ("--task-dir", ns.task_dir),
        ("--backend", ns.backend != "auto"),
        ("--num-fewshot", ns.num_fewshot is not None),
        ("--apply-chat-template", ns.apply_chat_template),
        ("--model-args", ns.model_args),
    )
    ignored = [flag for flag, value in given if value]
    if ignored:
        raise ConfigError(
            f"{', '.join(ignored)} with --builtin: the built-in evaluator scores only the --builtin FILE, zero-shot, "
            "as it is; drop --builtin to run tasks through lm-eval, or drop " + " and ".join(ignored)
        )
    items = read_gsm8k(ns.builtin)[: ns.limit]
    paths = {m: resolve_eval_model(m) for m in ns.model}  # every model checked before the first loads
    max_new_tokens = DEFAULT_NEW_TOKENS if ns.max_new_tokens is None else ns.max_new_tokens
    for path in paths.values():
        builtin.check_new_tokens(path, max_new_tokens)
    table, stderr, results, samples = {}, {}, {}, {}
    config = {"model": "ftrecycle-builtin", "batch_size": ns.batch_size, "limit": ns.limit, "device": ns.device}
    for m in ns.model:
        model, tok = builtin.load_for_eval(paths[m], device=ns.device, trust_remote_code=ns.trust_remote_code)
        rep = builtin.evaluate_gsm8k(model, tok, items, batch_size=ns.batch_size, max_gen_toks=max_new_tokens)
        results[m] = builtin_results(rep, data=ns.builtin, max_gen_toks=max_new_tokens, config=config)
        scores = results[m]["results"][BUILTIN_TASK]
        table[m] = {"strict": rep.strict, "flexible": rep.flexible}
        stderr[m] = {k: scores[f"exact_match_stderr,{f}"] for k, f in zip(table[m], FILTERS, strict=True)}
        samples[m] = {BUILTIN_TASK: builtin_samples(rep, items)} if ns.log_samples else {}
    describe = {
        "strict": f"strict: exact match of the number after '####' ({len(items)} items, 0-shot, at most "
        f"{max_new_tokens} new tokens)",
        "flexible": "flexible: exact match of the last number in the generation",
    }
    return {"table": table, "stderr": stderr, "describe": describe, "results": results, "samples": samples}


def _harness(ns: argparse.Namespace) -> dict[str, Any]:
    """Run the named tasks through lm-eval."""
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
    settings = HarnessSettings(
        num_fewshot=ns.num_fewshot,
        apply_chat_template=ns.apply_chat_template,
        model_args=parse_model_args(ns.model_args),
        log_samples=ns.log_samples,
        batch_size=ns.batch_size,
        limit=ns.limit,
    )
    return run_lm_eval(
        ns.model,
        tasks,
        backend=ns.backend,
        task_dir=ns.task_dir,
        device=ns.device,
        trust_remote_code=ns.trust_remote_code,
        settings=settings,
    )


def _run(ns: argparse.Namespace) -> None:
    if ns.log_samples and ns.output_path is None:
        raise ConfigError("--log-samples writes the samples under --output-path DIR; give one")
    if ns.output_path is not None:  # before the evaluation: results must not land in a model or the data
        check_no_overlap(ns.output_path, [*ns.model, ns.builtin, ns.task_dir], what="--output-path")
        if os.path.exists(ns.output_path) and not os.path.isdir(ns.output_path):
            raise ConfigError(f"--output-path {ns.output_path} is a file; give a directory (lm-eval's layout)")
    result = _builtin(ns) if ns.builtin else _harness(ns)
    if ns.output_path is not None:
        for m, res in result["results"].items():
            write_results(ns.output_path, m, res, result["samples"].get(m))
    if ns.json:
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2, default=str))
    else:
        print(format_table(result["table"], result.get("stderr"), result.get("describe")), end="")


COMMANDS = (
    Command(
        "eval",
        "benchmarks through lm-evaluation-harness, or the fast built-in GSM8K scorer",
        "Evaluate models with lm-eval's Python API: lm-eval's tasks by their own names, the paper's settings as "
        "paper:NAME (paper:gsm8k: 8-shot CoT; paper:math500: 4-shot; paper:arc_challenge: 25-shot; paper:gpqa: "
        "0-shot diamond; paper:mmlu: 5-shot; paper:ifeval; paper:global_mmlu:LANG), or tasks defined in --task-dir "
        "YAMLs over local files. --builtin FILE scores GSM8K-format JSONL in process instead. Prints models as rows "
        "and tasks as columns (score ± stderr, in percent) and what each column measures; --output-path writes "
        "lm-eval's results files.",
        _arguments,
        _run,
    ),
)
