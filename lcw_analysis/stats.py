"""Streaming accumulators: per-unit moments in float64, memory independent of the sample count.

A batch is reduced immediately to ``(count, mean, var)`` per unit over every axis but the unit
axis (:func:`batch_moments`: a float64 two-pass reduction) and kept; kept batches are merged with
the pairwise update of Chan, Golub & LeVeque (1979), generalized to many batches at once
(:func:`combine_moments`)::

    n = Σ n_k,   mean = Σ n_k mean_k / n
    var = Σ n_k var_k / n + Σ n_k (mean_k − mean)² / n

Variances are *population* variances (divide by the count, ``correction=0``). :class:`Moments`
defers the merge: it keeps at most :data:`MAX_PENDING` reduced batches (two vectors each) and
merges them in one vectorized operation when that bound is reached or a result is read, so its
state is bounded by a few float64 vectors of length "number of units" whatever the number of
samples.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "reduce_dims",
    "batch_moments",
    "combine_moments",
    "Moments",
    "RunningMean",
    "Scratch",
    "summarize",
    "MAX_PENDING",
]

MAX_PENDING = 64  # reduced batches a Moments keeps before merging them
_F64 = torch.float64
_DIMS: dict[tuple[int, int], tuple[int, ...]] = {}
# device types whose torch.batch_norm_update_stats failed once (use the generic reduction)
_NO_FUSED: set[str] = set()
_ALL_BUT_1 = {n: (0, *range(2, n)) for n in range(2, 9)}
_FUSED_MIN = 1 << 18  # elements from which the fused kernel pays off with several threads


def reduce_dims(ndim: int, unit_dim: int) -> tuple[int, ...]:
    """All axes of an ``ndim`` tensor except ``unit_dim`` (which may be negative)."""
    key = (ndim, unit_dim)
    dims = _DIMS.get(key)
    if dims is None:
        unit = unit_dim % ndim
        dims = _DIMS[key] = tuple(d for d in range(ndim) if d != unit)
    return dims


class Scratch:
    """Reusable buffers (one flat buffer per device and dtype, as large as the largest request so
    far, at most ``limit`` bytes), so that hooks convert or stack tensors without allocating.

    Writing into memory that is already mapped and cached is several times cheaper than a fresh
    allocation for the small tensors of a hook. A buffer is only used inside one call.
    """

    __slots__ = ("_flat", "_views", "limit")

    def __init__(self, limit: int = 64 << 20) -> None:
        self._flat: dict[tuple, torch.Tensor] = {}
        self._views: dict[tuple, torch.Tensor] = {}
        self.limit = limit

    def get(self, shape: tuple[int, ...], device: torch.device,
            dtype: torch.dtype = _F64) -> torch.Tensor | None:
        """A tensor of ``shape`` with arbitrary content, or None if it would exceed the limit."""
        key = (shape, device, dtype)
        view = self._views.get(key)
        if view is None:
            numel = math.prod(shape)
            if numel * dtype.itemsize > self.limit:
                return None
            # normal tensors even under torch.inference_mode: they are updated in place later
            with torch.inference_mode(False):
                flat = self._flat.get((device, dtype))
                if flat is None or flat.numel() < numel:
                    flat = self._flat[(device, dtype)] = torch.empty(numel, dtype=dtype,
                                                                     device=device)
                    self._views = {k: v for k, v in self._views.items()
                                   if k[1:] != (device, dtype)}
                if len(self._views) >= 64:
                    self._views.clear()
                view = self._views[key] = flat[:numel].view(shape)
        return view

    def clear(self) -> None:
        self._flat.clear()
        self._views.clear()


def _two_pass(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population variance over ``dims`` in float64 (any number of kept axes)."""
    dev = x.to(_F64, copy=True)
    mean = dev.mean(dims, keepdim=True)
    dev.sub_(mean)
    var = dev.square_().mean(dims)
    return mean.reshape(var.shape), var


