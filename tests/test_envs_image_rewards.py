"""Image rewards for DDPO."""

import pytest
import torch

from envs.image_rewards import (
    ClassifierReward,
    brightness,
    jpeg_compressibility,
    jpeg_incompressibility,
    reward_from_fn,
)


def test_jpeg_rewards_order_flat_above_noise():
    flat = torch.full((2, 3, 32, 32), 0.5)
    noise = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert (jpeg_compressibility(flat) > jpeg_compressibility(noise)).all()
    assert torch.equal(jpeg_incompressibility(noise), -jpeg_compressibility(noise))
    # the same images in [-1, 1] give the same sizes
    assert torch.allclose(jpeg_compressibility(noise * 2 - 1, value_range=(-1, 1)), jpeg_compressibility(noise))
    assert jpeg_compressibility(torch.zeros(1, 1, 16, 16)).shape == (1,)


def test_brightness_known_values():
    imgs = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4), torch.full((3, 4, 4), 0.25)])
    assert brightness(imgs).tolist() == [0.0, 1.0, 0.25]
    assert brightness(imgs * 2 - 1, value_range=(-1, 1)).tolist() == [0.0, 1.0, 0.25]
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        brightness(torch.zeros(4, 4))


def test_classifier_reward_log_prob_and_prob():
    # a "classifier" whose logits are (brightness, 1 - brightness): class 0 prefers bright images
    def clf(images):
        b = images.mean(dim=(1, 2, 3))
        return torch.stack([b, 1 - b], 1)

    imgs = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    r = ClassifierReward(clf, target_class=0)(imgs)
    expected = torch.log_softmax(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), 1)[:, 0]
    assert torch.allclose(r, expected)
    p = ClassifierReward(clf, log_prob=False)(imgs, classes=torch.tensor([1, 0]))
    assert torch.allclose(p, torch.sigmoid(torch.ones(2)))  # softmax of (1, 0) at the larger logit
    with pytest.raises(ValueError, match="target_class"):
        ClassifierReward(clf)(imgs)


def test_reward_from_fn_adapts_and_checks_length():
    imgs = torch.rand(3, 3, 8, 8)
    fn = reward_from_fn(lambda images, classes: [float(i) for i in range(len(images))])
    assert fn(imgs).tolist() == [0.0, 1.0, 2.0] and fn(imgs).dtype == torch.float32
    with pytest.raises(ValueError, match="returned 2 values for 3 images"):
        reward_from_fn(lambda images, classes: [1, 2])(imgs)
