"""The natural mistakes: a fine-tuned model of another base, swapped source models, tokenizers that
disagree on shared ids, a zero diff. Each is refused (or warned about) with the flag that overrides it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ftrecycle import CheckpointError, IncompatibleModelsError, diff, transfer
from ftrecycle.cli import main
from ftrecycle.diagnose.geometry import geometry
from ftrecycle.diagnose.tokens import input_warnings

from fixtures.tiny import make_model, make_versions, perturbed, save, tiny_config, word_tokenizer


@pytest.fixture(scope="module")
def v(tmp_path_factory) -> dict[str, Path]:
    return make_versions("llama", tmp_path_factory.mktemp("v"))


def _refs(v: dict[str, Path], **swap: Path) -> tuple[str, str, str]:
    m = {**v, **swap}
    return str(m["source_base"]), str(m["source_finetuned"]), str(m["target_base"])


def _finetune_record(model: Path, base: Path | str) -> None:
    """The record `ftrecycle finetune` writes into its output, naming the model it started from."""
    record = {"tool": "ftrecycle", "operation": "finetune", "inputs": {"model": {"ref": str(base), "path": str(base)}}}
    (model / "ftrecycle.json").write_text(json.dumps(record))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_finetune_of_another_base_is_refused(v, tmp_path, capsys):
    fin = _copy(v["source_finetuned"], tmp_path / "fin")
    _finetune_record(fin, v["target_base"])  # its record says it was tuned from C, not from A
    with pytest.raises(IncompatibleModelsError, match=r"names its base as .*--ignore-provenance"):
        transfer(*_refs(v, source_finetuned=fin), tmp_path / "o1")
    assert not (tmp_path / "o1").exists()
    transfer(*_refs(v, source_finetuned=fin), tmp_path / "o2", ignore_provenance=True)
    # the CLI: one line naming both models and the flag, exit 2
    a, b, c = _refs(v, source_finetuned=fin)
    code = main(
        ["transfer", "--source-base", a, "--source-finetuned", b, "--target-base", c, "-o", str(tmp_path / "o3")]
    )
    err = capsys.readouterr().err
    assert code == 2 and str(v["target_base"]) in err and a in err and "--ignore-provenance" in err, err


def test_the_real_base_its_copy_and_a_vanished_record_pass(v, tmp_path):
    fin = _copy(v["source_finetuned"], tmp_path / "fin")
    _finetune_record(fin, v["source_base"])
    transfer(*_refs(v, source_finetuned=fin), tmp_path / "o1")
    moved = _copy(v["source_base"], tmp_path / "base-copy")  # a copy of the base is the base
    transfer(*_refs(v, source_finetuned=fin, source_base=moved), tmp_path / "o2")
    _finetune_record(fin, tmp_path / "gone")  # a record naming a path that is not there makes no claim
    transfer(*_refs(v, source_finetuned=fin), tmp_path / "o3")


def test_a_transfer_output_records_its_target_as_its_base(v, tmp_path):
    """A model ftrecycle wrote (C + diff) and then used as a fine-tuned model: its base is C, followed up the chain."""
    made = transfer(*_refs(v), tmp_path / "made").output
    transfer(str(v["target_base"]), str(made), str(v["source_base"]), tmp_path / "back")
    with pytest.raises(IncompatibleModelsError, match="names its base"):
        transfer(str(v["source_base"]), str(made), str(v["target_base"]), tmp_path / "wrong")
    tuned = _copy(v["source_finetuned"], tmp_path / "tuned")
    _finetune_record(tuned, made)  # tuned from C + diff, itself made from C: C is an ancestor
    transfer(str(v["target_base"]), str(tuned), str(v["source_base"]), tmp_path / "chain")


def test_an_adapter_config_naming_another_base_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    cfg = tiny_config("llama")
    base = save(make_model(cfg, seed=1, dtype=torch.float32), tmp_path / "base")
    other = save(perturbed(make_model(cfg, seed=1, dtype=torch.float32), seed=2, scale=0.02), tmp_path / "other")
    lc = LoraConfig(init_lora_weights=False, r=4, target_modules=["q_proj"])
    get_peft_model(make_model(cfg, seed=1, dtype=torch.float32), lc).save_pretrained(tmp_path / "adapter")
    cpath = tmp_path / "adapter" / "adapter_config.json"
    cpath.write_text(json.dumps({**json.loads(cpath.read_text()), "base_model_name_or_path": str(base)}))
    with pytest.raises(IncompatibleModelsError, match=r"adapter_config\.json names its base"):
        transfer(str(other), str(tmp_path / "adapter"), str(base), tmp_path / "o1")
    transfer(str(base), str(tmp_path / "adapter"), str(other), tmp_path / "o2")
    transfer(str(other), str(tmp_path / "adapter"), str(base), tmp_path / "o3", ignore_provenance=True)


def test_swapped_sources_are_refused_when_the_record_proves_it(v, tmp_path):
    tuned = _copy(v["source_finetuned"], tmp_path / "tuned")
    _finetune_record(tuned, v["source_base"])
    swapped = _refs(v, source_base=tuned, source_finetuned=v["source_base"])
    with pytest.raises(IncompatibleModelsError, match=r"look swapped.*--ignore-provenance"):
        transfer(*swapped, tmp_path / "o1")
    transfer(*swapped, tmp_path / "o2", ignore_provenance=True)
    with pytest.raises(IncompatibleModelsError, match="look swapped"):  # `diff` checks the same records
        diff(swapped[0], swapped[1], tmp_path / "d1")
    diff(swapped[0], swapped[1], tmp_path / "d2", ignore_provenance=True)
    total = geometry(*swapped).total
    assert any("swapped" in w for w in input_warnings(*swapped, total))


@pytest.fixture(scope="module")
def far(tmp_path_factory) -> dict[str, Path]:
    """A fine-tune that moved further than the version drift (no records anywhere)."""
    root = tmp_path_factory.mktemp("far")
    a = make_model(tiny_config("llama"), seed=7)
    return {
        "source_base": save(a, root / "a"),
        "source_finetuned": save(perturbed(a, seed=8, scale=0.06), root / "b"),
        "target_base": save(perturbed(a, seed=9, scale=0.02), root / "c"),
    }


def test_diagnose_warns_of_swapped_sources_from_the_geometry(far, capsys):
    right = _refs(far)
    swapped = _refs(far, source_base=far["source_finetuned"], source_finetuned=far["source_base"])
    t_right, t_swapped = geometry(*right).total, geometry(*swapped).total
    assert not input_warnings(*right, t_right)
    warned = input_warnings(*swapped, t_swapped)
    assert len(warned) == 1 and "may be swapped" in warned[0], (t_swapped, warned)
    assert t_swapped["cos"] > 0.5
    a, b, c = swapped
    assert main(["diagnose", "--source-base", a, "--source-finetuned", b, "--target-base", c, "--json"]) == 0
    out = capsys.readouterr()
    assert "may be swapped" in out.err and json.loads(out.out)["warnings"] == warned


def _swapped_tokenizer(size: int):
    """The tiny models' tokenizer with two ids exchanged: the same size, other ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = word_tokenizer(size).get_vocab()
    words = sorted(vocab, key=vocab.__getitem__)
    words[10], words[11] = words[11], words[10]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_a_target_tokenizer_with_other_ids_is_refused(v, tmp_path, capsys):
    c = _copy(v["target_base"], tmp_path / "c")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (c / f).unlink(missing_ok=True)
    _swapped_tokenizer(96).save_pretrained(c)
    with pytest.raises(IncompatibleModelsError, match=r"maps 2 of the 96 token ids.*--allow-tokenizer-mismatch"):
        transfer(*_refs(v, target_base=c), tmp_path / "o1")
    transfer(*_refs(v, target_base=c), tmp_path / "o2", allow_tokenizer_mismatch=True)
    assert any("other tokens" in w for w in input_warnings(*_refs(v, target_base=c), {}))


