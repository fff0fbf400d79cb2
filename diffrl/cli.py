"""The ``diffrl`` command: train, eval, collect, bench and list.

This is the one module of the core that imports ``agents`` and ``envs``: it wires datasets, agents and the training
loop together. Every run writes one folder holding the resolved config, TensorBoard events, checkpoints, evaluation
results (JSON and CSV), the final policy and plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import runpy
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffrl import __version__
from diffrl.config import apply_overrides, config_from_dict, config_to_dict, suggest
from diffrl.device import PRECISIONS, resolve_device
from diffrl.seeding import seed_everything
from diffrl.training import TrainConfig, Trainer

RUN_CONFIG = "config.json"
POLICY_FILE = "policy.pt"


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


def batch_sampler(agent, dataset):
    """The agent's own batch sampler (e.g. sequence windows) or uniform transitions."""
    make = getattr(agent, "batch_sampler", None)
    return make(dataset) if make is not None else dataset.sample


@dataclass
class RunSpec:
    """Everything needed to rebuild a run: saved as ``config.json`` in the run folder."""

    agent: str
    dataset: str
    agent_config: dict
    train: dict
    eval_episodes: int
    diffrl_version: str = __version__

    def save(self, run_dir: Path) -> None:
        (run_dir / RUN_CONFIG).write_text(json.dumps(self.__dict__, indent=2))

    @classmethod
    def load(cls, run_dir: Path) -> RunSpec:
        path = run_dir / RUN_CONFIG
        if not path.is_file():
            raise SystemExit(f"{run_dir} is not a diffrl run folder (no {RUN_CONFIG})")
        return cls(**json.loads(path.read_text()))


def _new_run_dir(args, kind: str, dataset_name: str) -> Path:
    if args.run_dir:
        run_dir = Path(args.run_dir)
        if run_dir.exists() and any(run_dir.iterdir()) and not args.overwrite:
            raise SystemExit(f"run folder {run_dir} already exists and is not empty: pass --resume {run_dir} to "
                             "continue it, --overwrite to replace it, or choose another --run-dir")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        safe = dataset_name.replace("/", "_").replace(":", "_")
        run_dir = Path(args.runs_root) / f"{kind}-{safe}-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _evaluator(dataset, episodes: int, seed: int):
    """Periodic evaluation by return (and normalised score) in the dataset's environment, if it has one."""
    from envs import evaluate

    if episodes <= 0 or getattr(dataset, "env_id", None) is None:
        return None

    def run(agent, step: int) -> dict:
        result = evaluate(agent.policy(seed=seed + 10_000), dataset, episodes=episodes, seed=seed + 10_000).to_dict()
        return {k: v for k, v in result.items() if isinstance(v, int | float)}

    return run


