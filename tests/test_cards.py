"""Hub-ready outputs: one card for every kind of output, records without local paths, and an exported
LoRA that PEFT loads on the new base as the dense transfer.

Every card is parsed by ``huggingface_hub.ModelCard.load`` from the local file (offline), as the Hub
would read it; its metadata must place the output in the Hub's model tree (``base_model`` a Hub id,
never a path; ``base_model_relation``), and no output file may name the machine's directories.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import ModelCard

from ftrecycle import apply_delta, diff, transfer
from ftrecycle.cli import main
from ftrecycle.errors import ConfigError
from ftrecycle.finetune.calibrate import calibrate
from ftrecycle.finetune.config import FinetuneConfig
from ftrecycle.finetune.train import finetune
from ftrecycle.io.card import Card, hub_id, render_card
from ftrecycle.ops.export import export_lora
from ftrecycle.recycle import ChainSpec, iterate, recycle_finetune

from conftest import load_dir
from fixtures.tiny import make_model, perturbed, save, tiny_config

TARGET_ID = "example-org/target-7b"
FINETUNED_ID = "example-org/chat-7b"
TINY_FT = {"batch_size": 4, "learning_rate": 3e-3, "logging_every": 1, "eval_max_new_tokens": 4, "eval_batch_size": 8}


def _items(path: Path, n: int) -> Path:
    rows = [{"question": f"{i} + 1 = ?", "answer": f"{i} + 1 = {i + 1} #### {i + 1}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _name_model(path: Path, name: str | None, license: str | None = None) -> None:
    """Make a local model look like a Hub download: its config names its repo, its card its license."""
    cfg = json.loads((path / "config.json").read_text())
    cfg["_name_or_path"] = name
    (path / "config.json").write_text(json.dumps(cfg))
    if license is not None:
        (path / "README.md").write_text(f"---\nlicense: {license}\n---\n\n# a model\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every kind of output ftrecycle writes, made once through the Python API."""
    root = tmp_path_factory.mktemp("cards")
    base = make_model(tiny_config("llama"), seed=3, dtype=torch.float32)
    m = {
        "A": save(base, root / "models" / "A"),
        "B": save(perturbed(base, seed=4, scale=0.02), root / "models" / "B"),
        "C": save(perturbed(base, seed=5, scale=0.03), root / "models" / "C"),
    }
    _name_model(m["C"], TARGET_ID, "apache-2.0")
    _name_model(m["B"], FINETUNED_ID)
    _name_model(m["A"], str(m["A"]))  # a local path in the config: never a base_model
    train, test = _items(root / "train.jsonl", 24), _items(root / "test.jsonl", 4)
    out = root / "out"
    cfg = FinetuneConfig(**{**TINY_FT, "max_steps": 2, "save_every": 2})
    made = {
        "transfer": transfer(str(m["A"]), str(m["B"]), str(m["C"]), out / "transfer").output,
        "delta": diff(str(m["A"]), str(m["B"]), out / "delta").output,
    }
    made["apply"] = apply_delta(made["delta"], str(m["C"]), out / "apply").output
    sign = diff(str(m["A"]), str(m["B"]), root / "sign", compress="sign").output
    texts = [{"prompt": f"{i} + 1 =", "completion": f"{i + 1}"} for i in range(8)]
    (root / "texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    made["calibrated"] = calibrate(sign, m["A"], m["B"], root / "texts.jsonl", out / "calibrated", steps=1).output
    made["adapter"] = export_lora(made["delta"], out / "adapter", rank=4, target_base=str(m["C"])).output
    made["finetune"] = finetune(str(m["C"]), train, out / "finetune", config=cfg, eval_data=test).output
    made["recycle-finetune"] = recycle_finetune(
        str(m["A"]), str(m["B"]), str(m["C"]), train, out / "recycle", config=cfg
    ).output
    chain = {"versions": [str(m["A"]), str(m["C"])], "data": str(train), "output": str(out / "chain")}
    (root / "chain.yaml").write_text(json.dumps({**chain, "finetune": {**TINY_FT, "max_steps": 2}}))
    iterate(ChainSpec.load(root / "chain.yaml"))
    made["chain"] = out / "chain"
    return {**m, **made, "root": root, "out": out}


def _card(path: Path) -> tuple[dict[str, Any], str]:
    card = ModelCard.load(path / "README.md")  # a local file: no network
    return card.data.to_dict(), card.text


@pytest.mark.parametrize(
    ("kind", "relation", "bases", "library"),
    [
        ("transfer", "merge", [TARGET_ID, FINETUNED_ID], "transformers"),
        ("apply", "merge", [TARGET_ID, FINETUNED_ID], "transformers"),
        ("adapter", "adapter", TARGET_ID, "peft"),
        ("finetune", "finetune", TARGET_ID, "transformers"),
        ("recycle-finetune", "finetune", TARGET_ID, "transformers"),
    ],
)
def test_every_model_card_parses_with_the_hub_metadata(world, kind, relation, bases, library):
    meta, text = _card(world[kind])
    assert meta["base_model"] == bases and meta["base_model_relation"] == relation, meta
    assert meta["library_name"] == library and meta["license"] == "apache-2.0"
    assert "ftrecycle" in meta["tags"]
    assert "## How to load it" in text and "## How it was made" in text and "ftrecycle " in text
    assert "example.com" not in text and "0 tensors" not in text


@pytest.mark.parametrize("kind", ["delta", "calibrated"])
def test_the_delta_card_names_its_base_only_by_hub_id(world, kind):
    meta, text = _card(world[kind])
    # A's config names a local path: a base_model must be a Hub id, so none is written
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert {"ftrecycle", "delta"} <= set(meta["tags"]) and "ftrecycle apply --delta" in text


def test_the_transfer_card_counts_what_was_adapted(world):
    _, text = _card(world["transfer"])
    written = len(load_dir(world["transfer"]))
    assert f"| written to the output | {written} |" in text
    assert f"| target + alpha × diff | {written} |" in text  # llama: no tensor copied without its diff


def test_the_finetune_card_reports_its_evaluation(world):
    _, text = _card(world["finetune"])
    log = json.loads((world["finetune"] / "eval_log.json").read_text())
    assert "## Evaluation" in text and f"(step {log[-1]['step']})" in text


def test_every_chain_product_has_a_card(world):
    products = [p.parent for p in world["chain"].rglob("ftrecycle*.json")]
    assert len(products) >= 3  # M*1, its delta, M2 + delta, M*2
    for p in products:
        meta, _ = _card(p)
        assert "ftrecycle" in meta["tags"], p


def test_no_output_file_names_a_local_directory(world):
    # the tmp root, the user's home and the virtualenv must not appear in anything we wrote
    needles = {str(world["root"]), str(Path.home()), sys.prefix, os.path.realpath(world["root"])}
    hits = []
    for f in world["out"].rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md", ".jsonl", ".txt"):
            text = f.read_text(errors="replace")
            hits += [f"{f.relative_to(world['out'])}: {n}" for n in needles if n in text]
    assert not hits, hits
    rec = json.loads((world["transfer"] / "ftrecycle.json").read_text())
    assert rec["inputs"]["target_base"]["path"] == os.path.join("..", "..", "models", "C")
    assert len(rec["inputs"]["target_base"]["sha256"]["config.json"]) == 64
    # a rewritten (calibrated) delta names its inputs from its own directory, not its input delta's
    manifest = json.loads((world["calibrated"] / "ftrecycle-delta.json").read_text())
    assert manifest["base"]["path"] == os.path.join("..", "..", "models", "A")


def test_record_paths_absolute_keeps_them(world, tmp_path):
    m = world
    out = tmp_path / "private"
    assert (
        main(
            [
                *["transfer", "--source-base", str(m["A"]), "--source-finetuned", str(m["B"])],
                *["--target-base", str(m["C"]), "-o", str(out), "-q", "--record-paths", "absolute"],
            ]
        )
        == 0
    )
    rec = json.loads((out / "ftrecycle.json").read_text())
    assert rec["inputs"]["target_base"]["path"] == str(m["C"].resolve())
    with pytest.raises(ConfigError, match="--record-paths"):
        transfer(str(m["A"]), str(m["B"]), str(m["C"]), tmp_path / "x", record_paths="home")


def test_a_hostile_name_cannot_add_metadata():
    evil = "evil/x\nlicense: mit\nbase_model_relation: quantized"
    card = Card(
        title=evil,
        summary=evil,
        relation="merge",
        base_models=(evil, "ok-org/ok"),
        license="mit\nfoo: bar",
        table=(("a", "b"), [(evil, "| injected |")]),
    )
    meta = ModelCard(render_card(card)).data.to_dict()
    assert meta == {
        "library_name": "transformers",
        "base_model": "ok-org/ok",
        "base_model_relation": "merge",
        "tags": ["ftrecycle"],
    }
    assert hub_id("/home/u/models/x") is None and hub_id("./a/b") is None and hub_id("org/name") == "org/name"


def test_export_lora_on_the_target_loads_in_peft_as_the_dense_transfer(world, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ad = tmp_path / "ad"
    argv = ["export-lora", "--delta", str(world["delta"]), "--rank", "64", "-o", str(ad)]
    assert main([*argv, "--target-base", str(world["C"]), "--full-modules"]) == 0
    printed = capsys.readouterr()
    assert "0.0 % of the diff's squared norm" in printed.out and "warning" not in printed.err
    config = json.loads((ad / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == TARGET_ID  # PEFT's auto-loader builds C + LoRA
    assert config["lora_bias"] is False  # llama has no biases: a plain LoRA
    assert sorted(config["modules_to_save"]) == sorted(
        ["lm_head", "model.embed_tokens", "model.norm"]
        + [f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")]
    )
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["C"]), ad).eval()
    dense = AutoModelForCausalLM.from_pretrained(world["transfer"]).eval()
    ids = torch.arange(2, 40).reshape(2, 19)
    with torch.no_grad():
        got, want = model(ids).logits, dense(ids).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-4), (got - want).abs().max().item()
    # without the carried modules, PEFT on C differs from the transfer: the test above can fail
    plain = export_lora(world["delta"], tmp_path / "plain", rank=64, target_base=str(world["C"]))
    base_only = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["C"]), plain.output).eval()
    with torch.no_grad():
        assert (base_only(ids).logits - want).abs().max().item() > 1e-3
    assert 0 < plain.left_out_share < 1 and any("--full-modules" in w for w in plain.warnings)


