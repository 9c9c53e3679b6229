#!/usr/bin/env bash
# One-command GPU check of lora_ext, sized for one 10-minute call on a single H200
# (16 cores, its own python3/torch/nvcc/compute-sanitizer, no network).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default: $OUT, else ./gpu_check_out)
#
# Stages, in order (a stage that fails does not stop the later ones, except that
# a missing GPU or a failed build ends the run at once):
#   gpu          nvidia-smi and torch.cuda.is_available(), FIRST: without a GPU the
#                script fails within seconds, before any build
#   environment  versions, nvidia-smi, nvcc, compute-sanitizer; `python -m lora_ext --no-selftest`
#   build        pip install -e . for sm_90 (LORA_EXT_CUDA_ARCHS, default 9.0) with -Xptxas -v,
#                from a clean tree; then checks that the library loaded is the one just built:
#                build_info()['cuda'], lora_ext.__file__ and the library under this checkout,
#                the library newer than the build start (LORA_EXT_REQUIRE_EXTENSION=1 throughout)
#   spills       every ptxas "N bytes spill stores, M bytes spill loads" line of a lora_ext
#                function must read 0 and 0 (fails otherwise, or when no such line was seen);
#                cuobjdump: every kernel of the library has lora_ext in its name (what the
#                sanitizers' kernel filter matches), so none goes unchecked
#   selftest     `python -m lora_ext`: every compiled op on CPU and GPU against the fallback
#   cuda_tests   tests/test_cuda.py + tests/test_nf4_cuda.py + tests/test_dora_cuda.py + tests/test_mixed_cuda.py
#                in one pytest run (junit xml);
#                fails unless tests - skipped > 0 and failures + errors == 0
#   racecheck    compute-sanitizer racecheck of the lora_ext kernels (shared-memory hazards)
#   memcheck     compute-sanitizer memcheck of the lora_ext kernels (out-of-bounds, misaligned)
#   initcheck    compute-sanitizer initcheck (reads of device memory nothing wrote)
#   bench        `python -m benchmarks.run --device cuda --quick` (the GPU part of the one harness)
# The sanitizers run benchmarks/gpu_sanitize_case.py (every CUDA op, odd shapes, r = 40)
# with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so every tensor is its own cudaMalloc: an
# out-of-bounds access hits a real allocation end and initcheck sees every fresh
# allocation (the small pool of the caching allocator included) as uninitialised.
# The full test suite is not run here (CI runs it on CPU).
#
# Budget: the stages run against cumulative deadlines, stage i ending at the latest at
# cap_1 + ... + cap_i seconds (time a stage leaves unused passes to the next ones). The
# caps (printed at the start, overridable with GPU_CHECK_CAP_<STAGE>=seconds) sum to at
# most GPU_CHECK_BUDGET_S (default 540), leaving a minute of a 10-minute call for start-up
# and transfers. The build cap (210 s) covers a 16-core nvcc build for one arch (~3 min).
#
# Output: exactly two files in OUT_DIR, written also on failure, timeout or interrupt
# (trap): summary.txt (each stage's PASS/FAIL/SKIP with its time, the tail of each
# failing log, the benchmark table, the final RESULT line) and gpu_check_logs.tar.gz
# (every stage log, the junit xml, the benchmark results and a copy of the summary;
# refreshed after every stage, so even a killed run leaves the logs so far). Logs are
# written to a temporary directory first. Exit status 0 only if every stage passed.
#
# Environment: PYTHON (python3), CUDA_HOME (from nvcc on PATH, else /usr/local/cuda),
# LORA_EXT_CUDA_ARCHS (9.0), MAX_JOBS (16), NVCC_THREADS (4), GPU_CHECK_BUDGET_S (540).
#
# Offline helpers (no GPU needed; used to dry-run the checks):
#   bash benchmarks/gpu_check.sh --check-spills BUILD_LOG   the spill check on a ptxas log
#   bash benchmarks/gpu_check.sh --check-junit JUNIT_XML    the "not all skipped" check
#   bash benchmarks/gpu_check.sh --check-sanitizer TOOL OUTPUT   the verdict on a sanitizer log
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHON

# ----------------------------------------------------------------- offline checks

