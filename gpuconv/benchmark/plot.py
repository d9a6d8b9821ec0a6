"""``--plot out.png`` (or ``gpuconv-bench plot run.json out.png``): two panels.

Left, a roofline per device: achieved FLOP/s against arithmetic intensity (FLOPs per byte of
minimum traffic), one marker per backend, the ceilings of the run's roofline drawn as lines, so a
point's distance below its roof is the headroom. Right, the ratio of each layer's time to the
reference backend (log scale; 1 = parity; below 1 = faster), per op and backend.
matplotlib is optional (``pip install gpuconv[plot]``).
"""
from __future__ import annotations

MISSING = ("--plot needs matplotlib, which is not installed here: pip install matplotlib "
           "(or gpuconv[plot]); the results themselves are unaffected")


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(doc, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 (matplotlib.ticker below)

    rows = [r for r in doc["results"] if r.get("median_s")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6))
    backends = sorted({r["backend"] for r in rows})
    markers = dict(zip(backends, "os^vD<>phx*+"))
    for b in backends:
        pts = [(r["flops"] / r["bytes"], r["flop_rate"]) for r in rows
               if r["backend"] == b and r["op"] != "pool"]
        if pts:
            ax1.scatter(*zip(*pts), marker=markers[b], label=b, alpha=0.8)
    xs = [r["flops"] / r["bytes"] for r in rows if r["op"] != "pool"] or [1.0]
    lo, hi = min(xs) / 2, max(xs) * 2
    styles = iter(["--", ":", "-.", (0, (5, 1)), (0, (1, 3)), (0, (3, 3, 1, 3))] * 4)
    for dev, roof in (doc.get("roofline") or {}).items():
        bw = roof.get("bandwidth_bytes_per_s")
        for unit, peak in (roof.get("peak_flops") or {}).items():
            if not bw or not peak:
                continue
            knee = peak / bw
            x = [lo, min(max(knee, lo), hi), hi]
            ax1.plot(x, [min(peak, v * bw) for v in x], lw=1, ls=next(styles), color="0.35")
            ax1.annotate(f"{dev} {unit}", (hi, peak), fontsize=7, ha="right", va="bottom")
    ax1.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP / byte of minimum "
            "traffic)", ylabel="achieved FLOP/s", title="roofline")
    ax1.legend(fontsize=8)

    labeled = [r for r in rows if r.get("ratio") and r["backend"] != r.get("ref_backend")]
    cases = []
    for r in labeled:
        c = f"{r['layer']} {r['op']} {r['dtype']}"
        if c not in cases:
            cases.append(c)
    series = sorted({r["backend"] for r in labeled})
    width = 0.8 / max(len(series), 1)
    for i, b in enumerate(series):
        val = {f"{r['layer']} {r['op']} {r['dtype']}": r["ratio"] for r in labeled
               if r["backend"] == b}
        by_case = {f"{r['layer']} {r['op']} {r['dtype']}": r for r in labeled
                   if r["backend"] == b}
        xs = [j + i * width for j, c in enumerate(cases) if c in val]
        here = [by_case[c] for c in cases if c in val]
        bars = ax2.bar(xs, [val[c] for c in cases if c in val], width, label=b)
        # error bars: the ratio's quartile spread; red (and hatched bars) where unstable
        if all(r.get("ratio_lo") for r in here):
            lo = [r["ratio"] - r["ratio_lo"] for r in here]
            hi = [r["ratio_hi"] - r["ratio"] for r in here]
            colors = ["red" if r.get("ratio_unstable") else "k" for r in here]
            for x, v, l, h, c in zip(xs, [r["ratio"] for r in here], lo, hi, colors):
                ax2.errorbar([x], [v], yerr=[[max(l, 0)], [max(h, 0)]], fmt="none",
                             ecolor=c, capsize=2, lw=1)
            for bar, r in zip(bars, here):
                if r.get("ratio_unstable"):
                    bar.set_hatch("//")
    ax2.axhline(1.0, color="k", lw=1)
    ax2.set_yscale("log")
    ax2.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax2.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax2.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax2.set_xticklabels(cases, rotation=75, ha="right", fontsize=7)
    ax2.set(ylabel="time / reference time (lower is faster)",
            title="ratio to the reference per layer\n(error bars: quartiles; red, hatched: "
                  "unstable, IQR > 25%)")
    if series:
        ax2.legend(fontsize=8)
    gpu = (doc.get("machine") or {}).get("gpu") or {}
    fig.suptitle(f"gpuconv-bench {doc.get('date')}  {gpu.get('name') or doc['machine']['cpu']}"
                 f"  commit {str(doc.get('commit'))[:12]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
