"""ImageNet ResNet, ResNeXt, SE-ResNet/SE-ResNeXt and SENet-154, with any attention block.

Papers: ResNet (He et al., arXiv 1512.03385), ResNeXt (Xie et al., arXiv 1611.05431),
SENet (Hu et al., arXiv 1709.01507), ECA-Net (arXiv 1910.03151), CBAM (arXiv 1807.06521).

Module names are torchvision's/timm's, so their checkpoints map by name:
``conv1, bn1`` (stem), ``layer1..layer4`` (nn.Sequential of units), ``fc`` (head). A unit has
``conv1, bn1, conv2, bn2[, conv3, bn3]``, ``downsample`` (nn.Sequential(conv, bn), or nn.Identity when
the shapes already match) and ``attn`` (the attention block; nn.Identity when none, SE's parameters
are ``attn.fc1.*``/``attn.fc2.*``).

SENet-154's deep stem (three 3x3 convs, SENet paper Sec. 6.1 / Caffe release) is timm's layout:
``conv1`` becomes ``nn.Sequential(conv 3x3/2, BN, ReLU, conv 3x3, BN, ReLU, conv 3x3)`` (indices 0, 1,
3, 4, 6) and ``bn1`` normalises its output. The Caffe ``layer0.{conv,bn}{1,2,3}`` map onto
``conv1.{0,1,3,4,6}`` and ``bn1``.

Two bottleneck conventions (``stride_in_1x1``): the original/Caffe one puts a block's stride in its
first 1x1 conv (ResNet paper, the released SE-ResNets); torchvision/timm put it in the 3x3 conv
("ResNet v1.5": more MACs, better accuracy).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from senet.layers.pool import MaxPool2d

from ._attn import AttnFactory, AttnUnit, conv_bn_relu, stage_attention
from ._head import PooledClassifier
from .registry import ECA_PAPER, RESNET_PAPER, SENET_PAPER, register_model


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(cout)]


class BasicBlock(AttnUnit):
    """Two 3x3 convs (ResNet-18/34). ``after_3x3`` attends after the first one."""

    expansion = 1

    def __init__(self, cin: int, planes: int, *, stride: int = 1, downsample: nn.Module,
                 make_attn: AttnFactory, placement: str = "standard", groups: int = 1, width_per_group: int = 64,
                 **_bottleneck_only):
        if groups != 1 or width_per_group != 64:
            raise ValueError(f"basic blocks take no groups/width_per_group (got {groups}, {width_per_group}); "
                             "use a bottleneck depth (50, 101, 152) for ResNeXt")
        super().__init__(make_attn, placement, {"pre": cin, "after_3x3": planes, "out": planes})
        self.conv1, self.bn1 = _conv_bn(cin, planes, 3, stride)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3)
        self.act = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self._at("identity", self.downsample(x))
        x = self._at("pre", x)
        out = self._at("after_3x3", conv_bn_relu(self.conv1, self.bn1, self.act, x)[0])
        return self._merge(self.conv2(out), self.bn2, shortcut, (self.conv2, out))  # post(act(standard(bn2(.)) + sc))


class Bottleneck(AttnUnit):
    """1x1 -> 3x3 (grouped for ResNeXt) -> 1x1, out = 4 * planes.

    Widths: the 3x3 has ``width = planes * width_per_group / 64 * groups`` channels out (ResNeXt
    Table 1: 32x4d -> 2 * planes); the first 1x1 has ``conv1_ratio * width`` (SENet-154: 0.5, its
    3x3 widens 2*planes -> 4*planes).
    """

    expansion = 4

    def __init__(self, cin: int, planes: int, *, stride: int = 1, downsample: nn.Module,
                 make_attn: AttnFactory, placement: str = "standard", groups: int = 1, width_per_group: int = 64,
                 conv1_ratio: float = 1.0, stride_in_1x1: bool = False):
        width = int(planes * width_per_group / 64) * groups
        mid = int(width * conv1_ratio)
        out = planes * self.expansion
        super().__init__(make_attn, placement, {"pre": cin, "after_3x3": width, "out": out})
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1, self.bn1 = _conv_bn(cin, mid, 1, s1)
        self.conv2, self.bn2 = _conv_bn(mid, width, 3, s3, groups)
        self.conv3, self.bn3 = _conv_bn(width, out, 1)
        self.act = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self._at("identity", self.downsample(x))
        x = self._at("pre", x)
        out = conv_bn_relu(self.conv1, self.bn1, self.act, x)[0]
        # mean_hw of conv3's input, from the pass that writes it, for the SE end's squeeze (eager inference)
        squeeze = self.attn_placement == "standard" and not isinstance(self.attn, nn.Identity)
        out, h_mean = conv_bn_relu(self.conv2, self.bn2, self.act, out, squeeze)
        out = self._at("after_3x3", out)  # (after_3x3: no h_mean, squeeze is False)
        # post(act(standard(bn3(.)) + sc))
        return self._merge(self.conv3(out), self.bn3, shortcut, (self.conv3, out), h_mean)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _stem(in_chans: int, width: int, deep: bool) -> nn.Module:
    """7x7/2 conv (ResNet), or SENet-154's three 3x3 convs (64, 64, ``width``), the first strided."""
    if not deep:
        return nn.Conv2d(in_chans, width, 7, 2, 3, bias=False)
    return nn.Sequential(
        *_conv_bn(in_chans, 64, 3, 2), nn.ReLU(inplace=True),
        *_conv_bn(64, 64, 3), nn.ReLU(inplace=True),
        nn.Conv2d(64, width, 3, 1, 1, bias=False),
    )


