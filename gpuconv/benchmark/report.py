"""Readable tables and the JSON result file.

Columns per (layer, op, dtype) and backend: median time, spread (the interquartile range as a
percentage of the median, and the minimum), samples, FLOP rate (TFLOP/s on a GPU, GFLOP/s on the
CPU), GB/s of the minimum traffic (``ConvProblem.bytes_moved``: each operand read once, the result
written once), the fraction of the roofline, the workspace memory and the ratio to the reference
backend of the device (cuDNN on the GPU, PyTorch on the CPU; > 1 means slower than it).
"""
from __future__ import annotations

import json

from . import timing

SCHEMA = "gpuconv-bench/1"


def fmt_time(s):
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_bytes(n):
    if n is None:
        return "-"
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def fmt_rate(row):
    r = row.get("flop_rate")
    if r is None:
        return "-"
    return f"{r / 1e12:.2f} T" if row["device"] == "cuda" else f"{r / 1e9:.1f} G"


def _num(x, spec, dash="-"):
    return dash if x is None else format(x, spec)


HEAD = (f"  {'backend':<20} {'status':<6} {'median':>10} {'iqr':>6} {'min':>10} {'n':>4} "
        f"{'FLOP/s':>9} {'GB/s':>7} {'roof':>5} {'workspace':>10} {'ratio':>6}  rel.err")


def fmt_iqr(r, digits=1):
    """The IQR as a percentage of the median; '!' marks an unstable result (timing.UNSTABLE_IQR)."""
    med = r.get("median_s")
    if not med:
        return "-"
    return f"{100 * (r['q3_s'] - r['q1_s']) / med:.{digits}f}%" + ("!" if timing.unstable(r) else "")


def case_block(rows):
    """The lines of one (layer, op, dtype) case."""
    r0 = rows[0]
    unit = "comparisons" if r0["op"] == "pool" else "FLOP"
    lines = [f"{r0['layer']}  {r0['op']}  {r0['dtype']}   {r0['problem']}   "
             f"{r0['flops'] / 1e9:.3g} G{unit}, min traffic {fmt_bytes(r0['bytes'])}"
             + (f", {r0['input_sets']} input sets" if r0.get("input_sets", 1) > 1 else ""),
             HEAD]
    for r in rows:
        med = r.get("median_s")
        iqr = fmt_iqr(r)
        roof = r.get("roofline_fraction")
        lines.append(
            f"  {r['backend']:<20} {r['status']:<6} {fmt_time(med):>10} {iqr:>6} "
            f"{fmt_time(r.get('min_s')):>10} {r.get('n', 0):>4} {fmt_rate(r):>9} "
            f"{_num(r.get('byte_rate') and r['byte_rate'] / 1e9, '.1f'):>7} "
            f"{_num(roof and 100 * roof, '.0f'):>4}% {fmt_bytes(r.get('workspace_bytes')):>10} "
            f"{_num(r.get('ratio'), '.2f'):>6}  {_num(r.get('rel_err'), '.1e')}")
        if r["status"] != "ok":
            lines.append(f"      {r['status']}: {r['reason']} -- not timed")
        elif timing.unstable(r):
            lines.append("      UNSTABLE: IQR over 25% of the median; its ratio is not evidence")
        if (r.get("page_faults") or 0) >= FAULTS_NOTED:
            lines.append(f"      {r['page_faults']:,.0f} page faults a call (median): memory "
                         "fresh from the OS each call, part of this time is the kernel's")
        if r.get("algo_info"):
            lines.append(f"      cuDNN chose: {r['algo_info']}")
    return lines


FAULTS_NOTED = 256  # page faults a call (1 MiB of fresh pages) worth a line under the row


def summary_lines(summary, targets):
    lines = ["", "Summary per suite (geometric mean of time / reference time over the layers; "
             "network time = sum of median x count_in_net)",
             f"  {'suite':<11} {'op':<6} {'dtype':<9} {'backend':<20} {'vs':<10} "
             f"{'geomean':>8} {'gm(min)':>8} {'layers':>7} {'network time':>13}"]
    for s in summary:
        net = fmt_time(s["net_time_s"]) if s["complete"] else f"({s['n_ok']}/{s['n_layers']} ok)"
        ref = s["backend"] == s["ref_backend"]
        g = "(ref)" if ref else _num(s["geomean_ratio"], ".3f")
        gm = "" if ref else _num(s.get("geomean_min_ratio"), ".3f")
        lines.append(f"  {s['suite']:<11} {s['op']:<6} {s['dtype']:<9} {s['backend']:<20} "
                     f"{s['ref_backend'] or '-':<10} {g:>8} {gm:>8} "
                     f"{s['n_ratios']:>3}/{s['n_layers']:<3} {net:>13}"
                     + (f"  {len(s['unstable_layers'])} unstable" if not ref
                        and s.get("unstable_layers") else ""))
    for t in targets:
        lines.append(t["line"])
    return lines