def test_a_special_token_renamed_in_place_is_not_a_remapped_vocabulary(v, tmp_path):
    """Llama 3.1 renamed some of Llama 3's reserved special tokens: the same ids, still special, other names."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    c = _copy(v["target_base"], tmp_path / "c")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (c / f).unlink(missing_ok=True)
    vocab = word_tokenizer(96).get_vocab()
    words = sorted(vocab, key=vocab.__getitem__)
    words[0] = "<|finetune_right_pad_id|>"  # was <pad>
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=words[0], bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(c)
    transfer(*_refs(v, target_base=c), tmp_path / "o")  # accepted: no ordinary token moved
    words[12], words[13] = words[13], words[12]  # an ordinary token moved too: refused
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=words[0], unk_token="<unk>").save_pretrained(c)
    with pytest.raises(IncompatibleModelsError, match="maps 2 of the 96 token ids"):
        transfer(*_refs(v, target_base=c), tmp_path / "o2")


def test_a_zero_diff_warns_loudly(v, tmp_path, capsys):
    same = _copy(v["source_base"], tmp_path / "same")
    r = transfer(*_refs(v, source_finetuned=same), tmp_path / "o1")
    assert len(r.warnings) == 1 and "the diff is zero" in r.warnings[0]
    assert json.loads((tmp_path / "o1" / "ftrecycle.json").read_text())["warnings"] == r.warnings
    assert transfer(*_refs(v), tmp_path / "o2").warnings == []  # a real diff: no warning
    a, b, c = _refs(v, source_finetuned=same)
    assert (
        main(
            [
                "transfer",
                "--source-base",
                a,
                "--source-finetuned",
                b,
                "--target-base",
                c,
                "-o",
                str(tmp_path / "o3"),
                "-q",
            ]
        )
        == 0
    )
    assert "warning: the diff is zero" in capsys.readouterr().err


def test_an_untrained_adapter_is_a_zero_diff(tmp_path):
    from peft import LoraConfig, get_peft_model

    cfg = tiny_config("llama")
    base = save(make_model(cfg, seed=1), tmp_path / "base")
    target = save(perturbed(make_model(cfg, seed=1), seed=2, scale=0.02), tmp_path / "target")
    for init, name in ((True, "untrained"), (False, "trained")):  # PEFT's default init: lora_B = 0
        lc = LoraConfig(init_lora_weights=init, r=4, target_modules=["q_proj", "v_proj"])
        get_peft_model(make_model(cfg, seed=1), lc).save_pretrained(tmp_path / name)
    r = transfer(str(base), str(tmp_path / "untrained"), str(target), tmp_path / "o1")
    assert len(r.warnings) == 1 and "the diff is zero" in r.warnings[0]
    assert transfer(str(base), str(tmp_path / "trained"), str(target), tmp_path / "o2").warnings == []


@pytest.mark.parametrize(
    "content",
    ['{"operation": "finetune", "inputs": {"model": ', '{"inputs": {"model": 1}, "inputs": 2}', "[" * 100 + "]" * 100],
    ids=["truncated", "duplicate key", "deep"],
)
def test_a_broken_record_is_one_line_naming_it_and_the_flag(v, tmp_path, capsys, content):
    fin = _copy(v["source_finetuned"], tmp_path / "fin")
    (fin / "ftrecycle.json").write_text(content)
    a, b, c = _refs(v, source_finetuned=fin)
    args = ["transfer", "--source-base", a, "--source-finetuned", b, "--target-base", c, "-q"]
    assert main([*args, "-o", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "ftrecycle.json" in err and "--ignore-provenance" in err, err
    assert main([*args, "-o", str(tmp_path / "o2"), "--ignore-provenance"]) == 0
    assert (fin / "ftrecycle.json").read_text() == content  # inputs are never modified
    warned = input_warnings(a, b, c, {})  # diagnose says so and goes on
    assert len(warned) == 1 and "record could not be read" in warned[0] and "ftrecycle.json" in warned[0]


def test_records_of_other_shapes_make_no_claim(v, tmp_path):
    fin = _copy(v["source_finetuned"], tmp_path / "fin")
    odd = ({"inputs": {"model": {"path": "a\x00b"}}}, {"inputs": {"model": "~nobody/x"}})
    for record in ([1, 2], {"inputs": [1]}, *odd):
        (fin / "ftrecycle.json").write_text(json.dumps(record))
        transfer(*_refs(v, source_finetuned=fin), tmp_path / "o", force=True)


def test_a_broken_target_tokenizer_is_named_unless_the_check_is_off(v, tmp_path, capsys):
    c = _copy(v["target_base"], tmp_path / "c")
    (c / "tokenizer.json").write_text('{"model": {"vocab": {"a": "x"}}}')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        transfer(*_refs(v, target_base=c), tmp_path / "o1")
    transfer(*_refs(v, target_base=c), tmp_path / "o2", allow_tokenizer_mismatch=True)
