"""Third-generation dgrad and wgrad (kernels/igemm3_dgrad.cu, igemm3_wgrad.cu: NHWC, cp.async +
ldmatrix(.trans) + mma.sync) RUN on the CPU through tests/igemm_host.py (one fiber per CUDA
thread, cp.async landing at its wait_group, poisoned shared memory, NaN guard bands), driven by
gpuconv.engines.cuda_igemm3's own host code (stride phases, argument structs, grids, split-K
sizing, the shared split-K reduce), against the NumPy engine in float64 on random data.

Also the mutation tests of the two kernels (IG3D_MUTATE_*, IG3W_MUTATE_*: a CPU test must catch
each). Tiny shapes: the fiber shim is slow. GPU twin: tests/test_igemm3_gpu.py.
"""
import numpy as np
import pytest

from gpuconv import ConvProblem, autotune, config
from gpuconv.engines import cuda_igemm3 as ig3
from gpuconv.engines import numpy_engine as ne

from . import cuda_checks as cc
from . import igemm_host as ih
from .kernel_host import CXX
# the host-emulation fixtures (the gen-3 kernels built once, installed per test) and nhwc()
from .test_igemm3_host_fprop import host, libs, nhwc  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(CXX is None, reason="g++ is not installed: cannot run the "
                                                    "kernels on the host")


def _check(out, ref, dt, tf32, what):
    if tf32:
        err = autotune.relative_error(out.astype(np.float64), ref)
        assert err <= autotune.tolerance(np.float32, True), f"tf32 {what}: {err}"
    else:
        cc.assert_close(out, ref, dt, what)


def run_grad(op, p, dtype, label, *, splits=None, seed=0, check=True):
    """igemm3 dgrad / wgrad of p on random data (physical NHWC / KRSC device copies inside NaN
    guards), checked against the NumPy engine in float64 and the guard bands; returns
    (result in NCHW / KCRS order, reference)."""
    dt, tf32 = dtype.split("+")[0], dtype.endswith("+tf32")
    npdt = cc.dtype(dt)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, p.x_shape).astype(npdt)
    w = rng.uniform(-1, 1, p.w_shape).astype(npdt)
    dy = rng.uniform(-1, 1, p.y_shape).astype(npdt)
    cls = ig3.Igemm3Dgrad if op == "dgrad" else ig3.Igemm3Wgrad
    algo = cls(label, splits=splits)
    config.set_allow_tf32(tf32)
    try:
        assert algo.supports(p, npdt)
        if op == "dgrad":
            out = algo(p, ih.to_device(nhwc(w)), ih.to_device(nhwc(dy)))
            shape = (p.N, p.H, p.W, p.C)
        else:
            out = algo(p, ih.to_device(nhwc(x)), ih.to_device(nhwc(dy)))
            shape = (p.K, p.R, p.S, p.Cg)
    finally:
        config.set_allow_tf32(False)
    ih.check_guards()
    assert out.shape == shape and out.dtype == npdt
    out = np.asarray(out).transpose(0, 3, 1, 2)
    if op == "dgrad":
        ref = ne.conv_dgrad(p, w.astype(np.float64), dy.astype(np.float64))
    else:
        ref = ne.conv_wgrad(p, x.astype(np.float64), dy.astype(np.float64))
    if check:
        _check(out, ref, dt, tf32, f"igemm3 {op} {label} {p}")
    return out, ref


CASES = [  # (id, x shape, w shape, kwargs): tiny, every geometry feature
    ("basic3x3", (2, 8, 5, 6), (16, 8, 3, 3), dict(padding=1)),
    ("stride2_pad", (1, 16, 7, 9), (8, 16, 3, 3), dict(stride=2, padding=1)),
    ("stride12_dil", (1, 8, 7, 8), (8, 8, 3, 2), dict(stride=(1, 2), padding=(2, 1),
                                                      dilation=(2, 3))),
    ("stride21_odd", (2, 8, 9, 5), (16, 8, 2, 3), dict(stride=(2, 1), padding=(0, 1))),
    ("groups", (2, 16, 5, 5), (32, 8, 3, 3), dict(padding=1, groups=2)),
    ("s2_1x1_notaps", (1, 24, 5, 7), (8, 24, 1, 1), dict(stride=2)),   # phases without taps
    ("s3_dil2_k40", (1, 8, 8, 7), (40, 8, 3, 3), dict(stride=3, padding=2, dilation=2)),
]
DTYPES = [("float16", "128x128"), ("bfloat16", "128x64"), ("float32+tf32", "128x64"),
          ("float32+tf32", "128x128")]   # tf32 128x128: 8 warps
