"""QGPO (Lu et al. 2023, "Contrastive Energy Prediction for Exact Energy-Guided Diffusion Sampling in Offline
Reinforcement Learning"), the two-phase algorithm of the official code (ChenDRAG/CEP-energy-guided-diffusion, D4RL
part in ``Offline_RL_2D/``).

The optimal policy pi(a|s) ~ mu(a|s) exp(beta Q(s, a)) is sampled by guiding a behaviour diffusion model mu with
the gradient of a time-dependent energy model f(x_t, t, s), trained by contrastive energy prediction (CEP): over
K behaviour samples a_1..a_K of one state, softmax_k f(x_t^k, t, s) is fitted to softmax_k beta Q(s, a_k), which
makes f the exact intermediate energy log E[exp(beta Q(s, a_0)) | x_t].

Training runs in two phases inside one run of the shared Trainer:

1. Behaviour phase (``behavior_steps`` updates, official 600 epochs x 1000 = 600k steps at batch 4096,
   ``train_behavior.py``): only the behaviour model trains. The agent's batch sampler draws ``behavior_batch_size``
   transitions per update here, whatever the Trainer's batch size (one gradient step on 4096 samples, as the
   official DataLoader does).
2. At the switch the behaviour model is frozen and K support actions are drawn once for every dataset state s and,
   separately, every next state s' (15-step DPM-Solver, no guidance; ``train_critic.py`` ``critic``); they stay on
   the data's device and batches carry their dataset ``indices`` to look them up.
3. Critic phase (official 100 epochs x 10,000 = 1M steps at batch 256, ``train_critic.py`` ``train_critic``): the
   in-support softmax Q-learning step runs during the first ``q_train_fraction`` (official: epochs < 50 of 100) of
   the phase, the CEP step of the energy model during all of it, labels from the target critic.

The default split keeps the official proportions of whatever budget the run has: ``behavior_fraction`` = 600k /
1.6M of the run's updates (``total_steps``, set to ``--steps`` by ``diffrl train``) for the behaviour model, the
rest for the critic phase; with ``total_steps`` unset the official 600k + 1M.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from agents.critics import MLP, DoubleQCritic, q_regression_loss
from agents.offline_rl import OfflineRLAgent, actor_settings, identity_normalizer, last_observation, max_abs_normalizer
from agents.policy import register_actor
from agents.presets import Preset
from diffrl.guidance import GradientGuidance, Guidance, as_guidance
from diffrl.model import DiffusionModel
from diffrl.nets.embeddings import FourierTimeEmbedding, broadcast_time
from diffrl.schedules import VPSDE, NoiseSchedule, expand_like
from diffrl.solvers.base import Solver
from diffrl.training import Learner

#: The official budget (``train_behavior.py``: 600 x 1000 steps; ``train_critic.py``: 100 x 10,000 steps).
OFFICIAL_BEHAVIOR_STEPS = 600_000
OFFICIAL_CRITIC_STEPS = 1_000_000
REWARD_TRANSFORMS = ("none", "iql_locomotion", "iql_antmaze")


@dataclass
class QGPOConfig:
    """Defaults are the official D4RL settings (``Offline_RL_2D/``: ``utils.py`` ``get_args``, README command,
    ``train_behavior.py``, ``train_critic.py``, ``diffusion_SDE/model.py``); per-task rows in ``QGPO.presets``.

    ``hidden`` is the narrowest width of the behaviour network (official ScoreNet: 128, blocks 512-256-128-128-
    256-512 with skips between them), ``time_dim`` its Gaussian-Fourier time features (32, scale 30, also used by
    the energy model). ``behavior_steps`` (None: ``behavior_fraction`` of ``total_steps``) updates train the
    behaviour model on ``behavior_batch_size`` samples each (None: the Trainer's batch); the critic phase takes
    the rest, Q learning during its first ``q_train_fraction``. ``beta`` is the official ``--alpha`` (CEP
    temperature), ``q_alpha`` the softmax temperature of the in-support value. ``support_steps`` and
    ``sample_steps`` are the official ``--diffusion_steps`` (network calls of the sampler) for the support actions
    and the policy. ``reward_transform``: IQL's ``iql_locomotion`` (r * 1000 / (max - min episode return)) or
    ``iql_antmaze`` (r - 1), as official, or ``none``.

    The networks have the official parameter counts (counted from its classes; tests/test_qgpo.py) and the sampler
    agreed with the official ``dpm_solver_pytorch`` to 1e-13 in float64 when the two were run side by side on one
    network. Differences from the official code, none of which changes what is computed in expectation:

    - Batches are drawn with replacement (the official shuffles epochs); same samples per step.
    - AdamW with zero weight decay (= Adam); the denoising loss is a mean over action dimensions (official: a sum),
      the Q loss the mean over the two members (as official); Adam is invariant to such constant factors.
    - The behaviour network predicts eps (the official net's output is -eps, read as a score times -sigma): the same
      function class with the head's sign flipped.
    - Actions are scaled per dimension by the data's max |a| (1 up to rounding on D4RL, whose actions lie in
      [-1, 1]); the executed action is clamped to that range, which the MuJoCo control range does in the official runs.
      Observations are raw by default, as official (``normalize_obs`` z-scores them).
    - The support actions are not written into checkpoints (K x |D| x act_dim values for s and for s': 0.8 GB for
      halfcheetah at fp32). They are drawn from a generator seeded by ``support_seed`` (taken from the global RNG at
      the switch and saved in the state dict), so a run resumed past the switch recomputes exactly the same set with
      the saved, frozen behaviour model.
    - A batch without ``indices`` in the critic phase (a plain ``dataset.sample``, e.g. a script that does not use
      ``batch_sampler``) gets fresh behaviour samples for its states and next states instead of the fixed set: the
      same distribution, redrawn; a warning says so once.
    - Guidance scale: the official code evaluates a sweep (``train_critic.py``: s in {0, 1, 2, 3, 5, 8, 10} for
      locomotion, {1, 1.5, 2, 2.5, 3, 4} for AntMaze) and keeps 1.0 as its default; the presets carry no per-task
      scale, as none is fixed in the code (choose one with ``guidance_scale=`` or per policy).
    """

    hidden: int = 128
    time_dim: int = 32
    fourier_scale: float = 30.0
    beta_min: float = 0.1
    beta_max: float = 20.0
    behavior_lr: float = 1e-4
    behavior_batch_size: int | None = 4096
    critic_hidden: int = 256
    critic_depth: int = 3
    critic_lr: float = 3e-4
    energy_hidden: int = 256
    energy_depth: int = 4
    energy_lr: float = 3e-4
    n_support: int = 16
    support_steps: int = 15
    support_chunk: int = 256
    q_alpha: float = 1.0
    beta: float = 3.0
    gamma: float = 0.99
    tau: float = 0.005
    total_steps: int | None = None
    behavior_steps: int | None = None
    behavior_fraction: float = OFFICIAL_BEHAVIOR_STEPS / (OFFICIAL_BEHAVIOR_STEPS + OFFICIAL_CRITIC_STEPS)
    q_train_fraction: float = 0.5
    reward_transform: str = "iql_locomotion"
    normalize_obs: bool = False
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
        if not 0.0 <= self.behavior_fraction <= 1.0 or not 0.0 <= self.q_train_fraction <= 1.0:
            raise ValueError(f"behavior_fraction and q_train_fraction must lie in [0, 1], got "
                             f"{self.behavior_fraction}, {self.q_train_fraction}")
        if self.behavior_steps is not None and self.behavior_steps < 0:
            raise ValueError(f"behavior_steps must be >= 0 or None, got {self.behavior_steps}")
        if self.reward_transform not in REWARD_TRANSFORMS:
            raise ValueError(f"reward_transform must be one of {REWARD_TRANSFORMS}, got {self.reward_transform!r}")
        if self.support_chunk < 1:
            raise ValueError(f"support_chunk must be >= 1, got {self.support_chunk}")

    def phase_steps(self) -> tuple[int, int]:
        """(updates of the behaviour phase, updates of the critic phase that train Q)."""
        if self.total_steps is None:
            behavior = OFFICIAL_BEHAVIOR_STEPS if self.behavior_steps is None else self.behavior_steps
            critic = OFFICIAL_CRITIC_STEPS
        else:
            behavior = (round(self.behavior_fraction * self.total_steps) if self.behavior_steps is None
                        else self.behavior_steps)
            critic = max(self.total_steps - behavior, 0)
        return behavior, round(self.q_train_fraction * critic)


_LOCOMOTION = {"n_support": 16, "reward_transform": "iql_locomotion"}
_ANTMAZE = {"n_support": 32, "reward_transform": "iql_antmaze"}
_SOURCE = ("ChenDRAG/CEP-energy-guided-diffusion Offline_RL_2D/train_critic.py (__main__: M = 16 support actions, "
           "32 for antmaze) and dataset/dataset.py (D4RL_dataset: reward_tune {})")
#: The D4RL tasks of the paper's Table 1; beta = 3, q_alpha = 1 (README command) are the config defaults.
QGPO_PRESETS: dict[str, Preset] = {
    **{f"{env}-{level}": Preset(dict(_LOCOMOTION), _SOURCE.format("iql_locomotion"))
       for env in ("halfcheetah", "hopper", "walker2d") for level in ("medium", "medium-replay", "medium-expert")},
    **{f"antmaze-{maze}": Preset(dict(_ANTMAZE), _SOURCE.format("iql_antmaze"))
       for maze in ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")},
}


# ------------------------------------------------------------------------------------------------- networks
def fourier_time(dim: int, scale: float) -> nn.Module:
    """Gaussian random Fourier features of t (fixed frequencies ~ N(0, scale^2)) and a linear layer."""
    return nn.Sequential(FourierTimeEmbedding(dim, std=scale), nn.Linear(dim, dim))


class _TimeResidualBlock(nn.Module):
    """``silu(W_2 (silu(W_1 x) + V silu(e))) + skip(x)``: one block of the behaviour network."""

    def __init__(self, in_dim: int, out_dim: int, embed_dim: int):
        super().__init__()
        self.first = nn.Linear(in_dim, out_dim)
        self.embed = nn.Linear(embed_dim, out_dim)
        self.second = nn.Linear(out_dim, out_dim)
        self.skip = nn.Linear(in_dim, out_dim) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = F.silu(self.first(x)) + self.embed(F.silu(e))
        return F.silu(self.second(h)) + self.skip(x)


class BehaviorNet(nn.Module):
    """The official behaviour network's shape (``diffusion_SDE/model.py`` ScoreNet), as an eps-prediction denoiser
    ``(x_t (B, act_dim), t (B,), s (B, obs_dim)) -> (B, act_dim)``.

    The state (linear + SiLU to ``time_dim``) and Fourier time features (``time_dim``) are joined and mapped by a
    two-layer MLP to an embedding of width ``hidden`` that every block receives. Blocks of widths 4h, 2h, h go
    down, a middle block of width h follows, and two blocks of widths 2h, 4h go up, each taking the output of the
    block before joined with the matching down block's; the head reads the first block joined with the last.
    """

    def __init__(self, act_dim: int, obs_dim: int, hidden: int = 128, time_dim: int = 32,
                 fourier_scale: float = 30.0):
        super().__init__()
        if act_dim <= 0 or obs_dim <= 0 or hidden <= 0:
            raise ValueError(f"invalid BehaviorNet: act_dim={act_dim}, obs_dim={obs_dim}, hidden={hidden}")
        self.x_dim, self.x_shape = act_dim, (act_dim,)
        h = hidden
        self.time = fourier_time(time_dim, fourier_scale)
        self.state = nn.Linear(obs_dim, time_dim)
        self.embed = nn.Sequential(nn.Linear(2 * time_dim, h), nn.SiLU(), nn.Linear(h, h))
        self.down = nn.ModuleList([_TimeResidualBlock(act_dim, 4 * h, h), _TimeResidualBlock(4 * h, 2 * h, h),
                                   _TimeResidualBlock(2 * h, h, h)])
        self.middle = _TimeResidualBlock(h, h, h)
        self.up = nn.ModuleList([_TimeResidualBlock(2 * h, 2 * h, h), _TimeResidualBlock(4 * h, 4 * h, h)])
        self.head = nn.Linear(8 * h, act_dim)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        t = broadcast_time(t, x_t.shape[0])
        e = self.embed(torch.cat([F.silu(self.state(cond)), self.time(t)], dim=-1))
        d1 = self.down[0](x_t, e)
        d2 = self.down[1](d1, e)
        d3 = self.down[2](d2, e)
        u = self.middle(d3, e)
        u = self.up[0](torch.cat([d3, u], dim=-1), e)
        u = self.up[1](torch.cat([d2, u], dim=-1), e)
        return self.head(torch.cat([d1, u], dim=-1))


class EnergyNetwork(nn.Module):
    """Time-dependent energy f(x_t, t, s) -> scalar (official ``GuidanceQt``: an MLP of ``depth`` SiLU layers of
    width ``hidden`` on [x_t, Fourier time features, s]); inputs may carry extra leading dims (e.g. (B, K, ...)),
    ``t`` broadcasts against them."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, depth: int = 4, time_dim: int = 32,
                 fourier_scale: float = 30.0):
        super().__init__()
        self.time = fourier_time(time_dim, fourier_scale)
        self.net = MLP(act_dim + time_dim + obs_dim, 1, hidden, depth, activation="silu")

    def forward(self, x_t: Tensor, t: Tensor, obs: Tensor) -> Tensor:
        lead = x_t.shape[:-1]
        t_feat = self.time(t.expand(lead).reshape(-1)).view(*lead, -1)
        return self.net(torch.cat([x_t, t_feat, obs], dim=-1)).squeeze(-1)


