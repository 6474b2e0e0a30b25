"""Bad input: exit code 2, one clear line naming the file or tensor, inputs unchanged, no output."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ftrecycle.cli import main
from ftrecycle.io.output import TMP_MARK

from conftest import load_dir, tree_digest


def _run(
    capsys,
    v: dict[str, Path],
    out: Path,
    *extra: str,
    a: Path | None = None,
    b: Path | None = None,
    c: Path | None = None,
) -> tuple[int, str]:
    code = main(
        [
            "transfer",
            "--source-base",
            str(a or v["source_base"]),
            "--source-finetuned",
            str(b or v["source_finetuned"]),
            "--target-base",
            str(c or v["target_base"]),
            "-o",
            str(out),
            "-q",
            # this process is pytest with transformers loaded, not a fresh command: give it room
            "--max-memory",
            "16GiB",
            *extra,
        ]
    )
    return code, capsys.readouterr().err


def _copy(v: dict[str, Path], tmp: Path, role: str, damage: Callable[[Path], None]) -> Path:
    dst = tmp / f"{role}-damaged"
    shutil.copytree(v[role], dst)
    damage(dst)
    return dst


def _first_shard(d: Path) -> Path:
    return sorted(d.glob("*.safetensors"))[0]


def _truncate(d: Path) -> None:
    f = _first_shard(d)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])


def _corrupt_header(d: Path) -> None:
    f = _first_shard(d)
    data = bytearray(f.read_bytes())
    data[8:20] = b"#" * 12
    f.write_bytes(bytes(data))


def _drop_shard(d: Path) -> None:
    _first_shard(d).unlink()


def _no_weights(d: Path) -> None:
    for f in d.glob("*.safetensors*"):
        f.unlink()


def _nan(d: Path) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.up_proj.weight"
    shard = d / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name][3, 4] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})


def _bad_config(d: Path) -> None:
    (d / "config.json").write_text("{not json")


CASES = {
    "truncated shard": ("source_finetuned", _truncate, "truncated", []),
    "corrupt header": ("target_base", _corrupt_header, "corrupt safetensors header", []),
    "index names a missing shard": ("source_base", _drop_shard, "are not in", []),
    "no weights": ("target_base", _no_weights, "no weights found", []),
    "non-finite result": ("source_finetuned", _nan, "model.layers.0.mlp.up_proj.weight", []),
    "bad config.json": ("source_base", _bad_config, "config.json: not valid JSON", []),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_input(versions, tmp_path, capsys, case):
    role, damage, needle, extra = CASES[case]
    v = versions["llama"]
    damaged = _copy(v, tmp_path, role, damage)
    before = tree_digest(v["source_base"], v["source_finetuned"], v["target_base"], damaged)
    out = tmp_path / "out"
    kw = {"source_base": "a", "source_finetuned": "b", "target_base": "c"}[role]
    code, err = _run(capsys, v, out, *extra, **{kw: damaged})
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftrecycle: error:") and needle in lines[0], err
    assert not out.exists() and not list(tmp_path.glob(f".out{TMP_MARK}*"))
    assert tree_digest(v["source_base"], v["source_finetuned"], v["target_base"], damaged) == before


def test_nonfinite_allowed_on_request(versions, tmp_path, capsys):
    v = versions["llama"]
    damaged = _copy(v, tmp_path, "source_finetuned", _nan)
    code, err = _run(capsys, v, tmp_path / "out", "--allow-nonfinite", b=damaged)
    assert code == 0, err
    assert torch.isnan(load_dir(tmp_path / "out")["model.layers.0.mlp.up_proj.weight"].float()).any()


def test_existing_output_needs_force(versions, tmp_path, capsys):
    v = versions["llama"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(capsys, v, out)
    assert code == 2 and "--force" in err and (out / "keep.txt").read_text() == "mine"
    code, err = _run(capsys, v, out, "--force")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "ftrecycle.json").is_file()


def test_output_inside_an_input_is_refused(versions, tmp_path, capsys):
    v = versions["llama"]
    target = tmp_path / "c"
    shutil.copytree(v["target_base"], target)
    before = tree_digest(target)
    for out in (target / "sub", target, tmp_path):
        code, err = _run(capsys, v, out, "--force", c=target)
        assert code == 2 and "overlaps input" in err, err
    assert tree_digest(target) == before


def test_not_enough_disk_space(versions, tmp_path, capsys, monkeypatch):
    import ftrecycle.io.output as output

    class Usage:
        free = 1000

    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: Usage())
    code, err = _run(capsys, versions["llama"], tmp_path / "out")
    assert code == 2 and "not enough free space" in err and not (tmp_path / "out").exists()


def test_pickle_refused_then_allowed(versions, tmp_path, capsys):
    v = versions["llama"]
    pick = tmp_path / "pickled"
    shutil.copytree(v["source_finetuned"], pick)
    state = load_dir(pick)
    for f in pick.glob("*.safetensors*"):
        f.unlink()
    torch.save(state, pick / "pytorch_model.bin")  # the layout of older Hugging Face checkpoints
    code, err = _run(capsys, v, tmp_path / "out", b=pick)
    assert code == 2 and "--allow-pickle" in err and "pytorch_model" in err
    code, err = _run(capsys, v, tmp_path / "out", "--allow-pickle", b=pick)
    assert code == 0, err
    code, err = _run(capsys, v, tmp_path / "ref")
    assert code == 0, err
    got, want = load_dir(tmp_path / "out"), load_dir(tmp_path / "ref")
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--shard-size", "lots"], "--shard-size"),
        (["--max-memory", "1MiB"], "--max-memory"),
        (["--alpha", "nan"], "--alpha"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_bad_options(versions, tmp_path, capsys, args, needle):
    code, err = _run(capsys, versions["llama"], tmp_path / "out", *args)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_default_budget_is_on_top_of_what_the_process_holds(versions, tmp_path, capsys):
    """Without --max-memory a command that already holds more than the default (here 600 MiB of
    ballast; in practice the models `--alpha auto` loaded) still runs; an explicit bound is a peak RSS."""
    import numpy as np

    from ftrecycle.engine import current_rss

    v = versions["llama"]
    ballast = np.ones(600 * 2**20, dtype=np.uint8)  # touched, so resident
    assert current_rss() > 600 * 2**20
    args = [
        "transfer",
        *("--source-base", str(v["source_base"]), "--source-finetuned", str(v["source_finetuned"])),
        *("--target-base", str(v["target_base"]), "-q"),
    ]
    assert main([*args, "-o", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert main([*args, "-o", str(tmp_path / "o2"), "--max-memory", "512MiB"]) == 2
    assert "below what this process already holds" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    del ballast


def test_missing_path_and_offline_hub_id(versions, tmp_path, capsys):
    v = versions["llama"]
    code, err = _run(capsys, v, tmp_path / "out", a=tmp_path / "nowhere")
    assert code == 2 and "no such directory" in err
    code = main(
        [
            "transfer",
            "--source-base",
            "some-org/some-model@v1",
            "--source-finetuned",
            str(v["source_finetuned"]),
            "--target-base",
            str(v["target_base"]),
            "-o",
            str(tmp_path / "out"),
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "some-org/some-model@v1" in err and "local directory" in err, err
    assert len(err.strip().splitlines()) == 1


def test_delta_errors(versions, tmp_path, capsys):
    v = versions["llama"]
    assert (
        main(
            [
                "diff",
                "--base",
                str(v["source_base"]),
                "--finetuned",
                str(v["source_finetuned"]),
                "-o",
                str(tmp_path / "d"),
                "-q",
            ]
        )
        == 0
    )
    code = main(
        [
            "apply",
            "--delta",
            str(v["source_base"]),
            "--target-base",
            str(v["target_base"]),
            "-o",
            str(tmp_path / "o"),
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "not a delta directory" in err
    code = main(
        [
            "apply",
            "--delta",
            str(tmp_path / "d"),
            "--target-base",
            str(versions["qwen2"]["target_base"]),
            "-o",
            str(tmp_path / "o"),
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "different architectures" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "spec",
    ["lowrank:rank=2", "mpsvd:ratio=8", "signlr:rank=2", "kbit:bits=3", "sign:axis=col", "lossless", "auto:ratio=4"],
)
def test_a_nan_in_the_diff_is_one_clear_error_for_every_codec(versions, tmp_path, capsys, spec):
    v = versions["llama"]
    damaged = _copy(v, tmp_path, "source_finetuned", _nan)
    out = tmp_path / "delta"
    args = ["--base", str(v["source_base"]), "--finetuned", str(damaged), "-o", str(out), "--compress", spec]
    code = main(["diff", *args, "-q"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err  # no numpy warning before it, no internal error
    assert "model.layers.0.mlp.up_proj.weight" in lines[0] and "NaN" in lines[0], err
    assert not out.exists()
