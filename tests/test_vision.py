"""Image encoders of Diffusion Policy (ResNet-18 with GroupNorm, spatial softmax, crops, several cameras) and the
image-observation DiffusionPolicy (update on dict batches, act on dict observations)."""

import numpy as np
import pytest
import torch
from torch import nn

from agents.diffusion_policy import DiffusionPolicy, DiffusionPolicyConfig, EncodedDenoiser, pack_observations
from diffrl.nets.vision import ImageEncoder, ObservationEncoder, ResNet18GN, SpatialSoftmax, center_crop, random_crop


def test_resnet18_has_group_norms_and_the_resnet18_layout():
    net = ResNet18GN(3, width=16)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == max(m.num_channels // 16, 1) for m in norms)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 16 and sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 1  # 8 basic blocks
    for size in (32, 28, 84, 96):
        out = net(torch.zeros(2, 3, size, size))
        assert out.shape == (2, 128, ResNet18GN.feature_size(size), ResNet18GN.feature_size(size))
    assert ResNet18GN.feature_size(84) == 3 and ResNet18GN.feature_size(96) == 3


def test_spatial_softmax_returns_the_peak_coordinates_in_the_unit_square():
    head = SpatialSoftmax(4, height=5, width=7, num_keypoints=3)
    points = head(torch.randn(6, 4, 5, 7) * 10)
    assert points.shape == (6, 3, 2) and points.abs().max() <= 1.0
    nn.init.zeros_(head.maps.bias)
    head.maps.weight.data = torch.eye(3, 4)[..., None, None]  # keypoint k looks at channel k
    features = torch.zeros(1, 4, 5, 7)
    features[0, 0, 4, 0] = features[0, 1, 0, 6] = features[0, 2, 2, 3] = 100.0
    expected = torch.tensor([[[-1.0, 1.0], [1.0, -1.0], [0.0, 0.0]]])  # (x, y) of column 0 / row 4, ...
    torch.testing.assert_close(head(features), expected, atol=1e-6, rtol=0)


def test_crops_random_per_image_in_training_centred_in_evaluation():
    images = torch.arange(5 * 2 * 8 * 8, dtype=torch.float32).view(5, 2, 8, 8).repeat(40, 1, 1, 1)
    crops = random_crop(images, (5, 6), torch.Generator().manual_seed(0))
    assert crops.shape == (200, 2, 5, 6)
    offsets = set()
    for image, crop in zip(images, crops, strict=True):
        top, left = int(crop[0, 0, 0] - image[0, 0, 0]) // 8, int(crop[0, 0, 0] - image[0, 0, 0]) % 8
        assert torch.equal(crop, image[:, top:top + 5, left:left + 6])
        offsets.add((top, left))
    assert offsets == {(top, left) for top in range(4) for left in range(3)}  # every placement occurs
    assert torch.equal(center_crop(images[:1], (4, 6)), images[:1, :, 2:6, 1:7])

    torch.manual_seed(0)
    encoder = ImageEncoder(3, (36, 36), num_keypoints=4, width=8)
    x = torch.rand(3, 3, 44, 44)
    encoder.eval()
    torch.testing.assert_close(encoder(x), encoder(x))
    assert torch.equal(encoder.crop(x), x[:, :, 4:40, 4:40])
    encoder.train()
    assert not torch.equal(encoder.crop(x), encoder.crop(x))
    with pytest.raises(ValueError, match="smaller than the crop"):
        encoder(torch.rand(1, 3, 30, 44))


@pytest.mark.parametrize("shared", [False, True])
def test_observation_encoder_cameras_and_state(shared):
    torch.manual_seed(0)
    encoder = ObservationEncoder(state_dim=3, cameras=2, image_shape=(3, 40, 40), crop_shape=(36, 36),
                                 num_keypoints=4, width=8, shared=shared).eval()
    assert len(encoder.encoders) == (1 if shared else 2) and encoder.feature_dim == 3 + 2 * 8
    state, images = torch.randn(5, 3), torch.rand(5, 2, 3, 40, 40)
    features = encoder(torch.cat([state, images.flatten(1)], dim=1))
    assert features.shape == (5, 19) and torch.equal(features[:, :3], state)
    second = encoder.encoders[-1](images[:, 1])
    torch.testing.assert_close(features[:, 11:], second)
    with pytest.raises(ValueError, match="observations must have"):
        encoder(torch.zeros(5, 10))
    with pytest.raises(ValueError, match="1x1 feature map"):  # keypoints of one position ignore the image
        ObservationEncoder(state_dim=3, cameras=1, image_shape=(3, 32, 32), crop_shape=(28, 28))


IMAGES = dict(cameras=("top", "wrist"), image_shape=(3, 40, 40), crop_shape=(36, 36), num_keypoints=4,
              encoder_width=8, horizon=8, n_obs_steps=2, n_action_steps=4, dims=(8, 16), time_dim=8, steps=3,
              total_steps=200, warmup_steps=0, ema_power=None, ema_decay=0.0)


def image_batch(generator, batch=16):
    """A bright square at a random corner of the "top" camera; the actions point to the corner."""
    corner = torch.randint(0, 2, (batch, 2), generator=generator)
    top = torch.zeros(batch, 2, 3, 40, 40, dtype=torch.uint8)
    for i, (r, c) in enumerate(corner.tolist()):
        top[i, :, :, 20 * r: 20 * r + 20, 20 * c: 20 * c + 20] = 255
    wrist = torch.rand(batch, 2, 3, 40, 40, generator=generator)
    actions = (2.0 * corner - 1.0)[:, None].expand(batch, 8, 2)
    return {"observations": {"top": top, "wrist": wrist, "state": torch.randn(batch, 2, 1, generator=generator)},
            "actions": actions}


def test_image_policy_update_lowers_the_loss_and_acts_on_dict_observations():
    torch.manual_seed(0)
    agent = DiffusionPolicy(DiffusionPolicyConfig(**IMAGES, lr=3e-3), 1, 2)
    assert agent.obs_dim == 1 + 2 * 3 * 40 * 40 and isinstance(agent.actor.model.denoiser, EncodedDenoiser)
    generator = torch.Generator().manual_seed(0)
    losses = [float(agent.update(image_batch(generator))["loss"]) for _ in range(80)]
    assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:10])

    policy = agent.policy(seed=0)
    obs = {k: v[0, 0].numpy() for k, v in image_batch(generator)["observations"].items()}
    action = policy.act(obs)
    assert action.shape == (2,) and np.isfinite(action).all()
    batch = {k: np.stack([v, v]) for k, v in obs.items()}
    policy.reset()
    assert policy.act(batch).shape == (2, 2)
    as_float = {**obs, "top": obs["top"].astype(np.float32) / 255}
    policy.reset(seed=3)
    first = policy.act(obs)
    policy.reset(seed=3)
    np.testing.assert_allclose(policy.act(as_float), first, rtol=1e-5, atol=1e-6)  # uint8 / 255 == float in [0, 1]
    with pytest.raises(ValueError, match="lacks"):
        policy.act({"top": obs["top"], "state": obs["state"]})


