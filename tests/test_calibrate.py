"""Calibration: BitDelta-style distillation of a compressed delta's gains, and per-tensor sensitivities.

The codecs' ``gain`` hooks are written by others; where a codec here has none yet, the test installs
a correct one (sign: one gain per matrix, the scale times g; int8: one per row) so the machinery
is tested against the interface, not against one codec.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ftrecycle.cli import main
from ftrecycle.codecs import CODECS
from ftrecycle.delta import rewrite
from ftrecycle.delta.store import Delta
from ftrecycle.errors import ConfigError, DataError, OutputError
from ftrecycle.finetune import calibrate as cal
from ftrecycle.io.hf_load import load_causal_lm
from ftrecycle.ops.apply import apply_delta
from ftrecycle.ops.diff import diff

from conftest import bits, load_dir
from fixtures.tiny import FAMILIES, NUMBERS, make_versions


def _matrix_gain(parts: dict[str, np.ndarray], g: np.ndarray) -> dict[str, np.ndarray]:
    return {"scale": (parts["scale"].astype(np.float64) * g[0]).astype(np.float32)}


def _lowrank_gain(parts: dict[str, np.ndarray], g: np.ndarray) -> dict[str, np.ndarray]:
    if parts["a"].dtype != np.float32:
        raise AssertionError("this test's lowrank hook takes float32 parts")
    return {"a": (parts["a"].astype(np.float64) * g[:, None]).astype(np.float32)}


def _row_gain(parts: dict[str, np.ndarray], g: np.ndarray) -> dict[str, np.ndarray]:
    return {"scale": (parts["scale"].astype(np.float64) * g).astype(np.float32)}


@pytest.fixture(autouse=True)
def gains(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give sign (per matrix), int8 and lowrank (per row) a gain hook where this branch's codecs have none."""
    hooks = (("sign", _matrix_gain, False), ("int8", _row_gain, True), ("lowrank", _lowrank_gain, True))
    for name, hook, rows in hooks:
        if CODECS[name].gain is None:
            monkeypatch.setitem(CODECS, name, dataclasses.replace(CODECS[name], gain=hook, row_gain=rows))


