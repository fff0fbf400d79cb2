"""Denoiser backbones: shapes, conditioning semantics, tracing, determinism and trainability."""

from __future__ import annotations

import math

import pytest
import torch

from diffrl.nets import (
    ClassEmbedding,
    ConditionEncoder,
    DiT1D,
    FourierTimeEmbedding,
    ResidualMLP,
    SinusoidalTimeEmbedding,
    TemporalUNet1D,
    TemporalValueNet1D,
    UNet2D,
)

B = 6
X_DIM, COND_DIM, HORIZON, CLASSES = 3, 4, 12, 5

# name -> (constructor taking cond_drop_prob, sample shape, output shape, condition sampler)
SPECS = {
    "mlp": (
        lambda p: ResidualMLP(X_DIM, COND_DIM, hidden=32, depth=3, cond_drop_prob=p),
        (X_DIM,), (X_DIM,), lambda n: torch.randn(n, COND_DIM),
    ),
    "mlp_ln": (
        lambda p: ResidualMLP(X_DIM, COND_DIM, hidden=32, depth=4, cond_drop_prob=p, layer_norm=True,
                              activation="relu"),
        (X_DIM,), (X_DIM,), lambda n: torch.randn(n, COND_DIM),
    ),
    "unet1d": (
        lambda p: TemporalUNet1D(X_DIM, HORIZON, COND_DIM, dims=(8, 16, 32), time_dim=16, cond_drop_prob=p),
        (HORIZON, X_DIM), (HORIZON, X_DIM), lambda n: torch.randn(n, COND_DIM),
    ),
    "value1d": (
        lambda p: TemporalValueNet1D(X_DIM, HORIZON, (8, 16), COND_DIM, time_dim=16, hidden=32, cond_drop_prob=p),
        (HORIZON, X_DIM), (), lambda n: torch.randn(n, COND_DIM),
    ),
    "dit": (
        lambda p: DiT1D(X_DIM, HORIZON, COND_DIM, d_model=32, depth=2, heads=4, cond_drop_prob=p),
        (HORIZON, X_DIM), (HORIZON, X_DIM), lambda n: torch.randn(n, COND_DIM),
    ),
    "unet2d": (
        lambda p: UNet2D(1, 8, (1, 2), num_classes=CLASSES, cond_drop_prob=p, image_size=8),
        (1, 8, 8), (1, 8, 8), lambda n: torch.randint(0, CLASSES, (n,)),
    ),
}
NAMES = list(SPECS)


def make(name: str, drop: float = 0.0, seed: int = 0, nondegenerate: bool = True) -> torch.nn.Module:
    """Build a net under a seed; zero-initialised tensors (adaLN-zero, null embeddings) get small random values
    so that outputs depend on every input, as they do after training."""
    torch.manual_seed(seed)
    net = SPECS[name][0](drop)
    if nondegenerate:
        with torch.no_grad():
            for p in net.parameters():
                if not p.any():
                    p.normal_(0.0, 0.1)
    return net


def inputs(name: str, n: int = B, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SPECS[name][1], generator=g)
    t = torch.rand(n, generator=g)
    torch.manual_seed(seed)
    return x, t, SPECS[name][3](n)


# ---------------------------------------------------------------- embeddings


def test_sinusoidal_embedding_matches_formula():
    emb = SinusoidalTimeEmbedding(6, scale=2.0)
    t = torch.tensor([0.0, 0.3, 1.0])
    freqs = torch.tensor([1.0, 0.01, 1e-4])  # 10000^(-i/(half-1)) for half = 3
    args = 2.0 * t[:, None] * freqs
    expected = torch.cat([args.sin(), args.cos()], dim=1)
    torch.testing.assert_close(emb(t), expected)
    assert emb.state_dict() == {}  # derived from the constructor arguments, nothing to save


def test_fourier_embedding_is_fixed_saved_and_unit_norm_per_pair():
    torch.manual_seed(0)
    emb = FourierTimeEmbedding(8, std=4.0)
    t = torch.rand(5)
    out = emb(t)
    assert out.shape == (5, 8)
    torch.testing.assert_close(out[:, :4] ** 2 + out[:, 4:] ** 2, torch.ones(5, 4))
    torch.manual_seed(1)
    other = FourierTimeEmbedding(8, std=4.0)
    assert not torch.allclose(other(t), out)
    other.load_state_dict(emb.state_dict())
    torch.testing.assert_close(other(t), out)
    assert not any(p.requires_grad for p in emb.parameters())


