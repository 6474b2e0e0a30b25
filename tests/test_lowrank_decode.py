"""The low-rank decode's BLAS path: exact sums by construction, checked against integer arithmetic.

:func:`ftrecycle.codecs.lowrank.exact_sum` claims that factors on its grids make every float64
GEMM return the exact sum; these tests compute that sum with Python integers (an independent
reference), take factors at and just past the bound, and decode under other range splits,
BLAS thread counts and OpenBLAS kernels in subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ftrecycle.codecs import decode
from ftrecycle.codecs import lowrank as lr
from ftrecycle.codecs.base import Packed
from ftrecycle.delta.store import open_delta
from ftrecycle.dtypes import BF16, F16, F32, from_storage
from ftrecycle.ops.diff import diff
from ftrecycle.terms import PackedTerm

F64 = np.dtype(np.float64)


def integer_product(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int]:
    """``a @ b`` exactly, as Python integers ``N`` (an object array) times ``2^e``."""
    e_a = int(min(lr.grid_exponents(a).min(), 0))
    e_b = int(min(lr.grid_exponents(b).min(), 0))
    ai = np.array([[int(np.ldexp(x, -e_a)) for x in row] for row in a], dtype=object)
    bi = np.array([[int(np.ldexp(x, -e_b)) for x in row] for row in b], dtype=object)
    return ai.dot(bi), e_a + e_b


def _stats_pass(a: np.ndarray, b: np.ndarray) -> bool:
    return lr.exact_sum(*lr.column_stats(a), *lr.column_stats(b.T))


def _svd_like(rng: np.random.Generator, m: int, n: int, r: int, decay: float) -> tuple[np.ndarray, np.ndarray]:
    """Factors shaped like a truncated SVD's: orthonormal-ish rows, singular values spanning ``decay`` decades."""
    u = rng.standard_normal((m, r)) / np.sqrt(m)
    v = rng.standard_normal((r, n)) / np.sqrt(n)
    return u * np.logspace(-2, -2 - decay, r), v


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
@pytest.mark.parametrize("decay", [1.0, 12.0])
def test_snapped_factors_decode_to_the_exact_sum_rounded_once(dtype, decay):
    rng = np.random.default_rng(7)
    m, n, r = 37, 53, 24
    u, v = _svd_like(rng, m, n, r, decay)
    if decay > 10:  # a few entries far below their column's largest: snapping must move them
        u[3, 0], v[0, 11] = 1e-12, -3e-13
    a_st, b_st = lr.snap_factors(u, v, dtype)
    a, b = from_storage(a_st, dtype, F64), from_storage(b_st, dtype, F64)
    assert _stats_pass(a, b)
    exact, e = integer_product(a, b)
    odd = [abs(int(x)) // (abs(int(x)) & -abs(int(x))) if x else 0 for x in exact.reshape(-1)]
    assert max(odd) < 2**53, "every exact sum must be a float64"
    want64 = np.array([np.ldexp(float(x), e) for x in exact.reshape(-1)])  # exact: odd part < 2^53
    packed = Packed("lowrank", (m, n), {"a": a_st if dtype is not BF16 else a.astype(np.float32), "b": b})
    for ct in (np.float32, np.float64):
        got = decode(packed, 0, m * n, np.empty(m * n, ct), {})
        want = want64.astype(ct)  # one rounding of the exact sum
        int_type = f"i{got.itemsize}"
        bad = np.flatnonzero(got.view(int_type) != want.view(int_type))
        assert bad.size == 0, f"{bad.size} elements differ, first at {bad[:3]}"


def test_snapping_changes_the_factors_far_below_bf16_rounding():
    rng = np.random.default_rng(3)
    u, v = _svd_like(rng, 64, 96, 32, 20.0)
    u[::7, :4] *= 1e-9  # entries of the leading columns far below their largest
    a_st, b_st = lr.snap_factors(u, v, BF16)
    plain_a = lr._rounded(u, BF16)
    plain_b = lr._rounded(v, BF16)
    a, b = from_storage(a_st, BF16, F64), from_storage(b_st, BF16, F64)
    assert not _stats_pass(plain_a, plain_b), "the test needs factors that fail the bound before snapping"
    assert not np.array_equal(a, plain_a), "the test needs entries that snapping moves"
    d = u @ v
    before = np.linalg.norm(plain_a @ plain_b - d) / np.linalg.norm(d)
    after = np.linalg.norm(a @ b - d) / np.linalg.norm(d)
    # bf16 rounding gives ~2^-9 relative error per entry; snapping moves an entry by at most half
    # its grid, 2^-26 of its column's (row's) largest, so an element by < 2^-24 of the largest term
    assert abs(after - before) < 1e-6 * before, (before, after)
    terms = np.abs(plain_a).max(axis=0) * np.abs(plain_b).max(axis=1)
    assert np.abs(a @ b - plain_a @ plain_b).max() < 2**-24 * terms.max()


def test_factors_just_past_the_bound_take_the_loop_and_at_it_the_exact_path():
    # one term: a = 2^52 - 1 on the grid 1, b = 1 on the grid 1: T = 2^52 - 1 < 2^52 passes
    a = np.array([[2.0**52 - 1], [1.0]])
    b = np.array([[1.0, 3.0]])
    assert _stats_pass(a, b) is False  # 3 * (2^52 - 1) >= 2^52
    assert _stats_pass(a, b[:, :1])
    # two terms whose products need 54 bits together: refused
    a2 = np.array([[2.0**30 + 1, 2.0**-30]])
    b2 = np.array([[2.0**23 + 1], [1.0]])
    assert not _stats_pass(a2, b2)
    # NaN and infinity never take the BLAS path; zeros always may
    assert not _stats_pass(np.array([[np.nan]]), np.array([[1.0]]))
    assert not _stats_pass(np.array([[np.inf]]), np.array([[1.0]]))
    assert _stats_pass(np.zeros((3, 2)), np.ones((2, 4)))


def test_factors_that_fail_decode_by_the_rank_ordered_loop():
    rng = np.random.default_rng(11)
    a = rng.standard_normal((9, 6)).astype(np.float32)
    b = rng.standard_normal((6, 13)).astype(np.float32)
    assert not _stats_pass(a.astype(F64), b.astype(F64))
    got = decode(Packed("lowrank", (9, 13), {"a": a, "b": b}), 0, 117, np.empty(117, np.float32), {})
    want = np.zeros((9, 13), np.float32)
    for k in range(6):
        want = want + np.outer(a[:, k], b[k]).astype(np.float32)
    assert np.array_equal(got.view(np.int32), want.reshape(-1).view(np.int32))


def test_the_path_is_decided_over_the_whole_factors_not_the_range():
    # rows 0..9 alone pass the bound; row 10 (never inside the decoded range) makes the tensor fail it
    rng = np.random.default_rng(5)
    a = lr._rounded(rng.standard_normal((11, 4)), BF16)
    a[10, 0] = 2.0**-100  # a fine grid: g drops by ~100 bits
    b = lr._rounded(rng.standard_normal((4, 6)), BF16)
    assert _stats_pass(a[:10], b) and not _stats_pass(a, b)
    cache: dict = {}
    p = Packed("lowrank", (11, 6), {"a": a.astype(np.float32), "b": b.astype(np.float32)})
    decode(p, 0, 12, np.empty(12, np.float32), cache)
    ((bf, exact_path),) = cache.values()
    assert exact_path is False and bf.dtype == np.float32


@pytest.fixture(scope="module")
def lowrank_delta(versions, tmp_path_factory):
    v = versions["llama"]
    out = tmp_path_factory.mktemp("lowrank-decode") / "d"
    return diff(str(v["source_base"]), str(v["source_finetuned"]), out, compress="lowrank:rank=6").output


def test_the_encoder_stores_factors_on_the_exact_path(lowrank_delta):
    ckpt, _, terms, _ = open_delta(lowrank_delta)
    try:
        plans = []
        for term in terms.values():
            if isinstance(term, PackedTerm) and term.packed.method == "lowrank":
                plans.append(lr.factor_plan(term.packed, np.dtype(np.float32), {})[1])
    finally:
        ckpt.close()
    assert len(plans) >= 4 and all(plans), plans


_CHILD = textwrap.dedent(
    """
    import hashlib, json, sys
    import numpy as np
    from ftrecycle.codecs import decode
    from ftrecycle.codecs import lowrank as lr
    from ftrecycle.codecs.base import Packed
    from ftrecycle.dtypes import BF16
    rng = np.random.default_rng(2)
    m, n, r = 300, 257, 64
    u = rng.standard_normal((m, r)) * np.logspace(-2, -8, r)
    a, b = lr.snap_factors(u, rng.standard_normal((r, n)) / 16, BF16)
    p = Packed("lowrank", (m, n), {"a": (a.astype(np.uint32) << 16).view(np.float32),
                                   "b": (b.astype(np.uint32) << 16).view(np.float32)})
    out, digests = np.empty(m * n, np.float32), []
    for step in json.loads(sys.argv[1]):
        cache = {}
        for s in range(0, m * n, step):
            c = min(step, m * n - s)
            decode(p, s, c, out[s : s + c], cache)
        digests.append(hashlib.sha256(out.tobytes()).hexdigest())
    print(json.dumps([digests, lr.factor_plan(p, out.dtype, {})[1]]))
    """
)


def test_bits_do_not_depend_on_range_split_blas_threads_or_kernel():
    src = str(Path(__file__).resolve().parents[1] / "src")
    steps = [300 * 257, 1000, 257 * 7 + 3, 97]
    seen = set()
    envs = [
        {"OPENBLAS_NUM_THREADS": "1"},
        {"OPENBLAS_NUM_THREADS": "2"},
        {"OPENBLAS_CORETYPE": "Sandybridge"},
        {"OPENBLAS_CORETYPE": "Haswell"},
    ]
    for extra in envs:
        env = {**os.environ, "PYTHONPATH": src, **extra}
        run = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(steps)], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        digests, exact_path = json.loads(run.stdout)
        assert exact_path, "the factors were meant to take the BLAS path"
        seen.update(digests)
    assert len(seen) == 1, f"{len(seen)} different decodes across splits and BLAS settings"


def test_column_stats_finds_each_columns_grid_as_the_element_by_element_minimum():
    rng = np.random.default_rng(9)
    x = lr._rounded(rng.standard_normal((40, 6)) * np.logspace(0, -20, 6), BF16)
    x[5, 1] = 0.0
    x[:, 2] = 0.0  # all zeros: on every grid
    x[7, 3] = x[:, 3].max() * 2.0**-60  # finer than 52 bits below the column's largest
    x[:, 4] = lr.snap(x[:, 0], np.full(40, -6))  # a coarse grid shared by the column
    amax, grid = lr.column_stats(x)
    want = np.min(lr.grid_exponents(x), axis=0)
    assert np.array_equal(amax, np.abs(x).max(axis=0))
    assert grid[4] == -6 and grid[2] == want[2] > 1 << 18
    for k in (0, 1, 2, 4, 5):
        assert grid[k] == want[k], (k, grid[k], want[k])
    assert grid[3] <= -(1 << 18) and want[3] < np.frexp(amax[3])[1] - 52
    nan = x.copy()
    nan[0, 0] = np.nan
    assert lr.column_stats(nan)[1][0] == lr.grid_exponents(np.array([np.nan]))[0]
