"""The lab's units of work: pretrain, fine-tune, transfer, evaluate. Each returns a JSON-ready dict.

Every job writes its model directory atomically and can be rerun: a finished output is read
back instead of recomputed, and an interrupted fine-tune resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from typing import Any

from ftrecycle.delta.store import Delta
from ftrecycle.diagnose.accuracy import PROBE_NEW_TOKENS
from ftrecycle.diagnose.geometry import geometry
from ftrecycle.diagnose.verdict import best_alpha, diagnose, thresholds
from ftrecycle.errors import ConfigError
from ftrecycle.evaluate.builtin import evaluate_gsm8k, load_for_eval
from ftrecycle.evaluate.data import read_gsm8k
from ftrecycle.finetune.calibrate import calibrate
from ftrecycle.finetune.config import FinetuneConfig
from ftrecycle.finetune.gradmask import grad_sign_mask
from ftrecycle.finetune.train import EVAL_LOG, FinetuneResult, finetune
from ftrecycle.io.output import atomic_directory
from ftrecycle.lab import world
from ftrecycle.lab.pretrain import VERSIONS, ModelSpec, PretrainSpec, pretrain
from ftrecycle.lab.scheduler import write_json_atomic
from ftrecycle.lab.sizes import sizes_entry
from ftrecycle.ops.apply import apply_delta
from ftrecycle.ops.diff import diff
from ftrecycle.ops.transfer import transfer
from ftrecycle.recycle import ChainSpec, iterate

CALIBRATION_ITEMS = 200  # the first training problems: the "few hundred examples of the task" diagnose uses


def _pct(x: float) -> float:
    return round(100.0 * x, 1)


def evaluate_model(model: str | Path, test: str | Path, *, max_new_tokens: int, batch_size: int = 128) -> float:
    """Zero-shot accuracy (lm-eval's flexible-extract) of ``model`` on a GSM8K-format file, in percent."""
    net, tok = load_for_eval(str(model), device=None)
    report = evaluate_gsm8k(net, tok, read_gsm8k(test), batch_size=batch_size, max_gen_toks=max_new_tokens)
    return _pct(report.flexible)


def pretrain_job(out: str, model: dict[str, Any], spec: dict[str, Any], seed: int, world_id: str) -> dict[str, Any]:
    """Pretrain and save M1..M5 under ``out`` (appears only when all five are written).

    ``world_id`` is :func:`ftrecycle.lab.world.fingerprint`, recorded so that the job's cache key changes
    with the texts it trains on; a run of another world is refused as stale.
    """
    path = Path(out)
    if (path / "pretrain.json").is_file():
        return dict(json.loads((path / "pretrain.json").read_text()))
    with atomic_directory(path, force=True) as tmp:
        record = pretrain(tmp, ModelSpec(**model), PretrainSpec(**spec), seed=seed)
        (tmp / "pretrain.json").write_text(json.dumps(record) + "\n")
    return record


def finetune_config(steps: int, settings: dict[str, Any], seed: int) -> FinetuneConfig:
    """The fine-tuning settings of a lab run of ``steps`` steps (one recipe for every fine-tuning job)."""
    return FinetuneConfig(max_steps=steps, seed=seed, **settings)


def _curve(run: Path) -> dict[str, Any]:
    """A fine-tuned model's logged accuracy against steps, with its first (start) and last (final) value."""
    log = json.loads((run / EVAL_LOG).read_text())
    curve = [[int(e["step"]), _pct(e["flexible"])] for e in sorted(log, key=lambda e: e["step"])]
    return {"curve": curve, "final": curve[-1][1], "start": curve[0][1]}


def eval_seconds(log: list[dict[str, Any]], after_step: int = -1) -> float:
    """Seconds a fine-tune spent in its periodic evaluations.

    Args:
        log: a fine-tune's evaluation log (each entry's ``seconds`` is measured around its generation-based
            scoring by :func:`ftrecycle.evaluate.builtin.evaluate_gsm8k`).
        after_step: count only the evaluations logged after this step.

    Returns:
        Their seconds, summed, to 0.1.
    """
    return round(sum(float(e.get("seconds", 0.0)) for e in log if int(e["step"]) > after_step), 1)


def time_split(result: FinetuneResult) -> dict[str, float]:
    """Where one fine-tuning call's wall time went: the training loop less its evaluations (``train_s``),
    the periodic evaluations (``eval_s``), and everything outside the loop (``setup_s``: loading the model
    and data, tokenizing, writing the output).

    Args:
        result: what :func:`ftrecycle.finetune.train.finetune` returned.

    Returns:
        The three parts in seconds (they add up to ``result.seconds``, to rounding).
    """
    loop = result.seconds_per_step * max(1, result.steps - result.resumed_from_step)
    # a resumed run's log holds the evaluations of the earlier call too; only this call's count here
    ev = eval_seconds(result.eval_log, result.resumed_from_step if result.resumed_from_step else -1)
    return {
        "train_s": round(max(0.0, loop - ev), 1),
        "eval_s": ev,
        "setup_s": round(max(0.0, result.seconds - loop), 1),
    }


def finetune_job(
    start: str, train: str, test: str, out: str, steps: int, settings: dict[str, Any], seed: int
) -> dict[str, Any]:
    """Fine-tune ``start`` for ``steps`` steps, logging zero-shot accuracy against steps.

    Returns:
        The curve (see :func:`_curve`), the call's ``seconds`` and their split (:func:`time_split`); the
        times are None when the model was already written (nothing was trained in this call).
    """
    path = Path(out)
    split: dict[str, float | None] = {"train_s": None, "eval_s": None, "setup_s": None}
    seconds = None
    if not (path / EVAL_LOG).is_file():
        cfg = finetune_config(steps, settings, seed)
        result = finetune(start, train, path, config=cfg, eval_data=test, resume=True)
        seconds = round(result.seconds, 1)
        split = {**time_split(result)}
    return {**_curve(path), "seconds": seconds, **split}


def iterative_job(
    versions: list[str],
    first: str,
    train: str,
    test: str,
    out: str,
    steps: int,
    settings: dict[str, Any],
    seed: int,
    max_new_tokens: int,
) -> dict[str, Any]:
    """Algorithm 1 over ``versions`` by :func:`ftrecycle.recycle.iterate`, each Mi + Δ^iter_{i-1} and M*i scored.

    M*1 is ``first`` (experiment a's ``ft-M1``, fine-tuned at the direct runs' settings); the chain
    fine-tunes every later M*i with the recycling runs' settings (``steps``, ``settings``, ``seed``), as
    :func:`finetune_job` does, so M*i is what a ``ft-Mi+...`` job started from Mi + Δ^iter_{i-1} would be.
    iterate keeps every product under ``out`` and skips finished ones, so an interrupted job resumes.

    Returns:
        Per version from the third on (M*2 is experiment c's ``ft-M2+d1``): the accuracy of Mi + Δ^iter_{i-1}
        and the fine-tuning curve of M*i, as :func:`transfer_job` and :func:`finetune_job` report them; and
        ``eval_s``, the seconds the chain's fine-tunes spent in their periodic evaluations.
    """
    spec = ChainSpec(
        versions=list(versions),
        data=Path(train),
        output=Path(out),
        mode="iterative",
        eval_data=Path(test),
        finetune=finetune_config(steps, settings, seed),
        finetuned=first,
    )
    rows = iterate(spec)
    out_rows: dict[str, Any] = {
        VERSIONS[k]: {
            "accuracy": evaluate_model(rows[k]["start"], test, max_new_tokens=max_new_tokens),
            **_curve(Path(rows[k]["finetuned"])),
        }
        for k in range(2, len(rows))
    }
    # the chain's periodic evaluations (M*2 on), for the lab's timing; M*1 is experiment a's ft-M1
    logs = [Path(rows[k]["finetuned"]) / EVAL_LOG for k in range(1, len(rows))]
    raw = [float(e.get("seconds", 0.0)) for f in logs if f.is_file() for e in json.loads(f.read_text())]
    out_rows["eval_s"] = round(sum(raw), 1)  # rounded once: many short evaluations each rounded would sum to 0
    return out_rows


def _transferred(
    source_base: str, source_finetuned: str, target_base: str, path: Path, test: str, max_new_tokens: int, alpha: float
) -> float:
    """Write ``target + alpha * (finetuned - base)`` at ``path`` (unless a finished one is there) and score it."""
    # outputs appear by an atomic rename: a directory that exists is complete
    if not path.is_dir():
        transfer(
            source_base=source_base,
            source_finetuned=source_finetuned,
            target_base=target_base,
            output=path,
            alpha=alpha,
        )
    return evaluate_model(path, test, max_new_tokens=max_new_tokens)


def transfer_job(
    source_base: str, source_finetuned: str, target_base: str, out: str, test: str, max_new_tokens: int
) -> dict[str, Any]:
    """Write ``target + (finetuned - base)`` and score it."""
    args = (source_base, source_finetuned, target_base, Path(out), test, max_new_tokens)
    return {"accuracy": _transferred(*args, alpha=1.0)}


def compressed_job(
    source_base: str,
    source_finetuned: str,
    target_base: str,
    out: str,
    spec: str,
    test: str,
    max_new_tokens: int,
    calibration: str | None = None,
    calibration_steps: int = 0,
) -> dict[str, Any]:
    """Store Δ as a bf16 delta compressed by ``spec`` ("none": dense), calibrate it on ``calibration``
    (``ftrecycle calibrate``, ``calibration_steps`` Adam steps) if given, apply it to the target, score it.

    A setting the model's shapes cannot take (``diff`` refuses it with a ConfigError) gives None
    numbers and the reason under ``infeasible``."""
    root = Path(out)
    delta, model = root / "delta", root / "model"
    if not (root / "done").is_file():
        try:
            d = diff(
                source_base,
                source_finetuned,
                root / "compressed" if calibration else delta,
                delta_dtype="bfloat16",
                compress=None if spec == "none" else spec,
                force=True,
            )
        except ConfigError as e:
            # a setting this model cannot take (a budget below its smallest settings): recorded, not run
            return {"accuracy": None, "ratio": None, "median_error": None, "infeasible": str(e)}
        if calibration:
            calibrate(
                root / "compressed",
                source_base,
                source_finetuned,
                calibration,
                delta,
                steps=calibration_steps,
                force=True,
            )
        apply_delta(delta, target_base, model, force=True)
        (root / "done").write_text(json.dumps(d.provenance.get("compression")))
    stored_delta = Delta.read(delta)
    stored, dense = stored_delta.file_bytes(), stored_delta.dense_bytes()
    errors = stored_delta.compression_errors()
    return {
        "accuracy": evaluate_model(model, test, max_new_tokens=max_new_tokens),
        "ratio": dense / stored,
        "median_error": statistics.median(errors) if errors else 0.0,
    }


def masked_job(
    source_base: str,
    source_finetuned: str,
    target_base: str,
    out: str,
    test: str,
    calibration: str,
    examples: int,
    max_new_tokens: int,
    vote: str = "sum",
) -> dict[str, Any]:
    """``transfer --mask grad-sign``: the target's gradient-sign mask on the first ``examples`` problems of
    ``calibration`` (``ftrecycle mask --vote VOTE``), Mj + (mask ⊙ Δi) written with it, then scored.

    Returns:
        The accuracy, and the share of Δ's non-zero entries the mask kept.
    """
    root = Path(out)
    mask, model = root / "mask.safetensors", root / "model"
    if not mask.is_file():
        root.mkdir(parents=True, exist_ok=True)
        grad_sign_mask(target_base, calibration, mask, examples=examples, vote=vote, force=True)
    if not model.is_dir():
        transfer(source_base, source_finetuned, target_base, model, mask=str(mask), force=True)
    record = json.loads((model / "ftrecycle.json").read_text())["mask"]
    return {
        "accuracy": evaluate_model(model, test, max_new_tokens=max_new_tokens),
        "kept_fraction": record["kept_fraction"],
        "examples": record["made"]["examples"],
    }


def eval_job(model: str, test: str, max_new_tokens: int) -> dict[str, Any]:
    """Score a model."""
    return {"accuracy": evaluate_model(model, test, max_new_tokens=max_new_tokens)}


def data_files(root: Path, *, seed: int, train_items: int, test_items: int, language_items: int) -> dict[str, Path]:
    """Write the seed's fine-tuning and test sets (English and the second language) once."""
    root.mkdir(parents=True, exist_ok=True)
    # Test sets are the same for every seed; training sets are drawn per seed and never repeat a test question.
    files = {
        "test": (test_items, False, "test", None),
        "language_test": (test_items, True, "language-test", None),
        "train": (train_items, False, f"{seed}-train", "test"),
        "language_train": (language_items, True, f"{seed}-language-train", "language_test"),
    }
    out: dict[str, Path] = {}
    held: dict[str, set[str]] = {}
    for name, (n, language, rng_seed, exclude) in files.items():
        path = root / f"{name}.jsonl"
        out[name] = path
        if path.is_file():
            held[name] = {json.loads(line)["question"] for line in path.read_text().splitlines()}
            continue
        rng, rows = random.Random(rng_seed), list[dict[str, str]]()
        avoid = held.get(exclude or "", set())
        while len(rows) < n:
            rows += [r for r in world.sft_items(rng, n - len(rows), language=language) if r["question"] not in avoid]
        held[name] = {r["question"] for r in rows}
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)
    write_json_atomic(root / "data.json", {"seed": seed, "files": {k: str(v.name) for k, v in out.items()}})
    return out


