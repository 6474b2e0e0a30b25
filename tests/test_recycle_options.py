"""recycle-finetune and iterate take the transfer options: a grown vocabulary, alpha auto, a chain's `transfer:`."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from ftrecycle.diagnose.probe import ALPHAS
from ftrecycle.diagnose.verdict import best_alpha, resolve_alpha
from ftrecycle.errors import ConfigError, IncompatibleModelsError
from ftrecycle.finetune.config import FinetuneConfig
from ftrecycle.ops.diff import diff
from ftrecycle.options import TransferOptions
from ftrecycle.recycle import ChainSpec, iterate, recycle_finetune

from conftest import bits, load_dir, tree_digest
from fixtures.tiny import make_model, make_versions, perturbed, save, tiny_config

TINY_FT = {"max_steps": 2, "batch_size": 4, "learning_rate": 3e-3, "logging_every": 1}


def _write_items(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        rows.append(json.dumps({"question": f"{a} + {b} = ?", "answer": f"{a} + {b} = {a + b} #### {a + b}"}))
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A source pair of vocabulary 96 and a target whose vocabulary grew to 112."""
    return make_versions("llama", tmp_path_factory.mktemp("grown"), seed=3, target_vocab=112)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"train": _write_items(root / "train.jsonl", 16, seed=1), "calib": _write_items(root / "calib.jsonl", 8, 2)}


def _sources(v: dict[str, Path]) -> tuple[str, str, str]:
    return str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"])


