"""DDPO: reward fine-tuning of diffusion models by policy gradients over the denoising chain (Black et al. 2023).

Sampling with stochastic DDIM (eta > 0) is a multi-step MDP: the state is (x_t, t, prompt), the action is the next
latent x_s ~ N(mean_theta(x_t), std^2), and the reward r(x_0, prompt) arrives at the end. One DDPO epoch samples a
batch of chains, keeping every latent and each step's log-probability under the classifier-free guided policy
(averaged over the latent's dimensions, as ddpo-pytorch), normalises rewards per prompt into advantages
(clipped to ``adv_clip_max``), and then, for ``inner_epochs`` passes over the shuffled batch, takes one optimiser
step per train batch of chains with the gradient accumulated over all their trained steps:

* DDPO-SF: the score-function (REINFORCE) loss -A * log p(x_{k+1} | x_k), one step on the whole batch;
* DDPO-IS: the importance-sampled, PPO-clipped loss max(-A r, -A clip(r, 1 - e, 1 + e)), r = p_theta / p_old.

The chain is the package's own image model (:class:`agents.ddpo_chains.ModelChain`, ``DDPO(config, model, ...)``)
or a diffusers text-to-image pipeline (:class:`agents.ddpo_chains.PipelineChain`, :meth:`DDPO.from_pipeline`).
Either the whole denoiser or only LoRA adapters (:mod:`agents.lora`, through peft) train. The drift from the
starting model is reported as ``kl_to_start``, E_chain[sum_k log p_theta - log p_start] on sampled chains (with
log-probabilities averaged over dimensions: the KL per latent dimension). With :class:`diffrl.training.Trainer`,
``sample_batch = agent.collect`` and one trainer step is one DDPO epoch.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from agents.base import TorchAgent
from agents.ddpo_chains import Chain, ModelChain, PipelineChain, Prompts
from diffrl.device import autocast, check_precision
from diffrl.model import DiffusionModel
from diffrl.training import Learner

RewardFn = Callable[..., Any]
METHODS = ("sf", "is")


class PerPromptStatTracker:
    """Reward normalisation per prompt: ``(r - mean_p) / (std_p + eps)`` over a buffer of recent rewards.

    Each prompt (any hashable key: a class id or a prompt string) keeps its last ``buffer_size`` rewards, the
    current batch's included. While a prompt has fewer than ``min_count`` rewards buffered, the mean and std of
    the whole current batch are used instead (ddpo-pytorch's ``PerPromptStatTracker``).
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16, eps: float = 1e-6):
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size and min_count must be >= 1, got {buffer_size}, {min_count}")
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.buffers: dict[Hashable, deque[float]] = {}

    def update(self, keys: Sequence[Hashable] | Tensor, rewards: Tensor) -> Tensor:
        """Add the batch's rewards to the buffers and return its advantages (shape, dtype and device of ``rewards``).

        The statistics are computed in float64 on the CPU (one host copy per batch).
        """
        like = rewards
        keys = keys.reshape(-1).tolist() if isinstance(keys, Tensor) else list(keys)
        rewards = rewards.reshape(-1).double().cpu()
        if len(keys) != len(rewards):
            raise ValueError(f"{len(keys)} prompts and {len(rewards)} rewards differ in number")
        global_mean, global_std = rewards.mean(), rewards.std(unbiased=False)
        advantages = torch.empty_like(rewards)
        for key in dict.fromkeys(keys):
            mask = torch.tensor([k == key for k in keys])
            buffer = self.buffers.setdefault(key, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = global_mean, global_std
            else:
                values = torch.tensor(list(buffer), dtype=torch.float64)
                mean, std = values.mean(), values.std(unbiased=False)
            advantages[mask] = (rewards[mask] - mean) / (std + self.eps)
        return advantages.to(device=like.device, dtype=like.dtype).reshape(like.shape)

    def state_dict(self) -> dict:
        return {"keys": list(self.buffers), "buffers": [list(b) for b in self.buffers.values()]}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {k: deque(b, maxlen=self.buffer_size) for k, b in zip(state["keys"], state["buffers"],
                                                                             strict=True)}


def clipped_surrogate(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> Tensor:
    """PPO's pessimistic objective as a loss, per element: max(-A r, -A clip(r, 1 - e, 1 + e)), r = exp(lp - old)."""
    ratio = torch.exp(log_prob - old_log_prob)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))


