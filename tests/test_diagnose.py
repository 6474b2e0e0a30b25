"""`diagnose`: streamed geometry against a torch reference, the probe, --alpha auto, bad calibration data."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ftrecycle import DataError
from ftrecycle.cli import main
from ftrecycle.diagnose.geometry import geometry, module_type
from ftrecycle.diagnose.probe import calibration_batches, mean_loss, probe
from ftrecycle.diagnose.verdict import best_alpha, diagnose
from test_streaming import ARCH, CHILD, _trio

from conftest import load_dir
from fixtures.tiny import make_versions


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    rng = random.Random(0)
    rows = []
    for _ in range(40):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        rows.append({"question": f"{a} + {b} = ?", "answer": f"{a} + {b} = {a + b} . #### {a + b}"})
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli(command: str, v: dict[str, Path]) -> list[str]:
    """``ftrecycle COMMAND`` with the three models of a version trio."""
    return [
        command,
        "--source-base",
        str(v["source_base"]),
        "--source-finetuned",
        str(v["source_finetuned"]),
        "--target-base",
        str(v["target_base"]),
    ]


def _reference(a: Path, b: Path, c: Path) -> dict[str, float]:
    ta, tb, tc = (load_dir(p) for p in (a, b, c))
    names = [n for n in ta if n in tb and n in tc and ta[n].shape == tc[n].shape and ta[n].is_floating_point()]
    va = torch.cat([ta[n].double().flatten() for n in names])
    delta = torch.cat([(tb[n].double() - ta[n].double()).flatten() for n in names])
    drift = torch.cat([(tc[n].double() - ta[n].double()).flatten() for n in names])
    both = (delta != 0) & (drift != 0)
    return {
        "drift_rel": float(drift.norm() / va.norm()),
        "delta_rel": float(delta.norm() / va.norm()),
        "cos": float(delta @ drift / (delta.norm() * drift.norm())),
        "sign_agreement": int((both & (delta.sign() == drift.sign())).sum()) / int(both.sum()),
        "elements": va.numel(),
    }


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_geometry_matches_a_whole_tensor_reference(versions, family):
    v = versions[family]
    g = geometry(str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"]), per_tensor=True)
    ref = _reference(v["source_base"], v["source_finetuned"], v["target_base"])
    for key in ("drift_rel", "delta_rel", "cos", "sign_agreement"):
        assert g.total[key] == pytest.approx(ref[key], rel=1e-9), (key, g.total[key], ref[key])
    assert g.total["elements"] == ref["elements"]
    assert sum(m["elements"] for m in g.by_module.values()) == ref["elements"]
    assert sum(m["elements"] for m in g.by_layer.values()) == ref["elements"]
    assert not g.skipped
    assert module_type("model.layers.0.self_attn.q_proj.weight") == "attention"
    assert module_type("model.layers.3.mlp.down_proj.weight") == "mlp"
    assert module_type("model.norm.weight") == "norms"
    assert module_type("lm_head.weight") == "embeddings"


def test_geometry_lists_what_it_could_not_compare(tmp_path):
    v = make_versions("llama", tmp_path, target_vocab=112)
    g = geometry(str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"]))
    assert set(g.skipped) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert "shapes differ" in g.skipped["lm_head.weight"]


def test_probe_losses_are_the_models_losses(versions, calib):
    v = versions["llama"]
    pr = probe(str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"]), calib, alphas=(0.0, 1.0, 2.0))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(v["target_base"])
    batches = calibration_batches(calib, tok, max_examples=256, batch_size=16)

    def loss(path: Path) -> float:
        return mean_loss(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), batches)

    assert pr.loss_target == pytest.approx(loss(v["target_base"]), rel=1e-6)
    assert dict(pr.alphas)[0.0] == pytest.approx(pr.loss_target, rel=1e-6)
    assert dict(pr.path)[0.0] == pytest.approx(loss(v["source_base"]), rel=1e-6)
    assert dict(pr.path)[1.0] == pytest.approx(pr.loss_target, rel=1e-6)
    assert pr.best_alpha == min(pr.alphas, key=lambda p: p[1])[0]
    assert pr.loss_transfer == dict(pr.alphas)[1.0]
    assert pr.examples == 40


def test_diagnose_cli_json_and_verdict(versions, calib, capsys):
    v = versions["qwen2"]
    args = _cli("diagnose", v)
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] in ("likely helps", "uncertain", "likely hurts") and out["probe"] is None
    assert out["reasons"] and "cos(diff, drift)" in out["reasons"][0]
    assert main([*args, "--data", str(calib)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("verdict: **") and "| α | loss of C + αΔ |" in text and "barrier:" in text
    d = diagnose(str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"]), data=calib)
    change = (d.probe.loss_transfer - d.probe.loss_target) / d.probe.loss_target
    assert d.score == pytest.approx(-change)
    assert d.accuracy_gain is not None and d.accuracy_gain == d.probe.accuracy.gain  # calib has '#### N' answers


def test_alpha_auto_picks_by_the_probe_and_records_it(versions, calib, tmp_path, capsys):
    v = versions["llama"]
    args = [*_cli("transfer", v), "-q"]
    assert main([*args, "-o", str(tmp_path / "out"), "--alpha", "auto", "--calibration", str(calib)]) == 0
    err = capsys.readouterr().err
    chosen = float(err.split("alpha auto: ")[1].split()[0])
    # the calibration items carry '#### N' answers: auto chooses by the accuracy probe (ties by loss)
    pr = best_alpha(str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"]), calib)
    assert chosen == pr.best_alpha and pr.alpha_method == "accuracy" and "by accuracy" in err
    assert json.loads((tmp_path / "out" / "ftrecycle.json").read_text())["alpha"] == chosen
    assert main([*args, "-o", str(tmp_path / "o2"), "--alpha", "auto"]) == 2
    assert "needs --calibration" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_bad_calibration_data_is_one_clear_error(versions, tmp_path, capsys):
    v = versions["llama"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1 + 1 = ?", "answer": "2"}\nnot json\n')
    args = [*_cli("diagnose", v)]
    assert main([*args, "--data", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl" in err[0] and ":2" in err[0]
    assert main([*args, "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(DataError):
        probe(str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"]), bad)


@pytest.mark.slow
def test_geometry_memory_is_bounded_on_a_128256_x_4096_embedding(tmp_path):
    layout = [("model.embed_tokens.weight", (128256, 4096)), ("model.norm.weight", (4096,))]
    a, b, c = _trio(tmp_path, layout, **ARCH)
    trio = {"source_base": a, "source_finetuned": b, "target_base": c}
    cmd = [sys.executable, "-c", CHILD, *_cli("diagnose", trio), "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    peak_mib = int(p.stdout.split("VmHWM_KiB")[1].split()[0]) / 1024
    assert peak_mib < 512, f"peak RSS {peak_mib:.0f} MiB"
    assert json.loads(p.stdout.split("VmHWM_KiB")[0])["geometry"]["total"]["elements"] == 128256 * 4096 + 4096
