"""Rewards over image batches: the "environment" of the denoising MDP used by DDPO.

Every reward is called as ``reward(images, prompts=None, metadata=None) -> torch.Tensor (B,)`` (float32, on the
images' device), as ddpo-pytorch's reward functions; ``prompts`` are class ids for the package's image model.
``images`` is a float tensor (B, C, H, W) with C = 1 or 3; by default pixel values are in [0, 1] (VAE-decoded
pipeline images). Pass ``value_range=(-1, 1)`` for images in [-1, 1] (the usual diffusion-model range). Images of
another layout or with values outside the range are refused with a one-line ``ValueError``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ValueRange = tuple[float, float]
RewardFn = Callable[..., torch.Tensor]


def to_unit_range(images: torch.Tensor, value_range: ValueRange = (0.0, 1.0)) -> torch.Tensor:
    """Map images from ``value_range`` to [0, 1]; checks the (B, C, H, W) layout, the dtype and the values."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (B, C, H, W) with C in (1, 3), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor with values in {value_range}, got {images.dtype}")
    lo, hi = value_range
    low, high = images.min().item(), images.max().item()
    slack = 1e-3 * (hi - lo)
    if not (low >= lo - slack and high <= hi + slack):  # also refuses NaN
        raise ValueError(f"image values must lie in [{lo:g}, {hi:g}] (value_range), got values in [{low:.4g}, "
                         f"{high:.4g}]")
    return ((images.float() - lo) / (hi - lo)).clamp(0.0, 1.0)


def to_uint8(images: torch.Tensor, value_range: ValueRange = (0.0, 1.0)) -> np.ndarray:
    """(B, H, W, C) uint8 array for PIL."""
    unit = to_unit_range(images, value_range)
    return (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def jpeg_size_kb(images: torch.Tensor, quality: int = 95, value_range: ValueRange = (0.0, 1.0)) -> torch.Tensor:
    """Size in kB of each image JPEG-encoded with PIL at ``quality``."""
    sizes = []
    for img in to_uint8(images, value_range):
        buffer = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def jpeg_compressibility(images: torch.Tensor, prompts=None, metadata=None, *, quality: int = 95,
                         value_range: ValueRange = (0.0, 1.0)) -> torch.Tensor:
    """Negative JPEG size in kB: higher for images that compress well."""
    return -jpeg_size_kb(images, quality, value_range)


def jpeg_incompressibility(images: torch.Tensor, prompts=None, metadata=None, *, quality: int = 95,
                           value_range: ValueRange = (0.0, 1.0)) -> torch.Tensor:
    """JPEG size in kB: higher for detailed, hard-to-compress images."""
    return jpeg_size_kb(images, quality, value_range)


def brightness(images: torch.Tensor, prompts=None, metadata=None, *,
               value_range: ValueRange = (0.0, 1.0)) -> torch.Tensor:
    """Mean pixel value in [0, 1]."""
    return to_unit_range(images, value_range).mean(dim=(1, 2, 3))


class ClassifierReward:
    """Log-probability (or probability) that a torch classifier assigns to a class.

    ``classifier(images) -> logits (B, K)`` receives images in the range it expects: ``classifier_range``
    (default: the same as the input ``value_range``). The class is ``target_class``, or per image the
    ``classes`` passed at call time (e.g. the prompt labels of a class-conditional model).
    """

    def __init__(self, classifier: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
                 target_class: int | None = None, log_prob: bool = True, value_range: ValueRange = (0.0, 1.0),
                 classifier_range: ValueRange | None = None) -> None:
        self.classifier, self.target_class, self.log_prob = classifier, target_class, log_prob
        self.value_range, self.classifier_range = value_range, classifier_range or value_range

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, classes: torch.Tensor | None = None, metadata=None) -> torch.Tensor:
        unit = to_unit_range(images, self.value_range)
        lo, hi = self.classifier_range
        logits = self.classifier(unit * (hi - lo) + lo)
        if classes is None:
            if self.target_class is None:
                raise ValueError("ClassifierReward needs target_class or per-image classes")
            classes = torch.full((len(images),), self.target_class, dtype=torch.long)
        classes = torch.as_tensor(classes, dtype=torch.long, device=logits.device).reshape(-1)
        log_p = torch.log_softmax(logits.float(), dim=-1).gather(1, classes[:, None])[:, 0]
        return log_p if self.log_prob else log_p.exp()


def reward_from_fn(fn: Callable[..., object]) -> RewardFn:
    """Adapt any ``fn(images, prompts, metadata) -> rewards`` (list, array or tensor of B numbers) to the reward
    protocol."""

    def reward(images: torch.Tensor, prompts=None, metadata=None) -> torch.Tensor:
        out = fn(images, prompts, metadata)
        values = torch.as_tensor(np.asarray(out.detach().cpu() if isinstance(out, torch.Tensor) else out),
                                  dtype=torch.float32).reshape(-1)
        if len(values) != len(images):
            raise ValueError(f"reward function {getattr(fn, '__name__', fn)!r} returned {len(values)} values "
                             f"for {len(images)} images")
        return values.to(images.device)

    return reward


#: Per-channel mean and std of the images CLIP was trained on (OpenAI CLIP's preprocessing).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: The "improved-aesthetic-predictor" head (LAION): five linear layers with dropout between the first four and
#: no activation; the indices are those of its ``layers`` Sequential (dropout at 1, 3, 5).
AESTHETIC_LINEARS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")
AESTHETIC_WIDTHS = (768, 1024, 128, 64, 16, 1)


def _short(err: BaseException) -> str:
    """An error's message on one line, cut to 200 characters, for the one-line errors about model files."""
    return " ".join(str(err).split())[:200]


