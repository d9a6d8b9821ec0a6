"""bench/sass_stats.py: the SASS parser, the loop finder and the issue-rate model on hand-written
listings with known answers (no CUDA tools needed), and one end-to-end run on
kernels/igemm_fprop.cu, skipped where nvcc or nvdisasm/cuobjdump are missing (CI has nvcc but
not the nvidia-cuda-nvdisasm wheel)."""
import importlib.util
import os
import re
import struct
import sys

import pytest

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "sass_stats.py")
_spec = importlib.util.spec_from_file_location("sass_stats", _PATH)
ss = importlib.util.module_from_spec(_spec)
sys.modules["sass_stats"] = ss   # dataclasses look their module up there
_spec.loader.exec_module(ss)

# nvdisasm -c style. Kernel 1, main loop = .L_x_0 .. the back edge at 0x130, with an if (0x60),
# an out-of-line block after EXIT that jumps back in (0x160), a nested loop without math
# (0xd0-0xf0) and nvdisasm's unreachable self-loop at the end. Kernel 2: no math, two loops.
NVDISASM = """
	.target	sm_90
//--------------------- .text._Z4testPf --------------------------
	.section	.text._Z4testPf,"ax",@progbits
	.align	128
        .global         _Z4testPf
_Z4testPf:
.text._Z4testPf:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;
        /*0030*/               @P0 EXIT ;
.L_x_0:
        /*0040*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0050*/                   LDG.E.128.CONSTANT R8, desc[UR4][R6.64] ;
        /*0060*/              @!P1 BRA `(.L_x_1) ;
        /*0070*/                   FFMA R10, R2, R3, R10 ;
        /*0080*/                   FFMA R11, R2, R3, R11 ;
.L_x_1:
        /*0090*/                   LDS.128 R12, [R0] ;
        /*00a0*/                   HMMA.16816.F32 R16, R12, R14, R16 ;
        /*00b0*/               @P2 BRA `(.L_x_3) ;
.L_x_2:
        /*00c0*/                   STS.128 [R0], R8 ;
.L_x_4:
        /*00d0*/                   IADD3 R20, R20, 0x1, RZ ;
        /*00e0*/                   ISETP.NE.AND P3, PT, R20, R21, PT ;
        /*00f0*/               @P3 BRA `(.L_x_4) ;
        /*0100*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0110*/                   HFMA2.MMA R22, -RZ, RZ, 0, 0 ;
        /*0120*/                   ISETP.NE.AND P4, PT, R22, R23, PT ;
        /*0130*/               @P4 BRA `(.L_x_0) ;
        /*0140*/                   STG.E desc[UR4][R4.64], R10 ;
        /*0150*/                   EXIT ;
.L_x_3:
        /*0160*/                   LDG.E.U16 R9, desc[UR4][R6.64] ;
        /*0170*/                   BRA `(.L_x_2) ;
.L_x_5:
        /*0180*/                   BRA `(.L_x_5);
        /*0190*/                   NOP;
.L_x_6:
//--------------------- .text._Z4copyPf --------------------------
	.section	.text._Z4copyPf,"ax",@progbits
_Z4copyPf:
.text._Z4copyPf:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_7:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   ISETP.NE.AND P0, PT, R2, RZ, PT ;
        /*0030*/               @P0 BRA `(.L_x_7) ;
.L_x_8:
        /*0040*/                   LDG.E.64 R2, desc[UR4][R4.64] ;
        /*0050*/                   STG.E.64 desc[UR4][R6.64], R2 ;
        /*0060*/                   IADD3 R4, P1, R4, 0x8, RZ ;
        /*0070*/               @P1 BRA `(.L_x_8) ;
        /*0080*/                   EXIT ;
//--------------------- .nv.info --------------------------
	.section	.nv.info,"",@"SHT_CUDA_INFO"
        /*0000*/ 	.byte	0x04, 0x2f
        /*0008*/ 	.word	0x000000fe
"""

