#!/usr/bin/env bash
# Lint: ruff (check + format) for Python, clang-format for csrc/ and tests/cpp/.
# Installs the pinned tools into .venv-lint on first use.
#
#   bash scripts/lint.sh          check only (CI)
#   bash scripts/lint.sh --fix    rewrite files in place
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-lint
if [ ! -x "$VENV/bin/ruff" ] || [ ! -x "$VENV/bin/clang-format" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check ruff==0.17.5 clang-format==23.1.3
fi
mapfile -t CXX_FILES < <(git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh' 'tests/cpp/*.cpp')
if [ "${1:-}" = --fix ]; then
  "$VENV/bin/ruff" check --fix .
  "$VENV/bin/ruff" format .
  "$VENV/bin/clang-format" -i "${CXX_FILES[@]}"
  exit 0
fi
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/clang-format" --dry-run -Werror "${CXX_FILES[@]}"
echo "[lint] ruff and clang-format clean (${#CXX_FILES[@]} C++/CUDA files)"
