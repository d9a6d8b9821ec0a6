"""One benchmark run: for every (layer, op, dtype), draw inputs, check every backend against a
float64 reference, then time the correct ones together.

Order of work in a case:
1. random inputs (standard normal, never zeros), rounded to the dtype; several sets when one fits
   in the cache (``timing.input_sets_for``);
2. the reference: the NumPy engine in float64 on input set 0 (the rounded values, so only the
   backend's arithmetic is judged);
3. each backend runs set 0 once; ``||out - ref|| / ||ref||`` over its tolerance, a wrong shape,
   or a NaN/Inf makes it WRONG (an exception: ERROR); neither is ever timed;
4. warm-up and interleaved samples of the correct backends (``timing``);
5. workspace memory and, for cuDNN, the kernels it chose: one extra call each, after timing.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ..engines import numpy_engine
from . import backends as bk
from . import timing


@dataclass
class Case:
    layer: object
    op: str
    dtype: str
    problem: object
    sets: list = field(default_factory=list)

    @property
    def batch(self):
        return self.problem.N

    def flops(self):
        p = self.problem
        if self.op == "pool":  # comparisons, one per window element
            return p.N * p.C * p.P * p.Q * p.R * p.S
        return p.flops(self.op)

    def bytes_moved(self, itemsize):
        p = self.problem
        if self.op == "pool":  # x read once, y and its int64 indices written once
            return (p.N * p.C * p.H * p.W + p.N * p.C * p.P * p.Q) * itemsize \
                + p.N * p.C * p.P * p.Q * 8
        return p.bytes_moved(self.op, itemsize)


INPUTS = {"fprop": ("x", "w"), "dgrad": ("w", "dy"), "wgrad": ("x", "dy"), "pool": ("x",)}


def describe(p):
    """One line for a ConvProblem (its own str) or a PoolProblem."""
    if hasattr(p, "K"):
        return str(p)
    return (f"N{p.N} C{p.C} H{p.H} W{p.W} maxpool {p.R}x{p.S} stride{p.stride_h}x{p.stride_w} "
            f"pad{p.pad_h}x{p.pad_w} -> P{p.P} Q{p.Q}")


def make_case(layer, op, dtype, batch):
    p = layer.pool_problem(batch) if op == "pool" else layer.problem(batch)
    return Case(layer, op, dtype, p)


def draw_inputs(case, n_sets, seed):
    """n_sets dicts of NumPy arrays in the case's dtype, standard normal."""
    p = case.problem
    dt = bk.numpy_dtype(case.dtype)
    shapes = {"x": p.x_shape, "w": getattr(p, "w_shape", None), "dy": p.y_shape}
    rng = np.random.default_rng(seed)
    gen_dt = np.float64 if case.dtype == "float64" else np.float32
    case.sets = [{k: rng.standard_normal(shapes[k], dtype=gen_dt).astype(dt)
                  for k in INPUTS[case.op]} for _ in range(n_sets)]


def footprint(case, itemsize):
    p = case.problem
    shapes = {"x": p.x_shape, "w": getattr(p, "w_shape", None), "dy": p.y_shape}
    n = sum(math.prod(shapes[k]) for k in INPUTS[case.op])
    return (n + math.prod(p.x_shape if case.op == "dgrad" else p.y_shape)) * itemsize


def reference(case):
    """The NumPy engine in float64 on input set 0."""
    a = {k: v.astype(np.float64) for k, v in case.sets[0].items()}
    p = case.problem
    if case.op == "pool":
        return numpy_engine.pool_fprop(p, a["x"])[0]
    return bk.engine_op(case.op, {"fprop": numpy_engine.conv_fprop,
                                  "dgrad": numpy_engine.conv_dgrad,
                                  "wgrad": numpy_engine.conv_wgrad}[case.op])(p, a)


def rel_error(out, ref):
    """||out - ref|| / ||ref|| (absolute where ref is 0); inf for NaN/Inf or a wrong shape."""
    if out.shape != ref.shape or not np.all(np.isfinite(out)):
        return math.inf
    den = float(np.linalg.norm(ref))
    num = float(np.linalg.norm(out - ref))
    return num / den if den > 0 else num


@dataclass
class RunSettings:
    ops: tuple
    dtypes: tuple
    batch: int
    timing: timing.TimingSettings
    seed: int = 0
    input_sets: int | None = None   # None: automatic
    ref: dict = field(default_factory=lambda: {"cuda": "cudnn", "cpu": "torch-cpu"})


