"""Streaming accumulators against one-shot torch.var_mean in float64."""

import numpy as np
import pytest
import torch

from lcw_analysis.stats import Moments, RunningMean, batch_moments, reduce_dims, summarize


def test_reduce_dims():
    assert reduce_dims(2, -1) == (0,)
    assert reduce_dims(4, 1) == (0, 2, 3)
    assert reduce_dims(4, -3) == (0, 2, 3)
    assert reduce_dims(3, -1) == (0, 1)


@pytest.mark.parametrize("shape, unit", [((50, 7), -1), ((30, 4, 5, 3), 1), ((20, 6, 9), -1)])
@pytest.mark.parametrize("splits", [[1], [3, 9, 1, 37], [10] * 5])
def test_streamed_equals_one_shot(shape, unit, splits):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 100  # large mean: stability matters
    dims = reduce_dims(x.ndim, unit)
    acc = Moments()
    bounds = np.cumsum([0, *splits]) * x.shape[0] // sum(splits)  # proportional chunks
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        acc.update(x[lo:hi], dims)
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    assert acc.count == x.numel() // mean.numel()
    torch.testing.assert_close(acc.mean, mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(acc.var, var, rtol=1e-10, atol=0)


def test_float32_input_is_reduced_in_float64_without_underflow():
    x = torch.randn(64, 5) * 1e-30  # squares underflow in float32
    count, mean, var = batch_moments(x, (0,))
    assert mean.dtype == var.dtype == torch.float64 and count == 64
    ref_var, ref_mean = torch.var_mean(x.double(), dim=0, correction=0)
    torch.testing.assert_close(var, ref_var, rtol=1e-10, atol=0)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=0)


def test_single_sample_and_empty_batches():
    acc = Moments()
    acc.update(torch.tensor([1.0, 2.0]), ())  # one unbatched sample
    acc.merge(0, torch.zeros(2), torch.zeros(2))  # empty batch: ignored
    acc.update(torch.tensor([[3.0, 6.0]]), (0,))
    assert acc.count == 2
    torch.testing.assert_close(acc.mean, torch.tensor([2.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(acc.var, torch.tensor([1.0, 4.0], dtype=torch.float64))


def test_merge_does_not_modify_inputs_in_place():
    a = batch_moments(torch.randn(10, 3), (0,))
    kept = [t.clone() for t in a[1:]]
    acc = Moments()
    acc.merge(*a)
    acc.update(torch.randn(5, 3), (0,))
    for t, k in zip(a[1:], kept, strict=True):
        assert torch.equal(t, k)


def test_memory_independent_of_samples():
    sizes = []
    for n in (100, 1000):
        acc = Moments()
        for chunk in torch.randn(n, 8).split(10):
            acc.update(chunk, (0,))
        sizes.append(acc.numel())
    assert sizes[0] == sizes[1] == 16


def test_running_mean_and_summary():
    rm = RunningMean()
    rm.merge(2, torch.tensor([1.0]))
    rm.merge(6, torch.tensor([5.0]))
    assert rm.count == 8 and rm.mean.item() == pytest.approx(4.0)
    mean, var = np.array([0.0, 2.0]), np.array([1.0, 3.0])
    s = summarize(mean, var)
    assert s == {"pooled_mean": 1.0, "within_var": 2.0, "between_var": 1.0, "pooled_var": 3.0,
                 "stripe_ratio": 0.5}
    x = torch.tensor([[-1.0, 2 - 3**0.5], [1.0, 2 + 3**0.5]])  # pooled_var = var of all values
    _, m, v = batch_moments(x, (0,))
    assert summarize(m.numpy(), v.numpy())["pooled_var"] == pytest.approx(x.var(correction=0))
