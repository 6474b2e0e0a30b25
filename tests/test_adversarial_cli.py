"""The command line attacked as a hostile or careless user would: every failure is one line.

One test per class of failure, each parametrised over crafted cases, all run in process
through :func:`ftrecycle.cli.main`: option values (NaN, infinity, negative, zero, absurdly
large, duplicated spec keys), `eval`'s inputs (non-model and adapter directories, offline
data sets, flags that would be ignored), anything unexpected (the last-resort handler),
typed config files, and the review's item 7 (model card link, transformers floor).
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import sys
import types
from pathlib import Path

import pytest

from ftrecycle.cli import INTERNAL_ERROR_EXIT, build_parser, main
from ftrecycle.cli import args as argtypes
from ftrecycle.errors import ConfigError
from ftrecycle.finetune.config import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
GSM8K_LINE = '{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}\n'


def _one_line(capsys: pytest.CaptureFixture[str], code: int, expected_code: int = 2) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == expected_code, err
    assert len(lines) == 1, f"not one line:\n{err}"
    assert lines[0].startswith("ftrecycle: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# 1. Every option value is checked when parsed: one line, exit 2, nothing written.

T = "transfer"
D = "diff"
A = "apply"
X = "export-lora"
G = "diagnose"
F = "finetune"
R = "recycle-finetune"
E = "eval"
L = "lab"

BAD_OPTIONS: list[tuple[str, list[str], str]] = [
    # sizes
    (T, ["--shard-size", "1e400"], "--shard-size"),
    (T, ["--shard-size", "inf"], "--shard-size"),
    (T, ["--shard-size", "nan"], "--shard-size"),
    (T, ["--shard-size", "-5GB"], "--shard-size"),
    (T, ["--shard-size", "0"], "--shard-size"),
    (T, ["--shard-size", "5000TB"], "--shard-size"),
    (T, ["--max-memory", "inf"], "--max-memory"),
    (T, ["--max-memory", "-1GiB"], "--max-memory"),
    (T, ["--max-memory", "1e400MiB"], "--max-memory"),
    (T, ["--max-memory", "nan"], "--max-memory"),
    (D, ["--max-memory", "-inf"], "--max-memory"),
    (A, ["--shard-size", "1e400"], "--shard-size"),
    # alpha
    (T, ["--alpha", "nan"], "--alpha"),
    (T, ["--alpha", "inf"], "--alpha"),
    (T, ["--alpha", "-inf"], "--alpha"),
    (T, ["--alpha", "1e400"], "--alpha"),
    (A, ["--alpha", "nan"], "--alpha"),
    (R, ["--alpha", "nan"], "--alpha"),
    (R, ["--alpha", "-inf"], "--alpha"),
    # threads
    (T, ["--threads", "0"], "--threads"),
    (T, ["--threads", "-3"], "--threads"),
    (T, ["--threads", "1e9"], "--threads"),
    (T, ["--threads", "99999999999"], "--threads"),
    (D, ["--threads", "nan"], "--threads"),
    (X, ["--threads", "-3"], "--threads"),
    # compression specs
    (D, ["--compress", "lowrank:rank=nan"], "--compress"),
    (D, ["--compress", "lowrank:rank=4,rank=8"], "given twice"),
    (D, ["--compress", "lowrank:energy=0.5,energy=0.9"], "given twice"),
    (D, ["--compress", "lowrank:energy=inf"], "--compress"),
    (D, ["--compress", "lowrank:rank=1e30"], "--compress"),
    (D, ["--compress", "lowrank:rank=inf"], "--compress"),
    (D, ["--compress", "lowrank:rank=-inf"], "--compress"),
    (D, ["--compress", "sparse:ratio=inf"], "--compress"),
    (D, ["--compress", "sparse:ratio=1e400"], "--compress"),
    (D, ["--compress", "sparse:density=nan"], "--compress"),
    (T, ["--compress", "lowrank:rank=nan"], "--compress"),
    (T, ["--compress", "sparse:density=0.1,density=0.2"], "given twice"),
    # export-lora
    (X, ["--rank", "0"], "--rank"),
    (X, ["--rank", "-1"], "--rank"),
    (X, ["--rank", "nan"], "--rank"),
    (X, ["--rank", "1e400"], "--rank"),
    # diagnose
    (G, ["--device", "bogus"], "--device"),
    (G, ["--device", ""], "--device"),
    (G, ["--device", "cuda:99"], "--device"),
    (G, ["--plot", "missing/dir/x.png"], "mkdir -p"),
    (G, ["--plot", "{tmp}"], "--plot"),
    (G, ["--plot", "{tmp}/layers.txt"], ".png"),
    (G, ["--max-examples", "0"], "--max-examples"),
    (G, ["--max-examples", "-5"], "--max-examples"),
    (G, ["--device", "cpu"], "needs --calibration"),
    (G, ["--max-examples", "8"], "needs --calibration"),
    # fine-tuning settings (finetune and recycle-finetune share them)
    (F, ["--epochs", "nan"], "--epochs"),
    (F, ["--epochs", "inf"], "--epochs"),
    (F, ["--epochs", "0"], "--epochs"),
    (F, ["--epochs", "-1"], "--epochs"),
    (F, ["--seed", "-1"], "--seed"),
    (F, ["--seed", str(2**32)], "--seed"),
    (F, ["--learning-rate", "0"], "--learning-rate"),
    (F, ["--learning-rate", "-1"], "--learning-rate"),
    (F, ["--learning-rate", "nan"], "--learning-rate"),
    (F, ["--warmup-ratio", "1"], "--warmup-ratio"),
    (F, ["--warmup-ratio", "nan"], "--warmup-ratio"),
    (F, ["--weight-decay", "nan"], "--weight-decay"),
    (F, ["--weight-decay", "-0.1"], "--weight-decay"),
    (F, ["--max-steps", "0"], "--max-steps"),
    (F, ["--max-steps", "-2"], "--max-steps"),
    (F, ["--batch-size", "0"], "--batch-size"),
    (F, ["--grad-accum", "0"], "--grad-accum"),
    (F, ["--max-length", "0"], "--max-length"),
    (F, ["--save-every", "0"], "--save-every"),
    (F, ["--logging-every", "-1"], "--logging-every"),
    (F, ["--eval-every", "-1"], "--eval-every"),
    (F, ["--eval-batch-size", "0"], "--eval-batch-size"),
    (F, ["--eval-max-new-tokens", "-5"], "--eval-max-new-tokens"),
    (F, ["--eval-shots", "-1"], "--eval-shots"),
    (F, ["--bf16", "maybe"], "--bf16"),
    (F, ["--eval-data", "{tmp}/data.jsonl", "--eval-max-new-tokens", "512"], "leaves no room for a prompt"),
    (R, ["--eval-data", "{tmp}/data.jsonl", "--eval-max-new-tokens", "4096"], "leaves no room for a prompt"),
    (R, ["--epochs", "nan"], "--epochs"),
    (R, ["--seed", "-1"], "--seed"),
    # eval
    (E, ["--batch-size", "0"], "--batch-size"),
    (E, ["--batch-size", "-1"], "--batch-size"),
    (E, ["--max-new-tokens", "-5"], "--max-new-tokens"),
    (E, ["--max-new-tokens", str(10**9)], "--max-new-tokens"),
    (E, ["--limit", "0"], "--limit"),
    (E, ["--limit", "-1"], "--limit"),
    (E, ["--device", "bogus"], "--device"),
    (E, ["--backend", "bogus"], "--backend"),
    # empty paths (they would mean the current directory) and NUL bytes
    (T, ["-o", ""], "-o/--output: is empty"),
    (T, ["--source-base", " "], "--source-base: is empty"),
    (D, ["--finetuned", "a\0b"], "NUL"),
    (E, ["--builtin", ""], "--builtin: is empty"),
    (E, ["--model", ""], "--model: is empty"),
    (L, ["--out", ""], "--out: is empty"),
    (F, ["--data", ""], "--data: is empty"),
    (F, ["--eval-data", ""], "--eval-data: is empty"),
    # lab
    (L, ["--workers", "0"], "--workers"),
    (L, ["--seeds", "-1"], "--seeds"),
    (L, ["--seeds", "1,1"], "--seeds"),
    (L, ["--seeds", "a,b"], "--seeds"),
    (L, ["--seeds", ","], "--seeds"),
]


def _argv(command: str, extra: list[str], v: dict[str, Path], tmp: Path) -> list[str]:
    out = str(tmp / "out")
    data = tmp / "data.jsonl"
    data.write_text(GSM8K_LINE)
    a, b, c = (str(v[k]) for k in ("source_base", "source_finetuned", "target_base"))
    models = ["--source-base", a, "--source-finetuned", b, "--target-base", c]
    head = {
        T: [T, *models, "-o", out, "-q"],
        D: [D, "--base", a, "--finetuned", b, "-o", out, "-q"],
        A: [A, "--delta", str(tmp / "nodelta"), "--target-base", c, "-o", out, "-q"],
        X: [X, "--delta", str(tmp / "nodelta"), "--rank", "4", "-o", out],
        G: [G, *models],
        F: [F, "--model", c, "--data", str(data), "-o", out],
        R: [R, *models, "--data", str(data), "-o", out],
        E: [E, "--model", c, "--builtin", str(data)],
        L: [L, "run", "--preset", "smoke", "--out", out, "--quiet"],
    }[command]
    return head + [x.replace("{tmp}", str(tmp)) for x in extra]


@pytest.mark.parametrize(
    ("command", "extra", "needle"), BAD_OPTIONS, ids=[f"{c}{' '.join(e)}" for c, e, _ in BAD_OPTIONS]
)
def test_option_values_are_checked_when_parsed(versions, tmp_path, capsys, command, extra, needle):
    argv = _argv(command, extra, versions["llama"], tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    line = _one_line(capsys, main(argv))
    assert line.startswith("ftrecycle: error: ") and needle in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temp, no parent made


@pytest.mark.parametrize(
    "argv",
    [[], ["transfer"], ["transfer", "--bogus"], ["nosuchcommand"], ["eval"], ["lab"], ["inspect"]],
    ids=["no-command", "missing-args", "unknown-flag", "unknown-command", "eval-no-model", "lab-no-sub", "inspect"],
)
def test_usage_errors_are_one_line(capsys, argv):
    line = _one_line(capsys, main(argv))
    assert "--help" in line, line


def test_every_numeric_flag_has_a_checking_type():
    """No subcommand takes a bare ``type=int``/``type=float`` (which let nan, inf and -3 through)."""
    import argparse

    def walk(parser: argparse.ArgumentParser, path: str):
        for action in parser._actions:
            if action.type in (int, float):
                yield f"{path} {'/'.join(action.option_strings)}"
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")

    bare = list(walk(build_parser(), "ftrecycle"))
    assert not bare, bare


def test_every_command_help_works(capsys):
    parser = build_parser()
    commands = [["--help"]]
    sub = next(a for a in parser._actions if a.nargs == "A...")
    for name in sub.choices:
        commands.append([name, "--help"])
    commands += [["lab", "run", "--help"], ["lab", "report", "--help"]]
    for argv in commands:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0, argv
    assert "FTRECYCLE" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 2. eval: one line where it gave raw tracebacks, and no flag silently ignored.


def _eval_case(case: str, v: dict[str, Path], tmp: Path) -> tuple[list[str], str]:
    data = tmp / "g.jsonl"
    data.write_text(GSM8K_LINE)
    c = str(v["target_base"])
    if case == "not-a-model":
        (tmp / "notes").mkdir()
        (tmp / "notes" / "a.txt").write_text("x")
        return [E, "--model", str(tmp / "notes"), "--builtin", str(data)], "no config.json"
    if case == "adapter":
        ad = tmp / "adapter"
        ad.mkdir()
        (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
        (ad / "adapter_model.safetensors").write_bytes(b"")
        return [E, "--model", str(ad), "--builtin", str(data)], "ftrecycle transfer --source-base BASE"
    if case == "file-as-model":
        return [E, "--model", str(data), "--builtin", str(data)], "is a file"
    if case == "missing-local-model":
        (tmp / "models").mkdir()
        return [E, "--model", str(tmp / "models" / "M9"), "--builtin", str(data)], "no such model directory"
    if case == "pickle-only":
        pk = tmp / "pk"
        pk.mkdir()
        (pk / "config.json").write_text((v["target_base"] / "config.json").read_text())
        (pk / "pytorch_model.bin").write_bytes(b"not read")
        return [E, "--model", str(pk), "--builtin", str(data)], "pickle"
    if case == "no-weights":
        nw = tmp / "nw"
        nw.mkdir()
        (nw / "config.json").write_text((v["target_base"] / "config.json").read_text())
        return [E, "--model", str(nw), "--builtin", str(data)], "no weights"
    if case in ("no-model-type", "truncated-shard", "no-tokenizer"):
        m = tmp / case
        shutil.copytree(v["target_base"], m)
        if case == "no-model-type":
            (m / "config.json").write_text("{}")
            needle = "no model_type"
        elif case == "truncated-shard":
            shard = sorted(m.glob("*.safetensors"))[0]
            shard.write_bytes(shard.read_bytes()[:100])
            needle = shard.name
        else:
            for f in m.glob("tokenizer*"):
                f.unlink()
            needle = "no tokenizer files"
        return [E, "--model", str(m), "--builtin", str(data)], needle
    if case == "missing-data":
        return [E, "--model", c, "--builtin", str(tmp / "trian.jsonl")], "no such data file"
    if case == "non-utf8-data":
        bad = tmp / "bad.jsonl"
        bad.write_bytes(GSM8K_LINE.encode() + b'{"question": "\xff\xfe"}\n')
        return [E, "--model", c, "--builtin", str(bad)], "bad.jsonl:2: not UTF-8"
    if case == "deep-data":
        deep = tmp / "deep.jsonl"
        deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
        return [E, "--model", c, "--builtin", str(deep)], "deep.jsonl:1: JSON nested too deeply"
    if case == "data-is-a-directory":
        return [E, "--model", c, "--builtin", str(tmp)], "not a regular file"
    if case == "tasks-beside-builtin":
        return [E, "--model", c, "--builtin", str(data), "--tasks", "gsm8k"], "--tasks with --builtin"
    if case == "task-dir-beside-builtin":
        return [E, "--model", c, "--builtin", str(data), "--task-dir", str(tmp)], "--task-dir with --builtin"
    if case == "backend-beside-builtin":
        return [E, "--model", c, "--builtin", str(data), "--backend", "hf"], "--backend with --builtin"
    if case == "new-tokens-beyond-context":
        ctx = json.loads((v["target_base"] / "config.json").read_text())["max_position_embeddings"]
        return [E, "--model", c, "--builtin", str(data), "--max-new-tokens", str(ctx)], "leaves no room"
    if case == "new-tokens-beside-tasks":
        return [E, "--model", c, "--tasks", "gsm8k", "--max-new-tokens", "8"], "--max-new-tokens is for --builtin"
    if case == "empty-tasks":
        return [E, "--model", c, "--tasks", ","], "--tasks is empty"
    if case == "duplicate-tasks":
        return [E, "--model", c, "--tasks", "gsm8k,gsm8k"], "twice"
    if case == "missing-task-dir":
        return [E, "--model", c, "--tasks", "mine", "--task-dir", str(tmp / "nowhere")], "--task-dir"
    if case == "task-yaml-data-missing":  # real lm-eval: its warnings and the loading bar came before the error
        (tmp / "tasks").mkdir()
        yaml = "task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: nope.jsonl}\n"
        (tmp / "tasks" / "mine.yaml").write_text(yaml + "output_type: generate_until\ndoc_to_text: q\n")
        return [E, "--model", c, "--tasks", "mine", "--task-dir", str(tmp / "tasks"), "--device", "cpu"], "nope.jsonl"
    raise AssertionError(case)


EVAL_CASES = [
    "not-a-model",
    "adapter",
    "file-as-model",
    "missing-local-model",
    "pickle-only",
    "no-weights",
    "no-model-type",
    "truncated-shard",
    "no-tokenizer",
    "missing-data",
    "non-utf8-data",
    "deep-data",
    "data-is-a-directory",
    "tasks-beside-builtin",
    "task-dir-beside-builtin",
    "backend-beside-builtin",
    "new-tokens-beyond-context",
    "new-tokens-beside-tasks",
    "empty-tasks",
    "duplicate-tasks",
    "missing-task-dir",
    "task-yaml-data-missing",
]


@pytest.mark.parametrize("case", EVAL_CASES)
def test_eval_errors_are_one_line(versions, tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    argv, needle = _eval_case(case, versions["llama"], tmp_path)
    line = _one_line(capsys, main(argv))
    assert line.startswith("ftrecycle: error: ") and needle in line, line


class _FakeTaskManager:
    def __init__(self, include_path=None, include_defaults=True):
        self.all_tasks = ["gsm8k", "gsm8k_cot", "mine"]


@pytest.mark.parametrize(
    ("raised", "needle"),
    [
        (ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)"), "not available offline"),
        (FileNotFoundError(2, "No such file or directory", "/data/test.jsonl"), "/data/test.jsonl not found"),
        (FileNotFoundError("Unable to find '/data/test.jsonl'"), "Unable to find '/data/test.jsonl'; check"),
    ],
    ids=["offline-dataset", "missing-data-file", "missing-data-file-datasets"],
)
def test_eval_task_data_unavailable_is_one_line(versions, capsys, monkeypatch, raised, needle):
    """lm-eval's data set download failing offline (or a task's data file missing) is one line.

    lm-eval itself is replaced by a stand-in that fails as it does offline, so the test takes
    no network and none of lm-eval's 40 s start-up.
    """
    from ftrecycle.evaluate import harness

    def simple_evaluate(**kwargs):
        raise raised

    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = simple_evaluate  # type: ignore[attr-defined]
    fake_tasks = types.ModuleType("lm_eval.tasks")
    fake_tasks.TaskManager = _FakeTaskManager  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", fake_tasks)
    monkeypatch.setattr(harness, "_load_lm", lambda *a, **k: object())
    code = main([E, "--model", str(versions["llama"]["target_base"]), "--tasks", "gsm8k", "--device", "cpu"])
    line = _one_line(capsys, code)
    assert line.startswith("ftrecycle: error: task gsm8k: ") and needle in line, line


# ---------------------------------------------------------------------------------------------
# 3. The last-resort handler: anything unexpected is one line; OS errors name the path.

UNEXPECTED = [
    (ValueError("bad\nvalue"), INTERNAL_ERROR_EXIT, "internal error: ValueError: bad value (set FTRECYCLE_DEBUG=1"),
    (KeyError("weight"), INTERNAL_ERROR_EXIT, "internal error: KeyError: 'weight'"),
    (AssertionError(), INTERNAL_ERROR_EXIT, "internal error: AssertionError"),
    (OverflowError("cannot convert float infinity to integer"), INTERNAL_ERROR_EXIT, "OverflowError"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/out"), 2, "/ro/out: Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device", "/full/x"), 2, "/full/x: No space left on device; free"),
    (OSError(errno.EROFS, "Read-only file system", "/ro"), 2, "/ro: Read-only file system"),
    (OSError(errno.EMFILE, "Too many open files"), 2, "error: Too many open files; raise the open-file limit"),
    (OSError(errno.ENAMETOOLONG, "File name too long", "/x/" + "n" * 300), 2, "File name too long; use a shorter"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), 2, "/a -> /b: Invalid cross-device link"),
    (RecursionError("maximum recursion depth exceeded"), 2, "nested too deeply"),
    (MemoryError(), 2, "out of memory"),
]


@pytest.mark.parametrize(
    ("exc", "code", "needle"), UNEXPECTED, ids=[f"{type(e).__name__}{i}" for i, (e, _, _) in enumerate(UNEXPECTED)]
)
def test_anything_unexpected_is_one_line(tmp_path, capsys, monkeypatch, exc, code, needle):
    import ftrecycle.ops.inspect as inspect_mod

    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(inspect_mod, "inspect_delta", boom)
    monkeypatch.delenv("FTRECYCLE_DEBUG", raising=False)
    line = _one_line(capsys, main(["inspect", str(tmp_path)]), code)
    assert needle in line, line
    # with FTRECYCLE_DEBUG=1 the traceback comes first, then the same last line
    monkeypatch.setenv("FTRECYCLE_DEBUG", "1")
    assert main(["inspect", str(tmp_path)]) == code
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1] == line


def test_a_closed_stdout_is_not_an_error(tmp_path, capsys, monkeypatch):
    """`ftrecycle inspect D | head`: the reader went away; no traceback, no error line, exit 141 like SIGPIPE."""
    import ftrecycle.ops.inspect as inspect_mod

    def closed(*args, **kwargs):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(inspect_mod, "inspect_delta", closed)
    assert main(["inspect", str(tmp_path)]) == 141
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# 4. Typed settings from files (a chain's `finetune:` section) get the same checks as the flags.


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"learning_rate": "nan"}, "--learning-rate"),
        ({"learning_rate": float("inf")}, "--learning-rate"),
        ({"learning_rate": -1}, "--learning-rate"),
        ({"epochs": True}, "--epochs"),
        ({"epochs": "abc"}, "--epochs"),
        ({"seed": -1}, "--seed"),
        ({"seed": 2**40}, "--seed"),
        ({"max_steps": 2.5}, "--max-steps"),
        ({"max_steps": 0}, "--max-steps"),
        ({"batch_size": "8x"}, "--batch-size"),
        ({"gradient_checkpointing": "false"}, "--gradient-checkpointing"),
        ({"bf16": "maybe"}, "--bf16"),
        ({"weight_decay": float("nan")}, "--weight-decay"),
        ({"eval_max_new_tokens": 10**9}, "--eval-max-new-tokens"),
        ({"warmup_ratio": [0.1]}, "--warmup-ratio"),
        ({"nosuch": 1}, "unknown fine-tuning setting"),
    ],
)
def test_settings_from_a_file_are_checked(settings, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)) as e:
        FinetuneConfig.from_dict(settings, where="chain.yaml: finetune")
    assert str(e.value).startswith("chain.yaml: finetune") and "\n" not in str(e.value)


def test_settings_from_a_file_that_are_fine_are_kept():
    cfg = FinetuneConfig.from_dict(
        {"learning_rate": "5e-6", "epochs": 2, "max_steps": -1, "seed": 0, "gradient_checkpointing": True}
    )
    assert cfg.learning_rate == 5e-6 and cfg.epochs == 2.0 and isinstance(cfg.epochs, float) and cfg.seed == 0
    assert FinetuneConfig().validate() == FinetuneConfig()  # every default within its own declared range


# ---------------------------------------------------------------------------------------------
# 5. The review's item 7: no placeholder link in the model card; a transformers floor that is true.


def test_model_card_has_no_placeholder_link(versions, tmp_path, capsys):
    v = versions["llama"]
    argv = [
        T,
        "--source-base",
        str(v["source_base"]),
        "--source-finetuned",
        str(v["source_finetuned"]),
        "--target-base",
        str(v["target_base"]),
        "-o",
        str(tmp_path / "out"),
        "-q",
        "--max-memory",
        "16GiB",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    card = (tmp_path / "out" / "README.md").read_text()
    for url in re.findall(r"https?://[^\s)\]>]+", card):
        host_only = re.fullmatch(r"https?://[^/]+/?", url)
        assert not host_only, f"placeholder link {url} in the model card"


def test_transformers_floor_matches_what_finetune_uses():
    """finetune passes a ratio as ``warmup_steps`` (a ratio only from transformers 5.0) and ``dtype=``."""
    import transformers
    from transformers import TrainingArguments

    pyproject = (ROOT / "pyproject.toml").read_text()  # tomllib is 3.11+; the project supports 3.10
    m = re.search(r'^\s*"transformers>=\s*(\d+)', pyproject, re.M)
    assert m and int(m.group(1)) >= 5, "finetune needs transformers 5.0+ (float warmup_steps)"
    assert int(transformers.__version__.split(".")[0]) >= int(m.group(1))
    args = TrainingArguments(output_dir="unused", warmup_steps=0.25, report_to=[])
    assert args.get_warmup_steps(100) == 25  # the ratio is honoured, not truncated to 0 steps


def test_device_and_plot_validators_accept_what_is_fine(tmp_path):
    assert argtypes.device_type("cpu") == "cpu"
    assert argtypes.png_path(str(tmp_path / "layers.png")) == str(tmp_path / "layers.png")
    assert argtypes.seeds_type("0,1,2") == (0, 1, 2)
    assert argtypes.compression_type("lowrank:rank=4") == "lowrank:rank=4"
