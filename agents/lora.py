"""Low-rank adapters (LoRA, Hu et al. 2022) wrapped around the linear and convolutional layers of any module.

A wrapped layer computes ``base(x) + (alpha / rank) * up(down(x))``. ``down`` has the base layer's receptive field
(same kernel, stride, padding and dilation, ``rank`` output channels) and ``up`` is a 1x1 map to the base layer's
outputs, initialised to zero, so a freshly adapted module computes exactly what it did before. The base weights
are frozen; only the adapters train. The adapters are created on the base layer's device and in its dtype.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LoRA(nn.Module):
    """``base(x) + scale * up(down(x))`` around a frozen ``nn.Linear`` or ``nn.ConvNd`` (groups = 1)."""

    def __init__(self, base: nn.Module, rank: int = 4, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not isinstance(base, (nn.Linear, *_CONVS)):
            raise TypeError(f"LoRA wraps nn.Linear and nn.Conv1d/2d/3d layers, got {type(base).__name__}")
        place = {"device": base.weight.device, "dtype": base.weight.dtype}
        if isinstance(base, nn.Linear):
            self.down: nn.Module = nn.Linear(base.in_features, rank, bias=False, **place)
            self.up: nn.Module = nn.Linear(rank, base.out_features, bias=False, **place)
        else:
            if base.groups != 1:
                raise ValueError(f"LoRA supports convolutions with groups=1 only, got {base}")
            conv = type(base)
            self.down = conv(base.in_channels, rank, base.kernel_size, stride=base.stride, padding=base.padding,
                             dilation=base.dilation, bias=False, padding_mode=base.padding_mode, **place)
            self.up = conv(rank, base.out_channels, 1, bias=False, **place)
        nn.init.zeros_(self.up.weight)
        self.base = base.requires_grad_(False)
        self.scale = (alpha if alpha is not None else rank) / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * self.up(self.down(x))


def add_lora(module: nn.Module, rank: int = 4, alpha: float | None = None,
             include: Callable[[str, nn.Module], bool] | None = None) -> list[str]:
    """Freeze ``module`` and wrap its linear / convolutional layers (those ``include(name, layer)`` accepts) in LoRA.

    Layers are replaced in place; returns the names of the wrapped layers. Wrapping twice raises.
    """
    if any(isinstance(m, LoRA) for m in module.modules()):
        raise ValueError("module already has LoRA adapters")
    module.requires_grad_(False)
    targets = [
        (name, layer) for name, layer in module.named_modules()
        if (isinstance(layer, nn.Linear) or isinstance(layer, _CONVS) and layer.groups == 1)
        and (include is None or include(name, layer))
    ]
    if not targets:
        raise ValueError("no nn.Linear / nn.ConvNd layer to adapt in this module")
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, LoRA(layer, rank, alpha))
    return [name for name, _ in targets]


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters of a module prepared by :func:`add_lora`."""
    return [p for m in module.modules() if isinstance(m, LoRA) for p in (*m.down.parameters(), *m.up.parameters())]