def batch_moments(
    x: torch.Tensor, dims: tuple[int, ...], scratch: Scratch | None = None
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(count, mean, var)`` of ``x`` over ``dims`` in float64; ``count`` = values per unit.

    A non-float64 ``x`` is first copied to float64 (into ``scratch`` when given), so the squares
    of tiny values (vanishing gradients) do not underflow and the result is as exact as a float64
    two-pass reduction of the same values. With a single unit axis the mean and the centered
    mean square come from one fused kernel (``torch.batch_norm_update_stats``, a two-pass
    reduction with the unit axis as its channel axis) when torch runs one intra-op thread or the
    tensor is large (the kernel always splits its work over the threads, which costs more than
    it saves on small tensors); otherwise from two passes of elementwise kernels.
    """
    x = x.detach()
    shape = x.shape
    ndim = len(shape)
    if ndim >= 2 and dims == _ALL_BUT_1.get(ndim):  # (N, units, ...): the common case
        units = shape[1]
    else:
        if not dims:  # a single sample: one value per unit
            x, dims = x.unsqueeze(0), (0,)
            shape, ndim = x.shape, ndim + 1
        kept = [d for d in range(ndim) if d not in dims]
        units = math.prod(shape[d] for d in kept)
        if len(kept) != 1 or x.is_complex():
            count = x.numel() // units if units else 0
            if count == 0:
                return _empty(x, [shape[d] for d in kept])
            return (count, *_two_pass(x, dims))
        if kept[0] != 1:  # reduce everything but axis 1
            x = x.reshape(math.prod(shape[: kept[0]]), units, -1)
            shape, ndim = x.shape, 3
    numel = x.numel()
    count = numel // units if units else 0
    if count == 0:
        return _empty(x, [units])
    fused = not (_NO_FUSED and x.device.type in _NO_FUSED) and (
        numel >= _FUSED_MIN or x.device.type != "cpu" or torch.get_num_threads() == 1)
    if fused and x.dtype is _F64:
        buf = x
    else:
        buf = None if scratch is None else scratch.get(shape, x.device)
        buf = x.to(_F64, copy=True) if buf is None else buf.copy_(x)
    if fused:
        try:
            mean, var = torch.batch_norm_update_stats(buf, None, None, 0.0)
            return count, mean, var
        except (RuntimeError, NotImplementedError):  # no such kernel for this device
            _NO_FUSED.add(x.device.type)
            if buf is x:
                buf = x.to(_F64, copy=True)
    rdims = _ALL_BUT_1[ndim]
    total = buf.sum(rdims)
    buf.sub_(total.view(-1, *[1] * (ndim - 2)), alpha=1.0 / count)
    sq = buf.square_().sum(rdims)
    return count, total.div_(count), sq.div_(count)


def _empty(x: torch.Tensor, shape: list[int]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """No samples: nothing to merge."""
    empty = x.new_zeros(shape, dtype=_F64)
    return 0, empty, empty


def combine_moments(
    counts: list[int], means: list[torch.Tensor], variances: list[torch.Tensor]
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Merge the moments ``(count_k, mean_k, var_k)`` of disjoint sets of samples in one
    vectorized step (Chan's pairwise update, generalized); returns float64 ``(n, mean, var)``.

    Means are combined as offsets from the first mean, so nearly equal large means lose nothing.
    Inputs are never modified.
    """
    if len(counts) == 1:
        return counts[0], means[0], variances[0]
    n = sum(counts)
    dev = means[0].device
    weights = torch.tensor(counts, dtype=_F64, device=dev).div_(n).reshape(
        -1, *([1] * means[0].ndim))
    m = torch.stack(means).to(_F64)
    v = torch.stack(variances).to(_F64)
    delta = m - m[0]
    mean_off = (weights * delta).sum(0)
    delta.sub_(mean_off)
    var = (weights * (v + delta.square_())).sum(0)
    return n, mean_off.add_(m[0]), var


class Moments:
    """Running per-unit count, mean and population variance (float64, deferred Chan merge).

    :meth:`merge` only keeps the batch's moments (no tensor work); at most :data:`MAX_PENDING`
    are kept, then merged at once; reading :attr:`count`, :attr:`mean` or :attr:`var` merges
    what is kept. Merges never modify tensors in place, so one batch's moments may feed several
    accumulators.
    """

    __slots__ = ("_count", "_mean", "_var", "_pending")

    def __init__(self) -> None:
        self._count = 0
        self._mean: torch.Tensor | None = None
        self._var: torch.Tensor | None = None
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def update(self, x: torch.Tensor, dims: tuple[int, ...], scratch: Scratch | None = None
               ) -> None:
        """Reduce a batch over ``dims`` and merge it."""
        self.merge(*batch_moments(x, dims, scratch))

    def merge(self, count: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Merge the moments ``(count, mean, var)`` of another set of samples."""
        if count <= 0:
            return
        pending = self._pending
        pending.append((count, mean, var))
        if len(pending) >= MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        """Merge the kept batches into the state (done automatically when reading it)."""
        pending = self._pending
        if not pending:
            return
        if self._count:
            pending.insert(0, (self._count, self._mean, self._var))
        counts, means, variances = zip(*pending, strict=True)
        self._count, self._mean, self._var = combine_moments(counts, means, variances)
        self._pending = []

    @property
    def count(self) -> int:
        return self._count + sum(p[0] for p in self._pending)

    @property
    def mean(self) -> torch.Tensor | None:
        self.flush()
        return self._mean

    @property
    def var(self) -> torch.Tensor | None:
        self.flush()
        return self._var

    def numel(self) -> int:
        """Number of tensor elements held (for memory checks); merges what is kept first."""
        self.flush()
        return sum(t.numel() for t in (self._mean, self._var) if t is not None)


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
