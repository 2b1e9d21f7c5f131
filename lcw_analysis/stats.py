"""Streaming accumulators: per-unit moments in float64, memory independent of the sample count.

A batch is reduced immediately to ``(count, mean, var)`` per unit (two-pass mean and centered
mean square in float64 over every axis but the unit axis) and merged into the running state with
the pairwise update of
Chan, Golub & LeVeque (1979)::

    n = n_a + n_b,   δ = mean_b − mean_a
    mean = mean_a + δ · n_b/n
    var  = var_a · n_a/n + var_b · n_b/n + δ² · n_a n_b / n²

Variances are *population* variances (divide by the count, ``correction=0``). The state is two
float64 vectors of length "number of units" and a Python int, whatever the number of samples.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["reduce_dims", "batch_moments", "Moments", "RunningMean", "summarize"]

_DIMS: dict[tuple[int, int], tuple[int, ...]] = {}


def reduce_dims(ndim: int, unit_dim: int) -> tuple[int, ...]:
    """All axes of an ``ndim`` tensor except ``unit_dim`` (which may be negative)."""
    key = (ndim, unit_dim)
    dims = _DIMS.get(key)
    if dims is None:
        unit = unit_dim % ndim
        dims = _DIMS[key] = tuple(d for d in range(ndim) if d != unit)
    return dims


def batch_moments(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(count, mean, var)`` of ``x`` over ``dims`` in float64; ``count`` = values per unit."""
    x = x.detach()
    if not dims:  # a single sample: one value per unit
        x, dims = x.unsqueeze(0), (0,)
    # Two passes in float64 with in-place ops (torch.var_mean's Welford kernel is ~5x slower).
    if x.dtype == torch.float64:
        mean = x.mean(dims, keepdim=True)
        dev = x - mean
    else:
        dev = x.to(torch.float64)
        mean = dev.mean(dims, keepdim=True)
        dev.sub_(mean)
    var = dev.square_().mean(dims)
    units = var.numel()
    return (x.numel() // units if units else 0), mean.reshape(var.shape), var


class Moments:
    """Running per-unit count, mean and population variance (float64, Chan merge).

    Merges never modify tensors in place, so one batch's moments may feed several accumulators.
    """

    __slots__ = ("count", "mean", "var")

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None

    def update(self, x: torch.Tensor, dims: tuple[int, ...]) -> None:
        """Reduce a batch over ``dims`` and merge it."""
        self.merge(*batch_moments(x, dims))

    def merge(self, count: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Merge the moments ``(count, mean, var)`` of another set of samples."""
        if count <= 0:
            return
        if self.count == 0:
            self.count, self.mean, self.var = count, mean, var
            return
        n = self.count + count
        fa, fb = self.count / n, count / n
        delta = mean - self.mean
        self.mean = self.mean + delta * fb
        self.var = self.var * fa + var * fb + delta.square() * (fa * fb)
        self.count = n

    def numel(self) -> int:
        """Number of tensor elements held (for memory checks)."""
        return sum(t.numel() for t in (self.mean, self.var) if t is not None)


class RunningMean:
    """Count-weighted running mean of a vector (float64)."""

    __slots__ = ("count", "mean")

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None

    def merge(self, count: int, value: torch.Tensor) -> None:
        if count <= 0:
            return
        if self.count == 0:
            self.count, self.mean = count, value
            return
        n = self.count + count
        self.mean = self.mean + (value - self.mean) * (count / n)
        self.count = n

    def numel(self) -> int:
        return 0 if self.mean is None else self.mean.numel()


def summarize(mean: np.ndarray, var: np.ndarray) -> dict[str, float]:
    """Summary over units of per-unit means and variances (all population statistics).

    ``pooled_mean`` = mean of unit means; ``within_var`` = mean of unit variances;
    ``between_var`` = variance of unit means across units; ``pooled_var`` = within + between (the
    variance over samples *and* units, since every unit has the same count); ``stripe_ratio`` =
    between / within.
    """
    within = float(np.mean(var))
    between = float(np.var(mean))
    with np.errstate(divide="ignore", invalid="ignore"):
        stripe = float(np.float64(between) / np.float64(within))
    return {
        "pooled_mean": float(np.mean(mean)),
        "within_var": within,
        "between_var": between,
        "pooled_var": within + between,
        "stripe_ratio": stripe,
    }
