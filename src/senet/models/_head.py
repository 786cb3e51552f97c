"""The classifier head several networks share: mean over H, W -> dropout -> ``fc``."""

from __future__ import annotations

import torch
from torch import nn


class PooledClassifier(nn.Module):
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
        feats = self.forward_features(x)
        return feats if self.features_only else self.forward_head(feats[-1])
