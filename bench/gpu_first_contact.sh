#!/usr/bin/env bash
# One prepared device run: everything a session with a GPU must do, in one call, within 8 minutes
# on an H200, every output under OUTDIR.
#
#   GPUCONV_COMMIT=<sha> bench/gpu_first_contact.sh "$OUT"   on the GPU machine, from the repo
#                                                root (its copy of the tree has no .git)
#   bench/gpu_first_contact.sh --dry-run OUTDIR  the same steps on the CPU backends (CI runs it)
#
# Steps (each under `timeout`, each continuing after a failure of the ones before; the rc and
# wall time of every step go to steps.tsv and SUMMARY.md):
#   install  pip install --no-deps --no-build-isolation -e .  (the GPU machine has no registry;
#            the dry run only resolves it: pip install --dry-run)
#   smi      nvidia-smi                                        (skipped in the dry run)
#   doctor   gpuconv-doctor --bench --require-gpu --json doctor.json
#   pytest   pytest --require-gpu -m gpu tests --junitxml pytest-gpu.xml
#   bench-*  gpuconv-bench, suites r50 and vgg16, fprop/dgrad/wgrad, batch 32: float32 beside cuDNN
#            with TF32 off and on, and float16 beside cuDNN; JSON + Markdown per run
#   summary  SUMMARY.md: device, date, commit, pass/fail counts, every step, the bench tables
# Nothing here needs the network. The steps write into a scratch directory; after every step
# OUTDIR gets a fresh copy of the key files and a tarball of everything, so what a killed call
# leaves behind still comes back, and OUTDIR holds six files (the device tool returns at most
# eight): SUMMARY.md, summary.json, steps.log, doctor.json, pytest-gpu.xml and outputs.tar.gz
# (every <step>.log, steps.tsv, bench-<suite>-<dtype>.json and .md, and the five above).
#
# Time budget (H200, 16 CPU cores; the whole run is capped at BUDGET seconds, default 470, and a
# step gets min(its cap, what is left), so the run ends inside 8 minutes whatever hangs):
#   install ~10 s; doctor ~60 s (NVRTC compiles every kernel once, into CuPy's disk cache that the
#   later steps reuse; the sweep; a 12-case benchmark); pytest ~60-150 s.
#   bench: r50 = 23 layers, vgg16 = 9; x 3 ops = 69 and 27 cases per dtype, 192 in all. Per case:
#   a float64 NumPy reference on the CPU (r50 126 GFLOP, vgg16 686 GFLOP per op at batch 32:
#   ~35 s over the four runs at ~150 GFLOP/s), the check of up to 9 backends, >= 1 warm-up call,
#   then >= 5 samples per backend and sampling stops after 0.15 s (most layers take < 2 ms a
#   call: ~0.4 s a case) -> ~80 s of GPU-side work, plus ~8 s start-up per run: ~150 s in all.
set -u

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -ne 1 ]; then
    echo "usage: bench/gpu_first_contact.sh [--dry-run] OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpuconv-first-contact.XXXXXX") || exit 2
KEEP=(SUMMARY.md summary.json steps.log doctor.json pytest-gpu.xml)
export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-/tmp/gpuconv-cupy-cache}"
export PYTHONUNBUFFERED=1
# the GPU machine's `python3` is the one with PyTorch and CuPy
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${GPUCONV_FIRST_CONTACT_BUDGET:-470}
START=$(date +%s)
: > "$WORK/steps.tsv"
echo "first contact $(date -u +%FT%TZ) in $(pwd) -> $OUT (work dir $WORK; dry run: $DRY;" \
    "budget ${BUDGET} s)" | tee "$WORK/steps.log"

# publish: OUTDIR gets the key files and a tarball of the work dir, as they are now
publish() {
    local f
    for f in "${KEEP[@]}"; do
        if [ -f "$WORK/$f" ]; then cp "$WORK/$f" "$OUT/$f"; fi
    done
    tar -czf "$OUT/outputs.tar.gz.part" -C "$WORK" . && mv "$OUT/outputs.tar.gz.part" \
        "$OUT/outputs.tar.gz"
}

# step NAME CAP COMMAND...: run COMMAND under timeout min(CAP, time left), output to NAME.log.
# SIGINT first (pytest still writes its JUnit XML), SIGKILL 15 s later.
step() {
    local name=$1 cap=$2
    shift 2
    local now left t rc t0 dt
    now=$(date +%s)
    left=$(( START + BUDGET - now - 15 ))   # 15 s kept for the summary
    if [ "$left" -lt 5 ]; then
        printf '%s\t%s\t%s\t%s\n' "$name" "skipped" 0 0 >> "$WORK/steps.tsv"
        echo "== $name: skipped, out of time" | tee -a "$WORK/steps.log"
        publish
        return
    fi
    t=$(( cap < left ? cap : left ))
    echo "== $name (timeout ${t} s): $*" | tee -a "$WORK/steps.log"
    t0=$(date +%s)
    timeout -s INT -k 15 "$t" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    dt=$(( $(date +%s) - t0 ))
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$t" >> "$WORK/steps.tsv"
    echo "== $name: rc $rc in ${dt} s$([ "$rc" = 124 ] && echo ' (TIMED OUT)')" \
        | tee -a "$WORK/steps.log"
    tail -n 3 "$WORK/$name.log" | sed 's/^/   | /'
    publish
}

