#!/usr/bin/env bash
# The prepared device measurement of issue 15 (bench/README.md, `## device`): condiff vs the official stack on one GPU.
#   bash bench/device.sh [--dry] [--budget S] [--sections 1,2,...]     JSON lines on stdout and in $OUT/device.jsonl
# On the device, missing pure-Python packages (diffusers, importlib_metadata) come as wheels in .whl/ (carried).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
dry=0; for a in "$@"; do [ "$a" = "--dry" ] && dry=1; done
if [ "$dry" = 0 ] && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/condiff-site .whl/*.whl
  export PYTHONPATH=/tmp/condiff-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
exec timeout "${DEVICE_TIMEOUT:-475}" "$PY" bench/device.py --out "$OUT" "$@"
