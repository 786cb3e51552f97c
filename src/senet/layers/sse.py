"""Spatial and concurrent spatial-channel SE (Roy et al., "Concurrent Spatial and Channel
Squeeze & Excitation in Fully Convolutional Networks", arXiv 1803.02579).

    sSE:  q = σ(W_sq ⋆ x)            a 1x1 conv to one map (B, 1, H, W); x * q
    cSE:  the SE block (``SqueezeExcite``)
    scSE: combine(cSE(x), sSE(x)), combine = "add" (the MICCAI paper's description) or
          "max" (element-wise max, the authors' released code)
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import NoScript, check_channels, check_choice, check_input, create_gate
from .se import SqueezeExcite


class SpatialSE(NoScript, nn.Module):
    """sSE: ``x * σ(conv1x1(x))`` with one output map (C weights + 1 bias)."""

    paper = "Concurrent Spatial and Channel Squeeze & Excitation (Roy et al.)"
    arxiv = "1803.02579"
    summary = "x * σ(conv1x1_{C→1}(x)): one spatial map, channel squeeze"

    def __init__(self, channels: int, *, bias: bool = True, gate: str | type[nn.Module] = "sigmoid"):
        super().__init__()
        self.channels = check_channels(channels)
        self.conv = nn.Conv2d(channels, 1, 1, bias=bias)
        self.gate = create_gate(gate)

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, type(self).__name__)
        return self.gate(self.conv(x))  # (B, 1, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excitation(x)


class SpatialChannelSE(NoScript, nn.Module):
    """scSE: cSE and sSE side by side, combined by ``"add"`` (default, paper) or ``"max"`` (authors' code).

    Extra keyword arguments (``reduction``, ``hidden``, ``bias``, ...) go to the cSE branch.
    """

    paper = "Concurrent Spatial and Channel Squeeze & Excitation (Roy et al.)"
    arxiv = "1803.02579"
    summary = "cSE(x) + sSE(x) (or max): channel and spatial excitation concurrently"

    def __init__(self, channels: int, *, combine: str = "add", gate: str | type[nn.Module] = "sigmoid",
                 **cse_kwargs):
        super().__init__()
        self.channels = check_channels(channels)
        self.combine = check_choice("combine", combine, ("add", "max"))
        self.cse = SqueezeExcite(channels, gate=gate, **cse_kwargs)
        self.sse = SpatialSE(channels, gate=gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, s = self.cse(x), self.sse(x)
        return c + s if self.combine == "add" else torch.maximum(c, s)
