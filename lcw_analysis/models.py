"""Model builders with one ``norm`` argument for every weight-space variant and BN.

Module names are stable so recorders and notebooks can address sites: ``hidden.3.linear``,
``hidden.3.norm`` (only where a BN layer exists), ``hidden.3.act`` and ``head``.

Initialization (explicit, ``init="normal"``): every Linear/Conv weight is drawn from
``N(0, gain² / fan_in)`` with zero bias, *before* the weight-space variant is registered (its
``right_inverse`` then projects that draw onto the constraint, so LCW, centered and simple-basis
LCW start from the same ``w`` for the same seed). ``default_gain(activation, norm)``:

- ``relu`` family: ``√2`` (He). ``tanh`` and any other activation: ``1`` (LeCun; ``f'(0) = 1``).
- ``sigmoid``: ``1`` for plain, WN, BN and LCW+BN; ``4`` for the zero-sum variants without BN
  (``lcw``, ``lcw-simple``, ``centered``, ``ws``). Gain 4 = ``1/f'(0)`` makes the backward
  amplification ``m σ_w² f'(0)²`` equal to one in the linear regime, and with LCW the forward
  amplification is the same (digest §5.2–5.3). This is *our derivation*, not the initialization
  scheme stated in the paper (which we could not verify). Without LCW the same gain adds
  ``m σ_w² γ² = 4`` to the preactivation variance every layer and saturates the sigmoids, which is
  why plain sigmoid keeps gain 1. Pass ``gain=`` to override; the studies sweep it.

``init="torch"`` keeps PyTorch's default layer initialization instead.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from .checks import check_choice, check_int, check_number
from .parametrizations import CONSTRAINABLE, LCW, Centered, Standardized, constrain

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "INITS",
    "make_activation",
    "default_gain",
    "init_weights",
    "apply_norm",
    "Block",
    "MLP",
    "build_mlp",
]

ACTIVATIONS = ("sigmoid", "tanh", "relu")
NORMS = ("none", "lcw", "lcw-simple", "centered", "ws", "wn", "bn", "lcw+bn")
INITS = ("normal", "torch")
ZERO_SUM_NORMS = ("lcw", "lcw-simple", "centered", "ws")
_NOT_ACTIVATIONS = {"multiheadattention", "threshold"}


def _torch_activations() -> dict[str, type[nn.Module]]:
    from torch.nn.modules import activation

    found = {}
    for name in activation.__all__:
        key = name.lower()
        if key not in _NOT_ACTIVATIONS:
            found[key] = getattr(activation, name)
    return found


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def make_activation(name: str) -> nn.Module:
    """An activation module by name: ``sigmoid``, ``tanh``, ``relu`` or any torch.nn activation
    (``gelu``, ``leaky_relu``, ``elu``, ``silu``, …), case and underscores ignored."""
    known = _torch_activations()
    if not isinstance(name, str) or _key(name) not in known:
        raise ValueError(
            f"activation={name!r} is not known; expected one of {ACTIVATIONS} or a torch.nn "
            f"activation name such as {sorted(k for k in known if k not in ACTIVATIONS)[:8]}"
        )
    return known[_key(name)]()


def default_gain(activation: str, norm: str = "none") -> float:
    """Default init gain (``σ_w = gain/√fan_in``); see the module docstring for the argument."""
    check_choice("norm", norm, NORMS)
    make_activation(activation)
    key = _key(activation)
    if "relu" in key:
        return math.sqrt(2.0)
    if key == "sigmoid" and norm in ZERO_SUM_NORMS:
        return 4.0
    return 1.0


@torch.no_grad()
def init_weights(model: nn.Module, gain: float, init: str = "normal") -> nn.Module:
    """Draw every Linear/Conv weight from ``N(0, gain²/fan_in)`` and zero its bias."""
    check_choice("init", init, INITS)
    check_number("gain", gain, positive=True)
    if init == "torch":
        return model
    for module in model.modules():
        if isinstance(module, CONSTRAINABLE):
            fan_in = module.weight[0].numel()
            module.weight.normal_(0.0, gain / math.sqrt(fan_in))
            if module.bias is not None:
                module.bias.zero_()
    return model


def apply_norm(model: nn.Module, norm: str, gain: float = 1.0, include=None) -> nn.Module:
    """Register the weight-space part of ``norm`` on every Linear/Conv layer of ``model``
    (``lcw``, ``lcw-simple``, ``centered``, ``ws``, ``wn``; the LCW part of ``lcw+bn``).
    BN layers are the builder's job; ``none`` and ``bn`` leave the weights alone."""
    check_choice("norm", norm, NORMS)
    if norm in ("lcw", "lcw+bn"):
        return constrain(model, lambda: LCW("orthonormal"), include)
    if norm == "lcw-simple":
        return constrain(model, lambda: LCW("simple"), include)
    if norm == "centered":
        return constrain(model, Centered, include)
    if norm == "ws":
        for name, module in model.named_modules():
            if isinstance(module, CONSTRAINABLE) and (include is None or include(name, module)):
                std = gain / math.sqrt(module.weight[0].numel())
                constrain(module, lambda s=std: Standardized(gain=s))
        return model
    if norm == "wn":
        for name, module in model.named_modules():
            if isinstance(module, CONSTRAINABLE) and (include is None or include(name, module)):
                weight_norm(module, "weight", dim=0)
    return model


class Block(nn.Module):
    """One hidden layer: ``act(norm(linear(x)))``; ``norm`` exists only when BN is used."""

    def __init__(self, linear: nn.Module, act: nn.Module, norm: nn.Module | None = None):
        super().__init__()
        self.linear = linear
        if norm is not None:
            self.norm = norm
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        if hasattr(self, "norm"):
            x = self.norm(x)
        return self.act(x)


class MLP(nn.Module):
    """``flatten → hidden.0 … hidden.{depth−1} → head``."""

    def __init__(self, hidden: list[Block], head: nn.Module):
        super().__init__()
        self.flatten = nn.Flatten()
        self.hidden = nn.Sequential(*hidden)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(self.flatten(x)))


def build_mlp(
    in_features: int,
    num_classes: int,
    depth: int,
    width: int,
    activation: str = "sigmoid",
    norm: str = "none",
    init: str = "normal",
    gain: float | None = None,
    bias: bool = True,
) -> MLP:
    """A ``depth``-hidden-layer MLP of ``width`` units with the weight-space variant or BN
    ``norm`` (one of :data:`NORMS`) applied to every Linear layer, the head included."""
    check_choice("norm", norm, NORMS)
    check_choice("init", init, INITS)
    make_activation(activation)
    for param, value in (
        ("in_features", in_features),
        ("num_classes", num_classes),
        ("depth", depth),
        ("width", width),
    ):
        check_int(param, value, low=1)
    if norm in ("lcw", "lcw-simple", "centered", "ws", "lcw+bn") and (
        width < 2 or in_features < 2
    ):
        raise ValueError(
            f"norm={norm!r} constrains each row to sum to zero and needs width >= 2 and "
            f"in_features >= 2, got width={width}, in_features={in_features}"
        )
    if gain is None:
        gain = default_gain(activation, norm)
    use_bn = norm in ("bn", "lcw+bn")
    blocks = []
    for i in range(depth):
        fan_in = in_features if i == 0 else width
        linear = nn.Linear(fan_in, width, bias=bias and not use_bn)
        bn = nn.BatchNorm1d(width) if use_bn else None
        blocks.append(Block(linear, make_activation(activation), bn))
    model = MLP(blocks, nn.Linear(width, num_classes, bias=bias))
    init_weights(model, gain, init)
    return apply_norm(model, norm, gain)
