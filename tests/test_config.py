from dataclasses import dataclass

import pytest

from diffrl.config import apply_overrides, config_from_dict, config_to_dict, suggest


@dataclass
class Example:
    lr: float = 3e-4
    hidden: int = 256
    dims: tuple[int, ...] = (32, 64)
    use_ema: bool = True
    solver: str = "ddpm"
    max_grad_norm: float | None = None


def test_overrides_follow_field_types():
    cfg = apply_overrides(Example(), ["lr=1e-3", "hidden=512", "dims=[16,32,64]", "use_ema=false",
                                      "solver=dpm-solver++", "max_grad_norm=1.5"])
    assert cfg == Example(1e-3, 512, (16, 32, 64), False, "dpm-solver++", 1.5)
    assert apply_overrides(cfg, ["max-grad-norm=none"]).max_grad_norm is None
    assert apply_overrides(Example(), ["dims=8,8"]).dims == (8, 8)


def test_unknown_field_suggests_closest_name():
    with pytest.raises(ValueError, match="no field 'hiden'.*'hidden'"):
        apply_overrides(Example(), ["hiden=3"])


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match=r"Example.hidden expects int"):
        apply_overrides(Example(), ["hidden=big"])
    with pytest.raises(ValueError, match="true/false"):
        apply_overrides(Example(), ["use_ema=maybe"])
    with pytest.raises(ValueError, match="field=value"):
        apply_overrides(Example(), ["hidden"])


def test_dict_round_trip_restores_tuples_and_rejects_unknown_fields():
    cfg = Example(dims=(1, 2, 3))
    data = config_to_dict(cfg)
    assert data["dims"] == [1, 2, 3]
    assert config_from_dict(Example, data) == cfg
    with pytest.raises(ValueError, match="another diffrl version"):
        config_from_dict(Example, {**data, "extra": 1})


def test_suggest():
    assert "diffusion_ql" in suggest("diffusion_q", ["diffusion_ql", "qgpo"])
    assert suggest("zzz", ["diffusion_ql"]) == ""
