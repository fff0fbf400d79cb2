"""Chi et al.'s conditional temporal U-Net (diffrl.nets.chi_unet1d) and its use as Diffusion Policy's default."""

import pytest
import torch

from agents.diffusion_policy import DiffusionPolicy, DiffusionPolicyConfig
from diffrl.nets.chi_unet1d import ChiUNet1D


def test_parameter_count_is_the_official_networks():
    # real-stanford/diffusion_policy ConditionalUnet1D(input_dim=2, global_cond_dim=40, diffusion_step_embed_dim=256,
    # down_dims=[256, 512, 1024], kernel_size=5, n_groups=8, cond_predict_scale=True) logs 65,783,298 parameters
    net = ChiUNet1D(2, 16, 40, dims=(256, 512, 1024), kernel_size=5, time_dim=256)
    assert sum(p.numel() for p in net.parameters()) == 65_783_298


def test_shapes_time_features_and_float64():
    net = ChiUNet1D(3, 8, 4, dims=(8, 16), kernel_size=3, time_dim=8, num_train_steps=100).double()
    seen = []
    net.time[0].register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    x, cond = torch.randn(5, 8, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    t = torch.tensor([1, 2, 50, 99, 100], dtype=torch.float64) / 100
    out = net(x, t, cond)
    assert out.shape == (5, 8, 3) and out.dtype == torch.float64
    torch.testing.assert_close(seen[0], torch.tensor([0.0, 1.0, 49.0, 98.0, 99.0], dtype=torch.float64))


def test_every_parameter_learns_and_the_loss_falls():
    torch.manual_seed(0)
    net = ChiUNet1D(2, 8, 3, dims=(8, 16, 32), kernel_size=3, time_dim=8)
    x, t, cond = torch.randn(16, 8, 2), torch.rand(16), torch.randn(16, 3)
    target = torch.randn(16, 8, 2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = (net(x, t, cond) - target).square().mean()
        loss.backward()
        if not losses:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


def test_bad_horizon_and_missing_condition_are_refused():
    with pytest.raises(ValueError, match="multiple of 4"):
        ChiUNet1D(2, 10, 3, dims=(8, 16, 32))
    with pytest.raises(ValueError, match="no condition"):
        ChiUNet1D(2, 8, 3, dims=(8, 16))(torch.randn(1, 8, 2), torch.rand(1))


def test_diffusion_policy_defaults_to_it():
    agent = DiffusionPolicy(DiffusionPolicyConfig(dims=(8, 16), time_dim=8, total_steps=10, warmup_steps=0), 3, 2)
    assert isinstance(agent.actor.model.denoiser, ChiUNet1D)
    assert agent.actor.model.denoiser.num_train_steps == 100
    policy = agent.policy(seed=0)
    assert policy.act(torch.zeros(3).numpy()).shape == (2,)
