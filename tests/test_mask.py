"""The gradient-sign mask (GradFix): the mask file, the masked transfer against an independent NumPy
reference bit for bit, the errors, the command line, and the lab's summary of experiment (i)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ftrecycle.cli import main
from ftrecycle.errors import CheckpointError, ConfigError, IncompatibleModelsError
from ftrecycle.finetune.gradmask import grad_sign_mask
from ftrecycle.io.hf_load import load_causal_lm
from ftrecycle.io.maskfile import MASK_FORMAT, open_mask, write_mask
from ftrecycle.ops.apply import apply_delta
from ftrecycle.ops.diff import diff
from ftrecycle.ops.transfer import transfer

from conftest import bits, load_dir
from fixtures.tiny import NUMBERS, make_versions


def _examples(path: Path, n: int, seed: int) -> Path:
    """``n`` prompt/completion lines of words the tiny tokenizers know."""
    rng = random.Random(seed)
    words = [str(i) for i in range(NUMBERS)] + [f"w{i}" for i in range(20)]
    lines = [
        json.dumps({"prompt": " ".join(rng.choices(words, k=10)), "completion": " ".join(rng.choices(words, k=6))})
        for _ in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """float32 versions (so a masked transfer's reference is plain float32 arithmetic): untied and tied."""
    root = tmp_path_factory.mktemp("mask")
    return {
        fam: make_versions(fam, root / fam, seed=30 + i, dtype=torch.float32)
        for i, fam in enumerate(("llama", "qwen2"))
    }


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _examples(tmp_path_factory.mktemp("calib") / "calib.jsonl", 12, 5)


def _random_mask(target: Path, out: Path, seed: int, *, drop: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """A mask of random -1/0/+1 for every tensor of ``target`` (but ``drop``), written as a mask file."""
    rng = np.random.default_rng(seed)
    signs = {
        n: rng.integers(-1, 2, size=tuple(t.shape), dtype=np.int8) for n, t in load_dir(target).items() if n not in drop
    }
    write_mask(out, signs, {"test": True})
    return signs


def _reference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, s: np.ndarray) -> np.ndarray:
    """C + Delta * [sign(Delta) == s] in float32, in NumPy, one rounding per operation."""
    d = b.numpy() - a.numpy()
    return c.numpy() + d * (np.sign(d) == s)


# --------------------------------------------------------------------------------------------- the mask file


def test_mask_is_the_sign_of_minus_the_summed_gradient(models, calib, tmp_path):
    target = models["llama"]["target_base"]
    res = grad_sign_mask(target, calib, tmp_path / "m.safetensors", examples=5, micro_batch=2, device="cpu")
    m = open_mask(res.output)
    try:
        assert m.info["examples"] == 5 and res.examples == 5
        assert m.info["calibration"]["sha256"] == hashlib.sha256(calib.read_bytes()).hexdigest()
        assert m.sha256 == hashlib.sha256(res.output.read_bytes()).hexdigest()
        stored = load_dir(res.output.parent)
        assert set(stored) == set(load_dir(target))  # every floating tensor of the checkpoint, its names
    finally:
        m.close()
    # an independent gradient: the whole batch at once, mean loss (another scale, same sign)
    from ftrecycle.finetune.data import Collator, encode, load_examples
    from ftrecycle.io.hf_load import load_tokenizer

    tok = load_tokenizer(target)
    feats = [encode(r, tok, 1024) for r in load_examples(calib)[:5]]
    batch = Collator(tok.pad_token_id)(feats)
    net = load_causal_lm(target, dtype=torch.float32).eval()
    net(**batch).loss.backward()
    params = dict(net.named_parameters())
    agree = total = 0
    for name, s in stored.items():
        g = params[name].grad
        want = torch.sign(-g).to(torch.int8)
        # summation order differs (one batch vs micro-batches): only entries with |g| near 0 may flip
        big = g.abs() > 1e-6 * g.abs().max()
        agree += int((want[big] == s[big]).sum())
        total += int(big.sum())
    assert agree == total, f"{total - agree} of {total} signs differ"


def test_majority_vote_is_the_sign_of_the_examples_summed_signs(models, calib, tmp_path):
    from ftrecycle.finetune.data import Collator, encode, load_examples
    from ftrecycle.io.hf_load import load_tokenizer

    target = models["qwen2"]["target_base"]  # tied: the embedding's vote counts both of its uses
    res = grad_sign_mask(target, calib, tmp_path / "m.safetensors", examples=4, vote="majority", device="cpu")
    assert res.info["vote"] == "majority"
    stored = load_dir(tmp_path)
    tok = load_tokenizer(target)
    net = load_causal_lm(target, dtype=torch.float32).eval()
    params = dict(net.named_parameters())
    votes = {n: torch.zeros_like(p) for n, p in params.items()}
    small = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in params.items()}
    for row in load_examples(calib)[:4]:
        net.zero_grad()
        net(**Collator(tok.pad_token_id)([encode(row, tok, 1024)])).loss.backward()
        for n, p in params.items():
            votes[n] += torch.sign(-p.grad)
            small[n] |= p.grad.abs() <= 1e-6 * p.grad.abs().max()  # a sign summation order may flip
    for name, s in stored.items():
        n = name if name in params else "model.embed_tokens.weight"
        want = torch.sign(votes[n]).to(torch.int8)
        assert torch.equal(want[~small[n]], s[~small[n]]), name
    with pytest.raises(ConfigError, match="vote 'mean' is not one of sum, majority"):
        grad_sign_mask(target, calib, tmp_path / "x.safetensors", vote="mean")


