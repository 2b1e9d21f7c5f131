"""Weight-space variants as ``torch.nn.utils.parametrize`` modules.

Linearly Constrained Weights (LCW, digest §4): every weight row ``w`` (the flattened fan-in of one
output unit, ``C_in/groups · k...`` for a convolution) satisfies ``w · 1_m = 0``. It is trained
through the reparameterization ``w = B_m v`` with a free ``v`` of ``m − 1`` entries per row.

- ``LCW("orthonormal")``: columns of ``B_m`` are the Helmert basis of ``{w : w·1 = 0}``;
  column ``k`` is ``(1,…,1, −k, 0,…,0)/√(k(k+1))`` with ``k`` leading ones. ``B_m v`` and
  ``B_mᵀ w`` are applied with cumulative sums, O(m) per row; ``B_m`` is never materialized.
- ``LCW("simple")``: ``B_m = [I; −1ᵀ]`` (the ICLR-2018 variant; not orthonormal).
- ``Centered()``: ``w = u − mean(u)`` per row (the projection ``P = I − 11ᵀ/m``).
- ``Standardized(eps)``: weight standardization, ``(u − mean(u)) / √(var(u) + eps)`` per row.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "BASES",
    "LCW",
    "Centered",
    "Standardized",
    "apply_lcw",
    "constrain",
    "lcw_violation",
    "is_zero_sum",
]

BASES = ("orthonormal", "simple")
CONSTRAINABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _rows(w: torch.Tensor) -> torch.Tensor:
    """View a weight as one row per output unit: ``(out, fan_in)``."""
    return w.reshape(w.shape[0], -1)


@functools.lru_cache(maxsize=64)
def _helmert_constants(
    m: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cached per size (computed in float64): ``k = 1…m−1``, ``scale_k = 1/√(k(k+1))``, the
    scales reversed (``scale_{m−1} … scale_1``) and ``m − i`` for ``i = 0…m−1``."""
    with torch.inference_mode(False), torch.no_grad():
        k = torch.arange(1, m, dtype=torch.float64, device=device)
        scale = torch.rsqrt(k * (k + 1))
        found = (k, scale, scale.flip(0), torch.arange(m, 0, -1, dtype=torch.float64))
        return tuple(t.to(dtype=dtype, device=device) for t in found)


def _apply_kernel(v: torch.Tensor) -> torch.Tensor:
    """``B_m v`` without autograd: one cumulative sum (of the reversed row) and four passes.

    With ``c_0 = 0``, ``c_k = v_k/√(k(k+1))`` and suffix sums ``S_j = Σ_{k≥j} c_k``, row entry
    ``j`` of ``B_m v`` is ``Σ_{k>j} c_k − j c_j = S_j − (j+1) c_j``. It is computed on the reversed
    row (index ``i = m−1−j``, where the suffix sum is a prefix sum and ``j+1 = m−i``) and flipped
    back. Suffix sums (rather than ``total − prefix``) keep each entry's rounding independent, so
    rows sum to zero to rounding (``~eps·‖w‖``, flat in ``m``) without a centering pass.
    """
    n, m = v.shape[0], v.shape[1] + 1
    _, _, scale_reversed, m_minus_i = _helmert_constants(m, v.dtype, v.device)
    c = v.new_empty((n, m))  # reversed: c_{m−1} … c_1, c_0 = 0
    c.select(1, -1).zero_()
    torch.mul(v.flip(1), scale_reversed, out=c[:, :-1])
    w = c.cumsum(1)  # S_j
    w.addcmul_(c, m_minus_i, value=-1)
    return w.flip(1)


def _transpose_kernel(w: torch.Tensor) -> torch.Tensor:
    """``B_mᵀ w`` without autograd: ``v_k = (Σ_{j<k} w_j − k w_k)/√(k(k+1))``."""
    k, scale, _, _ = _helmert_constants(w.shape[1], w.dtype, w.device)
    v = w[:, :-1].cumsum(1)
    v.addcmul_(w[:, 1:], k, value=-1)
    return v.mul_(scale)


class _HelmertApply(torch.autograd.Function):
    """``w = B_m v`` fused; its backward is ``B_mᵀ`` of the gradient (and vice versa below), so
    autograd records one node instead of a dozen small ones. (The ``forward(ctx, …)`` form: the
    ``setup_context`` form costs ~3× more Python overhead per call.)"""

    @staticmethod
    def forward(ctx, v):
        return _apply_kernel(v)

    @staticmethod
    def backward(ctx, grad_w):
        # Without create_graph the backward runs with grad disabled: skip a second Function.
        return helmert_transpose(grad_w) if torch.is_grad_enabled() else _transpose_kernel(grad_w)

    @staticmethod
    def jvp(ctx, tangent):
        return _apply_kernel(tangent)


