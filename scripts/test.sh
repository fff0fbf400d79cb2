#!/usr/bin/env bash
# Set up .venv with the development extras and run the test suite (one torch thread, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev,images,diffusers,pusht
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 SDL_VIDEODRIVER=dummy
.venv/bin/python -m pytest "$@"
