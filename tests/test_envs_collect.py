"""Round trip: collect (tiny SAC budget) -> D4RL HDF5 and Minari -> load_dataset."""

import h5py
import numpy as np
import pytest
import torch

from envs import collect, load_dataset
from envs.collect import LEVELS


@pytest.mark.slow
def test_collect_all_levels_roundtrip(tmp_path):
    out = collect("Hopper-v5", LEVELS, n_transitions=300, train_steps=300, seed=0, out_dir=tmp_path,
                  snapshots=3, eval_episodes=1)
    assert set(out) == set(LEVELS)
    loaded = {}
    for level, written in out.items():
        a, b = load_dataset(written["hdf5"]), load_dataset(written["minari"])
        loaded[level] = a
        for key in ("observations", "actions", "rewards", "next_observations", "terminals"):
            assert torch.equal(getattr(a, key), getattr(b, key)), (level, key)
        assert a.episode_bounds() == b.episode_bounds()
        assert a.env_id == b.env_id == "Hopper-v5"
        assert (a.ref_min_score, a.ref_max_score) == (b.ref_min_score, b.ref_max_score) == (-20.272305, 3234.3)
        with h5py.File(written["hdf5"]) as f:
            assert f.attrs["behaviour"] == level
    assert len(loaded["random"]) == len(loaded["expert"]) == 300
    assert len(loaded["medium-expert"]) == 600
    assert torch.equal(loaded["medium-expert"].observations[:300], loaded["medium"].observations)
    # medium-replay: SAC's replay buffer up to a snapshot (every 100 steps here), within-episode consistency
    replay = loaded["medium-replay"]
    assert len(replay) in (100, 200)
    inner = np.ones(len(replay), bool)
    inner[[e - 1 for _, e in replay.episode_bounds()]] = False
    np.testing.assert_array_equal(replay.next_observations[:-1][inner[:-1]], replay.observations[1:][inner[:-1]])
    assert float(replay.actions.abs().max()) <= 1.0


def test_collect_random_only_hdf5(tmp_path):
    out = collect("diffrl/PointNav-v0", "random", n_transitions=250, seed=1, out_dir=tmp_path, formats=("hdf5",))
    d = load_dataset(out["random"]["hdf5"])
    assert len(d) == 250 and d.env_id == "diffrl/PointNav-v0" and d.ref_min_score is None
    assert float(d.actions.abs().max()) <= 1.0
    with pytest.raises(ValueError, match="unknown level"):
        collect("Hopper-v5", "novice", out_dir=tmp_path)
