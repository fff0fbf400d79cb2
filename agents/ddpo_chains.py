"""The denoising chains DDPO trains: the package's own image model, or a diffusers text-to-image pipeline.

Both sample stochastic DDIM chains with classifier-free guidance and evaluate, differentiably, the
log-probability of one step, averaged over the latent's dimensions as in ddpo-pytorch. A chain holds the
modules it runs (so the agent's ``to`` moves them) and knows its reference model, the starting point the drift
is measured from: the same modules with their LoRA adapters switched off, or a frozen copy when the whole
denoiser trains.

* :class:`ModelChain`: a :class:`DiffusionModel` on diffrl's continuous time, prompts are class ids, images in
  [-1, 1]; ``reward_fn(images, classes)``.
* :class:`PipelineChain`: a diffusers pipeline with ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and
  ``scheduler`` (e.g. a StableDiffusionPipeline), sampled on the scheduler's integer DDIM timesteps as in
  ``ddim_step_with_logprob`` of ddpo-pytorch: latents are never clamped and x0 is not clipped (SD's scheduler
  has ``clip_sample=False``); images are VAE-decoded into [0, 1]; ``prompt_fn() -> (prompt, metadata)`` and
  ``reward_fn(images, prompts, metadata)``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from agents.lora import adapters_disabled, add_lora
from diffrl.guidance import ClassifierFree, Guidance
from diffrl.model import DiffusionModel
from diffrl.solvers import DDIM
from diffrl.solvers.base import gaussian_log_prob

DEFAULT_PIPELINE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, as trl's DDPO
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def mean_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std^2) per sample, averaged over all but the batch dimension (ddpo-pytorch's log-prob)."""
    return gaussian_log_prob(x, mean, std.expand_as(mean)) / x[0].numel()


@dataclass
class Prompts:
    """Prompts of a batch of chains: ``cond`` (a tensor, one row per chain) conditions the denoiser, ``keys``
    group rewards for the per-prompt statistics, ``prompts`` and ``metadata`` go to the reward function."""

    cond: Tensor
    keys: list
    prompts: Any
    metadata: list | None = None

    @staticmethod
    def cat(parts: list[Prompts]) -> Prompts:
        first = parts[0]
        if first.prompts is None or isinstance(first.prompts, Tensor):
            prompts = None if first.prompts is None else torch.cat([p.prompts for p in parts])
        else:
            prompts = [q for p in parts for q in p.prompts]
        metadata = None if first.metadata is None else [m for p in parts for m in p.metadata]
        return Prompts(torch.cat([p.cond for p in parts]), [k for p in parts for k in p.keys], prompts, metadata)


