#!/usr/bin/env bash
# One-command GPU check for lora_ext (DESIGN.md §5): build for sm_90, run the CUDA
# tests, compute-sanitizer memcheck + racecheck on a small case, the GPU
# benchmark, then the rest of the test suite. Written for a single H200 with
# its own python3/torch/nvcc and no network.
#
#   benchmarks/gpu_check.sh [OUT_DIR]      (default: $OUT, else ./gpu_check_out)
#
# Every stage logs to OUT_DIR/<stage>.log; a failing stage does not stop the
# later ones; OUT_DIR/summary.txt lists each stage's status and the script exits
# non-zero if any stage failed. The whole run stays inside GPU_CHECK_BUDGET_S
# seconds (default 470): a stage gets at most its own cap and what is left of
# the budget, and is skipped (and counted as failed) when too little is left.
#
# Environment: PYTHON (default python3), CUDA_HOME (default: from nvcc on PATH,
# else /usr/local/cuda), LORA_EXT_CUDA_ARCHS (default 9.0), MAX_JOBS (16),
# GPU_CHECK_BUDGET_S (470), GPU_CHECK_SKIP_BUILD=1 to reuse an existing build.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$ROOT/gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
FAILED=0

# The toolkit root: $CUDA_HOME, else the one holding the nvcc on PATH (which
# may be a symlink or a wrapper script that execs the real one), else /usr/local/cuda.
find_cuda_home() {
  local nvcc candidates=() root
  nvcc="$(command -v nvcc || true)"
  if [[ -n "$nvcc" ]]; then
    candidates+=("$(dirname "$(dirname "$(readlink -f "$nvcc")")")")
    root="$(grep -oE '/[^ "]*/bin/nvcc' "$nvcc" 2>/dev/null | head -n 1 || true)"
    [[ -n "$root" ]] && candidates+=("$(dirname "$(dirname "$root")")")
  fi
  candidates+=(/usr/local/cuda /opt/cuda)
  for root in "${candidates[@]}"; do
    if [[ -x "$root/bin/nvcc" && -f "$root/include/cuda_runtime.h" ]]; then
      echo "$root"
      return 0
    fi
  done
  echo /usr/local/cuda
}
CUDA_HOME="${CUDA_HOME:-$(find_cuda_home)}"
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
export LORA_EXT_CUDA_ARCHS="${LORA_EXT_CUDA_ARCHS:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
export NVCC_THREADS="${NVCC_THREADS:-4}"
export LORA_EXT_FORCE_CUDA=1
export PYTHONUNBUFFERED=1
# The checkout itself is importable even when the in-place build fallback was used.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

SANITIZER="$(command -v compute-sanitizer || true)"
[[ -z "$SANITIZER" && -x "$CUDA_HOME/bin/compute-sanitizer" ]] && SANITIZER="$CUDA_HOME/bin/compute-sanitizer"

log() { echo "[gpu_check $(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$SUMMARY"; }

# run_stage NAME CAP_SECONDS CMD...: runs CMD with its output in NAME.log,
# under a timeout of min(CAP, budget left - 5 s).
run_stage() {
  local name="$1" cap="$2"
  shift 2
  local left=$((BUDGET - SECONDS - 5))
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    log "SKIP  $name (only ${left}s of the ${BUDGET}s budget left)"
    FAILED=1
    return 1
  fi
  log "START $name (limit ${limit}s) -> $name.log"
  local start=$SECONDS rc=0
  # bash -c so that CMD may be one of the (exported) functions below.
  timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" >"$OUT_DIR/$name.log" 2>&1 || rc=$?
  local took=$((SECONDS - start))
  if ((rc == 0)); then
    log "PASS  $name (${took}s)"
  else
    [[ $rc -eq 124 || $rc -eq 137 ]] && log "FAIL  $name: timed out after ${took}s" || log "FAIL  $name: exit $rc (${took}s)"
    tail -n 25 "$OUT_DIR/$name.log" | sed 's/^/        /' | tee -a "$SUMMARY"
    FAILED=1
  fi
  return $rc
}

environment() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)"
  nvidia-smi || true
  nvcc --version || true
  echo "compute-sanitizer: ${SANITIZER:-not found}"
  "$PYTHON" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for mod in ("peft", "transformers", "pytest", "ninja"):
    try:
        print(mod, __import__(mod).__version__)
    except Exception as exc:  # noqa: BLE001
        print(mod, "unavailable:", exc)
EOF
}

