"""The lab: its world, its job runner, its findings, and the whole pipeline on the smoke preset."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ftrecycle import ConfigError
from ftrecycle.cli import main
from ftrecycle.lab import preset, run_lab, world
from ftrecycle.lab.aggregate import combine
from ftrecycle.lab.experiments import COMPRESSIONS, pairs, seed_jobs
from ftrecycle.lab.findings import (
    across_seeds,
    all_findings,
    compression,
    convergence,
    grouping,
    iterative,
    pct_of_ft_score,
    pct_of_gain,
    recovery,
    transfer_measures,
)
from ftrecycle.lab.report import design_targets, plots, render
from ftrecycle.lab.run import JOB_KINDS, job_kind, rebuild_report, timing
from ftrecycle.lab.scheduler import Job, JobFailed, job_seconds, run_jobs, time_file
from ftrecycle.lab.signals import spearman
from ftrecycle.lab.sizes import (
    gain_recovered_pct,
    lr_ratios,
    noise_points,
    share_pct,
    sizes_entry,
    sweep_of_means,
    sweep_pair,
)

V = ("M1", "M2", "M3", "M4", "M5")


# --- the world -------------------------------------------------------------------------------------------


def _check_solution(answer: str) -> int:
    """Recompute every ``a op b = c`` step of an SFT answer; return the final value."""
    steps = re.findall(r"(\d+) ([+*-]) (\d+) = (\d+)", answer)
    assert steps, answer
    prev = None
    for a, op, b, c in steps:
        a, b, c = int(a), int(b), int(c)
        assert c == (a + b if op == "+" else a - b if op == "-" else a * b), answer
        assert prev is None or a == prev, f"a step does not start from the previous result: {answer}"
        prev = c
    final = int(answer.split("#### ")[1])
    assert final == prev
    return final


def test_problems_are_correct_and_in_range():
    rng = random.Random(3)
    for item in world.sft_items(rng, 300):
        final = _check_solution(item["answer"])
        assert 0 <= final <= world.MAX_NUMBER
        start = int(item["question"].split(" has ")[1].split()[0])
        assert item["answer"].startswith(f"{start} ")


def _solve(question: str) -> int:
    """Answer a problem from its text alone: follow the asked person's amount through the sentences."""
    sentences = [t.strip() for t in question.split(" . ")]
    asked = sentences[-1].split(" does ")[1].split()[0]
    amount: dict[str, int] = {}
    last = ""
    for t in sentences[:-1]:
        words = t.rstrip(" .").split()
        who = words[1] if words[0] == "then" else words[0]
        who = last if who in ("he", "she") else who
        last = who if who not in ("he", "she") else last
        if words[1] == "has":
            amount[who] = int(words[2])
        elif "doubles" in words:
            amount[who] *= 2
        else:
            n = next(int(w) for w in words if w.isdigit())
            amount[who] += n if "more" in words else -n
    return amount[asked]


def test_problems_are_solvable_from_their_text_with_distractors():
    items = world.sft_items(random.Random(5), 400)
    # the asked person's amount, not the other's, is the answer; some problems have a second person
    assert all(_solve(i["question"]) == _check_solution(i["answer"]) for i in items)
    with_other = [i for i in items if i["question"].count(" has ") == 2]
    assert 0.3 < len(with_other) / len(items) < 0.7
    lengths = {len(re.findall(r" = ", i["answer"])) for i in items}
    assert lengths == set(world.TASK_STEPS)


def test_distractor_steps_told_in_between_keep_problems_solvable(monkeypatch):
    # the shipped setting gives the second person only an amount; their own steps, interleaved, must
    # still leave the asked person's answer recoverable from the text
    monkeypatch.setattr(world, "DISTRACTOR_STEPS", (1, 2))
    items = world.sft_items(random.Random(9), 300)
    assert all(_solve(i["question"]) == _check_solution(i["answer"]) for i in items)
    assert sum(i["question"].count("more") + i["question"].count(" away ") for i in items) > 300


def test_tokenizer_covers_every_generated_text_without_unknowns():
    tok = world.tokenizer()
    rng = random.Random(0)
    texts = [next(world.documents(rng, mix)) for mix in (world.STAGE1, world.STAGE2) for _ in range(300)]
    texts += [f"{i['question']} {i['answer']}" for i in world.sft_items(rng, 200)]
    texts += [f"{i['question']} {i['answer']}" for i in world.sft_items(rng, 200, language=True)]
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, t
        assert tok.decode(ids) == " ".join(t.split())  # numbers are single tokens; decoding round-trips
    assert len(tok) == len(set(world.vocabulary()))


def test_second_language_is_a_bijection_that_keeps_numbers_and_format():
    table = world.cipher()
    assert len(set(table.values())) == len(table)
    assert not set(table.values()) & (set(world.english_words()) - {".", ",", "?"})
    item = world.sft_items(random.Random(1), 1, language=True)[0]
    _check_solution(item["answer"])  # the arithmetic and "#### N" survive translation
    assert "has" not in item["question"].split()


# --- the job runner ---------------------------------------------------------------------------------------

CALLS: list[str] = []


def _job(name: str, value: int) -> dict[str, Any]:
    CALLS.append(name)
    return {"value": value}


def _job_on_file(name: str, path: str) -> dict[str, Any]:
    CALLS.append(name)
    return {"chars": len(Path(path).read_text())}


def _boom() -> dict[str, Any]:
    raise ConfigError("bad thing in job")


