"""Names of tensor dtypes as users, safetensors and torch spell them."""

from __future__ import annotations

import torch

from ftrecycle.errors import ConfigError

#: safetensors header dtype code -> torch dtype.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

#: user-facing names accepted by ``--compute-dtype``, ``--out-dtype``, ``--delta-dtype``.
USER_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
COMPUTE_DTYPES = ("float32", "float64")


def parse_dtype(name: str, *, allowed: tuple[str, ...] = tuple(USER_DTYPES), flag: str = "dtype") -> torch.dtype:
    """Turn a user dtype name into a torch dtype.

    Args:
        name: one of ``allowed`` (``float32``, ``bfloat16``...).
        allowed: the names accepted here.
        flag: the option's name, quoted in the error.

    Returns:
        The torch dtype.

    Raises:
        ConfigError: the name is not one of ``allowed``.
    """
    if name not in allowed or name not in USER_DTYPES:
        raise ConfigError(f"{flag} {name!r} is not supported: choose one of {', '.join(allowed)}")
    return USER_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a torch dtype (``torch.bfloat16`` -> ``bfloat16``)."""
    return str(dtype).removeprefix("torch.")