# the console scripts, or their modules where the install step could not put them on PATH
# (resolved after the install step: `timeout` runs programs, not shell functions)
resolve() {
    if command -v gpuconv-doctor >/dev/null; then DOCTOR=(gpuconv-doctor);
    else DOCTOR=("$PY" -m gpuconv.doctor); fi
    if command -v gpuconv-bench >/dev/null; then BENCH=(gpuconv-bench);
    else BENCH=("$PY" -m gpuconv.benchmark.cli); fi
}
# Without an install the source tree lacks the package gpuconv.kernels (setup.py maps it to
# kernels/): link it, so that the steps still run from the checkout (the tree is a throwaway
# copy on the GPU machine), and say so.
importable() {
    if ! "$PY" -c "import gpuconv.kernels" 2>/dev/null; then
        ln -s ../kernels gpuconv/kernels
        echo "== install: gpuconv.kernels not importable; linked gpuconv/kernels -> ../kernels" \
            | tee -a "$WORK/steps.log"
    fi
}
# bench_step NAME CAP ARGS...: one gpuconv-bench run to NAME.json, then its Markdown tables
bench_step() {
    local name=$1 cap=$2
    shift 2
    step "$name" "$cap" "${BENCH[@]}" "$@" --quiet --json "$WORK/$name.json"
    if [ -f "$WORK/$name.json" ]; then
        timeout 30 "${BENCH[@]}" markdown "$WORK/$name.json" > "$WORK/$name.md" 2>&1
    fi
}

if [ "$DRY" = 1 ]; then
    step install 60 "$PY" -m pip install --dry-run --no-deps --no-build-isolation -e .
    resolve   # (no kernels link here: this is the developer's own checkout)
    step doctor 120 "${DOCTOR[@]}" --bench --json "$WORK/doctor.json"
    step pytest 120 "$PY" -m pytest -m gpu tests -q -rfEs -p no:cacheprovider \
        --junitxml "$WORK/pytest-gpu.xml"
    # two bench runs in the GPU runs' form (suite x dtype -> JSON + Markdown) with the CPU engine
    # on LeNet layers, batch 2; float64 stands in for float16, which the NumPy engine lacks. Two,
    # not four: each CPU run first measures the CPU's matmul peak (seconds on 2 cores).
    TINY=(--op fprop,dgrad,wgrad --batch 2 --backend numpy --min-samples 2 --max-samples 3
          --max-time-per-case 0.05 --settle-ms 1 --threads 1)
    bench_step bench-r50-float32 60 --layer lenet5.conv1 --dtype float32 "${TINY[@]}"
    bench_step bench-vgg16-float16 60 --layer lenet5.conv2 --dtype float64 "${TINY[@]}"
else
    step install 90 "$PY" -m pip install --no-deps --no-build-isolation -e .
    resolve
    importable
    step smi 15 nvidia-smi
    step doctor 150 "${DOCTOR[@]}" --bench --require-gpu --json "$WORK/doctor.json"
    step pytest 200 "$PY" -m pytest --require-gpu -m gpu tests -q -rfEs -p no:cacheprovider \
        --durations=15 --junitxml "$WORK/pytest-gpu.xml"
    SAMPLES=(--op fprop,dgrad,wgrad --batch 32 --warmup-ms 10 --min-samples 5
             --max-samples 30 --max-time-per-case 0.15)
    for suite in r50 vgg16; do
        bench_step "bench-$suite-float32" 110 --suite "$suite" --dtype float32 \
            --backend cuda,cudnn,cudnn-tf32 "${SAMPLES[@]}"
        bench_step "bench-$suite-float16" 100 --suite "$suite" --dtype float16 \
            --backend cuda,cudnn "${SAMPLES[@]}"
    done
fi

# ---- SUMMARY.md and summary.json from what the steps left behind ------------------------------
# (outside the budget: it always runs, and the budget kept 15 s for it)
timeout -k 5 30 "$PY" - "$WORK" "$DRY" > "$WORK/summary.log" 2>&1 <<'PYEOF'
import glob, json, os, subprocess, sys, xml.etree.ElementTree as ET

out, dry = sys.argv[1], sys.argv[2] == "1"
steps = [line.rstrip("\n").split("\t") for line in open(os.path.join(out, "steps.tsv"))]
doc = {}
try:
    doc = json.load(open(os.path.join(out, "doctor.json")))
