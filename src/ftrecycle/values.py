"""Range checks of option values, in one place: the CLI's argparse types and the typed configs use them.

A value is checked where it is parsed, so that ``nan``, ``inf``, a negative count or an
absurdly large one is refused with one line naming the option before anything is read or
written. Each bound is data (:class:`Bound`); the caps on counts are documented here:

- ``MAX_THREADS`` worker threads, ``MAX_COUNT`` items or steps, ``MAX_TOKENS`` generated
  tokens (the model's own context length is checked again once it is loaded);
- seeds are 32-bit unsigned integers (what NumPy's and PyTorch's seeding accept everywhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ftrecycle.errors import ConfigError

MAX_THREADS = 1024
MAX_COUNT = 2**31 - 1
MAX_TOKENS = 131072
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Bound:
    """An int or float option's allowed range.

    Attributes:
        kind: ``int`` or ``float``.
        lo: smallest allowed value (``None``: no lower bound).
        hi: largest allowed value (``None``: no upper bound; floats must still be finite).
        lo_open: ``lo`` itself is refused (``x > lo``).
        hi_open: ``hi`` itself is refused (``x < hi``).
        also: values allowed outside the range (``-1`` for "unset").
    """

    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple[float, ...] = ()

    def describe(self) -> str:
        """The range in words, for messages and help."""
        what = "an integer" if self.kind is int else "a finite number"

        def num(x: float) -> str:
            return str(int(x)) if self.kind is int else f"{x:g}"

        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {num(self.lo)}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {num(self.hi)}")
        text = what + (" " + " and ".join(parts) if parts else "")
        if self.also:
            text += " (or " + ", ".join(num(a) for a in self.also) + ")"
        return text

    def check(self, value: object, name: str) -> int | float:
        """``value`` (already a number, or text) as ``kind``, within the range.

        Raises:
            ConfigError: not a number of the kind, not finite, or out of range; names ``name``.
        """
        got = value
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be {self.describe()}, got {value!r}")
        if isinstance(value, str):
            try:
                got = int(value.strip(), 10) if self.kind is int else float(value)
            except ValueError:
                raise ConfigError(f"{name} must be {self.describe()}, got {value!r}") from None
        if self.kind is int:
            if isinstance(got, float) and math.isfinite(got) and got.is_integer():
                got = int(got)
            if not isinstance(got, int):
                raise ConfigError(f"{name} must be {self.describe()}, got {value!r}")
        else:
            if not isinstance(got, int | float):
                raise ConfigError(f"{name} must be {self.describe()}, got {value!r}")
            got = float(got)
            if not math.isfinite(got):
                raise ConfigError(f"{name} must be {self.describe()}, got {value!r}")
        if got in self.also:
            return got
        too_low = self.lo is not None and (got <= self.lo if self.lo_open else got < self.lo)
        too_high = self.hi is not None and (got >= self.hi if self.hi_open else got > self.hi)
        if too_low or too_high:
            raise ConfigError(f"{name} must be {self.describe()}, got {value!r}")
        return got


POSITIVE_INT = Bound(int, lo=1, hi=MAX_COUNT)
NONNEGATIVE_INT = Bound(int, lo=0, hi=MAX_COUNT)
THREADS = Bound(int, lo=1, hi=MAX_THREADS)
TOKENS = Bound(int, lo=1, hi=MAX_TOKENS)
SEED = Bound(int, lo=0, hi=MAX_SEED)
FINITE = Bound(float)
POSITIVE_FLOAT = Bound(float, lo=0, lo_open=True)
NONNEGATIVE_FLOAT = Bound(float, lo=0)
FRACTION = Bound(float, lo=0, hi=1, hi_open=True)