# check_spills LOG: fails if a ptxas spill line of a lora_ext function is not "0 bytes
# spill stores, 0 bytes spill loads", or if the log holds no spill line at all (no -v report).
check_spills() {
  awk '
    /Function properties for / { fn = $NF; next }
    /Compiling entry function / { fn = $0; sub(/.*Compiling entry function .?/, "", fn); sub(/.? for .*/, "", fn) }
    /bytes spill stores/ {
      seen++
      stores = $0; sub(/ bytes spill stores.*/, "", stores); sub(/.*[^0-9]/, "", stores)
      loads = $0; sub(/ bytes spill loads.*/, "", loads); sub(/.*[^0-9]/, "", loads)
      if (stores + 0 != 0 || loads + 0 != 0) {
        if (fn ~ /lora_ext/) { bad++; print "SPILL  " stores " B stores, " loads " B loads in " fn }
        else { other++; print "spill (not a lora_ext function) " stores " B stores, " loads " B loads in " fn }
      }
    }
    END {
      printf "ptxas spill lines: %d, lora_ext functions with spills: %d, other functions with spills: %d\n", seen, bad, other
      if (seen == 0) { print "no ptxas spill report found (was -Xptxas -v passed?)"; exit 1 }
      exit bad > 0 ? 1 : 0
    }' "$1"
}

# check_junit XML: tests - skipped > 0 and failures + errors == 0, summed over the test suites.
check_junit() {
  "$PYTHON" - "$1" <<'EOF'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
n = {k: 0 for k in ("tests", "skipped", "failures", "errors")}
for s in suites:
    for k in n:
        n[k] += int(s.get(k, 0))
ran = n["tests"] - n["skipped"]
print(f"junit: {n['tests']} tests, {n['skipped']} skipped, {n['failures']} failures, {n['errors']} errors -> {ran} ran")
if ran <= 0:
    sys.exit("junit: every CUDA test was skipped (no GPU, or no CUDA kernels in the build): nothing was checked")
if n["failures"] + n["errors"]:
    sys.exit("junit: failures or errors")
EOF
}

# check_sanitizer TOOL OUTPUT: the verdict on a compute-sanitizer run of the sanitize case.
# Fails when the case did not finish, on any "ERROR SUMMARY: N errors" with N > 0 (memcheck,
# racecheck: only lora_ext kernels are instrumented there), on racecheck hazards (errors or
# warnings), and, for initcheck (all kernels instrumented), on an uninitialised read in a
# lora_ext kernel or in a torch kernel (at::native: those read our outputs, e.g. the case's
# isfinite checks, so an output element a lora_ext kernel never wrote is reported there).
# Reads in other kernels (cuBLAS) are listed as a warning.
check_sanitizer() {
  local tool="$1" out="$2"
  grep -q "sanitize case: .* done" "$out" || { echo "the sanitize case did not finish"; return 1; }
  if grep -qE "RACECHECK SUMMARY: [0-9]+ hazards? displayed \(([1-9]|[0-9]+ errors?, [1-9])" "$out"; then
    echo "racecheck reported hazards"
    return 1
  fi
  if [[ "$tool" != initcheck ]]; then
    if grep -qE "ERROR SUMMARY: [1-9][0-9]* errors?" "$out"; then
      echo "compute-sanitizer $tool reported errors"
      return 1
    fi
    return 0
  fi
  # A report: "Uninitialized __global__ memory read ..." and, a line or two later, "at <kernel>+0x...".
  awk '
    /Uninitialized __global__ memory read/ { pending = 1; next }
    pending && /^=+ +at / {
      pending = 0
      if ($0 ~ /lora_ext|at::native|_ZN2at6native/) { bad++; print "UNINITIALISED READ " $0 } else { other[$0]++ }
    }
    /Uninitialized access .* on CUDA API call/ { api++; print "warning: " $0 }
    END {
      n = 0
      for (k in other) { n += other[k]; print "warning: uninitialised read outside lora_ext/torch kernels (" other[k] "x): " k }
      printf "initcheck: %d uninitialised reads in lora_ext or torch kernels, %d in other kernels, %d on API calls\n", bad, n, api
      exit bad > 0 ? 1 : 0
    }' "$out"
}

case "${1:-}" in
  --check-sanitizer) check_sanitizer "$2" "$3"; exit $? ;;
  --check-spills) check_spills "$2"; exit $? ;;
  --check-junit) check_junit "$2"; exit $? ;;
esac

# ----------------------------------------------------------------- setup

OUT_DIR="${1:-${OUT:-$ROOT/gpu_check_out}}"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)" || exit 2
SUMMARY="$OUT_DIR/summary.txt"
TARBALL="$OUT_DIR/gpu_check_logs.tar.gz"
LOG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || exit 2
rm -f "$TARBALL"
: >"$SUMMARY"
cd "$ROOT" || exit 2

