"""Delta format v2: compressed tensors, checksums, inspect; LoRA adapters in and out (checked with PEFT)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ftrecycle.cli import main
from ftrecycle.codecs import decode, parse_compression
from ftrecycle.codecs import lowrank as encode_mod
from ftrecycle.delta.store import open_delta
from ftrecycle.errors import CheckpointError, ConfigError
from ftrecycle.ops.apply import apply_delta
from ftrecycle.ops.diff import diff
from ftrecycle.ops.export import export_lora
from ftrecycle.ops.inspect import inspect_delta
from ftrecycle.ops.transfer import transfer
from ftrecycle.terms import PackedTerm

from conftest import bits, load_dir
from fixtures.tiny import make_model, save, tiny_config

SPECS = [
    "lowrank:rank=4",
    "lowrank:energy=0.8",
    "lowrank:ratio=3",
    "sparse:density=0.1",
    "sparse:ratio=3",
    "int8",
    "sign",
]


def _deltas(v: dict[str, Path]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return load_dir(v["source_base"]), load_dir(v["source_finetuned"])


def _dense_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return b.double() - a.double()


@pytest.fixture(scope="module")
def compressed(versions, tmp_path_factory):
    """spec -> delta directory (bf16 parts) of the llama fixture."""
    root = tmp_path_factory.mktemp("compressed")
    v = versions["llama"]
    out = {}
    for spec in SPECS:
        d = root / spec.replace(":", "-").replace("=", "")
        diff(str(v["source_base"]), str(v["source_finetuned"]), d, delta_dtype="bfloat16", compress=spec)
        out[spec] = d
    return out


def test_dense_float32_round_trip_with_checksums(versions, tmp_path):
    v = versions["qwen2"]
    d = diff(str(v["source_base"]), str(v["source_finetuned"]), tmp_path / "d").output
    manifest = json.loads((d / "ftrecycle-delta.json").read_text())
    assert manifest["version"] == 2 and manifest["compression"] is None
    assert set(manifest["checksums"]) == {n for n in load_dir(d)}
    assert all(len(h) == 64 for h in manifest["checksums"].values())
    out = apply_delta(d, str(v["source_base"]), tmp_path / "o").output
    got, want = load_dir(out), load_dir(v["source_finetuned"])
    assert all(torch.equal(bits(got[k]), bits(want[k])) for k in want)
    a, b = _deltas(v)
    for name, e in manifest["tensors"].items():
        assert e["norm"] == pytest.approx(_dense_delta(a[name], b[name]).norm().item(), rel=1e-6)


@pytest.mark.parametrize("spec", SPECS)
def test_compressed_delta_applies_with_the_error_it_records(versions, compressed, tmp_path, spec):
    v = versions["llama"]
    d = compressed[spec]
    s = inspect_delta(d)
    assert s["compression"] == str(parse_compression(spec)) and s["checksums"] == "verified"
    packed = [t for t in s["tensors"] if t["method"] != "dense"]
    assert packed and all(len(t["shape"]) == 2 for t in packed)
    assert all(t["method"] == "dense" for t in s["tensors"] if len(t["shape"]) == 1)
    assert s["bytes"] < s["dense_bytes"] and s["ratio"] == pytest.approx(s["dense_bytes"] / s["bytes"])
    out = apply_delta(d, str(v["source_base"]), tmp_path / "o", out_dtype="float32").output
    a, b = _deltas(v)
    got = load_dir(out)
    for t in packed:
        n = t["tensor"]
        want = _dense_delta(a[n], b[n])
        applied = got[n].double() - a[n].double()
        err = ((applied - want).norm() / want.norm()).item()
        assert err == pytest.approx(t["error"], rel=1e-3, abs=1e-5), n  # the applied diff is the stored one
        assert 0 <= t["error"] < 1


def test_decode_of_any_range_equals_the_whole(compressed):
    rng = np.random.default_rng(0)
    for spec, d in compressed.items():
        ckpt, _, terms, _ = open_delta(d)
        try:
            for term in terms.values():
                if not isinstance(term, PackedTerm):
                    continue
                numel = math.prod(term.shape)
                whole = decode(term.packed, 0, numel, np.empty(numel, np.float32), {})
                cuts = np.unique(np.r_[0, rng.integers(0, numel, 6), numel])
                pieces = [
                    decode(term.packed, s, e - s, np.empty(e - s, np.float32), {}) for s, e in itertools.pairwise(cuts)
                ]
                assert np.array_equal(np.concatenate(pieces), whole), (spec, term.name)
        finally:
            ckpt.close()


def test_codecs_do_what_they_say(versions, compressed):
    v = versions["llama"]
    a, b = _deltas(v)
    name = "model.layers.0.mlp.gate_proj.weight"
    want = _dense_delta(a[name], b[name]).float()
    m, n = want.shape

    def dense(spec: str) -> torch.Tensor:
        ckpt, _, terms, _ = open_delta(compressed[spec])
        try:
            term = terms[name]
            p = term.packed if isinstance(term, PackedTerm) else None
            assert p is not None
            return torch.from_numpy(decode(p, 0, m * n, np.empty(m * n, np.float32), {})).reshape(m, n)
        finally:
            ckpt.close()

    # sign: +-mean|d| with the sign of d
    s = dense("sign")
    assert torch.allclose(s.abs(), want.abs().mean().expand_as(s)) and torch.equal(s > 0, want >= 0)
    # int8: within half a step of the row's scale
    q = dense("int8")
    step = want.abs().amax(dim=1, keepdim=True) / 127
    assert ((q - want).abs() <= step / 2 + 1e-6).all()
    # sparse: exactly the k largest magnitudes, the rest zero
    sp = dense("sparse:density=0.1")
    k = round(0.1 * m * n)
    kept = sp != 0
    assert int(kept.sum()) == k and want.abs()[kept].min() >= want.abs()[~kept].max()
    # lowrank: the truncated SVD (Eckart-Young), to bf16 rounding of the factors
    lr = dense("lowrank:rank=4")
    u, sv, vt = torch.linalg.svd(want.double())
    best = (u[:, :4] * sv[:4]) @ vt[:4]
    assert ((lr.double() - best).norm() / best.norm()).item() < 1e-2


def test_randomized_svd_for_large_matrices_is_near_optimal(versions, tmp_path, monkeypatch):
    monkeypatch.setattr(encode_mod, "EXACT_ELEMENTS", 16)  # every matrix takes the streamed path
    monkeypatch.setattr(encode_mod, "EXACT_SIDE_RATIO", 0)
    v = versions["llama"]
    d = diff(str(v["source_base"]), str(v["source_finetuned"]), tmp_path / "d", compress="lowrank:rank=6").output
    a, b = _deltas(v)
    for t in inspect_delta(d)["tensors"]:
        if t["method"] != "lowrank":
            continue
        sv = torch.linalg.svdvals(_dense_delta(a[t["tensor"]], b[t["tensor"]]))
        optimal = math.sqrt(float((sv[6:] ** 2).sum() / (sv**2).sum()))
        assert optimal * (1 - 1e-6) <= t["error"] <= optimal * 1.05 + 1e-3, t


def test_energy_keeps_the_energy(versions, compressed):
    a, b = _deltas(versions["llama"])
    for t in inspect_delta(compressed["lowrank:energy=0.8"])["tensors"]:
        if t["method"] == "lowrank":
            assert t["error"] <= math.sqrt(0.2) + 1e-2  # bf16 factors add a little
            r = int(t["detail"].split()[1])
            sv = torch.linalg.svdvals(_dense_delta(a[t["tensor"]], b[t["tensor"]]))
            share = (sv**2).cumsum(0) / (sv**2).sum()
            assert share[r - 1] >= 0.8 - 1e-9 and (r == 1 or share[r - 2] < 0.8)


def test_corrupt_shard_fails_its_checksum(compressed, versions, tmp_path, capsys):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(compressed["int8"], d)
    shard = sorted(d.glob("delta*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        inspect_delta(d)
    v = versions["llama"]
    args = ["apply", "--delta", str(d), "--target-base", str(v["target_base"]), "-o", str(tmp_path / "o"), "-q"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "fails its checksum" in err and shard.name in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    assert main([*args, "--no-verify"]) == 0  # the user's call: a flipped bit in one value


def test_version_1_deltas_still_apply(versions, tmp_path):
    v = versions["llama"]
    d = diff(str(v["source_base"]), str(v["source_finetuned"]), tmp_path / "d").output
    mpath = d / "ftrecycle-delta.json"
    m = json.loads(mpath.read_text())
    m["version"] = 1
    del m["checksums"]
    m["tensors"] = {k: {"shape": e["shape"], "dtype": e["dtype"]} for k, e in m["tensors"].items()}
    mpath.write_text(json.dumps(m))
    out = apply_delta(d, str(v["source_base"]), tmp_path / "o").output
    got, want = load_dir(out), load_dir(v["source_finetuned"])
    assert all(torch.equal(bits(got[k]), bits(want[k])) for k in want)
    assert inspect_delta(d)["checksums"] == "none (version 1)"


@pytest.mark.parametrize(
    "spec",
    [
        "lowrank",
        "lowrank:rank=0",
        "lowrank:rank=2.5",
        "lowrank:energy=1.5",
        "sparse:density=1",
        "sparse:rank=3",
        "int8:rank=2",
        "sign:x",
        "zip",
        "lowrank:rank=2,energy=0.5",
        "sparse:ratio=1",
    ],
)
def test_bad_compression_specs(spec, versions, tmp_path, capsys):
    with pytest.raises(ConfigError):
        parse_compression(spec)
    v = versions["llama"]
    code = main(
        [
            "diff",
            "--base",
            str(v["source_base"]),
            "--finetuned",
            str(v["source_finetuned"]),
            "-o",
            str(tmp_path / "d"),
            "--compress",
            spec,
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--compress" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


def test_apply_checks_the_architecture(compressed, versions, tmp_path):
    from ftrecycle.errors import IncompatibleModelsError

    with pytest.raises(IncompatibleModelsError):
        apply_delta(compressed["sign"], str(versions["qwen2"]["target_base"]), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_inspect_cli(compressed, capsys):
    assert main(["inspect", str(compressed["lowrank:rank=4"])]) == 0
    text = capsys.readouterr().out
    assert "compression: lowrank:rank=4" in text and "ratio" in text and "| lowrank (rank 4) |" in text
    assert "checksums: verified" in text
    assert main(["inspect", str(compressed["sign"]), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["version"] == 2 and s["ratio"] > 8


# ---------------------------------------------------------------- LoRA


def _lora(fam: str, root: Path) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model

    cfg = tiny_config(fam)
    paths = {k: root / f"{fam}-{k}" for k in ("base", "adapter", "merged", "target")}
    save(make_model(cfg, seed=1, dtype=torch.float32), paths["base"])
    save(make_model(cfg, seed=5, dtype=torch.float32), paths["target"])
    modules = ["q_proj", "v_proj", "down_proj"] if fam != "gpt2" else ["c_attn", "c_fc"]
    lc = LoraConfig(r=4, lora_alpha=8, target_modules=modules, init_lora_weights=False, fan_in_fan_out=fam == "gpt2")
    pm = get_peft_model(make_model(cfg, seed=1, dtype=torch.float32), lc)
    pm.save_pretrained(paths["adapter"])
    save(pm.merge_and_unload(), paths["merged"])
    return paths


@pytest.mark.parametrize("fam", ["llama", "gpt2"])
def test_lora_source_equals_merging_it_with_peft(fam, tmp_path):
    p = _lora(fam, tmp_path)
    via_adapter = load_dir(diff(str(p["base"]), str(p["adapter"]), tmp_path / "da").output)
    via_merge = load_dir(diff(str(p["base"]), str(p["merged"]), tmp_path / "dm").output)
    assert set(via_adapter) == set(via_merge)
    scale = max(t.abs().max().item() for t in via_merge.values())
    assert scale > 0.1  # the adapter changes something
    for k, t in via_merge.items():
        assert torch.allclose(via_adapter[k], t, rtol=0, atol=4 * 2**-24 * scale), k  # float32 rounding
    t1 = load_dir(transfer(str(p["base"]), str(p["adapter"]), str(p["target"]), tmp_path / "t1").output)
    t2 = load_dir(transfer(str(p["base"]), str(p["merged"]), str(p["target"]), tmp_path / "t2").output)
    assert all(torch.allclose(t1[k], t2[k], rtol=0, atol=1e-6) for k in t2)


@pytest.mark.parametrize(
    ("fam", "embedding", "norm", "probe"),
    [
        ("llama", "model.embed_tokens.weight", "layernorm", "model.layers.0.self_attn.q_proj.weight"),
        ("gpt2", "transformer.wte.weight", "ln_", "transformer.h.0.attn.c_attn.weight"),  # Conv1D: fan_in_fan_out
    ],
)
def test_export_lora_loads_in_peft_and_equals_the_transfer(tmp_path, fam, embedding, norm, probe):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    p = _lora(fam, tmp_path)
    d = diff(str(p["base"]), str(p["merged"]), tmp_path / "d").output
    ad = tmp_path / "adapter"
    assert main(["export-lora", "--delta", str(d), "--rank", "64", "-o", str(ad)]) == 0
    want = load_dir(transfer(str(p["base"]), str(p["merged"]), str(p["target"]), tmp_path / "t").output)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(p["target"]), ad)
    got = model.merge_and_unload().state_dict()
    compared = [k for k in want if k in got and "lora" not in k]
    assert len(compared) > 10
    for k in compared:
        assert torch.allclose(got[k], want[k], rtol=0, atol=4e-6), (k, (got[k] - want[k]).abs().max().item())
    rec = json.loads((ad / "ftrecycle.json").read_text())
    left = {e["tensor"] for e in rec["left_out"]}
    assert embedding in left and any(norm in n for n in left)
    assert all(e == pytest.approx(0, abs=1e-5) for e in rec["relative_error"].values())
    # a low rank: PEFT loads it, and its update is the recorded approximation of the diff
    low = export_lora(d, tmp_path / "low", rank=2)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(p["target"]), low.output)
    merged = model.merge_and_unload().state_dict()
    tgt = load_dir(p["target"])
    full = want[probe].double() - tgt[probe].double()
    approx = merged[probe].double() - tgt[probe].double()
    assert ((approx - full).norm() / full.norm()).item() == pytest.approx(low.errors[probe], rel=1e-3)


def test_export_lora_from_a_compressed_delta(compressed, tmp_path):
    # a rank-4 delta re-factorised at rank 4 loses only the rounding of its bf16 factors
    res = export_lora(compressed["lowrank:rank=4"], tmp_path / "ad", rank=4)
    assert res.modules > 0 and max(res.errors.values()) < 1e-2


def test_transfer_with_compress_equals_diff_then_apply(versions, compressed, tmp_path, capsys):
    v = versions["llama"]
    args = ["transfer", "--source-base", str(v["source_base"]), "--source-finetuned", str(v["source_finetuned"])]
    args += ["--target-base", str(v["target_base"]), "-q"]
    assert main([*args, "-o", str(tmp_path / "t"), "--compress", "sign"]) == 0
    ref = apply_delta(compressed["sign"], str(v["target_base"]), tmp_path / "r").output
    got, want = load_dir(tmp_path / "t"), load_dir(ref)
    assert all(torch.equal(bits(got[k]), bits(want[k])) for k in want)
    rec = json.loads((tmp_path / "t" / "ftrecycle.json").read_text())
    assert rec["inputs"]["delta"]["manifest"]["compression"]["spec"] == "sign"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary delta is gone
    assert main([*args, "-o", str(tmp_path / "bad"), "--compress", "zip"]) == 2
    assert "--compress" in capsys.readouterr().err and not (tmp_path / "bad").exists()
