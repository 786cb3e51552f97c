"""SRM, style-based recalibration (Lee et al., "SRM: A Style-based Recalibration Module for
Convolutional Neural Networks", arXiv 1903.10829).

    style pooling:      μ_c = mean_{HW} x_c,  σ_c = sqrt(mean_{HW} (x_c - μ_c)² + ε)     (eq. 1-2)
                        t_c = [μ_c, σ_c]                                                 (B, C, 2)
    style integration:  z_c = w_c · t_c        channel-wise FC, two weights per channel (eq. 3)
                        g = σ(BN(z))                                                     (eq. 4-5)
    x̃_c = g_c · x_c

σ uses the 1/HW (population) variance of the paper's eq. 2, so a 1x1 map gives sqrt(ε), not NaN.
Trainable parameters: 2C (CFC) + 2C (BN affine); w starts at zero as in the authors' code.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import NoScript, check_channels, check_input, create_gate


class SRM(NoScript, nn.Module):
    """SRM block: ``x * σ(BN(w_μ ⊙ mean(x) + w_σ ⊙ std(x)))``, per-channel weights, no mixing across channels.

    Args:
        channels: C.
        gate: σ.
        eps: ε inside the standard deviation.
    """

    paper = "SRM: A Style-based Recalibration Module for CNNs (Lee et al.)"
    arxiv = "1903.10829"
    summary = "x * σ(BN(w1 ⊙ mean(x) + w2 ⊙ std(x))): style pooling, channel-wise FC"

    def __init__(self, channels: int, *, gate: str | type[nn.Module] = "sigmoid", eps: float = 1e-5):
        super().__init__()
        self.channels = check_channels(channels)
        self.eps = eps
        self.cfc = nn.Parameter(torch.zeros(channels, 2))  # w_c = [w_μ, w_σ]
        self.bn = nn.BatchNorm2d(channels)
        self.gate = create_gate(gate)

    def style(self, x: torch.Tensor) -> torch.Tensor:
        """t = [μ, σ] per channel, shaped (B, C, 2)."""
        mean = x.mean((2, 3))  # (B, C)
        std = (x.var((2, 3), correction=0) + self.eps).sqrt()  # (B, C)
        return torch.stack([mean, std], dim=-1)

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """g, shaped (B, C, 1, 1)."""
        check_input(x, self.channels, type(self).__name__)
        z = (self.style(x) * self.cfc).sum(-1)  # (B, C), eq. 3
        return self.gate(self.bn(z[:, :, None, None]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excitation(x)
