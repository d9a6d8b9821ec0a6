"""Sequential's fused ReLU -> MaxPool2d backward: the same bits as the two layers' own backward,
the same safety errors, and the fallbacks (channels_last, overlapping windows, the thread pool)."""
import numpy as np
import pytest

import gpuconv as gc
from gpuconv import functional as F
from gpuconv import nn
from gpuconv.engines import cpu_threads as ct
from gpuconv.engines import numpy_engine as ne


def _model(rng, pool=2, stride=None, padding=0, ceil_mode=False, c=3, dtype=np.float32):
    return nn.Sequential(nn.Conv2d(2, c, 3, padding=1, dtype=dtype, rng=rng), nn.ReLU(),
                         nn.MaxPool2d(pool, stride=stride, padding=padding, ceil_mode=ceil_mode))


def _grads(model, x, g, fused, monkeypatch, needs_input_grad=True):
    monkeypatch.setattr(nn, "FUSE_RELU_POOL", fused)
    for p in model.parameters():
        p.zero_grad()
    model(x)
    dx = model.backward(g, needs_input_grad=needs_input_grad)
    return dx, [p.grad.copy() for p in model.parameters()]


CASES = [dict(), dict(pool=3), dict(pool=2, stride=3), dict(pool=3, stride=2),
         dict(pool=2, ceil_mode=True), dict(pool=3, padding=1)]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_backward_is_bit_identical_to_the_layers_own(case, dtype, monkeypatch):
    rng = np.random.default_rng(0)
    model = _model(rng, dtype=dtype, **case)
    x = rng.standard_normal((3, 2, 9, 7)).astype(dtype)
    with gc.no_grad():
        y = model(x)
    g = rng.standard_normal(y.shape).astype(y.dtype)
    g[0, 0, 0, 0] = -g[0, 0, 0, 0] if g[0, 0, 0, 0] > 0 else g[0, 0, 0, 0]  # a negative dy
    taken = []
    real = ne.relu_pool_dgrad
    monkeypatch.setattr(ne, "relu_pool_dgrad", lambda *a: taken.append(real(*a)) or taken[-1])
    for needs in (True, False):
        a = _grads(model, x, g, True, monkeypatch, needs)
        b = _grads(model, x, g, False, monkeypatch, needs)
        if needs:
            assert a[0].dtype == b[0].dtype and a[0].shape == b[0].shape
            np.testing.assert_array_equal(a[0], b[0])
            assert np.array_equal(np.signbit(a[0]), np.signbit(b[0]))  # -0.0 kept
        for u, v in zip(a[1], b[1]):
            np.testing.assert_array_equal(u, v)
    # the one-pass path ran for the non-overlapping pools, and the two steps for the others
    overlapping = case.get("stride", case.get("pool", 2)) < case.get("pool", 2)
    assert len(taken) == 2 and all((t is None) == overlapping for t in taken)


def test_fused_path_is_taken_for_a_2x2_pool_and_matches_the_two_steps():
    rng = np.random.default_rng(1)
    from gpuconv.problem import PoolProblem
    pp = PoolProblem.from_args((4, 5, 8, 6), 2)
    x = rng.standard_normal(pp.x_shape).astype(np.float32)
    x[0, 0, :2, :2] = np.nan        # a NaN input wins its window and passes dy (PyTorch's rule)
    x[1, 1, :2, :2] = 0.0           # a zero wins: dy stops there
    y, idx = F.max_pool2d(np.maximum(x, 0, where=~np.isnan(x), out=x.copy()), 2,
                          return_indices=True)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dy[2, 2, 1, 1] = np.inf         # a non-finite dy: 0 where x <= 0 (np.where), dy elsewhere
    fused = ne.relu_pool_dgrad(pp, x, dy, idx)
    assert fused is not None
    two = F.relu_backward(x, F.max_pool2d_backward(dy, idx, x.shape, 2))
    np.testing.assert_array_equal(fused, two)
    assert np.array_equal(np.signbit(fused), np.signbit(two))
    assert F._relu_max_pool2d_backward(x, dy, idx, 2) is not None
    # with the winners' mask the pool's forward keeps (from y, not x): the same bits
    mask = np.logical_not(np.less_equal(y, 0)).view(np.uint8)
    with_mask = ne.relu_pool_dgrad(pp, x, dy, idx, mask)
    np.testing.assert_array_equal(with_mask, two)
    assert np.array_equal(np.signbit(with_mask), np.signbit(two))


def test_fused_path_declines_overlap_channels_last_and_the_thread_pool(monkeypatch):
    from gpuconv.problem import PoolProblem
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    for args in ((3, 2), (2, 1)):  # overlapping windows
        pp = PoolProblem.from_args(x.shape, *args)
        y, idx = F.max_pool2d(x, *args, return_indices=True)
        assert ne.relu_pool_dgrad(pp, x, np.ones_like(y), idx) is None
        np.testing.assert_array_equal(
            F._relu_max_pool2d_backward(x, np.ones_like(y), idx, *args),
            F.relu_backward(x, F.max_pool2d_backward(np.ones_like(y), idx, x.shape, *args)))
    pp = PoolProblem.from_args(x.shape, 2)
    xl = gc.to_channels_last(x) if hasattr(gc, "to_channels_last") else \
        np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    y, idx = F.max_pool2d(xl, 2, return_indices=True)
    assert ne.relu_pool_dgrad(pp, xl, np.ones_like(y), idx) is None
    monkeypatch.setattr(ct, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(ct, "_cores", lambda: 4)
    ct.set_num_threads(2)
    try:
        y, idx = F.max_pool2d(x, 2, return_indices=True)
        assert ne.relu_pool_dgrad(pp, x, np.ones_like(y), idx) is None
    finally:
        ct.set_num_threads(None)


def test_fused_backward_keeps_the_safety_errors():
    rng = np.random.default_rng(3)
    model = _model(rng)
    x = rng.standard_normal((2, 2, 8, 8)).astype(np.float32)
    y = model(x)
    model.backward(np.ones_like(y))
    with pytest.raises(RuntimeError):  # a second backward after one forward
        model.backward(np.ones_like(y))
    model(x)
    model[1](x)  # the ReLU ran twice in train mode since its last backward
    with pytest.raises(RuntimeError):
        model.backward(np.ones_like(y))


def test_a_replaced_backward_on_the_instance_is_called(monkeypatch):
    rng = np.random.default_rng(4)
    model = _model(rng)
    x = rng.standard_normal((2, 2, 8, 8)).astype(np.float32)
    calls = []
    relu = model[1]
    orig = relu.backward

    def spy(g):
        calls.append(g.shape)
        return orig(g)
    object.__setattr__(relu, "backward", spy)
    try:
        y = model(x)
        model.backward(np.ones_like(y))
    finally:
        del relu.__dict__["backward"]
    assert calls == [(2, 3, 8, 8)]


@pytest.mark.parametrize("pool,stride,kept", [(2, None, 3), (3, 3, 3), (3, 2, 2), (2, 1, 2)])
def test_the_winners_mask_is_kept_only_for_pools_that_use_it(pool, stride, kept):
    rng = np.random.default_rng(5)
    model = _model(rng, pool=pool, stride=stride)
    x = rng.standard_normal((2, 2, 9, 9)).astype(np.float32)
    model(x)
    assert len(model[2]._cache) == kept
    model.eval()
    model(x)  # an eval forward keeps nothing new
    assert len(model[2]._cache) == kept and model[2]._forwards == 1
