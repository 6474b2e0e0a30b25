"""Iterative recycling over a chain of versions (paper Algorithm 1), and its direct baseline.

Every product of the chain (M*i, Δi, Mi + Δi-1, D_i) is a directory kept on disk with, in
``summary.json``, the key of everything that decided it; running the chain again reuses a product
only when its key is unchanged.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftrecycle.diagnose.verdict import resolve_alpha
from ftrecycle.distributed import barrier, is_main, on_main
from ftrecycle.errors import ConfigError
from ftrecycle.evaluate import builtin
from ftrecycle.evaluate.data import read_gsm8k
from ftrecycle.finetune.train import finetune
from ftrecycle.io.hub import resolve_ref
from ftrecycle.io.output import check_no_overlap, write_json
from ftrecycle.io.provenance import portable
from ftrecycle.io.state import check_settings, file_identity, read_settings, settings_hash, write_settings
from ftrecycle.ops.apply import apply_delta
from ftrecycle.ops.diff import diff
from ftrecycle.options import ApplyOptions, DiffOptions
from ftrecycle.recycle.chainfile import ChainSpec
from ftrecycle.recycle.keys import (
    alpha_key,
    changed,
    complete,
    model_key,
    step_options,
    weight_fields,
)

SUMMARY = "summary.json"  # also holds the key of every finished step, under "keys"


#: a line of news about a long run ("step 2/5: fine-tuning M2 + Δ1"); the CLI prints it, the library never does
Say = Callable[[str], None]


def iterate(
    spec: ChainSpec, *, progress: bool = False, force: bool = False, say: Say | None = None
) -> list[dict[str, Any]]:
    """Run the chain; every finished step is kept on disk and reused when run again with the same settings.

    iterative: M*1 = FT(M1); Δi-1 = M*i-1 − Mi-1; M*i = FT(Mi + Δi-1).
    direct:    D_i = FT(M_i) for every i; M*i = FT(Mi + (D_i-1 − Mi-1)) (M*1 = D_1).

    Every product (M*i, Δi, Mi + Δi-1, D_i) is recorded in ``summary.json`` (under ``keys``) with a key of
    everything that decides it — its inputs' content identity, the data files' sha256, the
    fine-tuning settings, alpha, the transfer options that change weights — and reused only when that
    key is unchanged. Scores are keyed by the scored model's key and the evaluation data and settings,
    not by path. With ``alpha: auto`` each step's alpha is chosen on the calibration data for its own
    source, fine-tuned model and target.

    Args:
        spec: the chain.
        progress: show training progress bars.
        force: recompute products made with other settings (without it, such a product is refused).
        say: called with one line as each step starts or is reused (``step 2/5: fine-tuning M2 + Δ1``).

    Returns:
        One summary row per version (also written to ``summary.json`` and ``summary.md``).

    Raises:
        ConfigError: a finished product was made with other settings (naming what changed) and not ``force``.
    """
    spec.check_files()
    chain = _Chain(spec, progress=progress, force=force, say=say)
    on_main(chain.prepare)
    chain.run()
    if spec.eval_data is not None:
        _score(chain.rows, spec, chain.keys, chain.version_key)
    on_main(chain.summarise)
    barrier()  # leave together: a rank that exits while another still tears down its process group can abort it
    return chain.rows


@dataclass(frozen=True)
class PlannedStep:
    """One product of a chain as ``iterate --plan`` sees it.

    Attributes:
        what: the step in words (``fine-tuning M2 + Δ1``).
        output: its directory.
        status: ``reuse`` (made with the same settings), ``run`` (missing or unfinished), or ``changed``
            (made with other settings: refused without ``--force``, remade with it).
    """

    what: str
    output: str
    status: str


def plan_chain(spec: ChainSpec) -> list[PlannedStep]:
    """What :func:`iterate` would do, step by step, without doing it: which products it would reuse
    and which it would make. Reads the chain's record and the inputs' identities; writes nothing.

    Raises:
        ConfigError, DataError, CheckpointError: as :func:`iterate` would before its first step.
    """
    spec.check_files()
    chain = _Chain(spec, dry=True)
    chain.run()
    return chain.planned


@dataclass
class _Chain:
    """One run of a chain: its products' keys (recorded and current) and the rows so far."""

    spec: ChainSpec
    progress: bool = False
    force: bool = False
    rows: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)  # product name -> key on record (summary.json)
    keys: dict[str, str] = field(default_factory=dict)  # path of a model -> hash of its key, for scores
    identities: dict[str, dict[str, Any]] = field(default_factory=dict)
    say: Say | None = None
    dry: bool = False  # plan only: keys are computed, nothing is made, removed or recorded
    planned: list[PlannedStep] = field(default_factory=list)

    def __post_init__(self) -> None:
        # The steps' keys live in summary.json (read and written by the main process only), beside the rows so far.
        recorded = (read_settings(self.state_file) or {}).get("keys")
        self.state = dict(recorded) if isinstance(recorded, dict) else {}

    @property
    def out(self) -> Path:
        """The chain's output directory."""
        return self.spec.output

    @property
    def state_file(self) -> Path:
        """Where the rows and the products' keys are recorded."""
        return self.out / SUMMARY

    @property
    def inputs(self) -> list[str | Path | None]:
        """What no product may overlap (never removed, even with ``force``)."""
        s = self.spec
        return [*s.versions, s.finetuned, s.data, s.eval_data, s.transfer.scaling.calibration]

    def prepare(self) -> None:
        """Check the output and find (or fetch) every base before anything is written."""
        check_no_overlap(self.out, self.inputs, what="iterate output")
        for v in [*self.spec.versions, *filter(None, [self.spec.finetuned])]:
            resolve_ref(v)
        self.out.mkdir(parents=True, exist_ok=True)

    def run(self) -> None:
        """Make (or reuse) every product, version by version, adding a row for each."""
        spec, out = self.spec, self.out
        direct: list[Path] = []
        if spec.mode == "direct":
            # D_i = FT(M_i), each trained once; D_1 is M*1 too
            direct = [self.first(out / "direct-FT-M1", "fine-tuning M1 (D1 = M*1)")] + [
                self.ft(
                    v, self.version_key(v), out / f"direct-FT-M{i}", f"fine-tuning M{i} (D{i}, the direct baseline)"
                )
                for i, v in enumerate(spec.versions[1:-1], 2)
            ]
        for i, base in enumerate(spec.versions, 1):
            row: dict[str, Any] = {"version": f"M{i}", "base": base}
            if i <= len(direct):
                row["direct"] = str(direct[i - 1])
            if i == 1:
                tuned = direct[0] if direct else self.first(out / "M1-star", "fine-tuning M1 (M*1)")
            else:
                previous = spec.versions[i - 2]
                source = Path(self.rows[-1]["finetuned"]) if spec.mode == "iterative" else direct[i - 2]
                carried = self.delta_of(source, previous, out / f"delta-{i - 1}", i - 1)
                start = self.plus_delta(carried, base, out / f"M{i}-plus-delta-{i - 1}", (previous, source), i)
                row["start"] = str(start)
                tuned = self.ft(str(start), self.keys[str(start)], out / f"M{i}-star", f"fine-tuning M{i} + Δ{i - 1}")
            row["finetuned"] = str(tuned)
            self.rows.append(row)

    @property
    def total(self) -> int:
        """How many products the chain has (for "step k/N")."""
        n = len(self.spec.versions)
        first = 0 if self.spec.finetuned is not None else 1  # M*1 (= D1 in direct mode), unless given
        direct = n - 2 if self.spec.mode == "direct" else 0  # D2 .. D(n-1)
        return first + direct + 3 * (n - 1)

    def first(self, dest: Path, what: str) -> Path:
        """M*1: the chain file's ``finetuned`` model as given, or M1 fine-tuned into ``dest``."""
        spec = self.spec
        if spec.finetuned is None:
            return self.ft(spec.versions[0], self.version_key(spec.versions[0]), dest, what)
        given = Path(spec.finetuned)  # a directory or hub id, read by diff as any model argument
        self.keys[str(given)] = settings_hash(self.version_key(spec.finetuned))
        return given

    def version_key(self, v: str) -> dict[str, Any]:
        """A base version's key: its full identity, so that a refusal names what changed in it."""
        if v not in self.identities:
            self.identities[v] = model_key(v)
            self.keys[v] = settings_hash(self.identities[v])
        return self.identities[v]

    def product(
        self, dest: Path, key: dict[str, Any], make: Callable[[], None], what: str, *, every_rank: bool = False
    ) -> Path:
        """Reuse ``dest`` if it was made with ``key``; else (re)make it, recording the key first.

        Under `accelerate launch` the main process decides (and broadcasts) whether the step is done;
        ``make`` runs on every rank when it is collective (fine-tuning), else on the main process only.
        """
        self.keys[str(dest)] = settings_hash(key)
        step = len(self.planned) + 1
        if self.dry:
            self.planned.append(PlannedStep(what, str(dest), self.status(dest, key)))
            return dest
        self.planned.append(PlannedStep(what, str(dest), "done"))
        if on_main(lambda: self.done(dest, key)):
            self.tell(f"step {step}/{self.total}: {what}: reused ({dest.name})")
            return dest
        self.tell(f"step {step}/{self.total}: {what} -> {dest.name}")
        if every_rank:
            make()
        else:
            on_main(make)
        return dest

    def tell(self, line: str) -> None:
        """One line of news, from the main process only."""
        if self.say is not None and is_main():
            self.say(line)

    def status(self, dest: Path, key: dict[str, Any]) -> str:
        """``reuse``, ``run`` or ``changed``: what :meth:`done` would decide, without its side effects."""
        if not complete(dest):
            return "run"
        recorded, published = self.state.get(dest.name), portable(key, self.out)  # as done() compares them
        try:
            check_settings(recorded if recorded != _json_form(key) else published, published, what=f"{dest}", fix="")
        except ConfigError:
            return "changed"
        return "reuse"

    def done(self, dest: Path, key: dict[str, Any]) -> bool:
        """Whether ``dest`` exists and was made with ``key``; if not, clear it and record ``key`` for it.

        Raises:
            ConfigError: ``dest`` was made with another key, and not ``force``.
        """
        check_no_overlap(dest, self.inputs, what="iterate step")  # never remove an input, even with --force
        # keys are on record with paths relative to the chain's output (summary.json may be published);
        # one recorded with absolute paths, as earlier versions did, is still recognised
        recorded, published = self.state.get(dest.name), portable(key, self.out)
        if complete(dest):
            try:
                check_settings(
                    recorded if recorded != _json_form(key) else published,
                    published,
                    what=f"{dest}",
                    fix="pass --force to recompute it (and what depends on it), or choose another output",
                )
                self.state[dest.name] = published  # a legacy record is rewritten without its paths
                return True
            except ConfigError:
                if not self.force:
                    raise
            shutil.rmtree(dest)
        # The key goes on record before the product is made: a product on disk always has its key on record.
        self.state[dest.name] = published
        write_settings(self.state_file, self.summary())
        return False

    def summary(self) -> dict[str, Any]:
        """``summary.json``'s content: the rows so far and the products' keys, without absolute paths."""
        return {"mode": self.spec.mode, "versions": portable(self.rows, self.out), "keys": self.state}

    def ft(self, model: str, start_key: Any, dest: Path, what: str) -> Path:
        """M*: ``model`` fine-tuned on the chain's data."""
        # What decides a fine-tuned model's weights. The eval_* settings and eval data decide only its logged
        # curve and the scores, which are keyed separately (_score): changing them re-scores, it does not retrain.
        settings = {
            "data": file_identity(self.spec.data),
            "finetune": {k: v for k, v in self.spec.finetune.key().items() if not k.startswith("eval_")},
        }
        return self.product(
            dest, {"start": start_key, **settings}, lambda: self.train(model, start_key, dest), what, every_rank=True
        )

    def train(self, model: str, start_key: Any, dest: Path) -> None:
        """Fine-tune ``model`` into ``dest`` (continuing an interrupted run of the same step)."""
        finetune(
            model,
            self.spec.data,
            dest,
            config=self.spec.finetune,
            eval_data=self.spec.eval_data,
            resume=True,
            force=self.force,
            progress=self.progress,
            allow_pickle=self.spec.transfer.inputs.allow_pickle,
            model_key={"chain_start": start_key},
        )

    def delta_of(self, tuned: Path, base: str, dest: Path, i: int) -> Path:
        """Δi = tuned − base, stored as a delta directory."""
        options = self.spec.transfer
        key: dict[str, Any] = {"finetuned": self.keys[str(tuned)], "base": self.version_key(base)}
        stored = changed(options, weight_fields(DiffOptions))
        if stored:
            key["transfer"] = stored

        def make() -> None:
            diff(base, str(tuned), dest, options=step_options(DiffOptions, options))

        return self.product(dest, key, make, f"Δ{i} = {tuned.name} − M{i}")

    def plus_delta(self, carried: Path, base: str, dest: Path, source: tuple[str, Path], i: int) -> Path:
        """base + alpha · Δ; with ``alpha: auto``, alpha is chosen for ``source`` (its base, its fine-tuned)."""
        options = self.spec.transfer
        key: dict[str, Any] = {"delta": self.keys[str(carried)], "base": self.version_key(base)}
        key.update(alpha_key(options.scaling))
        applied = changed(options, weight_fields(ApplyOptions))
        if applied:
            key["transfer"] = applied

        def make() -> None:
            scaling = options.scaling
            alpha = resolve_alpha(source[0], str(source[1]), base, scaling.alpha, scaling.calibration).alpha
            apply_delta(carried, base, dest, options=step_options(ApplyOptions, options, alpha))

        return self.product(dest, key, make, f"M{i} + Δ{i - 1}")

    def summarise(self) -> None:
        """Write ``summary.json`` (rows and keys) and ``summary.md``."""
        write_json(self.state_file, self.summary())
        rows = portable(self.rows, self.out)
        (self.out / "summary.md").write_text(summary_table(rows, self.spec.mode, describe_chain(self.spec)))


