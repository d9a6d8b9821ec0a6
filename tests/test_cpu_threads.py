"""The NumPy engine's batch split over threads (gpuconv.engines.cpu_threads).

Every split op is run with the split forced on (tiny MIN_ELEMENTS, 3 parts so that one part is
shorter) and checked against the float64 naive loops, against the unsplit op, and against
itself run again (bit-identical). Element-wise ops and pooling must equal the unsplit op
exactly; convolutions may differ from it in the last bits (BLAS on one thread per part).
"""
import threading

import numpy as np
import pytest

import gpuconv as gc
from gpuconv.engines import cpu_threads as ct
from gpuconv.engines import numpy_engine as ne
from gpuconv.problem import ConvProblem, PoolProblem

from . import naive
from .problems import IDS, PROBLEMS
from .test_pool_act_numpy import PIDS, POOLS, _pp


@pytest.fixture
def split(monkeypatch):
    """Force the split: 3 threads allowed (even on a 2-core machine) and no size threshold."""
    monkeypatch.setattr(ct, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(ct, "_cores", lambda: 4)
    ct.set_num_threads(3)
    yield
    ct.set_num_threads(None)


def _unsplit(fn, *args):
    ct.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        ct.set_num_threads(3)


def _problem(case, batch=5):
    _, xs, ws, kw = case
    xs = (batch,) + tuple(xs[1:])
    p = ConvProblem.from_args(xs, ws, **kw)
    rng = np.random.default_rng(len(case[0]))
    x = rng.standard_normal(p.x_shape).astype(np.float32)
    w = rng.standard_normal(p.w_shape).astype(np.float32)
    b = rng.standard_normal(p.K).astype(np.float32)
    dy = rng.standard_normal(p.y_shape).astype(np.float32)
    return p, x, w, b, dy


def test_parts_cover_the_batch_in_near_equal_contiguous_ranges(split):
    assert ct.parts(7, 7) == [(0, 3), (3, 5), (5, 7)]
    assert ct.parts(2, 100) == [(0, 1), (1, 2)]  # never more parts than images
    assert ct.parts(1, 100) is None


def test_no_split_on_one_thread_small_ops_or_inside_a_part(monkeypatch):
    monkeypatch.setattr(ct, "_cores", lambda: 4)
    monkeypatch.setattr(ct, "MIN_ELEMENTS", 1 << 16)
    ct.set_num_threads(1)
    try:
        assert ct.parts(64, 1 << 30) is None
        ct.set_num_threads(2)
        assert ct.parts(64, 2 * ct.MIN_ELEMENTS) == [(0, 32), (32, 64)]
        assert ct.parts(64, 2 * ct.MIN_ELEMENTS - 1) is None  # a part would be below the limit
        seen = []
        ct.run(lambda i, a, b: seen.append(ct.parts(64, 1 << 30)), [(0, 1), (1, 2)])
        assert seen == [None, None]  # nested: the parts run their own work serially
    finally:
        ct.set_num_threads(None)


def test_off_by_default_and_set_by_the_environment_or_the_call(monkeypatch):
    monkeypatch.setattr(ct, "_cores", lambda: 8)
    monkeypatch.delenv("GPUCONV_CPU_THREADS", raising=False)
    ct.set_num_threads(None)  # (re)reads the environment
    assert ct.get_num_threads() == 1 and ct.parts(64, 1 << 30) is None
    monkeypatch.setenv("GPUCONV_CPU_THREADS", "3")
    assert ct.get_num_threads() == 1  # read once, as OMP_NUM_THREADS: a change needs the call
    ct.set_num_threads(None)
    assert ct.get_num_threads() == 3
    monkeypatch.setenv("GPUCONV_CPU_THREADS", "two")
    ct.set_num_threads(None)
    with pytest.raises(ValueError, match="GPUCONV_CPU_THREADS"):
        ct.get_num_threads()
    ct.set_num_threads(16)
    try:
        assert ct.get_num_threads() == 8  # never more than the cores we may run on
    finally:
        ct.set_num_threads(None)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2"])
def test_set_num_threads_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="num_threads"):
        ct.set_num_threads(bad)


