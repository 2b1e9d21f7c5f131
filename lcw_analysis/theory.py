"""Closed-form predictions for activation shift and variance amplification (digest §3, §5).

Plain numbers (or numpy arrays) in, plain numbers out. Notation: ``m`` fan-in, ``σ_w²`` weight
variance, ``γ`` common mean and ``σ_a²`` variance of the layer input ``a^{l-1}``.

- Proposition 1: ``E[z_i] = w_i·μ + b_i = ‖w_i‖ ‖μ‖ cos θ_i + b_i`` (``μ = E[a]``; for
  ``μ = γ 1_m`` this is ``γ w_i·1 + b_i``).
- Amplification rates (digest §5.2, variances pooled over samples *and* units, square layer):
  plain ``R_f = m σ_w² (1 + γ²/σ_a²)``, ``R_b = m σ_w²``; LCW ``R_f = R_b = (m − 1) σ_w²``.
- Activation moments for Gaussian preactivations ``z ~ N(0, s²)`` (``s²`` = ``preact_var``) by
  quadrature: ``asymmetry_factor = E[a²]/Var(a) = 1 + γ²/σ_a²`` (the plain ``R_f/R_b``),
  ``balanced_gain = 1/√E[f'(z)²]`` and ``linear_gain = 1/f'(0)``.

The expectations use composite Gauss–Legendre quadrature on ``[−12 s, 12 s]`` with a panel edge
at 0 (where ReLU-type kinks sit), which is exact to ~1e-12 for smooth activations and for ReLU;
plain Gauss–Hermite converges only algebraically across a kink.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = [
    "ACTIVATIONS",
    "proposition1_mean",
    "proposition1_angle",
    "cos_theta",
    "stripe_ratio",
    "forward_amplification",
    "backward_amplification",
    "amplification_ratio",
    "activation_moments",
    "asymmetry_factor",
    "balanced_gain",
    "linear_gain",
]


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def _sigmoid_prime(z):
    s = _sigmoid(z)
    return s * (1.0 - s)


ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "sigmoid": (_sigmoid, _sigmoid_prime),
    "tanh": (np.tanh, lambda z: 1.0 - np.tanh(z) ** 2),
    "relu": (lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(float)),
}

_PANELS, _NODES, _WIDTH = 96, 24, 12.0
_GL_X, _GL_W = np.polynomial.legendre.leggauss(_NODES)


def _check_positive(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _check_fan_in(m, lcw: bool) -> int:
    low = 2 if lcw else 1
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < low:
        raise ValueError(f"m (fan-in) must be an integer >= {low}, got {m!r}")
    return int(m)


def _numpy_fn(f: Callable) -> Callable:
    """Wrap a callable so it maps numpy arrays to float arrays (numpy, torch or scalar-only)."""

    def call(z: np.ndarray) -> np.ndarray:
        try:
            out = f(z)
            return np.broadcast_to(np.asarray(out, dtype=float), z.shape)
        except Exception:  # not numpy-friendly: try torch, then element-wise
            pass
        try:
            import torch

            return f(torch.as_tensor(z)).detach().cpu().numpy().astype(float)
        except Exception:
            return np.vectorize(lambda v: float(f(float(v))))(z)

    return call


def _resolve(activation) -> tuple[Callable, Callable]:
    if isinstance(activation, str):
        key = activation.lower()
        if key not in ACTIVATIONS:
            raise ValueError(
                f"activation={activation!r} is not known; expected one of "
                f"{tuple(ACTIVATIONS)} or a callable"
            )
        return ACTIVATIONS[key]
    if callable(activation):
        f = _numpy_fn(activation)

        def deriv(z: np.ndarray) -> np.ndarray:
            h = 1e-5 * np.maximum(1.0, np.abs(z))
            return (f(z + h) - f(z - h)) / (2 * h)

        return f, deriv
    raise ValueError(f"activation={activation!r}: expected a name {tuple(ACTIVATIONS)} or callable")


def _gaussian_nodes(var: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of ``E[g(z)]`` for ``z ~ N(0, var)``."""
    s = math.sqrt(var)
    edges = np.linspace(-_WIDTH * s, _WIDTH * s, 2 * _PANELS + 1)  # 0 is an edge
    half = np.diff(edges)[:, None] / 2
    mid = (edges[:-1] + edges[1:])[:, None] / 2
    z = (mid + half * _GL_X).ravel()
    w = (half * _GL_W).ravel() * np.exp(-0.5 * z * z / var) / math.sqrt(2 * math.pi * var)
    return z, w


def activation_moments(activation, preact_var: float) -> dict[str, float]:
    """Moments of ``a = f(z)``, ``z ~ N(0, preact_var)``: ``mean`` (γ), ``var`` (σ_a²),
    ``second_moment`` (E[a²]) and ``deriv_sq`` (E[f'(z)²])."""
    preact_var = _check_positive("preact_var", preact_var)
    f, df = _resolve(activation)
    z, w = _gaussian_nodes(preact_var)
    a = f(z)
    mean = float(w @ a)
    second = float(w @ (a * a))
    return {
        "mean": mean,
        "var": second - mean * mean,
        "second_moment": second,
        "deriv_sq": float(w @ df(z) ** 2),
    }


