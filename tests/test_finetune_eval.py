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


def test_iterate_direct_mode_trains_each_model_once_and_says_each_step(data, tmp_path, monkeypatch):
    from ftrecycle.recycle import plan_chain

    spec = ChainSpec.load(_chain(tmp_path, data, mode="direct"))
    spec.eval_data = None
    planned = plan_chain(spec)
    assert [p.status for p in planned] == ["run"] * 8 and not spec.output.exists()  # the plan writes nothing
    calls: list[str] = []
    real = recycle_mod.finetune
    monkeypatch.setattr(recycle_mod, "finetune", lambda model, *a, **k: calls.append(model) or real(model, *a, **k))
    said: list[str] = []
    rows = iterate(spec, say=said.append)
    out = spec.output
    # D1 = FT(M1) is M*1 too: M1 is fine-tuned once (it was twice)
    assert sorted(Path(c).name for c in calls) == ["M1", "M2", "M2-plus-delta-1", "M3-plus-delta-2"]
    assert {p.name for p in out.glob("direct-FT-*")} == {"direct-FT-M1", "direct-FT-M2"}
    assert not (out / "M1-star").exists() and rows[0]["finetuned"] == str(out / "direct-FT-M1")
    manifest = json.loads((out / "delta-2" / "ftrecycle-delta.json").read_text())
    assert manifest["finetuned"]["path"] == os.path.join("..", "direct-FT-M2")  # relative to the delta
    assert [line.split(":")[0] for line in said] == [f"step {k}/8" for k in range(1, 9)]
    assert said[0] == "step 1/8: fine-tuning M1 (D1 = M*1) -> direct-FT-M1" and "M3 + Δ2" in said[6]
    assert [p.what for p in planned] == [line.split(": ", 1)[1].split(" -> ")[0] for line in said]
    assert [p.status for p in plan_chain(spec)] == ["reuse"] * 8
    summary = (out / "summary.md").read_text()
    assert "mode: direct (3 versions)" in summary and "FT(M_i)" in summary


def test_builtin_evaluator_agrees_with_lm_eval_item_by_item(tuned, data, tmp_path):
    from ftrecycle.evaluate.harness import HarnessSettings, run_lm_eval, write_gsm8k_task

    write_gsm8k_task(tmp_path / "tasks", "tiny_gsm8k", data["test"], max_gen_toks=24)
    settings = HarnessSettings(batch_size=8, log_samples=True)
    res = run_lm_eval([str(tuned)], ["tiny_gsm8k"], task_dir=tmp_path / "tasks", device="cpu", settings=settings)
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


def test_finetune_outputs_are_as_readable_as_the_umask_says(tuned):
    import stat

    from ftrecycle.io.output import process_umask

    want = 0o444 & ~process_umask()  # read bits the umask leaves (r--r--r-- under 022)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tuned.rglob("*") if p.is_file()}
    assert modes and all(m & 0o444 == want for m in modes.values()), modes


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

    names = [f"paper:{t}" for t in (*PAPER_TASKS, "global_mmlu:si", "global_mmlu:mg", "global_mmlu:tr")]
    known = TaskManager().all_tasks
    assert [n for n in names if resolve_task(n).task not in known] == []
    assert resolve_task("paper:gsm8k").num_fewshot == 8 and resolve_task("paper:gsm8k").task == "gsm8k_cot"
    # a plain name is lm-eval's own task, with its own shots and metrics
    assert resolve_task("gsm8k").task == "gsm8k" and resolve_task("gsm8k").num_fewshot is None
    for bad in ("paper:nope", "paper:global_mmlu:", "paper:"):
        with pytest.raises(ConfigError, match="the paper's benchmarks"):
            resolve_task(bad)


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


# ------------------------------------------------------------------ eval shaped like lm-eval (issue 16)


def _lm_eval_files(root: Path) -> tuple[dict, list[Path]]:
    """The newest results file under ``root`` found the way lm-eval's own readers find them, and the samples files."""
    from lm_eval.utils import get_latest_filename, get_results_filenames, get_sample_results_filenames

    files = [str(p) for p in root.rglob("*") if p.is_file()]
    results = get_results_filenames(files)
    assert results, files
    return json.loads(Path(get_latest_filename(results)).read_text()), [
        Path(f) for f in get_sample_results_filenames(files)
    ]


LM_EVAL_KEYS = {"results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config", "model_name"}


def test_builtin_eval_writes_lm_evals_results_and_one_sample_per_item(tuned, data, tmp_path, capsys):
    out = tmp_path / "evals"
    argv = ["eval", "--model", str(tuned), "--builtin", str(data["test"]), "--device", "cpu", "--max-new-tokens", "24"]
    assert main([*argv, "--output-path", str(out), "--log-samples"]) == 0
    table = capsys.readouterr().out
    assert "±" in table and "strict: exact match of the number after '####'" in table
    res, samples = _lm_eval_files(out)
    assert LM_EVAL_KEYS <= set(res) and res["model_name"] == os.path.relpath(tuned, out)  # relative to DIR
    scores = res["results"]["gsm8k_builtin"]
    assert 0 <= scores["exact_match,strict-match"] <= 1 and scores["exact_match_stderr,strict-match"] is not None
    assert len(samples) == 1
    records = [json.loads(line) for line in samples[0].read_text().splitlines()]
    assert [r["doc_id"] for r in records] == list(range(24))  # one record per item
    assert sum(r["exact_match,strict-match"] for r in records) / 24 == pytest.approx(scores["exact_match,strict-match"])


