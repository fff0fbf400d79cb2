"""Every agent on one device: a few hundred updates and a short evaluation in fp32 and bf16 (DDPO: a few epochs
on the package's digits-sized image model), with updates per second, peak device memory and d3rlpy's TD3+BC on
the same device beside them (when d3rlpy is installed).

    python scripts/gpu_check.py --device cuda --dataset hopper-medium.hdf5 --out results/gpu

Agents run with their default (paper) settings and the preset of the dataset's task; the table and a JSON file
go to --out. Runs on the CPU too (``--device cpu --steps 3``), which is how the tests keep it working.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents import AGENTS  # noqa: E402
from agents.presets import apply_preset  # noqa: E402
from diffrl.device import resolve_device  # noqa: E402
from diffrl.training import TrainConfig, Trainer  # noqa: E402
from envs import evaluate, load_dataset  # noqa: E402

KINDS = ("diffusion_bc", "diffusion_policy", "gaussian_bc", "diffuser", "decision_diffuser", "diffusion_ql", "qgpo",
         "idql")


def peak_memory_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_agent(kind: str, dataset, device: torch.device, precision: str, steps: int, eval_steps: int,
                overrides: dict) -> dict:
    """Train ``steps`` updates of ``kind`` on ``device`` and evaluate one short episode."""
    config_cls, agent_cls = AGENTS[kind]
    config, _ = apply_preset(config_cls(), getattr(agent_cls, "presets", {}), dataset.name)
    fields = {f.name for f in dataclasses.fields(config)}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if k in fields})
    if getattr(config, "total_steps", 0) is None:
        config = dataclasses.replace(config, total_steps=max(steps, getattr(config, "warmup_steps", 0) + 1))
    torch.manual_seed(0)
    agent = agent_cls.from_dataset(dataset, config, device=device)
    make_sampler = getattr(agent, "batch_sampler", None)
    data = dataset.to(device)
    sampler = make_sampler(data) if make_sampler is not None else data.sample
    batch_size = getattr(agent_cls, "default_batch_size", TrainConfig.batch_size)
    train = TrainConfig(steps=steps, batch_size=batch_size, log_every=max(1, steps), progress=False,
                        device=str(device), precision=precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    history = Trainer(agent, sampler, train).fit()
    synchronize(device)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluate(agent.policy(seed=0), dataset, episodes=1, seed=0, max_episode_steps=eval_steps)
    return {"agent": kind, "precision": precision, "steps": steps, "batch_size": batch_size,
            "steps_per_s": steps / seconds, "eval_return": result.mean, "eval_steps": int(result.lengths[0]),
            "eval_s": time.perf_counter() - start, "peak_mib": peak_memory_mib(device),
            "final_metrics": {k: v for k, v in history[-1].items() if k != "step"} if history else {}}


def check_ddpo(device: torch.device, precision: str, epochs: int, batch_size: int, sample_steps: int) -> dict:
    """DDPO-IS epochs (sample, reward, update) on the package's 16x16 digits-sized image model, JPEG reward."""
    from agents.ddpo import DDPO, DDPOConfig
    from agents.digits import ImageModelConfig
    from envs.image_rewards import jpeg_compressibility

    torch.manual_seed(0)
    model_config = ImageModelConfig()
    reward = functools.partial(jpeg_compressibility, value_range=(-1.0, 1.0))  # the model's images are in [-1, 1]
    agent = DDPO(DDPOConfig(sample_steps=sample_steps, minibatch_size=batch_size), model_config.build(),
                 reward, model_config.image_shape, model_config.num_classes).to(device)
    train = TrainConfig(steps=epochs, batch_size=batch_size, log_every=epochs, progress=False, device=str(device),
                        precision=precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    history = Trainer(agent, agent.collect, train).fit()
    synchronize(device)
    return {"agent": "ddpo", "precision": precision, "steps": epochs, "batch_size": batch_size,
            "steps_per_s": epochs / (time.perf_counter() - start), "eval_return": None, "peak_mib":
            peak_memory_mib(device), "final_metrics": {k: v for k, v in history[-1].items() if k != "step"}}


def check_d3rlpy(dataset_path: str, device: torch.device, steps: int) -> dict | None:
    """d3rlpy TD3+BC on the same device through scripts/d3rlpy_runner.py (None when d3rlpy is missing)."""
    try:
        import d3rlpy  # noqa: F401
    except ImportError:
        print("d3rlpy is not installed here: TD3+BC baseline skipped")
        return None
    runner = Path(__file__).resolve().parent / "d3rlpy_runner.py"
    device_name = "cuda:0" if device.type == "cuda" else "cpu:0"
    out = subprocess.run([sys.executable, str(runner), "--algo", "td3bc", "--dataset", dataset_path, "--steps",
                          str(steps), "--eval-every", str(steps), "--eval-episodes", "1", "--device", device_name],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        print(f"d3rlpy TD3+BC failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
        return None
    record = json.loads(out.stdout.strip().splitlines()[-1])
    return {"agent": "d3rlpy_td3bc", "precision": "fp32", "steps": steps, "steps_per_s": record["steps_per_sec"]}


def table(rows: list[dict]) -> str:
    lines = [f"{'agent':<18} {'precision':<9} {'batch':>5} {'steps/s':>9} {'peak MiB':>9} {'eval return':>11}"]
    for r in rows:
        peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
        ret = "-" if r.get("eval_return") is None else f"{r['eval_return']:.1f}"
        lines.append(f"{r['agent']:<18} {r['precision']:<9} {r.get('batch_size', 256):>5} "
                     f"{r['steps_per_s'] or float('nan'):>9.1f} {peak:>9} {ret:>11}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dataset", default="../shared/datasets/hopper-medium.hdf5")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-steps", type=int, default=100, help="length of the short evaluation episode")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--agents", default=",".join(KINDS))
    parser.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                        help="config field for every agent that has it (JSON value), e.g. horizon=8")
    parser.add_argument("--ddpo-epochs", type=int, default=3, help="DDPO epochs (0: skip DDPO)")
    parser.add_argument("--ddpo-batch", type=int, default=64, help="images sampled per DDPO epoch")
    parser.add_argument("--ddpo-sample-steps", type=int, default=50, help="DDIM steps per DDPO sample")
    parser.add_argument("--out", help="folder for gpu_check.json and gpu_check.txt")
    args = parser.parse_args()

    device = resolve_device(args.device)
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.override)}
    dataset = load_dataset(args.dataset)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, dataset {dataset.name}, {args.steps} updates")
    rows = []
    for precision in args.precisions.split(","):
        for kind in args.agents.split(","):
            row = check_agent(kind, dataset, device, precision, args.steps, args.eval_steps, overrides)
            print(table([row]).splitlines()[1], flush=True)
            rows.append(row)
        if args.ddpo_epochs:
            row = check_ddpo(device, precision, args.ddpo_epochs, args.ddpo_batch, args.ddpo_sample_steps)
            print(table([row]).splitlines()[1], flush=True)
            rows.append(row)
    baseline = check_d3rlpy(args.dataset, device, args.steps)
    if baseline is not None:
        rows.append(baseline)
    report = table(rows)
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps({"device": name, "torch": torch.__version__,
                                                        "rows": rows}, indent=1, default=float))
        (out / "gpu_check.txt").write_text(f"device {name}, torch {torch.__version__}\n{report}\n")


if __name__ == "__main__":
    main()