BUDGET="${GPU_CHECK_BUDGET_S:-540}"
STAGES=(environment build spills selftest cuda_tests racecheck memcheck initcheck bench)
# environment's cap also covers the GPU probe before it (both import torch: ~5 s each).
declare -A CAP=([environment]=30 [build]=210 [spills]=10 [selftest]=20 [cuda_tests]=120
  [racecheck]=30 [memcheck]=35 [initcheck]=35 [bench]=45)
CAPS_SUM=0
for s in "${STAGES[@]}"; do
  var="GPU_CHECK_CAP_${s^^}"
  CAP[$s]="${!var:-${CAP[$s]}}"
  CAPS_SUM=$((CAPS_SUM + CAP[$s]))
done
FAILED=0
DEADLINE=0

log() { echo "[gpu_check +${SECONDS}s] $*" | tee -a "$SUMMARY"; }

# snapshot: the tarball of everything so far (atomic rename, so a reader never sees half a file).
snapshot() {
  cp "$SUMMARY" "$LOG_DIR/summary.txt" 2>/dev/null
  tar -czf "$TARBALL.part" -C "$LOG_DIR" . 2>/dev/null && mv -f "$TARBALL.part" "$TARBALL"
  rm -f "$TARBALL.part"
}
finish() {
  local rc=$?
  trap - EXIT INT TERM
  ((rc == 0)) || grep -q "RESULT:" "$SUMMARY" || echo "[gpu_check +${SECONDS}s] RESULT: FAILED (exit $rc)" >>"$SUMMARY"
  snapshot
  rm -rf "$LOG_DIR"
  exit "$rc"
}
trap finish EXIT
STAGE_PID=""
on_signal() {
  [[ -n "$STAGE_PID" ]] && kill -TERM "$STAGE_PID" 2>/dev/null && wait "$STAGE_PID"  # timeout passes it on
  log "interrupted by a signal"
  exit 130
}
trap on_signal INT TERM

# The toolkit root: $CUDA_HOME, else the one holding the nvcc on PATH (maybe a symlink or
# a wrapper script that execs the real one), else /usr/local/cuda.
find_cuda_home() {
  local nvcc root candidates=()
  nvcc="$(command -v nvcc || true)"
  if [[ -n "$nvcc" ]]; then
    candidates+=("$(dirname "$(dirname "$(readlink -f "$nvcc")")")")
    root="$(grep -oE '/[^ "]*/bin/nvcc' "$nvcc" 2>/dev/null | head -n 1 || true)"
    [[ -n "$root" ]] && candidates+=("$(dirname "$(dirname "$root")")")
  fi
  for root in "${candidates[@]}" /usr/local/cuda /opt/cuda; do
    [[ -x "$root/bin/nvcc" && -f "$root/include/cuda_runtime.h" ]] && { echo "$root"; return 0; }
  done
  echo /usr/local/cuda
}
CUDA_HOME="${CUDA_HOME:-$(find_cuda_home)}"
SANITIZER="$(command -v compute-sanitizer || true)"
[[ -z "$SANITIZER" && -x "$CUDA_HOME/bin/compute-sanitizer" ]] && SANITIZER="$CUDA_HOME/bin/compute-sanitizer"
export CUDA_HOME SANITIZER LOG_DIR ROOT
export PATH="$CUDA_HOME/bin:$PATH"
export LORA_EXT_CUDA_ARCHS="${LORA_EXT_CUDA_ARCHS:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" NVCC_THREADS="${NVCC_THREADS:-4}"
export LORA_EXT_FORCE_CUDA=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The compiled library must load: `python -m lora_ext` (and CI-style tests) fail on the fallback.
export LORA_EXT_REQUIRE_EXTENSION=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# run_stage NAME CMD...: CMD (a command or an exported function) with its output in
# LOG_DIR/NAME.log, killed at the stage's cumulative deadline.
run_stage() {
  local name="$1" rc=0 start=$SECONDS limit
  shift
  DEADLINE=$((DEADLINE + CAP[$name]))
  ((DEADLINE > BUDGET)) && DEADLINE=$BUDGET
  limit=$((DEADLINE - SECONDS))
  if ((limit < 5)); then
    log "SKIP  $name: only ${limit}s left before its deadline (${DEADLINE}s)"
    FAILED=1
    return 1
  fi
  log "START $name (limit ${limit}s)"
  # bash -c so that CMD may be one of the exported functions below (pipefail is not inherited);
  # in the background + wait, so that a signal reaches the trap at once, not after the stage.
  timeout --kill-after=5 "$limit" bash -c 'set -o pipefail; "$@"' _ "$@" >"$LOG_DIR/$name.log" 2>&1 &
  STAGE_PID=$!
  wait "$STAGE_PID" || rc=$?
  STAGE_PID=""
  if ((rc == 0)); then
    log "PASS  $name ($((SECONDS - start))s)"
  else
    if ((rc == 124 || rc == 137)); then
      log "FAIL  $name: timed out after $((SECONDS - start))s"
    else
      log "FAIL  $name: exit $rc ($((SECONDS - start))s)"
    fi
    tail -n 30 "$LOG_DIR/$name.log" | sed 's/^/        /' >>"$SUMMARY"
    FAILED=1
  fi
  snapshot
  return "$rc"
}

