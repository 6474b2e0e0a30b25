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
from collections.abc import Iterator
from dataclasses import dataclass
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
GLOBAL_MMLU = "global_mmlu"  # global_mmlu:LANG, e.g. global_mmlu:si


def resolve_task(name: str) -> PaperTask:
    """A paper task by short name, ``global_mmlu:LANG``, or any lm-eval/local task name as it is."""
    if name in PAPER_TASKS:
        return PAPER_TASKS[name]
    if name.startswith(GLOBAL_MMLU + ":"):
        return PaperTask(f"global_mmlu_full_{name.split(':', 1)[1]}", 5, "acc,none")
    return PaperTask(name, None, "")


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


def _load_lm(backend: str, model: str, *, batch_size: int | str, device: str, trust_remote_code: bool) -> Any:
    if backend == "vllm":
        from lm_eval.models.vllm_causallms import VLLM  # heavy: kept off the transfer path

        return VLLM(pretrained=model, dtype="auto", batch_size="auto", trust_remote_code=trust_remote_code)
    from lm_eval.models.huggingface import HFLM  # heavy: kept off the transfer path

    return HFLM(
        pretrained=model, dtype="auto", batch_size=batch_size, device=device, trust_remote_code=trust_remote_code
    )


def run_lm_eval(
    models: list[str],
    tasks: list[str],
    *,
    backend: str = "auto",
    task_dir: str | Path | None = None,
    batch_size: int | str = 16,
    limit: int | None = None,
    device: str | None = None,
    log_samples: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Evaluate each model on each task through lm-eval's Python API (loading each model once).

    Args:
        models: model directories or hub ids.
        tasks: paper short names (``gsm8k``, ``mmlu``, ``global_mmlu:si``...), lm-eval task names,
            or task names defined in ``task_dir``.
        backend: ``auto`` (vLLM when installed and a GPU is present, else transformers), ``hf`` or ``vllm``.
        task_dir: a directory of task YAMLs; when given, lm-eval's ~14,000 built-in task
            files are not indexed unless a paper task needs them.
        batch_size: lm-eval batch size.
        limit: evaluate only the first N items of each task.
        device: ``cpu``, ``cuda``...; default: CUDA when available.
        log_samples: keep per-item records under ``samples``.
        trust_remote_code: passed to transformers.

    Returns:
        ``{"table": {model: {task: score}}, "metrics": {model: {task: metric}}, "raw": ..., "samples": ...}``.

    Raises:
        ConfigError: lm-eval is not installed, or a task is unknown.
        CheckpointError: a model is not a model directory (see :func:`resolve_eval_model`).
        DataError: a task's data set is not available offline, or its data file is missing.
    """
    paths = {m: resolve_eval_model(m) for m in models}  # before lm-eval's slow start: bad paths fail at once
    try:
        import lm_eval  # heavy: kept off the transfer path
        from lm_eval.tasks import TaskManager  # heavy: kept off the transfer path
    except ImportError as e:
        raise ConfigError("lm-eval is not installed: pip install 'lm-eval[hf]'") from e
    import torch  # heavy: kept off the transfer path

    specs = {t: resolve_task(t) for t in tasks}
    needs_builtin = task_dir is None or any(t in PAPER_TASKS or t.startswith(GLOBAL_MMLU) for t in tasks)
    manager = TaskManager(include_path=str(task_dir) if task_dir else None, include_defaults=needs_builtin)
    unknown = [t for t, s in specs.items() if s.task not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"unknown task(s) {', '.join(unknown)}: use a paper task ({', '.join(PAPER_TASKS)}, "
            "global_mmlu:LANG), an lm-eval task name, or a YAML in --task-dir"
        )
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = choose_backend(backend)
    with _lm_eval_quiet():
        return _evaluate_all(
            lm_eval, manager, models, paths, specs, engine, dev, batch_size, limit, log_samples, trust_remote_code
        )


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


def _evaluate_all(
    lm_eval: Any,
    manager: Any,
    models: list[str],
    paths: dict[str, str],
    specs: dict[str, Any],
    engine: str,
    dev: str,
    batch_size: int | str,
    limit: int | None,
    log_samples: bool,
    trust_remote_code: bool,
) -> dict[str, Any]:
    table: dict[str, dict[str, float | None]] = {}
    metrics: dict[str, dict[str, str]] = {}
    raw: dict[str, Any] = {}
    samples: dict[str, Any] = {}
    for m in models:
        with loading(m):
            lm = _load_lm(engine, paths[m], batch_size=batch_size, device=dev, trust_remote_code=trust_remote_code)
        table[m], metrics[m], raw[m], samples[m] = {}, {}, {}, {}
        for name, spec in specs.items():
            gen_kwargs = {"max_gen_toks": spec.max_gen_toks} if spec.max_gen_toks else None
            try:
                out = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=[spec.task],
                    num_fewshot=spec.num_fewshot,
                    task_manager=manager,
                    limit=limit,
                    log_samples=log_samples,
                    gen_kwargs=gen_kwargs,
                    bootstrap_iters=0,
                )
            except OSError as e:  # datasets' "Couldn't reach ... on the Hub" is a ConnectionError
                err = _dataset_error(name, e)
                if err is None:
                    raise
                raise err from e
            if out is None:
                # lm-eval's own data-parallel path under `accelerate launch`: every process scores its
                # share and only the main process gets the results back (it is the one that reports)
                continue
            res = out["results"].get(spec.task, {})
            got = _primary(res, spec.metric)
            table[m][name] = got[1] if got else None
            metrics[m][name] = got[0] if got else ""
            raw[m][name] = res
            if log_samples:
                samples[m][name] = out.get("samples", {}).get(spec.task, [])
    return {"table": table, "metrics": metrics, "raw": raw, "samples": samples, "backend": engine}


def format_table(table: dict[str, dict[str, float | None]]) -> str:
    """Models as rows, tasks as columns, scores in percent (the layout of the paper's Table 1)."""
    tasks = list(dict.fromkeys(t for row in table.values() for t in row))  # first-seen order
    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m, row in table.items():
        cells = [f"{100 * v:.1f}" if isinstance(v, float) else "–" for v in (row.get(t) for t in tasks)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_json(result: dict[str, Any]) -> str:
    """The result without lm-eval's per-sample records, as JSON."""
    return json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2, default=str)
