"""A tiny regression agent for the training-loop tests: its update consumes the torch, numpy and python RNGs
(dropout, input noise, loss jitter), so only an exact RNG restore reproduces a run."""

import random

import numpy as np
import torch
from torch import nn

from diffrl.training import Learner


class ToyAgent:
    kind = "toy"

    def __init__(self, seed: int = 0, total_steps: int = 40) -> None:
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2))
        self.learner = Learner(self.net, lr=1e-2, max_grad_norm=1.0, lr_schedule="cosine",
                               total_steps=total_steps, warmup_steps=3, ema_decay=0.9)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        x = batch["x"] + 0.1 * torch.randn_like(batch["x"])
        jitter = 1.0 + 0.1 * float(np.random.rand()) + 0.1 * random.random()
        loss = jitter * ((self.net(x) - batch["y"]) ** 2).mean()
        return {"loss": loss.item(), **self.learner.step(loss)}

    def policy(self) -> nn.Module:
        return self.learner.ema_module

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "learner": self.learner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.learner.load_state_dict(state["learner"])

    def tensors(self) -> list[torch.Tensor]:
        """Everything that must match between two runs: parameters and their EMA."""
        return [p.detach() for p in self.net.parameters()] + list(self.learner.ema_module.parameters())


def sample_batch(batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    x = torch.randn(batch_size, 3, generator=generator)
    return {"x": x, "y": torch.stack([x[:, 0] * x[:, 1], torch.sin(2 * x[:, 2])], dim=1)}


def evaluate(agent: ToyAgent, step: int) -> dict[str, float]:
    """Held-out error of the EMA network; draws from the global RNG on purpose."""
    batch = sample_batch(64, torch.Generator().manual_seed(1234))
    net = agent.policy().eval()
    with torch.no_grad():
        mse = ((net(batch["x"] + 0.01 * torch.randn(64, 3)) - batch["y"]) ** 2).mean()
    return {"mse": mse.item(), "step_seen": step}