def test_jobs_run_in_dependency_order_and_are_cached(tmp_path):
    CALLS.clear()
    jobs = [
        Job("c", _job, {"name": "c", "value": 3}, ("a", "b")),
        Job("b", _job, {"name": "b", "value": 2}, ("a",)),
        Job("a", _job, {"name": "a", "value": 1}),
    ]
    res = run_jobs(jobs, tmp_path / "cache")
    assert CALLS == ["a", "b", "c"]
    assert {k: v["value"] for k, v in res.items()} == {"a": 1, "b": 2, "c": 3}
    CALLS.clear()
    again = run_jobs(jobs, tmp_path / "cache")
    assert CALLS == [] and again == res


def test_job_keys_name_no_absolute_path_and_old_absolute_keys_still_match(tmp_path):
    run = tmp_path / "run"
    data = run / "seed-0" / "data.txt"
    data.parent.mkdir(parents=True)
    data.write_text("x")
    jobs = [Job("a", _job_on_file, {"name": "a", "path": str(data)})]
    run_jobs(jobs, run / "jobs")
    recorded = (run / "jobs" / "a.key.json").read_text()
    assert str(tmp_path) not in recorded and "seed-0/data.txt" in recorded
    # a key written by an earlier version, with the absolute path, is the same key: the result is reused
    (run / "jobs" / "a.key.json").write_text(recorded.replace("seed-0/data.txt", str(data)).replace("../", ""))
    CALLS.clear()
    run_jobs(jobs, run / "jobs")
    assert CALLS == []
    data.write_text("y")  # another input: the cached result is refused as stale
    with pytest.raises(ConfigError, match="computed from other inputs"):
        run_jobs(jobs, run / "jobs")


def test_job_runner_refuses_cycles_and_names_a_failing_job(tmp_path):
    with pytest.raises(ConfigError, match="cycle"):
        run_jobs(
            [Job("a", _job, {"name": "a", "value": 1}, ("b",)), Job("b", _job, {"name": "b", "value": 1}, ("a",))],
            tmp_path / "c1",
        )
    with pytest.raises(ConfigError, match="unknown"):
        run_jobs([Job("a", _job, {"name": "a", "value": 1}, ("zz",))], tmp_path / "c2")
    with pytest.raises(JobFailed, match="lab job bad failed: bad thing"):
        run_jobs([Job("ok", _job, {"name": "ok", "value": 1}), Job("bad", _boom, {}, ("ok",))], tmp_path / "c3")
    assert (tmp_path / "c3" / "ok.json").is_file() and not (tmp_path / "c3" / "bad.json").exists()


def _sleep(seconds: float) -> dict[str, Any]:
    time.sleep(seconds)
    return {}


