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


def _helmert_scale(m: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.arange(1, m, dtype=like.dtype, device=like.device)
    return k, torch.rsqrt(k * (k + 1))


def helmert_apply(v: torch.Tensor) -> torch.Tensor:
    """``w = B_m v`` row by row for the Helmert basis: ``(n, m−1) → (n, m)``, O(m) per row."""
    m = v.shape[1] + 1
    k, scale = _helmert_scale(m, v)
    c = v * scale
    tail = c.flip(-1).cumsum(-1).flip(-1)  # S_j = Σ_{k ≥ j} c_k
    w = nn.functional.pad(tail, (0, 1)) - nn.functional.pad(k * c, (1, 0))
    # Exact in real arithmetic (rows already sum to zero); removes the rounding residue.
    return w - w.mean(dim=1, keepdim=True)


def helmert_transpose(w: torch.Tensor) -> torch.Tensor:
    """``v = B_mᵀ w`` row by row: ``(n, m) → (n, m−1)``; also projects ``w`` onto ``w·1 = 0``."""
    m = w.shape[1]
    k, scale = _helmert_scale(m, w)
    return (w.cumsum(-1)[:, :-1] - k * w[:, 1:]) * scale


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
