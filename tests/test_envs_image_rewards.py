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
    fn = reward_from_fn(lambda images, prompts, metadata: [float(i) for i in range(len(images))])
    assert fn(imgs).tolist() == [0.0, 1.0, 2.0] and fn(imgs).dtype == torch.float32
    with pytest.raises(ValueError, match="returned 2 values for 3 images"):
        reward_from_fn(lambda images, prompts, metadata: [1, 2])(imgs)


def test_rewards_take_prompts_and_metadata_and_refuse_bad_images():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(jpeg_compressibility(images, ["a cat", "a dog"], [{}, {}]), jpeg_compressibility(images))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\] \(value_range\), got values in \[-0.99"):
        jpeg_compressibility(images * 2 - 1)
    with pytest.raises(ValueError, match="must lie in"):
        brightness(torch.full((1, 3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match=r"C in \(1, 3\), got \(2, 4, 16, 16\)"):
        jpeg_incompressibility(torch.rand(2, 4, 16, 16))
    with pytest.raises(ValueError, match="float tensor"):
        brightness(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
