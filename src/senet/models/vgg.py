"""VGG-16 and VGG-16-BN, and SE-VGG16: one attention block at the end of each of the five conv blocks.

Papers: VGG (Simonyan & Zisserman, arXiv 1409.1556, Table 1 configuration D), SENet (Hu et al.,
arXiv 1709.01507, Table 2 "VGG-16 (with BN)").

SE-VGG16 (as the project's users describe it, ../shared/REFERENCE.md): one SE block (r = 16, two
bias-free ``Linear`` FCs, 2 C^2 / r parameters) after the last conv + ReLU of each block, before its
max-pool.

Parameter names are torchvision's (``features.N``, ``classifier.N``), so torchvision ``vgg16`` /
``vgg16_bn`` state dicts load by name. The attention cannot get an index of its own in ``features``
without shifting every later index; instead the last ReLU of each block (no parameters) becomes an
``ActAttn`` holding ``act`` and ``attn``: the SE parameters are ``features.N.attn.*`` with N the
ReLU's torchvision index (vgg16: 3, 8, 15, 22, 29; vgg16_bn: 5, 12, 22, 32, 42).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import skip_init

from senet.layers._common import NoScript
from senet.layers.pool import MaxPool2d

from ._attn import AttnFactory, stage_attention
from ._head import check_images
from .registry import SENET_PAPER, build_variant, register_model

# Conv widths of the five blocks, each followed by a 2x2 max-pool: VGG paper Table 1, column D.
_VGG16 = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class ActAttn(NoScript, nn.Module):
    """The last ReLU of a block, then its attention (``attn``; nn.Identity when none)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.act = nn.ReLU(inplace=True)
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.act(x))


def _block(cin: int, widths: Sequence[int], batch_norm: bool, make_attn: AttnFactory) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, cout in enumerate(widths):
        layers.append(nn.Conv2d(cin, cout, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(ActAttn(make_attn(cout)) if i == len(widths) - 1 else nn.ReLU(inplace=True))
        cin = cout
    return layers + [MaxPool2d(2, 2)]


class VGG(NoScript, nn.Module):
    """VGG with attention ``attn`` after the last conv + ReLU of each block (before the max-pool).

    Args:
        cfg: conv widths per block (default VGG-16, Table 1 D). batch_norm: BN after every conv.
        attn, attn_kwargs: attention name (``senet.layers.list_attentions()``, or None) and its keyword
            arguments, one dict or one per block. attn_stages: 1-based blocks that get it (default all).
        num_classes, in_chans, drop_rate (the two dropouts of the classifier, 0.5 in the paper).
        features_only: no classifier; ``forward`` returns each block's attended map before its
            max-pool (strides 1, 2, 4, 8, 16).
    """

    def __init__(
        self,
        cfg: Sequence[Sequence[int]] = _VGG16,
        *,
        batch_norm: bool = False,
        attn: str | None = None,
        attn_kwargs: Mapping | Sequence[Mapping] | None = None,
        attn_stages: Iterable[int] | None = None,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.5,
        features_only: bool = False,
    ):
        super().__init__()
        factories = stage_attention(attn, attn_kwargs, attn_stages, len(cfg))
        layers, cin = [], in_chans
        self.feature_info = []
        for i, widths in enumerate(cfg):
            layers += _block(cin, widths, batch_norm, factories[i])
            cin = widths[-1]
            self.feature_info.append({"module": f"features.{len(layers) - 2}", "channels": cin, "reduction": 2 ** i})
        self.features = nn.Sequential(*layers)
        self.num_features = cin
        self.features_only = features_only
        if not features_only:
            self.avgpool = nn.AdaptiveAvgPool2d(7)  # (B, 512, 7, 7) whatever the input size
            self.classifier = nn.Sequential(
                _linear(cin * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(drop_rate),
                _linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(drop_rate),
                _linear(4096, num_classes),
            )
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each block's attended map before its pool, then the last pooled map: (B, 512, H/32, W/32)."""
        feats = []
        for layer in self.features:
            x = layer(x)
            if isinstance(layer, ActAttn):
                feats.append(x)
        return feats + [x]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_images(x, self)
        if self.features_only:
            return self.forward_features(x)[:-1]
        x = self.avgpool(self.features(x)).flatten(1)  # (B, 512 * 7 * 7)
        return self.classifier(x)


def _linear(cin: int, cout: int) -> nn.Linear:
    # Uninitialised (init_weights fills it): nn.Linear's own init of the 102M-weight FC costs ~1.5 s.
    return skip_init(nn.Linear, cin, cout, device=torch.get_default_device())


def init_weights(model: nn.Module) -> None:
    """torchvision's CNN initialisation: Kaiming-normal (fan_out) convs, N(0, 0.01) linears, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)


_VGG = "Very Deep Convolutional Networks for Large-Scale Image Recognition (Simonyan & Zisserman), arXiv 1409.1556"



@register_model(paper=_VGG)
def vgg16(**kwargs) -> VGG:
    """VGG-16 (torchvision ``vgg16`` layout). Keyword arguments: see ``VGG``."""
    return build_variant(VGG, {}, kwargs)


@register_model(paper=_VGG)
def vgg16_bn(**kwargs) -> VGG:
    """VGG-16 with BN after every conv (torchvision ``vgg16_bn`` layout; SENet Table 2's baseline)."""
    return build_variant(VGG, {"batch_norm": True}, kwargs)


@register_model(paper=SENET_PAPER)
def se_vgg16(**kwargs) -> VGG:
    """SE-VGG16: SE (r = 16, bias-free Linear FCs) after each block's last conv + ReLU."""
    return build_variant(VGG, {"attn": "se"}, kwargs)


@register_model(paper=SENET_PAPER)
def se_vgg16_bn(**kwargs) -> VGG:
    """SE-VGG16 with BN (SENet Table 2: 15.48 GFLOPs vs 15.47)."""
    return build_variant(VGG, {"batch_norm": True, "attn": "se"}, kwargs)
