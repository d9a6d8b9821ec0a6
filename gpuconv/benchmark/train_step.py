"""``gpuconv-bench train``: whole training steps of small CNNs, gpuconv (NumPy engine) beside
the same model in PyTorch CPU, with the same weights and batches, interleaved.

A step is what a user's loop runs: zero the gradients, forward, cross-entropy, backward, one
SGD-with-momentum update. Models (``--model``, default all three):

* ``mnist-cnn``: 1x28x28, conv(1->32, 3x3, pad 1) -> ReLU -> max-pool 2 -> conv(32->64, 3x3,
  pad 1) -> ReLU -> max-pool 2 -> Flatten -> Linear(3136->128) -> ReLU -> Linear(128->10);
  batch 64 (issue 11's model).
* ``train-default``: ``gpuconv.train.build_lenet`` on 1x8x8 (what ``gpuconv-train`` trains by
  default, scikit-learn's digits), batch 32 (its default batch size).
* ``lenet5``: LeNet-5 on 1x32x32 with ReLU and max-pooling: conv(1->6, 5x5) -> pool ->
  conv(6->16, 5x5) -> pool -> 400 -> 120 -> 84 -> 10; batch 64.

Before anything is timed, one step of each side from the same weights on the same batch is
compared: the loss and every updated parameter must agree to float32 accuracy (a wrong engine is
reported WRONG and not timed). Then the two step functions are timed in interleaved rounds with
:func:`timing.sample` (warm cache: a step's own traffic is the workload), and finally a profiling
pass times each layer's forward and backward (plus loss and optimiser) on each side, to show where
a step's time goes. The profile adds a perf_counter pair per layer, so its total is a little over
the timed step; shares are of the profiled total.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import warnings

import numpy as np

from .. import nn
from ..engines import cpu_threads
from ..optim import SGD
from . import env, report, timing

LR, MOMENTUM = 0.05, 0.9
TOLERANCE = 5e-4  # relative error of loss and updated parameters, float32 against PyTorch


def _mnist_cnn(rng):
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3136, 128, rng=rng), nn.ReLU(), nn.Linear(128, 10, rng=rng))


def _train_default(rng):
    from ..train import build_lenet
    return build_lenet((1, 8, 8), 10, rng=rng)


def _lenet5(rng):
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(400, 120, rng=rng), nn.ReLU(), nn.Linear(120, 84, rng=rng),
        nn.ReLU(), nn.Linear(84, 10, rng=rng))


# name -> (builder(rng), input shape (C, H, W), classes, default batch)
MODELS = {"mnist-cnn": (_mnist_cnn, (1, 28, 28), 10, 64),
          "train-default": (_train_default, (1, 8, 8), 10, 32),
          "lenet5": (_lenet5, (1, 32, 32), 10, 64)}


def to_torch(model):
    """The same network as a torch.nn.Sequential, with copies of the parameters."""
    import torch
    tnn = torch.nn
    layers = []
    for m in model:
        if isinstance(m, nn.Conv2d):
            t = tnn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                           padding=m.padding, dilation=m.dilation, groups=m.groups,
                           bias=m.bias is not None)
        elif isinstance(m, nn.Linear):
            t = tnn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        elif isinstance(m, nn.MaxPool2d):
            t = tnn.MaxPool2d(**m.args)
        elif isinstance(m, nn.Flatten):
            t = tnn.Flatten(m.start_dim)
        elif isinstance(m, nn.LeakyReLU):
            t = tnn.LeakyReLU(m.negative_slope)
        elif isinstance(m, nn.ELU):
            t = tnn.ELU(m.alpha)
        elif type(m) in (nn.ReLU, nn.Tanh, nn.Sigmoid):
            t = getattr(tnn, type(m).__name__)()
        else:
            raise TypeError(f"no PyTorch twin for {type(m).__name__}")
        with torch.no_grad():
            for name, p in m.named_parameters():
                getattr(t, name).copy_(torch.from_numpy(np.array(p.data)))
        layers.append(t)
    return tnn.Sequential(*layers)


class GpuconvSide:
    """gpuconv's model, optimiser and batches; run(i) is one training step on batch i."""

    name = "gpuconv-numpy"

    def __init__(self, model, batches, kit):
        self.model, self.batches, self.kit = model, batches, kit
        self.loss_fn = nn.CrossEntropyLoss()
        self.opt = SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def run(self, i=0):
        x, y = self.batches[i]
        self.opt.zero_grad()
        loss = self.loss_fn(self.model(x), y)
        # as PyTorch, which computes no gradient for the images (they do not require grad)
        self.model.backward(self.loss_fn.backward(), needs_input_grad=False)
        self.opt.step()
        return float(loss)

    def params(self):
        return [np.asarray(p.data, np.float64) for p in self.model.parameters()]

    def profile(self, steps):
        """{part: seconds per step}: each layer's forward and backward (by wrapping the layer's
        methods for the pass), the loss, the optimiser, and the whole step."""
        t = {}

        def wrap(key, fn):
            @functools.wraps(fn)   # keeps fn's signature (Sequential looks for needs_input_grad)
            def f(*a, **kw):
                t0 = time.perf_counter()
                out = fn(*a, **kw)
                _add(t, key, time.perf_counter() - t0)
                return out
            return f

        layers = list(self.model)
        for i, m in enumerate(layers):
            object.__setattr__(m, "forward", wrap(_label(i, m, "fwd"), m.forward))
            object.__setattr__(m, "backward", wrap(_label(i, m, "bwd"), m.backward))
        try:
            for s in range(steps):
                x, y = self.batches[s % len(self.batches)]
                c = [time.perf_counter()]
                self.opt.zero_grad()
                c.append(time.perf_counter())
                logits = self.model(x)
                c.append(time.perf_counter())
                self.loss_fn(logits, y)
                g = self.loss_fn.backward()
                c.append(time.perf_counter())
                self.model.backward(g, needs_input_grad=False)
                c.append(time.perf_counter())
                self.opt.step()
                c.append(time.perf_counter())
                _add(t, "loss (fwd+bwd)", c[3] - c[2])
                _add(t, "optimizer (zero_grad+step)", c[1] - c[0] + c[5] - c[4])
                _add(t, "step", c[5] - c[0])
        finally:
            for m in layers:
                del m.__dict__["forward"], m.__dict__["backward"]
        return {k: v / steps for k, v in t.items()}


