"""The argument vocabulary every attention block shares, and its validation.

Names used across blocks (learn them once):

- ``reduction``: the ratio r; hidden width = ``hidden_from // r`` (SE Eq. 3 uses r = 16).
- ``hidden``: an explicit hidden width; overrides ``reduction``.
- ``divisor``: round the hidden width to a multiple of this (1 = no rounding, the paper's C // r).
- ``hidden_from``: the channel count the hidden width is computed from, when it differs from the
  scaled channels (EfficientNet computes it from the block's input channels).
- ``act``: the inner activation; ``gate``: the function producing the attention weights.
- ``bias``: whether the FC layers have biases.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

ModuleFactory = Callable[[], nn.Module]


class NoScript:
    """Mixin for senet's modules: ``torch.jit.script`` stops at once with an error naming what works,
    instead of failing deep in the TorchScript compiler on Python it does not support (the fast path's
    checks, annotations, imports). Scripting is deprecated in torch 2.x; tracing and export work."""

    def __prepare_scriptable__(self):  # torch.jit.script calls it on every module it compiles, recursively
        raise RuntimeError(
            f"torch.jit.script cannot compile senet's {type(self).__name__} (TorchScript is a subset of Python, "
            "and torch.jit.script is deprecated). Instead: torch.jit.trace(model.eval(), example) or "
            "`senet export --format torchscript` for a TorchScript file, torch.export.export for a graph, "
            "`senet export` (ONNX) to deploy, torch.compile for speed")

_ACTS: dict[str, ModuleFactory] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "hard_swish": nn.Hardswish,
    "leaky_relu": lambda: nn.LeakyReLU(0.1, inplace=True),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}

# Gates map the excitation logits to the per-channel (or per-position) scale.
_GATES: dict[str, ModuleFactory] = {
    "sigmoid": nn.Sigmoid,
    "hard_sigmoid": nn.Hardsigmoid,  # relu6(x + 3) / 6, MobileNetV3
    "tanh": nn.Tanh,  # SE ablation, Table 13
    "relu": nn.ReLU,  # SE ablation, Table 13
    "identity": nn.Identity,
}


def _resolve(kind: str, table: dict[str, ModuleFactory], value: str | type | nn.Module | None) -> nn.Module:
    if value is None:
        return nn.Identity()
    if isinstance(value, nn.Module):
        return value
    if isinstance(value, type) and issubclass(value, nn.Module):
        return value()
    if isinstance(value, str):
        key = value.lower().replace("-", "_")
        if key in table:
            return table[key]()
    raise ValueError(f"unknown {kind} {value!r}; choose one of {sorted(table)} or pass an nn.Module class")


def create_act(act: str | type | nn.Module | None) -> nn.Module:
    """An activation module from a name, a module class or a module."""
    return _resolve("activation", _ACTS, act)


def create_gate(gate: str | type | nn.Module | None) -> nn.Module:
    """A gate module (sigmoid, hard_sigmoid, tanh, relu, identity) from a name or a module."""
    return _resolve("gate", _GATES, gate)


def list_gates() -> list[str]:
    return sorted(_GATES)


def check_channels(channels: int, name: str = "channels") -> int:
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"{name} must be a positive integer, got {channels!r}")
    return channels


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without dropping below 90% of it.

    The MobileNet/EfficientNet rounding rule: ``max(min_value, int(v + d/2) // d * d)``, bumped up
    by one ``divisor`` if that lost more than 10%.
    """
    min_value = min_value or divisor
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < round_limit * value:
        new += divisor
    return new


def hidden_width(
    channels: int,
    reduction: float = 16,
    hidden: int | None = None,
    divisor: int = 1,
    hidden_from: int | None = None,
) -> int:
    """The hidden width of a reduce-expand excitation.

    ``hidden`` wins when given. Otherwise ``base // reduction`` (at least 1) where ``base`` is
    ``hidden_from`` or ``channels``; with ``divisor > 1`` the float ``base / reduction`` is rounded
    to a multiple of ``divisor`` instead (MobileNetV3: ``make_divisible(C / 4, 8)``).
    """
    if hidden is not None:
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
        return hidden
    base = check_channels(hidden_from if hidden_from is not None else channels, "hidden_from")
    if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or not reduction > 0:
        raise ValueError(f"reduction must be a positive number, got {reduction!r}")
    if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
        raise ValueError(f"divisor must be a positive integer (1 = no rounding), got {divisor!r}")
    if divisor > 1:
        return make_divisible(base / reduction, divisor)
    width = int(base // reduction)
    if width < 1:
        # C // r == 0: eq. 3 would have an empty hidden layer; say so instead of silently using 1.
        raise ValueError(
            f"reduction={reduction} on {base} channels leaves an empty hidden layer "
            f"({base} // {reduction} = 0); use reduction <= {base} or pass hidden=N"
        )
    return width


def floored_width(channels: int, reduction: float, hidden: int | None, divisor: int, hidden_from: int | None,
                  min_hidden: int) -> int:
    """A hidden width with a floor: ``max(C // r, min_hidden)`` (SK's d = max(C/r, L), eq. 4; coordinate
    attention's mip = max(8, C // r)). ``hidden`` overrides; C // r may be 0 for small C."""
    if hidden is not None:
        return hidden_width(channels, hidden=hidden)
    if isinstance(min_hidden, bool) or not isinstance(min_hidden, int) or min_hidden < 1:
        raise ValueError(f"min_hidden must be a positive integer (SK: 32, coordinate attention: 8), got {min_hidden!r}")
    base = check_channels(hidden_from if hidden_from is not None else channels, "hidden_from")
    if isinstance(reduction, (int, float)) and not isinstance(reduction, bool) and base < reduction:
        return min_hidden
    return max(hidden_width(channels, reduction, None, divisor, hidden_from), min_hidden)


def shapes_unchecked(x: torch.Tensor) -> bool:
    """Whether input checks must let ``x`` pass unexamined: the TorchScript tracer runs (ONNX export; the
    trace fixes the shapes anyway) or ``x`` is a ``torch.fx`` proxy (symbolic tracing: no shape to ask)."""
    return torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy)


def check_input(x: torch.Tensor, channels: int, block: str) -> None:
    """Raise a ValueError naming the problem instead of a shape error from deep inside PyTorch
    (skipped where ``shapes_unchecked``)."""
    if shapes_unchecked(x):
        return
    if x.dim() != 4:
        raise ValueError(f"{block} expects a 4D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(
            f"{block} was built for {channels} channels but the input has {x.shape[1]} "
            f"(shape {tuple(x.shape)}); build it with channels={x.shape[1]}"
        )


def odd_kernel(channels: int, gamma: float = 2, b: float = 1) -> int:
    """ECA's adaptive kernel size k = |log2(C)/γ + b/γ|_odd (ECA-Net eq. 12)."""
    t = int(abs(math.log2(channels) / gamma + b / gamma))
    return t if t % 2 else t + 1


def global_pool(x: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 1, 1) by average or max."""
    if pool == "avg":
        return x.mean((2, 3), keepdim=True)
    return F.adaptive_max_pool2d(x, 1)


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value
