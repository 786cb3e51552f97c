"""Gather-Excite (Hu et al., "Gather-Excite: Exploiting Feature Context in Convolutional Neural
Networks", arXiv 1810.12348).

    gather ξ_G:  x -> g, (B, C, ⌈H/e⌉, ⌈W/e⌉), pooling each position's neighbourhood of extent e
                 (e = 0: global, (B, C, 1, 1))
    excite ξ_E:  y = x ⊙ σ(interp(g))      nearest-neighbour upsampling back to (H, W)

GE-θ⁻ (``"ge"``) gathers by average pooling and has no parameters; with the global extent it is
SE without the MLP. GE-θ (``"ge_param"``) gathers by log2(e) depthwise 3x3 stride-2 convs, each
followed by BN (ReLU between them), or for the global extent by one depthwise conv covering the
whole (fixed) feature map. ``mlp=True`` adds the SE-style 1x1-conv MLP on the gathered map (GE-θ+).

The pooling window for e > 0 is 2e-1 wide with stride e and padding e-1, averaging only real
pixels, as in timm's ``GatherExcite``; the state-dict names (``gather.conv1``, ``gather.norm1``,
``mlp.fc1``, ...) are timm's too.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

from ._common import NoScript, check_channels, check_input, create_act, create_gate, hidden_width


class AvgGather(NoScript, nn.Module):
    """Parameter-free gather: global mean (extent 0) or average pooling of extent e."""

    def __init__(self, extent: int):
        super().__init__()
        self.extent = extent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.extent
        if e == 0:
            return x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
        # (B, C, ⌈H/e⌉, ⌈W/e⌉): window 2e-1, stride e, padding e-1 not counted
        return F.avg_pool2d(x, 2 * e - 1, stride=e, padding=e - 1, count_include_pad=False)

    def extra_repr(self) -> str:
        return f"extent={self.extent}"


def _param_gather(channels: int, extent: int, feat_size: tuple[int, int] | None, act) -> nn.Sequential:
    if extent == 0:  # one depthwise conv over the whole map -> (B, C, 1, 1)
        return nn.Sequential(OrderedDict(conv1=nn.Conv2d(channels, channels, feat_size, groups=channels, bias=False),
                                         norm1=nn.BatchNorm2d(channels)))
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    steps = int(math.log2(extent))  # each stride-2 conv halves H and W
    for i in range(1, steps + 1):
        layers[f"conv{i}"] = nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False)
        layers[f"norm{i}"] = nn.BatchNorm2d(channels)
        if i < steps:
            layers[f"act{i}"] = create_act(act)
    return nn.Sequential(layers)


def _check_extent(extent: int, params: bool) -> int:
    if isinstance(extent, bool) or not isinstance(extent, int) or extent < 0:
        raise ValueError(f"GE extent must be an integer >= 0 (0 = global), got {extent!r}")
    if params and extent and (extent < 2 or extent & (extent - 1)):
        raise ValueError(f"parametric GE extent must be 0 (global) or a power of two (2, 4, 8, ...) since each "
                         f"stride-2 conv halves the map, got {extent!r}")
    return extent


class GatherExcite(NoScript, nn.Module):
    """GE block: ``x * σ(upsample(mlp(gather(x))))``.

    Args:
        channels: C.
        extent: e, the gather extent ratio; 0 = global.
        params: parametric gather (GE-θ) instead of average pooling (GE-θ⁻).
        feat_size: (H, W) of the input; needed only by the parametric global gather.
        mlp: add the 1x1-conv MLP (with biases) on the gathered map (GE-θ+).
        reduction, hidden, divisor, hidden_from: the MLP hidden width (C // 16).
        act: activation of the MLP and between gather convs. gate: σ.
    """

    paper = "Gather-Excite: Exploiting Feature Context in CNNs (Hu et al.)"
    arxiv = "1810.12348"
    summary = "x * σ(nearest_upsample(avgpool_e(x))): parameter-free gather of extent e (0 = global), excite"

    def __init__(
        self,
        channels: int,
        *,
        extent: int = 0,
        params: bool = False,
        feat_size: int | tuple[int, int] | None = None,
        mlp: bool = False,
        reduction: float = 16,
        hidden: int | None = None,
        divisor: int = 1,
        hidden_from: int | None = None,
        act: str | type[nn.Module] = "relu",
        gate: str | type[nn.Module] = "sigmoid",
    ):
        super().__init__()
        self.channels = check_channels(channels)
        self.extent = _check_extent(extent, params)
        self.feat_size = None
        if params and extent == 0:
            self.feat_size = _check_feat_size(feat_size)
        self.gather = _param_gather(channels, extent, self.feat_size, act) if params else AvgGather(extent)
        self.mlp = nn.Identity()
        if mlp:
            h = hidden_width(channels, reduction, hidden, divisor, hidden_from)
            self.mlp = nn.Sequential(OrderedDict(fc1=nn.Conv2d(channels, h, 1), act=create_act(act),
                                                 fc2=nn.Conv2d(h, channels, 1)))
        self.gate = create_gate(gate)

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """σ of the gathered map, (B, C, 1, 1) for the global extent, else upsampled to (B, C, H, W)."""
        check_input(x, self.channels, type(self).__name__)
        if self.feat_size is not None and tuple(x.shape[-2:]) != self.feat_size:
            raise ValueError(f"GatherExcite was built with feat_size={self.feat_size} for its global depthwise "
                             f"gather but the input is {tuple(x.shape[-2:])}; rebuild it with that feat_size")
        g = self.mlp(self.gather(x))  # (B, C, H', W'); (B, C, 1, 1) for the global extent
        if self.extent:  # decided at build time, not from traced shapes
            g = F.interpolate(g, size=x.shape[-2:], mode="nearest")  # excite: back to (H, W)
        return self.gate(g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excitation(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, extent={self.extent}"


def _check_feat_size(feat_size) -> tuple[int, int]:
    if isinstance(feat_size, int) and not isinstance(feat_size, bool):
        feat_size = (feat_size, feat_size)
    if not (isinstance(feat_size, (tuple, list)) and len(feat_size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in feat_size)):
        raise ValueError(f"parametric GE with extent=0 (global) needs feat_size=(H, W) of its input, got "
                         f"{feat_size!r}; pass it, or use extent=2/4/8 which work for any size")
    return tuple(feat_size)


def ge_param(channels: int, **kwargs) -> GatherExcite:
    """GE-θ: parametric gather of depthwise stride-2 convs + BN, extent 8 by default."""
    return GatherExcite(channels, **{"extent": 8, **kwargs, "params": True})


ge_param.paper, ge_param.arxiv = GatherExcite.paper, GatherExcite.arxiv
ge_param.summary = "x * σ(upsample(BN(dwconv3x3_s2(...)))): parametric gather of extent e (default 8), excite"
