import csv
import dataclasses
import json
import math

import pytest
import torch
from torch import nn
from toy_agent import ToyAgent, sample_batch
from toy_agent import evaluate as toy_evaluate

from diffrl.checkpoint import CheckpointError, load_checkpoint
from diffrl.seeding import seed_everything
from diffrl.training import EMA, Learner, TrainConfig, Trainer


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))


def _loss(net: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
    return ((net(x) - y) ** 2).mean()


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_learner_matches_reference_adamw_with_clipping(max_grad_norm):
    net, ref = _mlp(), _mlp()
    learner = Learner(net, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99), max_grad_norm=max_grad_norm)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99), foreach=False)
    for step in range(10):
        metrics = learner.step(_loss(net, step))
        opt.zero_grad()
        _loss(ref, step).backward()
        norm = nn.utils.clip_grad_norm_(ref.parameters(), max_grad_norm or math.inf)
        opt.step()
        assert metrics["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
        assert metrics["lr"] == 1e-2
    if max_grad_norm is not None:
        assert norm.item() > 2 * max_grad_norm  # clipping was active
    assert _max_diff(net, ref) < 1e-6
    assert _max_diff(net, _mlp()) > 1e-2  # and the parameters did move


def test_lr_schedules():
    p = [nn.Parameter(torch.zeros(1))]
    warm = Learner(p, lr=1.0, warmup_steps=4)
    assert [warm.lr_at(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = Learner(p, lr=2.0, lr_schedule="cosine", warmup_steps=2, total_steps=12)
    assert cos.lr_at(0) == 1.0 and cos.lr_at(2) == 2.0
    assert cos.lr_at(7) == pytest.approx(1.0)  # halfway through the decay
    assert cos.lr_at(12) == pytest.approx(0.0, abs=1e-12)
    lin = Learner(p, lr=1.0, lr_schedule="linear", total_steps=10)
    assert [lin.lr_at(s) for s in (0, 5, 9, 20)] == pytest.approx([1.0, 0.5, 0.1, 0.0])
    # the scheduled rate is what the optimiser actually uses
    net = _mlp()
    learner = Learner(net, lr=1.0, lr_schedule="linear", total_steps=4)
    lrs = [learner.step(_loss(net, s))["lr"] for s in range(3)]
    assert lrs == pytest.approx([1.0, 0.75, 0.5])
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    # restarted every 4 updates: each cycle decays from 1 on its own
    cyc = Learner(p, lr=1.0, lr_schedule="linear", total_steps=4, restart_every=4)
    assert [cyc.lr_at(s) for s in range(9)] == pytest.approx([1.0, 0.75, 0.5, 0.25] * 2 + [1.0])


def test_ema_closed_form():
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema = EMA(net, decay=0.9)
    for value in (2.0, 4.0):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update()
    expected = 0.9 * (0.9 * 1.0 + 0.1 * 2.0) + 0.1 * 4.0
    assert ema.module.weight.item() == pytest.approx(expected)
    assert not ema.module.weight.requires_grad
    ema.copy_to()
    assert net.weight.item() == pytest.approx(expected)


def test_ema_start_and_update_every():
    net = _mlp()
    learner = Learner(net, lr=1e-2, ema_decay=0.5, ema_start=3, ema_update_every=2)
    snapshots = []
    for step in range(6):
        learner.step(_loss(net, step))
        snapshots.append([p.detach().clone() for p in net.parameters()])
        ema = list(learner.ema_module.parameters())
        if step < 3:  # a plain copy before ema_start
            assert all(torch.equal(a, b) for a, b in zip(ema, snapshots[-1], strict=True))
    # updates 4 and 6 average (update 5 is skipped): ema = 0.5 * (0.5 * w3 + 0.5 * w4) + 0.5 * w6
    for i, e in enumerate(learner.ema_module.parameters()):
        expected = 0.25 * snapshots[2][i] + 0.25 * snapshots[3][i] + 0.5 * snapshots[5][i]
        torch.testing.assert_close(e, expected)
    plain = _mlp()
    assert Learner(plain).ema_module is plain


def test_learner_state_dict_resumes_bitwise():
    def make():
        net = _mlp()
        return net, Learner(net, lr=1e-2, max_grad_norm=1.0, lr_schedule="cosine", total_steps=20,
                            warmup_steps=3, ema_decay=0.9)

    net_a, learner_a = make()
    net_b, learner_b = make()
    for s in range(5):
        learner_a.step(_loss(net_a, s))
        learner_b.step(_loss(net_b, s))
    state = {"net": net_b.state_dict(), "learner": learner_b.state_dict()}
    net_c, learner_c = make()
    net_c.load_state_dict(state["net"])
    learner_c.load_state_dict(state["learner"])
    for s in range(5, 10):
        learner_a.step(_loss(net_a, s))
        learner_c.step(_loss(net_c, s))
    assert learner_c.num_steps == 10
    for p, q in zip(list(net_a.parameters()) + list(learner_a.ema_module.parameters()),
                    list(net_c.parameters()) + list(learner_c.ema_module.parameters()), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="keeps no EMA"):
        Learner(_mlp()).load_state_dict(learner_a.state_dict())


def test_learner_rejects_bad_arguments():
    net = _mlp()
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        Learner(net, lr_schedule="step")
    with pytest.raises(ValueError, match="total_steps"):
        Learner(net, lr_schedule="cosine")
    with pytest.raises(ValueError, match="nn.Module"):
        Learner(list(net.parameters()), ema_decay=0.99)
    with pytest.raises(ValueError, match="lr must be positive"):
        Learner(net, lr=0.0)
    with pytest.raises(ValueError, match="restart_every"):
        Learner(net, lr_schedule="linear", total_steps=4, restart_every=0)
    learner = Learner(nn.Linear(1, 1))
    with pytest.raises(RuntimeError, match="does not depend"):
        learner.step(net(torch.zeros(1, 3)).sum())


# ---------------------------------------------------------------- Trainer

def _run(run_dir, steps, seed=0, evaluate=toy_evaluate, resume=False, agent_seed=0, **overrides):
    config = TrainConfig(steps=steps, batch_size=16, seed=seed, log_every=3, eval_every=10, checkpoint_every=10,
                         keep_checkpoints=2, progress=False, run_dir=str(run_dir))
    config = dataclasses.replace(config, **overrides)
    agent = ToyAgent(seed=agent_seed)
    trainer = Trainer(agent, sample_batch, config, evaluate=evaluate)
    return agent, trainer, trainer.fit(resume=resume)


def _same(a: ToyAgent, b: ToyAgent) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.tensors(), b.tensors(), strict=True))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    agent, _, history = _run(run_dir, steps=40)
    return agent, history, run_dir


def test_resume_after_stop_is_bitwise_exact(tmp_path, uninterrupted):
    full_agent, full_history, full_dir = uninterrupted
    _run(tmp_path, steps=20)
    # a fresh process: different initial weights and RNG state, everything must come from the checkpoint
    torch.manual_seed(99)
    resumed, trainer, history = _run(tmp_path, steps=40, agent_seed=7, resume=True)
    assert trainer.step == 40
    assert _same(resumed, full_agent)
    assert history == full_history
    assert (tmp_path / "eval.json").read_text() == (full_dir / "eval.json").read_text()
    assert (tmp_path / "eval.csv").read_text() == (full_dir / "eval.csv").read_text()


def test_resume_after_crash_is_bitwise_exact(tmp_path, uninterrupted):
    full_agent, full_history, _ = uninterrupted

    def crashing_sampler(batch_size, generator):
        crashing_sampler.calls += 1
        if crashing_sampler.calls == 27:
            raise KeyboardInterrupt  # killed between checkpoints: steps 21-26 are lost
        return sample_batch(batch_size, generator)

    crashing_sampler.calls = 0
    config = TrainConfig(steps=40, batch_size=16, log_every=3, eval_every=10, checkpoint_every=10,
                         keep_checkpoints=2, progress=False, run_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        Trainer(ToyAgent(), crashing_sampler, config, evaluate=toy_evaluate).fit()
    assert load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["step"] == 20
    resumed = ToyAgent(seed=3)
    trainer = Trainer(resumed, sample_batch, config, evaluate=toy_evaluate)
    assert trainer.resume(tmp_path) == 20
    assert trainer.fit() == full_history
    assert _same(resumed, full_agent)


def test_resume_without_rng_restore_differs(tmp_path, uninterrupted):
    """Control for the exactness tests: losing the global RNG state after a resume changes the result."""
    full_agent = uninterrupted[0]
    _run(tmp_path, steps=20)
    agent = ToyAgent()
    trainer = Trainer(agent, sample_batch, TrainConfig(steps=40, batch_size=16, log_every=3, eval_every=10,
                                                       progress=False, run_dir=str(tmp_path)), toy_evaluate)
    trainer.resume()
    seed_everything(12345)
    trainer.fit()
    assert not _same(agent, full_agent)


def test_evaluation_does_not_change_training(tmp_path, uninterrupted):
    agent, _, history = _run(tmp_path, steps=40, evaluate=None)
    assert _same(agent, uninterrupted[0])
    assert history == [r for r in uninterrupted[1] if not any(k.startswith("eval/") for k in r)]


def test_run_directory_contents(uninterrupted):
    _, history, run_dir = uninterrupted
    ckpt = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest.pt", "step_0000030.pt", "step_0000040.pt"]
    latest, last = load_checkpoint(ckpt / "latest.pt", expected_kind="toy"), load_checkpoint(ckpt / "step_0000040.pt")
    assert latest["step"] == last["step"] == 40
    assert latest["config"]["steps"] == 40
    rows = list(csv.DictReader((run_dir / "eval.csv").open()))
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40]
    assert [float(r["step_seen"]) for r in rows] == [10, 20, 30, 40]
    evals = json.loads((run_dir / "eval.json").read_text())
    assert [e["mse"] for e in evals] == [float(r["mse"]) for r in rows]
    assert evals[-1]["mse"] < evals[0]["mse"]  # it learns
    assert [r["step"] for r in history if "train/loss" in r] == list(range(3, 41, 3))
    assert any((run_dir / "tb").glob("events.out.tfevents.*"))
    assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.rglob(".latest*"))


