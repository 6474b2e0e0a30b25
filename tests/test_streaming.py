"""Bounded memory on a large embedding, and SIGKILL safety, measured in a child process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftrecycle.io.output import TMP_MARK

from fixtures.synthetic import llama_config, write_synthetic

# The child reports its own peak: VmHWM is per address space, so (unlike ru_maxrss after fork+exec)
# it does not include the parent's size.
CHILD = """
import sys
from ftrecycle.cli import main
code = main(sys.argv[1:])
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
print('VmHWM_KiB', hwm)
sys.exit(code)
"""


def _trio(root: Path, layout: list[tuple[str, tuple[int, ...]]], **arch: int | bool) -> list[Path]:
    """One random model, copied twice: the values do not matter here, the sizes do."""
    a = write_synthetic(root / "a", layout, llama_config(**arch), noise=[], shard_size=1 << 29)
    b, c = root / "b", root / "c"
    shutil.copytree(a, b)
    shutil.copytree(a, c)
    return [a, b, c]


def _cmd(trio: list[Path], out: Path, *extra: str) -> list[str]:
    a, b, c = trio
    return [
        sys.executable,
        "-c",
        CHILD,
        "transfer",
        "--source-base",
        str(a),
        "--source-finetuned",
        str(b),
        "--target-base",
        str(c),
        "-o",
        str(out),
        "-q",
        *extra,
    ]


ARCH = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 64,
    "num_hidden_layers": 0,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": True,
}


@pytest.mark.slow
def test_peak_rss_under_budget_with_a_128256_x_4096_embedding(tmp_path):
    layout = [("model.embed_tokens.weight", (128256, 4096)), ("model.norm.weight", (4096,))]
    trio = _trio(tmp_path, layout, **ARCH)
    p = subprocess.run(_cmd(trio, tmp_path / "out"), capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    peak_mib = int(p.stdout.split("VmHWM_KiB")[1].split()[0]) / 1024
    # one bf16 copy of this tensor alone is 1002 MiB; the budget is 512 MiB
    assert peak_mib < 512, f"peak RSS {peak_mib:.0f} MiB"


@pytest.mark.slow
def test_sigkill_leaves_no_output_and_a_rerun_succeeds(tmp_path):
    layout = [("model.embed_tokens.weight", (128256, 2048)), ("model.norm.weight", (2048,))]
    trio = _trio(tmp_path, layout, **{**ARCH, "hidden_size": 2048})
    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(trio, out, "--threads", "1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    shard = None
    while time.monotonic() < deadline and proc.poll() is None:
        tmps = list(tmp_path.glob(f".out{TMP_MARK}*"))
        shards = [f for t in tmps for f in t.glob("*.safetensors")]
        if shards:
            shard = shards[0]
            break
        time.sleep(0.002)
    assert shard is not None and proc.poll() is None, "the transfer finished before it could be killed"
    time.sleep(0.05)  # let it write some data
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed transfer left a directory under the final name"
    assert list(tmp_path.glob(f".out{TMP_MARK}*")), "the kill came after the rename: test did not test"
    p = subprocess.run(_cmd(trio, out), capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    assert (out / "ftrecycle.json").is_file()
    assert not list(tmp_path.glob(f".out{TMP_MARK}*")), "the rerun left the stale temporary directory"


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["lowrank:rank=64", "sparse:ratio=8"])
def test_compression_peak_rss_under_budget_with_a_128256_x_2048_embedding(tmp_path, spec):
    layout = [("model.embed_tokens.weight", (128256, 2048)), ("model.norm.weight", (2048,))]
    cfg = llama_config(**{**ARCH, "hidden_size": 2048})
    base = write_synthetic(tmp_path / "a", layout, cfg, noise=[], shard_size=1 << 29)
    fin = write_synthetic(tmp_path / "b", layout, cfg, noise=[(1, 1e-3)], shard_size=1 << 29)
    delta = tmp_path / "delta"
    cmd = [sys.executable, "-c", CHILD, "diff", "--base", str(base), "--finetuned", str(fin), "-o", str(delta)]
    cmd += ["--delta-dtype", "bfloat16", "--compress", spec, "--max-memory", "512MiB", "-q"]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    peak_mib = int(p.stdout.split("VmHWM_KiB")[1].split()[0]) / 1024
    # the diff of this tensor in float32 alone is 1002 MiB; --max-memory bounds the whole command
    assert peak_mib < 512, f"{spec}: peak RSS {peak_mib:.0f} MiB"
    cmd = [sys.executable, "-c", CHILD, "apply", "--delta", str(delta), "--target-base", str(base)]
    cmd += ["-o", str(tmp_path / "out"), "--max-memory", "512MiB", "-q"]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    assert int(p.stdout.split("VmHWM_KiB")[1].split()[0]) / 1024 < 512
