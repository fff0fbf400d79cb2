"""Device and dtype leaks: every agent's train -> evaluate -> save -> load -> act cycle in float64.

Inside ``only_float64()`` any floating tensor that an operator produces in another dtype fails the test, so a
tensor created with the default dtype (or a float32 constant) in an update or sampling path is caught at once.
This is the CPU stand-in for the same leaks on a GPU (a tensor made without ``device=``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from dtype_guard import DtypeLeak, GuardedActor, GuardedAgent, only_float64

from agents import AGENTS
from agents.base import TorchAgent
from agents.policy import load_policy
from diffrl.training import Learner, TrainConfig, Trainer
from envs import evaluate, load_dataset

#: Small sizes for every agent; a field is set only where the agent's config has it.
SMALL = dict(hidden=16, depth=2, time_dim=8, critic_hidden=16, critic_depth=2, energy_hidden=16, energy_depth=2,
             diffusion_steps=3, steps=3, sampling_steps=3, sample_steps=3, support_steps=3, n_support=4,
             n_candidates=4, horizon=8, dims=(8, 16), inverse_dynamics_hidden=16, num_train_steps=3, d_model=16,
             n_layers=1, heads=2, ema_start=1, n_action_steps=2, n_obs_steps=2, warmup_steps=0,
             behavior_steps=3, behavior_warmup_steps=3, total_steps=20, n_blocks=1)
KINDS = sorted(kind for kind in AGENTS if kind != "ddpo")  # DDPO trains on rewards: tests/test_ddpo_device.py


def small_config(kind: str):
    config_cls, _ = AGENTS[kind]
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in SMALL.items() if k in names})


@pytest.fixture(scope="module")
def pointnav():
    return load_dataset("toy:pointnav")


def test_guard_catches_a_default_dtype_tensor():
    x = torch.ones(3, dtype=torch.float64)
    with pytest.raises(DtypeLeak), only_float64():
        x + torch.rand(3)


@pytest.mark.parametrize("kind", KINDS)
def test_float64_train_evaluate_save_load_act(kind, pointnav, tmp_path):
    _, agent_cls = AGENTS[kind]
    torch.manual_seed(0)
    agent = agent_cls.from_dataset(pointnav, small_config(kind), device="cpu", dtype=torch.float64)
    assert agent.dtype == torch.float64
    make_sampler = getattr(agent, "batch_sampler", None)
    data = pointnav.to(dtype=torch.float64)
    sampler = make_sampler(data) if make_sampler is not None else data.sample
    assert sampler(4, torch.Generator().manual_seed(0))["observations"].dtype == torch.float64
    history = Trainer(GuardedAgent(agent), sampler, TrainConfig(steps=6, batch_size=8, log_every=3, progress=False,
                                                                device="cpu")).fit()
    assert all(np.isfinite(v) for record in history for k, v in record.items() if k != "step")

    policy = agent.policy(seed=0)
    assert policy.dtype == torch.float64
    policy.actor = GuardedActor(policy.actor)
    result = evaluate(policy, pointnav, episodes=1, seed=0, max_episode_steps=5)
    assert np.isfinite(result.mean)

    policy.actor = policy.actor.actor
    path = policy.save(tmp_path / "policy.pt")
    loaded = load_policy(path, seed=0)
    assert loaded.dtype == torch.float64
    obs = pointnav.observations[:3].numpy()
    policy.reset(seed=1)
    loaded.reset(seed=1)
    np.testing.assert_array_equal(policy.act(obs), loaded.act(obs))


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_keeps_the_agents_dtype(kind, pointnav):
    _, agent_cls = AGENTS[kind]
    agent = agent_cls.from_dataset(pointnav, small_config(kind), dtype=torch.float64)
    other = agent_cls.from_dataset(pointnav, small_config(kind), dtype=torch.float64)
    other.load_state_dict(agent.state_dict())
    assert other.obs_normalizer.mean.dtype == torch.float64
    for module in other._placed()[0]:
        assert all(p.dtype == torch.float64 for p in module.parameters())


def test_to_moves_ema_copies_targets_and_optimiser_state(pointnav):
    agent = AGENTS["diffusion_bc"][1].from_dataset(pointnav, small_config("diffusion_bc"))
    agent.update(pointnav.sample(8, torch.Generator().manual_seed(0)))  # optimiser state exists now
    agent.to(dtype=torch.float64)
    learner: Learner = agent.learner
    assert all(p.dtype == torch.float64 for p in learner.ema_module.parameters())
    moments = [v for s in learner.optimizer.state.values() for k, v in s.items() if k != "step"]
    assert moments and all(m.dtype == torch.float64 for m in moments)
    assert agent.obs_normalizer.mean.dtype == torch.float64
    metrics = agent.update(pointnav.to(dtype=torch.float64).sample(8, torch.Generator().manual_seed(1)))
    assert metrics["loss"].dtype == torch.float64 and isinstance(metrics["loss"], torch.Tensor)


def test_ema_follows_moved_buffers():
    class WithBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)
            self.register_buffer("stat", torch.zeros(2))

    net = WithBuffer()
    learner = Learner(net, ema_decay=0.5)
    net.to(torch.float64)
    learner.to(dtype=torch.float64)
    net.stat += 3.0
    learner.step(net.lin(torch.ones(1, 2, dtype=torch.float64)).sum())
    torch.testing.assert_close(learner.ema_module.stat, torch.full((2,), 3.0, dtype=torch.float64))


def test_dataset_batches_on_the_datasets_device_and_dtype(pointnav):
    data = pointnav.to("cpu", torch.float64)
    batch = data.sample(5, torch.Generator().manual_seed(0))
    assert {k: v.dtype for k, v in batch.items()} == {k: torch.float64 for k in batch}
    windows = data.sequences(4).sample(5, torch.Generator().manual_seed(0))
    assert windows["observations"].dtype == torch.float64 and windows["mask"].dtype == torch.bool
    assert pointnav.observations.dtype == torch.float32  # moving returns a copy
    same = pointnav.sample(5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(batch["observations"], same["observations"].double())


def test_every_dataset_agent_is_a_torch_agent():
    assert all(issubclass(AGENTS[kind][1], TorchAgent) for kind in AGENTS)


def test_trainer_generator_lives_on_the_configured_device():
    trainer = Trainer(GuardedAgent(None), lambda n, g: {}, TrainConfig(steps=0, device="cpu", progress=False))
    assert trainer.generator.device == torch.device("cpu")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_training_keeps_fp32_master_weights(precision, pointnav):
    agent = AGENTS["diffusion_bc"][1].from_dataset(pointnav, small_config("diffusion_bc"))
    history = Trainer(agent, pointnav.sample, TrainConfig(steps=4, batch_size=8, log_every=2, progress=False,
                                                          device="cpu", precision=precision)).fit()
    assert np.isfinite(history[-1]["train/loss"])
    assert all(p.dtype == torch.float32 for p in agent.actor.parameters())
    assert all(p.dtype == torch.float32 for p in agent.learner.ema_module.parameters())
    assert (agent.learner.scaler is not None) == (precision == "fp16")
    state = agent.state_dict()["learner"]
    assert ("scaler" in state) == (precision == "fp16")