def test_export_lora_without_target_warns_that_peft_loads_the_old_base(world, tmp_path, capsys):
    ad = tmp_path / "ad"
    assert main(["export-lora", "--delta", str(world["delta"]), "--rank", "4", "-o", str(ad)]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "--target-base" in err and "A + LoRA" in err
    config = json.loads((ad / "adapter_config.json").read_text())
    # a local base: no path at all (PEFT would read a relative one from the working directory), absolute only on request
    assert config["base_model_name_or_path"] is None
    ad2 = tmp_path / "ad2"
    assert (
        main(
            ["export-lora", "--delta", str(world["delta"]), "--rank", "4", "-o", str(ad2), "--record-paths", "absolute"]
        )
        == 0
    )
    named = json.loads((ad2 / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == str(Path(world["A"]).resolve())
    res = json.loads((ad / "ftrecycle.json").read_text())
    assert res["left_out_share_of_squared_norm"] > 0 and res["warnings"]
    with pytest.raises(ConfigError, match="--target-base"):
        export_lora(world["delta"], tmp_path / "x", rank=4, full_modules=True)


@pytest.mark.parametrize("fam", ["qwen2", "gpt2"])  # tied embeddings; q/k/v biases; Conv1D layers with biases
def test_full_modules_carry_the_whole_diff_through_peft(fam, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = make_model(tiny_config(fam), seed=3, dtype=torch.float32)
    a, b = save(base, tmp_path / "A"), save(perturbed(base, seed=4, scale=0.02), tmp_path / "B")
    c = save(perturbed(base, seed=5, scale=0.03), tmp_path / "C")
    dense = transfer(str(a), str(b), str(c), tmp_path / "t").output
    res = export_lora(
        diff(str(a), str(b), tmp_path / "d").output, tmp_path / "ad", rank=64, target_base=str(c), full_modules=True
    )
    # the layers' bias diffs ride in lora_B.bias (PEFT's lora_bias): nothing of the diff is left out
    assert res.left_out == [] and res.left_out_share == 0
    assert [w for w in res.warnings if "left out" in w] == [] and "local model" in res.warnings[0]
    assert json.loads((res.output / "adapter_config.json").read_text())["lora_bias"] is True
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(c), res.output).eval()
    want = AutoModelForCausalLM.from_pretrained(dense).eval()
    ids = torch.arange(2, 40).reshape(2, 19)
    with torch.no_grad():
        got, ref = model(ids).logits, want(ids).logits
    assert torch.allclose(got, ref, rtol=0, atol=1e-4), (got - ref).abs().max().item()


def test_a_chain_recorded_with_absolute_paths_is_reused(world, tmp_path, monkeypatch):
    import ftrecycle.recycle.chain as chain_mod

    train = _items(tmp_path / "train.jsonl", 16)
    spec = {"versions": [str(world["A"]), str(world["C"])], "data": str(train), "output": str(tmp_path / "chain")}
    (tmp_path / "chain.yaml").write_text(json.dumps({**spec, "finetune": {**TINY_FT, "max_steps": 1}}))
    # an earlier version recorded the products' keys with absolute paths
    monkeypatch.setattr(chain_mod, "portable", lambda value, out, record_paths="relative": value)
    iterate(ChainSpec.load(tmp_path / "chain.yaml"))
    assert str(tmp_path) in (tmp_path / "chain" / "summary.json").read_text()
    monkeypatch.undo()
    calls: list[str] = []
    real = chain_mod.finetune
    monkeypatch.setattr(chain_mod, "finetune", lambda model, *a, **k: calls.append(model) or real(model, *a, **k))
    iterate(ChainSpec.load(tmp_path / "chain.yaml"))  # no refusal, nothing made again
    assert calls == [] and str(tmp_path) not in (tmp_path / "chain" / "summary.json").read_text()
    iterate(ChainSpec.load(tmp_path / "chain.yaml"))  # and the relative keys it now holds are reused too
    assert calls == []


def test_portable_rewrites_joined_short_flags_and_leaves_token_strings_alone(tmp_path):
    from ftrecycle.io.provenance import portable

    out = tmp_path / "out"
    record = {
        "command": ["ftrecycle", "transfer", f"-o{out}", "--tokens", "/usr", f"--calibration={tmp_path / 'c.jsonl'}"],
        "token_rows": {"tokens": ["/usr", "/"]},
    }
    got = portable(record, out)
    assert got["command"] == ["ftrecycle", "transfer", "-o.", "--tokens", "/usr", "--calibration=../c.jsonl"]
    assert got["token_rows"]["tokens"] == ["/usr", "/"]
