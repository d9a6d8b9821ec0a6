"""Static SASS statistics of gpuconv's kernels: the main loop of each kernel, what one iteration
issues per warp, and the TFLOP/s that implies on an H100/H200 -- a prediction, no GPU involved.

    python bench/sass_stats.py [--arch sm_90] [--file igemm_fprop.cu] [--kernel REGEX]
                               [--json FILE] [--markdown] [--keep DIR]

Pipeline (per kernel file): the translation unit the compile test builds
(``gpuconv.cuda.instantiation_source`` with the loader's name lists: ``gpuconv.cuda.KERNELS``
for the first generation, ``cuda_igemm.IGEMM_KERNELS`` + ``cuda_igemm.STRUCTS`` for the second)
-> ``nvcc -std=c++17 -ftz=true -cubin -arch=<arch>`` -> ``nvdisasm`` (or ``cuobjdump -sass``)
from the ``nvidia-cuda-nvdisasm`` / ``nvidia-cuda-cuobjdump`` wheels, else from PATH. CuPy
compiles with NVRTC, not nvcc; both drive the same ptxas back end with these options, so the
SASS should match closely (instruction scheduling can differ a little between CUDA versions).
Registers come from the cubin's EIATTR_REGCOUNT records (``cubin_registers``).

Main-loop heuristic (``find_loops`` / ``main_loop``): split the listing into basic blocks, find
dominators, and take every back edge (a branch to a block that dominates it) as a natural loop.
Each loop's "own" math is the MMA + FFMA + DFMA count in its body minus that of the loops
nested in it; the main loop is the loop with the most own math, ties to the innermost. A kernel
without math gets the loop with the most own instructions (``math=False`` in its row).
Limits: a loop the compiler unrolled (two k-slabs per iteration) is reported per iteration; the
``slabs`` column divides by the unroll factor only where the kernel name tells the tile
(``igemm_*``: expected math per slab from BM, BN, BK, warps). Where the main loop does a whole
fraction 1/t of an igemm slab's math inside a loop with no other math (a k loop unrolled by
KU < BK), the slab loop is reported: its own instructions once plus t times the inner loop's
(``nested`` in the JSON; t = BK / KU from the name, not from the SASS); an outer loop whose peeled copies
hold as much math as the real loop loses the tie to it by design; indirect branches (BRX) have
no known targets and end their block. Counts are static: ``instrs`` is every instruction in the
loop body once (all paths, e.g. both the vector and the scalar-fallback gather);
``min_path``/``max_path`` are the shortest and longest path through one iteration (nested loops
counted once; for the igemm kernels the shortest is the last slab, which skips the prefetch);
predicated instructions count as issued, as they are on the hardware.

Prediction model (``predict``), throughput only (latency assumed hidden by other warps, which
one 8-warp block per SM may not do): per warp-iteration an SM needs
    cycles = max(instrs / ISSUE_PER_SM,                 issue: 4 schedulers x 1 warp-instr/clk
                 DFMA / DFMA_PER_SM,                    64 FP64 lanes per SM -> 2 warp-DFMA/clk
                 MMA FLOP / (tensor peak / SMs / clock),
                 shared-memory bytes / SMEM_BYTES_PER_SM)   128 B/clk
and does FLOP = 64 per FFMA/DFMA (32 lanes x 2) + 2*m*n*k per MMA (HGMMA: per warp, a quarter
of the warpgroup's). Predicted TFLOP/s = FLOP / cycles x clock x SMs, capped at the unit's
datasheet peak. Constants: peaks from gpuconv/benchmark/roofline.py's GPU_TABLE (default H200:
FP32 66.9, TF32 494.7, FP16/BF16 989.4 TFLOP/s dense); 132 SMs (H100 PCIe: 114);
clock = FP32 peak / (SMs x 128 lanes x 2) = 1.98 GHz. For FFMA the issue bound alone gives
FFMA share x FP32 peak (68.2% -> 45.6 TFLOP/s). The tensor peaks are wgmma's; mma.sync (HMMA)
on Hopper reaches less, so an HMMA row is a ceiling. The model ignores global-memory bandwidth
and latency (the roofline floors in bench/NOTES.md cover bandwidth), bank conflicts, and the
code outside the loop.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile

# ---------------------------------------------------------------------------------------------
# device model
# ---------------------------------------------------------------------------------------------
FP32_LANES_PER_SM = 128
ISSUE_PER_SM = 4          # warp instructions per clock per SM (4 sub-partitions, 1 each)
DFMA_PER_SM = 2           # warp DFMA per clock per SM (64 FP64 lanes)
SMEM_BYTES_PER_SM = 128   # shared-memory bandwidth, bytes per clock per SM


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    peaks: dict           # unit -> FLOP/s: fp32 (CUDA cores), tf32, fp16, fp64 (tensor cores)
    sms: int

    @property
    def clock(self):
        return self.peaks["fp32"] / (self.sms * FP32_LANES_PER_SM * 2)


#: the Hopper rows of roofline.GPU_TABLE the per-SM constants above hold for, with SM counts
HOPPER_SMS = {"h200": 132, "h100": 132, "h100 nvl": 132, "h100 pcie": 114}


def device(pattern="h200"):
    """A Device from gpuconv.benchmark.roofline.GPU_TABLE's row `pattern` (Hopper rows only:
    an A100 has 64 FP32 lanes per SM, so the constants above would not hold)."""
    from gpuconv.benchmark.roofline import GPU_TABLE
    if pattern.lower() not in HOPPER_SMS:
        raise ValueError(f"device must be one of {sorted(HOPPER_SMS)} (the model's per-SM "
                         f"constants are Hopper's), got {pattern!r}")
    pat, label, f = next(row for row in GPU_TABLE if row[0] == pattern.lower())
    return Device(label, {k: v * 1e12 for k, v in f.items() if k != "tbs"},
                  HOPPER_SMS[pat])


# ---------------------------------------------------------------------------------------------
# parsing: nvdisasm or cuobjdump -sass text -> {kernel: [Instr]}
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Instr:
    addr: int
    pred: str | None      # "P0", "!P0", ... or None
    opcode: str           # with modifiers: "LDG.E.128.CONSTANT"
    operands: str
    target: object = None  # branch target: a label name (str) or an address (int)

    @property
    def base(self):
        return self.opcode.split(".")[0]


_KERNEL_NVDISASM = re.compile(r"^\s*\.section\s+\.text\.([^,\s]+)")
_KERNEL_CUOBJDUMP = re.compile(r"^\s*Function\s*:\s*(\S+)")
_SECTION = re.compile(r"^\s*\.section\s")
_LABEL = re.compile(r"^([.$\w]+):\s*$")
_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(?:\{\s*)?(@!?U?P(?:\d|T)\s+)?([A-Z][A-Z0-9_]*"
                    r"(?:\.[A-Za-z0-9_]+)*)\s*([^;]*);")
_TARGET_LABEL = re.compile(r"`\(([.$\w]+)\)")
_TARGET_ADDR = re.compile(r"(?:^|[\s,])(0x[0-9a-fA-F]+)\s*$")
BRANCHES = {"BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BREAK", "KILL"}


def parse_sass(text):
    """{kernel (mangled): [Instr]} from an nvdisasm or cuobjdump -sass listing; branch targets
    resolved to addresses."""
    kernels, labels, cur, pending = {}, {}, None, []
    for line in text.splitlines():
        m = _KERNEL_NVDISASM.match(line) or _KERNEL_CUOBJDUMP.match(line)
        if m:
            cur, pending = m.group(1), []
            kernels.setdefault(cur, [])
            labels.setdefault(cur, {})
            continue
        if _SECTION.match(line):     # .nv.info, .nv.shared, ...: not code
            cur, pending = None, []
            continue
        if cur is None:
            continue
        m = _LABEL.match(line.strip())
        if m:
            pending.append(m.group(1))   # the label of the next instruction
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        ins = Instr(addr, (m.group(2) or "").strip()[1:] or None, m.group(3), m.group(4).strip())
        if ins.base in ("BRA", "JMP", "CALL"):
            t = _TARGET_LABEL.search(ins.operands)
            if t:
                ins.target = t.group(1)
            else:
                t = _TARGET_ADDR.search(ins.operands)
                ins.target = int(t.group(1), 16) if t else None
        for name in pending:
            labels[cur][name] = addr
        pending.clear()
        kernels[cur].append(ins)
    for k, instrs in kernels.items():   # labels -> addresses
        for ins in instrs:
            if isinstance(ins.target, str):
                ins.target = labels[k].get(ins.target)
    return {k: v for k, v in kernels.items() if v}


def cubin_registers(data: bytes):
    """{kernel: registers} from a cubin: the EIATTR_REGCOUNT records of its ELF64 .nv.info
    section (format 0x04 = sized value, attribute 0x2f; payload: symbol index, count)."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not an ELF64 cubin")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    # Elf64_Shdr: name type flags addr offset size link info addralign entsize
    heads = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]

    def cstr(off):
        return data[off:data.index(b"\0", off)].decode()

    names = [cstr(heads[shstrndx][4] + h[0]) for h in heads]
    symtab = next((h for h in heads if h[1] == 2), None)   # SHT_SYMTAB
    if symtab is None:
        return {}
    strtab = heads[symtab[6]][4]
    syms = [cstr(strtab + struct.unpack_from("<I", data, symtab[4] + i * 24)[0])
            for i in range(symtab[5] // 24)]
    out = {}
    for h, name in zip(heads, names):
        if name != ".nv.info":
            continue
        pos, end = h[4], h[4] + h[5]
        while pos + 4 <= end:
            fmt, attr, size = struct.unpack_from("<BBH", data, pos)
            if fmt == 0x04:
                if attr == 0x2f:
                    sym, regs = struct.unpack_from("<II", data, pos + 4)
                    out[syms[sym]] = regs
                pos += 4 + size
            else:   # no-value, byte and half-word formats: the value is in the header
                pos += 4
    return out


# ---------------------------------------------------------------------------------------------
# instruction classes
# ---------------------------------------------------------------------------------------------
MMA_OPS = {"HMMA", "IMMA", "DMMA", "BMMA", "HGMMA", "IGMMA", "QGMMA", "BGMMA"}
# HMMA/IMMA/DMMA shape suffixes -> (m, n, k)
_MMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "1684": (16, 8, 4), "884": (8, 8, 4),
               "16832": (16, 8, 32), "8816": (8, 8, 16), "8832": (8, 8, 32),
               "16864": (16, 8, 64), "168256": (16, 8, 256)}
_GMMA_SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+)$")
_WIDTH = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}