# cuobjdump -sass style: numeric targets, encodings in comments.
CUOBJDUMP = """
	code for sm_90
		Function : _Z4loopPd
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;        /* 0x00000a00ff017b82 */
                                                                 /* 0x000fe20000000800 */
        /*0010*/                   DFMA R2, R4, R6, R2 ;         /* 0x0000000604027228 */
        /*0020*/                   LDGSTS.E.BYPASS.128 [R0], desc[UR4][R2.64] ;  /* 0x0 */
        /*0030*/                   LDSM.16.M88.4 R4, [R0] ;      /* 0x0 */
        /*0040*/                   DFMA R8, R4, R6, R8 ;         /* 0x0000000604087228 */
        /*0050*/               @P0 BRA 0x10 ;                    /* 0xfffffffc00f40947 */
        /*0060*/                   EXIT ;                        /* 0x000000000000794d */
        /*0070*/                   BRA 0x70;                     /* 0xfffffffc00fc7947 */
"""


def _loop(text, kernel):
    instrs = ss.parse_sass(text)[kernel]
    cfg = ss.Cfg(instrs)
    return cfg, ss.main_loop(cfg)


def test_parse_nvdisasm_kernels_and_targets():
    k = ss.parse_sass(NVDISASM)
    assert list(k) == ["_Z4testPf", "_Z4copyPf"]   # .nv.info's .byte lines are not code
    t = k["_Z4testPf"]
    assert len(t) == 26 and t[-1].opcode == "NOP"
    bra = {i.addr: i for i in t if i.base == "BRA"}
    assert {a: i.target for a, i in bra.items()} == {
        0x60: 0x90, 0xb0: 0x160, 0xf0: 0xd0, 0x130: 0x40, 0x170: 0xc0, 0x180: 0x180}
    assert bra[0x60].pred == "!P1" and bra[0x170].pred is None
    assert t[5].opcode == "LDG.E.128.CONSTANT" and t[5].operands == "R8, desc[UR4][R6.64]"


def test_main_loop_natural_loop_with_out_of_line_block():
    cfg, (lp, has_math) = _loop(NVDISASM, "_Z4testPf")
    assert has_math
    assert cfg.instrs[cfg.blocks[lp.header][0]].addr == 0x40
    # body: 0x40..0x130 plus the out-of-line block at 0x160..0x170, not the epilogue/self-loop
    addrs = sorted(i.addr for b in lp.body for i in cfg.block_instrs(b))
    assert addrs == list(range(0x40, 0x140, 0x10)) + [0x160, 0x170]
    assert (lp.start, lp.end) == (0x40, 0x170)
    loops = ss.find_loops(cfg)
    # the nested no-math loop and the main loop; the unreachable self-loop is no loop
    assert sorted(cfg.instrs[cfg.blocks[x.header][0]].addr for x in loops) == [0x40, 0xd0]


def test_loop_stats_counts_exact():
    s = ss.loop_stats(ss.parse_sass(NVDISASM)["_Z4testPf"], "_Z4testPf")
    assert s["instrs"] == 18
    assert s["counts"] == {"bar": 1, "branch": 5, "ffma": 2, "ldg": 3, "lds": 1, "mma": 1,
                           "other": 4, "sts": 1}   # HFMA2.MMA is a move, not math
    assert s["widths"] == {"ldg": {16: 1, 32: 1, 128: 1}, "lds": {128: 1}, "sts": {128: 1}}
    # longest: every block once; shortest: skip the FFMAs (2) and the out-of-line block (2)
    assert (s["min_path"], s["max_path"]) == (14, 18)
    assert s["mma_ops"] == ["HMMA.16816.F32"]
    assert s["mma_flop"] == 2 * 16 * 8 * 16 and s["mma_units"] == {"fp16": 4096}
    assert s["smem_bytes"] == 512 + 512   # LDS.128 + STS.128, 32 lanes x 16 B
    assert s["scalar_global_loads"] == 2   # LDG.E and LDG.E.U16; LDG.E.128 is a vector load
    assert list(s["opcodes"].items())[:2] == [("BRA", 5), ("LDG", 3)]
    assert s["slabs"] == 1 and s["expected_math_per_slab"] is None


