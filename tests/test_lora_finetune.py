"""LoRA fine-tuning (finetune, recycle-finetune, iterate), the training settings, eval loss and --config files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftrecycle.cli import main
from ftrecycle.errors import ConfigError
from ftrecycle.finetune.card import finetune_card
from ftrecycle.finetune.config import FinetuneConfig
from ftrecycle.finetune.train import finetune
from ftrecycle.recycle import ChainSpec

FAST = dict(max_steps=6, batch_size=4, learning_rate=5e-3, logging_every=1, save_every=3, lora=True, lora_rank=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-data")
    rng = random.Random(0)
    pairs = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(48)]
    rows = [{"prompt": f"add {a} {b}", "completion": f"{a + b}"} for a, b in pairs]
    chat = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in rows[:4]
    ]
    gsm = [{"question": f"{a} + {b} = ?", "answer": f"{a} + {b} = {a + b} #### {a + b}"} for a, b in pairs[:6]]
    for name, lines in (("train", rows), ("held", rows[:8]), ("chat", chat), ("gsm", gsm)):
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return {n: root / f"{n}.jsonl" for n in ("train", "held", "chat", "gsm")}


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def test_lora_finetune_writes_a_peft_adapter_of_its_base(versions, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = versions["llama"]["source_base"]
    out = tmp_path / "ad"
    res = finetune(str(base), data["train"], out, config=FinetuneConfig(**FAST), eval_data=data["held"])
    assert {"adapter_config.json", "adapter_model.safetensors", "ftrecycle.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    assert not list(out.glob("model*.safetensors")) and not (out / "start").exists()
    conf = json.loads((out / "adapter_config.json").read_text())
    # a local base is not named by default (an output names no absolute path; PEFT reads a relative one from the
    # working directory): the card loads the adapter on the base explicitly; --record-paths absolute names it
    assert conf["base_model_name_or_path"] is None and conf["r"] == 4
    named = finetune(
        str(base), data["train"], tmp_path / "ad2", config=FinetuneConfig(**FAST), record_paths="absolute"
    ).output
    assert json.loads((named / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    rec = json.loads((out / "ftrecycle.json").read_text())
    assert rec["lora"]["output"] == "adapter" and "q_proj" in rec["lora"]["targets"]
    assert (
        "lm_head" not in rec["lora"]["targets"] and 0 < rec["lora"]["trainable_parameters"] < rec["lora"]["parameters"]
    )
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "PeftModel.from_pretrained" in card and "source_base" in card
    assert "--lora --lora-rank 4" in card  # the card's command makes an adapter, not a full fine-tune
    # on the Hub (a base with a hub id) the card says what the adapter is to its base
    published = {**rec, "inputs": {**rec["inputs"], "model": {"hub_id": "org/base", "ref": "org/base"}}}
    meta = finetune_card(published, [], "ad").metadata()
    assert meta["base_model"] == "org/base" and meta["base_model_relation"] == "adapter"
    # eval loss on prompt/completion data, before and after; no accuracy (not GSM8K-format)
    assert [e["step"] for e in res.eval_log] == [0, 6] and all(
        set(e) == {"step", "eval_loss", "seconds"} for e in res.eval_log
    )
    assert res.eval_log[-1]["eval_loss"] < res.eval_log[0]["eval_loss"]
    net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    assert any("lora_A" in n for n, _ in net.named_parameters())
    # the adapter changed the model: B (initialised to zero) was trained
    assert any(float(t.abs().max()) > 0 for k, t in _adapter(out).items() if "lora_B" in k)


def test_lora_runs_are_deterministic_and_resume_to_the_same_adapter(versions, data, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    import ftrecycle.finetune.train as train_mod

    base = str(versions["llama"]["source_base"])
    cfg = FinetuneConfig(**FAST, lora_dropout=0.1)
    finetune(base, data["train"], tmp_path / "a", config=cfg)
    finetune(base, data["train"], tmp_path / "b", config=cfg)

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                raise KeyboardInterrupt  # after the step-3 checkpoint

    real = train_mod._trainer_class

    def with_stop():
        class Stopping(real()):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                self.add_callback(Stop())

        return Stopping

    monkeypatch.setattr(train_mod, "_trainer_class", with_stop)
    with pytest.raises(KeyboardInterrupt):
        finetune(base, data["train"], tmp_path / "c", config=cfg)
    monkeypatch.setattr(train_mod, "_trainer_class", real)
    assert (tmp_path / ".c.ftrecycle-run" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    res = finetune(base, data["train"], tmp_path / "c", config=cfg, resume=True)
    assert res.resumed_from_step == 3
    a, b, c = (_adapter(tmp_path / n) for n in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "two runs with the same settings differ"
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a), "a resumed run differs from an uninterrupted one"


def test_merge_writes_the_base_plus_the_adapter(versions, data, tmp_path):
    from transformers import AutoModelForCausalLM

    base = str(versions["llama"]["source_base"])
    cfg = FinetuneConfig(**FAST, merge=True)
    finetune(base, data["train"], tmp_path / "m", config=cfg)
    finetune(base, data["train"], tmp_path / "ad", config=FinetuneConfig(**FAST))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"  # the base's dtype
    from peft import PeftModel

    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "ad")
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        got, want = merged(ids).logits, ref(ids).logits
    assert torch.allclose(got, want, atol=0.05), float((got - want).abs().max())  # bf16 storage of the merge
    assert not torch.equal(
        merged.model.layers[0].self_attn.q_proj.weight, ref.get_base_model().model.layers[0].self_attn.q_proj.weight
    )


def test_eval_loss_on_chat_data_and_accuracy_on_gsm8k(versions, data, tmp_path):
    base = str(versions["llama"]["source_base"])
    cfg = FinetuneConfig(**{**FAST, "max_steps": 2}, eval_max_new_tokens=8)
    chat = finetune(base, data["train"], tmp_path / "c", config=cfg, eval_data=data["chat"])
    assert all(set(e) == {"step", "eval_loss", "seconds"} and e["eval_loss"] > 0 for e in chat.eval_log)
    gsm = finetune(base, data["train"], tmp_path / "g", config=cfg, eval_data=data["gsm"])
    assert all({"eval_loss", "strict", "flexible"} <= set(e) for e in gsm.eval_log)


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"qlora": True}, "--qlora needs"),
        ({"lora": False, "merge": True}, "--merge applies to --lora"),
        ({"lora_targets": "q_proj,nonsense"}, "nonsense not in the model"),
        ({"lora_targets": "q proj"}, "is not a module name"),
        ({"report_to": "tensorboard"}, "tensorboard"),
    ],
)
def test_settings_this_machine_or_model_cannot_run_are_refused(versions, data, tmp_path, settings, needle):
    import importlib.util

    if settings.get("report_to") and importlib.util.find_spec("tensorboard"):
        pytest.skip("tensorboard is installed here")
    if settings.get("qlora") and importlib.util.find_spec("bitsandbytes") and torch.cuda.is_available():
        pytest.skip("QLoRA can run here")
    with pytest.raises(ConfigError, match=needle):
        finetune(
            str(versions["llama"]["source_base"]),
            data["train"],
            tmp_path / "x",
            config=FinetuneConfig(**{**FAST, **settings}),
        )
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.ftrecycle-run").exists()


def test_lr_scheduler_is_used_and_recorded(versions, data, tmp_path):
    cfg = FinetuneConfig(**{**FAST, "lr_scheduler": "constant", "warmup_ratio": 0.0})
    finetune(str(versions["llama"]["source_base"]), data["train"], tmp_path / "o", config=cfg)
    rec = json.loads((tmp_path / "o" / "ftrecycle.json").read_text())
    assert rec["config"]["lr_scheduler"] == "constant"


def test_new_settings_at_their_defaults_keep_earlier_run_keys():
    assert not {"lora", "lr_scheduler", "merge", "report_to"} & set(FinetuneConfig().key())
    assert FinetuneConfig(lora=True).key()["lora"] is True


def test_config_file_keys_are_the_flags_and_the_command_line_wins(versions, data, tmp_path, capsys):
    base = str(versions["llama"]["source_base"])
    f = tmp_path / "train.yaml"
    f.write_text("max-steps: 2\nbatch_size: 4\nlearning-rate: 1.0e-3\nlora: true\nlora-targets: [q_proj, v_proj]\n")
    rc = main(
        [
            "finetune",
            "--model",
            base,
            "--data",
            str(data["train"]),
            "--config",
            str(f),
            "--max-steps",
            "3",
            "-o",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((tmp_path / "o" / "ftrecycle.json").read_text())
    assert (
        rec["steps"] == 3 and rec["config"]["learning_rate"] == 1e-3 and rec["lora"]["targets"] == ["q_proj", "v_proj"]
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("learning_rat: 1.0e-3\n", "unknown setting 'learning_rat' (did you mean learning-rate?)"),
        ("lr: 1.0e-3\n", "did you mean learning-rate?"),
        ("bf16: on\n", "quote the value"),
        ("lora: 1\n", "lora: expected true or false"),
        ("- a\n- b\n", "expected a mapping"),
        ("a: &x [1]\nb: *x\n", "anchors and aliases"),
        ("batch-size: {a: 1}\n", "expected a single value"),
    ],
)
def test_bad_config_files_get_one_line_naming_the_file(versions, data, tmp_path, capsys, text, needle):
    f = tmp_path / "train.yaml"
    f.write_text(text)
    rc = main(
        [
            "finetune",
            "--model",
            str(versions["llama"]["source_base"]),
            "--data",
            str(data["train"]),
            "--config",
            str(f),
            "-o",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and str(f) in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_a_chain_with_lora_must_merge(tmp_path, versions, data):
    v = versions["llama"]
    chain = tmp_path / "chain.yaml"
    body = f"versions: [{v['source_base']}, {v['target_base']}]\ndata: {data['train']}\noutput: out\n"
    body += "finetune: {lora: true}\n"
    chain.write_text(body)
    with pytest.raises(ConfigError, match="lora needs merge: true"):
        ChainSpec.load(chain)
    chain.write_text(body.replace("{lora: true}", "{lora: true, merge: true}"))
    assert ChainSpec.load(chain).finetune.merge
    chain.write_text(body.replace("{lora: true}", "{lora_rnk: 4}"))
    with pytest.raises(ConfigError, match="did you mean lora_rank"):
        ChainSpec.load(chain)


def test_a_chain_trains_lora_and_diffs_the_merged_versions(tmp_path, versions, data):
    from ftrecycle.recycle import iterate

    v = versions["llama"]
    chain = {
        "versions": [str(v["source_base"]), str(v["target_base"])],
        "data": str(data["train"]),
        "output": "chain",
        "finetune": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "lora": True, "merge": True},
    }
    (tmp_path / "chain.yaml").write_text(json.dumps(chain))  # JSON is YAML
    rows = iterate(ChainSpec.load(tmp_path / "chain.yaml"))
    assert len(rows) == 2
    for row in rows:
        tuned = Path(row["finetuned"])
        rec = json.loads((tuned / "ftrecycle.json").read_text())
        assert rec["lora"]["output"] == "merged" and list(tuned.glob("*.safetensors"))
        assert not (tuned / "adapter_config.json").exists()


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_lora_finds_the_projections_of_each_family(versions, data, tmp_path, family):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = versions[family]["source_base"]
    finetune(str(base), data["train"], tmp_path / "ad", config=FinetuneConfig(**{**FAST, "max_steps": 2}))
    targets = json.loads((tmp_path / "ad" / "ftrecycle.json").read_text())["lora"]["targets"]
    want = {"gpt2": {"c_attn", "c_proj", "c_fc"}, "qwen2": {"q_proj", "v_proj", "down_proj"}}[family]
    assert want <= set(targets) and "lm_head" not in targets
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "ad")


def test_lora_with_gradient_checkpointing_trains(versions, data, tmp_path):
    cfg = FinetuneConfig(**{**FAST, "max_steps": 3}, gradient_checkpointing=True)
    res = finetune(str(versions["llama"]["source_base"]), data["train"], tmp_path / "gc", config=cfg)
    assert res.steps == 3 and any(
        float(t.abs().max()) > 0 for k, t in _adapter(tmp_path / "gc").items() if "lora_B" in k
    )


@pytest.mark.parametrize("kind", ["missing", "directory", "not-utf8", "huge"])
def test_unreadable_config_files_are_one_line(versions, data, tmp_path, capsys, kind):
    f = tmp_path / "train.yaml"
    if kind == "directory":
        f.mkdir()
    elif kind == "not-utf8":
        f.write_bytes(b"max-steps: 2\n\xff\xfe\n")
    elif kind == "huge":
        f.write_text("# padding\n" * 200_000)
    argv = ["finetune", "--model", str(versions["llama"]["source_base"]), "--data", str(data["train"])]
    rc = main([*argv, "--config", str(f), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    needle = {"missing": "no such training settings file", "directory": "not a regular file"}.get(kind, "")
    needle = needle or {"not-utf8": "save the training settings file as UTF-8", "huge": "is at most"}[kind]
    assert rc == 2 and str(f) in err and len(err.splitlines()) == 1 and needle in err, err


def test_held_out_data_that_fits_nothing_is_refused_before_training(versions, data, tmp_path):
    from ftrecycle.errors import DataError

    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"prompt": " ".join(["w1"] * 40), "completion": "3"}) + "\n")
    cfg = FinetuneConfig(**FAST, max_length=20)
    with pytest.raises(DataError, match=r"held\.jsonl: no held-out example keeps any completion token"):
        finetune(str(versions["llama"]["source_base"]), data["train"], tmp_path / "o", config=cfg, eval_data=held)
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.ftrecycle-run").exists()