class TorchSide:
    """The same model in PyTorch CPU (``to_torch``), torch.optim.SGD with the same settings."""

    name = "torch-cpu"

    def __init__(self, model, batches, kit):
        import torch
        self.torch, self.kit = torch, kit
        self.model = to_torch(model)
        self.batches = [(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))
                        for x, y in batches]
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)

    def run(self, i=0):
        x, y = self.batches[i]
        self.opt.zero_grad()
        loss = self.torch.nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def params(self):
        return [p.detach().double().numpy() for p in self.model.parameters()]

    def profile(self, steps):
        """Per-layer forward and backward times from module hooks (CPU ops run synchronously,
        so the clock between a pre-hook and its hook is the layer's time). The first layer's
        input needs no gradient, so PyTorch fires its backward hooks around nothing: its weight
        gradient lands in 'other'."""
        F = self.torch.nn.functional
        t, start, handles = {}, {}, []

        def pre(key):
            def f(*_):
                start[key] = time.perf_counter()
            return f

        def post(key):
            def f(*_):
                if key in start:
                    _add(t, key, time.perf_counter() - start.pop(key))
            return f

        for i, m in enumerate(self.model):
            for kind, reg_pre, reg_post in (
                    ("fwd", m.register_forward_pre_hook, m.register_forward_hook),
                    ("bwd", m.register_full_backward_pre_hook, m.register_full_backward_hook)):
                key = _label(i, m, kind)
                handles += [reg_pre(pre(key)), reg_post(post(key))]
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Full backward hook is firing")
                for s in range(steps):
                    x, y = self.batches[s % len(self.batches)]
                    c = [time.perf_counter()]
                    self.opt.zero_grad()
                    c.append(time.perf_counter())
                    logits = self.model(x)
                    c.append(time.perf_counter())
                    loss = F.cross_entropy(logits, y)
                    c.append(time.perf_counter())
                    loss.backward()
                    c.append(time.perf_counter())
                    self.opt.step()
                    c.append(time.perf_counter())
                    _add(t, "loss (fwd+bwd)", c[3] - c[2])  # its backward runs inside autograd
                    _add(t, "optimizer (zero_grad+step)", c[1] - c[0] + c[5] - c[4])
                    _add(t, "step", c[5] - c[0])
        finally:
            for h in handles:
                h.remove()
        return {k: v / steps for k, v in t.items()}


