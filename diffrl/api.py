"""Training from Python, exactly as ``diffrl train`` does it: ``make`` an experiment, ``fit`` it, ``resume`` a run.

    import diffrl

    exp = diffrl.make("diffusion_ql", "hopper-medium-v2", lr=3e-4)     # defaults -> the task's preset -> lr
    run = exp.fit(steps=100_000, eval_every=10_000, run_dir="runs/dql-hopper")
    run.score, run.policy_path, run.run_dir
    run = diffrl.resume("runs/dql-hopper", steps=200_000)               # continues exactly

:mod:`diffrl.cli` is a thin layer over this module; the two are the only modules of the core that import ``agents``
and ``envs``. A run checks everything it can (settings, dataset, agent, the evaluation environment, one batch)
before it creates or changes anything on disk and holds the run folder's lock while it trains. The folder holds
``config.json`` (the :class:`RunSpec`, with the agent config as the built agent holds it, data-derived values such
as IDQL's reward scale included), ``tb/`` (TensorBoard), ``checkpoints/``, ``eval.csv`` / ``eval.json`` (periodic
evaluations), ``final_eval.json``, ``policy.pt`` and ``learning_curve.png``. The final and the periodic
evaluations run the same episodes (same seeds), so the final one of a policy equals its last periodic one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import textwrap
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffrl import __version__
from diffrl.checkpoint import atomic_open
from diffrl.config import apply_values, config_from_dict, config_to_dict, suggest
from diffrl.device import resolve_device
from diffrl.runlock import LOCK_FILE, FolderInUse, RunLock
from diffrl.seeding import seed_everything
from diffrl.training import TrainConfig, Trainer, default_log_every

RUN_CONFIG = "config.json"
POLICY_FILE = "policy.pt"
FINAL_EVAL = "final_eval.json"
DEFAULT_EVAL_EPISODES = 10
#: Evaluation episode ``i`` of a run with seed ``s`` is seeded ``s + EVAL_SEED_OFFSET + i`` (periodic and final).
EVAL_SEED_OFFSET = 10_000
#: Settings a resume may change without changing the updates, and those it may change only with a warning.
_RESUME_FREE = ("steps", "eval_every", "log_every", "checkpoint_every", "on_nonfinite", "progress")
_RESUME_WARN = ("device", "precision")


def one_line(err: BaseException) -> str:
    """An exception's message on one line (a KeyError's without its quotes)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else err
    return " ".join(str(text).split())


def resolve_agent(kind: str) -> tuple[type, type]:
    """(ConfigClass, AgentClass) registered under ``kind``, with suggestions for typos."""
    from agents import AGENTS

    key = kind.replace("-", "_")
    if key not in AGENTS:
        raise ValueError(f"unknown agent {kind!r}.{suggest(key, AGENTS)} Known agents: {', '.join(sorted(AGENTS))}")
    return AGENTS[key]


def build_agent(kind: str, config: Any, dataset: Any) -> Any:
    """Instantiate an agent for ``dataset`` (dimensions and normalisers come from the data)."""
    _, agent_cls = resolve_agent(kind)
    try:
        return agent_cls.from_dataset(dataset, config)
    except TypeError as err:  # e.g. DDPO, which fine-tunes on a reward rather than a dataset
        raise ValueError(str(err)) from None


def batch_sampler(agent: Any, dataset: Any) -> Callable:
    """The agent's own batch sampler (e.g. sequence windows) or uniform transitions."""
    make_sampler = getattr(agent, "batch_sampler", None)
    return make_sampler(dataset) if make_sampler is not None else dataset.sample


@dataclass
class RunSpec:
    """Everything needed to rebuild a run: saved as ``config.json`` in the run folder. ``dataset`` is absolute
    when it names a file; ``dataset_sha256`` is the data's fingerprint (``OfflineDataset.fingerprint``);
    ``eval_env`` is the evaluation environment (None: the dataset's); ``distill`` the settings of a run made by
    :func:`distill` (its teacher run and ``DistillConfig``; ``agent_config`` is then the teacher's);
    ``pipeline`` those of a DDPO run made by :func:`train_ddpo` (its model, reward and prompts file; ``dataset``
    is then the model and ``eval_episodes`` the number of evaluation images)."""

    agent: str
    dataset: str
    agent_config: dict
    train: dict
    eval_episodes: int
    diffrl_version: str = __version__
    dataset_sha256: str | None = None
    eval_env: str | None = None
    distill: dict | None = None
    pipeline: dict | None = None

    def save(self, run_dir: Path) -> None:
        with atomic_open(run_dir / RUN_CONFIG, "w") as f:
            f.write(json.dumps(self.__dict__, indent=2))

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> RunSpec:
        """The spec of a run folder, with every setting checked (a broken file is named, never half used)."""
        path = Path(run_dir) / RUN_CONFIG
        if not path.is_file():
            raise ValueError(f"{run_dir} is not a diffrl run folder (no {RUN_CONFIG})")
        try:
            spec = config_from_dict(cls, json.loads(path.read_text()))
            config_cls, _ = resolve_agent(spec.agent)
            config_from_dict(config_cls, spec.agent_config)
            config_from_dict(TrainConfig, {**spec.train, "run_dir": str(run_dir)})
        except (ValueError, TypeError, UnicodeDecodeError) as err:  # JSON errors are ValueErrors
            raise ValueError(f"{path} is not a valid run config: {one_line(err)}") from None
        return spec


