"""The ``lossless`` codec: exact round trips (API and CLI), its ratio on a bf16 pair, any-range
decoding, and hostile parts refused with a clear error."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zstandard

from ftrecycle import pipeline as settings
from ftrecycle.cli import main
from ftrecycle.codecs import Compression, Job, Packed, Probe, decode, layout, parse_compression, resolve
from ftrecycle.codecs import lossless as codec
from ftrecycle.delta.store import check_parts
from ftrecycle.dtypes import BF16, F32, F64, I64, U8, DType, float32_to_bf16
from ftrecycle.errors import CheckpointError, ConfigError
from ftrecycle.io.safetensors_format import TensorInfo
from ftrecycle.ops.apply import apply_delta
from ftrecycle.ops.diff import diff
from ftrecycle.ops.inspect import inspect_delta

from conftest import bits, load_dir
from fixtures.tiny import make_model, make_versions, perturbed, save, tiny_config

# ---------------------------------------------------------------- helpers


def _bf16(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to bfloat16 (nearest even), as float32 values."""
    return (float32_to_bf16(np.ascontiguousarray(x, dtype=np.float32)).astype(np.uint32) << 16).view(np.float32)


def _finetune_like(m: int, n: int, seed: int, noise: float = 1e-4) -> np.ndarray:
    """The float32 diff ``B - A`` of a bf16 pair: ``A`` ~ N(0, 0.02), ``B = bf16(A + N(0, noise))``."""
    rng = np.random.default_rng(seed)
    a = _bf16(rng.normal(0, 0.02, (m, n)).astype(np.float32))
    b = _bf16(a + rng.normal(0, noise, (m, n)).astype(np.float32))
    return b - a


def _pack(d: np.ndarray, dtype: DType = F32, block: int = 1 << 17) -> tuple[Packed, Compression | None, float]:
    """``d`` through the codec's first pass and encoder, its parts held in memory; the error measured."""
    m, n = d.shape
    flat = d.reshape(-1)
    ct = np.dtype(np.float64 if d.dtype == np.float64 else np.float32)

    def read(start: int, count: int) -> np.ndarray:
        return flat[start : start + count].astype(ct)

    spec = resolve(Compression("lossless"), Probe(read, "t", (m, n), dtype, ct, block, 1 << 30))
    if spec is None:
        return Packed("lossless", (m, n)), None, math.nan
    parts = layout(spec, (m, n), dtype)
    held = {k: np.zeros(shape, dtype=pdt.storage) for k, (pdt, shape) in parts.items()}

    def write(part: str, start: int, values: np.ndarray) -> None:
        held[part][start : start + values.size] = values

    found = codec.encode(Job(read, write, "t", (m, n), parts, dtype, ct, block))
    return Packed("lossless", (m, n), held), spec, found.error


def _decoded(p: Packed, start: int, count: int, ct: Any = np.float32) -> np.ndarray:
    return decode(p, start, count, np.empty(count, dtype=ct), {})


def _with(p: Packed, **parts: np.ndarray) -> Packed:
    return Packed(p.method, p.shape, {**p.parts, **parts})


# ---------------------------------------------------------------- round trips through diff/apply


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(bits(got[k]), bits(want[k])), k


def _lossless_entries(delta: Path) -> dict[str, Any]:
    manifest = json.loads((delta / "ftrecycle-delta.json").read_text())
    return {k: e["compression"] for k, e in manifest["tensors"].items() if e.get("compression")}


def test_bf16_pair_round_trips_bit_for_bit_with_float32_delta(versions, tmp_path, monkeypatch):
    v = versions["llama"]
    d = diff(str(v["source_base"]), str(v["source_finetuned"]), tmp_path / "d", compress="lossless").output
    packed = _lossless_entries(d)
    assert packed and all(c["method"] == "lossless" and c["error"] == 0.0 for c in packed.values())
    back = apply_delta(d, str(v["source_base"]), tmp_path / "o").output
    _same(load_dir(back), load_dir(v["source_finetuned"]))
    # work items of 999 elements cut frames at odd places, on two threads
    monkeypatch.setattr(settings, "chunk_for_budget", lambda *_a: 999)
    split = apply_delta(d, str(v["source_base"]), tmp_path / "s", threads=2).output
    _same(load_dir(split), load_dir(v["source_finetuned"]))


