"""scikit-learn's bundled handwritten digits (UCI ML digits; ``sklearn.datasets.load_digits``).

1,797 real 8x8 grey images, values 0..16, 10 classes; shipped inside scikit-learn, so no download.
Made CIFAR-shaped: scaled to [0, 1], bilinearly upsampled to ``image_size`` (default 32, the input
CIFAR-style networks expect), one channel, normalised with the train split's mean/std. Training
augmentation: random crop after zero-padding by image_size // 8 (4 px at 32, i.e. 1 px of the 8x8
original, the CIFAR ratio). No flip: digits are not mirror-symmetric.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ._common import DataBundle
from .memory import InMemoryImages

DIGITS_SIZE = 8  # native resolution
DIGITS_MAX = 16.0  # pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap)
DEFAULT_IMAGE_SIZE = 32
DEFAULT_VAL_FRACTION = 0.2


def _split(labels, val_fraction: float, seed: int):
    """Stratified (train_idx, val_idx), fixed by ``seed``."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1), e.g. 0.2 for an 80/20 split")
    idx = list(range(len(labels)))
    return train_test_split(idx, test_size=val_fraction, stratify=labels, random_state=seed, shuffle=True)


def load_digits(image_size: int | None = None, *, val_fraction: float = DEFAULT_VAL_FRACTION,
                seed: int = 0) -> DataBundle:
    """The digits bundle; ``seed`` fixes the stratified split (keep it constant across training seeds)."""
    from sklearn import datasets

    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if size < DIGITS_SIZE:
        raise ValueError(f"image_size={size} is below digits' native 8x8; use 8 or more (default 32)")
    d = datasets.load_digits()
    x = torch.from_numpy(d.images).float().div_(DIGITS_MAX).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    if size != DIGITS_SIZE:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    y = torch.from_numpy(d.target).long()
    tr, va = _split(d.target, val_fraction, seed)
    tr, va = torch.tensor(tr), torch.tensor(va)
    mean, std = x[tr].mean().item(), x[tr].std().item()  # one channel: train-split statistics
    common = dict(mean=(mean,), std=(std,), image_size=size)
    return DataBundle(
        name="digits",
        train=InMemoryImages(x[tr], y[tr], pad=size // 8, flip=False, **common),
        val=InMemoryImages(x[va], y[va], **common),
        num_classes=10,
        in_chans=1,
        image_size=size,
        classes=[str(c) for c in d.target_names],
        mean=(mean,),
        std=(std,),
    )