def _texts(path: Path, n: int, seed: int) -> Path:
    """``n`` prompt/completion lines of words the tiny tokenizers know."""
    rng = random.Random(seed)
    words = [str(i) for i in range(NUMBERS)] + [f"w{i}" for i in range(20)]
    lines = [
        json.dumps({"prompt": " ".join(rng.choices(words, k=12)), "completion": " ".join(rng.choices(words, k=8))})
        for _ in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("calib")
    return {fam: make_versions(fam, root / fam, seed=10 + i) for i, fam in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("texts")
    return {"calib": _texts(root / "calib.jsonl", 16, 1), "held": _texts(root / "held.jsonl", 16, 2)}


def _kl(model_dir: Path, teacher_dir: Path, texts: Path) -> float:
    """KL(teacher || model) per non-padding token, one text at a time (independent of the library's batching)."""
    tok = cal.load_tokenizer(teacher_dir)
    batches = cal.calibration_batches(texts, tok, max_length=64, batch_size=1)
    student, teacher = load_causal_lm(model_dir, dtype=torch.float32), load_causal_lm(teacher_dir, dtype=torch.float32)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            s = torch.log_softmax(student(input_ids=b["input_ids"]).logits[0].double(), -1)
            t = torch.log_softmax(teacher(input_ids=b["input_ids"]).logits[0].double(), -1)
            total += float((t.exp() * (t - s)).sum())
            count += s.shape[0]
    return total / count


def _delta(v: dict[str, Path], out: Path, spec: str, dtype: str = "bfloat16") -> Path:
    diff(str(v["source_base"]), str(v["source_finetuned"]), out, delta_dtype=dtype, compress=spec)
    return out


# measured (see the report): one gain per sign matrix lowers the KL by ~5% (its optimum: the scale
# mean|D| is near the best single scale already); a gain per row of a rank-2 delta by ~55%
@pytest.mark.parametrize(
    ("family", "spec", "dtype", "ratio", "steps"),
    [("llama", "sign", "bfloat16", 0.97, 40), ("qwen2", "lowrank:rank=2", "float32", 0.7, 25)],
)
def test_calibration_lowers_the_kl_and_holds_on_held_out_texts(
    models, data, tmp_path, family, spec, dtype, ratio, steps
):
    v = models[family]
    src = _delta(v, tmp_path / "delta", spec, dtype)
    res = cal.calibrate(
        src, v["source_base"], v["source_finetuned"], data["calib"], tmp_path / "cal", steps=steps, lr=0.05
    )
    assert res.loss_after < ratio * res.loss_before, (res.loss_before, res.loss_after)
    kl = {}
    for name, d in (("input", src), ("calibrated", res.output)):
        apply_delta(str(d), str(v["source_base"]), tmp_path / f"applied-{name}")
        kl[name] = {k: _kl(tmp_path / f"applied-{name}", v["source_finetuned"], data[k]) for k in ("calib", "held")}
    # measured through apply (the stored, rounded parts) and an independent KL: lower on the calibration
    # texts, and not much higher on held-out texts of the same kind
    assert kl["calibrated"]["calib"] < kl["input"]["calib"], kl
    assert kl["calibrated"]["held"] < 1.1 * kl["input"]["held"], kl
    manifest = Delta.read(res.output).manifest
    record = manifest["calibration"]
    assert record["steps"] == steps and record["lr"] == 0.05
    assert record["sha256"] == cal.file_sha256(data["calib"])
    assert record["loss_before"] == res.loss_before and record["loss_after"] == res.loss_after
    assert set(record["tensors"]) == {n for n, e in manifest["tensors"].items() if e.get("compression")}


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_steps_rewrite_the_parts_bit_for_bit(models, data, tmp_path, family):
    v = models[family]
    src = _delta(v, tmp_path / "delta", "sign")
    res = cal.calibrate(src, v["source_base"], v["source_finetuned"], data["calib"], tmp_path / "cal", steps=0)
    assert res.loss_after == res.loss_before
    before, after = load_dir(src), load_dir(res.output)
    assert sorted(before) == sorted(after)
    for name in before:
        assert torch.equal(bits(before[name]), bits(after[name])), name
    with Delta.open(res.output) as d:  # every checksum verified
        assert d.manifest["checksums"] == Delta.read(src).manifest["checksums"]
    apply_delta(str(res.output), str(v["source_base"]), tmp_path / "applied")
    assert sorted((tmp_path / "applied").glob("*.safetensors"))


def test_trained_gains_change_only_the_scales_and_stay_valid(models, data, tmp_path):
    v = models["gpt2"]
    src = _delta(v, tmp_path / "delta", "int8")
    res = cal.calibrate(src, v["source_base"], v["source_finetuned"], data["calib"], tmp_path / "cal", steps=5, lr=0.05)
    before, after = load_dir(src), load_dir(res.output)
    changed = {n for n in before if not torch.equal(bits(before[n]), bits(after[n]))}
    assert changed and all(n.endswith("::scale") for n in changed), changed
    with Delta.open(res.output) as d:
        assert d.manifest["checksums"] != Delta.read(src).manifest["checksums"]


def _leftovers(out: Path) -> list[Path]:
    """What a run left beside ``out`` (temporary or scratch directories)."""
    return list(out.parent.iterdir()) if out.parent.exists() else []


def test_a_failed_run_leaves_nothing_at_the_output(models, data, tmp_path):
    v = models["llama"]
    src = _delta(v, tmp_path / "work" / "delta", "sign")
    out = tmp_path / "out" / "cal"

    def interrupted(*a: Any, **k: Any) -> None:
        raise KeyboardInterrupt

    def disk_gone(*a: Any, **k: Any) -> None:
        raise OSError(28, "No space left on device")

    # during training (the teacher's scratch file exists), and inside the delta's temporary directory
    cases = ((cal, "_train", interrupted, KeyboardInterrupt), (rewrite, "checksums", disk_gone, OutputError))
    for where, name, fn, error in cases:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(where, name, fn)
            with pytest.raises(error):
                cal.calibrate(src, v["source_base"], v["source_finetuned"], data["calib"], out, steps=3)
        assert not out.exists() and not _leftovers(out), _leftovers(out)


def test_a_delta_with_nothing_to_calibrate_is_refused(models, data, tmp_path, monkeypatch):
    v = models["llama"]
    monkeypatch.setitem(CODECS, "sign", dataclasses.replace(CODECS["sign"], gain=None))
    src = _delta(v, tmp_path / "delta", "sign")
    with pytest.raises(ConfigError, match="nothing to calibrate"):
        cal.calibrate(src, v["source_base"], v["source_finetuned"], data["calib"], tmp_path / "out", steps=1)
    dense = tmp_path / "dense"
    diff(str(v["source_base"]), str(v["source_finetuned"]), dense)
    with pytest.raises(ConfigError, match="no compressed tensor"):
        cal.calibrate(dense, v["source_base"], v["source_finetuned"], data["calib"], tmp_path / "out", steps=1)
    assert not (tmp_path / "out").exists()


def test_a_gain_hook_that_changes_a_part_s_shape_is_refused(models, data, tmp_path, monkeypatch):
    v = models["llama"]
    src = _delta(v, tmp_path / "delta", "sign")

    def wrong(parts: dict[str, np.ndarray], g: np.ndarray) -> dict[str, np.ndarray]:
        return {"scale": np.ones(2, dtype=np.float32)}

    monkeypatch.setitem(CODECS, "sign", dataclasses.replace(CODECS["sign"], gain=wrong, row_gain=False))
    with pytest.raises(ConfigError, match="keeps every tensor's dtype and shape"):
        cal.calibrate(src, v["source_base"], v["source_finetuned"], data["calib"], tmp_path / "out", steps=1)
    assert not (tmp_path / "out").exists()


def test_calibration_refuses_to_overwrite_an_input(models, data, tmp_path):
    v = models["llama"]
    src = _delta(v, tmp_path / "delta", "sign")
    with pytest.raises(OutputError):
        cal.calibrate(src, v["source_base"], v["source_finetuned"], data["calib"], src, steps=0, force=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_sensitivity_names_are_the_stored_two_dimensional_tensors(models, data, family):
    path = models[family]["source_finetuned"]
    found = cal.sensitivity(path, data["calib"], max_length=32)
    stored = {n: t for n, t in load_dir(path).items() if t.dim() == 2}
    assert set(found) == set(stored)
    assert all(math.isfinite(w) and w > 0 for w in found.values()), found


def test_sensitivity_is_the_mean_squared_gradient_per_text(models, data, tmp_path):
    path = models["llama"]["source_finetuned"]
    texts = _texts(tmp_path / "three.jsonl", 3, 7)
    found = cal.sensitivity(path, texts, max_length=32, batch_size=1)
    net = load_causal_lm(path, dtype=torch.float32).eval()
    tok = cal.load_tokenizer(path)
    name = "model.layers.0.mlp.up_proj.weight"
    param = dict(net.named_parameters())[name]
    acc = 0.0
    rows = [json.loads(line) for line in texts.read_text().splitlines()]
    for row in rows:
        ids = tok(row["prompt"])["input_ids"] + tok(row["completion"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([[*ids, tok.eos_token_id][:32]])
        net.zero_grad()
        net(input_ids=ids, labels=ids).loss.backward()
        acc += float(param.grad.double().square().mean())
    want = acc / len(rows)
    assert math.isclose(found[name], want, rel_tol=1e-6), (found[name], want)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty|no"),
        (b"not json\n", "not valid JSON"),
        (b'{"text": "w1 w2"}\n', "needs prompt/completion"),
        (b'{"prompt": "w1", "completion": 3}\n', "completion"),
        (b"[1, 2]\n", "expected an object"),
    ],
)
def test_hostile_calibration_files_are_data_errors(models, tmp_path, content, match):
    v = models["llama"]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    with pytest.raises(DataError, match=match):
        cal.sensitivity(v["source_finetuned"], bad)
    delta = _delta(v, tmp_path / "delta", "sign")
    with pytest.raises(DataError, match=match):
        cal.calibrate(delta, v["source_base"], v["source_finetuned"], bad, tmp_path / "out", steps=1)
    assert not (tmp_path / "out").exists()


def test_cli_diff_with_calibration_and_sensitivity(models, data, tmp_path, capsys):
    v = models["qwen2"]
    pair = ["--base", str(v["source_base"]), "--finetuned", str(v["source_finetuned"])]
    texts = ["--calibration", str(data["calib"])]
    out = tmp_path / "delta"
    rc = main(["diff", *pair, "-o", str(out), "--compress", "sign", *texts, "--steps", "5", "--lr", "0.01", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert "KL" in capsys.readouterr().out
    assert Delta.read(out).manifest["calibration"]["steps"] == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the scratch diff is gone
    weights = tmp_path / "w.json"
    rc = main(["calibrate", "--sensitivity", str(weights), "--model", str(v["source_finetuned"]), *texts])
    assert rc == 0, capsys.readouterr().err
    stored = {n for n, t in load_dir(v["source_finetuned"]).items() if t.dim() == 2}
    assert set(json.loads(weights.read_text())) == stored
    # the sensitivity file: never over an input, and an existing one only with --force
    before = weights.read_bytes()
    sens = ["calibrate", "--model", str(v["source_finetuned"]), *texts]
    assert main([*sens, "--sensitivity", str(weights)]) == 2 and "--force" in capsys.readouterr().err
    assert weights.read_bytes() == before
    calib = data["calib"].read_bytes()
    assert main([*sens, "--sensitivity", str(data["calib"]), "--force"]) == 2
    assert "overlaps input" in capsys.readouterr().err and data["calib"].read_bytes() == calib
    config = v["source_finetuned"] / "config.json"
    kept = config.read_bytes()
    assert main([*sens, "--sensitivity", str(config), "--force"]) == 2 and config.read_bytes() == kept
    capsys.readouterr()
    rc = main(["diff", *pair, "-o", str(tmp_path / "dense"), *texts])
    assert rc == 2 and "--compress" in capsys.readouterr().err
    rc = main(["calibrate", "--delta", str(out), *texts])
    assert rc == 2 and "missing: --source-base, --source-finetuned, -o/--output" in capsys.readouterr().err
