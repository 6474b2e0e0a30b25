"""Review of the options redesign (issue 12): wrong values inside option groups, bundles of the wrong
kind, options that do not apply, huge numbers and non-path calibrations are one-line ConfigErrors,
never a traceback from deep inside, nor silently accepted; nothing is written on a refusal."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ftrecycle import (
    ConfigError,
    DeltaStorage,
    DiffOptions,
    Policies,
    Precision,
    Resources,
    Scaling,
    TransferOptions,
    diff,
    export_lora,
    transfer,
)
from ftrecycle.cli import main
from ftrecycle.codecs import parse_compression
from ftrecycle.finetune.config import FinetuneConfig
from ftrecycle.recycle import ChainSpec, iterate, recycle_finetune

from conftest import bits, load_dir, tree_digest


def _sources(versions: dict[str, dict[str, Path]]) -> tuple[str, str, str]:
    v = versions["llama"]
    return str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"])


def _one_line(err: pytest.ExceptionInfo[ConfigError], needle: str) -> None:
    line = str(err.value)
    assert "\n" not in line and len(line) < 400 and needle in line, line


@pytest.mark.parametrize(
    "groups, needle",
    [
        ({"scaling": Precision()}, "TransferOptions.scaling must be a Scaling group, got a Precision"),
        ({"policies": {"vocab": "overlap"}}, "TransferOptions.policies must be a Policies group, got a dict"),
        ({"resources": "1GB"}, "TransferOptions.resources must be a Resources group, got a str"),
    ],
)
def test_a_group_of_the_wrong_kind_in_a_bundle_is_refused_when_the_bundle_is_made(groups, needle):
    # before: an AttributeError from deep inside transfer (`'Precision' object has no attribute ...`)
    with pytest.raises(ConfigError) as err:
        TransferOptions(**groups)
    _one_line(err, needle)


def test_recycle_and_chain_refuse_a_transfer_bundle_of_the_wrong_kind(versions, tmp_path):
    a, b, c = _sources(versions)
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "1 + 1 = ?", "answer": "2 #### 2"}\n')
    cfg = FinetuneConfig(max_steps=1, batch_size=2)
    for bad in ({"vocab": "overlap"}, DiffOptions()):
        with pytest.raises(ConfigError) as err:
            recycle_finetune(a, b, c, data, tmp_path / "out", transfer=bad, config=cfg)  # type: ignore[arg-type]
        _one_line(err, "recycle_finetune(transfer=...) must be a TransferOptions")
        with pytest.raises(ConfigError) as err:
            ChainSpec([a, c], data, tmp_path / "chain", transfer=bad)  # type: ignore[arg-type]
        _one_line(err, "ChainSpec.transfer must be a TransferOptions")
    with pytest.raises(ConfigError) as err:
        recycle_finetune(a, b, c, data, tmp_path / "out", alpha=10**400, config=cfg)
    _one_line(err, "--alpha must be a finite number or 'auto'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]


@pytest.mark.parametrize(
    "keywords, needle",
    [
        ({"shard_size": 1e30}, "--shard-size 1e+30 is not a size like 5GB"),
        ({"shard_size": [1]}, "--shard-size [1] is not a size"),
        ({"shard_size": None}, "--shard-size None is not a size"),
        ({"max_memory": 1.5}, "--max-memory 1.5 is not a size"),
        ({"max_memory": 10**5000}, "--max-memory (an integer of 16610 bits) is above the largest size"),
        ({"alpha": 10**400}, "--alpha must be a finite number or 'auto', got 1000"),
        ({"threads": 10**5000}, "--threads must be an integer >= 1 and <= 1024, got an integer of 16610 bits"),
    ],
)
def test_values_of_the_wrong_type_or_size_are_config_errors(versions, tmp_path, keywords, needle):
    # before: AttributeError ('float' object has no attribute 'strip'), OverflowError, or a ValueError
    # raised while formatting the message of an integer too long to print
    a, b, c = _sources(versions)
    with pytest.raises(ConfigError) as err:
        transfer(a, b, c, tmp_path / "out", **keywords)
    _one_line(err, needle)
    assert not (tmp_path / "out").exists()


def test_export_lora_refuses_a_budget_that_is_not_a_size(versions, tmp_path):
    a, b, _ = _sources(versions)
    delta = diff(a, b, tmp_path / "delta").output
    with pytest.raises(ConfigError) as err:
        export_lora(delta, tmp_path / "out", rank=2, max_memory=1.5)  # type: ignore[arg-type]
    _one_line(err, "--max-memory 1.5 is not a size")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("calibration", [5, "", ["calib.jsonl"], {"a": 1}])
def test_calibration_must_be_a_path(calibration):
    # before: accepted, and a TypeError when the file was opened (after the output was claimed)
    with pytest.raises(ConfigError) as err:
        Scaling(alpha="auto", calibration=calibration)
    _one_line(err, "--calibration must be a non-empty path")


@pytest.mark.parametrize(
    "options, needle",
    [
        (TransferOptions(storage=DeltaStorage(delta_dtype="bfloat16")), "delta_dtype do not apply to TransferOptions"),
        (TransferOptions(scaling=Scaling(alpha=0.5, calibration="c.jsonl")), "calibration do not apply"),
        (DiffOptions(policies=Policies(tie_mismatch="untie")), "tie_mismatch do not apply to DiffOptions"),
        (DiffOptions(precision=Precision(out_dtype="bfloat16")), "out_dtype do not apply to DiffOptions"),
    ],
)
def test_an_option_that_does_not_apply_is_refused_inside_a_bundle_too(versions, tmp_path, options, needle):
    # the same option as a keyword was refused; set in the bundle it was silently ignored
    a, b, c = _sources(versions)
    with pytest.raises(ConfigError) as err:
        if isinstance(options, TransferOptions):
            transfer(a, b, c, tmp_path / "out", options=options)
        else:
            diff(a, b, tmp_path / "out", options=options)
    _one_line(err, needle)
    assert not (tmp_path / "out").exists()


def test_a_compressed_transfer_still_takes_the_apply_only_options(versions, tmp_path):
    # its diff step shares the transfer's groups: the options only the apply step reads stay out of it
    a, b, c = _sources(versions)
    res = transfer(a, b, c, tmp_path / "out", compress="int8", tie_mismatch="untie", out_dtype="float32")
    assert res.provenance["policies"]["tie_mismatch"] == "untie" and res.provenance["out_dtype"] == "float32"


def _chain(root: Path, versions: dict[str, dict[str, Path]], **extra: Any) -> Path:
    a, _, c = _sources(versions)
    (root / "train.jsonl").write_text('{"question": "1 + 1 = ?", "answer": "2 #### 2"}\n')
    chain = {"versions": [a, c], "data": "train.jsonl", "output": "out", **extra}
    (root / "chain.yaml").write_text(json.dumps(chain))
    return root / "chain.yaml"


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"alpha": "auto", "transfer": {"calibration": 5}}, "--calibration must be a non-empty path"),
        ({"transfer": {"alpha": "auto", "calibration": {"a": 1}}}, "--calibration must be a non-empty path"),
        ({"transfer": {"max_memory": None}}, "--max-memory None is not a size"),
        ({"transfer": {"max_memory": [1]}}, "--max-memory [1] is not a size"),
        ({"transfer": {"threads": 10**40}}, "--threads must be an integer >= 1 and <= 1024"),
        ({"alpha": 10**400}, "alpha must be a finite number or 'auto'"),
        ({"transfer": {"delta_dtype": "float16", "vocab": {"a": {"b": ["c"] * 100}}}}, "--vocab must be one of"),
    ],
)
def test_chain_file_transfer_values_of_the_wrong_type_are_one_line(versions, tmp_path, capsys, extra, needle):
    path = _chain(tmp_path, versions, **extra)
    with pytest.raises(ConfigError) as err:
        ChainSpec.load(path)
    _one_line(err, needle)
    assert str(path) in str(err.value)
    assert main(["iterate", str(path)]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and needle in line, line
    assert not (tmp_path / "out").exists()


def test_chain_file_with_a_number_too_long_to_read_is_one_line(versions, tmp_path):
    path = _chain(tmp_path, versions)
    path.write_text(path.read_text().replace('"output": "out"', '"output": "out", "alpha": 1' + "0" * 5000))
    with pytest.raises(ConfigError) as err:  # before: ValueError from int(), an internal error (exit 3)
        ChainSpec.load(path)
    _one_line(err, "a number too long to read")


def test_chain_spec_built_in_code_checks_alpha_and_finetuned(versions, tmp_path):
    a, _, c = _sources(versions)
    data = tmp_path / "train.jsonl"
    for keywords, needle in (
        ({"alpha": True}, "alpha must be a finite number or 'auto', got True"),
        ({"alpha": 10**400}, "alpha must be a finite number or 'auto'"),
        ({"finetuned": 5}, "ChainSpec.finetuned must be a non-empty path, got 5"),
        ({"finetuned": ""}, "ChainSpec.finetuned must be a non-empty path"),
    ):
        with pytest.raises(ConfigError) as err:
            ChainSpec([a, c], data, tmp_path / "out", **keywords)
        _one_line(err, needle)
    assert ChainSpec([a, c], data, tmp_path / "out", alpha=1).alpha == 1.0


def test_resources_group_checks_like_the_flag():
    with pytest.raises(ConfigError) as err:
        Resources(max_memory=2.5e9)  # type: ignore[arg-type]
    _one_line(err, "--max-memory 2500000000.0 is not a size")


@pytest.mark.parametrize("spec", ["lowrank:rank=4", "lowrank:energy=0.123456789", "sparse:ratio=16", "int8"])
def test_diff_still_takes_a_parsed_compression(versions, tmp_path, spec):
    # `diff(compress=...)` took a parsed Compression before the redesign; it was refused after it
    a, b, _ = _sources(versions)
    parsed = diff(a, b, tmp_path / "parsed", compress=parse_compression(spec))
    text = diff(a, b, tmp_path / "text", compress=spec)
    assert parsed.provenance["compression"] == text.provenance["compression"]
    one, two = load_dir(parsed.output), load_dir(text.output)
    assert one.keys() == two.keys() and all(torch.equal(bits(one[k]), bits(two[k])) for k in one)


@pytest.mark.parametrize("rank", [True, 2.0, "4", 0])
def test_export_lora_rank_of_the_wrong_type_is_a_config_error(versions, tmp_path, rank):
    a, b, _ = _sources(versions)
    delta = diff(a, b, tmp_path / "delta").output
    with pytest.raises(ConfigError) as err:  # before: TypeError ("an integer is required") for True
        export_lora(delta, tmp_path / "out", rank=rank)
    _one_line(err, "--rank must be a positive integer, got")
    assert not (tmp_path / "out").exists()


def test_chain_finetuned_naming_a_version_is_refused(versions, tmp_path):
    a, _, c = _sources(versions)
    for n, v in enumerate((a, c), 1):
        with pytest.raises(ConfigError) as err:
            ChainSpec.load(_chain(tmp_path, versions, finetuned=v))
        _one_line(err, f"is versions[{n}] itself; give a fine-tuning of versions[1] (M1)")
    (tmp_path / "link").symlink_to(a)
    with pytest.raises(ConfigError) as err:  # the same directory through a link
        ChainSpec.load(_chain(tmp_path, versions, finetuned="link"))
    _one_line(err, "is versions[1] itself")
    with pytest.raises(ConfigError) as err:
        ChainSpec([a, c], tmp_path / "train.jsonl", tmp_path / "out", finetuned=a)
    _one_line(err, "finetuned")


@pytest.mark.parametrize("kind", ["file", "fifo"])
def test_chain_finetuned_that_is_not_a_model_directory_is_one_line_and_writes_nothing(versions, tmp_path, capsys, kind):
    given = tmp_path / "given"
    if kind == "file":
        given.write_text("{}")
    else:
        os.mkfifo(given)
    path = _chain(tmp_path, versions, finetuned="given", finetune={"max_steps": 1, "batch_size": 2})
    assert main(["iterate", str(path), "--force"]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and str(given) in line and "pass the model's directory" in line, line
    assert not (tmp_path / "out").exists()


def test_iterate_force_never_removes_the_finetuned_model(versions, tmp_path, capsys):
    _, b, _ = _sources(versions)
    mine = tmp_path / "mine"
    shutil.copytree(b, mine)
    before = tree_digest(mine)
    tiny = {"max_steps": 1, "batch_size": 2}
    path = _chain(tmp_path, versions, finetuned="mine", finetune=tiny)
    rows = iterate(ChainSpec.load(path))
    assert rows[0]["finetuned"] == str(mine)
    # settings changed: --force recomputes what depends on M*1, and leaves M*1 itself alone
    path = _chain(tmp_path, versions, finetuned="mine", finetune=tiny, alpha=0.5)
    assert main(["iterate", str(path), "--force"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "out" / "M2-plus-delta-1" / "ftrecycle.json").read_text())["alpha"] == 0.5
    assert tree_digest(mine) == before
    # M*1 inside the chain's output: refused before anything is removed, even with --force
    made = tmp_path / "out" / "M2-star"
    path = _chain(tmp_path, versions, finetuned="out/M2-star", finetune=tiny)
    assert main(["iterate", str(path), "--force"]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "overlaps input" in line, line
    assert made.is_dir() and tree_digest(mine) == before


@pytest.mark.parametrize("key", ["data", "output"])
def test_chain_file_empty_data_or_output_is_refused(versions, tmp_path, key):
    # an empty output was the chain file's own directory, products written beside the chain and its data
    with pytest.raises(ConfigError) as err:
        ChainSpec.load(_chain(tmp_path, versions, **{key: ""}))
    _one_line(err, f"{key} is empty; give a path")


@pytest.mark.parametrize("key", ["compress", "max_memory", "shard_size"])
def test_a_long_bad_value_is_cut_in_the_message(versions, tmp_path, key):
    extra = {"transfer": {key: "x" * 5000}} if key != "shard_size" else {}
    if extra:
        with pytest.raises(ConfigError) as err:
            ChainSpec.load(_chain(tmp_path, versions, **extra))
    else:
        a, b, c = _sources(versions)
        with pytest.raises(ConfigError) as err:
            transfer(a, b, c, tmp_path / "out", shard_size="x" * 5000)
    _one_line(err, "'xxxx")


def test_chain_file_empty_output_is_fine_when_the_command_line_gives_one(versions, tmp_path):
    spec = ChainSpec.load(_chain(tmp_path, versions, output=""), output=tmp_path / "elsewhere")
    assert spec.output == tmp_path / "elsewhere"


def test_numpy_numbers_are_taken_as_the_keywords_took_them(versions, tmp_path):
    # threads=np.int64(2) was accepted by transfer before the option groups, then refused by them
    a, b, c = _sources(versions)
    res = transfer(a, b, c, tmp_path / "out", threads=np.int64(2), alpha=np.float32(0.5), shard_size=np.int64(10**5))
    assert res.provenance["alpha"] == 0.5 and type(res.provenance["alpha"]) is float
    assert Resources(threads=np.int32(3)).threads == 3
    for bad in ({"threads": np.True_}, {"max_memory": np.True_}):
        with pytest.raises(ConfigError):
            Resources(**bad)
    with pytest.raises(ConfigError):
        Scaling(alpha=np.float32("nan"))
