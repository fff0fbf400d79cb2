"""DDPO: reward fine-tuning of diffusion models by policy gradients over the denoising chain (Black et al. 2023).

Sampling with stochastic DDIM (eta > 0) is a multi-step MDP: the state is (x_t, t, class), the action is the next
latent x_s ~ N(mean_theta(x_t), std^2), and the reward r(x_0, class) arrives at the end. One DDPO epoch samples a
batch of chains, keeping every latent and each step's log-probability under the (classifier-free guided) policy,
normalises rewards per class into advantages, and then improves

* DDPO-SF: the score-function (REINFORCE) gradient E[A * sum_k grad log p(x_{k+1} | x_k)], one step per batch;
* DDPO-IS: the importance-sampled, PPO-clipped surrogate E[max(-A r, -A clip(r, 1 - e, 1 + e))] with
  r = p_theta / p_old, several inner epochs of minibatches over (sample, timestep) pairs per batch.

Either the whole denoiser or only LoRA adapters (:mod:`agents.lora`) train. The drift from the starting model is
reported as the KL of the sampled chains, E_chain[sum_k log p_theta - log p_start], estimated on sampled chains.
With :class:`diffrl.training.Trainer`, ``sample_batch = agent.collect`` and one trainer step is one DDPO epoch.
"""

from __future__ import annotations

import copy
import math
import os
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from agents.base import TorchAgent
from agents.lora import add_lora, lora_parameters
from diffrl.guidance import ClassifierFree, Guidance
from diffrl.model import DiffusionModel
from diffrl.solvers import DDIM
from diffrl.training import Learner

RewardFn = Callable[[Tensor, Tensor | None], Tensor]
METHODS = ("sf", "is")


class PerClassStatTracker:
    """Reward normalisation per prompt class: ``(r - mean_c) / (std_c + eps)`` over a buffer of recent rewards.

    Each class keeps its last ``buffer_size`` rewards (the current batch's included). While a class has fewer than
    ``min_count`` rewards buffered, the mean and std of the whole current batch are used instead.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16, eps: float = 1e-6):
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size and min_count must be >= 1, got {buffer_size}, {min_count}")
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.buffers: dict[int, deque[float]] = {}

    def update(self, classes: Tensor, rewards: Tensor) -> Tensor:
        """Add the batch's rewards to the buffers and return its advantages (shape, dtype and device of ``rewards``).

        The statistics are computed in float64 on the CPU (one host copy per batch).
        """
        like = rewards
        classes, rewards = classes.reshape(-1).cpu(), rewards.reshape(-1).double().cpu()
        if classes.shape != rewards.shape:
            raise ValueError(f"classes {tuple(classes.shape)} and rewards {tuple(rewards.shape)} differ in size")
        global_mean, global_std = rewards.mean(), rewards.std(unbiased=False)
        advantages = torch.empty_like(rewards)
        for c in classes.unique().tolist():
            mask = classes == c
            buffer = self.buffers.setdefault(int(c), deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = global_mean, global_std
            else:
                values = torch.tensor(list(buffer), dtype=torch.float64)
                mean, std = values.mean(), values.std(unbiased=False)
            advantages[mask] = (rewards[mask] - mean) / (std + self.eps)
        return advantages.to(device=like.device, dtype=like.dtype).reshape(like.shape)

    def state_dict(self) -> dict:
        return {"buffers": {c: list(b) for c, b in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {int(c): deque(b, maxlen=self.buffer_size) for c, b in state["buffers"].items()}


def clipped_surrogate(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> Tensor:
    """PPO's pessimistic objective as a loss, per element: max(-A r, -A clip(r, 1 - e, 1 + e)), r = exp(lp - old)."""
    ratio = torch.exp(log_prob - old_log_prob)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))