class Chain(nn.Module):
    """What the DDPO agent needs from a denoising chain (see the module docstring)."""

    value_range: tuple[float, float]
    params: list[nn.Parameter]
    lora: bool

    def draw(self, n: int, generator: torch.Generator | None) -> Prompts:
        """Prompts of ``n`` new chains."""
        raise NotImplementedError

    def make_prompts(self, prompts: Any, metadata: list | None = None) -> Prompts:
        """:class:`Prompts` of given prompts (class ids for a model, strings for a pipeline)."""
        raise NotImplementedError

    def sample(self, prompts: Prompts, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
        """(latents (B, K + 1, ...) with x_T first, log-probs (B, K), images) of chains for ``prompts``."""
        raise NotImplementedError

    def log_prob(self, x: Tensor, x_next: Tensor, k: Tensor, cond: Tensor) -> Tensor:
        """Differentiable log p(x_next | x) of step ``k`` (per row) under the guided policy, mean over dims."""
        raise NotImplementedError

    def score(self, reward_fn: Callable, images: Tensor, prompts: Prompts) -> Any:
        raise NotImplementedError

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within the block :meth:`log_prob` is the starting model's."""
        raise NotImplementedError


@contextlib.contextmanager
def _reference(chain: Chain, adapted: nn.Module) -> Iterator[None]:
    """The chain's starting model within the block: adapters of ``adapted`` off, or the frozen copy in use."""
    if chain.lora:
        with adapters_disabled(adapted):
            yield
        return
    chain.use_reference = True
    try:
        yield
    finally:
        chain.use_reference = False


class ModelChain(Chain):
    """A class-conditional (or unconditional) :class:`DiffusionModel` sampled with DDIM(eta) on
    ``num_steps + 1`` grid points: ``num_steps`` stochastic steps, then the model's x0 estimate (clipped as the
    model clips it), the image in [-1, 1]."""

    value_range = (-1.0, 1.0)

    def __init__(self, model: DiffusionModel, image_shape: tuple[int, ...], num_classes: int, config) -> None:
        super().__init__()
        if any(not 0 <= c < max(num_classes, 1) for c in config.classes):
            raise ValueError(f"classes {config.classes} outside the model's {num_classes} classes")
        self.model = model.eval()
        self.image_shape, self.num_classes, self.num_steps = tuple(image_shape), num_classes, config.sample_steps
        self.classes, self.conditional = config.classes, num_classes > 0 and not config.null_prompt
        self.solver = DDIM(eta=config.eta)
        self.guidance = ClassifierFree(config.guidance_scale) if self.conditional else Guidance()
        self.lora = config.lora_rank > 0
        if self.lora:
            self.params = add_lora(model.denoiser, config.lora_rank, config.lora_alpha, config.lora_targets)
            self.frozen: DiffusionModel | None = None
        else:
            self.frozen = copy.deepcopy(model).requires_grad_(False)
            self.params = list(model.denoiser.parameters())
        self.use_reference = False
        self._grid_cache: tuple[tuple, Tensor] | None = None

    def condition(self, labels: Tensor) -> Tensor | None:
        return labels if self.conditional else None

    def draw(self, n: int, generator: torch.Generator | None) -> Prompts:
        """Class ids drawn uniformly from ``config.classes`` (all classes by default; zeros when unconditional)."""
        device = self.grid_like().device
        if not self.conditional:
            labels = torch.zeros(n, dtype=torch.long, device=device)
        else:
            pool = torch.tensor(self.classes or range(self.num_classes), dtype=torch.long, device=device)
            labels = pool[torch.randint(0, len(pool), (n,), generator=generator, device=device)]
        return self.make_prompts(labels)

    def make_prompts(self, prompts: Any, metadata: list | None = None) -> Prompts:
        labels = torch.as_tensor(prompts, dtype=torch.long).to(self.grid_like().device)
        return Prompts(labels, labels.tolist(), self.condition(labels), metadata)

    def grid_like(self) -> Tensor:
        return next(self.model.parameters())

    def _grid(self, like: Tensor) -> Tensor:
        key = (like.device, like.dtype)
        if self._grid_cache is None or self._grid_cache[0] != key:
            grid = self.solver.timesteps(self.model, self.num_steps + 1).to(device=like.device, dtype=like.dtype)
            self._grid_cache = (key, grid)
        return self._grid_cache[1]

    def prior(self, n: int, generator: torch.Generator | None) -> Tensor:
        like = self.grid_like()
        return self.model.schedule.prior((n, *self.image_shape), generator=generator, device=like.device,
                                         dtype=like.dtype)

    @torch.no_grad()
    def sample(self, prompts: Prompts, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
        x_T = self.prior(len(prompts.keys), generator)
        traj = self.solver.sample_trajectory(self.model, x_T, self.condition(prompts.cond), self.num_steps + 1,
                                             self.guidance, generator)
        return torch.stack(traj.latents, 1), traj.log_probs / x_T[0].numel(), traj.sample.clamp(-1.0, 1.0)

    def log_prob(self, x: Tensor, x_next: Tensor, k: Tensor, cond: Tensor) -> Tensor:
        grid = self._grid(x)
        dist = self.solver.step_distribution(self.active, x, grid[k], grid[k + 1], self.condition(cond),
                                             self.guidance)
        return mean_log_prob(x_next, dist.mean, dist.std)

    def score(self, reward_fn: Callable, images: Tensor, prompts: Prompts) -> Any:
        return reward_fn(images, prompts.prompts)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        with _reference(self, self.model.denoiser):
            yield

    @property
    def active(self) -> DiffusionModel:
        return self.frozen if self.use_reference else self.model


class PipelineChain(Chain):
    """A diffusers text-to-image pipeline as a DDPO chain (see the module docstring). The scheduler's
    ``num_train_timesteps`` and betas give the DDIM steps; the VAE and text encoder are frozen."""

    value_range = (0.0, 1.0)

    def __init__(self, pipe, config, prompt_fn: Callable[[], tuple[str, Any]]) -> None:
        super().__init__()
        from diffusers import DDIMScheduler

        missing = [name for name in PIPELINE_PARTS if getattr(pipe, name, None) is None]
        if missing:
            raise ValueError(f"the pipeline has no {', '.join(missing)}: DDPO needs {', '.join(PIPELINE_PARTS)}")
        self.pipe, self.prompt_fn, self.tokenizer = pipe, prompt_fn, pipe.tokenizer
        self.unet = pipe.unet.eval()
        self.vae = pipe.vae.requires_grad_(False).eval()
        self.text_encoder = pipe.text_encoder.requires_grad_(False).eval()
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}: "
                             "epsilon or v_prediction")
        scheduler.set_timesteps(config.sample_steps)
        self.v_prediction = scheduler.config.prediction_type == "v_prediction"
        self.num_steps, self.eta, self.guidance_scale = config.sample_steps, config.eta, config.guidance_scale
        self.stride = scheduler.config.num_train_timesteps // config.sample_steps
        self.alphas_cumprod = scheduler.alphas_cumprod.double()  # indexed on the host, then moved
        self.timesteps = scheduler.timesteps.long()
        self.lora = config.lora_rank > 0
        if self.lora:
            self.unet.requires_grad_(False)
            self.params = add_lora(self.unet, config.lora_rank, config.lora_alpha,
                                   config.lora_targets or DEFAULT_PIPELINE_LORA_TARGETS)
            self.frozen = None
        else:
            self.params = list(self.unet.requires_grad_(True).parameters())
            self.frozen = copy.deepcopy(self.unet).requires_grad_(False)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.use_reference = False
        self.register_buffer("null_embed", self.encode([""]), persistent=False)
        self.latent_shape = (self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        """The text encoder's hidden states (B, L, D) of ``prompts``, padded to the tokenizer's max length."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(ids.to(device))[0].to(self.unet.dtype)

    def draw(self, n: int, generator: torch.Generator | None) -> Prompts:
        """``n`` calls of ``prompt_fn`` (which draws with Python's or NumPy's global RNG, as ddpo-pytorch's)."""
        pairs = [self.prompt_fn() for _ in range(n)]
        for prompt, _ in pairs:
            if not isinstance(prompt, str):
                raise ValueError(f"prompt_fn must return (prompt string, metadata), got a {type(prompt).__name__}")
        return self.make_prompts([p for p, _ in pairs], [m for _, m in pairs])

    def make_prompts(self, prompts: Any, metadata: list | None = None) -> Prompts:
        prompts = list(prompts)
        metadata = metadata if metadata is not None else [{} for _ in prompts]
        return Prompts(self.encode(prompts), prompts, prompts, metadata)

    def _alpha_bars(self, k: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_bar at step k's timestep and at the previous (less noisy) one, shaped to broadcast over ``like``;
        the last step's previous index is clamped to 0, as in ddpo-pytorch."""
        t = self.timesteps[k.cpu()]
        prev = (t - self.stride).clamp(min=0)
        shape = (-1,) + (1,) * (like.ndim - 1)
        a_t, a_prev = (self.alphas_cumprod[i].to(device=like.device, dtype=like.dtype).reshape(shape)
                       for i in (t, prev))
        return a_t, a_prev

    def noise_prediction(self, x: Tensor, k: Tensor, cond: Tensor) -> Tensor:
        """The guided eps (or v) prediction of the active U-Net at step k (per row) for conditioning ``cond``."""
        t = self.timesteps.to(x.device)[k]
        cond = cond.to(self.unet.dtype)
        if self.guidance_scale == 1.0:
            return self.active(x, t, encoder_hidden_states=cond).sample
        null = self.null_embed.to(cond.dtype).expand_as(cond)
        out = self.active(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([null, cond])).sample
        uncond, text = out.chunk(2)
        return uncond + self.guidance_scale * (text - uncond)

    def step(self, x: Tensor, k: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) of the DDIM step from the latent ``x`` at step k, computed in at least float32."""
        work = torch.promote_types(x.dtype, torch.float32)
        out, x = self.noise_prediction(x, k, cond).to(work), x.to(work)
        a_t, a_prev = self._alpha_bars(k, x)
        if self.v_prediction:
            x0, eps = a_t.sqrt() * x - (1 - a_t).sqrt() * out, a_t.sqrt() * out + (1 - a_t).sqrt() * x
        else:
            x0, eps = (x - (1 - a_t).sqrt() * out) / a_t.sqrt(), out
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = self.eta * variance.sqrt()
        mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp_min(0).sqrt() * eps
        return mean, std

    def log_prob(self, x: Tensor, x_next: Tensor, k: Tensor, cond: Tensor) -> Tensor:
        mean, std = self.step(x, k, cond)
        return mean_log_prob(x_next.to(mean.dtype), mean, std)

    @torch.no_grad()
    def sample(self, prompts: Prompts, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
        cond = prompts.cond
        x = torch.randn((len(cond), *self.latent_shape), generator=generator, device=cond.device, dtype=cond.dtype)
        latents, log_probs = [x], []
        for j in range(self.num_steps):
            k = torch.full((len(x),), j, dtype=torch.long, device=x.device)
            mean, std = self.step(x, k, cond)
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            x = (mean + std * noise).to(cond.dtype)
            latents.append(x)
            log_probs.append(mean_log_prob(x.to(mean.dtype), mean, std))
        return torch.stack(latents, 1), torch.stack(log_probs, 1), self.decode(x)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """VAE-decoded images in [0, 1] (float32) of final latents."""
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0.0, 1.0)

    def score(self, reward_fn: Callable, images: Tensor, prompts: Prompts) -> Any:
        return reward_fn(images, prompts.prompts, prompts.metadata)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        with _reference(self, self.unet):
            yield

    @property
    def active(self) -> nn.Module:
        return self.frozen if self.use_reference else self.unet
