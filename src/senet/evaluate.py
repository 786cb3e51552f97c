"""Evaluate a classifier: top-1/top-5 accuracy, mean loss, per-class accuracy, confusion matrix.

``evaluate(model, loader, ...)`` is the library call (the training loop uses it every epoch);
``senet eval CHECKPOINT`` is the command: it prints the figures, writes a JSON file with
provenance (config, versions, device, git revision) and a confusion-matrix PNG.

Accuracies are in percent, as the papers report them (SENet, arXiv 1709.01507, Tables 2-5).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from senet.provenance import provenance, write_json


@dataclass
class EvalResult:
    """What one pass over a labelled set measured. Accuracies in percent.

    ``confusion[t, p]`` counts samples of true class t predicted as p (rows sum to the class counts).
    ``per_class[c]`` is ``confusion[c, c] / confusion[c].sum()`` (NaN for a class with no samples).
    ``topk`` is the k used for ``top5``: 5, capped at ``num_classes``.
    """

    top1: float
    top5: float
    loss: float
    per_class: np.ndarray  # (K,)
    confusion: np.ndarray  # (K, K), int64
    num_samples: int
    topk: int = 5
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["per_class"] = [None if np.isnan(a) else float(a) for a in self.per_class]
        d["confusion"] = self.confusion.tolist()
        return d

    @classmethod
    def from_counts(cls, confusion: np.ndarray, loss_sum: float, topk_hits: int, n: int, k: int,
                    seconds: float = 0.0) -> EvalResult:
        """The result of ``n`` samples from their (K, K) confusion counts, summed loss and top-k hits
        (sums over DDP ranks combine this way)."""
        counts = confusion.sum(axis=1)  # (K,) samples per true class
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = 100.0 * np.diag(confusion) / counts
        return cls(top1=100.0 * np.trace(confusion) / n, top5=100.0 * topk_hits / n, loss=loss_sum / n,
                   per_class=per_class.astype(np.float64), confusion=confusion.astype(np.int64), num_samples=n,
                   topk=k, seconds=seconds)


# --amp choices of `senet train` and `senet eval` -> autocast dtype (None: full float32)
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """``torch.autocast`` on ``device``'s type with ``amp_dtype``, or a no-op context for None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def evaluate(
    model: nn.Module,
    loader,
    *,
    device: torch.device | str,
    num_classes: int,
    amp_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Run ``model`` over ``loader`` (yielding ``(images, labels)``) without gradients.

    The loss is the mean cross-entropy over samples, computed in float32 even under autocast.
    The model's train/eval mode is restored afterwards.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    device = torch.device(device)
    k = min(5, num_classes)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    loss_sum, topk_hits, n = 0.0, 0, 0
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            with autocast(device, amp_dtype):
                logits = model(images)
            logits = logits.float()  # (B, K)
            _check_labels(labels, num_classes, logits)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            top = logits.topk(k, dim=1).indices  # (B, k), best first
            topk_hits += (top == labels[:, None]).any(dim=1).sum().item()
            # flatten (true, pred) pairs into one index t*K + p and count them
            idx = (labels * num_classes + top[:, 0]).cpu()
            confusion += torch.bincount(idx, minlength=num_classes * num_classes)
            n += labels.numel()
    model.train(was_training)
    if n == 0:
        raise ValueError("the loader yielded no samples; check the data set is not empty")
    return EvalResult.from_counts(confusion.view(num_classes, num_classes).numpy(), loss_sum, topk_hits, n, k,
                                  time.perf_counter() - start)