@dataclass
class Run:
    """A trained run: its folder, policy file, logged history, periodic evaluations and final evaluation (the
    contents of ``final_eval.json``; None when the run has no evaluation environment or episodes)."""

    run_dir: Path
    policy_path: Path
    history: list[dict]
    evaluations: list[dict]
    final: dict | None

    @property
    def score(self) -> float | None:
        """The final evaluation's D4RL-normalised score, else its mean return (None without one)."""
        if self.final is None:
            return None
        normalized = self.final.get("normalized_mean")
        return normalized if normalized is not None else self.final["mean"]

    def policy(self, seed: int | None = None, device: str = "cpu") -> Any:
        """The run's final :class:`agents.policy.Policy`."""
        from agents.policy import load_policy

        return load_policy(self.policy_path, seed=seed, device=device)


class Experiment:
    """A configured run not trained yet: the agent kind, its config (the agent's defaults, then the dataset
    task's preset, then the values given to :func:`make`), the loaded dataset (``dataset_name``: as config.json
    stores it) and the run-wide settings.

    :meth:`fit` builds the agent (``agent`` holds it afterwards), trains it and writes the run folder.
    """

    def __init__(self, kind: str, config: Any, dataset: Any, dataset_name: str, train: dict[str, Any],
                 trust_env: bool) -> None:
        self.kind, self.config, self.dataset, self.dataset_name = kind, config, dataset, dataset_name
        self.train, self.trust_env = train, trust_env
        self.agent: Any = None

    def fit(self, steps: int = 100_000, *, eval_every: int = 0, eval_episodes: int = DEFAULT_EVAL_EPISODES,
            eval_env: str | None = None, log_every: int | None = None, checkpoint_every: int | None = None,
            on_nonfinite: str = "stop", run_dir: str | os.PathLike | None = None, runs_root: str = "runs",
            overwrite: bool = False, progress: bool = True) -> Run:
        """Train for ``steps`` updates into ``run_dir`` (default: a new ``<runs_root>/<agent>-<dataset>-<time>``).

        Evaluations (``eval_episodes`` episodes every ``eval_every`` updates, 0: none, and of the final policy)
        run in ``eval_env`` (a Gymnasium id or dataset name; default: the dataset's environment). Logged means
        every ``log_every`` updates (default :func:`default_log_every`), checkpoints every ``checkpoint_every``
        (default: steps / 5) and after the last. ``overwrite`` empties an existing run folder ``run_dir`` first.
        """
        config = self.config
        if getattr(config, "total_steps", 0) is None:  # the schedule's horizon follows the run
            config = dataclasses.replace(config, total_steps=steps)
        train = {**config_to_dict(TrainConfig()), **self.train, "steps": steps, "eval_every": eval_every,
                 "log_every": default_log_every(steps) if log_every is None else log_every,
                 "checkpoint_every": max(1, steps // 5) if checkpoint_every is None else checkpoint_every,
                 "on_nonfinite": on_nonfinite, "progress": progress}
        del train["run_dir"]
        spec = RunSpec(self.kind, self.dataset_name, config_to_dict(config), train, eval_episodes, eval_env=eval_env)
        if overwrite and run_dir is None:
            raise ValueError("overwrite (--overwrite) needs the run_dir (--run-dir) it replaces")
        folder = _new_run_dir(run_dir, runs_root, overwrite, self.kind, self.dataset.name)
        run, self.agent = _run(spec, self.dataset, self.trust_env, folder, overwrite=overwrite)
        return run


def make(agent: str, dataset: str | os.PathLike | Any, *, seed: int = 0, batch_size: int | None = None,
         device: str = "auto", precision: str = "fp32", trust_env: bool = False, **config: Any) -> Experiment:
    """An :class:`Experiment` of agent kind ``agent`` on ``dataset`` (a D4RL name or HDF5 path, a Minari id,
    ``toy:<name>``, or an ``envs.OfflineDataset``), ready to :meth:`~Experiment.fit`.

    ``config`` sets agent config fields (see ``diffrl.describe(agent)``) over the preset of the dataset's task;
    ``batch_size`` defaults to the agent's (the paper's); ``device`` is auto, cpu, cuda or cuda:N; ``precision``
    fp32, bf16 or fp16; ``trust_env`` lets a Minari dataset build the environment entry point it records.
    An in-memory dataset is stored by its ``source``; pass it again to :func:`resume` if that cannot be loaded.
    """
    from agents.presets import apply_preset

    config_cls, agent_cls = resolve_agent(agent)
    name = _dataset_arg(dataset)
    preset_config, preset_line = apply_preset(config_cls(), agent_cls.presets, name)
    print(preset_line)
    agent_config = apply_values(preset_config, config)
    train = {"seed": seed, "batch_size": agent_cls.default_batch_size if batch_size is None else batch_size,
             "device": device, "precision": precision}
    return Experiment(agent.replace("-", "_"), agent_config, _load_dataset(dataset, trust_env), name, train, trust_env)


def resume(run_dir: str | os.PathLike, steps: int | None = None, *, dataset: str | os.PathLike | Any = None,
           config: dict[str, Any] | None = None, trust_env: bool = False, **changes: Any) -> Run:
    """Continue the run in ``run_dir`` exactly from its newest valid checkpoint, up to ``steps`` updates (default:
    the run's own total), and finish it as :meth:`Experiment.fit` does.

    ``changes`` may set ``eval_every``, ``eval_episodes``, ``eval_env``, ``log_every``, ``checkpoint_every``,
    ``on_nonfinite``, ``progress`` (the updates stay exact) and ``device`` / ``precision`` (with a warning: not
    bit-identical); ``seed``, ``batch_size`` and the agent ``config`` values must equal the run's. ``dataset`` may
    name the same data moved elsewhere (checked against the stored fingerprint). Every applied change is printed.
    A run made by :func:`distill` resumes with its own settings (its teacher's policy file checked unchanged);
    only ``progress`` may change.
    """
    run_dir = Path(run_dir)
    spec = RunSpec.load(run_dir)
    changes = {k: v for k, v in {"steps": steps, **changes}.items() if v is not None}
    if spec.distill is not None:
        return _resume_distill(run_dir, spec, changes, dataset is not None or bool(config), trust_env)
    known = (*_RESUME_FREE, *_RESUME_WARN, "seed", "batch_size", "eval_episodes", "eval_env")
    for name in changes:
        if name not in known:
            raise ValueError(f"resume() has no setting {name!r}.{suggest(name, known)} Agent config values go in "
                             "config={...}")
    config_cls, _ = resolve_agent(spec.agent)
    current = config_from_dict(config_cls, spec.agent_config)
    changed = apply_values(current, config or {})
    refused = [f"{f.name} {getattr(current, f.name)} -> {getattr(changed, f.name)}"
               for f in dataclasses.fields(current) if getattr(current, f.name) != getattr(changed, f.name)]
    refused += [f"{name} {spec.train[name]} -> {changes[name]}" for name in ("batch_size", "seed")
                if name in changes and changes[name] != spec.train[name]]
    if refused:
        raise ValueError(f"resuming {run_dir} continues it exactly, so it cannot change {'; '.join(refused)}; "
                         "start a new run for that")
    for name in _RESUME_FREE + _RESUME_WARN:
        if name in changes and changes[name] != spec.train.get(name):
            note = "warning: the resumed run is not bit-identical to an uninterrupted one" if name in _RESUME_WARN \
                else "the updates stay exact"
            print(f"resume: {name} {spec.train.get(name)} -> {changes[name]} ({note})")
            spec.train[name] = changes[name]
    for name in ("eval_episodes", "eval_env"):
        if name in changes and changes[name] != getattr(spec, name):
            print(f"resume: {name} {getattr(spec, name)} -> {changes[name]}")
            setattr(spec, name, changes[name])
    if spec.pipeline is not None:
        return _resume_ddpo(run_dir, spec, dataset)
    if dataset is not None and _dataset_arg(dataset) != spec.dataset:
        if spec.dataset_sha256 is None:
            raise ValueError(f"{run_dir / RUN_CONFIG} stores no fingerprint of its dataset, so another dataset "
                             "cannot be checked to hold the same data")
        print(f"resume: dataset {spec.dataset} -> {_dataset_arg(dataset)} (content checked)")
        spec.dataset = _dataset_arg(dataset)
    data = _load_dataset(spec.dataset if dataset is None else dataset, trust_env)
    run, _ = _run(spec, data, trust_env, run_dir, resume=True)
    return run


def distill(run_dir: str | os.PathLike, method: str = "progressive", steps: int = 2, *,
            out_dir: str | os.PathLike | None = None, runs_root: str = "runs", overwrite: bool = False,
            batch_size: int = 256, seed: int = 0, device: str = "auto", eval_episodes: int | None = None,
            trust_env: bool = False, progress: bool = True, **settings: Any) -> Run:
    """Distil the policy of the run in ``run_dir`` into a student sampled in ``steps`` network calls, trained as a
    new run folder (``out_dir``, default ``<runs_root>/<agent>-<method><steps>-<dataset>-<time>``) laid out as
    :meth:`Experiment.fit` lays one out, its ``policy.pt`` evaluated on the teacher run's episodes. An interrupted
    student run continues exactly with :func:`resume` (``diffrl distill --resume``).

    ``method``: progressive, consistency, consistency-training or reflow (see :mod:`diffrl.distillation`);
    ``settings``: further :class:`~diffrl.distillation.DistillConfig` fields (iterations, teacher_steps, scales,
    lr, ...).
    Works for the actors of DiffusionBC, Diffusion Policy and Diffusion-QL, and for distilled runs of those.
    """
    from diffrl.distillation import DistillConfig

    run_dir = Path(run_dir)
    spec = RunSpec.load(run_dir)
    config = apply_values(DistillConfig(method=method, steps=steps), settings)
    payload, teacher = _teacher_policy(run_dir)
    device = resolve_device(device)
    distiller, dataset = _distiller(payload, teacher, config, spec, device, seed, trust_env)
    total = distiller.total_iterations
    train = {**config_to_dict(TrainConfig()), "steps": total, "batch_size": batch_size, "seed": seed,
             "device": str(device), "log_every": default_log_every(total), "checkpoint_every": max(1, total // 5),
             "progress": progress}
    del train["run_dir"]
    episodes = spec.eval_episodes if eval_episodes is None else eval_episodes
    origin = {"teacher_run": str(run_dir.resolve()), "teacher_sha256": _file_sha256(run_dir / POLICY_FILE),
              **config_to_dict(config)}
    new_spec = RunSpec(spec.agent, spec.dataset, spec.agent_config, train, episodes, dataset_sha256=spec.dataset_sha256,
                       eval_env=spec.eval_env, distill=origin)
    folder = _new_run_dir(out_dir, runs_root, overwrite, f"{spec.agent}-{method}{steps}", dataset.name)
    return _train_student(new_spec, payload, distiller, dataset, folder, overwrite, trust_env, resume=False)


def _resume_distill(run_dir: Path, spec: RunSpec, changes: dict[str, Any], other_data: bool,
                    trust_env: bool) -> Run:
    """:func:`resume` of a run made by :func:`distill`: the same teacher, settings and seed, from its newest
    checkpoint; only ``progress`` may change."""
    from diffrl.distillation import DistillConfig

    refused = sorted(set(changes) - {"progress"}) + (["dataset / config"] if other_data else [])
    if refused:
        raise ValueError(f"{run_dir} was made by diffrl distill and resumes with its own settings only; it cannot "
                         f"change {', '.join(refused)}")
    spec.train["progress"] = changes.get("progress", spec.train.get("progress", True))
    origin = {"anneal_lr": False, "max_grad_norm": None,  # runs made before these settings trained without them
              **(spec.distill or {})}
    teacher_run, digest = Path(origin.pop("teacher_run", "")), origin.pop("teacher_sha256", None)
    if not (teacher_run / POLICY_FILE).is_file() or digest != _file_sha256(teacher_run / POLICY_FILE):
        raise ValueError(f"{run_dir} cannot resume: its teacher's policy {teacher_run / POLICY_FILE} is missing or "
                         "no longer the one it was distilled from (distil again into a new run folder)")
    try:
        config = config_from_dict(DistillConfig, origin)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{run_dir / RUN_CONFIG} holds invalid distillation settings: {one_line(err)}") from None
    payload, teacher = _teacher_policy(teacher_run)
    device = resolve_device(spec.train["device"])
    distiller, dataset = _distiller(payload, teacher, config, spec, device, spec.train["seed"], trust_env)
    return _train_student(spec, payload, distiller, dataset, run_dir, False, trust_env, resume=True)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _teacher_policy(run_dir: Path) -> tuple[dict, Any]:
    """(the policy file of a teacher run, its actor with the trained weights), checked to be a diffusion actor
    that can be distilled."""
    from agents.policy import CHECKPOINT_KIND, build_actor
    from diffrl.checkpoint import load_checkpoint

    payload = load_checkpoint(run_dir / POLICY_FILE, expected_kind=CHECKPOINT_KIND)
    kind, actor_config = payload["actor_kind"], payload["actor_config"]
    teacher = build_actor(kind, actor_config)
    if not (hasattr(teacher, "cond") and {"solver", "solver_kwargs", "steps", "prediction"} <= set(actor_config)):
        raise ValueError(f"{run_dir}: a {kind!r} actor cannot be distilled; diffrl distill takes runs of "
                         "diffusion_bc, diffusion_policy and diffusion_ql")
    teacher.load_state_dict(payload["actor_state"])
    return payload, teacher


def _distiller(payload: dict, teacher: Any, config: Any, spec: RunSpec, device: torch.device, seed: int,
               trust_env: bool) -> tuple[Any, Any]:
    """(the distiller of the ``teacher`` actor of the policy file ``payload`` on the run's dataset, that dataset);
    the same for the same seed, so that a resumed run rebuilds what it started with."""
    from diffrl.distillation import make_distiller

    dataset = _load_dataset(spec.dataset, trust_env)
    if spec.dataset_sha256 not in (None, dataset.fingerprint()):
        raise ValueError(f"dataset {spec.dataset} no longer holds the data the teacher was trained on")
    teacher.to(device)
    seed_everything(seed)
    return make_distiller(teacher.model, config, _distill_data(teacher, payload["policy"], dataset)), dataset


def _train_student(spec: RunSpec, payload: dict, distiller: Any, dataset: Any, folder: Path, overwrite: bool,
                   trust_env: bool, resume: bool) -> Run:
    """Train the student in its run folder (continuing from its newest checkpoint with ``resume``), then save,
    evaluate and summarise it."""
    from envs import check_env

    evaluation = _evaluation(spec, dataset, trust_env)
    if evaluation is not None:
        check_env(dataset, trust_env=trust_env, env=spec.eval_env)
    device = resolve_device(spec.train["device"])
    out, lock = _claim_run_dir(spec, folder, overwrite)
    try:
        trainer = Trainer(distiller, distiller.batch_sampler(),
                          config_from_dict(TrainConfig, {**spec.train, "run_dir": str(out)}))
        trainer.fit(resume=resume)
        _save_student(payload, distiller, out / POLICY_FILE)
        final = _finish(_PolicyFile(out / POLICY_FILE, device), out, spec, evaluation, trainer.step)
    finally:
        if lock is not None:
            lock.release()
    return Run(out, out / POLICY_FILE, trainer.history, trainer.evaluations, final)


def describe(agent: str, dataset: str | None = None) -> str:
    """Every config field of agent kind ``agent`` (type, default, meaning), the tasks its presets cover and, with
    ``dataset``, the preset a run on it applies."""
    from agents.field_help import field_help
    from agents.presets import apply_preset

    config_cls, agent_cls = resolve_agent(agent)
    kind = agent.replace("-", "_")
    defaults, hints = config_cls(), typing.get_type_hints(config_cls)
    rows = [(f.name, _type_name(hints[f.name]), _value_text(getattr(defaults, f.name)),
             field_help(kind, f.name) or f"see the {config_cls.__name__} docstring")
            for f in dataclasses.fields(config_cls)]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{kind} settings ({config_cls.__name__}; field=value on the command line, keywords of diffrl.make):",
             "  " + "  ".join(h.ljust(w) for h, w in zip(("field", "type", "default"), widths, strict=True))
             + "  meaning"]
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
              for row in rows]
    lines.append(f"default batch size: {agent_cls.default_batch_size}")
    tasks = ", ".join(sorted(agent_cls.presets)) or "none"
    wrap = textwrap.TextWrapper(width=118, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False)
    lines.append(wrap.fill(f"presets (applied by dataset name, before field=value): {tasks}"))
    if dataset is not None:
        lines.append(wrap.fill(apply_preset(defaults, agent_cls.presets, _dataset_arg(dataset))[1]))
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def _value_text(value: Any) -> str:
    """A default as the command line takes it."""
    if value is None or isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "[]"
    return f"{value:g}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------------------ internals


