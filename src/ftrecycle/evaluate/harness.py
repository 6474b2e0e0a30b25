"""lm-evaluation-harness adapter: the paper's benchmarks with its settings, and local task files.

Each paper task is a registry entry (lm-eval task name, shots, generation length,
reported metric), following the paper's appendix: GSM8K 8-shot chain-of-thought
with the last number extracted; MATH500 4-shot; ARC-Challenge 25-shot; GPQA
(diamond) zero-shot; MMLU 5-shot; IFEval; Global-MMLU per language.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftrecycle.errors import CheckpointError, ConfigError, DataError, FtRecycleError
from ftrecycle.io.checkpoint import open_checkpoint
from ftrecycle.io.hf_load import no_progress_bars
from ftrecycle.io.hub import ResolvedRef, resolve_ref
from ftrecycle.io.model_files import TOKENIZER_FILES


@dataclass(frozen=True)
class PaperTask:
    """One benchmark as the paper ran it."""

    task: str
    num_fewshot: int | None
    metric: str
    max_gen_toks: int | None = None


PAPER_TASKS: dict[str, PaperTask] = {
    "gsm8k": PaperTask("gsm8k_cot", 8, "exact_match,flexible-extract", 1024),
    "math500": PaperTask("minerva_math500", 4, "exact_match,none", 512),
    "arc_challenge": PaperTask("arc_challenge", 25, "acc_norm,none"),
    "gpqa": PaperTask("gpqa_diamond_zeroshot", 0, "acc_norm,none"),
    "mmlu": PaperTask("mmlu", 5, "acc,none"),
    "ifeval": PaperTask("ifeval", 0, "prompt_level_strict_acc,none"),
}
GLOBAL_MMLU = "global_mmlu"  # paper:global_mmlu:LANG, e.g. paper:global_mmlu:si
#: the prefix naming a task in the paper's setting (``paper:gsm8k``); a name without it is lm-eval's own task
PAPER = "paper:"


def resolve_task(name: str) -> PaperTask:
    """A task by name: ``paper:NAME`` (or ``paper:global_mmlu:LANG``) is the paper's setting of a
    benchmark; any other name is the lm-eval (or ``--task-dir``) task of that name, with its own
    shots, generation length and metrics (``gsm8k`` is lm-eval's 5-shot strict-match gsm8k, not the
    paper's 8-shot chain of thought, which is ``paper:gsm8k``).

    Raises:
        ConfigError: ``paper:`` followed by a name that is not one of the paper's benchmarks.
    """
    if not name.startswith(PAPER):
        return PaperTask(name, None, "")
    short = name.removeprefix(PAPER)
    if short in PAPER_TASKS:
        return PAPER_TASKS[short]
    if short.startswith(GLOBAL_MMLU + ":") and short.split(":", 1)[1]:
        return PaperTask(f"global_mmlu_full_{short.split(':', 1)[1]}", 5, "acc,none")
    raise ConfigError(
        f"task {name}: the paper's benchmarks are {', '.join(PAPER + t for t in PAPER_TASKS)} and "
        f"{PAPER}{GLOBAL_MMLU}:LANG"
    )


def describe_task(name: str, spec: PaperTask, metric: str, num_fewshot: int | None) -> str:
    """One line saying what a table column is: the lm-eval task, shots, metric and filter."""
    shots = num_fewshot if num_fewshot is not None else spec.num_fewshot
    metric_name, _, flt = metric.partition(",")
    parts = [
        f"{name}: lm-eval task {spec.task}",
        f"{shots}-shot" if shots is not None else "the task's own shots",
        f"metric {metric_name or '?'}" + (f" (filter {flt})" if flt and flt != "none" else ""),
    ]
    if spec.max_gen_toks:
        parts.append(f"at most {spec.max_gen_toks} new tokens")
    return ", ".join(parts)


GSM8K_TASK_TEMPLATE = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
{fewshot}output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
num_fewshot: {shots}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]
generation_kwargs:
  until: ["Question:", "</s>", "<|im_end|>"]
  do_sample: false
  temperature: 0.0
  max_gen_toks: {max_gen_toks}
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: take_first
  - name: flexible-extract
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: take_first
metadata:
  version: 3.0
"""


def write_gsm8k_task(
    directory: str | Path,
    name: str,
    data: str | Path,
    *,
    shots_file: str | Path | None = None,
    num_fewshot: int = 0,
    max_gen_toks: int = 256,
) -> Path:
    """Write an lm-eval task YAML over a local GSM8K-format JSONL file (lm-eval's gsm8k settings).

    Returns:
        The YAML's path; pass its directory as ``task_dir``.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fewshot = ""
    if shots_file is not None:
        fewshot = f"    train: {Path(shots_file).resolve()}\nfewshot_split: train\n"
    text = GSM8K_TASK_TEMPLATE.format(
        name=name, data=Path(data).resolve(), fewshot=fewshot, shots=num_fewshot, max_gen_toks=max_gen_toks
    )
    path = d / f"{name}.yaml"
    path.write_text(text)
    return path


PREFERRED = (
    "exact_match,strict-match",
    "exact_match,flexible-extract",
    "acc_norm,none",
    "acc,none",
    "prompt_level_strict_acc,none",
    "exact_match,none",
)


def _primary(task_results: dict[str, Any], metric: str) -> tuple[str, float] | None:
    for key in (metric, *PREFERRED):
        if key and isinstance(task_results.get(key), (int, float)):
            return key, float(task_results[key])
    for key, value in task_results.items():
        if "," in key and "stderr" not in key and isinstance(value, (int, float)):
            return key, float(value)
    return None


def resolve_eval_model(ref: str) -> str:
    """The local directory of a model to evaluate, checked before any loader sees it.

    A hub id is fetched (safetensors only) through :func:`ftrecycle.io.hub.resolve_ref`; a
    path that looks local (its first component exists here, or it starts with ``.``, ``/``
    or ``~``) and does not exist is reported as missing, not looked up on the hub.

    Raises:
        CheckpointError: not a directory, a PEFT adapter, no config.json, or no safetensors weights.
        HubError: a hub id that cannot be fetched.
    """
    p = Path(ref).expanduser()
    if not p.exists():
        first = Path(ref).parts[0] if Path(ref).parts else ref
        if ref.startswith((".", "/", "~")) or (len(Path(ref).parts) > 1 and Path(first).is_dir()):
            raise CheckpointError(f"{ref}: no such model directory")
    path = resolve_ref(ref).path
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise CheckpointError(
            f"{ref}: is a PEFT LoRA adapter, not a model; merge it into its base first: ftrecycle transfer "
            "--source-base BASE --source-finetuned ADAPTER --target-base BASE -o MERGED, then evaluate MERGED"
        )
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{ref}: not a model directory (no config.json); pass a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(q.name for q in (*path.glob("*.bin"), *path.glob("*.pt")))
        if pickles:
            raise CheckpointError(
                f"{ref}: holds only pickle weights ({pickles[0]}), which eval does not load; convert them to "
                "safetensors first (e.g. ftrecycle transfer ... --allow-pickle writes safetensors)"
            )
        raise CheckpointError(f"{ref}: no weights (*.safetensors) in the model directory")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{ref}: no tokenizer files (tokenizer.json, tokenizer.model...); copy the tokenizer of its base model"
        )

    # ftrecycle's own reader checks config.json and every safetensors header before transformers sees them
    with open_checkpoint(ResolvedRef(ref, path)) as ckpt:
        if not isinstance(ckpt.config.get("model_type"), str):
            raise CheckpointError(f"{path / 'config.json'}: no model_type; restore the model's config.json")
    return str(path)


@contextlib.contextmanager
def loading(path: str, what: str = "model") -> Iterator[None]:
    """Turn a loader's failure (transformers, tokenizers, lm-eval) on a checked directory into one line.

    Raises:
        CheckpointError: naming the directory, what was being loaded and the loader's first line.
    """
    try:
        yield
    except FtRecycleError:
        raise
    except (ValueError, OSError, RuntimeError, KeyError, TypeError, AttributeError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: transformers cannot load the {what} ({type(e).__name__}: {first[:300]})") from e


def _dataset_error(task: str, e: BaseException) -> FtRecycleError | None:
    """A one-line error for a task whose data cannot be read: offline and not cached, or a missing file."""
    module = type(e).__module__ or ""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, ConnectionError) or module.startswith(("datasets", "huggingface_hub", "requests", "httpx")):
        return DataError(
            f"task {task}: its data set is not available offline or in the Hugging Face cache ({text}); "
            "run it once with network access, or evaluate local files (--task-dir YAMLs, --builtin FILE)"
        )
    if isinstance(e, FileNotFoundError):
        detail = f"data file {e.filename} not found" if e.filename else text
        return DataError(f"task {task}: {detail}; check the task's data_files")
    return None


def choose_backend(backend: str) -> str:
    """``hf`` or ``vllm``; ``auto`` takes vLLM when it is installed and a GPU is present.

    Raises:
        ConfigError: an unknown backend, or ``vllm`` asked for where it is not installed.
    """
    has_vllm = importlib.util.find_spec("vllm") is not None
    if backend == "auto":
        import torch  # heavy: kept off the transfer path

        return "vllm" if has_vllm and torch.cuda.is_available() else "hf"
    if backend == "vllm" and not has_vllm:
        raise ConfigError("--backend vllm: vLLM is not installed (pip install vllm), or use --backend hf")
    if backend not in ("hf", "vllm"):
        raise ConfigError(f"--backend must be auto, hf or vllm, got {backend!r}")
    return backend


#: model arguments that have their own flag
OWN_FLAG = {"pretrained": "--model", "trust_remote_code": "--trust-remote-code", "device": "--device"}


def parse_model_args(text: str | None) -> dict[str, str]:
    """lm-eval's ``--model_args`` string (``dtype=bfloat16,peft=ADAPTER``) as a dict.

    Raises:
        ConfigError: an item that is not ``key=value``, a key given twice, or one that has its own flag.
    """
    out: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ConfigError(f"--model-args {text!r}: {item!r} is not key=value (e.g. dtype=bfloat16,peft=ADAPTER)")
        if key in out:
            raise ConfigError(f"--model-args {text!r}: {key} is given twice")
        if key in OWN_FLAG:
            raise ConfigError(f"--model-args {text!r}: give {key} with {OWN_FLAG[key]}")
        out[key] = value.strip()
    peft = out.get("peft")
    if peft is not None and peft.startswith((".", "/", "~")) and not Path(peft).expanduser().is_dir():
        raise CheckpointError(f"--model-args peft={peft}: no such adapter directory")
    return out


def _load_lm(
    backend: str, model: str, *, batch_size: int | str, device: str, trust_remote_code: bool, model_args: dict[str, str]
) -> Any:
    if backend == "vllm":
        from lm_eval.models.vllm_causallms import VLLM  # heavy: kept off the transfer path

        return VLLM(
            pretrained=model,
            **{"dtype": "auto", **model_args},
            batch_size="auto",
            trust_remote_code=trust_remote_code,
        )
    from lm_eval.models.huggingface import HFLM  # heavy: kept off the transfer path

    return HFLM(
        pretrained=model,
        **{"dtype": "auto", **model_args},
        batch_size=batch_size,
        device=device,
        trust_remote_code=trust_remote_code,
    )


@dataclass(frozen=True)
class HarnessSettings:
    """How lm-eval runs the tasks (lm-eval's own flags, same names).

    Attributes:
        num_fewshot: shots for every task (None: each task's own, or the paper's for ``paper:`` tasks).
        apply_chat_template: format prompts (and few-shot turns) with the tokenizer's chat template.
        model_args: extra model arguments (``dtype``, ``peft`` for an adapter on ``--model``, ...).
        bootstrap_iters: lm-eval's stderr iterations (0: no stderr; means get an analytic one).
        log_samples: keep per-item records.
        batch_size: lm-eval batch size.
        limit: only the first N items of each task.
    """

    num_fewshot: int | None = None
    apply_chat_template: bool = False
    model_args: dict[str, str] = field(default_factory=dict)
    bootstrap_iters: int = 100000
    log_samples: bool = False
    batch_size: int | str = 16
    limit: int | None = None


def run_lm_eval(
    models: list[str],
    tasks: list[str],
    *,
    backend: str = "auto",
    task_dir: str | Path | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    settings: HarnessSettings | None = None,
) -> dict[str, Any]:
    """Evaluate each model on each task through lm-eval's Python API (loading each model once).

    Args:
        models: model directories or hub ids.
        tasks: lm-eval task names, task names defined in ``task_dir``, or the paper's settings
            (``paper:gsm8k``, ``paper:mmlu``, ``paper:global_mmlu:si``...; see :func:`resolve_task`).
        backend: ``auto`` (vLLM when installed and a GPU is present, else transformers), ``hf`` or ``vllm``.
        task_dir: a directory of task YAMLs; when given, lm-eval's ~14,000 built-in task
            files are not indexed unless a task needs them.
        device: ``cpu``, ``cuda``...; default: CUDA when available.
        trust_remote_code: passed to transformers.
        settings: shots, chat template, model arguments, stderr, samples, batch size, limit.

    Returns:
        ``{"table": {model: {task: score}}, "stderr": ..., "metrics": {model: {task: metric}},
        "describe": {task: line}, "results": {model: lm-eval's aggregated dict}, "samples": ...}``.

    Raises:
        ConfigError: lm-eval is not installed, a task is unknown, or bad model arguments.
        CheckpointError: a model is not a model directory (see :func:`resolve_eval_model`).
        DataError: a task's data set is not available offline, or its data file is missing.
    """
    st = settings or HarnessSettings()
    specs = {t: resolve_task(t) for t in tasks}  # a bad paper: name fails before anything loads
    paths = {m: resolve_eval_model(m) for m in models}  # before lm-eval's slow start: bad paths fail at once
    try:
        import lm_eval  # heavy: kept off the transfer path
        from lm_eval.tasks import TaskManager  # heavy: kept off the transfer path
    except ImportError as e:
        raise ConfigError("lm-eval is not installed: pip install 'lm-eval[hf]'") from e
    import torch  # heavy: kept off the transfer path

    manager = TaskManager(
        include_path=str(task_dir) if task_dir else None, include_defaults=_needs_registry(tasks, task_dir)
    )
    unknown = [t for t, s in specs.items() if s.task not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"unknown task(s) {', '.join(unknown)}: use an lm-eval task name, a YAML in --task-dir, or the paper's "
            f"setting of a benchmark ({', '.join(PAPER + t for t in PAPER_TASKS)}, {PAPER}{GLOBAL_MMLU}:LANG)"
        )
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = choose_backend(backend)
    with _lm_eval_quiet():
        return _evaluate_all(lm_eval, manager, models, paths, specs, engine, dev, st, trust_remote_code)


def _needs_registry(tasks: list[str], task_dir: str | Path | None) -> bool:
    """Whether lm-eval's own task files must be indexed (slow): no --task-dir, or a paper task."""
    return task_dir is None or any(t.startswith(PAPER) for t in tasks)


@contextlib.contextmanager
def _lm_eval_quiet() -> Iterator[None]:
    """lm-eval's warnings (a task YAML without generation_kwargs...) and transformers' loading bar
    off for the run: the library does not print, and an error after them would not be one line."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with no_progress_bars():
            yield
    finally:
        logger.setLevel(level)


#: the keys of lm-eval's aggregated results that are per task (merged across the per-task runs)
PER_TASK_KEYS = ("results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def _one_task(lm_eval: Any, lm: Any, manager: Any, name: str, spec: PaperTask, st: HarnessSettings) -> Any:
    """lm-eval's simple_evaluate of one task (shots and generation length are per task)."""
    gen_kwargs = {"max_gen_toks": spec.max_gen_toks} if spec.max_gen_toks else None
    try:
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=[spec.task],
            num_fewshot=st.num_fewshot if st.num_fewshot is not None else spec.num_fewshot,
            task_manager=manager,
            limit=st.limit,
            log_samples=st.log_samples,
            gen_kwargs=gen_kwargs,
            bootstrap_iters=st.bootstrap_iters,
            apply_chat_template=st.apply_chat_template,
            fewshot_as_multiturn=st.apply_chat_template,
        )
    except OSError as e:  # datasets' "Couldn't reach ... on the Hub" is a ConnectionError
        err = _dataset_error(name, e)
        if err is None:
            raise
        raise err from e


def _evaluate_all(
    lm_eval: Any,
    manager: Any,
    models: list[str],
    paths: dict[str, str],
    specs: dict[str, PaperTask],
    engine: str,
    dev: str,
    st: HarnessSettings,
    trust_remote_code: bool,
) -> dict[str, Any]:
    out: dict[str, Any] = {k: {} for k in ("table", "stderr", "metrics", "raw", "samples", "results")}
    describe: dict[str, str] = {}
    for m in models:
        with loading(m):
            lm = _load_lm(
                engine,
                paths[m],
                batch_size=st.batch_size,
                device=dev,
                trust_remote_code=trust_remote_code,
                model_args=st.model_args,
            )
        for k in out:
            out[k][m] = {}
        merged: dict[str, Any] = {k: {} for k in PER_TASK_KEYS}
        for name, spec in specs.items():
            got = _one_task(lm_eval, lm, manager, name, spec, st)
            if got is None:
                # lm-eval's own data-parallel path under `accelerate launch`: every process scores its
                # share and only the main process gets the results back (it is the one that reports)
                continue
            res = got["results"].get(spec.task, {})
            primary = _primary(res, spec.metric)
            metric = primary[0] if primary else ""
            out["table"][m][name] = primary[1] if primary else None
            out["metrics"][m][name] = metric
            out["stderr"][m][name] = _stderr(res, metric)
            out["raw"][m][name] = res
            describe[name] = describe_task(name, spec, metric, got.get("n-shot", {}).get(spec.task, st.num_fewshot))
            for k in PER_TASK_KEYS:
                merged[k].update(got.get(k) or {})
            merged["config"] = {**(got.get("config") or {}), "model_args": st.model_args, "backend": engine}
            if st.log_samples:
                out["samples"][m][spec.task] = got.get("samples", {}).get(spec.task, [])
        out["results"][m] = merged
    return {**out, "describe": describe, "backend": engine}


def _stderr(res: dict[str, Any], metric: str) -> float | None:
    """The stderr lm-eval reports beside ``metric`` (``acc,none`` -> ``acc_stderr,none``), if a number."""
    name, _, flt = metric.partition(",")
    value = res.get(f"{name}_stderr,{flt}")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def format_table(
    table: dict[str, dict[str, float | None]],
    stderr: dict[str, dict[str, float | None]] | None = None,
    describe: dict[str, str] | None = None,
) -> str:
    """Models as rows, tasks as columns, scores in percent ± their standard error (the layout of the
    paper's Table 1), then one line per task naming what its column measures."""
    tasks = list(dict.fromkeys(t for row in table.values() for t in row))  # first-seen order
    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m, row in table.items():
        cells = []
        for t in tasks:
            v = row.get(t)
            se = (stderr or {}).get(m, {}).get(t)
            cell = f"{100 * v:.1f}" if isinstance(v, float) else "–"
            cells.append(cell + (f" ± {100 * se:.1f}" if isinstance(v, float) and se is not None else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    notes = [f"- {describe[t]}" for t in tasks if describe and t in describe]
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def to_json(result: dict[str, Any]) -> str:
    """The result without lm-eval's per-sample records, as JSON."""
    return json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2, default=str)
