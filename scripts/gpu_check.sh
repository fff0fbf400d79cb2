#!/usr/bin/env bash
# Every agent 300 updates plus a short evaluation on CUDA, in fp32 and bf16, with updates/s, peak GPU memory and
# d3rlpy's TD3+BC beside them (scripts/gpu_check.py); at most 5 minutes. Output: results/gpu/ (or $OUT).
#
# The lent GPU machine's image has torch, h5py, tensorboard and matplotlib but not gymnasium, MuJoCo, Minari,
# stable-baselines3 or d3rlpy: scripts/gpu_wheels.sh downloads them here into .whl/ and the dataset into
# .gpu_data/; carry both (device run: carry [".whl", ".gpu_data"], command: scripts/gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MUJOCO_GL=egl
data=.gpu_data/hopper-medium.hdf5
[ -f "$data" ] || data=../shared/datasets/hopper-medium.hdf5
out=${OUT:-results/gpu}
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
timeout 300 python3 scripts/gpu_check.py --device cuda --dataset "$data" --steps 300 --out "$out" "$@" \
  2>&1 | tee "$out/gpu_check.log"