def diagnose_job(
    source_base: str, source_finetuned: str, target_base: str, calibration: str, max_new_tokens: int = PROBE_NEW_TOKENS
) -> dict[str, Any]:
    """``diagnose`` with calibration data: geometry totals, probe numbers (loss and accuracy), verdict and scores."""
    d = diagnose(
        source_base,
        source_finetuned,
        target_base,
        data=calibration,
        max_examples=CALIBRATION_ITEMS,
        max_new_tokens=max_new_tokens,
    )
    g, pr = d.geometry.total, d.probe
    if pr is None:  # diagnose runs the probe whenever data is given
        raise RuntimeError("diagnose returned no probe")
    acc = pr.accuracy
    return {
        "verdict": d.verdict,
        "score": d.score,
        "accuracy_gain": d.accuracy_gain,
        "accuracy_stderr": acc.stderr if acc else None,
        "accuracy_target": acc.target if acc else None,
        "accuracy_items": acc.items if acc else 0,
        "accuracy_seconds": round(acc.seconds, 3) if acc else None,
        "thresholds": thresholds(),
        "drift_over_delta": g["drift_over_delta"],
        "drift_rel": g["drift_rel"],
        "cos": g["cos"],
        "sign_agreement": g["sign_agreement"],
        "barrier": pr.barrier,
        "loss_target": pr.loss_target,
        "loss_transfer": pr.loss_transfer,
        "best_alpha": pr.best_alpha,
    }