# A SIMT igemm tile (8x4 warp tile, BK 8: 8 FFMAs per slab) whose k loop is unrolled by 2 only:
# the FFMA loop (0x30-0x60) runs 4 times inside the slab loop (0x10-0x80), which has no math.
_NESTED_NAME = "_Z11igemm_fpropIfLi0ELi8ELi4ELi8ELi1ELi1EEvPKT_S2_S2_PS0_9IgemmArgs"
NESTED = f"""
	.target	sm_90
	.section	.text.{_NESTED_NAME},"ax",@progbits
{_NESTED_NAME}:
.text.{_NESTED_NAME}:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDS.128 R12, [R0] ;
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
.L_x_1:
        /*0030*/                   FFMA R10, R12, R13, R10 ;
        /*0040*/                   FFMA R11, R12, R14, R11 ;
        /*0050*/                   IADD3 R20, R20, 0x1, RZ ;
        /*0060*/               @P0 BRA `(.L_x_1) ;
        /*0070*/                   ISETP.NE.AND P1, PT, R22, R23, PT ;
        /*0080*/               @P1 BRA `(.L_x_0) ;
        /*0090*/                   EXIT ;
"""


def test_partially_unrolled_k_loop_is_summed_into_its_slab():
    s = ss.loop_stats(ss.parse_sass(NESTED)[_NESTED_NAME], _NESTED_NAME)
    assert s["expected_math_per_slab"] == 8
    assert s["nested"] == {"inner_loop": [0x30, 0x60], "trip": 4, "inner_instrs": 4,
                           "outer_own_instrs": 4}
    assert s["loop"] == [0x10, 0x80]
    assert s["instrs"] == 4 + 4 * 4 and s["counts"]["ffma"] == 8 and s["counts"]["lds"] == 1
    assert s["slabs"] == 1 and s["matches_tile"] is True
    assert (s["min_path"], s["max_path"]) == (20, 20)
    # without a tile to check against (not an igemm name) the inner loop is reported as is
    t = ss.loop_stats(ss.parse_sass(NESTED)[_NESTED_NAME], "_Z4testPf")
    assert "nested" not in t and t["instrs"] == 4 and t["loop"] == [0x30, 0x60]


def test_no_math_kernel_takes_the_biggest_loop():
    cfg, (lp, has_math) = _loop(NVDISASM, "_Z4copyPf")
    assert not has_math
    assert (lp.start, lp.end) == (0x40, 0x70)   # 4 instructions beat the 3 of the first loop
    s = ss.loop_stats(cfg.instrs)
    assert s["widths"] == {"ldg": {64: 1}, "stg": {64: 1}}


def test_cuobjdump_listing():
    k = ss.parse_sass(CUOBJDUMP)
    assert list(k) == ["_Z4loopPd"] and len(k["_Z4loopPd"]) == 8
    s = ss.loop_stats(k["_Z4loopPd"])
    assert (s["loop"], s["instrs"]) == ([0x10, 0x50], 5)
    assert s["counts"] == {"branch": 1, "dfma": 2, "ldgsts": 1, "ldsm": 1}
    assert s["widths"] == {"ldgsts": {128: 1}} and s["scalar_global_loads"] == 0
    assert s["smem_bytes"] == 512 + 512   # 16 B x 32 lanes into smem, ldmatrix .x4


def test_no_loop():
    text = NVDISASM.split(".L_x_0:")[0].replace("@P0 EXIT", "EXIT")
    assert ss.loop_stats(ss.parse_sass(text)["_Z4testPf"]) is None


