"""Max-pooling and activations on the NumPy engine: naive loops, finite differences, ties, NaN."""
import numpy as np
import pytest

import gpuconv as gc
from gpuconv.problem import PoolProblem

from . import naive

POOLS = [
    ("2x2s2", (2, 3, 8, 8), dict(kernel_size=2)),
    ("3x3s2_odd", (1, 2, 9, 11), dict(kernel_size=3, stride=2)),
    ("3x3s2p1", (2, 2, 7, 8), dict(kernel_size=3, stride=2, padding=1)),
    ("ceil", (1, 2, 8, 9), dict(kernel_size=3, stride=2, ceil_mode=True)),
    ("ceil_pad", (1, 1, 7, 7), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ("ceil_rule_drop", (1, 1, 6, 6), dict(kernel_size=2, stride=3, padding=1, ceil_mode=True)),
    ("dil2", (2, 2, 10, 9), dict(kernel_size=3, stride=1, dilation=2, padding=1)),
    ("pair", (1, 3, 9, 7), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0))),
    ("overlap_s1", (1, 2, 6, 6), dict(kernel_size=3, stride=1)),
]
PIDS = [c[0] for c in POOLS]


def _pp(shape, kw):
    return PoolProblem.from_args(shape, kw["kernel_size"], kw.get("stride"), kw.get("padding", 0),
                                 kw.get("dilation", 1), kw.get("ceil_mode", False))


@pytest.mark.parametrize("case", POOLS, ids=PIDS)
def test_max_pool_matches_naive_loops(case):
    _, shape, kw = case
    x = np.random.default_rng(0).standard_normal(shape)
    y, idx = gc.max_pool2d(x, return_indices=True, **kw)
    ry, ridx = naive.max_pool(_pp(shape, kw), x)
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(idx, ridx)


def test_max_pool_ties_go_to_first_in_row_major_order():
    x = np.zeros((1, 1, 4, 4))  # all equal: every window credits its top-left element
    y, idx = gc.max_pool2d(x, 2, return_indices=True)
    np.testing.assert_array_equal(idx[0, 0], [[0, 2], [8, 10]])
    x = np.array([[[[1.0, 5.0, 5.0], [5.0, 0.0, 5.0], [0.0, 0.0, 0.0]]]])
    _, idx = gc.max_pool2d(x, 2, stride=1, return_indices=True)
    np.testing.assert_array_equal(idx[0, 0], [[1, 1], [3, 5]])
    dx = gc.max_pool2d_backward(np.ones((1, 1, 2, 2)), idx, x.shape, 2, stride=1)
    # overlapping windows add up at the shared winner (index 1 won twice)
    np.testing.assert_array_equal(dx[0, 0], [[0, 2, 0], [1, 0, 1], [0, 0, 0]])


def test_max_pool_nan_propagates_and_first_nan_wins():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    x[0, 0, 0, 1] = np.nan
    x[0, 0, 1, 0] = np.nan
    y, idx = gc.max_pool2d(x, 2, return_indices=True)
    assert np.isnan(y[0, 0, 0, 0]) and idx[0, 0, 0, 0] == 1
    assert not np.isnan(y[0, 0, 1, 1])


def test_max_pool_2x2_nan_outside_every_window_changes_nothing():
    # The pairwise 2x2 path checks y (not x) for NaN: a NaN in the last row of an odd-height
    # input is read by no window, so the result is that of the same input without it.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    y0, i0 = gc.max_pool2d(x, 2, return_indices=True)
    x[1, 2, 4, 1] = np.nan
    y1, i1 = gc.max_pool2d(x, 2, return_indices=True)
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_array_equal(i0, i1)
    x[0, 1, 3, 2] = np.nan  # read by window (1, 1) of plane (0, 1): first NaN wins there
    y2, i2 = gc.max_pool2d(x, 2, return_indices=True)
    assert np.isnan(y2[0, 1, 1, 1]) and i2[0, 1, 1, 1] == 3 * 4 + 2
    assert np.isnan(y2).sum() == 1


def test_max_pool_all_minus_inf_window_credits_an_input_element():
    x = np.full((1, 1, 3, 3), -np.inf)
    y, idx = gc.max_pool2d(x, 2, stride=2, padding=1, return_indices=True)
    assert np.all(y == -np.inf)
    np.testing.assert_array_equal(idx[0, 0], [[0, 1], [3, 4]])  # first in-bounds elements


