"""Chi et al.'s conditional temporal U-Net (Diffusion Policy, 2023), in the layout of the official
``ConditionalUnet1D`` with FiLM scale and bias (``cond_predict_scale=True``, the paper's configs)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffrl.nets.activations import Mish, mish
from diffrl.nets.checks import check_shape
from diffrl.nets.conv_unet import ConvBlock, ResBlock
from diffrl.nets.embeddings import SinusoidalTimeEmbedding, broadcast_time


class ChiUNet1D(nn.Module):
    """Denoiser ``(x_t (B, horizon, x_dim), t (B,), cond (B, cond_dim) | None) -> (B, horizon, x_dim)``.

    Differs from :class:`~diffrl.nets.unet1d.TemporalUNet1D` where the official network does: the condition is
    concatenated to the time features (no condition MLP) and every residual block maps them to a FiLM scale and bias
    (``h * scale + bias``); the time MLP is ``dim -> 4 dim -> dim``; a skip is kept after every level, the last two
    are consumed by the decoder, which upsamples after its residual blocks. The time features are those of the
    official integer step ``n - 1`` of diffrl's time ``t = n / num_train_steps``. ``horizon`` must be a multiple of
    ``2 ** (len(dims) - 1)``, as in the official code.
    """

    def __init__(self, x_dim: int, horizon: int, cond_dim: int = 0, dims: tuple[int, ...] = (256, 512, 1024),
                 kernel_size: int = 5, time_dim: int = 256, num_train_steps: int = 100):
        super().__init__()
        multiple = 2 ** (len(dims) - 1)
        if x_dim <= 0 or horizon <= 0 or cond_dim < 0 or len(dims) < 2 or horizon % multiple:
            raise ValueError(f"invalid ChiUNet1D: x_dim={x_dim}, horizon={horizon} (a multiple of {multiple} for "
                             f"dims {tuple(dims)}, at least two levels), cond_dim={cond_dim}")
        self.x_dim, self.horizon, self.cond_dim, self.num_train_steps = x_dim, horizon, cond_dim, num_train_steps
        self.x_shape = (horizon, x_dim)
        self.time = nn.Sequential(SinusoidalTimeEmbedding(time_dim, scale=1.0), nn.Linear(time_dim, 4 * time_dim),
                                  Mish(), nn.Linear(4 * time_dim, time_dim))
        emb = time_dim + cond_dim

        def block(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, emb, nd=1, kernel_size=kernel_size, scale_offset=0.0)

        chans = (x_dim, *dims)
        self.down = nn.ModuleList(nn.ModuleList([block(a, b), block(b, b)])
                                  for a, b in zip(chans[:-1], chans[1:], strict=True))
        self.downsample = nn.ModuleList(nn.Conv1d(c, c, 3, stride=2, padding=1) for c in dims[:-1])
        self.mid = nn.ModuleList([block(dims[-1], dims[-1]), block(dims[-1], dims[-1])])
        lows = tuple(reversed(dims[:-1]))
        self.up = nn.ModuleList(nn.ModuleList([block(2 * hi, lo), block(lo, lo)])
                                for hi, lo in zip(reversed(dims[1:]), lows, strict=True))
        self.upsample = nn.ModuleList(nn.ConvTranspose1d(c, c, 4, stride=2, padding=1) for c in lows)
        self.head = nn.Sequential(ConvBlock(dims[0], dims[0], 1, kernel_size), nn.Conv1d(dims[0], x_dim, 1))

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        check_shape(x_t, (None, self.horizon, self.x_dim), "x_t")
        batch = x_t.shape[0]
        emb = self.time(broadcast_time(t, batch) * self.num_train_steps - 1.0)
        if self.cond_dim:
            if cond is None:
                raise ValueError(f"ChiUNet1D was built with cond_dim={self.cond_dim} but got no condition")
            emb = torch.cat([emb, cond.reshape(batch, -1).to(emb.dtype)], dim=1)
        emb_act = mish(emb)
        x, skips = x_t.transpose(1, 2), []
        for i, (res1, res2) in enumerate(self.down):
            x = res2(res1(x, emb_act), emb_act)
            skips.append(x)
            if i < len(self.downsample):
                x = self.downsample[i](x)
        for res in self.mid:
            x = res(x, emb_act)
        for (res1, res2), upsample in zip(self.up, self.upsample, strict=True):
            x = upsample(res2(res1(torch.cat([x, skips.pop()], dim=1), emb_act), emb_act))
        return self.head(x).transpose(1, 2)
