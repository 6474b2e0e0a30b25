"""Scale-out: real processes under ``accelerate launch`` on CPU (gloo), with the shipped configs.

Every test here starts two Python processes through accelerate's own launcher
(torchrun underneath), as a user would, on a tiny model. On a machine without GPUs,
accelerate runs both the DDP and the FSDP config as CPU data parallel (MULTI_CPU over
gloo: accelerate 1.x selects FSDP only on accelerator devices), so what is checked
here is the rank handling, the data split, the loss against one process with the
same global batch, the gathered final model and the refusals, not FSDP's sharding.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftrecycle.finetune.config import FinetuneConfig
from ftrecycle.finetune.train import finetune, work_dir

from conftest import tree_digest
from fixtures.tiny import make_versions

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "accelerate"
STEPS, PER_PROCESS, PROCS = 4, 2, 2
# Losses of two processes x batch 2 against one process x batch 4: the same examples in the same
# global batches, summed in another order (measured: max relative difference about 1e-7).
LOSS_RTOL = 1e-4
FT_FLAGS = ["--max-steps", str(STEPS), "--logging-every", "1", "--learning-rate", "1e-3", "--save-every", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    config: str, *args: str, script: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """``accelerate launch --config_file examples/accelerate/CONFIG`` with 2 CPU processes (only
    the process count and mixed precision changed from the shipped file)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    target = [str(script)] if script is not None else ["-m", "ftrecycle.cli"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config)]
    cmd += ["--num_processes", str(PROCS), "--mixed_precision", "no", "--main_process_port", str(_free_port())]
    return subprocess.run(cmd + target + list(args), env=env, capture_output=True, text=True, timeout=timeout)


