"""``diffrl train ddpo`` and ``diffrl.train_ddpo`` end to end on the tiny offline StableDiffusionPipeline
(agents.ddpo_tiny, saved with save_pretrained): run folder, TensorBoard, LoRA, exact resume, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

import diffrl  # noqa: E402
from agents.ddpo_tiny import save_tiny_pipeline, tiny_pipeline  # noqa: E402
from diffrl.cli import main  # noqa: E402

CONFIG = {"sample_steps": 3, "guidance_scale": 2.0, "minibatch_size": 8, "stat_min_count": 1, "lr": 1e-2,
          "drift_samples": 2, "train_batch_size": 2}
SETTINGS = [f"{key}={value}" for key, value in CONFIG.items()]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "tiny")


def prompts_file(folder: Path) -> Path:
    path = folder / "prompts.txt"
    path.write_text("a cat\n\nan owl\n a dog \n")
    return path


def train(model: Path, prompts: Path, run_dir: Path, *extra: str) -> None:
    main(["train", "ddpo", "--model", str(model), "--prompts", str(prompts), "--run-dir", str(run_dir),
          "--batch-size", "4", "--device", "cpu", "--log-every", "1", "--eval-episodes", "3", *extra, *SETTINGS])


def scalars(folder: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0}).Reload()
    return [e.value for e in events.Scalars(tag)]


def lora_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "lora" / "pytorch_lora_weights.safetensors"))


def test_train_ddpo_writes_a_run_folder_whose_lora_diffusers_loads(model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train(model, prompts_file(tmp_path), run_dir, "--steps", "2", "--eval-every", "1", "--checkpoint-every", "1")
    spec = json.loads((run_dir / "config.json").read_text())
    assert spec["agent"] == "ddpo" and spec["pipeline"]["reward"] == "jpeg_compressibility"
    assert spec["agent_config"]["sample_steps"] == 3 and spec["train"]["batch_size"] == 4
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt")) == ["step_0000001.pt",
                                                                                   "step_0000002.pt"]
    rewards = scalars(run_dir / "tb", "train/reward_mean")
    assert len(rewards) == 2 and all(-2 < r < 0 for r in rewards)  # minus the JPEG size in kB
    assert len(scalars(run_dir / "tb", "eval/reward_mean")) == 2
    images = EventAccumulator(str(run_dir / "tb_images"), size_guidance={"images": 0}).Reload()
    assert "samples" in images.Tags()["images"] and len(images.Images("samples")) >= 2
    assert (run_dir / "grids" / "samples_000002.png").is_file()
    final = json.loads((run_dir / "final_eval.json").read_text())
    assert final["step"] == 2 and final["mean"] == final["reward_mean"]
    pipe = tiny_pipeline(tmp_path / "fresh")  # the saved model's weights: same builder, same seed
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([667, 1])
    text = torch.randn(2, 8, 16)
    with torch.no_grad():
        base = pipe.unet(x, t, encoder_hidden_states=text).sample
        pipe.load_lora_weights(str(run_dir / "lora"))
        tuned = pipe.unet(x, t, encoder_hidden_states=text).sample
    assert (tuned - base).abs().max() > 1e-5


def test_resumed_run_equals_the_uninterrupted_one(model, tmp_path):
    prompts = prompts_file(tmp_path)
    whole = diffrl.train_ddpo(model, prompts, steps=2, batch_size=4, device="cpu", log_every=1, eval_images=2,
                              run_dir=tmp_path / "whole", progress=False, **CONFIG)
    parted = tmp_path / "parted"
    train(model, prompts, parted, "--steps", "1", "--eval-episodes", "2")
    main(["train", "--resume", str(parted), "--steps", "2"])
    trained, resumed = lora_weights(tmp_path / "whole"), lora_weights(parted)
    assert sorted(trained) == sorted(resumed)
    assert any(v.abs().max() > 0 for k, v in trained.items() if ".up." in k)  # trained: "up" starts at zero
    for key, value in trained.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)
    history = [h["train/reward_mean"] for h in whole.history if "train/reward_mean" in h]
    assert len(history) == 2
    assert scalars(parted / "tb", "train/reward_mean") == pytest.approx(history, rel=0, abs=0)
    assert scalars(tmp_path / "whole" / "tb", "train/reward_mean") == pytest.approx(history, rel=0, abs=0)
    assert whole.score == json.loads((parted / "final_eval.json").read_text())["mean"]


@pytest.mark.parametrize(("content", "name", "reward", "message"), [
    (None, "missing.txt", "jpeg_compressibility", "does not exist"),
    ("\n  \n", "empty.txt", "jpeg_compressibility", "holds no prompts"),
    ("[1, 2]", "numbers.json", "jpeg_compressibility", "JSON list of non-empty strings"),
    ("[\"a cat\"", "broken.json", "jpeg_compressibility", "not valid JSON"),
    ("a cat\n", "ok.txt", "prettiness", "unknown reward 'prettiness'"),
    ("a cat\n", "ok.txt", "aesthetic", "needs a local CLIP model folder"),
])
def test_bad_prompts_or_reward_exit_with_one_line(model, tmp_path, capsys, content, name, reward, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as err:
        main(["train", "ddpo", "--model", str(model), "--prompts", str(path), "--reward", reward, "--run-dir",
              str(tmp_path / "run")])
    assert err.value.code == 2
    line = capsys.readouterr().err.strip()
    assert message in line and "\n" not in line and "Traceback" not in line
    assert not (tmp_path / "run").exists()  # nothing written before the settings are checked
    if content is not None and reward == "jpeg_compressibility":
        assert name in line


def test_ddpo_options_need_ddpo_and_ddpo_needs_them(model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "ddpo", "--model", str(model)])
    assert "--prompts FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "diffusion_bc", "--dataset", "toy:bandit", "--model", str(model)])
    assert "settings of diffrl train ddpo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "ddpo", "--model", str(tmp_path / "nowhere"), "--prompts", str(prompts_file(tmp_path)),
              "--run-dir", str(tmp_path / "run")])
    assert "does not load as a diffusers pipeline" in capsys.readouterr().err


def test_stable_diffusion_script_help_and_dry_run(model, tmp_path, capsys):
    import runpy

    script = Path(__file__).resolve().parent.parent / "scripts" / "ddpo_stable_diffusion.py"
    sd_main = runpy.run_path(str(script))["main"]
    with pytest.raises(SystemExit) as err:
        sd_main(["--help"])
    assert err.value.code == 0 and "--dry-run" in capsys.readouterr().out
    sd_main(["--model", str(model), "--dry-run", "--out", str(tmp_path / "sd")])
    out = capsys.readouterr().out
    assert "4 images" in out and "images/s" in out and "peak GPU memory n/a" in out
    spec = json.loads((tmp_path / "sd" / "config.json").read_text())
    config = spec["agent_config"]
    assert (config["sample_steps"], config["eta"], config["guidance_scale"], config["lora_rank"]) == (50, 1.0, 5.0, 4)
    assert config["gradient_checkpointing"] and config["minibatch_size"] == 4 and spec["train"]["precision"] == "bf16"
    assert (tmp_path / "sd" / "lora" / "pytorch_lora_weights.safetensors").is_file()
