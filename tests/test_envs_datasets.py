"""OfflineDataset, SequenceDataset, Normalizer, the D4RL reader/writer and load_dataset errors."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from envs import Normalizer, OfflineDataset, load_dataset
from envs.d4rl import CHECKOUT_DATASETS, d4rl_url, read_d4rl_hdf5, ref_scores, write_d4rl_hdf5

SHARED = CHECKOUT_DATASETS / "hopper-medium.hdf5"


def small_dataset(**kw) -> OfflineDataset:
    """Three episodes: [0, 3) terminal, [3, 5) timeout, [5, 7) cut at the end."""
    obs = np.arange(14, dtype=np.float32).reshape(7, 2)
    terminals = np.array([0, 0, 1, 0, 0, 0, 0], bool)
    timeouts = np.array([0, 0, 0, 0, 1, 0, 0], bool)
    rewards = np.array([1, 2, 3, 4, 5, 6, 7], np.float32)
    return OfflineDataset(obs, obs[:, :1] * 0.1, rewards, obs + 100, terminals, timeouts, name="small", **kw)


def test_episode_structure_returns_and_returns_to_go():
    d = small_dataset()
    assert d.episode_bounds() == [(0, 3), (3, 5), (5, 7)]
    np.testing.assert_allclose(d.episode_returns(), [6, 9, 13])
    np.testing.assert_allclose(d.returns_to_go(), [6, 5, 3, 9, 5, 13, 7])
    g = 0.5
    np.testing.assert_allclose(d.returns_to_go(g), [1 + g * 2 + g * g * 3, 2 + g * 3, 3, 4 + g * 5, 5, 6 + g * 7, 7])
    assert (len(d), d.obs_dim, d.act_dim) == (7, 2, 1)


def test_returns_to_go_matches_loop_on_random_episodes():
    rng = np.random.default_rng(0)
    ends = rng.random(500) < 0.05
    rewards = rng.standard_normal(500).astype(np.float32)
    d = OfflineDataset(rng.standard_normal((500, 3)), rng.standard_normal((500, 2)), rewards, terminals=ends)
    expected = np.zeros(500)
    for s, e in d.episode_bounds():
        acc = 0.0
        for i in range(e - 1, s - 1, -1):
            acc = rewards[i] + 0.99 * acc
            expected[i] = acc
    np.testing.assert_allclose(d.returns_to_go(0.99).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_sample_keys_shapes_and_seeded():
    d = small_dataset()
    a = d.sample(16, torch.Generator().manual_seed(3))
    b = d.sample(16, torch.Generator().manual_seed(3))
    assert set(a) == {"observations", "actions", "rewards", "next_observations", "terminals"}
    assert a["observations"].shape == (16, 2) and a["terminals"].dtype == torch.float32
    assert all(torch.equal(a[k], b[k]) for k in a)
    # rows stay aligned: next_observations = observations + 100 in this dataset
    assert torch.equal(a["next_observations"], a["observations"] + 100)


def test_derived_next_observations_within_episodes():
    d = small_dataset()
    derived = OfflineDataset(d.observations, d.actions, d.rewards, None, d.terminals, d.timeouts)
    obs = d.observations
    assert torch.equal(derived.next_observations[0], obs[1]) and torch.equal(derived.next_observations[3], obs[4])
    assert torch.equal(derived.next_observations[2], obs[2])  # terminal: no successor, observation repeated


def test_sequences_padding_mask_and_returns_to_go():
    d = small_dataset()
    seq = d.sequences(horizon=3)
    assert len(seq) == 7  # one window per step with padding
    w = seq[torch.tensor([1])]  # episode 0 from step 1: steps 1, 2, then padding
    assert w["mask"].tolist() == [[True, True, False]]
    assert torch.equal(w["observations"][0, 2], d.observations[2])  # padding repeats the last real step
    assert w["rewards"][0].tolist() == [2, 3, 0]
    assert w["returns_to_go"][0].tolist() == [5, 3, 0]
    assert seq.observations.shape == (7, 3, 2) and seq.mask.shape == (7, 3)
    assert seq.episode_index.tolist() == [0, 0, 0, 1, 1, 2, 2] and seq.start.tolist() == list(range(7))
    nopad = d.sequences(horizon=2, pad=False)
    assert nopad.start.tolist() == [0, 1, 3, 5] and bool(nopad.mask.all())
    strided = d.sequences(horizon=2, stride=2)
    assert strided.start.tolist() == [0, 2, 3, 5]
    batch = seq.sample(5, torch.Generator().manual_seed(0))
    assert set(batch) == set(seq.KEYS) and batch["actions"].shape == (5, 3, 1)


def test_normalizer_roundtrip_numpy_and_torch():
    d = small_dataset()
    norm = d.normalizer("observations")
    z = norm.normalize(d.observations)
    torch.testing.assert_close(z.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(2), atol=1e-5, rtol=0)
    x = np.ones((4, 5, 2), np.float32)  # any leading dims
    out = norm.normalize(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(norm.denormalize(out), x, rtol=1e-6)
    restored = Normalizer.from_state_dict(norm.state_dict())
    assert torch.equal(restored.mean, norm.mean)
    const = Normalizer.fit(np.ones((10, 3)))
    assert bool((const.std == Normalizer.MIN_STD).all())
    ident = Normalizer.identity(3)
    assert torch.equal(ident.normalize(torch.arange(3.0)), torch.arange(3.0))
    assert d.normalizer("rewards").mean.shape == ()


def test_subset_and_normalized_score_known_numbers():
    d = small_dataset(ref_min_score=-20.272305, ref_max_score=3234.3)
    assert len(d.subset(n_episodes=2)) == 5 and d.subset(n_episodes=2).n_episodes == 2
    assert len(d.subset(n_transitions=4)) == 4 and d.subset(n_transitions=4).episode_bounds() == [(0, 3), (3, 4)]
    half = -20.272305 + 0.5 * (3234.3 + 20.272305)
    np.testing.assert_allclose(d.normalized_score([half, 3234.3, -20.272305]), [50.0, 100.0, 0.0])
    assert ref_scores("hopper-medium-v2") == (-20.272305, 3234.3)
    assert ref_scores("HalfCheetah-v5") == (-280.178953, 12135.0)
    with pytest.raises(ValueError, match="no reference scores"):
        small_dataset().normalized_score(1.0)


def _copy_rows(src: Path, dst: Path, n: int, drop: tuple[str, ...] = ()) -> None:
    with h5py.File(src) as f, h5py.File(dst, "w") as g:
        for key in f:
            if key not in drop:
                g.create_dataset(key, data=f[key][:n])
        g.attrs.update(f.attrs)


@pytest.mark.skipif(not SHARED.exists(), reason="shared datasets not present")
def test_read_slice_of_shared_file(tmp_path):
    path = tmp_path / "hopper-slice.hdf5"
    _copy_rows(SHARED, path, 3000)
    d = load_dataset(path)
    assert (len(d), d.obs_dim, d.act_dim, d.env_id) == (3000, 11, 3, "Hopper-v5")
    assert (d.ref_min_score, d.ref_max_score) == (-20.272305, 3234.3)
    with h5py.File(SHARED) as f:
        np.testing.assert_array_equal(d.observations.numpy(), f["observations"][:3000])
        n_ends = int((f["terminals"][:3000] | f["timeouts"][:3000]).sum())
    assert d.n_episodes == n_ends + (0 if d.terminals[-1] or d.timeouts[-1] else 1)
    # next_observations derived within episodes equal the stored ones except at episode ends
    path2 = tmp_path / "no-next.hdf5"
    _copy_rows(SHARED, path2, 3000, drop=("next_observations",))
    derived = load_dataset(path2)
    inner = np.ones(3000, bool)
    inner[np.array([e - 1 for _, e in d.episode_bounds()])] = False
    np.testing.assert_array_equal(derived.next_observations.numpy()[inner], d.next_observations.numpy()[inner])


def test_write_read_roundtrip_with_extra_groups(tmp_path):
    d = small_dataset(ref_min_score=0.0, ref_max_score=10.0, env_id="Hopper-v5")
    path = write_d4rl_hdf5(tmp_path / "x.hdf5", d)
    with h5py.File(path, "a") as f:  # D4RL files carry extra groups that the reader ignores
        f.create_group("infos").create_dataset("qpos", data=np.zeros((7, 3)))
        f.create_group("metadata").attrs["policy"] = "sac"
    back = read_d4rl_hdf5(path)
    for key in ("observations", "actions", "rewards", "next_observations", "terminals"):
        assert torch.equal(getattr(back, key), getattr(d, key)), key
    assert back.episode_bounds() == d.episode_bounds()
    assert (back.env_id, back.ref_min_score, back.ref_max_score) == ("Hopper-v5", 0.0, 10.0)


def test_d4rl_name_lookup_in_dataset_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    write_d4rl_hdf5(tmp_path / "hopper_medium-v2.hdf5", small_dataset())  # D4RL's own file name
    d = load_dataset("hopper-medium-v2")
    assert d.name == "hopper-medium-v2" and d.env_id == "Hopper-v5" and d.ref_max_score == 3234.3


# ------------------------------------------------------------------------------------------- bad input
def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.hdf5"):
        load_dataset(tmp_path / "nope.hdf5")


def test_not_d4rl_layout_lists_missing_keys(tmp_path):
    path = tmp_path / "bad.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"] = np.zeros((5, 2))
        f["rewards"] = np.zeros(5)
    with pytest.raises(ValueError, match=r"bad.hdf5 is not in D4RL layout: missing keys \['actions', 'terminals'\]"):
        load_dataset(path)


def test_length_mismatch_names_field(tmp_path):
    path = tmp_path / "short.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"] = np.zeros((5, 2))
        f["actions"] = np.zeros((4, 1))
        f["rewards"] = np.zeros(5)
        f["terminals"] = np.zeros(5, bool)
    with pytest.raises(ValueError, match=r"short.hdf5: length mismatch, field 'actions' has 4 rows"):
        load_dataset(path)


def test_nan_values_reported_with_field_and_count(tmp_path):
    d = small_dataset()
    path = write_d4rl_hdf5(tmp_path / "nan.hdf5", d)
    with h5py.File(path, "a") as f:
        r = f["rewards"][:]
        r[[1, 4]] = [np.nan, np.inf]
        f["rewards"][:] = r
    with pytest.raises(ValueError, match=r"nan.hdf5: field 'rewards' contains 2 non-finite"):
        load_dataset(path)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="Did you mean: hopper-medium-v2"):
        load_dataset("hoper-medium-v2")
    with pytest.raises(ValueError, match="toy:pointnav"):
        load_dataset("toy:pointnv")


def test_missing_d4rl_file_gives_download_url(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    url = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/walker2d_medium_replay-v2.hdf5"
    assert d4rl_url("walker2d-medium-replay-v2") == url
    with pytest.raises(FileNotFoundError, match=url):
        load_dataset("walker2d-medium-replay-v2")


def test_fingerprint_follows_the_data_not_the_file(tmp_path):
    from envs.toy import make_pointnav_dataset

    data = make_pointnav_dataset(n_episodes=5, seed=0)
    a = read_d4rl_hdf5(write_d4rl_hdf5(tmp_path / "a.hdf5", data))
    b = read_d4rl_hdf5(write_d4rl_hdf5(tmp_path / "elsewhere" / "b.hdf5", data, compression="gzip"))
    assert a.fingerprint() == b.fingerprint() == data.fingerprint()
    data.rewards[3] += 1.0
    assert data.fingerprint() != a.fingerprint()
