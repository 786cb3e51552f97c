"""Base networks by name, and attached networks saved to / rebuilt from senet checkpoints.

A base spec names where a network comes from: ``"torchvision:resnet50"``, ``"timm:convnext_atto"``
or a senet model name (``"se_resnet50"``). ``save_attached`` writes a senet checkpoint whose
``arch``/``model_kwargs`` are the base spec and its kwargs and whose ``extra["attach"]`` lists every
``attach`` call (attention, kwargs, init, places), so ``load_attached`` rebuilds the same network.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from senet.checkpoint import load_checkpoint, read_header, save_checkpoint

from ._core import AttachReport, attach


def _build_base(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    source, _, name = spec.partition(":")
    if source == "torchvision" and name:
        import torchvision

        if name not in torchvision.models.list_models():
            raise ValueError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
        return torchvision.models.get_model(name, weights=None, **kwargs)
    if source == "timm" and name:
        import timm

        if not timm.is_model(name):
            raise ValueError(f"timm has no model {name!r}; see timm.list_models()")
        return timm.create_model(name, pretrained=False, **kwargs)
    if ":" in spec:
        raise ValueError(f"base {spec!r}: use 'torchvision:NAME', 'timm:NAME' or a senet model name")
    from senet.models import create_model

    return create_model(spec, **kwargs)


def load_base_model(spec: str, num_classes: int | None = None, checkpoint: str | Path | None = None,
                    **kwargs: Any) -> nn.Module:
    """Build ``spec`` with random weights (nothing is downloaded), then load ``checkpoint`` if given.

    ``checkpoint`` is a state dict file (``.pth``/``.pt`` read with ``weights_only=True``, a plain or
    senet ``.safetensors``). Tensors whose shapes differ from the model's (a 1000-class head loaded
    into a ``num_classes=10`` model) are skipped with a warning; any other mismatch raises.
    The spec and kwargs are kept as ``model.senet_base`` for ``save_attached``.
    """
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = _build_base(spec, kwargs)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    model.senet_base = {"spec": spec, "kwargs": kwargs}
    return model


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    if path.suffix == ".safetensors":
        if read_header(path) is not None:
            return load_checkpoint(path)[0]
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state"):  # common training-script wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state


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
    attach_info = {"steps": [s.to_dict() for s in steps]}
    return save_checkpoint(path, model, arch=spec, model_kwargs=kwargs,
                           extra={**(extra or {}), "attach": attach_info}, source=f"senet.attach on {spec}")


def load_attached(path: str | Path) -> nn.Module:
    """Rebuild a model saved by ``save_attached``: the base network, the same attach calls (same
    places), then the file's weights loaded strictly."""
    state, header = load_checkpoint(path)
    info = header.get("extra", {}).get("attach")
    if not info:
        raise ValueError(f"{str(path)!r} holds no attach recipe; load it with senet.checkpoint.build_from_checkpoint")
    model = load_base_model(header["arch"], **header["model_kwargs"])
    for step in map(AttachReport.from_dict, info["steps"]):
        attach(model, step.attn, [p.name for p in step.places], init=step.init,
               input_size=step.input_size, **step.kwargs)
    model.load_state_dict(state, strict=True)
    return model
