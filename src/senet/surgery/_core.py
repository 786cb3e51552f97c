"""``attach``: insert attention blocks into an existing network by module surgery.

Insertion never renames or moves an existing module, so every existing parameter keeps its name and
old checkpoints still load. The block for place ``P`` becomes the new child ``P.attached`` and runs
on ``P``'s output through a forward hook (for a plain ``nn.Sequential`` it is appended instead and
runs last). A probe forward pass before and after checks every block runs exactly once.

Identity initialisation wraps the block as ``y = x + g · (A(x) - x)`` with a learnable scalar g = 0
(``GatedExcitation``): the network computes exactly what it did before, for every registered block
(SE, ECA, sSE, scSE, ...), and dL/dg = Σ (A(x) - x) · dL/dy ≠ 0, so g leaves 0 on the first step and
the block's own weights train from the second. At g = 1 the wrapper is the plain block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from senet.layers import create_attention, get_attention
from senet.layers._common import NoScript

from ._probe import area, probe
from ._rules import ATTR, RULES, explicit_places, is_plain_sequential

INITS = ("identity", "plain")


class GatedExcitation(NoScript, nn.Module):
    """``y = x + g · (A(x) - x)``, g a learnable scalar starting at ``gain`` (0: exactly the identity).

    The identity-at-insertion wrapper of ``senet.attach`` (Hu et al., SE networks, arXiv 1709.01507,
    inserted into a pretrained network): for a gating block ``A(x) = x · s`` this is
    ``x · (1 + g (s - 1))``, an interpolation between no attention (g = 0) and the block (g = 1).
    """

    is_attention = True  # senet.layers.is_attention: found by analyze/prune/optim as one block

    def __init__(self, block: nn.Module, gain: float = 0.0):
        super().__init__()
        self.block = block
        self.gain = nn.Parameter(torch.tensor(float(gain)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gain * (self.block(x) - x)

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """``1 + g (s - 1)``, the wrapper's own scale for a gating block ``A(x) = x · s(x)``, s its excitation."""
        if not callable(getattr(self.block, "excitation", None)):
            raise TypeError(f"{type(self.block).__name__} has no excitation(x)")
        return 1 + self.gain * (self.block.excitation(x) - 1)


@dataclass(frozen=True)
class Place:
    """One inserted block: after module ``name``, over ``channels`` channels of an ``size`` map."""

    name: str
    channels: int
    size: tuple[int, int]  # (H, W) at the probe input
    params: int


@dataclass
class AttachReport:
    """What one ``attach`` call inserted, and the recipe to do it again (``to_dict``)."""

    attn: str
    where: str | list[str]
    init: str
    kwargs: dict
    input_size: tuple[int, ...]
    places: list[Place] = field(default_factory=list)

    @property
    def added_params(self) -> int:
        return sum(p.params for p in self.places)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AttachReport:
        places = [Place(p["name"], p["channels"], tuple(p["size"]), p["params"]) for p in d["places"]]
        return cls(d["attn"], d["where"], d["init"], dict(d["kwargs"]), tuple(d["input_size"]), places)

    def __str__(self) -> str:
        w = max(len(p.name) for p in self.places)
        rows = [f"  {p.name:<{w}}  C={p.channels:<5} {p.size[0]}x{p.size[1]:<4} +{p.params:,} params"
                for p in self.places]
        head = (f"attached {self.attn!r} ({self.init} init) at {len(self.places)} places "
                f"(where={self.where!r}), +{self.added_params:,} parameters:")
        return "\n".join([head, *rows])