def _dataset_arg(dataset: str | os.PathLike | Any) -> str:
    """A dataset as stored: an existing file's absolute path, anything else (names, ids) as given; an
    ``OfflineDataset`` by its source."""
    text = os.fspath(dataset) if isinstance(dataset, str | os.PathLike) else str(dataset.source)
    return str(Path(text).resolve()) if os.path.exists(text) else text


def _load_dataset(dataset: str | os.PathLike | Any, trust_env: bool) -> Any:
    from envs import load_dataset

    return load_dataset(dataset, trust_env=trust_env) if isinstance(dataset, str | os.PathLike) else dataset


def _has_contents(folder: Path) -> bool:
    return folder.is_dir() and any(p.name != LOCK_FILE for p in folder.iterdir())


def _new_run_dir(run_dir: str | os.PathLike | None, runs_root: str, overwrite: bool, kind: str,
                 dataset_name: str) -> Callable[[], Path]:
    """The folder of a new run, found when called (on rank 0): ``run_dir``, or a fresh name under ``runs_root``."""
    def find() -> Path:
        if run_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            base = Path(runs_root) / f"{kind}-{dataset_name.replace('/', '_').replace(':', '_')}-{stamp}"
            folder, n = base, 1
            while folder.exists():
                n += 1
                folder = base.with_name(f"{base.name}-{n}")
            return folder
        folder = Path(run_dir)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"run folder {folder} is a file, not a folder")
        if _has_contents(folder):
            if not overwrite:
                raise ValueError(f"run folder {folder} already exists and is not empty: resume it (diffrl train "
                                 f"--resume {folder}), overwrite it (--overwrite) or choose another folder")
            if not (folder / RUN_CONFIG).is_file():
                raise ValueError(f"--overwrite deletes only diffrl run folders; {folder} has no {RUN_CONFIG}, so it "
                                 "is left alone: choose another folder")
        return folder
    return find


