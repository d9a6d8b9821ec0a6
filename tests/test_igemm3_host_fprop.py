"""Third-generation fprop (kernels/igemm3_fprop.cu, NHWC, cp.async + ldmatrix + mma.sync) RUN on
the CPU through tests/igemm_host.py: one fiber per CUDA thread, cp.async landing only at its
wait_group (destination poisoned until then), ldmatrix and mma.sync emulated warp-collectively
from the PTX ISA's fragment tables, shared memory poisoned before every block, NaN guard bands
around every array. Driven by gpuconv.engines.cuda_igemm3's own host code (tile configs, the
argument struct, grids, split-K sizing and its reduce), against the NumPy engine in float64.

Tensor-core arithmetic is the emulation's (double accumulation rounded to fp32), so these check
indexing, masking, pipelining and fragment layouts, not hardware rounding. The GPU twin is
tests/test_igemm3_gpu.py. Shapes are tiny: the fiber shim is slow (CI budget ~60 s).
"""
import numpy as np
import pytest

from gpuconv import ConvProblem, autotune, config
from gpuconv.engines import cuda_igemm3 as ig3
from gpuconv.engines import numpy_engine as ne

from . import cuda_checks as cc
from . import igemm_host as ih
from .kernel_host import CXX

pytestmark = pytest.mark.skipif(CXX is None, reason="g++ is not installed: cannot run the "
                                                    "kernels on the host")


@pytest.fixture(scope="module")
def libs():
    return ih.build3()


@pytest.fixture
def host(libs, monkeypatch):
    ih.install3(monkeypatch, libs)
    ih.set_order("forward")
    yield libs
    ih.set_order("forward")


def nhwc(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def run_fprop(p, dtype, label, *, splits=None, seed=0, bias=True, check=True):
    """igemm3 fprop of p on random data (physical NHWC / KRSC device copies in NaN guards);
    checks against the NumPy engine (float64) and the guard bands; returns (y_nchw, ref)."""
    dt, tf32 = dtype.split("+")[0], dtype.endswith("+tf32")
    npdt = cc.dtype(dt)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, p.x_shape).astype(npdt)
    w = rng.uniform(-1, 1, p.w_shape).astype(npdt)
    b = rng.uniform(-1, 1, (p.K,)).astype(npdt) if bias else None
    algo = ig3.Igemm3Fprop(label, splits=splits)
    config.set_allow_tf32(tf32)
    try:
        assert algo.supports(p, npdt)
        y = algo(p, ih.to_device(nhwc(x)), ih.to_device(nhwc(w)),
                 None if b is None else ih.to_device(b))
    finally:
        config.set_allow_tf32(False)
    ih.check_guards()
    assert y.shape == (p.N, p.P, p.Q, p.K) and y.dtype == npdt
    out = np.asarray(y).transpose(0, 3, 1, 2)
    ref = ne.conv_fprop(p, x.astype(np.float64), w.astype(np.float64),
                        None if b is None else b.astype(np.float64))
    if check:
        if tf32:
            err = autotune.relative_error(out.astype(np.float64), ref)
            assert err <= autotune.tolerance(np.float32, True), f"tf32 {p}: {err}"
        else:
            cc.assert_close(out, ref, dt, f"igemm3 fprop {label} {p}")
    return out, ref


CASES = [  # (id, x shape, w shape, kwargs): tiny, every geometry feature
    ("basic3x3", (2, 8, 5, 6), (16, 8, 3, 3), dict(padding=1)),
    ("stride2_pad", (1, 16, 7, 9), (8, 16, 3, 3), dict(stride=2, padding=1)),
    ("dilation", (1, 8, 8, 7), (8, 8, 3, 2), dict(padding=(2, 1), dilation=(2, 3))),
    ("groups", (2, 16, 5, 5), (24, 8, 3, 3), dict(padding=1, groups=2)),
    ("odd_1x1_asym", (3, 24, 3, 5), (7, 24, 1, 1), dict(stride=(1, 2))),   # K = 7: odd columns
    ("cg40_wide_pad", (1, 40, 4, 3), (9, 40, 3, 3), dict(padding=3)),       # Cg not / BK
    ("odd_group_cols", (1, 16, 4, 5), (10, 8, 3, 3), dict(padding=1, groups=2)),  # g*Kg odd
]
DTYPES = [("float16", "128x128"), ("bfloat16", "128x64"), ("float32+tf32", "128x64"),
          ("float16", "128x64")]


@pytest.mark.parametrize("dtype,label", DTYPES, ids=[f"{d}-{t}" for d, t in DTYPES])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fprop_matches_numpy(host, case, dtype, label):
    _, xs, ws, kw = case
    p = ConvProblem.from_args(xs, ws, **kw)
    run_fprop(p, dtype, label, splits=1)
    dt, tf32 = dtype.split("+")[0], dtype.endswith("+tf32")
    ct, mode = ig3.ctype_of(dt), ig3.MODE_TF32 if tf32 else ig3.MODE_F16
    tile = next(t for t in ig3.IGEMM3_CONFIGS[(ct, mode)] if t.label == label)
    assert [n for n, *_ in ih.launches] == [ig3.kernel_name("fprop", ct, mode, tile)]


