"""The SVD-based codecs ``mpsvd`` (mixed-precision singular vectors) and ``signlr`` (1 bit + low rank):
round trips, range decoding, rate against error, hostile parts, specs, gains, and the CLI end to end."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ftrecycle.cli import main
from ftrecycle.codecs import (
    CODECS,
    Compression,
    Job,
    Packed,
    decode,
    layout,
    mpsvd,
    parse_compression,
    signlr,
)
from ftrecycle.delta.store import check_parts, open_delta
from ftrecycle.dtypes import BF16, F32, U8, DType, from_storage
from ftrecycle.errors import CheckpointError, ConfigError
from ftrecycle.io.safetensors_format import TensorInfo
from ftrecycle.terms import PackedTerm

from conftest import load_dir

CT = np.dtype(np.float32)


def _spectrum(m: int, n: int, seed: int, power: float = 1.0) -> np.ndarray:
    """A float32 (m, n) matrix with singular values ``(k + 1)^-power`` and random singular vectors."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    u = np.linalg.qr(rng.standard_normal((m, k)))[0]
    v = np.linalg.qr(rng.standard_normal((n, k)))[0]
    return ((u * (1.0 + np.arange(k)) ** -power) @ v.T).astype(np.float32)


def _encode(spec: str, d: np.ndarray, dtype: DType = F32, block: int = 1 << 14) -> tuple[float, Packed]:
    """Encode ``d`` in memory through the registry; the recorded error and the parts, as stored."""
    c = parse_compression(spec)
    assert c is not None
    m, n = d.shape
    parts = layout(c, (m, n), dtype)
    assert parts, spec
    store = {k: np.zeros(math.prod(s), dtype=dt.storage) for k, (dt, s) in parts.items()}
    flat = d.reshape(-1)

    def read(s: int, count: int) -> np.ndarray:
        return flat[s : s + count].astype(CT)

    def write(part: str, s: int, v: np.ndarray) -> None:
        store[part][s : s + v.size] = v

    found = CODECS[c.method].encode(Job(read, write, "t", (m, n), parts, dtype, CT, block))
    return found.error, Packed(c.method, (m, n), {k: store[k].reshape(parts[k][1]) for k in parts})


def _whole(p: Packed) -> np.ndarray:
    m, n = p.shape
    return decode(p, 0, m * n, np.empty(m * n, CT), {}).reshape(m, n)


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want))


def _nbytes(p: Packed) -> int:
    return sum(a.nbytes for a in p.parts.values())


@pytest.mark.parametrize("spec", ["mpsvd:bits=1", "mpsvd:ratio=8", "signlr:rank=6", "signlr:ratio=10"])
def test_round_trip_decodes_with_the_error_recorded(spec):
    d = _spectrum(96, 80, 0)
    err, p = _encode(spec, d)
    assert 0 < err < 1
    assert _rel(_whole(p), d) == pytest.approx(err, rel=1e-4)


@pytest.mark.parametrize("spec", ["mpsvd:bits=2", "signlr:rank=5"])
def test_decode_of_any_range_equals_the_whole(spec):
    d = _spectrum(70, 53, 1)
    _, p = _encode(spec, d, block=300)  # row blocks of 5 rows: the encoder streams
    whole = _whole(p).reshape(-1)
    rng = np.random.default_rng(2)
    for _ in range(5):
        cuts = np.unique(np.r_[0, rng.integers(0, whole.size, 7), whole.size])
        cache: dict = {}
        pieces = [decode(p, s, e - s, np.empty(e - s, CT), cache) for s, e in itertools.pairwise(cuts)]
        got = np.concatenate(pieces)
        assert np.array_equal(got, whole), (spec, float(np.max(np.abs(got - whole))))


def test_signlr_refits_lower_the_error(monkeypatch):
    d = _spectrum(160, 120, 14, power=0.5)
    errs = []
    for rounds in (0, 1, 2):
        monkeypatch.setattr(signlr, "REFINE_ROUNDS", rounds)
        errs.append(_encode("signlr:rank=6", d)[0])
    assert errs[0] > errs[1] > errs[2], errs


