"""`senet prune`: remove attention blocks whose excitation is nearly constant (`senet analyze` flags them).

The SENet paper (Hu et al., arXiv 1709.01507, Sec. 7.2) finds the last-stage SE blocks nearly
class-agnostic and drops them for < 0.1% top-5 at ~6% fewer parameters; this tool does it for any
network and reports what it saved and cost. A flagged block ``A(u) = u * s(u)`` is replaced by
``u * s̄`` (s̄: its mean excitation over the data) folded into the layer producing ``u`` when that is
exact, otherwise by ``nn.Identity``:

    BN producer:    s̄ ⊙ (γ x̂ + β) = (s̄ γ) x̂ + s̄ β         -> scale γ and β (standard placement)
    conv producer:  s̄ ⊙ (W * x + b) = (s̄ W) * x + s̄ b       -> scale output filters (pre-act units)
    through ReLU:   s̄ ⊙ relu(v) = relu(s̄ ⊙ v) for s̄ >= 0   -> fold into the layer before the ReLU

The producer is found by tracing tensors through the unit's leaf modules; it must feed only the block.
The pruned checkpoint records the removed blocks in ``extra["pruned"]``; ``senet.load_model`` rebuilds it
(``remove_recorded``).
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from senet.layers._common import NoScript


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def remove_recorded(model: nn.Module, record: dict | None) -> nn.Module:
    """Set the blocks a pruned checkpoint lists (``extra["pruned"]["blocks"]``) to Identity, in place, and
    keep ``record`` as ``model.senet_pruned`` so a re-saved model keeps it. ``record=None``: unchanged."""
    if not record:
        return model
    for name in record.get("blocks", []):
        _set_module(model, name, nn.Identity())
    model.senet_pruned = dict(record)
    return model


class ConstantScale(NoScript, nn.Module):
    """``u * s̄``: what a folded block computes (the reference pruning is checked against)."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


# ----------------------------------------------------------------------------- finding the producer


