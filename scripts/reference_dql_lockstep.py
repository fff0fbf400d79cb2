"""Lockstep check of diffrl's DiffusionQL against the official Diffusion-QL code: the same initial weights, the same
batches and the same random draws, then ``--updates`` updates of each; prints how far their parameters drift apart.

Both implementations run in this one process: the official ``Diffusion_QL`` is imported from ``--official`` (see
scripts/reference_dql_runner.py), its weights are copied into a diffrl agent built with the dataset's preset, and
each update gets the same batch from the HDF5 file. Two differences in how random numbers are *consumed* (not in
what is computed) are bridged so the streams stay aligned: the official sampling loop draws a noise at its last
step and masks it out (diffrl's DDPM returns the x0 estimate there without a draw), so the diffrl side draws one
unused normal per chain; and the official update picks the maximised critic with ``np.random.uniform() > 0.5``,
so the diffrl side takes the same member from a NumPy generator with the same seed. Differences that remain are
float rounding (e.g. fused vs. unfused Adam kernels).

    OMP_NUM_THREADS=1 python scripts/reference_dql_lockstep.py --official /work/ref/dql \\
        --dataset ../shared/datasets/hopper-medium-replay.hdf5 --updates 50 --ema-start 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_dql_runner import (
    check_checkout,
    import_official,
    official_row,
    read_official_settings,
    task_name,
)
from reference_runs import load_transitions

ROOT = Path(__file__).resolve().parent.parent


def _forget_official_modules(checkout: Path) -> None:
    """Drop the checkout's top-level packages (``agents``, ``utils``, ...) from sys.modules and sys.path, so that
    diffrl's ``agents`` can be imported next; the official classes keep their modules alive."""
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and checkout in Path(file).resolve().parents:
            del sys.modules[name]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != checkout]


def _copy_linear(dst, src) -> None:
    dst.weight.copy_(src.weight)
    dst.bias.copy_(src.bias)


def copy_official_weights(official, ours) -> None:
    """Official actor MLP and critics -> diffrl's DQLMLP and Q ensemble (the layouts match layer for layer)."""
    import torch

    om, net = official.actor.model, ours.actor.denoiser
    with torch.no_grad():
        for src, dst in ((om.time_mlp[1], net.time[1]), (om.time_mlp[3], net.time[3]), (om.final_layer, net.head)):
            _copy_linear(dst, src)
        for i in range(0, len(om.mid_layer), 2):
            _copy_linear(net.body[i], om.mid_layer[i])
        for seq, member in ((official.critic.q1_model, ours.critic.q.members[0].net),
                            (official.critic.q2_model, ours.critic.q.members[1].net)):
            linears = [m for m in seq if isinstance(m, torch.nn.Linear)]
            for src, dst in zip(linears, [*member.layers, member.head], strict=True):
                _copy_linear(dst, src)
        ours.actor_ema.load_state_dict(ours.actor.state_dict())
        ours.critic.target.load_state_dict(ours.critic.q.state_dict())
    official.ema_model.load_state_dict(official.actor.state_dict())
    official.critic_target.load_state_dict(official.critic.state_dict())


def official_parameters(official) -> dict[str, list]:
    om, em = official.actor.model, official.ema_model.model

    def actor(m):
        return [p for layer in (m.time_mlp[1], m.time_mlp[3], *m.mid_layer[::2], m.final_layer)
                for p in layer.parameters()]

    return {"actor": actor(om), "actor_ema": actor(em),
            "critic": [p for q in (official.critic.q1_model, official.critic.q2_model) for p in q.parameters()],
            "critic_target": [p for q in (official.critic_target.q1_model, official.critic_target.q2_model)
                              for p in q.parameters()]}


def our_parameters(ours) -> dict[str, list]:
    def actor(m):
        net = m.denoiser
        return [p for layer in (net.time[1], net.time[3], *net.body[::2], net.head) for p in layer.parameters()]

    def critic(ensemble):
        return [p for member in ensemble.members for layer in (*member.net.layers, member.net.head)
                for p in layer.parameters()]

    return {"actor": actor(ours.actor), "actor_ema": actor(ours.actor_ema), "critic": critic(ours.critic.q),
            "critic_target": critic(ours.critic.target)}


