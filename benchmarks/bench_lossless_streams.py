"""The lossless codec's stream choices on real diff bytes: zlib stream or raw DEFLATE, run-length or
Huffman-only, by stored ratio and inflate speed (what ``apply`` of a lossless delta spends its time on).

Usage: PYTHONPATH=src .venv/bin/python benchmarks/bench_lossless_streams.py [--layout 1b] [--tensor NAME] [--json OUT]

The diff is one tensor of the bench trio (``benchmarks/_trio.py``; built on first use), rounded to
bf16 as ``bench_compress.py``'s deltas are, cut into the codec's frames and byte planes
(``ftrecycle.codecs.lossless``). Inflate speed: MB of output per second, best of nine passes, one thread.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path

import numpy as np
import torch
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


def frames_of(words: np.ndarray) -> list[bytes]:
    """The codec's frames of 16-bit words, each as its byte planes."""
    f = lossless.FRAME
    planes = (words[i : i + f].view(np.uint8).reshape(-1, 2).T for i in range(0, words.size, f))
    return [np.ascontiguousarray(p).tobytes() for p in planes]


def measure(frames: list[bytes], wbits: int, strategy: int) -> dict:
    """Stored ratio and inflate speed of one stream setting."""
    streams = []
    for f in frames:
        z = zlib.compressobj(lossless.LEVEL, zlib.DEFLATED, wbits, 8, strategy)
        streams.append(z.compress(f) + z.flush())
    raw = sum(map(len, frames))
    best = float("inf")
    for _ in range(9):
        t = time.perf_counter()
        for blob, f in zip(streams, frames, strict=True):
            d = zlib.decompressobj(wbits)
            d.decompress(blob, len(f))
            if not d.eof:
                d.decompress(d.unconsumed_tail, 1)
        best = min(best, time.perf_counter() - t)
    return {"ratio": round(raw / sum(map(len, streams)), 3), "inflate_mb_s": round(raw / best / 1e6, 1)}


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
    rows = []
    for wname, wbits in (("zlib", zlib.MAX_WBITS), ("raw", -zlib.MAX_WBITS)):
        for sname, strategy in (("rle", zlib.Z_RLE), ("huffman", zlib.Z_HUFFMAN_ONLY)):
            row = {"stream": wname, "strategy": sname, **measure(frames, wbits, strategy)}
            print(row, flush=True)
            rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps({"layout": args.layout, "tensor": args.tensor, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
