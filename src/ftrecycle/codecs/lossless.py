"""``lossless``: a diff matrix's values stored exactly, byte-plane shuffled and entropy-coded.

Formula: the diff ``D`` is rounded to the delta's dtype (what a dense delta stores; with the
default float32 delta of a bf16 or fp16 pair that rounding is exact) and cut, in row-major order,
into frames of ``F = 2**16`` elements (the last one shorter). Each frame's elements are split into
byte planes (the least significant byte of every element, then the next, ...) and each plane is
compressed as one Zstandard frame (RFC 8878: its content size in the header, no checksum, no
dictionary); a frame's planes are stored one after the other. Element ``(i, j)`` decodes as the
element ``i*n + j - f*F`` of frame ``f = (i*n + j) // F``, its planes decompressed and regrouped:
exactly the value a dense delta would store, so ``apply(diff(A, B), A) == B`` bit for bit wherever
the dense delta gives it.

Parts: ``data`` (nbytes,) uint8, the frames' compressed planes one after the other;
``offsets`` (frames+1,) int64, where frame ``f``'s planes lie in ``data[offsets[f]:offsets[f+1]]``;
``dtype`` (0,), no values: its dtype is the stored values' dtype (and its width the number of
planes). The frame size is read back from the number of offsets and ``m*n`` (the power of two that
cuts ``m*n`` elements into that many frames), so any flat element range decodes by decompressing
only its own frames.

The compressed size is only known after compressing, so a first pass (:func:`resolve`)
compresses every frame and gives the tensor ``Compression("lossless", nbytes=N)``; the encoder
compresses again (Zstandard's output is a function of its input and parameters within one
library build) and refuses to write more or fewer than ``N`` bytes. A tensor whose compressed
form is not smaller than dense stays dense.

Why it works on fine-tuning deltas: the float32 difference of two bf16 weights keeps at most
the bf16 mantissa's bits, so its two low bytes are mostly zero, and its exponent byte takes few
values; grouping equal-significance bytes and coding each plane on its own (its own Huffman
table) lets a standard compressor see those runs and skews.

Reference: byte grouping before entropy coding of model weights, ZipNN (Hershcovitch et al.,
"ZipNN: Lossless Compression for AI Models", 2024, arXiv:2411.05239), which Huffman-codes the
exponent plane and keeps the noise-like mantissa planes nearly as they are. Zstandard's fastest
strategy with its longest minimum match (:data:`PARAMS`) does about that: almost no matches,
literals Huffman-coded per plane, a plane that does not compress kept raw. Why Zstandard and not
zlib's DEFLATE (``benchmarks/bench_lossless_streams.py``, ``benchmarks/results/lossless-streams.json``,
on the bench trio's bf16 ``down_proj`` diff): zlib's DEFLATE (run-length or Huffman-only) stores
about 2 % less, but inflates at under 200 MB/s on one core, which made ``apply`` of a lossless
delta more than twice as slow as a dense one; Zstandard decodes about five times faster (its
Huffman decoder reads four streams at once).

A hostile file cannot make a decoder hold more than a frame's worth: a frame is read only if it
spans at most what Zstandard can write for its planes (:func:`compress_bound` each, checked on the
offsets before any frame is read); each plane's declared content size must be the plane's size
before anything is decompressed, and Zstandard bounds its buffer by that size whatever window the
header declares (a window the content size would not bound is capped at 128 KiB); each plane must
end its frame exactly where the next begins, and the last plane at the frame's end. A reader
accepts frame sizes ``2**10`` to ``2**16`` (read back from the offsets, as above); the writer uses
``2**16``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zstandard

from ftrecycle.codecs.base import (
    Codec,
    Compression,
    Encoded,
    Expected,
    Job,
    Packed,
    PartSpec,
    Probe,
    Reader,
    measured,
    part_dtype,
    read_part,
    row_block_bytes,
    squared,
)
from ftrecycle.dtypes import BY_NAME, I64, U8, USER_DTYPES, DType, from_storage, to_storage
from ftrecycle.errors import CheckpointError
from ftrecycle.io.safetensors_format import TensorInfo

#: Elements per frame written (a power of two; a decoder accepts any in FRAME_BITS).
FRAME = 1 << 16
#: The frame sizes (as powers of two) a decoder accepts: small enough that a frame's decompressed
#: bytes stay bounded (at most 512 KiB of float64: the memory a decoder holds per thread, whatever
#: a hostile file claims), large enough that ``offsets`` stays small.
FRAME_BITS = range(10, 17)
#: Zstandard's parameters, fixed (not a level, whose meaning may change between releases): the
#: fast strategy with 7-byte minimum matches, a window of a plane at most (2^16 bytes); the
#: content size in each frame's header, no checksum, no dictionary id, no worker threads.
PARAMS = zstandard.ZstdCompressionParameters(
    window_log=17,
    chain_log=16,
    hash_log=16,
    search_log=1,
    min_match=7,
    target_length=0,
    strategy=zstandard.STRATEGY_FAST,
    write_checksum=False,
    write_content_size=True,
    write_dict_id=False,
    threads=0,
)
#: The largest window a decoder accepts where the content size does not bound it (a plane is at
#: most 2^16 bytes).
MAX_WINDOW = 1 << 17
#: Bytes a compression and a decompression context hold (Zstandard's own estimates and the window).
CONTEXT_BYTES = (
    PARAMS.estimated_compression_context_size() + zstandard.estimate_decompression_context_size() + MAX_WINDOW
)
#: The dtypes a delta stores values in (the ``dtype`` part's).
VALUE_DTYPES = frozenset(BY_NAME[d] for d in USER_DTYPES)
#: Their storage dtypes are distinct (bfloat16's is uint16), so an array in memory names its dtype.
BY_STORAGE = {d.storage: d for d in VALUE_DTYPES}


def frame_size(total: int, frames: int) -> int | None:
    """The frame size ``F`` (a power of two in :data:`FRAME_BITS`) that cuts ``total`` elements
    into ``frames`` frames, or None when none does.

    For two frames or more, ``ceil(total / F)`` strictly decreases as ``F`` doubles, so ``F`` is
    unique; one frame holds all ``total`` elements (the smallest such ``F`` is returned).
    """
    for bits in FRAME_BITS:
        if -(-total // (1 << bits)) == frames:
            return 1 << bits
    return None


#: The unsigned integer of each width, whose shifts cut an element into its bytes.
WORDS: dict[int, np.dtype[Any]] = {2: np.dtype(np.uint16), 4: np.dtype(np.uint32), 8: np.dtype(np.uint64)}


def _planes(values: np.ndarray, dtype: DType) -> np.ndarray:
    """The byte planes of ``values`` rounded to ``dtype``: the least significant byte of every
    element, then the next one, ... (by shifts, so the planes do not depend on the machine's byte
    order; three times faster than a transposing copy)."""
    words = to_storage(values, dtype).view(WORDS[dtype.itemsize]).reshape(-1)
    planes = np.empty((dtype.itemsize, words.size), dtype=np.uint8)
    for k in range(dtype.itemsize):
        planes[k] = words >> (8 * k)  # the assignment keeps the low byte
    return planes


def _elements(planes: bytes, count: int, dtype: DType) -> np.ndarray:
    """The ``count`` storage values of ``dtype`` whose byte planes are ``planes``."""
    grouped = np.frombuffer(planes, dtype=np.uint8).reshape(dtype.itemsize, count)
    word = WORDS[dtype.itemsize]
    words = grouped[0].astype(word)
    for k in range(1, dtype.itemsize):
        words |= grouped[k].astype(word) << (8 * k)
    return words.view(dtype.storage)


def compress_bound(size: int) -> int:
    """The most bytes Zstandard's compressor writes for ``size`` bytes of input (``ZSTD_COMPRESSBOUND``
    of ``zstd.h``: its frame header, block headers and raw blocks at worst)."""
    small = ((128 << 10) - size) >> 11 if size < (128 << 10) else 0
    return size + (size >> 8) + small


def _compress(planes: np.ndarray, z: zstandard.ZstdCompressor) -> bytes:
    """One frame's planes (the rows of ``planes``), each compressed as one Zstandard frame, joined."""
    return b"".join(z.compress(plane) for plane in planes)


