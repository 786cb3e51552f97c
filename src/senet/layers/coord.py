"""Coordinate attention (Hou et al., "Coordinate Attention for Efficient Mobile Network Design",
arXiv 2103.02907).

    z^h = mean_W x  (B, C, H, 1),   z^w = mean_H x  (B, C, W, 1)     (eq. 4-5, 1D pooling per axis)
    f = δ(BN(F1([z^h; z^w])))      F1: 1x1 conv C -> mip, δ = hard-swish, (B, mip, H + W, 1)  (eq. 6)
    g^h = σ(F_h(f^h)), g^w = σ(F_w(f^w))    1x1 convs mip -> C, split back along H and W   (eq. 7-8)
    y = x ⊙ g^h ⊙ g^w                                                                      (eq. 9)

mip = max(8, C // r) with r = 32 (the authors' code); every conv has a bias.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import NoScript, check_channels, check_input, create_act, create_gate, floored_width


class CoordAttention(NoScript, nn.Module):
    """Coordinate attention: direction-aware attention maps along H and along W, multiplied in.

    Args:
        channels: C.
        reduction, hidden, divisor, hidden_from: mip = max(min_hidden, C // r), ``hidden`` overrides.
        min_hidden: the floor of mip (8).
        act: δ (hard-swish). gate: σ.
    """

    paper = "Coordinate Attention for Efficient Mobile Network Design (Hou et al.)"
    arxiv = "2103.02907"
    summary = "x * σ(F_h(f^h)) * σ(F_w(f^w)), f = hswish(BN(F1([mean_W x; mean_H x]))): attention along H and W"

    def __init__(
        self,
        channels: int,
        *,
        reduction: float = 32,
        hidden: int | None = None,
        divisor: int = 1,
        hidden_from: int | None = None,
        min_hidden: int = 8,
        act: str | type[nn.Module] = "hard_swish",
        gate: str | type[nn.Module] = "sigmoid",
    ):
        super().__init__()
        self.channels = check_channels(channels)
        self.hidden = mip = floored_width(channels, reduction, hidden, divisor, hidden_from, min_hidden)
        self.conv1 = nn.Conv2d(channels, mip, 1)  # F1, shared by both directions
        self.bn1 = nn.BatchNorm2d(mip)
        self.act = create_act(act)
        self.conv_h = nn.Conv2d(mip, channels, 1)  # F_h
        self.conv_w = nn.Conv2d(mip, channels, 1)  # F_w
        self.gate = create_gate(gate)

    def directional(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g^h (B, C, H, 1) and g^w (B, C, 1, W)."""
        check_input(x, self.channels, type(self).__name__)
        h = x.shape[2]
        z = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)], dim=2)  # (B, C, H+W, 1)
        f = self.act(self.bn1(self.conv1(z)))  # (B, mip, H+W, 1)
        g_h = self.gate(self.conv_h(f[:, :, :h]))  # (B, C, H, 1)
        g_w = self.gate(self.conv_w(f[:, :, h:].transpose(2, 3)))  # (B, C, 1, W)
        return g_h, g_w

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """g^h ⊙ g^w, shaped (B, C, H, W)."""
        g_h, g_w = self.directional(x)
        return g_h * g_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g_h, g_w = self.directional(x)
        return x * g_h * g_w

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}"
