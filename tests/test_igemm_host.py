"""CPU checks of the second-generation kernels' host-side math (no GPU needed).

- dgrad's stride-phase tables (what kernels/igemm_dgrad.cu reads) against the NumPy engine's own
  phase arithmetic, and a NumPy emulation of the kernel's per-phase GEMM against conv_dgrad;
- the kernels' incremental mixed-radix k counters (ig_step / ig_jump) against divmod;
- Winograd F(2x2,3x3): the same tile algorithm as kernels/winograd.cu, in NumPy, against the
  NumPy engine for fprop and stride-1 dgrad;
- launch geometry, split-K sizing and the 16-byte-load preconditions.
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


@pytest.mark.parametrize("name,xs,ws,kw", PROBLEMS, ids=IDS)
def test_dgrad_phase_tables_match_numpy_engine(name, xs, ws, kw):
    p = _problem(xs, ws, kw)
    for size, pad, k, dil, st, out in ((p.H, p.pad_h, p.R, p.dil_h, p.stride_h, p.P),
                                       (p.W, p.pad_w, p.S, p.dil_w, p.stride_w, p.Q)):
        rows, step, p_step = ig.dgrad_phases(size, pad, k, dil, st, out)
        ref, _, _ = ne._phase_taps(size, pad, k, dil, st, out)
        for (r0, taps, p0, n), (ph, n_ref, taps_ref) in zip(rows, ref):
            assert n == n_ref
            got = [(r0 + j * step, p0 - j * p_step) for j in range(taps)]
            # the engine lists taps by falling r (the mirrored kernel); the kernel by rising r
            assert sorted(got) == sorted(taps_ref), (ph, got, taps_ref)


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