def _check_labels(labels: torch.Tensor, num_classes: int, logits: torch.Tensor) -> None:
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(
            f"model outputs shape {tuple(logits.shape)} but num_classes={num_classes}; "
            "build the model with the data set's number of classes"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
        raise ValueError(f"label {bad} out of range [0, {num_classes}); check the data set's classes")


# ----------------------------------------------------------------------------- plots and text


def plot_confusion(confusion: np.ndarray, path: str | Path, *, classes: list[str] | None = None,
                   title: str = "") -> Path:
    """Row-normalised confusion matrix (true class down, predicted across) as a PNG."""
    from senet.plotting import pyplot, save_figure

    plt = pyplot()

    k = confusion.shape[0]
    rows = confusion.sum(axis=1, keepdims=True).clip(min=1)
    fig, ax = plt.subplots(figsize=(min(2 + 0.45 * k, 14), min(1.6 + 0.45 * k, 13)))
    im = ax.imshow(confusion / rows, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    if k <= 30:  # beyond that the labels are unreadable
        names = classes or [str(i) for i in range(k)]
        ax.set_xticks(range(k), names, rotation=90 if k > 10 else 0)
        ax.set_yticks(range(k), names)
        for t in range(k):
            for p in range(k):
                if confusion[t, p]:
                    ax.text(p, t, str(confusion[t, p]), ha="center", va="center", fontsize=7,
                            color="white" if confusion[t, p] / rows[t, 0] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    return save_figure(fig, path)


def format_result(result: EvalResult, classes: list[str] | None = None) -> str:
    lines = [
        f"samples {result.num_samples}   top-1 {result.top1:.2f}%   top-{result.topk} {result.top5:.2f}%"
        f"   loss {result.loss:.4f}",
        "per-class accuracy:",
    ]
    names = classes or [str(i) for i in range(len(result.per_class))]
    w = max(len(n) for n in names)
    counts = result.confusion.sum(axis=1)
    for name, acc, c in zip(names, result.per_class, counts, strict=True):
        shown = "   n/a" if np.isnan(acc) else f"{acc:6.2f}%"
        lines.append(f"  {name:<{w}}  {shown}  (n={c})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- `senet eval`



def _eval_command(args: argparse.Namespace) -> int:
    from senet.checkpoint import data_settings, require_header
    from senet.data import create_datasets, create_loaders
    from senet.hub import load_model

    ckpt = Path(args.checkpoint)
    header = require_header(ckpt)
    data, root, image_size = data_settings(header, args.data, args.root, args.image_size)
    bundle = create_datasets(data, root, image_size=image_size)
    _, loader = create_loaders(bundle, args.batch_size, workers=args.workers)
    device = torch.device(args.device)
    model = load_model(ckpt, map_location=device)
    result = evaluate(model, loader, device=device, num_classes=bundle.num_classes, amp_dtype=AMP_DTYPES[args.amp])
    if bundle.problems and len(bundle.problems):
        print(bundle.problems.report())
    print(f"{header['arch']} on {bundle.name} (val, image size {bundle.image_size}):")
    print(format_result(result, bundle.classes))
    out = Path(args.out) if args.out else ckpt.parent
    config = {"checkpoint": str(ckpt), "arch": header["arch"], "data": bundle.describe(),
              "batch_size": args.batch_size, "amp": args.amp}
    payload = {**provenance(config, device), "checkpoint_provenance": header.get("provenance"),
               "classes": bundle.classes, "result": result.to_dict()}
    json_path = write_json(out / f"eval-{ckpt.stem}.json", payload)
    png = plot_confusion(result.confusion, out / f"eval-{ckpt.stem}-confusion.png", classes=bundle.classes,
                         title=f"{header['arch']} on {bundle.name}: top-1 {result.top1:.2f}%")
    print(f"wrote {json_path} and {png}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: top-1/top-5, loss, per-class accuracy, "
                                    "confusion matrix")
    p.add_argument("checkpoint", help="a senet .safetensors checkpoint (`senet train`, `senet convert`)")
    p.add_argument("--data", default=None,
                   help="data set: digits, cifar10, cifar100, imagefolder:PATH (default: the one the "
                        "checkpoint was trained on, else digits)")
    p.add_argument("--root", default=None, help="directory holding the data set files")
    p.add_argument("--image-size", type=int, default=None, help="input resolution (default: as trained)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    p.add_argument("--amp", choices=sorted(AMP_DTYPES), default="none", help="autocast dtype for the forward pass")
    p.add_argument("--out", default=None, help="output directory (default: the checkpoint's directory)")
    p.set_defaults(func=_eval_command)
