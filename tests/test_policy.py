"""Policy: shapes, seeding, the action queue (per row), action chunks, bad input, checkpoint round trips and the
TorchScript export (stateless forward and the stateful reset / act module)."""

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from agents.diffusion_actor import DiffusionActor
from agents.policy import Policy, load_policy
from diffrl.checkpoint import CheckpointError, save_checkpoint

OBS, ACT = 3, 2


def actor(n_obs_steps=1, horizon=1, solver="ddpm", net="mlp", **kw):
    net_kwargs = {"mlp": {"hidden": 32, "depth": 2}, "unet1d": {"dims": (8, 16), "time_dim": 8}}[net]
    torch.manual_seed(0)
    return DiffusionActor(OBS, ACT, n_obs_steps=n_obs_steps, horizon=horizon, action_start=n_obs_steps - 1,
                          net=net, net_kwargs=net_kwargs, solver=solver, steps=4, **kw)


def policy(seed=0, **kw):
    settings = {k: kw.pop(k) for k in ("n_obs_steps", "n_action_steps") if k in kw}
    norm = SimpleNamespace(mean=torch.tensor([1.0, -2.0, 0.5]), std=torch.tensor([2.0, 1.0, 0.5]))
    act_norm = SimpleNamespace(mean=torch.tensor([0.5, -0.5]), std=torch.tensor([2.0, 0.1]))
    return Policy(actor(n_obs_steps=settings.get("n_obs_steps", 1), **kw), norm, act_norm, seed=seed, **settings)


def test_single_and_batched_shapes_and_bounds():
    p = policy()
    a = p.act(np.zeros(OBS))
    assert a.shape == (ACT,) and a.dtype == np.float32
    b = p.act(np.zeros((5, OBS)))
    assert b.shape == (5, ACT)
    # clip_x0 = 1 keeps normalised actions in [-1, 1]: raw actions lie in mean +- std
    assert np.all(np.abs(b - [0.5, -0.5]) <= np.array([2.0, 0.1]) + 1e-5)
    assert p.act([0.0, 1, 2]).shape == (ACT,)  # lists and integer arrays are accepted


def test_same_seed_same_actions_and_reset_reseeds():
    p, q = policy(seed=7), policy(seed=7)
    obs = np.random.default_rng(0).normal(size=(6, OBS))
    a = [p.act(o) for o in obs]
    assert np.array_equal(a, [q.act(o) for o in obs])
    p.reset()
    assert np.array_equal(a, [p.act(o) for o in obs])
    assert not np.allclose(a, [policy(seed=8).act(o) for o in obs])
    assert not np.allclose(a[0], a[1])  # stochastic sampler: fresh noise each call


def test_queue_plans_only_every_n_action_steps_and_history_repeats_first_obs():
    p = policy(n_obs_steps=2, n_action_steps=3, horizon=6, net="unet1d")
    calls = []
    forward = p.actor.forward

    def spy(obs, generator=None):
        calls.append(obs.clone())
        return forward(obs, generator)

    p.actor.forward = spy
    obs = np.arange(7 * OBS, dtype=np.float32).reshape(7, OBS)
    for o in obs:
        p.act(o)
    assert len(calls) == 3  # steps 0, 3, 6
    normalised = (torch.from_numpy(obs) - torch.tensor([1.0, -2.0, 0.5])) / torch.tensor([2.0, 1.0, 0.5])
    assert torch.allclose(calls[0][0], normalised[[0, 0]])  # first observation repeated
    assert torch.allclose(calls[1][0], normalised[[2, 3]])
    assert torch.allclose(calls[2][0], normalised[[5, 6]])
    p.reset()
    p.act(obs[0])
    assert len(calls) == 4  # reset clears the queue


def test_batched_queue_rejects_batch_change_without_reset():
    p = policy(n_obs_steps=2, n_action_steps=2, horizon=4, net="unet1d")
    p.act(np.zeros((3, OBS)))
    with pytest.raises(ValueError, match="batch size changed"):
        p.act(np.zeros((2, OBS)))
    p.reset()
    assert p.act(np.zeros((2, OBS))).shape == (2, ACT)


@pytest.mark.parametrize("bad, error, match", [
    (np.zeros(4), ValueError, r"shape \(3,\) or \(n, 3\)"),
    (np.zeros((2, 2, 3)), ValueError, r"shape \(3,\) or \(n, 3\)"),
    (np.array(["a", "b", "c"]), TypeError, "numeric"),
    (np.array([0.0, np.nan, 1.0]), ValueError, "NaN"),
])
def test_bad_observations_raise_clear_errors(bad, error, match):
    with pytest.raises(error, match=match):
        policy().act(bad)


def test_observations_are_checked_after_the_cast_and_keep_the_queue_clean():
    p = policy()
    with pytest.raises(ValueError, match="beyond the range of the policy's float32"):
        p.act(np.array([1e300, 0.0, 0.0]))  # finite in float64, infinite in float32
    with pytest.raises(ValueError, match="observation batch is empty"):
        p.act(np.zeros((0, OBS)))
    chunked, clean = (policy(seed=4, n_obs_steps=2, n_action_steps=2, horizon=4, net="unet1d") for _ in range(2))
    obs = np.random.default_rng(3).normal(size=(5, OBS))
    for i, o in enumerate(obs):
        if i in (1, 2):  # a refused observation changes neither the history nor the planned actions
            with pytest.raises(ValueError, match="NaN or infinite"):
                chunked.act(np.full(OBS, 1e300))
        assert np.array_equal(chunked.act(o), clean.act(o))


def test_a_non_finite_plan_never_enters_the_queue():
    p = policy(n_obs_steps=2, n_action_steps=2, horizon=4, net="unet1d")
    forward = p.actor.forward
    p.actor.forward = lambda obs, generator=None: forward(obs, generator) * math.nan
    with pytest.raises(RuntimeError, match="NaN or infinite actions"):
        p.act(np.zeros(OBS))
    assert p._queue is None and p._history is None
    p.actor.forward = forward
    assert np.isfinite(p.act(np.zeros(OBS))).all()


def test_save_refuses_non_finite_weights(tmp_path):
    p = policy()
    with torch.no_grad():
        next(p.actor.parameters()).fill_(math.inf)
    with pytest.raises(ValueError, match="not saving the policy .* hold NaN or infinite values"):
        p.save(tmp_path / "policy.pt")
    assert not (tmp_path / "policy.pt").exists()


def test_save_load_round_trip_gives_identical_actions(tmp_path):
    p = policy(seed=3, n_obs_steps=2, n_action_steps=2, horizon=4, net="unet1d")
    path = p.save(tmp_path / "policy.pt")
    q = load_policy(path)
    assert (q.n_obs_steps, q.n_action_steps, q.seed) == (2, 2, 3)
    obs = np.random.default_rng(1).normal(size=(5, OBS))
    p.reset()
    assert np.array_equal([p.act(o) for o in obs], [q.act(o) for o in obs])