def _compressor() -> zstandard.ZstdCompressor:
    """A compression context with :data:`PARAMS` (one per thread: contexts are not thread-safe)."""
    return zstandard.ZstdCompressor(compression_params=PARAMS)


def _decompressor() -> zstandard.ZstdDecompressor:
    """A decompression context whose window is capped (one per thread)."""
    return zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)


def _frames(read: Reader, total: int, block: int) -> Iterator[tuple[int, np.ndarray]]:
    """Each frame's first element and values, read ``block`` elements (whole frames) at a time."""
    span = max(1, block // FRAME) * FRAME
    for s in range(0, total, span):
        values = read(s, min(span, total - s))
        for f in range(0, values.size, FRAME):
            yield s + f, values[f : f + FRAME]


def compressed_size(read: Reader, total: int, dtype: DType, block: int) -> int:
    """The bytes the frames of ``total`` elements take compressed (the first pass).

    Args:
        read: the dense diff, by flat element range.
        total: its element count.
        dtype: the delta's dtype (the values are rounded to it).
        block: elements read at a time.

    Returns:
        The sum of the frames' compressed sizes.
    """
    z = _compressor()
    return sum(len(_compress(_planes(x, dtype), z)) for _, x in _frames(read, total, block))


def resolve(spec: Compression, probe: Probe) -> Compression | None:
    """The tensor's compressed size, found by compressing every frame (None: not smaller than dense)."""
    m, n = probe.shape
    nbytes = compressed_size(probe.read, m * n, probe.dtype, probe.block)
    if nbytes + 8 * (-(-m * n // FRAME) + 1) >= m * n * probe.dtype.itemsize:
        return None
    return Compression("lossless", nbytes=nbytes)


def layout(spec: Compression, m: int, n: int, dtype: DType) -> dict[str, PartSpec]:
    """Parts ``data`` (nbytes,) uint8, ``offsets`` (frames+1,) int64 and ``dtype`` (0,) of the
    delta's dtype; ``nbytes`` is what :func:`resolve` found."""
    if spec.nbytes is None:
        raise ValueError("lossless needs the compressed size found for the tensor (resolve it first)")
    frames = -(-m * n // FRAME)
    return {"data": (U8, (spec.nbytes,)), "offsets": (I64, (frames + 1,)), "dtype": (dtype, (0,))}


def encode(job: Job) -> Encoded:
    """Compress frame by frame into ``data``, checking each frame decompresses back to its bits;
    the offsets are written last.

    Raises:
        CheckpointError: the frames compress to another size than the first pass found (an input
            changed while the delta was written).
    """
    (m, n), dtype, ct = job.shape, job.dtype, job.ct
    nbytes = job.parts["data"][1][0]
    offsets = np.zeros(job.parts["offsets"][1][0], dtype=np.int64)
    total = err = 0.0
    pos = 0
    z, dz = _compressor(), _decompressor()
    for i, (_, x) in enumerate(_frames(job.read, m * n, job.block)):
        blob = _compress(_planes(x, dtype), z)
        if pos + len(blob) > nbytes:
            raise CheckpointError(_changed(job.name, nbytes))
        job.write("data", pos, np.frombuffer(blob, dtype=np.uint8))
        pos += len(blob)
        offsets[i + 1] = pos
        # the error is measured on what was stored: the frame decompressed and widened back
        raw = _decompress(blob, x.size, dtype.itemsize, dz, job.name)
        back = from_storage(_elements(raw, x.size, dtype), dtype, ct)
        total += squared(x)
        err += squared(x - back)
    if pos != nbytes:
        raise CheckpointError(_changed(job.name, nbytes))
    job.write("offsets", 0, offsets)
    return measured(total, err)


def _changed(name: str, nbytes: int) -> str:
    return (
        f"tensor {name!r}: its diff compressed to another size than the {nbytes} bytes the first pass found; "
        "an input changed while the delta was written; rerun `ftrecycle diff` on unchanging inputs"
    )


def _decompress(blob: bytes | memoryview, size: int, planes: int, dz: zstandard.ZstdDecompressor, where: str) -> bytes:
    """A frame's ``planes`` planes of ``size`` bytes each, decompressed (never more than that: a
    hostile frame cannot expand past its plane).

    Raises:
        CheckpointError: a plane's frame is corrupt, declares or gives another size, or is followed
            by other bytes than the next plane's frame.
    """
    out: list[bytes] = []
    rest: bytes | memoryview = blob
    for _ in range(planes):
        try:
            declared = zstandard.frame_content_size(rest)
            d = dz.decompressobj(read_across_frames=False)
            got = d.decompress(rest) if declared == size else b""
        except zstandard.ZstdError as e:
            raise CheckpointError(
                f"{where}: a compressed frame is corrupt ({e}); recreate the delta with `ftrecycle diff`"
            ) from e
        if declared != size or len(got) != size or not d.eof:
            raise CheckpointError(
                f"{where}: a compressed frame does not decompress to exactly its {planes} planes of {size} bytes; "
                "the delta is corrupt; recreate it with `ftrecycle diff`"
            )
        out.append(got)
        rest = d.unused_data
    if rest:
        raise CheckpointError(
            f"{where}: a compressed frame has {len(rest)} bytes past its {planes} planes; the delta is corrupt; "
            "recreate it with `ftrecycle diff`"
        )
    return b"".join(out)


@dataclass
class _Reading:
    """One lossless tensor as a decoding thread holds it: its checked frame index, and the last
    frame it decompressed (ranges cut inside a frame, as small work items are, decompress it once),
    with the thread's own decompression context.

    Attributes:
        packed: the tensor.
        offsets: the checked offsets.
        frame: elements per frame.
        dtype: the stored values' dtype.
        where: the tensor's data part, for errors.
        last: the frame in ``values`` (-1: none).
        values: that frame's storage values.
        dz: the decompression context.
    """

    packed: Packed
    offsets: np.ndarray
    frame: int
    dtype: DType
    where: str
    last: int = -1
    values: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint8))
    dz: zstandard.ZstdDecompressor = field(default_factory=_decompressor)


def _reading(p: Packed, cache: dict[Any, Any]) -> _Reading:
    """The tensor's offsets, checked (start at 0, never decrease, end at the size of ``data``,
    one per frame of a readable size) once per tensor, kept in the caller's one-entry cache.

    Raises:
        CheckpointError: offsets that are not a valid frame index of ``data``.
    """
    got = cache.get("lossless")
    if isinstance(got, _Reading) and got.packed is p:  # held, so no other tensor can take p's id
        return got
    src, data = p.parts["offsets"], p.parts["data"]
    shape = src.shape if isinstance(src, np.ndarray) else src.info.shape
    size = data.size if isinstance(data, np.ndarray) else data.info.numel
    where = "a lossless tensor" if isinstance(data, np.ndarray) else f"{data.info.path}: {data.info.name!r}"
    total = math.prod(p.shape)
    frame = frame_size(total, shape[0] - 1) if len(shape) == 1 else None
    offsets = read_part(p, "offsets", 0, shape[0]) if frame is not None else np.zeros(0, dtype=np.int64)
    spans = np.diff(offsets)
    if frame is None or int(offsets[0]) != 0 or int(offsets[-1]) != size or bool(np.any(spans < 0)):
        raise CheckpointError(
            f"{where}: the offsets of this lossless tensor {list(p.shape)} are not a valid frame index of its "
            f"{size} bytes (they must start at 0, never decrease and end at the size of data, one per frame); "
            "recreate the delta with `ftrecycle diff`"
        )
    dtype = _value_dtype(p)
    # a frame is read whole before it is decompressed: none may be longer than its planes can compress to
    limits = np.full(len(spans), dtype.itemsize * compress_bound(frame), dtype=np.int64)
    limits[-1] = dtype.itemsize * compress_bound(total - (len(spans) - 1) * frame)
    if bool(np.any(spans > limits)):
        raise CheckpointError(
            f"{where}: a frame of this lossless tensor {list(p.shape)} takes more bytes than Zstandard can write "
            f"for its {dtype.itemsize} planes; the delta is corrupt; recreate it with `ftrecycle diff`"
        )
    got = _Reading(p, offsets, frame, dtype, where)
    cache.clear()
    cache["lossless"] = got
    return got


def _value_dtype(p: Packed) -> DType:
    """The stored values' dtype: the ``dtype`` part's (an array in memory: its NumPy dtype's).

    Raises:
        ValueError: an array in memory of no delta value dtype.
    """
    dtype = part_dtype(p, "dtype")
    if dtype is not None:
        return dtype
    held = p.parts["dtype"].dtype
    found = BY_STORAGE.get(held)
    if found is None:
        raise ValueError(f"a lossless tensor's dtype part is a {held} array, not of a delta's value dtype")
    return found


def _frame(p: Packed, r: _Reading, f: int) -> np.ndarray:
    """Frame ``f``'s storage values (the last one decompressed is kept in ``r``)."""
    if r.last != f:
        o0, o1 = int(r.offsets[f]), int(r.offsets[f + 1])
        size = min(r.frame, math.prod(p.shape) - f * r.frame)
        blob = read_part(p, "data", o0, o1 - o0).data  # read once, not copied again
        raw = _decompress(blob, size, r.dtype.itemsize, r.dz, f"{r.where} frame {f}")
        r.last, r.values = f, _elements(raw, size, r.dtype)
    return r.values


def decode(p: Packed, start: int, count: int, out: np.ndarray, cache: dict[Any, Any]) -> np.ndarray:
    """Elements ``[start, start + count)`` into ``out``: only the frames under them are read and decompressed."""
    r = _reading(p, cache)
    done = 0
    for f in range(start // r.frame, -(-(start + count) // r.frame)):
        f0 = f * r.frame
        values = _frame(p, r, f)
        lo, hi = max(start, f0) - f0, min(start + count, f0 + values.size) - f0
        out[done : done + hi - lo] = from_storage(values[lo:hi], r.dtype, out.dtype)
        done += hi - lo
    return out


def state_bytes(parts: dict[str, PartSpec], shape: tuple[int, int], itemsize: int, block: int) -> int:
    """Bytes the encoder holds: the offsets, a span of whole frames, one frame's planes, stream
    and decompressed copy (each at most 8 bytes an element), and its Zstandard contexts."""
    span = max(1, block // FRAME) * FRAME
    return 8 * parts["offsets"][1][0] + row_block_bytes(itemsize, span) + 4 * 8 * FRAME + CONTEXT_BYTES


def expect(m: int, n: int, parts: dict[str, TensorInfo]) -> Expected:
    """``data`` (nbytes,) uint8 (nbytes read from it), ``offsets`` (frames+1,) int64 for a frame
    count that some frame size gives ``m*n`` elements (read from it; else the count written), and
    ``dtype`` (0,) of a delta's value dtype."""
    size = parts["data"].shape[0] if len(parts["data"].shape) == 1 else -1
    shape = parts["offsets"].shape
    readable = len(shape) == 1 and shape[0] >= 2 and frame_size(m * n, shape[0] - 1) is not None
    frames = shape[0] - 1 if readable else -(-m * n // FRAME)
    return {
        "data": (frozenset({U8}), (max(size, 0),)),
        "offsets": (frozenset({I64}), (frames + 1,)),
        "dtype": (VALUE_DTYPES, (0,)),
    }


CODEC = Codec(
    "lossless",
    (),
    frozenset({"data", "offsets", "dtype"}),
    layout,
    encode,
    decode,
    state_bytes,
    expect,
    resolve=resolve,
)
