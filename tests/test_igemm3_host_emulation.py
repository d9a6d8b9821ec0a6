"""The CPU emulation of cp.async, ldmatrix and the swizzle (tests/igemm_host.py) is right, and
strict enough that the kernel bugs it exists to catch make a CPU test FAIL.

1. Purpose-written kernels (tests/igemm3_selftest.cu, through the same shim) check each
   emulation against the PTX ISA's rules written out independently here in NumPy:
   cp.async lands only at the wait_group that retires its group, poisons its destination at
   issue, zero-fills for src-size 0; ldmatrix .x1/.x2/.x4 (.trans) gives thread t row t/4,
   elements 2(t%4), 2(t%4)+1 of each matrix from the row addresses the lanes supplied;
   ldmatrix feeding mma.sync reproduces A @ B; the swizzle is a permutation of each row's chunks
   under which 8 consecutive rows at one chunk hit 8 distinct 16-byte bank groups.
2. Mutation tests: the real fprop kernel compiled with one IG3_MUTATE_* switch (wrong stage
   index, one wait too few, unswizzled reads, wrong ldmatrix lane mapping) gives a wrong or
   NaN result on a problem where the correct kernel passes.
"""
import os

import numpy as np
import pytest

from gpuconv import ConvProblem
from gpuconv.kernel_loader import kernel_source

from . import cuda_checks as cc
from . import igemm_host as ih
from .kernel_host import CXX, emulate_ptx
from .test_igemm3_host_fprop import run_fprop

pytestmark = pytest.mark.skipif(CXX is None, reason="g++ is not installed: cannot run the "
                                                    "kernels on the host")
HERE = os.path.dirname(__file__)
SELFTEST = ("st_cp_async", "st_ldmatrix", "st_ldsm_mma", "st_swizzle")


def _read(name):
    if name == "igemm3_selftest.cu":
        with open(os.path.join(HERE, name), encoding="utf-8") as f:
            return f.read()
    return kernel_source(name)


@pytest.fixture(scope="module")
def st():
    lib = ih.compile_source("igemm3_selftest",
                            emulate_ptx(kernel_source("igemm3_selftest.cu", read=_read)),
                            list(SELFTEST))
    return {n: ih.HostKernel(n, lib) for n in SELFTEST}


def test_cp_async_lands_at_its_wait(st):
    rng = np.random.default_rng(0)
    src = rng.uniform(1, 2, 256).astype(np.float32)
    out = np.zeros((32, 4, 4), np.float32)
    st["st_cp_async"]((1,), (32,), (src, out))
    t = np.arange(32)
    assert np.isnan(out[:, 0]).all()                      # poisoned at issue (was zeroed)
    want0 = src[:128].reshape(32, 4).copy()
    want0[t % 5 == 0] = 0                                 # src-size 0: zero-filled
    assert np.array_equal(out[:, 1], want0)               # group 0 landed at wait_group 1
    assert np.isnan(out[:, 2]).all()                      # group 1 still in flight
    assert np.array_equal(out[:, 3], src[128:].reshape(32, 4))   # landed at wait_group 0


