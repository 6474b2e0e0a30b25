"""The quantizing codecs: ``kbit`` (group-wise K bits), ``sign`` per row/column, and every codec's gain hook."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ftrecycle.cli import main
from ftrecycle.codecs import CODECS, Compression, Job, Packed, decode, layout, parse_compression
from ftrecycle.codecs import kbit as kbit_mod
from ftrecycle.delta.store import check_parts, open_delta
from ftrecycle.dtypes import BF16, F16, F32, I8, U8, DType, bf16_to_float32, float32_to_bf16
from ftrecycle.errors import CheckpointError, ConfigError
from ftrecycle.io.safetensors_format import TensorInfo
from ftrecycle.ops.inspect import inspect_delta
from ftrecycle.terms import PackedTerm

from conftest import load_dir

F32_CT = np.dtype(np.float32)


def _encode(spec: str, d: np.ndarray, dtype: DType = F32, block: int = 4096) -> tuple[Any, dict[str, np.ndarray]]:
    """Encode ``d`` in memory (even where dense would be smaller): the encoder's report and each part
    in its storage dtype and shape."""
    m, n = d.shape
    c = parse_compression(spec)
    assert c is not None
    codec = CODECS[c.method]
    parts = codec.layout(c, m, n, dtype)
    assert parts, spec
    store = {k: np.full(math.prod(sh), 0x25, dtype=dt.storage) for k, (dt, sh) in parts.items()}  # unwritten: visible
    flat = np.ascontiguousarray(d, dtype=np.float32).reshape(-1)

    def write(name: str, s: int, v: np.ndarray) -> None:
        store[name][s : s + v.size] = v.reshape(-1)

    def read(s: int, k: int) -> np.ndarray:
        return flat[s : s + k].copy()

    enc = codec.encode(Job(read, write, "t", (m, n), parts, dtype, F32_CT, block))
    return enc, {k: store[k].reshape(sh) for k, (_, sh) in parts.items()}


def _packed(method: str, shape: tuple[int, int], parts: dict[str, np.ndarray]) -> Packed:
    """In-memory parts as decode reads them: floats as floats (bfloat16 bits widened, exactly)."""
    widened = {k: bf16_to_float32(v) if v.dtype == np.uint16 else v for k, v in parts.items()}
    return Packed(method, shape, widened)


def _decode(method: str, shape: tuple[int, int], parts: dict[str, np.ndarray], start: int = 0, count: int = -1):
    numel = shape[0] * shape[1]
    count = numel - start if count < 0 else count
    return decode(_packed(method, shape, parts), start, count, np.empty(count, np.float32), {})


def _structured(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
    """A Gaussian plus a rank-8 component of the same Frobenius norm, and a few outlier columns."""
    g = rng.standard_normal((m, n))
    low = rng.standard_normal((m, 8)) @ rng.standard_normal((8, n))
    d = g + low * np.linalg.norm(g) / np.linalg.norm(low)
    d[:, :: max(1, n // 5)] *= 6
    return (d * 1e-3).astype(np.float32)


SHAPES = [(1, 1), (3, 5), (7, 13), (5, 64), (4, 100), (2, 129)]


def _levels_ok(d: np.ndarray, parts: dict[str, np.ndarray], k: int, group: int) -> None:
    """Every decoded value is a level of its group, and each group's error is the least over the clip grid."""
    m, n = d.shape
    g, c = kbit_mod.groups(n, group)
    got = _decode("kbit", (m, n), parts).reshape(m, n).astype(np.float64)
    scale = bf16_to_float32(parts["scale"]).astype(np.float64)
    h = (2**k - 1) / 2
    for i, t in itertools.product(range(m), range(c)):
        x = d[i, t * g : (t + 1) * g].astype(np.float64)
        v = got[i, t * g : (t + 1) * g]
        s = scale[i, t]
        if s == 0:
            assert not v.any()
            continue
        codes = v / s + h
        assert np.array_equal(codes, np.rint(codes)) and codes.min() >= 0 and codes.max() <= 2**k - 1
        # the reference: each candidate scale rounded to bfloat16, values rounded to the nearest level
        top = np.float32(np.max(np.abs(x)))
        best = np.inf
        for ratio in kbit_mod.CLIP_RATIOS:
            cand = float(bf16_to_float32(float32_to_bf16(np.array([top * np.float32(ratio / h)])))[0])
            if cand == 0:
                continue
            q = np.clip(np.rint(x.astype(np.float32) / np.float32(cand) + h), 0, 2**k - 1)
            best = min(best, float(np.sum(((q - h) * cand - x) ** 2)))
        err = float(np.sum((v - x) ** 2))
        assert err <= best * (1 + 1e-5) + 1e-30, (i, t, err, best)