@pytest.mark.parametrize("case", POOLS, ids=PIDS)
def test_max_pool_backward_matches_finite_differences(case):
    _, shape, kw = case
    rng = np.random.default_rng(1)
    x = rng.permutation(np.prod(shape)).reshape(shape).astype(np.float64)  # distinct: no ties
    x += rng.uniform(0, 0.1, shape)
    y, idx = gc.max_pool2d(x, return_indices=True, **kw)
    dy = rng.standard_normal(y.shape)
    dx = gc.max_pool2d_backward(dy, idx, shape, **kw)
    fd = naive.central_difference(lambda: np.sum(gc.max_pool2d(x, **kw) * dy), x, eps=1e-4)
    np.testing.assert_allclose(dx, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", POOLS, ids=PIDS)
def test_max_pool_matches_pytorch(case):
    torch = pytest.importorskip("torch")
    _, shape, kw = case
    x = np.random.default_rng(2).standard_normal(shape)
    ty, tidx = torch.nn.functional.max_pool2d(torch.from_numpy(x), return_indices=True, **kw)
    y, idx = gc.max_pool2d(x, return_indices=True, **kw)
    np.testing.assert_array_equal(y, ty.numpy())
    np.testing.assert_array_equal(idx, tidx.numpy())


# ---- activations ------------------------------------------------------------------------------
ACTS = [
    ("relu", gc.relu, lambda x, y, dy: gc.relu_backward(x, dy)),
    ("leaky_relu", gc.leaky_relu, lambda x, y, dy: gc.leaky_relu_backward(x, dy)),
    ("sigmoid", gc.sigmoid, lambda x, y, dy: gc.sigmoid_backward(y, dy)),
    ("tanh", gc.tanh, lambda x, y, dy: gc.tanh_backward(y, dy)),
    ("elu", gc.elu, lambda x, y, dy: gc.elu_backward(x, y, dy)),
]


def _away_from_kinks(rng, shape):
    x = rng.standard_normal(shape) * 3
    x[np.abs(x) < 1e-3] = 0.5
    return x


@pytest.mark.parametrize("act", ACTS, ids=[a[0] for a in ACTS])
def test_activation_backward_matches_finite_differences(act):
    _, f, fb = act
    rng = np.random.default_rng(3)
    x = _away_from_kinks(rng, (2, 3, 4, 5))
    dy = rng.standard_normal(x.shape)
    eps = 1e-6
    fd = ((f(x + eps) - f(x - eps)) / (2 * eps)) * dy  # elementwise ops: exact per element
    np.testing.assert_allclose(fb(x, f(x), dy), fd, rtol=1e-6, atol=1e-9)


def test_activation_values():
    x = np.array([-2.0, -0.5, 0.0, 0.5, 3.0])
    np.testing.assert_array_equal(gc.relu(x), [0, 0, 0, 0.5, 3])
    np.testing.assert_allclose(gc.leaky_relu(x), [-0.2, -0.05, 0, 0.5, 3])  # lecture: 0.1
    np.testing.assert_allclose(gc.leaky_relu(x, 0.01), [-0.02, -0.005, 0, 0.5, 3])
    np.testing.assert_allclose(gc.sigmoid(x), 1 / (1 + np.exp(-x)), rtol=1e-15)
    np.testing.assert_allclose(gc.tanh(x), np.tanh(x))
    np.testing.assert_allclose(gc.elu(x, 2.0), np.where(x > 0, x, 2 * (np.exp(x) - 1)))


def test_sigmoid_is_stable_for_large_inputs():
    x = np.array([-1000.0, -40.0, 40.0, 1000.0], dtype=np.float32)
    with np.errstate(all="raise"):
        y = gc.sigmoid(x)
    assert y.dtype == np.float32 and np.all(np.isfinite(y))
    np.testing.assert_allclose(y[1], np.exp(-40.0), rtol=1e-6)  # not flushed to 0 by 1 - ...


def test_activations_propagate_nan_and_keep_dtype():
    x = np.array([np.nan, 1.0, -1.0], dtype=np.float32)
    for f in (gc.relu, gc.leaky_relu, gc.sigmoid, gc.tanh, gc.elu):
        y = f(x)
        assert y.dtype == np.float32 and np.isnan(y[0])


def test_kink_conventions_match_pytorch():
    torch = pytest.importorskip("torch")
    x = np.array([-1.0, 0.0, 1.0])
    dy = np.array([2.0, 3.0, 5.0])
    for ours, theirs in ((lambda: gc.relu_backward(x, dy), torch.relu),
                         (lambda: gc.leaky_relu_backward(x, dy, 0.1),
                          lambda t: torch.nn.functional.leaky_relu(t, 0.1)),
                         (lambda: gc.elu_backward(x, gc.elu(x), dy),
                          torch.nn.functional.elu)):
        t = torch.from_numpy(x.copy()).requires_grad_()
        theirs(t).backward(torch.from_numpy(dy))
        np.testing.assert_allclose(ours(), t.grad.numpy())


def test_maxout_groups_consecutive_channels():
    x = np.arange(24.0).reshape(1, 6, 2, 2)
    x[0, 1] *= -1
    y, idx = gc.maxout(x, 3, return_indices=True)
    assert y.shape == (1, 2, 2, 2)
    np.testing.assert_array_equal(y[0, 0], x[0, 2])
    np.testing.assert_array_equal(y[0, 1], x[0, 5])
    dy = np.ones_like(y)
    dx = gc.maxout_backward(dy, idx, 3, x.shape)
    assert dx.sum() == dy.sum() and np.all(dx[0, 2] == 1) and np.all(dx[0, [0, 1, 3, 4]] == 0)


def test_maxout_backward_matches_finite_differences_on_other_axis():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 8))
    y, idx = gc.maxout(x, 4, axis=-1, return_indices=True)
    dy = rng.standard_normal(y.shape)
    fd = naive.central_difference(lambda: np.sum(gc.maxout(x, 4, axis=-1) * dy), x)
    np.testing.assert_allclose(gc.maxout_backward(dy, idx, 4, x.shape, axis=-1), fd,
                               rtol=1e-6, atol=1e-9)


