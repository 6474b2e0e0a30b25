"""Shared fixtures: tiny models of three families, made once per test session."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from fixtures.tiny import FAMILIES, make_versions


@pytest.fixture(scope="session")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """family -> {source_base, source_finetuned, target_base} directories (bf16, sharded)."""
    root = tmp_path_factory.mktemp("versions")
    return {fam: make_versions(fam, root / fam, seed=i) for i, fam in enumerate(FAMILIES)}


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's safetensors files."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, so that equality is bit for bit (and NaN == NaN)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def reference(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: float, compute: torch.dtype, out: torch.dtype
) -> torch.Tensor:
    """cast(fl(C) + fl(alpha * fl(B - A))) on whole tensors, one rounding per operation."""
    d = b.to(compute) - a.to(compute)
    if alpha != 1.0:
        d = d * torch.tensor(alpha, dtype=compute)
    return (c.to(compute) + d).to(out)


def tree_digest(*paths: Path) -> str:
    """A hash of every file (names and bytes) under the given directories."""
    h = hashlib.sha256()
    for root in paths:
        for f in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            h.update(str(f).encode())
            h.update(f.read_bytes())
    return h.hexdigest()
