"""``senet.create_model``: build a registered network and, optionally, load a checkpoint into it.

The checkpoint may come from timm, torchvision or senet (see ``senet.convert``); with
``name=None`` the network is the one the checkpoint describes (senet's header, or the detected
layout of a foreign state dict).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from senet import models
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
    if checkpoint is None:
        if name is None:
            raise ValueError("create_model needs a model name (see senet.list_models()) or a checkpoint")
        return _tag(models.create_model(name, **kwargs), name, kwargs)
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


__all__ = ["LoadReport", "create_model"]
