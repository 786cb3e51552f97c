"""The model registry: builders are plain functions registered by name (torchvision's `register_model`).

    @register_model(paper="...", input_size=(3, 224, 224))
    def se_resnet50(**kwargs) -> nn.Module: ...

``create_model(name, **kwargs)`` is a lookup plus a call; ``list_models(pattern)`` filters with fnmatch.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

# Papers several model files cite (``register_model(paper=...)``).
SENET_PAPER = "Squeeze-and-Excitation Networks (Hu et al.), arXiv 1709.01507"
RESNET_PAPER = "Deep Residual Learning for Image Recognition (He et al.), arXiv 1512.03385"
ECA_PAPER = "ECA-Net (Wang et al.), arXiv 1910.03151"


@dataclass(frozen=True)
class ModelInfo:
    """What a registered name builds: the builder, its default input size (C, H, W) and its paper."""

    name: str
    builder: Callable[..., nn.Module]
    input_size: tuple[int, int, int]
    paper: str


_MODELS: dict[str, ModelInfo] = {}


def register_model(name: str | None = None, *, paper: str = "",
                   input_size: tuple[int, int, int] = (3, 224, 224)):
    """Decorator registering ``fn`` as ``name`` (default ``fn.__name__``). A duplicate name raises."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _MODELS:
            raise ValueError(f"model {key!r} is already registered; pick another name")
        _MODELS[key] = ModelInfo(key, fn, tuple(input_size), paper)
        return fn

    return wrap


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names in registration order, optionally filtered by a shell pattern (``"se_*"``)."""
    return [n for n in _MODELS if pattern is None or fnmatch.fnmatchcase(n, pattern)]


def model_info(name: str) -> ModelInfo:
    if name not in _MODELS:
        close = [n for n in _MODELS if name.replace("-", "_").lower() in n]
        hint = f"; did you mean one of {close[:5]}?" if close else "; see `senet models` or list_models()"
        raise ValueError(f"unknown model {name!r}{hint}")
    return _MODELS[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the model registered as ``name``; ``kwargs`` go to its builder (``num_classes``, ``attn``...).

    ``pretrained=False`` (timm's and torchvision's spelling) is accepted and means what it says; senet
    downloads no weights, so ``pretrained=True`` raises, naming how to load the file you have."""
    info = model_info(name)
    if kwargs.pop("pretrained", False):
        raise ValueError(f"senet downloads no weights (pretrained=True for {name!r}); load a file you have: "
                         f"senet.create_model({name!r}, checkpoint='weights.pth') reads timm, torchvision, "
                         "Caffe-port and senet checkpoints")
    return info.builder(**kwargs)


def build_variant(cls: Callable[..., nn.Module], defaults: dict, kwargs: dict) -> nn.Module:
    """``cls(**defaults, **kwargs)`` for a registered variant; a caller's own ``attn`` drops the variant's
    ``attn_kwargs`` (they belong to the variant's attention, e.g. SE's reduction, not to the new one)."""
    if "attn" in kwargs and kwargs["attn"] != defaults.get("attn"):
        defaults = {k: v for k, v in defaults.items() if k != "attn_kwargs"}
    return cls(**{**defaults, **kwargs})
