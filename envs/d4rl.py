"""Reader and writer for the D4RL HDF5 layout, and D4RL's reference scores for score normalisation."""

from __future__ import annotations

import os
import re
from pathlib import Path

import h5py
import numpy as np

from envs.datasets import OfflineDataset

# Reference returns of a random policy (min) and an expert policy (max) for the Gym-MuJoCo locomotion tasks,
# from D4RL's d4rl/infos.py (REF_MIN_SCORE / REF_MAX_SCORE; identical across dataset levels and versions).
REF_MIN_SCORE: dict[str, float] = {
    "hopper": -20.272305,
    "halfcheetah": -280.178953,
    "walker2d": 1.629008,
    "ant": -325.6,
}
REF_MAX_SCORE: dict[str, float] = {
    "hopper": 3234.3,
    "halfcheetah": 12135.0,
    "walker2d": 4592.3,
    "ant": 3879.7,
}
# Gymnasium environments that replace D4RL's gym-v2/v3 ones (same observation and action spaces, except Ant,
# whose D4RL observations include contact forces: Ant-v5 needs use_contact_forces=True for those).
GYM_ENV_IDS: dict[str, str] = {
    "hopper": "Hopper-v5",
    "halfcheetah": "HalfCheetah-v5",
    "walker2d": "Walker2d-v5",
    "ant": "Ant-v5",
}
LEVELS = ("random", "medium", "medium-replay", "medium-expert", "expert", "full-replay")
REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals")
OPTIONAL_KEYS = ("next_observations", "timeouts")
_D4RL_NAME = re.compile(rf"^({'|'.join(REF_MIN_SCORE)})-({'|'.join(LEVELS)})(-v(\d+))?$")
_D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl"


def robot_name(name_or_env_id: str) -> str | None:
    """The locomotion robot named by a D4RL name, Gymnasium id or Minari id (``"Hopper-v5"`` -> ``"hopper"``)."""
    for token in re.split(r"[/\-_:]", name_or_env_id.lower()):
        if token in REF_MIN_SCORE:
            return token
    return None


def ref_scores(name_or_env_id: str | None) -> tuple[float, float] | None:
    """D4RL ``(ref_min, ref_max)`` for the robot of a dataset name or env id, or None if unknown."""
    robot = robot_name(name_or_env_id) if name_or_env_id else None
    return (REF_MIN_SCORE[robot], REF_MAX_SCORE[robot]) if robot else None


def gym_env_id(name: str) -> str | None:
    """Gymnasium id for a D4RL dataset name (``"hopper-medium-v2"`` -> ``"Hopper-v5"``), or None."""
    robot = robot_name(name)
    return GYM_ENV_IDS[robot] if robot else None


def is_d4rl_name(name: str) -> bool:
    return _D4RL_NAME.match(name) is not None


def known_names() -> list[str]:
    return [f"{robot}-{level}-v2" for robot in REF_MIN_SCORE for level in LEVELS]


def d4rl_url(name: str) -> str:
    """Download address of a D4RL Gym-MuJoCo dataset (version v2 when the name has none)."""
    m = _D4RL_NAME.match(name)
    if m is None:
        raise ValueError(f"not a D4RL Gym-MuJoCo dataset name: {name!r}")
    robot, level, version = m.group(1), m.group(2).replace("-", "_"), m.group(4) or "2"
    if version == "0":
        return f"{_D4RL_URL}/gym_mujoco/{robot}_{level}.hdf5"
    return f"{_D4RL_URL}/gym_mujoco_v{version}/{robot}_{level}-v{version}.hdf5"


#: D4RL-layout datasets kept beside a source checkout (``<checkout>/../shared/datasets``), searched last.
CHECKOUT_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def d4rl_dirs() -> list[Path]:
    """Folders searched for D4RL files: ``$D4RL_DATASET_DIR``, ``~/.d4rl/datasets``, then ``CHECKOUT_DATASETS``."""
    dirs = [Path(os.environ["D4RL_DATASET_DIR"])] if os.environ.get("D4RL_DATASET_DIR") else []
    dirs.append(Path.home() / ".d4rl" / "datasets")
    return dirs + ([CHECKOUT_DATASETS] if CHECKOUT_DATASETS.is_dir() else [])


