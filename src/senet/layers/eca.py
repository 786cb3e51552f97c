"""ECA, efficient channel attention (Wang et al., "ECA-Net", arXiv 1910.03151).

    y = avgpool(x)                      (B, C)
    s = σ(conv1d_k(y))                  one k-tap filter shared by all channels, no reduction
    k = ψ(C) = |log2(C)/γ + b/γ|_odd    (eq. 12; γ = 2, b = 1)

CECA pads the channel axis circularly instead of with zeros, so the first and last channels see
each other (timm's CecaModule; same parameters).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ._common import NoScript, check_channels, check_input, create_gate, odd_kernel


class ECA(NoScript, nn.Module):
    """ECA block: ``x * σ(conv1d_k(avgpool(x)))`` with ``k`` taps (adaptive by default).

    Args:
        channels: C.
        kernel_size: explicit odd k; ``None`` picks ψ(C) from ``gamma`` and ``b``.
        gamma, b: the adaptive-kernel constants (2, 1 in the paper).
        gate: σ by default.
        circular: pad the channel axis circularly (CECA) instead of with zeros.
    """

    paper = "ECA-Net: Efficient Channel Attention (Wang et al.)"
    arxiv = "1910.03151"
    summary = "x * σ(conv1d_k(avgpool(x))): k-tap 1D conv across channels, k = |log2(C)/2 + 1/2|_odd"

    def __init__(self, channels: int, *, kernel_size: int | None = None, gamma: float = 2, b: float = 1,
                 gate: str | type[nn.Module] = "sigmoid", circular: bool = False):
        super().__init__()
        self.channels = check_channels(channels)
        if kernel_size is None:
            kernel_size = odd_kernel(channels, gamma, b)
        elif isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 \
                or kernel_size % 2 == 0:
            raise ValueError(f"ECA kernel_size must be a positive odd integer, got {kernel_size!r}; "
                             f"use e.g. {max(1, int(kernel_size) - 1) | 1} or None for the adaptive k")
        self.kernel_size = kernel_size
        self.circular = circular
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=0 if circular else (kernel_size - 1) // 2, bias=False)
        self.gate = create_gate(gate)

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, type(self).__name__)
        y = x.mean((2, 3)).unsqueeze(1)  # (B, 1, C)
        if self.circular:
            pad = (self.kernel_size - 1) // 2
            y = F.pad(y, (pad, pad), mode="circular")
        s = self.gate(self.conv(y))  # (B, 1, C)
        return s.view(x.shape[0], self.channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excitation(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, circular={self.circular}"


class CECA(ECA):
    """CECA: ECA with circular padding of the channel axis (ECA-Net, arXiv 1910.03151; timm's variant)."""

    summary = "ECA with circular padding of the channel axis"

    def __init__(self, channels: int, **kwargs):
        super().__init__(channels, **{**kwargs, "circular": True})