@pytest.mark.parametrize("cls", [SinusoidalTimeEmbedding, FourierTimeEmbedding])
def test_time_embedding_rejects_odd_dim(cls):
    with pytest.raises(ValueError, match="even dim"):
        cls(7)


def test_condition_encoder_null_and_dropout():
    torch.manual_seed(0)
    enc = ConditionEncoder(3, 8, hidden=16, drop_prob=0.5)
    cond = torch.randn(200, 3)
    null = enc(None, 200)
    assert null.shape == (200, 8) and torch.equal(null, enc.null.null.expand(200, 8))
    enc.eval()
    clean = enc(cond, 200)
    assert not torch.isclose(clean, null).all(dim=1).any()
    enc.train()
    dropped = enc(cond, 200)
    is_null = torch.isclose(dropped, null).all(dim=1)
    is_clean = torch.isclose(dropped, clean).all(dim=1)
    assert torch.all(is_null ^ is_clean)
    assert 60 < is_null.sum() < 140  # Binomial(200, 0.5): mean 100, sd 7
    with pytest.raises(ValueError, match=r"cond must have shape \(200, 3\)"):
        enc(torch.randn(200, 2), 200)


def test_class_embedding_null_dropout_and_bad_labels():
    torch.manual_seed(0)
    emb = ClassEmbedding(4, 6, drop_prob=1.0)
    labels = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(emb(labels, 4), emb(None, 4))
    emb.eval()
    torch.testing.assert_close(emb(labels, 4), emb.table.weight)
    with pytest.raises(ValueError, match="integer"):
        emb(labels.float(), 4)
    with pytest.raises(ValueError, match="drop probability"):
        ClassEmbedding(4, 6, drop_prob=1.5)


# ---------------------------------------------------------------- shapes and input checks


@pytest.mark.parametrize("horizon", [4, 5, 12, 33, 128])
@pytest.mark.parametrize("cls", [TemporalUNet1D, DiT1D, TemporalValueNet1D])
def test_sequence_nets_any_horizon(cls, horizon):
    torch.manual_seed(0)
    kwargs = {"d_model": 32, "depth": 1} if cls is DiT1D else {"dims": (8, 16, 32)}
    net = cls(X_DIM, horizon, cond_dim=COND_DIM, **kwargs)
    x, t, c = torch.randn(2, horizon, X_DIM), torch.rand(2), torch.randn(2, COND_DIM)
    expected = (2,) if cls is TemporalValueNet1D else (2, horizon, X_DIM)
    assert net(x, t, c).shape == expected
    assert net(x, t).shape == expected
    assert net.x_shape == (horizon, X_DIM)


@pytest.mark.parametrize("size", [8, 15, 16, 32])
def test_unet2d_image_sizes(size):
    torch.manual_seed(0)
    net = UNet2D(in_channels=2, base_channels=8, channel_mults=(1, 2, 2), num_classes=3, image_size=size)
    x = torch.randn(2, 2, size, size)
    assert net(x, torch.rand(2), torch.tensor([0, 2])).shape == x.shape
    assert net(x, torch.rand(2)).shape == x.shape
    assert net.x_shape == (2, size, size)


@pytest.mark.parametrize("batch", [1, 7])
def test_mlp_batch_sizes_and_scalar_time(batch):
    net = make("mlp").eval()
    x, t, c = inputs("mlp", batch)
    assert net(x, t, c).shape == (batch, X_DIM)
    torch.testing.assert_close(net(x, torch.tensor(0.25), c), net(x, torch.full((batch,), 0.25), c))


def test_mlp_default_is_3x256():
    net = ResidualMLP(6, cond_dim=17)
    shapes = [tuple(m.weight.shape) for m in (net.stem, *net.layers, net.head)]
    assert shapes == [(256, 6 + 16 + 17), (256, 256), (256, 256), (6, 256)]


@pytest.mark.parametrize("name", NAMES)
def test_samples_are_processed_independently(name):
    net = make(name).eval()
    x, t, c = inputs(name)
    joint = net(x, t, c)
    single = torch.cat([net(x[i : i + 1], t[i : i + 1], c[i : i + 1]) for i in range(B)])
    torch.testing.assert_close(joint, single, atol=1e-5, rtol=1e-4)


