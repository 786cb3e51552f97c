"""The one table of attention blocks and the one function that builds them."""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from .bam import BAM
from .cbam import CBAM
from .coord import CoordAttention
from .eca import CECA, ECA
from .gc import GlobalContext
from .gct import GCT
from .ge import GatherExcite, ge_param
from .se import EffectiveSE, SqueezeExcite, se_mobilenetv3, se_released
from .se_variants import SEGroupConv, SEVar1, SEVar2, SEVar3
from .sk import SelectiveKernel
from .srm import SRM
from .sse import SpatialChannelSE, SpatialSE

# name -> block class or preset function; each carries `summary`, `paper` and `arxiv`.
_ATTENTIONS: dict[str, Callable[..., nn.Module]] = {
    "se": SqueezeExcite,
    "se_released": se_released,
    "se_mobilenetv3": se_mobilenetv3,
    "se_var1": SEVar1,
    "se_var2": SEVar2,
    "se_var3": SEVar3,
    "se_gc": SEGroupConv,
    "eca": ECA,
    "ceca": CECA,
    "ese": EffectiveSE,
    "sse": SpatialSE,
    "scse": SpatialChannelSE,
    "cbam": CBAM,
    "bam": BAM,
    "sk": SelectiveKernel,
    "ge": GatherExcite,
    "ge_param": ge_param,
    "gc": GlobalContext,
    "srm": SRM,
    "gct": GCT,
    "coord": CoordAttention,
}


def list_attentions() -> list[str]:
    """Every registered attention name, in registry order."""
    return list(_ATTENTIONS)


def get_attention(name: str) -> Callable[..., nn.Module]:
    """The class or preset registered as ``name``."""
    key = name.lower().replace("-", "_") if isinstance(name, str) else name
    if key not in _ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}; choose one of {list_attentions()}")
    return _ATTENTIONS[key]


def create_attention(name: str, channels: int, **kwargs) -> nn.Module:
    """Build the attention block registered as ``name`` over ``channels`` channels.

    ``name`` may be ``None``/``"none"`` for ``nn.Identity()`` so networks can always call the block.
    """
    if name is None or name == "none":
        return nn.Identity()
    return get_attention(name)(channels, **kwargs)


def describe_attention(name: str) -> dict[str, str]:
    """``{"name", "summary", "paper", "arxiv"}`` for a registered block."""
    block = get_attention(name)
    return {"name": name, "summary": block.summary, "paper": block.paper, "arxiv": block.arxiv}


@functools.lru_cache(maxsize=1)
def _attention_types() -> tuple[type, ...]:
    """The classes behind ``_ATTENTIONS``: a preset is resolved to the class it builds (over 16 channels)."""
    found = [b if isinstance(b, type) else type(b(16)) for b in _ATTENTIONS.values()]
    return tuple(dict.fromkeys(found))


def is_attention(module: nn.Module) -> bool:
    """True for a registered attention block, or a module whose class sets ``is_attention = True``
    (how a wrapper outside ``senet.layers`` -- ``senet.attach``'s ``GatedExcitation`` -- says it is one)."""
    return isinstance(module, _attention_types()) or getattr(type(module), "is_attention", False) is True


def attention_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified name: block}`` for every attention block in ``model`` (``is_attention``), found by type
    wherever it sits (``attn``, torchvision's MobileNetV3 slot, ``<place>.attached``), in module order.

    Blocks nested inside a found block (scSE's cSE and sSE, a wrapper's inner block) are part of it, not listed.
    """
    found: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if is_attention(m) and not any(name.startswith(f"{outer}.") for outer in found):
            found[name] = m
    return found
