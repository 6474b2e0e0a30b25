"""An independent float32 reference for ``cast_bf16(C + alpha * (B - A))``, in NumPy with bit-level rounding.

It shares no code with ftrecycle's engine: bf16 is widened by shifting its bits
into the top half of a float32, the arithmetic is NumPy float32 (one rounding per
operation), and the narrowing rounds to nearest-even on the integer bits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import safe_open


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bf16 bits (uint16) to float32 exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 bits, nearest-even (finite inputs; NaN kept as a quiet NaN)."""
    b = x.view(np.uint32)
    rounded = ((b + np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((b[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def _ulps(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """|got - ref| in bf16 spacings at the larger magnitude of the two (0 where the bits agree)."""
    r, g = bf16_bits_to_f32(ref), bf16_bits_to_f32(got)
    spacing = np.spacing(np.maximum(np.abs(r), np.abs(g))) * np.float32(65536)  # f32 has 16 more mantissa bits
    spacing = np.maximum(spacing, np.float32(2.0**-133))  # bf16's smallest subnormal step
    return np.where(ref == got, 0.0, np.abs(g - r) / spacing)


def _tensors(model: Path) -> dict[str, tuple[Path, str]]:
    out = {}
    for f in sorted(model.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                out[k] = (f, k)
    return out


def _bits(loc: tuple[Path, str]) -> np.ndarray:
    import torch

    with safe_open(loc[0], framework="pt") as h:
        t = h.get_tensor(loc[1])
    assert t.dtype == torch.bfloat16, f"{loc}: reference handles bf16 only, got {t.dtype}"
    return t.view(torch.int16).numpy().view(np.uint16).reshape(-1)


def compare(a: Path, b: Path, c: Path, out: Path, *, alpha: float = 1.0, rows: int = 1 << 22) -> dict[str, float]:
    """Compare every tensor of ``out`` with the reference; return mismatch counts and the largest ulp gap."""
    ta, tb, tc, to = _tensors(a), _tensors(b), _tensors(c), _tensors(out)
    mismatched = 0
    total = 0
    max_ulp = 0.0
    sum_ulp = 0.0
    al = np.float32(alpha)
    missing = sorted(set(tc) - set(to))
    for name in tc:
        if name not in to:
            continue
        xa, xb, xc, xo = (_bits(t[name]) for t in (ta, tb, tc, to))
        for s in range(0, xc.size, rows):
            d = bf16_bits_to_f32(xb[s : s + rows]) - bf16_bits_to_f32(xa[s : s + rows])
            if alpha != 1.0:
                d = d * al
            ref = f32_to_bf16_bits(bf16_bits_to_f32(xc[s : s + rows]) + d)
            got = xo[s : s + rows]
            diff = _ulps(ref, got)
            mismatched += int((diff != 0).sum())
            sum_ulp += float(diff.sum())
            max_ulp = max(max_ulp, float(diff.max()) if diff.size else 0.0)
            total += ref.size
    return {
        "elements": total,
        "mismatched": mismatched,
        "max_ulp": round(max_ulp, 2),
        "mean_ulp_of_mismatched": round(sum_ulp / mismatched, 2) if mismatched else 0.0,
        "missing_tensors": len(missing),
    }