def _run_attached(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    # A module-level function, not a closure: deepcopy/pickle keep it pointing at the copy's block.
    return getattr(module, ATTR)(output)


def _insert(target: nn.Module, block: nn.Module) -> None:
    target.add_module(ATTR, block)
    if not is_plain_sequential(target):
        target.register_forward_hook(_run_attached)


def _remove(target: nn.Module) -> None:
    target._modules.pop(ATTR, None)
    for key, hook in list(target._forward_hooks.items()):
        if hook is _run_attached:
            del target._forward_hooks[key]


def _example_input(model: nn.Module, input_size: Sequence[int]) -> torch.Tensor:
    if len(input_size) != 3 or not all(isinstance(s, int) and s > 0 for s in input_size):
        raise ValueError(f"input_size must be (C, H, W) positive ints, got {input_size!r}")
    p = next(model.parameters(), None)
    device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
    return x.to(device=device, dtype=dtype)


def _find_places(model: nn.Module, calls, where, select) -> list[str]:
    if isinstance(where, str):
        if where not in RULES:
            hint = f"; to attach after module {where!r} pass where=[{where!r}]" if where in calls else ""
            raise ValueError(f"where must be one of {list(RULES)} or a list of module names, got {where!r}{hint}")
        names = RULES[where](calls)
    elif isinstance(where, Sequence) and all(isinstance(n, str) for n in where):
        names = explicit_places(calls, list(where))
    else:
        raise ValueError(f"where must be one of {list(RULES)} or a list of module names, got {where!r}")
    if select is not None:
        names = [n for n in names if select(n, calls[n].y.shape[1])]
    if not names:
        raise ValueError(f"no place in {type(model).__name__} matches where={where!r}"
                         f"{' and select' if select is not None else ''}; try where='stage' or 'conv', "
                         "or list module names (see model.named_modules())")
    return names


def _build(attn: str, channels: int, name: str, init: str, kwargs: dict) -> nn.Module:
    try:
        block = create_attention(attn, channels, **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"attention {attn!r} does not fit place {name!r} ({channels} channels): {err}") from None
    return GatedExcitation(block) if init == "identity" else block


def _verify(model: nn.Module, x: torch.Tensor, before, names: list[str], init: str) -> None:
    calls, after = probe(model, x)
    for name in names:
        n = calls[f"{name}.{ATTR}"].calls
        if n != 1:
            raise ValueError(f"attention attached after {name!r} ran {n} times in a forward pass, not once "
                             f"({type(calls[name].module).__name__} runs its children itself); "
                             "name a module inside it instead")
    if init == "identity" and not _same(before, after):
        raise ValueError(f"the output changed although every gate is 0: one of {names} feeds more than "
                         "its successor; attach at fewer places")


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return True


def attach(
    model: nn.Module,
    attn: str = "se",
    where: str | Sequence[str] = "residual",
    *,
    init: str = "identity",
    select: Callable[[str, int], bool] | None = None,
    input_size: Sequence[int] = (3, 224, 224),
    **attn_kwargs,
) -> tuple[nn.Module, AttachReport]:
    """Insert ``create_attention(attn, C, **attn_kwargs)`` blocks into ``model`` (in place).

    Args:
        model: any ``nn.Module`` taking an image batch (torch.fx-traceable or not).
        attn: a registered attention name (``senet.list_attentions()``).
        where: ``"residual"`` (end of each residual branch, before the addition), ``"stage"`` (end of
            each stage, before downsampling, as in SE-VGG16), ``"conv"`` (after each
            conv/norm/activation group), or a list of module names to attach after.
        init: ``"identity"`` (a zero gate: the output is unchanged at insertion, see
            ``GatedExcitation``) or ``"plain"`` (the block as built, as if trained from scratch).
        select: keep only places where ``select(module_name, channels)`` is true.
        input_size: (C, H, W) of the probe input used to find places and their channels.

    Returns ``(model, report)``; the report (also kept as ``model.senet_attach``) lists each place.
    Raises ValueError naming the place when nothing matches, a name does not exist, a place already
    has attention, or the block does not fit the channels there.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")
    get_attention(attn)  # unknown names fail before any probing
    x = _example_input(model, input_size)
    calls, before = probe(model, x)
    names = _find_places(model, calls, where, select)
    report = AttachReport(attn, where if isinstance(where, str) else list(where), init, dict(attn_kwargs),
                          tuple(input_size))
    done = []
    try:
        for name in names:
            y = calls[name].y  # (N, C, H, W)
            block = _build(attn, y.shape[1], name, init, attn_kwargs).to(device=y.device, dtype=y.dtype)
            _insert(calls[name].module, block)
            done.append(calls[name].module)
            report.places.append(Place(name, y.shape[1], tuple(y.shape[2:]),
                                       sum(p.numel() for p in block.parameters())))
        _verify(model, x, before, names, init)
    except BaseException:
        for target in done:
            _remove(target)
        raise
    model.senet_attach = [*getattr(model, "senet_attach", []), report]
    return model, report


def attached_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """``{place: inserted block}`` for every block ``attach`` put into ``model``."""
    return {name[: -len(ATTR) - 1]: m for name, m in model.named_modules() if name.endswith(f".{ATTR}")}


def gates(model: nn.Module) -> dict[str, float]:
    """``{place: g}`` for every identity-initialised block (0 at insertion)."""
    return {p: b.gain.item() for p, b in attached_blocks(model).items() if isinstance(b, GatedExcitation)}


__all__ = ["AttachReport", "GatedExcitation", "INITS", "Place", "area", "attach", "attached_blocks", "gates"]