def behavior_model(obs_dim: int, act_dim: int, hidden: int, time_dim: int, fourier_scale: float, beta_min: float,
                   beta_max: float) -> DiffusionModel:
    """The behaviour model: linear VP-SDE (beta 0.1 -> 20, t in [1e-3, 1]), eps prediction, no x0 clipping (the
    official solver runs without thresholding)."""
    net = BehaviorNet(act_dim, obs_dim, hidden, time_dim, fourier_scale)
    return DiffusionModel(net, VPSDE(beta_min, beta_max), prediction="eps", clip_x0=None)


# ------------------------------------------------------------------------------------------------- sampler
def singlestep_orders(calls: int) -> list[int]:
    """Orders of the official fast singlestep DPM-Solver-2 for ``calls`` network calls (``dpm_solver_pytorch.py``
    ``get_orders_for_singlestep_solver``, order 2): second-order steps and one first-order step at the end (two
    where ``calls`` is even)."""
    if calls % 2:
        return [2] * (calls // 2) + [1]
    return [2] * (calls // 2 - 1) + [1, 1]


class SinglestepDPMSolver2(Solver):
    """The sampler of the official code (``DPM_Solver(predict_x0=True)``, ``sample(steps, order=2)`` with the
    default ``method='singlestep'``, ``skip_type='time_uniform'``, ``t_end = 1e-3``, no final denoising).

    ``steps`` is the number of network calls. The grid has ``steps + 1`` times uniform in t from ``t_max`` to
    ``t_min``; each second-order (data-prediction) step spans two grid intervals and evaluates the model at the
    grid point in between; the result is the sample at ``t_min`` itself.
    """

    name = "dpm-solver-2s"

    def __init__(self) -> None:
        super().__init__("uniform")

    def nfe(self, steps: int) -> int:
        return steps

    @staticmethod
    def _half_log_snr(model: DiffusionModel, t: Tensor) -> Tensor:
        return 0.5 * model.schedule.log_snr(t)

    def step(self, model, x, t, s, cond, guidance, generator, state):
        """One first-order step t -> s (DDIM in data-prediction form)."""
        x0, _ = model.denoise(x, t, cond, guidance)
        return self._first_order(model, x, t, s, x0)

    def _first_order(self, model: DiffusionModel, x: Tensor, t: Tensor, s: Tensor, x0: Tensor) -> Tensor:
        sched = model.schedule
        h = self._half_log_snr(model, s) - self._half_log_snr(model, t)
        ratio, a_s = sched.sigma(s) / sched.sigma(t), sched.alpha(s)
        return expand_like(ratio, x) * x - expand_like(a_s * torch.expm1(-h), x) * x0

    def _second_order(self, model: DiffusionModel, x: Tensor, t: Tensor, u: Tensor, s: Tensor, cond,
                      guidance: Guidance) -> Tensor:
        x0, _ = model.denoise(x, t, cond, guidance)
        lam_t = self._half_log_snr(model, t)
        h = self._half_log_snr(model, s) - lam_t
        r1 = (self._half_log_snr(model, u) - lam_t) / h
        m1, _ = model.denoise(self._first_order(model, x, t, u, x0), u, cond, guidance)
        correction = expand_like((0.5 / r1) * model.schedule.alpha(s) * torch.expm1(-h), x) * (m1 - x0)
        return self._first_order(model, x, t, s, x0) - correction

    def _sample(self, model, x_T, cond, steps, guidance, generator):
        guidance = as_guidance(guidance)
        sched: NoiseSchedule = model.schedule
        grid = torch.linspace(sched.t_max, sched.t_min, steps + 1, device=x_T.device, dtype=x_T.dtype)
        batch, x, i = x_T.shape[0], x_T, 0
        for order in singlestep_orders(steps):
            t, s = grid[i].expand(batch), grid[i + order].expand(batch)
            if order == 1:
                x = self.step(model, x, t, s, cond, guidance, generator, {})
            else:
                x = self._second_order(model, x, t, grid[i + 1].expand(batch), s, cond, guidance)
            x = guidance.project(x, s)
            i += order
        return x

    def __repr__(self) -> str:
        return "SinglestepDPMSolver2()"


def draw_samples(model: DiffusionModel, cond: Tensor, act_dim: int, steps: int,
                 guidance: Guidance | None = None, generator: torch.Generator | None = None) -> Tensor:
    """One action per row of ``cond`` with the official sampler (prior on ``cond``'s device and dtype)."""
    x_T = model.schedule.prior((cond.shape[0], act_dim), generator=generator, device=cond.device, dtype=cond.dtype)
    return SinglestepDPMSolver2().sample(model, x_T, cond, steps=steps, guidance=guidance, generator=generator)


@register_actor("qgpo")
class QGPOActor(nn.Module):
    """Energy-guided sampling: the frozen behaviour model's eps shifted by -``guidance_scale`` * sigma_t * grad f
    (official ``forward_dmp_wrapper_fn``), ``sample_steps`` calls of the official solver, the action clamped to the
    data's range (``action_clip``, normalised units)."""

    #: Guided sampling differentiates the energy model, so the Policy must not run it under inference_mode.
    needs_grad = True

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 128, time_dim: int = 32, fourier_scale: float = 30.0,
                 beta_min: float = 0.1, beta_max: float = 20.0, energy_hidden: int = 256, energy_depth: int = 4,
                 guidance_scale: float = 1.0, sample_steps: int = 15, action_clip: float | None = 1.0):
        super().__init__()
        self._config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.guidance_scale, self.sample_steps, self.action_clip = guidance_scale, sample_steps, action_clip
        self.behavior = behavior_model(obs_dim, act_dim, hidden, time_dim, fourier_scale, beta_min, beta_max)
        self.energy = EnergyNetwork(obs_dim, act_dim, energy_hidden, energy_depth, time_dim, fourier_scale)

    def export_config(self) -> dict[str, Any]:
        return dict(self._config)

    def forward(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        s = last_observation(obs, self.obs_dim)
        guidance = GradientGuidance(self.energy, self.guidance_scale)
        actions = draw_samples(self.behavior, s, self.act_dim, self.sample_steps, guidance, generator)
        if self.action_clip is not None:
            actions = actions.clamp(-self.action_clip, self.action_clip)
        return actions.unsqueeze(1)


# ------------------------------------------------------------------------------------------------- losses
def contrastive_energy_loss(energies: Tensor, q_values: Tensor, beta: float) -> Tensor:
    """CEP: cross-entropy between softmax_k(beta Q_k) (targets) and softmax_k(f_k) over the last dim."""
    targets = torch.softmax(beta * q_values, dim=-1)
    return -(targets * F.log_softmax(energies, dim=-1)).sum(-1).mean()


def in_support_value(q_support: Tensor, q_alpha: float) -> Tensor:
    """In-support softmax value ``V(s') = sum_k softmax_k(q_alpha Q(s', a'_k)) Q(s', a'_k)`` over the last dim."""
    return (torch.softmax(q_alpha * q_support, dim=-1) * q_support).sum(-1)


def in_support_q_target(rewards: Tensor, terminals: Tensor, q_next_support: Tensor, q_alpha: float,
                        gamma: float) -> Tensor:
    """``r + gamma (1 - d) V(s')`` with the in-support soft value of (B, K) target-critic values at s'."""
    return (rewards + gamma * (1.0 - terminals) * in_support_value(q_next_support, q_alpha)).detach()


def perturb_support(schedule: NoiseSchedule, support: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """``x_t = alpha_t a + sigma_t eps`` for (B, K, act_dim) support actions with one time ``t`` (B,) per state,
    shared by its K actions; returns (x_t, the times expanded to (B, K))."""
    t_k = t.unsqueeze(1).expand(support.shape[:-1])
    return schedule.marginal(support, t_k, noise), t_k


def iql_locomotion_scale(dataset: Any) -> float:
    """IQL's locomotion reward scale ``1000 / (max - min episode return)`` over the complete episodes (official
    ``dataset.py`` ``return_range``: a trailing episode without terminal or timeout is left out)."""
    returns = dataset.episode_returns()
    if len(returns) > 1 and not bool(dataset.terminals[-1] | dataset.timeouts[-1]):
        returns = returns[:-1]
    spread = float(returns.max() - returns.min()) if len(returns) else 0.0
    return 1000.0 / max(spread, 1e-6)


# ------------------------------------------------------------------------------------------------- agent
_BEHAVIOR_FIELDS = ("observations", "actions")
_TRANSITION_FIELDS = ("observations", "actions", "rewards", "next_observations")


class QGPO(OfflineRLAgent):
    """QGPO agent: a behaviour phase, then (behaviour model frozen, support actions fixed) the in-support critic and
    the energy model. Train it on batches from :meth:`batch_sampler`."""

    kind = "qgpo"
    #: The critic phase's batch (official ``train_critic.py``); the behaviour phase draws its own 4096.
    default_batch_size = 256
    presets: dict[str, Preset] = QGPO_PRESETS

    def __init__(self, config: QGPOConfig, obs_dim: int, act_dim: int, obs_normalizer: Any = None,
                 action_normalizer: Any = None):
        super().__init__(config, obs_dim, act_dim, obs_normalizer, action_normalizer)
        c = config
        self.behavior = behavior_model(obs_dim, act_dim, c.hidden, c.time_dim, c.fourier_scale, c.beta_min,
                                       c.beta_max)
        self.critic = DoubleQCritic(obs_dim, act_dim, 2, c.critic_hidden, c.critic_depth)
        self.energy = EnergyNetwork(obs_dim, act_dim, c.energy_hidden, c.energy_depth, c.time_dim, c.fourier_scale)
        self.behavior_learner = Learner(self.behavior, lr=c.behavior_lr)
        self.critic_learner = Learner(self.critic, lr=c.critic_lr)
        self.energy_learner = Learner(self.energy, lr=c.energy_lr)
        self.modules = {"behavior": self.behavior, "critic": self.critic, "energy": self.energy}
        self.learners = {"behavior": self.behavior_learner, "critic": self.critic_learner,
                         "energy": self.energy_learner}
        self.behavior_steps, self.q_steps = c.phase_steps()
        #: (scale, shift) of the rewards; None until the data is known (from_dataset or batch_sampler).
        self.reward_affine: tuple[float, float] | None = (1.0, 0.0) if c.reward_transform == "none" else None
        self.support_seed: int | None = None
        self.support: dict[str, Tensor] | None = None  # "obs" / "next_obs": (N, K, act_dim) on the data's device
        self._data: Any = None
        self._warned_unindexed = False

    @classmethod
    def from_dataset(cls, dataset: Any, config: QGPOConfig, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None) -> QGPO:
        """Dimensions, normalisers (raw observations unless ``normalize_obs``; max-abs scaled actions) and the
        reward transform from ``dataset``; on ``device``."""
        obs_norm = dataset.normalizer("observations") if config.normalize_obs else identity_normalizer(dataset.obs_dim)
        agent = cls(config, dataset.obs_dim, dataset.act_dim, obs_norm, max_abs_normalizer(dataset.actions))
        agent.set_reward_transform(dataset)
        return agent.to(device, dtype)

    def set_reward_transform(self, dataset: Any) -> None:
        """Fix the reward (scale, shift) of ``config.reward_transform`` from the dataset's episode returns."""
        transform = self.config.reward_transform
        if transform == "iql_locomotion":
            self.reward_affine = (iql_locomotion_scale(dataset), 0.0)
        elif transform == "iql_antmaze":
            self.reward_affine = (1.0, -1.0)
        else:
            self.reward_affine = (1.0, 0.0)

    # --------------------------------------------------------------------------------------------- phases
    @property
    def in_behavior_phase(self) -> bool:
        return self.behavior_learner.num_steps < self.behavior_steps

    @property
    def trains_q(self) -> bool:
        """Whether the next critic-phase update trains Q (the first ``q_steps`` of the phase do)."""
        return self.energy_learner.num_steps < self.q_steps

    def batch_sampler(self, dataset: Any) -> Callable[[int, torch.Generator | None], dict[str, Tensor]]:
        """Uniform batches of ``dataset`` with their dataset ``indices``: ``behavior_batch_size`` (state, action)
        pairs per update in the behaviour phase, ``batch_size`` transitions in the critic phase. Indices are drawn
        on the generator's device and used on the data's."""
        if self._data is not dataset:
            self._data, self.support = dataset, None
        if self.reward_affine is None:
            self.set_reward_transform(dataset)
        behavior_batch = self.config.behavior_batch_size

        def sample(batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
            behavior = self.in_behavior_phase
            n = behavior_batch if behavior and behavior_batch else batch_size
            draw_on = generator.device if generator is not None else dataset.device
            idx = torch.randint(0, len(dataset), (n,), generator=generator, device=draw_on).to(dataset.device)
            batch = {name: getattr(dataset, name)[idx] for name in (_BEHAVIOR_FIELDS if behavior
                                                                    else _TRANSITION_FIELDS)}
            if not behavior:
                batch["terminals"] = dataset.terminals[idx].to(dataset.rewards.dtype)
            batch["indices"] = idx
            return batch

        return sample

    def _place(self, x: Tensor) -> Tensor:
        ref = self.behavior.denoiser.head.weight
        return x.to(device=ref.device, dtype=ref.dtype if x.is_floating_point() else None)

    def prepare(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        missing = {"observations", "actions", "rewards", "next_observations", "terminals"} - set(batch)
        if missing:
            raise KeyError(f"{self.kind} critic-phase batch lacks {sorted(missing)}; got keys {sorted(batch)}")
        if self.reward_affine is None:
            raise ValueError(f"reward_transform={self.config.reward_transform!r} needs the dataset's returns: build "
                             "the agent with QGPO.from_dataset or pass the data through batch_sampler(dataset)")
        scale, shift = self.reward_affine
        obs = self.obs_normalizer.normalize(self._place(batch["observations"]))
        return {
            "obs": obs,
            "next_obs": self.obs_normalizer.normalize(self._place(batch["next_observations"])),
            "actions": self.action_normalizer.normalize(self._place(batch["actions"])),
            "rewards": self._place(batch["rewards"]).reshape(-1) * scale + shift,
            "terminals": self._place(batch["terminals"]).to(obs.dtype).reshape(-1),
        }

    # --------------------------------------------------------------------------------------------- support
    def sample_support(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """K behaviour samples per (normalised) state, no guidance: (B, obs_dim) -> (B, K, act_dim)."""
        k = self.config.n_support
        with torch.no_grad():
            actions = draw_samples(self.behavior, obs.repeat_interleave(k, dim=0), self.act_dim,
                                   self.config.support_steps, generator=generator)
        return actions.view(obs.shape[0], k, self.act_dim)

    def _support_of(self, states: Tensor, generator: torch.Generator) -> Tensor:
        chunks = [self.sample_support(self.obs_normalizer.normalize(self._place(part)), generator).to(states.device)
                  for part in states.split(self.config.support_chunk)]
        return torch.cat(chunks)

    def start_critic_phase(self) -> None:
        """The switch: freeze the behaviour model and draw the support actions of every dataset state and next
        state once (from ``support_seed``; on loading a state past the switch this recomputes the same set)."""
        self.behavior.requires_grad_(False)
        if self._data is None:
            self.support = {}
            return
        if self.support_seed is None:
            self.support_seed = int(torch.randint(0, 2**62, ()).item())
        generator = torch.Generator(self.behavior.denoiser.head.weight.device).manual_seed(self.support_seed)
        self.support = {"obs": self._support_of(self._data.observations, generator),
                        "next_obs": self._support_of(self._data.next_observations, generator)}

    def batch_support(self, batch: dict[str, Tensor], b: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(support at s, support at s'), each (B, K, act_dim) on the agent's device: looked up by the batch's
        dataset indices, or drawn for this batch when it has none."""
        if "indices" in batch and self.support:
            idx = batch["indices"].to(self.support["obs"].device)
            return self._place(self.support["obs"][idx]), self._place(self.support["next_obs"][idx])
        if "indices" in batch:
            raise RuntimeError("the batch has dataset indices but no support actions were computed: draw batches "
                               "from this agent's batch_sampler(dataset)")
        if not self._warned_unindexed:
            warnings.warn("QGPO critic-phase batch without 'indices' (not from agent.batch_sampler): support actions "
                          "are drawn for each batch instead of once per dataset state", stacklevel=3)
            self._warned_unindexed = True
        return self.sample_support(b["obs"]), self.sample_support(b["next_obs"])

    # --------------------------------------------------------------------------------------------- updates
    def energy_loss(self, obs: Tensor, support: Tensor, q_support: Tensor) -> Tensor:
        """CEP loss at one random diffusion time per state, shared by its K support actions."""
        schedule = self.behavior.schedule
        t = schedule.sample_t(obs.shape[0], device=obs.device, dtype=obs.dtype)
        x_t, t_k = perturb_support(schedule, support, t, torch.randn_like(support))
        energies = self.energy(x_t, t_k, obs.unsqueeze(1).expand(-1, support.shape[1], -1))
        return contrastive_energy_loss(energies, q_support, self.config.beta)

    def _behavior_update(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        obs = self.obs_normalizer.normalize(self._place(batch["observations"]))
        actions = self.action_normalizer.normalize(self._place(batch["actions"]))
        loss = self.behavior.loss(actions, obs)
        self.behavior_learner.step(loss)
        return {"behavior_loss": loss.detach()}

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor | float]:
        if self.in_behavior_phase:
            return self._behavior_update(batch)
        if self.support is None:
            self.start_critic_phase()
        c = self.config
        b = self.prepare(batch)
        support, next_support = self.batch_support(batch, b)
        k = support.shape[1]
        metrics: dict[str, Tensor | float] = {}
        if self.trains_q:
            next_obs_k = b["next_obs"].unsqueeze(1).expand(-1, k, -1)
            target = in_support_q_target(b["rewards"], b["terminals"], self.critic.target_min(next_obs_k, next_support),
                                         c.q_alpha, c.gamma)
            q_values = self.critic(b["obs"], b["actions"])
            critic_loss = q_regression_loss(q_values, target) / q_values.shape[0]
            self.critic_learner.step(critic_loss)
            self.critic.update_target(c.tau)
            metrics.update(critic_loss=critic_loss.detach(), q_mean=q_values.mean().detach())
        q_support = self.critic.target_min(b["obs"].unsqueeze(1).expand(-1, k, -1), support)
        energy_loss = self.energy_loss(b["obs"], support, q_support)
        self.energy_learner.step(energy_loss)
        metrics["energy_loss"] = energy_loss.detach()
        return metrics

    # --------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {**super().state_dict(), "support_seed": self.support_seed,
                "reward_affine": None if self.reward_affine is None else list(self.reward_affine)}

    def load_state_dict(self, state: dict) -> None:
        """Weights, optimisers and phase counters; the support actions are recomputed at the next critic-phase
        update from the saved seed and the (frozen) behaviour weights."""
        super().load_state_dict(state)
        self.support_seed = state["support_seed"]
        affine = state["reward_affine"]
        self.reward_affine = None if affine is None else (float(affine[0]), float(affine[1]))
        self.support = None
        self.behavior.requires_grad_(self.in_behavior_phase)

    def build_actor(self, **overrides: Any) -> QGPOActor:
        c = self.config
        settings = actor_settings({"guidance_scale": c.guidance_scale, "sample_steps": c.sample_steps}, overrides,
                                  self.kind)
        actor = QGPOActor(self.obs_dim, self.act_dim, c.hidden, c.time_dim, c.fourier_scale, c.beta_min, c.beta_max,
                          c.energy_hidden, c.energy_depth, **settings)
        actor.behavior.load_state_dict(self.behavior.state_dict())
        actor.energy.load_state_dict(self.energy.state_dict())
        return actor.eval()