def auto_alpha_job(
    source_base: str,
    source_finetuned: str,
    target_base: str,
    out: str,
    test: str,
    calibration: str,
    max_new_tokens: int,
) -> dict[str, Any]:
    """``transfer --alpha auto`` (α chosen on calibration data: by accuracy on items with answers), then score it."""
    pr = best_alpha(
        source_base,
        source_finetuned,
        target_base,
        calibration,
        max_examples=CALIBRATION_ITEMS,
        max_new_tokens=max_new_tokens,
    )
    args = (source_base, source_finetuned, target_base, Path(out), test, max_new_tokens)
    acc = pr.accuracy
    return {
        "alpha": pr.best_alpha,
        "alpha_method": pr.alpha_method,
        "probe_accuracy": acc.by_alpha if acc else None,
        "probe_seconds": round(acc.seconds, 3) if acc else None,
        "accuracy": _transferred(*args, alpha=pr.best_alpha),
    }


def update_sizes_job(entries: dict[str, list[str]]) -> dict[str, Any]:
    """‖B − A‖/‖A‖ in percent, total and by module type, for each named (A, B) pair of models.

    Args:
        entries: name -> [A, B] (a base and its fine-tune, or an older and a newer version).

    Returns:
        name -> :func:`ftrecycle.lab.sizes.sizes_entry` of the pair.
    """
    out: dict[str, Any] = {}
    for name, (a, b) in entries.items():
        # geometry's third model only sets the drift, which is not wanted here: A itself makes it zero
        g = geometry(a, b, a)
        out[name] = sizes_entry(g.total, g.by_module)
    return out
