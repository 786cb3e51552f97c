"""The classifier head several networks share: mean over H, W -> dropout -> ``fc``."""

from __future__ import annotations

import torch
from torch import nn

from senet.layers._common import NoScript, shapes_unchecked


def check_images(x: torch.Tensor, net: nn.Module) -> None:
    """Raise a ValueError naming the fix for input that is not a batch of images (N, C, H, W): one image
    (C, H, W) passes the first conv (conv2d takes unbatched input) and failed at the first BatchNorm with
    torch's "expected 4D input". Skipped where ``shapes_unchecked`` (tracing)."""
    if not shapes_unchecked(x) and x.dim() != 4:
        hint = "; for one image add the batch dimension: x.unsqueeze(0)" if x.dim() == 3 else ""
        raise ValueError(f"{type(net).__name__} expects a batch of images (N, C, H, W), got shape "
                         f"{tuple(x.shape)}{hint}")


class PooledClassifier(NoScript, nn.Module):
    """Base of networks whose ``forward_features`` returns each stage's map and whose head is global
    average pooling, dropout and one linear layer (``drop``, ``fc``: torchvision's/timm's names), or
    that return the maps themselves with ``features_only``."""

    def _add_head(self, cin: int, num_classes: int, drop_rate: float, features_only: bool) -> None:
        self.num_features, self.features_only = cin, features_only
        if not features_only:
            self.drop = nn.Dropout(drop_rate)
            self.fc = nn.Linear(cin, num_classes)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x.mean((2, 3))))  # (B, C, H, W) -> (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_images(x, self)
        feats = self.forward_features(x)
        return feats if self.features_only else self.forward_head(feats[-1])
