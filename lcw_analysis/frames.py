"""Selections of the recorder's tidy frame that notebooks and plots share."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

__all__ = ["layer_stats", "unit_stats"]

_KEYS = ["step", "mode", "index", "layer"]


def _check(frame: pd.DataFrame, site: str, stats: Sequence[str]) -> pd.DataFrame:
    missing = {"step", "mode", "index", "layer", "site", "stat", "unit", "value"} - set(frame)
    if missing:
        raise ValueError(f"frame is not a Recorder frame: missing columns {sorted(missing)}")
    rows = frame[(frame["site"] == site) & frame["stat"].isin(list(stats))]
    absent = set(stats) - set(rows["stat"])
    if absent:
        known = sorted(frame.loc[frame["site"] == site, "stat"].unique())
        raise ValueError(f"site {site!r} has no stat(s) {sorted(absent)}; it has {known}")
    return rows


def _plain_ints(wide: pd.DataFrame) -> pd.DataFrame:
    # Nullable Int64 columns become int64 where complete (seaborn cannot map Int64 hues).
    for col in ("index", "unit"):
        if col in wide and wide[col].notna().all():
            wide[col] = wide[col].astype("int64")
    return wide


def layer_stats(frame: pd.DataFrame, site: str, stats: Sequence[str]) -> pd.DataFrame:
    """Summary rows (``unit`` NA) of ``site`` as one row per layer and step, one column per stat."""
    rows = _check(frame, site, stats)
    rows = rows[rows["unit"].isna()]
    wide = rows.pivot_table(index=_KEYS, columns="stat", values="value", aggfunc="first")
    return _plain_ints(wide.reset_index().rename_axis(columns=None)).sort_values(["step", "index"])


def unit_stats(frame: pd.DataFrame, site: str, stats: Sequence[str]) -> pd.DataFrame:
    """Per-unit rows of ``site``: one row per layer, step and unit, one column per stat."""
    rows = _check(frame, site, stats)
    rows = rows[rows["unit"].notna()]
    wide = rows.pivot_table(index=[*_KEYS, "unit"], columns="stat", values="value",
                            aggfunc="first")
    wide = _plain_ints(wide.reset_index().rename_axis(columns=None))
    return wide.sort_values(["step", "index", "unit"])
