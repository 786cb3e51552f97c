"""`senet analyze`: what the excitations of a trained network do (SENet, Hu et al., arXiv 1709.01507, Sec. 7.2).

Every attention block (``senet.layers.attention_blocks``: found by type, in any slot) is hooked; its
``excitation(x)`` is recorded for every image as a vector ``e`` (SE: the scale s, (B, C); maps with a
spatial extent are averaged over H, W; SK's (B, M, C, 1, 1) is flattened to (B, M*C)). Per block:

- class means  m_k = mean of e over the images of class k, (K, C) - the curves of the paper's Fig. 6;
- specificity  S = B / W, with B = Σ_k p_k ||m_k - m||² / C (between-class variance, p_k the class
  share, m the overall mean) and W = mean_i ||e_i - m_{y_i}||² / C (mean within-class variance).
  S = 0: every class gets the same excitation; S >> 1: the excitation tells classes apart.
- saturation   the share of gate values < 0.05 or > 0.95;
- variation    V = mean over channels of the standard deviation of e_c across inputs.
  A block is *flagged* as nearly constant when V < threshold (default 0.02, gate units: a sigmoid
  gate that moves by under 2% of its range is, to the next layer, a fixed per-channel scale).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from senet.layers import attention_blocks

SATURATION_BAND = (0.05, 0.95)  # a gate value outside this band counts as saturated
DEFAULT_THRESHOLD = 0.02  # V below this flags a block as nearly constant (see module docstring)


def _has_excitation(block: nn.Module) -> bool:
    # a wrapper (senet.attach's GatedExcitation) excites through the block it holds
    inner = getattr(block, "block", block)
    return callable(getattr(block, "excitation", None)) and callable(getattr(inner, "excitation", None))


def _per_input(e: torch.Tensor) -> torch.Tensor:
    """An excitation of any block as (B, D): spatial maps averaged over (H, W), the rest flattened."""
    if e.dim() >= 4:
        e = e.mean((-2, -1))  # (B, C, H, W) -> (B, C); (B, M, C, 1, 1) -> (B, M, C)
    return e.flatten(1)


@dataclass
class Recording:
    """Excitations of every recorded block over a data set."""

    excitations: dict[str, torch.Tensor]  # name -> (N, D) float32
    labels: torch.Tensor  # (N,) int64
    scale_form: dict[str, bool]  # block(x) == x * excitation(x) with a (B, C, 1, 1) excitation
    skipped: dict[str, str]  # name -> why it was not recorded


def record_excitations(model: nn.Module, loader, *, device: torch.device | str = "cpu",
                       max_samples: int | None = None) -> Recording:
    """Run ``model`` (eval mode) over ``loader`` and record each attention block's excitation."""
    blocks = attention_blocks(model)
    if not blocks:
        raise ValueError("the model has no attention blocks (no module of a registered attention type); "
                         "analyze a network built with attention, e.g. se_resnet20")
    store: dict[str, list[torch.Tensor]] = {n: [] for n in blocks}
    scale_form: dict[str, bool] = {}
    skipped = {n: f"{type(b).__name__} has no excitation(x)" for n, b in blocks.items()
               if not _has_excitation(b)}

    def hook_for(name: str):
        def hook(module: nn.Module, args, out: torch.Tensor) -> None:
            x = args[0]
            e = module.excitation(x)
            store[name].append(_per_input(e).float().cpu())
            if name not in scale_form:
                scale_form[name] = bool(e.dim() == 4 and e.shape[-2:] == (1, 1)
                                        and torch.allclose(out, x * e, rtol=1e-4, atol=1e-6))
        return hook

    handles = [b.register_forward_hook(hook_for(n)) for n, b in blocks.items() if n not in skipped]
    labels = _run(model, loader, torch.device(device), max_samples, handles)
    n = len(labels)
    excitations = {k: torch.cat(v)[:n] for k, v in store.items() if v}
    return Recording(excitations, labels, scale_form, skipped)


def _run(model: nn.Module, loader, device: torch.device, max_samples: int | None, handles) -> torch.Tensor:
    was_training, labels, seen = model.training, [], 0
    model.eval()
    try:
        with torch.inference_mode():
            for images, y in loader:
                model(images.to(device))
                labels.append(y.cpu())
                seen += len(y)
                if max_samples is not None and seen >= max_samples:
                    break
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if not labels:
        raise ValueError("the loader yielded no samples; check the data set is not empty")
    return torch.cat(labels)[:max_samples]


@dataclass
class BlockStats:
    name: str
    dims: int  # D, the length of the excitation vector (C for SE)
    specificity: float | None  # B / W; None when W = 0 < B (perfectly class-determined)
    between: float
    within: float
    saturation: float  # share of values outside SATURATION_BAND
    variation: float  # V, mean over channels of the std across inputs
    flagged: bool  # V < threshold: nearly constant
    mean: list[float]  # (D,) s̄, the constant a pruned block is replaced by
    class_means: list[list[float]]  # (K, D), NaN rows for classes without samples


def block_stats(name: str, e: torch.Tensor, labels: torch.Tensor, num_classes: int,
                threshold: float = DEFAULT_THRESHOLD) -> BlockStats:
    """The numbers of the module docstring for one block's excitations ``e`` (N, D)."""
    e = e.double()
    mean = e.mean(0)  # (D,) m
    class_means = torch.full((num_classes, e.shape[1]), float("nan"), dtype=e.dtype)
    between = 0.0
    for k in labels.unique().tolist():
        members = e[labels == k]
        class_means[k] = members.mean(0)
        between += len(members) / len(e) * (class_means[k] - mean).square().mean().item()
    within = (e - class_means[labels]).square().mean().item()
    spec = between / within if within > 1e-12 else (0.0 if between <= 1e-12 else None)
    lo, hi = SATURATION_BAND
    variation = e.std(0, unbiased=False).mean().item()
    return BlockStats(name, e.shape[1], spec, between, within, ((e < lo) | (e > hi)).double().mean().item(),
                      variation, variation < threshold, mean.tolist(), class_means.tolist())


