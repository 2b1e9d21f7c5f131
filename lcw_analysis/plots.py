"""Figures for the studies. Plots read tidy frames (and, for heatmaps, the recorder's kept
preactivation matrices); they never touch models."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

__all__ = ["preactivation_heatmaps", "identity_scatter", "per_layer", "save_figure"]


def preactivation_heatmaps(panels: dict[tuple[str, str], np.ndarray], vlim: float | None = None):
    """A grid of ``Z^l`` heatmaps (units × samples): ``panels[(row, column)] = matrix``.

    Horizontal stripes are units whose preactivation mean is offset (activation shift). Each panel
    has its own symmetric colour scale ``±vlim`` (default: the panel's 99th percentile of ``|z|``),
    so stripes show whatever the layer's overall scale.
    """
    if not panels:
        raise ValueError("panels is empty: expected {(row, column): units × samples matrix}")
    rows = list(dict.fromkeys(r for r, _ in panels))
    cols = list(dict.fromkeys(c for _, c in panels))
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.4 * len(cols), 2.6 * len(rows)),
                             squeeze=False, constrained_layout=True)
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            ax = axes[i, j]
            if (row, col) not in panels:
                ax.axis("off")
                continue
            matrix = np.asarray(panels[(row, col)])
            if matrix.ndim != 2:
                raise ValueError(f"panel {(row, col)} has shape {matrix.shape}; expected 2-D")
            lim = vlim or float(np.percentile(np.abs(matrix), 99)) or 1.0
            image = ax.imshow(matrix, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim,
                              interpolation="nearest")
            ax.set_title(f"{row} · {col}", fontsize=9)
            ax.set_xlabel("sample")
            ax.set_ylabel("unit")
            fig.colorbar(image, ax=ax, shrink=0.8, pad=0.02)
    return fig


def identity_scatter(data: pd.DataFrame, x: str, y: str, col: str, hue: str | None = None):
    """Measured ``y`` against predicted ``x`` with the identity line, one panel per ``col``."""
    for name in (x, y, col, *([hue] if hue else [])):
        if name not in data:
            raise ValueError(f"column {name!r} is not in the data; it has {list(data.columns)}")
    grid = sns.relplot(data=data, x=x, y=y, col=col, hue=hue, kind="scatter", s=12,
                       facet_kws={"sharex": False, "sharey": False}, height=3.2)
    for ax in grid.axes.flat:
        lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
        hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--", label="identity")
    return grid.figure


def per_layer(data: pd.DataFrame, y: str, hue: str, col: str | None = None,
              row: str | None = None, x: str = "index", logy: bool = True, style=None):
    """One line per ``hue`` of ``y`` against the layer number, faceted by ``col``/``row``."""
    for name in (x, y, hue, col, row, style):
        if name is not None and name not in data:
            raise ValueError(f"column {name!r} is not in the data; it has {list(data.columns)}")
    grid = sns.relplot(data=data, x=x, y=y, hue=hue, col=col, row=row, style=style,
                       kind="line", marker="o", markersize=4, height=3.0, aspect=1.2,
                       facet_kws={"sharey": False})
    if logy:
        grid.set(yscale="log")
    grid.set_axis_labels("layer l" if x == "index" else x, y)
    return grid.figure


def save_figure(fig, out_dir: str | Path, name: str) -> Path:
    """Save ``fig`` as ``out_dir/name.png`` (folder created) and return the path."""
    if not name or "/" in name or name.endswith(".png"):
        raise ValueError(f"name={name!r}: expected a bare file name without '.png'")
    path = Path(out_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
