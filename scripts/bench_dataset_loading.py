"""Time load_dataset and sequences() on a synthetic D4RL file (default 1M transitions, Hopper-sized)."""

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from envs import load_dataset  # noqa: E402


def write_synthetic(path: Path, n: int, obs_dim: int, act_dim: int, episode_len: int, seed: int = 0) -> None:
    """D4RL-layout file with episodes of ``episode_len`` steps (every 3rd ends by termination, others by timeout)."""
    rng = np.random.default_rng(seed)
    ends = np.zeros(n, bool)
    ends[episode_len - 1::episode_len] = True
    end_idx = np.flatnonzero(ends)
    terminals = np.zeros(n, bool)
    terminals[end_idx[::3]] = True
    with h5py.File(path, "w") as f:
        f["observations"] = rng.standard_normal((n, obs_dim), dtype=np.float32)
        f["next_observations"] = rng.standard_normal((n, obs_dim), dtype=np.float32)
        f["actions"] = rng.uniform(-1, 1, (n, act_dim)).astype(np.float32)
        f["rewards"] = rng.standard_normal(n, dtype=np.float32)
        f["terminals"] = terminals
        f["timeouts"] = ends & ~terminals
        f.attrs["env_id"] = "Hopper-v5"


def timed(label: str, fn):
    start = time.perf_counter()
    out = fn()
    print(f"{label:<38s} {time.perf_counter() - start:7.3f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--transitions", type=int, default=1_000_000)
    parser.add_argument("--obs-dim", type=int, default=11)
    parser.add_argument("--act-dim", type=int, default=3)
    parser.add_argument("--episode-len", type=int, default=250)
    parser.add_argument("--horizon", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.hdf5"
        timed(f"write synthetic file ({args.transitions} rows)", lambda: write_synthetic(
            path, args.transitions, args.obs_dim, args.act_dim, args.episode_len))
        data = timed("load_dataset", lambda: load_dataset(path))
        print(f"  -> {data}")
        timed("returns_to_go(0.99)", lambda: data.returns_to_go(0.99))
        seq = timed(f"sequences(horizon={args.horizon})", lambda: data.sequences(args.horizon))
        print(f"  -> {len(seq)} windows")
        timed("sequence sample x100 (batch 256)", lambda: [seq.sample(256) for _ in range(100)])
        timed("transition sample x100 (batch 256)", lambda: [data.sample(256) for _ in range(100)])


if __name__ == "__main__":
    main()
