"""The lossless codec's coder choices on real diff bytes: zlib's raw DEFLATE (run-length or
Huffman-only) against Zstandard (the codec's parameters, per plane; level 1 over a frame's planes
together; level 3 per plane), by stored ratio and decode speed (what ``apply`` of a lossless delta
spends its time on).

Usage: PYTHONPATH=src .venv/bin/python benchmarks/bench_lossless_streams.py [--layout 1b] [--tensor NAME] [--json OUT]

The diff is one tensor of the bench trio (``benchmarks/_trio.py``; built on first use), rounded to
bf16 as ``bench_compress.py``'s deltas are, cut into the codec's frames and byte planes
(``ftrecycle.codecs.lossless``). Decode speed: MB of output per second, best of nine passes, one
thread; the codec's own row goes through its own decoder (with every check it makes).
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zstandard
from safetensors import safe_open

from ftrecycle.codecs import lossless

from _trio import build_trio

HERE = Path(__file__).resolve().parent


def tensor(model: Path, name: str) -> torch.Tensor:
    """One tensor of a sharded model directory."""
    for f in sorted(model.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            if name in h.keys():
                return h.get_tensor(name)
    raise SystemExit(f"{model}: no tensor {name!r}")


def frames_of(words: np.ndarray) -> list[np.ndarray]:
    """The codec's frames of 16-bit words, each as its byte planes (one row per plane)."""
    f = lossless.FRAME
    return [np.ascontiguousarray(words[i : i + f].view(np.uint8).reshape(-1, 2).T) for i in range(0, words.size, f)]


def best_of(passes: int, fn: Callable[[], object]) -> float:
    """The fastest of ``passes`` runs of ``fn``, in seconds."""
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def deflate(frames: list[np.ndarray], strategy: int) -> dict:
    """Raw DEFLATE, one stream per frame (its planes together), level 1."""
    streams = []
    for f in frames:
        z = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS, 8, strategy)
        streams.append(z.compress(f.tobytes()) + z.flush())

    def run() -> None:
        for blob, f in zip(streams, frames, strict=True):
            zlib.decompressobj(-zlib.MAX_WBITS).decompress(blob, f.nbytes)

    return _row(frames, streams, best_of(9, run))


def zstd_joint(frames: list[np.ndarray], level: int) -> dict:
    """Zstandard at ``level``, one frame per codec frame (its planes together)."""
    z, d = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
    streams = [z.compress(f.tobytes()) for f in frames]
    return _row(frames, streams, best_of(9, lambda: [d.decompress(b) for b in streams]))


def zstd_planes(frames: list[np.ndarray], z: zstandard.ZstdCompressor, through_codec: bool) -> dict:
    """Zstandard, one frame per plane; decoded by the codec's own decoder or by plain ``decompress``."""
    streams = [lossless._compress(f, z) for f in frames]
    d = lossless._decompressor() if through_codec else zstandard.ZstdDecompressor()
    planes = [z.compress(p) for f in frames for p in f]

    def run() -> None:
        if through_codec:
            for blob, f in zip(streams, frames, strict=True):
                lossless._decompress(blob, f.shape[1], f.shape[0], d, "t")
        else:
            for blob in planes:
                d.decompress(blob)

    return _row(frames, streams, best_of(9, run))


def _row(frames: list[np.ndarray], streams: list[bytes], seconds: float) -> dict:
    raw = sum(f.nbytes for f in frames)
    return {"ratio": round(raw / sum(map(len, streams)), 3), "decode_mb_s": round(raw / seconds / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default="1b")
    ap.add_argument("--tensor", default="model.layers.3.mlp.down_proj.weight")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    trio = build_trio(HERE / "work", args.layout)
    a, b = tensor(trio["source_base"], args.tensor), tensor(trio["source_finetuned"], args.tensor)
    words = (b.float() - a.float()).bfloat16().view(torch.int16).numpy().view(np.uint16).reshape(-1)
    frames = frames_of(words)
    rows = [
        {"coder": "deflate raw, run-length (the codec before)", **deflate(frames, zlib.Z_RLE)},
        {"coder": "deflate raw, Huffman only", **deflate(frames, zlib.Z_HUFFMAN_ONLY)},
        {"coder": "zstd level 1, planes together", **zstd_joint(frames, 1)},
        {"coder": "zstd level 3, per plane", **zstd_planes(frames, zstandard.ZstdCompressor(level=3), False)},
        {"coder": "zstd codec PARAMS, per plane", **zstd_planes(frames, lossless._compressor(), False)},
        {"coder": "zstd codec PARAMS, per plane, codec decoder", **zstd_planes(frames, lossless._compressor(), True)},
    ]
    for row in rows:
        print(row, flush=True)
    versions = {"zlib": zlib.ZLIB_RUNTIME_VERSION, "zstd": ".".join(map(str, zstandard.ZSTD_VERSION))}
    if args.json:
        Path(args.json).write_text(
            json.dumps({"layout": args.layout, "tensor": args.tensor, **versions, "runs": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
