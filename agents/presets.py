"""Per-task settings as data: each agent keeps a table ``task -> Preset(values, source)`` applied by dataset name.

A task is a D4RL-style name without version or file suffix (``hopper-medium-replay``); the dataset names
``hopper-medium-replay-v2``, ``hopper-medium-replay.hdf5`` and ``/data/hopper-medium-replay-v2.hdf5`` all map to it.
A preset overrides the agent's defaults (the paper's defaults); ``field=value`` overrides of the user come last.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

_VERSION = re.compile(r"-v\d+$")


@dataclass(frozen=True)
class Preset:
    """Config values for one task and where they come from (paper appendix, official config file)."""

    values: dict[str, Any]
    source: str


def task_name(dataset: str) -> str:
    """The task of a dataset name: ``hopper-medium-replay`` for ``hopper-medium-replay-v2``, a ``.hdf5`` path to
    it, or the Minari id ``mujoco/hopper/medium-replay-v0``; ``pointnav`` for ``toy:pointnav``."""
    text = str(dataset).removeprefix("toy:")
    path = PurePath(text)
    if path.suffix in (".hdf5", ".h5"):
        name = path.stem
    elif len(path.parts) >= 2:  # a Minari id: <namespace>/<env>/<level>
        name = f"{path.parts[-2]}-{path.parts[-1]}"
    else:
        name = path.name
    return _VERSION.sub("", name.lower())


def find_preset(presets: dict[str, Preset], dataset: str) -> tuple[str, Preset] | None:
    """``(task, preset)`` for the dataset, or None when the table has no row for its task."""
    task = task_name(dataset)
    return (task, presets[task]) if task in presets else None


def apply_preset(config: Any, presets: dict[str, Preset], dataset: str) -> tuple[Any, str]:
    """``config`` with the dataset's preset row applied, and one line saying which preset (or none) was used."""
    found = find_preset(presets, dataset)
    kind = type(config).__name__
    if found is None:
        return config, f"preset: none for task {task_name(dataset)!r}; {kind} defaults (the paper's)"
    task, preset = found
    names = {f.name for f in dataclasses.fields(config)}
    unknown = set(preset.values) - names
    if unknown:
        raise ValueError(f"preset {task!r} of {kind} sets unknown fields {sorted(unknown)}")
    values = ", ".join(f"{k}={v}" for k, v in preset.values.items())
    return dataclasses.replace(config, **preset.values), f"preset: {task} ({values}; source: {preset.source})"
