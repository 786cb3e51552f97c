"""GCT, gated channel transformation (Yang et al., "Gated Channel Transformation for Visual
Recognition", arXiv 1909.11519).

    embedding:      s_c = α_c · sqrt(Σ_{HW} x_c² + ε)                 (eq. 1, ℓ2 global context)
    normalization:  ŝ_c = sqrt(C) · s_c / sqrt(Σ_c s_c² + ε)         (eq. 2, channel normalization)
    gating:         x̂_c = x_c · (1 + tanh(γ_c ŝ_c + β_c))             (eq. 3)

α starts at 1, γ and β at 0, so the block starts as the identity. 3C parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._common import NoScript, check_channels, check_input


class GCT(NoScript, nn.Module):
    """GCT block: ``x * (1 + tanh(γ ŝ + β))`` with ŝ the channel-normalized ℓ2 embedding α‖x_c‖.

    Args:
        channels: C.
        eps: ε inside both square roots.
    """

    paper = "Gated Channel Transformation for Visual Recognition (Yang et al.)"
    arxiv = "1909.11519"
    summary = "x * (1 + tanh(γ ŝ + β)), ŝ = √C s / ‖s‖, s = α ‖x_c‖₂: identity at init"

    def __init__(self, channels: int, *, eps: float = 1e-5):
        super().__init__()
        self.channels = check_channels(channels)
        self.eps = eps
        self.alpha = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """The gate 1 + tanh(γ ŝ + β), shaped (B, C, 1, 1), in (0, 2)."""
        check_input(x, self.channels, type(self).__name__)
        s = self.alpha * (x.square().sum((2, 3), keepdim=True) + self.eps).sqrt()  # (B, C, 1, 1), eq. 1
        s_hat = math.sqrt(self.channels) * s / (s.square().sum(1, keepdim=True) + self.eps).sqrt()  # eq. 2
        return 1 + torch.tanh(self.gamma * s_hat + self.beta)  # eq. 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excitation(x)
