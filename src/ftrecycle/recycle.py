"""Recycling-then-fine-tuning (paper §5) and its iterative form over a chain of versions (Algorithm 1)."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftrecycle.distributed import barrier, is_main, on_main
from ftrecycle.errors import ConfigError
from ftrecycle.finetune.config import FinetuneConfig
from ftrecycle.finetune.train import FinetuneResult, finetune
from ftrecycle.io.hub import resolve_ref
from ftrecycle.io.localpath import looks_local
from ftrecycle.io.output import check_no_overlap, check_output, output_lock, sibling_name, write_json
from ftrecycle.io.state import (
    check_settings,
    file_identity,
    model_identity,
    read_settings,
    settings_hash,
    write_settings,
)
from ftrecycle.ops.transfer import transfer


def _complete(path: Path) -> bool:
    # every output ftrecycle writes appears by an atomic rename: if it exists, it is complete
    return path.is_dir()


def _model_key(ref: str) -> dict[str, Any]:
    """A model argument as a key: a local directory by content identity, a hub id by the id."""
    return model_identity(ref) if Path(ref).expanduser().is_dir() else {"ref": ref}


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
    allow_pickle: bool = False,
) -> FinetuneResult:
    """FT(target + alpha * (finetuned - base)) in one call.

    The merged starting point is kept in ``.OUT.ftrecycle-start`` beside the output
    until fine-tuning completes, so ``resume`` skips a finished transfer and
    continues fine-tuning from its last checkpoint — only when the sources, target,
    alpha, data and settings are the ones the unfinished run was made with.

    The output's provenance says ``operation: recycle-finetune`` and records the
    source models, target and alpha (not the temporary start directory).

    Raises:
        ConfigError: ``resume`` of a run made with other models, alpha or settings (without ``force``).
        As :func:`ftrecycle.ops.transfer` and :func:`ftrecycle.finetune.train.finetune`.
    """
    from ftrecycle.finetune.train import RUN_SETTINGS, run_settings, work_dir

    inputs = [source_base, source_finetuned, target_base, data, eval_data]

    held = contextlib.ExitStack()

    def prepare() -> tuple[Path, Path]:
        out = check_output(output, inputs, force=force)
        held.enter_context(output_lock(out))
        start = out.parent / sibling_name(out, ".ftrecycle-start")
        return out, check_no_overlap(start, inputs, what="work directory")

    # the main process holds OUT's lock from its checks to the end: a second run for OUT is refused
    # before it writes a start model (finetune takes the same lock again, re-entrantly)
    with held:
        out, start = on_main(prepare)
        # Passed to transfer as they are recorded, so the provenance says what ran.
        transfer_settings: dict[str, Any] = {
            "compute_dtype": "float32",
            "out_dtype": None,
            "config_from": "target",
            "tokenizer_from": "target",
            "vocab": "error",
            "on_missing": "error",
            "tie_mismatch": "error",
        }
        model_key = {
            "recycled_from": {
                "source_base": _model_key(source_base),
                "source_finetuned": _model_key(source_finetuned),
                "target_base": _model_key(target_base),
                "alpha": alpha,
                "transfer": transfer_settings,
            }
        }
        run = work_dir(out)
        start_key = start.parent / f"{start.name}.json"

        def merge() -> None:
            if resume and not force and run.exists():
                # Refuse before redoing any transfer: the unfinished run must be continued with what made it.
                check_settings(
                    read_settings(run / RUN_SETTINGS),
                    run_settings(model_key, data, eval_data, (config or FinetuneConfig()).validate()),
                    what=f"the unfinished run for {out} in {run}",
                    fix="rerun with its settings, or pass --force to start over",
                )
            # one process writes the start model; under `accelerate launch` the others wait for it
            if not (resume and _complete(start) and read_settings(start_key) == model_key):
                shutil.rmtree(start, ignore_errors=True)
                start_key.unlink(missing_ok=True)
                transfer(
                    source_base,
                    source_finetuned,
                    target_base,
                    start,
                    alpha=alpha,
                    force=True,
                    allow_pickle=allow_pickle,
                    **transfer_settings,
                )
                write_settings(start_key, model_key)

        on_main(merge)

        def cleanup() -> None:
            shutil.rmtree(start, ignore_errors=True)
            start_key.unlink(missing_ok=True)

        try:
            result = finetune(
                str(start),
                data,
                out,
                config=config,
                eval_data=eval_data,
                resume=resume,
                force=force,
                progress=progress,
                allow_pickle=False,  # the start is written by transfer, as safetensors
                operation="recycle-finetune",
                model_key=model_key,
                extra_provenance={
                    "inputs": {
                        "model": None,  # the merged start is temporary: the sources below identify it
                        "source_base": _describe(source_base, allow_pickle),
                        "source_finetuned": _describe(source_finetuned, allow_pickle),
                        "target_base": _describe(target_base, allow_pickle),
                    },
                    "alpha": alpha,
                    "transfer": transfer_settings,
                    "recycled_from": {  # as given (kept for readers of earlier records)
                        "source_base": source_base,
                        "source_finetuned": source_finetuned,
                        "target_base": target_base,
                        "alpha": alpha,
                    },
                },
            )
        except BaseException:
            # A run that failed before training made no work directory: there is nothing to resume, so the
            # start goes too (with a work directory, --resume reuses it, as may a run for OUT started meanwhile)
            if is_main() and not os.path.lexists(run):
                cleanup()
            raise

        on_main(cleanup)
        return result


def _describe(ref: str, allow_pickle: bool) -> dict[str, Any]:
    from ftrecycle.io.checkpoint import open_checkpoint
    from ftrecycle.io.provenance import describe_input

    with open_checkpoint(ref, allow_pickle=allow_pickle) as ck:
        return describe_input(ck)


#: Keys of a chain file and the types each takes.
_CHAIN_KEYS: dict[str, tuple[type, ...]] = {
    "versions": (list,),
    "data": (str,),
    "output": (str,),
    "mode": (str,),
    "eval_data": (str, type(None)),
    "alpha": (int, float),
    "finetune": (dict, type(None)),
}
MAX_CHAIN_BYTES = 1 << 20  # a chain file is a few lines; a bigger one is a mistake or an attack
MAX_CHAIN_DEPTH = 8  # versions and finetune are one level below the top: deeper nesting is never valid


def _read_chain_yaml(p: Path) -> Any:
    """Parse a chain file as plain YAML: no anchors or aliases (no expansion bombs), shallow, small.

    Raises:
        ConfigError: naming the file (and line) of what is refused.
    """
    import yaml

    try:
        if not p.is_file():
            raise ConfigError(f"{p}: no such chain file" if not p.exists() else f"{p}: not a regular file")
        size = p.stat().st_size
        if size > MAX_CHAIN_BYTES:
            raise ConfigError(f"{p}: {size} bytes; a chain file is at most {MAX_CHAIN_BYTES} bytes")
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the chain file ({e.strerror or e})") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not UTF-8 text (byte {e.start}); save the chain file as UTF-8") from e
    try:
        # Events first: the parser is iterative, so depth and aliases are checked before anything is built.
        depth = 0
        for ev in yaml.parse(text, Loader=yaml.SafeLoader):
            where = f"{p}:{ev.start_mark.line + 1}" if ev.start_mark is not None else str(p)
            if isinstance(ev, yaml.AliasEvent) or getattr(ev, "anchor", None) is not None:
                raise ConfigError(f"{where}: YAML anchors and aliases (&, *) are not accepted in a chain file")
            if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_CHAIN_DEPTH:
                    raise ConfigError(f"{where}: nested more than {MAX_CHAIN_DEPTH} levels deep; not a chain file")
            elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from e


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
        source: the chain file it was read from (for messages).
    """

    versions: list[str]
    data: Path
    output: Path
    mode: str = "iterative"
    eval_data: Path | None = None
    alpha: float = 1.0
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    source: Path | None = None

    @classmethod
    def load(cls, path: str | Path, *, output: str | Path | None = None) -> ChainSpec:
        """Read and validate a chain YAML file (relative paths are taken from its directory).

        Anchors and aliases are refused (no expansion bombs), as are deep nesting, unknown keys
        and values of the wrong type; a version or data path that looks local and does not exist
        is reported as missing, not looked up on the hub.

        Raises:
            ConfigError: one line naming the file and the key.
        """
        p = Path(path)
        raw = _read_chain_yaml(p)
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping with versions, data, output")
        known = set(_CHAIN_KEYS)
        unknown = sorted(str(k) for k in set(raw) - known)
        if unknown:
            raise ConfigError(f"{p}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for key, types in _CHAIN_KEYS.items():
            if key in raw and (not isinstance(raw[key], types) or isinstance(raw[key], bool)):
                want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise ConfigError(f"{p}: {key}: expected {want}, got {type(raw[key]).__name__} {raw[key]!r:.60}")
        versions = raw.get("versions")
        if not isinstance(versions, list) or len(versions) < 2:
            raise ConfigError(f"{p}: 'versions' must list at least two base models, oldest first")
        base = p.parent
        for n, v in enumerate(versions, 1):
            if not isinstance(v, str) or not v:
                raise ConfigError(f"{p}: versions[{n}]: expected a model directory or hub id, got {v!r:.60}")

        def local(v: str) -> str:
            q = base / v
            if q.exists():
                return str(q)
            if Path(v).expanduser().is_absolute() and Path(v).expanduser().exists():
                return v
            if looks_local(v, base):
                raise ConfigError(f"{p}: version {v}: no such model directory ({q}); check the path")
            return v

        mode = raw.get("mode", "iterative")
        if mode not in ("iterative", "direct"):
            raise ConfigError(f"{p}: mode must be iterative or direct, got {mode!r:.60}")
        if "data" not in raw or (output is None and "output" not in raw):
            raise ConfigError(f"{p}: 'data' and 'output' are required")
        alpha = float(raw.get("alpha", 1.0))
        if not math.isfinite(alpha):
            raise ConfigError(f"{p}: alpha: expected a finite number, got {alpha}")
        ft = raw.get("finetune") or {}
        return cls(
            versions=[local(v) for v in versions],
            data=base / str(raw["data"]),
            output=Path(output) if output is not None else base / str(raw["output"]),
            mode=mode,
            eval_data=base / str(raw["eval_data"]) if raw.get("eval_data") else None,
            alpha=alpha,
            finetune=FinetuneConfig.from_dict(ft, where=f"{p}: finetune"),
            source=p,
        )

    def check_files(self) -> None:
        """Check that the data files exist (at run time: an example chain may name files not made yet).

        Raises:
            ConfigError: naming the chain file, the key and the missing path.
        """
        where = f"{self.source}: " if self.source is not None else ""
        for key, q in (("data", self.data), ("eval_data", self.eval_data)):
            if q is not None and not q.is_file():
                raise ConfigError(f"{where}{key}: no such data file {q}" + (" (not a file)" if q.exists() else ""))


SUMMARY = "summary.json"  # also holds the key of every finished step, under "keys"


def iterate(spec: ChainSpec, *, progress: bool = False, force: bool = False) -> list[dict[str, Any]]:
    """Run the chain; every finished step is kept on disk and reused when run again with the same settings.

    iterative: M*1 = FT(M1); Δi-1 = M*i-1 − Mi-1; M*i = FT(Mi + Δi-1).
    direct:    D_i = FT(M_i) for every i; M*i = FT(Mi + (D_i-1 − Mi-1)) (M*1 = D_1).

    Every product (M*i, Δi, Mi + Δi-1, D_i) is recorded in ``summary.json`` (under ``keys``) with a key of
    everything that decides it — its inputs' content identity, the data files' sha256, the
    fine-tuning settings, alpha — and reused only when that key is unchanged. Scores are keyed
    by the scored model's key and the evaluation data and settings, not by path.

    Args:
        spec: the chain.
        progress: show training progress bars.
        force: recompute products made with other settings (without it, such a product is refused).

    Returns:
        One summary row per version (also written to ``summary.json`` and ``summary.md``).

    Raises:
        ConfigError: a finished product was made with other settings (naming what changed) and not ``force``.
    """
    from ftrecycle.ops.apply import apply_delta
    from ftrecycle.ops.diff import diff

    spec.check_files()
    out = spec.output
    inputs: list[str | Path | None] = [*spec.versions, spec.data, spec.eval_data]

    def prepare() -> None:
        check_no_overlap(out, inputs, what="iterate output")
        for v in spec.versions:  # every base is found (or fetched) before anything is written
            resolve_ref(v)
        out.mkdir(parents=True, exist_ok=True)

    on_main(prepare)
    cfg = spec.finetune
    rows: list[dict[str, Any]] = []
    n = len(spec.versions)
    state_file = out / SUMMARY
    # The steps' keys live in summary.json (read and written by the main process only), beside the rows so far.
    recorded = (read_settings(state_file) or {}).get("keys")
    state: dict[str, Any] = dict(recorded) if isinstance(recorded, dict) else {}
    keys: dict[str, str] = {}  # path of a model -> hash of its key, for scores

    identities: dict[str, dict[str, Any]] = {}

    def version_key(v: str) -> dict[str, Any]:
        # A base version enters keys as its full identity, so that a refusal names what changed in it.
        if v not in identities:
            identities[v] = _model_key(v)
            keys[v] = settings_hash(identities[v])
        return identities[v]

    def product(dest: Path, key: dict[str, Any], make: Callable[[], None], *, every_rank: bool = False) -> Path:
        """Reuse ``dest`` if it was made with ``key``; else (re)make it, recording the key first.

        Under `accelerate launch` the main process decides (and broadcasts) whether the step is done;
        ``make`` runs on every rank when it is collective (fine-tuning), else on the main process only.
        """
        name = dest.name

        def done() -> bool:
            check_no_overlap(dest, inputs, what="iterate step")  # never remove an input, even with --force
            if _complete(dest):
                try:
                    check_settings(
                        state.get(name),
                        key,
                        what=f"{dest}",
                        fix="pass --force to recompute it (and what depends on it), or choose another output",
                    )
                    return True
                except ConfigError:
                    if not force:
                        raise
                shutil.rmtree(dest)
            # The key goes on record before the product is made: a product on disk always has its key on record.
            state[name] = key
            write_settings(state_file, {"mode": spec.mode, "versions": rows, "keys": state})
            return False

        if not on_main(done):
            if every_rank:
                make()
            else:
                on_main(make)
        keys[str(dest)] = settings_hash(key)
        return dest

    # What decides a fine-tuned model's weights. The eval_* settings and eval data decide only its logged
    # curve and the scores, which are keyed separately (_score): changing them re-scores, it does not retrain.
    ft_settings = {
        "data": file_identity(spec.data),
        "finetune": {k: v for k, v in asdict(cfg).items() if not k.startswith("eval_")},
    }

    def ft(model: str, start_key: Any, dest: Path) -> Path:
        def make() -> None:
            finetune(
                model,
                spec.data,
                dest,
                config=cfg,
                eval_data=spec.eval_data,
                resume=True,
                force=force,
                progress=progress,
                model_key={"chain_start": start_key},
            )

        return product(dest, {"start": start_key, **ft_settings}, make, every_rank=True)

    def delta_of(tuned: Path, base: str, dest: Path) -> Path:
        def make() -> None:
            diff(base, str(tuned), dest, force=True)

        return product(dest, {"finetuned": keys[str(tuned)], "base": version_key(base)}, make)

    def plus_delta(carried: Path, base: str, dest: Path) -> Path:
        def make() -> None:
            apply_delta(carried, base, dest, alpha=spec.alpha, force=True)

        return product(dest, {"delta": keys[str(carried)], "base": version_key(base), "alpha": spec.alpha}, make)

    direct: list[Path] = []
    if spec.mode == "direct":
        direct = [
            ft(spec.versions[i], version_key(spec.versions[i]), out / f"direct-FT-M{i + 1}") for i in range(n - 1)
        ]
    for i, base in enumerate(spec.versions, 1):
        row: dict[str, Any] = {"version": f"M{i}", "base": base}
        if i == 1:
            tuned = ft(base, version_key(base), out / "M1-star")
        else:
            carried = out / f"delta-{i - 1}"
            source = out / f"M{i - 1}-star" if spec.mode == "iterative" else direct[i - 2]
            delta_of(source, spec.versions[i - 2], carried)
            start = plus_delta(carried, base, out / f"M{i}-plus-delta-{i - 1}")
            row["start"] = str(start)
            tuned = ft(str(start), keys[str(start)], out / f"M{i}-star")
        row["finetuned"] = str(tuned)
        rows.append(row)
    if spec.eval_data is not None:
        _score(rows, spec, keys, version_key)

    def summarise() -> None:
        write_json(out / SUMMARY, {"mode": spec.mode, "versions": rows, "keys": state})
        (out / "summary.md").write_text(summary_table(rows, spec.mode))

    on_main(summarise)
    barrier()  # leave together: a rank that exits while another still tears down its process group can abort it
    return rows


def _score(
    rows: list[dict[str, Any]], spec: ChainSpec, keys: dict[str, str], version_key: Callable[[str], Any]
) -> None:
    from ftrecycle.evaluate.builtin import evaluate_gsm8k, load_for_eval
    from ftrecycle.evaluate.data import read_gsm8k

    items = read_gsm8k(spec.eval_data) if spec.eval_data else []
    cache = spec.output / "scores.json"
    # every rank evaluates its share of the items (see evaluate_gsm8k); the main process owns the cache
    stored = on_main(lambda: read_settings(cache) or {})
    # Keyed by what decides a score: the model's content key, the eval data's sha256, the generation settings.
    held = stored.get("scores") if stored.get("version") == 2 else None
    # a score is reused only in the shape this code writes; anything else (edited, cut short) is scored again
    scores: dict[str, Any] = {
        k: v
        for k, v in (held.items() if isinstance(held, dict) else ())
        if isinstance(v, dict) and isinstance(v.get("strict"), float)
    }
    evaluation = {
        "eval_data": file_identity(spec.eval_data),
        "batch_size": spec.finetune.eval_batch_size,
        "max_new_tokens": spec.finetune.eval_max_new_tokens,
    }
    for row in rows:
        for key, label in (("base", "base"), ("start", "base_plus_delta"), ("finetuned", "finetuned")):
            path = row.get(key)
            if path is None:
                continue
            model_key = keys.get(path) or settings_hash(version_key(path))
            score_key = settings_hash({"model": model_key, **evaluation})
            if score_key not in scores:
                model, tok = load_for_eval(path)
                strict = evaluate_gsm8k(
                    model,
                    tok,
                    items,
                    batch_size=spec.finetune.eval_batch_size,
                    max_gen_toks=spec.finetune.eval_max_new_tokens,
                ).strict
                scores[score_key] = {"model": path, "strict": strict}
                if is_main():
                    write_settings(cache, {"version": 2, "scores": scores})
            row[f"acc_{label}"] = scores[score_key]["strict"]


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
