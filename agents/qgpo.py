"""QGPO (Lu et al. 2023, "Contrastive Energy Prediction for Exact Energy-Guided Diffusion Sampling in Offline
Reinforcement Learning").

The optimal policy pi(a|s) ~ mu(a|s) exp(beta Q(s, a)) is sampled by guiding a behaviour diffusion model mu with
the gradient of a time-dependent energy model f(x_t, t, s), trained by contrastive energy prediction (CEP): over
K behaviour samples a_1..a_K of one state, softmax_k f(x_t^k, t, s) is fitted to softmax_k beta Q(s, a_k), which
makes f the exact intermediate energy log E[exp(beta Q(s, a_0)) | x_t]. Q is learned in-support: the next-state
value is a softmax-weighted mean of Q over K behaviour samples at s'.

Here the K support actions are drawn at the batch's next states each update and serve both the Q target and the
CEP labels (the paper pre-computes them once for every dataset state; drawing them on the fly keeps memory flat and
lets training start before the behaviour model has converged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from agents.critics import MLP, DoubleQCritic, q_regression_loss, td_target
from agents.offline_rl import OfflineRLAgent, actor_settings, candidate_actions, diffusion_actor, last_observation
from agents.policy import register_actor
from diffrl.guidance import GradientGuidance
from diffrl.model import DiffusionModel
from diffrl.nets import TimeMLP
from diffrl.schedules import VPSDE, expand_like
from diffrl.solvers import DPMSolverPP
from diffrl.training import Learner


@dataclass
class QGPOConfig:
    """Defaults follow the paper's D4RL locomotion setup: VP-SDE behaviour model, K = 16 support actions, beta = 3,
    15-step DPM-Solver sampling. ``behavior_warmup_steps`` updates train the behaviour model alone before the critic
    and energy model start (the paper trains them one after the other)."""

    hidden: int = 256
    depth: int = 3
    time_dim: int = 16
    beta_min: float = 0.1
    beta_max: float = 20.0
    behavior_lr: float = 1e-4
    critic_hidden: int = 256
    critic_depth: int = 2
    critic_lr: float = 3e-4
    energy_hidden: int = 256
    energy_depth: int = 3
    energy_lr: float = 3e-4
    n_support: int = 16
    support_steps: int = 15
    q_alpha: float = 1.0
    beta: float = 3.0
    gamma: float = 0.99
    tau: float = 0.005
    behavior_warmup_steps: int = 0
    reward_scale: float = 1.0
    guidance_scale: float = 1.0
    sample_steps: int = 15

    def __post_init__(self) -> None:
        if self.n_support < 2:
            raise ValueError(f"contrastive energy prediction needs n_support >= 2, got {self.n_support}")
        if self.support_steps < 1 or self.sample_steps < 1:
            raise ValueError(f"support_steps and sample_steps must be >= 1, got {self.support_steps}, "
                             f"{self.sample_steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")


class EnergyNetwork(nn.Module):
    """Time-dependent energy f(x_t, t, s) -> scalar; inputs may carry extra leading dims (e.g. (B, K, ...))."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, depth: int = 3, time_dim: int = 16):
        super().__init__()
        self.time = TimeMLP(time_dim)
        self.net = MLP(act_dim + time_dim + obs_dim, 1, hidden, depth, activation="silu")

    def forward(self, x_t: Tensor, t: Tensor, obs: Tensor) -> Tensor:
        lead = x_t.shape[:-1]
        t_feat = self.time(t.expand(lead).reshape(-1)).view(*lead, -1)
        return self.net(torch.cat([x_t, t_feat, obs], dim=-1)).squeeze(-1)


def behavior_model(obs_dim: int, act_dim: int, hidden: int, depth: int, time_dim: int, beta_min: float,
                   beta_max: float) -> DiffusionModel:
    return diffusion_actor(obs_dim, act_dim, VPSDE(beta_min, beta_max), hidden, depth, time_dim)