def test_a_failing_job_stops_the_other_workers_at_once(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(JobFailed, match="bad"):
        run_jobs([Job("slow", _sleep, {"seconds": 60}), Job("bad", _boom, {})], tmp_path / "c", workers=2, threads=1)
    assert time.perf_counter() - t0 < 30  # did not wait for the 60 s job
    assert not (tmp_path / "c" / "slow.json").exists()


def test_job_runner_with_worker_processes(tmp_path):
    jobs = [Job(f"j{i}", _job, {"name": f"j{i}", "value": i}, (f"j{i - 1}",) if i % 2 else ()) for i in range(4)]
    res = run_jobs(jobs, tmp_path / "cache", workers=2, threads=1)
    assert {k: v["value"] for k, v in res.items()} == {f"j{i}": i for i in range(4)}
    with pytest.raises(JobFailed, match="bad"):
        run_jobs([Job("bad", _boom, {})], tmp_path / "c2", workers=2, threads=1)


def test_the_scheduler_records_each_jobs_wall_time_and_a_cached_job_keeps_it(tmp_path):
    jobs = [Job("slow", _sleep, {"seconds": 0.3}), Job("fast", _job, {"name": "f", "value": 1}, ("slow",))]
    run_jobs(jobs, tmp_path / "cache")
    first = job_seconds(jobs, tmp_path / "cache")
    assert first["slow"] is not None and 0.3 <= first["slow"] < 5, first
    assert first["fast"] is not None and first["fast"] < first["slow"], first
    run_jobs(jobs, tmp_path / "cache")  # from the cache: the times are those of the first run
    assert job_seconds(jobs, tmp_path / "cache") == first
    time_file(tmp_path / "cache", "fast").unlink()  # a result cached before times were kept
    assert job_seconds(jobs, tmp_path / "cache")["fast"] is None


def test_the_scheduler_times_jobs_in_worker_processes(tmp_path):
    jobs = [Job("a", _sleep, {"seconds": 0.3}), Job("b", _sleep, {"seconds": 0.0})]
    run_jobs(jobs, tmp_path / "cache", workers=2, threads=1)
    secs = job_seconds(jobs, tmp_path / "cache")
    # timed around the call in the worker: the worker's start-up (seconds, with torch) is not in it
    assert secs["a"] is not None and 0.3 <= secs["a"] < 2, secs
    assert secs["b"] is not None and secs["b"] < 0.3, secs


def test_job_kinds_from_ids():
    kinds = {
        "s0:pretrain": "pretrain",
        "s1:ft-M3": "direct fine-tune",
        "s0:ft-M5+d4": "recycling fine-tune",
        "s0:iterative": "iterative",
        "s2:M5+d4": "transfer+score",
        "s0:M4+d5@lowrank:ratio=8": "compressed",
        "s1:M4+d5@mask64maj": "masked (i)",
        "s0:diag-M2+d1": "diagnose",
        "s0:M5+d4auto": "auto-alpha",
        "s0:lang-ft-M4": "language",
        "s0:lang-eval-ft-M5": "language",
        "s0:ft-M5+dlang": "language",
        "s0:ft-M4@lr0.2": "Δ-size sweep",
        "s1:M5+d4@lr5": "Δ-size sweep",
        "s0:M4+d5@lr0.2@lowrank:ratio=8": "Δ-size sweep",
        "s0:sizes": "update sizes",
        "s0:something-new": "other",
    }
    assert {k: job_kind(k) for k in kinds} == kinds
    assert {k for k, _ in JOB_KINDS} == set(kinds.values())


def test_timing_sums_job_seconds_and_fine_tuning_splits_by_kind():
    seconds = {"s0:pretrain": 10.0, "s0:ft-M1": 4.0, "s1:ft-M1": 6.0, "s0:ft-M2+d1": 3.0, "s0:M2+d1": 1.0,
               "s0:iterative": 5.0, "s0:diag-M2+d1": None}  # fmt: skip
    results = {
        "s0:ft-M1": {"train_s": 2.0, "eval_s": 1.5, "setup_s": 0.5},
        "s1:ft-M1": {"train_s": 3.0, "eval_s": 2.0, "setup_s": 1.0},
        "s0:ft-M2+d1": {"train_s": None, "eval_s": None, "setup_s": None},  # its model was already written
        "s0:iterative": {"eval_s": 2.5},
    }
    t = timing(seconds, results, wall_s=20.0, workers=2)
    assert t["job_s"] == 29.0 and t["untimed_jobs"] == 1 and t["wall_s"] == 20.0 and t["workers"] == 2
    by = t["by_kind"]
    kinds = ["pretrain", "direct fine-tune", "recycling fine-tune", "iterative", "transfer+score", "diagnose"]
    assert list(by) == kinds  # in the lab's order of kinds, only those with jobs
    assert by["direct fine-tune"] == {"jobs": 2, "seconds": 10.0, "share_pct": round(1000 / 29, 1),
                                      "train_s": 5.0, "eval_s": 3.5, "setup_s": 1.5}  # fmt: skip
    assert by["recycling fine-tune"]["train_s"] is None and by["recycling fine-tune"]["jobs"] == 1
    assert by["iterative"]["eval_s"] == 2.5 and by["iterative"]["train_s"] is None
    assert by["diagnose"] == {"jobs": 1, "seconds": 0.0, "share_pct": 0.0, "train_s": None, "eval_s": None,
                              "setup_s": None}  # fmt: skip
    assert timing({}, {}, wall_s=0.0, workers=1)["by_kind"] == {}


# --- the findings, on hand-made numbers -------------------------------------------------------------------


def _numbers(*, m5_plus_d4: float = 60.0, cross: float = 5.0, recycled_gap: float = 3.0, iter_ft: float = 70.0):
    """A results record shaped like one seed's, with chosen values."""
    base = {"M1": 10.0, "M2": 12.0, "M3": 15.0, "M4": 30.0, "M5": 32.0}
    final = {"M1": 40.0, "M2": 45.0, "M3": 50.0, "M4": 70.0, "M5": 72.0}
    steps = [0, 100, 200, 300]

    def curve(start: float, end: float) -> list[list[float]]:
        return [[s, round(start + (end - start) * s / steps[-1], 1)] for s in steps]

    transfer = {j: {i: (base[j] + 20.0 if (i in V[:3]) == (j in V[:3]) else cross) for i in V if i != j} for j in V}
    transfer["M5"]["M4"] = m5_plus_d4
    direct = {v: {"final": final[v], "curve": curve(base[v], final[v])} for v in V}
    # recycled: Mj + Δi at step 0, then flat at FT(Mj)'s final accuracy + recycled_gap
    recycle = {
        j: {
            i: {
                "final": final[j] + recycled_gap,
                "curve": [[s, final[j] + recycled_gap if s else transfer[j][i]] for s in steps],
            }
            for i in V
            if i != j
        }
        for j in V
    }
    its = {v: {"iter_ft": iter_ft, "dir_ft": 70.0} for v in ("M3", "M4", "M5")}
    return {"base": base, "transfer": transfer, "direct_ft": direct, "recycle_ft": recycle, "iterative": its}


def test_finding_1_threshold_is_80_percent_of_the_gain():
    # M5: base 32, FT 72 -> gain 40; 80 % is 64
    assert recovery(_numbers(m5_plus_d4=64.0))["passed"] is False  # M4+Δ5 = 50 recovers 50 %
    nums = _numbers(m5_plus_d4=64.0)
    nums["transfer"]["M4"]["M5"] = 62.0  # 32 of 40 = 80 %
    assert recovery(nums)["passed"] is True
    nums["transfer"]["M5"]["M4"] = 63.9
    assert recovery(nums)["passed"] is False


def test_finding_2_needs_a_harmful_cross_transfer_and_a_2x_ratio():
    assert grouping(_numbers(cross=5.0))["passed"] is True  # cross transfers sit below every target
    f = grouping(_numbers(cross=40.0))  # above every target: gains across exceed half of those within
    assert f["passed"] is False and f["numbers"]["cross_pairs_below_target"] == 0


def test_finding_3_and_4_are_computed_from_the_curves():
    assert convergence(_numbers(), ft_steps=300)["passed"] is True
    slow = _numbers(recycled_gap=-5.0)
    f = convergence(slow, ft_steps=300)
    assert f["passed"] is False and f["numbers"]["held"] < f["numbers"]["comparisons"]
    assert iterative(_numbers(iter_ft=69.0))["passed"] is True
    assert iterative(_numbers(iter_ft=68.9))["passed"] is False


def test_finding_5_needs_8x_smaller_and_at_most_1_point_lost():
    nums = _numbers()  # full Δ: M5+Δ4 = 60, M4+Δ5 = 50

    def comp(ratio: float, acc5: float, acc4: float) -> dict[str, Any]:
        return {
            "M5+Δ4": {"accuracy": acc5, "ratio": ratio, "median_error": 0.5},
            "M4+Δ5": {"accuracy": acc4, "ratio": ratio + 0.1, "median_error": 0.5},
        }

    nums["compressed"] = {"int8": comp(2.0, 60.0, 50.0), "sign": comp(16.0, 59.0, 49.5)}
    f = compression(nums)
    assert f["passed"] is True and f["numbers"]["best"]["spec"] == "sign"
    nums["compressed"]["sign"] = comp(16.0, 58.9, 50.0)  # 1.1 points lost on one pair
    assert compression(nums)["passed"] is False
    nums["compressed"]["sign"] = comp(7.9, 60.0, 50.0)  # not 8x smaller
    assert compression(nums)["passed"] is False


def test_field_measures_never_divide_by_a_missing_gain():
    assert pct_of_gain(30.0, 50.0, 70.0) == 50.0
    assert pct_of_gain(30.0, 20.0, 70.0) == -25.0  # the transfer hurt: a negative share
    assert pct_of_gain(30.0, 50.0, 30.0) is None  # fine-tuning gained nothing
    assert pct_of_gain(30.0, 50.0, 25.0) is None  # fine-tuning lost: no gain to recover
    assert pct_of_ft_score(35.0, 70.0) == 50.0 and pct_of_ft_score(0.0, 0.0) is None


def test_transfer_measures_by_pair_and_group():
    nums = _numbers()  # M5: base 32, FT 72, M5+Δ4 = 60; M4: base 30, FT 70, M4+Δ5 = 50
    got = transfer_measures(nums)
    assert got["pairs"]["M5+Δ4"] == {"source": "M4", "target": "M5", "ft_score_pct": 83.3, "gain_recovered_pct": 70.0}
    assert got["pairs"]["M4+Δ5"]["gain_recovered_pct"] == 50.0 and got["pairs"]["M4+Δ5"]["ft_score_pct"] == 71.4
    st2 = got["summary"]["stage2"]
    assert st2 == {"ft_score_pct": 77.4, "gain_recovered_pct": 60.0, "pairs": 2, "gain_defined": 2}
    # cross-stage transfers land at 5, below every target: every share of gain is negative
    across = got["summary"]["across"]
    assert across["pairs"] == 12 and across["gain_recovered_pct"] < 0
    assert got["summary"]["within"]["pairs"] == 8
    nums["direct_ft"]["M4"]["final"] = 30.0  # FT(M4) = M4: that pair's share is undefined, left out of the mean
    st2 = transfer_measures(nums)["summary"]["stage2"]
    assert st2["gain_defined"] == 1 and st2["gain_recovered_pct"] == 70.0
    assert recovery(nums)["numbers"]["pairs"][1]["ft_score_pct"] == round(100 * 50 / 30, 1)


def test_findings_across_seeds_count_passes_and_give_mean_and_range():
    good, bad = _numbers(m5_plus_d4=68.0), _numbers(m5_plus_d4=40.0)
    for n in (good, bad):
        n["transfer"]["M4"]["M5"] = 66.0  # 36 of 40 = 90 %
    seeds = [[recovery(good), iterative(_numbers(iter_ft=71.0))], [recovery(bad), iterative(_numbers(iter_ft=60.0))]]
    got = across_seeds(seeds)
    assert got["1"]["passed"] == 1 and got["1"]["seeds"] == 2
    key = got["1"]["key"]["M5+Δ4 % of gain"]  # (68 − 32) / 40 = 90 %, (40 − 32) / 40 = 20 %
    assert key == {"mean": 55.0, "min": 20.0, "max": 90.0, "seeds": 2, "per_seed": [90.0, 20.0]}
    assert got["4"]["passed"] == 1 and got["4"]["key"]["iterative − direct"] == {
        "mean": -4.5, "min": -10.0, "max": 1.0, "seeds": 2, "per_seed": [1.0, -10.0]}  # fmt: skip
    undefined = _numbers()
    undefined["direct_ft"]["M5"]["final"] = 20.0  # below M5's 32: no gain, so no share of it in this seed
    got = across_seeds([[recovery(good)], [recovery(undefined)]])["1"]["key"]["M5+Δ4 % of gain"]
    assert got == {"mean": 90.0, "min": 90.0, "max": 90.0, "seeds": 1, "per_seed": [90.0, None]}


def test_spearman_matches_scipy_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")  # installed with lm-eval's dependencies
    rng = random.Random(5)
    for _ in range(20):
        x = [rng.choice([0.0, 1.0, 2.5, rng.random()]) for _ in range(12)]
        y = [rng.random() for _ in range(12)]
        assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1.0, 1.0], [1.0, 2.0]) is None


