"""The small image task DDPO runs on without downloads: scikit-learn's 8x8 digits upsampled to 16x16 in [-1, 1].

It holds the data loader, the class-conditional image diffusion model's configuration (with checkpoint save/load)
and a small digit classifier whose confidence serves as a reward.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from diffrl.checkpoint import load_checkpoint, save_checkpoint
from diffrl.model import DiffusionModel
from diffrl.nets.unet2d import UNet2D
from diffrl.schedules import DiscreteVP

IMAGE_MODEL_KIND = "image_model"
CLASSIFIER_KIND = "digit_classifier"


def load_digit_images(image_size: int = 16) -> tuple[Tensor, Tensor]:
    """All 1,797 scikit-learn digits as float images (N, 1, image_size, image_size) in [-1, 1] and labels (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # pixel values 0..16
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp(0.0, 1.0) * 2.0 - 1.0, torch.as_tensor(digits.target, dtype=torch.long)


@dataclass
class ImageModelConfig:
    """A class-conditional ``UNet2D`` eps-denoiser on a discrete VP chain (``schedule``: "cosine" or "linear")."""

    in_channels: int = 1
    image_size: int = 16
    base_channels: int = 16
    channel_mults: tuple[int, ...] = (1, 2)
    num_classes: int = 10
    attention_heads: int = 0
    cond_drop_prob: float = 0.1
    schedule: str = "cosine"
    num_train_steps: int = 1000

    def build(self) -> DiffusionModel:
        schedules = {"cosine": DiscreteVP.cosine, "linear": DiscreteVP.linear}
        if self.schedule not in schedules:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {sorted(schedules)}")
        net = UNet2D(self.in_channels, self.base_channels, tuple(self.channel_mults), self.num_classes,
                     self.cond_drop_prob, self.image_size, self.attention_heads)
        return DiffusionModel(net, schedules[self.schedule](self.num_train_steps), "eps", clip_x0=1.0)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)


def save_image_model(path: str | os.PathLike, model: DiffusionModel, config: ImageModelConfig) -> Path:
    """Write the denoiser weights with the configuration that rebuilds them."""
    return save_checkpoint(path, {"config": asdict(config), "denoiser": model.denoiser.state_dict()}, IMAGE_MODEL_KIND)


def load_image_model(path: str | os.PathLike) -> tuple[DiffusionModel, ImageModelConfig]:
    """Rebuild a model saved by :func:`save_image_model` (in eval mode)."""
    payload = load_checkpoint(path, IMAGE_MODEL_KIND)
    config = ImageModelConfig(**payload["config"])
    model = config.build()
    model.denoiser.load_state_dict(payload["denoiser"])
    return model.eval(), config


class DigitClassifier(nn.Module):
    """Small CNN: images (B, 1, 16, 16) in [-1, 1] -> logits (B, num_classes)."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.num_classes, self.width = num_classes, width
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.GELU(), nn.Linear(128, num_classes),
        )

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[1:] != (1, 16, 16):
            raise ValueError(f"DigitClassifier expects images (B, 1, 16, 16), got {tuple(images.shape)}")
        return self.net(images)


def save_classifier(path: str | os.PathLike, classifier: DigitClassifier) -> Path:
    config = {"num_classes": classifier.num_classes, "width": classifier.width}
    return save_checkpoint(path, {"config": config, "state_dict": classifier.state_dict()}, CLASSIFIER_KIND)


def load_classifier(path: str | os.PathLike) -> DigitClassifier:
    payload = load_checkpoint(path, CLASSIFIER_KIND)
    classifier = DigitClassifier(**payload["config"])
    classifier.load_state_dict(payload["state_dict"])
    return classifier.eval()