@pytest.mark.parametrize("case", PROBLEMS, ids=IDS)
def test_split_convolutions_match_naive_loops_unsplit_and_themselves(split, case):
    p, x, w, b, dy = _problem(case)
    assert ne._split(p, 1 << 30) is not None or p.N < 2  # depthwise layers split too
    ops = [("fprop", lambda: ne.conv_fprop(p, x, w, b), lambda: naive.conv_fprop(p, x, w, b)),
           ("dgrad", lambda: ne.conv_dgrad(p, w, dy), lambda: naive.conv_dgrad(p, w, dy)),
           ("wgrad", lambda: ne.conv_wgrad(p, x, dy), lambda: naive.conv_wgrad(p, x, dy))]
    for name, op, ref in ops:
        got = op()
        assert got.dtype == np.float32, name
        r = ref()
        np.testing.assert_allclose(got, r, rtol=1e-4, atol=1e-4 * np.abs(r).max(), err_msg=name)
        np.testing.assert_allclose(got, _unsplit(op), rtol=1e-5, atol=1e-6 * np.abs(r).max(),
                                   err_msg=name)
        np.testing.assert_array_equal(got, op(), err_msg=name)  # run to run: bit-identical


@pytest.mark.parametrize("case", PROBLEMS[:3] + PROBLEMS[8:11], ids=IDS[:3] + IDS[8:11])
def test_split_convolutions_in_float64_match_naive_loops_closely(split, case):
    p, x, w, b, dy = _problem(case)
    _check_three_ops(p, *(a.astype(np.float64) for a in (x, w, b, dy)), tol=1e-12)


def _check_three_ops(p, x, w, b, dy, tol):
    for op in ("conv_fprop", "conv_dgrad", "conv_wgrad"):
        args = {"conv_fprop": (x, w, b), "conv_dgrad": (w, dy), "conv_wgrad": (x, dy)}[op]
        want = getattr(naive, op)(p, *args)
        np.testing.assert_allclose(getattr(ne, op)(p, *args), want, rtol=tol,
                                   atol=tol * max(1.0, np.abs(want).max()), err_msg=op)


def test_split_within_memory_chunks(split, monkeypatch):
    """Each part is itself cut into column-matrix chunks when the workspace limit says so."""
    p, x, w, b, dy = _problem(PROBLEMS[1], batch=9)
    monkeypatch.setattr(ne, "WORKSPACE_BYTES", 2 * p.im2col_elements() // p.N * 4)
    assert len(ne._batch_chunks(p.with_batch(3), "fprop", 4)) > 1
    _check_three_ops(p, x, w, b, dy, tol=1e-4)


def test_split_wgrad_reuses_each_parts_columns_only_for_the_same_input(split):
    """fprop's column matrices are remembered per part thread; wgrad after an in-place change
    of x must expand x again."""
    p, x, w, b, dy = _problem(PROBLEMS[1], batch=7)
    ne.conv_fprop(p, x, w, b)
    np.testing.assert_allclose(ne.conv_wgrad(p, x, dy), naive.conv_wgrad(p, x, dy),
                               rtol=1e-4, atol=1e-3)
    ne.conv_fprop(p, x, w, b)
    x[-1] += 1.0  # the last part's images change in place
    np.testing.assert_allclose(ne.conv_wgrad(p, x, dy), naive.conv_wgrad(p, x, dy),
                               rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("case", POOLS, ids=PIDS)
def test_split_max_pool_equals_unsplit_exactly(split, case):
    _, shape, kw = case
    shape = (5,) + tuple(shape[1:])
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    x[1, 0, 0, :3] = np.nan  # NaN windows in one part
    x[3, -1] = -np.inf  # an all -inf plane in another (padded windows credit an input element)
    pp = _pp(shape, kw)
    y, idx = ne.pool_fprop(pp, x)
    ry, ridx = _unsplit(ne.pool_fprop, pp, x)
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(idx, ridx)
    assert idx.dtype == np.int64 and y.dtype == np.float32
    ny, nidx = naive.max_pool(pp, np.nan_to_num(x, nan=0.0))  # the loops skip NaN semantics
    xz = np.nan_to_num(x, nan=0.0)
    np.testing.assert_array_equal(ne.pool_fprop(pp, xz)[0], ny)
    np.testing.assert_array_equal(ne.pool_fprop(pp, xz)[1], nidx)
    dy = np.random.default_rng(2).standard_normal(y.shape).astype(np.float32)
    dx = ne.pool_dgrad(pp, dy, idx)
    np.testing.assert_array_equal(dx, _unsplit(ne.pool_dgrad, pp, dy, idx))
    assert dx.dtype == np.float32 and dx.shape == shape


def test_split_relu_equals_unsplit_exactly_with_pytorchs_non_finite_rules(split):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 3, 4, 7)).astype(np.float32)
    x.flat[[0, 200, 400]] = [np.nan, -np.inf, 0.0]
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dy.flat[[1, 5, 300]] = [np.inf, np.nan, -np.inf]
    x.flat[300] = -1.0  # a non-finite dy where x <= 0: PyTorch gives 0 there
    y = ne.act_fprop("relu", x)
    np.testing.assert_array_equal(y, _unsplit(ne.act_fprop, "relu", x))
    dx = ne.act_dgrad("relu", x, y, dy)
    np.testing.assert_array_equal(dx, _unsplit(ne.act_dgrad, "relu", x, y, dy))
    assert dx.flat[300] == 0 and np.isnan(y.flat[0]) and y.flat[200] == 0


