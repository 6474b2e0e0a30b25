"""Hostile and careless delta directories and LoRA adapters, crafted the way an attacker would:
each class is refused with one clear line (exit 2), inputs untouched, nothing written.

Classes: manifest schema and version; compressed parts against their tensor; names that collide
with part names; the files a delta copies into an output; adapter configs (types, and PEFT's own
semantics, checked against PEFT itself).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from ftrecycle.cli import main
from ftrecycle.delta.manifest import MANIFEST
from ftrecycle.delta.store import checksums, open_delta
from ftrecycle.errors import FtRecycleError
from ftrecycle.io.safetensors_format import read_header
from ftrecycle.ops.diff import diff
from ftrecycle.ops.inspect import inspect_delta

from conftest import load_dir, tree_digest
from fixtures.tiny import make_model, save, tiny_config

DEEP = "[" * 100_000 + "]" * 100_000
Q = "model.layers.0.self_attn.q_proj.weight"  # (32, 32)
K = "model.layers.0.self_attn.k_proj.weight"  # (16, 32)
UP = "model.layers.0.mlp.up_proj.weight"  # (64, 32)


@pytest.fixture(scope="module")
def deltas(versions, tmp_path_factory) -> dict[str, Path]:
    """method -> a float32 delta of the llama fixture ("dense": uncompressed)."""
    root = tmp_path_factory.mktemp("deltas")
    v = versions["llama"]
    specs = {"dense": None, "int8": "int8", "sign": "sign", "sparse": "sparse:density=0.2", "lowrank": "lowrank:rank=2"}
    return {
        k: diff(str(v["source_base"]), str(v["source_finetuned"]), root / k, compress=spec).output
        for k, spec in specs.items()
    }


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _apply_refused(capsys, delta: Path, target: Path, out: Path, *extra: str, inputs: tuple[Path, ...] = ()) -> str:
    """Run `ftrecycle apply` and check: exit 2, one `ftrecycle: error:` line, no output, inputs unchanged."""
    before = tree_digest(delta, target, *inputs)
    code = main(["apply", "--delta", str(delta), "--target-base", str(target), "-o", str(out), "-q", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("ftrecycle: error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    assert tree_digest(delta, target, *inputs) == before
    return err


# ---------------------------------------------------------------- 1. manifest schema and version


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(m: dict[str, Any]) -> None:
        *keys, last = path.split("/")
        d = m
        for k in keys:
            d = d[k]
        d[last] = value

    return edit


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def edit(m: dict[str, Any]) -> None:
        *keys, last = path.split("/")
        d = m
        for k in keys:
            d = d[k]
        del d[last]

    return edit


def _drop_one_checksum(m: dict[str, Any]) -> None:
    del m["checksums"][sorted(m["checksums"])[0]]


def _zero_method(m: dict[str, Any]) -> None:  # an internal name: would wipe the tensor's diff
    m["tensors"][Q]["compression"]["method"] = "zero"


def _steal_part(m: dict[str, Any]) -> None:  # q_proj's entry points at k_proj's q
    m["tensors"][Q]["parts"]["q"] = f"{K}::q"


MANIFEST_CASES = {
    "version missing": ("dense", _drop("version")),
    "version 3": ("dense", _set("version", 3)),
    "version as string": ("dense", _set("version", "2")),
    "version true": ("dense", _set("version", True)),
    "version float": ("dense", _set("version", 2.0)),
    "not an object": ("dense", None),
    "tensors a list": ("dense", _set("tensors", [])),
    "tensors empty": ("dense", _set("tensors", {})),
    "shape a string": ("dense", _set(f"tensors/{Q}/shape", "32x32")),
    "shape negative": ("dense", _set(f"tensors/{Q}/shape", [-32, -32])),
    "shape of bools": ("dense", _set(f"tensors/{Q}/shape", [True, 32])),
    "entry dtype int8": ("dense", _set(f"tensors/{Q}/dtype", "int8")),
    "norm a string": ("dense", _set(f"tensors/{Q}/norm", "big")),
    "top dtype unknown": ("dense", _set("dtype", "float8")),
    "aliases a list": ("dense", _set("aliases", ["x"])),
    "base_config a string": ("dense", _set("base_config", "llama")),
    "deep nesting": ("dense", "deep"),
    "checksums missing (v2)": ("dense", _drop("checksums")),
    "checksums empty (v2)": ("int8", _set("checksums", {})),
    "one checksum missing": ("int8", _drop_one_checksum),
    "checksum of a tensor not stored": ("dense", lambda m: m["checksums"].update({"x.weight": "0" * 64})),
    "checksum not hex": ("dense", lambda m: m["checksums"].update({Q: "z" * 64})),
    "method zero": ("int8", _zero_method),
    "method dense": ("int8", _set(f"tensors/{Q}/compression/method", "dense")),
    "method missing": ("int8", _drop(f"tensors/{Q}/compression/method")),
    "parts missing one": ("int8", _drop(f"tensors/{Q}/parts/scale")),
    "part of another tensor": ("int8", _steal_part),
    "compressed in version 1": ("int8", _set("version", 1)),
    "v2 relabelled version 1": ("dense", _set("version", 1)),
    "v2 relabelled, checksums dropped": ("dense", lambda m: m.update(version=1, checksums=None)),
    "rank a string": ("lowrank", _set(f"tensors/{Q}/compression/rank", "2")),
    "compressed 1-D": ("sign", _set(f"tensors/{Q}/shape", [1024])),
    "compressed empty": ("int8", _set(f"tensors/{Q}/shape", [32, 0])),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_malformed_manifests_are_refused(case, deltas, versions, tmp_path, capsys):
    kind, edit = MANIFEST_CASES[case]
    d = _copy(deltas[kind], tmp_path / "d")
    mpath = d / MANIFEST
    m = json.loads(mpath.read_text())
    if edit is None:
        mpath.write_text(json.dumps([m]))
    elif edit == "deep":
        text = json.dumps(m)
        mpath.write_text(text[:-1] + ', "deep": ' + DEEP + "}")
    else:
        edit(m)
        mpath.write_text(json.dumps(m))
    with pytest.raises(FtRecycleError) as e:
        inspect_delta(d)
    assert MANIFEST in str(e.value) or str(d) in str(e.value)
    err = _apply_refused(capsys, d, versions["llama"]["target_base"], tmp_path / "o")
    assert "recreate the delta" in err or "upgrade ftrecycle" in err


def test_inspect_says_verified_only_for_a_complete_v2_delta(deltas, tmp_path):
    assert inspect_delta(deltas["int8"])["checksums"] == "verified"
    assert inspect_delta(deltas["int8"], check=False)["checksums"] == "not checked"


# ---------------------------------------------------------------- 2. parts against their tensor


def _rewrite(d: Path, edit: Callable[[dict[str, torch.Tensor]], None], *, fix_checksums: bool = True) -> None:
    """Edit a delta's stored tensors as an attacker would: rewrite the shards, then (unless told
    otherwise) recompute the manifest's checksums so that they do not give the edit away."""
    tensors = load_dir(d)
    edit(tensors)
    for f in d.glob("delta*.safetensors*"):
        f.unlink()
    save_file(tensors, str(d / "delta.safetensors"), metadata={"format": "pt"})
    if fix_checksums:
        m = json.loads((d / MANIFEST).read_text())
        infos, _ = read_header(d / "delta.safetensors")
        m["checksums"], _ = checksums(infos, 1)
        (d / MANIFEST).write_text(json.dumps(m))