class ResNet(PooledClassifier):
    """ResNet/ResNeXt/SENet with attention ``attn`` in every unit of the chosen stages.

    Args:
        block: ``"basic"`` or ``"bottleneck"``. layers: units per stage (4 stages).
        groups, width_per_group, conv1_ratio: bottleneck widths (see ``Bottleneck``).
        stride_in_1x1: stride in the first 1x1 (Caffe/paper) instead of the 3x3 (torchvision/timm).
        deep_stem: SENet-154's three-3x3 stem (128 channels out); else a 7x7 conv (64).
        pool_ceil: the Caffe max-pool (3x3/2, ceil_mode, no padding) instead of padding 1.
        down_kernel: kernel of the downsample conv in stages 2-4 (SENet-154: 3; stage 1 keeps 1).
        attn, attn_kwargs: name in ``senet.layers.list_attentions()`` (or None) and its keyword
            arguments: one dict, or one dict per stage (e.g. a reduction per stage).
        attn_placement: one of ``_attn.PLACEMENTS`` (SE paper Fig. 5). attn_stages: 1-based stages
            that get attention (default all; the paper's conv{k+1}_x is our stage k).
        num_classes, in_chans, drop_rate (dropout before ``fc``).
        features_only: no head; ``forward`` returns the four stage maps (strides 4, 8, 16, 32).
    """

    def __init__(
        self,
        block: str,
        layers: Sequence[int],
        *,
        groups: int = 1,
        width_per_group: int = 64,
        conv1_ratio: float = 1.0,
        stride_in_1x1: bool = False,
        deep_stem: bool = False,
        pool_ceil: bool = False,
        down_kernel: int = 1,
        attn: str | None = None,
        attn_kwargs: Mapping | Sequence[Mapping] | None = None,
        attn_placement: str = "standard",
        attn_stages: Iterable[int] | None = None,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        features_only: bool = False,
    ):
        super().__init__()
        if block not in _BLOCKS:
            raise ValueError(f"block must be one of {list(_BLOCKS)}, got {block!r}")
        if len(layers) != 4:
            raise ValueError(f"layers must give 4 stage depths, got {layers!r}")
        factories = stage_attention(attn, attn_kwargs, attn_stages, 4)
        unit = _BLOCKS[block]
        unit_kw = {"placement": attn_placement, "groups": groups, "width_per_group": width_per_group,
                   "conv1_ratio": conv1_ratio, "stride_in_1x1": stride_in_1x1}
        width = 128 if deep_stem else 64
        self.conv1 = _stem(in_chans, width, deep_stem)  # (B, width, H/2, W/2)
        self.bn1 = nn.BatchNorm2d(width)
        self.act = nn.ReLU(inplace=True)
        self.maxpool = MaxPool2d(3, 2, 0, ceil_mode=True) if pool_ceil else MaxPool2d(3, 2, 1)
        self.feature_info = []
        cin = width
        for i, (depth, planes) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
            stride, kernel = (1, 1) if i == 0 else (2, down_kernel)
            stage, cin = _make_stage(unit, cin, planes, depth, stride, kernel, factories[i], unit_kw)
            self.add_module(f"layer{i + 1}", stage)
            self.feature_info.append({"module": f"layer{i + 1}", "channels": cin, "reduction": 4 * 2 ** i})
        self._add_head(cin, num_classes, drop_rate, features_only)
        _init_weights(self)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """The stem: conv, BN, ReLU and max pooling, (B, 64|128, H/4, W/4)."""
        return self.maxpool(conv_bn_relu(self.conv1, self.bn1, self.act, x)[0])

    def forward_end(self, x: torch.Tensor) -> torch.Tensor:
        """What follows the last stage before the head: nothing here (``CifarResNet``'s pre-activation nets
        normalise there)."""
        return x

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of each stage: (B, C_k, H / 2^(k+1), W / 2^(k+1)) for k = 1..4."""
        x = self.forward_stem(x)
        feats = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            feats.append(x)
        return feats


def _make_stage(unit, cin, planes, depth, stride, down_kernel, make_attn, unit_kw) -> tuple[nn.Module, int]:
    cout = planes * unit.expansion
    blocks = []
    for j in range(depth):
        s = stride if j == 0 else 1
        down = nn.Identity()
        if s != 1 or cin != cout:
            down = nn.Sequential(*_conv_bn(cin, cout, down_kernel, s))
        blocks.append(unit(cin, planes, stride=s, downsample=down, make_attn=make_attn, **unit_kw))
        cin = cout
    return nn.Sequential(*blocks), cout


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


# Depth -> (unit, units per stage): ResNet paper (arXiv 1512.03385) Table 1.
_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}

_RESNEXT = "Aggregated Residual Transformations (ResNeXt, Xie et al.), arXiv 1611.05431"
_CBAM = "CBAM: Convolutional Block Attention Module (Woo et al.), arXiv 1807.06521"

_X32 = {"groups": 32, "width_per_group": 4}  # ResNeXt 32x4d (ResNeXt Table 1)
_SE = {"attn": "se_released"}  # FCs with biases, hidden C // 16: the released SENets, timm's `seresnet*`
# The Caffe release (timm `legacy_*`): ceil-mode max-pool, SE-ResNet stride in the first 1x1.
_CAFFE = {**_SE, "pool_ceil": True, "stride_in_1x1": True}

# name: (depth, defaults, paper). Defaults mirror the checkpoints each name is meant to load.
_VARIANTS = {
    "resnet18": (18, {}, RESNET_PAPER),
    "resnet34": (34, {}, RESNET_PAPER),
    "resnet50": (50, {}, RESNET_PAPER),
    "resnet101": (101, {}, RESNET_PAPER),
    "resnet152": (152, {}, RESNET_PAPER),
    # timm seresnet18/34: hidden make_divisible(C / 16, 8), so 8 (not 4) in stage 1.
    "se_resnet18": (18, {**_SE, "attn_kwargs": {"divisor": 8}}, SENET_PAPER),
    "se_resnet34": (34, {**_SE, "attn_kwargs": {"divisor": 8}}, SENET_PAPER),
    "se_resnet50": (50, _SE, SENET_PAPER),  # timm seresnet50: 28,088,024 parameters
    "se_resnet101": (101, _SE, SENET_PAPER),
    "se_resnet152": (152, _SE, SENET_PAPER),
    "resnext50_32x4d": (50, _X32, _RESNEXT),
    "resnext101_32x4d": (101, _X32, _RESNEXT),
    "se_resnext50_32x4d": (50, {**_X32, **_SE}, SENET_PAPER),  # timm seresnext50_32x4d: 27,559,896
    "se_resnext101_32x4d": (101, {**_X32, **_SE}, SENET_PAPER),
    "legacy_se_resnet50": (50, _CAFFE, SENET_PAPER),
    "legacy_se_resnet101": (101, _CAFFE, SENET_PAPER),
    "legacy_se_resnet152": (152, _CAFFE, SENET_PAPER),
    # The released SE-ResNeXts keep the stride in the 3x3 (timm legacy_seresnext*).
    "legacy_se_resnext50_32x4d": (50, {**_CAFFE, **_X32, "stride_in_1x1": False}, SENET_PAPER),
    "legacy_se_resnext101_32x4d": (101, {**_CAFFE, **_X32, "stride_in_1x1": False}, SENET_PAPER),
    # SENet paper Sec. 6.1 / Table 8: ResNeXt-152 64x4d, first 1x1 halved, deep stem, 3x3 downsample
    # convs in stages 2-4, dropout 0.2 (timm legacy_senet154); stride in the 3x3.
    "senet154": (152, {**_SE, "groups": 64, "width_per_group": 4, "conv1_ratio": 0.5, "deep_stem": True,
                       "pool_ceil": True, "down_kernel": 3, "drop_rate": 0.2}, SENET_PAPER),
    # ECA's released ResNet-50 uses k = 3, 5, 5, 7 per stage, not eq. 12's adaptive k (5, 5, 5, 7).
    "eca_resnet50": (50, {"attn": "eca", "attn_kwargs": [{"kernel_size": k} for k in (3, 5, 5, 7)]}, ECA_PAPER),
    "cbam_resnet50": (50, {"attn": "cbam"}, _CBAM),
}


def build_resnet(depth: int, defaults: dict, **kwargs) -> ResNet:
    """``ResNet`` of ``depth`` from a variant's ``defaults`` overridden by ``kwargs``.

    Choosing another ``attn`` than the variant's drops the variant's ``attn_kwargs`` (they belong to
    its attention).
    """
    if depth not in _DEPTHS:
        raise ValueError(f"depth must be one of {list(_DEPTHS)}, got {depth!r}")
    cfg = dict(defaults)
    if "attn" in kwargs and kwargs["attn"] != cfg.get("attn"):
        cfg.pop("attn_kwargs", None)
    block, layers = _DEPTHS[depth]
    return ResNet(block, layers, **{**cfg, **kwargs})


def _register(name: str, depth: int, defaults: dict, paper: str) -> None:
    def builder(**kwargs) -> ResNet:
        return build_resnet(depth, defaults, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"{name}: depth {depth}, defaults {defaults} ({paper}). Keyword arguments: see ResNet."
    register_model(name, paper=paper)(builder)


for _name, (_depth, _defaults, _paper) in _VARIANTS.items():
    _register(_name, _depth, _defaults, _paper)
