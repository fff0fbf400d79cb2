"""The ``diffrl`` command: train, eval, collect, bench and list.

This is the one module of the core that imports ``agents`` and ``envs``: it wires datasets, agents and the training
loop together. Every run writes one folder holding the resolved config, TensorBoard events, checkpoints, evaluation
results (JSON and CSV), the final policy and plots.

``diffrl train`` checks everything it can (settings, dataset, agent, the dataset's environment) before it
creates or changes anything on disk, holds the run folder's lock while it trains, and reports a user's mistake
as one line naming the file and the problem, with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import runpy
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffrl import __version__
from diffrl.checkpoint import atomic_open
from diffrl.config import apply_overrides, config_from_dict, config_to_dict, suggest
from diffrl.device import PRECISIONS, resolve_device
from diffrl.runlock import LOCK_FILE, FolderInUse, RunLock
from diffrl.seeding import seed_everything
from diffrl.training import NONFINITE_POLICIES, NonFiniteError, TrainConfig, Trainer

RUN_CONFIG = "config.json"
POLICY_FILE = "policy.pt"
DEFAULT_EVAL_EPISODES = 10


def _agents() -> dict:
    from agents import AGENTS

    return AGENTS


def resolve_agent(kind: str) -> tuple[type, type]:
    """(ConfigClass, AgentClass) registered under ``kind``, with suggestions for typos."""
    registry = _agents()
    key = kind.replace("-", "_")
    if key not in registry:
        raise SystemExit(f"unknown agent {kind!r}.{suggest(key, registry)} Known agents: {', '.join(sorted(registry))}")
    return registry[key]


def build_agent(kind: str, config: Any, dataset) -> Any:
    """Instantiate an agent for ``dataset`` (dimensions and normalisers come from the data)."""
    _, agent_cls = resolve_agent(kind)
    try:
        return agent_cls.from_dataset(dataset, config)
    except TypeError as err:  # e.g. DDPO, which fine-tunes on a reward rather than a dataset
        raise SystemExit(f"error: {err}") from None


def _one_line(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else err
    return " ".join(str(text).split())


def batch_sampler(agent, dataset):
    """The agent's own batch sampler (e.g. sequence windows) or uniform transitions."""
    make = getattr(agent, "batch_sampler", None)
    return make(dataset) if make is not None else dataset.sample


@dataclass
class RunSpec:
    """Everything needed to rebuild a run: saved as ``config.json`` in the run folder. ``dataset`` is absolute
    when it names a file; ``dataset_sha256`` is the data's fingerprint (``OfflineDataset.fingerprint``)."""

    agent: str
    dataset: str
    agent_config: dict
    train: dict
    eval_episodes: int
    diffrl_version: str = __version__
    dataset_sha256: str | None = None

    def save(self, run_dir: Path) -> None:
        with atomic_open(run_dir / RUN_CONFIG, "w") as f:
            f.write(json.dumps(self.__dict__, indent=2))

    @classmethod
    def load(cls, run_dir: Path) -> RunSpec:
        """The spec of a run folder, with every setting checked (a broken file is named, never half used)."""
        path = run_dir / RUN_CONFIG
        if not path.is_file():
            raise SystemExit(f"{run_dir} is not a diffrl run folder (no {RUN_CONFIG})")
        try:
            spec = config_from_dict(cls, json.loads(path.read_text()))
            config_cls, _ = resolve_agent(spec.agent)
            config_from_dict(config_cls, spec.agent_config)
            config_from_dict(TrainConfig, {**spec.train, "run_dir": str(run_dir)})
        except (ValueError, TypeError, UnicodeDecodeError) as err:  # JSON errors are ValueErrors
            raise ValueError(f"{path} is not a valid run config: {_one_line(err)}") from None
        except SystemExit as err:
            raise ValueError(f"{path}: {err}") from None
        return spec


def _has_contents(folder: Path) -> bool:
    return folder.is_dir() and any(p.name != LOCK_FILE for p in folder.iterdir())


