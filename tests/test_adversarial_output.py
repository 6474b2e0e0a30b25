"""Outputs under attack: nothing lost, every write failure one line, races and signals leave nothing behind.

Each test is one class of failure, parametrised over crafted cases the way a hostile or careless
user would produce them: outputs that are, hold or lie inside an input by any spelling; OS errors
at each step of a write; names at NAME_MAX and with glob characters; concurrent writers; signals
in the middle of a write.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftrecycle.cli import main
from ftrecycle.io.output import LOCK_MARK, TMP_MARK
from ftrecycle.ops.diff import diff

from conftest import load_dir, tree_digest
from fixtures.tiny import make_versions

# ADV_SRC runs the subprocess cases against another checkout (how these tests were seen to fail on the old code)
SRC = os.environ.get("ADV_SRC") or str(Path(__file__).resolve().parents[1] / "src")
ROOM = ("--max-memory", "16GiB")  # pytest with transformers loaded is not a fresh command


def _hidden(directory: Path) -> list[str]:
    """What ftrecycle may leave beside an output: temporary dirs, lock files, work dirs."""
    return sorted(p.name for p in directory.iterdir() if ".ftrecycle-" in p.name)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftrecycle: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> dict[str, Path]:
    """Inputs of every command under one root: models, a delta, data, a chain file; and a place to stand."""
    root = tmp_path_factory.mktemp("adv-out")
    src = root / "src"
    made = make_versions("llama", root / "made", seed=7)
    src.mkdir()
    for role, name in (("source_base", "A"), ("source_finetuned", "B"), ("target_base", "C")):
        shutil.move(made[role], src / name)
    shutil.rmtree(root / "made")
    diff(str(src / "A"), str(src / "B"), src / "D")
    rows = [{"prompt": f"{i} + {i} =", "completion": f" {2 * i}"} for i in range(8)]
    (src / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (src / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chain = {"versions": [str(src / "A"), str(src / "C")], "data": str(src / "data.jsonl"), "output": "chain-out"}
    (src / "chain.yaml").write_text(json.dumps(chain))
    (root / "elsewhere").mkdir()
    return {
        "root": root,
        "src": src,
        "A": src / "A",
        "B": src / "B",
        "C": src / "C",
        "D": src / "D",
        "data": src / "data.jsonl",
        "calib": src / "calib.jsonl",
        "chain": src / "chain.yaml",
    }


def _argv(command: str, e: dict[str, Path], out: str) -> list[str]:
    models = ["--source-base", str(e["A"]), "--source-finetuned", str(e["B"]), "--target-base", str(e["C"])]
    ft = ["--data", str(e["data"]), "-o", out, "--force", "--max-steps", "1"]
    return {
        "transfer": ["transfer", *models, "-o", out, "--force", "-q", *ROOM],
        "transfer-compress": ["transfer", *models, "-o", out, "--force", "-q", "--compress", "int8", *ROOM],
        "transfer-alpha-auto": [
            "transfer",
            *models,
            "-o",
            out,
            "--force",
            "-q",
            "--alpha",
            "auto",
            "--calibration",
            str(e["calib"]),
        ],
        "diff": ["diff", "--base", str(e["A"]), "--finetuned", str(e["B"]), "-o", out, "--force", "-q", *ROOM],
        "apply": ["apply", "--delta", str(e["D"]), "--target-base", str(e["C"]), "-o", out, "--force", "-q", *ROOM],
        "export-lora": ["export-lora", "--delta", str(e["D"]), "--rank", "2", "-o", out, "--force"],
        "finetune": ["finetune", "--model", str(e["A"]), *ft],
        "recycle-finetune": ["recycle-finetune", *models, *ft],
        "iterate": ["iterate", str(e["chain"]), "-o", out],
    }[command]


#: The input each command's "same" and "inside" cases aim at (every command's last-named input
#: tends to be the one a check forgets: the compressed path checked none at all).
TARGET = {
    "transfer": "C",
    "transfer-compress": "A",
    "transfer-alpha-auto": "calib",
    "diff": "B",
    "apply": "D",
    "export-lora": "D",
    "finetune": "data",
    "recycle-finetune": "A",
    "iterate": "C",
}

#: (kind, where the command runs relative to the root, the -o it is given)
KINDS = {
    "same-absolute": lambda e, x: (e["root"], str(e[x])),
    "same-relative": lambda e, x: (e[x].parent, e[x].name),
    "dot-inside-input": lambda e, x: (e["A"], "."),
    "dotdot-holder": lambda e, x: (e["A"], ".."),
    "folder-holding-sources": lambda e, x: (e["root"], "src"),
    "lexical-dotdot": lambda e, x: (e["root"] / "elsewhere", f"../src/../src/{e[x].name}"),
    "symlink-to-input": lambda e, x: (e["root"], "link-" + x),
    "through-a-linked-parent": lambda e, x: (e["root"], "link-" + x + "/new"),
    "inside-input": lambda e, x: (e["root"], str(e[x] / "sub") if e[x].is_dir() else str(e["A"] / "sub")),
    "grandparent": lambda e, x: (e["root"] / "elsewhere", str(e["root"])),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("command", list(TARGET))
def test_force_never_removes_or_replaces_an_input(lab, capsys, monkeypatch, command, kind):
    e = lab
    x = TARGET[command]
    link = e["root"] / f"link-{x}"
    if not link.is_symlink():
        link.symlink_to(e[x])
    cwd, out = KINDS[kind](e, x)
    before = tree_digest(e["root"])
    listing = sorted(p.name for p in e["root"].iterdir())
    monkeypatch.chdir(cwd)
    code = main(_argv(command, e, out))
    err = capsys.readouterr().err
    assert code == 2, err
    _one_line(err)
    assert tree_digest(e["root"]) == before, f"{command} -o {out} changed an input"
    assert sorted(p.name for p in e["root"].iterdir()) == listing
    assert not _hidden(e["root"]) and not _hidden(e["src"])


def test_lab_and_demo_never_remove_the_current_directory(lab, capsys, monkeypatch, tmp_path):
    """--force on a run directory given as `.`, `..` or a holder of the current directory."""
    here = tmp_path / "project"
    (here / "work").mkdir(parents=True)
    (here / "precious.txt").write_text("keep me")
    (here / "lab-config.json").write_text("{}")  # looks like a lab run of other settings
    (here / "work" / "lab-config.json").write_text("{}")
    cases = [
        (here, ["lab", "run", "--preset", "smoke", "--out", ".", "--force", "--quiet"]),
        (here / "work", ["lab", "run", "--preset", "smoke", "--out", "..", "--force", "--quiet"]),
        (here / "work", ["lab", "run", "--preset", "smoke", "--out", str(here), "--force", "--quiet"]),
        (here, ["demo", "--out", ".", "--force"]),
        (here / "work", ["demo", "--out", "..", "--force"]),
        (tmp_path, ["demo", "--out", "project", "--force"]),  # not a demo directory
    ]
    for cwd, argv in cases:
        before = tree_digest(here)
        monkeypatch.chdir(cwd)
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        _one_line(err)
        assert tree_digest(here) == before, argv
        assert (here / "precious.txt").read_text() == "keep me"


def _transfer_argv(e: dict[str, Path], out: Path | str, *extra: str) -> list[str]:
    return [
        "transfer",
        "--source-base",
        str(e["A"]),
        "--source-finetuned",
        str(e["B"]),
        "--target-base",
        str(e["C"]),
        "-o",
        str(out),
        "-q",
        *ROOM,
        *extra,
    ]


def _fail_on(monkeypatch, name: str, code: int, when=lambda *a, **k: True) -> None:
    real = getattr(os, name)

    def fake(*a, **k):
        if when(*a, **k):
            raise OSError(code, os.strerror(code), str(a[0]) if a and isinstance(a[0], (str, Path)) else None)
        return real(*a, **k)

    monkeypatch.setattr(os, name, fake)


def _in_temp(path, *a, **k) -> bool:
    return TMP_MARK in str(path)


# (name, os function, errno, which calls fail)
INJECTED = [
    ("disk-full-data", "pwrite", errno.ENOSPC, lambda *a, **k: True),
    ("file-too-big", "pwrite", errno.EFBIG, lambda *a, **k: True),
    ("io-error", "pwrite", errno.EIO, lambda *a, **k: True),
    ("disk-full-header", "write", errno.ENOSPC, lambda fd, *a, **k: fd > 2),
    ("read-only-fs-temp", "mkdir", errno.EROFS, _in_temp),
    ("no-permission-temp", "mkdir", errno.EACCES, _in_temp),
    ("read-only-fs-lock", "open", errno.EROFS, lambda p, *a, **k: str(p).endswith(LOCK_MARK)),
    ("too-many-files", "open", errno.EMFILE, lambda p, *a, **k: _in_temp(p) and str(p).endswith(".safetensors")),
    ("quota", "ftruncate", errno.EDQUOT, lambda *a, **k: True),
    ("busy-rename", "rename", errno.EBUSY, _in_temp),
    ("cross-device-rename", "rename", errno.EXDEV, _in_temp),
    ("name-too-long-mkdir", "mkdir", errno.ENAMETOOLONG, _in_temp),
    ("not-a-dir-parent", "mkdir", errno.ENOTDIR, lambda p, *a, **k: "new-parent" in str(p)),
]


@pytest.mark.parametrize("case", INJECTED, ids=[c[0] for c in INJECTED])
def test_os_errors_while_writing_are_one_line_with_no_temp_and_no_created_parents(
    lab, capsys, monkeypatch, tmp_path, case
):
    _, func, code, when = case
    out = tmp_path / "new-parent" / "deeper" / "out"
    _fail_on(monkeypatch, func, code, when)
    rc = main(_transfer_argv(lab, out, "--shard-size", "20KB"))
    monkeypatch.undo()
    line = _one_line(capsys.readouterr().err)
    assert rc == 2, line
    assert str(out) in line and os.strerror(code) in line and errno.errorcode[code] in line, line
    assert not (tmp_path / "new-parent").exists(), "a failed run left the parent directories it created"
    assert not _hidden(tmp_path)


REAL = {
    "under-a-regular-file": lambda t: (t / "file.txt" / "out", "is a file"),
    "under-a-file-deeper": lambda t: (t / "file.txt" / "a" / "b", "is a file"),
    "name-over-name-max": lambda t: (t / ("n" * 256), "bytes"),
    "parent-name-over-name-max": lambda t: (t / ("p" * 300) / "out", "bytes"),
    "dangling-symlink-out": lambda t: (t / "dangling", "symbolic link"),
    "symlink-out-to-dir": lambda t: (t / "dirlink", "symbolic link"),
    "dangling-symlink-parent": lambda t: (t / "dangling" / "out", "dangling"),
    "dot": lambda t: (Path("."), "current directory"),
    "dotdot": lambda t: (Path(".."), "current directory"),
    "existing-file-out": lambda t: (t / "file.txt", "exists"),
    "root": lambda t: (Path("/"), "root"),
}


@pytest.mark.parametrize("case", list(REAL))
def test_impossible_output_paths_are_one_line(lab, capsys, monkeypatch, tmp_path, case):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "adir").mkdir()
    (tmp_path / "dirlink").symlink_to(tmp_path / "adir")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    out, expect = REAL[case](tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(_transfer_argv(lab, out, "--force"))
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and expect in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "file.txt").read_text() == "x"


def _run_cli(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ftrecycle.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, **kw
    )


@pytest.mark.parametrize("limit", [12, 16, 20, 24, 28])
def test_too_many_open_files_is_one_line_and_leaves_no_temp(lab, tmp_path, limit):
    import resource

    def low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    args = _transfer_argv(lab, tmp_path / "out", "--shard-size", "1KB", "--threads", "1")
    p = _run_cli(args, tmp_path, preexec_fn=low)
    assert p.returncode == 2, p.stderr
    line = _one_line(p.stderr)
    assert "EMFILE" in line and "ulimit" in line, line
    assert not (tmp_path / "out").exists() and not _hidden(tmp_path)


NAMES = {
    "240-chars": "x" * 240,
    "255-chars": "y" * 255,
    "240-bytes-utf8": "é" * 120,
    "star": "a*",
    "question": "a?",
    "brackets": "[a]b",
    "negated-class": "a[!x]",
}


@pytest.mark.parametrize("name", list(NAMES))
def test_legal_names_work_and_glob_characters_touch_no_other_temp(lab, capsys, tmp_path, name):
    out = tmp_path / NAMES[name]
    # Another output's temporary directories: an old-style one whose PID is gone, and a stale locked-style
    # one; a run for `a*`, `a?`, `[a]b` must not take them for its own.
    others = [tmp_path / f".ab{TMP_MARK}999999-0badcafe", tmp_path / f".ab{TMP_MARK}00112233aabbccdd"]
    for o in others:
        o.mkdir()
        (o / LOCK_MARK).touch()
        (o / "model.safetensors").write_bytes(b"in progress")
    rc = main(_transfer_argv(lab, out))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert load_dir(out).keys() == load_dir(lab["C"]).keys()
    assert all(o.is_dir() and (o / "model.safetensors").is_file() for o in others), "another output's temp went"
    assert _hidden(tmp_path) == sorted(o.name for o in others), "a temp or lock file of this run was left"


def test_stale_temps_go_only_when_their_own_lock_is_free(lab, capsys, tmp_path):
    """A live run in another PID namespace: its PID means nothing here, its lock does."""
    out = tmp_path / "out"
    live = [tmp_path / f".out{TMP_MARK}{n}" for n in ("1", "424242-cafecafe", "00ff00ff00ff00ff")]
    dead = [tmp_path / f".out{TMP_MARK}{n}" for n in ("2", str(os.getpid()) + "-deadbeef", "11ee11ee11ee11ee")]
    held = []
    for d in live + dead:
        d.mkdir()
        (d / LOCK_MARK).touch()
    for d in live:
        fd = os.open(d / LOCK_MARK, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.append(fd)
    try:
        rc = main(_transfer_argv(lab, out))
        assert rc == 0, capsys.readouterr().err
        assert all(d.is_dir() for d in live), "a live run's temp dir was removed"
        assert not any(d.exists() for d in dead), "a stale temp dir was kept"
    finally:
        for fd in held:
            os.close(fd)


def test_a_second_writer_of_a_locked_output_gets_one_line(lab, capsys, tmp_path):
    out = tmp_path / "out"
    lock = tmp_path / f".out{LOCK_MARK}"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        for extra in ((), ("--compress", "int8")):
            rc = main(_transfer_argv(lab, out, "--force", *extra))
            line = _one_line(capsys.readouterr().err)
            assert rc == 2 and "another ftrecycle run is writing" in line, line
            assert not out.exists() and _hidden(tmp_path) == [lock.name]
    finally:
        os.close(fd)


def test_racing_force_writers_one_wins_the_other_one_line(lab, tmp_path):
    out = tmp_path / "out"
    args = _argv("apply", lab, str(out))
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    for _ in range(10):
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "ftrecycle.cli", *args],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert "Traceback" not in err, err
            assert p.returncode == 0 or (p.returncode == 2 and "another ftrecycle run is writing" in _one_line(err))
        assert load_dir(out).keys() == load_dir(lab["C"]).keys()
        assert not _hidden(tmp_path), _hidden(tmp_path)


#: Run the CLI with a pause at the n-th call of the write path's directory flush (the temp dir is
#: full, the rename has not happened), announcing the pause in a file.
PAUSED = """
import sys, time
from pathlib import Path
import ftrecycle.io.output as o
ready, n = Path(sys.argv[1]), int(sys.argv[2])
real, calls = o._fsync_dir, []
def paused(path):
    calls.append(path)
    if len(calls) == n:
        Path(str(ready) + ".part").write_text(str(path))
        Path(str(ready) + ".part").rename(ready)
        time.sleep(60)
    real(path)
