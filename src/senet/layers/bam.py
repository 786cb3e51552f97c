"""BAM, the bottleneck attention module (Park et al., "BAM: Bottleneck Attention Module",
arXiv 1807.06514).

    Mc(F) = BN(W1 (ReLU(BN(W0 avgpool(F) + b0))) + b1)          (eq. 3, (B, C, 1, 1))
    Ms(F) = BN(f1x1_{C/r→1}(f3x3_d4(f3x3_d4(f1x1_{C→C/r}(F)))))  (eq. 4, (B, 1, H, W); each inner
            conv followed by BN + ReLU, dilation d = 4)
    M(F)  = σ(Mc(F) + Ms(F))                                    (eq. 2, broadcast to (B, C, H, W))
    F'    = F + F ⊗ M(F)                                        (eq. 1)

The paper's equations sum the branches; the authors' released code multiplies them
(``combine="mul"``). Every conv/FC has a bias (their code); the final BN of each branch in eq. 3/4
is the paper's, the released code omits it: ``final_bn=False``.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import NoScript, check_channels, check_choice, check_input, create_act, create_gate, hidden_width


def _conv_bn_act(cin: int, cout: int, kernel_size: int, dilation: int, act: nn.Module) -> nn.Sequential:
    pad = dilation * (kernel_size - 1) // 2  # "same" size
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size, padding=pad, dilation=dilation),
                         nn.BatchNorm2d(cout), act)


class BAM(NoScript, nn.Module):
    """BAM: ``x + x * σ(Mc(x) + Ms(x))``, a channel MLP branch and a dilated-conv spatial branch.

    Args:
        channels: C.
        reduction, hidden, divisor, hidden_from: the bottleneck width C/r of both branches (r = 16).
        dilation: of the two 3x3 spatial convs (4 in the paper). num_dilated: how many (2).
        combine: ``"add"`` (the paper, eq. 2) or ``"mul"`` (the authors' code).
        final_bn: BN on each branch's output (eq. 3/4); the released code has none.
        act: the inner activation (ReLU). gate: σ.
    """

    paper = "BAM: Bottleneck Attention Module (Park et al.)"
    arxiv = "1807.06514"
    summary = "x + x * σ(Mc(x) + Ms(x)): channel MLP branch plus dilated-conv spatial branch"

    def __init__(
        self,
        channels: int,
        *,
        reduction: float = 16,
        hidden: int | None = None,
        divisor: int = 1,
        hidden_from: int | None = None,
        dilation: int = 4,
        num_dilated: int = 2,
        combine: str = "add",
        final_bn: bool = True,
        act: str | type[nn.Module] = "relu",
        gate: str | type[nn.Module] = "sigmoid",
    ):
        super().__init__()
        self.channels = check_channels(channels)
        self.hidden = h = hidden_width(channels, reduction, hidden, divisor, hidden_from)
        self.combine = check_choice("combine", combine, ("add", "mul"))
        for name, value, low in (("dilation", dilation, 1), ("num_dilated", num_dilated, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"BAM {name} must be an integer >= {low} (paper: 4 and 2), got {value!r}")
        # channel branch on the pooled (B, C, 1, 1) descriptor; 1x1 convs == the paper's FCs
        self.channel = nn.Sequential(_conv_bn_act(channels, h, 1, 1, create_act(act)),
                                     nn.Conv2d(h, channels, 1),
                                     nn.BatchNorm2d(channels) if final_bn else nn.Identity())
        self.spatial = nn.Sequential(
            _conv_bn_act(channels, h, 1, 1, create_act(act)),
            *[_conv_bn_act(h, h, 3, dilation, create_act(act)) for _ in range(num_dilated)],
            nn.Conv2d(h, 1, 1),
            nn.BatchNorm2d(1) if final_bn else nn.Identity(),
        )
        self.gate = create_gate(gate)

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """M(F), shaped (B, C, H, W)."""
        check_input(x, self.channels, type(self).__name__)
        mc = self.channel(x.mean((2, 3), keepdim=True))  # (B, C, 1, 1)
        ms = self.spatial(x)  # (B, 1, H, W)
        return self.gate(mc + ms if self.combine == "add" else mc * ms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x * self.excitation(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}, combine={self.combine}"