def approx_kl(log_prob: Tensor, old_log_prob: Tensor) -> Tensor:
    """The k2 estimate 0.5 * E[(log p - log p_old)^2] of KL(p_old || p) on samples of p_old (ddpo-pytorch's)."""
    return 0.5 * (log_prob - old_log_prob).pow(2).mean()


def clip_fraction(log_prob: Tensor, old_log_prob: Tensor, clip_range: float) -> Tensor:
    """Share of ratios outside [1 - clip_range, 1 + clip_range]."""
    return ((log_prob - old_log_prob).exp().sub(1.0).abs() > clip_range).to(log_prob.dtype).mean()


@dataclass
class DDPOConfig:
    """DDPO hyper-parameters. Defaults follow Black et al. 2023 and its official code (ddpo-pytorch,
    config/base.py): 50 DDIM steps, all trained, eta 1, guidance scale 5, LoRA of rank 4 on the attention
    projections, AdamW lr 3e-4, weight decay 1e-4, gradient clip 1, clip range 1e-4, advantages clipped at 5, one
    inner epoch, per-prompt statistics with buffer 16 / min count 16. ``train_batch_size`` = None trains on the
    whole sampled batch in one optimiser step, as the compressibility configuration (256 samples per epoch and
    per step). Small models on short chains need other values: see scripts/bench_ddpo*.py for those used there.
    """

    method: str = "is"  # "sf" (REINFORCE, one step per batch) or "is" (importance sampling + PPO clipping)
    sample_steps: int = 50  # stochastic DDIM steps per chain
    eta: float = 1.0
    guidance_scale: float = 5.0  # classifier-free guidance in sampling and log-probabilities (1 = none)
    classes: tuple[int, ...] = ()  # image model: prompt classes sampled uniformly; () = all classes
    null_prompt: bool = False  # image model: sample a class-conditional model with its null class only
    lr: float = 3e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    inner_epochs: int = 1
    sample_batch_size: int | None = None  # chains sampled and decoded at once (None: the whole batch)
    train_batch_size: int | None = None  # chains per optimiser step (None: the whole batch; DDPO-SF: always)
    minibatch_size: int = 64  # (chain, step) pairs per forward/backward pass; gradients accumulate over them
    timestep_fraction: float = 1.0  # share of each chain's steps trained on (a random subset per chain)
    stat_buffer_size: int = 16
    stat_min_count: int = 16
    lora_rank: int = 4  # 0: train the whole denoiser; > 0: train LoRA adapters of this rank only
    lora_alpha: float | None = None  # None: the rank (scale 1)
    lora_targets: tuple[str, ...] = ()  # () = to_q, to_k, to_v, to_out.0 (pipeline); every linear/conv (model)
    gradient_checkpointing: bool = False  # diffusers U-Nets only
    drift_samples: int = 16  # chains per batch on which the KL to the starting model is estimated (0: off)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"DDPOConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.sample_steps < 1:
            raise ValueError(f"DDPOConfig.sample_steps must be >= 1, got {self.sample_steps}")
        if not 0.0 < self.eta <= 1.0:
            raise ValueError(f"DDPOConfig.eta must lie in (0, 1] (log-probabilities need noise), got {self.eta}")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError(f"DDPOConfig.timestep_fraction must lie in (0, 1], got {self.timestep_fraction}")
        if self.inner_epochs < 1 or self.minibatch_size < 1:
            raise ValueError("DDPOConfig.inner_epochs and minibatch_size must be >= 1")
        for name in ("sample_batch_size", "train_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"DDPOConfig.{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.method == "sf" and (self.inner_epochs != 1 or self.train_batch_size is not None):
            raise ValueError("DDPO-SF is on-policy: one step on the whole batch (inner_epochs 1, train_batch_size "
                             "None)")
        if self.lora_rank < 0:
            raise ValueError(f"DDPOConfig.lora_rank must be >= 0, got {self.lora_rank}")
        self.classes = tuple(int(c) for c in self.classes)
        self.lora_targets = tuple(str(t) for t in self.lora_targets)


class DDPO(TorchAgent):
    """Fine-tunes a denoising chain to maximise a reward.

    ``DDPO(config, model, reward_fn, image_shape, num_classes)`` trains a :class:`DiffusionModel` (class ids as
    prompts, ``reward_fn(images in [-1, 1], classes | None) -> (B,)``); :meth:`from_pipeline` a diffusers
    pipeline. The denoiser is kept in eval mode (no condition dropout): the sampled and the trained policy must
    agree. Everything sampled and trained follows the chain's device and dtype (move the agent with :meth:`to`);
    rewards and advantages are kept in at least float32.
    """

    kind = "ddpo"

    def __init__(self, config: DDPOConfig, model: DiffusionModel | Chain, reward_fn: RewardFn,
                 image_shape: tuple[int, ...] | None = None, num_classes: int = 0):
        if not isinstance(model, Chain):
            if image_shape is None:
                raise ValueError("DDPO on a DiffusionModel needs image_shape")
            model = ModelChain(model, image_shape, num_classes, config)
        self.chain = model  # first module attribute: the agent's device and dtype are the chain's
        self.config, self.reward_fn = config, reward_fn
        ids = {id(p) for p in model.params}
        self._param_names = [name for name, p in model.named_parameters() if id(p) in ids]
        self.learner = Learner(model.params, lr=config.lr, weight_decay=config.weight_decay,
                               max_grad_norm=config.max_grad_norm)
        self.tracker = PerPromptStatTracker(config.stat_buffer_size, config.stat_min_count)
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.precision = "fp32"

    @classmethod
    def from_pipeline(cls, pipe, config: DDPOConfig, prompt_fn: Callable[[], tuple[str, Any]],
                      reward_fn: RewardFn) -> DDPO:
        """DDPO on a diffusers pipeline with unet, vae, text_encoder, tokenizer and scheduler (e.g. a
        StableDiffusionPipeline): ``prompt_fn() -> (prompt, metadata)``, ``reward_fn(images in [0, 1], prompts,
        metadata) -> (B,)``. The pipeline's U-Net is trained in place (its adapters, when ``lora_rank`` > 0)."""
        return cls(config, PipelineChain(pipe, config, prompt_fn), reward_fn)

    @classmethod
    def from_dataset(cls, dataset, config: DDPOConfig) -> DDPO:
        """Not applicable: DDPO learns from rewards on its own samples, not from an offline dataset."""
        raise TypeError("DDPO fine-tunes an image diffusion model on a reward, not on a dataset: build it with "
                        "DDPO(config, model, reward_fn, image_shape, num_classes) or DDPO.from_pipeline")

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> DDPO:
        """Move the agent (see :class:`TorchAgent`). Moving to another device recreates the agent's own generator
        (minibatch and timestep draws) there, seeded from ``config.seed``: that random stream starts over."""
        before = self.generator.device
        super().to(device, dtype)
        if self.device != before:
            self.generator = torch.Generator(self.device).manual_seed(self.config.seed)
        return self

    def set_precision(self, precision: str) -> None:
        """Training precision; sampling in :meth:`collect` runs under the same autocast."""
        self.precision = check_precision(precision)
        super().set_precision(precision)

    @property
    def model(self) -> DiffusionModel:
        """The trained :class:`DiffusionModel` (image-model chains)."""
        return self.chain.model

    @property
    def _score_dtype(self) -> torch.dtype:
        """The dtype of rewards and advantages: the chain's, at least float32."""
        return torch.promote_types(self.dtype, torch.float32)

    def trained_steps(self, steps: int) -> int:
        """How many of a chain's ``steps`` steps are trained on: ``int(steps * timestep_fraction)``, at least 1."""
        return max(1, int(steps * self.config.timestep_fraction))

    def sample(self, prompts: Any, generator: torch.Generator | None = None, metadata: list | None = None) -> Tensor:
        """Images from the current policy for the given prompts (class ids or strings), in the chain's range."""
        with torch.no_grad(), autocast(self.device, self.precision):
            return self.chain.sample(self.chain.make_prompts(prompts, metadata), generator)[2]

    def score(self, images: Tensor, prompts: Prompts, reward_fn: RewardFn | None = None) -> Tensor:
        """Rewards (B,) of ``images`` for ``prompts`` on the agent's device, in at least float32."""
        rewards = self.chain.score(reward_fn or self.reward_fn, images, prompts)
        rewards = torch.as_tensor(np.asarray(rewards.detach().cpu() if isinstance(rewards, Tensor) else rewards))
        rewards = rewards.to(device=self.device, dtype=self._score_dtype).reshape(-1)
        if rewards.shape != (len(images),):
            raise ValueError(f"reward_fn returned {rewards.numel()} values for {len(images)} images")
        return rewards

    @torch.no_grad()
    def collect(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Sample ``batch_size`` chains (``sample_batch_size`` at a time), score them and compute advantages.

        Keys: ``latents`` (B, K + 1, ...) with x_T first, ``log_probs`` (B, K), ``cond`` (the denoiser's
        condition per chain), ``prompts`` (the stat-tracking keys), ``images``, ``rewards``, ``advantages`` and
        ``drift`` (for the first ``drift_samples`` chains, the sum over steps of log p_theta - log p_start).
        ``generator`` (if given) must live on the agent's device.
        """
        chunk = self.config.sample_batch_size or batch_size
        parts = []
        with autocast(self.device, self.precision):
            for start in range(0, batch_size, chunk):
                prompts = self.chain.draw(min(chunk, batch_size - start), generator)
                latents, log_probs, images = self.chain.sample(prompts, generator)
                parts.append((prompts, latents, log_probs, images, self.score(images, prompts)))
        prompts = Prompts.cat([p[0] for p in parts])
        latents, log_probs, images, rewards = (torch.cat([p[i] for p in parts]) for i in range(1, 5))
        batch = {"latents": latents, "log_probs": log_probs, "cond": prompts.cond, "prompts": prompts.keys,
                 "images": images, "rewards": rewards, "advantages": self.tracker.update(prompts.keys, rewards)}
        n = min(self.config.drift_samples, batch_size)
        if n > 0:
            batch["drift"] = (log_probs[:n] - self.chain_log_probs(latents[:n], prompts.cond[:n], True)).sum(1)
        return batch

    @torch.no_grad()
    def chain_log_probs(self, latents: Tensor, cond: Tensor, reference: bool = False) -> Tensor:
        """(B, K) log-probabilities of every step of the chains ``latents`` under the policy or the reference."""
        b, steps = latents.shape[:2]
        i = torch.arange(b, device=latents.device).repeat_interleave(steps - 1)
        k = torch.arange(steps - 1, device=latents.device).repeat(b)
        out = []
        with autocast(self.device, self.precision), (self.chain.reference() if reference else contextlib.nullcontext()):
            for rows in torch.arange(len(i), device=latents.device).split(self.config.minibatch_size):
                ii, kk = i[rows], k[rows]
                out.append(self.chain.log_prob(latents[ii, kk], latents[ii, kk + 1], kk, cond[ii]))
        return torch.cat(out).reshape(b, steps - 1).to(self._score_dtype)

    def update(self, batch: dict[str, Any]) -> dict[str, Tensor | float]:
        """One DDPO epoch on a batch from :meth:`collect`: ``inner_epochs`` shuffled passes, one optimiser step per
        train batch with gradients accumulated over its chains' trained steps (DDPO-SF: one step in all).

        Metric values are detached tensors on the agent's device (no host sync), ``num_updates`` a float.
        """
        cfg = self.config
        batch_size, steps = batch["log_probs"].shape
        per_chain = self.trained_steps(steps)
        train_batch = cfg.train_batch_size or batch_size
        device = self.generator.device
        stats: dict[str, list[Tensor]] = {"loss": [], "approx_kl": [], "clipfrac": [], "grad_norm": []}
        for _ in range(cfg.inner_epochs):
            order = torch.randperm(batch_size, generator=self.generator, device=device)
            keys = torch.rand(batch_size, steps, generator=self.generator, device=device, dtype=self._score_dtype)
            chosen = keys.argsort(1)[:, :per_chain]  # a random subset (all, by default) of each chain's steps
            for rows in order.split(train_batch):
                i, k = rows.repeat_interleave(per_chain), chosen[rows].reshape(-1)
                grads = self.gradients(batch, i, k, stats)
                # A surrogate whose gradient is the accumulated one lets the Learner scale, clip and step as usual.
                surrogate = sum((p * g).sum() for p, g in zip(self.learner.params, grads, strict=True))
                stats["grad_norm"].append(self.learner.step(surrogate)["grad_norm"])
        metrics: dict[str, Tensor | float] = {key: torch.stack(v).mean() for key, v in stats.items()}
        rewards = batch["rewards"].detach()
        metrics.update(reward_mean=rewards.mean(), reward_std=rewards.std(), num_updates=float(len(stats["grad_norm"])))
        if "drift" in batch:
            metrics["kl_to_start"] = batch["drift"].detach().mean()
        return metrics

    def gradients(self, batch: dict[str, Any], i: Tensor, k: Tensor,
                  stats: dict[str, list[Tensor]] | None = None) -> list[Tensor]:
        """Gradient of the mean loss over the (chain i, step k) pairs, accumulated over ``minibatch_size`` chunks."""
        cfg = self.config
        params = self.learner.params
        scaler = self.learner.scaler
        scale = scaler.get_scale() if scaler is not None else 1.0  # fp16: keep small gradients representable
        total = [torch.zeros_like(p) for p in params]
        device = batch["latents"].device
        i, k = i.to(device), k.to(device)
        for rows in torch.arange(len(i), device=device).split(cfg.minibatch_size):
            ii, kk = i[rows], k[rows]
            lp = self.chain.log_prob(batch["latents"][ii, kk], batch["latents"][ii, kk + 1], kk, batch["cond"][ii])
            old = batch["log_probs"][ii, kk].to(lp.dtype)
            adv = batch["advantages"][ii].clamp(-cfg.adv_clip_max, cfg.adv_clip_max).to(lp.dtype)
            per_pair = -adv * lp if cfg.method == "sf" else clipped_surrogate(lp, old, adv, cfg.clip_range)
            grads = torch.autograd.grad(per_pair.sum() * (scale / len(i)), params, allow_unused=True)
            for acc, g in zip(total, grads, strict=True):
                if g is not None:
                    acc.add_(g, alpha=1.0 / scale)
            if stats is not None:
                with torch.no_grad():
                    stats["loss"].append(per_pair.detach().mean())
                    stats["approx_kl"].append(approx_kl(lp.detach(), old))
                    stats["clipfrac"].append(clip_fraction(lp.detach(), old, cfg.clip_range))
        return total

    def trainable_state(self) -> dict[str, Tensor]:
        """The trained parameters by name (the adapters, or the whole denoiser)."""
        return {name: p.detach() for name, p in zip(self._param_names, self.chain.params, strict=True)}

    def state_dict(self) -> dict:
        """Config, trained parameters, optimiser, stat tracker and generator. The reference is the model the
        agent was built from: restore into an agent built from the same starting model."""
        return {
            "config": asdict(self.config),
            "trainable": self.trainable_state(),
            "learner": self.learner.state_dict(),
            "tracker": self.tracker.state_dict(),
            "generator": self.generator.get_state(),
            "generator_device": self.generator.device.type,
        }

    def load_state_dict(self, state: dict) -> None:
        trainable = state["trainable"]
        if sorted(trainable) != sorted(self._param_names):
            raise ValueError("the saved DDPO state trains other parameters than this agent (LoRA settings differ?)")
        with torch.no_grad():
            for name, p in zip(self._param_names, self.chain.params, strict=True):
                p.copy_(trainable[name])
        self.learner.load_state_dict(state["learner"])
        self.tracker.load_state_dict(state["tracker"])
        if state.get("generator_device", "cpu") == self.generator.device.type:
            self.generator.set_state(state["generator"].cpu())
        else:  # a CPU and a CUDA generator's states do not convert: the stream starts over, as in :meth:`to`
            self.generator.manual_seed(self.config.seed)

    def save_lora(self, folder: str | os.PathLike) -> Path:
        """Write the pipeline U-Net's adapters in the diffusers format ``pipe.load_lora_weights(folder)`` reads."""
        from agents.lora import save_lora

        self._need_pipeline_lora()
        return save_lora(self.chain.pipe, self.chain.unet, folder)

    def save_merged(self, folder: str | os.PathLike) -> Path:
        """Write the whole pipeline with the adapters merged into the U-Net (``from_pretrained(folder)`` reloads it)."""
        from agents.lora import merged_copy

        chain = self._need_pipeline()
        unet = merged_copy(chain.unet) if chain.lora else chain.unet
        type(chain.pipe)(**{**chain.pipe.components, "unet": unet}).save_pretrained(str(folder))
        return Path(folder)

    def _need_pipeline(self) -> PipelineChain:
        if not isinstance(self.chain, PipelineChain):
            raise ValueError("saving in the diffusers format needs an agent built with DDPO.from_pipeline")
        return self.chain

    def _need_pipeline_lora(self) -> None:
        if not self._need_pipeline().lora:
            raise ValueError("this agent trains the whole U-Net (lora_rank=0): save it with save_merged")


def image_grid(images: Tensor, nrow: int, scale: int = 4, pad: int = 1,
               value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Images (B, C, H, W) in ``value_range`` tiled ``nrow`` per row, upscaled ``scale``x: uint8 (H', W') or
    (H', W', C)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, C, H, W) with C in (1, 3), got {tuple(images.shape)}")
    b, c, h, w = images.shape
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1).mul(255).round().to(torch.uint8)
    x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    rows = math.ceil(b / nrow)
    hs, ws = h * scale + pad, w * scale + pad
    grid = torch.full((c, rows * hs + pad, nrow * ws + pad), 255, dtype=torch.uint8)
    for n in range(b):
        r, q = divmod(n, nrow)
        grid[:, pad + r * hs:pad + r * hs + h * scale, pad + q * ws:pad + q * ws + w * scale] = x[n]
    out = grid.permute(1, 2, 0).numpy()
    return out[..., 0] if c == 1 else out


def captioned_grid(images: Tensor, captions: Sequence[str], nrow: int, scale: int = 4,
                   value_range: tuple[float, float] = (0.0, 1.0), line: int = 12) -> np.ndarray:
    """:func:`image_grid` (RGB) with each image's caption written in a strip below it: uint8 (H', W', 3)."""
    from PIL import Image, ImageDraw

    if len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    h, w = images.shape[2] * scale, images.shape[3] * scale
    tiles = []
    for image, caption in zip(images, captions, strict=True):
        tile = Image.new("RGB", (w, h + line), "white")
        tile.paste(Image.fromarray(image_grid(image[None], 1, scale, 0, value_range)), (0, 0))
        ImageDraw.Draw(tile).text((1, h), str(caption)[: max(1, w // 6)], fill="black")
        tiles.append(torch.from_numpy(np.asarray(tile)).permute(2, 0, 1).float() / 255)
    return image_grid(torch.stack(tiles), nrow, 1, 1, (0.0, 1.0))


def save_image_grid(path: str | os.PathLike, images: Tensor, nrow: int, scale: int = 4,
                    value_range: tuple[float, float] = (-1.0, 1.0)) -> Path:
    """Write :func:`image_grid` as a PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images, nrow, scale, value_range=value_range)).save(path)
    return path


class SampleEvaluator:
    """``evaluate(agent, step)`` for the Trainer: rewards of a fixed-seed sample set, saved as a PNG grid and in
    TensorBoard (captioned with the prompts for a pipeline).

    ``prompts`` are the evaluation prompts (class ids for an image model, strings for a pipeline), ``reward_fn``
    takes the chain's reward arguments (None: the agent's); the grid has ``nrow`` images per row. Returns
    ``reward_mean``, ``reward_std`` and ``reward_sem``.
    """

    def __init__(self, reward_fn: RewardFn | None, prompts: Any, seed: int = 1234,
                 run_dir: str | os.PathLike | None = None, nrow: int = 10, tag: str = "samples",
                 metadata: list | None = None):
        self.reward_fn, self.prompts, self.seed, self.nrow, self.tag = reward_fn, prompts, seed, nrow, tag
        self.metadata = metadata
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._writer = None

    def images(self, agent: DDPO) -> Tensor:
        return agent.sample(self.prompts, torch.Generator(agent.device).manual_seed(self.seed), self.metadata)

    def grid(self, agent: DDPO, images: Tensor) -> np.ndarray:
        if isinstance(agent.chain, PipelineChain):
            return captioned_grid(images, list(self.prompts), self.nrow, value_range=agent.chain.value_range)
        return image_grid(images, self.nrow, value_range=agent.chain.value_range)

    def __call__(self, agent: DDPO, step: int) -> dict[str, float]:
        images = self.images(agent)
        rewards = agent.score(images, agent.chain.make_prompts(self.prompts, self.metadata), self.reward_fn).double()
        if self.run_dir is not None:
            from PIL import Image

            grid = self.grid(agent, images)
            path = self.run_dir / "grids" / f"{self.tag}_{step:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grid).save(path)
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb_images"))
            self._writer.add_image(self.tag, grid, step, dataformats="HW" if grid.ndim == 2 else "HWC")
            self._writer.add_scalar(f"{self.tag}/reward_mean", rewards.mean().item(), step)
            self._writer.flush()
        n = len(rewards)
        return {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
                "reward_sem": rewards.std().item() / math.sqrt(n)}
