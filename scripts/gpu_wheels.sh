#!/usr/bin/env bash
# Download, here, the wheels scripts/gpu_check.sh needs on the GPU machine (Python 3.12, x86-64) into .whl/, and
# copy the dataset it trains on into .gpu_data/ (both ignored by git; carry them with the device run).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || printf '/.whl/\n/.gpu_data/\n' >> .git/info/exclude
mkdir -p .whl .gpu_data
cp ../shared/datasets/hopper-medium.hdf5 .gpu_data/
# gymnasium 1.0.0: the version d3rlpy 2.8.1 pins (diffrl works on gymnasium >= 1.0).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  gymnasium==1.0.0 farama-notifications==0.0.4 mujoco==3.3.0 glfw==2.11.0 pyopengl==3.1.10 absl-py etils \
  minari==0.5.4 stable-baselines3==2.7.0 cloudpickle d3rlpy==2.8.1 structlog colorama \
  dataclasses-json marshmallow typing-inspect mypy-extensions
du -sh .whl .gpu_data
