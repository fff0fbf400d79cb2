"""The ``diffrl`` command: train, distill, eval, collect, bench and list.

``diffrl train`` is a thin layer over :mod:`diffrl.api` (``make(...).fit(...)`` and ``resume``), so a run started
from the command line and one started from Python write the same run folder. This module and ``diffrl.api`` are
the only modules of the core that import ``agents`` and ``envs``. A user's mistake is reported as one line naming
the file and the problem, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

import torch

from diffrl import __version__
from diffrl.api import (
    DEFAULT_EVAL_EPISODES,
    POLICY_FILE,
    RUN_CONFIG,
    RunSpec,
    build_agent,
    describe,
    distill,
    make,
    one_line,
    resolve_agent,
    resume,
    train_ddpo,
)
from diffrl.config import config_from_dict, parse_overrides, suggest
from diffrl.device import PRECISIONS, resolve_device
from diffrl.runlock import FolderInUse
from diffrl.training import NONFINITE_POLICIES, NonFiniteError

#: ``diffrl train`` options passed on to ``make`` (run-wide settings) and to ``fit`` / ``resume`` (the schedule).
_MAKE_OPTIONS = ("seed", "batch_size", "device", "precision")
_FIT_OPTIONS = ("steps", "eval_every", "eval_episodes", "eval_env", "log_every", "checkpoint_every", "on_nonfinite")


def cmd_train(args) -> None:
    if args.help:
        print(args.format_help())
        if args.agent:
            print(describe(args.agent, args.dataset))
        return
    given = {name: getattr(args, name) for name in _MAKE_OPTIONS + _FIT_OPTIONS if getattr(args, name) is not None}
    if args.resume:
        spec = RunSpec.load(Path(args.resume))
        refused = []
        if args.agent and args.agent.replace("-", "_") != spec.agent:
            refused.append(f"agent {spec.agent} -> {args.agent}")
        if args.overwrite:
            refused.append("--overwrite (it starts a new run)")
        if args.run_dir and Path(args.run_dir).resolve() != Path(args.resume).resolve():
            refused.append(f"--run-dir {args.run_dir} (the run lives in {args.resume})")
        refused += [f"--{name.replace('_', '-')}" for name in _DDPO_OPTIONS if getattr(args, name) is not None]
        if refused:
            raise SystemExit(f"error: --resume continues {args.resume} exactly, so it cannot change "
                             f"{'; '.join(refused)}; start a new run for that")
        config = parse_overrides(resolve_agent(spec.agent)[0], args.overrides)
        resume(args.resume, dataset=args.dataset, config=config, trust_env=args.trust_dataset_env, **given)
        return
    if args.agent and args.agent.replace("-", "_") == "ddpo":
        _train_ddpo(args, given)
        return
    if any(getattr(args, name) is not None for name in _DDPO_OPTIONS):
        raise SystemExit("--model, --reward, --prompts, --clip-model and --aesthetic-head are settings of "
                         "diffrl train ddpo")
    if not args.agent or not args.dataset:
        raise SystemExit("diffrl train needs AGENT and --dataset (or --resume RUN_DIR); diffrl train AGENT --help "
                         "lists the agent's settings")
    config = parse_overrides(resolve_agent(args.agent)[0], args.overrides)
    experiment = make(args.agent, args.dataset, trust_env=args.trust_dataset_env,
                      **{k: v for k, v in given.items() if k in _MAKE_OPTIONS}, **config)
    experiment.fit(run_dir=args.run_dir, runs_root=args.runs_root, overwrite=args.overwrite,
                   **{k: v for k, v in given.items() if k in _FIT_OPTIONS})


#: ``diffrl train ddpo`` options (attribute names): the pipeline, its reward and prompts.
_DDPO_OPTIONS = ("model", "reward", "prompts", "clip_model", "aesthetic_head")


def _train_ddpo(args, given: dict) -> None:
    """``diffrl train ddpo --model PATH --prompts FILE [--reward NAME]``: :func:`diffrl.api.train_ddpo`."""
    from agents.ddpo import DDPOConfig

    if args.model is None or args.prompts is None:
        raise SystemExit("diffrl train ddpo needs --model PIPELINE (a diffusers pipeline folder or id) and --prompts "
                         "FILE (one prompt per line, or a .json list); --reward defaults to jpeg_compressibility")
    if args.dataset or "eval_env" in given:
        raise SystemExit("diffrl train ddpo fine-tunes on a reward, not on a dataset or environment: drop "
                         "--dataset / --eval-env")
    given = dict(given)
    if "eval_episodes" in given:
        given["eval_images"] = given.pop("eval_episodes")
    train_ddpo(args.model, args.prompts, args.reward or "jpeg_compressibility", run_dir=args.run_dir,
               runs_root=args.runs_root, overwrite=args.overwrite, clip_model=args.clip_model,
               aesthetic_head=args.aesthetic_head, **given, **parse_overrides(DDPOConfig, args.overrides))


def cmd_distill(args) -> None:
    from diffrl.distillation import DistillConfig

    if args.resume:
        if args.run or args.overrides or args.run_dir or args.overwrite:
            raise SystemExit(f"error: diffrl distill --resume {args.resume} continues that run with its own "
                             "settings; give no teacher RUN, settings, --run-dir or --overwrite with it")
        resume(args.resume, trust_env=args.trust_dataset_env)
        return
    if not args.run:
        raise SystemExit("diffrl distill needs the teacher RUN folder (or --resume STUDENT_RUN_DIR)")
    settings = parse_overrides(DistillConfig, args.overrides)
    settings.update({name: getattr(args, name) for name in ("iterations", "teacher_steps", "scales", "lr")
                     if getattr(args, name) is not None})
    distill(args.run, method=args.method, steps=args.steps, out_dir=args.run_dir, runs_root=args.runs_root,
            overwrite=args.overwrite, batch_size=args.batch_size, seed=args.seed, device=args.device,
            eval_episodes=args.eval_episodes, trust_env=args.trust_dataset_env, **settings)


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
        raise CheckpointError(f"{path} does not fit the agent its run's {RUN_CONFIG} describes: {one_line(err)}") \
            from None
    return agent.policy(seed=seed)


def _eval_one(job: tuple[str, str | None, int, int, str, bool]) -> dict:
    from envs import evaluate, load_dataset

    path, env, episodes, seed, device, trust_env = job
    policy = _load_policy(Path(path), seed=seed, device=device, trust_env=trust_env)  # noise follows the seed too
    if env is None:
        spec = RunSpec.load(_run_dir_of(Path(path)))
        env = spec.eval_env or load_dataset(spec.dataset, trust_env=trust_env)
    result = evaluate(policy, env, episodes=episodes, seed=seed, trust_env=trust_env)
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
    from envs import collect, maze

    env = args.env or args.env_flag
    if env is None or (args.env and args.env_flag and args.env != args.env_flag):
        raise SystemExit("error: diffrl collect needs one environment: ENV or --env ENV")
    if maze.is_maze(env):
        given = [flag for flag, value in (("--level", args.level), ("--train-steps", args.train_steps))
                 if value is not None]
        if given:
            raise SystemExit(f"error: {' and '.join(given)} do not apply to {env} (its behaviour is the waypoint "
                             "controller; --noise sets its action noise)")
        try:
            written = maze.collect_maze(env, n_transitions=args.transitions, seed=args.seed,
                                        noise=maze.ACTION_NOISE if args.noise is None else args.noise,
                                        out_dir=args.out, formats=tuple(args.formats.split(",")), progress=True)
        except ImportError as err:
            raise SystemExit(f"error: {err}") from None
    else:
        if args.noise is not None:
            raise SystemExit(f"error: --noise applies to maze2d-* datasets only, not {env}")
        train_steps = 150_000 if args.train_steps is None else args.train_steps
        written = collect(env, level=(args.level or "medium").split(","), n_transitions=args.transitions,
                          train_steps=train_steps, seed=args.seed, out_dir=args.out,
                          formats=tuple(args.formats.split(",")), progress=True)
    print(json.dumps(written, indent=2, default=str))


def cmd_bench(args) -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / f"bench_{args.name.replace('-', '_')}.py"
    if not script.is_file():
        available = sorted(p.stem[len("bench_"):] for p in script.parent.glob("bench_*.py"))
        raise SystemExit(f"no benchmark {args.name!r}.{suggest(args.name, available)} "
                         f"Available: {', '.join(available)}")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")


def cmd_list(args) -> None:
    from agents import AGENTS
    from diffrl.schedules import SCHEDULES
    from diffrl.solvers import SOLVERS
    from envs import d4rl, minari_io, toy

    if args.agent:
        print(describe(args.agent, args.dataset))
        return
    print("agents:    " + ", ".join(sorted(AGENTS)) + "  (diffrl list AGENT: its settings)")
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

    train = sub.add_parser("train", help="train an agent on an offline dataset", add_help=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="Agent config fields are set with field=value, e.g. lr=1e-4 hidden=512.\n"
                                  "`diffrl train AGENT --help [--dataset D]` also lists every field of AGENT (type, "
                                  "default, meaning)\nand the preset dataset D applies.")
    train.add_argument("-h", "--help", action="store_true", help="show this help (and AGENT's settings) and exit")
    train.add_argument("agent", nargs="?", help="agent kind (see `diffrl list`); then any field=value overrides")
    train.add_argument("--dataset", help="D4RL name or .hdf5 path, Minari id, or toy:<name>")
    train.add_argument("--steps", type=int)
    train.add_argument("--batch-size", type=int, help="batch size per process")
    train.add_argument("--seed", type=int)
    train.add_argument("--eval-every", type=int)
    train.add_argument("--eval-episodes", type=int, help=f"episodes per evaluation (default {DEFAULT_EVAL_EPISODES})")
    train.add_argument("--eval-env", help="evaluation environment id (default: the dataset's environment)")
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
    ddpo = train.add_argument_group("ddpo (diffrl train ddpo --model PIPELINE --prompts FILE [--reward NAME])")
    ddpo.add_argument("--model", help="diffusers text-to-image pipeline: a folder saved with save_pretrained, or "
                                     "a hub id")
    ddpo.add_argument("--reward", help="jpeg_compressibility (default), jpeg_incompressibility or aesthetic")
    ddpo.add_argument("--prompts", help="prompts file: one prompt per line, or a .json list of strings")
    ddpo.add_argument("--clip-model", help="aesthetic reward: local CLIP ViT-L/14 folder (transformers)")
    ddpo.add_argument("--aesthetic-head", help="aesthetic reward: the predictor head's state dict "
                                              "(.safetensors or .pth)")
    _trust_flag(train)
    train.set_defaults(func=cmd_train, format_help=train.format_help)

    dis = sub.add_parser("distill", help="distil a run's policy into a few-step student (a new run folder)",
                         epilog="Further DistillConfig fields are set with field=value, e.g. target_ema=0.9 "
                                "(see diffrl.distillation.DistillConfig).")
    dis.add_argument("run", nargs="?",
                     help="run folder of the teacher (diffusion_bc, diffusion_policy or diffusion_ql)")
    dis.add_argument("--method", default="progressive",
                     help="progressive, consistency, consistency-training or reflow (LinearFlow models)")
    dis.add_argument("--steps", type=int, default=2, help="network calls of the student's sampler")
    dis.add_argument("--iterations", type=int, help="updates per progressive round, or in all (default 2000)")
    dis.add_argument("--teacher-steps", type=int,
                     help="progressive: DDIM steps of the first teacher; reflow: ODE steps of the pairs")
    dis.add_argument("--scales", type=int, help="consistency: discretisation N of the time grid")
    dis.add_argument("--lr", type=float, help="student learning rate (default 3e-4)")
    dis.add_argument("--batch-size", type=int, default=256)
    dis.add_argument("--seed", type=int, default=0)
    dis.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    dis.add_argument("--eval-episodes", type=int, help="final evaluation episodes (default: the teacher run's)")
    dis.add_argument("--run-dir", help="run folder of the student (default: runs/<agent>-<method><steps>-...)")
    dis.add_argument("--runs-root", default="runs")
    dis.add_argument("--overwrite", action="store_true", help="replace an existing run folder --run-dir")
    dis.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted distillation run exactly from its newest checkpoint")
    _trust_flag(dis)
    dis.set_defaults(func=cmd_distill)

    ev = sub.add_parser("eval", help="evaluate saved policies (run folders, policy files or checkpoints)")
    ev.add_argument("paths", nargs="+")
    ev.add_argument("--episodes", type=int, default=10)
    ev.add_argument("--env", help="environment id (default: the run's evaluation environment)")
    ev.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    ev.add_argument("--workers", type=int, default=1, help="evaluate paths x seeds in this many processes")
    ev.add_argument("--output", help="write results as JSON here")
    ev.add_argument("--device", default="auto", help="where the policy runs: auto, cpu, cuda or cuda:N")
    _trust_flag(ev)
    ev.set_defaults(func=cmd_eval)

    col = sub.add_parser("collect", help="collect a D4RL-style dataset: an SB3 SAC behaviour policy on a Gymnasium "
                                         "env, or D4RL's waypoint controller on maze2d-umaze|medium|large")
    col.add_argument("env", nargs="?", help="Gymnasium env id (SAC levels) or maze2d-umaze|maze2d-medium|maze2d-large")
    col.add_argument("--env", dest="env_flag", metavar="ENV", help="the same as ENV")
    col.add_argument("--level", default=None,
                     help="random, medium (default), medium-replay, expert or medium-expert; several "
                          "comma-separated share one SAC training run")
    col.add_argument("--transitions", type=int, default=100_000)
    col.add_argument("--train-steps", type=int, default=None, help="SAC training steps (default 150000)")
    col.add_argument("--noise", type=float, default=None,
                     help="maze2d: std of the Gaussian action noise (default 0.5, D4RL's --noisy)")
    col.add_argument("--seed", type=int, default=0)
    col.add_argument("--out", default="datasets")
    col.add_argument("--formats", default="hdf5,minari")
    col.set_defaults(func=cmd_collect)

    bench = sub.add_parser("bench", help="run a benchmark script from scripts/bench_<name>.py")
    bench.add_argument("name")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)

    lst = sub.add_parser("list", help="list agents, solvers, schedules and datasets, or one agent's settings")
    lst.add_argument("agent", nargs="?", help="list this agent's config fields (type, default, meaning)")
    lst.add_argument("--dataset", help="with AGENT: also the preset this dataset applies")
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
    unknown = extra if args.command not in ("train", "distill") else [x for x in extra if x not in overrides]
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
        raise _usage_error(f"error: {one_line(err)}") from None


def _usage_error(message: str) -> SystemExit:
    """Exit status 2 with ``message`` as one line on stderr (the exception's text stays the message)."""
    line = " ".join(message.split())
    print(f"diffrl: {line}", file=sys.stderr)
    err = SystemExit(line)
    err.code = 2
    return err
