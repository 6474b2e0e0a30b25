"""The one bfloat16 conversion: nearest-even like torch, NaN always a quiet NaN."""

from __future__ import annotations

import numpy as np
import torch

from ftrecycle.dtypes import BF16, BF16_NAN, bf16_to_float32, float32_to_bf16, from_storage, to_storage


def test_bf16_rounding_matches_torch_on_finite_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, generator=g) * torch.logspace(-30, 30, 20_000)
    x = torch.cat([x, torch.tensor([0.0, -0.0, 3.3961e38, -3.3961e38, 1 + 2**-8, 1 + 3 * 2**-8, float("inf")])])
    got = float32_to_bf16(x.numpy())
    want = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(got, want), f"{int((got != want).sum())} differ"
    assert np.array_equal(to_storage(x.numpy().astype(np.float64), BF16), want)


def test_every_nan_stays_a_quiet_nan():
    # payloads in the low half only (the bit trick alone gives infinity), and all ones (it carries into a zero)
    patterns = np.array([0x7F800001, 0x7F807FFF, 0x7FFFFFFF, 0xFFFFFFFF, 0xFF800001, 0x7FC00000], dtype=np.uint32)
    got = float32_to_bf16(patterns.view(np.float32))
    assert (got == BF16_NAN).all(), [hex(v) for v in got]
    assert np.isnan(bf16_to_float32(got)).all()


def test_widening_is_exact_and_keeps_every_bit():
    bits = np.arange(1 << 16, dtype=np.uint16)
    wide = bf16_to_float32(bits)
    assert np.array_equal(wide.view(np.uint32) >> 16, bits.astype(np.uint32))
    assert np.array_equal(from_storage(bits, BF16, np.dtype(np.float64)), wide.astype(np.float64), equal_nan=True)