def mma_info(opcode):
    """(FLOP per warp, unit) of one MMA instruction, unit in fp16 / tf32 / fp64 / int8."""
    parts = opcode.split(".")
    mods = set(parts[1:])
    shape = None
    for p in parts[1:]:
        g = _GMMA_SHAPE.match(p)
        if g:   # warpgroup MMA: each of the 4 warps issues it; a quarter of the work per warp
            m, n, k = (int(v) for v in g.groups())
            shape = (m, n, k, 4)
            break
        if p in _MMA_SHAPES:
            shape = _MMA_SHAPES[p] + (1,)
            break
    if shape is None:
        raise ValueError(f"unknown MMA shape in {opcode}")
    m, n, k, per = shape
    if parts[0] in ("DMMA",):
        unit = "fp64"
    elif parts[0] in ("IMMA", "IGMMA", "BMMA", "BGMMA", "QGMMA") or mods & {"S8", "U8", "S4"}:
        unit = "int8" if parts[0] != "QGMMA" else "fp8"
    elif "TF32" in mods:
        unit = "tf32"
    else:
        unit = "fp16"
    return 2 * m * n * k // per, unit


def mem_width(opcode):
    """Bits per thread of a load/store opcode (LDG.E -> 32, LDG.E.128 -> 128, LDS.U16 -> 16)."""
    for p in opcode.split(".")[1:]:
        if p in _WIDTH:
            return _WIDTH[p]
    return 32


