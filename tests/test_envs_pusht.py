"""PushT (envs/pusht.py): the scripted expert, demonstration files, image windows, Gaussian BC with an observation
history and images, and scripts/bench_pusht.py end to end at a tiny budget."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gym_pusht")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

from agents.baselines import GaussianBC, GaussianBCConfig  # noqa: E402
from envs import load_dataset  # noqa: E402
from envs.datasets import OfflineDataset  # noqa: E402
from envs.pusht import (  # noqa: E402
    GOAL_POSE,
    ImageWindows,
    PushTExpert,
    bodies,
    clearance,
    collect_demos,
    evaluate_pusht,
    image_dataset,
    make_env,
    outline,
    pose_error,
    read_demos,
    run_expert_episode,
    write_demos,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_pusht  # noqa: E402


class RandomTargets:
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def reset(self) -> None:
        pass

    def act(self, obs):
        return self.rng.uniform(0, 512, 2)


def test_pose_error_and_clearance():
    assert pose_error(GOAL_POSE) == pytest.approx(0.0)
    assert pose_error(GOAL_POSE + [10.0, 0.0, 0.0]) == pytest.approx(10.0)
    corners = outline(np.array([100.0, 100.0, 0.0]))  # bar x in [40, 160], y in [100, 130]
    d = clearance(np.array([[100.0, 115.0], [100.0, 90.0], [30.0, 115.0]]), corners)
    np.testing.assert_allclose(d, [-15.0, 10.0, 10.0])


def test_expert_reaches_the_goal_where_random_targets_do_not():
    env = make_env("state")
    expert = run_expert_episode(env, PushTExpert(), seed=3)
    random = evaluate_pusht(RandomTargets(), "state", episodes=1, seed=3)
    assert expert["success"] and expert["max_coverage"] > 0.95
    assert random["coverage"][0] < expert["max_coverage"] - 0.2
    assert pose_error(bodies(env)[2]) < 5.0  # the episode ended at the goal
    assert len(expert["actions"]) == len(expert["observations"]) < 300


def test_demos_round_trip_with_images(tmp_path):
    demos = collect_demos(1, seed=4, images=True, successful_only=False)
    n = len(demos.dataset)
    assert demos.images.shape == (n, 3, 96, 96) and demos.images.dtype == np.uint8
    assert demos.stats["tried"] == 1 and demos.stats["kept"] == 1
    np.testing.assert_allclose(demos.agent_pos, demos.dataset.observations[:, :2].numpy())
    path = write_demos(tmp_path / "demos.hdf5", demos)
    back = read_demos(path, images=True)
    torch.testing.assert_close(back.dataset.observations, demos.dataset.observations)
    torch.testing.assert_close(back.dataset.actions, demos.dataset.actions)
    np.testing.assert_array_equal(back.images, demos.images)
    assert back.stats["success_rate"] == demos.stats["success_rate"]
    assert image_dataset(back).obs_dim == 2 and len(image_dataset(back)) == n
    assert load_dataset(path).obs_dim == 5  # an ordinary D4RL-layout file for the rest of the package
    with pytest.raises(ValueError, match="holds no images"):
        read_demos(write_demos(tmp_path / "plain.hdf5", collect_demos(1, seed=4, successful_only=False)), images=True)


def test_image_windows_gather_the_seen_frames_and_the_action_chunk():
    steps = np.arange(10, dtype=np.float32)
    data = OfflineDataset(np.stack([steps, -steps], 1), np.stack([steps, steps], 1), np.zeros(10),
                          timeouts=steps == 5)  # episodes [0, 6) and [6, 10)
    images = np.broadcast_to(np.arange(10, dtype=np.uint8)[:, None, None, None], (10, 3, 4, 4)).copy()
    batch = ImageWindows(data, images, horizon=4, n_obs_steps=2, pad_before=1, pad_after=1).sample(
        64, torch.Generator().manual_seed(0))
    frames, state, actions = batch["observations"]["image"], batch["observations"]["state"], batch["actions"]
    assert frames.shape == (64, 2, 3, 4, 4) and frames.dtype == torch.uint8 and actions.shape == (64, 4, 2)
    torch.testing.assert_close(frames[:, :, 0, 0, 0].float(), state[..., 0])  # same steps
    torch.testing.assert_close(actions[:, :2, 0], state[..., 0])
    first = actions[:, :, 0] < 6
    assert bool((first.all(1) | (~first).all(1)).all())  # no window crosses an episode
    assert bool((state[:, 0, 0] == state[:, 1, 0]).any())  # windows starting before an episode repeat its first step


# 64x64 images: the ResNet's stride of 32 leaves a 2x2 map of a 56x56 crop for the keypoints (1x1 at 32x32)
IMAGES = dict(cameras=("image",), image_shape=(3, 64, 64), crop_shape=(56, 56), num_keypoints=4, encoder_width=8)


def test_gaussian_bc_sees_its_whole_history():
    agent = GaussianBC(GaussianBCConfig(n_obs_steps=2, hidden=16, depth=2), 3, 2)
    assert agent.policy().n_obs_steps == 2
    history = torch.randn(4, 2, 3)
    changed = history.clone()
    changed[:, 0] += 1.0
    assert not torch.allclose(agent.actor(history), agent.actor(changed))
    batch = {"observations": torch.randn(8, 2, 3), "actions": torch.randn(8, 2, 2)}
    assert np.isfinite(float(agent.update(batch)["loss"]))
    with pytest.raises(ValueError, match="n_obs_steps"):
        GaussianBCConfig(n_obs_steps=0)


def test_gaussian_bc_learns_from_images_and_acts_on_dict_observations():
    torch.manual_seed(0)
    agent = GaussianBC(GaussianBCConfig(n_obs_steps=2, hidden=32, depth=2, lr=3e-3, **IMAGES), 1, 2)
    generator = torch.Generator().manual_seed(0)

    def batch(size=16):  # a bright square in a random corner; the action points to it
        corner = torch.randint(0, 2, (size, 2), generator=generator)
        image = torch.zeros(size, 2, 3, 64, 64, dtype=torch.uint8)
        for i, (r, c) in enumerate(corner.tolist()):
            image[i, :, :, 32 * r: 32 * r + 32, 32 * c: 32 * c + 32] = 255
        actions = (2.0 * corner - 1.0)[:, None].expand(size, 2, 2)
        return {"observations": {"image": image, "state": torch.zeros(size, 2, 1)}, "actions": actions}

    losses = [float(agent.update(batch())["loss"]) for _ in range(50)]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0  # the mean follows the square: the images are used
    obs = {k: v[0, 0].numpy() for k, v in batch()["observations"].items()}
    policy = agent.policy(seed=0)
    assert policy.act(obs).shape == (2,)
    state = agent.state_dict()
    other = GaussianBC(GaussianBCConfig(n_obs_steps=2, hidden=32, depth=2, **IMAGES), 1, 2)
    other.load_state_dict(state)
    policy.reset()
    np.testing.assert_allclose(other.policy(seed=0).act(obs), policy.act(obs), rtol=1e-6)


def test_bench_end_to_end_at_a_tiny_budget(tmp_path):
    args = ["--demos", "1", "--steps", "2", "--image-steps", "2", "--batch", "8", "--image-batch", "4",
            "--episodes", "1", "--image-episodes", "1", "--max-steps", "20", "--dims", "8", "16",
            "--encoder-width", "16", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    bench_pusht.main(args + ["--seeds", "0"])
    runs = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["obs"], r["method"]) for r in runs) == [("image", "dp"), ("image", "gbc"), ("state", "dp"),
                                                             ("state", "expert"), ("state", "gbc")]
    assert all(0.0 <= r["mean_coverage"] <= 1.0 and max(r["lengths"]) <= 20 for r in runs)
    table = (tmp_path / "out" / "bench.md").read_text()
    assert "Diffusion Policy" in table and "Gaussian BC" in table and (tmp_path / "out" / "bench.png").stat().st_size
    bench_pusht.main(args + ["--seeds", "0", "--obs", "state"])  # resumes: nothing new to run
    assert len((tmp_path / "out" / "runs.jsonl").read_text().splitlines()) == len(runs)
    with pytest.raises(SystemExit, match="error: --demos"):
        bench_pusht.main(args + ["--steps", "0"])
