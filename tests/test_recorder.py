"""Recorder: every statistic against a brute-force twin, lifecycle, schedule, probe, frame."""

import copy
import gc
import math
import weakref

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lcw_analysis import build_mlp
from lcw_analysis import recorder as recorder_module
from lcw_analysis.recorder import COLUMNS, Recorder, probe

F64 = torch.float64


# ---------------------------------------------------------------------------------- models
def conv_net(inplace: bool = True) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, groups=2),
        nn.GroupNorm(2, 6),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(6, 4, 2, bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 5),
    ).double()


def make(kind: str) -> nn.Module:
    if kind == "conv":
        return conv_net()
    torch.manual_seed(1)
    norm = kind.split("-")[1]
    return build_mlp(12, 5, depth=3, width=8, activation="sigmoid", norm=norm).double()


def data(kind: str, n: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 3, 6, 6) if kind == "conv" else (n, 12)
    return torch.rand(*shape, generator=g, dtype=F64), torch.randint(0, 5, (n,), generator=g)


def run(model, x, y, splits, rec=None, input_grad=True):
    """Forward/backward in chunks with a sum-reduced loss (per-sample gradients split-free)."""
    for p in model.parameters():
        p.grad = None
    bounds = np.cumsum([0, *splits])
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        xc = x[lo:hi].clone().requires_grad_(input_grad)
        F.cross_entropy(model(xc), y[lo:hi], reduction="sum").backward()


# ---------------------------------------------------------------------------------- twin
def _kind(module):
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return "layer"
    if isinstance(module, (nn.BatchNorm1d, nn.GroupNorm)):
        return "norm"
    if isinstance(module, (nn.Sigmoid, nn.ReLU, nn.Tanh)):
        return "act"
    return None


class Twin:
    """Store everything (clones) and reduce with ``torch.var_mean`` in float64 at the end."""

    def __init__(self, model):
        self.store: dict[tuple[str, str], list[torch.Tensor]] = {}
        self.weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.handles = []
        for name, module in model.named_modules():
            kind = _kind(module)
            if kind is not None:
                self.handles.append(module.register_forward_hook(self._hook(name, kind)))

    def _put(self, key, t):
        self.store.setdefault(key, []).append(t.detach().clone())

    def _grad(self, key, t):
        if t.requires_grad:
            t.register_hook(lambda g: self._put(key, g))

    def _hook(self, name, kind):
        def hook(module, args, out):
            site = {"layer": "z", "norm": "norm", "act": "a"}[kind]
            self._put((name, site), out)
            self._grad((name, "grad_" + site), out)
            if kind == "layer":
                self._put((name, "input"), args[0])
                self._grad((name, "grad_input"), args[0])
                b = None if module.bias is None else module.bias.detach().clone()
                self.weights[name] = (module.weight.detach().clone(), b)

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()

    def all(self, name, site):
        return torch.cat(self.store[(name, site)])

    def moments(self, name, site):
        x = self.all(name, site)
        dims = [d for d in range(x.ndim) if d != 1]
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        return mean, var, x.numel() // mean.numel(), x.var(correction=0).item()


_LOOKUP: list = [None, {}]  # (frame, {(layer, site, stat): rows}) of the last frame queried


def lookup(frame) -> dict:
    if _LOOKUP[0] is not frame:
        _LOOKUP[:] = [frame, dict(iter(frame.groupby(["layer", "site", "stat"], sort=False)))]
    return _LOOKUP[1]


def get(frame, layer, site, stat):
    """One statistic of a single-step frame: a float (summary) or a tensor over units."""
    rows = lookup(frame).get((layer, site, stat))
    assert rows is not None and len(rows), (layer, site, stat)
    if rows.unit.isna().all():
        assert len(rows) == 1, (layer, site, stat)
        return rows.value.iloc[0]
    return torch.tensor(rows.sort_values("unit").value.to_numpy())


