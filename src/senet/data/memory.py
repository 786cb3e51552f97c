"""A data set held whole in memory as one tensor (digits, CIFAR), augmented a batch at a time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from . import transforms as T
from ._common import SkippedSample

# A sample key: a bare index (augmentation drawn from the global RNG, like torchvision) or
# (index, seed) as the loaders' sampler yields it (augmentation a pure function of the seed).
Key = int | tuple[int, int]


class Batch(NamedTuple):
    """A collated batch: images (B, C, H, W) float, labels (B,) int64, and the samples dropped from it."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: list[SkippedSample]


class Samples(list):
    """What ``__getitems__`` returns: a list of (image, label), as any collate expects, that also carries
    the ``Batch`` it was cut from, so ``loader.collate`` skips re-stacking."""

    def __init__(self, batch: Batch):
        super().__init__(zip(batch.images.unbind(0), batch.labels.tolist(), strict=True))
        self.batch = batch


def split_key(key: Key, augment: bool) -> tuple[int, int]:
    """(index, seed) from a key; a bare index under augmentation draws its seed from the global RNG."""
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    seed = int(torch.randint(0, 2**62, ()).item()) if augment else 0
    return int(key), seed


class InMemoryImages(Dataset):
    """``images`` (N, C, H, W) uint8 or float in [0, 1], ``labels`` (N,) -> normalised (C, S, S) floats.

    Training augmentation (``pad`` > 0 and/or ``flip``) is applied before normalisation, so padding
    is black (0), as in the CIFAR recipe. ``__getitems__`` builds a whole batch in one vectorised
    pass; the DataLoader calls it when it exists (any collate works; ``loader.collate`` skips
    re-stacking).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int,
        pad: int = 0,
        flip: bool = False,
    ):
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"expected images (N, C, H, W) and N labels, got {tuple(images.shape)} and {len(labels)}")
        self.images, self.labels = images, labels.long()
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_size, self.pad, self.flip = image_size, pad, flip

    @property
    def augment(self) -> bool:
        return self.pad > 0 or self.flip

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, keys: list[Key]) -> Batch:
        """The samples ``keys`` as one batch, augmented and normalised in one vectorised pass."""
        idx, seeds = zip(*(split_key(k, self.augment) for k in keys), strict=True)
        index = torch.tensor(idx, dtype=torch.long)
        x = self.images[index]  # (B, C, H, W)
        if self.augment:
            x = T.crop_flip(x, seeds, pad=self.pad, flip=self.flip)
        x = T.normalize(T.resize(T.to_float(x), self.image_size), self.mean, self.std)
        return Batch(x, self.labels[index], [])

    def __getitems__(self, keys: list[Key]) -> Samples:
        return Samples(self.batch(keys))

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int]:
        batch = self.batch([key])
        return batch.images[0], int(batch.labels[0])
