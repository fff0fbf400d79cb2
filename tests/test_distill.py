"""Few-step students: closed-form checks of progressive, consistency and reflow pieces, and the CLI round trip."""

import math

import pytest
import torch

from diffrl.distillation import DistillConfig, ddim_step, halving, progressive_target, reflow_pairs
from diffrl.model import DiffusionModel
from diffrl.predictions import ConsistencyPrediction
from diffrl.schedules import VESDE, VPSDE, LinearFlow
from diffrl.solvers import ConsistencySampler, Euler
from tests.diffusion_reference import exact_model, four_modes

VP = VPSDE(0.1, 20.0)


def test_progressive_target_is_two_teacher_ddim_steps():
    teacher = exact_model(four_modes(), VP)
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    t, mid, s = (torch.full((64,), v, dtype=torch.float64) for v in (0.8, 0.5, 0.2))
    target = progressive_target(teacher, x_t, t, mid, s)
    # two DDIM steps written out: x_s = alpha_s x0 + sigma_s eps
    a, sg = VP.alpha, VP.sigma
    x0, eps = teacher.x0_eps(x_t, t)
    z_mid = a(mid)[:, None] * x0 + sg(mid)[:, None] * eps
    x0, eps = teacher.x0_eps(z_mid, mid)
    z_s = a(s)[:, None] * x0 + sg(s)[:, None] * eps
    # one DDIM step t -> s with the target as x0 lands on z_s
    eps_student = (x_t - a(t)[:, None] * target) / sg(t)[:, None]
    assert torch.allclose(a(s)[:, None] * target + sg(s)[:, None] * eps_student, z_s, atol=1e-10)
    # to the data (s = 0) the target is the teacher's x0 from the midpoint
    zero = torch.zeros(64, dtype=torch.float64)
    assert torch.allclose(progressive_target(teacher, x_t, t, mid, zero), teacher.x0_eps(z_mid, mid)[0], atol=1e-10)


def test_halving_keeps_every_other_point_and_the_data():
    assert halving(9) == [0, 2, 4, 6, 8]
    assert halving(6) == [0, 2, 4, 5]


@pytest.mark.parametrize("schedule", [VESDE(), VP, LinearFlow()])
def test_consistency_parametrisation_is_identity_at_the_boundary(schedule):
    x = torch.randn(16, 3, dtype=torch.float64)
    out = torch.randn(16, 3, dtype=torch.float64) * 100
    t0 = torch.zeros(16, dtype=torch.float64)
    x0, _ = ConsistencyPrediction().to_x0_eps(out, x, t0, schedule)
    assert torch.equal(x0, x)
    x0, _ = ConsistencyPrediction().to_x0_eps(out, x, t0 + 0.5, schedule)
    assert not torch.allclose(x0, x)


class PerfectConsistency(torch.nn.Module):
    """The exact consistency function of 1-D N(mu, c^2) data, output in the consistency parametrisation."""

    def __init__(self, schedule, mu: float, c: float):
        super().__init__()
        self.schedule, self.mu, self.c = schedule, mu, c

    def forward(self, x_t, t, cond=None):
        a, s = self.schedule.alpha(t)[:, None], self.schedule.sigma(t)[:, None]
        level = s / a  # PF-ODE map of x/alpha to the data end: mu + (x/a - mu) c / sqrt(c^2 + level^2)
        f = self.mu + (x_t / a - self.mu) * self.c / (self.c**2 + level**2).sqrt()
        return ConsistencyPrediction().from_x0_eps(f, None, x_t, t, self.schedule)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_multistep_consistency_sampling_with_a_perfect_function_is_exact(steps):
    mu, c, n = 0.7, 0.4, 200_000
    model = DiffusionModel(PerfectConsistency(VP, mu, c), VP, "consistency")
    gen = torch.Generator().manual_seed(steps)
    t_max = torch.tensor(VP.t_max, dtype=torch.float64)
    a, s = float(VP.alpha(t_max)), float(VP.sigma(t_max))
    x_T = a * mu + math.sqrt(a * a * c * c + s * s) * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    out = ConsistencySampler().sample(model, x_T, steps=steps, generator=gen)
    tol = 4 / math.sqrt(n)
    assert abs(float(out.mean()) - mu) < tol * c * 2 and abs(float(out.std()) - c) < tol * c * 2