def test_float32_pair_round_trips_bit_for_bit_with_float64_delta(tmp_path):
    v = make_versions("llama", tmp_path / "m", dtype=torch.float32)
    d = diff(
        str(v["source_base"]),
        str(v["source_finetuned"]),
        tmp_path / "d",
        compress="lossless",
        delta_dtype="float64",
        compute_dtype="float64",
    ).output
    packed = _lossless_entries(d)
    assert packed and all(c["error"] == 0.0 for c in packed.values())
    back = apply_delta(d, str(v["source_base"]), tmp_path / "o", compute_dtype="float64").output
    _same(load_dir(back), load_dir(v["source_finetuned"]))


def test_cli_round_trip_and_inspect(versions, tmp_path, capsys):
    v = versions["qwen2"]
    d, o = tmp_path / "d", tmp_path / "o"
    args = ["diff", "--base", str(v["source_base"]), "--finetuned", str(v["source_finetuned"]), "-o", str(d)]
    assert main([*args, "--compress", "lossless", "-q"]) == 0
    assert main(["apply", "--delta", str(d), "--target-base", str(v["source_base"]), "-o", str(o), "-q"]) == 0
    _same(load_dir(o), load_dir(v["source_finetuned"]))
    capsys.readouterr()
    assert main(["inspect", str(d)]) == 0
    assert "lossless" in capsys.readouterr().out


def test_ratio_above_one_against_dense_bf16_on_a_finetune_like_pair(tmp_path):
    """A small fine-tune (noise well under the weights' scale) of a tiny bf16 model."""
    base = make_model(tiny_config("llama"), seed=3)
    fin = perturbed(base, seed=4, scale=1e-3)
    a, b = save(base, tmp_path / "a"), save(fin, tmp_path / "b")
    d = diff(str(a), str(b), tmp_path / "d", compress="lossless").output
    s = inspect_delta(d)
    # the dense float32 delta takes twice the dense bf16 bytes
    against_bf16 = s["dense_bytes"] / 2 / s["bytes"]
    assert against_bf16 > 1.0, f"ratio against dense bf16 {against_bf16:.3f}"
    _same(load_dir(apply_delta(d, str(a), tmp_path / "o").output), load_dir(b))


def test_parse_and_register():
    assert parse_compression("lossless") == Compression("lossless")
    with pytest.raises(ConfigError, match="lossless takes no parameters"):
        parse_compression("lossless:nbytes=5")


# ---------------------------------------------------------------- the codec on arrays


def test_codec_ratio_on_a_finetune_like_bf16_diff():
    d = _finetune_like(512, 512, seed=0)
    p, spec, error = _pack(d)
    assert spec is not None and spec.nbytes is not None and error == 0.0
    stored = sum(a.nbytes for a in p.parts.values())
    assert d.size * 2 / stored > 1.5, f"ratio against dense bf16 {d.size * 2 / stored:.3f}"
    assert np.array_equal(_decoded(p, 0, d.size).view(np.uint32), d.reshape(-1).view(np.uint32))


@pytest.mark.parametrize("dtype", [F32, F64, BF16])
def test_any_range_decodes_the_stored_values(dtype):
    rng = np.random.default_rng(1)
    m, n = 300, 701  # 210300 elements: three whole frames and a short one
    d = _finetune_like(m, n, seed=2, noise=1e-3)
    if dtype is F64:
        d = d.astype(np.float64) + rng.normal(0, 1e-12, d.shape)
    p, spec, error = _pack(d, dtype, block=3 * n)
    assert spec is not None
    ct = np.float64 if dtype is F64 else np.float32
    want = d.reshape(-1).astype(ct)
    if dtype is BF16:  # what a bf16 delta stores: the diff rounded to bf16
        want = _bf16(want)
        assert error > 0.0
    else:
        assert error == 0.0
    cuts = [(0, d.size), (d.size - 1, 1), (codec.FRAME - 3, 7), (2 * codec.FRAME, codec.FRAME)]
    cuts += [(int(s), int(rng.integers(1, d.size - s + 1))) for s in rng.integers(0, d.size, 20)]
    for start, count in cuts:
        got = _decoded(p, start, count, ct)
        assert np.array_equal(got, want[start : start + count]), (start, count)