@dataclass
class DDPOConfig:
    """DDPO hyper-parameters. Defaults follow Black et al. 2023 and the configuration released with it
    (ddpo-pytorch, config/base.py): 50 DDIM steps, eta 1, guidance 5, AdamW lr 3e-4 (for LoRA), weight decay 1e-4,
    grad clip 1, clip range 1e-4, advantages clipped at 5, per-prompt stat tracking with buffer 16 / min count 16.
    Small models on short chains need other values: see scripts/bench_ddpo.py for those used on the digits model."""

    method: str = "is"  # "sf" (REINFORCE, one step per batch) or "is" (importance sampling + PPO clipping)
    sample_steps: int = 50  # DDIM grid points (sample_steps - 1 stochastic steps, then the x0 prediction)
    eta: float = 1.0
    guidance_weight: float = 5.0  # classifier-free guidance weight for conditional models (1 = none)
    classes: tuple[int, ...] = ()  # prompt classes sampled uniformly; () = all classes of the model
    null_prompt: bool = False  # sample a class-conditional model with its null class only (unconditional, no CFG)
    lr: float = 3e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    inner_epochs: int = 1
    minibatch_size: int = 64  # (sample, timestep) pairs per gradient step (IS) / per accumulation chunk (SF)
    timestep_fraction: float = 1.0  # share of each chain's steps trained on
    # The step into t_min adds noise of std ~sigma(t_min), far below the data's resolution (0.006 on a 1000-step
    # cosine chain): its score-function term is noise of size 1 / std that swamps the other steps' signal, so by
    # default it is sampled but neither trained on nor counted in the drift.
    train_last_step: bool = False
    stat_buffer_size: int = 16
    stat_min_count: int = 16
    lora_rank: int = 0  # 0: train the whole denoiser; > 0: train LoRA adapters of this rank only
    lora_alpha: float | None = None
    drift_samples: int = 16  # chains per batch on which the KL to the starting model is estimated (0: off)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"DDPOConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.sample_steps < (2 if self.train_last_step else 3):
            raise ValueError(f"DDPOConfig.sample_steps={self.sample_steps} leaves no stochastic step to train on")
        if not 0.0 < self.eta <= 1.0:
            raise ValueError(f"DDPOConfig.eta must lie in (0, 1] (log-probabilities need noise), got {self.eta}")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError(f"DDPOConfig.timestep_fraction must lie in (0, 1], got {self.timestep_fraction}")
        if self.inner_epochs < 1 or self.minibatch_size < 1:
            raise ValueError("DDPOConfig.inner_epochs and minibatch_size must be >= 1")
        if self.method == "sf" and self.inner_epochs != 1:
            raise ValueError("DDPO-SF is on-policy: it takes one step per batch, so inner_epochs must be 1")
        self.classes = tuple(int(c) for c in self.classes)