def _open_run_dir(run_dir: Path, spec: RunSpec, overwrite: bool) -> RunLock:
    """Create ``run_dir``, take its lock, empty it when ``overwrite`` and write the spec; returns the lock."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire()
    try:
        if overwrite:
            for entry in run_dir.iterdir():
                if entry.name == LOCK_FILE:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        spec.save(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def _claim_run_dir(spec: RunSpec, folder: Path | Callable[[], Path], overwrite: bool) -> tuple[Path, RunLock | None]:
    """The run folder, created, locked and holding the spec on rank 0 (which every process follows); when rank 0
    cannot claim it, every process stops with its reason."""
    from diffrl.distributed import all_gather_object, is_main_process

    run_dir, lock, failure = None, None, None
    if is_main_process():
        try:
            run_dir = folder() if callable(folder) else folder
            lock = _open_run_dir(run_dir, spec, overwrite)
        except (OSError, FolderInUse, ValueError) as err:
            failure = err
    shared_dir, shared_failure = all_gather_object((str(run_dir), failure and one_line(failure)))[0]
    if failure is not None:
        raise failure
    if shared_failure is not None:
        raise ValueError(shared_failure)
    return Path(shared_dir), lock


def _train_device(requested: str) -> torch.device:
    """The device of this process, with torchrun's LOCAL_RANK GPU for auto / cuda."""
    from diffrl.distributed import init_distributed

    if "WORLD_SIZE" in os.environ:
        rank_device = init_distributed()  # NCCL and GPU LOCAL_RANK with CUDA, gloo on the CPU
        if requested in ("auto", "cuda") and rank_device.type == "cuda":
            requested = str(rank_device)
    return resolve_device(requested)