def test_error_falls_as_the_budget_grows():
    d = _spectrum(128, 96, 3, power=0.7)
    mp = [_encode(f"mpsvd:bits={b}", d)[0] for b in (0.5, 1, 2, 4)]
    sl = [_encode(f"signlr:rank={r}", d)[0] for r in (1, 4, 16, 48)]
    assert all(x > y for x, y in itertools.pairwise(mp)), mp
    assert all(x > y for x, y in itertools.pairwise(sl)), sl


def test_mpsvd_stays_within_its_budget():
    d = _spectrum(120, 90, 4)
    for bits in (0.5, 1, 3):
        _, p = _encode(f"mpsvd:bits={bits}", d)
        budget = bits * d.size / 8
        # a packed row is whole bytes: less than one byte per row and column (and its vectors) is left over
        assert budget - (120 + 90 + 4 * mpsvd.VECTOR_BYTES) < _nbytes(p) <= budget, bits
        w = p.parts["widths"]
        assert set(w.tolist()) <= set(mpsvd.WIDTHS) and int(w.sum()) <= 8 * p.parts["qa"].shape[1]


def test_mpsvd_never_follows_the_memory_and_is_refused_when_its_encoder_does_not_fit(tmp_path):
    # a vector count chosen by the memory would make the delta depend on --max-memory and --threads
    assert CODECS["mpsvd"].resolve is None
    m, n = 8192, 2048  # its encoder at ratio=4 holds ~510 MiB
    spec = parse_compression("mpsvd:ratio=4")
    capped = parse_compression("mpsvd:ratio=4,rank=16")
    assert spec is not None and capped is not None
    need = mpsvd.state_bytes(layout(spec, (m, n), BF16), (m, n), 4, 1 << 14)
    assert mpsvd.state_bytes(layout(capped, (m, n), BF16), (m, n), 4, 1 << 14) < need / 4
    rng = np.random.default_rng(0)
    a = {"w.weight": rng.standard_normal((m, n)).astype(np.float32)}
    b = {"w.weight": a["w.weight"] + 0.01 * rng.standard_normal((m, n)).astype(np.float32)}
    paths = []
    for name, tensors in (("a", a), ("b", b)):
        d = tmp_path / name
        d.mkdir()
        save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text("{}")
        paths.append(str(d))
    args = ["diff", "--base", paths[0], "--finetuned", paths[1], "-o", str(tmp_path / "d"), "-q"]
    # a fresh process: --max-memory also bounds what the process already holds, which a test run's grows past
    run = subprocess.run(
        [sys.executable, "-m", "ftrecycle.cli", *args, "--compress", str(spec), "--max-memory", "400MiB"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "rank=K" in run.stderr, run.stderr
    assert not (tmp_path / "d").exists()


def test_mpsvd_gives_the_large_singular_values_more_bits():
    d = _spectrum(200, 160, 5)
    _, p = _encode("mpsvd:bits=1", d)
    w = p.parts["widths"].astype(int)
    assert w[0] == 8 and w[-1] == 0 and np.all(np.diff(w) <= 0), w


@pytest.mark.parametrize("ratio", [8, 16, 32])
def test_mpsvd_beats_lowrank_at_the_same_bytes_on_a_decaying_spectrum(ratio):
    d = _spectrum(256, 256, 6)
    err_mp, p_mp = _encode(f"mpsvd:ratio={ratio}", d, BF16)
    err_lr, p_lr = _encode(f"lowrank:ratio={ratio}", d, BF16)
    assert _nbytes(p_mp) <= _nbytes(p_lr) * 1.02, (_nbytes(p_mp), _nbytes(p_lr))
    assert err_mp < 0.8 * err_lr, (ratio, err_mp, err_lr)


def _delta_come_schedule(s: np.ndarray, errors: np.ndarray, capacity: int) -> np.ndarray:
    """Delta-CoMe's fixed widths: 8 bits for 2 vectors, 3 for the next 32, 2 for the rest, while they fit."""
    widths = np.zeros(len(s), dtype=np.uint8)
    used = 0
    for k in range(len(s)):
        w = 8 if k < 2 else 3 if k < 34 else 2
        if used + w > capacity:
            break
        widths[k], used = w, used + w
    return widths


def test_mpsvd_greedy_widths_beat_a_fixed_schedule(monkeypatch):
    d = _spectrum(256, 256, 13)
    greedy, _ = _encode("mpsvd:ratio=8", d, BF16)
    monkeypatch.setattr(mpsvd, "allocate", _delta_come_schedule)
    fixed, _ = _encode("mpsvd:ratio=8", d, BF16)
    assert greedy < 0.8 * fixed, (greedy, fixed)


def _lowrank_then_sign(d: np.ndarray, r: int) -> float:
    u, s, vt = np.linalg.svd(d.astype(np.float64), full_matrices=False)
    res = d - (u[:, :r] * s[:r]) @ vt[:r]
    mag = np.mean(np.abs(res), axis=1, keepdims=True)
    return _rel(d - (res - np.where(res >= 0, mag, -mag)), d)


def _sign_then_lowrank(d: np.ndarray, r: int) -> float:
    x = d.astype(np.float64)
    mag = np.mean(np.abs(x), axis=1, keepdims=True)
    res = x - np.where(x >= 0, mag, -mag)
    u, s, vt = np.linalg.svd(res, full_matrices=False)
    return _rel(d - (res - (u[:, :r] * s[:r]) @ vt[:r]), d)


def test_signlr_low_rank_first_is_better_and_is_what_it_stores(monkeypatch):
    rng = np.random.default_rng(7)
    noise = rng.standard_normal((256, 256))
    low = rng.standard_normal((256, 4)) @ rng.standard_normal((4, 256))
    structured = (noise + low * math.sqrt(3) * np.linalg.norm(noise) / np.linalg.norm(low)).astype(np.float32)
    assert _lowrank_then_sign(structured, 8) < 0.75 * _sign_then_lowrank(structured, 8)
    flat = noise.astype(np.float32)
    assert _lowrank_then_sign(flat, 8) == pytest.approx(_sign_then_lowrank(flat, 8), rel=0.02)
    err, _ = _encode("signlr:rank=8", structured)  # exact SVD at this size: the first order, then refits
    assert err < _lowrank_then_sign(structured, 8)
    monkeypatch.setattr(signlr, "REFINE_ROUNDS", 0)
    plain, _ = _encode("signlr:rank=8", structured)
    assert plain == pytest.approx(_lowrank_then_sign(structured, 8), rel=1e-3)


def test_signlr_ratio_leaves_room_for_bits_and_scales():
    m, n = 128, 64
    d = _spectrum(m, n, 8)
    _, p = _encode("signlr:ratio=8", d, BF16)
    assert _nbytes(p) <= m * n * 2 / 8
    assert layout(Compression("signlr", ratio=16), (m, n), BF16) == {}  # 1 bit alone is 16x: dense


def _infos(parts: dict[str, tuple[DType, tuple[int, ...]]]) -> dict[str, TensorInfo]:
    return {k: TensorInfo(f"t::{k}", dt, shape, Path("x.safetensors"), 0) for k, (dt, shape) in parts.items()}


@pytest.mark.parametrize(
    ("part", "bad"),
    [
        ("qb", (U8, (40, 3))),  # other n
        ("qb", (U8, (30, 4))),  # c other than qa's
        ("sa", (F32, (9,))),  # r other than the widths'
        ("sb", (BF16, (12,))),
        ("widths", (F32, (12,))),
        ("qa", (U8, (50,))),
        ("widths", (U8, (31,))),  # more vectors than the matrix has
    ],
)
def test_mpsvd_parts_of_the_wrong_shape_or_dtype_are_refused(part, bad):
    good = {"qa": (U8, (50, 3)), "qb": (U8, (30, 3)), "sa": (F32, (12,)), "sb": (F32, (12,)), "widths": (U8, (12,))}
    check_parts("t", "mpsvd", (50, 30), _infos(good))
    with pytest.raises(CheckpointError, match=part if part != "qa" else "q"):
        check_parts("t", "mpsvd", (50, 30), _infos({**good, part: bad}))


def test_mpsvd_more_vectors_than_a_packed_row_holds_are_refused():
    many = {"qa": (U8, (50, 1)), "qb": (U8, (30, 1)), "sa": (F32, (5,)), "sb": (F32, (5,)), "widths": (U8, (5,))}
    with pytest.raises(CheckpointError, match="widths"):  # one byte holds 4 vectors of 2 bits
        check_parts("t", "mpsvd", (50, 30), _infos(many))


def test_signlr_parts_of_the_wrong_shape_or_dtype_are_refused():
    good = {"bits": (U8, (188,)), "scale": (F32, (50,)), "a": (BF16, (50, 4)), "b": (BF16, (4, 30))}
    check_parts("t", "signlr", (50, 30), _infos(good))
    for part, bad in [("scale", (F32, (1,))), ("b", (F32, (4, 30))), ("b", (BF16, (5, 30))), ("bits", (U8, (187,)))]:
        with pytest.raises(CheckpointError, match=part):
            check_parts("t", "signlr", (50, 30), _infos({**good, part: bad}))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda w: w.__setitem__(0, 9),  # not a width
        lambda w: w.__setitem__(0, 1),
        lambda w: w.fill(8),  # more bits than a packed row holds
    ],
)
def test_mpsvd_widths_out_of_range_are_refused_when_read(tamper):
    d = _spectrum(40, 30, 9)
    _, p = _encode("mpsvd:bits=2", d)
    widths = p.parts["widths"].copy()
    tamper(widths)
    bad = Packed("mpsvd", p.shape, {**p.parts, "widths": widths})
    with pytest.raises(CheckpointError, match="widths"):
        decode(bad, 0, 10, np.empty(10, CT), {})


