"""Parameter-space geometry of a transfer, streamed tensor by tensor in bounded memory.

For a source base A, its fine-tune B and a target base C (drift D = C − A, diff Δ = B − A),
per tensor and summed over groups (layer; module type):

* relative drift ‖D‖ / ‖A‖ and relative diff size ‖Δ‖ / ‖A‖;
* cos(Δ, D), the alignment of the fine-tuning update with the version drift;
* sign agreement, the share of elements where Δ and D (both non-zero) have the same sign.

The paper (§3) finds transfers help when source and target are close (small drift relative
to the diff) and fail across the stage boundary, where the drift dwarfs the diff.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ftrecycle.arch import LAYER, MODULE_TYPES, check_compatible
from ftrecycle.dtypes import F64
from ftrecycle.engine import Buffers, widen
from ftrecycle.io.checkpoint import Checkpoint, open_checkpoint

CHUNK = 1 << 20  # elements per read; the engine's buffers for it are ~70 MiB in all


def module_type(name: str) -> str:
    """``embeddings``, ``norms``, ``attention``, ``mlp`` or ``other``, from a tensor name."""
    for kind, pattern in MODULE_TYPES:
        if pattern.search(name):
            return kind
    return "other"


def layer_of(name: str) -> str:
    """``layer N`` for a transformer block's tensor, else ``embeddings/head``."""
    m = LAYER.search(name)
    return f"layer {int(m.group(1)):03d}" if m else "embeddings/head"


@dataclass
class Sums:
    """Running float64 sums over elements; merged into group totals."""

    n: int = 0
    a2: float = 0.0
    d2: float = 0.0
    delta2: float = 0.0
    dot: float = 0.0
    signs_equal: int = 0
    signs_counted: int = 0

    def add(self, other: Sums) -> None:
        for k in ("n", "a2", "d2", "delta2", "dot", "signs_equal", "signs_counted"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def summary(self) -> dict[str, Any]:
        """The ratios (None where undefined)."""
        na, nd, ndelta = np.sqrt(self.a2), np.sqrt(self.d2), np.sqrt(self.delta2)
        return {
            "elements": self.n,
            "drift_rel": float(nd / na) if na > 0 else None,
            "delta_rel": float(ndelta / na) if na > 0 else None,
            "drift_over_delta": float(nd / ndelta) if ndelta > 0 else None,
            "cos": float(self.dot / (nd * ndelta)) if nd > 0 and ndelta > 0 else None,
            "sign_agreement": self.signs_equal / self.signs_counted if self.signs_counted else None,
        }


@dataclass
class Geometry:
    """The geometry of one transfer.

    Attributes:
        total: over every compared tensor.
        by_module: by module type.
        by_layer: by transformer block.
        tensors: per tensor.
        skipped: tensors not compared, with the reason.
    """

    total: dict[str, Any]
    by_module: dict[str, dict[str, Any]]
    by_layer: dict[str, dict[str, Any]]
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "total": self.total,
            "by_module": self.by_module,
            "by_layer": self.by_layer,
            "tensors": self.tensors,
            "skipped": self.skipped,
        }


def tensor_sums(cks: tuple[Checkpoint, Checkpoint, Checkpoint], name: str, bufs: Buffers) -> Sums:
    """Sums for one tensor present with one shape in A, B and C (widened to float64 as the engine does)."""
    infos = [ck.tensors[name] for ck in cks]
    total = int(np.prod(infos[0].shape)) if infos[0].shape else 1
    s = Sums()
    for start in range(0, total, CHUNK):
        n = min(CHUNK, total - start)
        a, b, c = (
            widen(ck.read(info, start, n, bufs.raw[0]), info.dtype, f[:n], bufs)
            for ck, info, f in zip(cks, infos, bufs.f, strict=True)
        )
        np.subtract(b, a, out=b)  # Δ
        np.subtract(c, a, out=c)  # drift
        s.n += n
        s.a2 += float(np.dot(a, a))
        s.delta2 += float(np.dot(b, b))
        s.d2 += float(np.dot(c, c))
        s.dot += float(np.dot(b, c))
        sb, sc = np.sign(b), np.sign(c)
        both = (sb != 0) & (sc != 0)
        s.signs_counted += int(both.sum())
        s.signs_equal += int((both & (sb == sc)).sum())
    return s


def geometry(source_base: str, source_finetuned: str, target_base: str, *, per_tensor: bool = False) -> Geometry:
    """Stream the three checkpoints once and measure drift, diff size and alignment.

    Args:
        source_base: A (directory or hub id).
        source_finetuned: B.
        target_base: C.
        per_tensor: also keep every tensor's numbers.

    Returns:
        Totals, by module type, by layer (and per tensor); tensors whose shapes differ (a resized
        vocabulary) or that a model lacks are listed in ``skipped``.

    Raises:
        CheckpointError: an unreadable model.
        IncompatibleModelsError: the architectures differ.
    """
    cks = (open_checkpoint(source_base), open_checkpoint(source_finetuned), open_checkpoint(target_base))
    try:
        check_compatible(
            {"source-base": cks[0].config, "source-finetuned": cks[1].config, "target-base": cks[2].config}
        )
        bufs = Buffers(CHUNK, F64)
        total = Sums()
        by_module: dict[str, Sums] = {}
        by_layer: dict[str, Sums] = {}
        tensors: dict[str, dict[str, Any]] = {}
        skipped: dict[str, str] = {}
        for name, info in sorted(cks[0].tensors.items()):
            others = [ck.tensors.get(name) for ck in cks[1:]]
            if any(o is None for o in others):
                skipped[name] = "missing from the fine-tuned or target model"
                continue
            if any(o.shape != info.shape for o in others if o is not None):
                skipped[name] = f"shapes differ: {[tuple(info.shape)] + [tuple(o.shape) for o in others if o]}"
                continue
            if not info.dtype.arithmetic:
                skipped[name] = f"not floating ({info.dtype})"
                continue
            s = tensor_sums(cks, name, bufs)
            total.add(s)
            by_module.setdefault(module_type(name), Sums()).add(s)
            by_layer.setdefault(layer_of(name), Sums()).add(s)
            if per_tensor:
                tensors[name] = s.summary()
        return Geometry(
            total=total.summary(),
            by_module={k: v.summary() for k, v in sorted(by_module.items())},
            by_layer={k: v.summary() for k, v in sorted(by_layer.items())},
            tensors=tensors,
            skipped=skipped,
        )
    finally:
        for ck in cks:
            ck.close()
