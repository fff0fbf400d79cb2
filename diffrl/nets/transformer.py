"""Transformer denoisers over sequences, one token per time step: DiT-style (adaLN-zero conditioning) and the
causal condition-token transformer of Diffusion Policy."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from diffrl.nets.activations import Mish
from diffrl.nets.checks import check_shape
from diffrl.nets.embeddings import ConditionEncoder, SinusoidalTimeEmbedding, TimeCondEmbedding, broadcast_time


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention on tokens (B, N, d_model) via ``scaled_dot_product_attention``."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """Pre-norm attention and MLP sublayers whose norms are modulated (shift, scale) and whose outputs are
    gated by the conditioning vector; the modulation layer starts at zero so each block starts as identity
    (adaLN-zero, Peebles & Xie 2023)."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(d_model, heads)
        self.norm2 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        hidden = int(d_model * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d_model))
        self.modulation = nn.Linear(d_model, 6 * d_model)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, c_act: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c_act).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class DiT1D(nn.Module):
    """Denoiser ``(x_t (B, L, x_dim), t (B,), cond (B, cond_dim) | None) -> (B, L, x_dim)`` for ``L <= horizon``.

    Tokens are the time steps of the sequence, linearly embedded plus learned positional embeddings. The time
    and condition embeddings are summed into one vector that drives adaLN-zero in every block and in the final
    layer; the output projection starts at zero, so the untrained net predicts 0.
    """

    def __init__(
        self,
        x_dim: int,
        horizon: int,
        cond_dim: int = 0,
        d_model: int = 128,
        depth: int = 4,
        heads: int = 4,
        cond_drop_prob: float = 0.0,
    ):
        super().__init__()
        if x_dim <= 0 or horizon <= 0 or cond_dim < 0 or depth < 1:
            raise ValueError(f"invalid DiT1D: x_dim={x_dim}, horizon={horizon}, cond_dim={cond_dim}, depth={depth}")
        self.x_dim, self.horizon, self.cond_dim = x_dim, horizon, cond_dim
        self.x_shape = (horizon, x_dim)
        encoder = ConditionEncoder(cond_dim, d_model, hidden=d_model, drop_prob=cond_drop_prob) if cond_dim else None
        self.embed = TimeCondEmbedding(d_model, encoder)
        self.tokens = nn.Linear(x_dim, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(1, horizon, d_model))
        self.blocks = nn.ModuleList(DiTBlock(d_model, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, x_dim)
        for layer in (self.final_modulation, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        check_shape(x_t, (None, None, self.x_dim), "x_t")
        length = x_t.shape[1]
        if not torch.jit.is_tracing() and length > self.horizon:
            raise ValueError(f"sequence length {length} exceeds the horizon {self.horizon} of this DiT1D")
        c_act = F.silu(self.embed(t, cond, x_t.shape[0]))
        h = self.tokens(x_t) + self.pos[:, :length]
        for block in self.blocks:
            h = block(h, c_act)
        shift, scale = self.final_modulation(c_act).chunk(2, dim=1)
        return self.out(_modulate(self.final_norm(h), shift, scale))


class CausalTransformer1D(nn.Module):
    """Denoiser ``(x_t (B, L, x_dim), t (B,), cond (B, n_obs_steps * obs_dim) | None) -> (B, L, x_dim)``, the
    transformer of Chi et al. 2023 (``TransformerForDiffusion`` with time and observations as condition tokens).

    The condition tokens are the sinusoidal time features followed by one linear embedding per observation step,
    plus learned positions, passed through an MLP; the action tokens (linear embedding plus learned positions)
    go through a pre-norm transformer decoder that self-attends causally (token i sees tokens <= i) and
    cross-attends to the time token and the observations up to its own step (observation j is visible from
    action token j on). A final LayerNorm and a linear head give the prediction. Weights start as in the
    official code: normal(0, 0.02) for linear, attention and positional weights, zero biases.
    """

    def __init__(
        self,
        x_dim: int,
        horizon: int,
        cond_dim: int = 0,
        n_obs_steps: int = 1,
        d_model: int = 256,
        depth: int = 8,
        heads: int = 4,
        p_drop_emb: float = 0.0,
        p_drop_attn: float = 0.3,
        causal_attn: bool = True,
    ):
        super().__init__()
        if x_dim <= 0 or horizon <= 0 or cond_dim < 0 or depth < 1 or n_obs_steps < 1 or cond_dim % n_obs_steps:
            raise ValueError(f"invalid CausalTransformer1D: x_dim={x_dim}, horizon={horizon}, cond_dim={cond_dim}, "
                             f"n_obs_steps={n_obs_steps} (must divide cond_dim), depth={depth}")
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        self.x_dim, self.horizon, self.cond_dim, self.n_obs_steps = x_dim, horizon, cond_dim, n_obs_steps
        self.x_shape = (horizon, x_dim)
        n_cond = 1 + (n_obs_steps if cond_dim else 0)
        self.time = SinusoidalTimeEmbedding(d_model)
        self.obs_tokens = nn.Linear(cond_dim // n_obs_steps, d_model) if cond_dim else None
        self.cond_pos = nn.Parameter(torch.zeros(1, n_cond, d_model))
        self.cond_mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), Mish(), nn.Linear(4 * d_model, d_model))
        self.tokens = nn.Linear(x_dim, d_model)
        self.pos = nn.Parameter(torch.zeros(1, horizon, d_model))
        self.drop = nn.Dropout(p_drop_emb)
        layer = nn.TransformerDecoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=p_drop_attn,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, depth)
        self.final_norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, x_dim)
        steps = torch.arange(horizon)
        self.register_buffer("self_mask", steps[:, None] < steps[None, :] if causal_attn else None, persistent=False)
        cond_steps = torch.arange(n_cond)
        self.register_buffer("cond_mask", steps[:, None] < cond_steps[None, :] - 1 if causal_attn else None,
                             persistent=False)
        self.apply(_init_official)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.cond_pos, std=0.02)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        check_shape(x_t, (None, None, self.x_dim), "x_t")
        batch, length = x_t.shape[:2]
        if not torch.jit.is_tracing() and length > self.horizon:
            raise ValueError(f"sequence length {length} exceeds the horizon {self.horizon} of this transformer")
        time = self.time(broadcast_time(t, batch)).to(x_t.dtype)[:, None]
        if self.obs_tokens is not None:
            if cond is None:
                raise ValueError("this CausalTransformer1D is conditional: pass cond (B, n_obs_steps * obs_dim)")
            check_shape(cond, (batch, self.cond_dim), "cond")
            time = torch.cat([time, self.obs_tokens(cond.view(batch, self.n_obs_steps, -1))], dim=1)
        memory = self.cond_mlp(self.drop(time + self.cond_pos))
        h = self.drop(self.tokens(x_t) + self.pos[:, :length])
        masks = {}
        if self.self_mask is not None:
            masks = {"tgt_mask": self.self_mask[:length, :length], "memory_mask": self.cond_mask[:length]}
        return self.out(self.final_norm(self.decoder(h, memory, **masks)))


def _init_official(module: nn.Module) -> None:
    """normal(0, 0.02) weights and zero biases for linear and attention layers, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.MultiheadAttention):
        nn.init.normal_(module.in_proj_weight, std=0.02)
        nn.init.zeros_(module.in_proj_bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