WDTYPES = [("float16", "128x128"), ("bfloat16", "64x64"), ("float32+tf32", "64x64"),
           ("float32+tf32", "128x128")]


def _kname(op, dtype, label):
    dt, tf32 = dtype.split("+")[0], dtype.endswith("+tf32")
    ct, mode = ig3.ctype_of(dt), ig3.MODE_TF32 if tf32 else ig3.MODE_F16
    tile = next(t for t in ig3.CONFIGS[op][(ct, mode)] if t.label == label)
    return ig3.kernel_name(op, ct, mode, tile)


@pytest.mark.parametrize("dtype,label", DTYPES, ids=[f"{d}-{t}" for d, t in DTYPES])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dgrad_matches_numpy(host, case, dtype, label):
    _, xs, ws, kw = case
    p = ConvProblem.from_args(xs, ws, **kw)
    run_grad("dgrad", p, dtype, label, splits=1)
    names = [n for n, *_ in ih.launches]
    assert names == [_kname("dgrad", dtype, label)] * len(ig3.dgrad_phases(p))


@pytest.mark.parametrize("dtype,label", WDTYPES, ids=[f"{d}-{t}" for d, t in WDTYPES])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_wgrad_matches_numpy(host, case, dtype, label):
    _, xs, ws, kw = case
    p = ConvProblem.from_args(xs, ws, **kw)
    run_grad("wgrad", p, dtype, label, splits=1)
    assert [n for n, *_ in ih.launches] == [_kname("wgrad", dtype, label)]


def test_dgrad_phases_cover_every_pixel_and_tap():
    """Each output pixel is in exactly one phase; each phase's taps are exactly the (r, s) whose
    dy index (h + pad - r*dil) / stride is an integer, and the kernel's dy formula gives it."""
    for kw in (dict(stride=2, padding=1), dict(stride=(3, 2), padding=(2, 0), dilation=(2, 3)),
               dict(stride=(2, 4), padding=3, dilation=(2, 1)), dict(stride=1, padding=1)):
        p = ConvProblem.from_args((1, 8, 11, 10), (8, 8, 3, 4), **kw)
        seen = np.zeros((p.H, p.W), int)
        for ph, pw, ah, aw in ig3.dgrad_phases(p):
            for (o0, n, t0, tst, nt, d0, dd), size, pad, st, dil, taps, phase in (
                    (ah, p.H, p.pad_h, p.stride_h, p.dil_h, p.R, ph),
                    (aw, p.W, p.pad_w, p.stride_w, p.dil_w, p.S, pw)):
                outs = range(o0, size, st)
                assert len(outs) == n and all((o + pad) % st == phase for o in outs)
                want = [t for t in range(taps) if (t * dil) % st == phase]
                assert [t0 + a * tst for a in range(nt)] == want
                for i, o in enumerate(outs):
                    for a, t in enumerate(want):
                        assert (o + pad - t * dil) == st * (i + d0 - a * dd)
            seen[ah[0]::p.stride_h, aw[0]::p.stride_w] += 1
        assert (seen == 1).all(), kw


SPLIT = [("dgrad", "float16", "128x128"), ("dgrad", "float32+tf32", "128x64"),
         ("wgrad", "bfloat16", "128x128"), ("wgrad", "float32+tf32", "64x64")]


@pytest.mark.parametrize("op,dtype,label", SPLIT, ids=[f"{o}-{d}-{t}" for o, d, t in SPLIT])
def test_split_k_deterministic(host, op, dtype, label):
    """Split-K (3 splits): fp32 partials and the fixed-order reduce are right, and bitwise the
    same under a shuffled fiber order."""
    p = ConvProblem.from_args((2, 16, 5, 6), (16, 8, 3, 3), stride=(2, 1), padding=1, groups=2)
    out1, _ = run_grad(op, p, dtype, label, splits=3)
    assert ih.launches[-1][0].startswith("igemm3_splitk_reduce<")
    a0 = ih.launches[0][3][0]   # wgrad: no empty split (3 splits of 2 iterations are 2)
    assert a0["splits"][0] == (3 if op == "dgrad" else min(3, a0["iters"][0])) > 1
    ih.reset()
    ih.set_order("shuffle", seed=3)
    out2, _ = run_grad(op, p, dtype, label, splits=3)
    assert np.array_equal(np.ascontiguousarray(out1).view(np.uint8),
                          np.ascontiguousarray(out2).view(np.uint8))