def test_small_items_sharing_one_cache_decode_two_tensors_exactly():
    """As an engine thread does: items of 999 elements, of two tensors in turn, through one cache."""
    d1, d2 = _finetune_like(200, 700, seed=8, noise=1e-3), _finetune_like(150, 500, seed=9, noise=1e-3)
    (p1, _, _), (p2, _, _) = _pack(d1), _pack(d2)
    cache: dict[Any, Any] = {}
    got1, got2 = np.empty(d1.size, np.float32), np.empty(d2.size, np.float32)
    for s in range(0, d1.size, 999):
        for p, got, d in ((p1, got1, d1), (p2, got2, d2)):
            if s < d.size:
                c = min(999, d.size - s)
                decode(p, s, c, got[s : s + c], cache)
    assert np.array_equal(got1, d1.reshape(-1)) and np.array_equal(got2, d2.reshape(-1))


def test_random_bytes_stay_dense():
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 2**32, (256, 512), dtype=np.uint32)
    d = raw.view(np.float32)
    raw[~np.isfinite(d)] ^= np.uint32(1 << 30)  # the 1/256 with an all-ones exponent made finite
    assert np.isfinite(d).all()
    _, spec, _ = _pack(d)
    assert spec is None


def test_layout_is_dense_when_the_size_is_not_smaller():
    big = Compression("lossless", nbytes=64 * 64 * 4)
    assert layout(big, (64, 64), F32) == {}
    assert set(layout(Compression("lossless", nbytes=100), (64, 64), F32)) == {"data", "offsets", "dtype"}


