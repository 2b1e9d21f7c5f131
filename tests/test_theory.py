"""Closed-form theory: quadrature numbers, gains, Proposition 1 and Monte-Carlo amplification."""

import math

import numpy as np
import pytest
import torch

from lcw_analysis import theory as T


@pytest.mark.parametrize("var, expected", [(0.25, 18.9), (1.0, 6.77), (4.0, 3.54)])
def test_sigmoid_asymmetry_factor(var, expected):
    assert T.asymmetry_factor("sigmoid", var) == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("var", [0.1, 1.0, 7.0])
def test_relu_and_tanh_asymmetry_factor(var):
    assert T.asymmetry_factor("relu", var) == pytest.approx(math.pi / (math.pi - 1), rel=1e-9)
    assert T.asymmetry_factor("tanh", var) == pytest.approx(1.0, abs=1e-12)


def test_moments_match_known_values():
    mom = T.activation_moments("relu", 2.0)  # E[relu] = s/√(2π), E[relu²] = s²/2, E[f'²] = 1/2
    assert mom["mean"] == pytest.approx(math.sqrt(2.0 / (2 * math.pi)), rel=1e-10)
    assert mom["second_moment"] == pytest.approx(1.0, rel=1e-10)
    assert mom["deriv_sq"] == pytest.approx(0.5, rel=1e-10)
    sig = T.activation_moments("sigmoid", 1.0)
    assert sig["mean"] == pytest.approx(0.5, abs=1e-12)
    assert sig["deriv_sq"] == pytest.approx(0.0449, rel=0.01)  # digest §5.3


def test_callables_match_names():
    scalar_relu = lambda z: max(z, 0.0)  # noqa: E731 - a scalar-only callable
    for name, fn in [("sigmoid", torch.sigmoid), ("tanh", np.tanh), ("relu", scalar_relu)]:
        for var in (0.5, 2.0):
            assert T.asymmetry_factor(fn, var) == pytest.approx(T.asymmetry_factor(name, var),
                                                                 rel=1e-9)
            assert T.balanced_gain(fn, var) == pytest.approx(T.balanced_gain(name, var), rel=1e-6)


def test_gains():
    assert T.linear_gain("sigmoid") == pytest.approx(4.0)
    assert T.linear_gain("tanh") == pytest.approx(1.0)
    assert T.linear_gain(torch.sigmoid) == pytest.approx(4.0, rel=1e-8)
    assert T.balanced_gain("relu", 3.0) == pytest.approx(math.sqrt(2.0), rel=1e-9)
    assert T.balanced_gain("sigmoid", 1e-6) == pytest.approx(4.0, rel=1e-5)
    assert T.balanced_gain("sigmoid", 1.0) == pytest.approx(1 / math.sqrt(0.0449), rel=0.01)
    assert T.balanced_gain("tanh", 1.0) > 1.0


@pytest.mark.parametrize(
    "call, param",
    [
        (lambda: T.asymmetry_factor("swish", 1.0), "activation"),
        (lambda: T.asymmetry_factor("sigmoid", 0.0), "preact_var"),
        (lambda: T.balanced_gain("relu", -1.0), "preact_var"),
        (lambda: T.activation_moments(3, 1.0), "activation"),
        (lambda: T.linear_gain("relu"), "relu"),
        (lambda: T.forward_amplification(0, 1.0), "m"),
        (lambda: T.forward_amplification(1, 1.0, lcw=True), "m"),
        (lambda: T.forward_amplification(10, 0.0), "sigma_w2"),
        (lambda: T.forward_amplification(10, 1.0, act_var=0), "act_var"),
        (lambda: T.backward_amplification(10, float("nan")), "sigma_w2"),
        (lambda: T.stripe_ratio(0.5, -1), "act_var"),
    ],
)
def test_bad_input_names_the_parameter(call, param):
    with pytest.raises(ValueError, match=param):
        call()


def test_proposition1_forms_agree():
    rng = np.random.default_rng(0)
    w, mu, b = rng.normal(size=(5, 7)), rng.uniform(size=7), rng.normal(size=5)
    pred = T.proposition1_mean(w, mu, b)
    norms = np.linalg.norm(w, axis=1)
    angle = T.proposition1_angle(norms, np.linalg.norm(mu), T.cos_theta(w, mu), b)
    np.testing.assert_allclose(pred, angle, rtol=1e-12)
    # common mean γ: E[z] = γ w·1 = √m |γ| ‖w‖ cos θ
    g = 0.5
    assert T.proposition1_mean(w[0], g) == pytest.approx(g * w[0].sum())
    assert T.proposition1_mean(w[0], g) == pytest.approx(
        math.sqrt(7) * g * norms[0] * T.cos_theta(w[0], g))
    assert isinstance(T.proposition1_mean(w[0], mu), float)
    # LCW row: zero mean for any common mean
    assert T.proposition1_mean(w[0] - w[0].mean(), 0.73) == pytest.approx(0.0, abs=1e-14)


def test_proposition1_monte_carlo():
    rng = np.random.default_rng(1)
    m = 50
    w = rng.normal(size=(4, m)) / math.sqrt(m)
    a = 1 / (1 + np.exp(-rng.normal(size=(200_000, m))))  # sigmoid of N(0,1): γ = 0.5
    measured = (a @ w.T).mean(axis=0)
    np.testing.assert_allclose(measured, T.proposition1_mean(w, 0.5), atol=3e-3)


def _pooled_amplification(m, sigma_w2, gamma, act_var, lcw, seed):
    """Monte Carlo over data and weights: square layer, pooled variances (samples × units)."""
    rng = np.random.default_rng(seed)
    ratios_f, ratios_b = [], []
    for _ in range(6):
        w = rng.normal(scale=math.sqrt(sigma_w2), size=(m, m))
        if lcw:
            w = w - w.mean(axis=1, keepdims=True)  # w = P u
        a = gamma + math.sqrt(act_var) * rng.standard_normal((1000, m))
        ratios_f.append((a @ w.T).var() / a.var())
        delta = rng.standard_normal((1000, m))
        ratios_b.append((delta @ w).var() / delta.var())
    return np.mean(ratios_f), np.mean(ratios_b)


@pytest.mark.parametrize("lcw", [False, True])
def test_amplification_monte_carlo(lcw):
    m, gamma, act_var = 300, 0.5, 0.25
    sigma_w2 = 1.5 / m
    fwd, bwd = _pooled_amplification(m, sigma_w2, gamma, act_var, lcw, seed=int(lcw))
    r_f = T.forward_amplification(m, sigma_w2, gamma, act_var, lcw=lcw)
    r_b = T.backward_amplification(m, sigma_w2, lcw=lcw)
    assert fwd == pytest.approx(r_f, rel=0.03)
    assert bwd == pytest.approx(r_b, rel=0.03)
    assert fwd / bwd == pytest.approx(T.amplification_ratio(gamma, act_var, lcw=lcw), rel=0.03)
    assert T.stripe_ratio(gamma, act_var, lcw=lcw) == (0.0 if lcw else 1.0)
    if lcw:
        assert r_f == r_b == pytest.approx((m - 1) * sigma_w2)
    else:
        assert r_f / r_b == pytest.approx(2.0)