def test_seed_mean_and_spread():
    a, b = {"x": 1.0, "c": [[0, 10.0], [5, 20.0]]}, {"x": 3.0, "c": [[0, 30.0], [5, 40.0]]}
    assert combine([a, b], "mean") == {"x": 2.0, "c": [[0, 20.0], [5, 30.0]]}
    assert combine([a, b], "spread") == {"x": 2.0, "c": [[0, 20.0], [5, 20.0]]}


def test_seed_mean_of_a_share_undefined_in_one_seed_is_none():
    assert combine([{"r": 50.0}, {"r": None}], "mean") == {"r": None}
    assert combine([{"r": None}, {"r": 50.0}], "spread") == {"r": None}


# --- update sizes and experiment (h), on hand-made numbers ------------------------------------------------


def test_gain_recovered_and_share_of_ft():
    assert gain_recovered_pct(transfer=50.0, base=20.0, finetuned=80.0) == 50.0
    assert gain_recovered_pct(transfer=10.0, base=20.0, finetuned=80.0) == pytest.approx(-16.7)  # worse than base
    assert gain_recovered_pct(transfer=90.0, base=20.0, finetuned=80.0) == pytest.approx(116.7)  # beyond FT
    assert gain_recovered_pct(transfer=50.0, base=20.0, finetuned=20.0) is None  # no gain: no share of it
    assert gain_recovered_pct(transfer=50.0, base=20.0, finetuned=15.0) is None  # fine-tuning lost
    # a gain within two binomial standard errors of the base is test noise: no share of it
    assert noise_points(50.0, 400) == pytest.approx(5.0)
    assert gain_recovered_pct(transfer=45.0, base=46.2, finetuned=47.5, floor=noise_points(46.2, 400)) is None
    assert gain_recovered_pct(transfer=60.0, base=46.2, finetuned=75.2, floor=noise_points(46.2, 400)) == 47.6
    assert share_pct(45.0, 60.0) == 75.0
    assert share_pct(45.0, 0.0) is None and share_pct(0.0, -1.0) is None