def test_split_k_sizing_rule(host):
    """Under two waves the rule splits (as far as the k-iterations allow), on a full grid not;
    the automatic choice reaches the kernels and the reduce."""
    t = ig3.IGEMM3_DGRAD_CONFIGS[("ig_f16", ig3.MODE_F16)][1]
    tw = ig3.IGEMM3_WGRAD_CONFIGS[("ig_f16", ig3.MODE_F16)][1]
    p = ConvProblem.from_args((1, 16, 5, 6), (64, 16, 3, 3), padding=1)   # 18 k-iterations
    assert ig3.dgrad_splits(p, t, 132) == 18 // 4
    big = ConvProblem.from_args((64, 16, 32, 32), (16, 16, 3, 3), padding=1)
    assert ig3.wgrad_splits(big, tw, 132) > 8 and ig3.wgrad_splits(big, tw, 1) == 1
    run_grad("dgrad", p, "float16", "128x64")
    assert ih.launches[-1][0].startswith("igemm3_splitk_reduce<")
    assert ih.launches[0][3][0]["splits"][0] == 4


def test_split_k_off_when_grid_is_full(host, monkeypatch):
    p = ConvProblem.from_args((4, 16, 6, 6), (16, 16, 3, 3), padding=1)   # 2 / 3 blocks
    monkeypatch.setattr(ig3, "_current_sm_count", lambda: 1)
    for op, label in (("dgrad", "128x64"), ("wgrad", "64x64")):
        ih.reset()
        run_grad(op, p, "float16", label)
        assert not any(n.startswith("igemm3_splitk") for n, *_ in ih.launches)
        assert all(args["splits"][0] == 1 for *_, (args,) in ih.launches)


def test_uneven_and_empty_splits(host):
    """dgrad: 5 splits of a phase with fewer k-iterations (empty splits write zeros); wgrad:
    a split count that does not divide the N*P*Q iterations."""
    p = ConvProblem.from_args((1, 8, 5, 4), (8, 8, 3, 1), stride=(2, 1), padding=(1, 0))
    run_grad("dgrad", p, "float16", "128x64", splits=5)
    ih.reset()
    p = ConvProblem.from_args((3, 8, 6, 5), (8, 8, 3, 3), padding=1)   # N*P*Q = 90: 3 iters
    run_grad("wgrad", p, "float16", "64x64", splits=2)
    assert ih.launches[0][3][0]["splits"][0] == 2


def test_warp_ahead_schedule_gives_the_same_bits(host):
    p = ConvProblem.from_args((2, 16, 5, 6), (16, 16, 3, 3), stride=2, padding=1)
    for op, label in (("dgrad", "128x128"), ("wgrad", "128x128")):
        ih.set_order("forward")
        ref, _ = run_grad(op, p, "float16", label, splits=1)
        ih.set_order("warp_ahead")
        out, _ = run_grad(op, p, "float16", label, splits=1)
        assert np.array_equal(np.ascontiguousarray(out).view(np.uint16),
                              np.ascontiguousarray(ref).view(np.uint16)), op


def test_bad_arguments_are_named(host):
    p = ConvProblem.from_args((1, 8, 4, 4), (8, 8, 3, 3))
    d, wg = ig3.Igemm3Dgrad("128x64"), ig3.Igemm3Wgrad("64x64")
    w = np.ones((8, 3, 3, 8), np.float16)
    dy = np.ones((1, 2, 2, 8), np.float16)
    x = np.ones((1, 4, 4, 8), np.float16)
    with pytest.raises(ValueError, match="NHWC dy"):
        d(p, ih.to_device(w), ih.to_device(dy.transpose(0, 3, 1, 2).copy()))
    with pytest.raises(ValueError, match="KRSC w"):
        d(p, ih.to_device(w.transpose(0, 3, 1, 2).copy()), ih.to_device(dy))
    with pytest.raises(ValueError, match="w must be 16-byte aligned"):
        d(p, ih.to_device(w, offset=1), ih.to_device(dy))
    with pytest.raises(TypeError, match="w is float32"):
        d(p, ih.to_device(w.astype(np.float32)), ih.to_device(dy))
    with pytest.raises(TypeError, match="p must be a gpuconv.ConvProblem"):
        d((1, 2), ih.to_device(w), ih.to_device(dy))
    with pytest.raises(ValueError, match="NHWC x"):
        wg(p, ih.to_device(x.transpose(0, 3, 1, 2).copy()), ih.to_device(dy))
    with pytest.raises(TypeError, match="dy is float32"):
        wg(p, ih.to_device(x), ih.to_device(dy.astype(np.float32)))
    with pytest.raises(ValueError, match="dy must be 16-byte aligned"):
        wg(p, ih.to_device(x), ih.to_device(dy, offset=2))
    with pytest.raises(ValueError, match="does not support"):
        wg(p, ih.to_device(x.astype(np.float64)), ih.to_device(dy.astype(np.float64)))


