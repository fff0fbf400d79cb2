"""Minari datasets written through Minari's own API and loaded by envs; envs' Minari writer; make_env."""

import minari
import numpy as np
import pytest
import torch
from minari.data_collector import EpisodeBuffer

from envs import load_dataset, make_env
from envs.minari_io import write_minari
from envs.toy import make_pointnav_dataset


def _hopper_buffers(n_episodes: int, seed: int) -> list[EpisodeBuffer]:
    rng = np.random.default_rng(seed)
    buffers = []
    for i in range(n_episodes):
        steps = 5 + i
        buffers.append(EpisodeBuffer(
            id=i, observations=rng.standard_normal((steps + 1, 11)).astype(np.float32),
            actions=rng.uniform(-1, 1, (steps, 3)).astype(np.float32), rewards=np.arange(steps, dtype=np.float64),
            terminations=np.array([False] * (steps - 1) + [i % 2 == 0]),
            truncations=np.array([False] * (steps - 1) + [i % 2 == 1])))
    return buffers


def test_load_dataset_created_with_minari_api():
    buffers = _hopper_buffers(3, 0)
    minari.create_dataset_from_buffers("test/hopper/tiny-v0", buffers, env="Hopper-v5", data_format="hdf5",
                                       ref_min_score=-20.272305, ref_max_score=3234.3, algorithm_name="none",
                                       author="tests", author_email="t@example.org", code_permalink="x",
                                       description="tiny", eval_env="Hopper-v5")
    d = load_dataset("test/hopper/tiny-v0")
    assert d.episode_bounds() == [(0, 5), (5, 11), (11, 18)]
    assert d.terminals.nonzero().flatten().tolist() == [4, 17] and d.timeouts.nonzero().flatten().tolist() == [10]
    np.testing.assert_array_equal(d.observations[5:11].numpy(), buffers[1].observations[:-1])
    np.testing.assert_array_equal(d.next_observations[5:11].numpy(), buffers[1].observations[1:])
    np.testing.assert_allclose(d.episode_returns(), [10, 15, 21])
    assert (d.env_id, d.ref_min_score, d.minari_id) == ("Hopper-v5", -20.272305, "test/hopper/tiny-v0")
    env = make_env(d)
    assert env.spec.id == "Hopper-v5"


def test_write_minari_roundtrip_without_env():
    d = make_pointnav_dataset(n_episodes=6, seed=1)
    d.env_id = None  # spaces then come from the data
    write_minari(d, "test/pointnav/roundtrip-v0")
    back = load_dataset("test/pointnav/roundtrip-v0")
    for key in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts"):
        assert torch.equal(getattr(back, key), getattr(d, key)), key
    assert back.episode_bounds() == d.episode_bounds()


def test_write_minari_replaces_a_local_dataset_only_when_asked():
    first, second = make_pointnav_dataset(n_episodes=2, seed=1), make_pointnav_dataset(n_episodes=3, seed=2)
    first.env_id = second.env_id = None
    write_minari(first, "test/pointnav/replaced-v0")
    with pytest.raises(ValueError):
        write_minari(second, "test/pointnav/replaced-v0")
    write_minari(second, "test/pointnav/replaced-v0", replace=True)
    assert torch.equal(load_dataset("test/pointnav/replaced-v0").observations, second.observations)


def test_missing_minari_dataset_offline_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"'mujoco/hopper/medium-v0' is not in local storage.*offline"):
        load_dataset("mujoco/hopper/medium-v0")


def test_make_env_maps_names():
    assert make_env("hopper-medium-v2").spec.id == "Hopper-v5"
    assert make_env("mujoco/walker2d/medium-v0").spec.id == "Walker2d-v5"
    assert make_env("toy:pointnav").spec.id == "diffrl/PointNav-v0"
    with pytest.raises(ValueError, match="cannot make an environment"):
        make_env("nothing-here")
