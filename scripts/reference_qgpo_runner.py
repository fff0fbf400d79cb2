"""Train the official QGPO implementation (contrastive energy prediction) on a D4RL-layout HDF5 file and print one
JSON line with its learning curve and training throughput (the record of scripts/reference_dql_runner.py).

The official code (github.com/ChenDRAG/CEP-energy-guided-diffusion, D4RL part in ``Offline_RL_2D/``) is read from
a checkout given by ``--official``, never edited and never copied. This process puts ``Offline_RL_2D/`` first on
``sys.path`` and imports its ``ScoreNet`` (behaviour model, with the ``QGPO_Critic`` holding the in-support Q and
the energy model), ``loss_fn`` and ``D4RL_dataset``. Its scripts ``train_behavior.py`` / ``train_critic.py`` hard-code
``gym``, ``d4rl``, TensorBoard, checkpoint files and their 600 + 100 epochs, so they are not run: their budget,
batch sizes, learning rate and phase boundaries are read from their syntax tree (``read_official_settings``) and the
two loops are driven here with the official pieces, call for call:

1. behaviour phase: ``loss_fn(score_model, a, marginal_prob_std)`` with ``score_model.condition = s`` and the
   official Adam (lr from ``train_behavior.py``) on batches of the official ``DataLoader(D4RL_dataset, shuffle=True)``;
2. support actions: ``score_model.sample(states, sample_per_state=M, diffusion_steps)`` with guidance scale 0 for
   every state and every next state, in the official 256-state chunks, stored as ``fake_actions`` /
   ``fake_next_actions``;
3. critic phase: ``QGPO_Critic.update_q0`` during the first ``q_epochs / critic_epochs`` of the phase, then
   ``update_qt`` (CEP) at every step.

Substitutions: the transitions come from the HDF5 file read with h5py (``reference_runs.load_transitions``:
every row, with the file's ``next_observations``) and reach the official ``D4RL_dataset`` through a replacement of
the ``d4rl.qlearning_dataset`` / ``gym.make`` names in its module (``d4rl`` and ``gym`` are answered by inert stubs
at import, recorded as ``stubbed_imports``); the official ``diffusion_SDE.schedule.marginal_prob_std`` defaults to
``device="cuda"`` where ``update_qt`` calls it, so that name is bound to ``--device``. The evaluation rolls out the
official ``select_actions`` (DPM-Solver, ``diffusion_steps`` calls, guidance scale ``--guidance-scale``, the
official default 1.0) in the Gymnasium env named by the file's ``env_id`` through diffrl's
``envs.evaluation.evaluate`` (episode seeds ``--eval-seed + i``, as diffrl's evaluation), instead of
``pallaral_eval_policy`` in old gym.

Budget: ``--steps`` gradient steps split in the official ratio (600 x 1000 behaviour steps : 100 x 10,000 critic
steps, Q trained during the first 50 of the 100 critic epochs), i.e. 3750 + 6250 (Q: 3125) of 10,000. Throughput
counts training time only, the support actions included (diffrl draws them inside its first critic-phase update).
``--behavior-batch`` / ``--critic-batch`` default to the official 4096 / 256; the parity benchmark passes the
reduced setting it runs both implementations at (scripts/bench_reference.py).

    OMP_NUM_THREADS=1 python scripts/reference_qgpo_runner.py --official /tmp/ref/cep \\
        --dataset ../shared/datasets/hopper-medium-replay.hdf5 --steps 80 --eval-every 40 --behavior-batch 64 \\
        --critic-batch 32
"""

from __future__ import annotations

import ast
import functools
import re
import sys
import time
import types
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_dql_runner import _StubFinder, task_name
from reference_runs import (
    Evaluation,
    eval_period,
    load_data,
    load_evaluation,
    print_record,
    runner_parser,
)

REPOSITORY = "ChenDRAG/CEP-energy-guided-diffusion"
CODE_DIR = "Offline_RL_2D"
#: Files the adapter reads or imports, relative to ``CODE_DIR``.
REQUIRED_FILES = ("Readme.md", "train_behavior.py", "train_critic.py", "utils.py", "dataset/dataset.py",
                  "diffusion_SDE/model.py", "diffusion_SDE/loss.py", "diffusion_SDE/schedule.py",
                  "diffusion_SDE/dpm_solver_pytorch.py")
