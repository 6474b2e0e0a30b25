"""``auto``: a size budget, not a method — each 2-D tensor gets the setting (method and parameters)
that spends the delta's bytes where they remove the most error.

``auto:ratio=R`` caps the stored bytes of the 2-D tensors at ``sum_t dense_t / R``, where
``dense_t = m_t * n_t * itemsize`` in the delta's dtype; ``auto:bits=B`` caps them at
``B / 8`` bytes per element of the 2-D tensors on average. Counted: the bytes of every 2-D
tensor's stored parts (or its dense values, when it stays dense) — not the 1-D tensors (always
dense), the safetensors headers or the manifest, so the file-level ratio the manifest records is
slightly below ``R``.

Rate–distortion allocation: each tensor ``t`` has candidates ``c`` (the settings of :data:`MENU`
whose codec is registered, and dense at error 0) with stored bytes ``b_tc`` and squared error
``e_tc = ||D_t - decoded_tc||_F^2`` (absolute); the allocation minimises ``sum_t w_t * e_t``
subject to ``sum_t b_t <= budget`` by the Lagrangian method (Shoham & Gersho, "Efficient bit
allocation for an arbitrary set of quantizers", IEEE TASSP 1988; Everett 1963): for a multiplier
``lambda`` every tensor picks ``argmin_c w_t * e_tc + lambda * b_tc``, and the largest total size
within the budget is the answer. :func:`allocate` finds it exactly rather than by bisecting
``lambda``: the choices as ``lambda`` falls are the points of each tensor's lower convex hull in
the (bytes, weighted error) plane, taken segment by segment in the order of their slopes (error
removed per byte), so the walk stops at the same solution a bisection converges to, without its
tolerance. What the last segment leaves unspent is then spent greedily (the upgrade removing the
most weighted error per byte that still fits, repeatedly). A Lagrangian solution is optimal for
its own size; the greedy step only lowers the error; the result never gets worse as the budget
grows (every upgrade the greedy step can take removes at most the next hull slope per byte).
Ties are broken by a fixed order (tensor order, then candidate order), so the allocation is
deterministic.

The errors are estimates: each candidate is really encoded (its codec's ``encode``, the parts
discarded, the error measured against the rounded parts), but on a deterministic sample of
evenly spaced row blocks (the whole tensor when it has at most :data:`SAMPLE_ELEMENTS`
elements), its squared error scaled by ``m / m_sample``. A setting whose structure follows the
shape with no parameter to fix it on a sample (``mpsvd``: its vector count and packed row width)
is measured only on tensors measured whole (up to :data:`LOWRANK_SAMPLE_ELEMENTS` elements).
For low-rank candidates the estimate is biased low (optimistic): the best rank-``r`` fit of
``m_sample`` rows leaves less of them than the rank-``r`` fit of all ``m`` rows leaves of the same
rows, and the gap grows as ``r`` nears ``m_sample`` (at ``r >= m_sample`` the sample is
reproduced exactly). So a low-rank candidate is only measured on a sample of at least
:data:`LOWRANK_ROWS` times its rank rows (up to :data:`LOWRANK_SAMPLE_ELEMENTS` elements) and
left out of a tensor's menu where that does not fit; at 4 rows per unit of rank, on an
8192 x 2048 Gaussian diff, the estimate of ``lowrank:ratio=16`` (rank 102, 408 rows) was 0.69 of
the real squared error, that of ``lowrank:ratio=64`` (rank 25) 0.92, while ``int8``, ``sign`` and
``sparse`` were within 2%. The manifest records each tensor's real error, measured while it is
encoded, and the setting chosen for it.

Weights (``--weights FILE``): a JSON object ``{"tensor name": weight, ...}`` of non-negative
finite numbers, a per-tensor sensitivity such as a diagonal-Fisher mean squared gradient; with a
file, every 2-D tensor of the diff must have a weight (a missing one is an error, not a silent
1: the weights of a file are on the file's own scale), names of 1-D tensors and of tied aliases
are accepted and unused, and any other name is an error (the file is for another model).
Without a file every weight is 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ftrecycle.codecs.base import Compression, PartSpec
from ftrecycle.errors import ConfigError

#: the ``--compress`` name of the budgeted mode
AUTO = "auto"
#: its parameters (exactly one)
PARAMS = ("ratio", "bits")

_RATIOS = (2, 4, 8, 16, 32, 64)
#: Low-rank ratios measured: the higher ranks (ratios 2-8) cost the most SVD time and no allocation chose
#: them (the lab's five budgets, two seeds; the 1B-layout bench), where ``mpsvd`` and ``kbit`` do better.
_LOWRANK_RATIOS = (16, 32, 64)

#: The settings ``auto`` chooses from, before filtering to the registered codecs and the parameters
#: they take (:func:`available`): codecs merged later are picked up by name. Not here: ``lossless``
#: (its size is known only after a whole pass) and ``signlr``, whose SVD-then-sign encoder took 55 % of
#: ``auto:ratio=8``'s time on the 1B layout (py-spy) and which no allocation chose, in the lab or the
#: bench; it stays available on its own (``--compress signlr:...``).
MENU: tuple[str, ...] = (
    "int8",
    "sign",
    "sign:axis=row",
    *(f"kbit:bits={b},group=64" for b in (2, 3, 4)),
    *(f"mpsvd:bits={b}" for b in (1, 2, 4)),
    *(f"lowrank:ratio={x}" for x in _LOWRANK_RATIOS),
    *(f"sparse:ratio={x}" for x in _RATIOS),
)

#: a tensor of at most this many elements is measured whole; a larger one on this many (about) ...
SAMPLE_ELEMENTS = 1 << 18
#: ... and a low-rank candidate on at least this many rows per unit of rank ...
LOWRANK_ROWS = 4
#: ... within this many elements (else it is left out of that tensor's menu).
LOWRANK_SAMPLE_ELEMENTS = 1 << 21
#: evenly spaced row blocks a sample is made of
SAMPLE_BLOCKS = 16
#: the largest weights file read
MAX_WEIGHTS_BYTES = 16 << 20


def available(text: str, allowed: Mapping[str, tuple[str, ...]]) -> bool:
    """Whether a menu entry's method is registered and takes every parameter the entry gives.

    Args:
        text: a spec of :data:`MENU`.
        allowed: registered method -> the parameters it takes.

    Returns:
        True when the entry can be parsed by this build.
    """
    method, _, rest = text.partition(":")
    keys = [item.partition("=")[0] for item in filter(None, rest.split(","))]
    return method in allowed and all(k in allowed[method] for k in keys)


def budget_bytes(spec: Compression, shapes: Sequence[tuple[int, int]], itemsize: int) -> int:
    """The bytes the 2-D tensors may take under ``auto:ratio=R`` or ``auto:bits=B``.

    Args:
        spec: the ``auto`` setting.
        shapes: the 2-D tensors' shapes.
        itemsize: bytes of one element of the delta's dtype.

    Returns:
        ``floor(sum dense / R)`` or ``floor(B * elements / 8)``.

    Raises:
        ConfigError: ``spec`` is not an ``auto`` setting with ``ratio`` or ``bits``.
    """
    elements = sum(m * n for m, n in shapes)
    if spec.method == AUTO and spec.ratio is not None:
        return math.floor(elements * itemsize / spec.ratio)
    if spec.method == AUTO and spec.bits is not None:
        return math.floor(spec.bits * elements / 8)
    raise ConfigError(f"--compress {spec}: a budget is auto:ratio=R or auto:bits=B")


def sample_rows(m: int, n: int, ranks: Sequence[int], whole: bool = False) -> int:
    """Rows of the sample an (m, n) tensor is measured on: all of them when it is small (or, with
    ``whole``, when it fits :data:`LOWRANK_SAMPLE_ELEMENTS`), else about :data:`SAMPLE_ELEMENTS`,
    raised to :data:`LOWRANK_ROWS` times the largest rank that fits :data:`LOWRANK_SAMPLE_ELEMENTS`."""
    if m * n <= SAMPLE_ELEMENTS or (whole and m * n <= LOWRANK_SAMPLE_ELEMENTS):
        return m
    rows = max(1, SAMPLE_ELEMENTS // n)
    cap = max(rows, LOWRANK_SAMPLE_ELEMENTS // n)
    for r in ranks:
        if LOWRANK_ROWS * r <= cap:
            rows = max(rows, LOWRANK_ROWS * r)
    return min(m, rows)


def sample_blocks(m: int, rows: int) -> list[tuple[int, int]]:
    """Row ranges ``[r0, r1)``, evenly spaced over ``m`` rows, holding ``rows`` rows in all.

    :data:`SAMPLE_BLOCKS` blocks (fewer when ``rows`` is smaller) of equal size (within one row),
    the first starting at row 0 and the last ending at row ``m``, the rows left out spread evenly
    between them: a sample reads a few contiguous stretches, from the top to the bottom of the matrix.
    """
    if rows >= m:
        return [(0, m)]
    count = max(1, min(SAMPLE_BLOCKS, rows))
    out, taken = [], 0
    for i in range(count):
        size = rows // count + (1 if i < rows % count else 0)
        gap = (i * (m - rows)) // (count - 1) if count > 1 else 0
        out.append((taken + gap, taken + gap + size))
        taken += size
    return out


def on_sample(spec: Compression, parts: dict[str, PartSpec], m: int, n: int) -> Compression | None:
    """The setting that encodes a row sample as ``spec`` encodes the whole (m, n) tensor, or None
    where no spec says so (the tensor is then measured whole or not at all).

    A ratio spec sizes its parts by the matrix shape, so a sample would get another rank or entry
    count; it becomes the rank (part ``a``'s columns) or the density (``values``' entries over
    ``m * n``) the whole tensor gets. A mixed-precision SVD (``widths``: one per singular vector)
    fits its vector count and packed row width to the shape, which no spec parameter fixes. Other
    settings (bits, groups, fixed ranks) are per element.
    """
    if "widths" in parts:
        return None
    if spec.ratio is None:
        return spec
    if "a" in parts and len(parts["a"][1]) == 2:
        return replace(spec, ratio=None, rank=parts["a"][1][1])
    if "values" in parts:
        return replace(spec, ratio=None, density=parts["values"][1][0] / (m * n))
    return spec


def rank_of(parts: dict[str, PartSpec]) -> int | None:
    """The rank of a layout's low-rank part: ``a`` (m, r), or the singular vectors of a
    mixed-precision SVD (``widths`` (r,)); None for other layouts."""
    a = parts.get("a")
    if a is not None and len(a[1]) == 2:
        return a[1][1]
    widths = parts.get("widths")
    return widths[1][0] if widths is not None and len(widths[1]) == 1 else None


def _finite(w: float) -> bool:
    """Whether ``w`` is a finite float (a JSON integer beyond float range is not: 400 digits)."""
    try:
        return math.isfinite(float(w))
    except OverflowError:
        return False


def check_weights(raw: Any, matrices: Sequence[str], others: Sequence[str], source: str) -> dict[str, float]:
    """A parsed weights file as tensor name -> weight, every 2-D tensor given one.

    Args:
        raw: the parsed JSON value.
        matrices: the diff's 2-D tensors (each must have a weight).
        others: other names the file may give and that are unused (1-D tensors, tied aliases).
        source: the file, for messages.

    Returns:
        The weight of each 2-D tensor.

    Raises:
        ConfigError: not an object, a weight that is not a non-negative finite number, a name the
            diff does not have, or a 2-D tensor without a weight.
    """
    fix = "give a JSON object of tensor name -> non-negative number, one per 2-D tensor of the diff"
    if not isinstance(raw, dict):
        raise ConfigError(f"--weights {source}: not a JSON object; {fix}")
    known = set(matrices) | set(others)
    unknown = sorted(k for k in raw if k not in known)
    if unknown:
        shown = ", ".join(repr(k[:80]) for k in unknown[:5])
        raise ConfigError(f"--weights {source}: {len(unknown)} name(s) the diff does not have: {shown}; {fix}")
    for name, w in raw.items():
        ok = isinstance(w, int | float) and not isinstance(w, bool) and _finite(w) and w >= 0
        if not ok:
            raise ConfigError(f"--weights {source}: the weight of {name[:80]!r} is {str(w)[:40]}; {fix}")
    missing = [k for k in matrices if k not in raw]
    if missing:
        shown = ", ".join(repr(k[:80]) for k in missing[:5])
        raise ConfigError(f"--weights {source}: {len(missing)} 2-D tensor(s) without a weight: {shown}; {fix}")
    return {k: float(raw[k]) for k in matrices}


# ------------------------------------------------------------------------------------- allocation


@dataclass(frozen=True)
class Candidate:
    """One setting of one tensor, as the allocation sees it.

    Attributes:
        spec: the setting (None: dense).
        nbytes: the bytes it stores.
        error: its squared error ``||D - decoded||_F^2`` (an estimate), >= 0.
    """

    spec: Compression | None
    nbytes: int
    error: float


def _hull(cands: Sequence[Candidate], weight: float) -> list[int]:
    """Indexes of the lower convex hull of (bytes, weight * error), from the fewest bytes on,
    the error strictly falling (collinear points kept: each is a step the walk can stop at)."""
    order = sorted(range(len(cands)), key=lambda i: (cands[i].nbytes, cands[i].error, i))
    pareto: list[int] = []
    for i in order:
        if not pareto or (cands[i].error < cands[pareto[-1]].error and cands[i].nbytes > cands[pareto[-1]].nbytes):
            pareto.append(i)
    hull: list[int] = []
    for i in pareto:
        while len(hull) >= 2:
            a, b = cands[hull[-2]], cands[hull[-1]]
            c = cands[i]
            # b lies above the line from a to c: it is no Lagrangian choice
            cross = (b.nbytes - a.nbytes) * (c.error - a.error) - (b.error - a.error) * (c.nbytes - a.nbytes)
            if weight * cross < 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _slope(a: Candidate, b: Candidate, weight: float) -> float:
    return weight * (a.error - b.error) / (b.nbytes - a.nbytes)


def allocate(table: Sequence[Sequence[Candidate]], weights: Sequence[float], budget: int) -> list[int]:
    """The candidate of each tensor minimising ``sum_t w_t * error_t`` within ``budget`` bytes.

    Args:
        table: each tensor's candidates (non-empty; dense among them, as the allocation assumes
            nothing about which is which).
        weights: each tensor's weight, >= 0.
        budget: the bytes all tensors may take.

    Returns:
        The index of the chosen candidate of each tensor.

    Raises:
        ConfigError: even the smallest candidate of every tensor exceeds the budget.
    """
    hulls = [_hull(c, w) for c, w in zip(table, weights, strict=True)]
    pick = [h[0] for h in hulls]
    size = sum(c[p].nbytes for c, p in zip(table, pick, strict=True))
    if size > budget:
        raise ConfigError(
            f"the budget of {budget} bytes is below the {size} bytes the smallest settings take; "
            "ask a smaller ratio or more bits"
        )
    # the hull segments by falling slope (error removed per byte), ties in tensor then segment order
    segments = sorted(
        (-_slope(table[t][h[k]], table[t][h[k + 1]], weights[t]), t, k)
        for t, h in enumerate(hulls)
        for k in range(len(h) - 1)
    )
    for neg, t, k in segments:
        if neg >= 0:  # no error left to remove at any price (weight 0): keep the bytes
            break
        extra = table[t][hulls[t][k + 1]].nbytes - table[t][hulls[t][k]].nbytes
        if size + extra > budget:
            break
        pick[t] = hulls[t][k + 1]
        size += extra
    return _spend(table, weights, pick, budget - size)


def _spend(table: Sequence[Sequence[Candidate]], weights: Sequence[float], pick: list[int], left: int) -> list[int]:
    """``pick`` upgraded greedily: the move removing the most weighted error per byte that fits
    ``left``, again until none does."""
    while True:
        moves = []
        for t, cands in enumerate(table):
            now = cands[pick[t]]
            for i, c in enumerate(cands):
                extra = c.nbytes - now.nbytes
                if c.error < now.error and extra <= left and weights[t] > 0:
                    gain = weights[t] * (now.error - c.error)
                    # a move that frees bytes too is taken first (its "slope" is unbounded)
                    moves.append((-(gain / extra) if extra > 0 else -math.inf, -gain, t, i))
        if not moves:
            return pick
        _, _, t, i = min(moves)
        left -= table[t][i].nbytes - table[t][pick[t]].nbytes
        pick[t] = i


def objective(table: Sequence[Sequence[Candidate]], weights: Sequence[float], pick: Sequence[int]) -> float:
    """``sum_t w_t * error_t`` of a choice."""
    return sum(w * c[p].error for c, w, p in zip(table, weights, pick, strict=True))