def test_relu_backward_non_finite_grad_where_input_is_not_positive_gives_zero():
    """PyTorch's threshold_backward: 0 wherever x <= 0, even for an inf or NaN grad_output
    (a multiply by the mask would give NaN there); NaN grads where x > 0 pass through."""
    x = np.array([-1.0, 0.0, 2.0, 3.0, -4.0], np.float32)
    dy = np.array([np.inf, np.nan, np.nan, 1.5, -np.inf], np.float32)
    dx = gc.relu_backward(x, dy)
    assert dx.dtype == np.float32
    np.testing.assert_array_equal(dx, [0, 0, np.nan, 1.5, 0])
    np.testing.assert_array_equal(gc.relu_backward(x, np.ones_like(x)), [0, 0, 1, 1, 0])


@pytest.mark.parametrize("data", ["random", "ties", "inf"])
@pytest.mark.parametrize("kw", [dict(kernel_size=2), dict(kernel_size=2, padding=1),
                                dict(kernel_size=2, stride=3), dict(kernel_size=2, stride=1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_2x2_pairwise_equals_running_max_and_naive(data, kw, dtype, monkeypatch):
    """2x2 windows by pairwise maxima give the running maximum's values and first-maximum
    indices exactly, with ties, infinities and padding, and match the naive loops."""
    from gpuconv.engines import numpy_engine
    rng = np.random.default_rng(23)
    x = rng.standard_normal((2, 3, 9, 8))
    if data == "ties":
        x = np.round(x)
    if data == "inf":
        x.reshape(-1)[rng.choice(x.size, 20, replace=False)] = [np.inf, -np.inf] * 10
    x = x.astype(dtype)
    got = {}
    for pairwise in (True, False):
        monkeypatch.setattr(numpy_engine, "POOL_PAIRWISE_2X2", pairwise)
        got[pairwise] = gc.max_pool2d(x, return_indices=True, **kw)
    for a, b in zip(got[True], got[False]):
        np.testing.assert_array_equal(a, b)
    ry, ridx = naive.max_pool(_pp(x.shape, kw), x)
    np.testing.assert_array_equal(got[True][0], ry)
    np.testing.assert_array_equal(got[True][1], ridx)