def close(a, b, rtol=1e-10, atol=1e-13):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64),
                               rtol=rtol, atol=atol)


def check_against_twin(frame, twin, model):
    names = dict(model.named_modules())
    sites = {site for _, site in twin.store}
    for (name, site) in twin.store:
        if site.startswith("grad_"):
            continue
        rsite = site
        mean, var, count, pooled = twin.moments(name, site)
        close(get(frame, name, rsite, "mean"), mean)
        close(get(frame, name, rsite, "var"), var)
        close(get(frame, name, rsite, "count"), count)
        close(get(frame, name, rsite, "pooled_var"), pooled)
        close(get(frame, name, rsite, "within_var"), var.mean())
        close(get(frame, name, rsite, "between_var"), mean.var(correction=0))
        close(get(frame, name, rsite, "stripe_ratio"), mean.var(correction=0) / var.mean())
        if (name, "grad_" + site) in twin.store:
            gmean, gvar, gcount, gpooled = twin.moments(name, "grad_" + site)
            close(get(frame, name, rsite, "grad_mean"), gmean)
            close(get(frame, name, rsite, "grad_var"), gvar)
            close(get(frame, name, rsite, "grad_count"), gcount)
            close(get(frame, name, rsite, "grad_pooled_var"), gpooled)
        else:
            assert (name, rsite, "grad_mean") not in lookup(frame)
        if site != "z":
            continue
        # weight side and derived layer quantities
        w, b = twin.weights[name]
        rows = w.reshape(w.shape[0], -1)
        close(get(frame, name, "weight", "w_sum"), rows.sum(1))
        close(get(frame, name, "weight", "w_norm"), rows.norm(dim=1))
        mu = twin.moments(name, "input")[0]
        groups = getattr(names[name], "groups", 1)
        taps = w[0, 0].numel()
        mu_b = mu.reshape(groups, 1, -1, 1).expand(groups, w.shape[0] // groups, -1, taps)
        mu_b = mu_b.reshape(w.shape[0], -1)  # μ broadcast over the taps, per unit's group
        dot = (rows * mu_b).sum(1)
        close(get(frame, name, "weight", "w_dot_mu"), dot)
        close(get(frame, name, "weight", "mu_norm"), mu_b.norm(dim=1))
        close(get(frame, name, "weight", "cos_theta"), dot / (rows.norm(dim=1) * mu_b.norm(dim=1)))
        bias = torch.zeros(w.shape[0], dtype=F64) if b is None else b
        if b is not None:
            close(get(frame, name, "weight", "bias"), b)
        close(get(frame, name, "layer", "mean_pred"), dot + bias)
        gamma = mu.reshape(groups, -1).mean(1).repeat_interleave(w.shape[0] // groups)
        close(get(frame, name, "layer", "mean_pred_gamma"), gamma * rows.sum(1) + bias)
        close(get(frame, name, "layer", "gamma"), mu.mean())
        zm = mean
        r2 = 1 - ((zm - dot - bias) ** 2).sum() / ((zm - zm.mean()) ** 2).sum()
        close(get(frame, name, "layer", "mean_pred_r2"), r2, rtol=1e-8, atol=1e-8)
        fwd = pooled / twin.moments(name, "input")[3]
        close(get(frame, name, "layer", "fwd_amp"), fwd)
        if (name, "grad_input") in sites and (name, "grad_z") in sites:
            bwd = twin.moments(name, "grad_input")[3] / twin.moments(name, "grad_z")[3]
            close(get(frame, name, "layer", "bwd_amp"), bwd)
            close(get(frame, name, "layer", "amp_ratio"), fwd / bwd)
    for pname, p in model.named_parameters():
        close(get(frame, pname, "param", "grad_norm"), p.grad.norm())


MODELS = ["mlp-none", "mlp-lcw", "mlp-bn", "conv"]
SPLITS = [(24,), (7, 5, 12), (2, 22)]


@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("kind", MODELS)
def test_every_statistic_matches_brute_force(kind, splits):
    model = make(kind)
    x, y = data(kind)
    twin = Twin(model)
    with Recorder(model) as rec:
        run(model, x, y, splits)
    twin.remove()
    frame = rec.frame()
    check_against_twin(frame, twin, model)
    assert set(frame.site) == {"input", "weight", "z", "layer", "a", "param"} | (
        {"norm"} if kind in ("mlp-bn", "conv") else set())
    assert (frame["mode"] == "train").all() and (frame.step == 0).all()


def _keyed(frame):
    return frame.set_index(["step", "mode", "layer", "site", "stat", "unit"]).value.sort_index()


@pytest.mark.parametrize("kind", MODELS)
def test_streamed_equals_one_shot(kind):
    model = make(kind)
    if kind == "mlp-bn":
        model.eval()  # train-mode BN depends on the split itself
    x, y = data(kind)
    frames = []
    for splits in SPLITS:
        with Recorder(model) as rec:
            run(model, x, y, splits)
        frames.append(_keyed(rec.frame()))
    for other in frames[1:]:
        assert other.index.equals(frames[0].index)
        np.testing.assert_allclose(other.to_numpy(), frames[0].to_numpy(), rtol=1e-10,
                                   atol=1e-13)


def test_in_place_activation_records_pre_and_post_activation():
    x, y = data("conv")
    frames = []
    for inplace in (True, False):
        model = conv_net(inplace)
        with Recorder(model) as rec:
            run(model, x, y, (10, 14))
        frames.append(_keyed(rec.frame()))
    pd.testing.assert_series_equal(frames[0], frames[1], rtol=1e-12, atol=1e-14)
    f = rec.frame()
    z_mean = get(f, "2", "z", "mean")  # conv before GroupNorm: can be negative
    gn = get(f, "3", "norm", "mean")
    a_mean = get(f, "4", "a", "mean")  # in-place ReLU output
    assert (a_mean >= 0).all() and (gn < 0).any() and not torch.allclose(z_mean, gn)
    # gradient w.r.t. the conv output feeding an in-place ReLU directly
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(64, 5)).double()
    twin_model = copy.deepcopy(model)
    twin_model[1].inplace = False
    with Recorder(model) as rec:
        run(model, x, y, (24,), input_grad=False)
    z = twin_model[0](x)
    z.retain_grad()
    a = twin_model[1](z)
    a.retain_grad()
    F.cross_entropy(twin_model[3](twin_model[2](a)), y, reduction="sum").backward()
    f = rec.frame()
    close(get(f, "0", "z", "mean"), z.detach().mean((0, 2, 3)))
    close(get(f, "0", "z", "grad_mean"), z.grad.mean((0, 2, 3)))
    close(get(f, "0", "z", "grad_var"), z.grad.var((0, 2, 3), correction=0))
    close(get(f, "1", "a", "mean"), a.detach().mean((0, 2, 3)))
    close(get(f, "1", "a", "grad_var"), a.grad.var((0, 2, 3), correction=0))
    assert (get(f, "0", "z", "mean") < 0).any()


def test_conv_mean_prediction_and_padding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 1, groups=2), nn.Sigmoid(), nn.Conv2d(6, 6, 3),
                          nn.Sigmoid(), nn.Conv2d(6, 3, 3, padding=1)).double()
    with Recorder(model) as rec:
        model(torch.rand(200, 4, 9, 9, dtype=F64))
    f = rec.frame()
    close(get(f, "0", "layer", "mean_pred"), get(f, "0", "z", "mean"))  # 1×1 kernel: exact
    # 3×3, no padding: taps see shifted windows of a stationary input, equal up to noise
    close(get(f, "2", "layer", "mean_pred"), get(f, "2", "z", "mean"), rtol=0, atol=5e-3)
    # zero padding: border outputs see zeros instead of μ (digest §4.2)
    deviation = (get(f, "4", "layer", "mean_pred") - get(f, "4", "z", "mean")).abs()
    assert (deviation > 0.02).all()


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_load_state_dict_pre_hooks")