def test_load_rejects_corrupt_and_incompatible_files(tmp_path):
    p = policy()
    path = p.save(tmp_path / "policy.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_policy(tmp_path / "cut.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a diffrl checkpoint"):
        load_policy(tmp_path / "text.pt")
    save_checkpoint(tmp_path / "agent.pt", {"x": 1}, kind="diffusion_bc")
    with pytest.raises(CheckpointError, match="expected 'policy'"):
        load_policy(tmp_path / "agent.pt")
    payload = p._payload()
    payload["actor_kind"] = "no_such_actor"
    save_checkpoint(tmp_path / "kind.pt", payload, kind="policy")
    with pytest.raises(CheckpointError, match="no actor registered"):
        load_policy(tmp_path / "kind.pt")
    payload = p._payload()
    payload["actor_config"]["net_kwargs"]["hidden"] = 16
    save_checkpoint(tmp_path / "shape.pt", payload, kind="policy")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_policy(tmp_path / "shape.pt")


SUBPROCESS = """
import json, sys, torch
torch.set_num_threads(1)
module = torch.jit.load(sys.argv[1])
torch.manual_seed(5)
obs = torch.tensor(json.loads(sys.argv[2]), dtype=torch.float32)
out = module(obs)
assert not any(name == 'diffrl' or name.startswith(('diffrl.', 'agents', 'envs')) for name in sys.modules)
print(json.dumps(out.tolist()))
"""


@pytest.mark.parametrize("kw", [dict(), dict(n_obs_steps=2, n_action_steps=3, horizon=6, net="unet1d",
                                             solver="dpm-solver++")])
def test_torchscript_export_runs_without_diffrl_and_matches(tmp_path, kw):
    p = policy(seed=5, **kw)
    path = p.export_torchscript(tmp_path / "policy.ts")
    obs = np.random.default_rng(2).normal(size=(4, p.n_obs_steps, OBS)).astype(np.float32)
    out = subprocess.run([sys.executable, "-c", SUBPROCESS, str(path), json.dumps(obs.tolist())], capture_output=True,
                         text=True, check=True, cwd=tmp_path, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    exported = np.array(json.loads(out.stdout))
    assert exported.shape == (4, p.n_action_steps, ACT)
    # the same seed through the Policy (a stateless batch call per history)
    p.reset()
    with torch.no_grad():
        expected = p._plan((torch.from_numpy(obs) - p._obs_mean) / p._obs_std)
    np.testing.assert_allclose(exported, expected, atol=1e-4)


def test_predict_action_chunk_is_the_stateless_step_under_act():
    kw = dict(n_obs_steps=2, n_action_steps=3, horizon=6, net="unet1d")
    p, q = policy(seed=2, **kw), policy(seed=2, **kw)
    obs = np.random.default_rng(4).normal(size=(3, OBS)).astype(np.float32)
    chunk = q.predict_action_chunk(obs[[0, 0]])  # the history act() starts an episode with
    assert chunk.shape == (3, ACT) and q._history is None and q._queue is None
    np.testing.assert_array_equal(chunk, [p.act(o) for o in obs])
    assert q.predict_action_chunk(np.zeros((5, 2, OBS))).shape == (5, 3, ACT)
    with pytest.raises(ValueError, match=r"observation history must have shape \(2, 3\) or \(n, 2, 3\)"):
        q.predict_action_chunk(np.zeros((3, OBS)))


def test_reset_envs_restarts_only_those_rows():
    kw = dict(n_obs_steps=2, n_action_steps=3, horizon=6, net="unet1d")
    p, clean = policy(seed=1, **kw), policy(seed=1, **kw)
    planned = []
    forward = p.actor.forward

    def spy(obs, generator=None):
        planned.append(obs.shape[0])
        return forward(obs, generator)

    p.actor.forward = spy
    obs = np.random.default_rng(0).normal(size=(4, 2, OBS)).astype(np.float32)
    for o in obs[:2]:
        np.testing.assert_array_equal(p.act(o), clean.act(o))
    p.reset_envs(np.array([True, False]))
    after, expected = p.act(obs[2]), clean.act(obs[2])
    assert planned == [2, 1]  # a plan for the whole batch, then one for the restarted row only
    np.testing.assert_array_equal(after[1], expected[1])  # row 1 goes on with its queued action
    assert not np.array_equal(after[0], expected[0])
    normalised = (torch.from_numpy(obs[2, 0]) - torch.tensor([1.0, -2.0, 0.5])) / torch.tensor([2.0, 1.0, 0.5])
    assert torch.allclose(p._history[0], normalised.expand(2, OBS))  # row 0's history starts again
    with pytest.raises(ValueError, match="mask has shape"):
        p.reset_envs(np.array([True, False, True]))


STATEFUL = """
import json, sys, torch
torch.set_num_threads(1)
module = torch.jit.load(sys.argv[1])
obs = torch.tensor(json.loads(sys.argv[2]), dtype=torch.float32)
settings = {k: getattr(module, k) for k in ("n_obs_steps", "n_action_steps", "obs_dim", "act_dim")}
buffers = {k: getattr(module, k).tolist() for k in ("obs_mean", "obs_std", "act_mean", "act_std", "action_high")}
torch.manual_seed(int(sys.argv[3]))
module.reset()
actions = [module.act(o).tolist() for o in obs]
assert not any(name == 'diffrl' or name.startswith(('diffrl.', 'agents', 'envs')) for name in sys.modules)
print(json.dumps({"settings": settings, "buffers": buffers, "actions": actions}))
"""


@pytest.mark.parametrize("kw", [dict(), dict(n_obs_steps=2, n_action_steps=3, horizon=6, net="unet1d",
                                             solver="dpm-solver++")])
def test_stateful_torchscript_module_reproduces_act_step_by_step(tmp_path, kw):
    p = policy(seed=9, **kw)
    path = p.export_torchscript(tmp_path / "policy.ts")
    obs = np.random.default_rng(5).normal(size=(7, OBS)).astype(np.float32)
    out = subprocess.run([sys.executable, "-c", STATEFUL, str(path), json.dumps(obs.tolist()), "9"],
                         capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""})
    exported = json.loads(out.stdout)
    assert exported["settings"] == {"n_obs_steps": p.n_obs_steps, "n_action_steps": p.n_action_steps,
                                    "obs_dim": OBS, "act_dim": ACT}
    assert exported["buffers"]["obs_std"] == [2.0, 1.0, 0.5] and exported["buffers"]["act_mean"] == [0.5, -0.5]
    assert exported["buffers"]["action_high"] == [math.inf, math.inf]
    p.reset()
    np.testing.assert_allclose(exported["actions"], [p.act(o) for o in obs], atol=1e-5)
