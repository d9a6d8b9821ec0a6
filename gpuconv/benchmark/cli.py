"""gpuconv-bench: time convolution layers on every backend there is, checked before timed.

    gpuconv-bench --suite vgg16 --op fprop,dgrad,wgrad --dtype float32,float16 --json run.json
    gpuconv-bench --suite cpu-target --backend numpy,torch-cpu --batch 8
    gpuconv-bench --layer 'r50.l3.*' --backend cuda,cudnn --algo im2col_gemm
    gpuconv-bench --shape 32,64,56,56,64,3,3,1,1 --op all
    gpuconv-bench compare before.json after.json --threshold 0.05
    gpuconv-bench train --model mnist-cnn,lenet5 --threads 2   (whole training steps)
    gpuconv-bench plot run.json run.png
    gpuconv-bench markdown run.json      (the run as Markdown tables, for bench/NOTES.md)
    gpuconv-bench --list

Exit status: 0, or 2 when a backend was WRONG or raised (ERROR) in some case. See bench/README.md.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import backends as bk
from . import compare as compare_mod
from . import env, report, roofline, runner, suites, timing
from . import plot as plot_mod
from ..engines import cpu_threads


def _csv(s):
    return [t.strip() for t in s.split(",") if t.strip()]


def build_parser():
    ap = argparse.ArgumentParser(
        prog="gpuconv-bench",
        description="Benchmark gpuconv's convolution engines against cuDNN (through PyTorch), "
                    "the im2col+cuBLAS baseline and the CPU. Every backend is checked against a "
                    "float64 reference before it is timed. Subcommands: 'compare A.json B.json', "
                    "'plot RUN.json OUT.png', 'markdown RUN.json'.",
        epilog="Layers come from the packaged layers.csv; `--list` shows suites, layers and "
               "which backends can run here.")
    sel = ap.add_argument_group("what to run")
    sel.add_argument("--suite", type=_csv, default=[],
                     help=f"comma-separated suites: {', '.join(suites.suite_names())} "
                          "(default: lenet5 when nothing else is chosen)")
    sel.add_argument("--layer", type=_csv, default=[],
                     help="layer names or globs, e.g. 'r50.l2.*,vgg16.conv3_1'")
    sel.add_argument("--shape", action="append", default=[],
                     help="ad-hoc layer N,C,H,W,K,R,S[,stride,pad,dilation,groups] "
                          "(repeatable; its N overrides --batch)")
    sel.add_argument("--op", type=_csv, default=["fprop", "dgrad", "wgrad"],
                     help="fprop,dgrad,wgrad,pool or all (default fprop,dgrad,wgrad); pool is "
                          "a 2x2/2 max-pool of the layer's input (3x3/2 for alexnet, r50)")
    sel.add_argument("--dtype", type=_csv, default=["float32"],
                     help="float32,float16,float64,bfloat16 (default float32)")
    sel.add_argument("--batch", type=int, default=None,
                     help="batch size N (default 32 when a GPU backend runs, 8 on the CPU)")
    sel.add_argument("--backend", type=_csv, default=None,
                     help="comma-separated: " + ", ".join(bk.known_names()) + ", or all "
                          "(default: cuda,cudnn,cudnn-tf32 with a GPU, numpy,torch-cpu without)")
    sel.add_argument("--algo", type=_csv, default=None,
                     help="only these algorithms of the CUDA engine's registry")
    sel.add_argument("--ref", default=None,
                     help="backend the ratio column divides by (default: cudnn for GPU rows, "
                          "torch-cpu for CPU rows)")
    sel.add_argument("--list", action="store_true", help="list suites, layers and backends")

    tm = ap.add_argument_group("timing")
    tm.add_argument("--cache", choices=("cold", "warm"), default=None,
                    help="default cold on a GPU, warm on the CPU (see bench/NOTES.md: a CPU "
                         "flush burns the process's scheduler slice and lets thread pools "
                         "sleep right before the timed call). cold: zero a buffer of 2x the "
                         "last-level cache before every "
                         "sample; warm: no flush")
    tm.add_argument("--warmup-ms", type=float, default=None,
                    help="warm-up per backend and case (default 50 on GPU, 0 = one call on CPU)")
    tm.add_argument("--min-samples", type=int, default=None,
                    help="samples always taken (default 20 GPU, 5 CPU)")
    tm.add_argument("--max-samples", type=int, default=None,
                    help="samples at most (default 200 GPU, 50 CPU)")
    tm.add_argument("--max-time-per-case", type=float, default=None,
                    help="seconds of sampling per case, all backends together, once "
                         "--min-samples are in (default 2 GPU, 3 CPU)")
    tm.add_argument("--block", type=int, default=None,
                    help="consecutive samples per backend per round (default 1 GPU, 3 CPU)")
    tm.add_argument("--settle-ms", type=float, default=None,
                    help="pause before each CPU backend's turn, so the previous backend's "
                         "spinning thread pool sleeps (default 150; GPU backends never pause)")
    tm.add_argument("--wake-ms", type=float, default=None,
                    help="untimed calls after each settle pause, at least one, so the cores "
                         "are awake when the timed samples start (default 100)")
    tm.add_argument("--input-sets", type=int, default=None,
                    help="input sets rotated between samples (default: enough to span 2x the "
                         "cache when one set fits in it, at most 8)")
    tm.add_argument("--threads", type=int, default=None,
                    help="CPU threads for NumPy's BLAS and PyTorch (default: all cores)")
    tm.add_argument("--roofline", choices=("table", "measure"), default="table",
                    help="GPU peaks from the datasheet table (default; unknown GPUs are "
                         "measured) or measured once this run; the CPU is always measured")
    tm.add_argument("--cudnn-benchmark", choices=("on", "off"), default="on",
                    help="torch.backends.cudnn.benchmark: let cuDNN autotune (default on)")
    tm.add_argument("--seed", type=int, default=0)

    out = ap.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write every sample and the environment")
    out.add_argument("--plot", metavar="PATH", help="roofline + ratio chart (needs matplotlib)")
    out.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    return ap


def _list(out=None):
    out = out or sys.stdout
    layers = suites.load_layers()
    print("suites: " + ", ".join(suites.suite_names()), file=out)
    print("cpu-target: " + ", ".join(suites.CPU_TARGET_LAYERS), file=out)
    for l in layers:
        print(f"  {l.suite:<8} {l.name:<24} C{l.C} H{l.H} W{l.W} K{l.K} R{l.R} S{l.S} "
              f"stride{l.stride} pad{l.pad} dil{l.dilation} g{l.groups} x{l.count_in_net}",
              file=out)
    ready, skipped = bk.resolve(list(bk.GPU_BACKENDS) + list(bk.CPU_BACKENDS))
    print("backends:", file=out)
    for b in ready:
        print(f"  {b.name:<20} ready    {b.description}", file=out)
    for name, why in skipped:
        print(f"  {name:<20} skipped  {why}", file=out)


def _timing_settings(args, gpu):
    d = timing.GPU_DEFAULTS if gpu else timing.CPU_DEFAULTS
    pick = lambda v, default: default if v is None else v  # noqa: E731
    return timing.TimingSettings(
        cold=(args.cache or ("cold" if gpu else "warm")) == "cold",
        warmup_s=pick(args.warmup_ms, d.warmup_s * 1e3) / 1e3,
        min_samples=max(1, pick(args.min_samples, d.min_samples)),
        max_samples=max(1, pick(args.max_samples, d.max_samples)),
        max_time=pick(args.max_time_per_case, d.max_time),
        block=max(1, pick(args.block, d.block)),
        settle_s=pick(args.settle_ms, d.settle_s * 1e3) / 1e3,
        wake_s=pick(args.wake_ms, d.wake_s * 1e3) / 1e3)


_threads = timing.thread_limits  # the benchmark's CPU thread limits (train uses them too)


def _gpu_roofline(kind):
    info = env.gpu_info() or {}
    name = info.get("name") or "unknown GPU"
    roof = None if kind == "measure" else roofline.gpu_from_table(name)
    return roof or roofline.measure_gpu(name)


def _cache_bytes(ready):
    if any(b.device == "cuda" for b in ready):
        info = env.gpu_info() or {}
        return int(info.get("l2_bytes") or 64 << 20)
    return timing.cpu_cache_bytes()


def run(args, argv):
    names = args.backend
    if names == ["all"]:
        names = list(bk.GPU_BACKENDS) + list(bk.CPU_BACKENDS)
    gpu_reason = bk.cuda_reason()
    torch_gpu_reason = bk.torch_cuda_reason()
    if names is None:
        names = list(bk.GPU_BACKENDS) if not (gpu_reason and torch_gpu_reason) \
            else list(bk.CPU_BACKENDS) + list(bk.GPU_BACKENDS)
    for op in args.op:
        if op not in bk.OPS and op != "all":
            raise SystemExit(f"gpuconv-bench: unknown op {op!r}; choose from "
                             f"{', '.join(bk.OPS)} or all")
    ops = list(bk.OPS) if "all" in args.op else args.op
    for dt in args.dtype:
        bk.numpy_dtype(dt)  # ValueError names the choices
    ready, skipped = bk.resolve(names, args.algo, args.cudnn_benchmark == "on")
    gpu = any(b.device == "cuda" for b in ready)
    if not gpu:
        print(f"No GPU here: CUDA engine: {gpu_reason or 'usable'}; cuDNN: "
              f"{torch_gpu_reason or 'usable'}. Running the CPU backends only.")
    for name, why in skipped:
        print(f"skipped backend {name}: {why}")
    if not ready:
        print("gpuconv-bench: no backend can run here", file=sys.stderr)
        return 2
    batch = args.batch or (32 if gpu else 8)
    layers = suites.select(args.suite, args.layer, args.shape)
    ts = _timing_settings(args, gpu)
    ref = {"cuda": "cudnn", "cpu": "torch-cpu"}
    if args.ref:
        ref = {"cuda": args.ref, "cpu": args.ref}
    settings = runner.RunSettings(tuple(ops), tuple(args.dtype), batch, ts, args.seed,
                                  args.input_sets, ref)
    threads = args.threads or os.cpu_count() or 1
    doc = {"schema": report.SCHEMA, "date": env.now(), "commit": env.git_commit(),
           "command": "gpuconv-bench " + " ".join(argv), "machine": env.machine(),
           "versions": env.versions(), "results": []}
    with _threads(threads):
        roofs = {}
        if any(b.device == "cpu" for b in ready):
            roofs["cpu"] = roofline.measure_cpu()
        if gpu:
            roofs["cuda"] = _gpu_roofline(args.roofline)
        cache = _cache_bytes(ready)
        _print_header(doc, ready, roofs, settings, threads, cache)
        cases = [(l, op, dt) for l in layers for op in ops for dt in args.dtype]
        prog = runner.Progress(len(cases), enabled=not args.quiet)
        not_run = {}
        for i, (layer, op, dt) in enumerate(cases):
            prog.step(f"{layer.name} {op} {dt}")
            case = runner.make_case(layer, op, dt, batch)
            for b in ready:
                why = b.unsupported(op, dt, case.problem)
                if why:
                    not_run.setdefault((b.name, why), []).append(f"{layer.name} {op}/{dt}")
            rows = runner.run_case(case, ready, settings, cache, roofs, i)
            doc["results"] += rows
            if rows:
                print("\n" + "\n".join(report.case_block(rows)), flush=True)
        prog.close()
    by_suite = {}
    for l in layers:
        by_suite.setdefault(l.suite, []).append(l)
    doc["summary"] = runner.summarize(doc["results"], by_suite)
    doc["targets"] = report.target_checks(doc["summary"], suites.SUITE_TARGETS)
    print("\n".join(report.summary_lines(doc["summary"], doc["targets"])))
    for (name, why), what in not_run.items():
        what = sorted(set(what))
        more = f" and {len(what) - 4} more" if len(what) > 4 else ""
        print(f"not run: {name} on {', '.join(what[:4])}{more}: {why}")
    doc["settings"] = {"batch": batch, "ops": ops, "dtypes": args.dtype, "threads": threads,
                       "cpu_threads": cpu_threads.get_num_threads(),
                       "cache": "cold" if ts.cold else "warm", "cache_bytes": cache, "warmup_s": ts.warmup_s,
                       "min_samples": ts.min_samples, "max_samples": ts.max_samples,
                       "max_time_per_case_s": ts.max_time, "block": ts.block,
                       "settle_s": ts.settle_s, "wake_s": ts.wake_s, "input_sets": args.input_sets,
                       "seed": args.seed, "reference": "NumPy engine, float64",
                       "tolerances": bk.TOLERANCE, "ratio_reference": ref}
    doc["roofline"] = {k: r.to_json() for k, r in roofs.items()}
    doc["backends"] = [dict(b.info(), status="ran") for b in ready] + \
        [{"name": n, "status": "skipped", "reason": w} for n, w in skipped]
    doc["not_run"] = [{"backend": n, "reason": w, "cases": sorted(set(c))}
                      for (n, w), c in not_run.items()]
    if args.json:
        report.write_json(args.json, doc)
        print(f"wrote {args.json}")
    if args.plot:
        _plot(doc, args.plot)
    bad = [r for r in doc["results"] if r["status"] != "ok"]
    return 2 if bad else 0


def _print_header(doc, ready, roofs, settings, threads, cache):
    m, v = doc["machine"], doc["versions"]
    gpu = m.get("gpu") or {}
    print(f"gpuconv-bench {doc['date']}  commit {doc['commit']}")
    print(f"machine: {m['cpu']} ({m['cpu_count']} cores, {threads} threads used)"
          + (f"; GPU {gpu.get('name')} driver {gpu.get('driver')}" if gpu else "; no GPU"))
    print(f"NumPy's BLAS: {env.blas_line(v)}; gpuconv CPU threads: "
          f"{cpu_threads.get_num_threads()} (GPUCONV_CPU_THREADS)")
    load = m.get("load_average_1min")
    if load is not None and load > 0.25 * (m["cpu_count"] or 1):
        print(f"WARNING: load average {load:.2f} on {m['cpu_count']} cores: other processes "
              "compete for the CPU; CPU timings are less reliable (interleaving keeps ratios "
              "fairer than absolute times)")
    print("versions: " + ", ".join(f"{k} {val}" for k, val in v.items()
                                   if k != "blas" and val is not None))
    for b in ready:
        print(f"backend {b.name}: {b.description}")
    for dev, r in roofs.items():
        peaks = ", ".join(f"{u} {f / (1e12 if dev == 'cuda' else 1e9):.1f} "
                          f"{'T' if dev == 'cuda' else 'G'}FLOP/s" for u, f in r.flops.items())
        print(f"roofline {dev}: {peaks}; {r.bandwidth / 1e9:.1f} GB/s  [{r.source}]")
    t = settings.timing
    print(f"timing: batch {settings.batch}; {'cold' if t.cold else 'warm'} cache "
          f"(flush {report.fmt_bytes(2 * cache)} before every sample)" if t.cold else
          f"timing: batch {settings.batch}; warm cache (no flush)")
    print(f"  warm-up {t.warmup_s * 1e3:.0f} ms (>= 1 call); {t.min_samples}..{t.max_samples} "
          f"samples in interleaved rounds ({t.block} per backend per round"
          + (f", {t.settle_s * 1e3:.0f} ms settle pause and >= {t.wake_s * 1e3:.0f} ms of "
             "untimed calls before each turn" if t.settle_s else "")
          + f"), up to {t.max_time:g} s per case; median, IQR; check: NumPy "
          f"engine in float64, rel. tolerances {bk.TOLERANCE}")


def _plot(doc, path):
    if not plot_mod.have_matplotlib():
        print(plot_mod.MISSING, file=sys.stderr)
        return False
    plot_mod.plot(doc, path)
    print(f"wrote {path}")
    return True


def plot_main(argv):
    ap = argparse.ArgumentParser(prog="gpuconv-bench plot",
                                 description="Plot a gpuconv-bench JSON result.")
    ap.add_argument("json")
    ap.add_argument("out")
    args = ap.parse_args(argv)
    return 0 if _plot(report.load_json(args.json), args.out) else 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:
        return compare_mod.main(argv[1:])
    if argv[:1] == ["plot"]:
        return plot_main(argv[1:])
    if argv[:1] == ["train"]:
        from . import train_step
        return train_step.main(argv[1:])
    if argv[:1] == ["markdown"]:
        if len(argv) != 2:
            print("usage: gpuconv-bench markdown RUN.json", file=sys.stderr)
            return 2
        print(report.markdown(report.load_json(argv[1])), end="")
        return 0
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.list:
        _list()
        return 0
    try:
        return run(args, argv)
    except ValueError as e:  # bad --shape, --layer, --suite, --dtype
        ap.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