def _trace_unit(model: nn.Module, attn_name: str, x: torch.Tensor):
    """Every call of the unit's leaf modules (not the block's own): [(name, module, input, output)] in call
    order, the index of the first call after the block started, and the block's input.

    A module whose only child is the block (``senet.attach`` hangs ``attached`` off the layer it follows)
    counts as a leaf, the unit itself included; its hook runs first, so it sees the output the block gets."""
    unit_name, _, leaf = attn_name.rpartition(".")
    unit = model.get_submodule(unit_name) if unit_name else model
    block = model.get_submodule(attn_name)
    calls, seen = [], {}

    def leaf_hook(name):
        def hook(m, args, out):
            calls.append((name, m, args[0] if args else None, out))
        return hook

    def attn_hook(m, args):
        seen.setdefault("input", args[0])
        seen.setdefault("at", len(calls))

    handles = [m.register_forward_hook(leaf_hook(n), prepend=True) for n, m in unit.named_modules()
               if not [c for c in m.children() if c is not block] and n != leaf and not n.startswith(leaf + ".")]
    handles.append(block.register_forward_pre_hook(attn_hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls, seen.get("at", 0), seen.get("input")


def find_fold_target(model: nn.Module, attn_name: str, scale: torch.Tensor, x: torch.Tensor) -> str | None:
    """Qualified name of the BatchNorm2d/Conv2d whose output ``attn_name`` alone scales, or None."""
    calls, at, target = _trace_unit(model, attn_name, x)
    walked, tensors = [], []
    for name, module, inp, out in reversed(calls[:at]):
        if out is not target:
            continue
        walked.append(module)
        tensors.append(out)
        if isinstance(module, nn.ReLU) and bool((scale >= 0).all()):
            target = inp  # s relu(v) = relu(s v) for s >= 0
            continue
        affine = isinstance(module, nn.Conv2d) or (isinstance(module, nn.BatchNorm2d) and module.affine)
        others = [n for n, m, i, _ in calls if any(i is t for t in tensors) and not any(m is w for w in walked)]
        if affine and not others and module.weight.shape[0] == scale.numel():
            return ".".join(n for n in (attn_name.rpartition(".")[0], name) if n)
        return None
    return None


@torch.no_grad()
def fold_scale(layer: nn.Module, scale: torch.Tensor) -> None:
    """Multiply ``layer``'s output channels by ``scale`` (C,): BN γ, β; conv filters and bias."""
    s = scale.to(layer.weight.dtype)
    layer.weight.mul_(s.view(-1, *[1] * (layer.weight.dim() - 1)))
    if layer.bias is not None:
        layer.bias.mul_(s)


# ----------------------------------------------------------------------------- pruning


@dataclass
class PrunedBlock:
    name: str
    action: str  # "folded" or "identity"
    into: str | None  # the layer the constant scale was folded into


def prune_blocks(model: nn.Module, blocks: dict[str, torch.Tensor | None], example: torch.Tensor, *,
                 fold: bool = True, check: bool = True) -> list[PrunedBlock]:
    """Remove ``blocks`` ({name: mean excitation s̄ (C,) or None}) from ``model`` in place.

    With ``fold``, a block whose s̄ is given and whose producer is found is folded; the rest become
    Identity. ``check`` compares the result on ``example`` with the model where folded blocks are
    ``ConstantScale(s̄)`` and removed ones Identity (they must agree to 1e-5 relative: folding is exact).
    """
    reference = copy.deepcopy(model) if check else None
    done = []
    for name, scale in blocks.items():
        into = find_fold_target(model, name, scale, example) if fold and scale is not None else None
        if into is not None:
            fold_scale(model.get_submodule(into), scale)
        _set_module(model, name, nn.Identity())
        if reference is not None:
            _set_module(reference, name, ConstantScale(scale) if into else nn.Identity())
        done.append(PrunedBlock(name, "folded" if into else "identity", into))
    if reference is not None:
        with torch.no_grad():
            ref = reference.eval()(example)
            diff = (model.eval()(example) - ref).abs().max().item()
        if diff > 1e-5 * max(1.0, ref.abs().max().item()):  # float32 rounding grows with the logits' size
            raise RuntimeError(f"folding changed the logits by {diff:.2e} beyond the constant-scale model; "
                               "this is a bug in senet.prune, please report it")
    return done


def scale_form_blocks(stats, scale_form: dict[str, bool]) -> dict[str, torch.Tensor | None]:
    """{name: s̄ if the block is ``u * s(u)`` else None} for the flagged blocks."""
    return {s.name: torch.tensor(s.mean) if scale_form.get(s.name) else None for s in stats if s.flagged}


# ----------------------------------------------------------------------------- `senet prune`


def _cost(model: nn.Module, input_size) -> dict[str, int]:
    from senet.flops import count_macs, count_params

    return {"params": count_params(model), "macs": count_macs(model, tuple(input_size), device="cpu")}


def _command(args: argparse.Namespace) -> int:
    from senet.analyze import analyze, load_for_data, record_excitations
    from senet.checkpoint import save_checkpoint
    from senet.evaluate import evaluate
    from senet.provenance import provenance, write_json

    loaded, bundle, loader = load_for_data(args)
    model, size = loaded.model, (bundle.in_chans, bundle.image_size, bundle.image_size)
    rec = record_excitations(model, loader, max_samples=args.max_samples)
    stats = analyze(rec, bundle.num_classes, args.threshold)
    chosen = _choose(stats, rec.scale_form, args.blocks)
    if not chosen:
        print(f"no attention block is nearly constant (threshold {args.threshold:g}); nothing to prune")
        return 0
    before, cost_before = evaluate(model, loader, device="cpu", num_classes=bundle.num_classes), _cost(model, size)
    example = next(iter(loader))[0][:8]
    done = prune_blocks(model, chosen, example, fold=not args.no_fold)
    after, cost_after = evaluate(model, loader, device="cpu", num_classes=bundle.num_classes), _cost(model, size)
    _print_summary(done, before, after, cost_before, cost_after)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(
        Path(args.checkpoint).name.removesuffix(".safetensors") + "-pruned.safetensors")
    earlier = (getattr(model, "senet_pruned", None) or {}).get("blocks", [])  # pruned before: keep them
    extra = {**(loaded.header.get("extra") or {}),
             "pruned": {"blocks": [*earlier, *(d.name for d in done)], "from": args.checkpoint,
                        "threshold": args.threshold}}
    save_checkpoint(out, model, arch=loaded.arch, model_kwargs=loaded.model_kwargs, extra=extra,
                    source=f"senet prune {args.checkpoint}")
    config = {"checkpoint": args.checkpoint, "arch": loaded.arch, "data": bundle.describe(), "split": args.split,
              "threshold": args.threshold, "fold": not args.no_fold, "out": str(out)}
    payload = {**provenance(config, "cpu"), "pruned": [asdict(d) for d in done],
               "before": {**cost_before, "top1": before.top1, "top5": before.top5},
               "after": {**cost_after, "top1": after.top1, "top5": after.top5}}
    js = write_json(out.with_name(out.name.removesuffix(".safetensors") + ".json"), payload)
    print(f"wrote {out} and {js}")
    return 0


def _choose(stats, scale_form, names: str | None) -> dict[str, torch.Tensor | None]:
    if not names:
        return scale_form_blocks(stats, scale_form)
    by_name = {s.name: s for s in stats}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ValueError(f"--blocks {unknown} are not recorded attention blocks; choose from {list(by_name)}")
    return {n: torch.tensor(by_name[n].mean) if scale_form.get(n) else None for n in wanted}


def _print_summary(done, before, after, cost_before, cost_after) -> None:
    for d in done:
        print(f"  {d.name}: " + (f"folded into {d.into}" if d.into else "replaced by Identity"))
    dp, dm = cost_before["params"] - cost_after["params"], cost_before["macs"] - cost_after["macs"]
    print(f"params {cost_before['params']:,} -> {cost_after['params']:,} (-{dp:,}, "
          f"-{100 * dp / cost_before['params']:.2f}%);  MACs {cost_before['macs']:,} -> {cost_after['macs']:,} "
          f"(-{dm:,})")
    print(f"top-1 {before.top1:.2f}% -> {after.top1:.2f}% ({after.top1 - before.top1:+.2f});  "
          f"top-5 {before.top5:.2f}% -> {after.top5:.2f}% ({after.top5 - before.top5:+.2f})")


def add_parser(sub) -> None:
    from senet.analyze import add_data_args

    p = sub.add_parser("prune", help="remove nearly constant attention blocks (fold their scale where exact); "
                                     "report params/MACs saved and the accuracy change")
    add_data_args(p)
    p.add_argument("--blocks", default=None, help="comma-separated block names to prune instead of the flagged ones")
    p.add_argument("--no-fold", action="store_true", help="always replace by Identity (do not fold the scale)")
    p.add_argument("--out", default=None, help="pruned checkpoint (default: <checkpoint>-pruned.safetensors)")
    p.set_defaults(func=_command)
