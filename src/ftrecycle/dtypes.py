"""Tensor dtypes as safetensors, NumPy and users name them — without importing torch.

The transfer path runs on NumPy alone: importing torch costs about a second per
command, a third of a 1B-model transfer. bfloat16 and float8 have no NumPy dtype,
so every tensor is held as its *storage* dtype (bfloat16 as uint16 bits) and
widened or narrowed by the engine.

bfloat16 conversions live here and nowhere else (:func:`bf16_to_float32`,
:func:`float32_to_bf16`, and :func:`to_storage`/:func:`from_storage` for any dtype):
the engine, the codecs, the delta checksums and the adapter reader all call them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ftrecycle.errors import ConfigError


@dataclass(frozen=True)
class DType:
    """One tensor dtype.

    Attributes:
        name: the torch-style name (``bfloat16``).
        code: the safetensors header code (``BF16``).
        itemsize: bytes per element.
        is_floating: a floating-point type.
        storage: the NumPy dtype its bytes are held in (bfloat16 -> uint16).
        exponent_mask: for floats, the bits that are all set in an infinity or NaN.
    """

    name: str
    code: str
    itemsize: int
    is_floating: bool
    storage: np.dtype[Any]
    exponent_mask: int = 0

    @property
    def bits(self) -> np.dtype[Any]:
        """The unsigned integer dtype of the same size."""
        return np.dtype(f"u{self.itemsize}")

    @property
    def abs_mask(self) -> int:
        """All bits but the sign."""
        return (1 << (8 * self.itemsize - 1)) - 1

    @property
    def arithmetic(self) -> bool:
        """Whether the engine computes with it (float8 needs scales it does not have)."""
        return self.is_floating and self.itemsize >= 2

    def __str__(self) -> str:
        return self.name


F64 = DType("float64", "F64", 8, True, np.dtype(np.float64), 0x7FF0_0000_0000_0000)
F32 = DType("float32", "F32", 4, True, np.dtype(np.float32), 0x7F80_0000)
F16 = DType("float16", "F16", 2, True, np.dtype(np.float16), 0x7C00)
BF16 = DType("bfloat16", "BF16", 2, True, np.dtype(np.uint16), 0x7F80)
F8_E4M3 = DType("float8_e4m3fn", "F8_E4M3", 1, True, np.dtype(np.uint8))
F8_E5M2 = DType("float8_e5m2", "F8_E5M2", 1, True, np.dtype(np.uint8))
I64 = DType("int64", "I64", 8, False, np.dtype(np.int64))
I32 = DType("int32", "I32", 4, False, np.dtype(np.int32))
I16 = DType("int16", "I16", 2, False, np.dtype(np.int16))
I8 = DType("int8", "I8", 1, False, np.dtype(np.int8))
U16 = DType("uint16", "U16", 2, False, np.dtype(np.uint16))
U8 = DType("uint8", "U8", 1, False, np.dtype(np.uint8))
BOOL = DType("bool", "BOOL", 1, False, np.dtype(np.bool_))

ALL = (F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I16, I8, U16, U8, BOOL)
BY_CODE: dict[str, DType] = {d.code: d for d in ALL}
BY_NAME: dict[str, DType] = {d.name: d for d in ALL}
#: The float dtypes the engine computes with (float8 is left out: it needs scales); a delta stores its
#: dense diffs and its compressed tensors' float parts in one of them.
FLOAT_DTYPES = frozenset(d for d in ALL if d.arithmetic)

#: user-facing names accepted by ``--out-dtype`` and ``--delta-dtype``; ``--compute-dtype`` takes the first two.
USER_DTYPES = ("float32", "float64", "bfloat16", "float16")
COMPUTE_DTYPES = ("float32", "float64")


def parse_dtype(name: str, *, allowed: tuple[str, ...] = USER_DTYPES, flag: str = "dtype") -> DType:
    """Turn a user dtype name into a :class:`DType`.

    Raises:
        ConfigError: the name is not one of ``allowed``.
    """
    if name not in allowed:
        raise ConfigError(f"{flag} {name!r} is not supported: choose one of {', '.join(allowed)}")
    return BY_NAME[name]


def from_torch(dtype: Any) -> DType:
    """The :class:`DType` of a torch dtype (``torch.bfloat16`` -> :data:`BF16`)."""
    name = str(dtype).removeprefix("torch.")
    if name not in BY_NAME:
        raise ConfigError(f"tensor dtype {name} is not supported")
    return BY_NAME[name]


#: The bfloat16 a NaN narrows to: the canonical quiet NaN (torch's scalar conversion writes it too).
BF16_NAN = 0x7FC0
#: Elements converted at a time by :func:`to_storage`/:func:`from_storage` (bounds their temporaries).
CONVERT_BLOCK = 1 << 20


def bf16_to_float32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Widen bfloat16 values, held as uint16 bits, to float32 — exactly.

    A bfloat16 is the top half of a float32, so widening is a shift; every value (NaN
    payloads included) comes out unchanged.

    Args:
        bits: bfloat16 bits (any integer dtype holding them; uint16 as stored).
        out: a contiguous float32 array of the same size to write into (a new one if None).

    Returns:
        ``out``.
    """
    if out is None:
        out = np.empty(bits.shape, dtype=np.float32)
    wide = out.view(np.uint32)
    np.copyto(wide, bits, casting="unsafe")
    np.left_shift(wide, 16, out=wide)
    return out