def assert_no_hooks(model):
    for module in model.modules():
        for attr in HOOK_DICTS:
            assert not getattr(module, attr, {}), (module, attr)
    for p in model.parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None)
        assert not p._backward_hooks


def test_hooks_removed_on_exit_and_on_exception():
    model = make("mlp-lcw")
    x, y = data("mlp")
    with Recorder(model) as rec:
        assert any(m._forward_hooks for m in model.modules())
        run(model, x, y, (24,))
    assert_no_hooks(model)
    rec.remove()  # idempotent
    rec.remove()
    with pytest.raises(RuntimeError, match="boom"), Recorder(model):
        model(x)
        raise RuntimeError("boom")
    assert_no_hooks(model)
    rec2 = Recorder(model).attach()
    rec2.attach()  # attaching twice registers nothing twice
    rec2.remove()
    assert_no_hooks(model)


def test_no_references_left_behind():
    model = make("mlp-bn")
    x, y = data("mlp")
    rec = Recorder(model).attach()
    out = model(x.clone().requires_grad_())
    loss = F.cross_entropy(out, y)
    loss.backward()
    refs = [weakref.ref(t) for t in (out, loss)]
    del out, loss
    gc.collect()
    assert all(r() is None for r in refs)  # the recorder holds no activation tensors
    assert len(rec.frame())
    wm, wr = weakref.ref(model), weakref.ref(rec)
    rec.remove()
    del model, rec
    gc.collect()
    assert wm() is None and wr() is None


