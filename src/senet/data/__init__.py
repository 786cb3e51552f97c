"""Data sets and loaders: digits (embedded), CIFAR-10/100 pickles, ImageFolder trees.

    bundle = create_datasets("digits")                  # or "cifar10", "imagefolder:/data/imagenette"
    train, val = create_loaders(bundle, 128, workers=2, seed=0)
    train.set_epoch(epoch, start_step=0)                # every epoch; start_step > 0 to resume mid-epoch
    ...
    bundle.problems.report()                            # at the end: warns naming skipped files

See docs/data.md. This package imports nothing from ``senet.models``.
"""

from __future__ import annotations

from pathlib import Path

from ._common import DataBundle, DataProblems, SkippedSample
from .digits import DEFAULT_VAL_FRACTION  # digits only: CIFAR uses its test batch, ImageFolder its val/
from .loader import EpochBatchSampler, EpochLoader, Loaders, create_loaders

_NAMES = ("digits", "cifar10", "cifar100", "imagefolder:<path>")


def list_datasets() -> list[str]:
    """The data set names ``create_datasets`` accepts."""
    return list(_NAMES)


def create_datasets(name: str = "digits", root: str | None = None, *, image_size: int | None = None,
                    download: bool = False, val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0) -> DataBundle:
    """Build a ``DataBundle`` by name.

    name: ``digits`` (scikit-learn's bundled 8x8 digits, upsampled to ``image_size`` 32), ``cifar10`` /
    ``cifar100`` (python pickles under ``root``, default ./data), ``imagefolder:<path>`` or
    ``imagefolder`` with ``root`` (root/train/<class>/..., root/val/<class>/...; ``image_size`` 224).
    download: fetch CIFAR with torchvision (needs the internet). val_fraction, seed: digits' stratified
    split (keep ``seed`` fixed across training seeds so every run is scored on the same images).
    """
    key = name.strip() if isinstance(name, str) else name
    low = key.lower() if isinstance(key, str) else key
    if image_size is not None and int(image_size) < 1:
        raise ValueError(f"image_size={image_size} must be a positive number of pixels")
    if low == "digits":
        from .digits import load_digits

        return load_digits(image_size, val_fraction=val_fraction, seed=seed)
    if low in ("cifar10", "cifar100", "cifar-10", "cifar-100"):
        from .cifar import load_cifar

        return load_cifar(low.replace("-", ""), root, image_size, download=download)
    if isinstance(low, str) and (low == "imagefolder" or low.startswith("imagefolder:")):
        path = key.split(":", 1)[1] if ":" in key else root
        if not path:
            raise ValueError("imagefolder needs a path: name='imagefolder:/path/to/tree' or root='/path/to/tree'")
        from .folder import load_image_folder

        return load_image_folder(Path(path), image_size)
    if isinstance(key, str) and ("/" in key or key.startswith(".")):  # meant as a path, but there is none
        raise FileNotFoundError(f"no directory at {key!r}; give an ImageFolder tree (train/<class>/, val/<class>/) "
                                f"or one of {list(_NAMES)}")
    raise ValueError(f"unknown data set {name!r}; choose one of {list(_NAMES)}")


__all__ = [
    "DataBundle",
    "DataProblems",
    "EpochBatchSampler",
    "EpochLoader",
    "Loaders",
    "SkippedSample",
    "create_datasets",
    "create_loaders",
    "list_datasets",
]
