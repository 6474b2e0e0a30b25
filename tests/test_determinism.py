"""Compressed deltas decode to the same bits whatever the work split, thread count and BLAS kernel.

``scripts/test.sh`` runs this module a second time under another OpenBLAS kernel
(``OPENBLAS_CORETYPE``), so an assertion that held only for one kernel's summation order fails there.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ftrecycle import pipeline as settings
from ftrecycle.codecs import decode, lowrank
from ftrecycle.delta.store import open_delta
from ftrecycle.ops.apply import apply_delta
from ftrecycle.ops.diff import diff
from ftrecycle.terms import PackedTerm
from test_lowrank_decode import integer_product

from conftest import bits, load_dir

SPECS = ["lowrank:rank=5", "lowrank:energy=0.7", "sparse:density=0.2", "int8", "sign"]


@pytest.fixture(scope="module")
def deltas(versions, tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    v = versions["llama"]
    out = {}
    for i, spec in enumerate(SPECS):
        out[spec] = diff(str(v["source_base"]), str(v["source_finetuned"]), root / str(i), compress=spec).output
    return out


def _exact_rounded_once(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` summed exactly in Python integers, then rounded once to float32."""
    n_int, e = integer_product(a.astype(np.float64), b.astype(np.float64))
    # float() of a Python int rounds correctly; then to float32 the second rounding is the only one
    # where the exact sum is a float64 (exact_sum's claim, checked in test_lowrank_decode)
    return np.array([np.ldexp(float(x), e) for x in n_int.reshape(-1)]).astype(np.float32).reshape(n_int.shape)


def test_lowrank_decode_is_the_exact_sum_rounded_once_for_cuts_inside_rows(deltas):
    rng = np.random.default_rng(1)
    checked = 0
    for spec in ("lowrank:rank=5", "lowrank:energy=0.7"):
        ckpt, _, terms, _ = open_delta(deltas[spec])
        try:
            for term in terms.values():
                p = term.packed if isinstance(term, PackedTerm) else None
                if p is None or p.method != "lowrank":
                    continue
                m, n = term.shape
                a = _widen(ckpt, p.parts["a"])
                b = _widen(ckpt, p.parts["b"])
                # the encoder's factors are on exact_sum's grids: decoding takes the BLAS path
                assert lowrank.factor_plan(p, np.dtype(np.float32), {})[1], (spec, term.name)
                want = _exact_rounded_once(a, b).reshape(-1)
                # cuts that fall inside rows, of sizes from 1 element to several rows
                cuts = np.unique(np.r_[0, rng.integers(1, m * n, 9), n // 2, n + 1, m * n])
                for s, e in itertools.pairwise(cuts):
                    got = decode(p, int(s), int(e - s), np.empty(int(e - s), np.float32), {})
                    assert np.array_equal(got.view(np.int32), want[s:e].view(np.int32)), (spec, term.name, s, e)
                checked += 1
        finally:
            ckpt.close()
    assert checked >= 4


def _widen(ckpt, op) -> np.ndarray:
    raw = np.empty(op.info.nbytes, dtype=np.uint8)
    x = ckpt.read(op.info, 0, math.prod(op.info.shape), raw)
    if op.info.dtype.name == "bfloat16":
        x = (x.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(x, dtype=np.float32).reshape(op.info.shape)


@pytest.mark.parametrize("spec", SPECS)
def test_apply_of_a_compressed_delta_does_not_depend_on_chunk_or_threads(versions, deltas, tmp_path, monkeypatch, spec):
    v = versions["llama"]
    outs = []
    # 999 and 4097 elements per work item split rows of every matrix at odd places; the default does not
    for chunk, threads in ((None, 1), (999, 1), (999, 2), (4097, 2)):
        if chunk is not None:
            monkeypatch.setattr(settings, "chunk_for_budget", lambda *_a, c=chunk: c)
        out = tmp_path / f"o-{chunk}-{threads}"
        apply_delta(deltas[spec], str(v["target_base"]), out, out_dtype="float32", threads=threads)
        outs.append(load_dir(out))
        monkeypatch.undo()
    first = outs[0]
    for other in outs[1:]:
        assert first.keys() == other.keys()
        for k in first:
            diffs = (first[k] != other[k]).sum().item()
            assert torch.equal(bits(first[k]), bits(other[k])), f"{spec} {k}: {diffs} elements differ"


# ---------------------------------------------------------------- the encoders' work split

#: Every stored method, on matrices large enough for the randomized SVD (more than 2^18 elements,
#: the smaller side over twice the sketch), so that the row blocks it reads in are many.
ENCODED = ["lowrank:rank=8", "signlr:rank=8", "mpsvd:ratio=8", "sparse:density=0.1", "kbit:bits=3", "lossless"]


@pytest.fixture(scope="module")
def wide_pair(tmp_path_factory):
    """A one-layer synthetic Llama of hidden 384 and MLP 1024 (matrices of 393,216 elements), and its fine-tune."""
    from fixtures.synthetic import llama_config, llama_layout, write_synthetic

    arch = dict(vocab_size=256, hidden_size=384, intermediate_size=1024, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    root = tmp_path_factory.mktemp("wide")
    out = {}
    for role, noise in (("base", []), ("finetuned", [(1, 1e-3)])):
        out[role] = write_synthetic(root / role, llama_layout(**arch), llama_config(**arch), noise=noise)
    return out


@pytest.mark.parametrize("spec", ENCODED)
def test_a_compressed_diff_does_not_depend_on_the_engine_chunk_or_threads(wide_pair, tmp_path, monkeypatch, spec):
    """The engine's chunk follows --max-memory and --threads; the encoders' row blocks must not."""
    assert lowrank.exact(1024, 384, 18) is False  # the randomized SVD, read in row blocks
    stored = set()
    for chunk, threads in ((None, 2), (4096, 1), (70000, 2)):
        if chunk is not None:
            monkeypatch.setattr(settings, "chunk_for_budget", lambda *_a, c=chunk: c)
        out = tmp_path / f"d-{chunk}-{threads}"
        diff(str(wide_pair["base"]), str(wide_pair["finetuned"]), out, compress=spec, threads=threads)
        stored.add(b"".join(f.read_bytes() for f in sorted(out.glob("delta*.safetensors"))))
    assert len(stored) == 1