# ----------------------------------------------------------------- stages

gpu_present() {
  if command -v nvidia-smi >/dev/null; then
    timeout 30 nvidia-smi -L || echo "nvidia-smi -L failed: the driver sees no GPU"
  else
    echo "nvidia-smi not found (no NVIDIA driver?)"
  fi
  timeout 60 "$PYTHON" -c "import sys, torch; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', ok); sys.exit(0 if ok else 1)" ||
    { echo "torch.cuda.is_available() is False"; return 1; }
}

environment() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(hostname)  nproc: $(nproc)"
  nvidia-smi
  nvcc --version
  echo "compute-sanitizer: ${SANITIZER:-not found}"
  [[ -n "$SANITIZER" ]] && "$SANITIZER" --version
  "$PYTHON" -m pip --disable-pip-version-check list 2>/dev/null | grep -iE "^(torch|peft|transformers|pytest|ninja|numpy) "
  # Before the build: whatever library is there now (none on a fresh checkout).
  "$PYTHON" -m lora_ext --no-selftest
}

build() {
  # From clean: no stale library or object can pass for the one built now.
  rm -rf "$ROOT/build" "$ROOT"/lora_ext/_C*.so
  date +%s >"$LOG_DIR/build_start"
  # -Xptxas -v: every kernel's registers, stack and spills land in this log (spills stage).
  LORA_EXT_PTXAS_VERBOSE=1 "$PYTHON" -m pip install --no-build-isolation --no-deps --disable-pip-version-check -v -e . ||
    return 1
  "$PYTHON" - "$ROOT" "$(cat "$LOG_DIR/build_start")" <<'EOF'
import json, os, sys

import lora_ext

root, start = os.path.realpath(sys.argv[1]), int(sys.argv[2])
info = lora_ext.build_info()
print(json.dumps(info, indent=1))
lib = info.get("library_path")
problems = []
if not info["extension_loaded"]:
    problems.append(f"the compiled library did not load: {info['load_error']}")
if not info["cuda"]:
    problems.append("the library has no CUDA kernels")
if "9.0" not in info.get("cuda_archs", "") and os.environ["LORA_EXT_CUDA_ARCHS"] == "9.0":
    problems.append(f"cuda_archs is {info.get('cuda_archs')!r}, expected sm_90")
if not os.path.realpath(lora_ext.__file__).startswith(root + os.sep):
    problems.append(f"lora_ext imported from {lora_ext.__file__}, not from {root}")
if not lib or not os.path.realpath(lib).startswith(root + os.sep):
    problems.append(f"the library {lib} is not under {root}")
elif os.path.getmtime(lib) < start:
    problems.append(f"{lib} is older than this build (mtime {os.path.getmtime(lib):.0f} < start {start})")
print(f"library: {lib}")
for p in problems:
    print("BUILD CHECK FAILED:", p)
sys.exit(1 if problems else 0)
EOF
}

spills() {
  check_spills "$LOG_DIR/build.log" || return 1
  # The sanitizer stages filter kernels by the substring "lora_ext": it must match every
  # kernel of the library (a kernel outside the namespace would go unchecked) and at least one.
  local lib entries ours
  lib="$("$PYTHON" -c "import lora_ext; print(lora_ext.build_info()['library_path'])")" || return 1
  if command -v cuobjdump >/dev/null; then
    entries="$(cuobjdump -symbols "$lib" | grep -c "STO_ENTRY")"
    ours="$(cuobjdump -symbols "$lib" | grep "STO_ENTRY" | grep -c "lora_ext")"
    echo "cuobjdump: $ours of the $entries kernels (all archs) in $lib have lora_ext in their name"
    ((ours > 0 && ours == entries)) || { echo "the sanitizers' kernel filter kns=lora_ext would miss kernels"; return 1; }
  else
    echo "cuobjdump not found: the sanitizers' kernel filter is not cross-checked"
  fi
}

cuda_tests() {
  local rc=0
  "$PYTHON" -m pytest tests/test_cuda.py tests/test_nf4_cuda.py tests/test_dora_cuda.py tests/test_mixed_cuda.py -q -rs \
    -p no:cacheprovider \
    --junitxml="$LOG_DIR/cuda_tests.xml" || rc=$?
  check_junit "$LOG_DIR/cuda_tests.xml" || return 1
  return "$rc"
}

