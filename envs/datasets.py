"""Offline datasets as tensors: transitions, episodes, normalisers, sequence windows, and `load_dataset`."""

from __future__ import annotations

import copy
import difflib
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor

NORMALIZABLE_FIELDS = ("observations", "actions", "rewards")


def _float_tensor(x: Any) -> torch.Tensor:
    """A floating tensor as it is (its device and dtype kept); anything else as a float32 tensor."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x
    return torch.as_tensor(x, dtype=torch.float32)


@dataclass
class Normalizer:
    """Z-score normaliser ``(x - mean) / std`` over the trailing feature dims; ``std`` is floored at 1e-6."""

    mean: torch.Tensor
    std: torch.Tensor

    MIN_STD = 1e-6

    def __post_init__(self) -> None:
        self.mean, self.std = _float_tensor(self.mean), _float_tensor(self.std).clamp_min(self.MIN_STD)
        if self.mean.shape != self.std.shape:
            raise ValueError(f"Normalizer mean shape {tuple(self.mean.shape)} != std shape {tuple(self.std.shape)}")

    @classmethod
    def identity(cls, dim: int | Sequence[int] = ()) -> Normalizer:
        """A no-op normaliser (mean 0, std 1) for features of shape ``dim`` (``()`` for scalars)."""
        shape = (dim,) if isinstance(dim, int) else tuple(dim)
        return cls(torch.zeros(shape), torch.ones(shape))

    @classmethod
    def fit(cls, data: ArrayLike) -> Normalizer:
        """Mean and (population) std over the leading axis of ``data``."""
        x = torch.as_tensor(data, dtype=torch.float64)
        return cls(x.mean(0).float(), x.std(0, unbiased=False).float())

    @classmethod
    def limits(cls, data: ArrayLike) -> Normalizer:
        """Per-feature [min, max] of ``data`` mapped to [-1, 1] (Diffuser's ``LimitsNormalizer``)."""
        x = torch.as_tensor(data, dtype=torch.float64)
        low, high = x.min(0).values, x.max(0).values
        return cls(((high + low) / 2).float(), ((high - low) / 2).float())

    def _stats_like(self, x: ArrayLike) -> tuple[Any, Any]:
        if isinstance(x, torch.Tensor):
            dtype = x.dtype if x.is_floating_point() else torch.float32
            return self.mean.to(x.device, dtype), self.std.to(x.device, dtype)
        if isinstance(x, np.ndarray):
            dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
            return self.mean.cpu().numpy().astype(dtype), self.std.cpu().numpy().astype(dtype)
        raise TypeError(f"Normalizer expects a torch.Tensor or np.ndarray, got {type(x).__name__}")

    def normalize(self, x: ArrayLike) -> ArrayLike:
        mean, std = self._stats_like(x)
        return (x - mean) / std

    def denormalize(self, x: ArrayLike) -> ArrayLike:
        mean, std = self._stats_like(x)
        return x * std + mean

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Normalizer:
        """A copy with the statistics on ``device`` / in floating ``dtype`` (so normalising moves nothing)."""
        return Normalizer(self.mean.to(device=device, dtype=dtype), self.std.to(device=device, dtype=dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.cpu().clone(), "std": self.std.cpu().clone()}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> Normalizer:
        return cls(d["mean"], d["std"])


def _returns_to_go(rewards: np.ndarray, starts: np.ndarray, ends: np.ndarray, discount: float) -> np.ndarray:
    """Discounted reward-to-go within each episode ``[start, end)``.

    Episodes are sorted by length so that step ``t`` of every episode longer than ``t`` is updated in one
    vectorised operation: O(N) work, O(max episode length) Python iterations.
    """
    lengths = ends - starts
    order = np.argsort(-lengths, kind="stable")
    s, L = starts[order], lengths[order]
    rtg = np.zeros(len(rewards), dtype=np.float64)
    r = rewards.astype(np.float64)
    neg_L = -L
    for t in range(int(L.max(initial=0)) - 1, -1, -1):
        k = int(np.searchsorted(neg_L, -t, side="left"))  # episodes with length > t
        idx = s[:k] + t
        has_next = (t + 1) < L[:k]
        nxt = np.where(has_next, rtg[np.minimum(idx + 1, len(r) - 1)], 0.0)
        rtg[idx] = r[idx] + discount * nxt
    return rtg


class OfflineDataset:
    """Transitions of an offline dataset as float32 tensors; episodes are stored contiguously in order.

    An episode ends where ``terminals | timeouts`` is true, or at the last index. ``source`` names where the data
    came from (file path or Minari id) and appears in error messages.
    """

    def __init__(
        self,
        observations: ArrayLike,
        actions: ArrayLike,
        rewards: ArrayLike,
        next_observations: ArrayLike | None = None,
        terminals: ArrayLike | None = None,
        timeouts: ArrayLike | None = None,
        *,
        name: str = "dataset",
        env_id: str | None = None,
        ref_min_score: float | None = None,
        ref_max_score: float | None = None,
        source: str | None = None,
        minari_id: str | None = None,
    ) -> None:
        self.name, self.env_id, self.source, self.minari_id = name, env_id, source or name, minari_id
        self.ref_min_score = None if ref_min_score is None else float(ref_min_score)
        self.ref_max_score = None if ref_max_score is None else float(ref_max_score)
        obs = self._float_field("observations", observations, ndim=2)
        n = len(obs)
        act = self._float_field("actions", actions, ndim=2, n=n)
        rew = self._float_field("rewards", rewards, ndim=1, n=n)
        term = self._bool_field("terminals", terminals, n)
        tout = self._bool_field("timeouts", timeouts, n)
        self.observations, self.actions, self.rewards = obs, act, rew
        self.terminals, self.timeouts = term, tout
        ends = term.numpy() | tout.numpy()
        if n:
            ends[-1] = True
        self._ends = np.flatnonzero(ends) + 1
        self._starts = np.concatenate([[0], self._ends[:-1]]).astype(np.int64)
        if next_observations is None:
            self.next_observations = self._derive_next_observations()
        else:
            nxt = self._float_field("next_observations", next_observations, ndim=2, n=n)
            if nxt.shape[1] != obs.shape[1]:
                raise ValueError(f"{self.source}: field 'next_observations' has dim {nxt.shape[1]}, "
                                 f"observations have dim {obs.shape[1]}")
            self.next_observations = nxt
        self._normalizers: dict[str, Normalizer] = {}

    # ----------------------------------------------------------------------------------------- validation
    def _numeric(self, field: str, data: ArrayLike) -> torch.Tensor:
        if isinstance(data, torch.Tensor):
            return data
        array = np.asarray(data)
        if array.dtype.kind not in "biuf":
            raise ValueError(f"{self.source}: field '{field}' must hold numbers, got dtype {array.dtype}")
        return torch.as_tensor(array)

    def _float_field(self, field: str, data: ArrayLike, ndim: int, n: int | None = None) -> torch.Tensor:
        t = self._numeric(field, data)
        if t.ndim == 1 and ndim == 2:
            t = t.reshape(-1, 1)
        elif t.ndim == 2 and ndim == 1 and t.shape[1] == 1:
            t = t[:, 0]
        if t.ndim != ndim:
            raise ValueError(f"{self.source}: field '{field}' must have {ndim} dims, got shape {tuple(t.shape)}")
        if n is not None and len(t) != n:
            raise ValueError(f"{self.source}: length mismatch, field '{field}' has {len(t)} rows but "
                             f"'observations' has {n}")
        t = t.detach().to("cpu", torch.float32).contiguous()
        values = t.numpy()  # numpy's isfinite is much faster than torch's on one thread
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            raise ValueError(f"{self.source}: field '{field}' contains {bad} non-finite values (NaN/inf)")
        return t

    def _bool_field(self, field: str, data: ArrayLike | None, n: int) -> torch.Tensor:
        if data is None:
            return torch.zeros(n, dtype=torch.bool)
        t = self._numeric(field, data).reshape(-1)
        if len(t) != n:
            raise ValueError(f"{self.source}: length mismatch, field '{field}' has {len(t)} rows but "
                             f"'observations' has {n}")
        return t.detach().cpu() != 0

    def _derive_next_observations(self) -> torch.Tensor:
        """``next_obs[i] = obs[i + 1]`` inside episodes; at an episode end (no successor stored) ``obs[i]``."""
        nxt = torch.empty_like(self.observations)
        nxt[:-1] = self.observations[1:]
        last = torch.as_tensor(self._ends - 1)
        nxt[last] = self.observations[last]
        return nxt

    # ----------------------------------------------------------------------------------------- basics
    def __len__(self) -> int:
        return self.observations.shape[0]

    def __repr__(self) -> str:
        return (f"OfflineDataset(name={self.name!r}, env_id={self.env_id!r}, transitions={len(self)}, "
                f"episodes={len(self._starts)}, obs_dim={self.obs_dim}, act_dim={self.act_dim})")

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def act_dim(self) -> int:
        return self.actions.shape[1]

    @property
    def n_episodes(self) -> int:
        return len(self._starts)

    def episode_bounds(self) -> list[tuple[int, int]]:
        """``[start, end)`` index pairs, one per episode, in storage order."""
        return list(zip(self._starts.tolist(), self._ends.tolist(), strict=True))

    def episode_lengths(self) -> np.ndarray:
        return self._ends - self._starts

    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of each episode (float64)."""
        if not len(self):
            return np.zeros(0)
        return np.add.reduceat(self.rewards.cpu().numpy().astype(np.float64), self._starts)

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the transitions (every field's values, dtype and shape): the same data gives the same
        fingerprint wherever it is loaded from."""
        h = hashlib.sha256()
        for field in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts"):
            t = getattr(self, field).detach().cpu().contiguous()
            h.update(f"{field}:{t.dtype}{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def returns_to_go(self, discount: float = 1.0) -> torch.Tensor:
        """(N,) discounted sum of rewards from each step to the end of its episode (the rewards' device, dtype)."""
        rtg = _returns_to_go(self.rewards.cpu().numpy(), self._starts, self._ends, discount)
        return torch.from_numpy(rtg).to(device=self.rewards.device, dtype=self.rewards.dtype)

    @property
    def device(self) -> torch.device:
        return self.observations.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> OfflineDataset:
        """This dataset with every tensor on ``device`` (floating fields in ``dtype``): move it once, and batches
        are then drawn and indexed there."""
        moved = copy.copy(self)
        for field in ("observations", "actions", "rewards", "next_observations"):
            setattr(moved, field, getattr(self, field).to(device=device, dtype=dtype))
        moved.terminals, moved.timeouts = self.terminals.to(device), self.timeouts.to(device)
        moved._normalizers = {}
        return moved

    def normalizer(self, field: str) -> Normalizer:
        """Z-score normaliser fitted on ``observations``, ``actions`` or ``rewards`` (cached)."""
        if field not in NORMALIZABLE_FIELDS:
            raise ValueError(f"normalizer field must be one of {NORMALIZABLE_FIELDS}, got {field!r}")
        if field not in self._normalizers:
            self._normalizers[field] = Normalizer.fit(getattr(self, field))
        return self._normalizers[field]

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Uniform batch of transitions (with replacement); ``terminals`` as float 0/1."""
        if not len(self):
            raise ValueError(f"{self.source}: cannot sample from an empty dataset")
        idx = torch.randint(0, len(self), (batch_size,), generator=generator, device=self.device)
        return {
            "observations": self.observations[idx],
            "actions": self.actions[idx],
            "rewards": self.rewards[idx],
            "next_observations": self.next_observations[idx],
            "terminals": self.terminals[idx].to(self.rewards.dtype),
        }

    def sequences(self, horizon: int, stride: int = 1, pad: bool = True, discount: float = 1.0,
                  pad_before: int = 0, pad_after: int | None = None) -> SequenceDataset:
        """Fixed-length windows over episodes (see `SequenceDataset`)."""
        return SequenceDataset(self, horizon, stride=stride, pad=pad, discount=discount, pad_before=pad_before,
                               pad_after=pad_after)

    def _select(self, idx: slice | np.ndarray, name: str) -> OfflineDataset:
        return OfflineDataset(
            self.observations[idx], self.actions[idx], self.rewards[idx], self.next_observations[idx],
            self.terminals[idx], self.timeouts[idx], name=name, env_id=self.env_id,
            ref_min_score=self.ref_min_score, ref_max_score=self.ref_max_score, source=self.source,
            minari_id=self.minari_id,
        )

    def subset(self, n_episodes: int | None = None, n_transitions: int | None = None) -> OfflineDataset:
        """The first ``n_episodes`` episodes, then at most the first ``n_transitions`` transitions of those."""
        end = len(self)
        if n_episodes is not None:
            if n_episodes < 1:
                raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
            end = int(self._ends[min(n_episodes, self.n_episodes) - 1])
        if n_transitions is not None:
            if n_transitions < 1:
                raise ValueError(f"n_transitions must be >= 1, got {n_transitions}")
            end = min(end, n_transitions)
        return self._select(slice(0, end), self.name)

    def normalized_score(self, returns: ArrayLike | float) -> np.ndarray:
        """D4RL normalised score ``100 * (R - ref_min) / (ref_max - ref_min)``."""
        if self.ref_min_score is None or self.ref_max_score is None:
            raise ValueError(f"dataset {self.name!r} has no reference scores (ref_min_score/ref_max_score); "
                             "cannot compute a normalised score")
        return normalized_score(returns, self.ref_min_score, self.ref_max_score)


def normalized_score(returns: ArrayLike | float, ref_min: float, ref_max: float) -> np.ndarray:
    """``100 * (R - ref_min) / (ref_max - ref_min)`` (D4RL convention)."""
    r = np.asarray(returns.cpu() if isinstance(returns, torch.Tensor) else returns, dtype=np.float64)
    return 100.0 * (r - ref_min) / (ref_max - ref_min)


def concatenate(datasets: Sequence[OfflineDataset], name: str | None = None) -> OfflineDataset:
    """Episodes of several datasets one after another (the last episode of each stays ended)."""
    if not datasets:
        raise ValueError("concatenate needs at least one dataset")
    first = datasets[0]
    for d in datasets[1:]:
        if (d.obs_dim, d.act_dim) != (first.obs_dim, first.act_dim):
            raise ValueError(f"cannot concatenate {d.name!r} (obs {d.obs_dim}, act {d.act_dim}) with "
                             f"{first.name!r} (obs {first.obs_dim}, act {first.act_dim})")
    timeouts = []
    for d in datasets:
        t = d.timeouts.clone()
        if len(d) and not d.terminals[-1]:
            t[-1] = True
        timeouts.append(t)
    return OfflineDataset(
        torch.cat([d.observations for d in datasets]), torch.cat([d.actions for d in datasets]),
        torch.cat([d.rewards for d in datasets]), torch.cat([d.next_observations for d in datasets]),
        torch.cat([d.terminals for d in datasets]), torch.cat(timeouts),
        name=name or "+".join(d.name for d in datasets), env_id=first.env_id,
        ref_min_score=first.ref_min_score, ref_max_score=first.ref_max_score,
    )


class SequenceDataset:
    """Fixed-length windows of ``horizon`` steps over the episodes of an `OfflineDataset`.

    Windows start at every ``stride``-th step of each episode. With ``pad=True`` windows may run past the
    episode end: there ``mask`` is False, observations/actions repeat the last real step, and rewards and
    returns-to-go are 0. With ``pad=False`` only windows that fit inside an episode are kept. ``pad_after``
    bounds the steps past the end a window may hold (None: ``horizon - 1`` with ``pad=True``, 0 without), and
    windows may start up to ``pad_before`` steps before the episode, the first step repeated there (mask False),
    as the ``pad_before`` / ``pad_after`` of the sequence sampler of Chi et al.'s diffusion_policy.
    ``returns_to_go`` is the ``discount``-ed reward-to-go of each step within its episode, computed once.

    Windows are stored as indices; the (M, H, ...) attribute tensors are gathered when accessed, and
    `sample` / ``__getitem__`` gather only the requested windows.
    """

    KEYS = ("observations", "actions", "rewards", "returns_to_go", "mask")

    def __init__(self, dataset: OfflineDataset, horizon: int, stride: int = 1, pad: bool = True,
                 discount: float = 1.0, pad_before: int = 0, pad_after: int | None = None) -> None:
        if horizon < 1 or stride < 1:
            raise ValueError(f"horizon and stride must be >= 1, got horizon={horizon}, stride={stride}")
        pad_after = (horizon - 1 if pad else 0) if pad_after is None else pad_after
        if not (0 <= pad_before < horizon and 0 <= pad_after < horizon):
            raise ValueError(f"pad_before and pad_after must lie in [0, horizon - 1 = {horizon - 1}], got "
                             f"{pad_before}, {pad_after}")
        self.dataset, self.horizon, self.stride, self.pad, self.discount = dataset, horizon, stride, pad, discount
        starts, ends = dataset._starts, dataset._ends
        lengths = ends - starts
        n_windows = np.maximum(lengths - horizon + 1 + pad_before + pad_after, 0)
        n_windows = (n_windows + stride - 1) // stride
        episode = np.repeat(np.arange(len(starts)), n_windows)
        first = np.cumsum(n_windows) - n_windows
        offset = (np.arange(int(n_windows.sum())) - np.repeat(first, n_windows)) * stride - pad_before
        device = dataset.device
        self.episode_index = torch.from_numpy(episode).to(device)
        self.start = torch.from_numpy(starts[episode] + offset).to(device)  # absolute index of each window's start
        self.episode_start = torch.from_numpy(starts[episode]).to(device)
        self.episode_end = torch.from_numpy(ends[episode]).to(device)
        self._steps = torch.arange(horizon, device=device)
        self._rtg = dataset.returns_to_go(discount)

    def __len__(self) -> int:
        return len(self.start)

    def __getitem__(self, idx: torch.Tensor | np.ndarray | Sequence[int] | int) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.start.device)
        pos = self.start[idx].unsqueeze(-1) + self._steps
        begin, end = self.episode_start[idx].unsqueeze(-1), self.episode_end[idx].unsqueeze(-1)
        mask = (pos >= begin) & (pos < end)
        pos = torch.maximum(torch.minimum(pos, end - 1), begin)
        d = self.dataset
        zero = d.rewards.new_zeros(())
        return {
            "observations": d.observations[pos],
            "actions": d.actions[pos],
            "rewards": torch.where(mask, d.rewards[pos], zero),
            "returns_to_go": torch.where(mask, self._rtg[pos], zero),
            "mask": mask,
        }

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Uniform batch of windows (with replacement), keys as `KEYS`."""
        if not len(self):
            raise ValueError(f"no windows of horizon {self.horizon} in {self.dataset.name!r} (pad={self.pad})")
        return self[torch.randint(0, len(self), (batch_size,), generator=generator, device=self.start.device)]

    def _all(self, key: str) -> torch.Tensor:
        return self[torch.arange(len(self), device=self.start.device)][key]

    @property
    def observations(self) -> torch.Tensor:
        return self._all("observations")

    @property
    def actions(self) -> torch.Tensor:
        return self._all("actions")

    @property
    def rewards(self) -> torch.Tensor:
        return self._all("rewards")

    @property
    def returns_to_go(self) -> torch.Tensor:
        return self._all("returns_to_go")

    @property
    def mask(self) -> torch.Tensor:
        return self._all("mask")


# --------------------------------------------------------------------------------------------- loading
_MINARI_ID = re.compile(r"^[\w.-]+(/[\w.-]+)+$")


def load_dataset(spec: str | os.PathLike, *, trust_env: bool = False, **kw: Any) -> OfflineDataset:
    """Load an offline dataset; an empty one is refused.

    ``spec`` is one of: a path to a D4RL-layout ``.hdf5`` file; a D4RL name such as ``"hopper-medium-v2"``
    (looked up in ``$D4RL_DATASET_DIR`` or ``~/.d4rl/datasets``); a Minari id such as
    ``"mujoco/hopper/medium-v0"`` (local storage first, download only when online); or ``"toy:<name>"``
    (see `envs.toy`). ``trust_env`` lets a Minari dataset run the environment entry point it records (see
    `envs.minari_io`). Other keyword arguments go to the specific loader.
    """
    dataset = _load(spec, trust_env, **kw)
    if not len(dataset):
        raise ValueError(f"{dataset.source}: the dataset holds no transitions")
    return dataset


def _load(spec: str | os.PathLike, trust_env: bool, **kw: Any) -> OfflineDataset:
    from envs import d4rl, minari_io, toy

    if isinstance(spec, os.PathLike) or Path(str(spec)).suffix.lower() in (".hdf5", ".h5"):
        return d4rl.read_d4rl_hdf5(spec, **kw)
    spec = str(spec)
    if spec.startswith("toy:"):
        return toy.load_toy(spec[len("toy:"):], **kw)
    if d4rl.is_d4rl_name(spec):
        return d4rl.load_d4rl_name(spec, **kw)
    if _MINARI_ID.match(spec) and not os.path.exists(spec):
        return minari_io.load_minari(spec, trust_env=trust_env, **kw)
    if os.path.exists(spec):
        return d4rl.read_d4rl_hdf5(spec, **kw)
    candidates = d4rl.known_names() + toy.known_names() + minari_io.local_dataset_ids()
    close = difflib.get_close_matches(spec, candidates, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(
        f"unknown dataset {spec!r}: not a file, a D4RL name (e.g. 'hopper-medium-v2'), a Minari id "
        f"(e.g. 'mujoco/hopper/medium-v0') or a toy dataset ('toy:pointnav').{hint}")