def test_sweep_shares_of_the_mean_come_from_mean_accuracies():
    comp = {"lowrank:ratio=8": {"accuracy": 30.0, "ratio": 7.9}}
    seeds = [
        sweep_pair(5.0, base=20.0, finetuned=60.0, transfer=40.0, compressed=comp),  # recovers 50 %
        sweep_pair(5.0, base=40.0, finetuned=39.0, transfer=40.0, compressed=comp),  # no gain: undefined
    ]
    mean = combine([{"1": {"scale": 1.0, "lr": 1e-4, "pairs": {"M5+Δ4": r}}} for r in seeds], "mean")
    assert mean["1"]["pairs"]["M5+Δ4"]["recovery_pct"] is None  # a mean of shares has no value here
    row = sweep_of_means(mean, 400)["1"]["pairs"]["M5+Δ4"]
    assert row["recovery_pct"] == pytest.approx(100 * (40 - 30) / (49.5 - 30), abs=0.05)  # from mean accuracies


def test_sweep_pair_derives_every_share_from_its_inputs():
    comp = {"lowrank:ratio=8": {"accuracy": 30.0, "ratio": 7.912}, "lowrank:ratio=4": {"accuracy": 0.0, "ratio": 3.9}}
    row = sweep_pair(1.25, base=10.0, finetuned=50.0, transfer=40.0, compressed=comp)
    assert row["recovery_pct"] == 75.0 and row["of_ft_pct"] == 80.0 and row["delta_rel_pct"] == 1.25
    # the compressed transfer keeps (30 - 10) / (40 - 10) of the dense transfer's gain
    assert row["compressed"]["lowrank:ratio=8"] == {"accuracy": 30.0, "ratio": 7.91, "of_dense_pct": 66.7}
    assert row["compressed"]["lowrank:ratio=4"]["of_dense_pct"] == -33.3  # worse than the base itself
    flat = sweep_pair(1.25, base=0.0, finetuned=0.0, transfer=0.0, compressed=comp)
    assert flat["recovery_pct"] is None and flat["of_ft_pct"] is None
    assert all(c["of_dense_pct"] is None for c in flat["compressed"].values())


def test_sizes_entry_is_in_percent_and_marks_a_missing_module_type():
    total = {"delta_rel": 0.0123}
    by_module = {"attention": {"delta_rel": 0.02}, "mlp": {"delta_rel": 0.01}, "embeddings": {"delta_rel": None}}
    e = sizes_entry(total, by_module)
    assert e == {"total": 1.23, "embeddings": None, "attention": 2.0, "mlp": 1.0, "norms": None}


def test_rates_are_stated_as_peak_over_fine_tuning_rate():
    # 5e-8 over 3e-4 would round to 0 in the seed mean (4 decimals); the inverse ratios survive it
    assert lr_ratios(1e-3, 3e-3, 5e-4) == {
        "pretrain_peak_over_ft": 3.0,
        "stage2_peak_over_ft": 0.5,
        "olmo2_peak_over_paper_ft": 6000.0,
    }


def test_sweep_jobs_reuse_scale_1_and_have_safe_distinct_directories(tmp_path):
    specs = ("lowrank:ratio=8", "int8", "kbit:bits=5")
    cfg = preset("smoke", sweep_lr_scales=(0.5, 1.0, 3.0), sweep_compressions=specs)
    data = {k: tmp_path / f"{k}.jsonl" for k in ("train", "test", "language_train", "language_test")}
    jobs = {j.id[len("s0:") :]: j for j in seed_jobs(cfg, 0, tmp_path, data)}
    assert {n for n in jobs if n.startswith("ft-M") and "@" in n} == {
        f"ft-M{v}@lr{x}" for v in (4, 5) for x in (0.5, 3)
    }
    assert not any("@lr1" in n for n in jobs)  # scale 1 is (a), (b) and (g)'s own jobs
    assert "M5+d4@lr0.5" in jobs and "M4+d5@lr3@int8" in jobs and "M4+d5@int8" in jobs  # (g) has int8
    assert "M5+d4@kbit:bits=5" in jobs  # scale 1, a spec (g) lacks: made under (g)'s naming, once
    assert jobs["M5+d4@lr0.5"].kwargs["source_finetuned"].endswith("ft-M4@lr0.5")
    assert jobs["ft-M4@lr0.5"].kwargs["settings"]["learning_rate"] == pytest.approx(0.5 * cfg.ft_lr)
    outs = [j.kwargs["out"] for j in jobs.values() if "out" in j.kwargs]
    assert len(outs) == len(set(outs)) and not any(c in Path(o).name for o in outs for c in ":=")
    sizes = jobs["sizes"]
    assert set(sizes.deps) >= {"s0:ft-M4@lr0.5", "s0:ft-M5@lr3", "s0:lang-ft-M4", "s0:ft-M1"}
    assert len([k for k in sizes.kwargs["entries"] if "->" in k]) == 10


