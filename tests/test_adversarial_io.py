"""Hostile inputs to the reading layer, crafted byte by byte as an attacker would write them.

One test per class of failure, parametrised over crafted cases. Every case must end the
command with exit 2 and one ``ftrecycle: error:`` line that names what is wrong, leave the
inputs byte-identical, write no output and no temp, and never hang (a SIGALRM guard turns
a block into a failure).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ftrecycle.cli import main
from ftrecycle.errors import CheckpointError, MemoryBudgetError
from ftrecycle.io import checkpoint as checkpoint_module
from ftrecycle.io.checkpoint import metadata_cost, open_checkpoint
from ftrecycle.io.jsonfile import loads_json, read_json
from ftrecycle.io.output import TMP_MARK

from conftest import tree_digest

# ---------------------------------------------------------------------------------------------
# The attacker's builder: raw bytes of an 8-byte little-endian length, then JSON, then data.

ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}
TENSORS = {"model.embed_tokens.weight": ("F32", [4, 2]), "model.norm.weight": ("F32", [2])}
CONFIG = {"model_type": "llama", "hidden_size": 2, "num_hidden_layers": 1, "num_attention_heads": 1}


def header_for(tensors: dict[str, tuple[str, list[int]]]) -> tuple[dict[str, Any], int]:
    """A valid header for tensors laid out back to back, and the data size."""
    header: dict[str, Any] = {}
    at = 0
    for name, (dtype, shape) in tensors.items():
        n = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + n]}
        at += n
    return header, at


def st_bytes(header: dict[str, Any] | bytes | str, data: int | bytes, *, length: int | None = None) -> bytes:
    """A safetensors file: ``length`` (default: the true header length), the header, the data."""
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    body = data if isinstance(data, bytes) else bytes(range(256)) * (data // 256) + bytes(data % 256)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def write_model(d: Path, *, st: bytes | None = None, config: Any = CONFIG, seed: int = 0) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    if st is None:
        header, size = header_for(TENSORS)
        st = st_bytes(header, bytes((seed + i) % 251 for i in range(size)))
    (d / "model.safetensors").write_bytes(st)
    (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return d


@pytest.fixture
def trio(tmp_path: Path) -> dict[str, Path]:
    """Three small valid models a transfer accepts (checked by test_the_crafted_models_are_valid)."""
    return {role: write_model(tmp_path / role, seed=i) for i, role in enumerate(("a", "b", "c"))}


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """A case that blocks (a FIFO opened for reading) fails after 20 s instead of hanging the run."""

    def boom(*_: object) -> None:
        raise TimeoutError("blocked: the input was opened without O_NONBLOCK or read without a stat")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def transfer_argv(paths: dict[str, Any], out: Path, *extra: str) -> list[str]:
    a, b, c = (str(paths[r]) for r in "abc")
    return ["transfer", "--source-base", a, "--source-finetuned", b, "--target-base", c, "-o", str(out), "-q", *extra]


def refused(capsys: pytest.CaptureFixture[str], trio: dict[str, Path], *extra: str, **roles: Path | str) -> str:
    """Run a transfer that must be refused; check the standards; return the error line."""
    paths = {**trio, **roles}
    out = trio["a"].parent / "out"
    dirs = {Path(p) for p in paths.values() if Path(p).is_dir()}
    before = tree_digest(*dirs)
    # this process is pytest with torch loaded, not a fresh command: give it room
    code = main(transfer_argv(paths, out, "--max-memory", "16GiB", *extra))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("ftrecycle: error: "), err
    assert not out.exists(), "a refused command left an output"
    assert not [p for p in out.parent.iterdir() if TMP_MARK in p.name], "a refused command left a temp dir"
    assert tree_digest(*dirs) == before, "an input changed"
    return lines[0]


def test_the_crafted_models_are_valid(capsys: pytest.CaptureFixture[str], trio: dict[str, Path]) -> None:
    """The builder makes files both safetensors and ftrecycle accept, so each case below fails for its damage."""
    from safetensors.numpy import load_file

    assert sorted(load_file(trio["a"] / "model.safetensors")) == sorted(TENSORS)
    out = trio["a"].parent / "ok"
    code = main(transfer_argv(trio, out))
    assert code == 0, capsys.readouterr().err
    assert (out / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# 1. safetensors headers


_DROP = object()


def _entry(**change: Any) -> bytes:
    header, size = header_for(TENSORS)
    header["model.norm.weight"].update(change)
    header["model.norm.weight"] = {k: v for k, v in header["model.norm.weight"].items() if v is not _DROP}
    return st_bytes(header, size)


def _deep(n: int) -> bytes:
    return st_bytes('{"x": ' + "[" * n + "]" * n + "}", 0)


_H, _SIZE = header_for(TENSORS)
_OK = json.dumps(_H).encode()
HEADERS: dict[str, tuple[bytes, str]] = {
    "empty file": (b"", "not a safetensors file"),
    "7 bytes": (b"\x08\0\0\0\0\0\0", "not a safetensors file"),
    "length past EOF": (st_bytes(_OK, _SIZE, length=len(_OK) + _SIZE + 9), "truncated"),
    "length over 100 MB": (st_bytes(_OK, _SIZE, length=100_000_001), "more than the 100000000"),
    "length 2**64-1": (st_bytes(_OK, _SIZE, length=2**64 - 1), "more than the 100000000"),
    "length 0": (st_bytes(_OK, _SIZE, length=0), "corrupt"),
    "not JSON": (st_bytes(b'{"model.norm.weight": {"dtype": "F32", ', 0), "not valid JSON"),
    "not UTF-8": (st_bytes(b'{"\xff\xfe": 1}', 0), "not UTF-8"),
    "an array": (st_bytes(b"[1, 2]", 0), "does not start with '{'"),
    "a string": (st_bytes(b'"{}"', 0), "does not start with '{'"),
    "nested 100k deep": (_deep(100_000), "nested too deeply"),
    "nested 900 deep": (_deep(900), "corrupt"),
    "entry not an object": (st_bytes({"w": [1, 2]}, 0), "not an object"),
    "entry without dtype": (_entry(dtype=_DROP), "no dtype"),
    "unknown dtype": (_entry(dtype="F33"), "dtype 'F33'"),
    "dtype a number": (_entry(dtype=4), "dtype 4"),
    "shape a string": (_entry(shape="2"), "shape '2'"),
    "shape negative": (_entry(shape=[-2]), "shape [-2]"),
    "shape bool": (_entry(shape=[True, True]), "shape [True, True]"),
    "shape float": (_entry(shape=[2.0]), "shape [2.0]"),
    "shape 2**64": (_entry(shape=[2**64]), "shape"),
    "shape nested": (_entry(shape=[[2]]), "shape [[2]]"),
    "shape 65 dims": (_entry(shape=[1] * 65), "at most 64"),
    "offsets one number": (_entry(data_offsets=[32]), "data_offsets [32]"),
    "offsets three numbers": (_entry(data_offsets=[32, 40, 48]), "data_offsets"),
    "offsets strings": (_entry(data_offsets=["32", "40"]), "data_offsets"),
    "offsets negative": (_entry(data_offsets=[-8, 0]), "data_offsets"),
    "offsets bool": (_entry(data_offsets=[32, True]), "data_offsets"),
    "offsets end < begin": (_entry(data_offsets=[40, 32]), "byte range [40, 32)"),
    "offsets beyond the file": (_entry(data_offsets=[2**40, 2**40 + 8]), "truncated"),
    "offsets overflow": (_entry(shape=[2**62, 2**62], data_offsets=[32, 2**64 - 1]), "byte range"),
    "offsets disagree with shape": (_entry(shape=[3]), "declares shape [3]"),
    "offsets overlap": (_entry(data_offsets=[28, 36]), "overlap"),
    "a gap before a tensor": (
        st_bytes({**_H, "model.norm.weight": {**_H["model.norm.weight"], "data_offsets": [36, 44]}}, _SIZE + 4),
        "belong to no tensor",
    ),
    "bytes after the last tensor": (st_bytes(_H, _SIZE + 8), "after the last tensor"),
    "duplicate tensor name": (
        st_bytes(_OK[:-1] + b', "model.norm.weight": ' + json.dumps(_H["model.norm.weight"]).encode() + b"}", _SIZE),
        "appears twice",
    ),
    "a 5000-digit number": (st_bytes(_OK.replace(b"[32, 40]", b"[32, " + b"9" * 5000 + b"]"), _SIZE), "digits"),
    "NaN offset": (st_bytes(_OK.replace(b"[32, 40]", b"[32, NaN]"), _SIZE), "NaN"),
    "__metadata__ int values": (st_bytes({"__metadata__": {"format": 1}, **_H}, _SIZE), "__metadata__"),
    "__metadata__ a list": (st_bytes({"__metadata__": ["pt"], **_H}, _SIZE), "__metadata__"),
    "__metadata__ nested": (st_bytes({"__metadata__": {"a": {"b": "c"}}, **_H}, _SIZE), "__metadata__"),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_corrupt_safetensors_header_is_refused(
    case: str, capsys: pytest.CaptureFixture[str], trio: dict[str, Path]
) -> None:
    raw, words = HEADERS[case]
    (trio["b"] / "model.safetensors").write_bytes(raw)
    line = refused(capsys, trio)
    assert str(trio["b"] / "model.safetensors") in line and words in line, line
    assert len(line) < 400, "the message must stay one readable line whatever the input"


# ---------------------------------------------------------------------------------------------
# 2. metadata memory counts toward --max-memory


def _many(n: int, name: str = "t{i}") -> bytes:
    return st_bytes(
        {name.format(i=i): {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(n)}, 4 * n
    )


@pytest.mark.parametrize(
    ("tensors", "budget_mib", "sharded"),
    [(100_000, 64, False), (30_000, 16, True), (20_000, 4, False), (20_000, 1, True)],
)
def test_headers_too_large_for_the_budget_are_refused_before_parsing(
    tensors: int, budget_mib: int, sharded: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A valid header of many tensors is refused up front when its index would not fit the budget."""
    d = write_model(tmp_path / "m", st=_many(tensors))
    if sharded:
        (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
        (d / "model-00002-of-00002.safetensors").write_bytes(_many(tensors, "u{i}"))
        index = {f"t{i}": "model-00001-of-00002.safetensors" for i in range(tensors)}
        index.update({f"u{i}": "model-00002-of-00002.safetensors" for i in range(tensors)})
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))

    def parsed(*_: object) -> None:
        raise AssertionError("the header was parsed before the budget was checked")

    monkeypatch.setattr(checkpoint_module, "read_header", parsed)
    with pytest.raises(MemoryBudgetError, match=r"--max-memory") as e:
        open_checkpoint(str(d), max_metadata_bytes=budget_mib << 20)
    assert str(d) in str(e.value)
    monkeypatch.undo()
    if tensors > 20_000:
        return  # parsing is slow; the small cases check what a budget that fits gives
    cost = metadata_cost(sorted(d.glob("*.safetensors")))
    ckpt = open_checkpoint(str(d), max_metadata_bytes=cost)
    assert ckpt.metadata_bytes == cost
    assert len(ckpt.tensors) == tensors * (2 if sharded else 1)