def _label(i, m, kind):
    return f"{i}:{type(m).__name__} {kind}"


def _add(t, key, v):
    t[key] = t.get(key, 0.0) + v


def shares(prof):
    """[(part, seconds, fraction of the profiled step)], layers in order, then the rest;
    'other' is the step minus every listed part (framework overhead, autograd bookkeeping)."""
    step = prof.get("step") or 0.0
    parts = [(k, v) for k, v in prof.items() if k != "step"]
    other = step - sum(v for _, v in parts)
    parts.append(("other", max(other, 0.0)))
    return [(k, v, v / step if step else None) for k, v in parts]


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def make_batches(shape, classes, batch, n, seed):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch,) + shape, dtype=np.float32),
             rng.integers(0, classes, batch).astype(np.int64)) for _ in range(n)]


def check(model_name, batch, seed=0):
    """One step on each side from the same weights and batch: (max relative error over the loss
    and every updated parameter, gpuconv loss, torch loss)."""
    build, shape, classes, _ = MODELS[model_name]
    batches = make_batches(shape, classes, batch, 1, seed)
    kit = timing.CpuKit()
    g = GpuconvSide(build(np.random.default_rng(seed)), batches, kit)
    t = TorchSide(g.model, batches, kit)
    lg, lt = g.run(0), t.run(0)
    errs = [abs(lg - lt) / max(abs(lt), 1e-30)]
    for a, b in zip(g.params(), t.params()):
        errs.append(float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)))
    return max(errs), lg, lt


def run_model(model_name, batch, settings, n_batches=4, profile_steps=5, seed=0):
    """Check, time interleaved, profile: one result dict (the JSON's row for this model)."""
    build, shape, classes, default_batch = MODELS[model_name]
    batch = batch or default_batch
    row = dict(model=model_name, batch=batch, input_shape=list(shape), status="ok",
               reason=None, tol=TOLERANCE)
    err, lg, lt = check(model_name, batch, seed)
    row.update(rel_err=err, loss_gpuconv=lg, loss_torch=lt)
    if not err <= TOLERANCE:
        row.update(status="WRONG", reason=f"rel. error {err:.2e} > tol {TOLERANCE:.0e}")
        return row
    batches = make_batches(shape, classes, batch, n_batches, seed + 1)
    kit = timing.CpuKit()
    g = GpuconvSide(build(np.random.default_rng(seed)), batches, kit)
    sides = {g.name: g, "torch-cpu": TorchSide(g.model, batches, kit)}
    timing.warm_up(sides, n_batches, settings)
    faults = {}
    samples = timing.sample(sides, n_batches, settings, faults)
    for name, s in samples.items():
        st = timing.stats(s)
        row[name] = dict(st, samples_s=s, unstable=timing.unstable(st),
                         page_faults=timing.median_faults(faults, name))
    med = {n: row[n]["median_s"] for n in sides}
    mins = {n: row[n]["min_s"] for n in sides}
    row["ratio"] = med[g.name] / med["torch-cpu"]
    row["ratio_min"] = mins[g.name] / mins["torch-cpu"]
    row["unstable"] = any(row[n]["unstable"] for n in sides) \
        or timing.ratios_disagree(row["ratio"], row["ratio_min"])
    if profile_steps:
        row["profile"] = {}
        for n, s in sides.items():
            time.sleep(settings.settle_s)  # the other side's thread pool falls asleep first
            timing.wake(lambda s=s: s.run(0), settings.wake_s)
            row["profile"][n] = s.profile(profile_steps)
    return row