def test_reflow_pairs_are_teacher_ode_solutions():
    teacher = exact_model(four_modes(), LinearFlow(), "velocity")
    noise = torch.randn(50, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cond = torch.zeros(50, 0, dtype=torch.float64)  # unconditional: the exact denoiser ignores it
    pairs = reflow_pairs(teacher, noise, cond, Euler(), steps=30, chunk=16)
    assert torch.allclose(pairs, Euler().sample(teacher, noise, cond, steps=30), atol=1e-12)


def test_consistency_distillation_step_to_the_data_is_the_teacher_x0():
    teacher = exact_model(four_modes(), VP)
    x = torch.randn(8, 2, dtype=torch.float64)
    t = torch.full((8,), 0.3, dtype=torch.float64)
    assert torch.allclose(ddim_step(teacher, x, t, torch.zeros_like(t)), teacher.x0_eps(x, t)[0], atol=1e-12)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown distillation method"):
        DistillConfig(method="bogus")
    with pytest.raises(ValueError, match="invalid distillation settings"):
        DistillConfig(steps=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        DistillConfig(max_grad_norm=0.0)


def test_progressive_rounds_anneal_the_learning_rate_and_clip_gradients():
    # official configs: linear decay to 0 over each round's updates, starting again every round; grad norm <= 1
    from diffrl.distillation import make_distiller
    from diffrl.nets.mlp import ResidualMLP

    torch.manual_seed(0)
    teacher = DiffusionModel(ResidualMLP(2, cond_dim=1, hidden=16, depth=2), VPSDE(0.1, 20.0), "eps")
    data = {"x0": torch.randn(64, 2), "cond": torch.randn(64, 1)}
    distiller = make_distiller(teacher, DistillConfig(steps=2, iterations=4, teacher_steps=8, lr=1e-3), data)
    sample = distiller.batch_sampler()
    lrs = [float(distiller.update(sample(16))["lr"]) for _ in range(distiller.total_iterations)]
    assert lrs == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4] * 2)
    assert distiller.learner.max_grad_norm == 1.0
    plain = make_distiller(teacher, DistillConfig(steps=2, iterations=4, teacher_steps=8, lr=1e-3, anneal_lr=False,
                                                  max_grad_norm=None), data)
    assert [plain.learner.lr_at(k) for k in range(8)] == [1e-3] * 8 and plain.learner.max_grad_norm is None


AGENT_SETTINGS = {  # tiny networks: each agent kind trains and distils in seconds
    "diffusion_bc": ["hidden=32", "ema_start=0"],
    "diffusion_policy": ["dims=[8,16]", "time_dim=8", "horizon=8", "n_action_steps=4", "steps=4", "warmup_steps=0"],
    "diffusion_ql": ["hidden=16", "critic_hidden=16", "n_candidates=3", "ema_start=0"],
}

TEACHER_STEPS = {"diffusion_ql": "5"}  # progressive grids divide a discrete chain's steps (Diffusion-QL: 5)


def train_teacher(kind: str, run_dir) -> None:
    from diffrl.cli import main

    main(["train", kind, "--dataset", "toy:pointnav", "--steps", "20", "--batch-size", "32", "--eval-episodes", "1",
          "--run-dir", str(run_dir), *AGENT_SETTINGS[kind]])