#: utils.py ``get_args`` defaults the run needs (``q_alpha`` None means ``alpha`` there).
ARGPARSE_DEFAULTS = ("alpha", "q_alpha", "diffusion_steps", "M", "method")
#: Options of the README's train_critic.py command (it sets ``--q_alpha 1``).
README_OPTIONS = ("alpha", "q_alpha", "diffusion_steps", "method")


def check_checkout(path: str | Path) -> Path:
    """``path`` (the repository root) as a Path if it holds the official files the adapter uses."""
    path = Path(path).expanduser().resolve()
    missing = [name for name in REQUIRED_FILES if not (path / CODE_DIR / name).is_file()]
    if missing:
        raise SystemExit(f"--official {path} does not look like a checkout of {REPOSITORY}: missing "
                         f"{', '.join(f'{CODE_DIR}/{m}' for m in missing)} (clone it with "
                         f"`git clone https://github.com/{REPOSITORY}`)")
    return path


def _loop_settings(path: Path) -> dict[str, object]:
    """``n_epochs``, the inner ``range(...)`` count, the DataLoader ``batch_size``, Adam's ``lr`` and the
    ``epoch < N`` bound of one official training script."""
    out: dict[str, object] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "n_epochs" for t in node.targets):
            out["epochs"] = ast.literal_eval(node.value)
        elif (isinstance(node, ast.For) and isinstance(node.iter, ast.Call) and getattr(node.iter.func, "id", "")
              == "range" and len(node.iter.args) == 1 and isinstance(node.iter.args[0], ast.Constant)):
            out["steps_per_epoch"] = node.iter.args[0].value
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            for kw in node.keywords:
                if name == "DataLoader" and kw.arg == "batch_size":
                    out["batch_size"] = ast.literal_eval(kw.value)
                if name == "Adam" and kw.arg == "lr":
                    out["lr"] = ast.literal_eval(kw.value)
        elif (isinstance(node, ast.Compare) and getattr(node.left, "id", "") == "epoch"
              and isinstance(node.ops[0], ast.Lt) and isinstance(node.comparators[0], ast.Constant)):
            out["q_epochs"] = node.comparators[0].value
    return out


def _support_sizes(path: Path) -> dict[str, int]:
    """train_critic.py's ``args.M = ...`` assignments: the first for locomotion, the second for AntMaze."""
    values = [ast.literal_eval(node.value) for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr == "M"
                                                      for t in node.targets)]
    if len(values) != 2:
        raise SystemExit(f"{path}: expected the two `args.M = ...` assignments (locomotion, antmaze), found "
                         f"{len(values)}")
    return {"locomotion": values[0], "antmaze": values[1]}


def _argparse_defaults(path: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args
                and isinstance(node.args[0], ast.Constant)):
            name = str(node.args[0].value).lstrip("-")
            for kw in node.keywords:
                if kw.arg == "default" and name in ARGPARSE_DEFAULTS and name not in out:
                    out[name] = ast.literal_eval(kw.value)
    return out


