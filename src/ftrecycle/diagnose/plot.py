"""A PNG of the geometry by layer: drift and diff size (relative to the base), and their cosine."""

from __future__ import annotations

from pathlib import Path

from ftrecycle.diagnose.geometry import Geometry
from ftrecycle.io.output import replaced_file


def plot_layers(geo: Geometry, out: str | Path) -> Path:
    """Draw ``geo.by_layer`` into ``out`` (PNG); returns the path.

    The PNG is drawn into a hidden file beside ``out`` and renamed over it, so that a failed
    draw leaves no half file and an ``out`` hard-linked elsewhere is replaced, not rewritten.

    Raises:
        OutputError: the PNG could not be written (the path and the OS's cause).
    """
    import matplotlib  # heavy: kept off the transfer path

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: kept off the transfer path

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
    try:
        with replaced_file(path) as f:
            fig.savefig(f, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path
