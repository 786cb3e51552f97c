"""Selective Kernel convolution (Li et al., "Selective Kernel Networks", arXiv 1903.06586).

    Split:  U_m = ReLU(BN(conv3x3_{dil m}(X)))      branches; 3x3 dilation 2 stands in for 5x5 (Sec. 3.1)
    Fuse:   U = Σ_m U_m,  s = avgpool(U)            (eq. 1-2, (B, C, 1, 1))
            z = δ(BN(W s)),  W: d x C,  d = max(C / r, L)      (eq. 3-4; r = 16, L = 32)
    Select: a_m = softmax_m(A_m z)  per channel      (eq. 5, A_m: C x d)
            V = Σ_m a_m ⊙ U_m                        (eq. 6)

Unlike the other blocks SK replaces a conv: its output is V, not ``x`` rescaled; channels in ==
channels out. The A_m are stored as one 1x1 conv with M·C outputs, branch-major (rows
``[m C, (m+1) C)`` are A_m), the layout of timm's ``SelectiveKernel(split_input=False)``.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import NoScript, check_channels, check_input, create_act, floored_width


class SelectiveKernel(NoScript, nn.Module):
    """SK unit: branches of 3x3 convs with growing dilation, fused, then softly selected per channel.

    Args:
        channels: C (in == out).
        dilations: one 3x3 branch per entry; ``(1, 2)`` is the paper's 3x3 + "5x5" pair.
        groups: of every branch conv (the paper's SKNet-50 uses 32; must divide C).
        reduction, hidden, divisor, hidden_from: d = max(C // r, min_hidden), ``hidden`` overrides.
        min_hidden: L, the floor of d (32).
        act: the activation after every BN (ReLU).
    """

    paper = "Selective Kernel Networks (Li et al.)"
    arxiv = "1903.06586"
    summary = "Σ_m softmax_m(A_m δ(BN(W avgpool(Σ U_m)))) ⊙ U_m over 3x3 branches of dilation 1 and 2"

    def __init__(
        self,
        channels: int,
        *,
        dilations: tuple[int, ...] = (1, 2),
        groups: int = 1,
        reduction: float = 16,
        hidden: int | None = None,
        divisor: int = 1,
        hidden_from: int | None = None,
        min_hidden: int = 32,
        act: str | type[nn.Module] = "relu",
    ):
        super().__init__()
        self.channels = check_channels(channels)
        dilations = tuple(dilations) if isinstance(dilations, (list, tuple)) else dilations
        if not isinstance(dilations, tuple) or len(dilations) < 2 \
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dilations):
            raise ValueError(f"SK dilations must be a tuple of >= 2 positive integers, e.g. (1, 2), got {dilations!r}")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or channels % groups:
            raise ValueError(f"SK groups must be a positive divisor of channels={channels}, got {groups!r}")
        self.dilations = dilations
        self.hidden = floored_width(channels, reduction, hidden, divisor, hidden_from, min_hidden)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=d, dilation=d, groups=groups, bias=False),
                          nn.BatchNorm2d(channels), create_act(act))
            for d in dilations
        )
        self.fc_reduce = nn.Conv2d(channels, self.hidden, 1, bias=False)  # W
        self.bn = nn.BatchNorm2d(self.hidden)
        self.act = create_act(act)
        self.fc_select = nn.Conv2d(self.hidden, channels * len(dilations), 1, bias=False)  # [A_1; ...; A_M]

    def _select(self, u: torch.Tensor) -> torch.Tensor:
        """(B, M, C, H, W) branch outputs -> (B, M, C, 1, 1) weights, summing to 1 over M."""
        s = u.sum(1).mean((2, 3), keepdim=True)  # (B, C, 1, 1), eq. 1-2
        z = self.act(self.bn(self.fc_reduce(s)))  # (B, d, 1, 1), eq. 3
        logits = self.fc_select(z).unflatten(1, (len(self.dilations), self.channels))  # (B, M, C, 1, 1)
        return logits.softmax(dim=1)  # eq. 5

    def branch_outputs(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, type(self).__name__)
        return torch.stack([branch(x) for branch in self.branches], dim=1)  # (B, M, C, H, W)

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """The selection weights a_m, shaped (B, M, C, 1, 1)."""
        return self._select(self.branch_outputs(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.branch_outputs(x)
        return (u * self._select(u)).sum(1)  # V, eq. 6

    def extra_repr(self) -> str:
        return f"channels={self.channels}, dilations={self.dilations}, hidden={self.hidden}"