def test_frame_size_is_read_back_from_the_offsets():
    for total in (codec.FRAME + 1, 3 * codec.FRAME, 10**7):
        assert codec.frame_size(total, -(-total // codec.FRAME)) == codec.FRAME
    for total in (1, 1000, codec.FRAME):  # one frame holds them all
        size = codec.frame_size(total, 1)
        assert size is not None and size >= total
    assert codec.frame_size(10**7, 10**7) is None  # frames of one element are refused
    assert codec.frame_size(10**7, 7) is None  # powers of two cut 1e7 into 10, 5 or 3 frames, never 7


def test_encoder_refuses_another_size_than_the_first_pass_found():
    d = _finetune_like(64, 64, seed=6)
    flat = d.reshape(-1)
    for nbytes in (10, 64 * 64 * 3):
        parts = layout(Compression("lossless", nbytes=nbytes), (64, 64), F32)
        job = Job(lambda s, c: flat[s : s + c], lambda *a: None, "t", (64, 64), parts, F32, np.dtype(np.float32), 4096)
        with pytest.raises(CheckpointError, match="another size than the"):
            codec.encode(job)


# ---------------------------------------------------------------- hostile parts


@pytest.fixture(scope="module")
def framed() -> Packed:
    """A lossless tensor of three frames, its parts in memory."""
    p, spec, _ = _pack(_finetune_like(3, codec.FRAME, seed=7))
    assert spec is not None and p.parts["offsets"].shape == (4,)
    return p


def test_non_monotone_offsets_are_refused(framed):
    off = framed.parts["offsets"].copy()
    off[1], off[2] = off[2], off[1]
    with pytest.raises(CheckpointError, match="not a valid frame index"):
        _decoded(_with(framed, offsets=off), 0, 10)


def test_truncated_data_is_refused(framed):
    data = framed.parts["data"][:-5]
    with pytest.raises(CheckpointError, match="not a valid frame index"):
        _decoded(_with(framed, data=data), 0, 10)


def test_offsets_of_the_wrong_length_are_refused(framed):
    off = np.append(framed.parts["offsets"], framed.parts["offsets"][-1])
    with pytest.raises(CheckpointError, match="not a valid frame index"):
        _decoded(_with(framed, offsets=off), 0, 10)


def _zstd(data: bytes, **kw: Any) -> bytes:
    """One Zstandard frame of ``data`` (its content size in the header unless told otherwise)."""
    return zstandard.ZstdCompressor(level=1, **kw).compress(data)


def _frame_by_hand(plane: bytes, window_exponent: int) -> bytes:
    """A Zstandard frame (RFC 8878, 3.1.1) of ``plane`` in one raw block, with a window descriptor
    of ``2**(10 + window_exponent)`` bytes and a 4-byte content size."""
    magic = (0xFD2FB528).to_bytes(4, "little")
    header = bytes([0b1000_0000, window_exponent << 3]) + len(plane).to_bytes(4, "little")
    block = ((len(plane) << 3) | 1).to_bytes(3, "little")  # last block, raw
    return magic + header + block + plane


def _first_frame_replaced(framed: Packed, blob: bytes) -> Packed:
    """``framed`` with frame 0's bytes replaced by ``blob`` (the offsets shifted to match)."""
    off = framed.parts["offsets"]
    data = np.concatenate([np.frombuffer(blob, dtype=np.uint8), framed.parts["data"][off[1] :]])
    shifted = off - off[1] + len(blob)
    shifted[0] = 0
    return _with(framed, data=data, offsets=shifted)


PLANE = codec.FRAME  # bytes of one plane of a whole frame
PLANES = 4  # a float32 delta's


def test_the_frames_are_one_zstandard_frame_per_plane(framed):
    off = framed.parts["offsets"]
    blob = framed.parts["data"][off[0] : off[1]].tobytes()
    d = zstandard.ZstdDecompressor()
    rest, planes = blob, []
    while rest:
        assert zstandard.frame_content_size(rest) == PLANE
        o = d.decompressobj()
        planes.append(o.decompress(rest))
        rest = o.unused_data
    assert len(planes) == PLANES
    words = np.frombuffer(b"".join(planes), dtype=np.uint8).reshape(PLANES, PLANE).astype(np.uint32)
    values = (words[0] | words[1] << 8 | words[2] << 16 | words[3] << 24).view(np.float32)
    assert np.array_equal(values, _decoded(framed, 0, PLANE))


def test_a_frame_declaring_more_than_its_plane_is_refused(framed):
    p = _first_frame_replaced(framed, _zstd(bytes(8 * PLANE)) * PLANES)  # 8 times the bytes, zeros
    with pytest.raises(CheckpointError, match="exactly its"):
        _decoded(p, 0, 10)
    assert np.array_equal(_decoded(p, codec.FRAME, 10), _decoded(framed, codec.FRAME, 10))  # other frames decode


def test_a_frame_whose_blocks_give_more_than_it_declares_is_refused(framed):
    lying = bytearray(_frame_by_hand(bytes(2 * PLANE), window_exponent=7))
    lying[6:10] = PLANE.to_bytes(4, "little")  # declares one plane, its block holds two
    with pytest.raises(CheckpointError, match="corrupt"):
        _decoded(_first_frame_replaced(framed, bytes(lying) * PLANES), 0, 10)


HUGE_WINDOW = """
import resource, sys
from test_codecs_lossless import PLANE, _frame_by_hand
from ftrecycle.codecs import lossless
blob = _frame_by_hand(bytes(PLANE), window_exponent=21)  # declares a 2 GiB window
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
raw = lossless._decompress(blob, PLANE, 1, lossless._decompressor(), "t")
assert raw == bytes(PLANE)
print("ok")
"""


def test_a_huge_declared_window_allocates_no_more_than_the_plane():
    """The decoder's buffer is bounded by the frame's content size (which must be the plane's), not by
    the window its header declares: under an address-space limit of 256 MiB a 2 GiB window decodes."""
    run = subprocess.run(
        [sys.executable, "-c", HUGE_WINDOW], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=120
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_a_frame_without_a_content_size_is_refused_whatever_its_window(framed):
    unknown = _zstd(bytes(PLANE), write_content_size=False)
    assert zstandard.frame_content_size(unknown) == -1
    with pytest.raises(CheckpointError, match="exactly its"):
        _decoded(_first_frame_replaced(framed, unknown * PLANES), 0, 10)


def test_missing_or_extra_planes_are_refused(framed):
    off = framed.parts["offsets"]
    blob = framed.parts["data"][off[0] : off[1]].tobytes()
    one = _zstd(bytes(PLANE))
    for bad, match in [
        (blob + one, "bytes past its 4 planes"),
        (blob + b"\x00", "bytes past"),
        (one * (PLANES - 1), "corrupt"),  # the fourth plane's header is missing
        (blob[:-3], "corrupt|exactly its"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            _decoded(_first_frame_replaced(framed, bad), 5, 10)


def test_a_short_or_corrupt_frame_is_refused(framed):
    for blob in (_zstd(bytes(100)) * PLANES, zlib.compress(bytes(PLANE * PLANES)), b"\x00" * 40, b""):
        with pytest.raises(CheckpointError, match="frame"):
            _decoded(_first_frame_replaced(framed, blob), 5, 10)


def _info(name: str, dtype: DType, shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo(name, dtype, shape, Path("delta.safetensors"), 0)


def test_stored_parts_of_the_wrong_dtype_or_shape_are_refused_before_any_read():
    m, n = 3, codec.FRAME
    good = {
        "data": _info("data", U8, (500,)),
        "offsets": _info("offsets", I64, (4,)),
        "dtype": _info("dtype", F32, (0,)),
    }
    check_parts("t", "lossless", (m, n), good)
    for part, info in [
        ("offsets", _info("offsets", I64, (5,))),  # one offset too many
        ("offsets", _info("offsets", I64, (3 * n + 1,))),  # frames of one element
        ("offsets", _info("offsets", U8, (4,))),
        ("data", _info("data", F32, (500,))),
        ("data", _info("data", U8, (2, 250))),
        ("dtype", _info("dtype", F32, (1,))),
        ("dtype", _info("dtype", I64, (0,))),
    ]:
        with pytest.raises(CheckpointError, match=f"part {part!r}"):
            check_parts("t", "lossless", (m, n), {**good, part: info})


def test_the_stored_dtype_part_decides_the_values_dtype(framed):
    """Decoding reads the values' width from the parts: bf16 planes read as float32 fail cleanly."""
    as_bf16 = _with(framed, dtype=np.zeros(0, dtype=BF16.storage))
    with pytest.raises(CheckpointError, match="bytes past its 2 planes"):
        _decoded(as_bf16, 0, 10)


def test_a_frame_longer_than_its_planes_can_compress_to_is_refused_before_it_is_read(framed):
    """Valid planes followed by 8 MiB: the span alone is refused, from the offsets, before any frame is read."""
    off = framed.parts["offsets"]
    blob = framed.parts["data"][off[0] : off[1]].tobytes() + bytes(8 << 20)
    p = _first_frame_replaced(framed, blob)
    read: list[str] = []

    class Watched(np.ndarray):
        """The data part, noting every slice taken of it (a frame being read)."""

        def __getitem__(self, key: Any) -> Any:
            read.append(str(key))
            return super().__getitem__(key)

    with pytest.raises(CheckpointError, match="more bytes than Zstandard can write"):
        _decoded(_with(p, data=p.parts["data"].view(Watched)), codec.FRAME, 10)  # frame 1 is fine
    assert not read
    bound = PLANES * codec.compress_bound(PLANE)
    assert bound < PLANES * PLANE * 1.01
    fits = _first_frame_replaced(framed, blob[: bound - 1])
    with pytest.raises(CheckpointError, match="bytes past its 4 planes"):  # within the bound: read, then refused
        _decoded(fits, 0, 10)


def test_a_value_dtype_relabelled_in_the_header_is_refused(versions, tmp_path):
    """The ``dtype`` part holds no bytes, so its checksum cannot see a relabelled header: the manifest's
    dtype must agree with it (bf16 values read as fp16 would decode to other numbers)."""
    v = versions["llama"]
    d = diff(str(v["source_base"]), str(v["source_finetuned"]), tmp_path / "d", compress="lossless",
             delta_dtype="bfloat16").output  # fmt: skip
    shard = next(d.glob("delta*.safetensors"))
    raw = shard.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    relabelled = [k for k, e in header.items() if k.endswith("::dtype") and e["dtype"] == "BF16"]
    assert relabelled
    for k in relabelled:
        header[k]["dtype"] = "F16"
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= size
    shard.write_bytes(raw[:8] + text.ljust(size) + raw[8 + size :])
    with pytest.raises(CheckpointError, match="manifest says the delta stores its values as bfloat16"):
        apply_delta(d, str(v["source_base"]), tmp_path / "o")
    assert not (tmp_path / "o").exists()