def _evaluation(spec: RunSpec, dataset: Any, trust_env: bool) -> Callable[[Any], Any] | None:
    """``agent -> EvalResult`` in the run's evaluation environment, the same episodes every time; None when the
    run evaluates nothing."""
    from envs import evaluate

    target = spec.eval_env or (dataset if dataset.env_id is not None else None)
    if spec.eval_episodes <= 0 or target is None:
        return None
    seed = spec.train["seed"] + EVAL_SEED_OFFSET
    refs = None if dataset.ref_min_score is None else (dataset.ref_min_score, dataset.ref_max_score)

    def run(agent: Any) -> Any:
        return evaluate(agent.policy(seed=seed), target, episodes=spec.eval_episodes, seed=seed, ref_scores=refs,
                        trust_env=trust_env)

    return run


def _run(spec: RunSpec, dataset: Any, trust_env: bool, folder: Path | Callable[[], Path], overwrite: bool = False,
         resume: bool = False) -> tuple[Run, Any]:
    """The one path of every run, fresh or resumed: check, build, claim the folder, train, finish."""
    from diffrl.distributed import barrier, cleanup, is_main_process
    from envs import check_env

    config_from_dict(TrainConfig, {**spec.train, "run_dir": "."})
    device = _train_device(spec.train["device"])
    fingerprint = dataset.fingerprint()
    if spec.dataset_sha256 not in (None, fingerprint):
        raise ValueError(f"dataset {spec.dataset} does not hold the data the run was trained on (its fingerprint "
                         f"differs from the one in {RUN_CONFIG}); a resume must use the same data")
    spec.dataset_sha256 = fingerprint
    config_cls, _ = resolve_agent(spec.agent)
    seed_everything(spec.train["seed"])  # the agent's initial weights follow the run's seed
    agent = build_agent(spec.agent, config_from_dict(config_cls, spec.agent_config), dataset).to(device)
    spec.agent_config = config_to_dict(agent.config)  # with what the agent derived from the data
    evaluation = _evaluation(spec, dataset, trust_env)
    if evaluation is not None:
        check_env(dataset, trust_env=trust_env, env=spec.eval_env)
    sample_batch = batch_sampler(agent, dataset.to(device))
    sample_batch(1, torch.Generator(device).manual_seed(0))  # the data fits the agent's batches
    run_dir, lock = _claim_run_dir(spec, folder, overwrite)
    try:
        train_config = config_from_dict(TrainConfig, {**spec.train, "run_dir": str(run_dir), "device": str(device)})
        periodic = None if evaluation is None else lambda a, step: _numbers(evaluation(a).to_dict())
        trainer = Trainer(agent, sample_batch, train_config, evaluate=periodic)
        trainer.fit(resume=resume)
        final = _finish(agent, run_dir, spec, evaluation, trainer.step) if is_main_process() else None
        barrier()  # no rank tears the group down while rank 0 still finishes the run
    finally:
        if lock is not None:
            lock.release()
    cleanup()
    return Run(run_dir, run_dir / POLICY_FILE, trainer.history, trainer.evaluations, final), agent


