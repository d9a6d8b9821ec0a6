"""CPU checks of the second-generation kernels' host-side math (no GPU needed).

- dgrad's stride phases (gpuconv.problem, which every engine uses) and the tables
  kernels/igemm_dgrad.cu reads, against a brute-force enumeration of h + pad = p*stride + r*dil,
  and a NumPy emulation of the kernel's per-phase GEMM against conv_dgrad;
- the kernels' incremental mixed-radix k counters (ig_step / ig_jump) against divmod;
- Winograd F(2x2,3x3): the same tile algorithm as kernels/winograd.cu, in NumPy, against the
  NumPy engine for fprop and stride-1 dgrad;
- launch geometry (CUDA's 65535 limit on grid.y / grid.z included), split-K sizing and the
  16-byte-load preconditions.
"""
import itertools

import numpy as np
import pytest

from gpuconv import ConvProblem
from gpuconv.engines import cuda_igemm as ig
from gpuconv.engines import numpy_engine as ne

from .problems import IDS, PROBLEMS


def _problem(xs, ws, kw):
    return ConvProblem.from_args(xs, ws, **kw)


def _rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape)


def _brute_taps(size, pad, k, dil, stride, out_size):
    """{h: {(r, p)}}: the (tap, dy row) pairs with h + pad = p*stride + r*dil, 0 <= p < out."""
    return {h: {(r, (h + pad - r * dil) // stride) for r in range(k)
                if (h + pad - r * dil) % stride == 0
                and 0 <= (h + pad - r * dil) // stride < out_size}
            for h in range(size)}


@pytest.mark.parametrize("name,xs,ws,kw", PROBLEMS, ids=IDS)
def test_dgrad_phases_match_brute_force(name, xs, ws, kw):
    p = _problem(xs, ws, kw)
    for axis, (size, pad, k, dil, st, out) in (
            ("h", (p.H, p.pad_h, p.R, p.dil_h, p.stride_h, p.P)),
            ("w", (p.W, p.pad_w, p.S, p.dil_w, p.stride_w, p.Q))):
        want = _brute_taps(size, pad, k, dil, st, out)
        phases, lo, hi = p.dgrad_phases(axis)
        assert [ph for ph, _, _ in phases] == list(range(st))
        rows, step, p_step = p.dgrad_phase_rows(axis)
        for (ph, n, taps), (r0, ntaps, p0, n_rows) in zip(phases, rows):
            assert n == n_rows == len(range(ph, size, st))
            # the tables' arithmetic progression lists the same taps as the phase
            assert sorted((r0 + j * step, p0 - j * p_step) for j in range(ntaps)) == sorted(taps)
            assert [r for r, _ in taps] == sorted((r for r, _ in taps), reverse=True)  # mirrored
            for i, h in enumerate(range(ph, size, st)):
                got = {(r, off + i) for r, off in taps if 0 <= off + i < out}
                assert got == want[h], (axis, h)
                # dy padded by (lo, hi) covers every listed offset
                assert all(-lo <= off + i < out + hi for _, off in taps)


def _emulate_dgrad(p, w, dy):
    """kernels/igemm_dgrad.cu's GEMM per (group, phase), vectorised over (img, i, j, c)."""
    a, grid = ig.igemm_args("dgrad", p, ig.Tile(64, 64, 8, 2, 2), 8)
    a = a[0]
    dx = np.full(p.x_shape, np.nan)
    for g in range(p.groups):
        for z in range(p.stride_h * p.stride_w):
            ph, pw = divmod(z, p.stride_w)
            n_i, n_j = a["ph_n"][ph], a["pw_n"][pw]
            if n_i == 0 or n_j == 0:
                continue
            acc = np.zeros((p.N, p.Cg, n_i, n_j))
            for jr in range(a["ph_tr"][ph]):
                for js in range(a["pw_ts"][pw]):
                    pp = np.arange(n_i) + a["ph_dp0"][ph] - jr * a["dp_step"]
                    qq = np.arange(n_j) + a["pw_dq0"][pw] - js * a["dq_step"]
                    mp, mq = (pp >= 0) & (pp < p.P), (qq >= 0) & (qq < p.Q)
                    d = np.zeros((p.N, p.Kg, n_i, n_j))
                    d[:, :, mp[:, None] & mq[None, :]] = dy[:, g * p.Kg:(g + 1) * p.Kg][
                        :, :, pp[mp]][:, :, :, qq[mq]].reshape(p.N, p.Kg, -1)
                    r = a["ph_r0"][ph] + jr * a["r_step"]
                    s = a["pw_s0"][pw] + js * a["s_step"]
                    acc += np.einsum("nkij,kc->ncij", d, w[g * p.Kg:(g + 1) * p.Kg, :, r, s])
            dx[:, g * p.Cg:(g + 1) * p.Cg, ph::p.stride_h, pw::p.stride_w] = acc
    return dx


@pytest.mark.parametrize("name,xs,ws,kw", PROBLEMS, ids=IDS)
def test_dgrad_kernel_formulation_emulated(name, xs, ws, kw):
    p = _problem(xs, ws, kw)
    w, dy = _rand(p.w_shape, 1), _rand(p.y_shape, 2)
    dx = _emulate_dgrad(p, w, dy)
    ref = ne.conv_dgrad(p, w, dy)
    # phases without taps are written by the kernel as zeros (acc = 0), emulated as NaN-skipped
    dx = np.where(np.isnan(dx), 0.0, dx)
    np.testing.assert_allclose(dx, ref, rtol=1e-12, atol=1e-12)


# ---- the incremental k counters of igemm_common.cuh, line for line -------------------------
def _decode(k, mid, lo):
    return [k // (mid * lo), (k // lo) % mid, k % lo]


def _step(d, mid, lo):
    d[2] += 1
    if d[2] == lo:
        d[2] = 0
        d[1] += 1
        if d[1] == mid:
            d[1] = 0
            d[0] += 1


def _jump(d, j, mid, lo):
    d[2] += j[2]
    carry = d[2] >= lo
    d[2] -= lo if carry else 0
    d[1] += j[1] + carry
    carry = d[1] >= mid
    d[1] -= mid if carry else 0
    d[0] += j[0] + carry


@pytest.mark.parametrize("mid,lo,bk", [(3, 3, 16), (1, 49, 32), (7, 7, 8), (1, 1, 16),
                                       (5, 2, 32), (2, 13, 16)])
def test_radix_counters(mid, lo, bk):
    jb = _decode(bk, mid, lo)
    for start in range(0, 40):
        d = _decode(start, mid, lo)
        for t in range(12):
            assert d == _decode(start + t * bk, mid, lo)
            e = list(d)
            for u in range(1, 8):
                _step(e, mid, lo)
                assert e == _decode(start + t * bk + u, mid, lo)
            _jump(d, jb, mid, lo)


# ---- Winograd F(2x2, 3x3) --------------------------------------------------------------------
def test_winograd_matrices_are_lavin_gray():
    # 1-D F(2,3): A^T [(G g) * (B^T d)] equals the correlation of d (4) with g (3), any d, g
    rng = np.random.default_rng(0)
    for _ in range(5):
        d, g = rng.standard_normal(4), rng.standard_normal(3)
        y = ig.WINO_AT @ ((ig.WINO_G @ g) * (ig.WINO_BT @ d))
        np.testing.assert_allclose(y, [d[0:3] @ g, d[1:4] @ g], rtol=1e-13)


WINO_PROBLEMS = [
    ("same", (2, 3, 7, 9), (4, 3, 3, 3), dict(padding=1)),
    ("valid_odd", (1, 2, 9, 8), (3, 2, 3, 3), dict()),
    ("pad2", (2, 2, 5, 6), (2, 2, 3, 3), dict(padding=2)),
    ("pad3", (1, 2, 5, 5), (2, 2, 3, 3), dict(padding=3)),  # dgrad offset 2 - pad < 0
    ("groups", (2, 4, 6, 7), (6, 2, 3, 3), dict(groups=2, padding=1)),
    ("depthwise", (1, 3, 6, 5), (3, 1, 3, 3), dict(groups=3, padding=1)),
    ("asym_pad", (1, 2, 6, 6), (2, 2, 3, 3), dict(padding=(0, 1))),
    ("tiny", (1, 1, 3, 3), (1, 1, 3, 3), dict()),
]


@pytest.mark.parametrize("name,xs,ws,kw", WINO_PROBLEMS, ids=[w[0] for w in WINO_PROBLEMS])
def test_winograd_tile_algorithm(name, xs, ws, kw):
    p = _problem(xs, ws, kw)
    assert ig.winograd_supports(p)
    x, w, b = _rand(p.x_shape, 3), _rand(p.w_shape, 4), _rand((p.K,), 5)
    np.testing.assert_allclose(ig.winograd_f2x3_numpy("fprop", p, x, w, b),
                               ne.conv_fprop(p, x, w, b), rtol=1e-11, atol=1e-11)
    dy = _rand(p.y_shape, 6)
    np.testing.assert_allclose(ig.winograd_f2x3_numpy("dgrad", p, dy, w),
                               ne.conv_dgrad(p, w, dy), rtol=1e-11, atol=1e-11)


def test_winograd_supports_only_3x3_s1_d1():
    assert not ig.winograd_supports(ConvProblem(1, 1, 8, 8, 1, 3, 3, stride_h=2, stride_w=2))
    assert not ig.winograd_supports(ConvProblem(1, 1, 8, 8, 1, 3, 3, dil_h=2, dil_w=2))
    assert not ig.winograd_supports(ConvProblem(1, 1, 8, 8, 1, 5, 5))


# ---- launch geometry and preconditions --------------------------------------------------------
def test_grid_covers_gemm_and_phases():
    p = ConvProblem.from_args((3, 6, 13, 11), (9, 2, 3, 3), stride=2, padding=1, groups=3)
    t = ig.Tile(64, 64, 16, 2, 2)
    _, g = ig.igemm_args("fprop", p, t, 4)
    assert g == (-(-3 * p.P * p.Q // 64), 1, 3)
    a, g = ig.igemm_args("dgrad", p, t, 4)
    assert g == (-(-3 * 7 * 6 // 64), 1, 3 * 4) and a["gemm_m"][0] == 3 * 7 * 6
    a, g = ig.igemm_args("wgrad", p, t, 4, splits=5)
    assert g[2] == 15
    k = p.N * p.P * p.Q
    assert a["k_chunk"][0] % 16 == 0 and 5 * a["k_chunk"][0] >= k
    assert 4 * a["k_chunk"][0] < k + 16 * 4  # no split left empty by rounding


def test_grid_z_limit_is_checked_in_supports():
    """grid.z = groups * stride^2 (dgrad) or groups * splits (wgrad) must stay <= 65535: a
    problem past it is not supported (the autotuner never picks it), never launched."""
    algos = {(op, a.name): a for op, lst in ig.algorithms().items() for a in lst}
    f32 = np.dtype("float32")
    t = ig.IGEMM_CONFIGS[("float", ig.MODE_SIMT)][1]
    # depthwise-like, 4096 groups, stride 4: dgrad's grid.z = 4096 * 16 = 65536
    p = ConvProblem(1, 4096, 8, 8, 4096, 3, 3, 1, 1, 4, 4, groups=4096)
    assert ig.launch_grid("dgrad", p, t)[2] == 65536 and not ig.grid_fits("dgrad", p, t)
    for name in ("igemm_simt_64x64", "igemm_simt_128x128"):
        assert not algos[("dgrad", name)].supports(p, f32)
        assert algos[("fprop", name)].supports(p, f32)  # fprop's z is the 4096 groups
    with pytest.raises(ValueError, match="65535"):
        ig.igemm_args("dgrad", p, t, 4)
    ok = ConvProblem(1, 4095, 8, 8, 4095, 3, 3, 1, 1, 4, 4, groups=4095)  # z = 65520
    assert ig.grid_fits("dgrad", ok, t) and algos[("dgrad", "igemm_simt_64x64")].supports(ok, f32)
    # wgrad: the split count is capped so that groups * splits fits
    w = ConvProblem(64, 20000, 16, 16, 20000, 1, 1, groups=20000)
    s = ig.wgrad_splits(w, t, sm_count=10**6)
    assert s == 3 and ig.grid_fits("wgrad", w, t, s) and not ig.grid_fits("wgrad", w, t, s + 1)
    assert ig.igemm_args("wgrad", w, t, 4, splits=s)[1][2] == 20000 * 3
    huge = ConvProblem(1, 70000, 2, 2, 70000, 1, 1, groups=70000)  # grid.z > 65535 for any op
    assert not any(algos[(op, "igemm_simt_64x64")].supports(huge, f32)
                   for op in ("fprop", "dgrad", "wgrad"))
    # grid.y = ceil(Kg / BN) (fprop) is held to the same limit
    tall = ConvProblem(1, 1, 4, 4, 64 * 65536, 1, 1)
    assert ig.launch_grid("fprop", tall, t)[1] == 65536 and not ig.grid_fits("fprop", tall, t)


def test_winograd_not_offered_for_16bit():
    """fp32 transforms and an fp32 GEMM would forgo the tensor cores: 16-bit inputs go to igemm."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    p = ConvProblem(2, 8, 9, 9, 8, 3, 3, 1, 1)
    for dt in (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)):
        for op in ("fprop", "dgrad"):
            assert not ig.WinogradAlgorithm(op).supports(p, dt)
            assert ig.IgemmAlgorithm(op, True, "128x128").supports(p, dt)
    for dt in (np.float32, np.float64):
        assert ig.WinogradAlgorithm("fprop").supports(p, np.dtype(dt))
    names = dict(ig.IGEMM_KERNELS)["winograd.cu"]
    assert "wino_input<float, float>" in names
    assert not any("ig_f16" in n or "ig_bf16" in n for n in names)


def test_args_struct_is_packed_int32():
    # every field a 4-byte int (no padding: the C struct IgemmArgs has the same layout, which
    # tests/test_igemm_compile.py static_asserts)
    assert ig.IGEMM_ARGS_DTYPE.itemsize == 4 * (len(ig._SCALARS) + 8 * ig.MAX_STRIDE)


def test_wgrad_splits_rule():
    t = ig.Tile(128, 128, 16, 2, 4)
    small = ConvProblem(32, 64, 56, 56, 64, 3, 3, 1, 1)  # 64 x 576 GEMM, k = 100352
    s = ig.wgrad_splits(small, t, 132)
    assert 1 < s <= 64
    assert s * 5 >= 2 * 132  # 5 blocks per split: two per SM reached
    big = ConvProblem(1, 512, 7, 7, 2048, 1, 1)  # k = 49: too short to split
    assert ig.wgrad_splits(big, t, 132) == 1


def test_vec_preconditions():
    p = ConvProblem(1, 8, 6, 6, 4, 1, 1)  # Cg*R*S = 8, P*Q = 36
    assert ig.vec_ok("fprop", p, 4, 256) and ig.vec_ok("fprop", p, 2, 256)
    assert not ig.vec_ok("fprop", p, 4, 260)  # misaligned base
    assert ig.vec_ok("wgrad", p, 4, 0) and not ig.vec_ok("wgrad", p, 2, 0)  # 36 % 8 != 0
    q = ConvProblem(1, 3, 6, 6, 4, 3, 3)  # Cg*R*S = 27
    assert not ig.vec_ok("fprop", q, 4, 0)


def test_instantiation_list_is_consistent():
    names = [n for _, ns in ig.IGEMM_KERNELS for n in ns]
    assert len(names) == len(set(names))
    for (ct, mode), tiles in ig.IGEMM_CONFIGS.items():
        for t in tiles:
            for op in ("fprop", "dgrad", "wgrad"):
                assert ig.igemm_name(op, ct, mode, t) in names
            kv = 16 // ig.ITEMSIZE[ct]
            assert t.bk % kv == 0 and t.threads % (t.bk // kv) == 0
            rstep = t.threads // (t.bk // kv)
            assert t.bm % rstep == 0 and t.bn % rstep == 0


def test_algorithms_supports():
    algos = {(op, a.name): a for op, lst in ig.algorithms().items() for a in lst}
    p = ConvProblem(2, 8, 9, 9, 8, 3, 3, 1, 1)
    f32, f16, f64 = np.dtype("float32"), np.dtype("float16"), np.dtype("float64")
    assert algos[("fprop", "igemm_simt_128x128")].supports(p, f32)
    assert algos[("fprop", "igemm_simt_64x64")].supports(p, f64)
    assert not algos[("fprop", "igemm_simt_128x128")].supports(p, f64)  # one fp64 tile only
    assert not algos[("fprop", "igemm_simt_128x128")].supports(p, f16)
    assert algos[("fprop", "igemm_tc_64x64")].supports(p, f16)
    from gpuconv import config
    assert not algos[("fprop", "igemm_tc_64x64")].supports(p, f32)  # TF32 off by default
    config.set_allow_tf32(True)
    try:
        assert algos[("fprop", "igemm_tc_64x64")].supports(p, f32)
    finally:
        config.set_allow_tf32(False)
    assert algos[("fprop", "winograd_f2x3")].supports(p, f32)
    assert not algos[("fprop", "direct_depthwise")].supports(p, f32)
    dw = ConvProblem(1, 4, 5, 5, 8, 3, 3, groups=4)
    assert algos[("wgrad", "direct_depthwise")].supports(dw, f16)
    assert not algos[("dgrad", "igemm_simt_64x64")].supports(
        ConvProblem(1, 1, 40, 40, 1, 1, 1, stride_h=17, stride_w=1), f32)


def test_register_into_a_registry():
    reg = {}

    def register_algorithm(op, name, fn, replace=False):
        reg.setdefault(op, {})[name] = fn

    names = ig.register(register_algorithm)
    assert set(reg) == {"fprop", "dgrad", "wgrad"}
    assert "winograd_f2x3" in reg["dgrad"] and "winograd_f2x3" not in reg["wgrad"]
    assert all(hasattr(fn, "supports") for r in reg.values() for fn in r.values())
    assert sorted(names["fprop"]) == sorted(reg["fprop"])
    assert list(itertools.chain(*names.values()))