def read_official_settings(checkout: str | Path) -> dict[str, object]:
    """The official D4RL settings from the checkout's files (syntax trees and the README command)."""
    code = Path(checkout) / CODE_DIR
    behavior, critic = _loop_settings(code / "train_behavior.py"), _loop_settings(code / "train_critic.py")
    need = {"behavior": (behavior, ("epochs", "steps_per_epoch", "batch_size", "lr")),
            "critic": (critic, ("epochs", "steps_per_epoch", "batch_size", "q_epochs"))}
    for phase, (found, keys) in need.items():
        missing = [k for k in keys if k not in found]
        if missing:
            raise SystemExit(f"{code}/train_{phase}.py: could not read {missing} of its training loop")
    defaults = _argparse_defaults(code / "utils.py")
    missing = sorted(set(ARGPARSE_DEFAULTS) - set(defaults))
    if missing:
        raise SystemExit(f"{code}/utils.py lacks get_args defaults for {missing}")
    command = next((line for line in (code / "Readme.md").read_text().splitlines() if "train_critic.py" in line
                    and "python" in line), "")
    readme = {k: v for k, v in re.findall(r"--(\w+)\s+\"?([^\s\"]+)\"?", command) if k in README_OPTIONS}
    settings = {**defaults, **{k: (v if k == "method" else float(v)) for k, v in readme.items()}}
    if settings["q_alpha"] is None:
        settings["q_alpha"] = settings["alpha"]
    return {"behavior_steps": behavior["epochs"] * behavior["steps_per_epoch"],
            "behavior_batch": behavior["batch_size"], "behavior_lr": behavior["lr"],
            "critic_steps": critic["epochs"] * critic["steps_per_epoch"],
            "critic_batch": critic["batch_size"], "q_fraction": critic["q_epochs"] / critic["epochs"],
            "alpha": float(settings["alpha"]), "q_alpha": float(settings["q_alpha"]),
            "diffusion_steps": int(settings["diffusion_steps"]), "method": settings["method"],
            "M": _support_sizes(code / "train_critic.py")}


def phase_split(settings: dict, steps: int) -> tuple[int, int]:
    """(behaviour steps, critic-phase steps that train Q) of a ``steps`` budget in the official proportions."""
    behavior = round(steps * settings["behavior_steps"] / (settings["behavior_steps"] + settings["critic_steps"]))
    return behavior, round((steps - behavior) * settings["q_fraction"])


def import_official(checkout: Path, device: str) -> tuple[types.SimpleNamespace, list[str]]:
    """The official modules (``model``, ``loss``, ``schedule``, ``dataset``) imported from the checkout, with
    d4rl/gym stubbed during the import, and the stubbed module names."""
    code = checkout / CODE_DIR
    sys.path.insert(0, str(code))
    finder = _StubFinder()
    sys.meta_path.insert(0, finder)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import dataset.dataset as dataset_module
            import diffusion_SDE.loss as loss_module
            import diffusion_SDE.model as model_module
            import diffusion_SDE.schedule as schedule_module
    finally:
        sys.meta_path.remove(finder)
        for name in finder.imported:
            sys.modules.pop(name, None)
    for module in (dataset_module, loss_module, model_module, schedule_module):
        if code not in Path(module.__file__).resolve().parents:
            raise SystemExit(f"imported {module.__name__} from {module.__file__}, not from the checkout {code}")
    # update_qt calls schedule.marginal_prob_std(t) with its default device="cuda"
    model_module.schedule = types.SimpleNamespace(
        marginal_prob_std=functools.partial(schedule_module.marginal_prob_std, device=device))
    modules = types.SimpleNamespace(model=model_module, loss=loss_module, schedule=schedule_module,
                                    dataset=dataset_module)
    return modules, sorted(set(finder.imported))


def official_dataset(modules: types.SimpleNamespace, data: dict, env_name: str, device: str):
    """The official ``D4RL_dataset`` (its reward transform included) built on ``data`` instead of
    ``d4rl.qlearning_dataset(gym.make(env))``."""
    modules.dataset.d4rl = types.SimpleNamespace(qlearning_dataset=lambda env: data)
    modules.dataset.gym = types.SimpleNamespace(make=lambda name: name)
    return modules.dataset.D4RL_dataset(types.SimpleNamespace(env=env_name, device=device))