class Progress:
    """A one-line progress bar on stderr when it is a terminal; plain lines otherwise."""

    def __init__(self, total, enabled=True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def step(self, what):
        if not self.enabled:
            return
        self.done += 1
        frac = self.done / max(self.total, 1)
        bar = "#" * int(24 * frac)
        line = (f"[{bar:<24}] {self.done}/{self.total} {time.perf_counter() - self.t0:6.1f}s "
                f"{what}")
        if self.tty:
            sys.stderr.write("\r" + line[:110].ljust(110))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self):
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def run_case(case, backends_, settings, cache_bytes, roofs, case_index=0):
    """Rows (one per backend that supports the case) of one case."""
    itemsize = bk.numpy_dtype(case.dtype).itemsize
    rows, runners = [], {}
    active = [(b, b.unsupported(case.op, case.dtype, case.problem)) for b in backends_]
    active = [b for b, why in active if why is None]
    if not active:
        return rows
    n_sets = settings.input_sets or timing.input_sets_for(footprint(case, itemsize), cache_bytes)
    draw_inputs(case, n_sets, settings.seed * 100003 + case_index)
    ref = reference(case)
    base = dict(suite=case.layer.suite, layer=case.layer.name, op=case.op, dtype=case.dtype,
                batch=case.batch, problem=describe(case.problem), flops=case.flops(),
                bytes=case.bytes_moved(itemsize), count_in_net=case.layer.count_in_net,
                input_sets=n_sets)
    by_name = {}
    for b in active:
        tol_key = b.tolerance_key(case.dtype)
        row = dict(base, backend=b.name, device=b.device, status="ok", reason=None,
                   rel_err=None, tol=bk.TOLERANCE[tol_key], tol_key=tol_key, samples_s=[])
        by_name[b.name] = row
        rows.append(row)
        try:
            r = b.prepare(case)
            out = r.result(r.run(0))
        except Exception as e:
            row.update(status="ERROR", reason=f"{type(e).__name__}: {e}"[:300])
            continue
        err = rel_error(out, ref)
        row["rel_err"] = err if math.isfinite(err) else None
        if not err <= row["tol"]:
            why = ("shape %s, expected %s" % (out.shape, ref.shape) if out.shape != ref.shape
                   else "NaN/Inf in output" if not math.isfinite(err)
                   else f"rel. error {err:.2e} > tol {row['tol']:.0e}")
            row.update(status="WRONG", reason=why)
            continue
        runners[b.name] = r
    if runners:
        warm = timing.warm_up(runners, n_sets, settings.timing)
        faults = {}
        samples = timing.sample(runners, n_sets, settings.timing, faults)
        for name, r in runners.items():
            row = by_name[name]
            st = timing.stats(samples[name])
            row.update(samples_s=samples[name], warmup_calls=warm[name], **st,
                       iqr_frac=timing.iqr_fraction(st), unstable=timing.unstable(st),
                       page_faults=timing.median_faults(faults, name))
            try:
                row["workspace_bytes"], row["workspace_how"] = r.workspace_bytes()
            except Exception as e:
                row["workspace_bytes"], row["workspace_how"] = None, f"failed: {e}"[:200]
            info = r.algo_info()
            if info:
                row["algo_info"] = info
    _derive(rows, settings, roofs)
    del runners
    release_memory()
    return rows


def _derive(rows, settings, roofs):
    """Rates, roofline fraction and ratio to the device's reference backend."""
    for row in rows:
        med = row.get("median_s")
        if not med:
            continue
        roof = roofs.get(row["device"])
        row["flop_rate"] = row["flops"] / med
        row["byte_rate"] = row["bytes"] / med
        if roof is not None:
            floor = roof.floor_s(row["flops"], row["bytes"], row["tol_key"],
                                 memory_only=row["op"] == "pool")
            row["roofline_fraction"] = floor / med if floor else None
            row["peak_unit"] = "bandwidth" if row["op"] == "pool" else roof.unit(row["tol_key"])
    meds = {r["backend"]: r.get("median_s") for r in rows}
    mins = {r["backend"]: r.get("min_s") for r in rows}
    for row in rows:
        ref = settings.ref.get(row["device"])
        row["ref_backend"] = ref
        if row.get("median_s") and meds.get(ref):
            row["ratio"] = row["median_s"] / meds[ref]
            # min / min: interference from other processes only adds time, so on a shared
            # machine this ratio is the steadier estimate of the quiet-machine ratio
            row["ratio_min"] = row["min_s"] / mins[ref]
            # the ratio's spread, for error bars: quartiles against the reference's quartiles
            r = next(x for x in rows if x["backend"] == ref)
            row["ratio_lo"] = row["q1_s"] / r["q3_s"]
            row["ratio_hi"] = row["q3_s"] / r["q1_s"]
            row["ratio_unstable"] = bool(row.get("unstable") or r.get("unstable")
                                         or timing.ratios_disagree(row["ratio"],
                                                                   row["ratio_min"]))


def release_memory():
    """Hand cached device memory back between cases (big layers follow small ones)."""
    if "cupy" in sys.modules:
        try:
            sys.modules["cupy"].get_default_memory_pool().free_all_blocks()
        except Exception:
            pass
    if "torch" in sys.modules:
        try:
            torch = sys.modules["torch"]
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass


def geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summarize(rows, layers_by_suite):
    """Per (suite, op, dtype, backend): geometric mean of ratios and whole-network time."""
    out = []
    keys = []
    for r in rows:
        k = (r["suite"], r["op"], r["dtype"], r["backend"])
        if k not in keys:
            keys.append(k)
    for suite, op, dtype, backend in keys:
        sel = [r for r in rows if (r["suite"], r["op"], r["dtype"], r["backend"])
               == (suite, op, dtype, backend)]
        n_layers = len(layers_by_suite.get(suite, ()))
        ok = [r for r in sel if r.get("median_s")]
        ratios = [r["ratio"] for r in ok if r.get("ratio")]
        ratios_min = [r["ratio_min"] for r in ok if r.get("ratio_min")]
        complete = len(ok) == n_layers
        # results too spread to compare: this backend's or its reference's IQR over the limit
        unstable = sorted(r["layer"] for r in ok if r.get("ratio_unstable") or r.get("unstable"))
        net = sum(r["median_s"] * r["count_in_net"] for r in ok) if complete else None
        out.append(dict(suite=suite, op=op, dtype=dtype, backend=backend,
                        ref_backend=sel[0].get("ref_backend"),
                        geomean_ratio=geomean(ratios), geomean_min_ratio=geomean(ratios_min),
                        n_ratios=len(ratios),
                        n_layers=n_layers, n_ok=len(ok), net_time_s=net, complete=complete,
                        unstable_layers=unstable))
    return out
