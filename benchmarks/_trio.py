"""Build (once) the synthetic source-base / source-finetuned / target-base trio the benchmarks use."""

from __future__ import annotations

import json
from pathlib import Path

import _paths  # noqa: F401  (tests/fixtures on sys.path)
from fixtures.synthetic import LLAMA_3_2_1B, llama_config, llama_layout, write_synthetic

LAYOUTS = {
    "1b": dict(LLAMA_3_2_1B),
    "small": {
        **LLAMA_3_2_1B,
        "vocab_size": 32000,
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
}
#: (version, noise scale) draws added to the shared base: a fine-tune and a newer release.
VERSIONS = {"source_base": [], "source_finetuned": [(1, 1e-3)], "target_base": [(2, 2e-3)]}


def build_trio(work: Path, layout: str, *, shard_size: int = 1 << 30) -> dict[str, Path]:
    """Write the three models under ``work/layout`` unless already there; return their directories."""
    arch = LAYOUTS[layout]
    root = work / f"trio-{layout}"
    paths = {}
    for role, noise in VERSIONS.items():
        d = root / role
        stamp = d / ".complete"
        if not stamp.exists():
            write_synthetic(d, llama_layout(**arch), llama_config(**arch), noise=noise, shard_size=shard_size)
            stamp.write_text(json.dumps({"layout": layout, "noise": noise}))
        paths[role] = d
    return paths