#: the models of a row that are scored: row key -> score label (``acc_<label>``)
SCORED = (("base", "base"), ("start", "base_plus_delta"), ("finetuned", "finetuned"), ("direct", "direct"))


def _score(
    rows: list[dict[str, Any]], spec: ChainSpec, keys: dict[str, str], version_key: Callable[[str], Any]
) -> None:
    items = read_gsm8k(spec.eval_data) if spec.eval_data else []
    cache = spec.output / "scores.json"
    scores = _cached_scores(cache)
    evaluation = {
        "eval_data": file_identity(spec.eval_data),
        "batch_size": spec.finetune.eval_batch_size,
        "max_new_tokens": spec.finetune.eval_max_new_tokens,
    }
    for row in rows:
        for key, label in (
            ("base", "base"),
            ("start", "base_plus_delta"),
            ("finetuned", "finetuned"),
            ("direct", "direct"),
        ):
            path = row.get(key)
            if path is None:
                continue
            model_hash = keys.get(path) or settings_hash(version_key(path))
            score_key = settings_hash({"model": model_hash, **evaluation})
            if score_key not in scores:
                scores[score_key] = {"model": path, "strict": _strict(path, items, spec)}
                if is_main():
                    write_settings(cache, {"version": 2, "scores": portable(scores, spec.output)})
            row[f"acc_{label}"] = scores[score_key]["strict"]


