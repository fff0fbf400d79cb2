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


def tiny_clip(folder, projection_dim: int = 8):
    """A randomly initialised CLIP vision tower with projection (32x32 inputs) saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2, projection_dim=projection_dim)
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    model.save_pretrained(str(folder))
    return model


def random_head(path, width: int = 8, safetensors: bool = False) -> dict:
    """An improved-aesthetic-predictor state dict with random weights, written to ``path``."""
    from envs.image_rewards import AESTHETIC_LINEARS, AESTHETIC_WIDTHS

    g = torch.Generator().manual_seed(1)
    widths = (width, *AESTHETIC_WIDTHS[1:])
    state = {}
    for name, fan_in, fan_out in zip(AESTHETIC_LINEARS, widths[:-1], widths[1:], strict=True):
        state[f"{name}.weight"] = torch.randn(fan_out, fan_in, generator=g) / fan_in**0.5
        state[f"{name}.bias"] = torch.randn(fan_out, generator=g)
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


def hand_aesthetic(clip, head: dict, images: torch.Tensor) -> torch.Tensor:
    """head(normalise(embed(preprocessed image))) written out: CLIP normalisation, the vision tower's pooled
    output through the projection, L2 normalisation, then the five linear layers (dropout off, no activation)."""
    from envs.image_rewards import AESTHETIC_LINEARS, CLIP_MEAN, CLIP_STD

    pixels = (images - torch.tensor(CLIP_MEAN).reshape(1, 3, 1, 1)) / torch.tensor(CLIP_STD).reshape(1, 3, 1, 1)
    with torch.no_grad():
        embed = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
    x = embed / embed.norm(dim=-1, keepdim=True)
    for name in AESTHETIC_LINEARS:
        x = x @ head[f"{name}.weight"].T + head[f"{name}.bias"]
    return x[:, 0]


@pytest.mark.parametrize("safetensors", [False, True])
def test_aesthetic_reward_equals_the_hand_computation(tmp_path, safetensors):
    from envs.image_rewards import AestheticReward

    clip = tiny_clip(tmp_path / "clip")
    head_file = tmp_path / ("head.safetensors" if safetensors else "head.pth")
    head = random_head(head_file, safetensors=safetensors)
    reward = AestheticReward(tmp_path / "clip", head_file)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    expected = hand_aesthetic(clip, head, images)
    got = reward(images, ["a", "b", "c"], [{}, {}, {}])
    assert got.shape == (3,) and got.dtype == torch.float32 and expected.std() > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(AestheticReward(tmp_path / "clip", head_file, value_range=(-1, 1))(images * 2 - 1),
                               expected, rtol=1e-5, atol=1e-5)
    # a wider image is centre-cropped to the model's 32 x 32 (its shorter side already fits)
    wide = torch.rand(3, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    wide[..., 8:40] = images
    torch.testing.assert_close(reward(wide), expected, rtol=1e-5, atol=1e-5)
    assert reward(torch.rand(2, 1, 16, 24)).shape == (2,)  # grey and small: resized, three channels


def test_aesthetic_reward_refuses_missing_or_bad_files_with_one_line(tmp_path):
    from envs.image_rewards import AestheticReward, reward_by_name

    tiny_clip(tmp_path / "clip")
    random_head(tmp_path / "head.pth")
    with pytest.raises(ValueError, match="no config.json"):
        AestheticReward(tmp_path / "nowhere", tmp_path / "head.pth")
    with pytest.raises(ValueError, match="does not exist"):
        AestheticReward(tmp_path / "clip", tmp_path / "nohead.pth")
    torch.save({"layers.0.weight": torch.zeros(2, 2)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="not an improved-aesthetic-predictor state dict"):
        AestheticReward(tmp_path / "clip", tmp_path / "partial.pth")
    torch.save({"head": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # loading it would need unpickling code
    with pytest.raises(ValueError, match="cannot be read as a state dict"):
        AestheticReward(tmp_path / "clip", tmp_path / "pickled.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot be read as a state dict"):
        AestheticReward(tmp_path / "clip", tmp_path / "junk.safetensors")
    random_head(tmp_path / "wide.pth", width=12)
    with pytest.raises(ValueError, match="12-dimensional embeddings"):
        AestheticReward(tmp_path / "clip", tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="unknown reward 'pretty'"):
        reward_by_name("pretty")
    with pytest.raises(ValueError, match="--aesthetic-head"):
        reward_by_name("aesthetic")
    assert reward_by_name("jpeg_incompressibility") is jpeg_incompressibility