o._fsync_dir = paused
from ftrecycle.cli import main
sys.exit(main(sys.argv[3:]))
"""

# (command, which flush to pause at, signal)
SIGNALLED = [
    ("transfer", 1, signal.SIGTERM),
    ("transfer", 1, signal.SIGINT),
    ("transfer-compress", 1, signal.SIGTERM),  # while the hidden delta is being written
    ("transfer-compress", 3, signal.SIGTERM),  # the hidden delta done, the output being written
    ("transfer-compress", 3, signal.SIGINT),
    ("diff", 1, signal.SIGTERM),
    ("apply", 1, signal.SIGTERM),
    ("export-lora", 1, signal.SIGTERM),
]


@pytest.mark.parametrize("case", SIGNALLED, ids=[f"{c}-{n}-{s.name}" for c, n, s in SIGNALLED])
def test_a_signal_during_a_write_removes_every_temp(lab, tmp_path, case):
    command, n, sig = case
    out = tmp_path / "new" / "out"
    ready = tmp_path / "ready"
    p = _paused(lab, command, out, ready, n, force=False)
    paused_in = Path(ready.read_text())
    assert TMP_MARK in paused_in.name or TMP_MARK in str(paused_in), paused_in
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, err
    assert "Traceback" not in err and sig.name in err, err
    assert not (tmp_path / "new").exists(), "the run left its output, a temp or a created parent"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["ready"]


def _paused(
    lab: dict[str, Path], command: str, out: Path, ready: Path, n: int, *, force: bool
) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    argv = [a for a in _argv(command, lab, str(out)) if force or a != "--force"]
    p = subprocess.Popen(
        [sys.executable, "-c", PAUSED, str(ready), str(n), *argv],
        cwd=ready.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not ready.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ready.exists(), p.communicate()[1]
    return p


@pytest.mark.parametrize(
    "second", ["apply", "transfer", "transfer-compress", "export-lora", "diff", "finetune", "recycle-finetune"]
)
def test_a_second_writer_while_the_first_writes_gets_one_line(lab, tmp_path, second):
    """The first run is held mid-write (temp dir full, rename to come); the second must not race it."""
    out = tmp_path / "out"
    first = _paused(lab, "apply", out, tmp_path / "ready", 1, force=True)
    try:
        p = _run_cli(_argv(second, lab, str(out)), tmp_path)
        assert p.returncode == 2, p.stderr
        assert "another ftrecycle run is writing" in _one_line(p.stderr)
        assert not out.exists()
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert not out.exists() and _hidden(tmp_path) == []


@pytest.mark.parametrize("case", [("transfer-compress", 1), ("transfer-compress", 3), ("apply", 1), ("diff", 1)])
def test_what_a_killed_run_left_is_removed_by_the_next_run_for_its_output(lab, tmp_path, case):
    """SIGKILL cannot be caught: the hidden temps stay, unlocked, until the next run for OUT."""
    command, n = case
    out = tmp_path / "out"
    p = _paused(lab, command, out, tmp_path / "ready", n, force=False)
    p.kill()
    p.communicate(timeout=60)
    assert any(TMP_MARK in name for name in _hidden(tmp_path)), "nothing was left: the test did not test"
    done = _run_cli(_argv(command, lab, str(out)), tmp_path)
    assert done.returncode == 0, done.stderr
    assert _hidden(tmp_path) == [], _hidden(tmp_path)


@pytest.mark.parametrize("force", [False, True])
def test_lab_never_writes_into_a_directory_that_is_not_a_lab_run(lab, capsys, tmp_path, force):
    """`lab run --out MODELS` (a folder of something else) is refused, not filled or discarded."""
    models = lab["src"]
    before = tree_digest(models)
    listing = sorted(p.name for p in models.iterdir())
    code = main(["lab", "run", "--preset", "smoke", "--out", str(models), "--quiet", *(["--force"] if force else [])])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "holds no lab run" in line, line
    assert tree_digest(models) == before and sorted(p.name for p in models.iterdir()) == listing


#: (case, where diagnose runs, the --plot it is given, the exit code expected); every case aims at
#: a PNG that belongs to an input (a model card's figure in A) or shares its inode
PLOTS = {
    "png-inside-a-model": lambda e: (e["root"], str(e["A"] / "figure.png"), 2),
    "relative-from-inside-the-model": lambda e: (e["A"], "figure.png", 2),
    "through-a-linked-parent": lambda e: (e["root"], "link-A/figure.png", 2),
    "dotdot-back-into-the-model": lambda e: (e["root"] / "elsewhere", "../src/A/../A/figure.png", 2),
    "hard-link-of-the-models-png": lambda e: (e["root"] / "elsewhere", "hard.png", 0),
}


@pytest.mark.parametrize("case", list(PLOTS))
def test_a_plot_never_replaces_an_input(lab, capsys, monkeypatch, case):
    """diagnose --plot wrote its PNG over any path, a file of a model directory included."""
    e = lab
    png = e["A"] / "figure.png"
    if not png.exists():
        png.write_bytes(b"a figure of the model card")
        os.link(png, e["root"] / "elsewhere" / "hard.png")
    if not (e["root"] / "link-A").is_symlink():
        (e["root"] / "link-A").symlink_to(e["A"])
    cwd, plot, expect = PLOTS[case](e)
    before = tree_digest(e["src"])
    monkeypatch.chdir(cwd)
    models = ["--source-base", str(e["A"]), "--source-finetuned", str(e["B"]), "--target-base", str(e["C"])]
    code = main(["diagnose", *models, "--plot", plot])
    err = capsys.readouterr().err
    assert code == expect, err
    if expect == 2:
        assert "overlaps input" in _one_line(err), err
    assert tree_digest(e["src"]) == before, f"diagnose --plot {plot} changed an input"
    assert png.read_bytes() == b"a figure of the model card"
    assert not [p for p in (cwd.iterdir()) if p.name.startswith(".") and p.name.endswith(".png")]