def clip_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP's input from images in [0, 1]: shorter side resized to ``size`` (bicubic, antialiased), centre crop
    ``size`` x ``size``, per-channel normalisation; grey images are repeated over three channels."""
    images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    h, w = images.shape[2:]
    if min(h, w) != size:
        scale = size / min(h, w)
        shape = (max(size, round(h * scale)), max(size, round(w * scale)))
        images = torch.nn.functional.interpolate(images, size=shape, mode="bicubic", antialias=True,
                                                 align_corners=False)
    top, left = (images.shape[2] - size) // 2, (images.shape[3] - size) // 2
    images = images[:, :, top:top + size, left:left + size]
    mean, std = (torch.tensor(v, dtype=images.dtype, device=images.device).reshape(1, 3, 1, 1)
                 for v in (CLIP_MEAN, CLIP_STD))
    return (images - mean) / std


def load_aesthetic_head(path: str | Path) -> torch.nn.Sequential:
    """The aesthetic MLP from a state dict (``.safetensors``, or a torch file read with ``weights_only=True``: no
    code from the file runs) in the improved-aesthetic-predictor layout; the input width is taken from the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"aesthetic head file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file or one that would run code: named, never a traceback
        raise ValueError(f"aesthetic head file {path} cannot be read as a state dict: "
                         f"{_short(err)}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    names = [f"{layer}.{p}" for layer in AESTHETIC_LINEARS for p in ("weight", "bias")]
    if not isinstance(state, dict) or any(not isinstance(state.get(n), torch.Tensor) for n in names):
        raise ValueError(f"aesthetic head file {path} is not an improved-aesthetic-predictor state dict (needs "
                         f"{', '.join(names[::2])} weights and biases)")
    widths = (state["layers.0.weight"].shape[1], *AESTHETIC_WIDTHS[1:])
    layers: list[torch.nn.Module] = []
    for n, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(torch.nn.Linear(fan_in, fan_out))
        if n < 3:
            layers.append(torch.nn.Dropout(0.2 if n < 2 else 0.1))
    head = torch.nn.Sequential(*layers)
    try:
        head.load_state_dict({n.removeprefix("layers."): state[n] for n in names})
    except RuntimeError as err:
        raise ValueError(f"aesthetic head file {path} has the wrong layer sizes for widths {widths}: "
                         f"{_short(err)}") from None
    return head.eval().requires_grad_(False)


class AestheticReward:
    """A LAION-style aesthetic score: the MLP head of the improved-aesthetic-predictor on the L2-normalised CLIP
    image embedding, as ddpo-pytorch's aesthetic reward (CLIP ViT-L/14, 768-dimensional embeddings).

    ``clip_path`` is a local folder holding a CLIP model saved by transformers (``CLIPModel`` or
    ``CLIPVisionModelWithProjection``); ``head_path`` the head's state dict. No weights ship with diffrl.
    Called as every reward, on images in ``value_range``; the scores are float32 on the images' device.
    """

    def __init__(self, clip_path: str | Path, head_path: str | Path, device: str | torch.device = "cpu",
                 value_range: ValueRange = (0.0, 1.0)) -> None:
        from transformers import CLIPVisionModelWithProjection

        clip_path = Path(clip_path)
        if not (clip_path / "config.json").is_file():
            raise ValueError(f"aesthetic CLIP model folder {clip_path} has no config.json (a CLIP model saved "
                             "with save_pretrained is needed)")
        try:
            self.clip = CLIPVisionModelWithProjection.from_pretrained(str(clip_path))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"aesthetic CLIP model folder {clip_path} does not load as a CLIP vision model: "
                             f"{_short(err)}") from None
        self.head = load_aesthetic_head(head_path)
        width = self.head[0].in_features
        if width != self.clip.config.projection_dim:
            raise ValueError(f"aesthetic head {head_path} takes {width}-dimensional embeddings but the CLIP model "
                             f"in {clip_path} makes {self.clip.config.projection_dim}-dimensional ones")
        self.value_range = value_range
        self.to(device)

    def to(self, device: str | torch.device) -> AestheticReward:
        self.clip = self.clip.to(device).eval().requires_grad_(False)
        self.head = self.head.to(device)
        return self

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings (B, D) of images in ``value_range``."""
        unit = to_unit_range(images, self.value_range)
        param = next(self.clip.parameters())
        pixels = clip_preprocess(unit.to(device=param.device, dtype=param.dtype), self.clip.config.image_size)
        embeds = self.clip(pixel_values=pixels).image_embeds.float()
        return embeds / embeds.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts=None, metadata=None) -> torch.Tensor:
        return self.head(self.embed(images))[:, 0].to(images.device)


#: Rewards known by name (``diffrl train ddpo --reward NAME``).
REWARD_NAMES = ("jpeg_compressibility", "jpeg_incompressibility", "aesthetic")


def reward_by_name(name: str, clip_path: str | Path | None = None, head_path: str | Path | None = None,
                   device: str | torch.device = "cpu") -> RewardFn:
    """The reward called ``name`` (one of :data:`REWARD_NAMES`) on images in [0, 1]; ``aesthetic`` needs the
    local ``clip_path`` and ``head_path`` of :class:`AestheticReward`."""
    if name == "jpeg_compressibility":
        return jpeg_compressibility
    if name == "jpeg_incompressibility":
        return jpeg_incompressibility
    if name == "aesthetic":
        if clip_path is None or head_path is None:
            raise ValueError("the aesthetic reward needs a local CLIP model folder and head file (--clip-model, "
                             "--aesthetic-head)")
        return AestheticReward(clip_path, head_path, device)
    raise ValueError(f"unknown reward {name!r}: one of {', '.join(REWARD_NAMES)}")
