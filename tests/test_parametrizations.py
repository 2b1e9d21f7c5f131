"""LCW, Centered and Standardized parametrizations, apply_lcw and lcw_violation."""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lcw_analysis import LCW, Centered, Standardized, apply_lcw, build_mlp, lcw_violation
from lcw_analysis.parametrizations import helmert_apply, helmert_transpose


def make_layer(kind, bias, dtype):
    layers = {
        "linear": lambda: nn.Linear(12, 5, bias=bias),
        "conv1d": lambda: nn.Conv1d(3, 4, 3, bias=bias),
        "conv2d_groups2": lambda: nn.Conv2d(4, 6, 3, groups=2, bias=bias),
        "conv3d": lambda: nn.Conv3d(2, 3, 2, bias=bias),
    }
    return layers[kind]().to(dtype)


def make_input(kind, dtype):
    shapes = {
        "linear": (16, 12),
        "conv1d": (8, 3, 10),
        "conv2d_groups2": (8, 4, 6, 6),
        "conv3d": (4, 2, 4, 4, 4),
    }
    # Inputs with a common non-zero mean, as after a sigmoid.
    return torch.rand(shapes[kind], dtype=dtype)


def row_sums(layer):
    rows = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
    return rows.sum(1).abs() / rows.norm(dim=1)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d_groups2", "conv3d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("basis", ["orthonormal", "simple"])
def test_rows_sum_to_zero_at_init_and_after_training(kind, bias, dtype, tol, optimizer, basis):
    torch.manual_seed(0)
    layer = apply_lcw(make_layer(kind, bias, dtype), basis=basis)
    assert row_sums(layer).max().item() <= tol
    assert lcw_violation(layer) <= tol
    x = make_input(kind, dtype)
    opt = (
        torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.Adam(layer.parameters(), lr=1e-2)
    )
    w0 = layer.weight.detach().clone()
    for _ in range(100):
        opt.zero_grad()
        out = layer(x)
        loss = ((out - 1.0) ** 2).mean()
        loss.backward()
        opt.step()
    assert not torch.allclose(layer.weight, w0), "the weight should have trained"
    assert row_sums(layer).max().item() <= tol
    if bias:
        assert layer.bias.requires_grad and layer.bias.grad is not None


def brute_force_helmert(m):
    """Dense Helmert basis, column k = (1,…,1, −k, 0,…,0)/√(k(k+1)), built entry by entry."""
    basis = torch.zeros(m, m - 1, dtype=torch.float64)
    for k in range(1, m):
        for j in range(k):
            basis[j, k - 1] = 1.0
        basis[k, k - 1] = -k
        basis[:, k - 1] /= math.sqrt(k * (k + 1))
    return basis


@pytest.mark.parametrize("m", [2, 3, 7, 64])
def test_orthonormal_basis_materialized(m):
    eye = torch.eye(m - 1, dtype=torch.float64)
    basis = helmert_apply(eye).T  # column k = B e_k
    torch.testing.assert_close(basis, brute_force_helmert(m), atol=1e-14, rtol=0)
    torch.testing.assert_close(basis.T @ basis, eye, atol=1e-12, rtol=0)
    proj = torch.eye(m, dtype=torch.float64) - torch.ones(m, m, dtype=torch.float64) / m
    torch.testing.assert_close(basis @ basis.T, proj, atol=1e-12, rtol=0)
    w = torch.randn(5, m, dtype=torch.float64)
    torch.testing.assert_close(helmert_transpose(w), w @ basis, atol=1e-12, rtol=0)


def test_simple_basis_materialized():
    m = 6
    lcw = LCW("simple")
    lcw.right_inverse(torch.zeros(m - 1, m, dtype=torch.float64))
    basis = lcw(torch.eye(m - 1, dtype=torch.float64)).T
    expected = torch.cat([torch.eye(m - 1), -torch.ones(1, m - 1)]).double()
    torch.testing.assert_close(basis, expected)
    assert not torch.allclose(basis.T @ basis, torch.eye(m - 1, dtype=torch.float64))


@pytest.mark.parametrize("basis", ["orthonormal", "simple"])
def test_right_inverse_round_trips_and_projects(basis):
    torch.manual_seed(1)
    w = torch.randn(4, 3, 5, dtype=torch.float64)  # a conv1d-shaped weight, fan-in 15
    projected = w - w.reshape(4, -1).mean(1).reshape(4, 1, 1)
    lcw = LCW(basis)
    v = lcw.right_inverse(projected)
    assert v.shape == (4, 14)
    torch.testing.assert_close(lcw(v), projected, atol=1e-12, rtol=0)
    torch.testing.assert_close(lcw(lcw.right_inverse(w)), projected, atol=1e-12, rtol=0)
    if basis == "orthonormal":  # ‖w‖ = ‖v‖ for an orthonormal basis
        torch.testing.assert_close(v.norm(dim=1), projected.reshape(4, -1).norm(dim=1))


def test_init_variance_of_lcw_weights():
    """Claim 7: v ~ N(0, σ²I) ⇒ Var(w_j) = σ²(1 − 1/m)."""
    torch.manual_seed(2)
    m, sigma = 4, 0.5
    lcw = LCW()
    lcw.right_inverse(torch.zeros(200_000, m))
    w = lcw(sigma * torch.randn(200_000, m - 1, dtype=torch.float64))
    var = w.var(dim=0)
    torch.testing.assert_close(var, torch.full((m,), sigma**2 * (1 - 1 / m), dtype=torch.float64),
                               rtol=0.02, atol=0)


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # so the initial projection is exact in float64 too
    yield
    torch.set_default_dtype(previous)


