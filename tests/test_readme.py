"""The README stays true: its fresh-machine commands exist and CI runs the test one; its library and Python API
examples run; the results section links files that exist."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def fenced_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_fresh_machine_commands_and_ci_agree():
    commands = [block.strip() for block in fenced_blocks("bash")]
    assert any(c.startswith("scripts/setup.sh && .venv/bin/diffrl train") for c in commands), commands
    assert "scripts/test.sh" in commands
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert len(README.splitlines()) < 1000, "README has grown suspiciously long"


def test_library_example_runs():
    example = next(block for block in fenced_blocks("python") if "DiffusionModel" in block)
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    assert scope["x"].shape == (512, 2)
    assert torch.isfinite(scope["x"]).all()
    assert scope["x"][:, 0].mean() > 0.8  # trained on N((1, -1), 0.3^2) and guided towards large x[0]


def test_python_api_example_runs(tmp_path, monkeypatch):
    example = next(block for block in fenced_blocks("python") if "diffrl.make" in block)
    shorter = example.replace("steps=3000", "steps=30").replace("steps=6000", "steps=40")
    shorter = shorter.replace("eval_every=1000", "eval_every=10")
    assert shorter != example
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(shorter, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    assert scope["run"].final["step"] == 40 and scope["run"].score == scope["run"].final["mean"]
    assert scope["policy"].act([-0.8, 0.0]).shape == (2,)
    assert (tmp_path / "runs" / "pointnav-bc" / "learning_curve.png").is_file()


def test_results_section_links_exist():
    results = README[README.index("## Results"):README.index("## Layout")]
    links = re.findall(r"\]\((results/[^)]*)\)", results)
    assert len(links) >= 5
    for link in links:
        assert (ROOT / link).exists(), link
    assert "results/reference_dql/report.txt" in results and "historical, not comparable" in results
