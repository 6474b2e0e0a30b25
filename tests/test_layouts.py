"""Real checkpoint layouts: tied embeddings, grown vocabularies, names on one side, buffers, architectures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ftrecycle import IncompatibleModelsError, transfer

from conftest import bits, load_dir, reference
from fixtures.tiny import make_model, perturbed, save, tiny_config

EMB = "model.embed_tokens.weight"


def _versions(tmp: Path, *, base_tie: bool, target_tie: bool, target_vocab: int | None = None) -> dict[str, Path]:
    base = make_model(tiny_config("qwen2", tie=base_tie), seed=3)
    fin = perturbed(base, seed=4, scale=0.01)
    tcfg = tiny_config("qwen2", tie=target_tie, vocab_size=target_vocab or 96)
    new = make_model(tcfg, seed=3)
    # the target starts from the base's values where shapes allow, as a new version would
    sd = {k: v for k, v in base.state_dict().items() if k in new.state_dict()}
    if target_vocab:
        sd[EMB] = torch.cat([sd[EMB], new.state_dict()[EMB][sd[EMB].shape[0] :]])
        sd.pop("lm_head.weight", None)
    new.load_state_dict(sd, strict=False)
    new = perturbed(new, seed=5, scale=0.02)
    return {"a": save(base, tmp / "a"), "b": save(fin, tmp / "b"), "c": save(new, tmp / "c")}


def _args(v: dict[str, Path]) -> tuple[str, str, str]:
    return str(v["a"]), str(v["b"]), str(v["c"])


def test_tied_embeddings_get_the_diff_once(versions, tmp_path):
    v = versions["qwen2"]
    out = transfer(str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"]), tmp_path / "o")
    got = load_dir(out.output)
    assert "lm_head.weight" not in got
    a, b, c = (load_dir(v[k]) for k in ("source_base", "source_finetuned", "target_base"))
    once = reference(a[EMB], b[EMB], c[EMB], 1.0, torch.float32, torch.bfloat16)
    twice = reference(a[EMB], b[EMB], once, 1.0, torch.float32, torch.bfloat16)
    assert torch.equal(bits(got[EMB]), bits(once)) and not torch.equal(bits(got[EMB]), bits(twice))


def test_source_ties_target_unties_applies_embedding_diff_to_lm_head(tmp_path):
    v = _versions(tmp_path, base_tie=True, target_tie=False)
    out = transfer(*_args(v), tmp_path / "o")
    a, b, c = load_dir(v["a"]), load_dir(v["b"]), load_dir(v["c"])
    got = load_dir(out.output)
    want = reference(a[EMB], b[EMB], c["lm_head.weight"], 1.0, torch.float32, torch.bfloat16)
    assert torch.equal(bits(got["lm_head.weight"]), bits(want))
    assert any(r["action"] == "tied-source" and r["tensor"] == "lm_head.weight" for r in out.records)


def test_source_unties_target_ties_needs_a_choice(tmp_path):
    from transformers import AutoModelForCausalLM

    v = _versions(tmp_path, base_tie=False, target_tie=True)
    with pytest.raises(IncompatibleModelsError, match="--tie-mismatch"):
        transfer(*_args(v), tmp_path / "o")
    assert not (tmp_path / "o").exists()
    a, b, c = load_dir(v["a"]), load_dir(v["b"]), load_dir(v["c"])

    untied = transfer(*_args(v), tmp_path / "u", tie_mismatch="untie")
    got = load_dir(untied.output)
    want = reference(a["lm_head.weight"], b["lm_head.weight"], c[EMB], 1.0, torch.float32, torch.bfloat16)
    assert torch.equal(bits(got["lm_head.weight"]), bits(want))
    assert json.loads((untied.output / "config.json").read_text())["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(untied.output)
    assert torch.equal(model.lm_head.weight.data, got["lm_head.weight"])

    kept = transfer(*_args(v), tmp_path / "k", tie_mismatch="embed-only")
    assert "lm_head.weight" not in load_dir(kept.output)
    assert any(r["action"] == "dropped" and r["tensor"] == "lm_head.weight" for r in kept.records)


def test_grown_vocabulary_overlap(tmp_path):
    from transformers import AutoModelForCausalLM

    v = _versions(tmp_path, base_tie=True, target_tie=True, target_vocab=112)
    with pytest.raises(IncompatibleModelsError, match="--vocab overlap"):
        transfer(*_args(v), tmp_path / "o")
    out = transfer(*_args(v), tmp_path / "o", vocab="overlap")
    a, b, c = load_dir(v["a"]), load_dir(v["b"]), load_dir(v["c"])
    got = load_dir(out.output)[EMB]
    assert got.shape == (112, 32)
    shared = reference(a[EMB], b[EMB], c[EMB][:96], 1.0, torch.float32, torch.bfloat16)
    assert torch.equal(bits(got[:96]), bits(shared))
    assert torch.equal(bits(got[96:]), bits(c[EMB][96:]))
    assert any(r["action"] == "vocab-overlap" for r in out.records)
    assert AutoModelForCausalLM.from_pretrained(out.output).config.vocab_size == 112


def _with_tensor(src: Path, dst: Path, name: str, value: torch.Tensor | None) -> Path:
    """Copy a model directory, adding (or with None removing) one tensor in its own last shard."""
    shutil.copytree(src, dst)
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    if value is None:
        shard = index["weight_map"].pop(name)
        tensors = load_file(dst / shard)
        tensors.pop(name)
        save_file(tensors, dst / shard, metadata={"format": "pt"})
    else:
        save_file({name: value}, dst / "extra.safetensors", metadata={"format": "pt"})
        index["weight_map"][name] = "extra.safetensors"
    index_path.write_text(json.dumps(index))
    return dst


def test_integer_buffers_are_copied_from_target(versions, tmp_path):
    v = versions["llama"]
    name = "model.position_ids_buffer"
    a = _with_tensor(v["source_base"], tmp_path / "a", name, torch.arange(8))
    b = _with_tensor(v["source_finetuned"], tmp_path / "b", name, torch.arange(8) * 2)
    c = _with_tensor(v["target_base"], tmp_path / "c", name, torch.arange(8) * 3)
    out = transfer(str(a), str(b), str(c), tmp_path / "o")
    assert torch.equal(load_dir(out.output)[name], torch.arange(8) * 3)
    assert any(r["tensor"] == name and r["action"] == "copied" for r in out.records)


def test_names_on_one_side_only(versions, tmp_path):
    v = versions["llama"]
    gone = "model.layers.1.mlp.up_proj.weight"
    c = _with_tensor(v["target_base"], tmp_path / "c", gone, None)
    c2 = _with_tensor(c, tmp_path / "c2", "model.extra.weight", torch.ones(4, dtype=torch.bfloat16))
    with pytest.raises(IncompatibleModelsError) as e:
        transfer(str(v["source_base"]), str(v["source_finetuned"]), str(c2), tmp_path / "o")
    assert "model.extra.weight" in str(e.value) and gone in str(e.value) and "--on-missing keep-target" in str(e.value)
    out = transfer(str(v["source_base"]), str(v["source_finetuned"]), str(c2), tmp_path / "o", on_missing="keep-target")
    got = load_dir(out.output)
    assert gone not in got and torch.equal(got["model.extra.weight"], torch.ones(4, dtype=torch.bfloat16))
    actions = {(r["tensor"], r["action"]) for r in out.records}
    assert (gone, "dropped") in actions and ("model.extra.weight", "copied") in actions


def test_architecture_mismatch_is_refused(versions, tmp_path):
    v = versions["llama"]
    c = tmp_path / "c"
    shutil.copytree(v["target_base"], c)
    cfg = json.loads((c / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (c / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleModelsError, match=r"num_hidden_layers 2 .* vs 3"):
        transfer(str(v["source_base"]), str(v["source_finetuned"]), str(c), tmp_path / "o")
    with pytest.raises(IncompatibleModelsError, match="model_type"):
        transfer(
            str(v["source_base"]), str(v["source_finetuned"]), str(versions["qwen2"]["target_base"]), tmp_path / "o"
        )


def test_shape_mismatch_outside_vocabulary_is_refused(versions, tmp_path):
    v = versions["llama"]
    name = "model.layers.0.mlp.up_proj.weight"
    c = _with_tensor(v["target_base"], tmp_path / "c0", name, None)
    c = _with_tensor(c, tmp_path / "c", name, torch.zeros(65, 32, dtype=torch.bfloat16))
    with pytest.raises(IncompatibleModelsError, match=r"up_proj.weight.*\[65, 32\]"):
        transfer(str(v["source_base"]), str(v["source_finetuned"]), str(c), tmp_path / "o", vocab="overlap")
