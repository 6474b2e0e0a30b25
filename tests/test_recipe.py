"""docs/recipe.md, run: every ``ftrecycle`` command of its bash blocks, in order, on tiny models, through the CLI."""

from __future__ import annotations

import json
import random
import re
import shlex
from pathlib import Path

import pytest
import torch

from ftrecycle.cli import main

from fixtures.tiny import make_versions

RECIPE = Path(__file__).resolve().parents[1] / "docs" / "recipe.md"
# the recipe's settings, made small: a few steps at a rate that moves a tiny model
TINY_TRAIN = "max-steps: 6\nbatch-size: 4\nlearning-rate: 1.0e-3\nlr-scheduler: cosine\neval-every: 3\nsave-every: 3\n"


def recipe_commands() -> list[list[str]]:
    """The argument lists of the ``ftrecycle`` commands in the recipe's bash blocks, in order."""
    blocks = re.findall(r"```bash\n(.*?)```", RECIPE.read_text(), flags=re.S)
    lines = [ln.strip() for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    return [shlex.split(ln)[1:] for ln in lines if ln.startswith("ftrecycle ")]


def _item(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return {"question": f"{a} + {b} = ?", "answer": f"{a} + {b} = {a + b} . The answer is {a + b} #### {a + b}"}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory with A, B, C and the recipe's data files, made the working directory."""
    v = make_versions("llama", tmp_path / "models", seed=3)
    for name, key in (("A", "source_base"), ("B", "source_finetuned"), ("C", "target_base")):
        v[key].rename(tmp_path / name)
    rng = random.Random(0)
    for name, n in (("train", 48), ("calib", 16), ("test", 6)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(_item(rng)) + "\n" for _ in range(n)))
    (tmp_path / "train.yaml").write_text(TINY_TRAIN)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_recipe_lists_every_step():
    cmds = [c[0] for c in recipe_commands()]
    assert cmds == ["diagnose", "transfer", "eval", "recycle-finetune", "recycle-finetune", "recycle-finetune", "eval"]


def test_the_recipe_runs_end_to_end(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for argv in recipe_commands():
        rc = main(argv)
        out, err = capsys.readouterr()
        assert rc == 0, f"ftrecycle {shlex.join(argv)}: {err}"
        if argv[0] == "diagnose":
            assert re.search(r"likely helps|uncertain|likely hurts", out), out
        if argv[0] == "eval":
            models = [argv[i + 1] for i, a in enumerate(argv) if a == "--model"]
            assert all(f"| {m} | " in out for m in models) and "strict" in out, out
    # the transfer: an exact C + (B - A) directory
    assert json.loads((workdir / "C-plus-delta" / "ftrecycle.json").read_text())["operation"] == "transfer"
    # full fine-tuning: a full model with its curve (loss and accuracy: test.jsonl is GSM8K-format)
    full = json.loads((workdir / "rft-full" / "ftrecycle.json").read_text())
    assert full["operation"] == "recycle-finetune" and full["steps"] == 6 and "lora" not in full
    assert [e["step"] for e in full["eval_log"]] == [0, 3, 6] and {"eval_loss", "strict"} <= set(full["eval_log"][0])
    AutoModelForCausalLM.from_pretrained(workdir / "rft-full")
    # LoRA: an adapter kept with its base OUT/start, C + Δ, which is the transfer's result (the config names no
    # local path by default: the adapter is loaded on OUT/start explicitly, as its card shows)
    conf = json.loads((workdir / "rft-lora" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] is None
    assert "rft-lora/start" in (workdir / "rft-lora" / "README.md").read_text()
    start = AutoModelForCausalLM.from_pretrained(workdir / "rft-lora" / "start", dtype=torch.float32)
    moved = AutoModelForCausalLM.from_pretrained(workdir / "C-plus-delta", dtype=torch.float32)
    s, m = start.state_dict(), moved.state_dict()
    assert s.keys() == m.keys() and all(torch.equal(s[k], m[k]) for k in s)
    adapted = PeftModel.from_pretrained(start, workdir / "rft-lora")
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        assert not torch.equal(adapted(ids).logits, moved(ids).logits)  # the adapter was trained
    lora = json.loads((workdir / "rft-lora" / "ftrecycle.json").read_text())
    assert lora["lora"]["output"] == "adapter" and lora["config"]["learning_rate"] == 1e-4  # the flag won
    # --merge: a full model transformers loads, no start/ kept
    merged = workdir / "rft-lora-merged"
    assert not (merged / "start").exists() and not (merged / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(merged)
    # nothing is left behind beside the outputs
    assert not [p.name for p in workdir.iterdir() if p.name.startswith(".")]
