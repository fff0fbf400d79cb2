"""IDQL (Hansen-Estruch et al. 2023, "IDQL: Implicit Q-Learning as an Actor-Critic Method with Diffusion Policies").

IQL critics (expectile value regression, Kostrikov et al. 2022) are trained independently of the actor, a diffusion
behaviour model is trained by plain denoising, and actions are chosen by importance resampling: N candidates are
drawn from the behaviour model and one is picked with weights given by the critics' implicit policy (expectile
weights |tau - 1(A < 0)| / |A|, or softmax(temperature * A)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from agents.critics import DoubleQCritic, QEnsemble, ValueNetwork, expectile_log_weights, iql_q_loss, iql_value_loss
from agents.offline_rl import (
    OfflineRLAgent,
    actor_settings,
    candidate_actions,
    choose,
    diffusion_actor,
    last_observation,
)
from agents.policy import register_actor
from diffrl.schedules import DiscreteVP
from diffrl.solvers import DDPM
from diffrl.training import Learner

WEIGHTINGS = ("expectile", "softmax")


@dataclass
class IDQLConfig:
    """Defaults: IQL critics (2x256 ReLU, expectile 0.7, tau 0.005, gamma 0.99) and IDQL's LayerNorm residual
    actor on a 5-step VP chain with a cosine-decayed learning rate; at selection ``n_candidates`` actions are
    resampled by ``weighting`` (``greedy`` takes the highest weight instead of drawing). IQL and IDQL scale
    locomotion rewards by 1000 / (max - min episode return): set ``reward_scale`` accordingly."""

    hidden: int = 256
    depth: int = 3
    time_dim: int = 16
    layer_norm: bool = True
    diffusion_steps: int = 5
    beta_min: float = 0.1
    beta_max: float = 10.0
    actor_lr: float = 3e-4
    lr_schedule: str = "cosine"
    total_steps: int = 1_000_000
    ema_decay: float = 0.999
    critic_hidden: int = 256
    critic_depth: int = 2
    critic_lr: float = 3e-4
    value_lr: float = 3e-4
    expectile: float = 0.7
    gamma: float = 0.99
    tau: float = 0.005
    reward_scale: float = 1.0
    n_candidates: int = 32
    weighting: str = "expectile"
    temperature: float = 3.0
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not 0.0 < self.expectile < 1.0:
            raise ValueError(f"expectile must lie in (0, 1), got {self.expectile}")
        if self.n_candidates < 1 or self.diffusion_steps < 1:
            raise ValueError(f"n_candidates and diffusion_steps must be >= 1, got {self.n_candidates}, "
                             f"{self.diffusion_steps}")


@register_actor("idql")
class IDQLActor(nn.Module):
    """Behaviour samples resampled by the IQL critics' implicit-policy weights."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, depth: int = 3, time_dim: int = 16,
                 layer_norm: bool = True, diffusion_steps: int = 5, beta_min: float = 0.1, beta_max: float = 10.0,
                 critic_hidden: int = 256, critic_depth: int = 2, expectile: float = 0.7, n_candidates: int = 32,
                 weighting: str = "expectile", temperature: float = 3.0, greedy: bool = False):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self._config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.obs_dim, self.act_dim, self.steps = obs_dim, act_dim, diffusion_steps
        self.expectile, self.n_candidates, self.weighting = expectile, n_candidates, weighting
        self.temperature, self.greedy = temperature, greedy
        self.model = diffusion_actor(obs_dim, act_dim, DiscreteVP.vp(diffusion_steps, beta_min, beta_max), hidden,
                                     depth, time_dim, layer_norm)
        self.critic = QEnsemble(obs_dim, act_dim, 2, critic_hidden, critic_depth)
        self.value = ValueNetwork(obs_dim, critic_hidden, critic_depth)

    def export_config(self) -> dict[str, Any]:
        return dict(self._config)

    def log_weights(self, obs: Tensor, actions: Tensor) -> Tensor:
        """Unnormalised log selection weights of actions at states (same leading dims)."""
        advantage = self.critic.min(obs, actions) - self.value(obs)
        if self.weighting == "expectile":
            return expectile_log_weights(advantage, self.expectile)
        return self.temperature * advantage

    def forward(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        s = last_observation(obs, self.obs_dim)
        n = self.n_candidates
        states, actions = candidate_actions(self.model, s, n, self.act_dim, DDPM(), self.steps, generator)
        logits = self.log_weights(states, actions).view(s.shape[0], n)
        return choose(actions.view(s.shape[0], n, self.act_dim), logits, self.greedy, generator).unsqueeze(1)


class IDQL(OfflineRLAgent):
    """IDQL agent: each update takes one value, one Q and one behaviour-model step, then the target update."""

    kind = "idql"

    def __init__(self, config: IDQLConfig, obs_dim: int, act_dim: int, obs_normalizer: Any = None,
                 action_normalizer: Any = None):
        super().__init__(config, obs_dim, act_dim, obs_normalizer, action_normalizer)
        c = config
        self.actor = diffusion_actor(obs_dim, act_dim, DiscreteVP.vp(c.diffusion_steps, c.beta_min, c.beta_max),
                                     c.hidden, c.depth, c.time_dim, c.layer_norm)
        self.critic = DoubleQCritic(obs_dim, act_dim, 2, c.critic_hidden, c.critic_depth)
        self.value = ValueNetwork(obs_dim, c.critic_hidden, c.critic_depth)
        self.actor_learner = Learner(self.actor, lr=c.actor_lr, lr_schedule=c.lr_schedule, total_steps=c.total_steps,
                                     ema_decay=c.ema_decay)
        self.critic_learner = Learner(self.critic, lr=c.critic_lr)
        self.value_learner = Learner(self.value, lr=c.value_lr)
        self.modules = {"actor": self.actor, "critic": self.critic, "value": self.value}
        self.learners = {"actor": self.actor_learner, "critic": self.critic_learner, "value": self.value_learner}

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor | float]:
        b = self.prepare(batch)
        c = self.config
        value_loss = iql_value_loss(self.value(b["obs"]), self.critic.target_min(b["obs"], b["actions"]), c.expectile)
        self.value_learner.step(value_loss)
        with torch.no_grad():
            next_v = self.value(b["next_obs"])
        q_values = self.critic(b["obs"], b["actions"])
        critic_loss = iql_q_loss(q_values, b["rewards"], b["terminals"], next_v, c.gamma)
        self.critic_learner.step(critic_loss)
        self.critic.update_target(c.tau)
        bc_loss = self.actor.loss(b["actions"], b["obs"])
        info = self.actor_learner.step(bc_loss)
        return {"value_loss": value_loss.detach(), "critic_loss": critic_loss.detach(), "bc_loss": bc_loss.detach(),
                "q_mean": q_values.mean().detach(), "lr": info["lr"]}

    def build_actor(self, **overrides: Any) -> IDQLActor:
        c = self.config
        defaults = {"n_candidates": c.n_candidates, "weighting": c.weighting, "temperature": c.temperature,
                    "greedy": c.greedy}
        settings = actor_settings(defaults, overrides, self.kind)
        actor = IDQLActor(self.obs_dim, self.act_dim, c.hidden, c.depth, c.time_dim, c.layer_norm, c.diffusion_steps,
                          c.beta_min, c.beta_max, c.critic_hidden, c.critic_depth, c.expectile, **settings)
        actor.model.load_state_dict(self.actor_learner.ema_module.state_dict())
        actor.critic.load_state_dict(self.critic.target.state_dict())
        actor.value.load_state_dict(self.value.state_dict())
        return actor.eval()