def batches(dataset, batch_size: int):
    """Endless batches of the official ``DataLoader(dataset, batch_size, shuffle=True)``, as its scripts draw them."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    while True:
        yield from loader


def support_actions(score_model, states, m: int, diffusion_steps: int):
    """(N, M, act_dim) behaviour samples for the (N, obs_dim) ``states`` in the official 256-state chunks."""
    import numpy as np
    import torch

    states = states.cpu().numpy()
    chunks = [score_model.sample(part, sample_per_state=m, diffusion_steps=diffusion_steps)
              for part in np.array_split(states, states.shape[0] // 256 + 1)]
    return torch.Tensor(np.concatenate(chunks).astype(np.float32))


class OfficialPolicy:
    """``act(obs (n, obs_dim)) -> (n, act_dim)``: the official ``select_actions`` on the batch of observations."""

    def __init__(self, score_model, diffusion_steps: int) -> None:
        self.score_model, self.diffusion_steps = score_model, diffusion_steps

    def act(self, obs):
        import numpy as np

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # marginal_prob_std copy-constructs a tensor at every call
            actions = self.score_model.select_actions(np.asarray(obs), diffusion_steps=self.diffusion_steps)
        return np.stack(actions).astype(np.float32)


def main(argv: list[str] | None = None) -> None:
    parser = runner_parser(__doc__, REPOSITORY, "gradient steps of both phases together")
    parser.add_argument("--behavior-batch", type=int, default=None, help="default: the official 4096")
    parser.add_argument("--critic-batch", type=int, default=None, help="default: the official 256")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="evaluation guidance scale (official "
                                                                         "default after its sweep: 1.0)")
    args = parser.parse_args(argv)
    checkout = check_checkout(args.official)
    every = eval_period(args)
    evaluate = load_evaluation(args.threads)

    import gymnasium as gym
    import numpy as np
    import torch

    official = read_official_settings(checkout)
    behavior_steps, q_steps = phase_split(official, args.steps)
    behavior_batch = args.behavior_batch or official["behavior_batch"]
    critic_batch = args.critic_batch or official["critic_batch"]
    modules, stubbed = import_official(checkout, args.device)

    data, attrs = load_data(args.dataset)
    env = gym.make(attrs["env_id"])
    state_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    task = task_name(args.dataset)
    m = official["M"]["antmaze" if "antmaze" in task else "locomotion"]

    torch.manual_seed(args.seed)  # as train_behavior.py / train_critic.py
    np.random.seed(args.seed)
    run_args = types.SimpleNamespace(device=args.device, alpha=official["alpha"], q_alpha=official["q_alpha"],
                                     method=official["method"], env=task)
    std_fn = functools.partial(modules.schedule.marginal_prob_std, device=args.device)
    score_model = modules.model.ScoreNet(input_dim=state_dim + action_dim, output_dim=action_dim,
                                         marginal_prob_std=std_fn, args=run_args).to(args.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = official_dataset(modules, data, task, args.device)
    critic = score_model.q[0]
    optimizer = torch.optim.Adam(score_model.parameters(), lr=official["behavior_lr"])
    behavior_data, critic_data = batches(dataset, behavior_batch), None
    evaluation, policy = Evaluation(evaluate, attrs, args), OfficialPolicy(score_model, official["diffusion_steps"])
    train_seconds, support_seconds, done = 0.0, 0.0, 0
    while done < args.steps:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in range(done, done + every):
                if step < behavior_steps:
                    batch = {k: v.to(args.device) for k, v in next(behavior_data).items()}
                    score_model.condition = batch["s"]
                    loss = modules.loss.loss_fn(score_model, batch["a"], std_fn)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    score_model.condition = None
                    continue
                if critic_data is None:  # the switch: support actions of every state and next state
                    t0 = time.perf_counter()
                    critic.guidance_scale = 0.0
                    dataset.fake_actions = support_actions(score_model, dataset.states, m,
                                                           official["diffusion_steps"]).to(args.device)
                    dataset.fake_next_actions = support_actions(score_model, dataset.next_states, m,
                                                                official["diffusion_steps"]).to(args.device)
                    support_seconds = time.perf_counter() - t0
                    critic_data = batches(dataset, critic_batch)
                batch = {k: v.to(args.device) for k, v in next(critic_data).items()}
                if step - behavior_steps < q_steps:
                    critic.update_q0(batch)
                critic.update_qt(batch)
        train_seconds += time.perf_counter() - start
        done += every
        critic.guidance_scale = args.guidance_scale
        evaluation(policy, done)
    settings = {**official, "M": m, "behavior_batch": behavior_batch, "critic_batch": critic_batch,
                "guidance_scale": args.guidance_scale, "phase_steps": [behavior_steps, q_steps]}
    print_record(REPOSITORY, checkout, done, train_seconds, evaluation, settings, len(data["observations"]),
                 stubbed, support_seconds=support_seconds)


if __name__ == "__main__":
    main()
