"""Train the official Diffusion-QL implementation on a D4RL-layout HDF5 file and print one JSON line with its
learning curve and training throughput.

The official code (github.com/Zhendong-Wang/Diffusion-Policies-for-Offline-RL) is read from a checkout given by
``--official``, never edited and never copied: this process puts the checkout first on ``sys.path`` and imports its
``agents.ql_diffusion.Diffusion_QL`` and ``utils.data_sampler.Data_Sampler``. Its ``main.py`` imports ``gym`` and
``d4rl`` and is therefore not imported; the per-task ``hyperparameters`` table and the argparse defaults are read
from its syntax tree instead. Should an imported official module import ``d4rl`` or ``gym``, it gets an inert
stub (recorded in the output as ``stubbed_imports``); the real packages are never imported.

What runs is the official pipeline with two substitutions: the transitions come from the HDF5 file read with
h5py (every row, with the file's ``next_observations``; the official ``d4rl.qlearning_dataset`` would also drop
the rows that end on a timeout) and the evaluation rolls out the official ``sample_action`` in the Gymnasium env
named by the file's ``env_id`` attribute through diffrl's ``envs.evaluation.evaluate`` (episode seeds
``--eval-seed + i``, the same as diffrl's evaluation), instead of ``eval_policy`` in old gym. Training calls the
official ``Diffusion_QL.train`` for ``--eval-every`` iterations at a time (the official loop calls it for
eval_freq x num_steps_per_epoch); the throughput counts training time only. Hyperparameters: the table's row for
the dataset's task (lr, eta, max_q_backup, reward_tune, gn) and the argparse defaults (discount, tau, T,
beta_schedule, batch_size); ``--lr_decay`` is off as in the argparse default.

    OMP_NUM_THREADS=1 python scripts/reference_dql_runner.py --official /work/ref/dql \\
        --dataset ../shared/datasets/hopper-medium-replay.hdf5 --steps 1000 --eval-every 500 --seed 0
"""

from __future__ import annotations

import ast
import importlib.abc
import importlib.machinery
import re
import sys
import time
import types
import warnings
from pathlib import Path

from reference_runs import (
    Evaluation,
    eval_period,
    load_data,
    load_evaluation,
    print_record,
    runner_parser,
)

REPOSITORY = "Zhendong-Wang/Diffusion-Policies-for-Offline-RL"
#: Files the adapter reads or imports from the checkout.
REQUIRED_FILES = ("main.py", "agents/ql_diffusion.py", "agents/diffusion.py", "agents/model.py",
                  "utils/data_sampler.py")
#: main.py argparse defaults the agent needs: argparse name -> key in the output.
ARGPARSE_DEFAULTS = {"discount": "discount", "tau": "tau", "T": "T", "beta_schedule": "beta_schedule",
                     "batch_size": "batch_size", "num_steps_per_epoch": "num_steps_per_epoch"}
STUBBED = ("d4rl", "gym")
_VERSION = re.compile(r"-v\d+$")


def check_checkout(path: str | Path) -> Path:
    """``path`` as a Path if it holds the official files the adapter uses; a clear error otherwise."""
    path = Path(path).expanduser().resolve()
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise SystemExit(f"--official {path} does not look like a checkout of {REPOSITORY}: missing "
                         f"{', '.join(missing)} (clone it with `git clone https://github.com/{REPOSITORY}`)")
    return path


def task_name(dataset: str | Path) -> str:
    """``hopper-medium-replay`` for ``.../hopper-medium-replay.hdf5`` or ``hopper-medium-replay-v2``."""
    name = Path(dataset).name
    for suffix in (".hdf5", ".h5"):
        name = name.removesuffix(suffix)
    return _VERSION.sub("", name.lower())


def read_official_settings(checkout: str | Path) -> tuple[dict[str, dict], dict[str, object]]:
    """(per-task table keyed by the official names, argparse defaults) from the checkout's main.py syntax tree."""
    tree = ast.parse((Path(checkout) / "main.py").read_text())
    table = None
    defaults: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "hyperparameters"
                                                for t in node.targets):
            table = ast.literal_eval(node.value)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
                and node.args and isinstance(node.args[0], ast.Constant)):
            name = str(node.args[0].value).lstrip("-")
            for kw in node.keywords:
                if kw.arg == "default" and name in ARGPARSE_DEFAULTS:
                    defaults[ARGPARSE_DEFAULTS[name]] = ast.literal_eval(kw.value)
    if table is None:
        raise SystemExit(f"{checkout}/main.py has no `hyperparameters = {{...}}` table")
    missing = sorted(set(ARGPARSE_DEFAULTS.values()) - set(defaults))
    if missing:
        raise SystemExit(f"{checkout}/main.py lacks argparse defaults for {missing}")
    return table, defaults


