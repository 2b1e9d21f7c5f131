"""The MLP builder: names, variants, initialization and errors."""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lcw_analysis import NORMS, build_mlp, default_gain, lcw_violation, make_activation
from lcw_analysis.models import apply_norm, init_weights
from lcw_analysis.parametrizations import LCW, Centered, Standardized


def test_module_names_are_stable():
    model = build_mlp(40, 10, depth=4, width=16, norm="lcw+bn")
    names = {n for n, _ in model.named_modules()}
    for i in range(4):
        assert {f"hidden.{i}.linear", f"hidden.{i}.norm", f"hidden.{i}.act"} <= names
    assert "head" in names
    plain = build_mlp(40, 10, depth=2, width=16)
    assert not any(n.endswith(".norm") for n, _ in plain.named_modules())


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "gelu"])
def test_every_variant_trains_one_step(norm, activation):
    torch.manual_seed(0)
    model = build_mlp(12, 3, depth=3, width=8, activation=activation, norm=norm)
    x, y = torch.rand(16, 12), torch.randint(0, 3, (16,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    parametrized = {type(p) for m in model.modules() if parametrize.is_parametrized(m)
                    for p in m.parametrizations.weight}
    expected = {"none": set(), "bn": set(), "lcw": {LCW}, "lcw-simple": {LCW}, "lcw+bn": {LCW},
                "centered": {Centered}, "ws": {Standardized}}
    if norm in expected:
        assert parametrized == expected[norm]
    else:  # wn: torch's own weight norm
        assert len(parametrized) == 1 and next(iter(parametrized)).__name__ == "_WeightNorm"
    has_bn = any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    assert has_bn == (norm in ("bn", "lcw+bn"))
    if norm in ("lcw", "lcw-simple", "lcw+bn", "centered", "ws"):
        assert lcw_violation(model) < 1e-5


def test_default_gains():
    assert default_gain("sigmoid", "none") == 1.0
    assert default_gain("sigmoid", "lcw") == 4.0
    assert default_gain("sigmoid", "lcw+bn") == 1.0
    assert default_gain("relu", "lcw") == pytest.approx(math.sqrt(2))
    assert default_gain("leaky_relu") == pytest.approx(math.sqrt(2))
    assert default_gain("tanh", "lcw") == 1.0


@pytest.mark.parametrize("norm", ["none", "lcw", "centered", "wn"])
def test_initialization_scale(norm):
    """Weights are N(0, gain²/fan_in) before the variant (projected: × (1 − 1/m) for zero-sum)."""
    torch.manual_seed(1)
    width, gain = 400, 4.0
    model = build_mlp(400, 10, depth=2, width=width, norm=norm, gain=gain)
    w = model.hidden[1].linear.weight.detach().double()
    expected = gain**2 / width * ((1 - 1 / width) if norm in ("lcw", "centered") else 1.0)
    assert w.var().item() == pytest.approx(expected, rel=0.02)
    assert model.hidden[1].linear.bias.abs().max() == 0


def test_same_seed_same_start_for_zero_sum_variants():
    weights = {}
    for norm in ("lcw", "lcw-simple", "centered"):
        torch.manual_seed(2)
        weights[norm] = build_mlp(10, 3, depth=2, width=6, norm=norm).hidden[0].linear.weight
    torch.testing.assert_close(weights["lcw"], weights["centered"], atol=1e-6, rtol=0)
    torch.testing.assert_close(weights["lcw-simple"], weights["centered"], atol=1e-6, rtol=0)


def test_standardized_rows_match_init_scale():
    torch.manual_seed(3)
    model = build_mlp(64, 3, depth=1, width=32, norm="ws", gain=2.0)
    rows = model.hidden[0].linear.weight.detach()
    torch.testing.assert_close(rows.norm(dim=1), torch.full((32,), 2.0), rtol=1e-3, atol=0)


def test_torch_init_keeps_pytorch_defaults():
    torch.manual_seed(4)
    model = build_mlp(10, 3, depth=1, width=6, init="torch")
    assert model.hidden[0].linear.bias.abs().max() > 0  # PyTorch draws biases uniformly


def test_image_inputs_are_flattened():
    model = build_mlp(64, 10, depth=1, width=8)
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 10)


def test_make_activation_by_name():
    assert isinstance(make_activation("SiLU"), nn.SiLU)
    assert isinstance(make_activation("leaky_relu"), nn.LeakyReLU)
    with pytest.raises(ValueError, match="activation='swishy'.*sigmoid"):
        make_activation("swishy")


def test_bad_input_errors():
    with pytest.raises(ValueError, match="norm='layernorm'.*lcw\\+bn"):
        build_mlp(4, 2, depth=1, width=4, norm="layernorm")
    with pytest.raises(ValueError, match="activation='soft'"):
        build_mlp(4, 2, depth=1, width=4, activation="soft")
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        build_mlp(4, 2, depth=0, width=4)
    with pytest.raises(ValueError, match="width >= 2"):
        build_mlp(4, 2, depth=1, width=1, norm="lcw")
    with pytest.raises(ValueError, match="init='xavier'"):
        build_mlp(4, 2, depth=1, width=4, init="xavier")
    with pytest.raises(ValueError, match="gain must be > 0"):
        build_mlp(4, 2, depth=1, width=4, gain=0.0)
    with pytest.raises(ValueError, match="norm="):
        apply_norm(nn.Linear(3, 3), "batch")
    with pytest.raises(ValueError, match="init="):
        init_weights(nn.Linear(3, 3), 1.0, init="zeros")