def _numbers(result: dict) -> dict[str, float]:
    return {k: v for k, v in result.items() if isinstance(v, int | float)}


def _finish(agent: Any, run_dir: Path, spec: RunSpec, evaluation: Callable | None, step: int) -> dict | None:
    """Save the final policy, evaluate it (into final_eval.json and TensorBoard), plot the learning curve and
    print a short summary; returns the final evaluation."""
    from diffrl.plots import plot_learning_curve

    agent.policy().save(run_dir / POLICY_FILE)
    print(f"run folder: {run_dir}\npolicy:     {run_dir / POLICY_FILE}")
    final = None
    if evaluation is not None:
        result = evaluation(agent)
        final = {"step": step, "seed": spec.train["seed"] + EVAL_SEED_OFFSET, **result.to_dict()}
        with atomic_open(run_dir / FINAL_EVAL, "w") as f:
            f.write(json.dumps(final, indent=2))
        _log_final(run_dir, step, result.to_dict())
        line = f"return {result.mean:.2f} +- {result.stderr:.2f} over {spec.eval_episodes} episodes"
        if result.normalized_mean is not None:
            line += f", normalised score {result.normalized_mean:.1f} +- {result.normalized_stderr:.1f}"
        print(f"final:      {line}")
    plot = plot_learning_curve(run_dir, episodes=spec.eval_episodes)
    if plot is not None:
        print(f"plot:       {plot}")
    return final


