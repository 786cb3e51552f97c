"""Checkpoints people already have -> senet networks, and `senet convert IN OUT`.

Reads state dicts saved from timm (``seresnet50``, ``seresnext50_32x4d``, ``resnet50``, ...; the
``legacy_seresnet*`` / ``legacy_seresnext*`` / ``legacy_senet154`` ports of the original Caffe
SENets, arXiv 1709.01507), torchvision (``resnet50``, ``resnext50_32x4d``) and senet itself, from
``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``: never unpickles code) or
``.safetensors``. The layout is detected from the key names, keys are renamed to senet's
(``se``/``se_module`` -> ``attn``, ``layer0.*`` -> stem, ``last_linear`` -> ``fc``), 1x1-conv SE
weights ``(C, h, 1, 1)`` are reshaped to ``Linear`` ``(C, h)`` (or back), and every difference
from the target network is reported in a ``LoadReport``.
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from senet.checkpoint import read_header

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema")
_WRAPPER_PREFIXES = {
    "module.": "DataParallel/DistributedDataParallel",
    "_orig_mod.": "torch.compile",
}
_SHOW = 5  # keys named in an error message before "and N more"


@dataclass
class Source:
    """What a state dict is: its layout, a human name, and the senet network that matches it."""

    layout: str  # "senet", "timm_resnet" (timm ResNet family == torchvision ResNet), "timm_legacy"
    name: str  # e.g. "timm seresnext50_32x4d"
    arch: str | None  # the matching senet model name, None if the structure is not recognised
    model_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadReport:
    """What happened to every key when a checkpoint was loaded into a network."""

    source: str = ""
    arch: str = ""
    loaded: list[str] = field(default_factory=list)  # model keys filled from the checkpoint
    new: list[str] = field(default_factory=list)  # model keys the checkpoint lacks (left as initialised)
    skipped: list[str] = field(default_factory=list)  # checkpoint keys present but not loaded (head)
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model has no place for
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {self.source or 'checkpoint'} into {self.arch or 'model'}: "
                 f"{len(self.loaded)} loaded, {len(self.new)} new, {len(self.skipped)} skipped, "
                 f"{len(self.unexpected)} unexpected"]
        for label, keys in (("new", self.new), ("skipped", self.skipped), ("unexpected", self.unexpected)):
            if keys:
                lines.append(f"  {label}: {summarize_keys(keys)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def summarize_keys(keys: list[str]) -> str:
    """``layer*.*.attn.fc1.weight (16)``-style groups, or the keys themselves when few."""
    if len(keys) <= 6:
        return ", ".join(keys)
    groups: dict[str, int] = {}
    for k in keys:
        pattern = re.sub(r"\d+", "*", k)
        groups[pattern] = groups.get(pattern, 0) + 1
    return ", ".join(f"{p} ({n})" for p, n in groups.items())


# ----------------------------------------------------------------------------- reading files


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, list[str]]:
    """``(state_dict, senet_header_or_None, notes)`` from a ``.pth/.pt/.bin/.ckpt`` or ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        header = read_header(path)
        return load_file(str(path)), header, []
    if path.suffix not in _TORCH_SUFFIXES:
        raise ValueError(f"cannot read {str(path)!r}: expected one of {['.safetensors', *_TORCH_SUFFIXES]} "
                         "(a state dict saved with torch.save or safetensors)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{str(path)!r} holds pickled Python objects that need code to load, and senet loads "
            "weights only (torch.load(weights_only=True)); if you trust the file, re-save it as "
            "torch.save(model.state_dict(), PATH) or as .safetensors"
        ) from None
    notes: list[str] = []
    return unwrap(obj, notes, repr(str(path))), None, notes


