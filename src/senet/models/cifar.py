"""CIFAR ResNets and Wide ResNets (32x32 inputs, three stages), with any attention block.

Papers: ResNet (He et al., arXiv 1512.03385, Sec. 4.2: depth 6n+2, 16/32/64 channels, option-A
shortcuts), pre-activation ResNet (He et al., arXiv 1603.05027: ResNet-164 = 9n+2 bottlenecks),
Wide ResNet (Zagoruyko & Komodakis, arXiv 1605.07146: WRN-d-k, widths 16k/32k/64k), SE on CIFAR
(Hu et al., arXiv 1709.01507, Tables 4/5).

Layout: ``conv1`` (3x3 stem, 16 channels) [``bn1`` when post-activation], ``layer1..layer3``,
[``bn_final`` when pre-activation], ``fc``. Post-activation units are ``resnet.BasicBlock`` /
``resnet.Bottleneck``; pre-activation units are ``PreActBasic`` / ``PreActBottleneck`` below. Every
unit holds ``attn`` and applies it at ``attn_placement`` (SE paper Fig. 5, see ``_attn``).

Note (SE paper Tables 4/5): its ResNet-110/164 baselines (6.37 / 5.46 % on CIFAR-10) are the
pre-activation numbers of arXiv 1603.05027 Table 3; ``preact_resnet110`` is that network.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from senet.layers._common import NoScript

from ._attn import AttnFactory, AttnUnit, stage_attention
from ._head import PooledClassifier
from .registry import RESNET_PAPER, register_model
from .resnet import BasicBlock, Bottleneck


class ShortcutA(NoScript, nn.Module):
    """Option A (ResNet paper Sec. 3.3): subsample by ``stride``, zero-pad the new channels. No parameters."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (B, cin, H/s, W/s)
        return F.pad(x, (0, 0, 0, 0, 0, self.pad))  # (B, cout, H/s, W/s)


def _bn_act(c: int) -> tuple[nn.Module, nn.Module]:
    return nn.BatchNorm2d(c), nn.ReLU(inplace=True)


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)