def test_recycle_finetune_takes_vocab_overlap_for_a_grown_vocabulary(grown, data, tmp_path):
    cfg = FinetuneConfig(**TINY_FT)
    # the refusal names the option, and the option is now one recycle_finetune takes
    with pytest.raises(IncompatibleModelsError, match="--vocab overlap"):
        recycle_finetune(*_sources(grown), data["train"], tmp_path / "refused", config=cfg)
    assert not (tmp_path / "refused").exists()
    options = TransferOptions.of(vocab="overlap")
    res = recycle_finetune(*_sources(grown), data["train"], tmp_path / "out", transfer=options, alpha=0.5, config=cfg)
    rec = json.loads((res.output / "ftrecycle.json").read_text())
    assert rec["operation"] == "recycle-finetune" and rec["alpha"] == 0.5
    assert rec["transfer"]["vocab"] == "overlap"
    assert json.loads((res.output / "config.json").read_text())["vocab_size"] == 112
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def _stop_after(monkeypatch: pytest.MonkeyPatch, at_step: int) -> None:
    """Make fine-tuning die after step ``at_step``, as a killed run does."""
    from transformers import TrainerCallback

    import ftrecycle.finetune.train as train_mod

    class Stop(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == at_step:
                raise KeyboardInterrupt

    real = train_mod._trainer_class

    def stopping() -> Any:
        class Stopping(real()):  # type: ignore[misc]
            def __init__(self, *a: Any, **k: Any) -> None:
                super().__init__(*a, **k)
                self.add_callback(Stop())

        return Stopping

    monkeypatch.setattr(train_mod, "_trainer_class", stopping)


def test_recycle_finetune_resume_key_holds_the_transfer_options(grown, data, tmp_path, monkeypatch):
    cfg = FinetuneConfig(**{**TINY_FT, "max_steps": 4, "save_every": 2})
    out = tmp_path / "out"
    made = TransferOptions.of(vocab="overlap", compute_dtype="float64")
    with monkeypatch.context() as m:
        _stop_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            recycle_finetune(*_sources(grown), data["train"], out, transfer=made, config=cfg)
    assert (tmp_path / ".out.ftrecycle-run" / "checkpoint-2").is_dir()
    other = TransferOptions.of(vocab="overlap")  # float32 arithmetic: another start, so another run
    with pytest.raises(ConfigError, match="compute_dtype") as err:
        recycle_finetune(*_sources(grown), data["train"], out, transfer=other, config=cfg, resume=True)
    assert "--force" in str(err.value) and not out.exists()
    res = recycle_finetune(*_sources(grown), data["train"], out, transfer=made, config=cfg, resume=True)
    rec = json.loads((res.output / "ftrecycle.json").read_text())
    assert rec["resumed_from_step"] == 2 and rec["transfer"]["compute_dtype"] == "float64"


def test_recycle_finetune_alpha_auto_is_chosen_on_calibration_data(versions, data, tmp_path):
    v = versions["llama"]
    cfg = FinetuneConfig(**TINY_FT)
    with pytest.raises(ConfigError, match="--calibration"):
        recycle_finetune(*_sources(v), data["train"], tmp_path / "no", alpha="auto", config=cfg)
    assert not (tmp_path / "no").exists()
    options = TransferOptions.of(alpha="auto", calibration=str(data["calib"]))
    res = recycle_finetune(*_sources(v), data["train"], tmp_path / "out", transfer=options, config=cfg)
    rec = json.loads((res.output / "ftrecycle.json").read_text())
    chosen = best_alpha(*_sources(v), data["calib"]).best_alpha
    assert rec["alpha"] == chosen and chosen in ALPHAS
    assert rec["recycled_from"]["alpha"] == "auto" and rec["alpha_auto"]["sha256"]
    # the library function the command line shares gives the same choice
    assert resolve_alpha(*_sources(v), "auto", data["calib"]).alpha == chosen
    assert resolve_alpha(*_sources(v), 0.25).alpha == 0.25 and resolve_alpha(*_sources(v), 0.25).probe is None


def _chain(root: Path, versions: list[Path], data: dict[str, Path], **extra: object) -> Path:
    chain = {
        "versions": [str(p) for p in versions],
        "data": str(data["train"]),
        "output": "chain",
        "finetune": TINY_FT,
        **extra,
    }
    (root / "chain.yaml").write_text(json.dumps(chain))  # JSON is YAML
    return root / "chain.yaml"


def test_chain_file_transfer_section_carries_a_diff_onto_a_grown_vocabulary(data, tmp_path):
    base = make_model(tiny_config("llama"), seed=7)
    m1 = save(perturbed(base, seed=10, scale=0.005), tmp_path / "M1")
    m2 = save(perturbed(base, seed=11, scale=0.01, resize_vocab=112), tmp_path / "M2")
    with pytest.raises(IncompatibleModelsError, match="--vocab overlap"):
        iterate(ChainSpec.load(_chain(tmp_path, [m1, m2], data), output=tmp_path / "refused"))
    spec = ChainSpec.load(_chain(tmp_path, [m1, m2], data, transfer={"vocab": "overlap"}))
    assert spec.transfer.policies.vocab == "overlap"
    rows = iterate(spec)
    start = Path(rows[1]["start"])
    rec = json.loads((start / "ftrecycle.json").read_text())
    assert any(r["action"] == "vocab-overlap" for r in rec["records"])
    assert json.loads((Path(rows[1]["finetuned"]) / "config.json").read_text())["vocab_size"] == 112
    keys = json.loads((spec.output / "summary.json").read_text())["keys"]
    assert keys[start.name]["transfer"] == {"vocab": "overlap"}
    assert "transfer" not in keys["M1-star"]


def test_chain_file_alpha_auto_is_chosen_per_step(data, tmp_path):
    base = make_model(tiny_config("llama"), seed=8)
    ms = [save(perturbed(base, seed=20 + i, scale=0.005 * (i + 1)), tmp_path / f"M{i + 1}") for i in range(2)]
    spec = ChainSpec.load(_chain(tmp_path, ms, data, alpha="auto", transfer={"calibration": str(data["calib"])}))
    assert spec.alpha == "auto" and spec.transfer.scaling.alpha == "auto"
    rows = iterate(spec)
    start = Path(rows[1]["start"])
    chosen = best_alpha(str(ms[0]), str(spec.output / "M1-star"), str(ms[1]), data["calib"]).best_alpha
    assert json.loads((start / "ftrecycle.json").read_text())["alpha"] == chosen
    keys = json.loads((spec.output / "summary.json").read_text())["keys"]
    assert keys[start.name]["alpha"] == "auto" and keys[start.name]["calibration"]["sha256"]
    assert iterate(spec) == rows  # every product is reused: the search is keyed by its calibration data


BAD_TRANSFER = {
    "unknown": ({"transfer": {"vocabulary": "overlap"}}, "transfer: unknown option(s) vocabulary"),
    "force": ({"transfer": {"force": True}}, "transfer: force cannot be set here"),
    "shard_size": ({"transfer": {"shard_size": "1GB"}}, "shard_size cannot be set here"),
    "bad_value": ({"transfer": {"vocab": "grow"}}, "--vocab must be one of error, overlap"),
    "bad_dtype": ({"transfer": {"compute_dtype": "int8"}}, "--compute-dtype must be one of"),
    "bad_threads": ({"transfer": {"threads": 0}}, "--threads must be"),
    "not_a_mapping": ({"transfer": ["vocab"]}, "transfer: expected dict"),
    "auto_alone": ({"alpha": "auto"}, "calibration"),
    "calibration_alone": ({"transfer": {"calibration": "calib.jsonl"}}, "alpha: auto needs calibration"),
    "alpha_twice": ({"alpha": 0.5, "transfer": {"alpha": 0.5}}, "alpha is given both"),
    "alpha_word": ({"alpha": "half"}, "alpha must be a finite number or 'auto'"),
}


@pytest.mark.parametrize("case", list(BAD_TRANSFER))
def test_chain_file_bad_transfer_options_are_refused_in_one_line(versions, data, tmp_path, case):
    extra, needle = BAD_TRANSFER[case]
    v = versions["llama"]
    path = _chain(tmp_path, [v["source_base"], v["target_base"]], data, **extra)
    with pytest.raises(ConfigError) as err:
        ChainSpec.load(path)
    line = str(err.value)
    assert "\n" not in line and str(path) in line and needle in line, line


def test_chain_spec_built_in_code_keeps_its_fields(versions, data, tmp_path):
    v = versions["llama"]
    spec = ChainSpec(
        versions=[str(v["source_base"]), str(v["target_base"])],
        data=data["train"],
        output=tmp_path / "out",
        mode="direct",
        eval_data=None,
        alpha=0.5,
        finetune=FinetuneConfig(**TINY_FT),
    )
    assert spec.transfer.scaling.alpha == 0.5 and spec.alpha == 0.5
    spec = ChainSpec(spec.versions, spec.data, spec.output, transfer=TransferOptions.of(alpha=0.25))
    assert spec.alpha == 0.25
    with pytest.raises(ConfigError, match="force"):
        ChainSpec(spec.versions, spec.data, spec.output, transfer=TransferOptions.of(force=True))


@pytest.mark.parametrize("mode", ["iterative", "direct"])
def test_chain_file_finetuned_is_used_as_m1_star_and_never_retrained(data, tmp_path, mode):
    """`finetuned:` gives M*1: Δ1 is taken from it (bit for bit), nothing fine-tunes M1, the model is untouched."""
    base = make_model(tiny_config("llama"), seed=9)
    m1 = save(perturbed(base, seed=30, scale=0.005), tmp_path / "M1")
    m2 = save(perturbed(base, seed=31, scale=0.01), tmp_path / "M2")
    mine = save(perturbed(base, seed=32, scale=0.02), tmp_path / "my-ft-M1")
    before = tree_digest(mine)
    spec = ChainSpec.load(_chain(tmp_path, [m1, m2], data, mode=mode, finetuned="my-ft-M1"))
    assert spec.finetuned == str(mine)
    rows = iterate(spec)
    assert rows[0]["finetuned"] == str(mine)
    assert not (spec.output / "M1-star").exists() and not (spec.output / "direct-FT-M1").exists()
    stored = load_dir(spec.output / "delta-1")
    reference = load_dir(diff(str(m1), str(mine), tmp_path / "reference-delta").output)
    assert stored.keys() == reference.keys()
    assert all(torch.equal(bits(stored[k]), bits(reference[k])) for k in stored)
    assert tree_digest(mine) == before
    with pytest.raises(ConfigError, match=r"finetuned ./missing-dir: no such model directory"):
        ChainSpec.load(_chain(tmp_path, [m1, m2], data, finetuned="./missing-dir"))
