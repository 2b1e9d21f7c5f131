"""Figures read frames and write PNGs."""

import matplotlib

matplotlib.use("agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from lcw_analysis.plots import (  # noqa: E402
    identity_scatter,
    per_layer,
    preactivation_heatmaps,
    save_figure,
)


def test_heatmaps_grid_and_missing_panels(tmp_path):
    rng = np.random.default_rng(0)
    panels = {("plain", "layer 1"): rng.normal(size=(8, 20)),
              ("plain", "layer 2"): rng.normal(size=(8, 20)),
              ("lcw", "layer 1"): np.zeros((8, 20))}
    fig = preactivation_heatmaps(panels)
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 3
    path = save_figure(fig, tmp_path / "sub", "heatmaps")
    assert path.exists() and path.stat().st_size > 1000
    with pytest.raises(ValueError, match="panels is empty"):
        preactivation_heatmaps({})
    with pytest.raises(ValueError, match="expected 2-D"):
        preactivation_heatmaps({("a", "b"): np.zeros(3)})


def test_identity_scatter_and_per_layer():
    data = pd.DataFrame({"pred": [0.0, 1.0, 2.0, 0.5], "meas": [0.1, 0.9, 2.1, 0.4],
                         "norm": ["none", "none", "lcw", "lcw"], "index": [1, 2, 1, 2]})
    fig = identity_scatter(data, x="pred", y="meas", col="norm")
    assert len(fig.axes) == 2
    assert all(any(line.get_linestyle() == "--" for line in ax.lines) for ax in fig.axes)
    fig = per_layer(data, y="meas", hue="norm")
    assert fig.axes[0].get_yscale() == "log"
    with pytest.raises(ValueError, match="column 'gain' is not in the data"):
        per_layer(data, y="meas", hue="gain")


def test_save_figure_rejects_paths(tmp_path):
    fig = preactivation_heatmaps({("a", "b"): np.ones((2, 2))})
    with pytest.raises(ValueError, match="bare file name"):
        save_figure(fig, tmp_path, "x.png")