def test_mpsvd_non_finite_steps_are_refused():
    _, p = _encode("mpsvd:bits=2", _spectrum(40, 30, 9))
    sb = p.parts["sb"].copy()
    sb[0] = np.inf
    with pytest.raises(CheckpointError, match="non-finite"):
        decode(Packed("mpsvd", p.shape, {**p.parts, "sb": sb}), 0, 10, np.empty(10, CT), {})


@pytest.mark.parametrize(
    "spec",
    [
        "mpsvd",
        "mpsvd:bits=1,ratio=8",
        "mpsvd:rank=4",
        "mpsvd:bits=0",
        "mpsvd:bits=40",
        "mpsvd:ratio=1",
        "signlr",
        "signlr:bits=1",
        "signlr:rank=0",
        "signlr:rank=2.5",
        "signlr:rank=2,ratio=8",
    ],
)
def test_bad_specs_are_refused(spec):
    with pytest.raises(ConfigError, match="--compress"):
        parse_compression(spec)


def test_specs_print_as_parsed():
    assert str(parse_compression("mpsvd:ratio=16")) == "mpsvd:ratio=16"
    assert str(parse_compression("signlr:rank=8")) == "signlr:rank=8"


def test_signlr_row_gains_scale_the_rows():
    d = _spectrum(60, 40, 10)
    _, p = _encode("signlr:rank=4", d)
    g = np.linspace(0.5, 2.0, 60)
    assert signlr.CODEC.row_gain
    changed = signlr.CODEC.gain({k: np.asarray(v) for k, v in p.parts.items()}, g)
    assert set(changed) == {"a", "scale"}
    gained = _whole(Packed("signlr", p.shape, {**p.parts, **changed}))
    want = _whole(p).astype(np.float64) * g[:, None]
    assert np.max(np.abs(gained - want)) <= 1e-5 * np.max(np.abs(want))