def ldsm_bytes(opcode):
    """Bytes per warp of LDSM (ldmatrix): 128 per 8x8 b16 matrix, .x1 / .x2 / .x4 (M88.N,
    MT88.N with .trans)."""
    m = re.search(r"MT?88\.(\d)", opcode)
    return 128 * (int(m.group(1)) if m else 1)


def classify(opcode):
    """The counting class of an opcode: mma, ffma, dfma, lds, ldsm, ldg, ldgsts, sts, stg, bar,
    branch or other. HFMA2.MMA is the compiler's move-immediate idiom, not math."""
    base = opcode.split(".")[0]
    if base in MMA_OPS:
        return "mma"
    if base in ("FFMA", "DFMA"):
        return base.lower()
    if base in ("LDS", "LDSM", "LDG", "LDGSTS", "STS", "STG", "BAR"):
        return base.lower()
    if base in BRANCHES:
        return "branch"
    return "other"


# ---------------------------------------------------------------------------------------------
# control flow: blocks, dominators, natural loops
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Loop:
    header: int           # block index
    body: frozenset       # block indices
    latches: tuple        # blocks with the back edge
    start: int = 0        # lowest / highest instruction address in the body
    end: int = 0


def _postorder(root, succ):
    """Blocks reachable from root in DFS post-order (iterative: kernels have 1000s of blocks)."""
    order, seen, stack = [], {root}, [(root, iter(succ[root]))]
    while stack:
        b, it = stack[-1]
        nxt = next((s for s in it if s not in seen), None)
        if nxt is None:
            order.append(b)
            stack.pop()
        else:
            seen.add(nxt)
            stack.append((nxt, iter(succ[nxt])))
    return order


