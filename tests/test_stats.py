"""Streaming accumulators against one-shot torch.var_mean in float64."""

import numpy as np
import pytest
import torch

from lcw_analysis.stats import (
    MAX_PENDING,
    Moments,
    RunningMean,
    Scratch,
    batch_moments,
    combine_moments,
    reduce_dims,
    summarize,
)


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


def test_combine_moments_equals_one_shot():
    torch.manual_seed(1)
    x = torch.randn(200, 6, dtype=torch.float64) * 1e-3 + 1e4  # mean >> std
    parts = x.split([1, 7, 50, 2, 140])
    counts, means, variances = zip(*(batch_moments(p, (0,)) for p in parts), strict=True)
    n, mean, var = combine_moments(list(counts), list(means), list(variances))
    ref_var, ref_mean = torch.var_mean(x, dim=0, correction=0)
    assert n == 200
    torch.testing.assert_close(mean, ref_mean, rtol=1e-15, atol=0)
    torch.testing.assert_close(var, ref_var, rtol=1e-9, atol=0)
    assert combine_moments([3], [means[0]], [variances[0]])[1] is means[0]  # one batch: as is


def test_moments_keep_a_bounded_number_of_batches():
    torch.manual_seed(2)
    x = torch.randn(3 * MAX_PENDING + 5, 4, dtype=torch.float64) + 7
    acc = Moments()
    for row in x.split(1):
        acc.update(row, (0,))
        assert len(acc._pending) < MAX_PENDING  # merged at the bound
    assert acc.count == len(x) and len(acc._pending) == 5
    var, mean = torch.var_mean(x, dim=0, correction=0)
    torch.testing.assert_close(acc.mean, mean, rtol=1e-13, atol=0)
    torch.testing.assert_close(acc.var, var, rtol=1e-11, atol=0)
    assert not acc._pending and acc.numel() == 8


@pytest.mark.parametrize(
    "make, dims",
    [
        (lambda: torch.randn(5, 7, 3, dtype=torch.float64), (0, 1)),  # unit axis last
        (lambda: torch.randn(3, 5, 7, dtype=torch.float64).transpose(0, 2), (0, 1)),  # strided
        (lambda: torch.randn(6, 4, 3, 3, dtype=torch.float64), (0, 2, 3)),  # conv
        (lambda: torch.randn(9, 4, dtype=torch.float64).half().double(), (0,)),
        (lambda: torch.randn(4, 6, 5, dtype=torch.float64), (1, 2)),  # unit axis 0
    ],
)
def test_batch_moments_layouts_and_dtypes(make, dims):
    x = make() + 3
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    for dtype in (torch.float64, torch.float32, torch.float16):
        xd = x.to(dtype)
        ref_var, ref_mean = torch.var_mean(xd.double(), dim=dims, correction=0)
        for scratch in (None, Scratch()):
            count, m, v = batch_moments(xd, dims, scratch)
            assert count == x.numel() // mean.numel() and m.dtype == torch.float64
            torch.testing.assert_close(m, ref_mean, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(v, ref_var, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(batch_moments(x, dims)[2], var, rtol=1e-10, atol=0)


def test_batch_moments_of_an_empty_batch():
    count, mean, var = batch_moments(torch.zeros(0, 3), (0,))
    assert count == 0 and mean.shape == var.shape == (3,)
    acc = Moments()
    acc.merge(count, mean, var)
    assert acc.count == 0 and acc.mean is None


def test_scratch_reuses_one_buffer():
    scratch = Scratch(limit=1 << 20)
    cpu = torch.device("cpu")
    a = scratch.get((4, 5), cpu)
    assert a.dtype == torch.float64 and a.shape == (4, 5)
    assert scratch.get((4, 5), cpu).data_ptr() == a.data_ptr()
    b = scratch.get((2, 3), cpu)
    assert b.data_ptr() == a.data_ptr()  # views of the same memory
    big = scratch.get((100, 100), cpu)  # grows the buffer
    assert big.numel() == 10_000 and scratch.get((2, 3), cpu).data_ptr() == big.data_ptr()
    assert scratch.get((1000, 1000), cpu) is None  # over the limit
    assert scratch.get((3,), cpu, torch.float32).dtype == torch.float32


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_and_elementwise_paths_agree(threads):
    """One intra-op thread or a large tensor: one fused kernel; else elementwise kernels."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(3)
        for shape in ((128, 100), (1024, 300)):  # the second is above the fused threshold
            x = torch.randn(*shape) * 1e-4 + 0.5  # float32, mean >> std
            ref_var, ref_mean = torch.var_mean(x.double(), dim=0, correction=0)
            count, mean, var = batch_moments(x, (0,), Scratch())
            assert count == shape[0]
            torch.testing.assert_close(mean, ref_mean, rtol=1e-13, atol=0)
            torch.testing.assert_close(var, ref_var, rtol=1e-9, atol=0)
    finally:
        torch.set_num_threads(before)
