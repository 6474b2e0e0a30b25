"""A PNG of the geometry by layer (drift and diff size relative to the base, and their cosine) and, with
the loss probe, the calibration loss of C + αΔ along the α grid."""

from __future__ import annotations

from pathlib import Path

from ftrecycle.diagnose.geometry import Geometry
from ftrecycle.diagnose.probe import Probe
from ftrecycle.io.output import replaced_file


def plot_layers(geo: Geometry, out: str | Path, probe: Probe | None = None) -> Path:
    """Draw ``geo.by_layer`` (and ``probe``'s α-loss curve, when given) into ``out`` (PNG); returns the path.

    The PNG is drawn into a hidden file beside ``out`` and renamed over it, so that a failed
    draw leaves no half file and an ``out`` hard-linked elsewhere is replaced, not rewritten.

    Raises:
        OutputError: the PNG could not be written (the path and the OS's cause).
    """
    import matplotlib  # heavy: kept off the transfer path

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: kept off the transfer path

    names = list(geo.by_layer)
    fig, axes = plt.subplots(1, 3 if probe is not None else 2, figsize=(16 if probe is not None else 11, 3.6))
    ax1, ax2 = axes[0], axes[1]
    for key, label in (("drift_rel", "drift ‖C−A‖/‖A‖"), ("delta_rel", "diff ‖B−A‖/‖A‖")):
        ax1.plot(range(len(names)), [geo.by_layer[n][key] or 0 for n in names], "-o", ms=3, label=label)
    ax1.set_yscale("log")
    ax1.legend()
    ax2.plot(range(len(names)), [geo.by_layer[n]["cos"] or 0 for n in names], "-o", ms=3, color="C2")
    ax2.axhline(0, color="k", lw=0.5)
    ax2.set_ylabel("cos(diff, drift)")
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
    if probe is not None:
        ax3 = axes[2]
        ax3.plot([a for a, _ in probe.alphas], [lo for _, lo in probe.alphas], "-o", ms=3, color="C3")
        ax3.axhline(probe.loss_target, color="k", lw=0.5, ls="--", label="C (α = 0)")
        ax3.axvline(probe.best_alpha, color="C3", lw=0.5, ls=":", label=f"best α = {probe.best_alpha:g}")
        ax3.set_xlabel("α")
        ax3.set_ylabel("calibration loss of C + αΔ")
        ax3.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out)
    try:
        with replaced_file(path) as f:
            fig.savefig(f, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path
