"""Attack the ``ftrecycle`` command line as a hostile or careless user would, and check the invariants.

Every case runs the real CLI in a subprocess on tiny local models and crafted files, and must:

* end with exit code 2 and exactly one stderr line starting ``ftrecycle: error:`` (no traceback);
* leave every input byte-identical (a digest of the whole world before and after);
* leave no output and no hidden temporary directory behind;
* finish within its time limit (no hang) and, where a case sets ``--max-memory``, stay within it.

A few cases are legal inputs that must succeed (``expect=0``). Run::

    .venv/bin/python scripts/battery.py [--json FILE] [-k SUBSTRING]

and read the table: one row per case, grouped by class, with what broke. This is a tool for
maintainers, not a test: each case costs a Python start-up with torch (2-4 s).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test fixtures (tests/fixtures)
TIME = shutil.which("time", path="/usr/bin:/bin") or "/usr/bin/time"  # GNU time (Debian package "time")

# Cases ------------------------------------------------------------------------------------------


@dataclass
class Case:
    cls: str
    name: str
    argv: Callable[[World], list[str]]
    setup: Callable[[World], None] | None = None
    expect: int = 2
    timeout: float = 120.0
    max_rss_mib: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    nofile: int | None = None


class World:
    """Tiny models, deltas, data and chain files under one root; crafted copies made per case."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.case = root  # the current case's scratch directory (inside root)

    def build(self) -> None:
        from ftrecycle.ops.diff import diff

        from fixtures.tiny import make_versions

        v = make_versions("llama", self.root / "models")
        self.a, self.b, self.c = (str(v[k]) for k in ("source_base", "source_finetuned", "target_base"))
        self.delta = str(diff(self.a, self.b, self.root / "delta").output)
        self.delta_int8 = str(diff(self.a, self.b, self.root / "delta-int8", compress="int8").output)
        self.delta_lr = str(diff(self.a, self.b, self.root / "delta-lr", compress="lowrank:rank=4").output)
        data = self.root / "data"
        data.mkdir()
        rows = [{"question": f"What is {i} + 1 ?", "answer": f"{i} + 1 = {i + 1} . #### {i + 1}"} for i in range(20)]
        (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.train = str(data / "train.jsonl")
        chain = {
            "versions": [self.a, self.c],
            "data": self.train,
            "output": str(self.root / "chain-out"),
            "mode": "iterative",
            "alpha": 1.0,
            "finetune": {"max_steps": 2, "batch_size": 4},
        }
        (self.root / "chain.yaml").write_text(json.dumps(chain))
        self.chain = str(self.root / "chain.yaml")

    # helpers used by setups
    def copy(self, src: str, name: str) -> Path:
        dst = self.case / name
        shutil.copytree(src, dst, symlinks=True)
        return dst

    def out(self, name: str = "out") -> str:
        return str(self.case / name)

    def trio(self, command: str, *, b: str | None = None, c: str | None = None) -> list[str]:
        """``command`` with the three model flags (A, B, C; B or C replaced when given)."""
        return [command, "--source-base", self.a, "--source-finetuned", b or self.b, "--target-base", c or self.c]


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def _header(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _craft(w: World, mutate: Callable[[dict, bytes], bytes | tuple[dict, bytes]]) -> None:
    """A copy of C whose first shard's header (or whole bytes) is rewritten by ``mutate``."""
    d = w.copy(w.c, "C")
    f = _shards(d)[0]
    h, data = _header(f.read_bytes())
    got = mutate(h, data)
    if isinstance(got, bytes):
        f.write_bytes(got)
    else:
        h, data = got
        raw = json.dumps(h).encode()
        f.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _write(f: Path, got: object) -> None:
    if isinstance(got, bytes):
        f.write_bytes(got)
    else:
        f.write_text(got if isinstance(got, str) else json.dumps(got))


def _edit_json(name: str, mutate: Callable[[dict], object]) -> Callable[[World], None]:
    """A setup: a copy of C whose JSON file ``name`` is rewritten by ``mutate``."""

    def setup(w: World) -> None:
        f = w.copy(w.c, "C") / name
        _write(f, mutate(json.loads(f.read_text())))

    return setup


def _first_tensor(h: dict) -> str:
    return next(k for k in h if k != "__metadata__")


def _deep(n: int = 100_000) -> str:
    return "[" * n + "]" * n


def _set(key: str, value: object) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    def f(h: dict, data: bytes) -> tuple[dict, bytes]:
        h[_first_tensor(h)][key] = value
        return h, data

    return f


def transfer_c(w: World, *extra: str) -> list[str]:
    args = w.trio("transfer", c=str(w.case / "C"))
    return [*args, "-o", w.out(), *extra]


def _header_cases() -> list[Case]:
    def raw(b: bytes) -> Callable[[dict, bytes], bytes]:
        return lambda h, d: b

    crafted: dict[str, Callable[[dict, bytes], bytes | tuple[dict, bytes]]] = {
        "header-len-huge": raw(struct.pack("<Q", 2**63) + b"{}"),
        "header-len-past-eof": raw(struct.pack("<Q", 10_000) + b'{"a":1}'),
        "header-len-short-file": raw(b"\x01\x02"),
        "header-not-json": raw(struct.pack("<Q", 5) + b"{{{{{"),
        "header-array": raw(struct.pack("<Q", 2) + b"[]"),
        "header-deep": raw(struct.pack("<Q", 200_000) + _deep().encode()),
        "header-not-utf8": raw(struct.pack("<Q", 4) + b"\xff\xfe{}"),
        "shape-negative": _set("shape", [-1, 4]),
        "shape-float": _set("shape", [1.5, 2]),
        "shape-bool": _set("shape", [True, 2]),
        "shape-huge": _set("shape", [2**62, 2**62]),
        "shape-string": _set("shape", "abc"),
        "dtype-unknown": _set("dtype", "F128"),
        "dtype-int": _set("dtype", 7),
        "offsets-past-eof": _set("data_offsets", [0, 10**12]),
        "offsets-reversed": _set("data_offsets", [100, 4]),
        "offsets-negative": _set("data_offsets", [-8, 0]),
        "offsets-float": _set("data_offsets", [0.0, 8.0]),
        "offsets-mismatch-shape": _set("data_offsets", [0, 3]),
        "metadata-not-str": lambda h, d: ({**h, "__metadata__": {"format": 5}}, d),
        "tensor-entry-not-object": lambda h, d: ({**h, _first_tensor(h): 5}, d),
    }

    def overlap(h: dict, d: bytes) -> tuple[dict, bytes]:
        names = [k for k in h if k != "__metadata__"]
        if len(names) >= 2:
            h[names[1]]["data_offsets"] = h[names[0]]["data_offsets"]
        return h, d

    crafted["offsets-overlap"] = overlap
    cases = []
    for name, fn in crafted.items():
        cases.append(Case("safetensors header", name, lambda w: transfer_c(w), setup=lambda w, fn=fn: _craft(w, fn)))
    return cases


def _index_cases() -> list[Case]:
    def idx(mutate: Callable[[dict], object]) -> Callable[[World], None]:
        return _edit_json("model.safetensors.index.json", mutate)

    muts: dict[str, Callable[[dict], object]] = {
        "weight-map-empty": lambda j: {**j, "weight_map": {}},
        "weight-map-list": lambda j: {**j, "weight_map": []},
        "weight-map-missing": lambda j: {"metadata": {}},
        "index-array": lambda j: [],
        "index-deep": lambda j: _deep(),
        "index-not-utf8": lambda j: b'{"weight_map": {"\xff": 1}}',
        "shard-dotdot": lambda j: {
            **j,
            "weight_map": {k: "../../models/source_base/" + v for k, v in j["weight_map"].items()},
        },
        "shard-absolute": lambda j: {**j, "weight_map": {k: "/etc/passwd" for k in j["weight_map"]}},
        "shard-missing": lambda j: {**j, "weight_map": {k: "nope.safetensors" for k in j["weight_map"]}},
        "shard-value-int": lambda j: {**j, "weight_map": {k: 5 for k in j["weight_map"]}},
    }
    cases = [Case("index json", n, lambda w: transfer_c(w), setup=idx(m)) for n, m in muts.items()]

    def symlink_shard(w: World) -> None:
        d = w.copy(w.c, "C")
        s = _shards(d)[0]
        s.unlink()
        outside = w.case / "outside.safetensors"
        shutil.copy(_shards(Path(w.c))[0], outside)
        s.symlink_to(outside)

    cases.append(Case("index json", "shard-symlink-outside", lambda w: transfer_c(w), setup=symlink_shard))
    return cases


def _config_cases() -> list[Case]:
    def cfg(mutate: Callable[[dict], object]) -> Callable[[World], None]:
        return _edit_json("config.json", mutate)

    muts: dict[str, Callable[[dict], object]] = {
        "config-deep": lambda j: _deep(),
        "config-array": lambda j: [1, 2],
        "config-not-json": lambda j: "{",
        "config-hidden-size-str": lambda j: {**j, "hidden_size": "x"},
        "config-text-config-other-arch": lambda j: {
            "model_type": "llava",
            "architectures": ["LlavaForConditionalGeneration"],
            "text_config": {**j, "hidden_size": 64, "num_hidden_layers": 7},
        },
    }
    return [Case("config json", n, lambda w: transfer_c(w), setup=cfg(m)) for n, m in muts.items()]


def _fifo_cases() -> list[Case]:
    def single_file_with(kind: str, fname: str) -> Callable[[World], None]:
        def setup(w: World) -> None:
            d = w.copy(w.c, "C")
            for f in [*d.glob("*.safetensors"), d / "model.safetensors.index.json"]:
                f.unlink()
            target = d / fname
            if kind == "fifo":
                os.mkfifo(target)
            elif kind == "dir":
                target.mkdir()
            if fname != "model.safetensors":
                shutil.copy(_shards(Path(w.c))[0], d / "model.safetensors")

        return setup

    return [
        Case(
            "non-regular file",
            "fifo-model",
            lambda w: transfer_c(w),
            setup=single_file_with("fifo", "model.safetensors"),
            timeout=60,
        ),
        Case(
            "non-regular file", "dir-model", lambda w: transfer_c(w), setup=single_file_with("dir", "model.safetensors")
        ),
        Case("non-regular file", "fifo-config", lambda w: transfer_c(w), setup=_fifo_config, timeout=60),
    ]


def _fifo_config(w: World) -> None:
    d = w.copy(w.c, "C")
    (d / "config.json").unlink()
    os.mkfifo(d / "config.json")


# Nothing lost ----------------------------------------------------------------------------------


def _force_cases() -> list[Case]:
    def t(w: World, out: str, *extra: str) -> list[str]:
        return [
            *w.trio("transfer"),
            "-o",
            out,
            "--force",
            *extra,
        ]

    def link_to_a(w: World) -> None:
        (w.case / "L").symlink_to(w.a)

    rf = ["--data", "{train}", "--max-steps", "1", "--batch-size", "2"]

    def rfa(w: World, out: str) -> list[str]:
        extra = [x.format(train=w.train) for x in rf]
        args = w.trio("recycle-finetune")
        return [*args, *extra, "-o", out, "--force"]

    return [
        Case("force vs input", "transfer-o-A", lambda w: t(w, w.a)),
        Case("force vs input", "transfer-o-C", lambda w: t(w, w.c)),
        Case("force vs input", "transfer-int8-o-A", lambda w: t(w, w.a, "--compress", "int8")),
        Case(
            "force vs input", "transfer-int8-o-models-dir", lambda w: t(w, str(Path(w.a).parent), "--compress", "int8")
        ),
        Case("force vs input", "transfer-o-models-dir", lambda w: t(w, str(Path(w.a).parent))),
        Case("force vs input", "transfer-o-inside-A", lambda w: t(w, w.a + "/sub")),
        Case("force vs input", "transfer-o-symlink-to-A", lambda w: t(w, str(w.case / "L")), setup=link_to_a),
        Case("force vs input", "transfer-o-A-dotdot", lambda w: t(w, w.a + "/../source_base")),
        Case("force vs input", "diff-o-A", lambda w: ["diff", "--base", w.a, "--finetuned", w.b, "-o", w.a, "--force"]),
        Case(
            "force vs input",
            "apply-o-delta",
            lambda w: ["apply", "--delta", w.delta, "--target-base", w.c, "-o", w.delta, "--force"],
        ),
        Case(
            "force vs input",
            "apply-o-C",
            lambda w: ["apply", "--delta", w.delta, "--target-base", w.c, "-o", w.c, "--force"],
        ),
        Case(
            "force vs input",
            "export-lora-o-delta",
            lambda w: ["export-lora", "--delta", w.delta, "--rank", "2", "-o", w.delta, "--force"],
        ),
        Case("force vs input", "recycle-finetune-o-A", lambda w: rfa(w, w.a), timeout=300),
        Case("force vs input", "recycle-finetune-o-data-dir", lambda w: rfa(w, str(Path(w.train).parent)), timeout=300),
        Case(
            "force vs input",
            "finetune-o-model",
            lambda w: ["finetune", "--model", w.a, "--data", w.train, "--max-steps", "1", "-o", w.a, "--force"],
            timeout=300,
        ),
        Case(
            "force vs input",
            "finetune-o-data-dir",
            lambda w: [
                "finetune",
                "--model",
                w.a,
                "--data",
                w.train,
                "--max-steps",
                "1",
                "-o",
                str(Path(w.train).parent),
                "--force",
            ],
            timeout=300,
        ),
        Case(
            "force vs input",
            "iterate-o-models-dir",
            lambda w: ["iterate", w.chain, "-o", str(Path(w.a).parent)],
            timeout=300,
        ),
        Case(
            "force vs input",
            "lab-out-models",
            lambda w: ["lab", "run", "--preset", "smoke", "--out", str(Path(w.a).parent), "--force"],
            timeout=300,
        ),
    ]


# Deltas and adapters ---------------------------------------------------------------------------


def _manifest_cases() -> list[Case]:
    def man(src: str, mutate: Callable[[dict], object]) -> Callable[[World], None]:
        def setup(w: World) -> None:
            d = w.copy(src, "D")
            f = d / "ftrecycle-delta.json"
            got = mutate(json.loads(f.read_text()))
            _write(f, got)

        return setup

    def apply_d(w: World) -> list[str]:
        return ["apply", "--delta", str(w.case / "D"), "--target-base", w.c, "-o", w.out()]

    def drop_one(j: dict) -> dict:
        j["checksums"].pop(next(iter(j["checksums"])))
        return j

    def method(name: str) -> Callable[[dict], dict]:
        def f(j: dict) -> dict:
            for e in j["tensors"].values():
                if e.get("compression"):
                    e["compression"]["method"] = name
            return j

        return f

    cases = []
    for src_name in ("delta", "delta_lr"):
        muts: dict[str, Callable[[dict], object]] = {
            "no-checksums": lambda j: {k: v for k, v in j.items() if k != "checksums"},
            "one-checksum-missing": drop_one,
            "version-99": lambda j: {**j, "version": 99},
            "version-1": lambda j: {**j, "version": 1},
            "version-str": lambda j: {**j, "version": "2"},
            "manifest-deep": lambda j: _deep(),
            "tensors-list": lambda j: {**j, "tensors": []},
        }
        if src_name == "delta_lr":
            muts["method-zero"] = method("zero")
            muts["method-unknown"] = method("gzip")
        for n, m in muts.items():
            cases.append(
                Case(
                    "delta manifest",
                    f"{src_name}-{n}",
                    apply_d,
                    setup=lambda w, m=m, s=src_name: man(getattr(w, s), m)(w),
                )
            )

    def swap_parts(w: World) -> None:
        # exchange the stored bytes of two compressed tensors' parts by renaming them in the shard header
        d = w.copy(w.delta_int8, "D")
        f = _shards(d)[0]
        h, data = _header(f.read_bytes())
        qs = sorted(k for k in h if k.endswith("::q"))
        scales = sorted(k for k in h if k.endswith("::scale"))
        h[qs[0]], h[scales[0]] = h[scales[0]], h[qs[0]]
        raw = json.dumps(h).encode()
        f.write_bytes(struct.pack("<Q", len(raw)) + raw + data)

    cases.append(Case("delta manifest", "int8-parts-exchanged", apply_d, setup=swap_parts))
    cases.append(
        Case(
            "delta manifest", "int8-parts-exchanged-noverify", lambda w: [*apply_d(w), "--no-verify"], setup=swap_parts
        )
    )

    def finetuned_link(w: World) -> None:
        d = w.copy(w.delta, "D")
        fd = d / "finetuned"
        fd.mkdir(exist_ok=True)
        secret = w.case / "secret.txt"
        secret.write_text("private key")
        for name in ("tokenizer.json", "config.json"):
            (fd / name).unlink(missing_ok=True)
        (fd / "tokenizer.json").symlink_to(secret)

    cases.append(
        Case(
            "delta manifest",
            "finetuned-symlink-out",
            lambda w: [*apply_d(w), "--tokenizer-from", "finetuned"],
            setup=finetuned_link,
        )
    )

    def no_finetuned(w: World) -> None:
        d = w.copy(w.delta, "D")
        shutil.rmtree(d / "finetuned", ignore_errors=True)

    cases.append(
        Case(
            "delta manifest",
            "config-from-finetuned-missing",
            lambda w: [*apply_d(w), "--config-from", "finetuned"],
            setup=no_finetuned,
        )
    )
    return cases


def _adapter_cases() -> list[Case]:
    def adapter(mutate: Callable[[dict], object]) -> Callable[[World], None]:
        def setup(w: World) -> None:
            import torch
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM

            m = AutoModelForCausalLM.from_pretrained(w.a)
            pm = get_peft_model(m, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_B" in n:
                        p.normal_()
            pm.save_pretrained(w.case / "ad")
            f = w.case / "ad" / "adapter_config.json"
            got = mutate(json.loads(f.read_text()))
            _write(f, got)

        return setup

    def t(w: World) -> list[str]:
        return [
            *w.trio("transfer", b=str(w.case / "ad")),
            "-o",
            w.out(),
        ]

    muts: dict[str, Callable[[dict], object]] = {
        "r-zero": lambda j: {**j, "r": 0},
        "r-negative": lambda j: {**j, "r": -2},
        "r-string": lambda j: {**j, "r": "2"},
        "alpha-string": lambda j: {**j, "lora_alpha": "x"},
        "lora-bias": lambda j: {**j, "lora_bias": True},
        "targets-int": lambda j: {**j, "target_modules": 5},
        "rank-pattern-list": lambda j: {**j, "rank_pattern": [1]},
        "adapter-deep": lambda j: _deep(),
        "adapter-array": lambda j: [],
        "dora": lambda j: {**j, "use_dora": True},
    }
    return [Case("adapter config", n, t, setup=adapter(m)) for n, m in muts.items()]


# Option values ---------------------------------------------------------------------------------


def _option_cases() -> list[Case]:
    def t(w: World, *extra: str) -> list[str]:
        return [
            *w.trio("transfer"),
            "-o",
            w.out(),
            *extra,
        ]

    def ft(w: World, *extra: str) -> list[str]:
        return ["finetune", "--model", w.a, "--data", w.train, "-o", w.out(), "--max-steps", "1", *extra]

    def ev(w: World, *extra: str) -> list[str]:
        return ["eval", "--builtin", w.train, "--model", w.a, *extra]

    bad: dict[str, Callable[[World], list[str]]] = {
        "max-memory-inf": lambda w: t(w, "--max-memory", "inf"),
        "max-memory-nan": lambda w: t(w, "--max-memory", "nan"),
        "max-memory-negative": lambda w: t(w, "--max-memory=-5GB"),
        "shard-size-1e400": lambda w: t(w, "--shard-size", "1e400"),
        "shard-size-zero": lambda w: t(w, "--shard-size", "0"),
        "rank-nan": lambda w: t(w, "--compress", "lowrank:rank=nan"),
        "rank-inf": lambda w: t(w, "--compress", "lowrank:rank=inf"),
        "rank-duplicate": lambda w: t(w, "--compress", "lowrank:rank=4,rank=8"),
        "energy-nan": lambda w: t(w, "--compress", "lowrank:energy=nan"),
        "density-inf": lambda w: t(w, "--compress", "sparse:density=inf"),
        "alpha-nan": lambda w: t(w, "--alpha", "nan"),
        "alpha-inf": lambda w: t(w, "--alpha", "inf"),
        "threads-zero": lambda w: t(w, "--threads", "0"),
        "threads-negative": lambda w: t(w, "--threads=-3"),
        "epochs-nan": lambda w: ft(w, "--epochs", "nan"),
        "seed-negative": lambda w: ft(w, "--seed=-1"),
        "lr-zero": lambda w: ft(w, "--learning-rate", "0"),
        "lr-nan": lambda w: ft(w, "--learning-rate", "nan"),
        "batch-size-zero": lambda w: ft(w, "--batch-size", "0"),
        "max-steps-negative": lambda w: ft(w, "--max-steps=-2"),
        "eval-batch-size-zero": lambda w: ev(w, "--batch-size", "0"),
        "eval-max-new-tokens-negative": lambda w: ev(w, "--max-new-tokens=-5"),
        "eval-max-new-tokens-huge": lambda w: ev(w, "--max-new-tokens", "100000000"),
        "eval-limit-negative": lambda w: ev(w, "--limit=-1"),
        "diagnose-device-bogus": lambda w: [
            *w.trio("diagnose"),
            "--device",
            "bogus",
            "--data",
            w.train,
        ],
        "diagnose-plot-missing-dir": lambda w: [
            *w.trio("diagnose"),
            "--plot",
            str(w.case / "no" / "x.png"),
        ],
        "export-rank-zero": lambda w: ["export-lora", "--delta", w.delta, "--rank", "0", "-o", w.out()],
        "lab-seeds-junk": lambda w: ["lab", "run", "--preset", "smoke", "--seeds", "a,b", "--out", w.out()],
        "lab-workers-zero": lambda w: ["lab", "run", "--preset", "smoke", "--workers", "0", "--out", w.out()],
    }
    return [Case("option values", n, f) for n, f in bad.items()]


# Output paths and OS errors --------------------------------------------------------------------


def _os_cases() -> list[Case]:
    def t(w: World, out: str, *extra: str) -> list[str]:
        return [*w.trio("transfer"), "-o", out, *extra]

    def regular(w: World) -> None:
        (w.case / "file").write_text("x")

    def dangling(w: World) -> None:
        (w.case / "dang").symlink_to(w.case / "nowhere")

    def rodir(w: World) -> None:
        ro = w.case / "ro"
        ro.mkdir()
        # root ignores mode bits: a read-only bind mount is the real thing, where allowed
        r = subprocess.run(["mount", "--bind", "-o", "ro", str(ro), str(ro)], capture_output=True, check=False)
        if r.returncode:
            raise Skip("cannot make a read-only mount here")

    def tiny_fs(w: World) -> None:
        fs = w.case / "full"
        fs.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(fs)], capture_output=True, check=False
        )
        if r.returncode:
            raise Skip("cannot mount a small tmpfs here")

    long_name = "n" * 240
    return [
        Case("output path", "o-under-regular-file", lambda w: t(w, str(w.case / "file" / "out")), setup=regular),
        Case("output path", "o-dot", lambda w: t(w, ".")),
        Case("output path", "o-dangling-symlink", lambda w: t(w, str(w.case / "dang")), setup=dangling),
        Case("output path", "o-name-too-long", lambda w: t(w, str(w.case / ("x" * 300)))),
        Case("output path", "o-legal-240-char-name", lambda w: t(w, str(w.case / long_name)), expect=0),
        Case("output path", "o-glob-chars", lambda w: t(w, str(w.case / "o*[x]?")), expect=0),
        Case("output path", "o-read-only-dir", lambda w: t(w, str(w.case / "ro" / "out")), setup=rodir),
        Case("output path", "o-full-disk", lambda w: t(w, str(w.case / "full" / "out")), setup=tiny_fs),
        Case("output path", "o-emfile", lambda w: t(w, w.out(), "--shard-size", "2KB"), nofile=24),
        Case(
            "output path", "o-new-parents-fail", lambda w: t(w, str(w.case / "p1" / "p2" / "p3"), "--shard-size", "0")
        ),
    ]


# Data, chain and eval inputs -------------------------------------------------------------------


def _data_cases() -> list[Case]:
    def write(name: str, content: bytes) -> Callable[[World], None]:
        def setup(w: World) -> None:
            (w.case / name).write_bytes(content)

        return setup

    def ft(w: World, data: str) -> list[str]:
        return ["finetune", "--model", w.a, "--data", data, "-o", w.out(), "--max-steps", "1"]

    good = b'{"question": "What is 1 + 1 ?", "answer": "1 + 1 = 2 . #### 2"}\n'
    # (case, bytes of d.jsonl): one good line, then the bad one
    bad_lines = {
        "jsonl-not-utf8": good + b'{"question": "\xff\xfe", "answer": "x #### 1"}\n',
        "jsonl-deep": good + _deep().encode() + b"\n",
        "jsonl-bad-json": good + b"{oops\n",
        "jsonl-array-line": good + b"[1, 2]\n",
        "jsonl-empty": b"",
    }
    cases = [
        Case("data files", n, lambda w: ft(w, str(w.case / "d.jsonl")), setup=write("d.jsonl", content))
        for n, content in bad_lines.items()
    ]
    cases += [
        Case("data files", "jsonl-typo-path", lambda w: ft(w, "data/trian.jsonl")),
        Case(
            "data files",
            "jsonl-fifo",
            lambda w: ft(w, str(w.case / "fifo.jsonl")),
            setup=lambda w: os.mkfifo(w.case / "fifo.jsonl"),
            timeout=60,
        ),
        Case(
            "data files",
            "model-typo-path",
            lambda w: ["finetune", "--model", "models/M9", "--data", w.train, "-o", w.out()],
        ),
    ]

    def chain(text: str) -> Callable[[World], None]:
        def setup(w: World) -> None:
            (w.case / "chain.yaml").write_text(text.replace("{A}", w.a).replace("{C}", w.c).replace("{T}", w.train))

        return setup

    def it(w: World) -> list[str]:
        return ["iterate", str(w.case / "chain.yaml"), "-o", w.out()]

    bomb = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    for i in range(1, 10):
        prev = chr(ord("a") + i - 1)
        cur = chr(ord("a") + i)
        bomb += f"{cur}: &{cur} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
    base = "versions: [{A}, {C}]\ndata: {T}\nmode: iterative\nfinetune: {max_steps: 1}\n"
    chains = {
        "chain-alpha-abc": base + "alpha: abc\n",
        "chain-alpha-nan": base + "alpha: .nan\n",
        "chain-yaml-bomb": bomb + base,
        "chain-deep": "x: " + "[" * 10000 + "]" * 10000 + "\n" + base,
        "chain-unknown-key": base + "alhpa: 1.0\n",
        "chain-versions-str": "versions: 5\ndata: {T}\n",
        "chain-missing-model": "versions: [models/M9, {C}]\ndata: {T}\n",
        "chain-max-steps-str": base.replace("max_steps: 1", "max_steps: many"),
    }
    for n, text in chains.items():
        cases.append(Case("chain file", n, it, setup=chain(text), timeout=90))
    cases.append(
        Case(
            "chain file",
            "chain-not-utf8",
            it,
            setup=lambda w: (w.case / "chain.yaml").write_bytes(b"versions: [\xff\xfe]\n"),
        )
    )

    def ev(w: World, *extra: str) -> list[str]:
        return ["eval", "--model", *extra]

    cases += [
        Case(
            "eval inputs",
            "eval-non-model-dir",
            lambda w: ["eval", "--builtin", w.train, "--model", str(Path(w.train).parent)],
        ),
        Case(
            "eval inputs",
            "eval-missing-model",
            lambda w: ["eval", "--builtin", w.train, "--model", "models/M9"],
        ),
        Case(
            "eval inputs",
            "eval-tasks-offline",
            lambda w: ["eval", "--model", w.a, "--tasks", "gsm8k", "--limit", "2"],
            timeout=180,
        ),
        Case("eval inputs", "eval-delta-dir", lambda w: ["eval", "--builtin", w.train, "--model", w.delta]),
        Case(
            "eval inputs",
            "eval-tasks-with-builtin",
            lambda w: ["eval", "--builtin", w.train, "--model", w.a, "--tasks", "mmlu"],
        ),
    ]
    return cases


def _pickle_cases() -> list[Case]:
    def pickled(w: World) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(w.c)
        d = w.case / "P"
        d.mkdir()
        # transformers 5 writes safetensors whatever safe_serialization says: write the pickle by hand
        torch.save(m.state_dict(), d / "pytorch_model.bin")
        for f in Path(w.c).iterdir():
            if f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
                shutil.copy(f, d)

    p = lambda w: str(w.case / "P")  # noqa: E731
    return [
        Case(
            "pickle",
            "transfer-target-bin",
            lambda w: [
                *w.trio("transfer", c=p(w)),
                "-o",
                w.out(),
            ],
            setup=pickled,
        ),
        Case(
            "pickle",
            "finetune-bin",
            lambda w: ["finetune", "--model", p(w), "--data", w.train, "-o", w.out(), "--max-steps", "1"],
            setup=pickled,
        ),
        Case(
            "pickle",
            "eval-bin",
            lambda w: ["eval", "--builtin", w.train, "--model", p(w), "--limit", "2"],
            setup=pickled,
        ),
        Case(
            "pickle",
            "diagnose-probe-bin",
            lambda w: [
                *w.trio("diagnose", c=p(w)),
                "--data",
                w.train,
            ],
            setup=pickled,
        ),
    ]


def _memory_cases() -> list[Case]:
    def big_header(w: World) -> None:
        d = w.copy(w.c, "C")
        f = _shards(d)[0]
        h, data = _header(f.read_bytes())
        # 100k extra zero-size tensors: a valid, 9-10 MB header
        for i in range(100_000):
            h[f"extra.{i:06d}.padding_tensor_name_to_make_the_header_large.weight"] = {
                "dtype": "BF16",
                "shape": [0],
                "data_offsets": [0, 0],
            }
        raw = json.dumps(h).encode()
        f.write_bytes(struct.pack("<Q", len(raw)) + raw + data)

    return [
        Case(
            "memory",
            "header-100k-tensors",
            lambda w: transfer_c(w, "--max-memory", "256MiB"),
            setup=big_header,
            max_rss_mib=256,
            timeout=180,
        ),
    ]


ALL: list[Callable[[], list[Case]]] = [
    _header_cases,
    _index_cases,
    _config_cases,
    _fifo_cases,
    _force_cases,
    _manifest_cases,
    _adapter_cases,
    _option_cases,
    _os_cases,
    _data_cases,
    _pickle_cases,
    _memory_cases,
]


class Skip(Exception):
    pass


# Running ---------------------------------------------------------------------------------------


def digest(root: Path, skip: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            p = Path(dirpath) / name
            if p == skip or skip in p.parents:
                continue
            h.update(str(p).encode())
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                h.update(p.read_bytes())
            elif stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(p).encode())
    return h.hexdigest()


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_case(w: World, case: Case, scratch: Path) -> dict:
    w.case = scratch / f"{case.cls.replace(' ', '_')}--{case.name}"
    w.case.mkdir(parents=True)
    row: dict = {"class": case.cls, "case": case.name, "problems": []}
    try:
        if case.setup:
            case.setup(w)
        argv = case.argv(w)
    except Skip as e:
        row["skipped"] = str(e)
        return row
    before_world = digest(w.root, skip=scratch)
    before_case = listing(w.case)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **case.env}
    env.pop("FTRECYCLE_DEBUG", None)

    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        # GNU time between us and the CLI: a child's ru_maxrss would include the pages it shared
        # with this (large) process before exec; time's own child starts small
        rss_file = w.case.parent / f".{w.case.name}.rss"
        cmd = [TIME, "-q", "-f", "%M", "-o", str(rss_file)]
        if case.nofile:
            cmd += ["prlimit", f"--nofile={case.nofile}"]
        proc = subprocess.Popen(
            [*cmd, sys.executable, "-m", "ftrecycle.cli", *argv],
            cwd=w.case,
            env=env,
            stdout=out_f,
            stderr=err_f,
            stdin=subprocess.DEVNULL,
        )
        # wait4, not wait: it gives this child's own peak RSS
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > case.timeout:
                proc.kill()
                pid, status, ru = os.wait4(proc.pid, 0)
                row["problems"].append(f"hung (killed after {case.timeout:.0f} s)")
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err_f.seek(0)
        err = err_f.read()
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["exit"] = proc.returncode
    lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
    row["stderr"] = lines[-1][:300] if lines else ""
    if proc.returncode != case.expect:
        row["problems"].append(f"exit {proc.returncode}, expected {case.expect}")
    if case.expect == 2:
        errors = [ln for ln in lines if ln.startswith("ftrecycle: error:")]
        if len(errors) != 1 or any("Traceback" in ln for ln in lines):
            row["problems"].append(f"{len(lines)} stderr lines, {len(errors)} 'ftrecycle: error:' lines")
    if digest(w.root, skip=scratch) != before_world:
        row["problems"].append("an input outside the case changed")
        row["rebuild"] = True
    after_case = listing(w.case)
    added = after_case - before_case
    hidden = [a for a in added if any(part.startswith(".") for part in Path(a).parts)]
    if hidden:
        row["problems"].append(f"hidden leftovers: {sorted(hidden)[:3]}")
    if case.expect == 2 and added - set(hidden):
        row["problems"].append(f"output left: {sorted(added - set(hidden))[:3]}")
    del ru
    try:
        rss = int(rss_file.read_text().split()[-1]) / 1024
    except (OSError, ValueError, IndexError):
        rss = 0.0
    row["max_rss_mib"] = round(rss)
    if case.max_rss_mib and rss > case.max_rss_mib:
        row["problems"].append(f"peak RSS {rss:.0f} MiB > {case.max_rss_mib} MiB")
    subprocess.run(["umount", "-l", str(w.case / "ro")], capture_output=True, check=False)
    subprocess.run(["umount", "-l", str(w.case / "full")], capture_output=True, check=False)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("-k", default="", help="only cases whose class or name contains this")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ns = ap.parse_args()
    cases = [c for make in ALL for c in make() if ns.k in f"{c.cls} {c.name}"]
    root = Path(tempfile.mkdtemp(prefix="ftrecycle-battery-"))
    roots = [root]
    w = World(root)
    w.build()
    scratch = root / "cases"
    rows = []
    try:
        for i, case in enumerate(cases, 1):
            row = run_case(w, case, scratch)
            rows.append(row)
            if row.get("rebuild"):  # a case destroyed inputs: give the next cases a fresh world
                root = Path(tempfile.mkdtemp(prefix="ftrecycle-battery-"))
                roots.append(root)
                w = World(root)
                w.build()
                scratch = root / "cases"
            status = "skip" if "skipped" in row else ("ok" if not row["problems"] else "FAIL")
            said = "; ".join(row["problems"]) or row.get("stderr", "")[:150]
            print(f"[{i}/{len(cases)}] {status:4} {case.cls} / {case.name}: {said}", flush=True)
    finally:
        if not ns.keep:
            for r in roots:
                shutil.rmtree(r, ignore_errors=True)
    by_class: dict[str, list[int]] = {}
    for r in rows:
        c = by_class.setdefault(r["class"], [0, 0, 0])
        c[0 if "skipped" in r else (1 if not r["problems"] else 2)] += 1
    print("\n| class | cases | ok | failed | skipped |\n|---|---|---|---|---|")
    for k, (sk, ok, bad) in by_class.items():
        print(f"| {k} | {sk + ok + bad} | {ok} | {bad} | {sk} |")
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