def test_transfer_counts_metadata_toward_max_memory(capsys: pytest.CaptureFixture[str], trio: dict[str, Path]) -> None:
    """Three 30,000-tensor headers (about 2 MB each) under a budget that holds the index of one only."""
    from ftrecycle.engine import current_rss

    for role in trio:
        (trio[role] / "model.safetensors").write_bytes(_many(30_000))
    budget = (current_rss() >> 20) + 48
    line = refused(capsys, trio, "--max-memory", f"{budget}MiB")
    assert "indexing its safetensors headers" in line and "raise --max-memory" in line, line


# ---------------------------------------------------------------------------------------------
# 3. the shard index


def _sharded(d: Path) -> None:
    """Split d's model into two shards with an index, as save_pretrained does."""
    (d / "model.safetensors").unlink()
    names = list(TENSORS)
    for i, name in enumerate(names):
        header, size = header_for({name: TENSORS[name]})
        (d / f"model-0000{i + 1}-of-00002.safetensors").write_bytes(st_bytes(header, size))
    index = {"metadata": {}, "weight_map": {n: f"model-0000{i + 1}-of-00002.safetensors" for i, n in enumerate(names)}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _index(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        _sharded(d)
        index = json.loads((d / "model.safetensors.index.json").read_text())
        value = change(index)
        text = value if isinstance(value, (str, bytes)) else json.dumps(index if value is None else value)
        (d / "model.safetensors.index.json").write_bytes(text if isinstance(text, bytes) else text.encode())

    return damage


def _shard_link(target: Callable[[Path], Path]) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        _sharded(d)
        shard = d / "model-00001-of-00002.safetensors"
        outside = target(d)
        outside.write_bytes(shard.read_bytes())
        shard.unlink()
        shard.symlink_to(outside)

    return damage


def _wm(**kw: Any) -> Callable[[dict[str, Any]], None]:
    return lambda ix: ix["weight_map"].update(kw)


EMB = "model.embed_tokens.weight"
INDEXES: dict[str, tuple[Callable[[Path], None], str]] = {
    "an array": (_index(lambda ix: [ix]), "not an object"),
    "weight_map missing": (_index(lambda ix: ix.pop("weight_map") and None), "weight_map is missing"),
    "weight_map empty": (_index(lambda ix: ix.update(weight_map={})), "weight_map is empty"),
    "weight_map a list": (_index(lambda ix: ix.update(weight_map=[])), "weight_map is a list"),
    "shard a number": (_index(_wm(**{EMB: 1})), "names shard 1"),
    "shard a list": (_index(_wm(**{EMB: ["model-00001-of-00002.safetensors"]})), "names shard"),
    "shard with a separator": (_index(_wm(**{EMB: "sub/model-00001-of-00002.safetensors"})), "plain"),
    "shard with ..": (_index(_wm(**{EMB: "../b/model.safetensors"})), "plain"),
    "shard absolute": (_index(lambda ix: ix["weight_map"].update({EMB: "/etc/passwd"})), "plain"),
    "shard a pickle": (_index(_wm(**{EMB: "pytorch_model.bin"})), "plain"),
    "shard missing": (_index(_wm(**{EMB: "model-00009-of-00009.safetensors"})), "not in"),
    "tensor not in its shard": (_index(_wm(**{EMB: "model-00002-of-00002.safetensors"})), "does not hold it"),
    "tensor in no shard": (_index(_wm(**{"lm_head.weight": "model-00002-of-00002.safetensors"})), "does not hold"),
    "nested 100k deep": (_index(lambda ix: '{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}"), "too deep"),
    "nested 200 deep": (_index(lambda ix: ix.update(metadata=json.loads("[" * 200 + "]" * 200))), "too deep"),
    "not UTF-8": (_index(lambda ix: b'{"weight_map": {"\xff": "x"}}'), "not UTF-8"),
    "not JSON": (_index(lambda ix: '{"weight_map": {'), "not valid JSON"),
    "duplicate key": (_index(lambda ix: json.dumps(ix)[:-1] + ', "weight_map": {}}'), "appears twice"),
    "shard a symlink out of the dir": (_shard_link(lambda d: d.parent / "elsewhere.safetensors"), "out of the model"),
    "shard a symlink to a sibling model": (_shard_link(lambda d: d.parent / "a" / "x.safetensors"), "out of the model"),
}


@pytest.mark.parametrize("case", list(INDEXES))
def test_bad_shard_index_is_refused(case: str, capsys: pytest.CaptureFixture[str], trio: dict[str, Path]) -> None:
    damage, words = INDEXES[case]
    for role in trio:  # all sharded alike, so that only the damage differs
        _sharded(trio[role]) if role != "b" else damage(trio[role])
    line = refused(capsys, trio)
    assert str(trio["b"]) in line and words in line, line


# ---------------------------------------------------------------------------------------------
# 4. config.json


def _cfg(**kw: Any) -> dict[str, Any]:
    return {**CONFIG, **kw}


LLAVA = {"model_type": "llava", "text_config": {**CONFIG, "hidden_size": 2}, "vision_config": {"hidden_size": 8}}
CONFIGS: dict[str, tuple[Any, str]] = {
    "nested 100k deep": ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    "nested 100 deep": (json.dumps(_cfg(rope_scaling=json.loads("[" * 100 + "]" * 100))), "nested too deeply"),
    "an array": ("[]", "not an object"),
    "a number": ("3", "not an object"),
    "not UTF-8": (b'{"model_type": "\xff"}', "not UTF-8"),
    "NaN as a size": ('{"model_type": "llama", "hidden_size": NaN}', "hidden_size is nan"),
    "hidden_size a string": (_cfg(hidden_size="2"), "hidden_size is '2'"),
    "hidden_size true": (_cfg(hidden_size=True), "hidden_size is True"),
    "layers a float": (_cfg(num_hidden_layers=1.5), "num_hidden_layers is 1.5"),
    "heads negative": (_cfg(num_attention_heads=-1), "num_attention_heads is -1"),
    "model_type a number": (_cfg(model_type=7), "model_type is 7"),
    "tie_word_embeddings a string": (_cfg(tie_word_embeddings="false"), "tie_word_embeddings"),
    "text_config a list": ({**LLAVA, "text_config": [1]}, "text_config is a list"),
    "text_config hidden_size a string": ({**LLAVA, "text_config": _cfg(hidden_size="x")}, "(text_config)"),
    "text_config with another hidden_size": ({**LLAVA, "text_config": _cfg(hidden_size=4)}, "text_config.hidden_size"),
    "text_config with another layer count": (
        {**LLAVA, "text_config": _cfg(num_hidden_layers=3)},
        "text_config.num_hidden_layers",
    ),
    "vision_config with another size": ({**LLAVA, "vision_config": {"hidden_size": 16}}, "vision_config.hidden_size"),
    "text_config missing on one side": ({"model_type": "llava"}, "text_config"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_bad_or_incompatible_config_is_refused(
    case: str, capsys: pytest.CaptureFixture[str], trio: dict[str, Path]
) -> None:
    """Malformed configs are refused naming the file; a composite model's sub-config is compared too."""
    config, words = CONFIGS[case]
    if "text_config" in case or "vision_config" in case:
        for role in ("a", "c"):
            (trio[role] / "config.json").write_text(json.dumps(LLAVA))
    raw = config if isinstance(config, bytes) else (config if isinstance(config, str) else json.dumps(config)).encode()
    (trio["b"] / "config.json").write_bytes(raw)
    line = refused(capsys, trio)
    assert words in line, line
    if "another" not in case and "missing on one side" not in case:
        assert str(trio["b"] / "config.json") in line, line


def test_a_config_with_infinity_as_transformers_writes_it_is_read(
    capsys: pytest.CaptureFixture[str], trio: dict[str, Path]
) -> None:
    """transformers writes float("inf") as Infinity (Mamba's time_step_limit): not JSON, but not hostile."""
    for role in trio:
        (trio[role] / "config.json").write_text(json.dumps(_cfg(time_step_limit=[0.0, math.inf])))
    out = trio["a"].parent / "ok"
    assert main(transfer_argv(trio, out)) == 0, capsys.readouterr().err
    assert "Infinity" in (out / "config.json").read_text()


# ---------------------------------------------------------------------------------------------
# 5. non-regular files


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _socket(p: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    s.close()


def _directory(p: Path) -> None:
    p.mkdir()
    (p / "x").write_text("{}")


def _device(p: Path) -> None:
    try:
        os.mknod(p, 0o600 | 0o020000, os.makedev(1, 5))  # /dev/zero: endless
    except PermissionError:
        pytest.skip("cannot create a device node here")


KINDS = {"a FIFO": _fifo, "a socket": _socket, "a directory": _directory, "a character device": _device}
NAMES = ("model.safetensors", "config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors")


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", NAMES)
def test_non_regular_files_are_refused_without_blocking(
    kind: str, name: str, capsys: pytest.CaptureFixture[str], trio: dict[str, Path]
) -> None:
    for role in trio:
        if name.startswith(("model.safetensors.index", "model-0")):
            _sharded(trio[role])
    target = trio["b"] / name
    if target.exists():
        target.unlink()
    KINDS[kind](target)
    line = refused(capsys, trio)
    assert str(target) in line and f"is {kind}, not a regular file" in line, line


# ---------------------------------------------------------------------------------------------
# 6. symlinks out of a model directory, when files are copied into the output


def _secret(d: Path) -> Path:
    s = d.parent / "id_rsa"
    s.write_text("-----BEGIN PRIVATE KEY----- secret")
    return s


LINKS: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "tokenizer.json to a key": ("tokenizer.json", _secret),
    "tokenizer_config.json to a key": ("tokenizer_config.json", _secret),
    "generation_config.json to a key": ("generation_config.json", _secret),
    "vocab.txt, relative ../": ("vocab.txt", lambda d: Path("..") / _secret(d).name),
    "merges.txt through an inside link": ("merges.txt", lambda d: _inner_link(d, _secret(d))),
    "special_tokens_map.json to a sibling model's file": (
        "special_tokens_map.json",
        lambda d: d.parent / "a" / "config.json",
    ),
    "config.json to a key": ("config.json", _secret),
    "tokenizer.json dangling out": ("tokenizer.json", lambda d: d.parent / "nowhere"),
    "tokenizer.json a symlink loop": ("tokenizer.json", lambda d: Path("tokenizer.json")),
    "model.safetensors to a sibling's weights": ("model.safetensors", lambda d: d.parent / "a" / "model.safetensors"),
}


def _inner_link(d: Path, target: Path) -> Path:
    inner = d / "inner-link"
    inner.symlink_to(target)
    return Path("inner-link")


@pytest.mark.parametrize("case", list(LINKS))
def test_symlinks_out_of_a_model_dir_are_refused(
    case: str, capsys: pytest.CaptureFixture[str], trio: dict[str, Path]
) -> None:
    """config/tokenizer files are copied from the target: a link out of it must not leak a file into OUT."""
    name, target = LINKS[case]
    link = trio["c"] / name
    link.unlink(missing_ok=True)
    link.symlink_to(target(trio["c"]))
    line = refused(capsys, trio)
    assert str(link) in line and "out of the model directory" in line, line


def test_symlinks_inside_a_model_dir_are_followed(capsys: pytest.CaptureFixture[str], trio: dict[str, Path]) -> None:
    """The check is about leaving the directory, not about links: a Hub-cache-like inside link is fine."""
    (trio["c"] / "blob").write_text('{"model_max_length": 8}')
    (trio["c"] / "tokenizer_config.json").symlink_to("blob")
    out = trio["a"].parent / "ok"
    code = main(transfer_argv(trio, out))
    assert code == 0, capsys.readouterr().err
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 8}'
    assert not (out / "tokenizer_config.json").is_symlink()


def test_a_hub_cache_snapshot_may_link_into_its_blobs(
    capsys: pytest.CaptureFixture[str], trio: dict[str, Path]
) -> None:
    """A Hugging Face cache snapshot's files are links to ../../blobs: that is inside the model, not out."""
    repo = trio["c"].parent / "hub" / "models--org--c"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(trio["c"].iterdir())):
        (repo / "blobs" / f"sha{i}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f"sha{i}")
    out = trio["a"].parent / "ok"
    code = main(transfer_argv({**trio, "c": snap}, out))
    assert code == 0, capsys.readouterr().err
    assert (out / "config.json").is_file()


# ---------------------------------------------------------------------------------------------
# 7. pickles


class _Payload:
    """What an attacker pickles: loading it creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


PICKLES = {
    "pytorch_model.bin": ("pytorch_model.bin",),
    "model.pt": ("model.pt",),
    "sharded .bin with its index": ("pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"),
    "a .bin beside a config only": ("weights.bin",),
}


@pytest.mark.parametrize("case", list(PICKLES))
@pytest.mark.parametrize("role", ["a", "b", "c"])
def test_pickles_are_refused_without_allow_pickle(
    case: str, role: str, capsys: pytest.CaptureFixture[str], trio: dict[str, Path]
) -> None:
    d = trio[role]
    marker = d.parent / "pwned"
    (d / "model.safetensors").unlink()
    for name in PICKLES[case]:
        if name.endswith(".json"):
            (d / name).write_text(json.dumps({"weight_map": {EMB: PICKLES[case][0]}}))
        else:
            (d / name).write_bytes(pickle.dumps(_Payload(marker)))
    line = refused(capsys, trio)
    assert "--allow-pickle" in line and str(d) in line, line
    assert not marker.exists(), "a pickle was loaded"


# ---------------------------------------------------------------------------------------------
# 8. local-looking paths that do not exist never reach the hub


LOCAL = [
    "./models/M9",
    "../nowhere",
    "~/no-such-model-dir-xyz",
    "/no/such/dir",
    "models/M9",
    "data/trian",
    "a/b/c",
    "models\\M9",
    "org/name/",
]


@pytest.mark.parametrize("ref", LOCAL)
def test_missing_local_path_is_reported_before_any_hub_lookup(
    ref: str,
    capsys: pytest.CaptureFixture[str],
    trio: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import huggingface_hub

    def hub(*_: object, **__: object) -> None:
        raise AssertionError(f"{ref} went to the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    monkeypatch.chdir(trio["a"].parent)
    (trio["a"].parent / "models").mkdir()
    (trio["a"].parent / "data").mkdir()
    line = refused(capsys, trio, c=ref)
    assert f"no such directory: {ref}" in line, line


def test_a_hub_id_still_goes_to_the_hub(capsys: pytest.CaptureFixture[str], trio: dict[str, Path]) -> None:
    monkey = pytest.MonkeyPatch()
    monkey.chdir(trio["a"].parent)
    try:
        line = refused(capsys, trio, c="no-such-org-xyz/no-such-model")
    finally:
        monkey.undo()
    assert "cannot fetch from the Hugging Face Hub" in line, line


# ---------------------------------------------------------------------------------------------
# the shared JSON reader others call


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[" * 100_000, "nested too deeply"),
        ("[" * 65 + "]" * 65, "nested too deeply"),
        ('{"a": 1, "a": 2}', "appears twice"),
        ("Infinity", "Infinity"),
        (b"\xc3\x28", "not UTF-8"),
        ('{"a": ', "not valid JSON"),
    ],
)
def test_shared_json_reader_refuses_hostile_json(text: str | bytes, words: str, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=words):
        loads_json(text, source="x.json")
    f = tmp_path / "x.json"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError, match=words) as e:
        read_json(f, what="thing")
    assert str(f) in str(e.value)
    with pytest.raises(CheckpointError, match="more than the 1 accepted"):
        read_json(f, what="thing", max_bytes=1)
