#!/usr/bin/env bash
# `kernelloop up --demo` on a CUDA machine whose python3 already has torch and triton, with the
# project's other dependencies from .wheels/ when that folder is there (an offline machine).
# Copies the demo's summary, the services' logs and nvidia-smi's view into OUT_DIR.
#
#   bash bench/gpu_demo.sh OUT_DIR [extra `kernelloop up --demo` arguments]
set -euo pipefail
out=${1:?usage: bench/gpu_demo.sh OUT_DIR [args]}; shift
cd "$(dirname "$0")/.."
if [ -d .wheels ]; then
  python3 -m pip install -q --no-index --find-links .wheels -r .wheels/requirements.txt
  python3 -m pip install -q --no-deps --no-build-isolation -e .
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/nvidia-smi.csv" || true
state=$(mktemp -d)
rc=0
( time KERNELLOOP_STATE_DIR="$state" PYTHONUNBUFFERED=1 python3 -m kernelloop up --demo "$@" ) \
  > "$out/demo.log" 2>&1 || rc=$?
cp "$state/demo-summary.json" "$out/" 2>/dev/null || true
cp -r "$state/logs" "$out/logs" 2>/dev/null || true
tail -40 "$out/demo.log"
exit $rc