build() {
  if [[ "${GPU_CHECK_SKIP_BUILD:-0}" == 1 ]]; then
    echo "GPU_CHECK_SKIP_BUILD=1: reusing the existing build"
  else
    # -Xptxas -v: the register/spill report of every kernel lands in build.log.
    export LORA_EXT_PTXAS_VERBOSE=1
    # --no-deps: offline box; the editable install must not try to fetch anything.
    "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e . ||
      {
        echo "pip install -e failed; building in place instead"
        "$PYTHON" setup.py build_ext --inplace
      } || return 1
  fi
  "$PYTHON" -c "import json, lora_ext; info = lora_ext.build_info(); print(json.dumps(info, indent=1)); assert info['cuda'], 'no CUDA kernels in the build'"
  if grep -E "bytes spill (stores|loads)" "$OUT_DIR/build.log" | grep -vq " 0 bytes spill"; then
    echo "WARNING: ptxas reports register spills (see above)"
  fi
}

# A few calls of every op on odd shapes for compute-sanitizer (without the
# caching allocator, so out-of-bounds accesses hit real allocation ends).
write_sanitize_case() {
  cat >"$OUT_DIR/sanitize_case.py" <<'EOF'
import sys

import torch
import lora_ext

ops = torch.ops.lora_ext
dev = "cuda"
names = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16, "fp64": torch.float64}
for dtype in [names[n] for n in (sys.argv[1] if len(sys.argv) > 1 else "bf16").split(",")]:
    for (m, k, n, r) in ((37, 129, 67, 5), (5, 64, 72, 1), (300, 96, 40, 8)):
        x = torch.randn(m, k, device=dev, dtype=dtype)
        w = torch.randn(n, k, device=dev, dtype=dtype) / k**0.5
        a = torch.randn(r, k, device=dev, dtype=dtype) / k**0.5
        b = torch.randn(n, r, device=dev, dtype=dtype)
        bias = torch.randn(n, device=dev, dtype=dtype)
        g = torch.randn(m, n, device=dev, dtype=dtype)
        seed = torch.tensor(17, device=dev)
        for strategy in (1, 2):
            for p, s in ((0.0, None), (0.3, seed)):
                ops.lora_linear(x, w, bias, a, b, 1.5, p, s, strategy)
                ops.lora_linear_backward(g, x, w, a, b, 1.5, p, s, strategy, [True] * 5)
        ops.lora_linear(x[:, 1:], w[:, 1:], None, a[:, 1:], b, 1.5, 0.0, None, 1)  # offset, unaligned views
        ops.lora_linear_backward(g[:1].expand(m, n), x, w, a, b, 1.5, 0.0, None, 1, [True] * 5)
        ops.merged_weight(w, a, b, 0.5)
        ops.merge_(w, a, b, 0.5)
        ops.merge_(w.t().contiguous().t(), a, b, 0.5)
        ops.merge_(w[:, 1:], a[:, 1:], b, 0.5)
        ops.dropout_mask(seed, m, k, 0.3)
torch.cuda.synchronize()
print("sanitize case done")
EOF
}

# sanitize TOOL DTYPES [only-lora_ext-kernels]
sanitize() {
  local tool="$1" dtypes="$2" only_ours="${3:-0}"
  [[ -n "$SANITIZER" ]] || { echo "compute-sanitizer not found"; return 1; }
  local filter=()
  # racecheck over cuBLAS's shared-memory-heavy kernels takes minutes; our own
  # kernels (namespace lora_ext) are the ones to check for shared-memory races.
  if [[ "$only_ours" == 1 ]] && "$SANITIZER" --help 2>&1 | grep -q -- "--kernel-name"; then
    filter=(--kernel-name kns=lora_ext)
  fi
  "$SANITIZER" --version | head -n 3
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 3 --print-limit 50 ${filter[@]+"${filter[@]}"} \
    "$PYTHON" "$OUT_DIR/sanitize_case.py" "$dtypes"
}

export OUT_DIR PYTHON SANITIZER
export -f environment build write_sanitize_case sanitize

log "lora_ext GPU check in $ROOT -> $OUT_DIR (budget ${BUDGET}s, archs $LORA_EXT_CUDA_ARCHS, CUDA_HOME $CUDA_HOME)"
run_stage environment 60 environment
if run_stage build 240 build; then
  run_stage test_cuda 150 "$PYTHON" -m pytest tests/test_cuda.py -q -rs --junitxml="$OUT_DIR/test_cuda.xml"
  write_sanitize_case
  run_stage memcheck 120 sanitize memcheck bf16,fp32,fp16
  run_stage racecheck 90 sanitize racecheck bf16,fp32,fp64 1
  run_stage bench 150 "$PYTHON" benchmarks/bench_gpu.py --out "$OUT_DIR"
  run_stage test_suite 120 "$PYTHON" -m pytest tests -q -x -m "not slow" --ignore=tests/test_cuda.py \
    --junitxml="$OUT_DIR/test_suite.xml"
else
  log "build failed: skipping the tests, sanitizers and benchmark"
fi

if ((FAILED)); then
  log "RESULT: FAILED (see the logs in $OUT_DIR)"
  exit 1
fi
log "RESULT: all stages passed in ${SECONDS}s"
