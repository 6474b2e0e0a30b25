"""Bit-exactness of transfer, diff and apply on the three tiny families."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ftrecycle import apply_delta, diff, transfer

from conftest import bits, load_dir, reference
from fixtures.tiny import FAMILIES, make_versions


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        g, w = got[name], want[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        same = torch.equal(bits(g), bits(w))
        assert same, f"{name}: max |diff| {(g.float() - w.float()).abs().max().item()}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_transfer_matches_reference_bit_for_bit(versions, tmp_path, family, alpha):
    v = versions[family]
    out = transfer(
        str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"]), tmp_path / "out", alpha=alpha
    )
    a, b, c = (load_dir(v[k]) for k in ("source_base", "source_finetuned", "target_base"))
    want = {n: reference(a[n], b[n], t, alpha, torch.float32, t.dtype) for n, t in c.items()}
    _assert_same(load_dir(out.output), want)
    # the diff really changed the target: the test can fail if nothing were added
    assert any(not torch.equal(want[n], c[n]) for n in c)


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_of_diff_gives_back_finetuned(versions, tmp_path, family):
    v = versions[family]
    delta = diff(str(v["source_base"]), str(v["source_finetuned"]), tmp_path / "delta")
    manifest = json.loads((delta.output / "ftrecycle-delta.json").read_text())
    assert manifest["dtype"] == "float32" and manifest["format"] == "ftrecycle-delta"
    out = apply_delta(delta.output, str(v["source_base"]), tmp_path / "back")
    _assert_same(load_dir(out.output), load_dir(v["source_finetuned"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_transfer_equals_diff_then_apply(versions, tmp_path, family):
    v = versions[family]
    one = transfer(
        str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"]), tmp_path / "one", alpha=0.7
    )
    d = diff(str(v["source_base"]), str(v["source_finetuned"]), tmp_path / "delta")
    two = apply_delta(d.output, str(v["target_base"]), tmp_path / "two", alpha=0.7)
    _assert_same(load_dir(two.output), load_dir(one.output))


def test_float32_models_round_trip_with_float64_delta(tmp_path):
    v = make_versions("llama", tmp_path / "m", dtype=torch.float32)
    d = diff(
        str(v["source_base"]),
        str(v["source_finetuned"]),
        tmp_path / "delta",
        delta_dtype="float64",
        compute_dtype="float64",
    )
    back = apply_delta(d.output, str(v["source_base"]), tmp_path / "back", compute_dtype="float64")
    _assert_same(load_dir(back.output), load_dir(v["source_finetuned"]))


def test_float64_compute_and_out_dtype(versions, tmp_path):
    v = versions["llama"]
    out = transfer(
        str(v["source_base"]),
        str(v["source_finetuned"]),
        str(v["target_base"]),
        tmp_path / "o",
        alpha=0.3,
        compute_dtype="float64",
        out_dtype="float32",
    )
    a, b, c = (load_dir(v[k]) for k in ("source_base", "source_finetuned", "target_base"))
    want = {n: reference(a[n], b[n], t, 0.3, torch.float64, torch.float32) for n, t in c.items()}
    _assert_same(load_dir(out.output), want)
    cfg = json.loads((out.output / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float32"


@pytest.mark.parametrize("family", FAMILIES)
def test_output_loads_in_transformers_and_generates(versions, tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    v = versions[family]
    out = transfer(
        str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"]), tmp_path / "o", shard_size="30KB"
    )
    assert (out.output / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out.output)
    assert AutoTokenizer.from_pretrained(out.output) is not None
    ids = torch.tensor([[1, 5, 6, 7]])
    gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, ids.shape[1] + 5)
    # the loaded weights are the written ones (no silent re-initialisation)
    sd = model.state_dict()
    written = load_dir(out.output)
    for name, t in written.items():
        assert torch.equal(sd[name].to(t.dtype), t), name


def test_provenance_and_model_card(versions, tmp_path):
    v = versions["qwen2"]
    out = transfer(str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"]), tmp_path / "o", alpha=0.5)
    rec = json.loads((out.output / "ftrecycle.json").read_text())
    assert rec["operation"] == "transfer" and rec["alpha"] == 0.5
    assert set(rec["inputs"]) == {"source_base", "source_finetuned", "target_base"}
    # recorded relative to the output, so that an uploaded output names no local directory
    want = os.path.relpath(Path(v["target_base"]).resolve(), out.output.resolve())
    assert rec["inputs"]["target_base"]["path"] == want
    assert any(r["tensor"] == "lm_head.weight" and r["action"] == "tied" for r in rec["records"])
    card = (out.output / "README.md").read_text()
    assert card.startswith("---") and "ftrecycle" in card
    assert {"config.json", "tokenizer.json"} <= {p.name for p in out.output.iterdir()}


def test_config_and_tokenizer_from_finetuned(versions, tmp_path):
    v = versions["llama"]
    fin_cfg = json.loads((v["source_finetuned"] / "config.json").read_text())
    fin_cfg["ftrecycle_marker"] = 12345  # mark it, to see which config was copied
    marked = tmp_path / "fin"
    import shutil

    shutil.copytree(v["source_finetuned"], marked)
    (marked / "config.json").write_text(json.dumps(fin_cfg))
    out = transfer(
        str(v["source_base"]),
        str(marked),
        str(v["target_base"]),
        tmp_path / "o",
        config_from="finetuned",
        tokenizer_from="finetuned",
    )
    assert json.loads((out.output / "config.json").read_text())["ftrecycle_marker"] == 12345
    default = transfer(str(v["source_base"]), str(marked), str(v["target_base"]), tmp_path / "d")
    assert "ftrecycle_marker" not in json.loads((default.output / "config.json").read_text())
