"""Diffusion-QL (Wang, Hunt & Zhou 2023, "Diffusion Policies as an Expressive Policy Class for Offline Reinforcement
Learning"): a short-chain diffusion actor trained with the behaviour-cloning denoising loss plus a Q-maximisation
term backpropagated through the whole sampling chain, and a clipped double-Q critic whose targets use actions of
the EMA actor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from agents.critics import DoubleQCritic, QEnsemble, frozen, q_regression_loss, td_target
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

SELECTIONS = ("softmax", "max", "none")


@dataclass
class DiffusionQLConfig:
    """Defaults: the paper's D4RL locomotion settings (Wang et al. 2023, appendix; hopper-medium row).

    ``eta`` weighs the normalised Q term; ``max_grad_norm`` is the per-task gradient clip (9 for the medium sets,
    1-4 for some others in the paper). At action selection ``n_candidates`` actions are sampled and one is chosen
    by the target critic: ``softmax`` draws from softmax(Q) (the paper's rule), ``max`` takes the best, ``none``
    samples a single action. After 5,000 steps ``max`` scores far below the other two (the critic is not yet good
    enough to rank candidates); ``softmax`` and ``none`` score alike (results/offline_rl_dql_single_sample).
    """

    hidden: int = 256
    depth: int = 3
    time_dim: int = 16
    diffusion_steps: int = 5
    beta_min: float = 0.1
    beta_max: float = 10.0
    critic_hidden: int = 256
    critic_depth: int = 3
    eta: float = 1.0
    gamma: float = 0.99
    tau: float = 0.005
    lr: float = 3e-4
    critic_lr: float = 3e-4
    lr_schedule: str = "cosine"
    total_steps: int = 1_000_000
    max_grad_norm: float = 9.0
    ema_decay: float = 0.995
    ema_start: int = 1000
    ema_every: int = 5
    reward_scale: float = 1.0
    n_candidates: int = 50
    selection: str = "softmax"

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.diffusion_steps < 1 or self.n_candidates < 1:
            raise ValueError(f"diffusion_steps and n_candidates must be >= 1, got {self.diffusion_steps}, "
                             f"{self.n_candidates}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")


@register_actor("diffusion_ql")
class DiffusionQLActor(nn.Module):
    """Samples ``n_candidates`` actions per state with DDPM over the short chain and picks one by min Q."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, depth: int = 3, time_dim: int = 16,
                 diffusion_steps: int = 5, beta_min: float = 0.1, beta_max: float = 10.0, critic_hidden: int = 256,
                 critic_depth: int = 3, n_candidates: int = 50, selection: str = "softmax"):
        super().__init__()
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        self._config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.steps, self.n_candidates, self.selection = diffusion_steps, n_candidates, selection
        self.model = diffusion_actor(obs_dim, act_dim, DiscreteVP.vp(diffusion_steps, beta_min, beta_max), hidden,
                                     depth, time_dim)
        self.critic = QEnsemble(obs_dim, act_dim, 2, critic_hidden, critic_depth, activation="mish")

    def export_config(self) -> dict[str, Any]:
        return dict(self._config)

    def forward(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        s = last_observation(obs, self.obs_dim)
        n = 1 if self.selection == "none" else self.n_candidates
        states, actions = candidate_actions(self.model, s, n, self.act_dim, DDPM(), self.steps, generator)
        if n == 1:
            return actions.unsqueeze(1)
        logits = self.critic.min(states, actions).view(s.shape[0], n)
        best = choose(actions.view(s.shape[0], n, self.act_dim), logits, self.selection == "max", generator)
        return best.unsqueeze(1)


class DiffusionQL(OfflineRLAgent):
    """Diffusion-QL agent: ``update(batch)`` takes one critic step, one actor step and the target/EMA updates."""

    kind = "diffusion_ql"

    def __init__(self, config: DiffusionQLConfig, obs_dim: int, act_dim: int, obs_normalizer: Any = None,
                 action_normalizer: Any = None):
        super().__init__(config, obs_dim, act_dim, obs_normalizer, action_normalizer)
        c = config
        self.actor = diffusion_actor(obs_dim, act_dim, DiscreteVP.vp(c.diffusion_steps, c.beta_min, c.beta_max),
                                     c.hidden, c.depth, c.time_dim)
        self.critic = DoubleQCritic(obs_dim, act_dim, 2, c.critic_hidden, c.critic_depth, activation="mish")
        schedule = {"lr_schedule": c.lr_schedule, "total_steps": c.total_steps, "max_grad_norm": c.max_grad_norm}
        self.actor_learner = Learner(self.actor, lr=c.lr, ema_decay=c.ema_decay, ema_start=c.ema_start,
                                     ema_update_every=c.ema_every, **schedule)
        self.critic_learner = Learner(self.critic, lr=c.critic_lr, **schedule)
        self.solver = DDPM()
        self.modules = {"actor": self.actor, "critic": self.critic}
        self.learners = {"actor": self.actor_learner, "critic": self.critic_learner}

    def sample_actions(self, obs: Tensor, grad: bool = False, ema: bool = False) -> Tensor:
        """One action per (normalised) state from the online actor, or the EMA actor with ``ema=True``."""
        model = self.actor_learner.ema_module if ema else self.actor
        return model.sample((obs.shape[0], self.act_dim), obs, solver=self.solver, steps=self.config.diffusion_steps,
                            grad=grad)

    def actor_loss(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """BC denoising loss - eta * Q(s, a_pi) / mean |Q'(s, a_pi)|, with a_pi sampled through the chain.

        One ensemble member (chosen at random) is maximised and the other's mean |Q| normalises the scale, as in
        the paper's implementation.
        """
        bc_loss = self.actor.loss(actions, obs)
        new_actions = self.sample_actions(obs, grad=True)
        with frozen(self.critic):
            q = self.critic(obs, new_actions)
        i = int(torch.randint(2, ()))
        q_loss = -q[i].mean() / q[1 - i].abs().mean().detach()
        return bc_loss + self.config.eta * q_loss, {"bc_loss": bc_loss.detach(), "q_loss": q_loss.detach()}

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor | float]:
        b = self.prepare(batch)
        c = self.config
        with torch.no_grad():
            next_q = self.critic.target_min(b["next_obs"], self.sample_actions(b["next_obs"], ema=True))
        q_values = self.critic(b["obs"], b["actions"])
        critic_loss = q_regression_loss(q_values, td_target(b["rewards"], b["terminals"], next_q, c.gamma))
        critic_info = self.critic_learner.step(critic_loss)
        actor_loss, actor_info = self.actor_loss(b["obs"], b["actions"])
        step_info = self.actor_learner.step(actor_loss)
        self.critic.update_target(c.tau)
        return {"critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(), **actor_info,
                "q_mean": q_values.mean().detach(), "critic_grad_norm": critic_info["grad_norm"],
                "actor_grad_norm": step_info["grad_norm"], "lr": step_info["lr"]}

    def build_actor(self, **overrides: Any) -> DiffusionQLActor:
        c = self.config
        settings = actor_settings({"n_candidates": c.n_candidates, "selection": c.selection}, overrides, self.kind)
        actor = DiffusionQLActor(self.obs_dim, self.act_dim, c.hidden, c.depth, c.time_dim, c.diffusion_steps,
                                 c.beta_min, c.beta_max, c.critic_hidden, c.critic_depth, **settings)
        actor.model.load_state_dict(self.actor_learner.ema_module.state_dict())
        actor.critic.load_state_dict(self.critic.target.state_dict())
        return actor.eval()