def _log_final(run_dir: Path, step: int, result: dict) -> None:
    """The final evaluation as ``final/<metric>`` TensorBoard scalars at the run's last step."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(run_dir / "tb")) as writer:
        for key, value in _numbers(result).items():
            writer.add_scalar(f"final/{key}", value, step)


def _distill_data(actor: Any, settings: dict, dataset: Any) -> dict[str, torch.Tensor]:
    """The actor's training pairs from the dataset's windows: normalised action chunks as the denoiser models them
    ("x0") and its conditions ("cond"), normalised as the policy file says, on the actor's device and dtype."""
    param = next(actor.parameters())
    place = {"device": param.device, "dtype": param.dtype}
    n_obs = getattr(actor, "n_obs_steps", 1)
    windows = dataset.sequences(getattr(actor, "horizon", 1), pad=True)
    batch = windows[torch.arange(len(windows))]
    obs_mean, obs_std, act_mean, act_std = (settings[k].to(**place) for k in ("obs_mean", "obs_std", "act_mean",
                                                                              "act_std"))
    obs = (batch["observations"][:, :n_obs].to(**place) - obs_mean) / obs_std
    actions = ((batch["actions"].to(**place) - act_mean) / act_std).clamp(-1.0, 1.0)
    return {"x0": actions.reshape(len(actions), *actor.x_shape), "cond": actor.cond(obs)}


def _save_student(payload: dict, distiller: Any, path: Path) -> None:
    """The teacher's policy file with the student's sampler settings and weights in place of the teacher's."""
    from agents.policy import CHECKPOINT_KIND, build_actor
    from diffrl.checkpoint import nonfinite_tensors, save_checkpoint

    config = {**payload["actor_config"], **distiller.sampling()}
    actor = build_actor(payload["actor_kind"], config)
    actor.load_state_dict(payload["actor_state"])
    actor.model.denoiser.load_state_dict(distiller.student.denoiser.state_dict())
    state = {k: v.detach().cpu() for k, v in actor.state_dict().items()}
    bad = nonfinite_tensors({"actor_state": state})
    if bad:
        raise ValueError(f"not saving the student to {path}: {', '.join(bad[:3])} hold NaN or infinite values")
    save_checkpoint(path, {**payload, "actor_config": config, "actor_state": state}, kind=CHECKPOINT_KIND)


class _PolicyFile:
    """A saved policy presented as an agent for :func:`_finish` and :func:`_evaluation` (``policy(seed)``)."""

    def __init__(self, path: Path, device: torch.device) -> None:
        self.path, self.device = path, device

    def policy(self, seed: int | None = None) -> Any:
        from agents.policy import load_policy

        return load_policy(self.path, seed=seed, device=self.device)


# ------------------------------------------------------------------------------------------------ DDPO runs


#: A DDPO run's final adapters (LoRA, diffusers format) or, when it trains the whole U-Net, merged pipeline.
DDPO_LORA, DDPO_PIPELINE = "lora", "pipeline"


def train_ddpo(model: str | os.PathLike, prompts: str | os.PathLike, reward: str = "jpeg_compressibility", *,
               steps: int = 100, batch_size: int | None = None, seed: int = 0, device: str = "auto",
               precision: str = "fp32", eval_every: int = 0, eval_images: int = 16, log_every: int | None = None,
               checkpoint_every: int | None = None, on_nonfinite: str = "stop",
               run_dir: str | os.PathLike | None = None, runs_root: str = "runs", overwrite: bool = False,
               clip_model: str | os.PathLike | None = None, aesthetic_head: str | os.PathLike | None = None,
               progress: bool = True, **config: Any) -> Run:
    """Fine-tune the diffusers text-to-image pipeline ``model`` (a folder or hub id) with DDPO on ``reward``
    (``envs.image_rewards.REWARD_NAMES``; ``aesthetic`` needs the local ``clip_model`` and ``aesthetic_head``) for
    the prompts of the file ``prompts`` (one per line, or a JSON list), as ``diffrl train ddpo`` does.

    One step is one DDPO epoch of ``batch_size`` sampled images (default 256, the paper's); ``config`` sets
    :class:`agents.ddpo.DDPOConfig` fields. The run folder holds ``config.json``, ``tb/`` (reward curves),
    ``tb_images/`` and ``grids/`` (fixed-seed sample grids captioned with their prompts, every ``eval_every``
    epochs, ``eval_images`` images), ``checkpoints/``, ``final_eval.json`` and the trained adapters in ``lora/``
    (``pipe.load_lora_weights``), or the merged pipeline in ``pipeline/`` when ``lora_rank=0``. :func:`resume`
    continues it exactly. ``Run.policy_path`` is that folder.
    """
    from agents.ddpo import DDPO

    config_cls = resolve_agent(DDPO.kind)[0]
    agent_config = apply_values(config_cls(), config)
    texts = load_prompts(prompts)
    if eval_images < 0:
        raise ValueError(f"eval_images must be >= 0, got {eval_images}")
    train = {**config_to_dict(TrainConfig()), "seed": seed, "device": device, "precision": precision,
             "batch_size": DDPO.default_batch_size if batch_size is None else batch_size, "steps": steps,
             "eval_every": eval_every, "log_every": default_log_every(steps) if log_every is None else log_every,
             "checkpoint_every": max(1, steps // 5) if checkpoint_every is None else checkpoint_every,
             "on_nonfinite": on_nonfinite, "progress": progress}
    del train["run_dir"]
    local = {name: None if path is None else str(Path(path).resolve())
             for name, path in (("clip_model", clip_model), ("aesthetic_head", aesthetic_head))}
    pipeline = {"model": _dataset_arg(model), "reward": reward, "prompts": str(Path(prompts).resolve()),
                "prompts_sha256": _prompts_sha256(texts), **local}
    spec = RunSpec(DDPO.kind, pipeline["model"], config_to_dict(agent_config), train, eval_images, pipeline=pipeline)
    folder = _new_run_dir(run_dir, runs_root, overwrite, DDPO.kind, Path(os.fspath(model)).name)
    return _run_ddpo(spec, folder, overwrite=overwrite)


def load_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a text file (one per line, blank lines skipped) or of a ``.json`` file (a list of strings)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"prompts file {path} cannot be read as UTF-8 text: {one_line(err)}") from None
    if path.suffix == ".json":
        try:
            prompts = json.loads(text)
        except ValueError as err:
            raise ValueError(f"prompts file {path} is not valid JSON: {one_line(err)}") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"prompts file {path} must hold a JSON list of non-empty strings")
        prompts = [p.strip() for p in prompts]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts")
    return prompts