def test_an_error_in_a_part_reaches_the_caller_and_the_pool_stays_usable(split):
    def boom(i, a, b):
        if i == 2:
            raise RuntimeError("part 2 failed")

    with pytest.raises(RuntimeError, match="part 2 failed"):
        ct.run(boom, ct.parts(6, 6))
    out = np.zeros(6)
    ct.run(lambda i, a, b: out.__setitem__(slice(a, b), i), ct.parts(6, 6))
    np.testing.assert_array_equal(out, [0, 0, 1, 1, 2, 2])


def test_blas_thread_limit_is_one_inside_a_split_and_restored_after(split):
    ctl = ct._blas_controllers()
    if not ctl:
        pytest.skip("threadpoolctl finds no BLAS to control here")
    before = [c.get_num_threads() for c in ctl]
    seen = []
    ct.run(lambda i, a, b: seen.append([c.get_num_threads() for c in ctl]), [(0, 1), (1, 2)])
    assert all(all(n == 1 for n in s) for s in seen)
    assert [c.get_num_threads() for c in ctl] == before


def test_two_caller_threads_at_once_both_get_right_answers(split):
    p, x, w, b, dy = _problem(PROBLEMS[1], batch=6)
    want = naive.conv_fprop(p, x, w, b)
    got, errors = [], []

    def work():
        try:
            for _ in range(5):
                got.append(ne.conv_fprop(p, x, w, b))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=work) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors and len(got) == 15
    for g in got:
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4)


def test_a_training_step_with_the_split_is_bit_identical_run_to_run(split):
    def step():
        rng = np.random.default_rng(0)
        model = gc.nn.Sequential(gc.nn.Conv2d(2, 4, 3, padding=1, rng=rng), gc.nn.ReLU(),
                                 gc.nn.MaxPool2d(2), gc.nn.Flatten(), gc.nn.Linear(4 * 4 * 4, 3,
                                                                                    rng=rng))
        x = rng.standard_normal((5, 2, 8, 8)).astype(np.float32)
        loss = gc.nn.CrossEntropyLoss()
        value = loss(model(x), rng.integers(0, 3, 5))
        model.backward(loss.backward(), needs_input_grad=False)
        return value, [q.grad.copy() for q in model.parameters()]

    (l1, g1), (l2, g2) = step(), step()
    assert l1 == l2
    for a, b in zip(g1, g2):
        np.testing.assert_array_equal(a, b)


def test_split_gradients_match_finite_differences_in_float64(split):
    p, x, w, b, dy = _problem(PROBLEMS[2], batch=3)  # stride 2 with uncovered rows
    x, w, dy = (a.astype(np.float64) for a in (x, w, dy))

    def loss_x():  # central_difference perturbs x (then w) in place
        return float((ne.conv_fprop(p, x, w) * dy).sum())

    def loss_w():
        return float((ne.conv_fprop(p, x, w) * dy).sum())

    np.testing.assert_allclose(ne.conv_dgrad(p, w, dy), naive.central_difference(loss_x, x),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ne.conv_wgrad(p, x, dy), naive.central_difference(loss_w, w),
                               rtol=1e-6, atol=1e-6)


def test_public_api_uses_the_split_and_gives_the_same_layer_results(split):
    x = np.random.default_rng(4).standard_normal((6, 3, 9, 9)).astype(np.float32)
    w = np.random.default_rng(5).standard_normal((4, 3, 3, 3)).astype(np.float32)
    y = gc.conv2d(x, w, padding=1)
    np.testing.assert_allclose(y, _unsplit(gc.conv2d, x, w, None, 1, 1), rtol=1e-5, atol=1e-5)
    pp = PoolProblem.from_args(y.shape, 2)
    np.testing.assert_array_equal(gc.max_pool2d(y, 2), _unsplit(ne.pool_fprop, pp, y)[0])