def asymmetry_factor(activation, preact_var: float) -> float:
    """``E[a²]/Var(a) = 1 + γ²/σ_a²`` for ``z ~ N(0, preact_var)``: the plain layer's
    ``R_f/R_b`` (sigmoid: 18.9 / 6.77 / 3.54 at 0.25 / 1 / 4; ReLU: π/(π−1))."""
    mom = activation_moments(activation, preact_var)
    if mom["var"] <= 0:
        raise ValueError(f"activation={activation!r} has zero output variance")
    return mom["second_moment"] / mom["var"]


def balanced_gain(activation, preact_var: float) -> float:
    """Gain ``g`` (``σ_w = g/√m``) with backward amplification ``m σ_w² E[f'(z)²] = 1`` per
    layer: ``1/√E[f'(z)²]`` (ReLU: √2; sigmoid → 4 as ``preact_var → 0``)."""
    mom = activation_moments(activation, preact_var)
    if mom["deriv_sq"] <= 0:
        raise ValueError(f"activation={activation!r} has E[f'(z)²] = 0")
    return 1.0 / math.sqrt(mom["deriv_sq"])


def linear_gain(activation) -> float:
    """Linear-regime gain ``1/f'(0)`` (sigmoid 4, tanh 1); ReLU has no linear regime at 0."""
    if isinstance(activation, str) and activation.lower() == "relu":
        raise ValueError("activation='relu' is not differentiable at 0; use balanced_gain")
    _, df = _resolve(activation)
    slope = float(df(np.zeros(1))[0])
    if slope == 0:
        raise ValueError(f"activation={activation!r} has f'(0) = 0")
    return 1.0 / abs(slope)


def proposition1_mean(w, mu, bias=0.0):
    """``E[z] = w·μ + b`` for weight row(s) ``w`` (``(m,)`` or ``(n, m)``) and input mean ``mu``
    (``(m,)``, or a scalar ``γ`` meaning ``μ = γ 1_m``). Float for one row, array otherwise."""
    w = np.asarray(w, dtype=float)
    mu = np.asarray(mu, dtype=float)
    mean = w.sum(axis=-1) * mu if mu.ndim == 0 else w @ mu
    out = mean + np.asarray(bias, dtype=float)
    return float(out) if np.ndim(out) == 0 else out


def proposition1_angle(w_norm, mu_norm, cos_theta, bias=0.0):
    """Proposition 1 in angle form: ``‖w‖ ‖μ‖ cos θ + b``."""
    out = (
        np.asarray(w_norm, dtype=float) * np.asarray(mu_norm, dtype=float)
        * np.asarray(cos_theta, dtype=float) + np.asarray(bias, dtype=float)
    )
    return float(out) if np.ndim(out) == 0 else out


def cos_theta(w, mu):
    """``cos θ`` between weight row(s) ``w`` and the mean vector ``mu`` (``(m,)`` or scalar γ)."""
    w = np.asarray(w, dtype=float)
    mu = np.asarray(mu, dtype=float)
    if mu.ndim == 0:
        mu = np.full(w.shape[-1], float(mu))
    out = (w @ mu) / (np.linalg.norm(w, axis=-1) * np.linalg.norm(mu))
    return float(out) if np.ndim(out) == 0 else out


def stripe_ratio(gamma: float, act_var: float, lcw: bool = False) -> float:
    """Predicted stripe ratio of ``z`` (between-unit variance of unit means / mean within-unit
    variance) for i.i.d. inputs of mean ``γ`` and variance ``σ_a²``: ``γ²/σ_a²``; 0 with LCW."""
    act_var = _check_positive("act_var", act_var)
    return 0.0 if lcw else float(gamma) ** 2 / act_var


def forward_amplification(
    m: int, sigma_w2: float, gamma: float = 0.0, act_var: float = 1.0, lcw: bool = False
) -> float:
    """``R_f = Var(z)/Var(a)``: plain ``m σ_w² (1 + γ²/σ_a²)``, LCW ``(m − 1) σ_w²``."""
    m = _check_fan_in(m, lcw)
    sigma_w2 = _check_positive("sigma_w2", sigma_w2)
    act_var = _check_positive("act_var", act_var)
    if lcw:
        return (m - 1) * sigma_w2
    return m * sigma_w2 * (1.0 + float(gamma) ** 2 / act_var)


def backward_amplification(m: int, sigma_w2: float, lcw: bool = False) -> float:
    """``R_b = Var(∂L/∂a)/Var(∂L/∂z)`` (square layer): plain ``m σ_w²``, LCW ``(m − 1) σ_w²``."""
    m = _check_fan_in(m, lcw)
    sigma_w2 = _check_positive("sigma_w2", sigma_w2)
    return (m - 1) * sigma_w2 if lcw else m * sigma_w2


def amplification_ratio(gamma: float, act_var: float, lcw: bool = False) -> float:
    """``R_f/R_b``: plain ``1 + γ²/σ_a²`` (≥ 1, forward amplified more), LCW exactly 1."""
    act_var = _check_positive("act_var", act_var)
    return 1.0 if lcw else 1.0 + float(gamma) ** 2 / act_var
