"""Selections of the recorder frame."""

import pandas as pd
import pytest
import torch

from lcw_analysis import build_mlp
from lcw_analysis.frames import layer_stats, unit_stats
from lcw_analysis.recorder import probe


@pytest.fixture(scope="module")
def frame():
    torch.manual_seed(0)
    model = build_mlp(6, 3, depth=3, width=5, norm="lcw")
    x, y = torch.rand(40, 6), torch.randint(0, 3, (40,))
    return probe(model, x, y).frame()


def test_layer_stats_match_the_long_rows(frame):
    wide = layer_stats(frame, "z", ["stripe_ratio", "within_var"])
    assert list(wide["index"]) == [1, 2, 3, 4]
    assert wide["index"].dtype == "int64"
    for row in wide.itertuples():
        long = frame[(frame.site == "z") & (frame.stat == "stripe_ratio") & frame.unit.isna()
                     & (frame["index"] == row.index)]
        assert long["value"].item() == row.stripe_ratio


def test_unit_stats_one_row_per_unit(frame):
    wide = unit_stats(frame, "z", ["mean", "var"])
    assert len(wide) == 3 * 5 + 3  # three hidden layers of 5 units and a head of 3
    assert wide["unit"].dtype == "int64"
    long = frame[(frame.site == "z") & (frame.stat == "mean") & frame.unit.notna()]
    pd.testing.assert_series_equal(wide["mean"].reset_index(drop=True),
                                   long.sort_values(["index", "unit"])["value"]
                                   .reset_index(drop=True), check_names=False)


def test_errors_name_what_is_missing(frame):
    with pytest.raises(ValueError, match="site 'z' has no stat.*'nope'"):
        layer_stats(frame, "z", ["nope"])
    with pytest.raises(ValueError, match="not a Recorder frame"):
        unit_stats(pd.DataFrame({"a": [1]}), "z", ["mean"])
