"""Small class-conditional image U-Net (the package's own image model for DDPO)."""

from __future__ import annotations

from torch import Tensor, nn

from diffrl.nets.checks import check_shape
from diffrl.nets.conv_unet import UNetCore
from diffrl.nets.embeddings import ClassEmbedding, TimeCondEmbedding


class UNet2D(nn.Module):
    """Denoiser ``(x_t (B, C, S, S), t (B,), cond (B,) class ids | None) -> (B, C, S, S)``.

    Level ``i`` has ``base_channels * channel_mults[i]`` channels and half the resolution of level ``i - 1``;
    the bottleneck has self-attention when ``attention_heads > 0``. With ``num_classes > 0`` the class
    embedding (null class for ``cond=None`` and for dropped labels) is added to the time embedding.
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 32,
        channel_mults: tuple[int, ...] = (1, 2),
        num_classes: int = 0,
        cond_drop_prob: float = 0.0,
        image_size: int = 16,
        attention_heads: int = 4,
        kernel_size: int = 3,
    ):
        super().__init__()
        if in_channels <= 0 or base_channels <= 0 or image_size <= 0 or num_classes < 0 or not channel_mults:
            raise ValueError(
                f"invalid UNet2D: in_channels={in_channels}, base_channels={base_channels}, "
                f"channel_mults={channel_mults}, num_classes={num_classes}, image_size={image_size}"
            )
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.x_shape = (in_channels, image_size, image_size)
        emb_dim = 4 * base_channels
        encoder = ClassEmbedding(num_classes, emb_dim, cond_drop_prob) if num_classes else None
        self.embed = TimeCondEmbedding(emb_dim, encoder)
        dims = tuple(base_channels * m for m in channel_mults)
        self.unet = UNetCore(in_channels, in_channels, dims, emb_dim, nd=2, kernel_size=kernel_size,
                             attention_heads=attention_heads)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        check_shape(x_t, (None, self.in_channels, None, None), "x_t")
        return self.unet(x_t, self.embed(t, cond, x_t.shape[0]))