def verdict(row, limit):
    """'met', 'NOT met', or 'unstable' (a noisy sample never counts as meeting the target)."""
    if row["status"] != "ok":
        return row["status"]
    if row["unstable"]:
        return ("unstable (IQR or median/min ratio gap > %d%%): not judged"
                % round(100 * timing.UNSTABLE_IQR))
    ok = row["ratio"] <= limit and row["ratio_min"] <= limit
    return "met" if ok else "NOT met"


def lines(rows, limit):
    out = ["", f"Training steps: gpuconv (NumPy engine) / PyTorch CPU, target <= {limit}x "
           "(on medians and on minimum times)",
           f"  {'model':<14} {'batch':>5} {'gpuconv median':>15} {'iqr':>6} {'min':>10} "
           f"{'torch median':>13} {'iqr':>6} {'min':>10} {'ratio':>6} {'r(min)':>6}  verdict"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"  {r['model']:<14} {r['batch']:>5} {r['status']}: {r['reason']}")
            continue
        g, t = r["gpuconv-numpy"], r["torch-cpu"]
        out.append(f"  {r['model']:<14} {r['batch']:>5} {report.fmt_time(g['median_s']):>15} "
                   f"{_iqr(g):>6} {report.fmt_time(g['min_s']):>10} "
                   f"{report.fmt_time(t['median_s']):>13} {_iqr(t):>6} "
                   f"{report.fmt_time(t['min_s']):>10} {r['ratio']:>6.2f} {r['ratio_min']:>6.2f}"
                   f"  {verdict(r, limit)}")
    for r in rows:
        if r["status"] == "ok":
            pf = [(n, r[n].get("page_faults")) for n in ("gpuconv-numpy", "torch-cpu")]
            if any((v or 0) >= report.FAULTS_NOTED for _, v in pf):
                out.append(f"  {r['model']}: page faults a step (median) " + ", ".join(
                    f"{n} {v:,.0f}" for n, v in pf if v is not None)
                    + " (fresh memory from the OS: part of that step's time is the kernel's)")
    for r in rows:
        prof = r.get("profile")
        if not prof:
            continue
        out += ["", f"Where a {r['model']} step goes (profiling pass, per step; each layer "
                "timed alone, so gpuconv's ReLU + MaxPool2d pairs run unfused here):",
                f"  {'part':<30} {'gpuconv':>10} {'share':>6} {'torch':>10} {'share':>6}"]
        sg = {k: (v, f) for k, v, f in shares(prof["gpuconv-numpy"])}
        st = {k: (v, f) for k, v, f in shares(prof["torch-cpu"])}
        for k in list(sg) + [k for k in st if k not in sg]:
            cells = []
            for d in (sg, st):
                v, f = d.get(k, (None, None))
                cells += [report.fmt_time(v), "-" if f is None else f"{100 * f:.0f}%"]
            out.append(f"  {k:<30} {cells[0]:>10} {cells[1]:>6} {cells[2]:>10} {cells[3]:>6}")
        out.append(f"  {'step (profiled)':<30} "
                   f"{report.fmt_time(prof['gpuconv-numpy']['step']):>10} {'':>6} "
                   f"{report.fmt_time(prof['torch-cpu']['step']):>10}")
    return out


def _iqr(st):
    frac = timing.iqr_fraction(st)
    return "-" if frac is None else f"{100 * frac:.0f}%" + ("!" if timing.unstable(st) else "")


TARGET = 1.5  # issue 11: each model's step <= 1.5x PyTorch CPU on 2 cores
DEFAULTS = timing.TimingSettings(cold=False, warmup_s=0.3, min_samples=9, max_samples=60,
                                 max_time=6.0, block=3, settle_s=0.15, wake_s=0.1)