class _HelmertTranspose(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        return _transpose_kernel(w)

    @staticmethod
    def backward(ctx, grad_v):
        return helmert_apply(grad_v) if torch.is_grad_enabled() else _apply_kernel(grad_v)

    @staticmethod
    def jvp(ctx, tangent):
        return _transpose_kernel(tangent)


def helmert_apply(v: torch.Tensor) -> torch.Tensor:
    """``w = B_m v`` row by row for the Helmert basis: ``(n, m−1) → (n, m)``, O(m) per row."""
    return _HelmertApply.apply(v)


def helmert_transpose(w: torch.Tensor) -> torch.Tensor:
    """``v = B_mᵀ w`` row by row: ``(n, m) → (n, m−1)``; also projects ``w`` onto ``w·1 = 0``."""
    return _HelmertTranspose.apply(w)


class LCW(nn.Module):
    """Linearly constrained weights: ``w = B_m v`` with every row of ``w`` summing to zero.

    Register with ``parametrize.register_parametrization(layer, "weight", LCW(), unsafe=True)``
    (``v`` has one column fewer than ``w``), or use :func:`apply_lcw`. ``right_inverse`` maps an
    initial weight to ``v``, projecting it onto the constraint first.
    """

    def __init__(self, basis: str = "orthonormal"):
        super().__init__()
        if basis not in BASES:
            raise ValueError(f"LCW basis={basis!r} is not known; expected one of {BASES}")
        self.basis = basis
        self.shape: tuple[int, ...] | None = None

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.shape is None:
            raise RuntimeError("LCW used before right_inverse set the weight shape")
        if self.basis == "orthonormal":
            w = helmert_apply(v)
        else:
            w = torch.cat([v, -v.sum(dim=1, keepdim=True)], dim=1)
        return w.reshape(self.shape)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        rows = _rows(w)
        if rows.shape[1] < 2:
            raise ValueError(
                f"LCW needs a fan-in of at least 2 per output unit, got weight {tuple(w.shape)}"
            )
        self.shape = tuple(w.shape)
        if self.basis == "orthonormal":
            return helmert_transpose(rows)
        return (rows - rows.mean(dim=1, keepdim=True))[:, :-1]

    def extra_repr(self) -> str:
        return f"basis={self.basis!r}"


class Centered(nn.Module):
    """``w = u − mean(u)`` per output unit (the LCW projection applied in the forward pass)."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        rows = _rows(u)
        return (rows - rows.mean(dim=1, keepdim=True)).reshape(u.shape)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return self.forward(w)


class Standardized(nn.Module):
    """Weight standardization (Qiao et al. 2019): ``gain · (u − mean(u)) / √(var(u) + eps)``.

    ``var`` is the biased variance over the fan-in of each output unit. ``gain`` sets the scale of
    the standardized rows (a row of ``m`` unit-variance entries has norm ``√m``; ``gain = g/√m``
    gives the same scale as an ``N(0, g²/m)`` initialization).
    """

    def __init__(self, eps: float = 1e-5, gain: float = 1.0):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"Standardized eps must be > 0, got {eps}")
        self.eps = eps
        self.gain = gain

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        rows = _rows(u)
        var, mean = torch.var_mean(rows, dim=1, keepdim=True, correction=0)
        return (self.gain * (rows - mean) * torch.rsqrt(var + self.eps)).reshape(u.shape)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, gain={self.gain}"


ZERO_SUM = (LCW, Centered, Standardized)


def _selected(model: nn.Module, include: Callable[[str, nn.Module], bool] | None):
    for name, module in model.named_modules():
        if include is not None and not include(name, module):
            continue
        if isinstance(module, nn.RNNBase):
            raise ValueError(
                f"cannot constrain {name or 'model'!r} ({type(module).__name__}): parametrized "
                "nn.RNN/nn.LSTM/nn.GRU weights silently stop training (PyTorch issue 65688); "
                "build the recurrent cell from nn.Linear instead, or exclude it with include="
            )
        if isinstance(module, CONSTRAINABLE):
            yield name, module


def constrain(
    model: nn.Module,
    make: Callable[[], nn.Module],
    include: Callable[[str, nn.Module], bool] | None = None,
) -> nn.Module:
    """Register the parametrization ``make()`` on the weight of every Linear/Conv layer selected.

    ``include(qualified_name, module)`` selects layers (default: all). Biases are untouched.
    All layers are checked before any is changed.
    """
    targets = list(_selected(model, include))
    for name, module in targets:
        fan_in = _rows(module.weight).shape[1]
        if fan_in < 2:
            raise ValueError(
                f"cannot constrain {name!r}: fan-in per output unit is {fan_in}, LCW needs >= 2"
            )
        if is_zero_sum(module):
            raise ValueError(f"layer {name!r} already has a zero-sum weight parametrization")
    for _, module in targets:
        parametrize.register_parametrization(module, "weight", make(), unsafe=True)
    return model


def apply_lcw(
    model: nn.Module,
    basis: str = "orthonormal",
    include: Callable[[str, nn.Module], bool] | None = None,
) -> nn.Module:
    """Constrain every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` of ``model`` (or those ``include``
    selects) to linearly constrained weights; returns ``model``."""
    if basis not in BASES:
        raise ValueError(f"apply_lcw basis={basis!r} is not known; expected one of {BASES}")
    return constrain(model, lambda: LCW(basis), include)


def is_zero_sum(module: nn.Module) -> bool:
    """True when ``module.weight`` carries an LCW, Centered or Standardized parametrization."""
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, ZERO_SUM) for p in module.parametrizations.weight
    )


@torch.no_grad()
def lcw_violation(model: nn.Module) -> float:
    """Largest ``|w·1| / ‖w‖`` over the rows of every zero-sum-constrained layer of ``model``."""
    worst = None
    for module in model.modules():
        if is_zero_sum(module):
            rows = _rows(module.weight).double()
            ratio = (rows.sum(dim=1).abs() / rows.norm(dim=1).clamp_min(1e-300)).max().item()
            worst = ratio if worst is None else max(worst, ratio)
    if worst is None:
        raise ValueError("lcw_violation: the model has no LCW/Centered/Standardized layer")
    return worst
