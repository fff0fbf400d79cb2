"""Low-rank adapters (LoRA, Hu et al. 2022) through peft: add them, switch them off, save and merge them.

A diffusers model gets its adapters through its own ``add_adapter`` (so ``pipe.load_lora_weights`` and the
diffusers LoRA tooling know them); any other module through peft's ``inject_adapter_in_model``. Adapters start
as the identity (``up`` = 0, peft's "gaussian" init of ``down`` as in diffusers' LoRA training scripts). The
base weights are frozen; only the adapters train. The reference (starting) model is the same module with its
adapters switched off (:func:`adapters_disabled`), not a copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def linear_and_conv_names(module: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` and ``nn.ConvNd`` (groups = 1) layers of ``module``."""
    return [name for name, layer in module.named_modules()
            if name and (isinstance(layer, nn.Linear) or isinstance(layer, _CONVS) and layer.groups == 1)]


def add_lora(module: nn.Module, rank: int, alpha: float | None = None,
             targets: Sequence[str] | None = None) -> list[nn.Parameter]:
    """Freeze ``module`` and add LoRA adapters of ``rank`` to the layers named (or name-suffixed) by ``targets``
    (default: every linear and convolutional layer); returns the adapter parameters, which train."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if any(isinstance(m, BaseTunerLayer) for m in module.modules()):
        raise ValueError("module already has LoRA adapters")
    targets = list(targets) if targets else linear_and_conv_names(module)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                        target_modules=targets)
    module.requires_grad_(False)
    try:
        if hasattr(module, "add_adapter") and hasattr(module, "save_config"):  # a diffusers model
            module.add_adapter(config)
        else:
            inject_adapter_in_model(config, module)
    except ValueError as err:
        raise ValueError(f"LoRA targets {targets} do not name layers of this model: {err}") from None
    params = lora_parameters(module)
    for p in params:
        p.requires_grad_(True)
    return params


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters of a module prepared by :func:`add_lora`."""
    return [p for name, p in module.named_parameters() if "lora_" in name]


def has_lora(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``module`` computes its base (starting) model; the adapters come back afterwards."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer in layers:
            layer.enable_adapters(True)  # also marks the adapters trainable again


def save_lora(pipe, unet: nn.Module, folder: str | Path) -> Path:
    """Write the U-Net's adapters in the diffusers format that ``pipe.load_lora_weights(folder)`` reads."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    metadata = unet.peft_config["default"].to_dict()
    type(pipe).save_lora_weights(str(folder), unet_lora_layers=layers, unet_lora_adapter_metadata=metadata,
                                 safe_serialization=True)
    return Path(folder)


def merged_copy(unet: nn.Module) -> nn.Module:
    """A plain copy of a diffusers U-Net with its active adapters merged into the base weights, W + delta as peft
    merges them; the adapted U-Net itself is left as it is."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = {name.replace(".base_layer", ""): value.detach().clone() for name, value in unet.state_dict().items()
             if "lora_" not in name}
    with torch.no_grad():
        for name, layer in unet.named_modules():
            if isinstance(layer, BaseTunerLayer) and not layer.merged:
                for adapter in layer.active_adapters:
                    state[f"{name}.weight"] += layer.get_delta_weight(adapter).to(state[f"{name}.weight"].dtype)
    merged = type(unet).from_config(unet.config)
    merged.load_state_dict(state)
    return merged.to(device=unet.device, dtype=unet.dtype).requires_grad_(False)