def build_parser():
    ap = argparse.ArgumentParser(
        prog="gpuconv-bench train",
        description="Time whole training steps (zero_grad, forward, cross-entropy, backward, "
                    "SGD-momentum update) of small CNNs with gpuconv's NumPy engine and the "
                    "same model in PyTorch CPU, interleaved; per-layer time shares.")
    ap.add_argument("--model", default="all",
                    help=f"comma-separated: {', '.join(MODELS)} or all (default all)")
    ap.add_argument("--batch", type=int, default=None,
                    help="batch size (default per model: " + ", ".join(
                        f"{k} {v[3]}" for k, v in MODELS.items()) + ")")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for NumPy's BLAS and PyTorch (default: all cores)")
    ap.add_argument("--min-samples", type=int, default=DEFAULTS.min_samples)
    ap.add_argument("--max-samples", type=int, default=DEFAULTS.max_samples)
    ap.add_argument("--max-time", type=float, default=DEFAULTS.max_time,
                    help="seconds of sampling per model once --min-samples are in")
    ap.add_argument("--warmup-ms", type=float, default=DEFAULTS.warmup_s * 1e3)
    ap.add_argument("--block", type=int, default=DEFAULTS.block,
                    help="consecutive steps per side per round")
    ap.add_argument("--settle-ms", type=float, default=DEFAULTS.settle_s * 1e3,
                    help="pause before each side's turn (thread pools fall asleep)")
    ap.add_argument("--wake-ms", type=float, default=DEFAULTS.wake_s * 1e3,
                    help="untimed steps after the pause, at least one (the cores wake up)")
    ap.add_argument("--profile-steps", type=int, default=5,
                    help="steps of the per-layer profiling pass (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="write samples, profiles and the machine")
    return ap


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    names = list(MODELS) if args.model == "all" else [m.strip() for m in args.model.split(",")]
    for n in names:
        if n not in MODELS:
            raise SystemExit(f"gpuconv-bench train: unknown model {n!r}; choose from "
                             f"{', '.join(MODELS)} or all")
    try:
        import torch  # noqa: F401
    except ImportError:
        print("gpuconv-bench train needs PyTorch (the CPU wheel) to compare against",
              file=sys.stderr)
        return 2
    ts = timing.TimingSettings(cold=False, warmup_s=args.warmup_ms / 1e3,
                               min_samples=max(1, args.min_samples),
                               max_samples=max(1, args.max_samples), max_time=args.max_time,
                               block=max(1, args.block), settle_s=args.settle_ms / 1e3,
                               wake_s=args.wake_ms / 1e3)
    threads = args.threads or os.cpu_count() or 1
    doc = {"schema": report.SCHEMA + "+train", "date": env.now(), "commit": env.git_commit(),
           "command": "gpuconv-bench train " + " ".join(argv), "machine": env.machine(),
           "versions": env.versions(), "threads": threads, "target": TARGET,
           "cpu_threads": cpu_threads.get_num_threads(),
           "settings": {k: getattr(ts, k) for k in ("warmup_s", "min_samples", "max_samples",
                                                    "max_time", "block", "settle_s",
                                                    "wake_s")}}
    m = doc["machine"]
    print(f"gpuconv-bench train {doc['date']}  commit {doc['commit']}\nmachine: {m['cpu']} "
          f"({m['cpu_count']} cores, {threads} threads); 1-min load average "
          f"{m.get('load_average_1min')}\nNumPy's BLAS: {env.blas_line(doc['versions'])}; "
          f"gpuconv CPU threads: {doc['cpu_threads']}")
    with timing.thread_limits(threads):
        rows = [run_model(n, args.batch, ts, profile_steps=args.profile_steps, seed=args.seed)
                for n in names]
    doc["results"] = rows
    for r in rows:
        r["verdict"] = verdict(r, TARGET)
    print("\n".join(lines(rows, TARGET)))
    if args.json:
        report.write_json(args.json, doc)
        print(f"wrote {args.json}")
    return 0 if all(r["status"] == "ok" for r in rows) else 2
