"""Evaluation results in lm-evaluation-harness's layout on disk.

``lm_eval --output_path P --log_samples`` writes, per model, ``P/<model>/results_<date>.json`` (the
aggregated results: ``results``, ``configs``, ``versions``, ``n-shot``, ``higher_is_better``,
``n-samples``, ``config``, the model's name and the date) and ``P/<model>/samples_<task>_<date>.jsonl``
(one JSON record per evaluated item). ``ftrecycle eval --output-path P [--log-samples]`` writes the same
files, for lm-eval tasks and for the built-in evaluator, so that tools reading lm-eval's outputs
(``lm_eval.utils.get_results_filenames``, the Open LLM Leaderboard's readers) read ours. ``<model>``
is the model as the user named it, sanitized as lm-eval does. Each file is written whole under its
final name or not at all (a temp file renamed); lm-eval's own tracker logs and skips a failed write,
which is why it is not used here.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ftrecycle.errors import OutputError
from ftrecycle.evaluate.builtin import EvalReport
from ftrecycle.io.output import replaced_file
from ftrecycle.io.provenance import portable
from ftrecycle.version import __version__

#: the built-in evaluator's task name in results files
BUILTIN_TASK = "gsm8k_builtin"
#: its two filters, as lm-eval's gsm8k names them
FILTERS = ("strict-match", "flexible-extract")


def sanitize_model_name(name: str) -> str:
    """A model name as a directory name, the way lm-eval sanitizes it (and never ``.``, ``..`` or empty,
    which would put the files beside or above ``--output-path``)."""
    clean = re.sub(r"[\"<>:/|\\?*\[\]]+", "__", name)
    return "__" if clean.strip(".") == "" else clean


def date_id() -> str:
    """The date stamp lm-eval puts in its file names (ISO time, ``:`` as ``-``)."""
    return datetime.now().isoformat().replace(":", "-")


def mean_stderr(p: float, n: int) -> float | None:
    """The standard error of a mean of ``n`` 0/1 scores (lm-eval's ``mean_stderr``: the sample standard
    deviation over sqrt(n)); None for fewer than two items."""
    if n < 2:
        return None
    return math.sqrt(p * (1 - p) * n / (n - 1) / n)


def write_results(
    output_path: str | Path,
    model_name: str,
    results: dict[str, Any],
    samples: dict[str, Sequence[dict[str, Any]]] | None = None,
) -> list[Path]:
    """Write one model's results (and per-item samples) in lm-eval's layout.

    Args:
        output_path: the directory given as ``--output-path`` (created if missing).
        model_name: the model as the user named it (a hub id or a path as given).
        results: lm-eval's aggregated dict (``results``, ``configs``, ``versions``, ...).
        samples: task -> its per-item records (one JSON line each).

    Returns:
        The files written.

    Raises:
        OutputError: the directory cannot be created or written.
    """
    stamp = date_id()
    root = Path(output_path).expanduser()
    # the model as named in the files: a local path relative to the results, never the machine's absolute path
    model_name = str(portable(model_name, root)) if Path(model_name).is_absolute() else model_name
    folder = root / sanitize_model_name(model_name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--output-path {output_path}: cannot create {folder} ({e.strerror or e})") from e
    body = {
        **results,
        "model_name": model_name,
        "model_name_sanitized": sanitize_model_name(model_name),
        "date": results.get("date", time.time()),
        "ftrecycle_version": __version__,
    }
    written = [folder / f"results_{stamp}.json"]
    with replaced_file(written[0]) as f:
        f.write((json.dumps(body, indent=2, default=str, ensure_ascii=False) + "\n").encode())
    for task, records in (samples or {}).items():
        path = folder / f"samples_{task}_{stamp}.jsonl"
        with replaced_file(path) as f:
            for r in records:
                f.write((json.dumps(r, default=str, ensure_ascii=False) + "\n").encode())
        written.append(path)
    return written


def builtin_results(report: EvalReport, *, data: str, max_gen_toks: int, config: dict[str, Any]) -> dict[str, Any]:
    """The built-in evaluator's report as lm-eval's aggregated results of one task.

    Args:
        report: what :func:`ftrecycle.evaluate.builtin.evaluate_gsm8k` returned.
        data: the GSM8K-format file scored.
        max_gen_toks: the generation length used.
        config: the run's settings (backend, batch size, limit...).
    """
    scores: dict[str, Any] = {"alias": BUILTIN_TASK}
    for name, value in zip(FILTERS, (report.strict, report.flexible), strict=True):
        scores[f"exact_match,{name}"] = value
        scores[f"exact_match_stderr,{name}"] = mean_stderr(value, report.n)
    return {
        "results": {BUILTIN_TASK: scores},
        "configs": {
            BUILTIN_TASK: {
                "task": BUILTIN_TASK,
                "dataset_path": Path(data).name,
                "output_type": "generate_until",
                "num_fewshot": 0,
                "generation_kwargs": {"max_gen_toks": max_gen_toks, "do_sample": False},
                "filter_list": [{"name": name} for name in FILTERS],
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            }
        },
        "versions": {BUILTIN_TASK: __version__},
        "n-shot": {BUILTIN_TASK: 0},
        "higher_is_better": {BUILTIN_TASK: {"exact_match": True}},
        "n-samples": {BUILTIN_TASK: {"original": report.n, "effective": report.n}},
        "config": config,
    }


def builtin_samples(report: EvalReport, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per item of a built-in evaluation, shaped like lm-eval's samples."""
    out = []
    for i, (s, it) in enumerate(zip(report.items, items, strict=True)):
        out.append(
            {
                "doc_id": i,
                "doc": {"question": it["question"], "answer": it["answer"]},
                "target": it["answer"],
                "resps": [[s.generation]],
                "filtered_resps": {"strict-match": s.strict, "flexible-extract": s.flexible},
                "exact_match,strict-match": float(s.strict_correct),
                "exact_match,flexible-extract": float(s.flexible_correct),
            }
        )
    return out