def test_supports_rules():
    f16 = np.dtype(np.float16)
    for a in (ig3.Igemm3Dgrad("128x128"), ig3.Igemm3Wgrad("128x128")):
        assert a.layouts == ("nhwc",) and a.generation == 3
        ok = ConvProblem.from_args((1, 8, 4, 4), (8, 8, 3, 3))
        assert a.supports(ok, f16)
        assert not a.supports(ConvProblem.from_args((1, 12, 4, 4), (8, 12, 3, 3)), f16)  # Cg
        assert not a.supports(ConvProblem.from_args((1, 8, 4, 4), (12, 8, 3, 3)), f16)   # K
        assert not a.supports(ok, np.dtype(np.float64))
        assert not a.supports(ok, np.dtype(np.float32))      # fp32 only with TF32 allowed
        config.set_allow_tf32(True)
        try:
            assert a.supports(ConvProblem.from_args((1, 12, 4, 4), (4, 12, 3, 3)), np.float32)
            assert not a.supports(ConvProblem.from_args((1, 8, 4, 4), (6, 8, 3, 3)), np.float32)
        finally:
            config.set_allow_tf32(False)
        assert not a.supports(ConvProblem.from_args((1, 8, 40, 40), (8, 8, 33, 1)), f16)
        huge = ConvProblem.from_args((2**17, 8, 128, 128), (8, 8, 1, 1))
        assert not a.supports(huge, f16)


def test_registered_gated_off_auto_but_selectable(monkeypatch):
    from gpuconv.engines import cuda_registry as reg
    p = ConvProblem.from_args((1, 8, 4, 4), (8, 8, 3, 3))
    monkeypatch.delenv("GPUCONV_THIRD_GEN", raising=False)
    config.set_third_generation(None)
    for op in ("dgrad", "wgrad"):
        names = [n for n in reg.ALGORITHMS[op] if n.startswith("igemm3_tc_")]
        assert names and all(n.startswith(f"igemm3_tc_{op}_") for n in names)
        assert all(reg.ALGORITHMS[op][n].layouts == ("nhwc",) for n in names)
        assert not any(n.startswith("igemm3") for n in
                       autotune.candidates(p, np.float16, reg.ALGORITHMS[op], layout="nhwc"))
    monkeypatch.setenv("GPUCONV_THIRD_GEN", "1")
    for op in ("dgrad", "wgrad"):
        nh = autotune.candidates(p, np.float16, reg.ALGORITHMS[op], layout="nhwc")
        assert any(n.startswith(f"igemm3_tc_{op}_") for n in nh)


# ---- mutation tests: the real kernels with one bug each -----------------------------------------
MUTANT = ((2, 16, 9, 10), (16, 16, 3, 3), dict(stride=2, padding=1))   # N*P*Q = 50: q carries
MUTATIONS = [("dgrad", "IG3D_MUTATE_TAP", "forward"), ("dgrad", "IG3D_MUTATE_STAGE", "forward"),
             ("wgrad", "IG3W_MUTATE_CARRY", "forward"),
             ("wgrad", "IG3W_MUTATE_NO_BARRIER", "warp_ahead")]


def test_correct_kernels_pass_the_mutant_problem(host):
    p = ConvProblem.from_args(MUTANT[0], MUTANT[1], **MUTANT[2])
    for op, _, order in MUTATIONS:
        ih.set_order(order)
        run_grad(op, p, "float16", "128x128", splits=1)


@pytest.mark.parametrize("op,macro,order", MUTATIONS, ids=[m for _, m, _ in MUTATIONS])
def test_mutated_kernel_fails(monkeypatch, op, macro, order):
    ih.install3(monkeypatch, ih.build3((macro,)))
    p = ConvProblem.from_args(MUTANT[0], MUTANT[1], **MUTANT[2])
    ih.set_order(order)
    try:
        out, ref = run_grad(op, p, "float16", "128x128", splits=1, check=False)
    finally:
        ih.set_order("forward")
    with pytest.raises(AssertionError):
        cc.assert_close(out.astype(np.float64), ref, "float16", macro)
