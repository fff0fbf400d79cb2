"""Diffusion-QL (Wang, Hunt & Zhou 2023, "Diffusion Policies as an Expressive Policy Class for Offline Reinforcement
Learning"): a short-chain diffusion actor trained with the behaviour-cloning denoising loss plus a Q-maximisation
term backpropagated through the whole sampling chain, and a clipped double-Q critic whose targets use actions of
the EMA actor.

The reference is the authors' code, Zhendong-Wang/Diffusion-Policies-for-Offline-RL (commit d871f5c; files named
below are in that repository): ``agents/ql_diffusion.py`` (update, EMA, max-Q backup, action selection),
``agents/diffusion.py`` and ``agents/helpers.py`` (the VP chain), ``agents/model.py`` (the actor network) and
``main.py`` (defaults and the per-task table, :data:`PRESETS`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from agents.critics import DoubleQCritic, QEnsemble, frozen, polyak_update, q_regression_loss, td_target
from agents.offline_rl import (
    ACTION_NORMALIZATIONS,
    OBS_NORMALIZATIONS,
    OfflineRLAgent,
    actor_settings,
    candidate_actions,
    choose,
    input_normalizers,
    last_observation,
    repeat_states,
)
from agents.policy import register_actor
from agents.presets import Preset
from diffrl.model import DiffusionModel
from diffrl.nets import ResidualMLP, SinusoidalTimeEmbedding
from diffrl.nets.activations import Mish
from diffrl.nets.checks import check_shape
from diffrl.nets.embeddings import broadcast_time
from diffrl.predictions import make_prediction
from diffrl.schedules import DiscreteVP
from diffrl.solvers import DDPM, make_solver
from diffrl.training import LR_SCHEDULES, Learner

SELECTIONS = ("softmax", "max", "none")
NETS = ("mlp", "residual_mlp")
EVAL_ACTORS = ("online", "ema")
EMA_BEFORE_START = ("initial", "copy")
REWARD_TUNES = ("no", "cql_antmaze", "normalize")

_SOURCE = "Zhendong-Wang/Diffusion-Policies-for-Offline-RL main.py, hyperparameters[{!r}] (commit d871f5c)"


def _row(task: str, lr: float, eta: float, max_q_backup: bool, reward_tune: str, gn: float) -> tuple[str, Preset]:
    name = task.rsplit("-v", 1)[0]
    values = {"lr": lr, "eta": eta, "max_q_backup": max_q_backup, "reward_tune": reward_tune, "max_grad_norm": gn}
    return name, Preset(values, _SOURCE.format(task))


#: Every row of the official per-task table (its lr, eta, max_q_backup, reward_tune and gn columns; the critic's
#: learning rate is 3e-4 on every task there). Its remaining columns are run settings, not agent settings:
#: num_epochs x 1,000 gradient steps is the training budget (2,000 epochs on locomotion, 250 on kitchen-complete,
#: 1,000 elsewhere), eval_freq and top_k drive evaluation and offline model selection.
PRESETS: dict[str, Preset] = dict([
    _row("halfcheetah-medium-v2", 3e-4, 1.0, False, "no", 9.0),
    _row("hopper-medium-v2", 3e-4, 1.0, False, "no", 9.0),
    _row("walker2d-medium-v2", 3e-4, 1.0, False, "no", 1.0),
    _row("halfcheetah-medium-replay-v2", 3e-4, 1.0, False, "no", 2.0),
    _row("hopper-medium-replay-v2", 3e-4, 1.0, False, "no", 4.0),
    _row("walker2d-medium-replay-v2", 3e-4, 1.0, False, "no", 4.0),
    _row("halfcheetah-medium-expert-v2", 3e-4, 1.0, False, "no", 7.0),
    _row("hopper-medium-expert-v2", 3e-4, 1.0, False, "no", 5.0),
    _row("walker2d-medium-expert-v2", 3e-4, 1.0, False, "no", 5.0),
    _row("antmaze-umaze-v0", 3e-4, 0.5, False, "cql_antmaze", 2.0),
    _row("antmaze-umaze-diverse-v0", 3e-4, 2.0, True, "cql_antmaze", 3.0),
    _row("antmaze-medium-play-v0", 1e-3, 2.0, True, "cql_antmaze", 2.0),
    _row("antmaze-medium-diverse-v0", 3e-4, 3.0, True, "cql_antmaze", 1.0),
    _row("antmaze-large-play-v0", 3e-4, 4.5, True, "cql_antmaze", 10.0),
    _row("antmaze-large-diverse-v0", 3e-4, 3.5, True, "cql_antmaze", 7.0),
    _row("pen-human-v1", 3e-5, 0.15, False, "normalize", 7.0),
    _row("pen-cloned-v1", 3e-5, 0.1, False, "normalize", 8.0),
    _row("kitchen-complete-v0", 3e-4, 0.005, False, "no", 9.0),
    _row("kitchen-partial-v0", 3e-4, 0.005, False, "no", 10.0),
    _row("kitchen-mixed-v0", 3e-4, 0.005, False, "no", 10.0),
])


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass
class DiffusionQLConfig:
    """Defaults are those of the official code (``main.py`` argparse defaults and the hopper-medium row of its
    table; the :data:`PRESETS` rows set ``lr``, ``eta``, ``max_q_backup``, ``reward_tune`` and ``max_grad_norm``
    per task).

    Actor: ``net="mlp"`` is the paper's network (``agents/model.py``): ``[x_t, time features, state]`` through
    ``depth`` Mish layers of width ``hidden`` and a linear head; the time features are sinusoidal features
    (``time_dim``) of the integer chain step 0..T-1 through Linear(time_dim, 2 time_dim) - Mish - Linear(2 time_dim,
    time_dim). ``net="residual_mlp"`` is diffrl's :class:`~diffrl.nets.ResidualMLP` (pre-activation residual layers,
    time features of 1000 t), the default before this option existed. The chain is the discretised VP-SDE with
    ``diffusion_steps`` = 5 steps, beta_min 0.1, beta_max 10 (``helpers.vp_beta_schedule``), eps prediction, x0
    clipped to [-1, 1] and DDPM ancestral sampling (``diffusion.py``; its loop also draws a noise at the last step
    and masks it out, diffrl's does not draw it: same samples, a random stream shifted by one draw). With the
    official weights, batches and random draws, 50 updates of this agent follow the official ones to 1e-6
    (scripts/reference_dql_lockstep.py); both networks have the same size (141k parameters on hopper) and train
    at the same speed here (about 15-20 updates/s on one thread), so the official one is the default.

    Critic: two 3x256 Mish Q networks, TD target ``r + gamma (1 - done) min_i Q'_i(s', a')`` with ``a'`` from the
    EMA actor and ``Q'`` the Polyak (``tau``) target networks. With ``max_q_backup`` (AntMaze rows) ``max_q_samples``
    actions are drawn at s' and the target is ``min_i max_j Q'_i(s', a'_j)`` (each critic's max over the samples,
    then the min over the two critics, as in ``ql_diffusion.py``).

    Actor loss: ``bc - eta * Q_i(s, a_pi) / mean |Q_j(s, a_pi)|`` with (i, j) = (1, 2) or (2, 1) at random each
    step and a_pi sampled through the chain with gradients.

    Optimisation: Adam (AdamW without weight decay), ``lr`` for the actor and ``critic_lr`` = 3e-4 for the critic
    (fixed in the official code, whatever the task's lr), both clipped to ``max_grad_norm`` (the table's ``gn``;
    0 or None: no clipping). ``lr_schedule="constant"``: the official ``--lr_decay`` (recommended in its README)
    is a CosineAnnealingLR with T_max = num_epochs (2,000 on locomotion) stepped once per ``train()`` call, i.e.
    once every 50,000 updates, so over the whole 2M-step run the rate falls by under 0.1%; the argparse default
    leaves it off. ``"cosine"`` / ``"linear"`` decay per update over ``total_steps`` (None: the run's steps, filled
    in by ``diffrl train``; the agent refuses a non-constant schedule without one).

    EMA actor: decay ``ema_decay`` every ``ema_every`` updates from update ``ema_start`` on. Before that the
    official EMA copy keeps the actor's *initial* weights (``ema_before_start="initial"``; the TD targets of the
    first 1,000 updates use the untrained actor); ``"copy"`` makes it follow the online actor instead.

    Rewards: ``reward_tune`` as the official data sampler: ``"no"``, ``"cql_antmaze"`` ((r - 0.5) * 4) or
    ``"normalize"`` ((r - mean) / std over the dataset); then times ``reward_scale``. Observations and actions
    are used raw as in the official code (``obs_normalization="none"``, ``action_normalization="none"``, which
    needs actions within [-1, 1], the bounds of every task of the table); ``"zscore"`` / ``"max_abs"`` scale them
    from the dataset.

    Acting: ``n_candidates`` = 50 actions per state and one drawn from softmax(min_i Q'_i) of the target critic
    (``selection="softmax"``, the official ``sample_action``), ``max`` takes the best, ``none`` samples a single
    action (after 5,000 steps ``max`` scores far below the other two, ``softmax`` and ``none`` alike:
    results/offline_rl_dql_single_sample). ``eval_actor="online"`` acts with the online actor's weights, as the
    official evaluation does; ``"ema"`` with the EMA copy's.
    """

    net: str = "mlp"
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
    lr_schedule: str = "constant"
    total_steps: int | None = None
    max_grad_norm: float | None = 9.0
    max_q_backup: bool = False
    max_q_samples: int = 10
    ema_decay: float = 0.995
    ema_start: int = 1000
    ema_every: int = 5
    ema_before_start: str = "initial"
    reward_tune: str = "no"
    reward_scale: float = 1.0
    obs_normalization: str = "none"
    action_normalization: str = "none"
    n_candidates: int = 50
    selection: str = "softmax"
    eval_actor: str = "online"

    def __post_init__(self) -> None:
        for name, choices in (("net", NETS), ("selection", SELECTIONS), ("eval_actor", EVAL_ACTORS),
                              ("ema_before_start", EMA_BEFORE_START), ("reward_tune", REWARD_TUNES),
                              ("obs_normalization", OBS_NORMALIZATIONS),
                              ("action_normalization", ACTION_NORMALIZATIONS), ("lr_schedule", LR_SCHEDULES)):
            _check_choice(name, getattr(self, name), choices)
        if self.diffusion_steps < 1 or self.n_candidates < 1 or self.max_q_samples < 1:
            raise ValueError(f"diffusion_steps, n_candidates and max_q_samples must be >= 1, got "
                             f"{self.diffusion_steps}, {self.n_candidates}, {self.max_q_samples}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.ema_every < 1 or self.ema_start < 0 or not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"need ema_every >= 1, ema_start >= 0 and ema_decay in [0, 1], got {self.ema_every}, "
                             f"{self.ema_start}, {self.ema_decay}")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"total_steps must be None or >= 1, got {self.total_steps}")


class DQLMLP(nn.Module):
    """The Diffusion-QL actor network: ``(x_t (B, x_dim), t (B,), cond (B, cond_dim)) -> eps (B, x_dim)``.

    ``t`` is diffrl's time of a ``num_steps``-step discrete chain (n / T for step n = 1..T); the network sees the
    chain index n - 1 = 0..T-1 through sinusoidal features (``time_dim``, frequencies 10000^(-k / (time_dim/2 - 1)))
    and a Linear-Mish-Linear layer pair, concatenated as ``[x_t, time, cond]`` into ``depth`` Linear-Mish layers
    of width ``hidden`` and a linear head (the layout of the official ``agents/model.py``). Mish is diffrl's
    :func:`~diffrl.nets.activations.mish` (equal to ``nn.Mish`` to float rounding, faster on CPU).
    """

    def __init__(self, x_dim: int, cond_dim: int, hidden: int = 256, depth: int = 3, time_dim: int = 16,
                 num_steps: int = 5):
        super().__init__()
        if x_dim <= 0 or cond_dim <= 0 or hidden <= 0 or depth < 1 or num_steps < 1:
            raise ValueError(f"invalid DQLMLP: x_dim={x_dim}, cond_dim={cond_dim}, hidden={hidden}, depth={depth}, "
                             f"num_steps={num_steps}")
        self.x_dim, self.cond_dim, self.num_steps = x_dim, cond_dim, num_steps
        self.x_shape = (x_dim,)
        self.time = nn.Sequential(SinusoidalTimeEmbedding(time_dim, scale=1.0), nn.Linear(time_dim, 2 * time_dim),
                                  Mish(), nn.Linear(2 * time_dim, time_dim))
        dims = [x_dim + time_dim + cond_dim] + [hidden] * depth
        self.body = nn.Sequential(*(m for a, b in zip(dims[:-1], dims[1:], strict=True) for m in (nn.Linear(a, b),
                                                                                                   Mish())))
        self.head = nn.Linear(hidden, x_dim)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        check_shape(x_t, (None, self.x_dim), "x_t")
        if cond is None:
            raise ValueError("DQLMLP needs the state as its condition")
        check_shape(cond, (x_t.shape[0], self.cond_dim), "cond")
        index = (broadcast_time(t, x_t.shape[0]) * self.num_steps).round() - 1.0
        return self.head(self.body(torch.cat([x_t, self.time(index), cond], dim=-1)))


def actor_model(obs_dim: int, act_dim: int, net: str = "mlp", hidden: int = 256, depth: int = 3, time_dim: int = 16,
                diffusion_steps: int = 5, beta_min: float = 0.1, beta_max: float = 10.0) -> DiffusionModel:
    """p(a | s): eps prediction on the VP chain, x0 clipped to [-1, 1]."""
    _check_choice("net", net, NETS)
    if net == "mlp":
        denoiser: nn.Module = DQLMLP(act_dim, obs_dim, hidden, depth, time_dim, diffusion_steps)
    else:
        denoiser = ResidualMLP(act_dim, obs_dim, hidden=hidden, depth=depth, time_dim=time_dim)
    return DiffusionModel(denoiser, DiscreteVP.vp(diffusion_steps, beta_min, beta_max), prediction="eps", clip_x0=1.0)


@register_actor("diffusion_ql")
class DiffusionQLActor(nn.Module):
    """Samples ``n_candidates`` actions per state with DDPM over the short chain and picks one by min Q.

    ``solver`` / ``solver_kwargs`` / ``steps`` (None: ``diffusion_steps``) / ``prediction`` describe how the
    network is sampled; a distilled student (``diffrl distill``) changes them, training always uses the defaults.
    ``net`` defaults to ``residual_mlp`` here only so that policies exported before the option existed still load;
    :meth:`DiffusionQL.build_actor` always passes it.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, depth: int = 3, time_dim: int = 16,
                 diffusion_steps: int = 5, beta_min: float = 0.1, beta_max: float = 10.0, critic_hidden: int = 256,
                 critic_depth: int = 3, n_candidates: int = 50, selection: str = "softmax",
                 net: str = "residual_mlp", solver: str = "ddpm", solver_kwargs: dict | None = None,
                 steps: int | None = None, prediction: str = "eps"):
        super().__init__()
        _check_choice("selection", selection, SELECTIONS)
        self._config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.obs_dim, self.act_dim, self.x_shape = obs_dim, act_dim, (act_dim,)
        self.steps, self.n_candidates, self.selection = steps or diffusion_steps, n_candidates, selection
        self.model = actor_model(obs_dim, act_dim, net, hidden, depth, time_dim, diffusion_steps, beta_min, beta_max)
        self.model.prediction = make_prediction(prediction)
        self.solver = make_solver(solver, **(solver_kwargs or {}))
        self.critic = QEnsemble(obs_dim, act_dim, 2, critic_hidden, critic_depth, activation="mish")

    def export_config(self) -> dict[str, Any]:
        return dict(self._config)

    def cond(self, obs: Tensor) -> Tensor:
        """The denoiser's condition: the newest observation (B, obs_dim)."""
        return last_observation(obs, self.obs_dim)

    def forward(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        s = self.cond(obs)
        n = 1 if self.selection == "none" else self.n_candidates
        states, actions = candidate_actions(self.model, s, n, self.act_dim, self.solver, self.steps, generator)
        if n == 1:
            return actions.unsqueeze(1)
        logits = self.critic.min(states, actions).view(s.shape[0], n)
        best = choose(actions.view(s.shape[0], n, self.act_dim), logits, self.selection == "max", generator)
        return best.unsqueeze(1)


@torch.no_grad()
def _copy_parameters(target: nn.Module, source: nn.Module) -> None:
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.copy_(s)


class DiffusionQL(OfflineRLAgent):
    """Diffusion-QL agent: ``update(batch)`` takes one critic step, one actor step and the EMA/target updates."""

    kind = "diffusion_ql"
    presets: dict[str, Preset] = PRESETS

    def __init__(self, config: DiffusionQLConfig, obs_dim: int, act_dim: int, obs_normalizer: Any = None,
                 action_normalizer: Any = None, reward_stats: tuple[float, float] | None = None):
        super().__init__(config, obs_dim, act_dim, obs_normalizer, action_normalizer)
        c = config
        if c.lr_schedule != "constant" and c.total_steps is None:
            raise ValueError(f"DiffusionQL: lr_schedule={c.lr_schedule!r} decays over total_steps, which is None; set "
                             "total_steps (diffrl train fills it with the run's --steps) or use lr_schedule='constant'")
        if c.reward_tune == "normalize" and reward_stats is None:
            raise ValueError("reward_tune='normalize' needs the dataset's reward mean and std: build the agent with "
                             "DiffusionQL.from_dataset or pass reward_stats=(mean, std)")
        mean, std = reward_stats if reward_stats is not None else (0.0, 1.0)
        self.reward_stats = torch.tensor([float(mean), float(std)])
        self.actor = actor_model(obs_dim, act_dim, c.net, c.hidden, c.depth, c.time_dim, c.diffusion_steps,
                                 c.beta_min, c.beta_max)
        self.actor_ema = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic = DoubleQCritic(obs_dim, act_dim, 2, c.critic_hidden, c.critic_depth, activation="mish")
        clip = c.max_grad_norm if c.max_grad_norm is not None and c.max_grad_norm > 0 else None
        schedule = {"lr_schedule": c.lr_schedule, "total_steps": c.total_steps, "max_grad_norm": clip}
        self.actor_learner = Learner(self.actor, lr=c.lr, **schedule)
        self.critic_learner = Learner(self.critic, lr=c.critic_lr, **schedule)
        self.solver = DDPM()
        self.modules = {"actor": self.actor, "actor_ema": self.actor_ema, "critic": self.critic}
        self.learners = {"actor": self.actor_learner, "critic": self.critic_learner}

    @classmethod
    def from_dataset(cls, dataset: Any, config: DiffusionQLConfig, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None) -> DiffusionQL:
        """Dimensions, normalisers (as ``obs_normalization`` / ``action_normalization`` ask) and reward statistics
        from ``dataset``; on ``device``."""
        obs_normalizer, action_normalizer = input_normalizers(dataset, config.obs_normalization,
                                                              config.action_normalization)
        rewards = torch.as_tensor(dataset.rewards, dtype=torch.float64).reshape(-1)
        stats = (float(rewards.mean()), float(rewards.std())) if rewards.numel() > 1 else (0.0, 1.0)
        return cls(config, dataset.obs_dim, dataset.act_dim, obs_normalizer, action_normalizer,
                   reward_stats=stats).to(device, dtype)

    def prepare(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Normalised observations and actions, rewards tuned as ``reward_tune`` and times ``reward_scale``."""
        b = super().prepare(batch)
        r = batch["rewards"].to(b["obs"].dtype).reshape(-1)
        tune = self.config.reward_tune
        if tune == "cql_antmaze":
            r = (r - 0.5) * 4.0
        elif tune == "normalize":
            r = (r - self.reward_stats[0]) / self.reward_stats[1]
        b["rewards"] = r * self.config.reward_scale
        return b

    def sample_actions(self, obs: Tensor, grad: bool = False, ema: bool = False) -> Tensor:
        """One action per (normalised) state from the online actor, or the EMA actor with ``ema=True``."""
        model = self.actor_ema if ema else self.actor
        return model.sample((obs.shape[0], self.act_dim), obs, solver=self.solver, steps=self.config.diffusion_steps,
                            grad=grad)

    @torch.no_grad()
    def next_values(self, next_obs: Tensor) -> Tensor:
        """The bootstrap value of s': min over the target critics at the EMA actor's action, or with
        ``max_q_backup`` each target critic's max over ``max_q_samples`` EMA actions, then the min."""
        if not self.config.max_q_backup:
            return self.critic.target_min(next_obs, self.sample_actions(next_obs, ema=True))
        n = self.config.max_q_samples
        states = repeat_states(next_obs, n)
        q = self.critic.target(states, self.sample_actions(states, ema=True))  # (members, B * n)
        return q.view(q.shape[0], next_obs.shape[0], n).amax(dim=2).amin(dim=0)

    def actor_loss(self, obs: Tensor, actions: Tensor, member: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """BC denoising loss - eta * Q_i(s, a_pi) / mean |Q_j(s, a_pi)|, with a_pi sampled through the chain.

        Critic ``member`` i is maximised and the other one's mean |Q| (no gradient) normalises the scale; None
        draws i at random, as the official update does every step.
        """
        bc_loss = self.actor.loss(actions, obs)
        new_actions = self.sample_actions(obs, grad=True)
        with frozen(self.critic):
            q = self.critic(obs, new_actions)
        i = int(torch.randint(2, ())) if member is None else int(member)
        q_loss = -q[i].mean() / q[1 - i].abs().mean().detach()
        return bc_loss + self.config.eta * q_loss, {"bc_loss": bc_loss.detach(), "q_loss": q_loss.detach()}

    def update_ema(self) -> None:
        """The EMA step after update ``k`` (0-based): average every ``ema_every`` updates once k >= ``ema_start``;
        before that keep the initial weights (``ema_before_start="initial"``) or copy the actor's (``"copy"``)."""
        c = self.config
        k = self.actor_learner.num_steps - 1
        if k < c.ema_start:
            if c.ema_before_start == "copy":
                _copy_parameters(self.actor_ema, self.actor)
        elif k % c.ema_every == 0:
            polyak_update(self.actor_ema, self.actor, 1.0 - c.ema_decay)

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor | float]:
        b = self.prepare(batch)
        c = self.config
        target = td_target(b["rewards"], b["terminals"], self.next_values(b["next_obs"]), c.gamma)
        q_values = self.critic(b["obs"], b["actions"])
        critic_loss = q_regression_loss(q_values, target)
        critic_info = self.critic_learner.step(critic_loss)
        actor_loss, actor_info = self.actor_loss(b["obs"], b["actions"])
        step_info = self.actor_learner.step(actor_loss)
        self.update_ema()
        self.critic.update_target(c.tau)
        return {"critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(), **actor_info,
                "q_mean": q_values.mean().detach(), "target_q_mean": target.mean(),
                "critic_grad_norm": critic_info["grad_norm"], "actor_grad_norm": step_info["grad_norm"],
                "lr": step_info["lr"]}

    def build_actor(self, **overrides: Any) -> DiffusionQLActor:
        """The acting module: the online actor's weights (``eval_actor="online"``) or the EMA copy's, and the
        target critic for the choice among candidates."""
        c = self.config
        settings = actor_settings({"n_candidates": c.n_candidates, "selection": c.selection}, overrides, self.kind)
        actor = DiffusionQLActor(self.obs_dim, self.act_dim, c.hidden, c.depth, c.time_dim, c.diffusion_steps,
                                 c.beta_min, c.beta_max, c.critic_hidden, c.critic_depth, net=c.net, **settings)
        source = self.actor_ema if c.eval_actor == "ema" else self.actor
        actor.model.load_state_dict(source.state_dict())
        actor.critic.load_state_dict(self.critic.target.state_dict())
        return actor.eval()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "reward_stats": self.reward_stats.clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "reward_stats" in state:
            self.reward_stats = state["reward_stats"].to(device=self.device, dtype=self.dtype)