def find_d4rl_file(name: str, dataset_dir: str | os.PathLike | None = None) -> Path:
    """The local file of D4RL dataset ``name`` (no download); a clear error with the download address if absent."""
    m = _D4RL_NAME.match(name)
    if m is None:
        raise ValueError(f"not a D4RL Gym-MuJoCo dataset name: {name!r}")
    unversioned = f"{m.group(1)}-{m.group(2)}"
    filenames = [f"{name}.hdf5", d4rl_url(name).rsplit("/", 1)[1], f"{unversioned}.hdf5"]
    dirs = ([Path(dataset_dir)] if dataset_dir is not None else []) + d4rl_dirs()
    for folder in dirs:
        for filename in filenames:
            if (folder / filename).is_file():
                return folder / filename
    raise FileNotFoundError(
        f"D4RL dataset {name!r} not found locally (looked for {filenames} in {[str(d) for d in dirs]}). "
        f"Download it from {d4rl_url(name)} into one of those folders (or set D4RL_DATASET_DIR).")


def load_d4rl_name(name: str, dataset_dir: str | os.PathLike | None = None) -> OfflineDataset:
    """Load a D4RL dataset by name from a local folder (no download)."""
    return read_d4rl_hdf5(find_d4rl_file(name, dataset_dir), name=name)


def _attr(attrs: h5py.AttributeManager, key: str) -> object | None:
    value = attrs.get(key)
    return value.decode() if isinstance(value, bytes) else value


def read_d4rl_hdf5(path: str | os.PathLike, name: str | None = None) -> OfflineDataset:
    """Read a D4RL-layout HDF5 file.

    Keys ``observations, actions, rewards, terminals`` are required, ``timeouts`` and ``next_observations``
    optional (the latter derived within episodes when missing); other keys/groups (``infos/``,
    ``metadata/``) are ignored. File attributes ``env_id``, ``ref_min_score``, ``ref_max_score`` are used
    when present; otherwise D4RL's reference scores are looked up by the robot in the name.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a dataset file (give a D4RL-layout .hdf5 file, a Minari id "
                         "or toy:<name>)")
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not a readable HDF5 file: {e}") from e
    with f:
        for key in REQUIRED_KEYS + OPTIONAL_KEYS:
            if isinstance(f.get(key), h5py.Group):
                raise ValueError(f"{path}: '{key}' is an HDF5 group, expected an array (an HDF5 dataset)")
        missing = [k for k in REQUIRED_KEYS if not isinstance(f.get(k), h5py.Dataset)]
        if missing:
            raise ValueError(f"{path} is not in D4RL layout: missing keys {missing} "
                             f"(found {sorted(f.keys())}; required {list(REQUIRED_KEYS)})")
        data = {}
        for key in (k for k in REQUIRED_KEYS + OPTIONAL_KEYS if k in f):
            try:
                data[key] = f[key][()]
            except OSError as e:  # a truncated or damaged file
                raise ValueError(f"{path}: cannot read '{key}' (damaged or truncated file?): {e}") from e
        env_id = _attr(f.attrs, "env_id")
        ref_min, ref_max = _attr(f.attrs, "ref_min_score"), _attr(f.attrs, "ref_max_score")
    name = name or path.stem
    if ref_min is None or ref_max is None:
        ref_min, ref_max = ref_scores(name) or ref_scores(env_id) or (None, None)
    return OfflineDataset(
        data["observations"], data["actions"], data["rewards"], data.get("next_observations"),
        data["terminals"], data.get("timeouts"), name=name, env_id=env_id or gym_env_id(name),
        ref_min_score=ref_min, ref_max_score=ref_max, source=str(path),
    )


def write_d4rl_hdf5(path: str | os.PathLike, dataset: OfflineDataset, compression: str | None = None,
                    **attrs: object) -> Path:
    """Write ``dataset`` in D4RL layout (float32 fields, bool terminals/timeouts, attrs env_id/ref scores)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    timeouts = dataset.timeouts.numpy().copy()
    if len(dataset) and not dataset.terminals[-1]:
        timeouts[-1] = True  # keep the final episode boundary explicit in the file
    fields = {
        "observations": dataset.observations.numpy(), "actions": dataset.actions.numpy(),
        "rewards": dataset.rewards.numpy(), "next_observations": dataset.next_observations.numpy(),
        "terminals": dataset.terminals.numpy(), "timeouts": timeouts,
    }
    meta = {"env_id": dataset.env_id, "ref_min_score": dataset.ref_min_score,
            "ref_max_score": dataset.ref_max_score, **attrs}
    with h5py.File(path, "w") as f:
        for key, value in fields.items():
            f.create_dataset(key, data=np.asarray(value), compression=compression)
        for key, value in meta.items():
            if value is not None:
                f.attrs[key] = value
    return path