def test_bad_inputs_raise_clear_errors():
    x, t, c = inputs("mlp")
    with pytest.raises(ValueError, match=r"x_t must have shape \(\*, 3\)"):
        make("mlp")(x[:, :2], t, c)
    with pytest.raises(ValueError, match="cond must have shape"):
        make("mlp")(x, t, c[:, :2])
    with pytest.raises(ValueError, match="exceeds the horizon"):
        make("dit")(torch.randn(2, HORIZON + 1, X_DIM), torch.rand(2))
    with pytest.raises(ValueError, match=r"x_t must have shape \(\*, 12, 3\)"):
        make("value1d")(torch.randn(2, HORIZON - 1, X_DIM), torch.rand(2))
    with pytest.raises(ValueError, match="x_t must have shape"):
        make("unet2d")(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match="unknown activation"):
        ResidualMLP(2, activation="swish2")
    with pytest.raises(ValueError, match="odd"):
        TemporalUNet1D(2, 8, kernel_size=4)
    with pytest.raises(ValueError, match="divisible by heads"):
        DiT1D(2, 8, d_model=30, heads=4)


# ---------------------------------------------------------------- conditioning


@pytest.mark.parametrize("name", NAMES)
def test_condition_changes_output_and_full_dropout_equals_unconditional(name):
    x, t, c = inputs(name)
    net = make(name, drop=1.0).eval()
    assert not torch.allclose(net(x, t, c), net(x, t, None), atol=1e-4)
    net.train()
    torch.testing.assert_close(net(x, t, c), net(x, t, None))


def test_unconditional_nets_ignore_cond():
    torch.manual_seed(0)
    x, t = torch.randn(B, HORIZON, X_DIM), torch.rand(B)
    for net in (TemporalUNet1D(X_DIM, HORIZON, dims=(8, 16)), ResidualMLP(X_DIM, hidden=16)):
        xi = x if isinstance(net, TemporalUNet1D) else x[:, 0]
        torch.testing.assert_close(net(xi, t, torch.randn(B, COND_DIM)), net(xi, t))


# ---------------------------------------------------------------- determinism and tracing


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_seed(name):
    x, t, c = inputs(name)
    outs = []
    for _ in range(2):
        net = make(name, drop=0.5, seed=3, nondegenerate=False).train()
        torch.manual_seed(7)  # condition dropout draws from the global generator
        outs.append(net(x, t, c))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    other = make(name, drop=0.5, seed=4).train()
    torch.manual_seed(7)
    assert not torch.allclose(other(x, t, c), outs[0])


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("conditional", [True, False])
def test_jit_trace_matches_eager(name, conditional):
    net = make(name).eval()
    x, t, c = inputs(name)
    args = (x, t, c) if conditional else (x, t)
    traced = torch.jit.trace(net, args)
    x2, t2, c2 = inputs(name, seed=2)
    args2 = (x2, t2, c2) if conditional else (x2, t2)
    torch.testing.assert_close(traced(*args2), net(*args2), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- trainability


def _fit(net: torch.nn.Module, name: str, steps: int, lr: float) -> tuple[float, float]:
    x, t, c = inputs(name, n=8)
    target = torch.randn(8, *SPECS[name][2], generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = (net(x, t, c) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], min(losses[-10:])


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_every_parameter(name):
    """After a few steps (zero-initialised adaLN layers open up) every parameter, including the null
    embedding, receives a non-zero gradient under 50% condition dropout."""
    net = make(name, drop=0.5, nondegenerate=False).train()
    _fit(net, name, steps=3, lr=1e-3)
    x, t, c = inputs(name, n=16)
    torch.manual_seed(0)
    net.zero_grad()
    net(x, t, c).square().mean().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


@pytest.mark.parametrize(
    ("name", "steps", "lr"),
    [("mlp", 300, 3e-3), ("mlp_ln", 300, 3e-3), ("unet1d", 200, 3e-3), ("value1d", 150, 3e-3),
     ("dit", 200, 3e-3), ("unet2d", 200, 3e-3)],
)
def test_overfits_fixed_target(name, steps, lr):
    first, last = _fit(make(name, nondegenerate=False).train(), name, steps, lr)
    assert last < first / 10, f"{name}: loss {first:.3g} -> {last:.3g}"
    assert math.isfinite(last)
