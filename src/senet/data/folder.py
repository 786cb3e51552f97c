"""ImageFolder trees (ImageNet, Imagenette, your own photos), streamed: only file paths are held.

    root/train/<class>/*.jpg|png|...     root/val/<class>/...

Classes are the sorted sub-folders of train/; val/ may lack some but not add new ones. Images are
decoded in DataLoader workers. A file that cannot be decoded (truncated JPEG, text named .jpg) is
returned as a ``SkippedSample``: the collate drops it, the loader records it in ``DataProblems``,
and training goes on. Transforms: ImageNet's (see ``transforms``), normalised with ImageNet's
mean/std.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from . import transforms as T
from ._common import DataBundle, SkippedSample
from .memory import Key, split_key

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_IMAGE_SIZE = 224


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def check_layout(root: Path) -> None:
    """Raise a one-line error naming the path and the fix unless root/train/ and root/val/ exist."""
    if not root.exists():
        raise FileNotFoundError(f"no directory {root}: pass the folder holding train/<class>/ and val/<class>/")
    if not root.is_dir():
        raise ValueError(f"{root} is a file; pass the folder holding train/<class>/ and val/<class>/")
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise FileNotFoundError(f"{root} is empty; put images in {root}/train/<class>/ and {root}/val/<class>/")
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        loose = sum(_is_image(p) for p in entries)
        hint = f"{loose} images lie directly in {root}; " if loose else ""
        raise ValueError(f"{root} has no {' or '.join(s + '/' for s in missing)} folder; {hint}expected the "
                         f"ImageFolder layout {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg")


def scan_split(split_dir: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, label)]) for one split; ``classes`` given = val, checked against train's."""
    dirs = _class_dirs(split_dir)
    if not dirs:
        loose = sum(_is_image(p) for p in split_dir.iterdir())
        what = f"{loose} images but no class folders" if loose else "no class folders"
        raise ValueError(f"{split_dir} has {what}; put each class's images in {split_dir}/<class>/")
    names = [d.name for d in dirs]
    if classes is None:
        classes = names
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ValueError(f"{split_dir} has classes not in train/: {unknown[:5]}; add them to train/ or remove them")
    to_label = {c: i for i, c in enumerate(classes)}
    samples = []
    for d in dirs:
        files = sorted(str(p) for p in d.rglob("*") if _is_image(p))
        if not files and split_dir.name == "train":
            raise ValueError(f"{d} holds no images ({', '.join(IMAGE_EXTENSIONS[:4])}...); add some or remove it")
        samples += [(f, to_label[d.name]) for f in files]
    if not samples:
        raise ValueError(f"{split_dir} holds no images ({', '.join(IMAGE_EXTENSIONS[:4])}...) in its class folders")
    return classes, samples


def load_image(path: str):
    """The RGB PIL image at ``path``, fully decoded (so truncation fails here, not later)."""
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


class ImageFolderDataset(Dataset):
    """``samples`` [(path, label)] decoded on demand and passed through ``transform`` (PIL -> tensor).

    Keys are indices or (index, seed); with a seed, the transform's randomness is that seed's.
    """

    def __init__(self, samples: list[tuple[str, int]], transform: Callable, *, augment: bool):
        self.samples, self.transform, self.augment = samples, transform, augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int] | SkippedSample:
        index, seed = split_key(key, self.augment)
        path, label = self.samples[index]
        try:
            img = load_image(path)
        except (OSError, SyntaxError, ValueError) as err:  # PIL: UnidentifiedImageError is an OSError
            return SkippedSample(path, f"{type(err).__name__}: {err}")
        x = T.seeded(self.transform, seed, img) if self.augment else self.transform(img)
        return x, label


def load_image_folder(root: str | Path, image_size: int | None = None) -> DataBundle:
    """An ImageFolder tree as a streamed bundle (ImageNet transforms at ``image_size``, default 224)."""
    root = Path(root)
    check_layout(root)
    classes, train = scan_split(root / "train")
    _, val = scan_split(root / "val", classes)
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    return DataBundle(
        name=f"imagefolder:{root}",
        train=ImageFolderDataset(train, T.imagenet_train_transform(size), augment=True),
        val=ImageFolderDataset(val, T.imagenet_eval_transform(size), augment=False),
        num_classes=len(classes),
        in_chans=3,
        image_size=size,
        classes=classes,
        mean=T.IMAGENET_MEAN,
        std=T.IMAGENET_STD,
    )