@pytest.mark.parametrize("opcode,flop,unit", [
    ("HMMA.16816.F32", 4096, "fp16"), ("HMMA.16816.F32.BF16", 4096, "fp16"),
    ("HMMA.1688.F32.TF32", 2048, "tf32"), ("DMMA.884", 512, "fp64"),
    ("IMMA.16832.S8.S8", 8192, "int8"),
    ("HGMMA.64x128x16.F32", 2 * 64 * 128 * 16 // 4, "fp16"),   # per warp of the warpgroup
])
def test_mma_info(opcode, flop, unit):
    assert ss.mma_info(opcode) == (flop, unit)
    assert ss.classify(opcode) == "mma"


def test_widths_and_classes():
    assert [ss.mem_width(o) for o in ("LDG.E", "LDG.E.128.CONSTANT", "LDG.E.U16.CONSTANT",
                                      "LDS.64", "STS.U8")] == [32, 128, 16, 64, 8]
    assert ss.ldsm_bytes("LDSM.16.M88.4") == 512 and ss.ldsm_bytes("LDSM.16.MT88.2") == 128 * 2
    assert [ss.classify(o) for o in ("HFMA2.MMA", "FFMA.FTZ", "LDGSTS.E.BYPASS.128",
                                     "BAR.SYNC.DEFER_BLOCKING", "EXIT", "IMAD.WIDE")] == \
        ["other", "ffma", "ldgsts", "bar", "branch", "other"]


@pytest.mark.parametrize("args,bm,bn,bk,warps,per_instr", [
    ("IfLi0ELi128ELi128ELi16ELi2ELi4E", 128, 128, 16, 8, 1),        # SIMT: 1 FMA/thread/instr
    ("IfLi0ELi64ELi64ELi16ELi2ELi2E", 64, 64, 16, 4, 1),
    ("IdLi0ELi64ELi64ELi8ELi2ELi2E", 64, 64, 8, 4, 1),
    ("I6ig_f16Li1ELi128ELi128ELi32ELi2ELi4E", 128, 128, 32, 8, 16 * 8 * 16 // 32),
    ("I7ig_bf16Li1ELi64ELi64ELi32ELi2ELi2E", 64, 64, 32, 4, 16 * 8 * 16 // 32),
    ("IfLi2ELi128ELi128ELi16ELi2ELi4E", 128, 128, 16, 8, 16 * 8 * 8 // 32),
])
def test_igemm_slab_math(args, bm, bn, bk, warps, per_instr):
    # a warp's share of the slab's multiply-adds, per lane, over those one instruction does
    want = bm * bn * bk // (32 * warps) // per_instr
    for op in ("fprop", "dgrad", "wgrad"):
        assert ss.igemm_slab_math(f"_Z11igemm_{op}{args}EvPKT_S2_S2_PS0_9IgemmArgs") == want
    assert ss.igemm_slab_math("_Z8dw_fpropIfEvPKT_S2_PS0_") is None


def _stats(instrs, ffma=0, dfma=0, hmma=0, smem=0, unit="fp16", flop_per=4096):
    return {"instrs": instrs, "counts": {"ffma": ffma, "dfma": dfma, "mma": hmma},
            "smem_bytes": smem, "mma_flop": hmma * flop_per,
            "mma_units": {unit: hmma * flop_per} if hmma else {}}


def test_predict_issue_bound():
    dev = ss.device("h200")
    assert dev.peaks["fp32"] == pytest.approx(66.9e12) and dev.sms == 132
    assert dev.clock == pytest.approx(1.98e9, rel=1e-3)
    issue = dev.peaks["fp32"] / 64   # warp instructions per second, whole GPU
    # the review's SIMT fp32 128x128 loop: FFMA share x FP32 peak
    p = ss.predict(_stats(1501, ffma=1024, smem=64 * 512), dev)
    assert p["bound"] == "issue" and p["unit"] == "fp32"
    assert p["tflops"] == pytest.approx(1024 / 1501 * 66.9, rel=1e-9)
    # the review's f16 128x128 loop: 32 HMMA.16816 in 880 -> ~156 TFLOP/s
    p = ss.predict(_stats(880, hmma=32), dev)
    assert p["bound"] == "issue"
    assert p["tflops"] * 1e12 == pytest.approx(32 / 880 * issue * 4096, rel=1e-9)
    assert p["fraction"] == pytest.approx(p["tflops"] / 989.4, rel=1e-9)


def test_predict_unit_bounds():
    dev = ss.device("h200")
    # 32 HMMA in 64 instructions: the tensor pipe, not issue, limits: the datasheet peak
    p = ss.predict(_stats(64, hmma=32), dev)
    assert (p["bound"], p["tflops"], p["fraction"]) == ("tensor", pytest.approx(989.4),
                                                        pytest.approx(1.0))
    p = ss.predict(_stats(64, hmma=32, unit="tf32", flop_per=2048), dev)
    assert p["bound"] == "tensor" and p["tflops"] == pytest.approx(494.7)
    # DFMA at 2 per SM-clock: 256 of 300 instructions -> the FP64 (non-tensor) peak, FP32/2
    p = ss.predict(_stats(300, dfma=256), dev)
    assert (p["bound"], p["unit"]) == ("dfma", "fp64")
    assert p["tflops"] == pytest.approx(66.9 / 2)
    # shared memory at 128 B/clk: 512 FFMA, 600 instrs, 128 LDS.128 (64 KiB) -> 512 clk
    p = ss.predict(_stats(600, ffma=512, smem=128 * 512), dev)
    assert p["bound"] == "smem"
    assert p["tflops"] * 1e12 == pytest.approx(512 * 64 / 512 * dev.clock * 132, rel=1e-9)
    assert ss.predict(_stats(100), dev)["tflops"] is None


def _elf(sections, symbols):
    """A minimal ELF64: sections [(name, type, data, link)], symbol names (index 1..)."""
    strtab = b"\0" + b"".join(n.encode() + b"\0" for n in symbols)
    syms = b"\0" * 24
    off = 1
    for n in symbols:
        syms += struct.pack("<IBBHQQ", off, 0x12, 0, 0, 0, 0)
        off += len(n) + 1
    secs = [("", 0, b"", 0), (".shstrtab", 3, None, 0), (".strtab", 3, strtab, 0),
            (".symtab", 2, syms, 2)] + sections
    shstr = b"\0" + b"".join(s[0].encode() + b"\0" for s in secs[1:])
    name_off, o = [0], 1
    for s in secs[1:]:
        name_off.append(o)
        o += len(s[0]) + 1
    body, offsets = b"", []
    for s in secs:
        offsets.append(64 + len(body))
        body += shstr if s[0] == ".shstrtab" else s[2]
    shoff = 64 + len(body)
    hdr = b"\x7fELF\x02\x01\x01" + b"\0" * 33 + struct.pack("<Q", shoff) + b"\0" * 10 + \
        struct.pack("<HHH", 64, len(secs), 1)
    hdr = hdr[:64].ljust(64, b"\0")
    sh = b""
    for i, s in enumerate(secs):
        data = shstr if s[0] == ".shstrtab" else s[2]
        sh += struct.pack("<IIQQQQIIQQ", name_off[i], s[1], 0, 0, offsets[i], len(data), s[3],
                          0, 1, 0)
    return hdr + body + sh


def test_cubin_registers():
    info = (struct.pack("<BBH", 0x04, 0x11, 8) + struct.pack("<II", 1, 0)     # FRAME_SIZE
            + struct.pack("<BBH", 0x04, 0x2f, 8) + struct.pack("<II", 2, 254)  # REGCOUNT
            + struct.pack("<BBH", 0x03, 0x1b, 0xff)                           # a half-word
            + struct.pack("<BBH", 0x04, 0x2f, 8) + struct.pack("<II", 1, 40))
    data = _elf([(".nv.info", 0x70000000, info, 3)], ["_Z1av", "_Z1bv"])
    assert ss.cubin_registers(data) == {"_Z1bv": 254, "_Z1av": 40}
    with pytest.raises(ValueError, match="ELF64"):
        ss.cubin_registers(b"not an elf")


def test_markdown_row():
    row = {"file": "t.cu", "kernel": "_Z4testPf", "name": "test", "registers": 32,
           "loop": ss.loop_stats(ss.parse_sass(NVDISASM)["_Z4testPf"]), "predicted": None}
    md = ss.markdown([row]).splitlines()
    assert len(md) == 3 and md[2].startswith("| t.cu | test | 32 | 1 | 18 | 18 | 1 (5.6%) |")


# ---- end to end: nvcc + nvdisasm on the real kernels (skipped without the tools) -------------
_NVCC, _DIS = ss.find_nvcc(), ss.find_tool("nvdisasm") or ss.find_tool("cuobjdump")


@pytest.mark.skipif(_NVCC is None or _DIS is None,
                    reason="needs nvcc and nvdisasm/cuobjdump (pip install nvidia-cuda-nvdisasm)")
def test_igemm_fprop_main_loops():
    file, gen, src = next(x for x in ss.kernel_files() if x[0] == "igemm_fprop.cu")
    rows = ss.file_stats(file, gen, src, "sm_90")
    from gpuconv.engines import cuda_igemm as ig
    assert len(rows) == len(dict(ig.IGEMM_KERNELS)[file])
    for r in rows:
        s = r["loop"]
        assert r["registers"] and 0 < r["registers"] <= 255
        # the loop found does exactly the tile's multiply-adds for one (or u) k-slabs
        assert s["math"] and s["matches_tile"], (r["name"], s)
        assert r["predicted"]["tflops"] > 0
        if re.match(r"_Z11igemm_fpropI\w+?Li1E", r["kernel"]):   # MODE_F16
            assert s["mma_ops"] in (["HMMA.16816.F32"], ["HMMA.16816.F32.BF16"])
        assert s["counts"]["bar"] == s["slabs"]   # one __syncthreads per slab


def test_cli_on_a_listing(tmp_path, capsys):
    sass, out = tmp_path / "t.sass", tmp_path / "t.json"
    sass.write_text(NVDISASM)
    assert ss.main(["--sass", str(sass), "--kernel", "test", "--json", str(out),
                    "--markdown"]) == 0
    printed = capsys.readouterr().out
    assert "no GPU run" in printed and "| t.sass |" in printed
    import json
    doc = json.loads(out.read_text())
    assert doc["schema"] == "gpuconv-sass-stats/1"
    (row,) = doc["rows"]   # --kernel left out _Z4copyPf
    assert row["kernel"] == "_Z4testPf" and row["loop"]["instrs"] == 18
    # one MMA in the loop: a GEMM-like loop gets a prediction; 1 KiB of shared traffic (8 clk)
    # outweighs 18 instructions (4.5 clk)
    assert row["predicted"]["bound"] == "smem" and row["predicted"]["unit"] == "fp16"
    with pytest.raises(SystemExit):
        ss.main(["--device", "a100"])


def test_targets(tmp_path, capsys):
    sass = tmp_path / "t.sass"
    sass.write_text(NVDISASM)
    rows = ss.kernel_stats(NVDISASM)
    # 1 HMMA in 18 instructions = 5.6%; 2 of the 3 LDG are narrower than 16 bytes
    assert ss.target_failures(rows, 0.05, False) == []
    name = ss.short_name("_Z4testPf")   # "test" with c++filt, else the mangled name
    assert ss.target_failures(rows, 0.06, True) == [
        f"{name}: MMA share 5.6% < 6%",
        f"{name}: 2 global loads narrower than 16 bytes in the main loop"]
    assert ss.main(["--sass", str(sass), "--min-mma-share", "0.15"]) == 1
    assert "TARGET MISSED" in capsys.readouterr().out
    assert ss.main(["--sass", str(sass), "--min-mma-share", "0.05"]) == 0


def test_third_generation_names_give_their_tile_math():
    """igemm3_<op><T, MODE, BM, BN, BK, WARPS_M, WARPS_N, STAGES>: MI*NI*BK/KSTEP MMAs per warp
    and k-slab (f16 m16n8k16, tf32 m16n8k8), for fprop, dgrad and wgrad alike."""
    f16 = "_Z12igemm3_dgradI6ig_f16Li1ELi128ELi128ELi32ELi2ELi2ELi3EEvPKT_S3_PS1_Pf14Igemm3GradArgs"
    tf32 = "_Z12igemm3_wgradIfLi2ELi64ELi64ELi16ELi2ELi2ELi4EEvPKT_S2_PS0_Pf14Igemm3GradArgs"
    fp = "_Z12igemm3_fpropI7ig_bf16Li1ELi128ELi64ELi32ELi2ELi2ELi4EEvPKT_S3_S3_PS1_Pf10Igemm3Args"
    assert ss.igemm_slab_math(f16) == 4 * 8 * 2       # 64x64 warp tile, two k16 steps
    assert ss.igemm_slab_math(tf32) == 2 * 4 * 2      # 32x32 warp tile, two k8 steps
    assert ss.igemm_slab_math(fp) == 4 * 4 * 2        # 64x32 warp tile
    assert ss.igemm_slab_math("_Z19igemm3_splitk_reduceI6ig_f16EvPKfPKT_PS2_10Igemm3Args") is None
