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