except (OSError, ValueError) as e:
    doc = {"error": f"doctor.json unreadable: {e}"}
env = doc.get("environment", {})
device = env.get("device0") or ("none (dry run on the CPU)" if dry else "none found")
# the device gets a copy of the tree without .git: the caller passes the commit along
commit = (env.get("commit") or os.environ.get("GPUCONV_COMMIT")
          or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
          or "unknown (no .git here; run with GPUCONV_COMMIT=$(git rev-parse HEAD))")
try:
    from gpuconv.autotune import kernel_source_hash
    kernels = kernel_source_hash()[:16]
except Exception as e:
    kernels = f"unknown ({type(e).__name__}: {e})"
junit = {}
try:
    root = ET.parse(os.path.join(out, "pytest-gpu.xml")).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    for k in ("tests", "failures", "errors", "skipped"):
        junit[k] = sum(int(s.get(k, 0)) for s in suites)
    junit["failed"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites
                       for c in s.iter("testcase") if c.find("failure") is not None
                       or c.find("error") is not None]
except (OSError, ET.ParseError) as e:
    junit = {"error": f"pytest-gpu.xml unreadable: {e}"}
benches = []
for path in sorted(glob.glob(os.path.join(out, "bench-*.json"))):
    try:
        b = json.load(open(path))
    except ValueError as e:
        benches.append({"file": os.path.basename(path), "error": str(e)})
        continue
    st = [r.get("status") for r in b.get("results", [])]
    benches.append({"file": os.path.basename(path), "rows": len(st),
                    "ok": st.count("ok"), "not_ok": len(st) - st.count("ok")})
summary = {"dry_run": dry, "device": device, "date": doc.get("date"), "commit": commit,
           "kernel_source_hash": kernels,
           "steps": [{"step": s[0], "rc": s[1], "seconds": int(s[2]), "timeout": int(s[3])}
                     for s in steps],
           "doctor": {"status": doc.get("status"), "sweep": doc.get("sweep_counts"),
                      "failures": doc.get("failures", [])[:50]},
           "pytest": junit, "bench": benches}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)

L = ["# gpuconv first contact" + (" (dry run, CPU backends)" if dry else ""), "",
     f"- device: {device}", f"- date: {doc.get('date')}", f"- commit: {commit}",
     f"- kernel sources: sha256 {kernels}... (gpuconv.autotune.kernel_source_hash)",
     f"- driver {env.get('driver')}, CUDA runtime {env.get('cuda_runtime')}, NVRTC "
     f"{env.get('nvrtc')}, CuPy {env.get('cupy')}, PyTorch {env.get('torch')}", "",
     "## Steps", "", "| step | rc | seconds | timeout |", "| --- | --- | --- | --- |"]
L += [f"| {s[0]} | {s[1]}{' (timed out)' if s[1] == '124' else ''} | {s[2]} | {s[3]} |"
      for s in steps]
L += ["", "## gpuconv-doctor", "", f"status: {doc.get('status')}; sweep: {doc.get('sweep_counts')}"]
L += [f"- {f}" for f in doc.get("failures", [])[:30]]
if "error" in doc:
    L.append(doc["error"])
L += ["", "## pytest -m gpu", ""]
if "error" in junit:
    L.append(junit["error"])
else:
    L.append(f"{junit['tests']} tests: {junit['tests'] - junit['failures'] - junit['errors'] - junit['skipped']} "
             f"passed, {junit['failures']} failed, {junit['errors']} errors, "
             f"{junit['skipped']} skipped")
    L += [f"- FAILED {n}" for n in junit["failed"][:40]]
    if len(junit["failed"]) > 40:
        L.append(f"- ... and {len(junit['failed']) - 40} more (pytest-gpu.xml)")
L += ["", "## gpuconv-bench", ""]
head = list(L)
for b in benches:
    L.append(f"### {b['file']}: " + (b["error"] if "error" in b else
             f"{b['rows']} rows, {b['ok']} ok, {b['not_ok']} WRONG/ERROR"))
    head.append(L[-1])
    md = os.path.join(out, b["file"][:-5] + ".md")
    if os.path.exists(md):
        L += ["", open(md).read().rstrip(), ""]
open(os.path.join(out, "SUMMARY.md"), "w").write("\n".join(L) + "\n")
print("\n".join(head))  # the device tool shows the end of stdout: no bench tables here
PYEOF
rc=$?
cat "$WORK/summary.log"
echo "== summary: rc $rc" | tee -a "$WORK/steps.log"
echo "first contact done in $(( $(date +%s) - START )) s; summary: $OUT/SUMMARY.md" \
    | tee -a "$WORK/steps.log"
publish
rm -rf "$WORK"
