"""``gpuconv-bench compare a.json b.json``: two runs side by side, regressions marked.

A case is a REGRESSION when b's median is more than ``threshold`` slower than a's *and* the two
interquartile ranges do not overlap (b's 25th percentile above a's 75th), so that noise the runs
themselves show is not called a change; ``faster`` likewise the other way. A backend that was
correct in a and is WRONG or ERROR in b is BROKEN.
"""
from __future__ import annotations

import argparse

from .report import fmt_time, load_json
from .runner import geomean


def _key(r):
    return (r["layer"], r["op"], r["dtype"], r["batch"], r["backend"])


def verdict(a, b, threshold):
    if a is None:
        return "only in b"
    if b is None:
        return "only in a"
    if a["status"] == "ok" and b["status"] != "ok":
        return f"BROKEN ({b['status']})"
    if a["status"] != "ok" or b["status"] != "ok":
        return f"{a['status']} -> {b['status']}"
    ratio = b["median_s"] / a["median_s"]
    if ratio > 1 + threshold and b["q1_s"] > a["q3_s"]:
        return "REGRESSION"
    if ratio < 1 - threshold and b["q3_s"] < a["q1_s"]:
        return "faster"
    if abs(ratio - 1) > threshold:
        return "~ (IQRs overlap)"
    return "~"


def compare_docs(da, db, threshold=0.05):
    """(lines, number of regressions and breakages)."""
    ra = {_key(r): r for r in da["results"]}
    rb = {_key(r): r for r in db["results"]}
    keys = list(ra) + [k for k in rb if k not in ra]
    lines = []
    for tag, d in (("a", da), ("b", db)):
        gpu = (d.get("machine") or {}).get("gpu") or {}
        lines.append(f"{tag}: {d.get('date')}  commit {d.get('commit')}  "
                     f"{gpu.get('name') or (d.get('machine') or {}).get('cpu')}")
    lines.append(f"{'layer':<24} {'op':<6} {'dtype':<8} {'N':>3} {'backend':<20} "
                 f"{'a median':>10} {'b median':>10} {'b/a':>6}  verdict "
                 f"(threshold {threshold:.0%})")
    bad, ratios = 0, []
    for k in keys:
        a, b = ra.get(k), rb.get(k)
        v = verdict(a, b, threshold)
        bad += v.startswith(("REGRESSION", "BROKEN"))
        am, bm = (a or {}).get("median_s"), (b or {}).get("median_s")
        ratio = bm / am if am and bm else None
        if ratio:
            ratios.append(ratio)
        lines.append(f"{k[0]:<24} {k[1]:<6} {k[2]:<8} {k[3]:>3} {k[4]:<20} "
                     f"{fmt_time(am):>10} {fmt_time(bm):>10} "
                     f"{'-' if ratio is None else format(ratio, '.3f'):>6}  {v}")
    g = geomean(ratios)
    lines.append(f"geometric mean of b/a over {len(ratios)} cases: "
                 f"{'-' if g is None else format(g, '.3f')}; regressions or breakages: {bad}")
    return lines, bad


def main(argv=None):
    ap = argparse.ArgumentParser(prog="gpuconv-bench compare",
                                 description="Compare two gpuconv-bench JSON results.")
    ap.add_argument("a", help="the baseline run (JSON from gpuconv-bench --json)")
    ap.add_argument("b", help="the new run")
    ap.add_argument("--threshold", type=float, default=0.05,
                    help="relative change of the median that counts (default 0.05 = 5%%)")
    ap.add_argument("--fail-on-regression", action="store_true",
                    help="exit with status 1 if any case regressed or broke")
    args = ap.parse_args(argv)
    try:
        da, db = load_json(args.a), load_json(args.b)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    lines, bad = compare_docs(da, db, args.threshold)
    print("\n".join(lines))
    return 1 if bad and args.fail_on_regression else 0