@pytest.mark.parametrize("k", range(2, 9))
def test_kbit_round_trip_every_bits_and_group(k):
    rng = np.random.default_rng(k)
    for (m, n), group in itertools.product(SHAPES, (1, 3, 8, 64)):
        for d in (rng.standard_normal((m, n)).astype(np.float32) * 1e-4, _structured(rng, m, n)):
            enc, parts = _encode(f"kbit:bits={k},group={group}", d)
            _, c = kbit_mod.groups(n, group)
            assert parts["q"].shape == (-(-m * n // 8), k) and parts["scale"].shape == (m, c)
            _levels_ok(d, parts, k, group)
            got = _decode("kbit", (m, n), parts).astype(np.float64)
            norm = np.linalg.norm(d)  # a 1 x 1 structured matrix can cancel to 0
            want = np.linalg.norm(got - d.reshape(-1)) / norm if norm else 0.0
            assert enc.error == pytest.approx(want, rel=1e-4, abs=1e-9), (m, n, group)  # measured in float32


def test_kbit_output_does_not_depend_on_the_row_block():
    rng = np.random.default_rng(1)
    d = _structured(rng, 37, 29)  # 37 * 29 * 3 bits: an odd bit count, rows that end mid-byte
    ref = _encode("kbit:bits=3,group=8", d, block=1 << 20)[1]
    for block in (1, 29, 58, 100, 1000):
        got = _encode("kbit:bits=3,group=8", d, block=block)[1]
        assert all(np.array_equal(got[p], ref[p]) for p in ref), block


def test_kbit_decode_of_any_range_equals_the_whole_and_reads_only_its_bytes():
    rng = np.random.default_rng(2)
    for k, (m, n), group in [(3, (37, 29), 8), (5, (11, 100), 64), (7, (1, 1), 64), (2, (9, 3), 1)]:
        d = _structured(rng, m, n)
        _, parts = _encode(f"kbit:bits={k},group={group}", d)
        numel = m * n
        whole = _decode("kbit", (m, n), parts)
        cuts = [0, *sorted(rng.integers(0, numel, 8).tolist()), numel]
        for s, e in itertools.pairwise(cuts):
            if e == s:
                continue
            # everything outside the range's bytes and rows made garbage: the range decodes the same
            b0, b1, r0, r1 = s // 8, -(-e // 8), s // n, -(-e // n)
            poisoned = {p: v.copy() for p, v in parts.items()}
            poisoned["q"][:b0] = rng.integers(0, 256, poisoned["q"][:b0].shape, dtype=np.uint8)
            poisoned["q"][b1:] = rng.integers(0, 256, poisoned["q"][b1:].shape, dtype=np.uint8)
            poisoned["scale"][:r0] = 0x7FC0  # NaN
            poisoned["scale"][r1:] = 0x7FC0
            got = _decode("kbit", (m, n), poisoned, s, e - s)
            assert np.array_equal(got, whole[s:e]), (k, m, n, s, e)


@pytest.mark.parametrize("kind", ["gaussian", "structured"])
def test_kbit_error_decreases_with_bits(kind):
    rng = np.random.default_rng(3)
    d = rng.standard_normal((64, 96)).astype(np.float32) if kind == "gaussian" else _structured(rng, 64, 96)
    errors = [_encode(f"kbit:bits={k}", d)[0].error for k in range(2, 9)]
    # each bit about halves the step, so the error: at most 0.6 of the one a bit below
    assert errors[0] < 1 and all(b < 0.6 * a for a, b in itertools.pairwise(errors)), errors
    # smaller groups, smaller error at the same bits
    assert _encode("kbit:bits=3,group=16", d)[0].error < _encode("kbit:bits=3,group=96", d)[0].error


def _info(name: str, dtype: DType, shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo(name, dtype, shape, Path("delta.safetensors"), 0)


def test_kbit_shapes_say_bits_and_group_for_every_shape():
    for m, n in itertools.product(range(1, 6), range(1, 40)):
        seen: dict[tuple[Any, ...], tuple[int, int]] = {}
        for k, group in itertools.product(range(2, 9), range(1, n + 2)):
            parts = layout(Compression("kbit", bits=k, group=group), (m, n), F32)
            if not parts:
                continue  # stored dense: no smaller than float32
            shapes = (parts["q"][1], parts["scale"][1])
            g, _ = kbit_mod.groups(n, group)
            # the decoder's reading of the shapes: K and the group length
            assert (shapes[0][1], -(-n // shapes[1][1])) == (k, g)
            assert seen.setdefault(shapes, (k, g)) == (k, g)
            infos = {p: _info(p, dt, sh) for p, (dt, sh) in parts.items()}
            check_parts("t", "kbit", (m, n), infos)  # expect accepts what layout gives


@pytest.mark.parametrize(
    ("part", "dtype", "shape"),
    [
        ("q", U8, (10, 9)),  # K = 9
        ("q", U8, (10, 1)),  # K = 1
        ("q", U8, (11, 3)),  # one byte row too many
        ("q", U8, (30,)),  # flat
        ("q", I8, (10, 3)),
        ("scale", F16, (8, 2)),
        ("scale", F32, (8, 2)),
        ("scale", BF16, (8, 6)),  # no group size gives 6 groups of a 10-value row
        ("scale", BF16, (8, 11)),  # more groups than values
        ("scale", BF16, (8, 0)),
        ("scale", BF16, (9, 2)),
        ("scale", BF16, (16,)),
    ],
)
def test_kbit_hostile_parts_are_refused_before_any_read(part, dtype, shape):
    m, n = 8, 10
    good = {"q": _info("q", U8, (10, 3)), "scale": _info("scale", BF16, (8, 2))}
    check_parts("t", "kbit", (m, n), good)
    bad = {**good, part: _info(part, dtype, shape)}
    with pytest.raises(CheckpointError, match="part"):
        check_parts("t", "kbit", (m, n), bad)


@pytest.mark.parametrize(
    "spec",
    [
        "kbit",
        "kbit:bits=1",
        "kbit:bits=9",
        "kbit:bits=2.5",
        "kbit:bits=0",
        "kbit:bits=3,group=0",
        "kbit:bits=3,group=1.5",
        "kbit:bits=3,group=x",
        "kbit:group=64",
        "kbit:bits=3,axis=row",
        "kbit:bits=3,bits=4",
        "kbit:ratio=8",
        "sign:axis=diag",
        "sign:axis=row,axis=col",
        "sign:group=4",
        "int8:axis=row",
    ],
)
def test_bad_quantizer_specs(spec):
    with pytest.raises(ConfigError, match="--compress"):
        parse_compression(spec)


def test_good_quantizer_specs():
    c = parse_compression("kbit:bits=3,group=128")
    assert c == Compression("kbit", bits=3.0, group=128) and parse_compression(str(c)) == c
    assert parse_compression("sign:axis=col") == Compression("sign", axis="col")
    with pytest.raises(ConfigError):  # a Compression built by hand goes through the same check at layout
        layout(Compression("kbit", bits=12), (4, 4), F32)


@pytest.mark.parametrize("m", [1, 6, 9])
def test_sign_per_row_and_column_scales(m):
    rng = np.random.default_rng(4)
    n = 9
    d = _structured(rng, m, n)
    d[0, 0] = 0.0  # sign(0) is +1
    errs = {}
    for axis in (None, "row", "col"):
        spec = "sign" if axis is None else f"sign:axis={axis}"
        enc, parts = _encode(spec, d)
        want_shape = {None: (1,), "row": (m, 1), "col": (1, n)}[axis]
        assert parts["scale"].shape == want_shape and parts["scale"].dtype == np.float32
        red = {None: None, "row": 1, "col": 0}[axis]
        mean = np.mean(np.abs(d.astype(np.float64)), axis=red, keepdims=red is not None).astype(np.float32)
        got = _decode("sign", (m, n), parts).reshape(m, n)
        assert np.array_equal(np.abs(got), np.broadcast_to(mean, (m, n))), axis
        assert np.array_equal(~np.signbit(got), d >= 0)  # a zero scale keeps its sign: +0.0 or -0.0
        errs[axis] = enc.error
        err = np.linalg.norm(got.astype(np.float64) - d) / np.linalg.norm(d)
        assert enc.error == pytest.approx(err, rel=1e-6)
        # any range decodes as the slice of the whole
        for s, e in [(0, 1), (3, 17), (n - 1, m * n), (5, 6)]:
            if e <= m * n and s < e:
                assert np.array_equal(_decode("sign", (m, n), parts, s, e - s), got.reshape(-1)[s:e])
    # the per-set least-squares scale can only do better than the one of the matrix
    assert errs["row"] <= errs[None] + 1e-9 and errs["col"] <= errs[None] + 1e-9


def test_sign_scale_shapes_checked():
    m, n = 6, 6
    bits = _info("bits", U8, (5,))
    for shape in [(1,), (m, 1), (1, n)]:
        check_parts("t", "sign", (m, n), {"bits": bits, "scale": _info("scale", F32, shape)})
    for dtype, shape in [(F32, (m, n)), (F32, (2,)), (F32, (m,)), (F32, (1, 1)), (F16, (1,)), (F32, (7, 1))]:
        with pytest.raises(CheckpointError, match="part"):
            check_parts("t", "sign", (m, n), {"bits": bits, "scale": _info("scale", dtype, shape)})
    with pytest.raises(ValueError, match="fits no format"):
        _decode("sign", (m, n), {"bits": np.zeros(5, np.uint8), "scale": np.ones((2, 3), np.float32)})


GAIN_SPECS = [
    ("lowrank:rank=3", BF16, 2e-2),
    ("lowrank:rank=3", F32, 1e-6),
    ("int8", F32, 1e-6),
    ("sparse:density=0.3", BF16, 2e-2),
    ("sparse:density=0.3", F32, 1e-6),
    ("sign", F32, 1e-6),
    ("sign:axis=row", F32, 1e-6),
    ("kbit:bits=3,group=4", F32, 2e-2),
]


@pytest.mark.parametrize(("spec", "dtype", "tol"), GAIN_SPECS)
def test_gain_hooks_scale_the_rows(spec, dtype, tol):
    rng = np.random.default_rng(5)
    m, n = 12, 20
    d = _structured(rng, m, n)
    _, parts = _encode(spec, d, dtype)
    method = spec.partition(":")[0]
    codec = CODECS[method]
    assert codec.gain is not None and codec.row_gain
    g = rng.uniform(0.25, 3.0, m)
    changed = codec.gain(parts, g)
    assert set(changed) <= set(parts) and all(v.dtype == parts[k].dtype for k, v in changed.items())
    before = _decode(method, (m, n), parts).reshape(m, n).astype(np.float64)
    after = _decode(method, (m, n), {**parts, **changed}).reshape(m, n).astype(np.float64)
    want = g[:, None] * before
    assert np.allclose(after, want, rtol=tol, atol=tol * np.abs(want).max()), np.abs(after - want).max()
    if spec == "sign":
        # one scale per matrix: the parts do not say m, so a gain of another length makes a scale of the
        # wrong shape, refused when decoded (and by expect when stored)
        with pytest.raises(ValueError, match="fits no format"):
            _decode(method, (m, n), {**parts, **codec.gain(parts, g[:-1])})
    else:
        with pytest.raises(ValueError):
            codec.gain(parts, g[:-1])
    with pytest.raises(ValueError):
        codec.gain(parts, np.r_[g[:-1], np.nan])


def test_sign_gain_per_column_takes_one_gain():
    rng = np.random.default_rng(6)
    m, n = 5, 7
    d = _structured(rng, m, n)
    _, parts = _encode("sign:axis=col", d)
    gain = CODECS["sign"].gain
    assert gain is not None
    before = _decode("sign", (m, n), parts)
    same = gain(parts, np.full(m, 2.0))
    assert np.array_equal(_decode("sign", (m, n), {**parts, **same}), 2 * before)
    with pytest.raises(ValueError, match="axis=row"):
        gain(parts, np.linspace(1, 2, m))


def _dense_diff(v: dict[str, Path]) -> dict[str, torch.Tensor]:
    a, b = load_dir(v["source_base"]), load_dir(v["source_finetuned"])
    return {k: b[k].double() - a[k].double() for k in a}


@pytest.mark.parametrize("spec", ["kbit:bits=3", "kbit:bits=2,group=16", "sign:axis=row", "sign:axis=col"])
def test_cli_diff_then_apply(versions, tmp_path, spec):
    v = versions["llama"]
    d = tmp_path / "d"
    args = ["diff", "--base", str(v["source_base"]), "--finetuned", str(v["source_finetuned"]), "-o", str(d)]
    assert main([*args, "--delta-dtype", "bfloat16", "--compress", spec, "-q"]) == 0
    s = inspect_delta(d)
    method = spec.partition(":")[0]
    packed = [t for t in s["tensors"] if t["method"] == method]
    assert packed and s["checksums"] == "verified" and s["bytes"] < s["dense_bytes"]
    out = tmp_path / "o"
    apply = ["apply", "--delta", str(d), "--target-base", str(v["source_base"]), "-o", str(out)]
    code = main([*apply, "--out-dtype", "float32", "-q"])
    assert code == 0
    want, got, base = _dense_diff(v), load_dir(out), load_dir(v["source_base"])
    for t in packed:
        name = t["tensor"]
        applied = got[name].double() - base[name].double()
        err = ((applied - want[name]).norm() / want[name].norm()).item()
        assert err == pytest.approx(t["error"], rel=1e-3, abs=1e-5), name  # the applied diff is the stored one
        assert t["error"] < (0.5 if method == "kbit" else 0.9)
    ckpt, _, terms, _ = open_delta(d)
    try:
        rng = np.random.default_rng(7)
        for term in terms.values():
            if isinstance(term, PackedTerm):
                numel = math.prod(term.shape)
                whole = decode(term.packed, 0, numel, np.empty(numel, np.float32), {})
                cuts = np.unique(np.r_[0, rng.integers(0, numel, 5), numel])
                pieces = [
                    decode(term.packed, a, b - a, np.empty(b - a, np.float32), {}) for a, b in itertools.pairwise(cuts)
                ]
                assert np.array_equal(np.concatenate(pieces), whole), term.name
    finally:
        ckpt.close()