@pytest.mark.parametrize("kind", list(AGENT_SETTINGS))
def test_distill_cli_round_trip(kind, tmp_path, monkeypatch):
    from agents.policy import load_policy
    from diffrl.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    teacher = tmp_path / "teacher"
    train_teacher(kind, teacher)
    teacher_policy = load_policy(teacher / "policy.pt", seed=0)
    for method, steps in (("progressive", 1), ("consistency", 2)):
        out = tmp_path / method
        main(["distill", str(teacher), "--method", method, "--steps", str(steps), "--iterations", "3",
              "--teacher-steps", TEACHER_STEPS.get(kind, "4"), "--batch-size", "16", "--eval-episodes", "1",
              "--run-dir", str(out)])
        for name in ("config.json", "policy.pt", "final_eval.json", "tb", "checkpoints"):
            assert (out / name).exists(), name
        policy = load_policy(out / "policy.pt", seed=0)
        assert type(policy.actor) is type(teacher_policy.actor) and policy.actor.steps == steps
        assert type(policy.actor.solver).__name__ == ("GridDDIM" if method == "progressive" else "ConsistencySampler")
        obs = torch.zeros(policy.obs_dim).numpy()
        assert policy.act(obs).shape == teacher_policy.act(obs).shape == (policy.act_dim,)
        module = torch.jit.load(str(policy.export_torchscript(tmp_path / f"{method}.ts")))
        chunk = module(torch.zeros(1, policy.n_obs_steps, policy.obs_dim))
        assert chunk.shape == (1, policy.n_action_steps, policy.act_dim) and torch.isfinite(chunk).all()
    if kind == "diffusion_bc":
        with pytest.raises(SystemExit, match="LinearFlow"):
            main(["distill", str(teacher), "--method", "reflow", "--run-dir", str(tmp_path / "rf")])
        assert not (tmp_path / "rf").exists()


@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_interrupted_distillation_resumes_exactly(method, tmp_path, monkeypatch):
    import diffrl
    from diffrl import distillation
    from diffrl.checkpoint import load_checkpoint
    from diffrl.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    teacher = tmp_path / "teacher"
    train_teacher("diffusion_bc", teacher)
    # progressive: 2 rounds (4 -> 2 -> 1 calls) of 10 updates; consistency: 20 updates; checkpoints every 4
    settings = {"iterations": 10 if method == "progressive" else 20, "teacher_steps": 4, "batch_size": 16,
                "eval_episodes": 0, "device": "cpu", "progress": False}
    diffrl.distill(teacher, method, 1, out_dir=tmp_path / "whole", **settings)

    cls = distillation.ProgressiveDistiller if method == "progressive" else distillation.ConsistencyDistiller
    update = cls.update

    def interrupted(self, batch):  # stops in the second round, after the checkpoint of update 12
        if self.learner.num_steps == 13:
            raise RuntimeError("interrupted")
        return update(self, batch)

    monkeypatch.setattr(cls, "update", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        diffrl.distill(teacher, method, 1, out_dir=tmp_path / "parts", **settings)
    monkeypatch.setattr(cls, "update", update)
    assert not (tmp_path / "parts" / "policy.pt").exists()
    main(["distill", "--resume", str(tmp_path / "parts")])

    whole, parts = (load_checkpoint(tmp_path / name / "policy.pt")["actor_state"] for name in ("whole", "parts"))
    assert whole.keys() == parts.keys()
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    (teacher / "policy.pt").write_bytes((teacher / "policy.pt").read_bytes() + b"\0")
    with pytest.raises(SystemExit, match="no longer the one"):
        main(["distill", "--resume", str(tmp_path / "parts")])


def test_distill_cli_refuses_a_missing_teacher_and_mixed_resume(tmp_path):
    from diffrl.cli import main

    with pytest.raises(SystemExit, match="needs the teacher RUN"):
        main(["distill"])
    with pytest.raises(SystemExit, match="give no teacher RUN"):
        main(["distill", "--resume", str(tmp_path), "--run-dir", str(tmp_path / "other")])