has_option() { "$SANITIZER" --help 2>&1 | grep -q -- "$1"; }

# sanitize TOOL: compute-sanitizer TOOL over the sanitize case.
#  - --kernel-name kns=lora_ext: only our kernels (namespace lora_ext::cuda and
#    lora_ext::nf4_cuda) are instrumented; racecheck/memcheck over cuBLAS take minutes.
#    initcheck is NOT filtered: a write by an uninstrumented kernel (cuBLAS filling an
#    output we read next) could go unseen and be reported as an uninitialised read;
#    instead its reports are attributed afterwards (check_sanitizer): those in lora_ext
#    kernels and in the torch kernels that read our outputs fail, others are listed.
#  - --report-api-errors no: torch and cuBLAS probe the driver with calls that are
#    expected to fail (e.g. cudaGetDriverEntryPoint for optional symbols, peer-access
#    and stream-capture queries); "explicit" would report those and fail the stage.
#    Our own launch errors are not lost: every lora_ext launch is checked in C++
#    (cudaGetLastError -> exception), so the case script exits non-zero on one.
sanitize() {
  local tool="$1" dtypes="$2" rc=0
  local args=(--tool "$tool" --print-limit 10000)
  [[ -n "$SANITIZER" ]] || { echo "compute-sanitizer not found"; return 1; }
  "$SANITIZER" --version | head -n 3
  has_option --report-api-errors && args+=(--report-api-errors no)
  if [[ "$tool" != initcheck ]]; then
    has_option --kernel-name || { echo "this compute-sanitizer has no --kernel-name filter"; return 1; }
    args+=(--kernel-name kns=lora_ext --error-exitcode 3)
  fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" "${args[@]}" \
    "$PYTHON" benchmarks/gpu_sanitize_case.py "$dtypes" 2>&1 | tee "$LOG_DIR/$tool.out" || rc=$?
  ((rc == 0)) || { echo "compute-sanitizer $tool: exit $rc"; return "$rc"; }
  check_sanitizer "$tool" "$LOG_DIR/$tool.out" || return 1
  rm -f "$LOG_DIR/$tool.out"  # its content is in the stage log already
}

bench() {
  "$PYTHON" -m benchmarks.run --device cuda --quick --out "$LOG_DIR/bench"
}

export -f gpu_present environment build check_spills check_junit check_sanitizer spills cuda_tests has_option sanitize bench

# ----------------------------------------------------------------- run

log "lora_ext GPU check of $ROOT -> $OUT_DIR (archs $LORA_EXT_CUDA_ARCHS, CUDA_HOME $CUDA_HOME, python $PYTHON)"
caps_line=""
for s in "${STAGES[@]}"; do caps_line+=" $s=${CAP[$s]}"; done
log "stage caps (s):$caps_line; sum ${CAPS_SUM}s, budget ${BUDGET}s"
if ((CAPS_SUM > BUDGET)); then
  log "FAIL  the stage caps sum to ${CAPS_SUM}s, more than the ${BUDGET}s budget (GPU_CHECK_BUDGET_S)"
  exit 2
fi

if ! gpu_present >"$LOG_DIR/gpu.log" 2>&1; then
  log "FAIL  gpu: no usable CUDA GPU, nothing to check:"
  sed 's/^/        /' "$LOG_DIR/gpu.log" | tail -n 15 | tee -a "$SUMMARY"
  log "RESULT: FAILED (no GPU)"
  exit 1
fi
log "PASS  gpu: $(grep -m1 -E "^(GPU 0|torch )" "$LOG_DIR/gpu.log")"

run_stage environment environment
if ! run_stage build build; then
  log "build failed: nothing else can be checked"
  log "RESULT: FAILED"
  exit 1
fi
run_stage spills spills
run_stage selftest "$PYTHON" -m lora_ext
run_stage cuda_tests cuda_tests
run_stage racecheck sanitize racecheck bf16,fp32,fp64
run_stage memcheck sanitize memcheck bf16,fp32,fp16
run_stage initcheck sanitize initcheck bf16,fp32
run_stage bench bench
for f in "$LOG_DIR"/bench/results.md "$LOG_DIR"/bench/report.md; do
  [[ -f "$f" ]] && { echo; cat "$f"; echo; } >>"$SUMMARY" && break
done

if ((FAILED)); then
  log "RESULT: FAILED (logs in $(basename "$TARBALL"))"
  exit 1
fi
log "RESULT: all stages passed in ${SECONDS}s"
