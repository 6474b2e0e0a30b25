"""mpsvd and signlr decode through lowrank's exact BLAS path: by construction, checked independently.

Freshly encoded factors must take the exact path (asserted on the plan), decode to the exact sum
rounded once (Python integers as the reference), give the same bits for any range split, and
cost the codecs no measurable error; tampered parts must take the rank-ordered loop and still
decode deterministically.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ftrecycle.cli import main
from ftrecycle.codecs import decode, mpsvd, signlr
from ftrecycle.codecs import lowrank as lr
from ftrecycle.codecs.base import Packed, read_part
from ftrecycle.delta.store import open_delta
from ftrecycle.dtypes import BF16, F32, from_storage, to_storage
from ftrecycle.terms import PackedTerm
from test_codecs_svd import CT, _encode, _spectrum, _whole
from test_lowrank_decode import integer_product

F64 = np.dtype(np.float64)


def _mpsvd_factors(p: Packed) -> tuple[np.ndarray, np.ndarray]:
    """mpsvd's dequantized factors of the kept vectors, in float64 (exact: (odd / 2) * step)."""
    widths = p.parts["widths"]
    keep = np.flatnonzero(widths)
    a = mpsvd.dequantize(mpsvd.unpack(p.parts["qa"], widths), widths, p.parts["sa"], F64)[:, keep]
    b = mpsvd.dequantize(mpsvd.unpack(p.parts["qb"], widths), widths, p.parts["sb"], F64)[:, keep].T
    return a, b


def _splits(p: Packed, seed: int) -> None:
    """Decoding in pieces (several random splits, one cache each) gives the whole decode's bits."""
    whole = _whole(p).reshape(-1)
    rng = np.random.default_rng(seed)
    for pieces in (2, 7, 31):
        cuts = np.unique(np.r_[0, rng.integers(0, whole.size, pieces), whole.size])
        cache: dict = {}
        got = np.concatenate([decode(p, s, e - s, np.empty(e - s, CT), cache) for s, e in itertools.pairwise(cuts)])
        assert np.array_equal(got.view(np.int32), whole.view(np.int32)), pieces


def _mpsvd_plan(p: Packed) -> bool:
    return mpsvd.exact_steps(p.parts["sa"], p.parts["sb"], p.parts["widths"])


@pytest.mark.parametrize("spec", ["mpsvd:bits=2", "mpsvd:ratio=8"])
def test_mpsvd_fresh_factors_take_the_exact_path_and_give_the_exact_sum(spec):
    d = _spectrum(90, 70, 21)
    _, p = _encode(spec, d, block=700)
    assert _mpsvd_plan(p)
    a, b = _mpsvd_factors(p)
    assert lr.exact_sum(*lr.column_stats(a), *lr.column_stats(b.T))  # the bound holds on the codes too
    exact, e = integer_product(a, b)
    want = np.array([np.ldexp(float(x), e) for x in exact.reshape(-1)]).astype(CT)  # odd part < 2^53
    got = _whole(p).reshape(-1)
    bad = np.flatnonzero(got.view(np.int32) != want.view(np.int32))
    assert bad.size == 0, f"{bad.size} elements differ from the exact sum rounded once"
    _splits(p, 1)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_signlr_fresh_factors_take_the_exact_path(dtype):
    d = _spectrum(64, 88, 22)
    _, p = _encode("signlr:rank=7", d, dtype, block=880)
    if dtype is BF16:  # in memory the codec reads float parts; a file holds them as bf16
        p = Packed("signlr", p.shape, {**p.parts, **{k: from_storage(p.parts[k], BF16, CT) for k in "ab"}})
    _, exact_path = lr.factor_plan(p, CT, {})
    assert exact_path
    _splits(p, 2)