def trajectory(norm, optimizer, steps=20):
    torch.manual_seed(3)
    model = build_mlp(10, 3, depth=3, width=8, activation="sigmoid", norm=norm)
    x = torch.rand(32, 10, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    opt = optimizer(model.parameters())
    weights = []
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        weights.append([m.weight.detach().clone() for m in model.modules()
                        if isinstance(m, nn.Linear)])
    return weights


def test_lcw_and_centering_coincide_under_momentum_sgd(float64_default):
    sgd = lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9)  # noqa: E731
    lcw, centered = trajectory("lcw", sgd), trajectory("centered", sgd)
    assert len(lcw) == 20
    for step_lcw, step_centered in zip(lcw, centered, strict=True):
        for a, b in zip(step_lcw, step_centered, strict=True):
            assert (a - b).abs().max().item() <= 1e-10
    assert (lcw[-1][0] - lcw[0][0]).abs().max() > 1e-3  # they did move


def test_lcw_and_centering_differ_under_adam(float64_default):
    adam = lambda p: torch.optim.Adam(p, lr=1e-2)  # noqa: E731
    lcw, centered = trajectory("lcw", adam), trajectory("centered", adam)
    gap = max((a - b).abs().max().item() for a, b in zip(lcw[-1], centered[-1], strict=True))
    assert gap > 1e-4


def test_centered_and_standardized_rows():
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 5, 3)
    parametrize.register_parametrization(conv, "weight", Centered())
    assert row_sums(conv).max() < 1e-6
    conv2 = nn.Conv2d(3, 5, 3)
    parametrize.register_parametrization(conv2, "weight", Standardized(eps=1e-8, gain=2.0))
    rows = conv2.weight.detach().reshape(5, -1)
    torch.testing.assert_close(rows.mean(1), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(rows.var(1, correction=0), torch.full((5,), 4.0), rtol=1e-4, atol=0)
    assert lcw_violation(conv2) < 1e-6


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(5)
    model = build_mlp(6, 3, depth=2, width=5, norm="lcw")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(10, 6)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(99)
    fresh = build_mlp(6, 3, depth=2, width=5, norm="lcw")
    assert not torch.equal(fresh(x), model(x))
    fresh.load_state_dict(torch.load(tmp_path / "model.pt"))
    assert torch.equal(fresh(x), model(x))
    assert "hidden.0.linear.parametrizations.weight.original" in model.state_dict()


def test_apply_lcw_on_nested_foreign_model():
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(inplace=True),
        nn.ModuleDict({"inner": nn.Sequential(nn.Conv1d(4, 4, 1), nn.Tanh())}),
        nn.ModuleList([nn.Linear(8, 6), nn.Linear(6, 2, bias=False)]),
    )
    apply_lcw(model)
    constrained = [n for n, m in model.named_modules() if parametrize.is_parametrized(m, "weight")]
    assert constrained == ["0", "2.inner.0", "3.0", "3.1"]
    assert lcw_violation(model) < 1e-6
    # include= selects by qualified name
    other = apply_lcw(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
                      include=lambda name, module: name == "1")
    assert not parametrize.is_parametrized(other[0], "weight")
    assert parametrize.is_parametrized(other[1], "weight")
    assert other[1].bias is not None and not parametrize.is_parametrized(other[1], "bias")


def test_bad_input_errors():
    with pytest.raises(ValueError, match="basis='dense'.*orthonormal"):
        LCW("dense")
    with pytest.raises(ValueError, match="basis"):
        apply_lcw(nn.Linear(3, 3), basis="qr")
    with pytest.raises(ValueError, match="fan-in.*1"):
        apply_lcw(nn.Sequential(nn.Linear(4, 3), nn.Linear(1, 3)))
    with pytest.raises(ValueError, match="fan-in"):
        apply_lcw(nn.Conv2d(1, 3, 1))
    for rnn in (nn.RNN(4, 4), nn.LSTM(4, 4), nn.GRU(4, 4)):
        model = nn.Sequential(nn.Linear(4, 4), rnn)
        with pytest.raises(ValueError, match="65688"):
            apply_lcw(model)
        # nothing was half-applied: the Linear before it is untouched
        assert not parametrize.is_parametrized(model[0], "weight")
    layer = apply_lcw(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="already"):
        apply_lcw(layer)
    with pytest.raises(ValueError, match="no LCW"):
        lcw_violation(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="eps"):
        Standardized(eps=0)


def test_lcw_violation_detects_a_broken_constraint():
    layer = apply_lcw(nn.Linear(5, 3))
    assert lcw_violation(layer) < 1e-6
    with torch.no_grad():
        layer.parametrizations.weight.original.add_(1.0)  # still zero-sum: v is free
    assert lcw_violation(layer) < 1e-5
    centered = nn.Linear(5, 3)
    parametrize.register_parametrization(centered, "weight", Centered())
    parametrize.register_parametrization(centered, "weight", _AddOne())
    assert lcw_violation(centered) > 0.1


class _AddOne(nn.Module):
    def forward(self, w):
        return w + 1.0
