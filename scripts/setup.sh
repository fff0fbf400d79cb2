#!/usr/bin/env bash
# Create .venv and install diffrl with the CPU build of torch (never a multi-GB CUDA build).
# Usage: scripts/setup.sh [extras]   e.g. scripts/setup.sh dev,images
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${1:-}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, pinned: the package's own range is then already satisfied and pip resolves nothing bigger.
"$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
if [ -n "$EXTRAS" ]; then
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
else
  "$VENV/bin/python" -m pip install -q -e .
fi
echo "diffrl installed in $VENV"
