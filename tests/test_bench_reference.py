"""End-to-end check of the Diffusion-QL parity benchmark at a tiny budget, against a fake official checkout that has
only the interface the adapter uses (so no checkout of the official code is needed here)."""

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
    for name in ("bench_reference", "reference_dql_runner"):
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