@pytest.mark.parametrize("kind", ["mlp-lcw+bn", "conv"])
def test_outputs_and_gradients_bitwise_equal(kind):
    if kind == "conv":
        base = conv_net()
    else:
        torch.manual_seed(0)
        base = build_mlp(12, 5, depth=3, width=8, norm="lcw+bn")
    x, y = data("conv" if kind == "conv" else "mlp")
    x = x.to(next(base.parameters()).dtype)
    results = []
    for use in (False, True):
        model = copy.deepcopy(base)
        rec = Recorder(model, keep_matrix=4) if use else None
        if rec:
            rec.attach()
        xc = x.clone().requires_grad_()
        out = model(xc)
        F.cross_entropy(out, y).backward()
        if rec:
            rec.remove()
        results.append([out.detach(), xc.grad, *(p.grad for p in model.parameters()),
                        *model.buffers()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_accumulator_memory_does_not_grow_with_samples():
    model = make("conv")
    sizes = []
    for n in (20, 200):
        x, y = data("conv", n)
        with Recorder(model) as rec:
            run(model, x, y, [10] * (n // 10))
        sizes.append(rec.state_numel())
    assert sizes[0] == sizes[1] > 0


def test_proposition1_on_sigmoid_mlp():
    torch.manual_seed(0)
    x = torch.rand(3000, 40)
    stripes = {}
    for norm in ("none", "lcw"):
        torch.manual_seed(0)
        model = build_mlp(40, 10, depth=6, width=64, activation="sigmoid", norm=norm)
        f = probe(model, x, batch_size=1000).frame()
        z = f[(f.site == "z") & (f.stat == "mean")]
        pred = f[(f.site == "layer") & (f.stat == "mean_pred")]
        stripes[norm] = f[(f.site == "z") & (f.stat == "stripe_ratio")].set_index("index").value
        for index in range(2, 7):
            zm = z[z["index"] == index].sort_values("unit").value.to_numpy()
            pm = pred[pred["index"] == index].sort_values("unit").value.to_numpy()
            r2 = 1 - np.sum((zm - pm) ** 2) / np.sum((zm - zm.mean()) ** 2)
            if norm == "none":
                assert r2 >= 0.99, (index, r2)
                r2_frame = f[(f["index"] == index) & (f.stat == "mean_pred_r2")].value.item()
                assert r2_frame == pytest.approx(r2, abs=1e-6)
            else:
                assert np.abs(zm).max() < 0.05  # LCW: no activation shift
    for index in range(2, 7):
        assert stripes["lcw"][index] * 100 <= stripes["none"][index]


def test_every_and_paused():
    model = make("mlp-none")
    x, y = data("mlp")
    with Recorder(model, every=3) as rec:
        for step in range(7):
            rec.begin_step(step)
            assert rec.active == (step % 3 == 0)
            run(model, x, y, (24,))
            if step == 3:  # a second pass in the same step is merged
                run(model, x, y, (24,))
            with rec.paused():
                assert not rec.active
                with torch.no_grad():
                    model.eval()
                    model(x)
                    model.train()
    f = rec.frame()
    assert sorted(set(f.step)) == [0, 3, 6]
    assert set(f["mode"]) == {"train"}
    counts = f[(f.layer == "head") & (f.site == "z") & (f.stat == "count")].set_index("step")
    assert counts.value.to_dict() == {0: 24, 3: 48, 6: 24}


def test_default_step_is_zero_and_eval_mode_is_reported():
    model = make("mlp-bn").eval()
    x, _ = data("mlp")
    with Recorder(model) as rec:
        with torch.no_grad():
            model(x)
    f = rec.frame()
    assert set(f.step) == {0} and set(f["mode"]) == {"eval"}
    assert not (f.stat.str.startswith("grad_")).any()  # no backward pass


def test_probe_leaves_training_state_untouched():
    torch.manual_seed(0)
    model = build_mlp(12, 5, depth=3, width=8, norm="bn")
    x, y = data("mlp")
    x = x.float()
    F.cross_entropy(model(x), y).backward()  # existing grads and BN statistics
    model.hidden[1].eval()  # a mixed state must come back exactly
    model.head.bias.grad = None
    flags = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    grad_values = {n: None if g is None else g.clone() for n, g in grads.items()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    state = torch.random.get_rng_state()
    for mode in ("train", "eval"):
        rec = probe(model, x, y, mode=mode, batch_size=10, keep_matrix=3)
        f = rec.frame()
        assert set(f["mode"]) == {mode}
        assert (f.stat == "grad_norm").any() and (f.stat == "bwd_amp").any()
        assert {n: m.training for n, m in model.named_modules()} == flags
        for n, p in model.named_parameters():
            assert p.grad is grads[n]
            assert (p.grad is None) or torch.equal(p.grad, grad_values[n])
        for n, b in model.named_buffers():
            assert torch.equal(b, buffers[n]), n
        assert_no_hooks(model)
        assert all(m.shape[1] == 3 for m in rec.matrices().values())
    assert torch.equal(torch.random.get_rng_state(), state)


def test_probe_streams_like_one_batch():
    model = make("mlp-lcw")
    x, y = data("mlp", 30)
    full = _keyed(probe(model, x, y).frame())
    streamed = _keyed(probe(model, x, y, batch_size=7).frame())
    assert streamed.index.equals(full.index)
    np.testing.assert_allclose(streamed.to_numpy(), full.to_numpy(), rtol=1e-10, atol=1e-13)
    forward_only = probe(model, x, step=5).frame()
    assert set(forward_only.step) == {5} and not forward_only.stat.str.startswith("grad").any()


def test_probe_bad_arguments():
    model = make("mlp-none")
    x, y = data("mlp")
    with pytest.raises(ValueError, match="mode"):
        probe(model, x, y, mode="test")
    with pytest.raises(ValueError, match="batch_size"):
        probe(model, x, y, batch_size=0)


def test_site_selection():
    model = make("mlp-bn")
    x, y = data("mlp")

    def layers(sites):
        with Recorder(model, sites=sites) as rec:
            run(model, x, y, (24,))
        f = rec.frame()
        return set(f[f.site != "param"].layer), set(f[f.site == "param"].layer), f

    mods, params, f = layers("hidden.1.*")
    assert mods == {"hidden.1.linear", "hidden.1.norm", "hidden.1.act"}
    assert params == {"hidden.1.linear.weight", "hidden.1.norm.weight", "hidden.1.norm.bias"}
    assert set(f[f.layer == "hidden.1.act"]["index"]) == {2}  # index counts unselected layers
    mods, _, f = layers(lambda name, m: isinstance(m, nn.Linear))
    assert mods == {"hidden.0.linear", "hidden.1.linear", "hidden.2.linear", "head"}
    assert set(f.site) == {"input", "weight", "z", "layer", "param"}
    mods, _, _ = layers(["head", "*.act"])
    assert mods == {"head", "hidden.0.act", "hidden.1.act", "hidden.2.act"}
    with pytest.raises(ValueError, match="sites"):
        Recorder(model, sites="nothing.*")
    with pytest.raises(ValueError, match="sites"):
        Recorder(model, sites=3)
    with pytest.raises(ValueError, match="every"):
        Recorder(model, every=0)
    with pytest.raises(ValueError, match="keep_matrix"):
        Recorder(model, keep_matrix=-1)


def test_keep_matrix_is_capped():
    model = make("conv")
    x, y = data("conv")
    with Recorder(model, keep_matrix=5) as rec:
        for step in range(2):
            rec.begin_step(step)
            run(model, x, y, (3, 3, 18))
    mats = rec.matrices()
    # Linear/Conv outputs z, and the GroupNorm "3" output (norm sites are kept too)
    assert set(mats) == {(s, n) for s in (0, 1) for n in ("0", "2", "3", "5", "8")}
    assert mats[(0, "0")].shape == (4, 5, 6, 6)  # channels × samples × spatial
    assert mats[(1, "8")].shape == (5, 5)  # units × samples
    assert mats[(0, "3")].shape == (6, 5, 6, 6)
    z = model[0](x[:5]).detach()
    np.testing.assert_allclose(mats[(1, "0")], z.movedim(1, 0).numpy(), rtol=1e-12)
    with Recorder(model) as rec:
        run(model, x, y, (24,))
    assert rec.matrices() == {}


def test_frame_schema_and_plotting():
    model = make("mlp-lcw")
    x, y = data("mlp")
    with Recorder(model) as rec:
        run(model, x, y, (24,))
    f = rec.frame()
    assert tuple(f.columns) == COLUMNS
    assert str(f["unit"].dtype) == "Int64" and str(f["index"].dtype) == "Int64"
    assert f.value.dtype == np.float64 and f.step.dtype == np.int64
    assert set(f.site) <= {"z", "norm", "a", "input", "weight", "layer", "param"}
    assert f[f.site == "z"]["index"].tolist() == sorted(f[f.site == "z"]["index"])
    summary = f[f.unit.isna()]
    assert not summary.duplicated(["step", "mode", "layer", "site", "stat"]).any()
    assert set(f[f.site == "param"].layer) == {n for n, _ in model.named_parameters()}
    assert "hidden.0.linear.parametrizations.weight.original" in set(f.layer)  # LCW's free v
    empty = Recorder(model).frame()
    assert tuple(empty.columns) == COLUMNS and len(empty) == 0
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns

    ax = sns.lineplot(data=f[(f.site == "z") & (f.stat == "var")], x="index", y="value",
                      hue="layer")
    assert ax is not None
    sns.heatmap(rec.matrices().get((0, "head"), np.zeros((2, 2))))
    import matplotlib.pyplot as plt

    plt.close("all")
    assert math.isfinite(get(f, "hidden.1.linear", "layer", "amp_ratio"))


def test_any_model_sequence_layers_and_layer_norm():
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True,
                                       activation=nn.GELU()).double()
    x = torch.randn(6, 5, 8, dtype=F64)
    twin_out, twin_grad = [], []

    def store(module, args, out):
        twin_out.append(out.detach().clone())
        out.register_hook(lambda g: twin_grad.append(g.clone()))

    handle = model.linear1.register_forward_hook(store)
    with Recorder(model) as rec:
        model(x).square().sum().backward()
    handle.remove()
    f = rec.frame()
    z, g = twin_out[0].reshape(-1, 16), twin_grad[0].reshape(-1, 16)  # units = last axis
    close(get(f, "linear1", "z", "mean"), z.mean(0))
    close(get(f, "linear1", "z", "grad_var"), g.var(0, correction=0))
    close(get(f, "linear1", "z", "count"), 30)
    assert len(get(f, "norm1", "norm", "mean")) == 8  # LayerNorm: the feature axis
    assert len(get(f, "activation", "a", "mean")) == 16
    assert set(f[f.layer == "activation"]["index"]) == {1}  # after linear1 (forward order)


def test_layer_index_counts_linear_and_conv_only():
    model = make("mlp-bn")
    x, _ = data("mlp")
    with Recorder(model, sites="*.act") as rec:
        model(x)
    assert rec.layer_index == {"hidden.0.linear": 1, "hidden.1.linear": 2, "hidden.2.linear": 3,
                               "head": 4}


def test_inference_mode_and_unbatched_input():
    model = make("mlp-none")
    x, _ = data("mlp")
    with Recorder(model) as rec, torch.inference_mode():
        model(x)
    with Recorder(model) as rec2, torch.no_grad():
        model(x)
    assert _keyed(rec.frame()).index.equals(_keyed(rec2.frame()).index)
    np.testing.assert_allclose(_keyed(rec.frame()).to_numpy(), _keyed(rec2.frame()).to_numpy(),
                               rtol=1e-12)
    layer = nn.Linear(4, 3).double()
    with Recorder(layer) as rec:
        layer(torch.ones(4, dtype=F64))  # one unbatched sample
    f = rec.frame()
    assert get(f, "", "z", "count") == 1 and set(f["index"]) == {1}
    close(get(f, "", "z", "mean"), layer(torch.ones(4, dtype=F64)).detach())


def test_vanishing_gradients_do_not_underflow():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2))
    x = torch.rand(8, 4)
    with Recorder(model) as rec:
        (model(x).sum() * 1e-30).backward()  # float32 squares of 1e-30 underflow to 0
    f = rec.frame()
    assert 1e-32 < get(f, "2.weight", "param", "grad_norm") < 1e-28
    assert (get(f, "0", "z", "grad_var") > 0).all() and get(f, "0", "z", "grad_pooled_var") > 0


def test_keep_matrix_for_norm_sites():
    model = make("mlp-bn")
    x, y = data("mlp")
    outputs = {}

    def store(name):
        def hook(module, args, out):
            outputs.setdefault(name, []).append(out.detach().clone())

        return hook

    handles = [model.get_submodule(f"hidden.{i}.norm").register_forward_hook(
        store(f"hidden.{i}.norm")) for i in range(3)]
    with Recorder(model, keep_matrix=5) as rec:
        run(model, x, y, (3, 21))
    for h in handles:
        h.remove()
    mats = rec.matrices()
    norms = {(0, f"hidden.{i}.norm") for i in range(3)}
    linears = {(0, f"hidden.{i}.linear") for i in range(3)} | {(0, "head")}
    assert set(mats) == norms | linears
    for _, name in norms:
        bn_out = torch.cat(outputs[name])[:5]  # the BN output that enters the activation
        assert mats[(0, name)].shape == (8, 5)  # units × samples
        np.testing.assert_array_equal(mats[(0, name)], bn_out.T.numpy())
    with Recorder(model, keep_matrix=2, sites="hidden.1.norm") as rec:
        run(model, x, y, (24,))
    assert set(rec.matrices()) == {(0, "hidden.1.norm")}


def test_hooks_are_on_the_model_only_in_recorded_steps():
    model = make("mlp-none")
    x, y = data("mlp")

    def hooked():
        return any(m._forward_hooks for m in model.modules())

    with Recorder(model, every=3) as rec:
        for step in range(5):
            rec.begin_step(step)
            assert hooked() == (step % 3 == 0) == rec.active
            run(model, x, y, (24,))
    assert not hooked()
    assert sorted(set(rec.frame().step)) == [0, 3]


@pytest.mark.parametrize("backward", [True, False])
def test_many_passes_in_one_step_equal_one_pass(backward, monkeypatch):
    monkeypatch.setattr(recorder_module, "_PENDING_LIMIT", 50)  # merge kept batches often
    model = make("mlp-lcw")
    x, y = data("mlp", 3 * 80)
    frames, sizes = [], []
    for splits in ([3] * 80, [240]):  # more passes than MAX_PENDING
        with Recorder(model) as rec:
            if backward:
                run(model, x, y, splits)
            else:
                with torch.no_grad():
                    for chunk in x.split(splits):
                        model(chunk)
        frames.append(_keyed(rec.frame()))
        sizes.append(rec.state_numel())
    assert frames[0].index.equals(frames[1].index)
    np.testing.assert_allclose(frames[0].to_numpy(), frames[1].to_numpy(), rtol=1e-9, atol=1e-12)
    assert sizes[0] == sizes[1]


def test_weight_side_is_read_before_the_optimizer_step():
    model = make("mlp-none")
    x, y = data("mlp")
    twin = Twin(model)  # clones the weights at forward time
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    with Recorder(model) as rec:
        rec.begin_step(0)
        run(model, x, y, (24,))
        opt.step()  # changes every weight in place
        rec.begin_step(1)
    twin.remove()
    f = rec.frame()
    f = f[f.step == 0]
    for name in ("hidden.0.linear", "head"):
        w, b = twin.weights[name]
        close(get(f, name, "weight", "w_sum"), w.sum(1))
        close(get(f, name, "weight", "bias"), b)
        mu = twin.moments(name, "input")[0]
        close(get(f, name, "weight", "w_dot_mu"), w @ mu)


def test_a_paused_backward_records_no_gradients_but_keeps_the_weight_side():
    model = make("mlp-none")
    x, y = data("mlp")
    w0 = model.head.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    with Recorder(model) as rec:
        out = model(x)
        with rec.paused():
            F.cross_entropy(out, y).backward()
        opt.step()
        rec.begin_step(1)
    f = rec.frame()
    assert not f.stat.str.startswith("grad").any()
    close(get(f, "head", "weight", "w_sum"), w0.sum(1))


def test_a_weight_changed_in_place_before_backward_warns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2)).double()
    x = torch.rand(8, 4, dtype=F64)
    with Recorder(model):
        out = model(x)
        with torch.no_grad():
            model[0].weight.add_(1.0)  # allowed: not saved for backward (x needs no grad)
        with pytest.warns(RuntimeWarning, match="changed in place"):
            out.sum().backward()


def test_inference_mode_and_training_passes_with_one_recorder():
    model = make("mlp-lcw")
    x, y = data("mlp")
    with Recorder(model) as rec:
        with torch.inference_mode():
            model(x)  # reused buffers are allocated here ...
        run(model, x, y, (24,))  # ... and written to outside inference mode
        rec.begin_step(1)
        with torch.inference_mode():
            model(x)
    f = rec.frame()
    assert sorted(set(f.step)) == [0, 1]
    assert get(f[f.step == 0], "head", "z", "count") == 48  # both passes of step 0
