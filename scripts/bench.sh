#!/usr/bin/env bash
# Set up from nothing and run the benchmark suite (the README's main command).
#
#   bash scripts/bench.sh [--quick] [--device cpu|cuda] [...]   (options of python -m benchmarks.run)
#
# Writes the terminal table, CSV, markdown report and plots under bench_out/.
set -euo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS=${MAX_JOBS:-2} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
bash scripts/setup_env.sh .venv cuda
.venv/bin/python -m benchmarks.run "$@"