@register_actor("qgpo")
class QGPOActor(nn.Module):
    """Energy-guided DPM-Solver++ sampling: the behaviour score shifted by ``guidance_scale`` * grad f."""

    #: Guided sampling differentiates the energy model, so the Policy must not run it under inference_mode.
    needs_grad = True

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, depth: int = 3, time_dim: int = 16,
                 beta_min: float = 0.1, beta_max: float = 20.0, energy_hidden: int = 256, energy_depth: int = 3,
                 guidance_scale: float = 1.0, sample_steps: int = 15):
        super().__init__()
        self._config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.guidance_scale, self.sample_steps = guidance_scale, sample_steps
        self.behavior = behavior_model(obs_dim, act_dim, hidden, depth, time_dim, beta_min, beta_max)
        self.energy = EnergyNetwork(obs_dim, act_dim, energy_hidden, energy_depth, time_dim)

    def export_config(self) -> dict[str, Any]:
        return dict(self._config)

    def forward(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        s = last_observation(obs, self.obs_dim)
        guidance = GradientGuidance(self.energy, self.guidance_scale)
        actions = self.behavior.sample((s.shape[0], self.act_dim), s, solver=DPMSolverPP(), steps=self.sample_steps,
                                       guidance=guidance, generator=generator)
        return actions.unsqueeze(1)


def contrastive_energy_loss(energies: Tensor, q_values: Tensor, beta: float) -> Tensor:
    """CEP: cross-entropy between softmax_k(beta Q_k) (targets) and softmax_k(f_k) over the last dim."""
    targets = torch.softmax(beta * q_values, dim=-1)
    return -(targets * F.log_softmax(energies, dim=-1)).sum(-1).mean()


class QGPO(OfflineRLAgent):
    """QGPO agent: each update trains the behaviour model, then (after the warm-up) the in-support critic and the
    energy model on K support actions drawn at the next states."""

    kind = "qgpo"

    def __init__(self, config: QGPOConfig, obs_dim: int, act_dim: int, obs_normalizer: Any = None,
                 action_normalizer: Any = None):
        super().__init__(config, obs_dim, act_dim, obs_normalizer, action_normalizer)
        c = config
        self.behavior = behavior_model(obs_dim, act_dim, c.hidden, c.depth, c.time_dim, c.beta_min, c.beta_max)
        self.critic = DoubleQCritic(obs_dim, act_dim, 2, c.critic_hidden, c.critic_depth)
        self.energy = EnergyNetwork(obs_dim, act_dim, c.energy_hidden, c.energy_depth, c.time_dim)
        self.behavior_learner = Learner(self.behavior, lr=c.behavior_lr)
        self.critic_learner = Learner(self.critic, lr=c.critic_lr)
        self.energy_learner = Learner(self.energy, lr=c.energy_lr)
        self.modules = {"behavior": self.behavior, "critic": self.critic, "energy": self.energy}
        self.learners = {"behavior": self.behavior_learner, "critic": self.critic_learner,
                         "energy": self.energy_learner}

    def support_actions(self, obs: Tensor) -> Tensor:
        """K behaviour samples per state: (B, obs_dim) -> (B, K, act_dim)."""
        k = self.config.n_support
        _, actions = candidate_actions(self.behavior, obs, k, self.act_dim, DPMSolverPP(), self.config.support_steps)
        return actions.view(obs.shape[0], k, self.act_dim)

    def energy_loss(self, obs: Tensor, support: Tensor, q_support: Tensor) -> Tensor:
        """CEP loss at one random diffusion time per state, shared by its K support actions."""
        schedule = self.behavior.schedule
        t = schedule.sample_t(obs.shape[0], device=obs.device, dtype=obs.dtype)
        x_t = schedule.marginal(support, t, torch.randn_like(support))
        obs_k = obs.unsqueeze(1).expand(-1, support.shape[1], -1)
        energies = self.energy(x_t, expand_like(t, support[..., 0]), obs_k)
        return contrastive_energy_loss(energies, q_support, self.config.beta)

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor | float]:
        b = self.prepare(batch)
        c = self.config
        behavior_loss = self.behavior.loss(b["actions"], b["obs"])
        metrics = {"behavior_loss": behavior_loss.detach()}
        self.behavior_learner.step(behavior_loss)
        if self.behavior_learner.num_steps <= c.behavior_warmup_steps:
            return metrics
        next_obs = b["next_obs"]
        support = self.support_actions(next_obs)
        q_support = self.critic.target_min(next_obs.unsqueeze(1).expand(-1, c.n_support, -1), support)
        next_v = (torch.softmax(c.q_alpha * q_support, dim=1) * q_support).sum(1)
        q_values = self.critic(b["obs"], b["actions"])
        critic_loss = q_regression_loss(q_values, td_target(b["rewards"], b["terminals"], next_v, c.gamma))
        self.critic_learner.step(critic_loss)
        self.critic.update_target(c.tau)
        energy_loss = self.energy_loss(next_obs, support, q_support)
        self.energy_learner.step(energy_loss)
        return {**metrics, "critic_loss": critic_loss.detach(), "energy_loss": energy_loss.detach(),
                "q_mean": q_values.mean().detach()}

    def build_actor(self, **overrides: Any) -> QGPOActor:
        c = self.config
        settings = actor_settings({"guidance_scale": c.guidance_scale, "sample_steps": c.sample_steps}, overrides,
                                  self.kind)
        actor = QGPOActor(self.obs_dim, self.act_dim, c.hidden, c.depth, c.time_dim, c.beta_min, c.beta_max,
                          c.energy_hidden, c.energy_depth, **settings)
        actor.behavior.load_state_dict(self.behavior.state_dict())
        actor.energy.load_state_dict(self.energy.state_dict())
        return actor.eval()