@pytest.mark.parametrize(
    "override",
    [
        {"sweep_lr_scales": ()},
        {"sweep_lr_scales": (0.0,)},
        {"sweep_lr_scales": (1.0, 1)},
        {"sweep_compressions": ("",)},
        {"sweep_compressions": ("int8", "int8")},
        {"sweep_compressions": ("sign:x=1",)},
        {"sweep_compressions": ("kbit:bits=9+cal",)},
    ],
)
def test_bad_sweep_settings_are_refused(override):
    with pytest.raises(ConfigError, match="sweep_"):
        preset("smoke", **override)


# --- the whole pipeline -----------------------------------------------------------------------------------


def _numbers_in(obj: Any) -> set[str]:
    out: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            out |= _numbers_in(v) | _numbers_in(k)
    elif isinstance(obj, list):
        for v in obj:
            out |= _numbers_in(v)
    elif isinstance(obj, bool) or obj is None:
        pass
    elif isinstance(obj, (int, float)):
        out |= {f"{obj:.1f}", f"{obj:+.1f}", f"{obj:.2f}", str(obj)} | (
            {str(int(obj))} if float(obj).is_integer() else set()
        )
    return out


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lab") / "run"
    assert main(["lab", "run", "--preset", "smoke", "--out", str(out), "--workers", "1", "--quiet"]) == 0
    return out