def _swap(a: str, b: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[a], t[b] = t[b], t[a]

    return edit


def _put(name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[name] = fn(t[name])

    return edit


def _indptr_end(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    y[-1] = 2**62  # a row "holding" 7.6 EiB of entries
    return y


def _indptr_down(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    y[1] = y[-1]  # row 0 spans everything, row 1 goes backwards
    return y


def _indices_wide(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    y[0] = 40  # column 40 of a 32-column tensor: lands in the next row
    return y


PART_CASES = {
    "int8 q exchanged": ("int8", _swap(f"{Q}::q", f"{K}::q")),
    "int8 scale exchanged": ("int8", _swap(f"{Q}::scale", f"{UP}::scale")),
    "int8 q as uint8": ("int8", _put(f"{Q}::q", lambda x: x.view(torch.uint8))),
    "int8 scale as float16": ("int8", _put(f"{Q}::scale", lambda x: x.half())),
    "sign bits exchanged": ("sign", _swap(f"{Q}::bits", f"{UP}::bits")),
    "sign scale of 2": ("sign", _put(f"{Q}::scale", lambda x: torch.cat([x, x]))),
    "sparse indptr exchanged": ("sparse", _swap(f"{Q}::indptr", f"{UP}::indptr")),
    "sparse indptr ends at 2**62": ("sparse", _put(f"{Q}::indptr", _indptr_end)),
    "sparse indptr decreasing": ("sparse", _put(f"{Q}::indptr", _indptr_down)),
    "sparse indptr as int32": ("sparse", _put(f"{Q}::indptr", lambda x: x.int())),
    "sparse indices past the row": ("sparse", _put(f"{Q}::indices", _indices_wide)),
    "sparse values short": ("sparse", _put(f"{Q}::values", lambda x: x[:-1].clone())),
    "lowrank b of another rank": ("lowrank", _put(f"{Q}::b", lambda x: torch.cat([x, x]))),
    "lowrank a exchanged": ("lowrank", _swap(f"{Q}::a", f"{UP}::a")),
    "lowrank b as int32": ("lowrank", _put(f"{Q}::b", lambda x: x.view(torch.int32))),
    "dense tensor as int32": ("dense", _put(Q, lambda x: x.view(torch.int32))),
    "an unlisted tensor": ("int8", lambda t: t.update({"model.extra.weight": torch.zeros(4)})),
}


@pytest.mark.parametrize("case", list(PART_CASES))
def test_parts_that_do_not_fit_their_tensor_are_refused(case, deltas, versions, tmp_path, capsys):
    kind, edit = PART_CASES[case]
    d = _copy(deltas[kind], tmp_path / "d")
    _rewrite(d, edit)
    with pytest.raises(FtRecycleError, match=r"recreate the delta"):
        open_delta(d)
    err = _apply_refused(capsys, d, versions["llama"]["target_base"], tmp_path / "o")
    assert "delta.safetensors" in err or MANIFEST in err


# ---------------------------------------------------------------- 3. names that collide with part names


def _renamed(src: Path, dst: Path, old: str, new: str) -> Path:
    tensors = load_dir(src)
    tensors[new] = tensors.pop(old)
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


NAME_CASES = {
    "norm::a, dense": ("model.norm.weight", "model.norm.weight::a", None),
    "q_proj::b, lowrank": (Q, f"{Q}::b", "lowrank:rank=2"),
    "up_proj::q, int8": (UP, f"{UP}::q", "int8"),
    "bare ::, sign": ("model.norm.weight", "::", "sign"),
}


@pytest.mark.parametrize("case", [*NAME_CASES, "read: v1 shard", "read: v2 entry"])
def test_names_colliding_with_part_names_are_refused(case, versions, deltas, tmp_path, capsys):
    v = versions["llama"]
    if case in NAME_CASES:
        old, new, spec = NAME_CASES[case]
        a = _renamed(v["source_base"], tmp_path / "a", old, new)
        b = _renamed(v["source_finetuned"], tmp_path / "b", old, new)
        before = tree_digest(a, b)
        args = ["diff", "--base", str(a), "--finetuned", str(b), "-o", str(tmp_path / "d"), "-q"]
        code = main(args + (["--compress", spec] if spec else []))
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and repr(new) in err and "'::'" in err, err
        assert not (tmp_path / "d").exists() and tree_digest(a, b) == before
        return
    d = _copy(deltas["dense"], tmp_path / "d")
    m = json.loads((d / MANIFEST).read_text())
    if case == "read: v1 shard":  # version 1 keeps unlisted stored tensors: one named like a part
        _rewrite(d, lambda t: t.update({f"{Q}::a": torch.zeros(2)}), fix_checksums=False)
        m = json.loads((d / MANIFEST).read_text())
        m["version"] = 1
        del m["checksums"]
        m["tensors"] = {k: {"shape": e["shape"], "dtype": e["dtype"]} for k, e in m["tensors"].items()}
    else:
        m["tensors"][f"{Q}::a"] = m["tensors"].pop(Q)
    (d / MANIFEST).write_text(json.dumps(m))
    err = _apply_refused(capsys, d, v["target_base"], tmp_path / "o")
    assert "'::'" in err


# ---------------------------------------------------------------- 4. files a delta copies into an output


def _secret(tmp_path: Path) -> Path:
    s = tmp_path / "id_secret"
    s.write_text("-----BEGIN PRIVATE KEY-----\n")
    return s


def _link_out(d: Path, tmp: Path) -> None:
    (d / "finetuned" / "tokenizer.json").unlink()
    (d / "finetuned" / "tokenizer.json").symlink_to(_secret(tmp))


def _link_rel(d: Path, tmp: Path) -> None:
    _secret(tmp)
    (d / "finetuned" / "tokenizer_config.json").unlink(missing_ok=True)
    (d / "finetuned" / "tokenizer_config.json").symlink_to(Path("..", "..", "id_secret"))


def _link_inside(d: Path, tmp: Path) -> None:
    (d / "finetuned" / "config.json").unlink()
    (d / "finetuned" / "config.json").symlink_to(Path("..", MANIFEST))


def _link_dir(d: Path, tmp: Path) -> None:
    shutil.rmtree(d / "finetuned")
    (d / "finetuned").symlink_to(tmp / "elsewhere", target_is_directory=True)
    (tmp / "elsewhere").mkdir()
    (tmp / "elsewhere" / "config.json").write_text((d / MANIFEST).read_text())


def _fifo(d: Path, tmp: Path) -> None:
    (d / "finetuned" / "config.json").unlink()
    os.mkfifo(d / "finetuned" / "config.json")


def _no_dir(d: Path, tmp: Path) -> None:
    shutil.rmtree(d / "finetuned")


def _no_config(d: Path, tmp: Path) -> None:
    (d / "finetuned" / "config.json").unlink()


def _other_arch(d: Path, tmp: Path) -> None:
    cfg = json.loads((d / "finetuned" / "config.json").read_text())
    cfg["num_hidden_layers"] = 7
    (d / "finetuned" / "config.json").write_text(json.dumps(cfg))


def _deep_config(d: Path, tmp: Path) -> None:
    (d / "finetuned" / "config.json").write_text('{"a": ' + DEEP + "}")


FILE_CASES = {
    "symlink to a key, absolute": (_link_out, "--tokenizer-from"),
    "symlink to a key, relative": (_link_rel, "--tokenizer-from"),
    "symlink inside the delta": (_link_inside, "--config-from"),
    "finetuned/ a symlinked dir": (_link_dir, "--config-from"),
    "config.json a FIFO": (_fifo, "--config-from"),
    "no finetuned/": (_no_dir, "--config-from"),
    "no finetuned/config.json": (_no_config, "--config-from"),
    "config of another architecture": (_other_arch, "--config-from"),
    "config nested 100k deep": (_deep_config, "--config-from"),
    "no finetuned/, tokenizer": (_no_dir, "--tokenizer-from"),
    "tokenizer.json a directory": (
        lambda d, tmp: (d / "finetuned" / "tokenizer.json").unlink() or (d / "finetuned" / "tokenizer.json").mkdir(),
        "--tokenizer-from",
    ),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_delta_files_are_copied_only_when_regular_and_of_its_architecture(case, deltas, versions, tmp_path, capsys):
    craft, flag = FILE_CASES[case]
    d = _copy(deltas["dense"], tmp_path / "d")
    craft(d, tmp_path)
    err = _apply_refused(capsys, d, versions["llama"]["target_base"], tmp_path / "o", flag, "finetuned")
    assert "finetuned" in err and "PRIVATE" not in err


# ---------------------------------------------------------------- 5. adapter configs


@pytest.fixture(scope="module")
def lora_llama(tmp_path_factory) -> dict[str, Path]:
    """A float32 llama base and a PEFT LoRA adapter over it (q, v, down projections)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lora")
    cfg = tiny_config("llama")
    base = save(make_model(cfg, seed=1, dtype=torch.float32), root / "base")
    lc = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(make_model(cfg, seed=1, dtype=torch.float32), lc).save_pretrained(root / "adapter")
    return {"base": base, "adapter": root / "adapter"}


ADAPTER_CASES: dict[str, Any] = {
    "r a string": {"r": "4"},
    "r zero": {"r": 0},
    "r negative": {"r": -4},
    "r true": {"r": True},
    "r a float": {"r": 4.0},
    "lora_alpha a string": {"lora_alpha": "8"},
    "lora_alpha NaN": "nan",
    "target_modules a number": {"target_modules": 5},
    "target_modules of numbers": {"target_modules": [1, 2]},
    "rank_pattern values strings": {"rank_pattern": {"q_proj": "4"}},
    "rank_pattern zero": {"rank_pattern": {"q_proj": 0}},
    "alpha_pattern a list": {"alpha_pattern": ["q_proj"]},
    "alpha_pattern bad regex": {"alpha_pattern": {"q_proj(": 8}},
    "use_rslora a string": {"use_rslora": "yes"},
    "lora_bias true": {"lora_bias": True},
    "peft_type a list": {"peft_type": ["LORA"]},
    "not an object": [1, 2],
    "nested 100k deep": "deep",
}
AQ = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
BQ = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
WEIGHT_CASES: dict[str, Callable[[dict[str, torch.Tensor]], None]] = {
    "weights: ranks disagree": _put(BQ, lambda x: torch.cat([x, x], dim=1)),
    "weights: A of int32": _put(AQ, lambda x: x.view(torch.int32)),
    "weights: A 1-D": _put(AQ, lambda x: x.reshape(-1)),
    "weights: B missing": lambda t: t.pop(BQ),
    "weights: an untold lora_B bias": lambda t: t.update({BQ[: -len("weight")] + "bias": torch.zeros(32)}),
    "weights: a full tensor": lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(96, 32)}),
}


@pytest.mark.parametrize("case", [*ADAPTER_CASES, *WEIGHT_CASES])
def test_bad_adapter_configs_are_refused(case, lora_llama, tmp_path, capsys):
    ad = _copy(lora_llama["adapter"], tmp_path / "adapter")
    cpath = ad / "adapter_config.json"
    cfg = json.loads(cpath.read_text())
    change = ADAPTER_CASES.get(case)
    if case in WEIGHT_CASES:
        tensors = load_file(ad / "adapter_model.safetensors")
        WEIGHT_CASES[case](tensors)
        save_file(tensors, str(ad / "adapter_model.safetensors"), metadata={"format": "pt"})
    elif change == "deep":
        cpath.write_text(json.dumps(cfg)[:-1] + ', "x": ' + DEEP + "}")
    elif change == "nan":
        cpath.write_text(json.dumps(cfg)[:-1] + ', "lora_alpha": NaN}')
    elif isinstance(change, list):
        cpath.write_text(json.dumps(change))
    else:
        cfg.update(change)
        cpath.write_text(json.dumps(cfg))
    before = tree_digest(ad, lora_llama["base"])
    out = tmp_path / "d"
    code = main(["diff", "--base", str(lora_llama["base"]), "--finetuned", str(ad), "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ftrecycle: error: ") and len(err.strip().splitlines()) == 1, err
    assert "adapter" in err and not out.exists() and tree_digest(ad, lora_llama["base"]) == before


def _peft_adapter(fam: str, root: Path, lc_kwargs: dict[str, Any], config_edit: dict[str, Any]) -> dict[str, Path]:
    """A base, a PEFT adapter (its saved config then edited as a user might) and PEFT's own merge
    of that adapter as PEFT loads it."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(fam)
    base = save(make_model(cfg, seed=1, dtype=torch.float32), root / "base")
    lc = LoraConfig(init_lora_weights=False, **lc_kwargs)
    get_peft_model(make_model(cfg, seed=1, dtype=torch.float32), lc).save_pretrained(root / "adapter")
    cpath = root / "adapter" / "adapter_config.json"
    cpath.write_text(json.dumps({**json.loads(cpath.read_text()), **config_edit}))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():  # PEFT warns where it overrides fan_in_fan_out
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model, root / "adapter").merge_and_unload()
    return {"base": base, "adapter": root / "adapter", "merged": save(merged, root / "merged")}


SEMANTICS = {
    # PEFT warns and ignores fan_in_fan_out on nn.Linear
    "fan_in_fan_out true on Linear": (
        "llama",
        {"r": 4, "target_modules": ["q_proj", "o_proj"]},
        {"fan_in_fan_out": True},
    ),
    # ... and forces it on for GPT-2's Conv1D (c_proj is square: the shape cannot tell)
    "fan_in_fan_out false on Conv1D": (
        "gpt2",
        {"r": 4, "target_modules": ["c_proj", "c_fc"], "fan_in_fan_out": True},
        {"fan_in_fan_out": False},
    ),
    # 0 is a value (no update), not a miss that falls back to lora_alpha
    "alpha_pattern 0": (
        "llama",
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "alpha_pattern": {"q_proj": 0}},
        {},
    ),
    "rank and alpha patterns": (
        "llama",
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj", "up_proj"],
            "rank_pattern": {"v_proj": 2, "up_proj": 1},
            "alpha_pattern": {"layers.1.self_attn.v_proj": 5},
        },
        {},
    ),
    "alternation in a pattern": (
        "llama",
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "alpha_pattern": {"q_proj|v_proj": 2}},
        {},
    ),
    "rslora": ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["k_proj"], "use_rslora": True}, {}),
}