def unwrap(obj: Any, notes: list[str], where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor dict inside ``obj`` (a state dict, or a training checkpoint holding one)."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), Mapping):
                notes.append(f"took the state dict stored under {key!r}")
                return unwrap(obj[key], notes, where)
        raise ValueError(f"{where} has no tensors; top-level keys: {sorted(obj)[:10]}")
    dropped = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if dropped:
        notes.append(f"ignored non-tensor entries {dropped[:_SHOW]}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def strip_wrappers(state: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    changed = True
    while changed and state:
        changed = False
        for prefix, origin in _WRAPPER_PREFIXES.items():
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                notes.append(f"stripped the {prefix!r} prefix ({origin} wrapper) from every key")
                changed = True
    return state


# ----------------------------------------------------------------------------- layouts


def detect(state: Mapping[str, torch.Tensor]) -> Source:
    """Recognise the layout of a (prefix-free) state dict and the senet network it matches."""
    keys = list(state)
    if any(k.startswith("layer0.") for k in keys) and "last_linear.weight" in state:
        layout, lib = "timm_legacy", "timm legacy"
    elif any(".attn." in k for k in keys):
        layout, lib = "senet", "senet"
    else:
        layout, lib = "timm_resnet", "timm/torchvision"
    arch, lib_name, kwargs = guess_arch(to_senet_names(state, layout), layout)
    return Source(layout, f"{lib} {lib_name or 'network of unknown structure'}", arch, kwargs)


def to_senet_names(state: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Rename a ``layout`` state dict's keys to senet's (values untouched)."""
    if layout == "timm_legacy":
        deep = "layer0.conv3.weight" in state
        return {_legacy_key(k, deep): v for k, v in state.items()}
    if layout == "timm_resnet":
        return {k.replace(".se.", ".attn."): v for k, v in state.items()}
    return dict(state)


def _legacy_key(key: str, deep_stem: bool) -> str:
    # timm's Caffe ports: layer0.* is the stem, se_module the SE block, last_linear the head.
    if key.startswith("layer0."):
        module, rest = key[len("layer0."):].split(".", 1)
        stem = _LEGACY_DEEP_STEM if deep_stem else _LEGACY_STEM
        return f"{stem[module]}.{rest}"
    return key.replace(".se_module.", ".attn.").replace("last_linear.", "fc.")


# Caffe stem module -> senet's: 7x7 conv + BN, or SENet-154's three 3x3 convs whose last BN is
# senet's `bn1` (conv1 = Sequential(conv, BN, ReLU, conv, BN, ReLU, conv), see models/resnet.py).
_LEGACY_STEM = {"conv1": "conv1", "bn1": "bn1"}
_LEGACY_DEEP_STEM = {"conv1": "conv1.0", "bn1": "conv1.1", "conv2": "conv1.3", "bn2": "conv1.4",
                     "conv3": "conv1.6", "bn3": "bn1"}


# Blocks per stage -> depth (He et al. 2016, Table 1).
_DEPTHS = {
    (False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34,
    (True, (3, 4, 6, 3)): 50, (True, (3, 4, 23, 3)): 101, (True, (3, 8, 36, 3)): 152,
}


def _stage_depths(state: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    depths = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        depths.append(max(idx) + 1 if idx else 0)
    return tuple(depths)


def guess_arch(state: Mapping[str, torch.Tensor], layout: str
               ) -> tuple[str | None, str | None, dict[str, Any]]:
    """``(senet_name, source_library_name, model_kwargs)`` for a senet-named state dict.

    Names are None when the structure is not one senet registers.
    """
    from senet.models import list_models

    if (tv := _torchvision_arch(state)) is not None:
        senet, tv_name, kwargs = tv
        return (senet if senet in list_models() else None), tv_name, kwargs
    bottleneck = "layer1.0.conv3.weight" in state
    depth = _DEPTHS.get((bottleneck, _stage_depths(state)))
    if depth is None:
        return None, None, {}
    groups, width_per_group = 1, 64
    if bottleneck:
        conv2 = state["layer1.0.conv2.weight"]  # (width, mid / groups, 3, 3), mid = conv1's out channels
        groups = state["layer1.0.conv1.weight"].shape[0] // conv2.shape[1]
        width_per_group = conv2.shape[0] // groups
    family = f"resnet{depth}" if groups == 1 else f"resnext{depth}_{groups}x{width_per_group}d"
    senet, timm, kwargs = _names(family, any(".attn." in k for k in state), layout)
    if "fc.weight" in state:
        kwargs["num_classes"] = int(state["fc.weight"].shape[0])
    return (senet if senet in list_models() else None), timm, kwargs  # None: not registered


# torchvision networks whose keys senet's VGG / MobileNets share (models/vgg.py, mobilenet.py):
# (a key only that network has, its name, its classifier's last weight).
_TORCHVISION = (
    ("features.41.running_mean", "vgg16_bn", "classifier.6.weight"),  # BN after the 13th conv
    ("features.28.weight", "vgg16", "classifier.6.weight"),  # the 13th conv
    ("features.18.0.weight", "mobilenet_v2", "classifier.1.weight"),  # the last 1x1 conv
    ("features.16.0.weight", "mobilenet_v3_large", "classifier.3.weight"),
    ("features.12.0.weight", "mobilenet_v3_small", "classifier.3.weight"),
)


def _torchvision_arch(state: Mapping[str, torch.Tensor]) -> tuple[str, str, dict[str, Any]] | None:
    # With senet attention keys (``features.N.attn.*``): the se_/eca_ network of that family.
    for key, name, head in _TORCHVISION:
        if key in state:
            attn = [k for k in state if ".attn." in k]
            prefix = "" if not attn else "eca_" if any(k.endswith(".attn.conv.weight") for k in attn) else "se_"
            return prefix + name, name, ({"num_classes": int(state[head].shape[0])} if head in state else {})
    return None


def _names(family: str, attn: bool, layout: str) -> tuple[str | None, str, dict[str, Any]]:
    # senet's registered name, the source library's name, and kwargs beyond the registered defaults.
    if family == "resnext152_64x4d" and attn:
        return "senet154", "legacy_senet154", {}
    if layout == "timm_legacy" and family in ("resnet18", "resnet34"):
        # timm's legacy basic-block SE-ResNets put a ReLU between bn2 and SE: no senet network
        # computes that, so none is proposed (loading by name works but the outputs differ).
        return None, f"legacy_se{family}", {}
    if layout == "timm_legacy":
        return f"legacy_se_{family}", f"legacy_se{family}", {}
    if attn:
        return f"se_{family}", f"se{family}", {}
    return family, family, {}


# ----------------------------------------------------------------------------- loading into a network


def head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier (the last ``nn.Linear``), whose shape follows num_classes."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        return set()
    return {f"{last}.{p}" for p, _ in model.get_submodule(last).named_parameters(recurse=False)}


def _fits(src: torch.Tensor, dst: torch.Tensor) -> bool:
    # Same numbers, shape differing only by 1x1 conv vs Linear: (C, h, 1, 1) <-> (C, h).
    return src.numel() == dst.numel() and _squeeze(src.shape) == _squeeze(dst.shape)


def _squeeze(shape: torch.Size) -> tuple[int, ...]:
    dims = tuple(shape)
    while len(dims) > 2 and dims[-1] == 1:
        dims = dims[:-1]
    return dims


def match(model: nn.Module, state: Mapping[str, torch.Tensor], report: LoadReport
          ) -> tuple[dict[str, torch.Tensor], list[tuple[str, tuple, tuple]]]:
    """Fill ``report`` key by key; return the tensors to load and the (key, ckpt, model) shape clashes."""
    target = model.state_dict()
    heads = head_keys(model)
    out, clashes, reshaped = {}, [], 0
    for key, dst in target.items():
        src = state.get(key)
        if src is None:
            report.new.append(key)
        elif src.shape == dst.shape or _fits(src, dst):
            reshaped += src.shape != dst.shape
            out[key] = src.reshape(dst.shape).to(dst.dtype)
            report.loaded.append(key)
        elif key in heads:
            report.skipped.append(key)
        else:
            clashes.append((key, tuple(src.shape), tuple(dst.shape)))
    report.unexpected = [k for k in state if k not in target]
    if reshaped:
        report.notes.append(f"reshaped {reshaped} tensors between 1x1 conv (C, h, 1, 1) and Linear (C, h)")
    if report.skipped:
        shapes = {k: tuple(state[k].shape) for k in report.skipped}
        report.notes.append(f"classifier not loaded: the checkpoint's head {shapes} does not fit the model's "
                            f"num_classes; it keeps its fresh initialisation")
    return out, clashes


def _tolerated_new(report: LoadReport, state: Mapping[str, torch.Tensor]) -> list[str]:
    # Keys a checkpoint may lack without being wrong: BN step counters, and every attention
    # parameter when the checkpoint has no attention at all (plain ResNet -> SE-ResNet).
    src_has_attn = any(".attn." in k for k in state)
    return [k for k in report.new
            if k.endswith("num_batches_tracked") or (".attn." in k and not src_has_attn)]


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True,
              source: Source | None = None, arch: str = "", notes: list[str] | None = None) -> LoadReport:
    """Load a senet-named ``state`` into ``model`` and say what happened.

    ``strict=True`` raises ValueError on any unexplained difference: a shape clash outside the
    classifier (wrong architecture), checkpoint keys the model lacks, or model keys the checkpoint
    lacks other than attention blocks (when it has none: plain ResNet -> SE-ResNet) and BN counters.
    ``strict=False`` loads what fits and reports the rest. A classifier of another num_classes is
    always skipped and said.
    """
    report = LoadReport(source=source.name if source else "", arch=arch, notes=list(notes or []))
    tensors, clashes = match(model, state, report)
    tolerated = set(_tolerated_new(report, state))
    if tolerated - {k for k in tolerated if k.endswith("num_batches_tracked")}:
        report.notes.append("the checkpoint has no attention blocks: every attention parameter is new "
                            "(freshly initialised); everything else was loaded")
    problems = _problems(report, clashes, tolerated, source, arch)
    if not tensors:
        raise ValueError("nothing in the checkpoint fits the model: " + (problems or "no common keys"))
    if strict and problems:
        raise ValueError(problems)
    if source and source.arch and arch and source.arch != arch and not report.new:
        report.notes.append(f"the checkpoint matches senet {source.arch!r}, loaded into {arch!r}: parameters "
                            "that fit are loaded, but the two may compute differently (stride placement, "
                            "pooling, attention)")
    if clashes:
        report.skipped += [k for k, _, _ in clashes]
        report.notes.append("strict=False: skipped shape clashes " + _clash_text(clashes))
    model.load_state_dict(tensors, strict=False)
    return report


def _clash_text(clashes: list[tuple[str, tuple, tuple]]) -> str:
    shown = "; ".join(f"{k}: checkpoint {s} vs model {d}" for k, s, d in clashes[:_SHOW])
    more = f" (and {len(clashes) - _SHOW} more)" if len(clashes) > _SHOW else ""
    return shown + more


def _first(keys: list[str]) -> str:
    more = f" (and {len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def _problems(report: LoadReport, clashes: list, tolerated: set[str], source: Source | None,
              arch: str) -> str:
    """One message naming the first mismatched keys (empty when the checkpoint fits)."""
    parts = []
    if clashes:
        parts.append(f"shapes differ: {_clash_text(clashes)}")
    missing = [k for k in report.new if k not in tolerated]
    if missing:
        parts.append(f"{len(missing)} model keys missing from the checkpoint: {_first(missing)}")
    if report.unexpected:
        parts.append(f"{len(report.unexpected)} checkpoint keys the model has no place for: "
                     f"{_first(report.unexpected)}")
    if not parts:
        return ""
    what = f"{source.name} checkpoint" if source else "checkpoint"
    hint = "pass strict=False (--non-strict) to load only what fits"
    if source and source.arch and source.arch != arch:
        hint = f"it matches senet {source.arch!r}: build that instead, or " + hint
    return f"{what} does not fit {arch or 'the model'}: " + "; ".join(parts) + f". {hint[0].upper()}{hint[1:]}"


def prepare(checkpoint: str | Path | Mapping[str, Any]
            ) -> tuple[dict[str, torch.Tensor], Source, dict[str, Any] | None, list[str]]:
    """Read (if a path), unwrap, strip wrapper prefixes, detect and rename a checkpoint.

    Returns ``(senet_named_state, source, senet_header_or_None, notes)``.
    """
    if isinstance(checkpoint, (str, Path)):
        state, header, notes = read_state_dict(checkpoint)
    else:
        notes, header = [], None
        state = unwrap(checkpoint, notes)
    state = strip_wrappers(state, notes)
    if header is not None:
        source = Source("senet", f"senet {header['arch']}", header["arch"], dict(header["model_kwargs"]))
    else:
        source = detect(state)
        notes.append(f"detected a {source.name} state dict ({source.layout} layout)")
    return to_senet_names(state, source.layout), source, header, notes


def load_checkpoint_into(model: nn.Module, checkpoint: str | Path | Mapping[str, Any], *,
                         strict: bool = True, arch: str = "") -> LoadReport:
    """Load any supported checkpoint (path or state dict) into an existing senet ``model``."""
    state, source, _, notes = prepare(checkpoint)
    return load_into(model, state, strict=strict, source=source, arch=arch, notes=notes)


# ----------------------------------------------------------------------------- `senet convert`


def convert(src: str | Path, dst: str | Path, *, arch: str | None = None, strict: bool = True
            ) -> tuple[Path, LoadReport]:
    """Convert checkpoint ``src`` (any supported layout) to a senet checkpoint at ``dst``."""
    from senet.checkpoint import save_checkpoint
    from senet.hub import create_model

    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"OUT must be a .safetensors file, got {str(dst)!r}")
    model = create_model(arch, checkpoint=src, strict=strict, warn=False)
    report: LoadReport = model.load_report
    kept = {k: v for k, v in vars(report).items() if k != "loaded"}
    save_checkpoint(dst, model, arch=model.arch_name, model_kwargs=model.arch_kwargs,
                    source=f"{report.source} converted from {Path(src).name}",
                    extra={"conversion": {**kept, "loaded": len(report.loaded)}})
    return dst, report


def _convert_cmd(args: argparse.Namespace) -> int:
    out, report = convert(args.input, args.output, arch=args.arch, strict=not args.non_strict)
    print(report)
    if args.verbose:
        for label in ("new", "skipped", "unexpected"):
            for key in getattr(report, label):
                print(f"  {label}: {key}")
    print(f"wrote {out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a timm/torchvision/senet checkpoint to senet's format",
                       description="Detect a checkpoint's layout (timm ResNet/SE-ResNet/SE-ResNeXt, timm legacy "
                                   "Caffe SENets, torchvision ResNet/ResNeXt, senet), map it onto the "
                                   "matching senet network and write a senet .safetensors checkpoint.")
    p.add_argument("input", help="a .pth/.pt/.bin/.ckpt state dict or a .safetensors file")
    p.add_argument("output", help="the senet checkpoint to write (.safetensors)")
    p.add_argument("--arch", default=None, help="senet model name (default: the one matching the input)")
    p.add_argument("--non-strict", action="store_true", help="load what fits instead of failing on differences")
    p.add_argument("--verbose", "-v", action="store_true", help="list every new/skipped/unexpected key")
    p.set_defaults(func=_convert_cmd)
