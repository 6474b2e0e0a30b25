"""State that cannot outlive its settings, and hostile inputs to the training side (issue 10, item 6 and more).

Each test is one class of failure, parametrised over crafted cases built here the way a careless or
hostile user would make them: a resume after changing a setting, a chain rerun after editing a data
file, a checkpoint whose only loadable weights are a pickle, JSONL and YAML that attack the parser.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ftrecycle.cli import main
from ftrecycle.errors import CheckpointError, ConfigError, FtRecycleError
from ftrecycle.finetune.config import FinetuneConfig

from fixtures.tiny import make_model, perturbed, save, tiny_config

TINY_FT = {"batch_size": 4, "learning_rate": 3e-3, "logging_every": 1, "eval_max_new_tokens": 4, "eval_batch_size": 8}


def _item(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return {"question": f"{a} + {b} = ?", "answer": f"{a} + {b} = {a + b} #### {a + b}"}


def _write_items(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps(_item(rng)) + "\n" for _ in range(n)))
    return path


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int) -> str:
    # iterate's progress lines ("step 2/4: ...: reused") come before the refusal: the error itself is one line
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not re.match(r"step \d+/\d+: ", line)]
    assert code == 2 and len(err) == 1 and err[0].startswith("ftrecycle: error: "), (code, err)
    return err[0]


def _keep_mtime_copy(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=shutil.copy2)


# --- 1. resume: an unfinished run continues only with the settings and inputs it was made with ------------


def _interrupted(run: Callable[[], Any], at_step: int = 3) -> None:
    """Run a fine-tune that dies after step ``at_step`` (after the checkpoint of step 2)."""
    from transformers import TrainerCallback

    import ftrecycle.finetune.train as train_mod

    class Stop(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == at_step:
                raise KeyboardInterrupt

    real = train_mod._trainer_class

    def stopping() -> Any:
        cls = real()

        class Stopping(cls):  # type: ignore[misc, valid-type]
            def __init__(self, *a: Any, **k: Any) -> None:
                super().__init__(*a, **k)
                self.add_callback(Stop())

        return Stopping

    train_mod._trainer_class = stopping
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        train_mod._trainer_class = real


def _ft_flags(cfg: dict[str, Any]) -> list[str]:
    return [w for k, v in cfg.items() for w in (f"--{k.replace('_', '-')}", str(v))]


RESUME_CASES = {
    # name: (command, what the rerun changes, text the refusal must name)
    "learning_rate": ("finetune", {"learning_rate": 1e-4}, "learning_rate 0.003 -> 0.0001"),
    "max_steps": ("finetune", {"max_steps": 8}, "max_steps 6 -> 8"),
    "data_content": ("finetune", {"data": "edited"}, "data.sha256"),
    "eval_data_added": ("finetune", {"eval_data": "added"}, "eval_data"),
    "model_rewritten": ("finetune", {"model": "rewritten"}, "model.files"),
    "recycle_alpha": ("recycle-finetune", {"alpha": 0.5}, "alpha 1.0 -> 0.5"),
    "recycle_target_rewritten": ("recycle-finetune", {"model": "rewritten"}, "target_base"),
    "force_starts_over": ("finetune", {"learning_rate": 1e-4, "force": True}, None),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_refuses_a_run_made_with_other_settings_or_inputs(versions, tmp_path, capsys, case):
    from ftrecycle.finetune.train import finetune
    from ftrecycle.recycle import recycle_finetune

    command, change, needle = RESUME_CASES[case]
    v = {k: tmp_path / k for k in versions["llama"]}
    for k, p in versions["llama"].items():
        _keep_mtime_copy(p, v[k])
    data = _write_items(tmp_path / "train.jsonl", 40, seed=1)
    test = _write_items(tmp_path / "test.jsonl", 4, seed=2)
    out = tmp_path / "out"
    cfg = {**TINY_FT, "max_steps": 6, "save_every": 2}
    if command == "finetune":
        _interrupted(lambda: finetune(str(v["source_base"]), data, out, config=FinetuneConfig(**cfg)))
    else:
        _interrupted(
            lambda: recycle_finetune(
                str(v["source_base"]),
                str(v["source_finetuned"]),
                str(v["target_base"]),
                data,
                out,
                config=FinetuneConfig(**cfg),
            )
        )
    assert (tmp_path / ".out.ftrecycle-run" / "checkpoint-2").is_dir()

    new = {**cfg, **{k: x for k, x in change.items() if k in ("learning_rate", "max_steps")}}
    if change.get("data") == "edited":
        data.write_text(data.read_text().replace("= ?", "=?", 1))  # one character, same path and size class
    if change.get("model") == "rewritten":
        which = "source_base" if command == "finetune" else "target_base"
        shutil.rmtree(v[which])
        save(perturbed(make_model(tiny_config("llama"), seed=0), seed=99, scale=0.01), v[which], max_shard_size="20KB")
    args = [command]
    if command == "finetune":
        args += ["--model", str(v["source_base"])]
    else:
        args += ["--source-base", str(v["source_base"]), "--source-finetuned", str(v["source_finetuned"])]
        args += ["--target-base", str(v["target_base"]), "--alpha", str(change.get("alpha", 1.0))]
    args += ["--data", str(data), "-o", str(out), "--resume", *_ft_flags(new)]
    if change.get("eval_data") == "added":
        args += ["--eval-data", str(test)]
    if change.get("force"):
        args.append("--force")
    capsys.readouterr()
    code = main(args)
    if needle is None:  # --force: the old run is discarded and the new settings run from step 0
        capsys.readouterr()
        assert code == 0
        rec = json.loads((out / "ftrecycle.json").read_text())
        assert rec["config"]["learning_rate"] == 1e-4 and rec["resumed_from_step"] == 0 and rec["steps"] == 6
        return
    line = _one_line_error(capsys, code)
    assert needle in line and "--force" in line, line
    assert not out.exists() and (tmp_path / ".out.ftrecycle-run" / "checkpoint-2").is_dir()


# --- 2. iterate: products and scores are reused only when what decides them is unchanged -------------------


@pytest.fixture(scope="module")
def chain_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ftrecycle.recycle import ChainSpec, iterate

    root = tmp_path_factory.mktemp("chain")
    base = make_model(tiny_config("llama"), seed=7)
    for i in range(2):
        save(perturbed(base, seed=10 + i, scale=0.005 * (i + 1)), root / "models" / f"M{i + 1}")
    _write_items(root / "train.jsonl", 40, seed=3)
    _write_items(root / "test.jsonl", 6, seed=4)
    _chain_file(root, {})
    iterate(ChainSpec.load(root / "chain.yaml"))
    return root


def _chain_file(root: Path, finetune: dict[str, Any], alpha: float = 1.0) -> Path:
    chain = {
        "versions": ["models/M1", "models/M2"],
        "data": "train.jsonl",
        "output": "chain",
        "eval_data": "test.jsonl",
        "alpha": alpha,
        "finetune": {**TINY_FT, "max_steps": 2, **finetune},
    }
    (root / "chain.yaml").write_text(json.dumps(chain))
    return root / "chain.yaml"


ITERATE_CASES = {
    # name: (what changes, text the refusal names, or None: no refusal, scores are recomputed)
    "max_steps": ({"finetune": {"max_steps": 3}}, "finetune.max_steps 2 -> 3"),
    "learning_rate": ({"finetune": {"learning_rate": 1e-3}}, "finetune.learning_rate 0.003 -> 0.001"),
    "alpha": ({"alpha": 0.5}, "alpha 1.0 -> 0.5"),
    "data_content": ({"edit": "train.jsonl"}, "data.sha256"),
    "version_rewritten": ({"rewrite": "M2"}, "base.files"),
    "eval_data_content": ({"edit": "test.jsonl"}, None),
    "force_recomputes": ({"finetune": {"max_steps": 3}, "force": True}, None),
    "scores_cache_a_list": ({"scores": "list"}, None),
    "scores_cache_entries_edited": ({"scores": "no_strict"}, None),
}


@pytest.mark.parametrize("case", list(ITERATE_CASES))
def test_iterate_reuses_only_what_the_same_settings_and_inputs_made(chain_root, case, capsys, monkeypatch):
    import ftrecycle.evaluate.builtin as builtin

    change, needle = ITERATE_CASES[case]
    root = chain_root
    saved = root.parent / f"{root.name}-saved"
    # Work in place (paths are part of the key), and put everything back afterwards.
    shutil.copytree(root, saved, copy_function=shutil.copy2, symlinks=True)
    calls: list[str] = []
    real = builtin.evaluate_gsm8k
    monkeypatch.setattr(builtin, "evaluate_gsm8k", lambda m, *a, **k: calls.append("x") or real(m, *a, **k))
    try:
        _chain_file(root, change.get("finetune", {}), alpha=change.get("alpha", 1.0))
        if "edit" in change:
            f = root / change["edit"]
            f.write_text(f.read_text().replace("= ?", "=?"))
        if "rewrite" in change:
            shutil.rmtree(root / "models" / change["rewrite"])
            save(perturbed(make_model(tiny_config("llama"), seed=7), seed=50, scale=0.01), root / "models" / "M2")
        if change.get("scores") == "list":
            (root / "chain" / "scores.json").write_text('{"version": 2, "scores": [0.9]}')
        elif "scores" in change:
            held = json.loads((root / "chain" / "scores.json").read_text())
            held["scores"] = {k: {"model": v["model"], "strict": "0.9"} for k, v in held["scores"].items()}
            (root / "chain" / "scores.json").write_text(json.dumps(held))
        before = (root / "chain" / "summary.json").read_text()
        capsys.readouterr()
        code = main(["iterate", str(root / "chain.yaml"), *(["--force"] if change.get("force") else [])])
        if needle is not None:
            line = _one_line_error(capsys, code)
            assert needle in line and "--force" in line, line
            assert (root / "chain" / "summary.json").read_text() == before
        else:
            out = capsys.readouterr().out
            assert code == 0, out
            if case == "eval_data_content" or "scores" in change:
                assert len(calls) == 5, calls  # M1, M2, M2 + Δ1, M*1, M*2 scored again, on the new data
            else:
                rec = json.loads((root / "chain" / "M1-star" / "ftrecycle.json").read_text())
                assert rec["steps"] == 3 and rec["config"]["max_steps"] == 3
                assert json.loads((root / "chain" / "M2-star" / "ftrecycle.json").read_text())["steps"] == 3
    finally:
        shutil.rmtree(root)
        saved.rename(root)


# --- 3. recycle-finetune records what it did, not its deleted temporary start -----------------------------


@pytest.mark.parametrize(("alpha", "with_eval"), [(0.5, False), (1.0, True), (-0.25, False)])
def test_recycle_finetune_provenance_names_its_sources(versions, tmp_path, alpha, with_eval):
    from ftrecycle.recycle import recycle_finetune

    v = versions["llama"]
    data = _write_items(tmp_path / "train.jsonl", 16, seed=5)
    test = _write_items(tmp_path / "test.jsonl", 4, seed=6) if with_eval else None
    recycle_finetune(
        str(v["source_base"]),
        str(v["source_finetuned"]),
        str(v["target_base"]),
        data,
        tmp_path / "out",
        alpha=alpha,
        config=FinetuneConfig(**TINY_FT, max_steps=2),
        eval_data=test,
    )
    text = (tmp_path / "out" / "ftrecycle.json").read_text()
    rec = json.loads(text)
    assert rec["operation"] == "recycle-finetune" and rec["alpha"] == alpha
    # named relative to the output, so that an uploaded output names no local directory
    assert {k: rec["inputs"][k]["path"] for k in ("source_base", "source_finetuned", "target_base")} == {
        k: os.path.relpath(Path(v[k]).resolve(), (tmp_path / "out").resolve())
        for k in ("source_base", "source_finetuned", "target_base")
    }
    assert "ftrecycle-start" not in text and "model" not in rec["inputs"]
    assert rec["inputs"]["data"]["sha256"] and rec["config"]["max_steps"] == 2
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


# --- 4. no pickle is unpickled without --allow-pickle, through transformers either -------------------------


@pytest.fixture(scope="module")
def unfinished(versions, tmp_path_factory) -> dict[str, Path]:
    """A fine-tune stopped after its step-2 checkpoint and its first evaluations, to be damaged per case."""
    from ftrecycle.finetune.train import finetune

    root = tmp_path_factory.mktemp("unfinished")
    data = _write_items(root / "train.jsonl", 40, seed=1)
    test = _write_items(root / "test.jsonl", 4, seed=2)
    cfg = FinetuneConfig(**{**TINY_FT, "max_steps": 6, "save_every": 2, "eval_every": 2})
    model = str(versions["llama"]["source_base"])
    _interrupted(lambda: finetune(model, data, root / "out", config=cfg, eval_data=test))
    run = root / ".out.ftrecycle-run"
    assert (run / "checkpoint-2").is_dir() and (run / "eval_log.json").is_file()
    return {"root": root, "run": run, "data": data, "test": test, "model": Path(model)}


#: what is damaged in the unfinished run's work directory, and the file the refusal must name
DAMAGED: dict[str, tuple[Callable[[Path], Any], str]] = {
    "eval log: not JSON": (lambda r: (r / "eval_log.json").write_text('[{"step": 2, "acc'), "eval_log.json"),
    "eval log: an object": (lambda r: (r / "eval_log.json").write_text('{"step": 2}'), "eval_log.json"),
    "eval log: not UTF-8": (lambda r: (r / "eval_log.json").write_bytes(b"\xff[]"), "eval_log.json"),
    "eval log: 100k deep": (lambda r: (r / "eval_log.json").write_text("[" * 100_000 + "]" * 100_000), "eval_log.json"),
    "checkpoint-abc": (lambda r: (r / "checkpoint-abc").mkdir(), "checkpoint-abc"),
    "checkpoint-9 empty": (lambda r: (r / "checkpoint-9").mkdir(), "checkpoint-9"),
    "checkpoint-9 a file": (lambda r: (r / "checkpoint-9").write_text("x"), "checkpoint-9"),
    "checkpoint-9 a link": (lambda r: (r / "checkpoint-9").symlink_to(r / "checkpoint-2"), "checkpoint-9"),
    "weights gone": (lambda r: (r / "checkpoint-2" / "model.safetensors").unlink(), "checkpoint-2"),
    "trainer state cut": (lambda r: (r / "checkpoint-2" / "trainer_state.json").write_text('{"glo'), "trainer_state"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_unfinished_run_is_refused_in_one_line(unfinished, tmp_path, capsys, case):
    """--resume over a work directory cut short or edited by hand: one line naming the file, nothing written."""
    run = tmp_path / ".out.ftrecycle-run"
    shutil.copytree(unfinished["run"], run, symlinks=True)
    damage, needle = DAMAGED[case]
    damage(run)
    flags = _ft_flags({**TINY_FT, "max_steps": 6, "save_every": 2, "eval_every": 2})
    args = ["finetune", "--model", str(unfinished["model"]), "--data", str(unfinished["data"])]
    args += ["--eval-data", str(unfinished["test"]), "-o", str(tmp_path / "out"), "--resume", *flags]
    line = _one_line_error(capsys, main(args))
    assert needle in line and "--force" in line, line
    assert not (tmp_path / "out").exists() and (run / "run-settings.json").is_file()


def _pickle_dirs(versions: dict[str, dict[str, Path]], root: Path) -> dict[str, Path]:
    """``mixed``: unindexed safetensors shards beside a pytorch_model.bin (ftrecycle reads the shards,
    transformers falls back to the pickle); ``pickle``: only pytorch_model.bin and config.json."""
    src = versions["llama"]["target_base"]
    mixed = root / "mixed"
    shutil.copytree(src, mixed)
    (mixed / "model.safetensors.index.json").unlink()
    model = make_model(tiny_config("llama"), seed=3)
    torch.save(model.state_dict(), mixed / "pytorch_model.bin")
    only = root / "pickle"
    only.mkdir()
    shutil.copy(src / "config.json", only / "config.json")
    for f in src.glob("tokenizer*"):
        shutil.copy(f, only / f.name)
    torch.save(model.state_dict(), only / "pytorch_model.bin")
    return {"mixed": mixed, "pickle": only}


PICKLE_CASES = ["finetune-mixed", "finetune-pickle-only", "recycle-finetune-target-mixed", "eval-mixed", "probe-mixed"]


@pytest.mark.parametrize("case", PICKLE_CASES)
def test_no_pickle_is_loaded_without_allow_pickle(versions, tmp_path, capsys, monkeypatch, case):
    dirs = _pickle_dirs(versions, tmp_path)
    v = versions["llama"]
    data = _write_items(tmp_path / "train.jsonl", 8, seed=7)

    def no_unpickling(*a: Any, **k: Any) -> Any:
        raise AssertionError(f"a pickle was loaded: {a[:1]}")

    monkeypatch.setattr(torch, "load", no_unpickling)
    what, _, kind = case.rpartition("-")
    model = dirs["pickle" if kind == "only" else "mixed"]
    if what.startswith("finetune") or what.startswith("recycle"):
        if what.startswith("finetune"):
            args = ["finetune", "--model", str(model)]
        else:  # the transfer reads the shards; nothing may fall back to the target's pickle
            args = ["recycle-finetune", "--source-base", str(v["source_base"])]
            args += ["--source-finetuned", str(v["source_finetuned"]), "--target-base", str(model)]
        code = main([*args, "--data", str(data), "-o", str(tmp_path / "o"), "--max-steps", "1"])
        if what.startswith("recycle"):
            capsys.readouterr()
            assert code == 0  # the merged start is safetensors: the run succeeds without reading the pickle
            return
        line = _one_line_error(capsys, code)
        assert "pickle" in line and "--allow-pickle" in line and str(model) in line, line
        assert not (tmp_path / "o").exists()
    elif what == "eval":
        from ftrecycle.evaluate.builtin import load_for_eval

        with pytest.raises(CheckpointError):
            load_for_eval(str(model), device="cpu")
    else:
        from ftrecycle.diagnose.verdict import best_alpha

        with pytest.raises(CheckpointError):
            best_alpha(str(v["source_base"]), str(v["source_finetuned"]), str(model), data, max_examples=4)


# --- 5. JSONL data: every bad line is one `file:line: what` error; a mistyped path is missing --------------

DEEP = 100_000
JSONL_CASES = {
    "non_utf8": (b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "b"}\n', "train.jsonl:2:"),
    "invalid_json": (b'{"prompt": "a", "completion": }\n', "train.jsonl:1: not valid JSON"),
    "list_line": (b'["prompt", "completion"]\n', "train.jsonl:1: a JSON list"),
    "number_line": (b"42\n", "train.jsonl:1: a JSON int"),
    "deep_list": (b"[" * DEEP + b"]" * DEEP + b"\n", "train.jsonl:1:"),
    "deep_object": (b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"\n", "train.jsonl:1:"),
    "prompt_not_string": (b'{"prompt": 3, "completion": "b"}\n', "train.jsonl:1: missing field 'prompt'"),
    "messages_not_list": (b'{"messages": "hi"}\n', "train.jsonl:1: 'messages'"),
    "content_not_string": (
        b'{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "x"}]}\n',
        "train.jsonl:1: 'messages'",
    ),
    "eval_non_utf8": (b"\xc3\x28\n", "test.jsonl:1: not UTF-8"),
    "eval_not_object": (b'"question"\n', "test.jsonl:1: a JSON str"),
    "mistyped_local_path": (None, "data/trian.jsonl: no such data file"),
    "mistyped_path_no_dir": (None, "nodir/trian.jsonl: no such data file"),
}


@pytest.mark.parametrize("case", list(JSONL_CASES))
def test_bad_jsonl_is_one_line_naming_file_and_line(versions, tmp_path, capsys, monkeypatch, case):
    content, needle = JSONL_CASES[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    good = _write_items(tmp_path / "data" / "train.jsonl", 4, seed=8)
    data, eval_args = str(good), []
    if case.startswith("eval"):
        assert content is not None
        (tmp_path / "test.jsonl").write_bytes(content)
        eval_args = ["--eval-data", str(tmp_path / "test.jsonl")]
    elif content is not None:
        (tmp_path / "train.jsonl").write_bytes(content)
        data = str(tmp_path / "train.jsonl")
    else:
        data = "data/trian.jsonl" if case == "mistyped_local_path" else "nodir/trian.jsonl"
    before = {p: p.read_bytes() for p in tmp_path.glob("*.jsonl")}
    model = str(versions["llama"]["source_base"])
    code = main(["finetune", "--model", model, "--data", data, "-o", "o", *eval_args, "--max-steps", "1"])
    line = _one_line_error(capsys, code)
    assert needle in line, line
    assert "hub" not in line or "no such data file" in line
    assert not (tmp_path / "o").exists() and {p: p.read_bytes() for p in tmp_path.glob("*.jsonl")} == before


# --- 6. chain YAML: no alias bombs, no deep nesting, typed keys, missing models named missing --------------

BOMB = (
    "versions:\n"
    + "".join(
        f"  - &{c} [{', '.join(['*' + p] * 9) if p else ', '.join(['lol'] * 9)}]\n"
        for p, c in zip([None, *"abcdefgh"], "abcdefghi", strict=True)
    )
    + "data: train.jsonl\noutput: out\n"
)
CHAIN_CASES = {
    "alias_reuse": ("versions: [models/M1, models/M1]\ndata: &d train.jsonl\neval_data: *d\noutput: out\n", "alias"),
    "anchor_only": ("versions: &v [models/M1, models/M1]\ndata: train.jsonl\noutput: out\n", "anchors"),
    "deep_nesting": ("versions: " + "[" * 100_000 + "]" * 100_000 + "\ndata: train.jsonl\noutput: out\n", "nested"),
    "alpha_abc": ("versions: [models/M1, models/M1]\ndata: train.jsonl\noutput: out\nalpha: abc\n", "alpha"),
    "alpha_nan": ("versions: [models/M1, models/M1]\ndata: train.jsonl\noutput: out\nalpha: .nan\n", "alpha"),
    "data_list": ("versions: [models/M1, models/M1]\ndata: [train.jsonl]\noutput: out\n", "data: expected str"),
    "finetune_list": (
        "versions: [models/M1, models/M1]\ndata: train.jsonl\noutput: out\nfinetune: [1]\n",
        "finetune: expected dict",
    ),
    "version_number": ("versions: [1, 2]\ndata: train.jsonl\noutput: out\n", "versions[1]"),
    "unknown_key": ("versions: [models/M1, models/M1]\ndata: train.jsonl\noutput: out\nlr: 1\n", "unknown key"),
    "missing_model": (
        "versions: [models/M1, models/M9]\ndata: train.jsonl\noutput: out\n",
        "models/M9: no such model directory",
    ),
    "missing_data": ("versions: [models/M1, models/M1]\ndata: data/trian.jsonl\noutput: out\n", "no such data file"),
    "not_utf8": (b"versions: [models/M1, models/M1]\ndata: \xff.jsonl\noutput: out\n", "not UTF-8"),
}


@pytest.mark.parametrize("case", [*CHAIN_CASES, "billion_laughs"])
def test_bad_chain_files_are_refused_in_one_line(versions, tmp_path, capsys, case):
    (tmp_path / "models").mkdir()
    shutil.copytree(versions["llama"]["source_base"], tmp_path / "models" / "M1")
    (tmp_path / "data").mkdir()
    _write_items(tmp_path / "train.jsonl", 4, seed=9)
    chain = tmp_path / "chain.yaml"
    if case == "billion_laughs":  # the old loader expanded it while building the version names: run it apart
        chain.write_text(BOMB)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "ftrecycle.cli", "iterate", str(chain)],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
                cwd=tmp_path,
            )
        except subprocess.TimeoutExpired:
            pytest.fail("a YAML alias bomb hangs the chain loader")
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and "alias" in err[0] and "chain.yaml" in err[0], err
        return
    content, needle = CHAIN_CASES[case]
    chain.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = _one_line_error(capsys, main(["iterate", str(chain)]))
    assert "chain.yaml" in line and needle in line, line
    assert not (tmp_path / "out").exists()


# --- 7. lab: findings on flat numbers never PASS; smoke reports say they are not evidence ------------------


def _flat_numbers(value: float) -> dict[str, Any]:
    from ftrecycle.lab.experiments import COMPRESSIONS, STAGE2_PAIRS
    from ftrecycle.lab.pretrain import VERSIONS as V

    curve = [[s, value] for s in (0, 2, 4)]
    return {
        "base": dict.fromkeys(V, value),
        "transfer": {j: {i: value for i in V if i != j} for j in V},
        "direct_ft": {v: {"final": value, "curve": curve} for v in V},
        "recycle_ft": {j: {i: {"final": value, "curve": curve} for i in V if i != j} for j in V},
        "iterative": {
            v: {"iter_ft": value, "dir_ft": value, "base": value, "direct_ft": value} for v in ("M3", "M4", "M5")
        },
        "compressed": {
            spec: {f"{j}+Δ{i[1]}": {"accuracy": value, "ratio": 16.0, "median_error": 0.1} for i, j in STAGE2_PAIRS}
            for spec in COMPRESSIONS
        },
    }


@pytest.mark.parametrize(("preset", "value"), [("smoke", 0.0), ("tiny", 0.0), ("tiny", 50.0), ("smoke", 12.5)])
def test_flat_numbers_and_smoke_runs_are_never_evidence(preset, value):
    from ftrecycle.lab.findings import all_findings
    from ftrecycle.lab.report import _findings, not_evidence

    findings = all_findings(_flat_numbers(value), 4)
    assert [f["passed"] for f in findings] == [False] * 5 and all(f["no_signal"] for f in findings)
    table = "\n".join(_findings(findings, {}))
    assert "PASS" not in table and table.count("(no signal)") == 5
    why = not_evidence({"config": {"preset": preset}, "findings": findings})
    assert why and ("smoke" in why if preset == "smoke" else "no signal" in why)


def _job_value(value: int, data: str) -> dict[str, Any]:
    return {"value": value, "lines": len(Path(data).read_text().splitlines())}


def _job_other(value: int, data: str) -> dict[str, Any]:
    return {"value": -value, "lines": 0}


@pytest.mark.parametrize(
    "change", ["argument", "data_file_content", "function", "no_key_on_record", "unreadable_result", "result_a_list"]
)
def test_lab_job_cache_is_keyed_by_arguments_and_input_files(tmp_path, change):
    from ftrecycle.lab.scheduler import Job, run_jobs

    data = tmp_path / "data.jsonl"
    data.write_text("a\nb\n")
    cache = tmp_path / "jobs"
    first = run_jobs([Job("j", _job_value, {"value": 1, "data": str(data)})], cache)
    assert first["j"] == {"value": 1, "lines": 2}
    fn, kwargs = _job_value, {"value": 1, "data": str(data)}
    if change == "no_key_on_record":  # a result from before keys (or a half-written one) is computed again
        (cache / "j.key.json").unlink()
        (cache / "j.json").write_text('{"value": 7, "lines": 0}')
        assert run_jobs([Job("j", fn, kwargs)], cache)["j"] == {"value": 1, "lines": 2}
        return
    if change in ("unreadable_result", "result_a_list"):  # cut short or edited by hand: computed again
        (cache / "j.json").write_text('{"value": 7, "li' if change == "unreadable_result" else "[7]")
        assert run_jobs([Job("j", fn, kwargs)], cache)["j"] == {"value": 1, "lines": 2}
        return
    if change == "argument":
        kwargs["value"] = 2
    elif change == "data_file_content":
        data.write_text("a\nb\nc\n")
    else:
        fn = _job_other
    with pytest.raises(ConfigError, match=r"lab job j .* other inputs") as e:
        run_jobs([Job("j", fn, kwargs)], cache)
    assert isinstance(e.value, FtRecycleError) and "\n" not in str(e.value)


#: (file in the run directory, its crafted content, the lab command that reads it back)
RUN = ["run", "--preset", "smoke", "--quiet"]
LAB_FILES: dict[str, tuple[str, bytes, list[str]]] = {
    "results: empty object": ("results.json", b"{}", ["report"]),
    "results: a list": ("results.json", b"[]", ["report"]),
    "results: mean is null": ("results.json", b'{"config": {"seeds": [0]}, "mean": null}', ["report"]),
    "results: findings a number": (
        "results.json",
        b'{"config": {"preset": "tiny", "seeds": [0]}, "findings": 3, "mean": {}, "paper": {}}',
        ["report"],
    ),
    "results: not JSON": ("results.json", b"{x", ["report"]),
    "results: not UTF-8": ("results.json", b"\xff\xfe{}", ["report"]),
    "results: NaN alone": ("results.json", b"NaN", ["report"]),
    "settings: not JSON": ("lab-config.json", b"{x", RUN),
    "settings: a list": ("lab-config.json", b"[]", RUN),
    "settings: 100k deep": ("lab-config.json", b"[" * 100_000 + b"]" * 100_000, RUN),
}


@pytest.mark.parametrize("case", list(LAB_FILES))
def test_lab_files_read_back_are_checked(tmp_path, capsys, case):
    """A run directory's own files, edited or cut short, read back by `lab report` and `lab run`."""
    name, content, argv = LAB_FILES[case]
    run = tmp_path / "run"
    run.mkdir()
    (run / name).write_bytes(content)
    out = ["--out", str(run)] if argv[0] == "run" else [str(run)]
    code = main(["lab", *argv, *out])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ftrecycle: error: "), err
    assert str(run / name) in lines[0], lines[0]
    assert sorted(p.name for p in run.iterdir()) == [name] and (run / name).read_bytes() == content


