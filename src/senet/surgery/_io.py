"""Base networks by name, and attached networks saved to / rebuilt from senet checkpoints.

A base spec names where a network comes from: ``"torchvision:resnet50"``, ``"timm:convnext_atto"``
or a senet model name (``"se_resnet50"``). ``save_attached`` writes a senet checkpoint whose
``arch``/``model_kwargs`` are the base spec and its kwargs and whose ``extra["attach"]`` lists every
``attach`` call (attention, kwargs, init, places), so ``load_attached`` (and ``senet.load_model``)
rebuild the same network.

torchvision and timm bases are built with 3 input channels; ``in_chans=1`` (grayscale data, e.g.
digits) adapts the stem after any checkpoint is loaded: the first 3-channel convolution's filters are
summed over their input channels, ``W' = Σ_c W[:, c]`` (C_out, 1, k, k), so a grayscale image ``x``
gives exactly what the pretrained stem gives for ``(x, x, x)``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from senet.checkpoint import load_checkpoint, save_checkpoint

from ._core import AttachReport, attach


def _build_base(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    source, _, name = spec.partition(":")
    if source == "torchvision" and name:
        import torchvision

        if name not in torchvision.models.list_models():
            raise ValueError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
        return _call(torchvision.models.get_model, spec, name, weights=None, **kwargs)
    if source == "timm" and name:
        import timm

        if not timm.is_model(name):
            raise ValueError(f"timm has no model {name!r}; see timm.list_models()")
        return _call(timm.create_model, spec, name, pretrained=False, **kwargs)
    if ":" in spec:
        raise ValueError(f"base {spec!r}: use 'torchvision:NAME', 'timm:NAME' or a senet model name")
    from senet.models import create_model

    return create_model(spec, **kwargs)


def _call(builder, spec: str, *args: Any, **kwargs: Any) -> nn.Module:
    try:
        return builder(*args, **kwargs)
    except TypeError as err:  # an argument the foreign builder does not take (e.g. drop_rate)
        raise ValueError(f"base {spec!r} does not accept {kwargs}: {err}") from None


def adapt_stem(model: nn.Module, in_chans: int) -> nn.Module:
    """Make the first 3-channel ``Conv2d`` take ``in_chans`` = 1 input channel (in place).

    ``W' = Σ_c W[:, c]``: a grayscale image ``x`` then gives exactly what the 3-channel stem gives
    for ``(x, x, x)``, so pretrained weights keep their meaning.
    """
    if in_chans == 3:
        return model
    if in_chans != 1:
        raise ValueError(f"in_chans={in_chans}: torchvision/timm bases take 3 channels and senet adapts their "
                         "stem to 1 channel only; convert the images to RGB or grayscale")
    name, conv = next(((n, m) for n, m in model.named_modules()
                       if isinstance(m, nn.Conv2d) and m.in_channels == 3 and m.groups == 1), (None, None))
    if conv is None:
        raise ValueError(f"{type(model).__name__} has no 3-channel Conv2d stem to adapt to in_chans=1")
    with torch.no_grad():
        conv.weight = nn.Parameter(conv.weight.sum(dim=1, keepdim=True))  # (C_out, 1, k, k)
    conv.in_channels = 1
    return model


def load_base_model(spec: str, num_classes: int | None = None, checkpoint: str | Path | None = None,
                    **kwargs: Any) -> nn.Module:
    """Build ``spec`` with random weights (nothing is downloaded), then load ``checkpoint`` if given.

    ``checkpoint`` is a state dict file (``.pth``/``.pt`` read with ``weights_only=True``, a plain or
    senet ``.safetensors``) of the 3-channel network; ``in_chans=1`` adapts a torchvision/timm stem
    afterwards (see ``adapt_stem``). Tensors whose shapes differ from the model's (a 1000-class head loaded
    into a ``num_classes=10`` model) are skipped with a warning; any other mismatch raises.
    The spec and kwargs are kept as ``model.senet_base`` for ``save_attached``.
    """
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    foreign = ":" in spec
    in_chans = kwargs.get("in_chans", 3)
    model = _build_base(spec, {k: v for k, v in kwargs.items() if not (foreign and k == "in_chans")})
    if checkpoint is not None:
        load_weights(model, checkpoint)
    if foreign:
        adapt_stem(model, in_chans)  # after loading: the 3-channel pretrained filters are summed
    model.senet_base = {"spec": spec, "kwargs": kwargs}
    return model


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    # senet convert's reader: weights_only torch.load or safetensors, training wrappers unwrapped,
    # DataParallel/torch.compile key prefixes stripped
    from senet.convert import read_state_dict, strip_wrappers

    state, _, notes = read_state_dict(path)
    return strip_wrappers(state, notes)


def load_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load a state dict file into ``model``; returns the keys skipped for a shape mismatch."""
    state = _read_state(Path(path))
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    result = model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    missing = [k for k in result.missing_keys if k not in skipped]
    if missing or result.unexpected_keys:
        raise ValueError(f"{str(path)!r} does not fit {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]} (of {len(missing)}/"
                         f"{len(result.unexpected_keys)}); is it a checkpoint of this architecture?")
    if skipped:
        warnings.warn(f"{path}: kept the model's own (random) {skipped} - their shapes differ "
                      f"(e.g. a classifier for another number of classes)", stacklevel=2)
    return skipped