def test_images_are_encoded_once_per_plan():
    agent = DiffusionPolicy(DiffusionPolicyConfig(**IMAGES), 1, 2)
    policy = agent.policy(seed=0)
    calls = []
    policy.actor.model.denoiser.encoder.register_forward_hook(lambda *args: calls.append(1))
    obs = {k: v[0, 0] for k, v in image_batch(torch.Generator().manual_seed(0))["observations"].items()}
    for _ in range(5):  # two plans of n_action_steps = 4
        policy.act(obs)
    assert len(calls) == 2


def test_pack_observations_layout():
    state, image = torch.randn(4, 2, 3), torch.randint(0, 256, (4, 2, 1, 2, 2), dtype=torch.uint8)
    flat = pack_observations({"state": state, "cam": image}, ["cam"], torch.float64)
    assert flat.dtype == torch.float64 and flat.shape == (4, 2, 7)
    torch.testing.assert_close(flat[..., :3], state.double())
    torch.testing.assert_close(flat[..., 3:], image.flatten(-3).double() / 255)
    with pytest.raises(ValueError, match="leading axes"):
        pack_observations({"state": state, "cam": image[:, 0]}, ["cam"], torch.float32)


def test_float64_image_update_and_act_make_no_float32_tensors():
    from dtype_guard import GuardedActor, only_float64

    agent = DiffusionPolicy(DiffusionPolicyConfig(**IMAGES), 1, 2).to(dtype=torch.float64)
    batch = image_batch(torch.Generator().manual_seed(0), batch=4)
    batch = {"observations": {k: v if v.dtype == torch.uint8 else v.double() for k, v in batch["observations"].items()},
             "actions": batch["actions"].double()}
    with only_float64():
        assert np.isfinite(float(agent.update(batch)["loss"]))
    policy = agent.policy(seed=0)
    policy.policy.actor = GuardedActor(policy.actor)  # the sampler; the policy hands out float32 actions
    assert policy.act({k: v[0, 0].numpy() for k, v in batch["observations"].items()}).shape == (2,)