class Cfg:
    """Basic blocks of one kernel. blocks[i] = (first, last) instruction indices (inclusive)."""

    def __init__(self, instrs):
        self.instrs = instrs
        index = {ins.addr: i for i, ins in enumerate(instrs)}
        leaders = {0}
        for i, ins in enumerate(instrs):
            if ins.base in BRANCHES:
                leaders.add(i + 1)
                if ins.target in index:
                    leaders.add(index[ins.target])
        leaders = sorted(x for x in leaders if x < len(instrs))
        self.blocks = [(a, b - 1) for a, b in zip(leaders, leaders[1:] + [len(instrs)])]
        self.block_of = {first: bi for bi, (first, _) in enumerate(self.blocks)}
        self.succ = []
        for bi, (_, last) in enumerate(self.blocks):
            ins, s = instrs[last], []
            if ins.base in ("BRA", "JMP") and ins.target in index:
                s.append(self.block_of[index[ins.target]])
            ends = ins.base in ("BRA", "JMP", "BRX", "JMX", "RET", "EXIT", "KILL") and \
                ins.pred is None
            if not ends and bi + 1 < len(self.blocks):
                s.append(bi + 1)
            self.succ.append(sorted(set(s)))
        self.pred = [[] for _ in self.blocks]
        for a, ss in enumerate(self.succ):
            for b in ss:
                self.pred[b].append(a)
        self.idom = self._dominators()

    def size(self, bi):
        first, last = self.blocks[bi]
        return last - first + 1

    def block_instrs(self, bi):
        first, last = self.blocks[bi]
        return self.instrs[first:last + 1]

    def _dominators(self):
        """Immediate dominators (Cooper, Harvey, Kennedy), entry = block 0; None: unreachable."""
        rpo = _postorder(0, self.succ)[::-1]
        num = {b: i for i, b in enumerate(rpo)}
        idom = {0: 0}

        def meet(a, b):
            while a != b:
                while num[a] > num[b]:
                    a = idom[a]
                while num[b] > num[a]:
                    b = idom[b]
            return a

        changed = True
        while changed:
            changed = False
            for b in rpo[1:]:
                ps = [p for p in self.pred[b] if p in idom]
                if not ps:
                    continue
                new = ps[0]
                for p in ps[1:]:
                    new = meet(p, new)
                if idom.get(b) != new:
                    idom[b], changed = new, True
        return [idom.get(b) for b in range(len(self.blocks))]

    def dominates(self, a, b):
        if self.idom[b] is None:
            return False
        while True:
            if a == b:
                return True
            if b == 0:
                return False
            b = self.idom[b]

    def back_edges(self):
        return [(u, v) for u, ss in enumerate(self.succ) for v in ss if self.dominates(v, u)]


def find_loops(cfg):
    """Natural loops of a CFG, one per header (back edges to one header merged)."""
    latches = {}
    for u, h in cfg.back_edges():
        latches.setdefault(h, []).append(u)
    loops = []
    for h, ls in sorted(latches.items()):
        body, work = {h}, [u for u in ls if u != h]
        body.update(work)
        while work:
            b = work.pop()
            for p in cfg.pred[b]:
                if p not in body:
                    body.add(p)
                    work.append(p)
        addrs = [ins.addr for bi in body for ins in cfg.block_instrs(bi)]
        loops.append(Loop(h, frozenset(body), tuple(sorted(ls)), min(addrs), max(addrs)))
    return loops


def _counts(cfg, blocks):
    out = {}
    for bi in blocks:
        for ins in cfg.block_instrs(bi):
            c = classify(ins.opcode)
            out[c] = out.get(c, 0) + 1
    return out


def _math(counts):
    return counts.get("mma", 0) + counts.get("ffma", 0) + counts.get("dfma", 0)


def main_loop(cfg, loops=None):
    """(the main loop, whether it holds math) by the heuristic in the module docstring."""
    loops = find_loops(cfg) if loops is None else loops
    if not loops:
        return None, False

    def key(lp):
        inner = set()
        for other in loops:
            if other is not lp and other.header in lp.body:
                inner |= other.body
        own = _counts(cfg, lp.body - inner)
        # loops with math first (most own math), then the most own instructions; ties: innermost
        return (_math(own) > 0, _math(own) or sum(own.values()), -len(lp.body))

    best = max(loops, key=key)
    return best, key(best)[0]


def _nested_slab(cfg, loops, lp, expect):
    """(the slab loop, trip count) when main loop `lp` is an inner k loop that does a whole
    fraction 1/trip of an igemm k-slab's math (e.g. the SIMT 128x128 tiles, which unroll their
    BK loop by KU < BK to save registers) inside a loop that does no other math; else None.
    The trip count is expect / math (BK / KU), which the kernel name fixes: the static SASS
    cannot say how often a loop runs."""
    math = _math(_counts(cfg, lp.body))
    if not expect or not math or math >= expect or expect % math:
        return None
    outer = [o for o in loops if o is not lp and lp.body < o.body]
    if not outer:
        return None
    parent = min(outer, key=lambda o: len(o.body))
    if _math(_counts(cfg, parent.body - lp.body)):
        return None
    return parent, expect // math


