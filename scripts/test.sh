#!/usr/bin/env bash
# Set up from nothing and run every test: the README's test command (CI runs it too).
#
#   bash scripts/test.sh [pytest args]
#
# 1. lint       : ruff check + ruff format --check (Python), clang-format (csrc/).
# 2. .venv      : CUDA build of torch, lora_ext compiled in place (editable) with every
#                 CUDA source (nvcc must succeed even without a GPU; CUDA tests then
#                 skip), full pytest suite.
# 3. .venv-cpu  : CPU-only torch (a laptop user's path), lora_ext built from a separate
#                 copy of the tree (build/cpu-src), so its library never replaces the
#                 CUDA venv's: op tests, then the C++ tests through CMake/ctest.
# 4. .venv again: the build tests, to show the CUDA venv still loads its own CUDA build.
# Extra arguments go to the first pytest run (e.g. -k merge). LORA_EXT_TEST_SEED sets
# the base seed of every random input (default 0).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export MAX_JOBS=${MAX_JOBS:-2}
export LORA_EXT_REQUIRE_EXTENSION=1  # the compiled path must load; the fallback is tested explicitly
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

run_pytest() {  # pytest's exit code 5 means it collected nothing: a broken suite, not a pass
  local rc=0
  "$@" || rc=$?
  if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; return 1; fi
  return "$rc"
}

bash scripts/lint.sh

bash scripts/setup_env.sh .venv cuda
LORA_EXT_EXPECT_CUDA=1 run_pytest .venv/bin/python -m pytest -q "$@"

# The CPU-only build gets its own copy of the sources (tar keeps mtimes, so ninja
# rebuilds only what changed); its editable install and library live in that copy.
CPU_SRC=build/cpu-src
mkdir -p "$CPU_SRC"
rm -rf "$CPU_SRC/csrc" "$CPU_SRC/lora_ext" "$CPU_SRC/tests" "$CPU_SRC/benchmarks" "$CPU_SRC/scripts"
tar --exclude=./build --exclude='./.venv*' --exclude=./.git --exclude='*.so' --exclude=__pycache__ \
  --exclude=./bench_out -cf - . | tar -xf - -C "$CPU_SRC"
(cd "$CPU_SRC" && bash scripts/setup_env.sh "$ROOT/.venv-cpu" cpu)
(cd "$CPU_SRC" && run_pytest "$ROOT/.venv-cpu/bin/python" -m pytest -q -p no:cacheprovider tests/test_ops.py \
  tests/test_merge.py tests/test_errors.py tests/test_dispatcher.py tests/test_build.py)
mkdir -p build
(
  export PATH="$ROOT/.venv-cpu/bin:$PATH"  # cmake/ctest from the CPU venv, against its torch
  cmake -S . -B build/cmake-cpu -DPython3_EXECUTABLE="$ROOT/.venv-cpu/bin/python" > build/cmake-cpu.log 2>&1 ||
    { cat build/cmake-cpu.log; exit 1; }
  cmake --build build/cmake-cpu -j "$MAX_JOBS" 2>&1 | tail -3
  ctest --test-dir build/cmake-cpu --output-on-failure
)

LORA_EXT_EXPECT_CUDA=1 run_pytest .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_build.py