def test_mpsvd_matrix_gain_scales_the_matrix():
    _, p = _encode("mpsvd:bits=2", _spectrum(60, 40, 11))
    assert mpsvd.CODEC.gain is not None and not mpsvd.CODEC.row_gain
    changed = mpsvd.CODEC.gain(dict(p.parts), np.array([1.5]))
    assert set(changed) == {"sa", "sb"}  # sb: back on its grid (exact decode)
    gained = _whole(Packed("mpsvd", p.shape, {**p.parts, **changed}))
    want = _whole(p).astype(np.float64) * 1.5
    assert np.max(np.abs(gained - want)) <= 1e-5 * np.max(np.abs(want))


def test_signlr_gain_keeps_bfloat16_parts():
    _, p = _encode("signlr:rank=3", _spectrum(30, 20, 12), BF16)
    changed = signlr.CODEC.gain(dict(p.parts), np.full(30, 2.0))
    assert changed["a"].dtype == np.uint16  # bfloat16 bits: doubling is exact
    a, a2 = (from_storage(x, BF16, np.dtype(np.float64)) for x in (p.parts["a"], changed["a"]))
    assert np.array_equal(a2, 2 * a)


@pytest.mark.parametrize("spec", ["mpsvd:ratio=6", "signlr:rank=2"])
def test_cli_diff_then_apply(versions, tmp_path, spec):
    v = versions["llama"]
    d, out = tmp_path / "d", tmp_path / "o"
    argv = ["diff", "--base", str(v["source_base"]), "--finetuned", str(v["source_finetuned"]), "-o", str(d)]
    assert main([*argv, "--delta-dtype", "bfloat16", "--compress", spec, "-q"]) == 0
    manifest = json.loads((d / "ftrecycle-delta.json").read_text())
    packed = {k: e for k, e in manifest["tensors"].items() if e.get("compression")}
    assert packed and all(e["compression"]["method"] == spec.split(":")[0] for e in packed.values())
    apply = ["apply", "--delta", str(d), "--target-base", str(v["source_base"]), "-o", str(out)]
    assert main([*apply, "--out-dtype", "float32", "-q"]) == 0
    base, fine, got = load_dir(v["source_base"]), load_dir(v["source_finetuned"]), load_dir(out)
    for name, e in packed.items():
        want = fine[name].double() - base[name].double()
        err = ((got[name].double() - base[name].double() - want).norm() / want.norm()).item()
        assert err == pytest.approx(e["compression"]["error"], rel=1e-3, abs=1e-5), name
    ckpt, _, terms, _ = open_delta(d)
    try:
        for term in terms.values():
            if isinstance(term, PackedTerm):
                numel = math.prod(term.shape)
                whole = decode(term.packed, 0, numel, np.empty(numel, CT), {})
                half = numel // 2 + 3
                tail = decode(term.packed, half, numel - half, np.empty(numel - half, CT), {})
                assert np.array_equal(tail, whole[half:]), term.name
    finally:
        ckpt.close()


def test_mpsvd_rank_caps_the_vectors_kept_and_trades_error_for_it():
    d = _spectrum(96, 160, seed=5, power=0.5)
    free_err, free = _encode("mpsvd:ratio=8", d)
    capped_err, capped = _encode("mpsvd:ratio=8,rank=8", d)
    assert free.parts["widths"].size > 8 and capped.parts["widths"].size == 8
    assert _rel(_whole(capped), d) == pytest.approx(capped_err, rel=1e-3)
    assert capped_err > free_err  # fewer vectors, wider codes: a flat-ish spectrum loses more
    assert str(parse_compression("mpsvd:ratio=8,rank=8")) == "mpsvd:rank=8,ratio=8"
    with pytest.raises(ConfigError, match="rank"):
        parse_compression("mpsvd:ratio=8,rank=0")