def target_checks(summary, suite_targets):
    """Lines (and verdicts) for suites with a speed target, e.g. cpu-target."""
    out = []
    for s in summary:
        tgt = suite_targets.get(s["suite"])
        if not tgt or s["backend"] != tgt[0] or s["ref_backend"] != tgt[1]:
            continue
        g = s["geomean_ratio"]
        gmin = s.get("geomean_min_ratio")
        shaky = s.get("unstable_layers") or []
        # met only on complete, stable data, and on medians and minimum times alike
        met = (g is not None and gmin is not None and g <= tgt[2] and gmin <= tgt[2]
               and s["n_ratios"] == s["n_layers"] and not shaky)
        if g is None:
            verdict = "not measured"
        elif shaky:
            verdict = (f"UNSTABLE data, not judged ({len(shaky)} of {s['n_layers']} layers "
                       f"with IQR > 25%: {', '.join(shaky[:4])}{' ...' if len(shaky) > 4 else ''})")
        else:
            verdict = "met" if met else "NOT met"
        out.append(dict(suite=s["suite"], op=s["op"], dtype=s["dtype"], backend=tgt[0],
                        ref=tgt[1], limit=tgt[2], geomean=g, geomean_min=gmin, met=met,
                        unstable_layers=shaky, verdict=verdict,
                        line=f"  target {s['suite']} {s['op']} {s['dtype']}: geomean "
                             f"{tgt[0]}/{tgt[1]} = {_num(g, '.3f')}, on minimum times "
                             f"{_num(gmin, '.3f')} (limit {tgt[2]}) -> {verdict}"))
    return out


def write_json(path, doc):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")


def load_json(path):
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a gpuconv-bench result (schema {doc.get('schema')!r}, "
                         f"expected {SCHEMA!r})")
    return doc


def markdown(doc):
    """A run as Markdown (for bench/NOTES.md): one row per layer and op, backends side by side,
    then the suite summaries and targets. Numbers come from the JSON, never typed by hand."""
    m = doc["machine"]
    gpu = m.get("gpu") or {}
    where = f"{gpu.get('name')} (driver {gpu.get('driver')})" if gpu else \
        f"{m['cpu']}, {m['cpu_count']} cores, no GPU"
    st = doc.get("settings", {})
    load = m.get("load_average_1min")
    lines = [f"Measured {doc['date']} on {where}; commit `{doc['commit']}`; "
             f"`{doc['command']}`; batch {st.get('batch')}, {st.get('threads')} threads, "
             f"{st.get('cache')} cache"
             + (f"; 1-min load average at start {load:.2f}" if load is not None else "")
             + ". Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()
                                         if k != "blas" and v is not None) + ".", ""]
    backends = []
    for r in doc["results"]:
        if r["backend"] not in backends:
            backends.append(r["backend"])
    refs = set((st.get("ratio_reference") or {}).values())
    ratio_cols = [b for b in backends if b not in refs]
    head = "| layer | op | dtype | " + " | ".join(
        [f"{b} median (IQR)" for b in backends] + [f"{b} ratio" for b in ratio_cols]) + " |"
    lines += ["IQR marked '!': over 25% of the median, an unstable result whose ratio is not "
              "evidence.", "", head, "|" + " --- |" * (3 + len(backends) + len(ratio_cols))]
    cases = []
    for r in doc["results"]:
        k = (r["layer"], r["op"], r["dtype"])
        if k not in cases:
            cases.append(k)
    for k in cases:
        rows = {r["backend"]: r for r in doc["results"] if (r["layer"], r["op"], r["dtype"]) == k}
        cells = []
        for b in backends:
            r = rows.get(b)
            if r is None:
                cells.append("-")
            elif r.get("median_s"):
                cells.append(f"{fmt_time(r['median_s'])} ({fmt_iqr(r, 0)})")
            else:
                cells.append(r["status"])
        ratios = [_num((rows.get(b) or {}).get("ratio"), ".2f") for b in ratio_cols]
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells + ratios) + " |")
    lines += ["", "| suite | op | dtype | backend | vs | geomean ratio | geomean ratio of "
              "min times | layers | network time |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in doc.get("summary", []):
        ref = s["backend"] == s["ref_backend"]
        g = "(ref)" if ref else _num(s["geomean_ratio"], ".3f")
        gm = "" if ref else _num(s.get("geomean_min_ratio"), ".3f")
        net = fmt_time(s["net_time_s"]) if s["complete"] else "incomplete"
        lines.append(f"| {s['suite']} | {s['op']} | {s['dtype']} | {s['backend']} | "
                     f"{s['ref_backend']} | {g} | {gm} | {s['n_ratios']}/{s['n_layers']} | "
                     f"{net} |")
    for t in doc.get("targets", []):
        lines.append("")
        lines.append(f"Target {t['suite']} {t['op']} {t['dtype']}: geomean {t['backend']}/"
                     f"{t['ref']} = {_num(t['geomean'], '.3f')} (limit {t['limit']}): "
                     f"{t.get('verdict') or ('met' if t['met'] else 'NOT met')} (on minimum "
                     f"times: {_num(t.get('geomean_min'), '.3f')}).")
    return "\n".join(lines) + "\n"