def save_attached(path: str | Path, model: nn.Module, *, base: str | None = None,
                  base_kwargs: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Save an attached model as a senet checkpoint that ``load_attached`` can rebuild.

    ``base``/``base_kwargs`` default to what ``load_base_model`` recorded on the model.
    """
    steps = getattr(model, "senet_attach", None)
    if not steps:
        raise ValueError("the model has no attach record; insert attention with senet.attach first")
    recorded = getattr(model, "senet_base", {})
    spec = base or recorded.get("spec")
    if spec is None:
        raise ValueError("unknown base network: build it with load_base_model(...) or pass "
                         "base='torchvision:resnet50' (and base_kwargs) to save_attached")
    kwargs = base_kwargs if base_kwargs is not None else recorded.get("kwargs", {})
    return save_checkpoint(path, model, arch=spec, model_kwargs=kwargs,
                           extra={**(extra or {}), "attach": attach_record(model)}, source=f"senet.attach on {spec}")


def attach_record(model: nn.Module) -> dict[str, Any] | None:
    """``{"steps": [AttachReport.to_dict(), ...]}`` for every ``attach`` call on ``model``, or None:
    what a checkpoint's ``extra["attach"]`` holds."""
    steps = getattr(model, "senet_attach", None)
    return {"steps": [s.to_dict() for s in steps]} if steps else None


def rebuild_attached(spec: str, kwargs: dict[str, Any], record: dict[str, Any]) -> nn.Module:
    """The base network ``spec(**kwargs)`` with random weights and the recorded attach calls repeated at
    the recorded places (``record`` as ``attach_record`` returns it)."""
    model = load_base_model(spec, **kwargs)
    for step in map(AttachReport.from_dict, record["steps"]):
        attach(model, step.attn, [p.name for p in step.places], init=step.init,
               input_size=step.input_size, **step.kwargs)
    return model


def load_attached(path: str | Path) -> nn.Module:
    """Rebuild a model saved by ``save_attached``: the base network, the same attach calls (same
    places), then the file's weights loaded strictly. ``senet.load_model`` does this for any checkpoint."""
    state, header = load_checkpoint(path)
    info = header.get("extra", {}).get("attach")
    if not info:
        raise ValueError(f"{str(path)!r} holds no attach recipe; load it with senet.load_model")
    model = rebuild_attached(header["arch"], header["model_kwargs"], info)
    model.load_state_dict(state, strict=True)
    return model
