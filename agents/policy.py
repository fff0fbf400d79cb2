"""The controller-facing policy shared by every agent: numpy in, numpy out, state (history, action queue) inside.

An agent builds an *actor module*: an ``nn.Module`` with ``forward(obs (B, n_obs_steps, obs_dim) normalised,
generator=None) -> (B, n_actions, act_dim) normalised actions`` whose first action is the one to execute now, and
``export_config() -> dict`` (plain data) from which the registered builder rebuilds it. :class:`Policy` wraps it with
observation/action normalisation, an observation history, a receding-horizon action queue, seeding, clipping to
the action bounds, checkpoint files and TorchScript export.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffrl.checkpoint import CheckpointError, load_checkpoint, nonfinite_tensors, save_checkpoint
from diffrl.device import autocast, check_precision, module_dtype, resolve_device

#: kind -> builder(config dict) -> actor module.
ACTORS: dict[str, Callable[[dict], nn.Module]] = {}
CHECKPOINT_KIND = "policy"


def register_actor(kind: str) -> Callable:
    """Register an actor class (built as ``cls(**config)``) or a builder function ``fn(config) -> module``.

    A decorated class gets ``actor_kind = kind``; a builder function's modules get it set when built.
    """
    def decorate(obj):
        if kind in ACTORS:
            raise ValueError(f"actor kind {kind!r} is already registered")
        if isinstance(obj, type):
            obj.actor_kind = kind
            ACTORS[kind] = lambda config: obj(**config)
        else:
            def build(config: dict) -> nn.Module:
                module = obj(config)
                module.actor_kind = kind
                return module
            ACTORS[kind] = build
        return obj
    return decorate


def build_actor(kind: str, config: dict) -> nn.Module:
    """Rebuild a registered actor from its ``export_config()``."""
    if kind not in ACTORS:
        import agents  # noqa: F401  (registers the actors of the bundled agents)
    if kind not in ACTORS:
        raise KeyError(f"no actor registered as {kind!r}; known kinds: {sorted(ACTORS)}")
    return ACTORS[kind](dict(config))


def _affine(normalizer: Any, dim: int | None, name: str) -> tuple[Tensor, Tensor]:
    """(mean, std) float32 tensors of a normaliser with ``.mean``/``.std`` (None: identity)."""
    if normalizer is None:
        if dim is None:
            return torch.zeros(()), torch.ones(())
        return torch.zeros(dim), torch.ones(dim)
    if not (hasattr(normalizer, "mean") and hasattr(normalizer, "std")):
        raise TypeError(f"{name} must have .mean and .std (e.g. envs.datasets.Normalizer), got {type(normalizer)}")
    mean = torch.as_tensor(normalizer.mean, dtype=torch.float32).detach().clone()
    std = torch.as_tensor(normalizer.std, dtype=torch.float32).detach().clone()
    if mean.shape != std.shape or (dim is not None and mean.dim() and mean.shape[-1] != dim):
        raise ValueError(f"{name} has mean {tuple(mean.shape)} / std {tuple(std.shape)}, expected ({dim},)")
    return mean, std


def _bound(value: Any, act_dim: int | None, name: str) -> Tensor | None:
    if value is None:
        return None
    bound = torch.as_tensor(np.asarray(value, dtype=np.float32))
    if bound.dim() > 1 or (act_dim is not None and bound.dim() == 1 and bound.numel() != act_dim):
        raise ValueError(f"{name} must be a scalar or have shape ({act_dim},), got {tuple(bound.shape)}")
    return bound


def _dims(actor: nn.Module, config: dict, obs_dim: int | None, act_dim: int | None,
          obs_norm: Any) -> tuple[int, int | None]:
    obs_dim = obs_dim or getattr(actor, "obs_dim", None) or config.get("obs_dim")
    if obs_dim is None and obs_norm is not None and np.ndim(obs_norm.mean) == 1:
        obs_dim = len(obs_norm.mean)
    if obs_dim is None:
        raise ValueError("cannot tell the observation size: pass obs_dim or give the actor an obs_dim attribute")
    return int(obs_dim), act_dim or getattr(actor, "act_dim", None) or config.get("act_dim")


class Policy:
    """Wraps an actor module for control loops.

    ``act(obs)`` takes one observation (obs_dim,) or a batch (n, obs_dim) as numpy and returns (act_dim,) or
    (n, act_dim) float32 actions in the environment's units. Observations are normalised, the last
    ``n_obs_steps`` are kept (the first one repeated after ``reset()``), and the actor is queried only when the
    queue of planned actions is empty, after which the first ``n_action_steps`` actions are executed one per call.
    Each row of a batch has its own history and queue: ``reset_envs(mask)`` restarts some rows only (vectorised
    environments whose episodes end at different steps). ``predict_action_chunk(obs_history)`` is the stateless
    step underneath: a history in, the next ``n_action_steps`` actions out. With ``seed`` set, ``reset()``
    re-seeds the sampler, so the same seed gives the same actions.

    Observations are checked after the cast to the policy's dtype (so a float64 value beyond its range is refused,
    not turned into infinity), and a planned chunk is checked for NaN / infinity before it enters the queue: a
    refused call leaves the history and the queue as they were.
    """

    def __init__(self, actor: nn.Module, obs_normalizer: Any = None, action_normalizer: Any = None,
                 n_obs_steps: int = 1, n_action_steps: int = 1, action_low: Any = None, action_high: Any = None,
                 seed: int | None = None, obs_dim: int | None = None, act_dim: int | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None, precision: str = "fp32"):
        if n_obs_steps < 1 or n_action_steps < 1:
            raise ValueError(f"n_obs_steps and n_action_steps must be >= 1, got {n_obs_steps}, {n_action_steps}")
        if not hasattr(actor, "export_config"):
            raise TypeError(f"actor {type(actor).__name__} has no export_config(); see agents.policy")
        self.device = resolve_device(device)
        self.actor = actor.to(self.device, dtype).eval()
        self.dtype = module_dtype(self.actor)
        self.precision = check_precision(precision)
        self.obs_dim, self.act_dim = _dims(actor, actor.export_config(), obs_dim, act_dim, obs_normalizer)
        self.n_obs_steps, self.n_action_steps = int(n_obs_steps), int(n_action_steps)
        place = {"device": self.device, "dtype": self.dtype}
        self._obs_mean, self._obs_std = (t.to(**place) for t in _affine(obs_normalizer, self.obs_dim,
                                                                        "obs_normalizer"))
        self._act_mean, self._act_std = (t.to(**place) for t in _affine(action_normalizer, self.act_dim,
                                                                        "action_normalizer"))
        self._obs_inv_std = 1.0 / self._obs_std
        self.action_low = _bound(action_low, self.act_dim, "action_low")
        self.action_high = _bound(action_high, self.act_dim, "action_high")
        self._low, self._high = (None if b is None else b.to(**place) for b in (self.action_low, self.action_high))
        self.seed = seed
        self._generator = torch.Generator(self.device) if seed is not None else None
        # Actors that differentiate while sampling (gradient guidance) cannot run under inference_mode.
        self._no_grad = torch.no_grad if getattr(actor, "needs_grad", False) else torch.inference_mode
        self.reset()

    # ------------------------------------------------------------------------------------------- control
    def reset(self, seed: int | None = None) -> None:
        """Start a new episode: clear the history and the action queue; re-seed (``seed`` replaces the stored one)."""
        if seed is not None:
            self.seed = seed
            self._generator = self._generator or torch.Generator(self.device)
        if self._generator is not None:
            self._generator.manual_seed(int(self.seed))
        self._history: Tensor | None = None  # (B, n_obs_steps, obs_dim), normalised
        self._queue: np.ndarray | None = None  # (B, n_action_steps, act_dim) planned actions
        self._queue_pos: np.ndarray | None = None  # (B,) next queued action of each row
        self._fresh: np.ndarray | None = None  # (B,) rows whose history restarts at the next call

    def reset_envs(self, envs: Any) -> None:
        """Start a new episode in some rows of a batch only: the rows ``envs`` (a boolean mask over the batch, or
        row indices) lose their history and queued actions, the others keep theirs; nothing is re-seeded."""
        if self._history is None:  # nothing kept yet: every row starts afresh anyway
            return
        rows = np.zeros(self._history.shape[0], dtype=bool)
        chosen = np.asarray(envs)
        if chosen.dtype == bool and chosen.shape != rows.shape:
            raise ValueError(f"reset_envs mask has shape {chosen.shape}, the policy's batch has {len(rows)} rows")
        rows[chosen] = True
        self._fresh = self._fresh | rows
        self._queue_pos = np.where(rows, self.n_action_steps, self._queue_pos)

    def _check(self, obs: Any, history: bool = False) -> Tensor:
        """``obs`` (or an observation history) as a CPU tensor of the policy's dtype, after checking its type,
        shape and values."""
        shape = (self.n_obs_steps, self.obs_dim) if history else (self.obs_dim,)
        what = "observation history" if history else "observation"
        expected = f"{shape} or (n, {', '.join(str(d) for d in shape)})"
        x = obs if isinstance(obs, np.ndarray) else np.asarray(obs)
        if x.dtype.kind not in "fiu":
            raise TypeError(f"{what} must be a numeric array of shape {expected}, got dtype {x.dtype}")
        if x.ndim not in (len(shape), len(shape) + 1) or x.shape[-len(shape):] != shape:
            raise ValueError(f"{what} must have shape {expected}, got {x.shape}")
        if x.shape[0] == 0:
            raise ValueError(f"{what} batch is empty (shape {x.shape}); give at least one observation")
        t = torch.as_tensor(np.ascontiguousarray(x), dtype=self.dtype)
        if not bool(torch.isfinite(t).all()):  # checked after the cast: 1e300 is infinite in float32
            raise ValueError(f"{what} contains NaN or infinite values, or values beyond the range of the "
                             f"policy's {str(self.dtype).removeprefix('torch.')}")
        return t

    def _normalize(self, obs: Tensor) -> Tensor:
        return (obs.to(self.device) - self._obs_mean) * self._obs_inv_std

    def predict_action_chunk(self, obs_history: Any) -> np.ndarray:
        """The next ``n_action_steps`` actions for a raw observation history, oldest first: (n_obs_steps, obs_dim)
        -> (n_action_steps, act_dim), or a batch (n, n_obs_steps, obs_dim) -> (n, n_action_steps, act_dim).
        Stateless: the history and queue of ``act`` are left as they are (the sampler's random stream advances)."""
        t = self._check(obs_history, history=True)
        chunk = self._plan(self._normalize(t.view(-1, self.n_obs_steps, self.obs_dim)))
        return chunk[0] if t.dim() == 2 else chunk

    def act(self, obs: np.ndarray) -> np.ndarray:
        """The action(s) to execute now for observation(s) ``obs``."""
        t = self._check(obs)
        single = t.dim() == 1
        t = self._normalize(t.view(-1, 1, self.obs_dim))
        if self.n_obs_steps == 1 and self.n_action_steps == 1:  # stateless: any batch size on every call
            action = self._plan(t)[:, 0]
            return action[0] if single else action
        batch = t.shape[0]
        if self._history is None:
            history = t.expand(batch, self.n_obs_steps, self.obs_dim).clone()
            queue, pos = None, np.full(batch, self.n_action_steps)
        else:
            if self._history.shape[0] != batch:
                raise ValueError(f"batch size changed from {self._history.shape[0]} to {batch} without reset()")
            history = torch.cat([self._history[:, 1:], t], dim=1)
            if self._fresh.any():
                rows = torch.from_numpy(self._fresh).to(self.device)
                history[rows] = t[rows].expand(-1, self.n_obs_steps, -1)
            queue, pos = self._queue, self._queue_pos.copy()
        due = pos >= self.n_action_steps
        if due.all():  # raises before any state changes when the plan is not finite
            queue = self._plan(history)
        elif due.any():
            queue = queue.copy()
            queue[due] = self._plan(history[torch.from_numpy(due).to(self.device)])
        pos[due] = 0
        self._history, self._queue, self._queue_pos = history, queue, pos + 1
        self._fresh = np.zeros(batch, dtype=bool)
        action = queue[np.arange(batch), pos]
        return action[0] if single else action

    def _plan(self, history: Tensor) -> np.ndarray:
        """Query the actor; returns the next ``n_action_steps`` raw actions (B, k, act_dim) as numpy."""
        with self._no_grad(), autocast(self.device, self.precision):
            actions = self.actor(history, self._generator)
            if actions.dim() != 3 or actions.shape[0] != history.shape[0]:
                raise RuntimeError(f"actor returned shape {tuple(actions.shape)}, expected (B, n_actions, act_dim)")
            actions = self._postprocess(actions[:, : self.n_action_steps])
        planned = actions.float().cpu().numpy()
        if not np.isfinite(planned).all():
            raise RuntimeError("the actor produced NaN or infinite actions (non-finite weights or normaliser?)")
        return planned

    def _postprocess(self, actions: Tensor) -> Tensor:
        actions = torch.addcmul(self._act_mean, actions, self._act_std)
        if self._low is not None or self._high is not None:
            actions = actions.clamp(self._low, self._high)
        return actions

    # ------------------------------------------------------------------------------------------- files
    def _payload(self) -> dict:
        actor = self.actor
        kind = getattr(actor, "actor_kind", None)
        if kind is None:
            raise TypeError(f"{type(actor).__name__} is not a registered actor; decorate it with @register_actor")
        return {
            "actor_kind": kind,
            "actor_config": actor.export_config(),
            "actor_state": {k: v.detach().cpu() for k, v in actor.state_dict().items()},
            "policy": {
                "obs_mean": self._obs_mean.cpu(), "obs_std": self._obs_std.cpu(),
                "act_mean": self._act_mean.cpu(), "act_std": self._act_std.cpu(),
                "n_obs_steps": self.n_obs_steps, "n_action_steps": self.n_action_steps,
                "action_low": self.action_low, "action_high": self.action_high, "seed": self.seed,
                "obs_dim": self.obs_dim, "act_dim": self.act_dim, "dtype": str(self.dtype).removeprefix("torch."),
            },
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the policy (actor config and weights, normalisers, execution settings) to a checkpoint file;
        weights or normalisers holding NaN or infinity are refused."""
        payload = self._payload()
        settings = payload["policy"]
        bad = nonfinite_tensors({"actor_state": payload["actor_state"],
                                 **{k: settings[k] for k in ("obs_mean", "obs_std", "act_mean", "act_std")}})
        if bad:
            raise ValueError(f"not saving the policy to {path}: {', '.join(bad[:3])} hold NaN or infinite values")
        return save_checkpoint(path, payload, kind=CHECKPOINT_KIND)

    def export_torchscript(self, path: str | os.PathLike, batch_size: int = 1) -> Path:
        """Save the policy as a TorchScript module that needs only torch (``torch.jit.load``, ``torch::jit::load``):

        - ``forward(obs_history)``: raw observations (B, n_obs_steps, obs_dim), oldest first -> raw actions
          (B, n_action_steps, act_dim): normalisation, sampling and clipping inside, no state (as
          :meth:`predict_action_chunk`);
        - ``reset()`` and ``act(obs)``: (obs_dim,) -> (act_dim,) or (B, obs_dim) -> (B, act_dim), with the
          observation history and the action queue inside (as :meth:`act`; ``reset()`` at every episode start);
        - attributes ``n_obs_steps``, ``n_action_steps``, ``obs_dim``, ``act_dim`` and the buffers ``obs_mean``,
          ``obs_std``, ``act_mean``, ``act_std``, ``action_low``, ``action_high`` (infinite where unbounded).

        Noise comes from torch's global generator: after ``torch.manual_seed(s)`` in the loading process the
        module acts as this policy with seed ``s``. Actors that differentiate a guide network while sampling
        (QGPO, value-guided Diffuser) cannot be traced.
        """
        if getattr(self.actor, "needs_grad", False):
            raise ValueError(f"{type(self.actor).__name__} takes gradients of a guide network while sampling, which "
                             "TorchScript tracing cannot record; deploy it with Policy.save / load_policy instead")
        example = torch.zeros(batch_size, self.n_obs_steps, self.obs_dim, device=self.device, dtype=self.dtype)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit still serves plain torch.jit.load users
            plan = torch.jit.trace(_Planner(self).eval(), (example,), check_trace=False)
            module = torch.jit.script(_Controller(plan, self))
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.jit.save(module, str(path))
        return path


class _Planner(nn.Module):
    """One planning step in raw units, for tracing: history (B, n_obs_steps, obs_dim) -> (B, n_action_steps,
    act_dim), computed as :meth:`Policy._plan` computes it."""

    def __init__(self, policy: Policy):
        super().__init__()
        self.actor = policy.actor
        self.n_action_steps = policy.n_action_steps
        for name in ("_obs_mean", "_obs_inv_std", "_act_mean", "_act_std"):
            self.register_buffer(name.lstrip("_"), getattr(policy, name).clone())
        self.low, self.high = policy._low, policy._high

    def forward(self, obs: Tensor) -> Tensor:
        actions = self.actor((obs - self.obs_mean) * self.obs_inv_std, None)[:, : self.n_action_steps]
        actions = torch.addcmul(self.act_mean, actions, self.act_std)
        if self.low is not None or self.high is not None:
            actions = actions.clamp(self.low, self.high)
        return actions


class _Controller(nn.Module):
    """The exported module (scripted): the traced planning step with the settings, the normalisers, the
    observation history and the action queue around it (see :meth:`Policy.export_torchscript`)."""

    def __init__(self, plan: nn.Module, policy: Policy):
        super().__init__()
        self.plan = plan
        self.n_obs_steps, self.n_action_steps = policy.n_obs_steps, policy.n_action_steps
        self.obs_dim, self.act_dim = policy.obs_dim, int(policy.act_dim)
        place = {"device": policy.device, "dtype": policy.dtype}
        for name in ("obs_mean", "obs_std", "act_mean", "act_std"):
            self.register_buffer(name, getattr(policy, f"_{name}").clone())
        for name, bound, unbounded in (("action_low", policy._low, -math.inf), ("action_high", policy._high, math.inf)):
            value = torch.full((self.act_dim,), unbounded, **place) if bound is None else bound.expand(self.act_dim)
            self.register_buffer(name, value.clone())
        self.register_buffer("history", torch.zeros(0, self.n_obs_steps, self.obs_dim, **place))
        self.register_buffer("queue", torch.zeros(0, self.n_action_steps, self.act_dim, **place))
        self.queue_pos = 0

    def forward(self, obs_history: Tensor) -> Tensor:
        with torch.no_grad():
            return self.plan(obs_history)

    @torch.jit.export
    def reset(self) -> None:
        """Start a new episode: forget the history and the queued actions."""
        self.history = self.history[:0]
        self.queue = self.queue[:0]
        self.queue_pos = 0

    @torch.jit.export
    def act(self, obs: Tensor) -> Tensor:
        """The action(s) to execute now for raw observation(s) (obs_dim,) or (B, obs_dim)."""
        x = obs.to(self.obs_mean.dtype).reshape(-1, 1, self.obs_dim)
        if self.n_obs_steps == 1 and self.n_action_steps == 1:
            action = self.forward(x)[:, 0]
        else:
            if self.history.shape[0] != 0 and self.history.shape[0] != x.shape[0]:
                raise RuntimeError("the batch size changed without reset()")
            if self.history.shape[0] == 0:
                history = x.expand(x.shape[0], self.n_obs_steps, self.obs_dim).clone()
            else:
                history = torch.cat([self.history[:, 1:], x], dim=1)
            if self.queue.shape[0] == 0 or self.queue_pos >= self.n_action_steps:
                self.queue = self.forward(history)
                self.queue_pos = 0
            self.history = history
            action = self.queue[:, self.queue_pos]
            self.queue_pos += 1
        return action[0] if obs.dim() == 1 else action


def load_policy(path: str | os.PathLike, seed: int | None = None, device: str | torch.device = "cpu",
                precision: str = "fp32") -> Policy:
    """Rebuild a :class:`Policy` saved with :meth:`Policy.save` on ``device`` (``seed`` overrides the stored one).

    The actor gets the dtype it was saved in (float32 for files that do not say)."""
    payload = load_checkpoint(path, expected_kind=CHECKPOINT_KIND)
    try:
        kind, config, state, settings = (payload[k] for k in ("actor_kind", "actor_config", "actor_state", "policy"))
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is a policy checkpoint without {e}; it was written by an incompatible version") \
            from e
    try:
        actor = build_actor(kind, config)
    except KeyError as e:
        raise CheckpointError(f"{path}: {e.args[0]}") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot rebuild the {kind!r} actor from its stored config: {e}") from e
    try:
        actor.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the stored weights do not fit the {kind!r} actor: {e}") from e
    from types import SimpleNamespace

    return Policy(
        actor,
        obs_normalizer=SimpleNamespace(mean=settings["obs_mean"], std=settings["obs_std"]),
        action_normalizer=SimpleNamespace(mean=settings["act_mean"], std=settings["act_std"]),
        n_obs_steps=settings["n_obs_steps"], n_action_steps=settings["n_action_steps"],
        action_low=settings["action_low"], action_high=settings["action_high"],
        seed=settings["seed"] if seed is None else seed, obs_dim=settings["obs_dim"], act_dim=settings["act_dim"],
        device=device, dtype=_stored_dtype(path, settings.get("dtype", "float32")), precision=precision,
    )


def _stored_dtype(path: str | os.PathLike, name: str) -> torch.dtype:
    """The floating dtype a policy file names (a plain lookup: nothing from the file is evaluated)."""
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
             "float64": torch.float64}.get(name)
    if dtype is None:
        raise CheckpointError(f"{path}: unknown policy dtype {name!r}")
    return dtype