def _fresh_spec(args) -> RunSpec:
    """The run spec of a new run from the command line: the agent's defaults, then the preset of the dataset's
    task, then the ``field=value`` overrides; a learning-rate horizon left unset follows the run's steps."""
    from agents.presets import apply_preset

    if not args.agent or not args.dataset:
        raise SystemExit("diffrl train needs AGENT and --dataset (or --resume RUN_DIR)")
    config_cls, agent_cls = resolve_agent(args.agent)
    preset_config, preset_line = apply_preset(config_cls(), agent_cls.presets, args.dataset)
    print(preset_line)
    agent_config = apply_overrides(preset_config, args.overrides)
    train = config_to_dict(TrainConfig(batch_size=agent_cls.default_batch_size))
    train.update({k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("seed", args.seed),
                                    ("eval_every", args.eval_every), ("log_every", args.log_every),
                                    ("checkpoint_every", args.checkpoint_every), ("device", args.device),
                                    ("precision", args.precision)) if v is not None})
    train["checkpoint_every"] = train["checkpoint_every"] or max(1, train["steps"] // 5)
    del train["run_dir"]
    if getattr(agent_config, "total_steps", 0) is None:
        agent_config = dataclasses.replace(agent_config, total_steps=train["steps"])
    return RunSpec(args.agent.replace("-", "_"), args.dataset, config_to_dict(agent_config), train, args.eval_episodes)


def _train_device(spec: RunSpec, args) -> torch.device:
    """The device of this process: ``--device`` (or the run's), with torchrun's LOCAL_RANK GPU for auto / cuda."""
    from diffrl.distributed import init_distributed

    requested = args.device or spec.train.get("device", "auto")
    if "WORLD_SIZE" in os.environ:
        rank_device = init_distributed()  # NCCL and GPU LOCAL_RANK with CUDA, gloo on the CPU
        if requested in ("auto", "cuda") and rank_device.type == "cuda":
            requested = str(rank_device)
    return resolve_device(requested)


def cmd_train(args) -> None:
    from diffrl.distributed import all_gather_object, barrier, cleanup, is_main_process
    from envs import load_dataset

    spec = RunSpec.load(Path(args.resume)) if args.resume else _fresh_spec(args)
    if args.resume and args.steps is not None:  # extend (or shorten) the run
        spec.train["steps"] = args.steps
    if args.resume and args.precision is not None:
        spec.train["precision"] = args.precision
    device = _train_device(spec, args)
    config_cls, _ = resolve_agent(spec.agent)
    dataset = load_dataset(spec.dataset)
    seed_everything(spec.train["seed"])  # the agent's initial weights follow the run's seed
    agent = build_agent(spec.agent, config_from_dict(config_cls, spec.agent_config), dataset).to(device)
    run_dir = None
    if is_main_process():
        run_dir = Path(args.resume) if args.resume else _new_run_dir(args, spec.agent, dataset.name)
        spec.save(run_dir)
    run_dir = Path(all_gather_object(str(run_dir))[0])  # every process follows rank 0's folder
    train_config = config_from_dict(TrainConfig, {**spec.train, "run_dir": str(run_dir), "device": str(device)})
    trainer = Trainer(agent, batch_sampler(agent, dataset.to(device)), train_config,
                      evaluate=_evaluator(dataset, spec.eval_episodes, train_config.seed))
    trainer.fit(resume=bool(args.resume))
    if is_main_process():
        _finish_run(agent, dataset, run_dir, spec)
    barrier()  # no rank tears the group down while rank 0 still finishes the run
    cleanup()


def _finish_run(agent, dataset, run_dir: Path, spec: RunSpec) -> None:
    """Save the final policy, evaluate it, plot the learning curve and print a short summary."""
    from diffrl.plots import plot_learning_curve
    from envs import evaluate

    agent.policy().save(run_dir / POLICY_FILE)
    print(f"run folder: {run_dir}\npolicy:     {run_dir / POLICY_FILE}")
    if spec.eval_episodes > 0 and getattr(dataset, "env_id", None) is not None:
        seed = spec.train.get("seed", 0) + 20_000
        result = evaluate(agent.policy(seed=seed), dataset, episodes=spec.eval_episodes, seed=seed)
        (run_dir / "final_eval.json").write_text(json.dumps(result.to_dict(), indent=2))
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


def _load_policy(path: Path, seed: int | None = None, device: str = "cpu"):
    """A policy from a policy file, a run folder (its final policy) or a training checkpoint of a run, on
    ``device``."""
    from agents.policy import CHECKPOINT_KIND, load_policy
    from diffrl.checkpoint import load_checkpoint, read_header
    from envs import load_dataset

    if path.is_dir():
        path = path / POLICY_FILE
    if not path.is_file() or read_header(path).get("kind") == CHECKPOINT_KIND:
        return load_policy(path, seed=seed, device=device)
    spec = RunSpec.load(_run_dir_of(path))
    config_cls, _ = resolve_agent(spec.agent)
    agent = build_agent(spec.agent, config_from_dict(config_cls, spec.agent_config), load_dataset(spec.dataset))
    agent.to(device).load_state_dict(load_checkpoint(path, expected_kind=spec.agent)["agent"])
    return agent.policy(seed=seed)


def _eval_one(job: tuple[str, str | None, int, int, str]) -> dict:
    from envs import evaluate, load_dataset

    path, env, episodes, seed, device = job
    policy = _load_policy(Path(path), seed=seed, device=device)  # sampling noise follows the evaluation seed too
    target = env if env is not None else load_dataset(RunSpec.load(_run_dir_of(Path(path))).dataset)
    return {"path": path, "seed": seed, **evaluate(policy, target, episodes=episodes, seed=seed).to_dict()}


def cmd_eval(args) -> None:
    from diffrl.distributed import parallel_map

    device = str(resolve_device(args.device))
    jobs = [(str(p), args.env, args.episodes, s, device) for p in args.paths for s in args.seeds]
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
    train.add_argument("--eval-episodes", type=int, default=10)
    train.add_argument("--checkpoint-every", type=int)
    train.add_argument("--log-every", type=int)
    train.add_argument("--device", help="auto (CUDA when available, the default), cpu, cuda or cuda:N; "
                                        "under torchrun each process takes GPU LOCAL_RANK")
    train.add_argument("--precision", choices=sorted(PRECISIONS), help="training compute type (default fp32)")
    train.add_argument("--run-dir", help="run folder (default: runs/<agent>-<dataset>-<time>)")
    train.add_argument("--runs-root", default="runs")
    train.add_argument("--overwrite", action="store_true", help="reuse a non-empty --run-dir")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue a run exactly from its latest checkpoint (--steps sets a new total)")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate saved policies (run folders, policy files or checkpoints)")
    ev.add_argument("paths", nargs="+")
    ev.add_argument("--episodes", type=int, default=10)
    ev.add_argument("--env", help="environment id (default: the run's dataset environment)")
    ev.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    ev.add_argument("--workers", type=int, default=1, help="evaluate paths x seeds in this many processes")
    ev.add_argument("--output", help="write results as JSON here")
    ev.add_argument("--device", default="auto", help="where the policy runs: auto, cpu, cuda or cuda:N")
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
    unknown = extra if args.command != "train" else [x for x in extra if x not in overrides]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    args.overrides = overrides
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise SystemExit(f"error: {err}") from None
