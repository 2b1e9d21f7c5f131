"""Parameter checks shared by builders and study notebooks: each error names the parameter
and what was expected, and is raised before any expensive work."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["check_choice", "check_int", "check_number", "check_list", "check_network"]


def check_choice(param: str, value, allowed: Iterable) -> None:
    """Raise ``ValueError`` naming ``param`` unless ``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{param}={value!r} is not known; expected one of {allowed}")


def check_int(param: str, value, low: int | None = None, high: int | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{param} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{param} must be an integer >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{param} must be an integer <= {high}, got {value!r}")


def check_number(param: str, value, positive: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a real number (``> 0`` when ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{param} must be a number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{param} must be > 0, got {value!r}")


def check_list(param: str, value, allowed: Sequence | None = None, min_len: int = 1) -> list:
    """Raise ``ValueError`` unless ``value`` is a list of at least ``min_len`` items, each in
    ``allowed`` when given; returns it as a list."""
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ValueError(f"{param} must be a list, got {value!r}")
    if len(value) < min_len:
        raise ValueError(f"{param} must have at least {min_len} item(s), got {list(value)!r}")
    if allowed is not None:
        for item in value:
            if item not in allowed:
                raise ValueError(
                    f"{param} contains {item!r}, which is not known; expected items from "
                    f"{tuple(allowed)}"
                )
    return list(value)


def check_network(depth, width, activations, norms) -> None:
    """Check the network parameters a study notebook shares: ``depth >= 1``, ``width >= 1``
    (``>= 2`` with a zero-sum variant), every activation and norm known."""
    from .models import NORMS, ZERO_SUM_NORMS, make_activation

    check_int("depth", depth, low=1)
    check_int("width", width, low=1)
    for activation in check_list("activations", activations):
        try:
            make_activation(activation)
        except ValueError as err:
            raise ValueError(f"activations: {err}") from None
    check_list("norms", norms, allowed=NORMS)
    constrained = sorted(set(norms) & {*ZERO_SUM_NORMS, "lcw+bn"})
    if constrained and width < 2:
        raise ValueError(
            f"width must be >= 2 with norms {constrained} (each weight row sums to zero), "
            f"got width={width}"
        )