def test_lm_eval_results_with_stderr_and_an_adapter_through_model_args(tuned, data, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftrecycle.evaluate.harness import HarnessSettings, run_lm_eval, write_gsm8k_task
    from ftrecycle.evaluate.results import write_results

    write_gsm8k_task(tmp_path / "tasks", "tiny_gsm8k", data["test"], max_gen_toks=12)
    pm = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tuned),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    for p in pm.parameters():
        if p.requires_grad:
            p.data.mul_(8)  # a LoRA update large enough to change answers
    pm.save_pretrained(tmp_path / "adapter")
    merged = tmp_path / "merged"
    pm.merge_and_unload().save_pretrained(merged)
    for f in tuned.iterdir():  # the tokenizer and generation settings as the base has them
        if f.is_file() and not (merged / f.name).exists():
            (merged / f.name).write_bytes(f.read_bytes())
    run = dict(task_dir=tmp_path / "tasks", device="cpu")
    st = dict(batch_size=8, limit=8, log_samples=True)
    via_peft = run_lm_eval(
        [str(tuned)],
        ["tiny_gsm8k"],
        **run,
        settings=HarnessSettings(**st, model_args={"peft": str(tmp_path / "adapter")}),
    )
    plain = run_lm_eval([str(tuned)], ["tiny_gsm8k"], **run, settings=HarnessSettings(**st))
    on_merged = run_lm_eval([str(merged)], ["tiny_gsm8k"], **run, settings=HarnessSettings(**st))

    def gens(res, m):
        return sorted((s["doc_id"], s["filter"], s["resps"][0][0]) for s in res["samples"][m]["tiny_gsm8k"])

    g_peft, g_merged, g_plain = gens(via_peft, str(tuned)), gens(on_merged, str(merged)), gens(plain, str(tuned))
    # the adapter is applied: the answers move; and it is this adapter: most are the merged model's. Not all:
    # with peft=, lm-eval resizes the embedding to the tokenizer's length when config.vocab_size differs (as in
    # this tiny model), which the merged model's run does not, and near-ties of greedy decoding go apart
    assert sum(a != c for a, c in zip(g_peft, g_plain, strict=True)) >= 8, (g_peft, g_plain)
    assert sum(a == b for a, b in zip(g_peft, g_merged, strict=True)) >= 8, (g_peft, g_merged)
    assert via_peft["stderr"][str(tuned)]["tiny_gsm8k"] is not None
    write_results(tmp_path / "out", str(tuned), via_peft["results"][str(tuned)], via_peft["samples"][str(tuned)])
    res, samples = _lm_eval_files(tmp_path / "out")
    assert LM_EVAL_KEYS <= set(res) and "tiny_gsm8k" in res["results"] and res["config"]["model_args"]["peft"]
    assert len(samples) == 1 and len(samples[0].read_text().splitlines()) == 16  # 8 items x 2 filters


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("dtype", "not key=value"),
        ("dtype=a,dtype=b", "given twice"),
        ("pretrained=x", "--model"),
        ("peft=./nowhere", "no such adapter"),
    ],
)
def test_bad_model_args_are_refused(text, needle):
    from ftrecycle.errors import FtRecycleError
    from ftrecycle.evaluate.harness import parse_model_args

    with pytest.raises(FtRecycleError, match=needle):
        parse_model_args(text)
    assert parse_model_args("dtype=bfloat16, revision=main") == {"dtype": "bfloat16", "revision": "main"}


def test_eval_flag_mistakes_are_one_line_errors(tuned, data, capsys):
    base = ["eval", "--model", str(tuned), "--builtin", str(data["test"])]
    for extra, needle in [
        (["--log-samples"], "--output-path"),
        (["--num-fewshot", "3"], "--num-fewshot with --builtin"),
    ]:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_eval_output_path_stays_out_of_its_inputs_and_in_its_directory(tuned, data, tmp_path, capsys, monkeypatch):
    from ftrecycle.evaluate.results import write_results

    base = ["eval", "--builtin", str(data["test"]), "--limit", "2", "--max-new-tokens", "4"]
    assert main([*base, "--model", str(tuned), "--output-path", str(tuned)]) == 2  # into the model: refused
    assert "--output-path" in capsys.readouterr().err and not list(tuned.glob("results_*"))
    (tmp_path / "file").write_text("x")
    assert main([*base, "--model", str(tuned), "--output-path", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    out = tmp_path / "evals"
    for name in ("..", ".", str(tuned)):
        written = write_results(out, name, {"results": {}})
        assert all(out in p.parents for p in written), written
        assert str(tmp_path) not in written[0].read_text()  # no absolute path of the machine in the file