def _item(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return {"question": f"{a} + {b} = ?", "answer": f"{a} + {b} = {a + b} . The answer is {a + b} #### {a + b}"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    found = dict(make_versions("llama", root / "v", seed=3))
    # qwen2 ties lm_head to the embeddings: the gathered state dict names both, the output must not
    found.update({f"tied_{k}": v for k, v in make_versions("qwen2", root / "tied", seed=4).items()})
    rng = random.Random(0)
    found["train"] = root / "train.jsonl"
    found["train"].write_text("".join(json.dumps(_item(rng)) + "\n" for _ in range(32)))
    found["test"] = root / "test.jsonl"
    found["test"].write_text("".join(json.dumps(_item(rng)) + "\n" for _ in range(5)))
    return found


@pytest.fixture(scope="module")
def single(setup: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, float]]:
    """The loss curve of one process with the same global batch (2 x 2 = 4)."""
    out = tmp_path_factory.mktemp("single") / "ft"
    cfg = FinetuneConfig(
        max_steps=STEPS, batch_size=PER_PROCESS * PROCS, logging_every=1, learning_rate=1e-3, save_every=2
    )
    return finetune(str(setup["source_base"]), setup["train"], out, config=cfg).losses


def _names(model_dir: Path) -> list[str]:
    from safetensors import safe_open

    return sorted(k for f in model_dir.glob("*.safetensors") for k in safe_open(str(f), "pt").keys())


def _loads_and_transfers(
    out: Path, setup: dict[str, Path], tmp: Path, prefix: str = "", base: str = "source_base"
) -> None:
    """``out`` loads as an ordinary model and transfers as a fine-tune of ``base`` (what its record names)."""
    from transformers import AutoModelForCausalLM

    from ftrecycle import transfer

    setup = {k.removeprefix(prefix): v for k, v in setup.items() if k.startswith(prefix)}
    assert _names(out) == _names(setup["source_base"])  # the same tensors as the model it started from
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16  # saved in the source's dtype, not the float32 training copy
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin")) and not list(out.glob("pytorch_model*"))
    moved = transfer(str(setup[base]), str(out), str(setup["target_base"]), tmp / "moved")
    assert (moved.output / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ddp.yaml", "fsdp.yaml"])
def test_two_process_finetune_matches_one_process_and_leaves_an_ordinary_model(config, setup, single, tmp_path):
    out = tmp_path / "ft"
    r = launch(
        config,
        "finetune",
        "--model", str(setup["source_base"]),
        "--data", str(setup["train"]),
        "-o", str(out),
        "--batch-size", str(PER_PROCESS),
        *FT_FLAGS,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1, r.stdout  # one report, from the main process
    rec = json.loads((out / "ftrecycle.json").read_text())
    assert rec["processes"] == PROCS and rec["distributed"] == "MULTI_CPU" and rec["global_batch"] == 4
    got = [loss for _, loss in rec["losses"]]
    want = [loss for _, loss in single]
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, want, strict=True))
    assert len(got) == STEPS and worst <= LOSS_RTOL, f"2 processes {got} vs 1 process {want}: rel diff {worst:.2e}"
    assert not work_dir(out).exists() and not list(tmp_path.glob(".ft*"))  # the run and temp dirs are gone
    _loads_and_transfers(out, setup, tmp_path)


@pytest.mark.slow
def test_deepspeed_zero3_on_two_cpu_processes_gathers_an_ordinary_model(setup, single, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    out = tmp_path / "ft"
    r = launch(
        "deepspeed_zero3.yaml",
        "finetune",
        "--model", str(setup["source_base"]),
        "--data", str(setup["train"]),
        "-o", str(out),
        "--batch-size", str(PER_PROCESS),
        *FT_FLAGS,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((out / "ftrecycle.json").read_text())
    assert rec["processes"] == PROCS and rec["distributed"] == "DEEPSPEED"
    # the first step sees the same weights and the same global batch as one process
    assert abs(rec["losses"][0][1] - single[0][1]) <= LOSS_RTOL * abs(single[0][1]), (rec["losses"], single)
    _loads_and_transfers(out, setup, tmp_path)


def _refusal_cases(setup: dict[str, Path], tmp: Path) -> dict[str, list[str]]:
    existing = tmp / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    unfinished = tmp / "unfinished"
    work_dir(unfinished).mkdir()
    base = ["finetune", "--model", str(setup["source_base"]), "--data", str(setup["train"]), *FT_FLAGS]
    return {
        "output exists without --force": [*base, "-o", str(existing)],
        "unfinished run without --resume": [*base, "-o", str(unfinished)],
        "output inside the input model": [*base, "-o", str(setup["source_base"] / "out")],
        "missing data file": [*base[:4], str(tmp / "nope.jsonl"), *FT_FLAGS, "-o", str(tmp / "o")],
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        "output exists without --force",
        "unfinished run without --resume",
        "output inside the input model",
        "missing data file",
    ],
)
def test_a_refused_start_is_one_line_and_the_same_exit_code_on_every_rank(case, setup, tmp_path):
    args = _refusal_cases(setup, tmp_path)[case]
    before = tree_digest(tmp_path, setup["source_base"])
    r = launch("ddp.yaml", *args, timeout=300)
    lines = [line for line in (r.stdout + r.stderr).splitlines() if "ftrecycle: error:" in line]
    assert len(lines) == 1, r.stderr[-3000:]
    # torchrun's own report lists every rank's exit code: 2 from both, none killed by the launcher
    codes = re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", r.stderr, flags=re.M)
    assert r.returncode != 0 and codes == ["2"] * PROCS, (codes, r.stderr[-3000:])
    assert "/ftrecycle/" not in "".join(re.findall(r'File "[^"]+"', r.stderr))  # no traceback from our code
    assert tree_digest(tmp_path, setup["source_base"]) == before  # nothing created, changed or removed


@pytest.mark.slow
def test_recycle_finetune_under_two_processes(setup, tmp_path):
    out = tmp_path / "recycled"
    r = launch(
        "ddp.yaml",
        "recycle-finetune",
        "--source-base", str(setup["tied_source_base"]),
        "--source-finetuned", str(setup["tied_source_finetuned"]),
        "--target-base", str(setup["tied_target_base"]),
        "--data", str(setup["train"]),
        "--eval-data", str(setup["test"]),
        "--eval-max-new-tokens", "4",
        "--eval-batch-size", "2",
        "-o", str(out),
        "--batch-size", str(PER_PROCESS),
        *FT_FLAGS,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((out / "ftrecycle.json").read_text())
    assert rec["processes"] == PROCS and rec["recycled_from"]["alpha"] == 1.0
    assert [e["step"] for e in rec["eval_log"]] == [0, STEPS] and all(e["n"] == 5 for e in rec["eval_log"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recycled"]  # start, run and temp dirs removed
    # a recycled model is a fine-tune of the target (its record says so; another base is refused)
    _loads_and_transfers(out, setup, tmp_path, prefix="tied_", base="target_base")


@pytest.mark.slow
def test_iterate_under_two_processes_and_its_rerun_skips_every_finished_step(setup, tmp_path):
    chain = tmp_path / "chain.yaml"
    chain.write_text(
        f"versions: [{setup['source_base']}, {setup['target_base']}]\n"
        f"data: {setup['train']}\neval_data: {setup['test']}\noutput: out\n"
        "finetune: {max_steps: 2, batch_size: 2, logging_every: 1, eval_max_new_tokens: 4, eval_batch_size: 2}\n"
    )
    r = launch("ddp.yaml", "iterate", str(chain))
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    want = ["M1-star", "M2-plus-delta-1", "M2-star", "delta-1", "scores.json", "summary.json", "summary.md"]
    assert sorted(p.name for p in out.iterdir()) == want
    assert r.stdout.count("# iterate") == 1  # one table, from the main process
    rows = json.loads((out / "summary.json").read_text())["versions"]
    assert all(isinstance(row.get("acc_finetuned"), float) for row in rows)
    before = tree_digest(out)
    again = launch("ddp.yaml", "iterate", str(chain))
    assert again.returncode == 0 and tree_digest(out) == before, again.stderr[-3000:]


GENERATE = """
import json, sys
from ftrecycle.distributed import is_main
from ftrecycle.evaluate.builtin import generate, load_for_eval
model, tok = load_for_eval(sys.argv[1], device="cpu")
prompts = json.loads(open(sys.argv[2]).read())
for batch in (3, 7):
    texts = generate(model, tok, prompts, batch_size=batch, max_gen_toks=6)
    if is_main():
        with open(sys.argv[3] + f".{batch}", "w") as f:
            json.dump(texts, f)
"""


@pytest.mark.slow
def test_builtin_generation_split_across_processes_equals_one_process(setup, tmp_path):
    from ftrecycle.evaluate.builtin import generate, load_for_eval

    rng = random.Random(1)
    # 7 prompts in batches of 3 and 7: 3 batches over 2 processes (an uneven split) and 1 batch
    # (one process with no batch of its own, which still makes the same generate calls)
    prompts = [f"Question: {_item(rng)['question']}\nAnswer:" for _ in range(7)]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    script = tmp_path / "gen.py"
    script.write_text(GENERATE)
    r = launch(
        "ddp.yaml", str(setup["source_finetuned"]), str(tmp_path / "prompts.json"), str(tmp_path / "got"), script=script
    )
    assert r.returncode == 0, r.stderr[-3000:]
    model, tok = load_for_eval(str(setup["source_finetuned"]), device="cpu")
    for batch in (3, 7):
        got = json.loads((tmp_path / f"got.{batch}").read_text())
        want = generate(model, tok, prompts, batch_size=batch, max_gen_toks=6)
        assert got == want, (batch, got, want)


def test_on_main_without_a_launcher_is_a_plain_call():
    from ftrecycle.distributed import gather, on_main, world
    from ftrecycle.errors import OutputError

    assert world().size == 1 and on_main(lambda: 7) == 7 and gather("x") == ["x"]
    with pytest.raises(OutputError, match="exists"):
        on_main(lambda: (_ for _ in ()).throw(OutputError("exists")))


@pytest.mark.parametrize(
    ("name", "kind"), [("ddp.yaml", "MULTI_GPU"), ("fsdp.yaml", "FSDP"), ("deepspeed_zero3.yaml", "DEEPSPEED")]
)
def test_shipped_configs_are_accelerate_configs_that_need_only_the_process_count(name, kind):
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig

    raw = yaml.safe_load((CONFIGS / name).read_text())
    cfg = ClusterConfig.from_yaml_file(str(CONFIGS / name))
    assert str(cfg.distributed_type).endswith(kind) and cfg.num_machines == 1 and not cfg.use_cpu
    assert raw["mixed_precision"] == "bf16"
    assert f"--config_file examples/accelerate/{name}" in (CONFIGS / name).read_text()  # its launch line
    if kind == "DEEPSPEED":  # the final output is gathered from ZeRO-3 shards only with this set
        assert raw["deepspeed_config"]["zero3_save_16bit_model"] is True
