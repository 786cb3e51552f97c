"""Max pooling through senet's native CPU kernel (``senet.layers.native.max_pool2d``).

PyTorch's CPU max pooling on NCHW tensors is a scalar loop per output: ResNet's stem pooling (3x3, stride 2,
64 x 112 x 112 per image) took ~7.3 ms of a ~90 ms batch-1 ResNet-50 forward on this project's CPU (one thread),
eleven times a copy of the same tensor, in timm's and torchvision's networks as in ours. ``MaxPool2d`` is
``nn.MaxPool2d`` whose eager forward takes the kernel where it applies, the same values and gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from . import fused, native
from ._common import NoScript


class MaxPool2d(NoScript, nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments, same results) whose forward in eager mode runs senet's native kernel for
    float32 contiguous NCHW CPU tensors with dilation 1 and no indices returned (``native.max_pool2d``); anything
    else, and traced, exported or compiled code, and ``reference_path()``, ``native.off()``, take PyTorch's.
    Hooks fire as on any module (the module is called; only its forward differs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused._ENABLED and fused.eager():
            y = native.max_pool2d(self, x)
            if y is not None:
                return y
        return super().forward(x)
