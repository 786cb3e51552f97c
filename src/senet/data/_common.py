"""Types every data set shares: the bundle a data set is handed out as, and the record of bad files."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SkippedSample:
    """What a streamed data set returns in place of ``(image, label)`` for a file it cannot decode.

    The loaders' collate drops it and the loader records it in ``DataProblems``.
    """

    path: str
    reason: str


@dataclass
class DataProblems:
    """Files skipped at load time (truncated, not an image): counted, and reported once at the end.

    ``files`` maps each bad path to why it failed; ``occurrences`` counts every time one was hit
    (a bad file is met once per epoch). ``len(problems)`` is the number of distinct bad files.
    """

    files: dict[str, str] = field(default_factory=dict)
    occurrences: int = 0

    def add(self, path: str, reason: str) -> None:
        self.files.setdefault(path, reason)
        self.occurrences += 1

    def __len__(self) -> int:
        return len(self.files)

    def summary(self, limit: int = 10) -> str:
        """One line per file (at most ``limit``), or ``""`` when nothing was skipped."""
        if not self.files:
            return ""
        head = f"skipped {len(self.files)} unreadable file(s) ({self.occurrences} time(s)); fix or delete them:"
        lines = [f"  {p}: {r}" for p, r in list(self.files.items())[:limit]]
        more = len(self.files) - limit
        return "\n".join([head, *lines] + ([f"  ... and {more} more"] if more > 0 else []))

    def report(self, limit: int = 10) -> str:
        """Warn (``UserWarning``) naming the skipped files; return the text ("" when clean)."""
        text = self.summary(limit)
        if text:
            warnings.warn(text, stacklevel=2)
        return text

    def as_dict(self) -> dict:
        """For results files: ``{"skipped_files": n, "occurrences": k, "files": {path: reason}}``."""
        return {"skipped_files": len(self.files), "occurrences": self.occurrences, "files": dict(self.files)}


@dataclass
class DataBundle:
    """A data set ready to train on: both splits, and what a model needs to know about them.

    ``train`` yields ``(image float tensor (C, H, W), int label)`` with training augmentation, ``val``
    the evaluation transform. ``mean``/``std`` are the per-channel normalisation applied to both.
    """

    name: str  # "digits", "cifar10", "cifar100", "imagefolder:<path>"
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    num_classes: int
    in_chans: int
    image_size: int  # the model input resolution
    classes: list[str]
    problems: DataProblems = field(default_factory=DataProblems)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def describe(self) -> dict:
        """A JSON-ready summary for results files and checkpoints."""
        return {
            "name": self.name,
            "train_size": len(self.train),
            "val_size": len(self.val),
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }
