"""Augmentation whose randomness is a pure function of (seed, epoch, sample index).

Every random choice for one sample is drawn from ``sample_seed(seed, epoch, index)``, never from the
global RNG, so a batch's content does not depend on worker count, on the model's own use of the RNG,
or on where a run was resumed: skipping the first s batches of an epoch gives the same remaining
batches bit for bit.

- In-memory images (digits, CIFAR): ``crop_flip`` pads, crops and flips a whole batch at once
  (vectorised gather; the CIFAR recipe of He et al., arXiv 1512.03385, Sec. 4.2: 4-pixel pad,
  random 32x32 crop, horizontal flip).
- Streamed images (ImageFolder): torchvision's RandomResizedCrop + flip for training and
  resize(size / 0.875) + center crop for evaluation (the ImageNet recipe, Szegedy et al.
  arXiv 1409.4842 / He et al.), run under ``seeded(sample_seed)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.nn import functional as F

_MASK64 = (1 << 64) - 1

# ImageNet per-channel statistics (RGB, [0, 1] scale): the usual normalisation for ImageFolder data.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875  # 224 / 256: resize the short side to size / 0.875, then center-crop size


def splitmix64(x: int) -> int:
    """One step of the SplitMix64 mixer (Steele et al., 2014): a well-spread 64-bit hash of ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """Fold integers into one 63-bit seed; ``mix_seed(0, 1) != mix_seed(1, 0)`` (unlike ``seed + epoch``)."""
    h = 0
    for p in parts:
        h = splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1  # torch.manual_seed accepts < 2**63 comfortably


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of every random choice made for sample ``index`` in ``epoch`` of a run seeded ``seed``."""
    return mix_seed(seed, epoch, index)


def _uniform_ints(seed: int, highs: Sequence[int]) -> list[int]:
    """One integer in [0, high) per entry of ``highs``, from ``seed`` (SplitMix64 stream; bias < high / 2**64)."""
    out, h = [], seed
    for high in highs:
        h = splitmix64(h)
        out.append(h % high)
    return out


def crop_flip(images: torch.Tensor, seeds: Sequence[int], *, pad: int, flip: bool) -> torch.Tensor:
    """Zero-pad by ``pad``, crop back to (H, W) at a random offset, optionally flip left-right.

    images: (B, C, H, W), any dtype; seeds: B per-sample seeds. Returns (B, C, H, W), same dtype.
    Per sample: dy, dx ~ U{0..2 pad}, flipped with probability 1/2, all drawn from its seed.
    """
    B, C, H, W = images.shape
    highs = (2 * pad + 1, 2 * pad + 1, 2)
    params = torch.tensor([_uniform_ints(s, highs) for s in seeds], dtype=torch.long).view(B, 3)
    dy, dx, coin = params.unbind(1)  # (B,) each
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images  # (B, C, H + 2p, W + 2p)
    rows = dy[:, None] + torch.arange(H)  # (B, H)
    cols = dx[:, None] + torch.arange(W)  # (B, W)
    if flip:
        cols = torch.where(coin[:, None].bool(), cols.flip(1), cols)  # reversed columns = mirror
    b = torch.arange(B)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float images pass through as float32."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, C, H, W) float -> (x - mean_c) / std_c."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, size, size), bilinear; a no-op at the native size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def seeded(fn: Callable, seed: int, *args):
    """Call ``fn(*args)`` with torch's global CPU RNG seeded to ``seed``, restoring it afterwards.

    Makes torchvision's transforms (which draw from the global RNG) a pure function of ``seed``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(*args)


def imagenet_train_transform(size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """PIL image -> (3, size, size): RandomResizedCrop(size) (scale 0.08-1) + horizontal flip."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(size, antialias=True),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def imagenet_eval_transform(size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """PIL image -> (3, size, size): short side to round(size / 0.875) (256 for 224), center crop."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(round(size / EVAL_CROP_FRACTION), antialias=True),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