def iteration_paths(cfg, loop):
    """(shortest, longest) instruction count of one iteration: header -> a latch's back edge,
    over the loop body without its back edges (nested loops' bodies counted once)."""
    body = loop.body
    edges = {b: [s for s in cfg.succ[b] if s in body and not cfg.dominates(s, b)] for b in body}
    order = _postorder(loop.header, edges)
    lo, hi = {loop.header: cfg.size(loop.header)}, {loop.header: cfg.size(loop.header)}
    for b in reversed(order):   # topological order
        if b not in lo:
            continue
        for s in edges[b]:
            w = cfg.size(s)
            lo[s] = min(lo.get(s, 1 << 60), lo[b] + w)
            hi[s] = max(hi.get(s, -1), hi[b] + w)
    ends = [b for b in loop.latches if b in lo]
    return min(lo[b] for b in ends), max(hi[b] for b in ends)


# ---------------------------------------------------------------------------------------------
# per-kernel statistics
# ---------------------------------------------------------------------------------------------
def igemm_slab_math(kernel):
    """Math instructions per warp per k-slab that an igemm_<op><T, MODE, BM, BN, BK, WARPS_M,
    WARPS_N> kernel must issue (kernels/igemm_common.cuh) -- or an igemm3_<op><..., STAGES>
    one (kernels/igemm3_*.cu, tensor cores only) -- or None for other kernels."""
    m = re.match(r"_Z\d+igemm3?_(fprop|dgrad|wgrad)I(\w+?)Li(\d)ELi(\d+)ELi(\d+)ELi(\d+)E"
                 r"Li(\d+)ELi(\d+)E", kernel)
    if not m:
        return None
    mode, bm, bn, bk, wm, wn = (int(v) for v in m.groups()[2:])
    warp_m, warp_n = bm // wm, bn // wn
    if mode == 0:   # SIMT: a thread's TM x TN block of FMAs per k, TM = WM/8, TN = WN/4
        return (warp_m // 8) * (warp_n // 4) * bk
    kstep = 16 if mode == 1 else 8
    return (warp_m // 16) * (warp_n // 8) * (bk // kstep)


def loop_stats(instrs, kernel=""):
    """The main loop's statistics for one kernel (a dict, JSON-ready), or None without a loop."""
    cfg = Cfg(instrs)
    loops = find_loops(cfg)
    lp, has_math = main_loop(cfg, loops)
    if lp is None:
        return None
    expect = igemm_slab_math(kernel)
    ins = [i for bi in sorted(lp.body) for i in cfg.block_instrs(bi)]
    s = {"loop": [lp.start, lp.end], "math": has_math}
    s["min_path"], s["max_path"] = iteration_paths(cfg, lp)
    nest = _nested_slab(cfg, loops, lp, expect)
    if nest is not None:   # the main loop is a partially unrolled k loop inside the slab loop
        outer, trip = nest
        own = [i for bi in sorted(outer.body - lp.body) for i in cfg.block_instrs(bi)]
        lo, hi = iteration_paths(cfg, outer)
        s["nested"] = {"inner_loop": [lp.start, lp.end], "trip": trip,
                       "inner_instrs": len(ins), "outer_own_instrs": len(own)}
        s["loop"] = [outer.start, outer.end]
        s["min_path"] = lo + (trip - 1) * s["min_path"]
        s["max_path"] = hi + (trip - 1) * s["max_path"]
        ins = own + ins * trip
    s["instrs"] = len(ins)
    cls = {}
    widths = {"lds": {}, "ldg": {}, "ldgsts": {}, "sts": {}, "stg": {}}
    mma_flop, mma_units, smem = 0, {}, 0
    for i in ins:
        c = classify(i.opcode)
        cls[c] = cls.get(c, 0) + 1
        if c in widths:
            w = mem_width(i.opcode)
            widths[c][w] = widths[c].get(w, 0) + 1
            if c in ("lds", "sts", "ldgsts"):
                smem += 32 * w // 8
        elif c == "ldsm":
            smem += ldsm_bytes(i.opcode)
        elif c == "mma":
            f, u = mma_info(i.opcode)
            mma_flop += f
            mma_units[u] = mma_units.get(u, 0) + f
    s["counts"] = dict(sorted(cls.items()))
    ops = {}
    for i in ins:
        ops[i.base] = ops.get(i.base, 0) + 1
    s["opcodes"] = dict(sorted(ops.items(), key=lambda kv: -kv[1]))   # by base opcode
    s["widths"] = {k: dict(sorted(v.items())) for k, v in widths.items() if v}
    # the third generation's target: no global load narrower than 16 bytes in the main loop
    s["scalar_global_loads"] = sum(n for c in ("ldg", "ldgsts")
                                   for w, n in s["widths"].get(c, {}).items() if w < 128)
    s["mma_ops"] = sorted({i.opcode for i in ins if classify(i.opcode) == "mma"})
    s["mma_flop"], s["mma_units"], s["smem_bytes"] = mma_flop, mma_units, smem
    math = _math(cls)
    s["slabs"] = math // expect if expect and math and math % expect == 0 else 1
    s["expected_math_per_slab"] = expect
    # False: the loop found is not (a whole number of) k-slabs -- the heuristic missed
    s["matches_tile"] = None if not expect else math == s["slabs"] * expect
    return s


def predict(s, dev):
    """Issue-rate prediction for loop stats `s` on Device `dev` (model: module docstring).
    Returns {"tflops", "bound", "unit", "fraction"} (fraction of the unit's peak)."""
    c = s["counts"]
    clock = dev.clock
    cycles = {"issue": s["instrs"] / ISSUE_PER_SM,
              "dfma": c.get("dfma", 0) / DFMA_PER_SM,
              "smem": s["smem_bytes"] / SMEM_BYTES_PER_SM}
    tc = 0.0
    for unit, f in s["mma_units"].items():
        peak = dev.peaks.get(unit)
        if peak:
            tc += f / (peak / (dev.sms * clock))
    cycles["tensor"] = tc
    flop = 64 * (c.get("ffma", 0) + c.get("dfma", 0)) + s["mma_flop"]
    bound = max(cycles, key=cycles.get)
    if not flop or not cycles[bound]:
        return {"tflops": None, "bound": None, "unit": None, "fraction": None}
    if s["mma_units"]:
        unit = max(s["mma_units"], key=s["mma_units"].get)
    else:
        unit = "fp64" if c.get("dfma", 0) > c.get("ffma", 0) else "fp32"
    # SIMT fp64's peak is half FP32's (the table's fp64 is the tensor-core DMMA figure)
    peak = dev.peaks["fp32"] / 2 if unit == "fp64" and not s["mma_units"] else dev.peaks.get(unit)
    tflops = flop / cycles[bound] * clock * dev.sms
    if peak:
        tflops = min(tflops, peak)
    return {"tflops": tflops / 1e12, "bound": bound, "unit": unit,
            "fraction": tflops / peak if peak else None}


def kernel_stats(sass_text, registers=None, kernel_regex=None, dev=None):
    """[row] for each kernel of a listing: name, short name, registers, loop stats, prediction."""
    dev = dev or device()
    rows = []
    for k, instrs in parse_sass(sass_text).items():
        if kernel_regex and not re.search(kernel_regex, k) and \
                not re.search(kernel_regex, short_name(k)):
            continue
        s = loop_stats(instrs, k)
        gemm = bool(s and (s["counts"].get("mma") or s["expected_math_per_slab"]))
        rows.append({"kernel": k, "name": short_name(k),
                     "registers": (registers or {}).get(k), "total_instrs": len(instrs),
                     "loop": s, "predicted": predict(s, dev) if gemm else None})
    return rows


_CXXFILT = shutil.which("c++filt")


@functools.lru_cache(maxsize=None)
def short_name(mangled):
    """Demangled name without the argument list (c++filt), else the mangled name."""
    if not _CXXFILT:
        return mangled
    try:
        out = subprocess.run([_CXXFILT, mangled], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return mangled
    out = re.sub(r"^void\s+", "", out)
    depth = 0
    for i, ch in enumerate(out):   # cut the argument list: the first '(' outside <...>
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            return out[:i]
    return out or mangled


# ---------------------------------------------------------------------------------------------
# tools: nvcc, nvdisasm / cuobjdump
# ---------------------------------------------------------------------------------------------
def find_tool(name):
    """A CUDA binary from the nvidia-* wheels (site-packages/nvidia/*/bin), else PATH, else
    /usr/local/cuda/bin; None when absent."""
    import glob
    import site
    dirs = list(site.getsitepackages()) + [site.getusersitepackages()]
    dirs += [p for p in sys.path if p.endswith("site-packages")]
    for d in dirs:
        for p in sorted(glob.glob(os.path.join(d, "nvidia", "*", "bin", name))):
            if os.access(p, os.X_OK):
                return p
    p = shutil.which(name)
    if p:
        return p
    p = os.path.join("/usr/local/cuda/bin", name)
    return p if os.access(p, os.X_OK) else None


def find_nvcc():
    return shutil.which("nvcc") or next(
        (p for p in ("/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc") if os.access(p, os.X_OK)),
        None)


def kernel_files():
    """[(file, generation, translation-unit source)] for every kernel file the loader compiles."""
    from gpuconv import cuda
    from gpuconv.engines import cuda_igemm as ig
    out = [(f, 1, cuda.instantiation_source(f)) for f, _ in cuda.KERNELS]
    out += [(f, 2, cuda.instantiation_source(f, names=names, structs=ig.STRUCTS))
            for f, names in ig.IGEMM_KERNELS]
    from gpuconv.engines import cuda_igemm3 as ig3
    out += [(f, 3, cuda.instantiation_source(f, names=names, structs=ig3.STRUCTS))
            for f, names in ig3.IGEMM3_KERNELS]
    return out


def compile_cubin(source, arch, workdir, stem, nvcc=None):
    """nvcc source -> cubin bytes (RuntimeError with nvcc's log on failure)."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (PATH, /usr/local/bin, /usr/local/cuda/bin)")
    from gpuconv import cuda
    # the loader's NVRTC options; CuPy appends -ftz=true itself
    opts = tuple(cuda.COMPILE_OPTIONS) + ("-ftz=true",)
    cu = os.path.join(workdir, f"{stem}.{arch}.cu")
    out = cu[:-3] + ".cubin"
    with open(cu, "w", encoding="utf-8") as f:
        f.write(source)
    r = subprocess.run([nvcc, *opts, "-cubin", f"-arch={arch}", "-o", out, cu],
                       capture_output=True, text=True, timeout=900)
    if r.returncode:
        raise RuntimeError(f"nvcc failed on {stem} ({arch}):\n{r.stdout}{r.stderr}")
    with open(out, "rb") as f:
        return f.read(), out


def disassemble(cubin_path):
    """SASS text of a cubin: nvdisasm -c, else cuobjdump -sass."""
    nvd = find_tool("nvdisasm")
    if nvd:
        cmd = [nvd, "-c", cubin_path]
    else:
        cob = find_tool("cuobjdump")
        if cob is None:
            raise RuntimeError("neither nvdisasm nor cuobjdump found: pip install "
                               "nvidia-cuda-nvdisasm (or nvidia-cuda-cuobjdump)")
        cmd = [cob, "-sass", cubin_path]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return r.stdout


def file_stats(file, gen, source, arch="sm_90", kernel_regex=None, workdir=None, dev=None):
    """Compile, disassemble and analyse one kernel file: [row] with file, generation, arch."""
    with tempfile.TemporaryDirectory() as tmp:
        wd = workdir or tmp
        data, path = compile_cubin(source, arch, wd, file.replace(".cu", ""))
        rows = kernel_stats(disassemble(path), cubin_registers(data), kernel_regex, dev)
    for r in rows:
        r.update(file=file, generation=gen, arch=arch)
    return rows


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def _pct(n, d):
    return f"{100.0 * n / d:.1f}%" if d else "-"


def _widths(w):
    # keys are ints, or strings after a JSON round trip
    return " ".join(f"{n}x{b}" for b, n in sorted(w.items(), key=lambda kv: int(kv[0]))) \
        if w else "0"


COLUMNS = ("kernel", "regs", "slabs/iter", "instrs/slab", "longest path", "MMA", "FFMA/DFMA",
           "LDS (n x bits)", "LDSM", "LDG (n x bits)", "LDGSTS (n x bits)", "STS", "BAR",
           "predicted TFLOP/s (bound, % of peak)")


def row_cells(r):
    s, p = r["loop"], r["predicted"]
    if s is None:
        return [r["name"], str(r["registers"])] + ["no loop"] + ["-"] * (len(COLUMNS) - 3)
    c, u = s["counts"], s["slabs"]
    per = s["instrs"] / u
    fma = c.get("ffma", 0) + c.get("dfma", 0)
    pred = "-" if not p or p["tflops"] is None else (
        f"{p['tflops']:.1f} ({p['bound']}, {100 * p['fraction']:.0f}% {p['unit']})"
        if p["fraction"] is not None else f"{p['tflops']:.1f} ({p['bound']})")
    note = "" if s["math"] else " (no math)"
    if s["matches_tile"] is False:
        note += " (LOOP != k-slab)"
    return [r["name"] + note, str(r["registers"]), str(u),
            f"{per:.0f}", f"{s['max_path'] / u:.0f}",
            f"{c.get('mma', 0) / u:.0f} ({_pct(c.get('mma', 0), s['instrs'])})",
            f"{fma / u:.0f} ({_pct(fma, s['instrs'])})",
            _widths(s["widths"].get("lds", {})), str(c.get("ldsm", 0)),
            _widths(s["widths"].get("ldg", {})), _widths(s["widths"].get("ldgsts", {})),
            _widths(s["widths"].get("sts", {})), str(c.get("bar", 0)), pred]


def markdown(rows):
    """A Markdown table, one row per kernel (counts per iteration unless divided by slabs)."""
    lines = ["| file | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        cells = [r["file"]] + row_cells(r)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def target_failures(rows, min_mma_share=None, no_scalar_loads=False):
    """[message] for each selected row with MMA in its main loop that misses a target: an MMA
    share of the loop's instructions below `min_mma_share`, or (`no_scalar_loads`) a global load
    narrower than 16 bytes (issue 12's goals for the third generation's f16/bf16 loops)."""
    out = []
    for r in rows:
        s = r["loop"]
        if not s or not s["counts"].get("mma"):
            continue
        share = s["counts"]["mma"] / s["instrs"]
        if min_mma_share is not None and share < min_mma_share:
            out.append(f"{r['name']}: MMA share {100 * share:.1f}% < {100 * min_mma_share:.0f}%")
        if no_scalar_loads and s["scalar_global_loads"]:
            out.append(f"{r['name']}: {s['scalar_global_loads']} global loads narrower than "
                       f"16 bytes in the main loop")
    return out


def text_table(rows):
    cells = [list(COLUMNS)] + [row_cells(r) for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c[i].ljust(w[i]) for i in range(len(COLUMNS))) for c in cells)


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python bench/sass_stats.py", description=__doc__.split("\n\n")[0],
        epilog="Compiles with nvcc -std=c++17 -ftz=true (CuPy compiles with NVRTC, the same "
               "ptxas back end: results should match closely). The model and the loop "
               "heuristic are in the module docstring (pydoc bench/sass_stats.py).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_90", help="sm_90 (default), sm_80, ...")
    ap.add_argument("--file", action="append", help="only these kernel files (repeatable)")
    ap.add_argument("--kernel", help="regex on the mangled or demangled kernel name")
    ap.add_argument("--device", default="h200", choices=sorted(HOPPER_SMS),
                    help="row of roofline.GPU_TABLE for the prediction (default h200; h100 = "
                    "H100 SXM5)")
    ap.add_argument("--sass", help="analyse this SASS listing (nvdisasm/cuobjdump text) instead "
                    "of compiling")
    ap.add_argument("--cubin", action="append", help="analyse this cubin (e.g. one NVRTC made) "
                    "instead of compiling (repeatable)")
    ap.add_argument("--json", help="write every row (counts, widths, prediction) as JSON here")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--keep", help="keep the .cu and .cubin files in this directory")
    ap.add_argument("--jobs", type=int, default=2, help="parallel nvcc jobs (default 2)")
    ap.add_argument("--min-mma-share", type=float, help="exit 1 when a selected loop with MMA "
                    "has a smaller MMA share (issue 12's target for f16/bf16 128x128: 0.15)")
    ap.add_argument("--no-scalar-loads", action="store_true", help="exit 1 when a selected "
                    "loop with MMA has a global load narrower than 16 bytes")
    a = ap.parse_args(argv)
    dev = device(a.device)
    if a.sass or a.cubin:
        rows = []
        for path in [a.sass] if a.sass else a.cubin:
            if a.sass:
                with open(path, encoding="utf-8") as f:
                    part = kernel_stats(f.read(), None, a.kernel, dev)
            else:
                with open(path, "rb") as f:
                    regs = cubin_registers(f.read())
                part = kernel_stats(disassemble(path), regs, a.kernel, dev)
            for r in part:
                r.update(file=os.path.basename(path), generation=None, arch=None)
            rows += part
    else:
        files = kernel_files()
        if a.file:
            unknown = set(a.file) - {f for f, _, _ in files}
            if unknown:
                ap.error(f"--file: unknown kernel file(s) {sorted(unknown)}")
            files = [x for x in files if x[0] in a.file]
        if a.keep:
            os.makedirs(a.keep, exist_ok=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, a.jobs)) as ex:
            parts = list(ex.map(lambda x: file_stats(*x, a.arch, a.kernel, a.keep, dev), files))
        rows = [r for p in parts for r in p]
    print(f"# static SASS of the main loops, {a.arch}; predictions for {dev.name} "
          f"({dev.sms} SMs, {dev.clock / 1e9:.2f} GHz): no GPU run")
    print(markdown(rows) if a.markdown else text_table(rows))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"schema": "gpuconv-sass-stats/1", "arch": a.arch, "device": dev.name,
                       "rows": rows}, f, indent=1)
    fails = target_failures(rows, a.min_mma_share, a.no_scalar_loads)
    for msg in fails:
        print(f"TARGET MISSED: {msg}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
