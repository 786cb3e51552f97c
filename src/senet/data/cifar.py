"""CIFAR-10 / CIFAR-100 (Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009)
in their python pickle layout, read through an unpickler that refuses anything but numpy arrays.

    root/cifar-10-batches-py/  data_batch_1..5, test_batch, batches.meta   (b'labels', b'label_names')
    root/cifar-100-python/     train, test, meta                       (b'fine_labels', b'fine_label_names')

Each batch is a dict: b'data' uint8 (N, 3072) rows of R, G, B planes of 32x32; labels; b'batch_label';
b'filenames'. The test split is the validation set. Training augmentation: 4-pixel zero pad, random
32x32 crop, horizontal flip; both splits normalised per channel with the train split's mean/std
(CIFAR-10: 0.4914 0.4822 0.4465 / 0.2470 0.2435 0.2616 on the real files).
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._common import DataBundle
from .memory import InMemoryImages

CIFAR_SIZE = 32
CIFAR_PAD = 4  # He et al., arXiv 1512.03385, Sec. 4.2


@dataclass(frozen=True)
class _Layout:
    name: str
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: str
    names_key: str
    num_classes: int
    torchvision_class: str


_LAYOUTS = {
    "cifar10": _Layout("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                       "test_batch", "batches.meta", "labels", "label_names", 10, "CIFAR10"),
    "cifar100": _Layout("CIFAR-100", "cifar-100-python", ("train",), "test", "meta",
                        "fine_labels", "fine_label_names", 100, "CIFAR100"),
}

# The only globals a CIFAR pickle needs: numpy's array/dtype reconstructors (numpy 1.x and 2.x
# module paths) and, for pickles written by Python 3 at protocol 2, bytes rebuilt via _codecs.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),  # numpy ints in a label list of a re-pickled file
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: CIFAR files hold only arrays")
        return super().find_class(module, name)


def load_pickle(path: Path) -> dict:
    """A CIFAR batch as a dict with str keys; never runs code from the file."""
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: not a CIFAR python pickle ({err}); re-extract the official archive") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, found {type(obj).__name__}; re-extract the official archive")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_batch(path: Path, lay: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) from one batch file, validated."""
    d = load_pickle(path)
    for key in ("data", lay.label_key):
        if key not in d:
            raise ValueError(f"{path}: no b'{key}' entry (has {sorted(d)}); is this a {lay.name} file?")
    data, labels = np.asarray(d["data"]), np.asarray(d[lay.label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * CIFAR_SIZE**2:
        raise ValueError(f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    bad = np.flatnonzero((labels < 0) | (labels >= lay.num_classes))
    if bad.size:
        raise ValueError(f"{path}: label {labels[bad[0]]} at row {bad[0]} is outside 0..{lay.num_classes - 1} "
                         f"({bad.size} such rows); is this {lay.name}, or a corrupted file?")
    return data.reshape(-1, 3, CIFAR_SIZE, CIFAR_SIZE), labels  # rows are R, G, B planes


def _folder(root: str | Path, lay: _Layout) -> Path:
    """root itself or root/<folder>, whichever holds the batch files."""
    root = Path(root)
    for cand in (root / lay.folder, root):
        if (cand / lay.test).is_file() or (cand / lay.meta).is_file():
            return cand
    if not root.is_dir():
        raise FileNotFoundError(f"no {lay.name} directory {root}: pass the folder holding {lay.folder}/, "
                                f"or download=True where the internet is reachable")
    raise FileNotFoundError(f"{root} holds no {lay.name} files ({lay.meta}, {lay.test}); expected "
                            f"{root / lay.folder}/ from the official python archive, or pass download=True")


def _download(root: Path, lay: _Layout) -> None:
    import torchvision.datasets as tvd

    try:
        getattr(tvd, lay.torchvision_class)(str(root), train=True, download=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise FileNotFoundError(f"could not download {lay.name} into {root} ({err}); without internet, copy the "
                                f"extracted {lay.folder}/ there yourself") from err


def _load_split(folder: Path, files: tuple[str, ...], lay: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)}; re-extract the {lay.name} python archive")
    parts = [_read_batch(folder / f, lay) for f in files]
    if sum(len(p[1]) for p in parts) == 0:
        raise ValueError(f"{folder}: {', '.join(files)} hold no images; re-extract the {lay.name} python archive")
    images, labels = (np.concatenate([p[i] for p in parts]) for i in (0, 1))
    return torch.from_numpy(images), torch.from_numpy(labels)


def _class_names(folder: Path, lay: _Layout) -> list[str]:
    meta = folder / lay.meta
    if not meta.is_file():
        return [str(i) for i in range(lay.num_classes)]
    names = load_pickle(meta).get(lay.names_key, [])
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if len(names) != lay.num_classes:
        raise ValueError(f"{meta}: {len(names)} {lay.names_key}, expected {lay.num_classes}; is this {lay.name}?")
    return names


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images on the [0, 1] scale, in float64 chunks."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    sq = torch.zeros_like(total)
    for part in images.split(chunk):
        v = part.double().div_(255).transpose(0, 1).flatten(1)  # (C, n H W)
        total += v.sum(1)
        sq += v.square().sum(1)
    n = images.numel() // images.shape[1]
    mean = total / n
    std = ((sq - n * mean.square()) / max(n - 1, 1)).clamp_min(0).sqrt()  # unbiased, like Tensor.std
    return tuple(mean.tolist()), tuple(std.tolist())


def load_cifar(name: str, root: str | Path | None, image_size: int | None = None, *,
               download: bool = False) -> DataBundle:
    """CIFAR-10 (``name="cifar10"``) or CIFAR-100 from ``root`` (default ``./data``), test split as val."""
    lay = _LAYOUTS[name]
    root = Path("data" if root is None else root)
    if download:
        _download(root, lay)
    folder = _folder(root, lay)
    x_tr, y_tr = _load_split(folder, lay.train, lay)
    x_va, y_va = _load_split(folder, (lay.test,), lay)
    mean, std = channel_stats(x_tr)
    size = CIFAR_SIZE if image_size is None else int(image_size)
    common = dict(mean=mean, std=std, image_size=size)
    return DataBundle(
        name=name,
        train=InMemoryImages(x_tr, y_tr, pad=CIFAR_PAD, flip=True, **common),
        val=InMemoryImages(x_va, y_va, **common),
        num_classes=lay.num_classes,
        in_chans=3,
        image_size=size,
        classes=_class_names(folder, lay),
        mean=mean,
        std=std,
    )
