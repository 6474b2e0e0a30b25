"""A PNG of the geometry by layer: drift and diff size (relative to the base), and their cosine."""

from __future__ import annotations

from pathlib import Path

from ftrecycle.diagnose.geometry import Geometry


def plot_layers(geo: Geometry, out: str | Path) -> Path:
    """Draw ``geo.by_layer`` into ``out`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(geo.by_layer)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for key, label in (("drift_rel", "drift ‖C−A‖/‖A‖"), ("delta_rel", "diff ‖B−A‖/‖A‖")):
        ax1.plot(range(len(names)), [geo.by_layer[n][key] or 0 for n in names], "-o", ms=3, label=label)
    ax1.set_yscale("log")
    ax1.legend()
    ax2.plot(range(len(names)), [geo.by_layer[n]["cos"] or 0 for n in names], "-o", ms=3, color="C2")
    ax2.axhline(0, color="k", lw=0.5)
    ax2.set_ylabel("cos(diff, drift)")
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
