"""BN-Inception and Inception-ResNet-v2, with any attention block (SE-BN-Inception, SE-Inception-ResNet-v2).

Papers: Batch Normalization (Ioffe & Szegedy, arXiv 1502.03167, Fig. 5: "BN-Inception", the
Inception-v2 of the SE paper), Inception-v4/Inception-ResNet (Szegedy et al., arXiv 1602.07261),
SENet (Hu et al., arXiv 1709.01507: Fig. 2 SE-Inception module, Table 2).

- SE-BN-Inception: attention on the output of every Inception module (Fig. 2), as in the released
  Caffe SE-BN-Inception. Widths are the Caffe BN-Inception's (the release the SE paper builds on):
  module 4c outputs 608 channels where the BN paper's Fig. 5 prints 576; its pools use ceil mode.
- SE-Inception-ResNet-v2: attention on each residual branch, after its 1x1 up-projection and before
  the scaling and addition: ``x + scale * A(F(x))`` (the SE-ResNet module of Fig. 3). The network is the
  TF-slim Inception-ResNet-v2 (10 / 20 / 10 blocks, "mixed_5b" stem) that the released weights use,
  with timm's parameter names, so timm ``inception_resnet_v2`` state dicts load by name. Its "valid"
  convolutions need an input of at least 75 x 75 (299 x 299 by default).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from senet.layers._common import NoScript, shapes_unchecked
from senet.layers.pool import MaxPool2d

from ._attn import AttnFactory, stage_attention
from ._head import PooledClassifier, check_images
from .registry import SENET_PAPER, build_variant, register_model
from .vgg import init_weights


class ConvBN(NoScript, nn.Module):
    """Conv (no bias) + BN + ReLU, keys ``conv``/``bn`` (timm's ``BasicConv2d``)."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0, eps: float = 1e-5):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=eps)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def _same(cin: int, cout: int, kernel: int = 1, stride: int = 1) -> ConvBN:
    return ConvBN(cin, cout, kernel, stride, kernel // 2)


# ----------------------------------------------------------------------------- BN-Inception

# name: (#1x1, #3x3 reduce, #3x3, double #3x3 reduce, double #3x3, pool, pool proj, stride); BN paper
# Fig. 5 with the Caffe release's widths. Stride 2 (3c, 4e): no 1x1 branch, max-pool pass-through.
_BN_INCEPTION = (
    ("3a", 64, 64, 64, 64, 96, "avg", 32, 1), ("3b", 64, 64, 96, 64, 96, "avg", 64, 1),
    ("3c", 0, 128, 160, 64, 96, "max", 0, 2), ("4a", 224, 64, 96, 96, 128, "avg", 128, 1),
    ("4b", 192, 96, 128, 96, 128, "avg", 128, 1), ("4c", 160, 128, 160, 128, 160, "avg", 128, 1),
    ("4d", 96, 128, 192, 160, 192, "avg", 128, 1), ("4e", 0, 128, 192, 192, 256, "max", 0, 2),
    ("5a", 352, 192, 320, 160, 224, "avg", 128, 1), ("5b", 352, 192, 320, 192, 224, "max", 128, 1),
)
# Stages (for attn_stages / features): 3a-3b at stride 8, 3c-4d at 16, 4e-5b at 32.
_BN_STAGES = (("3a", "3b"), ("3c", "4a", "4b", "4c", "4d"), ("4e", "5a", "5b"))


class InceptionModule(NoScript, nn.Module):
    """BN-Inception module: concat(1x1, 1x1 -> 3x3, 1x1 -> 3x3 -> 3x3, pool [-> 1x1]), then ``attn``."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, cdr: int, cd: int, pool: str, proj: int,
                 stride: int, make_attn: AttnFactory):
        super().__init__()
        self.branch1x1 = _same(cin, c1) if c1 else None
        self.branch3x3 = nn.Sequential(_same(cin, c3r), _same(c3r, c3, 3, stride))
        self.branch3x3dbl = nn.Sequential(_same(cin, cdr), _same(cdr, cd, 3), _same(cd, cd, 3, stride))
        if stride == 2:  # pass-through: Caffe's 3x3/2 max-pool, ceil mode
            self.branch_pool = MaxPool2d(3, 2, ceil_mode=True)
        else:
            pooling = nn.AvgPool2d(3, 1, 1) if pool == "avg" else MaxPool2d(3, 1, 1)
            self.branch_pool = nn.Sequential(pooling, _same(cin, proj))
        self.out_channels = c1 + c3 + cd + (proj if stride == 1 else cin)
        self.attn = make_attn(self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.branch3x3(x), self.branch3x3dbl(x), self.branch_pool(x)]
        if self.branch1x1 is not None:
            outs.insert(0, self.branch1x1(x))
        return self.attn(torch.cat(outs, 1))  # (B, out_channels, H/s, W/s)


class BNInception(PooledClassifier):
    """BN-Inception (Inception-v2) with ``attn`` after every Inception module of the chosen stages.

    Args: attn, attn_kwargs, attn_stages (3 stages: 3a-3b, 3c-4d, 4e-5b), num_classes, in_chans,
    drop_rate (before ``fc``), features_only (the three stage maps, strides 8, 16, 32).
    """

    def __init__(self, *, attn: str | None = None, attn_kwargs: Mapping | Sequence[Mapping] | None = None,
                 attn_stages: Iterable[int] | None = None, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0, features_only: bool = False):
        super().__init__()
        factories = stage_attention(attn, attn_kwargs, attn_stages, len(_BN_STAGES))
        self.stem = nn.Sequential(
            _same(in_chans, 64, 7, 2), MaxPool2d(3, 2, ceil_mode=True),  # (B, 64, H/4, W/4)
            _same(64, 64), _same(64, 192, 3), MaxPool2d(3, 2, ceil_mode=True),  # (B, 192, H/8, W/8)
        )
        rows, cin = {r[0]: r[1:] for r in _BN_INCEPTION}, 192
        self.feature_info = []
        for k, names in enumerate(_BN_STAGES):
            modules = []
            for name in names:
                modules.append(InceptionModule(cin, *rows[name], make_attn=factories[k]))
                cin = modules[-1].out_channels
            self.add_module(f"stage{k + 3}", nn.Sequential(*modules))
            self.feature_info.append({"module": f"stage{k + 3}", "channels": cin, "reduction": 8 * 2 ** k})
        self._add_head(cin, num_classes, drop_rate, features_only)  # 1024 features
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in (self.stage3, self.stage4, self.stage5):
            x = stage(x)
            feats.append(x)
        return feats


# ----------------------------------------------------------------------------- Inception-ResNet-v2

_EPS = 1e-3  # the TF-slim BN epsilon of the released weights


def _cbn(cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
         padding: int | tuple[int, int] = 0) -> ConvBN:
    return ConvBN(cin, cout, kernel, stride, padding, eps=_EPS)


class Mixed5b(NoScript, nn.Module):
    """The TF-slim 35x35 entry: 1x1 96 | 1x1 48 -> 5x5 64 | 1x1 64 -> 3x3 96 -> 3x3 96 | avg -> 1x1 64."""

    def __init__(self):
        super().__init__()
        self.branch0 = _cbn(192, 96, 1)
        self.branch1 = nn.Sequential(_cbn(192, 48, 1), _cbn(48, 64, 5, 1, 2))
        self.branch2 = nn.Sequential(_cbn(192, 64, 1), _cbn(64, 96, 3, 1, 1), _cbn(96, 96, 3, 1, 1))
        self.branch3 = nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), _cbn(192, 64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in (self.branch0, self.branch1, self.branch2, self.branch3)], 1)  # 320


class Reduction(NoScript, nn.Module):
    """Grid reduction (Reduction-A ``mixed_6a`` / Reduction-B ``mixed_7a``): strided branches + max-pool."""

    def __init__(self, branches: Sequence[nn.Module]):
        super().__init__()
        for i, branch in enumerate(branches):
            self.add_module(f"branch{i}", branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.children()], 1)


class InceptionResBlock(NoScript, nn.Module):
    """``act(x + scale * attn(conv2d(cat(branches))))``: Inception-ResNet-A/B/C (paper Figs. 16-19)."""

    def __init__(self, channels: int, branches: Sequence[nn.Module], cat_channels: int, scale: float,
                 make_attn: AttnFactory, relu: bool = True):
        super().__init__()
        for i, branch in enumerate(branches):
            self.add_module(f"branch{i}", branch)
        self.n_branches = len(branches)
        self.conv2d = nn.Conv2d(cat_channels, channels, 1)  # linear up-projection, with bias
        self.attn = make_attn(channels)
        self.scale = scale
        self.act = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([getattr(self, f"branch{i}")(x) for i in range(self.n_branches)], 1)
        return self.act(x + self.scale * self.attn(self.conv2d(out)))


def _block35(make_attn: AttnFactory) -> InceptionResBlock:  # 35x35, 320 channels, scale 0.17
    return InceptionResBlock(320, [
        _cbn(320, 32, 1),
        nn.Sequential(_cbn(320, 32, 1), _cbn(32, 32, 3, 1, 1)),
        nn.Sequential(_cbn(320, 32, 1), _cbn(32, 48, 3, 1, 1), _cbn(48, 64, 3, 1, 1)),
    ], 128, 0.17, make_attn)


def _block17(make_attn: AttnFactory) -> InceptionResBlock:  # 17x17, 1088 channels, scale 0.10
    return InceptionResBlock(1088, [
        _cbn(1088, 192, 1),
        nn.Sequential(_cbn(1088, 128, 1), _cbn(128, 160, (1, 7), 1, (0, 3)), _cbn(160, 192, (7, 1), 1, (3, 0))),
    ], 384, 0.10, make_attn)


def _block8(make_attn: AttnFactory, scale: float = 0.20, relu: bool = True) -> InceptionResBlock:  # 8x8, 2080
    return InceptionResBlock(2080, [
        _cbn(2080, 192, 1),
        nn.Sequential(_cbn(2080, 192, 1), _cbn(192, 224, (1, 3), 1, (0, 1)), _cbn(224, 256, (3, 1), 1, (1, 0))),
    ], 448, scale, make_attn, relu)


class InceptionResNetV2(NoScript, nn.Module):
    """Inception-ResNet-v2 (TF-slim layout, timm names) with ``attn`` on every residual branch.

    Args: attn, attn_kwargs, attn_stages (3 stages: the 35x35 ``repeat``, 17x17 ``repeat_1`` and 8x8
    ``repeat_2`` + ``block8`` blocks), num_classes, in_chans, drop_rate (before ``classif``),
    features_only (the maps after ``repeat``, ``repeat_1`` and ``conv2d_7b``: strides 8, 16, 32).
    """

    def __init__(self, *, attn: str | None = None, attn_kwargs: Mapping | Sequence[Mapping] | None = None,
                 attn_stages: Iterable[int] | None = None, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0, features_only: bool = False):
        super().__init__()
        a, b, c = stage_attention(attn, attn_kwargs, attn_stages, 3)
        self.conv2d_1a = _cbn(in_chans, 32, 3, 2)  # 299 -> 149 ("valid" convs from here to 4a)
        self.conv2d_2a = _cbn(32, 32, 3)  # 147
        self.conv2d_2b = _cbn(32, 64, 3, 1, 1)
        self.maxpool_3a = MaxPool2d(3, 2)  # 73
        self.conv2d_3b = _cbn(64, 80, 1)
        self.conv2d_4a = _cbn(80, 192, 3)  # 71
        self.maxpool_5a = MaxPool2d(3, 2)  # 35
        self.mixed_5b = Mixed5b()  # (B, 320, 35, 35)
        self.repeat = nn.Sequential(*[_block35(a) for _ in range(10)])
        self.mixed_6a = Reduction([  # Reduction-A, k = 256, l = 256, m = n = 384 (paper Table 1) -> 1088 @ 17
            _cbn(320, 384, 3, 2),
            nn.Sequential(_cbn(320, 256, 1), _cbn(256, 256, 3, 1, 1), _cbn(256, 384, 3, 2)),
            MaxPool2d(3, 2)])
        self.repeat_1 = nn.Sequential(*[_block17(b) for _ in range(20)])
        self.mixed_7a = Reduction([  # Reduction-B -> 2080 @ 8
            nn.Sequential(_cbn(1088, 256, 1), _cbn(256, 384, 3, 2)),
            nn.Sequential(_cbn(1088, 256, 1), _cbn(256, 288, 3, 2)),
            nn.Sequential(_cbn(1088, 256, 1), _cbn(256, 288, 3, 1, 1), _cbn(288, 320, 3, 2)),
            MaxPool2d(3, 2)])
        self.repeat_2 = nn.Sequential(*[_block8(c) for _ in range(9)])
        self.block8 = _block8(c, scale=1.0, relu=False)  # the tenth, unscaled and without ReLU
        self.conv2d_7b = _cbn(2080, 1536, 1)
        self.num_features = 1536
        self.feature_info = [{"module": "repeat", "channels": 320, "reduction": 8},
                             {"module": "repeat_1", "channels": 1088, "reduction": 16},
                             {"module": "conv2d_7b", "channels": 1536, "reduction": 32}]
        self.features_only = features_only
        if not features_only:
            self.head_drop = nn.Dropout(drop_rate)
            self.classif = nn.Linear(1536, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.conv2d_2b(self.conv2d_2a(self.conv2d_1a(x)))
        x = self.conv2d_4a(self.conv2d_3b(self.maxpool_3a(x)))
        f8 = self.repeat(self.mixed_5b(self.maxpool_5a(x)))  # (B, 320, 35, 35) at 299
        f16 = self.repeat_1(self.mixed_6a(f8))  # (B, 1088, 17, 17)
        f32 = self.conv2d_7b(self.block8(self.repeat_2(self.mixed_7a(f16))))  # (B, 1536, 8, 8)
        return [f8, f16, f32]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_images(x, self)
        if not shapes_unchecked(x) and min(x.shape[-2:]) < 75:  # 4D: check_images
            raise ValueError(f"Inception-ResNet-v2 needs inputs of at least 75x75 (its stem and reductions "
                             f"use unpadded convs), got {tuple(x.shape[-2:])}; resize to 299x299")
        feats = self.forward_features(x)
        return feats if self.features_only else self.classif(self.head_drop(feats[-1].mean((2, 3))))


# ----------------------------------------------------------------------------- registered names

_BN = "Batch Normalization (Ioffe & Szegedy), arXiv 1502.03167"
_IRV2 = "Inception-v4, Inception-ResNet and the Impact of Residual Connections (Szegedy et al.), arXiv 1602.07261"



@register_model(paper=_BN)
def bninception(**kwargs) -> BNInception:
    """BN-Inception (SENet Table 2 baseline: 2.03 GFLOPs)."""
    return build_variant(BNInception, {}, kwargs)


@register_model(paper=SENET_PAPER)
def se_bninception(**kwargs) -> BNInception:
    """SE-BN-Inception: SE (r = 16, FCs with biases as the Caffe release) after every Inception module."""
    return build_variant(BNInception, {"attn": "se_released"}, kwargs)


@register_model(paper=_IRV2, input_size=(3, 299, 299))
def inception_resnet_v2(**kwargs) -> InceptionResNetV2:
    """Inception-ResNet-v2 at 299x299 (timm ``inception_resnet_v2`` names)."""
    return build_variant(InceptionResNetV2, {}, kwargs)


@register_model(paper=SENET_PAPER, input_size=(3, 299, 299))
def se_inception_resnet_v2(**kwargs) -> InceptionResNetV2:
    """SE-Inception-ResNet-v2: SE (r = 16, bias-free FCs) on every residual branch."""
    return build_variant(InceptionResNetV2, {"attn": "se"}, kwargs)
