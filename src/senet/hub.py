"""``senet.create_model`` and ``senet.load_model``: networks by name, and networks rebuilt from checkpoints.

``create_model(name, checkpoint=...)`` builds a registered network and loads weights from timm,
torchvision or senet (see ``senet.convert``); with ``name=None`` the network is the one the
checkpoint describes (senet's header, or the detected layout of a foreign state dict).

``load_model(path)`` rebuilds whatever a senet checkpoint holds, from its header alone:

    header["arch"](**header["model_kwargs"])     a senet name, or a base spec ("torchvision:resnet18")
    + extra["attach"]                           the recorded ``senet.attach`` calls, repeated
    + extra["pruned"]                           the blocks ``senet prune`` removed, set to Identity

then loads the weights strictly. Every tool that reads a checkpoint goes through it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from senet import models
from senet.checkpoint import load_checkpoint, read_header
from senet.convert import LoadReport, Source, load_into, prepare


def create_model(name: str | None = None, *, checkpoint: str | Path | Mapping[str, Any] | None = None,
                 strict: bool = True, warn: bool = True, **kwargs: Any) -> nn.Module:
    """Build senet model ``name(**kwargs)``; with ``checkpoint``, load it (any supported layout).

    ``strict``: raise ValueError on any unexplained difference (see ``senet.convert.load_into``);
    a plain ResNet checkpoint in an SE network (new attention keys) and a classifier of another
    ``num_classes`` (skipped) are explained, not errors. Without ``num_classes`` the checkpoint's
    is used. The returned model carries ``load_report`` (a ``LoadReport``), ``arch_name`` and
    ``arch_kwargs``; ``warn`` emits the report as a UserWarning when something was not loaded.
    """
    if checkpoint is not None or not kwargs.get("pretrained", False):
        # the weights come from ``checkpoint``; False means what it says (neither goes into arch_kwargs);
        # pretrained=True without a checkpoint reaches models.create_model, which says how to load weights
        kwargs.pop("pretrained", None)
    if checkpoint is None:
        if name is None:
            raise ValueError("create_model needs a model name (see senet.list_models()) or a checkpoint")
        return _tag(models.create_model(name, **kwargs), name, kwargs)
    header = _senet_header(checkpoint)
    if header is not None and _structure(header["extra"]):
        return _load_as_recorded(checkpoint, header, name, kwargs)
    state, source, header, notes = prepare(checkpoint)
    name, kwargs = _resolve(name, kwargs, source, notes)
    model = _tag(models.create_model(name, **kwargs), name, kwargs)
    report = load_into(model, state, strict=strict, source=source, arch=name, notes=notes)
    model.load_report = report
    if warn and (report.skipped or report.unexpected or _uncounted(report.new)):
        warnings.warn(str(report), UserWarning, stacklevel=2)
    return model


def _resolve(name: str | None, kwargs: dict[str, Any], source: Source, notes: list[str]
             ) -> tuple[str, dict[str, Any]]:
    # The network to build: the caller's name, or the checkpoint's; the checkpoint's kwargs
    # (structure, num_classes) apply when it describes that same network, the caller's win.
    if name is None:
        if source.arch is None:
            raise ValueError(f"cannot tell which senet network the {source.name} checkpoint is; "
                             "pass its name: create_model(NAME, checkpoint=...) or --arch NAME")
        name = source.arch
    base = dict(source.model_kwargs) if name == source.arch else {}
    if "num_classes" not in kwargs and "num_classes" in source.model_kwargs and name != source.arch:
        base["num_classes"] = source.model_kwargs["num_classes"]
    if "num_classes" in base and "num_classes" not in kwargs:
        notes.append(f"num_classes={base['num_classes']} taken from the checkpoint")
    return name, {**base, **kwargs}


def _uncounted(keys: list[str]) -> list[str]:
    return [k for k in keys if not k.endswith("num_batches_tracked")]


def _tag(model: nn.Module, name: str, kwargs: dict[str, Any]) -> nn.Module:
    model.arch_name, model.arch_kwargs = name, dict(kwargs)
    return model


# ----------------------------------------------------------------------------- rebuilding any checkpoint


def build_model(arch: str, model_kwargs: dict[str, Any], extra: dict[str, Any] | None = None) -> nn.Module:
    """The network a senet checkpoint header describes, with fresh weights (see the module docstring).

    ``arch`` is a registered senet name or a ``load_base_model`` spec; ``extra`` is the header's
    ``extra`` (its ``"attach"`` and ``"pruned"`` records are applied, anything else is ignored).
    """
    from senet.prune import remove_recorded
    from senet.surgery import load_base_model, rebuild_attached

    extra = extra or {}
    if extra.get("attach"):
        model = rebuild_attached(arch, model_kwargs, extra["attach"])
    elif ":" in arch:  # a torchvision/timm base trained without attached blocks
        model = load_base_model(arch, **model_kwargs)
    else:
        model = models.create_model(arch, **model_kwargs)
    remove_recorded(model, extra.get("pruned"))
    return _tag(model, arch, model_kwargs)


def load_model(path: str | Path, *, map_location: str | Any = "cpu", **overrides: Any) -> nn.Module:
    """Rebuild any senet checkpoint (plain, ``senet.attach``-ed, ``senet prune``-d, trained) and load its
    weights strictly; the model is in eval mode on ``map_location``. ``overrides`` replace model kwargs
    that do not change parameter shapes (e.g. ``drop_rate``).

    A file without a senet header (a timm/torchvision ``.pth``/``.safetensors``) is mapped onto the
    matching senet network as ``create_model(None, checkpoint=path)`` does. The returned model carries
    ``arch_name``, ``arch_kwargs`` and ``senet_header`` (the checkpoint's header, {} for foreign files).
    """
    header = _senet_header(path)
    if header is None:
        model = create_model(None, checkpoint=path, **overrides)
        model.senet_header = {}
        return model.to(map_location).eval()
    state, header = load_checkpoint(path)
    model = build_model(header["arch"], {**header["model_kwargs"], **overrides}, header.get("extra"))
    model.load_state_dict(state, strict=True)
    model.senet_header = header
    return model.to(map_location).eval()


def structure_extra(model: nn.Module) -> dict[str, Any]:
    """The records ``build_model`` needs beyond arch and kwargs: ``{"attach": ..., "pruned": ...}``,
    whichever ``model`` carries (put them into a checkpoint's ``extra``)."""
    from senet.surgery import attach_record

    found = {"attach": attach_record(model), "pruned": getattr(model, "senet_pruned", None)}
    return {k: v for k, v in found.items() if v}


def _structure(extra: dict[str, Any] | None) -> bool:
    return bool(extra and (extra.get("attach") or extra.get("pruned")))


def _senet_header(checkpoint: Any) -> dict[str, Any] | None:
    if not isinstance(checkpoint, (str, Path)):
        return None
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    header = read_header(path) if path.suffix == ".safetensors" else None
    return None if header is None else {**header, "extra": header.get("extra") or {}}


def _load_as_recorded(path: str | Path, header: dict[str, Any], name: str | None,
                      kwargs: dict[str, Any]) -> nn.Module:
    # An attached or pruned network exists only as recorded: another name or shape cannot take its weights.
    stored = header["model_kwargs"]
    if name not in (None, header["arch"]) or any(k not in stored or stored[k] != v for k, v in kwargs.items()):
        raise ValueError(f"{str(path)!r} holds an attached/pruned {header['arch']} {stored}; it rebuilds only "
                         f"as recorded, not as {name or header['arch']} {kwargs}: load it with senet.load_model")
    return load_model(path)


__all__ = ["LoadReport", "build_model", "create_model", "load_model", "structure_extra"]