def test_lab_writes_report_plots_and_results(lab_run):
    results = json.loads((lab_run / "results.json").read_text())
    report = (lab_run / "report.md").read_text()
    for heading in (
        "## Findings",
        "(a) Direct fine-tuning",
        "(b) Transfer matrix",
        "(c) Recycling-then-fine-tuning",
        "(d) Iterative vs direct",
        "(e) A second language",
        "(f) Does `diagnose` predict the gain?",
        "(g) Compressed deltas",
        "## Update sizes ‖Δ‖/‖W‖",
        "(h) Δ-size sweep",
        "## Design targets (issue 13)",
    ):
        assert heading in report
    for png in (
        "transfer_matrix.png",
        "recycle_curves.png",
        "iterative_curves.png",
        "direct_ft_curves.png",
        "diagnostics.png",
        "compression.png",
        "delta_size_sweep.png",
    ):
        assert (lab_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
    verdicts = re.findall(r"^\| (\d) \|.*\*\*(PASS|FAIL)\*\*", report, flags=re.M)
    assert [int(n) for n, _ in verdicts] == [1, 2, 3, 4, 5]
    assert [v == "PASS" for _, v in verdicts] == [f["passed"] for f in results["findings"]]
    assert len(results["mean"]["transfer"]) == 5 and sum(len(r) for r in results["mean"]["transfer"].values()) == 20
    assert len(pairs()) == 20
    diag = results["diagnostics_summary"]
    assert len(diag["pairs"]) == 20 and set(diag["spearman"]) == {"score", "geometry", "cos", "barrier", "accuracy"}
    assert set(diag["alpha_auto"]) == {"M5+Δ4", "M4+Δ5"}
    comp = results["mean"]["compressed"]
    # every (g) setting ran, but those the smoke model's 32-wide matrices cannot take (its 32x budget)
    assert set(comp) | set(results["mean"]["compressed_infeasible"]) == set(COMPRESSIONS)
    assert results["mean"]["compressed_infeasible"] == ["auto:ratio=32"]
    assert all(set(v) == {"M5+Δ4", "M4+Δ5"} for v in comp.values())
    assert comp["sign"]["M5+Δ4"]["ratio"] > 8 and comp["none"]["M5+Δ4"]["median_error"] == 0
    assert 1 < comp["int8"]["M4+Δ5"]["ratio"] <= 2  # 1 byte for 2, plus row scales and dense 1-D tensors
    sizes = results["mean"]["update_sizes"]
    assert set(sizes["finetunes"]) == {f"ft-{v}" for v in V} and len(sizes["version_steps"]) == 10
    for e in [*sizes["finetunes"].values(), *sizes["version_steps"].values(), sizes["language"]]:
        assert set(e) == {"total", "embeddings", "attention", "mlp", "norms"} and e["total"] > 0
    cfg = results["config"]
    sweep = results["mean"]["sweep"]
    assert list(sweep) == [f"{x:g}" for x in cfg["sweep_lr_scales"]]
    for pair in ("M5+Δ4", "M4+Δ5"):
        # a larger rate moves the weights further: the sweep spans Δ sizes
        grow = [sweep[k]["pairs"][pair]["delta_rel_pct"] for k in sweep]
        assert grow == sorted(grow) and grow[-1] > 10 * grow[0], grow
        assert set(sweep["1"]["pairs"][pair]["compressed"]) == set(cfg["sweep_compressions"]) - {"auto:ratio=32"}
    # scale 1 is (a)'s fine-tune and (b)'s transfer, measured once
    assert sweep["1"]["pairs"]["M5+Δ4"]["delta_rel_pct"] == sizes["finetunes"]["ft-M4"]["total"]
    assert sweep["1"]["pairs"]["M5+Δ4"]["transfer"] == results["mean"]["transfer"]["M5"]["M4"]
    assert set(sizes["sweep_finetunes"]) == {
        f"ft-M{v}@lr{x:g}" for v in (4, 5) for x in cfg["sweep_lr_scales"] if x != 1
    }
    # where the time goes: every job timed, fine-tuning split, kinds from the job ids
    t = results["timing"]
    assert t["untimed_jobs"] == 0 and t["workers"] == 1 and t["job_s"] <= t["wall_s"]  # one worker: jobs in turn
    by = t["by_kind"]
    assert by["direct fine-tune"]["jobs"] == 5 and by["recycling fine-tune"]["jobs"] == 20
    assert by["transfer+score"]["jobs"] == 20 and by["compressed"]["jobs"] == 2 * len(COMPRESSIONS)
    assert sum(r["jobs"] for r in by.values()) == len(list((lab_run / "jobs").glob("*.time.json")))
    ft = by["direct fine-tune"]
    assert ft["eval_s"] > 0 and ft["train_s"] > 0 and ft["setup_s"] >= 0
    assert ft["train_s"] + ft["eval_s"] + ft["setup_s"] <= ft["seconds"] + 1  # parts of the jobs' own time
    # the chain reports its evaluations (a smoke one can sum to 0.0 s at this rounding)
    assert by["iterative"]["eval_s"] is not None and by["iterative"]["eval_s"] >= 0
    assert "## Where the time goes" in report
    # the field's two measures, per seed and on the mean; finding 1 shows both
    meas = results["mean"]["measures"]
    assert set(meas["summary"]) == {"stage2", "within", "across"} and len(meas["pairs"]) == 20
    assert all("measures" in s for s in results["per_seed"].values()) and "measures" in results["spread"]
    assert all("ft_score_pct" in r for r in results["findings"][0]["numbers"]["pairs"])
    assert "% of FT score" in report and "% of gain recovered" in report and "Llama 3.1 + Δ3.0" in report
    # the findings over the seeds
    across = results["findings_across_seeds"]
    assert set(across) == {str(f["id"]) for f in results["findings"]}
    assert all(a["seeds"] == len(results["config"]["seeds"]) for a in across.values())
    assert "The findings rest on **one seed**" in report


def test_every_number_in_the_report_comes_from_results_json(lab_run):
    results = json.loads((lab_run / "results.json").read_text())
    known = _numbers_in(results)
    report = (lab_run / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("|") and not line.startswith("|---")]
    assert len(rows) > 60
    unknown = []
    for row in rows:
        # names, not numbers: versions, diffs, the paper's model names
        cleaned = re.sub(
            r"\b(M\d|FT\(M\d[^)]*\)|Δ\d(\.\d)?|Llama 3\.\d( 8B)?|3\.\d Instruct|\d+B\b)|`[^`]*`|bf16|float32", "", row
        )
        for num in re.findall(r"[+-]?\d+(?:\.\d+)?", cleaned):
            if num not in known and num.lstrip("+") not in known:
                unknown.append((num, row[:80]))
    assert not unknown, unknown[:10]


def test_docs_tables_render_a_fresh_runs_new_keys(lab_run, monkeypatch):
    spec = importlib.util.spec_from_file_location("docs_tables", Path(__file__).parents[1] / "scripts/docs_tables.py")
    assert spec is not None and spec.loader is not None
    docs_tables = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "docs_tables", docs_tables)  # its dataclasses look their module up there
    spec.loader.exec_module(docs_tables)
    results = json.loads((lab_run / "results.json").read_text())
    for name in ("lab-timing", "lab-measures", "lab-findings-seeds"):
        text = docs_tables.render(name, source=lab_run / "results.json")
        assert "Not in this results file" not in text and text.count("\n|") >= 3, (name, text)
        old = {k: v for k, v in results.items() if k not in ("timing", "findings_across_seeds")}
        old["mean"] = {k: v for k, v in results["mean"].items() if k != "measures"}
        assert docs_tables.TABLES[name].render(old) == ["_Not in this results file: rerun the lab._"]


def test_findings_are_recomputed_from_the_results_not_written_by_hand(lab_run, tmp_path):
    results = json.loads((lab_run / "results.json").read_text())
    assert all_findings(results["mean"], results["config"]["ft_steps"]) == results["findings"]
    # Edit the numbers so that finding 4 must pass, re-render: the verdict follows the numbers.
    m = results["mean"]
    m["iterative"]["M5"]["iter_ft"] = m["iterative"]["M5"]["dir_ft"] + 5.0
    results["findings"] = all_findings(m, results["config"]["ft_steps"])
    assert results["findings"][3]["passed"] is True
    assert re.search(r"^\| 4 \|.*\*\*PASS\*\*", render(results), flags=re.M)
    m["iterative"]["M5"]["iter_ft"] = m["iterative"]["M5"]["dir_ft"] - 5.0
    results["findings"] = all_findings(m, results["config"]["ft_steps"])
    assert re.search(r"^\| 4 \|.*\*\*FAIL\*\*", render(results), flags=re.M)


def test_rerun_uses_the_cache_and_other_settings_are_refused(lab_run):
    t0 = time.perf_counter()
    res = run_lab(preset("smoke", workers=2), lab_run)  # --workers is not part of the cache key
    assert res.jobs_run == 0
    assert time.perf_counter() - t0 < 30
    with pytest.raises(ConfigError, match="other settings"):
        run_lab(preset("smoke", workers=1, test_items=8), lab_run)
    assert rebuild_report(lab_run) == lab_run / "report.md"