def test_linear_layers_split_their_matmuls_rows_and_match_the_unsplit_result(split):
    rng = np.random.default_rng(6)
    a = rng.standard_normal((7, 5)).astype(np.float32)
    b = rng.standard_normal((5, 3)).astype(np.float32)
    assert ct.parts(7, 7 * 8) is not None
    np.testing.assert_allclose(ct.matmul(a, b), a @ b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ct.matmul(b.T, a.T), b.T @ a.T, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ct.matmul(a, b), ct.matmul(a, b))
    layer = gc.nn.Linear(5, 3, rng=np.random.default_rng(7))
    y = layer(a)
    np.testing.assert_allclose(y, a @ layer.weight.data.T + layer.bias.data, rtol=1e-6,
                               atol=1e-6)
    g = rng.standard_normal(y.shape).astype(np.float32)
    dx = layer.backward(g)
    np.testing.assert_allclose(dx, g @ layer.weight.data, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.weight.grad, g.T @ a, rtol=1e-6, atol=1e-6)


def test_unsplit_ops_hold_the_blas_to_one_thread_only_while_the_pool_is_on(split):
    ctl = ct._blas_controllers()
    if not ctl:
        pytest.skip("threadpoolctl finds no BLAS to control here")
    before = [c.get_num_threads() for c in ctl]
    with ct.serial(8):
        assert all(c.get_num_threads() == 1 for c in ctl)
    assert [c.get_num_threads() for c in ctl] == before
    with ct.serial(1):  # one image cannot be split: it keeps the BLAS's threads
        assert [c.get_num_threads() for c in ctl] == before
    ct.set_num_threads(1)
    with ct.serial(8):  # pool off: nothing changes
        assert [c.get_num_threads() for c in ctl] == before


def test_polling_workers_give_the_same_results(split, monkeypatch):
    monkeypatch.setattr(ct, "SPIN_S", 2e-4)
    out = np.zeros(9)
    for _ in range(3):
        ct.run(lambda i, a, b: out.__setitem__(slice(a, b), out[a:b] + i), ct.parts(9, 9))
    np.testing.assert_array_equal(out, [0, 0, 0, 3, 3, 3, 6, 6, 6])


def test_blas_note_only_when_the_environment_pins_avx2_kernels_on_an_avx512_cpu():
    from gpuconv import _blas_kernels as bk
    avx512 = {"avx2", "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl"}
    assert "OPENBLAS_CORETYPE=Haswell" in bk.note({"OPENBLAS_CORETYPE": "Haswell"}, avx512)
    assert bk.note({"OPENBLAS_CORETYPE": "zen"}, avx512)
    assert bk.note({"OPENBLAS_CORETYPE": "Haswell"}, {"avx2", "avx512f"}) is None  # no AVX-512BW
    assert bk.note({"OPENBLAS_CORETYPE": "SkylakeX"}, avx512) is None
    assert bk.note({}, avx512) is None


def test_a_split_fprop_keeps_no_column_matrix_for_wgrad(split):
    # Each thread keeps its own matrix, and which thread runs a part varies run to run: a kept
    # matrix would switch the wgrad part that finds it to the other summation order.
    p, x, w, b, dy = _problem(PROBLEMS[0], batch=4)
    ne._tls.__dict__.pop("fprop_col", None)
    with ne.keep_columns():
        ne.conv_fprop(p, x, w, b)
    assert "fprop_col" not in ne._tls.__dict__  # the caller ran part 0 and kept nothing
    ct.set_num_threads(1)
    with ne.keep_columns():
        ne.conv_fprop(p, x, w, b)
    assert ne._tls.fprop_col[0] == p  # unsplit, the matrix is kept as before


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_reads_the_environment_again(monkeypatch):
    import os
    monkeypatch.setattr(ct, "_cores", lambda: 8)
    monkeypatch.delenv("GPUCONV_CPU_THREADS", raising=False)
    ct.set_num_threads(None)
    try:
        assert ct.get_num_threads() == 1  # read (and held) in the parent
        monkeypatch.setenv("GPUCONV_CPU_THREADS", "3")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its own read, without a set_num_threads(None)
            try:
                os.write(w, str(ct.get_num_threads()).encode())
            finally:
                os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        assert os.read(r, 16) == b"3"
        os.close(r)
        assert ct.get_num_threads() == 1  # the parent keeps its reading
    finally:
        ct.set_num_threads(None)