def official_row(table: dict[str, dict], task: str) -> tuple[str, dict]:
    """The table's (official name, row) for ``task`` (its name without the -vN suffix)."""
    for name, row in table.items():
        if _VERSION.sub("", name) == task:
            return name, row
    raise SystemExit(f"the official table has no row for task {task!r}; it has {', '.join(sorted(table))}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers ``import d4rl`` / ``import gym`` (and their submodules) with empty modules, recording each."""

    def __init__(self) -> None:
        self.imported: list[str] = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name, f"stub of {spec.name} (the reference runner never imports it)")
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        self.imported.append(module.__name__)


def import_official(checkout: Path) -> tuple[type, type, list[str]]:
    """(Diffusion_QL, Data_Sampler, stubbed module names) imported from ``checkout``, with d4rl/gym stubbed for
    the duration of the import only."""
    sys.path.insert(0, str(checkout))
    finder = _StubFinder()
    sys.meta_path.insert(0, finder)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from agents.ql_diffusion import Diffusion_QL
            from utils.data_sampler import Data_Sampler
    finally:
        sys.meta_path.remove(finder)
        for name in finder.imported:
            sys.modules.pop(name, None)
    module_file = Path(sys.modules[Diffusion_QL.__module__].__file__).resolve()
    if checkout not in module_file.parents:
        raise SystemExit(f"imported Diffusion_QL from {module_file}, not from the checkout {checkout}")
    return Diffusion_QL, Data_Sampler, sorted(set(finder.imported))


class OfficialPolicy:
    """``act(obs (n, obs_dim)) -> (n, act_dim)``: the official ``sample_action`` on each row."""

    def __init__(self, agent) -> None:
        self.agent = agent

    def act(self, obs):
        import numpy as np

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its softmax without dim= warns at every call
            return np.stack([self.agent.sample_action(np.asarray(o)) for o in obs]).astype(np.float32)


def main(argv: list[str] | None = None) -> None:
    args = runner_parser(__doc__, REPOSITORY, "gradient steps (official train() iterations)").parse_args(argv)
    checkout = check_checkout(args.official)
    every = eval_period(args)
    evaluate = load_evaluation(args.threads)

    import gymnasium as gym
    import numpy as np
    import torch

    table, defaults = read_official_settings(checkout)
    official_task, row = official_row(table, task_name(args.dataset))
    Diffusion_QL, Data_Sampler, stubbed = import_official(checkout)

    data, attrs = load_data(args.dataset)
    env = gym.make(attrs["env_id"])
    max_action = float(env.action_space.high[0])
    env.close()
    state_dim, action_dim = data["observations"].shape[1], data["actions"].shape[1]

    torch.manual_seed(args.seed)  # as main.py
    np.random.seed(args.seed)
    sampler = Data_Sampler(data, args.device, row["reward_tune"])
    settings = {"official_task": official_task, **row, **defaults, "lr_decay": False, "max_action": max_action}
    agent = Diffusion_QL(state_dim=state_dim, action_dim=action_dim, max_action=max_action, device=args.device,
                         discount=defaults["discount"], tau=defaults["tau"], max_q_backup=row["max_q_backup"],
                         beta_schedule=defaults["beta_schedule"], n_timesteps=defaults["T"], eta=row["eta"],
                         lr=row["lr"], lr_decay=False, lr_maxt=row["num_epochs"], grad_norm=row["gn"])
    evaluation, policy = Evaluation(evaluate, attrs, args), OfficialPolicy(agent)
    train_seconds, done = 0.0, 0
    while done < args.steps:
        start = time.perf_counter()
        agent.train(sampler, iterations=every, batch_size=defaults["batch_size"], log_writer=None)
        train_seconds += time.perf_counter() - start
        done += every
        evaluation(policy, done)
    print_record(REPOSITORY, checkout, done, train_seconds, evaluation, settings, len(data["observations"]),
                 stubbed)


if __name__ == "__main__":
    main()