def analyze(recording: Recording, num_classes: int, threshold: float = DEFAULT_THRESHOLD) -> list[BlockStats]:
    """``block_stats`` for every recorded block, in network order."""
    return [block_stats(n, e, recording.labels, num_classes, threshold) for n, e in recording.excitations.items()]


# ----------------------------------------------------------------------------- plot (paper Fig. 6)


def plot_class_means(stats: list[BlockStats], path: str | Path, *, classes: list[str] | None = None,
                     channels: int = 64, max_classes: int = 10) -> Path:
    """One panel per block: mean excitation per class over ``channels`` evenly sampled channels."""
    from senet.plotting import pyplot, save_figure

    plt = pyplot()

    cols = min(4, len(stats))
    rows = -(-len(stats) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, st in zip(axes.flat, stats, strict=False):  # spare panels stay empty
        idx = np.unique(np.linspace(0, st.dims - 1, min(channels, st.dims)).round().astype(int))
        cm = np.asarray(st.class_means)[:, idx]  # (K, channels sampled)
        for k in range(min(max_classes, len(cm))):
            if not np.isnan(cm[k]).all():
                ax.plot(idx, cm[k], lw=0.9, label=(classes[k] if classes else str(k)))
        ax.plot(idx, np.asarray(st.mean)[idx], "k--", lw=1.2, label="all")
        spec = "n/a" if st.specificity is None else f"{st.specificity:.2f}"
        ax.set_title(f"{st.name}  S={spec}{'  FLAGGED' if st.flagged else ''}", fontsize=8)
        ax.set_xlabel("channel index", fontsize=7)
        ax.set_ylabel("activation", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(stats):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=5, ncol=2)
    return save_figure(fig, path, dpi=100)


def format_stats(stats: list[BlockStats], threshold: float) -> str:
    w = max(len(s.name) for s in stats)
    lines = [f"{'block':<{w}}  {'dims':>5}  {'specif.':>8}  {'satur.':>7}  {'variation':>9}  flag (V < {threshold:g})"]
    for s in stats:
        spec = "inf" if s.specificity is None else f"{s.specificity:.3f}"
        lines.append(f"{s.name:<{w}}  {s.dims:>5}  {spec:>8}  {100 * s.saturation:6.1f}%  {s.variation:9.4f}  "
                     f"{'constant' if s.flagged else ''}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- `senet analyze`


def load_for_data(args: argparse.Namespace):
    """The model (``args.checkpoint``), its data bundle and a loader over ``args.split`` (analyze, prune)."""
    from senet.checkpoint import data_settings
    from senet.data import create_datasets, create_loaders
    from senet.export import load_spec

    loaded = load_spec(args.checkpoint)
    data, root, image_size = data_settings(loaded.header, args.data, args.root, args.image_size)
    bundle = create_datasets(data, root, image_size=image_size)
    train, val = create_loaders(bundle, args.batch_size, workers=args.workers)
    return loaded, bundle, (val if args.split == "val" else train)


def _command(args: argparse.Namespace) -> int:
    from senet.provenance import provenance, write_json

    loaded, bundle, loader = load_for_data(args)
    device = torch.device(args.device)
    rec = record_excitations(loaded.model.to(device), loader, device=device, max_samples=args.max_samples)
    stats = analyze(rec, bundle.num_classes, args.threshold)
    print(f"{loaded.arch} on {bundle.name} ({args.split}, {len(rec.labels)} images):")
    print(format_stats(stats, args.threshold))
    for name, why in rec.skipped.items():
        print(f"skipped {name}: {why}")
    out = Path(args.out) if args.out else Path(loaded.checkpoint or ".").parent
    stem = Path(args.checkpoint).name.removesuffix(".safetensors")
    png = plot_class_means(stats, out / f"analyze-{stem}.png", classes=bundle.classes, channels=args.plot_channels)
    config = {"checkpoint": args.checkpoint, "arch": loaded.arch, "data": bundle.describe(), "split": args.split,
              "threshold": args.threshold, "saturation_band": SATURATION_BAND, "samples": len(rec.labels)}
    payload = {**provenance(config, device), "classes": bundle.classes, "skipped": rec.skipped,
               "scale_form": rec.scale_form, "blocks": [asdict(s) for s in stats]}
    js = write_json(out / f"analyze-{stem}.json", payload)
    print(f"wrote {png} and {js}")
    return 0


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a senet .safetensors checkpoint")
    p.add_argument("--data", default=None, help="digits, cifar10, cifar100, imagefolder:PATH "
                                                "(default: the checkpoint's training set, else digits)")
    p.add_argument("--root", default=None, help="directory holding the data set files")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument("--max-samples", type=int, default=None, help="stop after this many images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"flag a block when its mean per-channel std across inputs is below this "
                        f"(default {DEFAULT_THRESHOLD})")


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="record every attention block's excitations over a data set: "
                                       "class-specificity, saturation, constant blocks, Fig. 6 plots")
    add_data_args(p)
    p.add_argument("--plot-channels", type=int, default=64, help="channels sampled per panel")
    p.add_argument("--out", default=None, help="output directory (default: the checkpoint's)")
    p.set_defaults(func=_command)
