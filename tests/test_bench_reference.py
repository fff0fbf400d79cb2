"""End-to-end checks of the parity benchmarks (Diffusion-QL, QGPO) at a tiny budget, against fake official checkouts
that have only the interface the adapters use (so no checkout of the official code is needed here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from envs.d4rl import CHECKOUT_DATASETS

ROOT = Path(__file__).resolve().parent.parent
DATASET = CHECKOUT_DATASETS / "hopper-medium-replay.hdf5"
pytestmark = pytest.mark.skipif(not DATASET.exists(), reason="shared datasets not present")

FAKE_MAIN = '''
import argparse
import d4rl  # the runner reads this file's syntax tree and never imports it
import gym

hyperparameters = {
    'hopper-medium-replay-v2': {'lr': 3e-4, 'eta': 1.0, 'max_q_backup': False, 'reward_tune': 'no', 'eval_freq': 50,
                                'num_epochs': 2000, 'gn': 4.0, 'top_k': 2},
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_steps_per_epoch", default=1000, type=int)
    parser.add_argument("--batch_size", default=256, type=int)
    parser.add_argument("--discount", default=0.99, type=float)
    parser.add_argument("--tau", default=0.005, type=float)
    parser.add_argument("--T", default=5, type=int)
    parser.add_argument("--beta_schedule", default='vp', type=str)
'''

FAKE_AGENT = '''
import d4rl  # noqa: F401  (must be answered by the runner's stub: d4rl is not installed)
import torch


class Diffusion_QL:
    """A linear policy regressed on the batch actions, with the official constructor and methods."""

    def __init__(self, state_dim, action_dim, max_action, device, discount, tau, max_q_backup=False, eta=1.0,
                 beta_schedule="linear", n_timesteps=100, ema_decay=0.995, step_start_ema=1000, update_ema_every=5,
                 lr=3e-4, lr_decay=False, lr_maxt=1000, grad_norm=1.0):
        self.policy = torch.nn.Linear(state_dim, action_dim)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=lr)
        self.max_action = max_action

    def train(self, replay_buffer, iterations, batch_size=100, log_writer=None):
        for _ in range(iterations):
            state, action, next_state, reward, not_done = replay_buffer.sample(batch_size)
            loss = (self.policy(state) - action).pow(2).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return {"bc_loss": [float(loss)]}

    def sample_action(self, state):
        with torch.no_grad():
            state = torch.as_tensor(state, dtype=torch.float32).reshape(1, -1)
            return (self.max_action * torch.tanh(self.policy(state))).numpy().flatten()
'''

FAKE_SAMPLER = '''
import torch


class Data_Sampler:
    def __init__(self, data, device, reward_tune="no"):
        self.state = torch.from_numpy(data["observations"]).float()
        self.action = torch.from_numpy(data["actions"]).float()
        self.next_state = torch.from_numpy(data["next_observations"]).float()
        self.reward = torch.from_numpy(data["rewards"]).view(-1, 1).float()
        self.not_done = 1.0 - torch.from_numpy(data["terminals"]).view(-1, 1).float()

    def sample(self, batch_size):
        ind = torch.randint(0, self.state.shape[0], size=(batch_size,))
        return self.state[ind], self.action[ind], self.next_state[ind], self.reward[ind], self.not_done[ind]
'''


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    for name in ("bench_reference", "reference_dql_runner", "reference_qgpo_runner"):
        sys.modules.pop(name, None)
    import bench_reference

    return bench_reference


@pytest.fixture
def fake_official(tmp_path):
    root = tmp_path / "fake-official"
    files = {"main.py": FAKE_MAIN, "agents/__init__.py": "", "agents/ql_diffusion.py": FAKE_AGENT,
             "agents/diffusion.py": "", "agents/model.py": "", "utils/__init__.py": "",
             "utils/data_sampler.py": FAKE_SAMPLER}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_both_implementations_logged_resumed_and_reported(bench, fake_official, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--agent", "diffusion_ql", "--official", str(fake_official), "--dataset", str(DATASET), "--steps", "20",
              "--eval-every", "10", "--eval-episodes", "1", "--out", str(out)]
    bench.main([*common, "--seeds", "0"])
    text = capsys.readouterr().out
    assert "settings agree" in text
    runs = {r["implementation"]: r for r in read(out / "runs.jsonl")}
    assert sorted(runs) == ["diffrl", "official"]
    for r in runs.values():
        assert r["dataset"] == "hopper-medium-replay" and r["seed"] == 0 and r["steps"] == 20
        assert [p["step"] for p in r["curve"]] == [10, 20] and r["steps_per_sec"] > 0
        assert all(isinstance(p["normalized"], float) for p in r["curve"])
        assert r["transitions"] == runs["diffrl"]["transitions"]  # the same transitions on both sides
        assert r["dataset_sha256"] == bench.file_digest(DATASET)
    assert runs["official"]["stubbed_imports"] == ["d4rl"]  # the fake imports d4rl; it got the stub
    assert runs["official"]["settings"]["gn"] == runs["diffrl"]["settings"]["max_grad_norm"] == 4.0
    assert "hopper-medium-replay" in runs["diffrl"]["preset"]

    bench.main([*common, "--seeds", "0", "1", "--implementations", "official"])  # seed 0 is not run again
    text = capsys.readouterr().out
    assert "already logged: official hopper-medium-replay seed 0" in text
    logged = read(out / "runs.jsonl")
    assert sorted((r["implementation"], r["seed"]) for r in logged) == [("diffrl", 0), ("official", 0),
                                                                        ("official", 1)]

    bench.main(["--report", "--out", str(out)])
    text = capsys.readouterr().out
    assert all(word in text for word in ("official", "diffrl", "final", "last 3 evals", "steps / s"))
    official_row = next(line for line in text.splitlines() if line.split()[2:3] == ["official"])
    assert official_row.split()[3] == "0,1"
    assert (out / "curves.png").stat().st_size > 0


def test_runs_on_a_remade_file_are_not_taken_as_logged(bench, tmp_path):
    """A dataset remade under the same name (a new digest) gets new runs; runs logged before digests count as other."""
    old, new = tmp_path / "old" / "hopper-medium-replay.hdf5", tmp_path / "new" / "hopper-medium-replay.hdf5"
    for path, text in ((old, "first version"), (new, "remade")):
        path.parent.mkdir()
        path.write_text(text)
    args = bench.argparse.Namespace(agent="diffusion_ql", steps=20, eval_every=10, eval_episodes=1)
    logged = {**bench.job_fields("official", old, 0, args), "curve": []}
    assert bench.run_key(logged) == bench.run_key(bench.job_fields("official", old, 0, args))
    assert bench.run_key(logged) != bench.run_key(bench.job_fields("official", new, 0, args))
    before_digests = {k: v for k, v in logged.items() if k != "dataset_sha256"}
    assert bench.run_key(before_digests) != bench.run_key(bench.job_fields("official", old, 0, args))
    assert len(bench.group([logged, {**bench.job_fields("official", new, 0, args), "curve": []}])) == 2


def test_clear_errors(bench, tmp_path):
    (tmp_path / "not-a-checkout").mkdir()
    with pytest.raises(SystemExit, match="does not look like a checkout"):
        bench.main(["--official", str(tmp_path / "not-a-checkout"), "--dataset", str(DATASET), "--out",
                    str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="no runs logged"):
        bench.main(["--report", "--out", str(tmp_path / "empty")])


@pytest.mark.skipif(not os.environ.get("DIFFRL_DQL_OFFICIAL"),
                    reason="set DIFFRL_DQL_OFFICIAL to a checkout of Zhendong-Wang/Diffusion-Policies-for-Offline-RL")
def test_lockstep_with_the_official_code():
    """Same weights, batches and random draws: diffrl's updates follow the official ones to float rounding."""
    cmd = [sys.executable, str(ROOT / "scripts" / "reference_dql_lockstep.py"), "--official",
           os.environ["DIFFRL_DQL_OFFICIAL"], "--dataset", str(DATASET), "--updates", "12", "--ema-start", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = json.loads(proc.stdout)
    assert max(result["max_abs_diff"].values()) < 1e-5 and result["actor_loss_max_abs_diff"] < 1e-5


# ------------------------------------------------------------------------------------------------ QGPO
QGPO_BEHAVIOR = '''
import d4rl
import gym
from torch.utils.data import DataLoader


def train_behavior(args, score_model, data_loader, start_epoch=0):
    n_epochs = 600
    optimizer = torch.optim.Adam(score_model.parameters(), lr=1e-4)
    for epoch in range(start_epoch, n_epochs):
        for _ in range(1000):
            pass


def behavior(args):
    data_loader = DataLoader(dataset, batch_size=4096, shuffle=True)
'''

QGPO_CRITIC = '''
import d4rl
import gym
from torch.utils.data import DataLoader


def train_critic(args, score_model, data_loader, start_epoch=0):
    n_epochs = 100
    for epoch in range(start_epoch, n_epochs):
        for _ in range(10000):
            if (epoch < 50):
                score_model.q[0].update_q0(data)
            score_model.q[0].update_qt(data)


def critic(args):
    data_loader = DataLoader(dataset, batch_size=256, shuffle=True)


if __name__ == "__main__":
    if "antmaze" not in args.env:
        args.M = {m}
    else:
        args.M = 32
'''

QGPO_UTILS = '''
import argparse
import gym


def get_args():
    parser = argparse.ArgumentParser()
    parser.add_argument('--alpha', type=float, default=3.0)
    parser.add_argument('--diffusion_steps', type=int, default=15)
    parser.add_argument('--M', type=int, default=16)
    parser.add_argument('--method', type=str, default="CEP")
    parser.add_argument('--q_alpha', type=float, default=None)
'''

QGPO_README = '''
$ python3 -u train_critic.py --env $TASK --diffusion_steps 15 --seed 0 --alpha 3 --q_alpha 1 --method "CEP"
'''

QGPO_DATASET = '''
import d4rl  # answered by the runner's stub; the runner then replaces qlearning_dataset
import gym
import torch


class D4RL_dataset(torch.utils.data.Dataset):
    def __init__(self, args):
        data = d4rl.qlearning_dataset(gym.make(args.env))
        self.states = torch.from_numpy(data["observations"]).float()
        self.actions = torch.from_numpy(data["actions"]).float()
        self.next_states = torch.from_numpy(data["next_observations"]).float()
        self.rewards = torch.from_numpy(data["rewards"]).view(-1, 1).float()
        self.is_finished = torch.from_numpy(data["terminals"]).view(-1, 1).float()
        self.len = self.states.shape[0]

    def __getitem__(self, i):
        item = {"s": self.states[i], "a": self.actions[i], "r": self.rewards[i], "s_": self.next_states[i],
                "d": self.is_finished[i]}
        if hasattr(self, "fake_actions"):  # set by the runner at the switch
            item.update(fake_a=self.fake_actions[i], fake_a_=self.fake_next_actions[i])
        return item

    def __len__(self):
        return self.len
'''

QGPO_MODEL = '''
import atexit
import json
import os

import torch
from diffusion_SDE import schedule

CALLS = {"loss": 0, "q0": 0, "qt": 0, "support_states": 0, "select": 0, "q0_batch": [], "qt_support": []}
atexit.register(lambda: open(os.environ["FAKE_QGPO_LOG"], "w").write(json.dumps(CALLS)))


class Critic:
    """Counts the official critic-phase calls and checks their batches."""

    def __init__(self):
        self.guidance_scale = 1.0

    def update_q0(self, data):
        CALLS["q0"] += 1
        CALLS["q0_batch"] = list(data["s"].shape)

    def update_qt(self, data):
        CALLS["qt"] += 1
        schedule.marginal_prob_std(torch.rand(3))  # official call without device=: must work on the CPU
        CALLS["qt_support"] = list(data["fake_a"].shape)


class ScoreNet(torch.nn.Module):
    """A linear regressor with the official interface."""

    def __init__(self, input_dim, output_dim, marginal_prob_std, embed_dim=32, args=None):
        super().__init__()
        self.net = torch.nn.Linear(input_dim - output_dim, output_dim)
        self.q = [Critic()]
        self.condition = None
        self.output_dim = output_dim

    def sample(self, states, sample_per_state=16, diffusion_steps=15):
        CALLS["support_states"] += len(states)
        with torch.no_grad():
            a = self.net(torch.as_tensor(states)).unsqueeze(1).expand(-1, sample_per_state, -1)
        return a.numpy()

    def select_actions(self, states, diffusion_steps=15):
        CALLS["select"] += 1
        with torch.no_grad():
            return list(torch.tanh(self.net(torch.as_tensor(states, dtype=torch.float32))).numpy())
'''

QGPO_LOSS = '''
def loss_fn(model, x, marginal_prob_std, eps=1e-3):
    from diffusion_SDE.model import CALLS

    CALLS["loss"] += 1
    return (model.net(model.condition) - x).pow(2).mean()
'''

QGPO_SCHEDULE = '''
import torch


def marginal_prob_std(t, device="cuda"):
    t = torch.tensor(t, device=device)
    return torch.exp(-t), torch.sqrt(1 - torch.exp(-2 * t))
'''


def fake_qgpo_checkout(root: Path, m: int = 16) -> Path:
    files = {"train_behavior.py": QGPO_BEHAVIOR, "train_critic.py": QGPO_CRITIC.replace("{m}", str(m)),
             "utils.py": QGPO_UTILS, "Readme.md": QGPO_README, "dataset/__init__.py": "",
             "dataset/dataset.py": QGPO_DATASET, "diffusion_SDE/__init__.py": "", "diffusion_SDE/model.py": QGPO_MODEL,
             "diffusion_SDE/loss.py": QGPO_LOSS, "diffusion_SDE/schedule.py": QGPO_SCHEDULE,
             "diffusion_SDE/dpm_solver_pytorch.py": ""}
    for name, text in files.items():
        (root / "Offline_RL_2D" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "Offline_RL_2D" / name).write_text(text)
    return root


def test_qgpo_official_settings_and_phase_split_match_diffrl(bench, tmp_path):
    from agents.qgpo import QGPOConfig

    runner = sys.modules["reference_qgpo_runner"]
    official = runner.read_official_settings(fake_qgpo_checkout(tmp_path / "cep"))
    assert official["behavior_steps"] == 600_000 and official["critic_steps"] == 1_000_000
    assert (official["behavior_batch"], official["critic_batch"], official["behavior_lr"]) == (4096, 256, 1e-4)
    assert official["q_fraction"] == 0.5 and official["M"] == {"locomotion": 16, "antmaze": 32}
    assert (official["alpha"], official["q_alpha"], official["diffusion_steps"]) == (3.0, 1.0, 15)  # README q_alpha
    for steps in (10_000, 16, 1_600_000):
        assert runner.phase_split(official, steps) == QGPOConfig(total_steps=steps).phase_steps()
    assert runner.phase_split(official, 10_000) == (3750, 3125)
    reduced = {"behavior_batch": 128, "critic_batch": 32, "data_fraction": 1.0, "data_seed": 0}
    assert bench.settings_differences("qgpo", tmp_path / "cep", DATASET, 10_000, reduced) == []
    changed = bench.settings_differences("qgpo", fake_qgpo_checkout(tmp_path / "cep8", m=8), DATASET, 10_000, reduced)
    assert changed == ["M=8 vs n_support=16"]
    with pytest.raises(SystemExit, match="does not look like a checkout of ChenDRAG/CEP"):
        runner.check_checkout(tmp_path)


def test_reduced_dataset_keeps_whole_episodes_fixed_by_its_seed(bench, tmp_path):
    import h5py
    import numpy as np

    assert bench.reduced_dataset(DATASET, 1.0, 0, tmp_path) == DATASET
    path = bench.reduced_dataset(DATASET, 0.01, 0, tmp_path)
    assert path.name == DATASET.name and bench.task_name(path) == "hopper-medium-replay"
    assert bench.reduced_dataset(DATASET, 0.01, 0, tmp_path / "again").read_bytes() == path.read_bytes()
    other = bench.reduced_dataset(DATASET, 0.01, 1, tmp_path)
    with h5py.File(DATASET) as full, h5py.File(path) as sub, h5py.File(other) as sub1:
        n, rows = len(full["rewards"]), len(sub["rewards"])
        assert 0.01 * n <= rows < 0.01 * n + 1000  # whole episodes until the fraction is reached
        assert not np.array_equal(sub["observations"][()], sub1["observations"][()])
        assert sub.attrs["env_id"] == full.attrs["env_id"] and sub.attrs["subset_fraction"] == 0.01
        ends = np.flatnonzero(sub["terminals"][()] | sub["timeouts"][()])
        assert ends[-1] == rows - 1  # ends on an episode end
        obs, nxt = sub["observations"][()], sub["next_observations"][()]
        inside = np.setdiff1d(np.arange(rows - 1), ends)
        np.testing.assert_array_equal(nxt[inside], obs[inside + 1])  # consecutive rows within each episode
        full_obs = full["observations"][()]
        starts = np.concatenate([[0], ends[:-1] + 1])
        for a, b in zip(starts, ends + 1, strict=True):  # each episode is a contiguous block of the file
            i = int(np.flatnonzero((full_obs == obs[a]).all(1))[0])
            np.testing.assert_array_equal(full_obs[i:i + b - a], obs[a:b])
    with pytest.raises(SystemExit, match="--data-fraction"):
        bench.reduced_dataset(DATASET, 0.0, 0, tmp_path)


def test_qgpo_runner_drives_both_official_phases_and_is_logged_beside_diffrl(bench, tmp_path, monkeypatch, capsys):
    checkout = fake_qgpo_checkout(tmp_path / "cep")
    monkeypatch.setenv("FAKE_QGPO_LOG", str(tmp_path / "calls.json"))
    out = tmp_path / "out"
    bench.main(["--agent", "qgpo", "--official", str(checkout), "--dataset", str(DATASET), "--steps", "16",
                "--eval-every", "8", "--eval-episodes", "1", "--behavior-batch", "8", "--critic-batch", "4",
                "--data-fraction", "0.0003", "--data-dir", str(tmp_path / "data"), "--seeds", "0", "--out", str(out)])
    text = capsys.readouterr().out
    assert "settings agree" in text and "behaviour batch 8, critic batch 4" in text
    runs = {r["implementation"]: r for r in read(out / "runs.jsonl")}
    assert sorted(runs) == ["diffrl", "official"]
    for r in runs.values():
        assert r["agent"] == "qgpo" and r["reduction"]["critic_batch"] == 4
        assert [p["step"] for p in r["curve"]] == [8, 16] and r["steps_per_sec"] > 0
        assert r["transitions"] == runs["diffrl"]["transitions"] < 1000  # a few episodes of the file
    official = runs["official"]
    assert official["stubbed_imports"] == ["d4rl", "gym"]
    assert official["settings"]["phase_steps"] == [6, 5] == list(bench.diffrl_config(
        "qgpo", DATASET, 16)[0].phase_steps())
    assert runs["diffrl"]["settings"]["behavior_batch_size"] == 8
    calls = json.loads((tmp_path / "calls.json").read_text())
    n = official["transitions"]
    assert (calls["loss"], calls["q0"], calls["qt"]) == (6, 5, 10)  # 6 behaviour steps, then 10 critic steps
    assert calls["support_states"] == 2 * n  # every state and every next state, once
    assert calls["q0_batch"] == [4, 11] and calls["qt_support"] == [4, 16, 3]
    assert calls["select"] >= 2  # two evaluations
    bench.main(["--report", "--out", str(out)])
    assert "QGPO, behaviour batch 8" in capsys.readouterr().out
