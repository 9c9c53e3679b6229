#!/usr/bin/env bash
# Set up from nothing and run every test: the README's test command (CI runs it too).
#
#   bash scripts/test.sh
#
# 1. .venv     : CUDA build of torch, lora_ext compiled with every CUDA source (nvcc must
#                succeed even without a GPU; CUDA tests then skip), full pytest suite.
# 2. .venv-cpu : CPU-only torch, CPU-only build (a laptop user's path): op tests and the
#                C++ tests through CMake/ctest.
# Extra arguments go to the first pytest run (e.g. -k merge).
set -euo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS=${MAX_JOBS:-2}
export LORA_EXT_REQUIRE_EXTENSION=1  # the compiled path must load; the fallback is tested explicitly
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

run_pytest() {  # pytest's exit code 5 means it collected nothing: a broken suite, not a pass
  local rc=0
  "$@" || rc=$?
  if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; return 1; fi
  return "$rc"
}

bash scripts/setup_env.sh .venv cuda
run_pytest .venv/bin/python -m pytest -q "$@"

bash scripts/setup_env.sh .venv-cpu cpu
run_pytest .venv-cpu/bin/python -m pytest -q tests/test_ops.py tests/test_merge.py tests/test_errors.py tests/test_dispatcher.py
mkdir -p build
export PATH="$PWD/.venv-cpu/bin:$PATH"  # cmake/ctest from the CPU venv, against its torch
cmake -S . -B build/cmake-cpu -DPython3_EXECUTABLE="$PWD/.venv-cpu/bin/python" > build/cmake-cpu.log 2>&1 || { cat build/cmake-cpu.log; exit 1; }
cmake --build build/cmake-cpu -j "$MAX_JOBS" 2>&1 | tail -3
ctest --test-dir build/cmake-cpu --output-on-failure
