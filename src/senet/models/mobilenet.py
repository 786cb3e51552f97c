"""MobileNet v1, v2 and v3 with any attention block; SE-MobileNet, SE/ECA-MobileNetV2.

Papers: MobileNets (Howard et al., arXiv 1704.04861, Table 1), MobileNetV2 (Sandler et al.,
arXiv 1801.04381, Table 2), MobileNetV3 (Howard et al., arXiv 1905.02244, Tables 1-2), SENet
(Hu et al., arXiv 1709.01507, Table 3: SE-MobileNet 0.572 GFLOPs, 4.7M parameters), ECA-Net
(Wang et al., arXiv 1910.03151: ECA-MobileNetV2).

Where the attention goes:
    v1   after each depthwise-separable block (dw 3x3 + BN + ReLU, pw 1x1 + BN + ReLU), SENet Table 3
    v2   on the block's output (after the linear 1x1 projection + BN), before the residual addition;
         the ECA-MobileNetV2 of the ECA code release (k = 1 below 96 channels, else 3)
    v3   between the depthwise conv and the projection, in the blocks the paper marks "SE"
         (hidden make_divisible(expanded / 4, 8), hard-sigmoid gate: the ``se_mobilenetv3`` preset)

v2/v3 parameter names are torchvision's (``features.N``, ``classifier.N``), so torchvision
``mobilenet_v2`` / ``mobilenet_v3_large`` / ``mobilenet_v3_small`` state dicts load by name. In v2
the attention is a sibling of torchvision's ``conv`` (``features.N.attn.*``, new keys); in v3 it sits
in torchvision's own slot ``features.N.block.{1|2}`` (the SE's ``fc1``/``fc2`` are torchvision's).

"Stages" (``attn_stages``, per-stage ``attn_kwargs``) are: v1 and v3, the runs of blocks at one
resolution (a stride-2 block starts a new stage; v1: 5, v3 large: 5, small: 4); v2, the seven rows
of its Table 2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial

import torch
from torch import nn

from senet.layers import make_divisible
from senet.layers._common import NoScript

from ._attn import AttnFactory, stage_attention
from ._head import check_images
from .registry import ECA_PAPER, SENET_PAPER, build_variant, register_model
from .vgg import init_weights

ActLayer = Callable[[], nn.Module]
_BN_V3 = {"eps": 1e-3, "momentum": 0.01}  # MobileNetV3's BN (TF defaults), as torchvision


def conv_bn_act(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                act: ActLayer | None = nn.ReLU, **bn) -> nn.Sequential:
    """Conv (no bias) + BN [+ activation]: keys ``.0`` (conv) and ``.1`` (BN), as torchvision's."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout, **bn)]
    return nn.Sequential(*layers, *([act()] if act is not None else []))


def _relu6() -> nn.Module:
    return nn.ReLU6(inplace=True)


def _check_width(width: float) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"width_mult must be a positive number (1.0 = the paper's network), got {width!r}")
    return width


