"""Minari datasets <-> `OfflineDataset`, and recovering the Gymnasium env of a dataset.

A Minari dataset records its environment as a Gymnasium ``EnvSpec`` whose entry point names python code. That
code runs only with ``trust_env=True`` (``diffrl --trust-dataset-env``); otherwise the recorded id must be a
registered Gymnasium id, which is then built from the registry's own entry point with the recorded settings.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import gymnasium as gym
import minari
import numpy as np
from minari.data_collector import EpisodeBuffer
from minari.storage.datasets_root_dir import get_dataset_path

from envs import d4rl
from envs.datasets import OfflineDataset


def local_dataset_ids() -> list[str]:
    """Ids of the readable Minari datasets in local storage (``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets``).

    Broken folders are left out silently; opening one by its id says what is wrong with it."""
    try:
        with warnings.catch_warnings():  # Minari warns about every misconfigured folder it passes
            warnings.simplefilter("ignore")
            return sorted(minari.list_local_datasets())
    except (OSError, ValueError):
        return []


def _metadata(dataset_id: str) -> dict[str, Any]:
    """The ``data/metadata.json`` of a local Minari dataset, read as plain JSON."""
    folder = get_dataset_path(dataset_id)
    path = folder / "data" / "metadata.json"
    if not path.is_file():
        raise ValueError(f"Minari dataset {dataset_id!r} at {folder} is incomplete: it has no data/metadata.json")
    try:
        metadata = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is damaged: {e}") from e
    if not isinstance(metadata, dict):
        raise ValueError(f"{path} is damaged: expected a JSON object, got {type(metadata).__name__}")
    return metadata


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _online() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("0", "false", "")


def _flatten(data: Any, space: gym.Space, field: str, dataset_id: str) -> np.ndarray:
    """Per-episode data of a Box space, or a Dict/Tuple of Boxes concatenated in space order, as (T, d)."""
    if isinstance(space, gym.spaces.Box):
        arr = np.asarray(data, dtype=np.float32)
        return arr.reshape(len(arr), -1)
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([_flatten(data[k], s, field, dataset_id) for k, s in space.spaces.items()], 1)
    if isinstance(space, gym.spaces.Tuple):
        return np.concatenate([_flatten(data[i], s, field, dataset_id) for i, s in enumerate(space.spaces)], 1)
    raise ValueError(f"Minari dataset {dataset_id!r}: {field} space {space} is not supported "
                     "(only Box spaces, or Dict/Tuple of Box spaces, which are flattened)")


def open_minari(dataset_id: str, download: bool | None = None, trust_env: bool = False) -> minari.MinariDataset:
    """Open a Minari dataset from local storage; download it only when ``download`` (default: when online).

    A dataset that records no observation or action space is refused unless ``trust_env``: Minari would build
    its environment from the recorded entry point to find them."""
    folder = get_dataset_path(dataset_id)
    if not folder.exists():
        download = _online() if download is None else download
        if not download:
            raise FileNotFoundError(
                f"Minari dataset {dataset_id!r} is not in local storage ({get_dataset_path()}; set "
                "MINARI_DATASETS_PATH to change) and remote download is off (offline: HF_HUB_OFFLINE=1, or "
                f"download=False). Download it when online with `minari download {dataset_id}`.")
        try:
            minari.download_dataset(dataset_id)
        except Exception as e:  # minari/huggingface raise many error types for a failed download
            raise FileNotFoundError(f"Minari dataset {dataset_id!r} is not in local storage ({get_dataset_path()}) "
                                    f"and downloading it failed: {e}") from e
    metadata = _metadata(dataset_id)
    if not trust_env and not {"observation_space", "action_space"} <= metadata.keys():
        raise ValueError(f"Minari dataset {dataset_id!r} records no observation or action space: Minari would run "
                         "the environment entry point the dataset names to find them; pass --trust-dataset-env "
                         "(trust_env=True) only if you trust the dataset")
    try:
        return minari.load_dataset(dataset_id)
    except Exception as e:  # minari raises assertion, key and value errors for damaged metadata
        raise ValueError(f"Minari dataset {dataset_id!r} at {folder} cannot be opened: {_one_line(e)}") from e


def load_minari(dataset_id: str, download: bool | None = None, trust_env: bool = False) -> OfflineDataset:
    """Load a Minari dataset as an `OfflineDataset` (episodes concatenated, observations flattened)."""
    ds = open_minari(dataset_id, download, trust_env)
    try:
        return _to_offline(ds, dataset_id)
    except (OSError, KeyError) as e:  # h5py: a truncated or damaged data file
        raise ValueError(f"Minari dataset {dataset_id!r} at {get_dataset_path(dataset_id)}: cannot read its "
                         f"episodes ({_one_line(e)})") from e


def _to_offline(ds: minari.MinariDataset, dataset_id: str) -> OfflineDataset:
    obs_space, act_space = ds.observation_space, ds.action_space
    fields: dict[str, list[np.ndarray]] = {k: [] for k in ("obs", "next", "act", "rew", "term", "tout")}
    for ep in ds.storage.get_episodes(range(ds.total_episodes)):
        obs = _flatten(ep["observations"], obs_space, "observation", dataset_id)
        term = np.asarray(ep["terminations"], dtype=bool)
        tout = np.asarray(ep["truncations"], dtype=bool).copy()
        if len(term) and not term[-1]:
            tout[-1] = True  # an episode stored without a final flag still ends here
        fields["obs"].append(obs[:-1])
        fields["next"].append(obs[1:])
        fields["act"].append(_flatten(ep["actions"], act_space, "action", dataset_id))
        fields["rew"].append(np.asarray(ep["rewards"], dtype=np.float32))
        fields["term"].append(term)
        fields["tout"].append(tout)
    if not fields["obs"]:
        raise ValueError(f"Minari dataset {dataset_id!r} has no episodes")
    data = {k: np.concatenate(v) for k, v in fields.items()}
    meta = ds.storage.metadata
    env_id = ds.env_spec.id if ds.env_spec is not None else None
    ref_min, ref_max = meta.get("ref_min_score"), meta.get("ref_max_score")
    return OfflineDataset(data["obs"], data["act"], data["rew"], data["next"], data["term"], data["tout"],
                          name=dataset_id, env_id=env_id, ref_min_score=ref_min, ref_max_score=ref_max,
                          source=f"minari:{dataset_id}", minari_id=dataset_id)


def write_minari(dataset: OfflineDataset, dataset_id: str, env: str | gym.Env | None = None, replace: bool = False,
                 **metadata: Any) -> minari.MinariDataset:
    """Write ``dataset`` as a Minari dataset (HDF5 format) under ``dataset_id`` in Minari's local storage
    (``replace``: a local dataset of that id is deleted first).

    ``env`` (default: ``dataset.env_id``) gives the spaces and the recoverable env; without one, unbounded Box
    spaces of the dataset's dims are used. Extra ``metadata`` (author, algorithm_name, description, ...) is
    passed to `minari.create_dataset_from_buffers`.
    """
    obs, nxt, act = dataset.observations.numpy(), dataset.next_observations.numpy(), dataset.actions.numpy()
    rew, term, tout = dataset.rewards.numpy(), dataset.terminals.numpy(), dataset.timeouts.numpy()
    buffers = []
    for i, (s, e) in enumerate(dataset.episode_bounds()):
        truncations = tout[s:e].copy()
        truncations[-1] = not term[e - 1]
        buffers.append(EpisodeBuffer(
            id=i, observations=np.concatenate([obs[s:e], nxt[e - 1:e]]), actions=act[s:e],
            rewards=rew[s:e], terminations=term[s:e], truncations=truncations))
    env = env if env is not None else dataset.env_id
    spaces = {}
    if env is None:
        spaces = {"observation_space": gym.spaces.Box(-np.inf, np.inf, (dataset.obs_dim,), np.float32),
                  "action_space": gym.spaces.Box(-np.inf, np.inf, (dataset.act_dim,), np.float32)}
    if dataset.ref_min_score is not None and dataset.ref_max_score is not None:
        metadata = {"ref_min_score": dataset.ref_min_score, "ref_max_score": dataset.ref_max_score, **metadata}
    if replace and dataset_id in local_dataset_ids():
        minari.delete_dataset(dataset_id)
    with warnings.catch_warnings():  # Minari recommends optional metadata (permalink, email, eval env) loudly
        warnings.filterwarnings("ignore", message=".*(is set to None|env_spec is None)", category=UserWarning)
        return minari.create_dataset_from_buffers(dataset_id, buffers, env=env, data_format="hdf5", **spaces,
                                                  **metadata)


def _minari_env(dataset_id: str, trust_env: bool, **kwargs: Any) -> gym.Env:
    """The evaluation env a local Minari dataset records (else its data-collection env): from the recorded entry
    point when ``trust_env``, else the registered Gymnasium env of the recorded id with the recorded settings."""
    if trust_env:
        return minari.load_dataset(dataset_id).recover_environment(eval_env=True, **kwargs)
    metadata = _metadata(dataset_id)
    recorded = metadata.get("eval_env_spec") or metadata.get("env_spec")
    if recorded is None:
        raise ValueError(f"Minari dataset {dataset_id!r} records no environment; pass an env id")
    try:
        spec = json.loads(recorded)
        env_id, settings, max_steps = spec["id"], dict(spec.get("kwargs") or {}), spec.get("max_episode_steps")
        if not isinstance(env_id, str):
            raise TypeError(f"its id is {env_id!r}")
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"Minari dataset {dataset_id!r}: its recorded environment is damaged ({e})") from e
    if env_id not in gym.registry:
        raise ValueError(f"Minari dataset {dataset_id!r} names the environment {env_id!r}, which is not a registered "
                         "Gymnasium id; a dataset's environment is built only from registered ids unless you pass "
                         "--trust-dataset-env (trust_env=True), which runs the entry point the dataset names")
    options = {**settings, **({"max_episode_steps": max_steps} if max_steps else {}), **kwargs}
    try:
        return gym.make(env_id, **options)
    except TypeError as e:
        raise ValueError(f"the registered environment {env_id!r} does not accept the settings Minari dataset "
                         f"{dataset_id!r} records: {e}") from e


def make_env(dataset_or_env_id: OfflineDataset | str, trust_env: bool = False, **kwargs: Any) -> gym.Env:
    """The Gymnasium env of a dataset or id.

    Accepts an `OfflineDataset` (its Minari env when recoverable, else its ``env_id``), a registered Gymnasium
    id, a D4RL name (``"hopper-medium-v2"`` -> ``Hopper-v5``), a local Minari id, or ``"toy:pointnav"``.
    A Minari dataset's environment runs the entry point the dataset records only with ``trust_env``; otherwise
    its recorded id must be registered with Gymnasium. ``kwargs`` go to `gymnasium.make`.
    """
    from envs import toy

    if isinstance(dataset_or_env_id, OfflineDataset):
        ds = dataset_or_env_id
        if ds.minari_id is not None and ds.minari_id in local_dataset_ids():
            return _minari_env(ds.minari_id, trust_env, **kwargs)
        if ds.env_id is None:
            raise ValueError(f"dataset {ds.name!r} records no environment (env_id is None); pass an env id")
        return make_env(ds.env_id, trust_env, **kwargs)
    name = str(dataset_or_env_id)
    if name in gym.registry:
        return gym.make(name, **kwargs)
    if name == "toy:pointnav":
        return gym.make(toy.POINTNAV_ID, **kwargs)
    if d4rl.is_d4rl_name(name):
        return gym.make(d4rl.gym_env_id(name), **kwargs)
    if name in local_dataset_ids():
        return _minari_env(name, trust_env, **kwargs)
    if "/" in name and d4rl.gym_env_id(name):
        return gym.make(d4rl.gym_env_id(name), **kwargs)  # e.g. "mujoco/hopper/medium-v0" not downloaded
    raise ValueError(f"cannot make an environment for {name!r}: not a registered Gymnasium id, D4RL name, "
                     "local Minari dataset or toy env")
