#!/usr/bin/env bash
# Set up a virtual environment from nothing and build lora_ext into it (editable).
#
#   bash scripts/setup_env.sh [VENV_DIR] [cuda|cpu]
#
# cuda (default): a CUDA build of torch; the CUDA kernels are compiled whenever nvcc
#                 is found (CUDA_HOME, else /usr/local/cuda), even on a machine without a GPU.
# cpu:            a CPU-only build of torch; CPU kernels only.
# TORCH_SPEC overrides the torch requirement (defaults: torch==2.14.1 for cuda,
# torch==2.13.0 for cpu, the builds this project is tested with).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
KIND=${2:-cuda}
PYTHON=${PYTHON:-python3}

case "$KIND" in
  cuda) TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1} ;;
  cpu) TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0} ;;
  *) echo "setup_env.sh: KIND must be cuda or cpu, got $KIND" >&2; exit 2 ;;
esac

log() { echo "[setup_env $(date +%H:%M:%S)] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
log "installing $TORCH_SPEC and the requirements"
"$PY" -m pip install -q "$TORCH_SPEC"
if [ "$KIND" = cpu ]; then
  # the CPU-only install runs the op tests and ctest: no interop packages needed
  "$PY" -m pip install -q ninja pybind11 "setuptools>=64" wheel numpy pytest safetensors cmake "$TORCH_SPEC"
else
  "$PY" -m pip install -q -r requirements-dev.txt "$TORCH_SPEC"
fi

export MAX_JOBS=${MAX_JOBS:-2}
if [ "$KIND" = cpu ]; then
  export LORA_EXT_SKIP_CUDA=1
elif [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ "$KIND" = cuda ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  export LORA_EXT_FORCE_CUDA=1  # a CUDA compile error must fail the build, not fall back silently
fi
log "building lora_ext ($KIND, MAX_JOBS=$MAX_JOBS, CUDA_HOME=${CUDA_HOME:-none})"
"$PY" -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -5
"$PY" - <<'PYEOF'
import lora_ext
info = lora_ext.build_info()
print("lora_ext build:", {k: info[k] for k in ("extension_loaded", "cuda", "cuda_archs", "cuda_version", "torch_version")})
assert info["extension_loaded"], info["load_error"]
PYEOF
log "ready: $VENV"