def test_fprop_launch_and_pipeline_counts(host):
    """The launch is the tile's grid and block; every 16-byte chunk of every k-iteration went
    through cp.async and landed; ldmatrix ran."""
    p = ConvProblem.from_args((2, 8, 9, 9), (20, 8, 3, 3), padding=1)
    lib = host["igemm3_fprop.cu"]
    before = ih.counters(lib)
    run_fprop(p, "float16", "128x64", splits=1)
    name, grid, block, (args,) = ih.launches[0]
    tile = ig3.IGEMM3_CONFIGS[("ig_f16", ig3.MODE_F16)][1]
    assert name == ig3.kernel_name("fprop", "ig_f16", ig3.MODE_F16, tile)
    assert grid == (-(-2 * 81 // 128), 1, 1) and block == (tile.threads, 1, 1)
    iters = 9 * 1
    assert args["iters"][0] == iters
    issued, landed, ldsm = (a - b for a, b in zip(ih.counters(lib), before))
    chunks = (tile.bm + tile.bn) * tile.bk * 2 // 16   # per block and k-iteration
    assert issued == landed == grid[0] * iters * chunks
    assert ldsm > 0


SPLIT = [("float16", "128x128"), ("bfloat16", "128x64"), ("float32+tf32", "128x128"),
         ("bfloat16", "128x128")]


@pytest.mark.parametrize("dtype,label", SPLIT, ids=[f"{d}-{t}" for d, t in SPLIT])
def test_split_k_deterministic(host, dtype, label):
    """Split-K on (the sizing rule picks > 1 for a small grid on 132 SMs): partials and the
    fixed-order reduce give the right answer, and bitwise the same under every fiber order."""
    p = ConvProblem.from_args((1, 16, 6, 6), (8, 8, 3, 3), padding=1, groups=2)
    dt = dtype.split("+")[0]
    ct = ig3.ctype_of(dt)
    mode = ig3.MODE_TF32 if dtype.endswith("+tf32") else ig3.MODE_F16
    tile = next(t for t in ig3.IGEMM3_CONFIGS[(ct, mode)] if t.label == label)
    assert ig3.fprop_splits(p, tile, 132) > 1
    out1, _ = run_fprop(p, dtype, label)
    names = [n for n, *_ in ih.launches]
    assert names[1].startswith("igemm3_splitk_reduce<")
    assert ih.launches[0][3][0]["splits"][0] > 1
    ih.set_order("shuffle", seed=7)
    out2, _ = run_fprop(p, dtype, label)
    assert np.array_equal(np.ascontiguousarray(out1).view(np.uint8),
                          np.ascontiguousarray(out2).view(np.uint8))


def test_split_k_off_when_grid_is_full(host, monkeypatch):
    """Two blocks fill two waves of a 1-SM device: no split, no reduce; on 132 SMs: split."""
    p = ConvProblem.from_args((4, 16, 6, 6), (8, 16, 3, 3), padding=1)   # M = 144: 2 blocks
    tile = ig3.IGEMM3_CONFIGS[("ig_f16", ig3.MODE_F16)][0]
    assert ig3.fprop_splits(p, tile, 1) == 1 and ig3.fprop_splits(p, tile, 132) > 1
    monkeypatch.setattr(ig3, "_current_sm_count", lambda: 1)
    run_fprop(p, "float16", "128x128")
    assert len(ih.launches) == 1 and ih.launches[0][3][0]["splits"][0] == 1
    monkeypatch.setattr(ig3, "_current_sm_count", lambda: 132)
    ih.reset()
    run_fprop(p, "float16", "128x128")
    assert len(ih.launches) == 2 and ih.launches[0][3][0]["splits"][0] > 1


def test_no_bias_and_uneven_splits(host):
    p = ConvProblem.from_args((1, 8, 5, 4), (12, 8, 3, 3), padding=1)   # 9 iterations
    run_fprop(p, "float16", "128x64", splits=4, bias=False)   # 3 per split: 3 splits
    assert ih.launches[0][3][0]["splits"][0] == 3


def test_bad_arguments_are_named(host):
    p = ConvProblem.from_args((1, 8, 4, 4), (8, 8, 3, 3))
    algo = ig3.Igemm3Fprop("128x64")
    x = np.ones((1, 4, 4, 8), np.float16)
    w = np.ones((8, 3, 3, 8), np.float16)
    with pytest.raises(ValueError, match="NHWC"):
        algo(p, ih.to_device(x.transpose(0, 3, 1, 2).copy()), ih.to_device(w))   # NCHW given
    with pytest.raises(ValueError, match="x must be 16-byte aligned"):
        algo(p, ih.to_device(x, offset=1), ih.to_device(w))
    with pytest.raises(TypeError, match="w is float32"):
        algo(p, ih.to_device(x), ih.to_device(w.astype(np.float32)))
    with pytest.raises(ValueError, match="bias must have shape"):
        algo(p, ih.to_device(x), ih.to_device(w), ih.to_device(np.ones(3, np.float16)))


def test_supports_rules():
    f16 = np.dtype(np.float16)
    a = ig3.Igemm3Fprop("128x128")
    ok = ConvProblem.from_args((1, 8, 4, 4), (8, 8, 3, 3))
    assert a.supports(ok, f16)
    assert not a.supports(ConvProblem.from_args((1, 12, 4, 4), (8, 12, 3, 3)), f16)  # C % 8
    assert not a.supports(ConvProblem.from_args((1, 16, 4, 4), (8, 4, 3, 3), groups=4), f16)
    assert not a.supports(ok, np.dtype(np.float64))
    assert not a.supports(ok, np.dtype(np.float32))          # fp32 only with TF32 allowed
    config.set_allow_tf32(True)
    try:
        assert a.supports(ConvProblem.from_args((1, 12, 4, 4), (8, 12, 3, 3)), np.float32)
        assert not a.supports(ConvProblem.from_args((1, 6, 4, 4), (8, 6, 3, 3)), np.float32)
    finally:
        config.set_allow_tf32(False)
    assert not a.supports(ConvProblem.from_args((1, 8, 40, 40), (8, 8, 33, 1)), f16)  # R > 32
    # 64-bit offsets: x of 2^31+ elements is fine (offsets are 64-bit) while GEMM rows fit int32
    big_x = ConvProblem.from_args((2**16, 16, 64, 64), (8, 16, 1, 1))
    assert big_x.N * big_x.C * big_x.H * big_x.W > 2**31 and a.supports(big_x, f16)
    big_img = ConvProblem.from_args((1, 8, 2**15, 2**15), (8, 8, 1, 1), stride=2**14)
    assert a.supports(big_img, f16)   # one image of 2^33 elements: 64-bit offsets
    # GEMM rows past int32: refused
    huge = ConvProblem.from_args((2**17, 8, 128, 128), (8, 8, 1, 1))
    assert not a.supports(huge, f16)


def test_gated_off_auto_but_selectable(monkeypatch):
    from gpuconv.engines import cuda_registry as reg
    p = ConvProblem.from_args((1, 8, 4, 4), (8, 8, 3, 3))
    assert "igemm3_tc_128x128" in reg.ALGORITHMS["fprop"]
    assert reg.ALGORITHMS["fprop"]["igemm3_tc_128x128"].layouts == ("nhwc",)
    monkeypatch.delenv("GPUCONV_THIRD_GEN", raising=False)
    config.set_third_generation(None)
    assert not config.third_generation_enabled()
    names = autotune.candidates(p, np.float16, reg.ALGORITHMS["fprop"])
    assert not any(n.startswith("igemm3") for n in names)
    monkeypatch.setenv("GPUCONV_THIRD_GEN", "1")
    assert config.third_generation_enabled()
    assert not any(n.startswith("igemm3") for n in
                   autotune.candidates(p, np.float16, reg.ALGORITHMS["fprop"]))  # nchw call
    nh = autotune.candidates(p, np.float16, reg.ALGORITHMS["fprop"], layout="nhwc")
    # channels_last ops choose among NHWC readers: gen 3 and the first generation's NHWC path
    assert "igemm3_tc_128x128" in nh and "im2col_gemm" in nh
    assert not any(n.startswith(("igemm_", "winograd")) for n in nh)


def test_offsets_past_2_to_31_elements(host, tmp_path):
    """x of 2^33 elements (16 GiB of float16, a sparse file: only the 4 pixels read are real):
    a 1x1 stride-2^14 convolution reads pixels whose element offsets pass 2^32. A 32-bit offset
    anywhere on the way would read the wrong pixel (or fault)."""
    H = W = 2**15
    p = ConvProblem.from_args((1, 8, H, W), (8, 8, 1, 1), stride=2**14)
    assert (p.P, p.Q) == (2, 2)
    x = np.memmap(tmp_path / "x.bin", dtype=np.float16, mode="w+", shape=(1, H, W, 8))
    rng = np.random.default_rng(5)
    pix = rng.uniform(-1, 1, (2, 2, 8)).astype(np.float16)
    for i in range(2):
        for j in range(2):
            x[0, i * 2**14, j * 2**14] = pix[i, j]
    w = rng.uniform(-1, 1, (8, 1, 1, 8)).astype(np.float16)
    y = ig3.Igemm3Fprop("128x64", splits=1)(p, x.view(ih.DevArray), ih.to_device(w))
    ref = np.einsum("ijc,kc->ijk", pix.astype(np.float64), w[:, 0, 0].astype(np.float64))
    cc.assert_close(np.asarray(y)[0], ref, "float16", "2^33-element x")
    assert (0 * H * W + 2**14 * W + 2**14) * 8 > 2**32