#: a JSON file transformers reads beside the weights, damaged; (file, content)
MODEL_JSON: dict[str, tuple[str, bytes]] = {
    "tokenizer.json cut short": ("tokenizer.json", b'{"version": "1.0", "trunc'),
    "tokenizer.json 100k deep": ("tokenizer.json", b"[" * 100_000 + b"]" * 100_000),
    "tokenizer.json not UTF-8": ("tokenizer.json", b"\xff\xfe{}"),
    "tokenizer.json without its fields": ("tokenizer.json", b'{"version": "1.0"}'),
    "tokenizer_config.json a list": ("tokenizer_config.json", b"[]"),
    "special_tokens_map.json not JSON": ("special_tokens_map.json", b"{x"),
    "generation_config.json cut short": ("generation_config.json", b'{"bos_token_id": 1, "eos'),
}


@pytest.mark.parametrize("command", ["finetune", "eval"])
@pytest.mark.parametrize("case", list(MODEL_JSON))
def test_broken_tokenizer_and_generation_files_are_one_line(versions, tmp_path, capsys, case, command):
    """transformers read these unchecked: an internal error, or (generation_config) silently dropped, exit 0."""
    model = tmp_path / "model"
    shutil.copytree(versions["llama"]["source_base"], model)
    name, content = MODEL_JSON[case]
    (model / name).write_bytes(content)
    data = _write_items(tmp_path / "train.jsonl", 8, seed=3)
    if command == "finetune":
        args = ["finetune", "--model", str(model), "--data", str(data), "-o", str(tmp_path / "o"), "--max-steps", "1"]
    else:
        args = ["eval", "--model", str(model), "--builtin", str(data), "--limit", "1", "--max-new-tokens", "2"]
    line = _one_line_error(capsys, main([*args, "--device", "cpu"] if command == "eval" else args))
    assert str(model) in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "train.jsonl"], "a failed run left its work dir"