class PreActBasic(AttnUnit):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3 (arXiv 1603.05027 Fig. 4e; WRN's block); no ReLU after the sum."""

    expansion = 1

    def __init__(self, cin: int, planes: int, *, stride: int = 1, downsample: nn.Module,
                 make_attn: AttnFactory, placement: str = "standard", drop: float = 0.0):
        super().__init__(make_attn, placement, {"pre": cin, "after_3x3": planes, "out": planes})
        self.bn1, self.act1 = _bn_act(cin)
        self.conv1 = _conv(cin, planes, 3, stride)
        self.bn2, self.act2 = _bn_act(planes)
        self.drop = nn.Dropout(drop)  # WRN's dropout between the convs
        self.conv2 = _conv(planes, planes, 3)
        self.downsample = downsample
        # A projection shortcut sees the pre-activated input (the 1603.05027 / WRN code); identity sees x.
        self.project_pre = isinstance(downsample, nn.Conv2d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        shortcut = self._at("identity", self.downsample(pre if self.project_pre else x))
        out = self._at("after_3x3", self.conv1(self._at("pre", pre)))
        out = self._at("standard", self.conv2(self.drop(self.act2(self.bn2(out)))))
        return self._at("post", out + shortcut)


class PreActBottleneck(AttnUnit):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3 (stride), BN-ReLU-conv1x1 (x4): ResNet-164 (arXiv 1603.05027)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, *, stride: int = 1, downsample: nn.Module,
                 make_attn: AttnFactory, placement: str = "standard", drop: float = 0.0):
        out = planes * self.expansion
        super().__init__(make_attn, placement, {"pre": cin, "after_3x3": planes, "out": out})
        self.bn1, self.act1 = _bn_act(cin)
        self.conv1 = _conv(cin, planes, 1)
        self.bn2, self.act2 = _bn_act(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn3, self.act3 = _bn_act(planes)
        self.conv3 = _conv(planes, out, 1)
        self.downsample = downsample
        self.project_pre = isinstance(downsample, nn.Conv2d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        shortcut = self._at("identity", self.downsample(pre if self.project_pre else x))
        out = self.conv1(self._at("pre", pre))
        out = self._at("after_3x3", self.conv2(self.act2(self.bn2(out))))
        out = self._at("standard", self.conv3(self.act3(self.bn3(out))))
        return self._at("post", out + shortcut)


_UNITS = {  # (block, preact) -> unit
    ("basic", False): BasicBlock,
    ("bottleneck", False): Bottleneck,
    ("basic", True): PreActBasic,
    ("bottleneck", True): PreActBottleneck,
}


def _shortcut(kind: str, cin: int, cout: int, stride: int, preact: bool) -> nn.Module:
    """Identity when shapes match; else option A (zero-pad) or B (1x1 conv [+ BN when post-activation])."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    if kind == "A":
        return ShortcutA(cin, cout, stride)
    conv = _conv(cin, cout, 1, stride)
    return conv if preact else nn.Sequential(conv, nn.BatchNorm2d(cout))


class CifarResNet(PooledClassifier):
    """Three-stage ResNet for 32x32 images, ``blocks`` units per stage.

    Args:
        block: ``"basic"`` (depth 6n+2) or ``"bottleneck"`` (depth 9n+2). blocks: n.
        widen: k of WRN-d-k (stage widths 16k, 32k, 64k). preact: pre-activation units.
        shortcut: ``"A"`` (zero-pad, parameter-free: the ResNet paper's CIFAR nets) or ``"B"`` (1x1 conv).
        block_drop: dropout between a pre-activation basic unit's convs (WRN).
        attn, attn_kwargs, attn_placement, attn_stages (1..3), num_classes, in_chans, drop_rate,
        features_only: as in ``resnet.ResNet``.
    """

    def __init__(
        self,
        block: str,
        blocks: int,
        *,
        widen: int = 1,
        preact: bool = False,
        shortcut: str = "A",
        block_drop: float = 0.0,
        attn: str | None = None,
        attn_kwargs: Mapping | Sequence[Mapping] | None = None,
        attn_placement: str = "standard",
        attn_stages: Iterable[int] | None = None,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        features_only: bool = False,
    ):
        super().__init__()
        if (block, preact) not in _UNITS or shortcut not in ("A", "B"):
            raise ValueError(f"block must be 'basic' or 'bottleneck' and shortcut 'A' or 'B', "
                             f"got block={block!r}, shortcut={shortcut!r}")
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"blocks (units per stage) must be a positive integer, got {blocks!r}")
        unit, factories = _UNITS[block, preact], stage_attention(attn, attn_kwargs, attn_stages, 3)
        unit_kw = {"placement": attn_placement, **({"drop": block_drop} if preact else {})}
        self.preact = preact
        self.conv1 = _conv(in_chans, 16, 3)  # (B, 16, 32, 32)
        self.bn1 = nn.Identity() if preact else nn.BatchNorm2d(16)  # pre-act: the first unit normalises
        self.act = nn.ReLU(inplace=True)
        self.feature_info, cin = [], 16
        for i, planes in enumerate((16 * widen, 32 * widen, 64 * widen)):
            layers = []
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                down = _shortcut(shortcut, cin, planes * unit.expansion, stride, preact)
                layers.append(unit(cin, planes, stride=stride, downsample=down, make_attn=factories[i], **unit_kw))
                cin = planes * unit.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            self.feature_info.append({"module": f"layer{i + 1}", "channels": cin, "reduction": 2 ** i})
        self.bn_final = nn.BatchNorm2d(cin) if preact else nn.Identity()  # the last unit's sum is not normalised
        self._add_head(cin, num_classes, drop_rate, features_only)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """The stem: the 3x3 conv, then BN + ReLU when post-activation, (B, 16, H, W)."""
        x = self.conv1(x)
        return x if self.preact else self.act(self.bn1(x))

    def forward_end(self, x: torch.Tensor) -> torch.Tensor:
        """What follows the last stage: ``bn_final`` + ReLU when pre-activation (its sum is not normalised)."""
        return self.act(self.bn_final(x)) if self.preact else x

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage outputs: (B, C_k, H / 2^(k-1), W / 2^(k-1)), k = 1..3 (the last after ``forward_end``)."""
        x = self.forward_stem(x)
        feats = [self.layer1(x)]
        feats.append(self.layer2(feats[-1]))
        feats.append(self.forward_end(self.layer3(feats[-1])))
        return feats


_PREACT = "Identity Mappings in Deep Residual Networks (He et al.), arXiv 1603.05027"
_WRN = "Wide Residual Networks (Zagoruyko & Komodakis), arXiv 1605.07146"
_SE = {"attn": "se"}  # SE paper CIFAR nets: eq. 3 (no biases), r = 16; note 16 // 16 = 1 hidden unit

# name: (block, n, defaults, paper)
_VARIANTS = {
    # ResNet paper Table 6: 6n+2 layers, option A; 0.27M / 0.46M / 0.66M / 0.85M / 1.7M parameters.
    **{f"resnet{6 * n + 2}": ("basic", n, {}, RESNET_PAPER) for n in (3, 5, 7, 9, 18)},
    "preact_resnet110": ("basic", 18, {"preact": True}, _PREACT),  # 1603.05027 Table 3: 6.37 % C-10
    "resnet164": ("bottleneck", 18, {"preact": True, "shortcut": "B"}, _PREACT),  # 9n+2, 1.7M, 5.46 %
    "wrn16_8": ("basic", 2, {"preact": True, "shortcut": "B", "widen": 8}, _WRN),  # 11.0M (WRN Table 1)
}
_VARIANTS.update({f"se_{k}": (b, n, {**d, **_SE}, d_paper) for k, (b, n, d, d_paper) in list(_VARIANTS.items())})


def build_cifar(block: str, blocks: int, defaults: dict, **kwargs) -> CifarResNet:
    """``CifarResNet`` from a variant's ``defaults`` overridden by ``kwargs`` (another ``attn`` drops
    the variant's ``attn_kwargs``)."""
    cfg = dict(defaults)
    if "attn" in kwargs and kwargs["attn"] != cfg.get("attn"):
        cfg.pop("attn_kwargs", None)
    return CifarResNet(block, blocks, **{**cfg, **kwargs})


def _register(name: str, block: str, blocks: int, defaults: dict, paper: str) -> None:
    def builder(**kwargs) -> CifarResNet:
        return build_cifar(block, blocks, defaults, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"{name}: {block} x {blocks} per stage, defaults {defaults} ({paper})."
    register_model(name, paper=paper, input_size=(3, 32, 32))(builder)


for _name, (_block, _n, _defaults, _paper) in _VARIANTS.items():
    _register(_name, _block, _n, _defaults, _paper)