def _new_run_dir(args, kind: str, dataset_name: str) -> Path:
    """The folder of a new run (not created yet): ``--run-dir``, or a fresh name under ``--runs-root``."""
    if not args.run_dir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(args.runs_root) / f"{kind}-{dataset_name.replace('/', '_').replace(':', '_')}-{stamp}"
        run_dir, n = base, 1
        while run_dir.exists():
            n += 1
            run_dir = base.with_name(f"{base.name}-{n}")
        return run_dir
    run_dir = Path(args.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise SystemExit(f"error: --run-dir {run_dir} is a file, not a folder")
    if _has_contents(run_dir):
        if not args.overwrite:
            raise SystemExit(f"run folder {run_dir} already exists and is not empty: pass --resume {run_dir} to "
                             "continue it, --overwrite to replace it, or choose another --run-dir")
        if not (run_dir / RUN_CONFIG).is_file():
            raise SystemExit(f"error: --overwrite deletes only diffrl run folders; {run_dir} has no {RUN_CONFIG}, "
                             "so it is left alone: choose another --run-dir")
    return run_dir


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


def _evaluator(dataset, episodes: int, seed: int, trust_env: bool):
    """Periodic evaluation by return (and normalised score) in the dataset's environment, if it has one."""
    from envs import evaluate

    if episodes <= 0 or getattr(dataset, "env_id", None) is None:
        return None

    def run(agent, step: int) -> dict:
        result = evaluate(agent.policy(seed=seed + 10_000), dataset, episodes=episodes, seed=seed + 10_000,
                          trust_env=trust_env).to_dict()
        return {k: v for k, v in result.items() if isinstance(v, int | float)}

    return run


def _fresh_spec(args) -> RunSpec:
    """The run spec of a new run from the command line: the agent's defaults, then the preset of the dataset's
    task, then the ``field=value`` overrides; a learning-rate horizon left unset follows the run's steps."""
    from agents.presets import apply_preset

    if not args.agent or not args.dataset:
        raise SystemExit("diffrl train needs AGENT and --dataset (or --resume RUN_DIR)")
    if args.overwrite and not args.run_dir:
        raise SystemExit("error: --overwrite needs the --run-dir it replaces")
    config_cls, agent_cls = resolve_agent(args.agent)
    preset_config, preset_line = apply_preset(config_cls(), agent_cls.presets, args.dataset)
    print(preset_line)
    agent_config = apply_overrides(preset_config, args.overrides)
    train = config_to_dict(TrainConfig(batch_size=agent_cls.default_batch_size))
    train.update({k: v for k, v in _train_args(args).items() if v is not None})
    train["checkpoint_every"] = train["checkpoint_every"] or max(1, train["steps"] // 5)
    del train["run_dir"]
    if getattr(agent_config, "total_steps", 0) is None:
        agent_config = dataclasses.replace(agent_config, total_steps=train["steps"])
    episodes = DEFAULT_EVAL_EPISODES if args.eval_episodes is None else args.eval_episodes
    return RunSpec(args.agent.replace("-", "_"), _dataset_arg(args.dataset), config_to_dict(agent_config), train,
                   episodes)


def _train_args(args) -> dict[str, Any]:
    """The TrainConfig settings given on the command line (None: not given)."""
    names = ("steps", "batch_size", "seed", "eval_every", "log_every", "checkpoint_every", "device", "precision",
             "on_nonfinite")
    return {name: getattr(args, name) for name in names}


def _dataset_arg(dataset: str) -> str:
    """A dataset argument as stored: an existing file's absolute path, anything else (names, ids) as given."""
    return str(Path(dataset).resolve()) if os.path.exists(dataset) else dataset


#: Settings a resume may change without changing the updates, and those it may change only with a warning.
_RESUME_FREE = ("steps", "eval_every", "log_every", "checkpoint_every", "on_nonfinite")
_RESUME_WARN = ("device", "precision")


def _resume_spec(args) -> RunSpec:
    """The spec of the run to resume with the command line's changes: those that keep the run exact are applied,
    device / precision with a warning, the rest (agent settings, batch size, seed) refused. ``--dataset`` may
    relocate the same data (its fingerprint is checked once it is loaded)."""
    run_dir = Path(args.resume)
    spec = RunSpec.load(run_dir)
    refused = []
    if args.agent and args.agent.replace("-", "_") != spec.agent:
        refused.append(f"agent {spec.agent} -> {args.agent}")
    if args.overrides:
        config_cls, _ = resolve_agent(spec.agent)
        current = config_from_dict(config_cls, spec.agent_config)
        changed = apply_overrides(current, args.overrides)
        refused += [f"{f.name} {getattr(current, f.name)} -> {getattr(changed, f.name)}"
                    for f in dataclasses.fields(current) if getattr(current, f.name) != getattr(changed, f.name)]
    given = _train_args(args)
    refused += [f"{name} {spec.train[name]} -> {given[name]}" for name in ("batch_size", "seed")
                if given[name] is not None and given[name] != spec.train[name]]
    if args.overwrite:
        refused.append("--overwrite (it starts a new run)")
    if args.run_dir and Path(args.run_dir).resolve() != run_dir.resolve():
        refused.append(f"--run-dir {args.run_dir} (the run lives in {run_dir})")
    if refused:
        raise SystemExit(f"error: --resume continues {run_dir} exactly, so it cannot change {'; '.join(refused)}; "
                         "start a new run for that")
    for name in _RESUME_FREE + _RESUME_WARN:
        if given[name] is not None and given[name] != spec.train.get(name):
            note = "warning: the resumed run is not bit-identical to an uninterrupted one" if name in _RESUME_WARN \
                else "the updates stay exact"
            print(f"resume: {name} {spec.train.get(name)} -> {given[name]} ({note})")
            spec.train[name] = given[name]
    if args.eval_episodes is not None and args.eval_episodes != spec.eval_episodes:
        print(f"resume: eval_episodes {spec.eval_episodes} -> {args.eval_episodes}")
        spec.eval_episodes = args.eval_episodes
    if args.dataset and _dataset_arg(args.dataset) != spec.dataset:
        if spec.dataset_sha256 is None:
            raise SystemExit(f"error: {run_dir / RUN_CONFIG} stores no fingerprint of its dataset, so --dataset "
                             "cannot be checked to hold the same data")
        print(f"resume: dataset {spec.dataset} -> {_dataset_arg(args.dataset)} (content checked)")
        spec.dataset = _dataset_arg(args.dataset)
    return spec


def _train_device(spec: RunSpec, args) -> torch.device:
    """The device of this process: ``--device`` (or the run's), with torchrun's LOCAL_RANK GPU for auto / cuda."""
    from diffrl.distributed import init_distributed

    requested = args.device or spec.train.get("device", "auto")
    if "WORLD_SIZE" in os.environ:
        rank_device = init_distributed()  # NCCL and GPU LOCAL_RANK with CUDA, gloo on the CPU
        if requested in ("auto", "cuda") and rank_device.type == "cuda":
            requested = str(rank_device)
    return resolve_device(requested)


def _checked_run(spec: RunSpec, args) -> tuple[torch.device, Any, Any, Any]:
    """Device, dataset, agent and batch sampler of a run, with everything checked before anything is written:
    the settings, the data (its fingerprint on a resume), the agent, the dataset's environment, one batch."""
    from envs import check_env, load_dataset

    config_from_dict(TrainConfig, {**spec.train, "run_dir": "."})
    device = _train_device(spec, args)
    config_cls, _ = resolve_agent(spec.agent)
    dataset = load_dataset(spec.dataset, trust_env=args.trust_dataset_env)
    fingerprint = dataset.fingerprint()
    if spec.dataset_sha256 not in (None, fingerprint):
        raise SystemExit(f"error: dataset {spec.dataset} does not hold the data run {args.resume} was trained on "
                         f"(its fingerprint differs from the one in {RUN_CONFIG}); a resume must use the same data")
    spec.dataset_sha256 = fingerprint
    seed_everything(spec.train["seed"])  # the agent's initial weights follow the run's seed
    agent = build_agent(spec.agent, config_from_dict(config_cls, spec.agent_config), dataset).to(device)
    if spec.eval_episodes > 0 and getattr(dataset, "env_id", None) is not None:
        check_env(dataset, trust_env=args.trust_dataset_env)
    sample_batch = batch_sampler(agent, dataset.to(device))
    sample_batch(1, torch.Generator(device).manual_seed(0))  # the data fits the agent's batches
    return device, dataset, agent, sample_batch


def _claim_run_dir(spec: RunSpec, args, dataset_name: str) -> tuple[Path, RunLock | None]:
    """The run folder, created, locked and holding the spec on rank 0 (which every process follows); when rank 0
    cannot claim it, every process stops with its reason."""
    from diffrl.distributed import all_gather_object, is_main_process

    run_dir, lock, failure = None, None, None
    if is_main_process():
        try:
            run_dir = Path(args.resume) if args.resume else _new_run_dir(args, spec.agent, dataset_name)
            lock = _open_run_dir(run_dir, spec, overwrite=args.overwrite)
        except (OSError, FolderInUse, SystemExit) as err:
            failure = err
    shared_dir, shared_failure = all_gather_object((str(run_dir), failure and str(failure)))[0]
    if failure is not None:
        raise failure
    if shared_failure is not None:
        raise SystemExit(f"error: {shared_failure}")
    return Path(shared_dir), lock


def cmd_train(args) -> None:
    from diffrl.distributed import barrier, cleanup, is_main_process

    spec = _resume_spec(args) if args.resume else _fresh_spec(args)
    device, dataset, agent, sample_batch = _checked_run(spec, args)
    run_dir, lock = _claim_run_dir(spec, args, dataset.name)
    try:
        train_config = config_from_dict(TrainConfig, {**spec.train, "run_dir": str(run_dir), "device": str(device)})
        trainer = Trainer(agent, sample_batch, train_config,
                          evaluate=_evaluator(dataset, spec.eval_episodes, train_config.seed, args.trust_dataset_env))
        trainer.fit(resume=bool(args.resume))
        if is_main_process():
            _finish_run(agent, dataset, run_dir, spec, args.trust_dataset_env)
        barrier()  # no rank tears the group down while rank 0 still finishes the run
    finally:
        if lock is not None:
            lock.release()
    cleanup()


def _finish_run(agent, dataset, run_dir: Path, spec: RunSpec, trust_env: bool) -> None:
    """Save the final policy, evaluate it, plot the learning curve and print a short summary."""
    from diffrl.plots import plot_learning_curve
    from envs import evaluate

    agent.policy().save(run_dir / POLICY_FILE)
    print(f"run folder: {run_dir}\npolicy:     {run_dir / POLICY_FILE}")
    if spec.eval_episodes > 0 and getattr(dataset, "env_id", None) is not None:
        seed = spec.train.get("seed", 0) + 20_000
        result = evaluate(agent.policy(seed=seed), dataset, episodes=spec.eval_episodes, seed=seed,
                          trust_env=trust_env)
        with atomic_open(run_dir / "final_eval.json", "w") as f:
            f.write(json.dumps(result.to_dict(), indent=2))
        line = f"return {result.mean:.2f} +- {result.stderr:.2f} over {spec.eval_episodes} episodes"
        if result.normalized_mean is not None:
            line += f", normalised score {result.normalized_mean:.1f} +- {result.normalized_stderr:.1f}"
        print(f"final:      {line}")
    plot = plot_learning_curve(run_dir)
    if plot is not None:
        print(f"plot:       {plot}")


def _run_dir_of(path: Path) -> Path:
    """The run folder a path belongs to: itself, its policy file's folder, or a checkpoint's run."""
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def _load_policy(path: Path, seed: int | None = None, device: str = "cpu", trust_env: bool = False):
    """A policy from a policy file, a run folder (its final policy) or a training checkpoint of a run, on
    ``device``."""
    from agents.policy import CHECKPOINT_KIND, load_policy
    from diffrl.checkpoint import CheckpointError, load_checkpoint, read_header
    from envs import load_dataset

    if path.is_dir():
        path = path / POLICY_FILE
    if not path.is_file() or read_header(path).get("kind") == CHECKPOINT_KIND:
        return load_policy(path, seed=seed, device=device)
    spec = RunSpec.load(_run_dir_of(path))
    config_cls, _ = resolve_agent(spec.agent)
    dataset = load_dataset(spec.dataset, trust_env=trust_env)
    agent = build_agent(spec.agent, config_from_dict(config_cls, spec.agent_config), dataset).to(device)
    state = load_checkpoint(path, expected_kind=spec.agent)["agent"]
    try:
        agent.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path} does not fit the agent its run's {RUN_CONFIG} describes: {_one_line(err)}") \
            from None
    return agent.policy(seed=seed)


def _eval_one(job: tuple[str, str | None, int, int, str, bool]) -> dict:
    from envs import evaluate, load_dataset

    path, env, episodes, seed, device, trust_env = job
    policy = _load_policy(Path(path), seed=seed, device=device, trust_env=trust_env)  # noise follows the seed too
    target = env if env is not None else load_dataset(RunSpec.load(_run_dir_of(Path(path))).dataset,
                                                      trust_env=trust_env)
    result = evaluate(policy, target, episodes=episodes, seed=seed, trust_env=trust_env)
    return {"path": path, "seed": seed, **result.to_dict()}


def cmd_eval(args) -> None:
    from diffrl.distributed import parallel_map

    device = str(resolve_device(args.device))
    jobs = [(str(p), args.env, args.episodes, s, device, args.trust_dataset_env) for p in args.paths
            for s in args.seeds]
    results = parallel_map(_eval_one, jobs, processes=args.workers)
    print(json.dumps(results, indent=2, default=float))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=float))


