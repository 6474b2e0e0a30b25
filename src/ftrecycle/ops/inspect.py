"""Describe a delta directory: its provenance, compression, size and each tensor's norm and error."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ftrecycle.delta.store import open_delta
from ftrecycle.dtypes import BY_NAME


def inspect_delta(path: str | Path, *, check: bool = True, threads: int = 1) -> dict[str, Any]:
    """Summarise a delta directory (checking every tensor's checksum unless ``check`` is False).

    Raises:
        CheckpointError: not a delta, or a tensor that fails its checksum.
    """
    ckpt, manifest, terms, aliases = open_delta(path, check=check, threads=threads)
    try:
        stored = sum(i.nbytes for i in ckpt.tensors.values())
        dtype_size = BY_NAME[manifest.get("dtype", "float32")].itemsize
        entries: dict[str, Any] = manifest.get("tensors") or {}
        rows: list[dict[str, Any]] = []
        for name, term in terms.items():
            e = entries.get(name) or {}
            comp = e.get("compression") or {}
            method = comp.get("method") or "dense"
            detail = ""
            if "rank" in comp:
                detail = f"rank {comp['rank']}"
            elif "density" in comp:
                detail = f"density {comp['density']:.4g}"
            nbytes = e.get("bytes")
            if nbytes is None:
                nbytes = ckpt.tensors[name].nbytes if name in ckpt.tensors else None
            rows.append(
                {
                    "tensor": name,
                    "shape": list(term.shape),
                    "method": method,
                    "detail": detail,
                    "bytes": nbytes,
                    "norm": comp.get("norm", e.get("norm")),
                    "error": comp.get("error", e.get("error")),
                }
            )
        dense = sum(math.prod(r["shape"]) * dtype_size for r in rows)
        return {
            "path": str(ckpt.path),
            "format": manifest.get("format"),
            "version": manifest.get("version"),
            "created": manifest.get("created"),
            "ftrecycle_version": manifest.get("ftrecycle_version"),
            "base": _who(manifest.get("base")),
            "finetuned": _who(manifest.get("finetuned")),
            "architecture": (manifest.get("base") or {}).get("architecture"),
            "dtype": manifest.get("dtype"),
            "compute_dtype": manifest.get("compute_dtype"),
            "compression": (manifest.get("compression") or {}).get("spec"),
            "bytes": stored,
            "dense_bytes": dense,
            "ratio": dense / stored if stored else None,
            # open_delta has refused a version 2 manifest without a checksum for every stored tensor
            # and, when checking, verified every one of them: "verified" means all of them
            "checksums": ("verified" if check else "not checked") if manifest["version"] >= 2 else "none (version 1)",
            "aliases": aliases,
            "tensors": rows,
        }
    finally:
        ckpt.close()


def _who(d: dict[str, Any] | None) -> dict[str, Any]:
    d = d or {}
    return {k: d.get(k) for k in ("ref", "repo_id", "revision", "format")}


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.2f} MiB"


def format_inspection(s: dict[str, Any], *, limit: int | None = None) -> str:
    """The summary as text: a header and a markdown table of tensors."""

    def ref(d: dict[str, Any]) -> str:
        return f"{d.get('repo_id') or d.get('ref')}" + (f" @ {d['revision']}" if d.get("revision") else "")

    arch = s.get("architecture") or {}
    lines = [
        f"delta {s['path']}: {s['format']} version {s['version']}, made {s['created']} by ftrecycle "
        f"{s['ftrecycle_version']}",
        f"base: {ref(s['base'])}",
        f"fine-tuned: {ref(s['finetuned'])}",
        f"architecture: {', '.join(f'{k}={v}' for k, v in arch.items()) if arch else 'unknown'}",
        f"dtype {s['dtype']} (computed in {s['compute_dtype']}); compression: {s['compression'] or 'none'}",
        f"size {_mib(s['bytes'])}; dense in {s['dtype']} {_mib(s['dense_bytes'])}; ratio "
        + (f"{s['ratio']:.2f}x" if s["ratio"] else "?"),
        f"checksums: {s['checksums']}",
    ]
    if s["aliases"]:
        lines.append("tied: " + ", ".join(f"{a} = {b}" for a, b in s["aliases"].items()))
    lines += ["", "| tensor | shape | stored as | size | norm | rel. error |", "|---|---|---|---|---|---|"]
    rows = s["tensors"] if limit is None else s["tensors"][:limit]
    for r in rows:
        how = r["method"] + (f" ({r['detail']})" if r["detail"] else "")
        norm = "" if r["norm"] is None else f"{r['norm']:.4g}"
        err = "-" if r["method"] == "dense" else ("" if r["error"] is None else f"{r['error']:.4f}")
        lines.append(
            f"| {r['tensor']} | {'x'.join(map(str, r['shape']))} | {how} | {_mib(r['bytes'])} | {norm} | {err} |"
        )
    if limit is not None and len(s["tensors"]) > limit:
        lines.append(f"| ... {len(s['tensors']) - limit} more (--all) | | | | | |")
    return "\n".join(lines) + "\n"