def float32_to_bf16(x: np.ndarray, out: np.ndarray | None = None, scratch: np.ndarray | None = None) -> np.ndarray:
    """Round float32 values to bfloat16 bits (uint16): to nearest, ties to even.

    Overflow rounds to infinity, as IEEE-754 and torch do. A NaN becomes :data:`BF16_NAN`,
    a quiet NaN: the rounding bit trick alone would turn a NaN whose payload sits in the
    low half into infinity, or (carrying out of the top bit) into a zero.

    Args:
        x: contiguous float32 values.
        out: a uint16 array of the same size to write into (a new one if None).
        scratch: a uint32 array of the same size for the intermediate (a new one if None).

    Returns:
        ``out``.
    """
    bits = x.view(np.uint32)
    t = np.empty(x.shape, dtype=np.uint32) if scratch is None else scratch
    np.right_shift(bits, 16, out=t)
    np.bitwise_and(t, 1, out=t)
    np.add(t, 0x7FFF, out=t)
    np.add(t, bits, out=t)  # + 0x7FFF + lowest kept bit: ties go to even
    np.right_shift(t, 16, out=t)
    if out is None:
        out = np.empty(x.shape, dtype=np.uint16)
    np.copyto(out, t, casting="unsafe")
    if x.size and np.isnan(np.max(x)):  # max propagates NaN: one pass, no mask unless there is one
        out[np.isnan(x)] = BF16_NAN
    return out


def to_storage(x: np.ndarray, dtype: DType) -> np.ndarray:
    """Round float values to ``dtype``'s storage form (bfloat16: :func:`float32_to_bf16` bits).

    Float64 values go to bfloat16 through float32, as torch's conversion does.
    """
    if dtype is not BF16:
        return np.ascontiguousarray(x, dtype=dtype.storage)
    out = np.empty(x.shape, dtype=np.uint16)
    flat_in, flat_out = x.reshape(-1), out.reshape(-1)
    for s in range(0, flat_in.size, CONVERT_BLOCK):
        block = np.ascontiguousarray(flat_in[s : s + CONVERT_BLOCK], dtype=np.float32)
        float32_to_bf16(block, out=flat_out[s : s + CONVERT_BLOCK])
    return out


def from_storage(x: np.ndarray, dtype: DType, ct: np.dtype[Any]) -> np.ndarray:
    """Widen storage values of ``dtype`` to ``ct`` (float32 or float64), exactly."""
    if dtype is not BF16:
        return x.astype(ct)
    out = np.empty(x.shape, dtype=ct)
    flat_in, flat_out = x.reshape(-1), out.reshape(-1)
    for s in range(0, flat_in.size, CONVERT_BLOCK):
        flat_out[s : s + CONVERT_BLOCK] = bf16_to_float32(flat_in[s : s + CONVERT_BLOCK])
    return out
