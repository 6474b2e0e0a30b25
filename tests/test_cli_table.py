"""The command line as a table generated from the option groups, and recycle-finetune's transfer options.

Issue 12: `recycle-finetune` told a user with a grown vocabulary to pass `--vocab overlap` and then
refused the flag; it now takes the same transfer option groups as `transfer`.
"""

from __future__ import annotations

import argparse
import types
from dataclasses import fields

import pytest

import ftrecycle.cli.training as training
from ftrecycle.cli import COMMANDS, build_parser, main
from ftrecycle.options import (
    Inputs,
    ModelFiles,
    Output,
    Policies,
    Precision,
    Resources,
    Scaling,
    TransferOptions,
    flag_of,
)

MODELS = ["--source-base", "a", "--source-finetuned", "b", "--target-base", "c"]


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", ["transfer", "recycle-finetune"])
def test_transfer_options_are_generated_from_the_groups(command):
    """Every field of the transfer groups is a flag whose help is the field's declared help."""
    actions = {s: a for a in _subparser(command)._actions for s in a.option_strings}
    for group in (Scaling, Precision, Policies, ModelFiles, Resources, Inputs):
        for f in fields(group):
            action = actions[flag_of(f)]
            assert action.help == f.metadata["help"], flag_of(f)
            if f.metadata["choices"]:
                assert tuple(action.choices) == f.metadata["choices"], flag_of(f)


def test_recycle_finetune_passes_the_transfer_options(monkeypatch, tmp_path, capsys):
    calls: list[dict] = []

    def fake(*args, **kwargs):
        calls.append({"args": args, **kwargs})
        return types.SimpleNamespace(output=args[4], steps=1, losses=[], seconds_per_step=0.0, eval_log=[])

    monkeypatch.setattr(training, "recycle_finetune", fake)
    argv = ["recycle-finetune", *MODELS, "--data", "d.jsonl", "-o", str(tmp_path / "out")]
    extra = ["--alpha", "0.5", "--vocab", "overlap", "--tie-mismatch", "untie", "--compute-dtype", "float64"]
    assert main([*argv, *extra, "--tokenizer-from", "finetuned", "--threads", "2", "--allow-pickle"]) == 0
    (call,) = calls
    options = call["transfer"]
    assert isinstance(options, TransferOptions)
    assert options.scaling.alpha == 0.5 and call["alpha"] == 0.5
    assert options.policies == Policies(vocab="overlap", on_missing="error", tie_mismatch="untie")
    assert options.precision.compute_dtype == "float64"
    assert options.files.tokenizer_from == "finetuned"
    assert options.resources.threads == 2
    assert options.inputs.allow_pickle and call["allow_pickle"]
    assert options.output == Output()  # --force belongs to the fine-tuning run, not the start directory
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--alpha", "auto"], "--alpha auto needs --calibration"),
        (["--calibration", "c.jsonl"], "--calibration is only used with --alpha auto"),
        (["--vocab", "grow"], "invalid choice"),
    ],
)
def test_recycle_finetune_checks_transfer_options_like_transfer(monkeypatch, tmp_path, capsys, extra, needle):
    monkeypatch.setattr(training, "recycle_finetune", lambda *a, **k: pytest.fail("ran"))
    argv = ["recycle-finetune", *MODELS, "--data", "d.jsonl", "-o", str(tmp_path / "out"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_every_subcommand_is_a_row_of_the_table():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    assert {"transfer", "diff", "apply", "inspect", "export-lora", "finetune", "recycle-finetune"} <= set(COMMANDS)
    assert {"iterate", "eval", "diagnose", "lab", "demo"} <= set(COMMANDS)