class _Net(NoScript, nn.Module):
    """Shared body: ``features`` (stem + blocks + last conv), global pooling, ``classifier``."""

    def _finish(self, layers: list[nn.Module], stage_ends: list[tuple[int, int]], features_only: bool) -> None:
        # stage_ends: (index in features, channels) of each stage's last module.
        self.features = nn.Sequential(*layers)
        self.feature_info = [{"module": f"features.{i}", "channels": c, "reduction": 2 ** (k + 1)}
                             for k, (i, c) in enumerate(stage_ends)]
        self._taps = {i for i, _ in stage_ends}
        self.features_only = features_only
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of each stage (strides 2, 4, 8, ...)."""
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._taps:
                feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_images(x, self)
        if self.features_only:
            return self.forward_features(x)
        return self.classifier(self.features(x).mean((2, 3)))  # (B, C) -> (B, num_classes)


def _stage_of(strides: Sequence[int]) -> list[int]:
    """0-based resolution stage of each block: a stride-2 block opens a new one (first block: stage 0)."""
    stages, s = [], 0
    for j, stride in enumerate(strides):
        s += int(stride == 2 and j > 0)
        stages.append(s)
    return stages


# ----------------------------------------------------------------------------- v1

# (output channels, stride) of the 13 depthwise-separable blocks: MobileNets Table 1.
_V1 = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
       (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


class DepthwiseSeparable(NoScript, nn.Module):
    """dw 3x3 + BN + ReLU, pw 1x1 + BN + ReLU, then attention (SENet Table 3's SE-MobileNet)."""

    def __init__(self, cin: int, cout: int, stride: int, make_attn: AttnFactory):
        super().__init__()
        self.dw = conv_bn_act(cin, cin, 3, stride, groups=cin)
        self.pw = conv_bn_act(cin, cout, 1)
        self.attn = make_attn(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.pw(self.dw(x)))


class MobileNetV1(_Net):
    """MobileNet v1 (``width_mult`` = the paper's α) with ``attn`` after every depthwise-separable block.

    Args: attn, attn_kwargs, attn_stages (5 resolution stages), num_classes, in_chans,
    drop_rate (before the classifier), features_only (the 5 stage outputs, strides 2..32).
    """

    def __init__(self, *, width_mult: float = 1.0, attn: str | None = None,
                 attn_kwargs: Mapping | Sequence[Mapping] | None = None, attn_stages: Iterable[int] | None = None,
                 num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, features_only: bool = False):
        super().__init__()
        width_mult = _check_width(width_mult)
        stages = _stage_of([s for _, s in _V1])
        factories = stage_attention(attn, attn_kwargs, attn_stages, stages[-1] + 1)
        cin = int(32 * width_mult)
        layers: list[nn.Module] = [conv_bn_act(in_chans, cin, 3, 2)]  # (B, 32, H/2, W/2)
        for (c, stride), s in zip(_V1, stages, strict=True):
            cout = int(c * width_mult)
            layers.append(DepthwiseSeparable(cin, cout, stride, factories[s]))
            cin = cout
        ends = [(j + 1, int(_V1[j][0] * width_mult)) for j in range(len(stages))
                if j == len(stages) - 1 or stages[j + 1] != stages[j]]
        self.num_features = cin
        if not features_only:
            self.classifier = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(cin, num_classes))
        self._finish(layers, ends, features_only)


# ----------------------------------------------------------------------------- v2

