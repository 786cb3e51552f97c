"""The SE variants compared in the ECA paper (Wang et al., "ECA-Net", arXiv 1910.03151, Table 2).

    SE-Var1: s = σ(y)            no parameters
    SE-Var2: s = σ(w ⊙ y)        one weight per channel (C)
    SE-Var3: s = σ(W y)          one full C x C FC (C²)
    SE-GC:   s = σ(GC_g(y))      one grouped FC with g groups (C²/g)

with y = avgpool(x), applied as x * s. None of them has a bias (the paper's parameter counts).
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import NoScript, check_channels, check_input, create_gate


class _Variant(NoScript, nn.Module):
    paper = "ECA-Net: Efficient Channel Attention (Wang et al.), Table 2"
    arxiv = "1910.03151"

    def __init__(self, channels: int, gate: str | type[nn.Module]):
        super().__init__()
        self.channels = check_channels(channels)
        self.gate = create_gate(gate)

    def transform(self, y: torch.Tensor) -> torch.Tensor:  # (B, C, 1, 1) -> (B, C, 1, 1)
        raise NotImplementedError

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, type(self).__name__)
        return self.gate(self.transform(x.mean((2, 3), keepdim=True)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excitation(x)


class SEVar1(_Variant):
    """SE-Var1: ``x * σ(avgpool(x))``, parameter-free."""

    summary = "x * σ(avgpool(x)): no parameters"

    def __init__(self, channels: int, *, gate: str | type[nn.Module] = "sigmoid"):
        super().__init__(channels, gate)

    def transform(self, y):
        return y


class SEVar2(_Variant):
    """SE-Var2: ``x * σ(w ⊙ avgpool(x))``, one weight per channel."""

    summary = "x * σ(w ⊙ avgpool(x)): one weight per channel"

    def __init__(self, channels: int, *, gate: str | type[nn.Module] = "sigmoid"):
        super().__init__(channels, gate)
        self.weight = nn.Parameter(torch.ones(channels))

    def transform(self, y):
        return y * self.weight.view(1, -1, 1, 1)


class SEVar3(_Variant):
    """SE-Var3: ``x * σ(W avgpool(x))``, one full C x C FC without bias."""

    summary = "x * σ(W avgpool(x)): one full CxC FC"

    def __init__(self, channels: int, *, gate: str | type[nn.Module] = "sigmoid"):
        super().__init__(channels, gate)
        self.fc = nn.Conv2d(channels, channels, 1, bias=False)

    def transform(self, y):
        return self.fc(y)


class SEGroupConv(_Variant):
    """SE-GC: ``x * σ(GC_g(avgpool(x)))``, one grouped FC with ``groups`` groups (C²/g weights).

    The paper's SE-GC1 uses 16 groups, SE-GC2 C/16 groups, SE-GC3 C/8 groups.
    """

    summary = "x * σ(GC_g(avgpool(x))): one grouped FC, g groups (default 16)"

    def __init__(self, channels: int, *, groups: int = 16, gate: str | type[nn.Module] = "sigmoid"):
        super().__init__(channels, gate)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or channels % groups:
            raise ValueError(f"SE-GC groups must be a positive divisor of channels={channels}, got {groups!r}")
        self.groups = groups
        self.fc = nn.Conv2d(channels, channels, 1, groups=groups, bias=False)

    def transform(self, y):
        return self.fc(y)