class DDPO(TorchAgent):
    """Fine-tunes ``model`` (a :class:`DiffusionModel`) to maximise ``reward_fn(images, classes) -> (B,)``.

    ``num_classes > 0`` means the denoiser takes class ids (LongTensor (B,)) and ``None`` for the null class;
    sampling then uses classifier-free guidance and the log-probabilities are those of the guided steps, and
    ``reward_fn`` receives the prompt classes (``None`` for unconditional sampling).
    The denoiser is kept in eval mode (no condition dropout): the sampled and the trained policy must agree.
    Everything sampled and trained follows the model's device and dtype (move the agent with :meth:`to`);
    rewards and advantages are kept in at least float32.
    """

    kind = "ddpo"

    def __init__(self, config: DDPOConfig, model: DiffusionModel, reward_fn: RewardFn,
                 image_shape: tuple[int, ...], num_classes: int = 0):
        if any(not 0 <= c < max(num_classes, 1) for c in config.classes):
            raise ValueError(f"classes {config.classes} outside the model's {num_classes} classes")
        self.model = model.eval()  # first module attribute: the agent's device and dtype are the model's
        self.config, self.reward_fn, self.num_classes = config, reward_fn, num_classes
        self.image_shape = tuple(image_shape)
        self.reference = copy.deepcopy(model).requires_grad_(False)
        if config.lora_rank > 0:
            add_lora(model.denoiser, config.lora_rank, config.lora_alpha)
            params = lora_parameters(model.denoiser)
        else:
            params = list(model.denoiser.parameters())
        self.learner = Learner(params, lr=config.lr, weight_decay=config.weight_decay,
                               max_grad_norm=config.max_grad_norm)
        self.solver = DDIM(eta=config.eta)
        self.guidance = ClassifierFree(config.guidance_weight) if self.conditional else Guidance()
        self.tracker = PerClassStatTracker(config.stat_buffer_size, config.stat_min_count)
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self._grid_cache: tuple[tuple, Tensor] | None = None

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> DDPO:
        """Move the agent (see :class:`TorchAgent`). Moving to another device recreates the agent's own generator
        (minibatch and timestep draws) there, seeded from ``config.seed``: that random stream starts over."""
        before = self.generator.device
        super().to(device, dtype)
        if self.device != before:
            self.generator = torch.Generator(self.device).manual_seed(self.config.seed)
        return self

    @classmethod
    def from_dataset(cls, dataset, config: DDPOConfig) -> DDPO:
        """Not applicable: DDPO learns from rewards on its own samples, not from an offline dataset."""
        raise TypeError("DDPO fine-tunes an image diffusion model on a reward, not on a dataset: build it with "
                        "DDPO(config, model, reward_fn, image_shape, num_classes) (see scripts/bench_ddpo.py)")

    @property
    def conditional(self) -> bool:
        """Whether samples are prompted with class ids (False: unconditional model, or ``null_prompt``)."""
        return self.num_classes > 0 and not self.config.null_prompt

    def condition(self, labels: Tensor) -> Tensor | None:
        return labels if self.conditional else None

    def sample_labels(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Prompt classes drawn uniformly from ``config.classes`` (zeros for an unconditional model)."""
        device = self.device
        if not self.conditional:
            return torch.zeros(n, dtype=torch.long, device=device)
        pool = torch.tensor(self.config.classes or range(self.num_classes), dtype=torch.long, device=device)
        return pool[torch.randint(0, len(pool), (n,), generator=generator, device=device)]

    @property
    def _score_dtype(self) -> torch.dtype:
        """The dtype of rewards, advantages and random sort keys: the model's, at least float32."""
        return torch.promote_types(self.dtype, torch.float32)

    def _prior(self, n: int, generator: torch.Generator | None) -> Tensor:
        """x_T for ``n`` chains on the model's device and in its dtype."""
        return self.model.schedule.prior((n, *self.image_shape), generator=generator, device=self.device,
                                         dtype=self.dtype)

    @torch.no_grad()
    def sample(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, *image_shape) in [-1, 1] from the current policy for the given prompt classes.

        ``generator`` (if given) must live on the agent's device.
        """
        x_T = self._prior(len(labels), generator)
        x = self.model.sample(x_T.shape, self.condition(labels.to(x_T.device)), solver=self.solver,
                              steps=self.config.sample_steps, guidance=self.guidance, generator=generator, x_T=x_T)
        return x.clamp(-1.0, 1.0)

    @torch.no_grad()
    def collect(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Sample ``batch_size`` chains, score them and compute advantages: the batch for :meth:`update`.

        Keys: ``latents`` (B, K + 1, *image_shape) with x_T first, ``log_probs`` (B, K), ``labels``, ``images``,
        ``rewards``, ``advantages`` and ``drift`` (for the first ``drift_samples`` chains, the sum over the trained
        steps of log p_theta - log p_start). ``generator`` (if given) must live on the agent's device.
        """
        labels = self.sample_labels(batch_size, generator)
        x_T = self._prior(batch_size, generator)
        traj = self.solver.sample_trajectory(self.model, x_T, self.condition(labels), self.config.sample_steps,
                                             self.guidance, generator)
        images = traj.sample.clamp(-1.0, 1.0)
        rewards = torch.as_tensor(self.reward_fn(images, self.condition(labels)))
        rewards = rewards.to(device=x_T.device, dtype=self._score_dtype).reshape(-1)
        if rewards.shape != (batch_size,):
            raise ValueError(f"reward_fn returned shape {tuple(rewards.shape)} for {batch_size} images")
        latents = torch.stack(traj.latents, 1)
        batch = {"latents": latents, "log_probs": traj.log_probs, "labels": labels, "images": images,
                 "rewards": rewards, "advantages": self.tracker.update(labels, rewards)}
        n = min(self.config.drift_samples, batch_size)
        if n > 0:
            trained = self.trained_steps(traj.log_probs.shape[1]) + 1
            ref_lp = self._log_probs(self.reference, latents[:n, :trained], labels[:n])
            batch["drift"] = (traj.log_probs[:n, :trained - 1] - ref_lp).sum(1)
        return batch

    def trained_steps(self, steps: int) -> int:
        """How many of a chain's ``steps`` stochastic steps (the first ones) are trained on."""
        return steps if self.config.train_last_step else steps - 1

    def _grid(self, like: Tensor) -> Tensor:
        """The sampling grid on the device and in the dtype of ``like`` (kept for the last device and dtype)."""
        key = (like.device, like.dtype, self.config.sample_steps)
        if self._grid_cache is None or self._grid_cache[0] != key:
            grid = self.solver.timesteps(self.model, self.config.sample_steps).to(device=like.device, dtype=like.dtype)
            self._grid_cache = (key, grid)
        return self._grid_cache[1]

    def _step_log_prob(self, model: DiffusionModel, x: Tensor, x_next: Tensor, k: Tensor, labels: Tensor) -> Tensor:
        """log p(x_next | x) of step ``k`` (per element) of the guided DDIM chain."""
        grid = self._grid(x)
        dist = self.solver.step_distribution(model, x, grid[k], grid[k + 1], self.condition(labels), self.guidance)
        return dist.log_prob(x_next)

    def _log_probs(self, model: DiffusionModel, latents: Tensor, labels: Tensor) -> Tensor:
        """(B, K) log-probabilities of every step of the chains ``latents`` under ``model``."""
        steps = latents.shape[1] - 1
        k = torch.arange(steps, device=latents.device)
        flat = self._step_log_prob(model, latents[:, :-1].flatten(0, 1), latents[:, 1:].flatten(0, 1),
                                   k.repeat(len(latents)), labels.repeat_interleave(steps))
        return flat.reshape(len(latents), steps)

    def _pairs(self, batch_size: int, steps: int) -> tuple[Tensor, Tensor]:
        """(sample, step) index pairs trained on: all trained steps, or a random ``timestep_fraction`` of them."""
        steps = self.trained_steps(steps)
        per_chain = max(1, round(self.config.timestep_fraction * steps))
        device = self.generator.device
        keys = torch.rand(batch_size, steps, generator=self.generator, device=device, dtype=self._score_dtype)
        ks = keys.argsort(1)[:, :per_chain]
        return torch.arange(batch_size, device=device).repeat_interleave(per_chain), ks.reshape(-1)

    def _pair_terms(self, batch: dict[str, Tensor], i: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(new log-prob, old log-prob, clipped advantage) of the (sample i, step k) pairs."""
        device = batch["latents"].device
        i, k = i.to(device), k.to(device)
        lp = self._step_log_prob(self.model, batch["latents"][i, k], batch["latents"][i, k + 1], k,
                                 batch["labels"][i])
        adv = batch["advantages"][i].clamp(-self.config.adv_clip_max, self.config.adv_clip_max)
        return lp, batch["log_probs"][i, k], adv

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor | float]:
        """One DDPO epoch on a batch from :meth:`collect`: one step (SF) or inner epochs of minibatch steps (IS).

        Metric values are detached tensors on the agent's device (no host sync), ``num_updates`` a float.
        """
        cfg = self.config
        batch_size, steps = batch["log_probs"].shape
        stats: dict[str, list[Tensor]] = {"loss": [], "approx_kl": [], "clipfrac": [], "grad_norm": []}
        if cfg.method == "sf":
            i, k = self._pairs(batch_size, steps)
            self._sf_step(batch, i, k, stats)
        else:
            for _ in range(cfg.inner_epochs):
                i, k = self._pairs(batch_size, steps)
                perm = torch.randperm(len(i), generator=self.generator, device=self.generator.device)
                for chunk in perm.split(cfg.minibatch_size):
                    lp, old, adv = self._pair_terms(batch, i[chunk], k[chunk])
                    loss = clipped_surrogate(lp, old, adv, cfg.clip_range).mean()
                    stats["grad_norm"].append(self.learner.step(loss)["grad_norm"])
                    self._record(stats, loss, lp, old)
        metrics: dict[str, Tensor | float] = {key: torch.stack(v).mean() for key, v in stats.items()}
        rewards = batch["rewards"].detach()
        metrics.update(reward_mean=rewards.mean(), reward_std=rewards.std(), num_updates=float(len(stats["grad_norm"])))
        if "drift" in batch:
            metrics["kl_to_start"] = batch["drift"].detach().mean()
        return metrics

    def _sf_step(self, batch: dict[str, Tensor], i: Tensor, k: Tensor, stats: dict[str, list[Tensor]]) -> None:
        """REINFORCE on all pairs at once: gradients accumulated over chunks, then a single optimiser step."""
        params = self.learner.params
        total = [torch.zeros_like(p) for p in params]
        for chunk in torch.arange(len(i), device=i.device).split(self.config.minibatch_size):
            lp, old, adv = self._pair_terms(batch, i[chunk], k[chunk])
            loss = -(adv * lp).sum() / len(i)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, g in zip(total, grads, strict=True):
                if g is not None:
                    acc.add_(g)
            self._record(stats, loss * len(i) / len(chunk), lp, old)
        # A surrogate whose gradient is the accumulated one lets the Learner clip and step as usual.
        surrogate = sum((p * g).sum() for p, g in zip(params, total, strict=True))
        stats["grad_norm"].append(self.learner.step(surrogate)["grad_norm"])

    def _record(self, stats: dict[str, list[Tensor]], loss: Tensor, lp: Tensor, old: Tensor) -> None:
        with torch.no_grad():
            diff = lp - old
            stats["loss"].append(loss.detach())
            stats["approx_kl"].append(0.5 * diff.pow(2).mean())
            stats["clipfrac"].append((diff.exp().sub(1.0).abs() > self.config.clip_range).to(diff.dtype).mean())

    def state_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "denoiser": self.model.denoiser.state_dict(),
            "reference": self.reference.denoiser.state_dict(),
            "learner": self.learner.state_dict(),
            "tracker": self.tracker.state_dict(),
            "generator": self.generator.get_state(),
            "generator_device": self.generator.device.type,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.denoiser.load_state_dict(state["denoiser"])
        self.reference.denoiser.load_state_dict(state["reference"])
        self.learner.load_state_dict(state["learner"])
        self.tracker.load_state_dict(state["tracker"])
        if state.get("generator_device", "cpu") == self.generator.device.type:
            self.generator.set_state(state["generator"].cpu())
        else:  # a CPU and a CUDA generator's states do not convert: the stream starts over, as in :meth:`to`
            self.generator.manual_seed(self.config.seed)


def image_grid(images: Tensor, nrow: int, scale: int = 4, pad: int = 1) -> np.ndarray:
    """Images (B, C, H, W) in [-1, 1] tiled ``nrow`` per row, upscaled ``scale``x: uint8 (H', W') or (H', W', C)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, C, H, W) with C in (1, 3), got {tuple(images.shape)}")
    b, c, h, w = images.shape
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    rows = math.ceil(b / nrow)
    hs, ws = h * scale + pad, w * scale + pad
    grid = torch.full((c, rows * hs + pad, nrow * ws + pad), 255, dtype=torch.uint8)
    for n in range(b):
        r, q = divmod(n, nrow)
        grid[:, pad + r * hs:pad + r * hs + h * scale, pad + q * ws:pad + q * ws + w * scale] = x[n]
    out = grid.permute(1, 2, 0).numpy()
    return out[..., 0] if c == 1 else out


def save_image_grid(path: str | os.PathLike, images: Tensor, nrow: int, scale: int = 4) -> Path:
    """Write :func:`image_grid` as a PNG."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(images, nrow, scale)
    plt.imsave(path, grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255)
    return path


class SampleEvaluator:
    """``evaluate(agent, step)`` for the Trainer: rewards of a fixed-seed sample set, saved as PNG grid + TensorBoard.

    ``labels`` are the prompt classes of the evaluation images (ignored for unconditional models); the grid has
    ``nrow`` images per row. Returns ``reward_mean``, ``reward_std`` and ``reward_sem``.
    """

    def __init__(self, reward_fn: RewardFn, labels: Tensor, seed: int = 1234, run_dir: str | os.PathLike | None = None,
                 nrow: int = 10, tag: str = "samples"):
        self.reward_fn, self.labels, self.seed, self.nrow, self.tag = reward_fn, labels, seed, nrow, tag
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._writer = None

    def images(self, agent: DDPO) -> Tensor:
        return agent.sample(self.labels.to(agent.device), torch.Generator(agent.device).manual_seed(self.seed))

    def __call__(self, agent: DDPO, step: int) -> dict[str, float]:
        images = self.images(agent)
        rewards = torch.as_tensor(self.reward_fn(images, agent.condition(self.labels.to(agent.device)))).double()
        if self.run_dir is not None:
            save_image_grid(self.run_dir / "grids" / f"{self.tag}_{step:06d}.png", images, self.nrow)
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb_images"))
            grid = image_grid(images, self.nrow)
            self._writer.add_image(self.tag, grid, step, dataformats="HW" if grid.ndim == 2 else "HWC")
            self._writer.flush()
        n = len(rewards)
        return {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
                "reward_sem": rewards.std().item() / math.sqrt(n)}
