"""Critics shared by the offline-RL agents: Q ensembles with Polyak-averaged targets, state values, and the TD,
expectile and IQL losses (Kostrikov et al. 2022, "Offline RL with Implicit Q-Learning")."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from diffrl.nets.activations import ACTIVATIONS


class MLP(nn.Module):
    """``depth`` hidden layers of width ``hidden`` (optionally LayerNorm'd) and a linear head to ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256, depth: int = 2, activation: str = "relu",
                 layer_norm: bool = False):
        super().__init__()
        if in_dim <= 0 or out_dim <= 0 or hidden <= 0 or depth < 1:
            raise ValueError(f"invalid MLP: in_dim={in_dim}, out_dim={out_dim}, hidden={hidden}, depth={depth}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[activation]
        dims = [in_dim] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(depth)) if layer_norm else None
        self.head = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            x = self.act(self.norms[i](x) if self.norms is not None else x)
        return self.head(x)


class QNetwork(nn.Module):
    """Q(s, a) -> scalar; ``obs`` (..., obs_dim) and ``act`` (..., act_dim) share their leading dims."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, depth: int = 2, activation: str = "relu",
                 layer_norm: bool = False):
        super().__init__()
        self.net = MLP(obs_dim + act_dim, 1, hidden, depth, activation, layer_norm)

    def forward(self, obs: Tensor, act: Tensor) -> Tensor:
        if obs.shape[:-1] != act.shape[:-1]:
            raise ValueError(f"Q network: obs {tuple(obs.shape)} and actions {tuple(act.shape)} differ in leading dims")
        return self.net(torch.cat([obs, act], dim=-1)).squeeze(-1)


class ValueNetwork(nn.Module):
    """V(s) -> scalar for ``obs`` (..., obs_dim)."""

    def __init__(self, obs_dim: int, hidden: int = 256, depth: int = 2, activation: str = "relu",
                 layer_norm: bool = False):
        super().__init__()
        self.net = MLP(obs_dim, 1, hidden, depth, activation, layer_norm)

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(obs).squeeze(-1)


class QEnsemble(nn.Module):
    """``n`` independent Q networks; ``forward`` stacks their values as (n, ...), ``min`` takes the pessimistic one."""

    def __init__(self, obs_dim: int, act_dim: int, n: int = 2, hidden: int = 256, depth: int = 2,
                 activation: str = "relu", layer_norm: bool = False):
        super().__init__()
        if n < 1:
            raise ValueError(f"a Q ensemble needs n >= 1 members, got {n}")
        self.members = nn.ModuleList(QNetwork(obs_dim, act_dim, hidden, depth, activation, layer_norm)
                                     for _ in range(n))

    def forward(self, obs: Tensor, act: Tensor) -> Tensor:
        return torch.stack([q(obs, act) for q in self.members])

    def min(self, obs: Tensor, act: Tensor) -> Tensor:
        return self(obs, act).min(dim=0).values


class DoubleQCritic(nn.Module):
    """Clipped double Q (Fujimoto et al. 2018): an online ensemble ``q`` and a frozen Polyak-averaged copy ``target``.

    Only ``q`` has trainable parameters; both are in the state dict.
    """

    def __init__(self, obs_dim: int, act_dim: int, n: int = 2, hidden: int = 256, depth: int = 2,
                 activation: str = "relu", layer_norm: bool = False):
        super().__init__()
        self.q = QEnsemble(obs_dim, act_dim, n, hidden, depth, activation, layer_norm)
        self.target = copy.deepcopy(self.q).requires_grad_(False)

    def forward(self, obs: Tensor, act: Tensor) -> Tensor:
        """Online values (n, ...)."""
        return self.q(obs, act)

    @torch.no_grad()
    def target_min(self, obs: Tensor, act: Tensor) -> Tensor:
        """min over the target ensemble, without gradients."""
        return self.target.min(obs, act)

    def update_target(self, tau: float) -> None:
        polyak_update(self.target, self.q, tau)


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """``target <- (1 - tau) target + tau source`` for every parameter (buffers are copied)."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"Polyak rate tau must lie in [0, 1], got {tau}")
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)
    for tb, sb in zip(target.buffers(), source.buffers(), strict=True):
        tb.copy_(sb)


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Run a block with ``module``'s parameters excluded from autograd (gradients still flow to its inputs)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


# ------------------------------------------------------------------------------------------------ losses
def td_target(rewards: Tensor, terminals: Tensor, next_values: Tensor, gamma: float) -> Tensor:
    """One-step bootstrap ``r + gamma (1 - done) V(s')`` (no gradient)."""
    return (rewards + gamma * (1.0 - terminals) * next_values).detach()


def q_regression_loss(q_values: Tensor, target: Tensor) -> Tensor:
    """Sum over ensemble members of the mean squared TD error; ``q_values`` (n, B), ``target`` (B,)."""
    return (q_values - target.unsqueeze(0)).pow(2).mean(dim=-1).sum()


def expectile_weights(diff: Tensor, tau: float) -> Tensor:
    """``|tau - 1(diff < 0)|`` in the dtype and on the device of ``diff``."""
    return tau + (1.0 - 2.0 * tau) * (diff < 0).to(diff.dtype)


def expectile_loss(diff: Tensor, tau: float, reduction: str = "mean") -> Tensor:
    """Asymmetric squared loss ``|tau - 1(diff < 0)| diff^2``; tau = 0.5 gives half the MSE, tau > 0.5 an upper
    expectile."""
    if not 0.0 < tau < 1.0:
        raise ValueError(f"expectile tau must lie in (0, 1), got {tau}")
    loss = expectile_weights(diff, tau) * diff.pow(2)
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def iql_value_loss(values: Tensor, q_target: Tensor, tau: float) -> Tensor:
    """IQL's V step: expectile regression of V(s) on the target critic's min Q(s, a) over dataset actions."""
    return expectile_loss(q_target.detach() - values, tau)


def iql_q_loss(q_values: Tensor, rewards: Tensor, terminals: Tensor, next_values: Tensor, gamma: float) -> Tensor:
    """IQL's Q step: regress every member on ``r + gamma (1 - done) V(s')``."""
    return q_regression_loss(q_values, td_target(rewards, terminals, next_values, gamma))


def expectile_log_weights(advantage: Tensor, tau: float, eps: float = 1e-6) -> Tensor:
    """log of IDQL's implicit-policy weights ``|tau - 1(A < 0)| / |A|`` (Hansen-Estruch et al. 2023; ``eps``
    keeps A = 0 finite)."""
    return torch.log(expectile_weights(advantage, tau)) - torch.log(advantage.abs() + eps)