def cmd_collect(args) -> None:
    from envs import collect

    paths = collect(args.env, level=args.level.split(","), n_transitions=args.transitions,
                    train_steps=args.train_steps, seed=args.seed, out_dir=args.out,
                    formats=tuple(args.formats.split(",")), progress=True)
    print(json.dumps(paths, indent=2, default=str))


def cmd_bench(args) -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / f"bench_{args.name.replace('-', '_')}.py"
    if not script.is_file():
        available = sorted(p.stem[len("bench_"):] for p in script.parent.glob("bench_*.py"))
        raise SystemExit(f"no benchmark {args.name!r}.{suggest(args.name, available)} "
                         f"Available: {', '.join(available)}")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")


def cmd_list(args) -> None:
    from diffrl.schedules import SCHEDULES
    from diffrl.solvers import SOLVERS
    from envs import d4rl, minari_io, toy

    print("agents:    " + ", ".join(sorted(_agents())))
    print("solvers:   " + ", ".join(sorted(SOLVERS)))
    print("schedules: " + ", ".join(sorted(SCHEDULES)))
    print("datasets:")
    print("  toy:       " + ", ".join(toy.known_names()))
    print("  minari:    " + (", ".join(minari_io.local_dataset_ids()) or "(none in local storage)"))
    print(f"  d4rl:      {len(d4rl.known_names())} names such as hopper-medium-v2, read from "
          + " or ".join(str(d) for d in d4rl.d4rl_dirs()))
    print("  any D4RL-layout .hdf5 file by path")


