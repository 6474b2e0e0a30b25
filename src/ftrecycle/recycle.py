"""Recycling-then-fine-tuning (paper §5) and its iterative form over a chain of versions (Algorithm 1)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftrecycle.distributed import is_main, on_main
from ftrecycle.errors import ConfigError
from ftrecycle.finetune.config import FinetuneConfig
from ftrecycle.finetune.train import FinetuneResult, finetune
from ftrecycle.io.output import check_no_overlap, check_output, sibling_name, write_json
from ftrecycle.transfer import transfer


def _complete(path: Path) -> bool:
    # every output ftrecycle writes appears by an atomic rename: if it exists, it is complete
    return path.is_dir()


def recycle_finetune(
    source_base: str,
    source_finetuned: str,
    target_base: str,
    data: str | Path,
    output: str | Path,
    *,
    alpha: float = 1.0,
    config: FinetuneConfig | None = None,
    eval_data: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = False,
) -> FinetuneResult:
    """FT(target + alpha * (finetuned - base)) in one call.

    The merged starting point is kept in ``.OUT.ftrecycle-start`` beside the output
    until fine-tuning completes, so ``resume`` skips a finished transfer and
    continues fine-tuning from its last checkpoint.

    Raises:
        As :func:`ftrecycle.transfer` and :func:`ftrecycle.finetune.train.finetune`.
    """
    inputs = [source_base, source_finetuned, target_base, data, eval_data]

    def prepare() -> tuple[Path, Path]:
        out = check_output(output, inputs, force=force)
        start = out.parent / sibling_name(out, ".ftrecycle-start")
        return out, check_no_overlap(start, inputs, what="work directory")

    out, start = on_main(prepare)

    def merge() -> None:
        # one process writes the start model; under `accelerate launch` the others wait for it
        if not (resume and _complete(start)):
            transfer(source_base, source_finetuned, target_base, start, alpha=alpha, force=True)

    on_main(merge)
    result = finetune(
        str(start),
        data,
        out,
        config=config,
        eval_data=eval_data,
        resume=resume,
        force=force,
        progress=progress,
        extra_provenance={
            "recycled_from": {
                "source_base": source_base,
                "source_finetuned": source_finetuned,
                "target_base": target_base,
                "alpha": alpha,
            }
        },
    )
    on_main(lambda: shutil.rmtree(start, ignore_errors=True))
    return result


@dataclass
class ChainSpec:
    """An ``iterate`` chain file.

    Attributes:
        versions: base models M1..Mn, oldest first.
        data: training data (JSONL).
        output: directory for every M*i, delta and the summary.
        mode: ``iterative`` (Algorithm 1) or ``direct`` (the paper's Δ^dir baseline).
        eval_data: optional GSM8K-format data; Mi, Mi + Δ and M*i are scored.
        alpha: scale of each carried diff.
        finetune: fine-tuning settings.
    """

    versions: list[str]
    data: Path
    output: Path
    mode: str = "iterative"
    eval_data: Path | None = None
    alpha: float = 1.0
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @classmethod
    def load(cls, path: str | Path, *, output: str | Path | None = None) -> ChainSpec:
        """Read and validate a chain YAML file (relative paths are taken from its directory).

        Raises:
            ConfigError: unreadable file, unknown keys, fewer than two versions, bad mode.
        """
        import yaml

        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{p}: cannot read the chain file ({e})") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping with versions, data, output")
        known = {"versions", "data", "output", "mode", "eval_data", "alpha", "finetune"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{p}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        versions = raw.get("versions")
        if not isinstance(versions, list) or len(versions) < 2:
            raise ConfigError(f"{p}: 'versions' must list at least two base models, oldest first")
        base = p.parent

        def local(v: str) -> str:
            q = base / v
            return str(q) if q.exists() else v

        mode = raw.get("mode", "iterative")
        if mode not in ("iterative", "direct"):
            raise ConfigError(f"{p}: mode must be iterative or direct, got {mode!r}")
        if "data" not in raw or (output is None and "output" not in raw):
            raise ConfigError(f"{p}: 'data' and 'output' are required")
        return cls(
            versions=[local(str(v)) for v in versions],
            data=base / str(raw["data"]),
            output=Path(output) if output is not None else base / str(raw["output"]),
            mode=mode,
            eval_data=base / str(raw["eval_data"]) if raw.get("eval_data") else None,
            alpha=float(raw.get("alpha", 1.0)),
            finetune=FinetuneConfig.from_dict(raw.get("finetune") or {}, where=f"{p}: finetune"),
        )


def iterate(spec: ChainSpec, *, progress: bool = False) -> list[dict[str, Any]]:
    """Run the chain; every finished step is kept on disk and skipped when run again.

    iterative: M*1 = FT(M1); Δi-1 = M*i-1 − Mi-1; M*i = FT(Mi + Δi-1).
    direct:    D_i = FT(M_i) for every i; M*i = FT(Mi + (D_i-1 − Mi-1)) (M*1 = D_1).

    Returns:
        One summary row per version (also written to ``summary.json`` and ``summary.md``).
    """
    from ftrecycle.delta.compute import diff
    from ftrecycle.transfer import apply_delta

    out = spec.output
    inputs: list[str | Path | None] = [*spec.versions, spec.data, spec.eval_data]

    def prepare() -> None:
        check_no_overlap(out, inputs, what="iterate output")
        out.mkdir(parents=True, exist_ok=True)

    on_main(prepare)
    cfg = spec.finetune
    rows: list[dict[str, Any]] = []
    n = len(spec.versions)

    def _done(dest: Path) -> bool:
        check_no_overlap(dest, inputs, what="iterate step")
        return _complete(dest)

    # Under `accelerate launch` every step's "is it done?" is decided by the main process and
    # broadcast (a rank asking for itself could see an output the main has just written and skip
    # a collective call the others make); fine-tuning itself runs on every rank.
    def ft(model: str, dest: Path) -> Path:
        if not on_main(lambda: _done(dest)):
            finetune(
                model,
                spec.data,
                dest,
                config=cfg,
                eval_data=spec.eval_data,
                resume=True,
                force=False,
                progress=progress,
            )
        return dest

    def delta_of(tuned: Path, base: str, dest: Path) -> Path:
        def make() -> None:
            if not _done(dest):
                diff(base, str(tuned), dest, force=True)

        on_main(make)
        return dest

    if spec.mode == "direct":
        direct = [ft(spec.versions[i], out / f"direct-FT-M{i + 1}") for i in range(n - 1)]
    for i, base in enumerate(spec.versions, 1):
        row: dict[str, Any] = {"version": f"M{i}", "base": base}
        if i == 1:
            tuned = ft(base, out / "M1-star")
        else:
            carried = out / f"delta-{i - 1}"
            source = out / f"M{i - 1}-star" if spec.mode == "iterative" else direct[i - 2]
            delta_of(source, spec.versions[i - 2], carried)
            start = out / f"M{i}-plus-delta-{i - 1}"

            def merge(carried: Path = carried, base: str = base, start: Path = start) -> None:
                if not _done(start):
                    apply_delta(carried, base, start, alpha=spec.alpha, force=True)

            on_main(merge)
            row["start"] = str(start)
            tuned = ft(str(start), out / f"M{i}-star")
        row["finetuned"] = str(tuned)
        rows.append(row)
    if spec.eval_data is not None:
        _score(rows, spec)

    def summarise() -> None:
        write_json(out / "summary.json", {"mode": spec.mode, "versions": rows})
        (out / "summary.md").write_text(summary_table(rows, spec.mode))

    on_main(summarise)
    return rows


def _score(rows: list[dict[str, Any]], spec: ChainSpec) -> None:
    from ftrecycle.evaluate.builtin import evaluate_gsm8k, load_for_eval
    from ftrecycle.evaluate.data import read_gsm8k

    items = read_gsm8k(spec.eval_data) if spec.eval_data else []
    cache = spec.output / "scores.json"
    # every rank evaluates its share of the items (see evaluate_gsm8k); the main process owns the cache
    scores: dict[str, float] = on_main(lambda: json.loads(cache.read_text()) if cache.is_file() else {})
    for row in rows:
        for key, label in (("base", "base"), ("start", "base_plus_delta"), ("finetuned", "finetuned")):
            path = row.get(key)
            if path is None:
                continue
            if path not in scores:
                model, tok = load_for_eval(path)
                scores[path] = evaluate_gsm8k(
                    model,
                    tok,
                    items,
                    batch_size=spec.finetune.eval_batch_size,
                    max_gen_toks=spec.finetune.eval_max_new_tokens,
                ).strict
                if is_main():
                    write_json(cache, scores)
            row[f"acc_{label}"] = scores[path]


def summary_table(rows: list[dict[str, Any]], mode: str) -> str:
    """A markdown table of the chain (accuracies where evaluated)."""
    head = f"# iterate ({mode})\n\n| version | M_i | M_i + Δ | M*_i | fine-tuned model |\n|---|---|---|---|---|\n"

    def pct(v: Any) -> str:
        return f"{100 * v:.1f}" if isinstance(v, float) else "–"

    body = "".join(
        f"| {r['version']} | {pct(r.get('acc_base'))} | {pct(r.get('acc_base_plus_delta'))} | "
        f"{pct(r.get('acc_finetuned'))} | {r['finetuned']} |\n"
        for r in rows
    )
    return head + body