def _prompts_sha256(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


def _load_pipeline(model: str) -> Any:
    """A diffusers pipeline from a folder (or a hub id), in float32 (precision is a training setting)."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(model)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"model {model} does not load as a diffusers pipeline: {one_line(err)}"[:400]) from None


def _resume_ddpo(run_dir: Path, spec: RunSpec, dataset: Any) -> Run:
    """:func:`resume` of a DDPO run, once the generic checks passed: the same pipeline, reward and prompts."""
    if dataset is not None:
        raise ValueError(f"{run_dir} is a DDPO run on {spec.dataset}: it takes no dataset")
    return _run_ddpo(spec, run_dir, resume=True)


def _run_ddpo(spec: RunSpec, folder: Path | Callable[[], Path], overwrite: bool = False,
              resume: bool = False) -> Run:
    """Check and build everything, claim the folder, train, then save the adapters and the final evaluation."""
    from agents.ddpo import DDPO, DDPOConfig, SampleEvaluator
    from envs.image_rewards import reward_by_name

    config_from_dict(TrainConfig, {**spec.train, "run_dir": "."})
    parts = spec.pipeline or {}
    prompts = load_prompts(parts["prompts"])
    if _prompts_sha256(prompts) != parts["prompts_sha256"]:
        raise ValueError(f"prompts file {parts['prompts']} no longer holds the prompts the run was started with")
    device = _train_device(spec.train["device"])
    reward = reward_by_name(parts["reward"], parts.get("clip_model"), parts.get("aesthetic_head"), device)
    pipe = _load_pipeline(parts["model"])
    seed_everything(spec.train["seed"])  # the adapters' initial weights follow the run's seed

    def prompt_fn() -> tuple[str, dict]:
        return random.choice(prompts), {}  # Python's global RNG: seeded by the run and saved in its checkpoints

    agent = DDPO.from_pipeline(pipe, config_from_dict(DDPOConfig, spec.agent_config), prompt_fn, reward).to(device)
    seed = spec.train["seed"] + EVAL_SEED_OFFSET
    eval_prompts = [prompts[i % len(prompts)] for i in range(spec.eval_episodes)]
    run_dir, lock = _claim_run_dir(spec, folder, overwrite)
    try:
        evaluator = SampleEvaluator(None, eval_prompts, seed=seed, run_dir=run_dir, nrow=min(8, max(1, len(
            eval_prompts))))
        train_config = config_from_dict(TrainConfig, {**spec.train, "run_dir": str(run_dir), "device": str(device)})
        trainer = Trainer(agent, agent.collect, train_config, evaluate=evaluator if eval_prompts else None)
        trainer.fit(resume=resume)
        out = agent.save_lora(run_dir / DDPO_LORA) if agent.chain.lora else agent.save_merged(run_dir / DDPO_PIPELINE)
        print(f"run folder: {run_dir}\n{'adapters:' if agent.chain.lora else 'pipeline:'}   {out}")
        final = None
        if eval_prompts:
            result = evaluator(agent, trainer.step)
            final = {"step": trainer.step, "seed": seed, **result, "mean": result["reward_mean"],
                     "stderr": result["reward_sem"]}
            with atomic_open(run_dir / FINAL_EVAL, "w") as f:
                f.write(json.dumps(final, indent=2))
            _log_final(run_dir, trainer.step, result)
            print(f"final:      reward {result['reward_mean']:.4g} +- {result['reward_sem']:.2g} over "
                  f"{len(eval_prompts)} images")
    finally:
        if lock is not None:
            lock.release()
    return Run(run_dir, out, trainer.history, trainer.evaluations, final)
