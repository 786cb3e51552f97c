"""CBAM, the convolutional block attention module (Woo et al., "CBAM: Convolutional Block Attention
Module", arXiv 1807.06521).

    Mc(F) = σ(MLP(avgpool(F)) + MLP(maxpool(F)))      (eq. 2, shared MLP W1 δ(W0 ·), (B, C, 1, 1))
    F'    = Mc(F) ⊗ F
    Ms(F') = σ(f7x7([meanc(F'); maxc(F')]))           (eq. 3, (B, 1, H, W))
    F''   = Ms(F') ⊗ F'                                (eq. 1, channel then spatial, in sequence)

The spatial conv is the authors' ``BasicConv(2, 1, 7, relu=False)``: a bias-free 7x7 conv then
BatchNorm, as in timm's ``CbamModule`` (``ConvNormAct(2, 1, 7, apply_act=False)``). The MLP has
biases by default as in the authors' code (its ``nn.Linear``); that layout gives the paper's
ResNet-50 + CBAM count of 28.09M. timm defaults to ``mlp_bias=False``: pass ``bias=False``.
``cbam_from_timm`` / ``cbam_to_timm`` rename state-dict keys between the two layouts.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import NoScript, check_channels, check_input, create_act, create_gate, hidden_width


class CBAM(NoScript, nn.Module):
    """CBAM: channel attention (avg + max descriptors, shared MLP) then 7x7 spatial attention.

    Args:
        channels: C.
        reduction, hidden, divisor, hidden_from: the MLP hidden width (C // 16 by default).
        bias: MLP biases (authors' code: yes; timm's default: no).
        kernel_size: the spatial conv's odd kernel (7 in the paper; 3 in its ablation).
        act: δ inside the MLP. gate: σ for both attention maps.
    """

    paper = "CBAM: Convolutional Block Attention Module (Woo et al.)"
    arxiv = "1807.06521"
    summary = "channel σ(MLP(avg)+MLP(max)) then spatial σ(conv7x7([mean_c; max_c])), in sequence"

    def __init__(
        self,
        channels: int,
        *,
        reduction: float = 16,
        hidden: int | None = None,
        divisor: int = 1,
        hidden_from: int | None = None,
        bias: bool = True,
        kernel_size: int = 7,
        act: str | type[nn.Module] = "relu",
        gate: str | type[nn.Module] = "sigmoid",
    ):
        super().__init__()
        self.channels = check_channels(channels)
        self.hidden = hidden_width(channels, reduction, hidden, divisor, hidden_from)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 \
                or kernel_size % 2 == 0:
            raise ValueError(f"CBAM kernel_size must be a positive odd integer (7 in the paper), got {kernel_size!r}")
        self.fc1 = nn.Conv2d(channels, self.hidden, 1, bias=bias)  # W0
        self.act = create_act(act)
        self.fc2 = nn.Conv2d(self.hidden, channels, 1, bias=bias)  # W1
        self.spatial_conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.spatial_bn = nn.BatchNorm2d(1)
        self.gate = create_gate(gate)

    def mlp(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(z)))

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """The channel attention Mc(F), shaped (B, C, 1, 1)."""
        check_input(x, self.channels, type(self).__name__)
        return self.gate(self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True)))

    def spatial_excitation(self, f: torch.Tensor) -> torch.Tensor:
        """The spatial attention Ms(F') of the channel-refined F', shaped (B, 1, H, W)."""
        pooled = torch.cat([f.mean(1, keepdim=True), f.amax(1, keepdim=True)], dim=1)  # (B, 2, H, W)
        return self.gate(self.spatial_bn(self.spatial_conv(pooled)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x * self.excitation(x)  # F'
        return f * self.spatial_excitation(f)  # F''

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}"


# (timm CbamModule prefix, ours)
_TIMM_KEYS = (
    ("channel.fc1.", "fc1."),
    ("channel.fc2.", "fc2."),
    ("spatial.conv.conv.", "spatial_conv."),
    ("spatial.conv.bn.", "spatial_bn."),
)


def _rename(state_dict: dict[str, torch.Tensor], pairs: tuple[tuple[str, str], ...]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        match = next((p for p in pairs if key.startswith(p[0])), None)
        if match is None:
            raise ValueError(f"unexpected key {key!r}; expected keys starting with {[p[0] for p in pairs]}")
        out[match[1] + key[len(match[0]):]] = value
    return out


def cbam_from_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ``CbamModule`` state dict renamed for ``CBAM.load_state_dict``."""
    return _rename(state_dict, _TIMM_KEYS)


def cbam_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``CBAM`` state dict renamed for timm's ``CbamModule.load_state_dict``."""
    return _rename(state_dict, tuple((ours, theirs) for theirs, ours in _TIMM_KEYS))
