"""One probe forward pass that records, for every submodule, when it ran and which tensors it saw.

The placement rules read this log instead of tracing the graph, so they work on any network that
runs, torch.fx-traceable or not. Tensor *identity* (``a is b``) links a module's output to the next
module's input, including in-place activations that return their input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Call:
    """What one submodule did during the probe (its last call if it ran more than once)."""

    name: str
    module: nn.Module
    calls: int = 0
    start: int = -1  # event index of the (last) call's start
    end: int = -1  # event index of the (last) call's end
    x: object = None  # first tensor argument
    y: object = None  # output
    children: list[str] = field(default_factory=list)

    @property
    def leaf(self) -> bool:
        return not self.children


def area(t: object) -> int | None:
    """H·W of a 4D (N, C, H, W) tensor, None for anything else."""
    return t.shape[2] * t.shape[3] if isinstance(t, torch.Tensor) and t.dim() == 4 else None


def _first_tensor(args: tuple) -> object:
    return next((a for a in args if isinstance(a, torch.Tensor)), None)


@torch.no_grad()
def probe(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, Call], object]:
    """Run ``model(x)`` in eval mode with hooks on every submodule; return ``({name: Call}, output)``.

    Each module's ``training`` flag is restored afterwards (a frozen BN stays in eval mode).
    """
    calls = {name: Call(name, m, children=[f"{name}.{c}" if name else c for c, _ in m.named_children()])
             for name, m in model.named_modules()}
    clock = [0]
    handles = []

    def pre(name):
        def hook(module, args):
            rec = calls[name]
            rec.calls, rec.start, rec.x = rec.calls + 1, clock[0], _first_tensor(args)
            clock[0] += 1
        return hook

    def post(name):
        def hook(module, args, output):
            calls[name].end, calls[name].y = clock[0], output
            clock[0] += 1
        return hook

    modes = {m: m.training for m in model.modules()}
    try:
        for name, m in model.named_modules():
            handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name))]
        model.eval()
        out = model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return calls, out