def test_presets_and_bad_settings():
    assert preset("tiny").seeds == (0,) and len(preset("small").seeds) >= 3
    with pytest.raises(ConfigError, match="unknown lab preset"):
        preset("huge")
    with pytest.raises(ConfigError, match="ft_steps"):
        preset("tiny", ft_steps=0)
    with pytest.raises(ConfigError, match="bad lab setting"):
        preset("tiny", nonsense=1)


def _docs_tables() -> Any:
    path = Path(__file__).resolve().parents[1] / "scripts" / "docs_tables.py"
    spec = importlib.util.spec_from_file_location("docs_tables", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_tables"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_docs_tables_of_sizes_and_sweep_render_a_run_and_say_when_a_file_lacks_them(lab_run):
    dt = _docs_tables()
    results = json.loads((lab_run / "results.json").read_text())
    sizes, sweep = dt.lab_sizes(results), dt.lab_sweep(results)
    m = results["mean"]
    assert f"| FT(M4) − M4 | {m['update_sizes']['finetunes']['ft-M4']['total']:.2f} |" in "\n".join(sizes)
    assert len([r for r in sweep if r.startswith("| ×")]) == 2 * len(results["config"]["sweep_lr_scales"])
    del m["update_sizes"], m["sweep"]
    assert dt.lab_sizes(results) == dt.lab_sweep(results) == ["_Not in this results file: rerun the lab._"]


def test_sizes_and_sweep_sections_follow_the_numbers(lab_run, tmp_path):
    results = json.loads((lab_run / "results.json").read_text())
    m = results["mean"]
    pairs_1 = m["sweep"]["1"]["pairs"]
    comp = {c: {"accuracy": 30.0, "ratio": v["ratio"]} for c, v in pairs_1["M5+Δ4"]["compressed"].items()}
    pairs_1["M5+Δ4"] = sweep_pair(2.5, base=10.0, finetuned=50.0, transfer=40.0, compressed=comp)
    m["update_sizes"]["finetunes"]["ft-M4"]["total"] = 4.99
    text = render(results)
    assert re.search(r"^\| ×1 \| M5\+Δ4 \| 2\.50 \| 10\.0 \| 50\.0 \| 40\.0 \| 75\.0 \| 80\.0 \|$", text, re.M)
    # the compressed transfers' table: every setting keeps (30 - 10) / (40 - 10) of the dense gain at ×1 M5+Δ4
    cols = re.search(r"^\| Δ stored as \|(.*)\|$", text.split("## (h)")[1], re.M)
    assert cols is not None
    at = [c.strip() for c in cols.group(1).split("|")].index("×1 M5+Δ4")
    rows = re.findall(r"^\| `[^`]+` \|(.*)\|$", text.split("## (h)")[1], re.M)
    assert rows and all(r.split("|")[at].strip().startswith("66.7 (") for r in rows)
    assert re.search(r"at or below 5 %: \*\*yes\*\*", text)
    m["update_sizes"]["finetunes"]["ft-M4"]["total"] = 5.01
    assert re.search(r"at or below 5 %: \*\*no\*\*", render(results))
    assert tmp_path / "delta_size_sweep.png" in plots(results, tmp_path)


def _targets_results(finals: list[float], stage2: tuple[float, float], bases: list[float], seeds: int, span: float):
    direct = {v: {"final": x} for v, x in zip(V, finals, strict=True)}
    sizes = {"finetunes": {"ft-M4": {"total": stage2[0]}, "ft-M5": {"total": stage2[1]}}}
    seed = {"direct_ft": direct, "base": dict(zip(V, bases, strict=True)), "update_sizes": sizes}
    sweep = {"1": {"pairs": {"M5+Δ4": {"delta_rel_pct": 1.0}, "M4+Δ5": {"delta_rel_pct": span}}}}
    return {
        "mean": {**seed, "sweep": sweep},
        "per_seed": {str(k): seed for k in range(seeds)},
        "config": {"seeds": list(range(seeds))},
        "seconds": 899.0 if seeds > 1 else 901.0,
    }


def test_design_targets_are_judged_from_the_numbers():
    good = "\n".join(design_targets(_targets_results([41, 50, 60, 80, 89.9], (4.9, 3.0), [1, 2, 3, 4, 5], 2, 10)))
    assert good.count("**met**") == 6 and "not met" not in good
    bad = "\n".join(design_targets(_targets_results([39.9, 50, 60, 80, 90.1], (5.1, 3.0), [0, 2, 3, 4, 5], 1, 9.9)))
    assert bad.count("**not met**") == 6


def test_the_wall_time_target_counts_the_jobs_a_call_reused():
    """A call that reused every job takes a second; a fresh run cannot take less than the jobs' own seconds
    over the workers, and that is what the target is judged on."""
    fresh = _targets_results([41, 50, 60, 80, 89.9], (4.9, 3.0), [1, 2, 3, 4, 5], 2, 10)
    reused = {**fresh, "seconds": 0.7, "timing": {"job_s": 3395.0, "workers": 2}}
    row = next(r for r in design_targets(reused) if "wall time" in r)
    assert "at least 1698 s" in row and "**not met**" in row
    quick = {**fresh, "seconds": 0.7, "timing": {"job_s": 1700.0, "workers": 2}}
    assert "**met**" in next(r for r in design_targets(quick) if "wall time" in r)
    timed = {**fresh, "seconds": 880.0, "timing": {"job_s": 1700.0, "workers": 2}}  # the call itself, no reuse
    row = next(r for r in design_targets(timed) if "wall time" in r)
    assert "**met**" in row and "fresh run" not in row