def test_the_exact_path_gives_the_exact_sum_rounded_once_whatever_the_blocking():
    rng = np.random.default_rng(5)
    u = rng.standard_normal((70, 150)) * np.logspace(0, -6, 150)
    a_st, b_st = lr.snap_factors(u, rng.standard_normal((150, 133)), F32)
    a, b = a_st.astype(F64), b_st.astype(F64)
    _, n = b.shape
    for skip, count in [(0, 70 * 133), (133 * 3 + 5, 1000), (17, 1)]:
        got = np.empty(count, CT)
        lr.exact_rows(a, b, skip, count, got)
        one_by_one = np.empty(count, CT)
        for k in range(count):  # each element alone: a 1 x r x 1 GEMM
            lr.exact_rows(a, b, skip + k, 1, one_by_one[k:])
        assert np.array_equal(got.view(np.int32), one_by_one.view(np.int32))
        for k in range(0, count, max(1, count // 7)):  # math.fsum: the exact sum, then one rounding
            i, j = divmod(skip + k, n)
            want = CT.type(math.fsum((a[i] * b[:, j]).tolist()))
            assert got[k].view(np.int32) == want.view(np.int32)


def _identity_grids(sa, sb, widths):
    return sa, sb


def test_mpsvd_grids_cost_no_measurable_error(monkeypatch):
    d = _spectrum(128, 96, 23)
    err, p = _encode("mpsvd:ratio=8", d)
    monkeypatch.setattr(mpsvd, "on_grids", _identity_grids)
    err_free, p_free = _encode("mpsvd:ratio=8", d)
    assert not _mpsvd_plan(p_free)  # full float32 steps: the bound fails, so the test compares two paths
    assert abs(err - err_free) <= 1e-4 * err_free
    assert np.array_equal(p.parts["widths"], p_free.parts["widths"])  # the size accounting is the same


def _rounded_only(u, s, vt, rank, dtype):
    return to_storage(u[:, :rank] * s[:rank], dtype), to_storage(vt[:rank], dtype)


def test_signlr_grids_cost_no_measurable_error(monkeypatch):
    d = _spectrum(96, 80, 24)
    err, _ = _encode("signlr:rank=6", d, BF16)
    monkeypatch.setattr(signlr, "snapped_svd_factors", _rounded_only)
    err_free, _ = _encode("signlr:rank=6", d, BF16)
    assert abs(err - err_free) <= 1e-4 * err_free


def test_a_step_with_a_full_mantissa_takes_the_loop_deterministically():
    _, p = _encode("mpsvd:bits=2", _spectrum(70, 53, 25), block=300)
    sa = p.parts["sa"].copy()
    k = int(np.flatnonzero(p.parts["widths"])[0])
    sa[k] = np.float32(sa[k]) * np.float32(1 + 2**-23) if sa[k] else np.float32(1 + 2**-23)  # 24 bits
    bad = Packed("mpsvd", p.shape, {**p.parts, "sa": sa})
    assert not _mpsvd_plan(bad)
    a, b = _mpsvd_factors(bad)
    m, n = p.shape
    want = np.empty(m * n, CT)
    lr.product_rows(a.astype(CT), b.astype(CT), 0, m * n, want)  # the rank-ordered loop in CT
    got = _whole(bad).reshape(-1)
    assert np.array_equal(got.view(np.int32), want.view(np.int32))
    _splits(bad, 3)


def test_a_tiny_factor_entry_takes_the_loop_deterministically():
    _, p = _encode("signlr:rank=5", _spectrum(70, 53, 26), block=300)
    a = p.parts["a"].copy()
    a[3, 0] = np.float32(1e-30)  # far finer than the column's grid
    bad = Packed("signlr", p.shape, {**p.parts, "a": a})
    assert not lr.factor_plan(bad, CT, {})[1]
    _splits(bad, 4)


def test_mpsvd_gain_keeps_the_exact_path():
    _, p = _encode("mpsvd:bits=2", _spectrum(60, 40, 27))
    changed = mpsvd.gain(dict(p.parts), np.array([1.37]))
    gained = Packed("mpsvd", p.shape, {**p.parts, **changed})
    assert _mpsvd_plan(gained)
    want = _whole(p).astype(F64) * 1.37
    assert np.max(np.abs(_whole(gained) - want)) <= 1e-5 * np.max(np.abs(want))


@pytest.mark.parametrize("spec", ["mpsvd:ratio=6", "signlr:rank=2"])
def test_cli_deltas_decode_through_the_exact_path(versions, tmp_path, spec):
    v = versions["llama"]
    d = tmp_path / "d"
    argv = ["diff", "--base", str(v["source_base"]), "--finetuned", str(v["source_finetuned"]), "-o", str(d)]
    assert main([*argv, "--delta-dtype", "bfloat16", "--compress", spec, "-q"]) == 0
    manifest = json.loads((d / "ftrecycle-delta.json").read_text())
    assert any(e.get("compression") for e in manifest["tensors"].values())
    ckpt, _, terms, _ = open_delta(d)
    try:
        packed = [t for t in terms.values() if isinstance(t, PackedTerm)]
        assert packed
        for term in packed:
            p = term.packed
            if p.method == "mpsvd":
                r = p.parts["widths"].info.shape[0]
                parts = {k: read_part(p, k, 0, r) for k in ("sa", "sb", "widths")}
                assert mpsvd.exact_steps(parts["sa"], parts["sb"], parts["widths"]), term.name
            else:
                assert lr.factor_plan(p, CT, {})[1], term.name
    finally:
        ckpt.close()


_CHILD = textwrap.dedent(
    """
    import hashlib, json, sys
    import numpy as np
    from ftrecycle.codecs import decode, mpsvd
    from test_codecs_svd import _encode, _spectrum
    _, p = _encode("mpsvd:bits=6", _spectrum(150, 140, 31))  # over 64 kept vectors: one whole-rank GEMM per block
    m, n = p.shape
    out, digests = np.empty(m * n, np.float32), []
    for step in json.loads(sys.argv[1]):
        cache = {}
        for s in range(0, m * n, step):
            c = min(step, m * n - s)
            decode(p, s, c, out[s : s + c], cache)
        digests.append(hashlib.sha256(out.tobytes()).hexdigest())
    kept = int(np.count_nonzero(p.parts["widths"]))
    print(json.dumps([digests, mpsvd.exact_steps(p.parts["sa"], p.parts["sb"], p.parts["widths"]), kept]))
    """
)


def test_mpsvd_bits_do_not_depend_on_range_split_blas_threads_or_kernel():
    root = Path(__file__).resolve().parents[1]
    steps = [150 * 140, 1000, 140 * 7 + 3, 97]
    seen = set()
    envs = [{"OPENBLAS_NUM_THREADS": "1"}, {"OPENBLAS_NUM_THREADS": "2"}, {"OPENBLAS_CORETYPE": "Prescott"}]
    for extra in envs:
        env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root / 'tests'}", **extra}
        run = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(steps)], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        digests, exact_path, kept = json.loads(run.stdout)
        assert exact_path and kept > 64, (exact_path, kept)
        seen.update(digests)
    assert len(seen) == 1, f"{len(seen)} different decodes across splits and BLAS settings"
