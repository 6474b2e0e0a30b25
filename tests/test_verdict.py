"""The calibrated verdict: its rules branch by branch, the accuracy probe against an independent evaluation,
``--alpha auto`` by accuracy, and (f)'s confusion table."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftrecycle.cli import main
from ftrecycle.diagnose import verdict as V
from ftrecycle.diagnose.accuracy import AccuracyProbe, answer_items, paired_stderr, summarize
from ftrecycle.diagnose.geometry import Geometry
from ftrecycle.diagnose.probe import Probe, probe
from ftrecycle.diagnose.verdict import best_alpha, combine, judge
from ftrecycle.errors import ConfigError
from ftrecycle.evaluate.builtin import evaluate_gsm8k
from ftrecycle.evaluate.gsm8k import extract_flexible
from ftrecycle.lab.signals import HARMFUL, confusion, confusion_by_seed, diagnostics_summary


def _geo(ratio: float | None = 3.0, cos: float = 0.0) -> Geometry:
    total = {"drift_over_delta": ratio, "cos": cos, "drift_rel": 0.1, "delta_rel": 0.05, "sign_agreement": 0.5}
    return Geometry(total, {}, {})


def _probe(loss_target: float, loss_transfer: float, acc: AccuracyProbe | None) -> Probe:
    return Probe([], 0.0, [(0.0, loss_target), (1.0, loss_transfer)], 1.0, loss_target, loss_transfer, 10, acc)


def _acc(gain: float, stderr: float) -> AccuracyProbe:
    return AccuracyProbe(64, 0.5, [(0.0, 0.5), (1.0, 0.5 + gain)], 1.0, gain, stderr, 0.0)


# ------------------------------------------------------------------------------------------- the rules


@pytest.mark.parametrize(
    ("loss", "accuracy", "gain", "geometry_helps", "expected"),
    [
        ("falls", "falls", -0.2, True, "likely hurts"),  # answers break though the loss falls
        ("rises", "flat", 0.0, True, "likely hurts"),
        ("rises", None, None, True, "likely hurts"),
        ("rises", "rises", 0.2, True, "uncertain"),  # the signals disagree
        ("flat", "rises", 0.2, True, "uncertain"),
        ("flat", None, None, True, "uncertain"),
        ("falls", None, None, True, "likely helps"),
        ("falls", None, None, False, "uncertain"),  # loss alone never beats the geometry
        ("falls", "flat", -V.ACC_HELP_FLOOR - 0.01, True, "uncertain"),  # a fall within the noise is not blessed
        ("falls", "flat", -V.ACC_HELP_FLOOR + 0.01, False, "likely helps"),
        ("falls", "flat", 0.0, False, "likely helps"),
        ("falls", "rises", 0.2, False, "likely helps"),
    ],
)
def test_combine_every_branch(loss, accuracy, gain, geometry_helps, expected):
    verdict, why = combine(loss, accuracy, gain, geometry_helps)
    assert verdict == expected and why


def test_accuracy_direction_uses_both_the_floor_and_the_noise():
    assert V.accuracy_direction(_acc(-V.ACC_HURT - 0.01, 0.0)) == "falls"
    assert V.accuracy_direction(_acc(-V.ACC_HURT + 0.01, 0.0)) == "flat"  # above the floor
    noisy = V.ACC_HURT * 2 / V.ACC_Z
    assert V.accuracy_direction(_acc(-V.ACC_HURT * 1.5, noisy)) == "flat"  # within ACC_Z standard errors
    assert V.accuracy_direction(_acc(V.ACC_HURT * 2.5, noisy)) == "rises"


def test_judge_reads_the_loss_change_and_the_probe():
    drop = 1 - V.HELP_LOSS - 0.01
    v, reasons, score = judge(_geo(1.0), _probe(1.0, drop, _acc(0.0, 0.05)))
    assert v == "likely helps" and score == pytest.approx(1 - drop)
    assert any("64 calibration items" in r for r in reasons)
    v, reasons, _ = judge(_geo(1.0), _probe(1.0, drop, _acc(-0.3, 0.05)))
    assert v == "likely hurts" and "accuracy probe falls clearly" in reasons[-1]
    v, _, _ = judge(_geo(1.0), _probe(1.0, 1.0 + V.HURT_LOSS + 0.01, None))
    assert v == "likely hurts"
    v, reasons, _ = judge(_geo(V.NEAR + 1), _probe(1.0, drop, None))
    assert v == "uncertain" and "no accuracy probe" in reasons[-1]
    v, _, _ = judge(_geo(V.NEAR - 0.5), _probe(1.0, drop, None))
    assert v == "likely helps"


def test_thresholds_and_both_scores_are_recorded():
    acc = _acc(0.1, 0.02)
    d = V.Diagnosis(_geo(), _probe(1.0, 0.9, acc), "likely helps", ["r"], 0.1, acc.gain)
    out = d.to_json()
    assert out["thresholds"] == V.thresholds()
    assert out["thresholds"]["acc_z"] == V.ACC_Z and out["thresholds"]["help_loss"] == V.HELP_LOSS
    assert out["score"] == 0.1 and out["accuracy_gain"] == 0.1
    assert out["probe"]["accuracy"]["stderr"] == 0.02
    text = V.format_diagnosis(d)
    assert "scores: loss +10.0 % (calibration loss drop at α = 1); accuracy gain +10.0 ± 2.0 points on 64 items" in text
    assert out["scores"] == {"loss": 0.1, "accuracy": 0.1, "geometry": None}


def test_each_score_keeps_its_meaning_in_every_mode():
    geo = _geo()
    assert V.judge(geo, None)[2] is None  # no data: no loss score, and no other signal in its place
    assert V.judge(geo, _probe(1.0, 0.9, None))[2] == pytest.approx(0.1)


def test_the_best_alpha_at_the_edge_of_the_grid_is_named():
    pr = _probe(1.0, 0.9, None)
    grid = sorted(a for a, _ in pr.alphas)
    at_edge = V.edge_of_grid(dataclasses.replace(pr, best_alpha=grid[-1]))
    assert at_edge is not None and "largest" in at_edge and "--alphas" in at_edge
    assert V.edge_of_grid(dataclasses.replace(pr, best_alpha=grid[0])) is not None
    inner = [a for a in grid if a not in (grid[0], grid[-1])]
    if inner:
        assert V.edge_of_grid(dataclasses.replace(pr, best_alpha=inner[0])) is None


def test_paired_stderr_is_the_sd_of_the_differences():
    before = [True, True, False, False, True]
    after = [True, False, True, True, True]
    d = [0, -1, 1, 1, 0]
    mean = sum(d) / 5
    assert paired_stderr(before, after) == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in d) / 4 / 5))
    assert paired_stderr(before, before) == 0.0 and paired_stderr([True], [False]) == 0.0
    s = summarize(before, {0.0: before, 1.0: after}, 1.0, 0.0)
    assert s.target == pytest.approx(0.6) and s.transfer == pytest.approx(0.8) and s.gain == pytest.approx(0.2)


def test_answer_items_keeps_only_items_with_answers(tmp_path):
    f = tmp_path / "mixed.jsonl"
    rows = [
        {"prompt": "p", "completion": "c"},
        {"question": "1 + 1 = ?", "answer": "1 + 1 = 2 . #### 2"},
        {"question": "2 + 2 = ?", "answer": "4"},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert answer_items(f, 64) == [{"question": "1 + 1 = ?", "answer": "1 + 1 = 2 . #### 2"}]
    assert answer_items(f, 0) == []


# ----------------------------------------------------------------------------- the probe on a tiny model


def _float32(path: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _correct(model: Any, tok: Any, items: list[dict[str, str]]) -> list[bool]:
    return [s.flexible_correct for s in evaluate_gsm8k(model, tok, items, max_gen_toks=8).items]


@pytest.fixture(scope="module")
def answered(versions, tmp_path_factory) -> tuple[Path, list[dict[str, str]]]:
    """GSM8K items half of which C answers right: their answers are what C itself generates."""
    v = versions["llama"]
    tok = AutoTokenizer.from_pretrained(v["target_base"])
    items = [{"question": f"{a} + {a + 1} = ?", "answer": f"#### {2 * a + 1}"} for a in range(12)]
    gens = evaluate_gsm8k(_float32(v["target_base"]), tok, items, max_gen_toks=8).items
    for k, g in enumerate(gens[::2]):
        got = extract_flexible(g.generation)
        if got != "[invalid]":
            items[2 * k]["answer"] = f"#### {got}"
    path = tmp_path_factory.mktemp("answered") / "calib.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path, items


def test_accuracy_probe_matches_an_independent_evaluation(versions, answered):
    v = versions["llama"]
    path, items = answered
    a, b, c = (str(v[k]) for k in ("source_base", "source_finetuned", "target_base"))
    pr = probe(a, b, c, path, alphas=(0.0, 1.0), path=(), probe_items=10, max_new_tokens=8)
    tok = AutoTokenizer.from_pretrained(c)
    ref_c = _correct(_float32(c), tok, items[:10])
    sa, sb, model = _float32(a).state_dict(), _float32(b).state_dict(), _float32(c)
    model.load_state_dict({k: t + (sb[k] - sa[k]) for k, t in model.state_dict().items()})
    ref_t = _correct(model, tok, items[:10])
    assert pr.accuracy is not None and pr.accuracy.items == 10
    assert sum(ref_c) > 0, "the fixture's items should give C some right answers"
    assert pr.accuracy.target == pytest.approx(sum(ref_c) / 10)
    assert pr.accuracy.transfer == pytest.approx(sum(ref_t) / 10)
    assert pr.accuracy.stderr == pytest.approx(paired_stderr(ref_c, ref_t))
    assert pr.alpha_method == "loss" and pr.best_alpha == min(pr.alphas, key=lambda p: p[1])[0]
    no_probe = probe(a, b, c, path, alphas=(0.0, 1.0), path=(), probe_items=0)
    assert no_probe.accuracy is None and no_probe.loss_target == pytest.approx(pr.loss_target)


def test_alpha_auto_chooses_by_accuracy_with_answers(versions, answered):
    v = versions["llama"]
    path, _ = answered
    a, b, c = (str(v[k]) for k in ("source_base", "source_finetuned", "target_base"))
    pr = best_alpha(a, b, c, path, probe_items=10, max_new_tokens=8)
    assert pr.alpha_method == "accuracy" and pr.accuracy is not None
    by_acc = dict(pr.accuracy.by_alpha)
    loss = dict(pr.alphas)
    candidates = sorted(pr.alphas, key=lambda p: p[1])[:3]
    assert set(by_acc) == {0.0, *(al for al, _ in candidates)}
    best = max((al for al, _ in candidates), key=lambda al: (by_acc[al], -loss[al]))
    assert pr.best_alpha == best and pr.accuracy.alpha == best


def test_diagnose_cli_names_both_scores(versions, answered, capsys):
    v = versions["llama"]
    path, _ = answered
    args = [
        "diagnose",
        *[f"--{k.replace('_', '-')}={v[k]}" for k in ("source_base", "source_finetuned", "target_base")],
    ]
    assert main([*args, "--data", str(path), "--probe-items", "6", "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "score" in out and out["accuracy_gain"] is not None and out["probe"]["accuracy"]["items"] == 6
    assert out["thresholds"] == V.thresholds()
    png = path.parent / "diag.png"
    grid = ["--alphas", "0,0.5,1,2", "--plot", str(png)]
    assert main([*args, "--data", str(path), "--probe-items", "6", "--max-new-tokens", "8", *grid]) == 0
    text = capsys.readouterr().out
    assert "| 2 |" in text and png.stat().st_size > 0  # the grid as given, the plot (with its α-loss curve) written
    assert "scores: loss " in text and "accuracy gain" in text and "| α | accuracy of C + αΔ" in text
    assert "geometry " in text and "(minus drift / diff)" in text
    for bad in ("1", "0,x", "0,1,1", "0,nan"):
        assert main([*args, "--data", str(path), "--alphas", bad]) == 2
        assert "--alphas" in capsys.readouterr().err
    assert main([*args, "--probe-items", "6"]) == 2
    assert "needs --calibration" in capsys.readouterr().err


# -------------------------------------------------------------------------------- (f)'s confusion table


def test_confusion_table_counts_agreement_and_harmful_helps():
    c = confusion([("likely helps", 3.0), ("likely helps", HARMFUL), ("likely hurts", -1.0), ("uncertain", 2.0)])
    assert c["table"]["likely helps"] == {"gain > 0": 1, "gain ≤ 0": 1, "harmful": 1}
    assert c["table"]["uncertain"] == {"gain > 0": 1, "gain ≤ 0": 0, "harmful": 0}
    assert c["agree"] == 2 and c["pairs"] == 4 and c["harmful_called_helps"] == 1
    assert confusion([("likely hurts", 0.0)])["agree"] == 1  # a gain of 0 is "gain ≤ 0"


def _seed_record(verdicts: dict[tuple[str, str], str], gains: dict[tuple[str, str], float]) -> dict[str, Any]:
    versions = ("M1", "M2", "M3", "M4", "M5")
    diag = {
        j: {
            i: {
                "verdict": verdicts.get((i, j), "uncertain"),
                "score": 0.1,
                "drift_over_delta": 2.0,
                "cos": 0.0,
                "barrier": 0.0,
                "best_alpha": 1.0,
                "accuracy_gain": gains.get((i, j), 0.0) / 100,
            }
            for i in versions
            if i != j
        }
        for j in versions
    }
    transfer = {j: {i: 50.0 + gains.get((i, j), 0.0) for i in versions if i != j} for j in versions}
    return {
        "diagnostics": diag,
        "transfer": transfer,
        "base": {j: 50.0 for j in versions},
        "alpha_auto": {"M5+Δ4": {"alpha": 1.0, "accuracy": 51.0, "accuracy_alpha_1": 50.0}},
    }


def test_confusion_by_seed_and_overall_from_a_synthetic_results_dict():
    s0 = _seed_record(
        {("M4", "M5"): "likely helps", ("M2", "M4"): "likely helps"}, {("M4", "M5"): 6.0, ("M2", "M4"): -8.0}
    )
    s1 = _seed_record({("M1", "M2"): "likely hurts"}, {("M1", "M2"): -2.0, ("M4", "M5"): 1.0})
    out = confusion_by_seed({"0": s0, "1": s1})
    assert out["per_seed"]["0"]["harmful_called_helps"] == 1 and out["per_seed"]["0"]["agree"] == 1
    assert out["per_seed"]["1"]["agree"] == 1 and out["per_seed"]["1"]["table"]["uncertain"]["gain > 0"] == 1
    assert out["overall"]["pairs"] == 40 and out["overall"]["agree"] == 2
    assert out["overall"]["harmful_called_helps"] == 1
    summary = diagnostics_summary(s0, {"0": s0, "1": s1})
    assert summary["confusion"] == out
    assert summary["spearman"]["accuracy"] is not None  # the accuracy signal is ranked beside the others


def test_diagnose_takes_a_lora_adapter_as_transfer_does(tmp_path, capsys):
    from test_compress import _lora

    p = _lora("llama", tmp_path)
    via_adapter = V.diagnose(str(p["base"]), str(p["adapter"]), str(p["target"]))
    via_merged = V.diagnose(str(p["base"]), str(p["merged"]), str(p["target"]))  # PEFT's own merge
    for key in ("drift_over_delta", "cos", "delta_rel"):
        assert via_adapter.geometry.total[key] == pytest.approx(via_merged.geometry.total[key], rel=1e-4), key
    assert via_adapter.geometry.total["delta_rel"] > 0
    assert not list(Path(tempfile.gettempdir()).glob("ftrecycle-diagnose-*"))  # the merged copy is removed
    args = [f"--source-base={p['base']}", f"--source-finetuned={p['adapter']}", f"--target-base={p['target']}"]
    assert main(["diagnose", *args]) == 0 and "verdict" in capsys.readouterr().out


def test_a_handful_of_probe_items_is_never_evidence():
    few = AccuracyProbe(1, 1.0, [(0.0, 1.0), (1.0, 0.0)], 1.0, -1.0, 0.0, 0.0)  # one item, flipped: stderr 0
    assert V.accuracy_direction(few) == "flat"
    many = AccuracyProbe(64, 0.5, [(0.0, 0.5), (1.0, 0.2)], 1.0, -0.3, 0.05, 0.0)
    assert V.accuracy_direction(many) == "falls"


def test_alpha_auto_with_a_mask_is_refused():
    with pytest.raises(ConfigError, match="--alpha auto with --mask"):
        V.check_alpha_request("auto", "calib.jsonl", mask="m.safetensors")