def _trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-dataset-env", action="store_true",
                        help="build a Minari dataset's environment from the entry point the dataset records, which "
                             "runs code it names (default: registered Gymnasium ids only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffrl", description="Diffusion models for decision making.")
    parser.add_argument("--version", action="version", version=f"diffrl {__version__}")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train an agent on an offline dataset",
                           epilog="Agent config fields are set with field=value, e.g. lr=1e-4 hidden=512.")
    train.add_argument("agent", nargs="?", help="agent kind (see `diffrl list`); then any field=value overrides")
    train.add_argument("--dataset", help="D4RL name or .hdf5 path, Minari id, or toy:<name>")
    train.add_argument("--steps", type=int)
    train.add_argument("--batch-size", type=int, help="batch size per process")
    train.add_argument("--seed", type=int)
    train.add_argument("--eval-every", type=int)
    train.add_argument("--eval-episodes", type=int, help=f"episodes per evaluation (default {DEFAULT_EVAL_EPISODES})")
    train.add_argument("--checkpoint-every", type=int)
    train.add_argument("--log-every", type=int)
    train.add_argument("--device", help="auto (CUDA when available, the default), cpu, cuda or cuda:N; "
                                        "under torchrun each process takes GPU LOCAL_RANK")
    train.add_argument("--precision", choices=sorted(PRECISIONS), help="training compute type (default fp32)")
    train.add_argument("--on-nonfinite", choices=NONFINITE_POLICIES,
                       help="a NaN/inf loss or gradient norm stops the run (stop, the default) or its update is "
                            "left out (skip)")
    train.add_argument("--run-dir", help="run folder (default: runs/<agent>-<dataset>-<time>)")
    train.add_argument("--runs-root", default="runs")
    train.add_argument("--overwrite", action="store_true",
                       help="delete the contents of an existing run folder --run-dir (one with config.json) and "
                            "start afresh")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue a run exactly from its newest valid checkpoint (--steps sets a new total)")
    _trust_flag(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate saved policies (run folders, policy files or checkpoints)")
    ev.add_argument("paths", nargs="+")
    ev.add_argument("--episodes", type=int, default=10)
    ev.add_argument("--env", help="environment id (default: the run's dataset environment)")
    ev.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    ev.add_argument("--workers", type=int, default=1, help="evaluate paths x seeds in this many processes")
    ev.add_argument("--output", help="write results as JSON here")
    ev.add_argument("--device", default="auto", help="where the policy runs: auto, cpu, cuda or cuda:N")
    _trust_flag(ev)
    ev.set_defaults(func=cmd_eval)

    col = sub.add_parser("collect", help="collect a D4RL-style dataset with an SB3 SAC behaviour policy")
    col.add_argument("env")
    col.add_argument("--level", default="medium",
                     help="random, medium, medium-replay, expert or medium-expert; several comma-separated "
                          "share one SAC training run")
    col.add_argument("--transitions", type=int, default=100_000)
    col.add_argument("--train-steps", type=int, default=150_000)
    col.add_argument("--seed", type=int, default=0)
    col.add_argument("--out", default="datasets")
    col.add_argument("--formats", default="hdf5,minari")
    col.set_defaults(func=cmd_collect)

    bench = sub.add_parser("bench", help="run a benchmark script from scripts/bench_<name>.py")
    bench.add_argument("name")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)

    lst = sub.add_parser("list", help="list agents, solvers, schedules and datasets")
    lst.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``diffrl`` command."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    if args.command == "train" and args.agent and "=" in args.agent:  # `train --resume RUN field=value`
        overrides.insert(0, args.agent)
        args.agent = None
    unknown = extra if args.command != "train" else [x for x in extra if x not in overrides]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    args.overrides = overrides
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise SystemExit(f"error: --threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        args.func(args)
    except SystemExit as err:
        if isinstance(err.code, str):
            raise _usage_error(err.code) from None
        raise
    except (ValueError, KeyError, OSError, NonFiniteError, FolderInUse) as err:
        raise _usage_error(f"error: {_one_line(err)}") from None


def _usage_error(message: str) -> SystemExit:
    """Exit status 2 with ``message`` as one line on stderr (the exception's text stays the message)."""
    line = " ".join(message.split())
    print(f"diffrl: {line}", file=sys.stderr)
    err = SystemExit(line)
    err.code = 2
    return err