# (expansion t, output channels c, repeats n, first stride s): MobileNetV2 Table 2.
_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidualV2(NoScript, nn.Module):
    """[1x1 expand + BN + ReLU6] -> dw 3x3 + BN + ReLU6 -> 1x1 linear projection + BN -> attention,
    plus the input when the shapes allow. ``conv`` has torchvision's layout."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, make_attn: AttnFactory):
        super().__init__()
        hidden = int(round(cin * expand))
        layers = [conv_bn_act(cin, hidden, 1, act=_relu6)] if expand != 1 else []
        layers += [conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=_relu6),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.attn = make_attn(cout)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.attn(self.conv(x))
        return x + out if self.use_res else out


class MobileNetV2(_Net):
    """MobileNetV2 with ``attn`` on every inverted-residual block's output (before the addition).

    Args: width_mult (channels rounded to multiples of 8, as the paper's code), attn, attn_kwargs,
    attn_stages (the 7 rows of Table 2), num_classes, in_chans, drop_rate (0.2, torchvision),
    features_only (the outputs at strides 2, 4, 8, 16, 32).
    """

    def __init__(self, *, width_mult: float = 1.0, attn: str | None = None,
                 attn_kwargs: Mapping | Sequence[Mapping] | None = None, attn_stages: Iterable[int] | None = None,
                 num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.2, features_only: bool = False):
        super().__init__()
        width_mult = _check_width(width_mult)
        factories = stage_attention(attn, attn_kwargs, attn_stages, len(_V2))
        cin = make_divisible(32 * width_mult, 8)
        last = make_divisible(1280 * max(1.0, width_mult), 8)
        layers: list[nn.Module] = [conv_bn_act(in_chans, cin, 3, 2, act=_relu6)]
        strides = []
        for row, (t, c, n, s) in enumerate(_V2):
            cout = make_divisible(c * width_mult, 8)
            for j in range(n):
                layers.append(InvertedResidualV2(cin, cout, s if j == 0 else 1, t, factories[row]))
                strides.append(s if j == 0 else 1)
                cin = cout
        layers.append(conv_bn_act(cin, last, 1, act=_relu6))  # (B, 1280, H/32, W/32)
        self.num_features = last
        if not features_only:
            self.classifier = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(last, num_classes))
        self._finish(layers, _resolution_ends(layers, strides), features_only)


def _resolution_ends(layers: list[nn.Module], strides: list[int]) -> list[tuple[int, int]]:
    # Blocks are features[1..len(strides)]; a stage ends before each stride-2 block, and at the last
    # module (the final 1x1 conv, whose BN gives its channels).
    ends = [(j, _out_channels(layers[j])) for j in range(len(strides)) if strides[j] == 2]
    return ends + [(len(layers) - 1, _out_channels(layers[-1]))]


def _out_channels(module: nn.Module) -> int:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


# ----------------------------------------------------------------------------- v3

# (kernel, expanded, out, SE, activation, stride): MobileNetV3 Table 1 (large) and Table 2 (small).
_V3_LARGE = (
    (3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1), (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1), (5, 960, 160, True, "HS", 1),
)
_V3_SMALL = (
    (3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1),
)
# Per variant: rows, width of the hidden classifier layer (Tables 1-2: 1280 / 1024).
_V3 = {"large": (_V3_LARGE, 1280), "small": (_V3_SMALL, 1024)}
_V3_ACTS: dict[str, ActLayer] = {"RE": partial(nn.ReLU, inplace=True), "HS": nn.Hardswish}


class InvertedResidualV3(NoScript, nn.Module):
    """[1x1 expand] -> dw kxk -> attention (SE rows only) -> 1x1 linear projection, + input if shapes allow.

    ``block`` has torchvision's indices: the attention takes index 2 (1 without expansion) and shifts
    the projection after it, as torchvision's SqueezeExcitation does.
    """

    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, act: ActLayer, stride: int,
                 attn: nn.Module | None):
        super().__init__()
        layers = [conv_bn_act(cin, expanded, 1, act=act, **_BN_V3)] if expanded != cin else []
        layers.append(conv_bn_act(expanded, expanded, kernel, stride, groups=expanded, act=act, **_BN_V3))
        layers += [attn] if attn is not None else []
        layers.append(conv_bn_act(expanded, cout, 1, act=None, **_BN_V3))
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_res else out


class MobileNetV3(_Net):
    """MobileNetV3 large/small; ``attn`` (default its hard-sigmoid SE) in the rows marked SE.

    Args: variant (``"large"``/``"small"``), width_mult, attn (None: no attention anywhere),
    attn_kwargs, attn_stages (resolution stages), num_classes, in_chans, drop_rate (0.2),
    features_only (the stage outputs, strides 2..32).
    """

    def __init__(self, variant: str = "large", *, width_mult: float = 1.0, attn: str | None = "se_mobilenetv3",
                 attn_kwargs: Mapping | Sequence[Mapping] | None = None, attn_stages: Iterable[int] | None = None,
                 num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.2, features_only: bool = False):
        super().__init__()
        if variant not in _V3:
            raise ValueError(f"variant must be one of {list(_V3)}, got {variant!r}")
        width_mult = _check_width(width_mult)
        rows, hidden = _V3[variant]
        stages = _stage_of([r[5] for r in rows])
        factories = stage_attention(attn, attn_kwargs, attn_stages, stages[-1] + 1)
        has_attn = attn is not None and attn != "none"
        cin = make_divisible(16 * width_mult, 8)
        layers: list[nn.Module] = [conv_bn_act(in_chans, cin, 3, 2, act=nn.Hardswish, **_BN_V3)]
        for (k, e, c, se, act, s), st in zip(rows, stages, strict=True):
            e, c = make_divisible(e * width_mult, 8), make_divisible(c * width_mult, 8)
            attn_mod = factories[st](e) if se and has_attn else None
            layers.append(InvertedResidualV3(cin, k, e, c, _V3_ACTS[act], s, attn_mod))
            cin = c
        last = 6 * cin  # the last 1x1 conv: 960 (large) / 576 (small)
        layers.append(conv_bn_act(cin, last, 1, act=nn.Hardswish, **_BN_V3))
        self.num_features = last
        if not features_only:
            self.classifier = nn.Sequential(nn.Linear(last, hidden), nn.Hardswish(inplace=True),
                                            nn.Dropout(drop_rate, inplace=True), nn.Linear(hidden, num_classes))
        self._finish(layers, _resolution_ends(layers, [r[5] for r in rows]), features_only)


# ----------------------------------------------------------------------------- registered names

_V1_PAPER = "MobileNets (Howard et al.), arXiv 1704.04861"
_V2_PAPER = "MobileNetV2: Inverted Residuals and Linear Bottlenecks (Sandler et al.), arXiv 1801.04381"
_V3_PAPER = "Searching for MobileNetV3 (Howard et al.), arXiv 1905.02244"

# ECA-MobileNetV2 (ECA code release): k = 1 on rows narrower than 96 channels, 3 from 96 on.
_ECA_V2 = {"attn": "eca", "attn_kwargs": [{"kernel_size": 1 if c < 96 else 3} for _, c, _, _ in _V2]}



@register_model(paper=_V1_PAPER)
def mobilenet_v1(**kwargs) -> MobileNetV1:
    """MobileNet 1.0-224 (SENet Table 3 baseline: 569M MACs, 4.2M parameters)."""
    return build_variant(MobileNetV1, {}, kwargs)


@register_model(paper=SENET_PAPER)
def se_mobilenet_v1(**kwargs) -> MobileNetV1:
    """SE-MobileNet (SENet Table 3): SE (r = 16, bias-free FCs) after each depthwise-separable block."""
    return build_variant(MobileNetV1, {"attn": "se"}, kwargs)


@register_model(paper=_V2_PAPER)
def mobilenet_v2(**kwargs) -> MobileNetV2:
    """MobileNetV2 1.0 (torchvision ``mobilenet_v2`` layout)."""
    return build_variant(MobileNetV2, {}, kwargs)


@register_model(paper=SENET_PAPER)
def se_mobilenet_v2(**kwargs) -> MobileNetV2:
    """MobileNetV2 with SE (r = 16, bias-free FCs) on each block's output, before the addition."""
    return build_variant(MobileNetV2, {"attn": "se"}, kwargs)


@register_model(paper=ECA_PAPER)
def eca_mobilenet_v2(**kwargs) -> MobileNetV2:
    """ECA-MobileNetV2 (ECA-Net: 72.56 top-1): ECA on each block's output, k = 1 / 3 by width."""
    return build_variant(MobileNetV2, _ECA_V2, kwargs)


@register_model(paper=_V3_PAPER)
def mobilenet_v3_large(**kwargs) -> MobileNetV3:
    """MobileNetV3-Large 1.0 with its hard-sigmoid SE (torchvision ``mobilenet_v3_large`` layout)."""
    return build_variant(MobileNetV3, {"variant": "large"}, kwargs)


@register_model(paper=_V3_PAPER)
def mobilenet_v3_small(**kwargs) -> MobileNetV3:
    """MobileNetV3-Small 1.0 with its hard-sigmoid SE (torchvision ``mobilenet_v3_small`` layout)."""
    return build_variant(MobileNetV3, {"variant": "small"}, kwargs)
