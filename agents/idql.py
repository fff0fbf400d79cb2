"""IDQL (Hansen-Estruch et al. 2023, "IDQL: Implicit Q-Learning as an Actor-Critic Method with Diffusion Policies").

IQL critics (expectile value regression, Kostrikov et al. 2022) are trained independently of the actor, a diffusion
behaviour model is trained by plain denoising, and at evaluation N candidate actions are drawn from the (EMA)
behaviour model and the one with the highest target-critic value is executed.

The reference is the authors' code, philippe-eecs/IDQL (commit 7582571; files named below are in that
repository): ``jaxrl5/agents/ddpm_iql_simple/ddpm_iql_learner.py`` (the ``DDPMIQLLearner`` that
``jaxrl5/agents/__init__.py`` exports: defaults, update order, action selection),
``jaxrl5/networks/diffusion.py`` (VP betas, learned Fourier time features, ``ddpm_sampler``),
``jaxrl5/networks/resnet.py`` (the LN-ResNet actor), ``jaxrl5/networks/mlp.py`` (critic and value MLPs),
``examples/states/train_diffusion_offline.py`` (reward transformations) and
``launcher/examples/train_ddpm_iql_offline.py`` (the offline run settings and the AntMaze expectile).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from agents.critics import DoubleQCritic, QEnsemble, ValueNetwork, expectile_log_weights, iql_q_loss, iql_value_loss
from agents.offline_rl import (
    ACTION_NORMALIZATIONS,
    OBS_NORMALIZATIONS,
    OfflineRLAgent,
    actor_settings,
    candidate_actions,
    choose,
    diffusion_actor,
    input_normalizers,
    last_observation,
)
from agents.policy import register_actor
from agents.presets import Preset
from diffrl.guidance import Guidance
from diffrl.model import DiffusionModel
from diffrl.nets import LNResNet
from diffrl.nets.ln_resnet import LAYER_NORM_EPS
from diffrl.schedules import DiscreteVP
from diffrl.solvers import DDPM, Solver
from diffrl.solvers.base import coefs
from diffrl.training import LR_SCHEDULES, Learner

SELECTIONS = ("max_q", "expectile", "softmax")
ACTOR_NETS = ("ln_resnet", "mlp")
SAMPLERS = ("idql", "ddpm")
BETA_SCHEDULES = ("vp", "cosine", "linear")
REWARD_NORMALIZATIONS = ("returns", "none")

_REPO = "philippe-eecs/IDQL (commit 7582571)"
_ANTMAZE_SOURCE = (f"{_REPO}: launcher/examples/train_ddpm_iql_offline.py (critic_hyperparam 0.9 when 'antmaze' is "
                   "in the name) and examples/states/train_diffusion_offline.py:call_main (AntMaze rewards - 1, "
                   "no return normalisation)")
_UNNORMALISED_SOURCE = (f"{_REPO}: examples/states/train_diffusion_offline.py:call_main normalises returns only for "
                        "halfcheetah / walker2d / hopper; other rewards are used as they are (the paper has no "
                        "runs on this task, so every other value is the default)")
_ANTMAZE = {"expectile": 0.9, "reward_normalization": "none", "reward_shift": -1.0}
_UNNORMALISED = {"reward_normalization": "none"}

#: Per-task rows where the official settings differ from the defaults (the locomotion settings). AntMaze: the
#: offline launcher's expectile and the run script's reward shift; Kitchen and Adroit: the run script leaves their
#: rewards unscaled.
PRESETS: dict[str, Preset] = {
    **{f"antmaze-{maze}": Preset(dict(_ANTMAZE), _ANTMAZE_SOURCE)
       for maze in ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")},
    **{f"kitchen-{kind}": Preset(dict(_UNNORMALISED), _UNNORMALISED_SOURCE)
       for kind in ("complete", "partial", "mixed")},
    **{f"{task}-{kind}": Preset(dict(_UNNORMALISED), _UNNORMALISED_SOURCE)
       for task in ("pen", "hammer", "door", "relocate") for kind in ("human", "cloned", "expert")},
}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass
class IDQLConfig:
    """Defaults are those of the official offline runs (``DDPMIQLLearner.create`` defaults with the settings of
    ``launcher/examples/train_ddpm_iql_offline.py``) on the locomotion tasks; :data:`PRESETS` holds the AntMaze,
    Kitchen and Adroit rows. The training batch size, 512 in the official launcher, is a run setting:
    ``IDQL.default_batch_size`` (``diffrl train`` uses it unless ``--batch-size`` is given).

    Actor (``actor_net="ln_resnet"``, :class:`~diffrl.nets.LNResNet`): learned Fourier features (``time_dim`` =
    128) of the chain index 0..T-1 through a 256-256 SiLU MLP, ``concat(a_t, s, time)`` -> Linear(``hidden`` =
    256) -> ``depth`` = 3 residual blocks (dropout ``actor_dropout`` = 0.1, LayerNorm, 4 x 256 SiLU layer) ->
    Linear. ``actor_net="mlp"`` is diffrl's :class:`~diffrl.nets.ResidualMLP` (``depth`` hidden layers, the
    previous default). Eps prediction on a ``diffusion_steps`` = 5 step chain with ``beta_schedule="vp"``
    (discretised VP-SDE, beta_min 0.1, beta_max 10; ``"cosine"`` / ``"linear"`` as the official options).
    Trained by AdamW (``actor_lr`` 3e-4, ``actor_weight_decay`` 1e-4: optax.adamw's default, which the official
    code leaves in place) with cosine decay to 0 over ``total_steps`` = 3M updates (the official ``decay_steps``,
    equal to its 3M-update runs, so a shorter run decays only part of the way; None: the run's steps, filled in
    by ``diffrl train``); the denoising loss is summed over action dimensions and averaged over the batch, as the
    official one. EMA of the actor with decay ``ema_decay`` = 0.999 after every update (official ``actor_tau`` =
    0.001).

    Critics: ``n_critics`` = 2 Q networks of ``critic_depth`` = 2 ReLU layers of ``critic_hidden`` = 256, a Polyak
    target (``tau`` 0.005), and V(s) with a LayerNorm on its input (``value_layer_norm``, the official
    ``value_layer_norm=True`` of ``MLP(use_layer_norm=True)``) and the same MLP; Adam at 3e-4 for both; Xavier-
    uniform weights and zero biases as the official MLPs. Each update takes, in the official order, the actor
    step, then V by expectile regression (``expectile`` 0.7; 0.9 on AntMaze) on the target critics' min Q(s, a),
    then both Q networks on ``r + gamma (1 - done) V(s')`` with the V just updated (``gamma`` 0.99; the mean over
    members and batch of the squared error), then the target update.

    Rewards: ``reward_normalization="returns"`` multiplies them by ``reward_return_range`` / (max - min episode
    return of the dataset), i.e. 1000 / (max - min) as the official ``normalize_returns`` and IQL; the factor is
    computed by :meth:`IDQL.from_dataset` and stored in ``reward_scale`` (``"none"``: ``reward_scale`` as given).
    ``reward_shift`` is added afterwards (-1 on AntMaze). Observations and actions are used raw, as in the
    official code (``obs_normalization="none"``, ``action_normalization="none"``, which needs actions within
    [-1, 1]); ``"zscore"`` / ``"max_abs"`` scale them from the dataset.

    Acting: ``n_candidates`` = 64 actions per state from the EMA actor with the official sampler
    (``sampler="idql"``: ancestral steps with noise variance beta_t and the sample clipped to [-1, 1] after every
    step; ``"ddpm"`` is diffrl's DDPM posterior step with x0 clipping), and ``selection="max_q"`` executes the
    candidate with the highest min over the target critics (``DDPMIQLLearner.eval_actions``). The paper's
    importance-resampling rules are options: ``"expectile"`` draws with weights |tau - 1(A < 0)| / |A| and
    ``"softmax"`` with softmax(``temperature`` * A), A = min Q' - V (``greedy`` takes their argmax instead).

    Deliberate deviations: none in the agent. The official run script trains on a random 95% of the transitions
    (the rest only for validation losses) and clips dataset actions to +-(1 - 1e-5); here the run uses the whole
    dataset and the actions as stored.
    """

    actor_net: str = "ln_resnet"
    hidden: int = 256
    depth: int = 3
    time_dim: int = 128
    actor_dropout: float = 0.1
    layer_norm: bool = True
    diffusion_steps: int = 5
    beta_schedule: str = "vp"
    beta_min: float = 0.1
    beta_max: float = 10.0
    actor_lr: float = 3e-4
    actor_weight_decay: float = 1e-4
    lr_schedule: str = "cosine"
    total_steps: int | None = 3_000_000
    ema_decay: float = 0.999
    n_critics: int = 2
    critic_hidden: int = 256
    critic_depth: int = 2
    value_layer_norm: bool = True
    critic_lr: float = 3e-4
    value_lr: float = 3e-4
    expectile: float = 0.7
    gamma: float = 0.99
    tau: float = 0.005
    reward_normalization: str = "returns"
    reward_return_range: float = 1000.0
    reward_scale: float = 1.0
    reward_shift: float = 0.0
    obs_normalization: str = "none"
    action_normalization: str = "none"
    n_candidates: int = 64
    sampler: str = "idql"
    selection: str = "max_q"
    temperature: float = 3.0
    greedy: bool = False

    def __post_init__(self) -> None:
        for name, choices in (("actor_net", ACTOR_NETS), ("beta_schedule", BETA_SCHEDULES), ("sampler", SAMPLERS),
                              ("selection", SELECTIONS), ("reward_normalization", REWARD_NORMALIZATIONS),
                              ("obs_normalization", OBS_NORMALIZATIONS),
                              ("action_normalization", ACTION_NORMALIZATIONS), ("lr_schedule", LR_SCHEDULES)):
            _check_choice(name, getattr(self, name), choices)
        if not 0.0 < self.expectile < 1.0:
            raise ValueError(f"expectile must lie in (0, 1), got {self.expectile}")
        if self.n_candidates < 1 or self.diffusion_steps < 1 or self.n_critics < 1:
            raise ValueError(f"n_candidates, diffusion_steps and n_critics must be >= 1, got {self.n_candidates}, "
                             f"{self.diffusion_steps}, {self.n_critics}")
        if not 0.0 <= self.actor_dropout < 1.0:
            raise ValueError(f"actor_dropout must lie in [0, 1), got {self.actor_dropout}")
        if self.reward_return_range <= 0:
            raise ValueError(f"reward_return_range must be positive, got {self.reward_return_range}")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"total_steps must be None or >= 1, got {self.total_steps}")


def episode_return_range(episode_returns: Any) -> float:
    """max - min of the episode returns (the denominator of the official ``normalize_returns``)."""
    returns = np.asarray(episode_returns, dtype=np.float64)
    span = float(returns.max() - returns.min()) if returns.size else 0.0
    if not np.isfinite(span) or span <= 0.0:
        raise ValueError(f"reward_normalization='returns' needs episodes with different returns (got {returns.size} "
                         f"episode(s), spread {span}); use reward_normalization='none'")
    return span


class IDQLSampler(Solver):
    """The official DDPM sampler (``ddpm_sampler`` of jaxrl5/networks/diffusion.py): each step
    ``x_s = (x_t - beta / sigma_t eps) / sqrt(alpha) + sqrt(beta) z`` with alpha = (alpha_t / alpha_s)^2 and
    beta = 1 - alpha (the forward-process variance, not the posterior's), then ``x_s`` clipped to
    [-``clip``, ``clip``]; the last step returns the (clipped) x0 estimate."""

    name = "idql_ddpm"

    def __init__(self, clip: float = 1.0, spacing: str = "uniform"):
        super().__init__(spacing)
        self.clip = float(clip)

    def step(self, model: DiffusionModel, x: Tensor, t: Tensor, s: Tensor, cond, guidance: Guidance,
             generator: torch.Generator | None, state: dict) -> Tensor:
        x0, eps = model.x0_eps(x, t, cond)
        _, eps = guidance.apply(model, x, t, cond, x0, eps)
        a_t, s_t = coefs(model, t, x)
        a_s, _ = coefs(model, s, x)
        alpha = (a_t / a_s) ** 2
        beta = 1.0 - alpha
        mean = (x - beta / s_t * eps) / alpha.sqrt()
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (mean + beta.sqrt() * noise).clamp(-self.clip, self.clip)

    def __repr__(self) -> str:
        return f"IDQLSampler(clip={self.clip}, spacing={self.spacing!r})"


def make_sampler(name: str) -> Solver:
    _check_choice("sampler", name, SAMPLERS)
    return IDQLSampler() if name == "idql" else DDPM()


def beta_schedule(name: str, steps: int, beta_min: float = 0.1, beta_max: float = 10.0) -> DiscreteVP:
    """The official beta schedules (jaxrl5/networks/diffusion.py): ``vp``, ``cosine`` and ``linear`` (1e-4 to 2e-2
    over the T steps, not rescaled)."""
    _check_choice("beta_schedule", name, BETA_SCHEDULES)
    if name == "vp":
        return DiscreteVP.vp(steps, beta_min, beta_max)
    if name == "cosine":
        return DiscreteVP.cosine(steps)
    return DiscreteVP(torch.linspace(1e-4, 2e-2, steps, dtype=torch.float64))


def actor_model(obs_dim: int, act_dim: int, actor_net: str = "ln_resnet", hidden: int = 256, depth: int = 3,
                time_dim: int = 128, dropout: float = 0.1, layer_norm: bool = True, diffusion_steps: int = 5,
                schedule: str = "vp", beta_min: float = 0.1, beta_max: float = 10.0) -> DiffusionModel:
    """p(a | s): eps prediction on the chain, x0 clipped to [-1, 1] (the official final clip)."""
    _check_choice("actor_net", actor_net, ACTOR_NETS)
    chain = beta_schedule(schedule, diffusion_steps, beta_min, beta_max)
    if actor_net == "mlp":
        return diffusion_actor(obs_dim, act_dim, chain, hidden, depth, time_dim, layer_norm)
    # The network sees the chain index n - 1 in 0..T-1 of diffrl's time t = n / T, as the official one does.
    net = LNResNet(act_dim, obs_dim, hidden=hidden, blocks=depth, time_dim=time_dim, dropout=dropout,
                   layer_norm=layer_norm, time_scale=float(diffusion_steps), time_offset=-1.0)
    return DiffusionModel(net, chain, prediction="eps", clip_x0=1.0)


class IDQLValue(nn.Module):
    """V(s) -> scalar: optional LayerNorm of the input, then an MLP (the official ``StateValue`` over
    ``MLP(use_layer_norm=True)``, whose LayerNorm acts on the input only)."""

    def __init__(self, obs_dim: int, hidden: int = 256, depth: int = 2, layer_norm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(obs_dim, eps=LAYER_NORM_EPS) if layer_norm else nn.Identity()
        self.net = ValueNetwork(obs_dim, hidden, depth)

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(self.norm(obs))


@torch.no_grad()
def xavier_init_(module: nn.Module) -> nn.Module:
    """Xavier-uniform weights and zero biases for every Linear layer (the official MLPs' initialisation)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return module


@register_actor("idql")
class IDQLActor(nn.Module):
    """Draws ``n_candidates`` actions per state from the behaviour model and keeps one (see :class:`IDQLConfig`,
    "Acting"). ``critic`` holds the target critics' weights, ``value`` V's, ``model`` the EMA actor's."""

    def __init__(self, obs_dim: int, act_dim: int, actor_net: str = "ln_resnet", hidden: int = 256, depth: int = 3,
                 time_dim: int = 128, actor_dropout: float = 0.1, layer_norm: bool = True, diffusion_steps: int = 5,
                 beta_schedule: str = "vp", beta_min: float = 0.1, beta_max: float = 10.0, n_critics: int = 2,
                 critic_hidden: int = 256, critic_depth: int = 2, value_layer_norm: bool = True,
                 expectile: float = 0.7, n_candidates: int = 64, sampler: str = "idql", selection: str = "max_q",
                 temperature: float = 3.0, greedy: bool = False):
        super().__init__()
        _check_choice("selection", selection, SELECTIONS)
        self._config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.obs_dim, self.act_dim, self.steps = obs_dim, act_dim, diffusion_steps
        self.expectile, self.n_candidates, self.selection = expectile, n_candidates, selection
        self.temperature, self.greedy = temperature, greedy
        self.solver = make_sampler(sampler)
        self.model = actor_model(obs_dim, act_dim, actor_net, hidden, depth, time_dim, actor_dropout, layer_norm,
                                 diffusion_steps, beta_schedule, beta_min, beta_max)
        self.critic = QEnsemble(obs_dim, act_dim, n_critics, critic_hidden, critic_depth)
        self.value = IDQLValue(obs_dim, critic_hidden, critic_depth, value_layer_norm)

    def export_config(self) -> dict[str, Any]:
        return dict(self._config)

    def scores(self, obs: Tensor, actions: Tensor) -> Tensor:
        """What the selection rule ranks (same leading dims as the inputs): min Q for ``max_q``, else the log
        weights of the implicit policy from A = min Q - V."""
        q = self.critic.min(obs, actions)
        if self.selection == "max_q":
            return q
        advantage = q - self.value(obs)
        if self.selection == "expectile":
            return expectile_log_weights(advantage, self.expectile)
        return self.temperature * advantage

    def select(self, obs: Tensor, candidates: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One action per state from ``candidates`` (B, N, act_dim) at states ``obs`` (B, N, obs_dim)."""
        greedy = self.greedy or self.selection == "max_q"
        return choose(candidates, self.scores(obs, candidates), greedy, generator)

    def sample_candidates(self, obs: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(states (B, N, obs_dim), candidate actions (B, N, act_dim)) for states (B, obs_dim)."""
        n = self.n_candidates
        states, actions = candidate_actions(self.model, obs, n, self.act_dim, self.solver, self.steps, generator)
        return states.view(obs.shape[0], n, self.obs_dim), actions.view(obs.shape[0], n, self.act_dim)

    def forward(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        states, candidates = self.sample_candidates(last_observation(obs, self.obs_dim), generator)
        return self.select(states, candidates, generator).unsqueeze(1)


class IDQL(OfflineRLAgent):
    """IDQL agent: each update takes one behaviour-model step, one V step and one Q step (in this order, as the
    official ``update``), then the target update."""

    kind = "idql"
    presets: dict[str, Preset] = PRESETS
    default_batch_size = 512  # launcher/examples/train_ddpm_iql_offline.py

    def __init__(self, config: IDQLConfig, obs_dim: int, act_dim: int, obs_normalizer: Any = None,
                 action_normalizer: Any = None, return_range: float | None = None):
        c = config
        if c.lr_schedule != "constant" and c.total_steps is None:
            raise ValueError(f"IDQL: lr_schedule={c.lr_schedule!r} decays over total_steps, which is None; set "
                             "total_steps (diffrl train fills it with the run's --steps) or use lr_schedule='constant'")
        if c.reward_normalization == "returns":
            if return_range is None:
                raise ValueError("reward_normalization='returns' needs the dataset's episode-return range: build the "
                                 "agent with IDQL.from_dataset or pass return_range=max - min")
            c = dataclasses.replace(c, reward_scale=c.reward_return_range / float(return_range))
        super().__init__(c, obs_dim, act_dim, obs_normalizer, action_normalizer)
        self.actor = actor_model(obs_dim, act_dim, c.actor_net, c.hidden, c.depth, c.time_dim, c.actor_dropout,
                                 c.layer_norm, c.diffusion_steps, c.beta_schedule, c.beta_min, c.beta_max)
        self.critic = DoubleQCritic(obs_dim, act_dim, c.n_critics, c.critic_hidden, c.critic_depth)
        xavier_init_(self.critic.q)
        self.critic.target.load_state_dict(self.critic.q.state_dict())
        self.value = xavier_init_(IDQLValue(obs_dim, c.critic_hidden, c.critic_depth, c.value_layer_norm))
        self.actor_learner = Learner(self.actor, lr=c.actor_lr, weight_decay=c.actor_weight_decay,
                                     lr_schedule=c.lr_schedule, total_steps=c.total_steps, ema_decay=c.ema_decay)
        self.critic_learner = Learner(self.critic, lr=c.critic_lr)
        self.value_learner = Learner(self.value, lr=c.value_lr)
        self.modules = {"actor": self.actor, "critic": self.critic, "value": self.value}
        self.learners = {"actor": self.actor_learner, "critic": self.critic_learner, "value": self.value_learner}

    @classmethod
    def from_dataset(cls, dataset: Any, config: IDQLConfig, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None) -> IDQL:
        """Dimensions, normalisers (as ``obs_normalization`` / ``action_normalization`` ask) and, with
        ``reward_normalization="returns"``, the reward scale from ``dataset``; on ``device``."""
        obs_normalizer, action_normalizer = input_normalizers(dataset, config.obs_normalization,
                                                              config.action_normalization)
        return_range = None
        if config.reward_normalization == "returns":
            return_range = episode_return_range(dataset.episode_returns())
        return cls(config, dataset.obs_dim, dataset.act_dim, obs_normalizer, action_normalizer,
                   return_range=return_range).to(device, dtype)

    def prepare(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Observations and actions as normalised, rewards ``r * reward_scale + reward_shift``."""
        b = super().prepare(batch)
        if self.config.reward_shift:
            b["rewards"] = b["rewards"] + self.config.reward_shift
        return b

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor | float]:
        b = self.prepare(batch)
        c = self.config
        obs, actions = b["obs"], b["actions"]
        bc_loss = self.actor.loss(actions, obs) * self.act_dim  # summed over action dimensions
        actor_info = self.actor_learner.step(bc_loss)
        v = self.value(obs)
        v_loss = iql_value_loss(v, self.critic.target_min(obs, actions), c.expectile)
        self.value_learner.step(v_loss)
        with torch.no_grad():
            next_v = self.value(b["next_obs"])
        q_values = self.critic(obs, actions)
        critic_loss = iql_q_loss(q_values, b["rewards"], b["terminals"], next_v, c.gamma) / q_values.shape[0]
        self.critic_learner.step(critic_loss)
        self.critic.update_target(c.tau)
        return {"value_loss": v_loss.detach(), "critic_loss": critic_loss.detach(), "bc_loss": bc_loss.detach(),
                "q_mean": q_values.mean().detach(), "v_mean": v.mean().detach(), "lr": actor_info["lr"]}

    def build_actor(self, **overrides: Any) -> IDQLActor:
        """The acting module: the EMA actor's weights, the target critics' and V's."""
        c = self.config
        defaults = {"n_candidates": c.n_candidates, "sampler": c.sampler, "selection": c.selection,
                    "temperature": c.temperature, "greedy": c.greedy}
        settings = actor_settings(defaults, overrides, self.kind)
        actor = IDQLActor(self.obs_dim, self.act_dim, c.actor_net, c.hidden, c.depth, c.time_dim, c.actor_dropout,
                          c.layer_norm, c.diffusion_steps, c.beta_schedule, c.beta_min, c.beta_max, c.n_critics,
                          c.critic_hidden, c.critic_depth, c.value_layer_norm, c.expectile, **settings)
        actor.model.load_state_dict(self.actor_learner.ema_module.state_dict())
        actor.critic.load_state_dict(self.critic.target.state_dict())
        actor.value.load_state_dict(self.value.state_dict())
        return actor.eval()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "reward_scale": float(self.config.reward_scale)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "reward_scale" in state:
            self.config = dataclasses.replace(self.config, reward_scale=float(state["reward_scale"]))
