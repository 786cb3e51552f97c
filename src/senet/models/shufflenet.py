"""ShuffleNet v1 (groups g = 3, width 1x) and SE-ShuffleNet.

Papers: ShuffleNet (Zhang et al., arXiv 1707.01083, Table 1 and Fig. 2), SENet (Hu et al.,
arXiv 1709.01507, Table 3: ShuffleNet 1x (g = 3) 0.140 GFLOPs / 1.8M parameters -> SE 0.142 / 2.4M).

A unit (Fig. 2b/c): 1x1 group conv + BN + ReLU -> channel shuffle -> 3x3 depthwise conv (stride) + BN
-> 1x1 group conv + BN -> attention, then ``relu(x + branch)`` (stride 1) or
``relu(cat(avgpool3x3/2(x), branch))`` (stride 2). The bottleneck is a quarter of the stage's output
channels; the first unit's first 1x1 conv is not grouped (24 input channels, Sec. 3.3). The attention
sits on the residual branch, before the addition / concatenation, as the SE paper's SE-ResNet module
(Fig. 3): its 0.61M parameters (r = 16, bias-free) are the 1.8M -> 2.4M of Table 3.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from senet.layers._common import NoScript
from senet.layers.pool import MaxPool2d

from ._attn import AttnFactory, stage_attention
from ._head import PooledClassifier
from .registry import SENET_PAPER, build_variant, register_model
from .vgg import init_weights

# groups -> output channels of stages 2, 3, 4 at width 1x: ShuffleNet Table 1.
_WIDTHS = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960), 4: (272, 544, 1088), 8: (384, 768, 1536)}
_DEPTHS = (4, 8, 4)  # units per stage (Table 1: 1 + 3, 1 + 7, 1 + 3)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, g * n, H, W) -> view (B, g, n, H, W) -> transpose -> (B, n * g, H, W) (Sec. 3.1, Fig. 1c)."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class ShuffleUnit(NoScript, nn.Module):
    """ShuffleNet unit with ``attn`` on the residual branch (before the add / concat)."""

    def __init__(self, cin: int, cout: int, *, stride: int, groups: int, mid: int, group_first: bool,
                 make_attn: AttnFactory):
        super().__init__()
        branch = cout - cin if stride == 2 else cout  # stride 2: the branch fills what the shortcut lacks
        self.groups, self.stride = groups, stride
        self.conv1, self.bn1 = _conv_bn(cin, mid, 1, groups=groups if group_first else 1)
        self.conv2, self.bn2 = _conv_bn(mid, mid, 3, stride, groups=mid)
        self.conv3, self.bn3 = _conv_bn(mid, branch, 1, groups=groups)
        self.act = nn.ReLU(inplace=True)
        self.attn = make_attn(branch)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()
        self._shuffle = groups if group_first else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(self.act(self.bn1(self.conv1(x))), self._shuffle)  # (B, mid, H, W)
        out = self.bn3(self.conv3(self.bn2(self.conv2(out))))  # (B, branch, H/s, W/s)
        out = self.attn(out)
        if self.stride == 2:
            return self.act(torch.cat([self.shortcut(x), out], 1))  # (B, cout, H/2, W/2)
        return self.act(x + out)


class ShuffleNetV1(PooledClassifier):
    """ShuffleNet v1 with ``attn`` in every unit of the chosen stages.

    Args:
        groups: g of the 1x1 group convs (1, 2, 3, 4 or 8; Table 1). width_mult: the paper's "s x"
            (0.25, 0.5, 1, ...) scaling every stage width (kept a multiple of g, bottleneck of 4g).
        attn, attn_kwargs, attn_stages: as ``ResNet`` (3 stages: ``stage2``, ``stage3``, ``stage4``).
        num_classes, in_chans, drop_rate, features_only (the three stage maps, strides 8, 16, 32).
    """

    def __init__(self, *, groups: int = 3, width_mult: float = 1.0, attn: str | None = None,
                 attn_kwargs: Mapping | Sequence[Mapping] | None = None, attn_stages: Iterable[int] | None = None,
                 num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, features_only: bool = False):
        super().__init__()
        if groups not in _WIDTHS:
            raise ValueError(f"groups must be one of {list(_WIDTHS)} (ShuffleNet Table 1), got {groups!r}")
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
            raise ValueError(f"width_mult must be a positive number (1.0 = ShuffleNet 1x), got {width_mult!r}")
        factories = stage_attention(attn, attn_kwargs, attn_stages, 3)
        stem = 24 if width_mult >= 1 else max(groups, int(24 * width_mult) // groups * groups)
        self.conv1 = nn.Sequential(*_conv_bn(in_chans, stem, 3, 2), nn.ReLU(inplace=True))  # (B, 24, H/2, W/2)
        self.maxpool = MaxPool2d(3, 2, 1)  # (B, 24, H/4, W/4)
        self.feature_info, cin = [], stem
        for k, (width, depth) in enumerate(zip(_WIDTHS[groups], _DEPTHS, strict=True)):
            cout = int(width * width_mult) // (4 * groups) * (4 * groups)  # bottleneck cout/4 splits into g
            units = []
            for j in range(depth):
                units.append(ShuffleUnit(cin, cout, stride=2 if j == 0 else 1, groups=groups, mid=cout // 4,
                                         group_first=not (k == 0 and j == 0), make_attn=factories[k]))
                cin = cout
            self.add_module(f"stage{k + 2}", nn.Sequential(*units))
            self.feature_info.append({"module": f"stage{k + 2}", "channels": cout, "reduction": 8 * 2 ** k})
        self._add_head(cin, num_classes, drop_rate, features_only)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.conv1(x))
        feats = []
        for stage in (self.stage2, self.stage3, self.stage4):
            x = stage(x)
            feats.append(x)
        return feats


_SHUFFLE = "ShuffleNet (Zhang et al.), arXiv 1707.01083"



@register_model(paper=_SHUFFLE)
def shufflenet_v1_g3(**kwargs) -> ShuffleNetV1:
    """ShuffleNet 1x, g = 3 (Table 1; SENet Table 3 baseline 0.140 GFLOPs, 1.8M parameters)."""
    return build_variant(ShuffleNetV1, {"groups": 3}, kwargs)


@register_model(paper=SENET_PAPER)
def se_shufflenet_v1_g3(**kwargs) -> ShuffleNetV1:
    """SE-ShuffleNet 1x (g = 3): SE (r = 16, bias-free FCs) on each unit's branch (SENet Table 3)."""
    return build_variant(ShuffleNetV1, {"groups": 3, "attn": "se"}, kwargs)