def _ldmatrix_expected(rows, perm, num, trans):
    """PTX ISA: lane i gives the address of row i % 8 of matrix i / 8; thread t gets, of
    matrix j, b16 elements (t/4, 2(t%4)) and (t/4, 2(t%4)+1); .trans: the transposed matrix's."""
    out = np.zeros((32, 4), np.uint32)
    for t in range(32):
        for j in range(num):
            mat = rows[perm[8 * j:8 * j + 8]]             # 8 x 8 b16, row r from lane 8j + r
            if trans:
                mat = mat.T
            lo, hi = mat[t // 4, 2 * (t % 4)], mat[t // 4, 2 * (t % 4) + 1]
            out[t, j] = int(lo) | (int(hi) << 16)
    return out


@pytest.mark.parametrize("num,trans", [(1, 0), (2, 0), (4, 0), (2, 1), (4, 1)])
def test_ldmatrix_fragment_layout(st, num, trans):
    rng = np.random.default_rng(num + 10 * trans)
    rows = rng.integers(0, 2**16, (32, 8)).astype(np.uint16)
    perm = rng.permutation(32).astype(np.int32)           # each lane points at another row
    out = np.zeros((32, 4), np.uint32)
    st["st_ldmatrix"]((1,), (32,), (rows.reshape(-1), perm, out, np.int32(num), np.int32(trans)))
    assert np.array_equal(out, _ldmatrix_expected(rows, perm, num, trans))
    # and it is not the other layout: the test can tell them apart
    assert not np.array_equal(out[:, :num], _ldmatrix_expected(rows, perm, num, 1 - trans)[:, :num])


def test_ldmatrix_feeds_mma(st):
    """cp.async -> swizzled shared -> ldmatrix -> mma.sync == A @ B (two emulations built from
    two different PTX tables agree)."""
    rng = np.random.default_rng(3)
    A = rng.uniform(-1, 1, (16, 16)).astype(np.float16)
    B = rng.uniform(-1, 1, (16, 8)).astype(np.float16)
    D = np.full((16, 8), np.nan, np.float32)
    st["st_ldsm_mma"]((1,), (32,), (ih.to_device(A), ih.to_device(np.ascontiguousarray(B.T)),
                                    D))
    ref = A.astype(np.float64) @ B.astype(np.float64)
    assert np.abs(D - ref).max() < 1e-5


def test_swizzle_permutes_rows_and_avoids_bank_conflicts(st):
    out = np.zeros(256 + 512, np.int32)
    st["st_swizzle"]((1,), (64,), (out,))
    for cpr, tab in ((4, out[:256].reshape(64, 4)), (8, out[256:].reshape(64, 8))):
        rows = np.arange(64)[:, None]
        assert (tab // cpr == rows).all()                     # stays in its row
        assert all(sorted(r % cpr) == list(range(cpr)) for r in tab)   # a permutation
        for r0 in range(0, 64, 8):                            # one ldmatrix phase: 8 rows
            for c in range(cpr):
                banks = tab[r0:r0 + 8, c] % 8                 # 16-byte group of a 128-byte line
                assert len(set(banks)) == 8, (cpr, r0, c, banks)
        # without the XOR, the same phase is conflicted (the check can fail)
        plain = np.arange(64)[:, None] * cpr + np.arange(cpr)[None, :]
        assert len(set(plain[0:8, 0] % 8)) < 8


# ---- mutation tests: the real kernel with one bug -----------------------------------------------
MUTANT_PROBLEM = ((2, 16, 5, 6), (16, 16, 3, 3), dict(padding=1))   # 9 k-iterations
MUTATIONS = ("IG3_MUTATE_STAGE", "IG3_MUTATE_WAIT", "IG3_MUTATE_NO_SWIZZLE_READ",
             "IG3_MUTATE_LDSM")


@pytest.fixture(params=MUTATIONS)
def mutant(request, monkeypatch):
    libs = ih.build3((request.param,))
    ih.install3(monkeypatch, libs)
    return request.param


def test_correct_kernel_passes_the_mutant_problem(monkeypatch):
    ih.install3(monkeypatch, ih.build3())
    xs, ws, kw = MUTANT_PROBLEM
    run_fprop(ConvProblem.from_args(xs, ws, **kw), "float16", "128x128", splits=1)


def test_warp_ahead_schedule_gives_the_same_bits(monkeypatch):
    """Warps running ahead of each other between barriers (a legal GPU schedule): the correct
    kernel's result is bitwise the one of the forward order."""
    ih.install3(monkeypatch, ih.build3())
    xs, ws, kw = MUTANT_PROBLEM
    p = ConvProblem.from_args(xs, ws, **kw)
    try:
        ref, _ = run_fprop(p, "float16", "128x128", splits=1)
        for order in ("warp_ahead", "warp_ahead_reverse"):
            ih.set_order(order)
            out, _ = run_fprop(p, "float16", "128x128", splits=1)
            assert np.array_equal(np.ascontiguousarray(out).view(np.uint16),
                                  np.ascontiguousarray(ref).view(np.uint16)), order
    finally:
        ih.set_order("forward")


@pytest.mark.parametrize("order", ("forward", "warp_ahead"))
def test_missing_barrier(monkeypatch, order):
    """No __syncthreads between the cp.async wait and the ldmatrix reads: invisible when all
    warps move in lockstep (forward order: every thread's wait runs before any warp's reads),
    caught when one warp runs ahead and reads rows other warps' copies have not landed in."""
    ih.install3(monkeypatch, ih.build3(("IG3_MUTATE_NO_BARRIER",)))
    xs, ws, kw = MUTANT_PROBLEM
    ih.set_order(order)
    try:
        out, ref = run_fprop(ConvProblem.from_args(xs, ws, **kw), "float16", "128x128",
                             splits=1, check=False)
    finally:
        ih.set_order("forward")
    if order == "forward":
        cc.assert_close(out.astype(np.float64), ref, "float16", "lockstep schedule")
    else:
        assert np.isnan(out.astype(np.float64)).any()


def test_mutated_kernel_fails(mutant):
    xs, ws, kw = MUTANT_PROBLEM
    out, ref = run_fprop(ConvProblem.from_args(xs, ws, **kw), "float16", "128x128", splits=1,
                         check=False)
    out = out.astype(np.float64)
    with pytest.raises(AssertionError):
        cc.assert_close(out, ref, "float16", mutant)
