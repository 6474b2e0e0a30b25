"""Fine-tuning, recycling-then-fine-tuning, the iterative chain, and evaluation (built-in and lm-eval)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

import ftrecycle.recycle.chain as recycle_mod
from ftrecycle import ConfigError, transfer
from ftrecycle.cli import build_parser, main
from ftrecycle.evaluate.builtin import evaluate_gsm8k, load_for_eval
from ftrecycle.evaluate.data import read_gsm8k
from ftrecycle.finetune.config import FinetuneConfig
from ftrecycle.finetune.train import finetune
from ftrecycle.recycle import ChainSpec, iterate, recycle_finetune

from conftest import bits, load_dir
from fixtures.tiny import make_model, perturbed, save, tiny_config

FAST = dict(max_steps=20, batch_size=8, learning_rate=2e-3, logging_every=1, save_every=10, eval_max_new_tokens=24)


def _item(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return {"question": f"{a} + {b} = ?", "answer": f"{a} + {b} = {a + b} . The answer is {a + b} #### {a + b}"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    (root / "train.jsonl").write_text("\n".join(json.dumps(_item(rng)) for _ in range(160)) + "\n")
    (root / "test.jsonl").write_text("\n".join(json.dumps(_item(rng)) for _ in range(24)) + "\n")
    return {"train": root / "train.jsonl", "test": root / "test.jsonl"}


@pytest.fixture(scope="module")
def tuned(versions, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "tuned"
    cfg = FinetuneConfig(**{**FAST, "max_steps": 100, "learning_rate": 3e-3}, eval_every=50)
    finetune(str(versions["llama"]["source_base"]), data["train"], out, config=cfg, eval_data=data["test"])
    return out


def test_finetune_lowers_the_loss_and_writes_a_usable_model(versions, data, tuned, tmp_path):
    rec = json.loads((tuned / "ftrecycle.json").read_text())
    losses = [loss for _, loss in rec["losses"]]
    assert rec["steps"] == 100 and len(losses) >= 100
    assert sum(losses[15:20]) / 5 < sum(losses[:5]) / 5 - 0.2, losses[:20]  # within the first 20 steps
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert [e["step"] for e in rec["eval_log"]] == [0, 50, 100]
    assert (tuned / "eval_log.json").is_file() and list(tuned.glob("*.safetensors"))
    assert not (tuned.parent / f".{tuned.name}.ftrecycle-run").exists()
    v = versions["llama"]
    out = transfer(str(v["source_base"]), str(tuned), str(v["target_base"]), tmp_path / "moved")
    model, tok = load_for_eval(str(out.output), device="cpu")
    rep = evaluate_gsm8k(model, tok, read_gsm8k(data["test"]), max_gen_toks=24)
    assert rep.n == 24 and 0.0 <= rep.strict <= 1.0


def test_recycle_finetune_equals_transfer_then_finetune(versions, data, tmp_path):
    v = versions["llama"]
    cfg = FinetuneConfig(**{**FAST, "max_steps": 6})
    one = recycle_finetune(
        str(v["source_base"]),
        str(v["source_finetuned"]),
        str(v["target_base"]),
        data["train"],
        tmp_path / "one",
        alpha=0.5,
        config=cfg,
    )
    mid = transfer(
        str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"]), tmp_path / "mid", alpha=0.5
    )
    two = finetune(str(mid.output), data["train"], tmp_path / "two", config=cfg)
    a, b = load_dir(one.output), load_dir(two.output)
    assert sorted(a) == sorted(b) and all(torch.equal(bits(a[k]), bits(b[k])) for k in a)
    assert not any(p.name.startswith(".one.") for p in tmp_path.iterdir())


def _chain(tmp: Path, data: dict[str, Path], mode: str = "iterative") -> Path:
    base = make_model(tiny_config("llama"), seed=7)
    for i in range(3):
        save(perturbed(base, seed=10 + i, scale=0.005 * (i + 1)), tmp / f"M{i + 1}")
    chain = {
        "versions": ["M1", "M2", "M3"],
        "data": str(data["train"]),
        "output": "chain",
        "mode": mode,
        "eval_data": str(data["test"]),
        "finetune": {"max_steps": 4, "batch_size": 8, "learning_rate": 1e-3, "eval_max_new_tokens": 8},
    }
    (tmp / "chain.yaml").write_text(json.dumps(chain))  # JSON is YAML
    return tmp / "chain.yaml"


def test_iterate_resumes_after_an_interruption_without_redoing_finished_versions(data, tmp_path, monkeypatch):
    path = _chain(tmp_path, data)
    spec = ChainSpec.load(path)
    calls: list[str] = []
    real = recycle_mod.finetune

    def interrupted(model, *a, **k):
        calls.append(model)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies while fine-tuning M2 + delta-1
        return real(model, *a, **k)

    monkeypatch.setattr(recycle_mod, "finetune", interrupted)
    with pytest.raises(KeyboardInterrupt):
        iterate(spec)
    out = spec.output
    assert (out / "M1-star").is_dir() and not (out / "M2-star").exists()
    stamp = (out / "M1-star" / "model.safetensors").stat().st_mtime_ns
    calls.clear()
    monkeypatch.setattr(recycle_mod, "finetune", lambda model, *a, **k: calls.append(model) or real(model, *a, **k))
    rows = iterate(spec)
    assert calls == [str(out / "M2-plus-delta-1"), str(out / "M3-plus-delta-2")]
    assert (out / "M1-star" / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in out.glob("M*-star")) == ["M1-star", "M2-star", "M3-star"]
    assert sorted(p.name for p in out.glob("delta-*")) == ["delta-1", "delta-2"]
    assert [r["version"] for r in rows] == ["M1", "M2", "M3"]
    assert all(isinstance(r["acc_finetuned"], float) for r in rows) and "acc_base_plus_delta" in rows[1]
    assert "| M3 |" in (out / "summary.md").read_text()
    calls.clear()
    iterate(spec)  # everything done: nothing is trained again
    assert calls == []


def test_iterate_direct_mode_uses_direct_fine_tunes(data, tmp_path):
    spec = ChainSpec.load(_chain(tmp_path, data, mode="direct"))
    spec.eval_data = None
    iterate(spec)
    out = spec.output
    assert {p.name for p in out.glob("direct-FT-*")} == {"direct-FT-M1", "direct-FT-M2"}
    manifest = json.loads((out / "delta-2" / "ftrecycle-delta.json").read_text())
    assert manifest["finetuned"]["path"] == os.path.join("..", "direct-FT-M2")  # relative to the delta


def test_builtin_evaluator_agrees_with_lm_eval_item_by_item(tuned, data, tmp_path):
    from ftrecycle.evaluate.harness import run_lm_eval, write_gsm8k_task

    write_gsm8k_task(tmp_path / "tasks", "tiny_gsm8k", data["test"], max_gen_toks=24)
    res = run_lm_eval(
        [str(tuned)], ["tiny_gsm8k"], task_dir=tmp_path / "tasks", batch_size=8, log_samples=True, device="cpu"
    )
    score = res["table"][str(tuned)]["tiny_gsm8k"]
    assert isinstance(score, float) and res["metrics"][str(tuned)]["tiny_gsm8k"] == "exact_match,strict-match"
    samples = sorted(res["samples"][str(tuned)]["tiny_gsm8k"], key=lambda s: s["doc_id"])
    model, tok = load_for_eval(str(tuned), device="cpu")
    rep = evaluate_gsm8k(model, tok, read_gsm8k(data["test"]), batch_size=8, max_gen_toks=24)
    assert len(samples) == 2 * rep.n == 48  # one record per item and filter
    by_filter = {}
    for s in samples:
        by_filter.setdefault(s["filter"], {})[s["doc_id"]] = s
    strict, flexible = by_filter["strict-match"], by_filter["flexible-extract"]
    for item in rep.items:
        assert strict[item.index]["resps"][0][0] == item.generation
        assert strict[item.index]["filtered_resps"][0] == item.strict
        assert flexible[item.index]["filtered_resps"][0] == item.flexible
        assert bool(strict[item.index]["exact_match"]) == item.strict_correct
    assert abs(score - rep.strict) < 1e-9
    assert any(i.strict != "[invalid]" for i in rep.items), "the tuned model should produce '#### N' answers"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"prompt": "a"}\n', "train.jsonl:1: missing field 'completion'"),
        ("", "train.jsonl: empty data file"),
        ('{"prompt": "a", "completion": "b"}\nnot json\n', "train.jsonl:2: not valid JSON"),
        ('{"messages": [{"role": "user", "content": "x"}]}\n', "train.jsonl:1:"),
    ],
)
def test_bad_data_files(versions, tmp_path, capsys, content, needle):
    f = tmp_path / "train.jsonl"
    f.write_text(content)
    code = main(
        [
            "finetune",
            "--model",
            str(versions["llama"]["source_base"]),
            "--data",
            str(f),
            "-o",
            str(tmp_path / "o"),
            "--max-steps",
            "2",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_every_option_of_every_command_has_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"transfer", "diff", "apply", "finetune", "recycle-finetune", "iterate", "eval"} <= set(sub.choices)
    commands = [([name], p) for name, p in sub.choices.items()]
    while commands:
        words, p = commands.pop()
        for action in p._actions:
            assert action.help, f"{' '.join(words)} {action.option_strings or action.dest} has no help"
            if action.__class__.__name__ == "_SubParsersAction":
                commands += [([*words, n], q) for n, q in action.choices.items()]
        with pytest.raises(SystemExit) as e:
            main([*words, "--help"])
        assert e.value.code == 0
    capsys.readouterr()


def test_chain_and_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown fine-tuning setting"):
        FinetuneConfig.from_dict({"lr": 1})
    (tmp_path / "c.yaml").write_text("versions: [a]\ndata: d\noutput: o\n")
    with pytest.raises(ConfigError, match="at least two"):
        ChainSpec.load(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("versions: [a, b]\ndata: d\noutput: o\nmode: sideways\n")
    with pytest.raises(ConfigError, match="mode"):
        ChainSpec.load(tmp_path / "c.yaml")


def test_finetune_resumes_from_its_last_checkpoint(versions, data, tmp_path):
    from transformers import TrainerCallback

    import ftrecycle.finetune.train as train_mod

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 6:
                raise KeyboardInterrupt  # dies after the step-5 checkpoint

    real = train_mod._trainer_class

    def with_stop():
        cls = real()

        class Stopping(cls):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                self.add_callback(Stop())

        return Stopping

    cfg = FinetuneConfig(**{**FAST, "max_steps": 10, "save_every": 5})
    out = tmp_path / "o"
    train_mod._trainer_class = with_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune(str(versions["llama"]["source_base"]), data["train"], out, config=cfg)
    finally:
        train_mod._trainer_class = real
    run = tmp_path / ".o.ftrecycle-run"
    assert not out.exists() and (run / "checkpoint-5").is_dir()
    with pytest.raises(ConfigError, match="--resume"):
        finetune(str(versions["llama"]["source_base"]), data["train"], out, config=cfg)
    res = finetune(str(versions["llama"]["source_base"]), data["train"], out, config=cfg, resume=True)
    assert res.steps == 10 and not run.exists()
    assert res.resumed_from_step == 5  # only the remaining steps were trained
    assert [s for s, _ in res.losses] == list(range(1, 11))  # the history carried over, each step once


def test_hub_dataset_offline_error(versions, tmp_path, capsys):
    code = main(
        [
            "finetune",
            "--model",
            str(versions["llama"]["source_base"]),
            "--data",
            "some-org/some-data:train",
            "-o",
            str(tmp_path / "o"),
            "--max-steps",
            "2",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "some-org/some-data:train" in err[-1] and "local JSONL" in err[-1], err


def test_paper_tasks_exist_in_lm_eval():
    from lm_eval.tasks import TaskManager

    from ftrecycle.evaluate.harness import PAPER_TASKS, resolve_task

    names = [*PAPER_TASKS, "global_mmlu:si", "global_mmlu:mg", "global_mmlu:tr"]
    known = TaskManager().all_tasks
    assert [n for n in names if resolve_task(n).task not in known] == []
    assert resolve_task("gsm8k").num_fewshot == 8 and resolve_task("gsm8k").task == "gsm8k_cot"


def test_backend_choice(monkeypatch):
    import importlib.util

    from ftrecycle.evaluate.harness import choose_backend

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert choose_backend("auto") == "hf" and choose_backend("hf") == "hf"
    with pytest.raises(ConfigError, match="vLLM is not installed"):
        choose_backend("vllm")
    with pytest.raises(ConfigError, match="--backend"):
        choose_backend("tgi")
