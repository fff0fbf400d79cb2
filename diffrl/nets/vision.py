"""Image observation encoders of Diffusion Policy (Chi et al. 2023; LeRobot's ``DiffusionRgbEncoder``).

A ResNet-18 whose BatchNorms are GroupNorms (``channels // 16`` groups), a spatial-softmax keypoint head
(Levine et al. 2016: the expected image coordinates of each of ``num_keypoints`` attention maps, in [-1, 1]) and
a linear layer with ReLU. Images are cropped first: a random crop per image in training mode, the centre crop in
evaluation mode. :class:`ObservationEncoder` encodes several cameras (one encoder each, or one shared) and
appends their features to the low-dimensional state.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def center_crop(images: Tensor, size: tuple[int, int]) -> Tensor:
    """The central ``size`` (h, w) window of images (..., C, H, W)."""
    h, w = size
    top, left = (images.shape[-2] - h) // 2, (images.shape[-1] - w) // 2
    return images[..., top:top + h, left:left + w]


def random_crop(images: Tensor, size: tuple[int, int], generator: torch.Generator | None = None) -> Tensor:
    """An independent, uniformly placed ``size`` (h, w) window of each image of a batch (N, C, H, W)."""
    n, _, height, width = images.shape
    h, w = size
    top = torch.randint(0, height - h + 1, (n, 1, 1), generator=generator, device=images.device)
    left = torch.randint(0, width - w + 1, (n, 1, 1), generator=generator, device=images.device)
    rows = top + torch.arange(h, device=images.device)[:, None]
    cols = left + torch.arange(w, device=images.device)[None, :]
    batch = torch.arange(n, device=images.device)[:, None, None]
    return images.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def group_norm16(channels: int) -> nn.GroupNorm:
    """The GroupNorm that replaces a BatchNorm of ``channels`` features: ``channels // 16`` groups (at least 1)."""
    return nn.GroupNorm(max(channels // 16, 1), channels)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with GroupNorm, ReLU and a (strided 1x1) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = group_norm16(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = group_norm16(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), group_norm16(c_out))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(h)) + self.shortcut(x))


class ResNet18GN(nn.Module):
    """ResNet-18 feature extractor (no pooling or classifier) with GroupNorm: (N, C, H, W) -> (N, 8 width, H', W').

    ``width`` is the first stage's channel count (64 in ResNet-18); H' = H / 32 rounded up.
    """

    def __init__(self, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), group_norm16(width), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        widths = [width * 2**i for i in range(4)]
        self.stages = nn.Sequential(*(
            nn.Sequential(BasicBlock(widths[max(i - 1, 0)], c, 1 if i == 0 else 2), BasicBlock(c, c, 1))
            for i, c in enumerate(widths)))
        self.out_channels = widths[-1]
        for module in self.modules():  # torchvision's ResNet initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def feature_size(size: int) -> int:
        """Height (or width) of the feature map for an input of ``size`` pixels (five stride-2 layers)."""
        for _ in range(5):
            size = (size + 1) // 2
        return size

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))


class SpatialSoftmax(nn.Module):
    """Keypoints of a feature map: (N, C, H, W) -> (N, K, 2), the (x, y) expectation of the softmax over the
    positions of each of K maps (a 1x1 convolution makes K maps from C channels); coordinates lie in [-1, 1]."""

    def __init__(self, in_channels: int, height: int, width: int, num_keypoints: int):
        super().__init__()
        self.maps = nn.Conv2d(in_channels, num_keypoints, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1.0, 1.0, height), torch.linspace(-1.0, 1.0, width), indexing="ij")
        self.register_buffer("grid", torch.stack([xs.flatten(), ys.flatten()], dim=1))  # (H W, 2)

    def forward(self, features: Tensor) -> Tensor:
        attention = F.softmax(self.maps(features).flatten(2), dim=-1)  # (N, K, H W)
        return attention @ self.grid


class ImageEncoder(nn.Module):
    """One camera's images (N, C, H, W) with values in [-1, 1] -> features (N, 2 num_keypoints): crop, ResNet-18
    with GroupNorm, spatial softmax, linear, ReLU."""

    def __init__(self, in_channels: int, crop_shape: tuple[int, int], num_keypoints: int = 32, width: int = 64):
        super().__init__()
        self.crop_shape = tuple(crop_shape)
        self.backbone = ResNet18GN(in_channels, width)
        fh, fw = (ResNet18GN.feature_size(s) for s in self.crop_shape)
        if fh * fw < 2:
            raise ValueError(f"crops of {self.crop_shape} pixels leave a 1x1 feature map after ResNet-18's stride of "
                             "32, so the keypoints could not depend on the image; crop at least 33 pixels on a side")
        self.keypoints = SpatialSoftmax(self.backbone.out_channels, fh, fw, num_keypoints)
        self.feature_dim = 2 * num_keypoints
        self.out = nn.Linear(self.feature_dim, self.feature_dim)

    def crop(self, images: Tensor) -> Tensor:
        """A random crop per image in training mode, the centre crop in evaluation mode."""
        if images.shape[-2] < self.crop_shape[0] or images.shape[-1] < self.crop_shape[1]:
            raise ValueError(f"images of size {tuple(images.shape[-2:])} are smaller than the crop {self.crop_shape}")
        return random_crop(images, self.crop_shape) if self.training else center_crop(images, self.crop_shape)

    def forward(self, images: Tensor) -> Tensor:
        return F.relu(self.out(self.keypoints(self.backbone(self.crop(images))).flatten(1)))


class ObservationEncoder(nn.Module):
    """Flat observations (N, state_dim + cameras * C * H * W) -> (N, state_dim + cameras * 2 num_keypoints).

    The flat layout is the state first, then each camera's image (C, H, W) flattened; each camera's features
    come from its own :class:`ImageEncoder`, or from one encoder for all with ``shared=True``.
    """

    def __init__(self, state_dim: int, cameras: int, image_shape: tuple[int, int, int], crop_shape: tuple[int, int],
                 num_keypoints: int = 32, width: int = 64, shared: bool = False):
        super().__init__()
        if state_dim < 0 or cameras < 1 or len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"invalid ObservationEncoder: state_dim={state_dim}, cameras={cameras}, "
                             f"image_shape={image_shape}")
        self.state_dim, self.cameras, self.image_shape = state_dim, cameras, tuple(image_shape)
        self.encoders = nn.ModuleList(ImageEncoder(image_shape[0], crop_shape, num_keypoints, width)
                                      for _ in range(1 if shared else cameras))
        self.in_dim = state_dim + cameras * math.prod(image_shape)
        self.feature_dim = state_dim + cameras * self.encoders[0].feature_dim

    def forward(self, obs: Tensor) -> Tensor:
        if obs.shape[-1] != self.in_dim:
            raise ValueError(f"observations must have {self.in_dim} features (state {self.state_dim} + "
                             f"{self.cameras} x {self.image_shape} pixels), got {obs.shape[-1]}")
        n = obs.shape[0]
        images = obs[:, self.state_dim:].reshape(n, self.cameras, *self.image_shape)
        if len(self.encoders) == 1:
            features = self.encoders[0](images.flatten(0, 1)).view(n, -1)
        else:
            features = torch.cat([enc(images[:, i]) for i, enc in enumerate(self.encoders)], dim=1)
        return torch.cat([obs[:, : self.state_dim], features], dim=1)