@pytest.mark.parametrize("command", ["finetune", "recycle-finetune"])
def test_a_run_that_fails_before_training_leaves_no_work_dir(versions, tmp_path, capsys, command):
    """Nothing to resume, so no .OUT.ftrecycle-run (nor recycle-finetune's .OUT.ftrecycle-start) is left."""
    data = _write_items(tmp_path / "train.jsonl", 8, seed=3)
    v = versions["llama"]
    models = ["--model", str(v["source_base"])]
    if command == "recycle-finetune":
        models = ["--source-base", str(v["source_base"]), "--source-finetuned", str(v["source_finetuned"])]
        models += ["--target-base", str(v["target_base"])]
    for extra in ([], ["--resume"]):
        args = [command, *models, "--data", str(data)]
        line = _one_line_error(capsys, main([*args, "-o", str(tmp_path / "o"), "--max-length", "1", *extra]))
        assert "--max-length" in line, line
        assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"], extra


def test_a_run_started_meanwhile_keeps_its_work_dir(versions, tmp_path, capsys, monkeypatch):
    """Two finetunes for one OUT: the one that checked first and loads slower must not remove the other's run."""
    import ftrecycle.finetune.train as train_mod

    data = _write_items(tmp_path / "train.jsonl", 8, seed=3)
    other = tmp_path / ".o.ftrecycle-run"
    real = train_mod.load_tokenizer

    def slow_load(*a: Any, **k: Any) -> Any:  # the other run makes its work dir while this one loads
        other.mkdir()
        (other / "checkpoint-1").mkdir()
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "load_tokenizer", slow_load)
    args = ["finetune", "--model", str(versions["llama"]["source_base"]), "--data", str(data)]
    line = _one_line_error(capsys, main([*args, "-o", str(tmp_path / "o"), "--max-steps", "1"]))
    assert "another run" in line and str(other) in line, line
    assert (other / "checkpoint-1").is_dir() and not (tmp_path / "o").exists()


def test_a_chain_base_that_cannot_be_found_leaves_no_output(versions, tmp_path, capsys, monkeypatch):
    """Every base of a chain is found (or fetched) before the output directory is made."""
    (tmp_path / "models").mkdir()
    shutil.copytree(versions["llama"]["source_base"], tmp_path / "models" / "M1")
    _write_items(tmp_path / "train.jsonl", 4, seed=9)
    chain = tmp_path / "chain.yaml"
    # a hub-shaped id with no network (HF_HUB_OFFLINE): the second base fails, before any step
    chain.write_text("versions: [models/M1, acme/no-such-model]\ndata: train.jsonl\noutput: out\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _one_line_error(capsys, main(["iterate", str(chain)]))
    assert "acme/no-such-model" in line, line
    assert not (tmp_path / "out").exists()
