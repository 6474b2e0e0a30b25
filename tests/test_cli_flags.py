"""Flags people already know: no abbreviations, a "did you mean" for misspellings, `python -m ftrecycle`."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from ftrecycle.cli import build_parser, main
from ftrecycle.cli.suggest import flag_hint

# (command line, the misspelt flag, the flag it should suggest)
BATTERY = [
    ("finetune --model m --data d -o out --lr 1e-4", "--lr", "--learning-rate"),
    ("finetune --model m --data d --output_dir out", "--output_dir", "--output"),
    ("finetune --model m --data d -o out --learning-rat 1e-4", "--learning-rat", "--learning-rate"),
    ("finetune --model m --data d -o out --num_train_epochs 2", "--num_train_epochs", "--epochs"),
    ("finetune --model m --data d --gradient_accumulation_steps 2", "--gradient_accumulation_steps", "--grad-accum"),
    ("transfer --source_base a --source-finetuned b --target-base c -o out", "--source_base", "--source-base"),
    ("transfer --source-base a --source-finetuned b --target-base c --out out", "--out", "--output"),
    ("transfer --source-base a --source-finetuned b --target-base c --max-memroy 1GiB", "--max-memroy", "--max-memory"),
    ("diff --base a --finetuned b -o out --compres int8", "--compres", "--compress"),
    ("apply --delta d --target_base c -o out", "--target_base", "--target-base"),
    ("diagnose --source-base a --source-finetuned b --target-base c --calibraton f", "--calibraton", "--calibration"),
    ("eval --model m --task gsm8k", "--task", "--tasks"),
    ("lab run --seed 3", "--seed", "--seeds"),
    ("demo --outdir x", "--outdir", "--output"),
]


@pytest.mark.parametrize(("line", "bad", "want"), BATTERY)
def test_every_misspelt_flag_gets_a_did_you_mean(line, bad, want, capsys):
    assert main(line.split()) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{bad} -> {want}" in err and "did you mean" in err


def test_a_misspelt_command_gets_a_did_you_mean(capsys):
    assert main(["tranfer"]) == 2
    assert "tranfer -> transfer" in capsys.readouterr().err


def _parsers(p: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _parsers(sub, (*path, name))


def test_no_parser_accepts_an_abbreviated_flag():
    checked = 0
    for path, p in _parsers(build_parser()):
        assert p.allow_abbrev is False, path
        flags = {o for a in p._actions for o in a.option_strings if o.startswith("--")}
        for flag in flags:
            prefix = flag[: max(3, len(flag) - 2)]
            if prefix in flags or any(f != flag and f.startswith(prefix) for f in flags):
                continue
            with pytest.raises(Exception, match=r"unrecognized|unknown flag"):
                p.parse_args([prefix, "1"])
            checked += 1
    assert checked > 50


def test_a_hint_is_only_a_flag_the_command_has():
    assert flag_hint("--lr", ["--alpha", "--output"]) is None
    assert flag_hint("--zzzz", ["--alpha", "--output"]) is None


def test_python_dash_m_ftrecycle_runs_the_command():
    out = subprocess.run([sys.executable, "-m", "ftrecycle", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ftrecycle ")


@pytest.mark.parametrize(
    "line",
    [
        "diff --source-base a --base c --finetuned b -o x",
        "calibrate --calibration f --source-finetuned b --finetuned c",
        "lab run --out a -o b",
        "diagnose --source-base a --source-finetuned b --target-base c --calibration f --data g",
    ],
)
def test_one_flag_under_two_names_with_two_values_is_refused(line, capsys):
    assert main(line.split()) == 2
    assert "given twice" in capsys.readouterr().err