@pytest.mark.parametrize("case", [*SEMANTICS, "lora_bias by PEFT"])
def test_adapters_mean_what_peft_merges(case, tmp_path):
    """The diff of an adapter equals PEFT's own merge of it, for the settings PEFT reads in its own way."""
    from peft import LoraConfig, get_peft_model

    if case == "lora_bias by PEFT":  # README: trained biases are refused, not dropped
        cfg = tiny_config("llama")
        base = save(make_model(cfg, seed=1, dtype=torch.float32), tmp_path / "base")
        lc = LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False)
        get_peft_model(make_model(cfg, seed=1, dtype=torch.float32), lc).save_pretrained(tmp_path / "adapter")
        with pytest.raises(FtRecycleError, match="lora_bias"):
            diff(str(base), str(tmp_path / "adapter"), tmp_path / "d")
        assert not (tmp_path / "d").exists()
        return
    fam, lc_kwargs, edit = SEMANTICS[case]
    p = _peft_adapter(fam, tmp_path, lc_kwargs, edit)
    via_adapter = load_dir(diff(str(p["base"]), str(p["adapter"]), tmp_path / "da").output)
    via_merge = load_dir(diff(str(p["base"]), str(p["merged"]), tmp_path / "dm").output)
    assert set(via_adapter) == set(via_merge)
    scale = max(t.abs().max().item() for t in via_merge.values())
    assert scale > 0.01
    for k, t in via_merge.items():
        worst = (via_adapter[k] - t).abs().max().item()
        assert worst <= 4 * 2**-24 * scale, f"{k}: max difference {worst} from PEFT's merge"
