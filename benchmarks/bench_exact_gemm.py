"""Speed of the exact low-rank decode's float64 GEMM (``ftrecycle.codecs.lowrank.exact_rows``) by rank,
against the small tiles it used before, on one BLAS thread (as the engine runs it).

Usage: PYTHONPATH=src .venv/bin/python benchmarks/bench_exact_gemm.py [--json OUT]

The factors are integers times powers of two (what ``snap_factors`` produces), so every product and
partial sum is exact and both layouts give the same bits (checked); only the time differs. Prints
seconds and GFLOPS (2 m n r / s) for a 4096 x 2048 output at each rank.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
from threadpoolctl import threadpool_limits

from ftrecycle.codecs import lowrank

RANKS = (64, 84, 126, 256, 500, 1400)
SHAPE = (4096, 2048)


def old_tiles(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """The previous exact path: square-ish tiles of at most 2^18 multiply-adds."""
    (m, r), n = a.shape, b.shape[1]
    rows = max(1, min(m, math.isqrt((1 << 18) // r), (1 << 17) // n))
    cols = min(n, max(1, (1 << 18) // (rows * r)))
    buf = np.empty((rows, n))
    for i in range(0, m, rows):
        j = min(m, i + rows)
        for c in range(0, n, cols):
            np.matmul(a[i:j], b[:, c : c + cols], out=buf[: j - i, c : c + cols])
        out[i * n : j * n] = buf[: j - i].reshape(-1)


def best_of(fn, a: np.ndarray, b: np.ndarray, out: np.ndarray, repeats: int = 3) -> float:
    """The least wall time of ``repeats`` calls of ``fn(a, b, out)``."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(a, b, out)
        times.append(time.perf_counter() - t)
    return min(times)


def new_blocks(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """The exact path as the codecs run it."""
    lowrank.exact_rows(a, b, 0, out.size, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    m, n = SHAPE
    rows = []
    with threadpool_limits(limits=1, user_api="blas"):
        for r in RANKS:
            a = rng.integers(-127, 128, (m, r)).astype(np.float64) * 2.0**-20
            b = rng.integers(-127, 128, (r, n)).astype(np.float64) * 2.0**-10
            new, old = np.empty(m * n, np.float32), np.empty(m * n, np.float32)
            t_new = best_of(new_blocks, a, b, new)
            t_old = best_of(old_tiles, a, b, old)
            assert np.array_equal(new.view(np.int32), old.view(np.int32))
            flops = 2 * m * n * r
            row = {
                "rank": r,
                "new_s": round(t_new, 4),
                "old_s": round(t_old, 4),
                "new_gflops": round(flops / t_new / 1e9, 1),
                "old_gflops": round(flops / t_old / 1e9, 1),
            }
            print(row, flush=True)
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": SHAPE, "blas_threads": 1, "runs": rows}, f, indent=1)


if __name__ == "__main__":
    main()
