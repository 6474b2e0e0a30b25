"""Token rows: special tokens untrained in the bases and trained by the fine-tune; `diagnose` lists them,
`transfer --token-rows` makes them the fine-tuned model's, the target's, or target + diff, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftrecycle import ConfigError, IncompatibleModelsError, apply_delta, diff, transfer
from ftrecycle.cli import main
from ftrecycle.diagnose.tokens import token_rows

from conftest import bits, load_dir
from fixtures.tiny import make_model, make_versions, perturbed, tiny_config

VOCAB = 96
#: the chat tokens, placed last in the vocabulary
CHAT = ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")
CHAT_IDS = (93, 94, 95)
HEADS = ("model.embed_tokens.weight", "lm_head.weight")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4 - len(CHAT))] + list(CHAT)
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": list(CHAT)})
    return fast


def _set_rows(model, rows: tuple[int, ...], values: torch.Tensor | float) -> None:
    with torch.no_grad():
        for p in (model.model.embed_tokens.weight, model.lm_head.weight):
            p[list(rows)] = values if isinstance(values, float) else values.to(p.dtype)


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> dict[str, Path]:
    """A base and its newer version whose chat-token rows are zero (never trained), and a chat fine-tune
    of the base that trained them; every model has the tokenizer naming them special."""
    root = tmp_path_factory.mktemp("chat")
    a = make_model(tiny_config("llama", vocab_size=VOCAB), seed=3)
    _set_rows(a, CHAT_IDS, 0.0)
    b = perturbed(a, seed=4, scale=0.01)
    _set_rows(b, CHAT_IDS, torch.randn(len(CHAT_IDS), 32, generator=torch.Generator().manual_seed(5)) * 0.05)
    c = perturbed(a, seed=6, scale=0.02)
    _set_rows(c, CHAT_IDS[:2], 0.0)  # two rows exactly zero in C, as in A
    _set_rows(c, CHAT_IDS[2:], 1e-4)  # one tiny, not zero
    tok = _tokenizer()
    out = {}
    for name, m in (("source_base", a), ("source_finetuned", b), ("target_base", c)):
        m.save_pretrained(root / name, safe_serialization=True)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def _run(chat: dict[str, Path], out: Path, **kw) -> dict[str, torch.Tensor]:
    transfer(chat["source_base"], chat["source_finetuned"], chat["target_base"], out, **kw)
    return load_dir(out)


@pytest.fixture(scope="module")
def plain(chat, tmp_path_factory) -> dict[str, torch.Tensor]:
    return _run(chat, tmp_path_factory.mktemp("plain") / "out")


@pytest.mark.parametrize("policy", ["finetuned", "target", "delta"])
def test_each_policy_gives_its_rows_bit_for_bit(chat, plain, tmp_path, policy):
    # the default rows (the special tokens untrained in A) for the two that change rows; 'delta', the
    # default policy, decides nothing unless rows are named, so name them to see them recorded
    got = _run(chat, tmp_path / "out", token_rows=policy, tokens=None if policy != "delta" else CHAT)
    src = {"finetuned": load_dir(chat["source_finetuned"]), "target": load_dir(chat["target_base"]), "delta": plain}
    rows = list(CHAT_IDS)
    others = [i for i in range(VOCAB) if i not in CHAT_IDS]
    for name in HEADS:
        want = src[policy][name][rows]
        assert torch.equal(bits(got[name][rows]), bits(want)), (policy, name)
        assert torch.equal(bits(got[name][others]), bits(plain[name][others]))
    if policy != "delta":  # the rows really changed: the test would fail if the policy did nothing
        assert not torch.equal(got[HEADS[0]][rows], plain[HEADS[0]][rows])
    for name in set(plain) - set(HEADS):
        assert torch.equal(got[name], plain[name]), name
    record = json.loads((tmp_path / "out" / "ftrecycle.json").read_text())
    assert record["token_rows"]["rows"] == rows and record["token_rows"]["policy"] == policy
    assert record["token_rows"]["tokens"] == list(CHAT)
    assert {r["tensor"] for r in record["records"] if r["action"] == "token-rows"} == set(HEADS)


def test_tokens_by_string_and_id_choose_those_rows(chat, plain, tmp_path):
    got = _run(chat, tmp_path / "out", token_rows="finetuned", tokens="<|eot_id|>,10")
    b = load_dir(chat["source_finetuned"])
    for name in HEADS:
        assert torch.equal(got[name][[93, 10]], b[name][[93, 10]])
        assert torch.equal(got[name][[94, 95]], plain[name][[94, 95]])


def test_bad_tokens_are_refused_by_name(chat, tmp_path):
    with pytest.raises(ConfigError, match="not a token"):
        _run(chat, tmp_path / "o1", token_rows="target", tokens="<|im_start|>")
    with pytest.raises(ConfigError, match="out of range"):
        _run(chat, tmp_path / "o2", token_rows="target", tokens="96")
    with pytest.raises(ConfigError, match="at least one token"):
        _run(chat, tmp_path / "o3", token_rows="target", tokens=",")
    assert not (tmp_path / "o1").exists()


def test_apply_takes_target_rows_and_refuses_finetuned(chat, plain, tmp_path):
    d = diff(chat["source_base"], chat["source_finetuned"], tmp_path / "delta")
    got = tmp_path / "out"
    apply_delta(d.output, chat["target_base"], got, token_rows="target", tokens="93,94,95")
    c, out = load_dir(chat["target_base"]), load_dir(got)
    for name in HEADS:
        assert torch.equal(out[name][list(CHAT_IDS)], c[name][list(CHAT_IDS)])
    with pytest.raises(ConfigError, match="delta holds the diff"):
        apply_delta(d.output, chat["target_base"], tmp_path / "o2", token_rows="finetuned", tokens="93")
    with pytest.raises(ConfigError, match="needs --tokens"):
        apply_delta(d.output, chat["target_base"], tmp_path / "o3", token_rows="target")
    with pytest.raises(ConfigError, match="out of range: the embedding has 96 rows"):
        apply_delta(d.output, chat["target_base"], tmp_path / "o4", token_rows="target", tokens="500")


def test_diagnose_lists_the_untrained_special_rows(chat, capsys):
    report = token_rows(str(chat["source_base"]), str(chat["source_finetuned"]), str(chat["target_base"]))
    by = {(f.model, f.tensor): f for f in report.findings}
    for name in HEADS:
        assert by[("source base", name)].untrained == list(CHAT_IDS)
        assert by[("source fine-tuned", name)].untrained == []
        assert by[("target base", name)].untrained == list(CHAT_IDS)
        assert by[("target base", name)].same_as_base == list(CHAT_IDS[:2])
        assert by[("source base", name)].special == dict(zip(CHAT_IDS, CHAT, strict=True))
    args = ["--source-base", str(chat["source_base"]), "--source-finetuned", str(chat["source_finetuned"])]
    assert main(["diagnose", *args, "--target-base", str(chat["target_base"])]) == 0
    out = capsys.readouterr().out
    assert "| source base | model.embed_tokens.weight | 96 |" in out and "93 <|eot_id|>" in out


def test_cli_transfer_token_rows(chat, plain, tmp_path, capsys):
    args = ["--source-base", str(chat["source_base"]), "--source-finetuned", str(chat["source_finetuned"])]
    out = tmp_path / "out"
    code = main(["transfer", *args, "--target-base", str(chat["target_base"]), "-o", str(out), "-q",
                 "--token-rows", "finetuned", "--tokens", "<|eot_id|>"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    b = load_dir(chat["source_finetuned"])
    assert torch.equal(load_dir(out)[HEADS[0]][93], b[HEADS[0]][93])
    with pytest.raises(SystemExit):
        main(["transfer", "--help"])
    help_text = capsys.readouterr().out
    assert "--token-rows {delta,target,finetuned}" in help_text and "--ignore-provenance" in help_text


def test_tied_embeddings_take_the_rows_once(tmp_path):
    v = make_versions("qwen2", tmp_path / "v")
    out = tmp_path / "out"
    transfer(v["source_base"], v["source_finetuned"], v["target_base"], out, token_rows="finetuned", tokens="5,6")
    got, b = load_dir(out), load_dir(v["source_finetuned"])
    emb = "model.embed_tokens.weight"
    assert "lm_head.weight" not in got and torch.equal(bits(got[emb][[5, 6]]), bits(b[emb][[5, 6]]))
    record = json.loads((out / "ftrecycle.json").read_text())
    assert [r["tensor"] for r in record["records"] if r["action"] == "token-rows"] == [emb]


def test_rows_past_the_diff_have_no_finetuned_value(tmp_path):
    v = make_versions("llama", tmp_path / "v", target_vocab=100)
    refs = (v["source_base"], v["source_finetuned"], v["target_base"])
    with pytest.raises(IncompatibleModelsError, match=r"row 98 .* has no fine-tuned value"):
        transfer(*refs, tmp_path / "o1", vocab="overlap", token_rows="finetuned", tokens="98")
    plain = load_dir(transfer(*refs, tmp_path / "o2", vocab="overlap").output)
    got = load_dir(transfer(*refs, tmp_path / "o3", vocab="overlap", token_rows="target", tokens="95,98").output)
    c = load_dir(v["target_base"])
    for name in HEADS:
        assert torch.equal(bits(got[name][[95, 98]]), bits(c[name][[95, 98]]))
        assert not torch.equal(bits(plain[name][95]), bits(c[name][95]))  # row 95 had the diff added


def test_row_norms_do_not_depend_on_the_block(chat, monkeypatch):
    from ftrecycle.io.checkpoint import open_checkpoint
    from ftrecycle.ops import token_rows as rows_mod

    with open_checkpoint(str(chat["source_finetuned"])) as ck:
        info = ck.tensors[HEADS[0]]
        ref = rows_mod.row_norms(ck, info)
        monkeypatch.setattr(rows_mod, "BLOCK", 32 * 7)  # 7 rows a block: the last block is partial
        assert (rows_mod.row_norms(ck, info) == ref).all()
    w = load_dir(chat["source_finetuned"])[HEADS[0]].double()
    assert torch.allclose(torch.from_numpy(ref), w.norm(dim=1), rtol=1e-12)