def max_differences(official, ours) -> dict[str, float]:
    a, b = official_parameters(official), our_parameters(ours)
    return {k: max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a[k], b[k], strict=True)) for k in a}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--updates", type=int, default=50)
    parser.add_argument("--ema-start", type=int, default=10, help="both sides (official default 1000, which a short "
                                                                  "check would not reach)")
    parser.add_argument("--max-q-backup", action="store_true", help="force the max-Q backup on both sides")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    checkout = check_checkout(args.official)
    import numpy as np
    import torch

    torch.set_num_threads(1)
    table, defaults = read_official_settings(checkout)
    _, row = official_row(table, task_name(args.dataset))
    Diffusion_QL, _, _ = import_official(checkout)
    _forget_official_modules(checkout)
    sys.path.insert(0, str(ROOT))
    from agents.diffusion_ql import DiffusionQL, DiffusionQLConfig
    from agents.presets import apply_preset

    class Aligned(DiffusionQL):
        """DiffusionQL with the official random-number consumption (see the module docstring)."""

        member_rng = np.random.RandomState(args.seed)

        def sample_actions(self, obs, grad=False, ema=False):
            out = super().sample_actions(obs, grad=grad, ema=ema)
            torch.randn(out.shape, device=out.device, dtype=out.dtype)
            return out

        def actor_loss(self, obs, actions, member=None):
            return super().actor_loss(obs, actions, member=0 if self.member_rng.uniform() > 0.5 else 1)

    data, _ = load_transitions(args.dataset)
    state_dim, action_dim = data["observations"].shape[1], data["actions"].shape[1]
    config, _ = apply_preset(DiffusionQLConfig(), DiffusionQL.presets, args.dataset)
    row = {**row, "max_q_backup": row["max_q_backup"] or args.max_q_backup}
    config = dataclasses.replace(config, ema_start=args.ema_start, max_q_backup=row["max_q_backup"])
    torch.manual_seed(args.seed)
    official = Diffusion_QL(state_dim, action_dim, 1.0, "cpu", defaults["discount"], defaults["tau"],
                            max_q_backup=row["max_q_backup"], eta=row["eta"], beta_schedule=defaults["beta_schedule"],
                            n_timesteps=defaults["T"], step_start_ema=args.ema_start, lr=row["lr"],
                            grad_norm=row["gn"])
    ours = Aligned(config, state_dim, action_dim)
    copy_official_weights(official, ours)
    start = max_differences(official, ours)

    g = torch.Generator().manual_seed(args.seed)
    n, batch_size = len(data["observations"]), defaults["batch_size"]
    tensors = {k: torch.from_numpy(v) for k, v in data.items()}
    batches = [torch.randint(0, n, (batch_size,), generator=g) for _ in range(args.updates)]

    class Replay:
        i = 0

        def sample(self, size):
            idx = batches[self.i]
            self.i += 1
            return (tensors["observations"][idx], tensors["actions"][idx], tensors["next_observations"][idx],
                    tensors["rewards"][idx].view(-1, 1), 1.0 - tensors["terminals"][idx].view(-1, 1))

    np.random.seed(args.seed)
    torch.manual_seed(args.seed + 1)
    metrics = official.train(Replay(), iterations=args.updates, batch_size=batch_size)
    torch.manual_seed(args.seed + 1)
    ours_losses = []
    for idx in batches:
        m = ours.update({k: v[idx] for k, v in tensors.items()})
        ours_losses.append((float(m["critic_loss"]), float(m["actor_loss"])))
    result = {"updates": args.updates, "ema_start": args.ema_start, "max_q_backup": row["max_q_backup"],
              "start_max_abs_diff": start,
              "max_abs_diff": max_differences(official, ours),
              "critic_loss_max_abs_diff": max(abs(a - b[0]) for a, b in zip(metrics["critic_loss"], ours_losses,
                                                                            strict=True)),
              "actor_loss_max_abs_diff": max(abs(a - b[1]) for a, b in zip(metrics["actor_loss"], ours_losses,
                                                                           strict=True))}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