def test_mask_file_round_trip_and_refusals(tmp_path):
    signs = {"a.weight": np.array([[1, -1, 0]], dtype=np.int8), "b": np.array([0, 1], dtype=np.int8)}
    write_mask(tmp_path / "m.safetensors", signs, {"examples": 3})
    m = open_mask(tmp_path / "m.safetensors")
    buf = np.empty(64, dtype=np.uint8)
    assert m.info == {"examples": 3}
    assert m.ckpt.read(m.ckpt.tensors["a.weight"], 0, 3, buf).tolist() == [1, -1, 0]
    m.close()
    # a value other than -1/0/+1, another format, a missing file: one clear error naming the file
    raw = bytearray((tmp_path / "m.safetensors").read_bytes())
    raw[-1] = 5
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"bad.safetensors.*other than -1, 0 and \+1"):
        open_mask(tmp_path / "bad.safetensors")
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, dtype=np.int8)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match=f"plain.safetensors: not a mask file.*{MASK_FORMAT}"):
        open_mask(tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        open_mask(tmp_path / "none.safetensors")


# --------------------------------------------------------------------------------------------- masked transfer


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_masked_transfer_equals_the_numpy_reference_bit_for_bit(models, family, tmp_path):
    v = models[family]
    signs = _random_mask(v["target_base"], tmp_path / "m.safetensors", 7)
    out = transfer(
        str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"]), tmp_path / "out",
        mask=str(tmp_path / "m.safetensors"), threads=2,
    )  # fmt: skip
    a, b, c, got = (load_dir(p) for p in (v["source_base"], v["source_finetuned"], v["target_base"], out.output))
    kept = nonzero = 0
    for name, s in signs.items():
        want = _reference(a[name], b[name], c[name], s)
        assert torch.equal(bits(got[name]), bits(torch.from_numpy(want))), name
        d = b[name].numpy() - a[name].numpy()
        kept += int(np.count_nonzero(d * (np.sign(d) == s)))
        nonzero += int(np.count_nonzero(d))
    rec = out.provenance["mask"]
    assert rec["sha256"] == hashlib.sha256((tmp_path / "m.safetensors").read_bytes()).hexdigest()
    assert (rec["kept"], rec["nonzero"]) == (kept, nonzero) and rec["kept_fraction"] == kept / nonzero
    assert json.loads((out.output / "ftrecycle.json").read_text())["mask"]["kept"] == kept
    # the same bits with one thread and the smallest chunks
    again = transfer(
        str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"]), tmp_path / "again",
        mask=str(tmp_path / "m.safetensors"), threads=1, max_memory="40MiB",
    )  # fmt: skip
    assert all(torch.equal(bits(t), bits(load_dir(again.output)[n])) for n, t in got.items())


def test_a_mask_made_on_another_target_is_named_in_a_warning(models, calib, tmp_path):
    v = models["llama"]
    refs = (str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"]))
    own = grad_sign_mask(v["target_base"], calib, tmp_path / "own.safetensors", examples=2, device="cpu").output
    other = grad_sign_mask(v["source_base"], calib, tmp_path / "other.safetensors", examples=2, device="cpu").output
    assert transfer(*refs, tmp_path / "t1", mask=str(own)).warnings == []
    warned = transfer(*refs, tmp_path / "t2", mask=str(other)).warnings
    assert len(warned) == 1 and "other.safetensors was made on another target" in warned[0]


def test_apply_with_a_mask_equals_transfer_with_it(models, tmp_path):
    v = models["llama"]
    _random_mask(v["target_base"], tmp_path / "m.safetensors", 8)
    mask = str(tmp_path / "m.safetensors")
    t = transfer(str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"]), tmp_path / "t", mask=mask)
    d = diff(str(v["source_base"]), str(v["source_finetuned"]), tmp_path / "d")
    ap = apply_delta(d.output, str(v["target_base"]), tmp_path / "ap", mask=mask)
    got, want = load_dir(ap.output), load_dir(t.output)
    assert all(torch.equal(bits(got[n]), bits(want[n])) for n in want)
    assert ap.provenance["mask"]["kept"] == t.provenance["mask"]["kept"]


def test_a_tensor_without_mask_entry_is_added_whole_and_recorded(models, tmp_path):
    v = models["llama"]
    skip = "model.norm.weight"
    _random_mask(v["target_base"], tmp_path / "m.safetensors", 9, drop=(skip,))
    out = transfer(
        str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"]), tmp_path / "out",
        mask=str(tmp_path / "m.safetensors"),
    )  # fmt: skip
    a, b, c = (load_dir(v[k]) for k in ("source_base", "source_finetuned", "target_base"))
    plain = c[skip].numpy() + (b[skip].numpy() - a[skip].numpy())
    assert np.array_equal(load_dir(out.output)[skip].numpy().view(np.int32), plain.view(np.int32))
    assert {"tensor": skip, "action": "unmasked", "reason": "mask file m.safetensors has no entry for it; "
            "its diff is added whole"} in out.records  # fmt: skip


def test_a_mask_of_another_shape_is_refused_naming_the_tensor(models, tmp_path):
    v = models["llama"]
    signs = _random_mask(v["target_base"], tmp_path / "m.safetensors", 1)
    signs["model.norm.weight"] = np.zeros(5, dtype=np.int8)
    write_mask(tmp_path / "m.safetensors", signs, {})
    with pytest.raises(IncompatibleModelsError, match=r"'model.norm.weight' has shape \[5\] in mask file"):
        transfer(
            str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"]), tmp_path / "out",
            mask=str(tmp_path / "m.safetensors"),
        )  # fmt: skip
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="grad_sign_mask"):
        transfer(
            str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"]), tmp_path / "o", mask="grad-sign"
        )


# --------------------------------------------------------------------------------------------- command line


def _models_args(v: dict[str, Path]) -> list[str]:
    return ["--source-base", str(v["source_base"]), "--source-finetuned", str(v["source_finetuned"]),
            "--target-base", str(v["target_base"])]  # fmt: skip


def test_cli_mask_flags_refused_when_they_cannot_be_used(models, calib, tmp_path, capsys):
    v = models["llama"]
    base = ["transfer", *_models_args(v), "-o", str(tmp_path / "o"), "-q"]
    cases = [
        (["--mask", "grad-sign"], "--mask grad-sign needs --calibration FILE"),
        (["--mask-examples", "4"], "--mask-examples is only used with --mask grad-sign"),
        (["--calibration", str(calib)], "--calibration is only used with --alpha auto or --mask grad-sign"),
        (["--mask", str(tmp_path / "none.safetensors")], "none.safetensors: no such file"),
        (["--mask", str(calib)], "calib.jsonl"),  # not a safetensors file: its header is refused
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    apply = ["apply", "--delta", str(tmp_path), "--target-base", str(v["target_base"]), "-o", str(tmp_path / "o")]
    assert main([*apply, "--mask", "grad-sign"]) == 2
    assert "make the mask with `ftrecycle mask`" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_grad_sign_transfer_equals_mask_then_transfer(models, calib, tmp_path, capsys):
    v = models["qwen2"]
    mask = tmp_path / "m.safetensors"
    common = ["--calibration", str(calib), "--mask-examples", "6"]
    assert main(["mask", "--target-base", str(v["target_base"]), *common, "-o", str(mask), "--device", "cpu"]) == 0
    assert "the sign of -grad (sum) on 6 example(s)" in capsys.readouterr().out
    assert main(["transfer", *_models_args(v), "-o", str(tmp_path / "a"), "--mask", str(mask), "-q"]) == 0
    assert main(["transfer", *_models_args(v), "-o", str(tmp_path / "b"), "--mask", "grad-sign", *common, "-q"]) == 0
    a, b = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    assert all(torch.equal(bits(a[n]), bits(b[n])) for n in a)
    rec = json.loads((tmp_path / "b" / "ftrecycle.json").read_text())["mask"]
    assert rec["made"]["examples"] == 6 and 0 < rec["kept_fraction"] < 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the scratch mask is gone


# --------------------------------------------------------------------------------------------- lab (i)


def _lab_record(seed: int) -> dict[str, Any]:
    """A made-up seed record: M5+Δ4 hurt by plain transfer and less by the mask, M4+Δ5 helped, the rest flat."""
    from ftrecycle.lab.pretrain import VERSIONS

    base = {v: 20.0 + k for k, v in enumerate(VERSIONS)}
    transfer = {j: {i: base[j] for i in VERSIONS if i != j} for j in VERSIONS}
    masked = {j: {i: {"accuracy": base[j], "kept_fraction": 0.5} for i in VERSIONS if i != j} for j in VERSIONS}
    transfer["M5"]["M4"] = base["M5"] - 10.0 - seed  # plain hurts
    masked["M5"]["M4"]["accuracy"] = base["M5"] - 4.0  # masked loses less
    transfer["M4"]["M5"] = base["M4"] + 6.0  # plain helps, masked hurts a little
    masked["M4"]["M5"]["accuracy"] = base["M4"] - 1.0
    transfer["M1"]["M2"] = base["M1"] - 2.0  # plain hurts, masked hurts more
    masked["M1"]["M2"]["accuracy"] = base["M1"] - 3.0
    return {"base": base, "transfer": transfer, "masked": {"16": masked}}


def test_lab_masking_summary_from_a_made_up_record():
    from ftrecycle.lab.masking import masking_summary

    s = masking_summary(_lab_record(0))["16"]
    assert len(s["rows"]) == 20
    h = s["harmful"]
    assert h["names"] == ["M1+Δ2", "M5+Δ4"] and h["pairs"] == 2
    assert (h["mean_plain_gain"], h["mean_masked_gain"]) == (-6.0, -3.5)
    assert h["loses_less"] == 1 and h["masked_worse"] == 1
    assert s["made_harmful"] == 1  # M4+Δ5
    assert s["all"]["masked_better"] == 1 and s["all"]["masked_worse"] == 2
    assert s["all"]["mean_plain_gain"] == round((-10 + 6 - 2) / 20, 2)
    assert s["mean_kept_pct"] == 50.0 and s["examples"] == 16


def test_lab_masking_report_section_shows_the_numbers():
    from ftrecycle.lab.masking import masking_summary
    from ftrecycle.lab.report import _masking

    seeds = {"0": _lab_record(0), "1": _lab_record(1)}
    results = {
        "masking": {
            "mean": masking_summary(seeds["0"]),
            "per_seed": {k: masking_summary(v) for k, v in seeds.items()},
        }
    }
    text = "\n".join(_masking(results))
    assert "| M5+Δ4 | -10.0 | -4.0 | 50.0 |" in text
    assert "loses less on **1 of 2**" in text
    assert "Seed 1: 2 harmful pair(s), mean gain -6.5 plain, -3.5 masked" in text


def test_a_compressed_transfer_applies_and_records_the_mask(models, tmp_path):
    v = models["llama"]
    _random_mask(v["target_base"], tmp_path / "m.safetensors", 3)
    refs = (str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"]))
    masked = transfer(*refs, tmp_path / "m", compress="int8", mask=str(tmp_path / "m.safetensors"))
    plain = transfer(*refs, tmp_path / "p", compress="int8")
    assert "mask" not in plain.provenance and 0 < masked.provenance["mask"]["kept_fraction"] < 1
    got, want = load_dir(masked.output), load_dir(plain.output)
    assert any(not torch.equal(got[n], want[n]) for n in want)


def test_recycle_refuses_a_mask(models, tmp_path):
    from ftrecycle.options import Masking, TransferOptions
    from ftrecycle.recycle.start import recycle_finetune

    v = models["llama"]
    opts = TransferOptions(masking=Masking(mask=str(tmp_path / "m.safetensors")))
    with pytest.raises(ConfigError, match="mask is not supported"):
        recycle_finetune(
            str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"]), tmp_path / "t.jsonl",
            tmp_path / "o", transfer=opts,
        )  # fmt: skip


def test_lab_masked_jobs_cover_every_pair_and_setting(tmp_path):
    from ftrecycle.lab.config import preset
    from ftrecycle.lab.experiments import MASK_SETTINGS, pairs, seed_jobs

    data = {k: tmp_path / f"{k}.jsonl" for k in ("train", "test", "language_train", "language_test")}
    jobs = {j.id[len("s0:") :]: j for j in seed_jobs(preset("smoke"), 0, tmp_path, data)}
    masked = {n: j for n, j in jobs.items() if "@mask" in n}
    assert len(masked) == len(pairs()) * len(MASK_SETTINGS) == 60
    j = masked["M5+d4@mask16"]
    assert j.kwargs["examples"] == 16 and "vote" not in j.kwargs and j.deps == ("s0:ft-M4",)
    assert j.kwargs["source_finetuned"].endswith("ft-M4") and j.kwargs["target_base"].endswith("pretrain/M5")
    assert masked["M4+d5@mask64maj"].kwargs["vote"] == "majority"
    outs = [j.kwargs["out"] for j in masked.values()]
    assert len(set(outs)) == len(outs)
    from ftrecycle.lab.run import job_kind

    assert {job_kind("s1:" + n) for n in masked} == {"masked (i)"}
    assert job_kind("s0:M5+d4@int8") == "compressed"


@pytest.mark.parametrize("kind", ["fifo", "directory", "empty"])
def test_a_mask_that_is_no_regular_safetensors_file_is_one_clear_error(tmp_path, kind):
    import os

    p = tmp_path / "m.safetensors"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "directory":
        p.mkdir()
    else:
        p.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"m\.safetensors"):
        open_mask(p)