class _CountingAgent:
    """update() returns its call count, so logged means are known: (1+...+4)/4 = 2.5, then 6.5, ..."""

    def __init__(self):
        self.calls = 0

    def update(self, batch):
        self.calls += 1
        return {"calls": self.calls, "batch_size": batch["x"].shape[0]}


def test_logged_means_without_run_dir():
    history = Trainer(_CountingAgent(), lambda n, g: {"x": torch.zeros(n)},
                      TrainConfig(steps=10, batch_size=7, log_every=4, progress=False)).fit()
    assert history == [{"step": 4, "train/calls": 2.5, "train/batch_size": 7.0},
                       {"step": 8, "train/calls": 6.5, "train/batch_size": 7.0}]


def test_trainer_errors(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every needs a run_dir"):
        TrainConfig(steps=10, checkpoint_every=5)
    with pytest.raises(ValueError, match="log_every must be >= 1"):
        TrainConfig(log_every=0)
    _run(tmp_path, steps=10, evaluate=None)
    other = _CountingAgent()
    with pytest.raises(CheckpointError, match="contains a 'toy' agent, expected '_CountingAgent'"):
        Trainer(other, sample_batch, TrainConfig(steps=10, run_dir=str(tmp_path))).resume()
    bad_eval = Trainer(ToyAgent(), sample_batch, TrainConfig(steps=2, log_every=1, eval_every=1, progress=False),
                       evaluate=lambda agent, step: {"returns": [1.0, 2.0]})
    with pytest.raises(TypeError, match="dict of numbers"):
        bad_eval.fit()


def test_fit_resume_without_checkpoint_starts_fresh(tmp_path, uninterrupted):
    agent, _, _ = _run(tmp_path, steps=40, resume=True)
    assert _same(agent, uninterrupted[0])


# ---------------------------------------------------------------- non-finite updates


def _state(net: nn.Module, learner: Learner) -> list[torch.Tensor]:
    moments = [v for s in learner.optimizer.state.values() for k, v in sorted(s.items()) if k != "step"]
    return [p.detach().clone() for p in net.parameters()] + [m.clone() for m in moments]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # fused kernel skip / flag read
def test_a_non_finite_update_is_left_out_and_counted(dtype):
    net = _mlp().to(dtype)

    def loss(step):
        g = torch.Generator().manual_seed(step)
        return ((net(torch.randn(8, 3, generator=g, dtype=dtype)) - 1) ** 2).mean()

    learner = Learner(net, lr=1e-2, max_grad_norm=1.0)
    learner.step(loss(0))
    before = _state(net, learner)
    for bad in (float("nan"), float("inf")):
        metrics = learner.step(loss(1) * bad)
        assert not torch.isfinite(metrics["grad_norm"])
    assert all(torch.equal(a, b) for a, b in zip(before, _state(net, learner), strict=True))
    assert learner.nonfinite_updates.item() == 2 and learner.num_steps == 3
    learner.step(loss(2))
    assert not all(torch.equal(a, b) for a, b in zip(before, _state(net, learner), strict=True))
    assert learner.nonfinite_updates.item() == 2
    assert learner.state_dict()["nonfinite_updates"].item() == 2


def test_learner_rejects_non_finite_settings():
    for kwargs in ({"lr": math.inf}, {"lr": math.nan}, {"max_grad_norm": math.inf}, {"weight_decay": math.nan},
                   {"betas": (0.9, math.inf)}):
        with pytest.raises(ValueError, match="must be finite"):
            Learner(_mlp(), **kwargs)
    with pytest.raises(ValueError, match="on_nonfinite must be one of stop, skip"):
        TrainConfig(on_nonfinite="ignore")


def _poisoned(at: set[int]):
    calls = {"n": 0}

    def sample(batch_size, generator):
        calls["n"] += 1
        batch = sample_batch(batch_size, generator)
        return {**batch, "y": batch["y"] * math.nan} if calls["n"] in at else batch

    return sample


def test_stop_mode_raises_at_the_next_log_and_keeps_the_last_good_checkpoint(tmp_path):
    from diffrl.training import NonFiniteError

    config = TrainConfig(steps=40, batch_size=16, log_every=3, checkpoint_every=10, progress=False,
                         run_dir=str(tmp_path))
    trainer = Trainer(ToyAgent(), _poisoned({13}), config)
    with pytest.raises(NonFiniteError, match=r"stopped at step 15: 1 update\(s\) with a non-finite loss.*"
                                             r"last good checkpoint is .*step_0000010.pt"):
        trainer.fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.pt", "step_0000010.pt"]


def test_stop_mode_is_checked_before_a_checkpoint_between_logs(tmp_path):
    from diffrl.training import NonFiniteError

    config = TrainConfig(steps=40, batch_size=16, log_every=100, checkpoint_every=10, progress=False,
                         run_dir=str(tmp_path))
    with pytest.raises(NonFiniteError, match="stopped at step 20"):
        Trainer(ToyAgent(), _poisoned({13}), config).fit()
    assert load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["step"] == 10


def test_skip_mode_logs_the_skipped_updates_and_trains_on(tmp_path):
    config = TrainConfig(steps=12, batch_size=16, log_every=6, checkpoint_every=12, progress=False,
                         run_dir=str(tmp_path), on_nonfinite="skip")
    agent = ToyAgent()
    history = Trainer(agent, _poisoned({2, 3, 9}), config).fit()
    assert [r.get("train/skipped_updates") for r in history] == [2.0, 1.0]
    assert all(torch.isfinite(t).all() for t in agent.tensors())
    assert load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["step"] == 12


def test_fit_resume_uses_the_newest_valid_checkpoint(tmp_path, uninterrupted):
    _run(tmp_path, steps=30)
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "latest.pt").unlink()
    agent, trainer, history = _run(tmp_path, steps=40, resume=True, agent_seed=5)
    assert _same(agent, uninterrupted[0]) and history == uninterrupted[1]