def _json_form(value: Any) -> Any:
    """``value`` as it reads back from a JSON file (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(value, default=str))


def _cached_scores(cache: Path) -> dict[str, Any]:
    """Scores on record, keyed by what decides a score: the model's content key, the eval data, the settings."""
    # every rank evaluates its share of the items (see evaluate_gsm8k); the main process owns the cache
    stored = on_main(lambda: read_settings(cache) or {})
    held = stored.get("scores") if stored.get("version") == 2 else None
    # a score is reused only in the shape this code writes; anything else (edited, cut short) is scored again
    return {
        k: v
        for k, v in (held.items() if isinstance(held, dict) else ())
        if isinstance(v, dict) and isinstance(v.get("strict"), float)
    }


def _strict(path: str, items: list[dict[str, Any]], spec: ChainSpec) -> float:
    model, tok = builtin.load_for_eval(path)
    return builtin.evaluate_gsm8k(
        model,
        tok,
        items,
        batch_size=spec.finetune.eval_batch_size,
        max_gen_toks=spec.finetune.eval_max_new_tokens,
    ).strict


def describe_chain(spec: ChainSpec) -> list[str]:
    """What a chain's summary table measures and how its models were made, one line each."""
    ft, out = spec.finetune, spec.output
    length = f"{ft.max_steps} steps" if ft.max_steps > 0 else f"{ft.epochs:g} epochs"
    lines = [
        f"mode: {spec.mode} ({len(spec.versions)} versions); fine-tuning: {portable(str(spec.data), out)}, {length}, "
        f"learning rate "
        f"{ft.learning_rate:g}, batch {ft.batch_size} x {ft.grad_accum}; alpha {spec.transfer.scaling.alpha}",
    ]
    if spec.eval_data is None:
        lines.append("no eval_data: accuracies not measured")
    else:
        n = len(read_gsm8k(spec.eval_data))
        lines.append(
            f"accuracy: strict exact match (the number after '####') of the built-in evaluator on the {n} items of "
            f"{portable(str(spec.eval_data), out)}, 0-shot, greedy, at most {ft.eval_max_new_tokens} new tokens, "
            "in percent"
        )
    if spec.mode == "iterative":
        lines.append("FT(M_i): not trained in iterative mode (run mode: direct for that baseline)")
    return lines


def summary_table(rows: list[dict[str, Any]], mode: str, notes: list[str] | None = None) -> str:
    """A markdown table of the chain (accuracies where evaluated): M_i, M_i + Δ, M*_i and, in direct
    mode, the baseline FT(M_i); ``notes`` (see :func:`describe_chain`) say what the numbers are."""
    head = (
        f"# iterate ({mode})\n\n"
        + "".join(f"- {n}\n" for n in notes or [])
        + ("\n" if notes else "")
        + "| version | M_i | M_i + Δ | M*_i | FT(M_i) | fine-tuned model |\n|---|---|---|---|---|---|\n"
    )

    def pct(v: Any) -> str:
        return f"{100 * v:.1f}" if isinstance(v, float) else "–"

    body = "".join(
        f"| {r['version']} | {pct(r.get('acc_base'))} | {pct(r.get('acc_base_plus_delta'))} | "
        f"{pct(r.get('acc_finetuned'))} | {pct(r.get('acc_direct'))} | {r['finetuned']} |\n"
        for r in rows
    )
    return head + body
