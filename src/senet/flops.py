"""Parameters and multiply-accumulates (MACs) of one forward pass.

Convention (the SENet paper's "GFLOPs", arXiv 1709.01507 Table 2, are MACs of one 224x224 image):
we count the multiply-accumulates of convolutions (1d/2d, grouped or not) and linear layers, which
includes the SE FCs, ECA's 1d conv and CBAM's 7x7 conv. We exclude BatchNorm, activations, pooling,
biases and element-wise ops (the residual addition, the SE scaling ``x * s``): they are ~1% of a
ResNet's work and papers differ on them.

    conv:   MACs = (output elements per image) * (C_in / groups) * prod(kernel)
    linear: MACs = (output elements per image) * in_features

Counting runs on the ``meta`` device when asked: shapes propagate, nothing is computed, so even
SENet-154 at 224x224 counts in milliseconds.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from senet.models import create_model, model_info


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    per_image = out.numel() // out.shape[0]
    if isinstance(module, nn.Linear):
        return per_image * module.in_features
    # nn.Conv1d / nn.Conv2d / nn.Conv3d: weight (C_out, C_in / groups, *kernel)
    return per_image * module.weight.shape[1] * math.prod(module.weight.shape[2:])


def count_macs(model: nn.Module, input_size: tuple[int, ...] = (3, 224, 224), *,
               device: torch.device | str | None = None, by_type: bool = False) -> int | dict[str, int]:
    """MACs of one forward pass of a single ``input_size`` image through ``model`` (eval mode).

    ``by_type=True`` returns ``{"Conv2d": ..., "Linear": ..., ...}`` instead of the total.
    """
    if device is None:
        device = next(model.parameters()).device
    totals: dict[str, int] = {}

    def hook(module: nn.Module, args, out: torch.Tensor) -> None:
        name = type(module).__name__
        totals[name] = totals.get(name, 0) + _layer_macs(module, out)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return totals if by_type else sum(totals.values())


def profile_model(name: str, input_size: tuple[int, ...] | None = None, **kwargs) -> dict:
    """``{"name", "params", "macs", "input_size", "paper"}`` for a registered model, built on ``meta``
    (no memory, no init cost) at its default input size unless ``input_size`` is given."""
    info = model_info(name)
    size = tuple(input_size or info.input_size)
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    return {"name": name, "params": count_params(model), "macs": count_macs(model, size, device="meta"),
            "input_size": size, "paper": info.paper}
