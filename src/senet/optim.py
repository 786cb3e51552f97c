"""The training recipe's pieces: parameter groups, the learning-rate schedule, EMA, staged unfreezing.

- Weight decay is not applied to norms, biases and attention blocks by default (the SE paper's
  gates are small FC layers whose decay only pulls the gates towards σ(0) = 0.5). A parameter is
  "no decay" when it is 1-D (norm scales/shifts, biases, per-channel gains) or lives inside an
  attention block (a registered senet block, a block ``senet.attach`` inserted with its gate, or a
  foreign one recognised by its class name).
- Fine-tuning (the SE-VGG16 recipe in REFERENCE.md): the backbone gets ``lr * backbone_lr_scale``,
  the attention blocks and the classifier head get ``lr``; unfreezing goes in stages: attention +
  head, then the last backbone stage(s), then everything.
- The schedule is a pure function of the optimizer step (linear warmup, then cosine or step decay),
  so resuming only needs the step count.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence

import torch
from torch import nn

from senet.layers import is_attention as senet_is_attention

# Foreign attention blocks (timm's SEModule/EcaModule/CbamModule, torchvision's SqueezeExcitation ...).
_ATTN_NAME = re.compile(r"squeeze|excit|^se(module|layer|block)?$|semodule|^eca|cbam|^gc(module|block)",
                        re.IGNORECASE)


def is_attention(module: nn.Module) -> bool:
    """True for an attention block: a senet one (``senet.layers.is_attention``: a registered block or
    ``senet.attach``'s ``GatedExcitation``), or a foreign one named like one."""
    return senet_is_attention(module) or bool(_ATTN_NAME.search(type(module).__name__))


def attention_params(model: nn.Module) -> set[int]:
    """ids of every parameter inside an attention block."""
    return {id(p) for m in model.modules() if is_attention(m) for p in m.parameters()}


def classifier_of(model: nn.Module) -> nn.Module:
    """The classifier head: ``get_classifier()`` (timm), else ``fc``/``head``/``classifier``
    (torchvision, senet), else the last ``nn.Linear``."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        if isinstance(head, nn.Module):
            return head
    for name in ("fc", "head", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot find the classifier head of {type(model).__name__}: give it a `fc`, "
                         "`head` or `classifier` attribute")
    return linears[-1]


def head_and_attention_params(model: nn.Module) -> set[int]:
    """ids of the parameters fine-tuning treats as new: attention blocks and the classifier head."""
    return attention_params(model) | {id(p) for p in classifier_of(model).parameters()}


def param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    backbone_lr_scale: float = 1.0,
    decay_norm_bias: bool = False,
    decay_attention: bool = False,
) -> list[dict]:
    """Optimizer groups ``{"params", "weight_decay", "lr_scale", "name"}``, empty ones dropped.

    Names are ``backbone``/``head`` (attention + classifier) crossed with ``decay``/``no_decay``.
    Every parameter is included, frozen or not, so the optimizer state keeps one layout across
    unfreezing stages (a frozen parameter has no gradient and the optimizer skips it).
    """
    if backbone_lr_scale < 0:
        raise ValueError(f"backbone_lr_scale must be >= 0, got {backbone_lr_scale}")
    attn, new = attention_params(model), head_and_attention_params(model)
    groups: dict[tuple[str, str], list[nn.Parameter]] = {}
    for p in model.parameters():
        part = "head" if id(p) in new else "backbone"
        skip = (p.ndim <= 1 and not decay_norm_bias) or (id(p) in attn and not decay_attention)
        groups.setdefault((part, "no_decay" if skip else "decay"), []).append(p)
    out = []
    for part in ("backbone", "head"):
        for kind in ("decay", "no_decay"):
            if (part, kind) in groups:
                out.append({"params": groups[part, kind], "name": f"{part}.{kind}",
                            "weight_decay": weight_decay if kind == "decay" else 0.0,
                            "lr_scale": backbone_lr_scale if part == "backbone" else 1.0})
    return out


def build_optimizer(groups: list[dict], name: str, *, lr: float, momentum: float = 0.9,
                    nesterov: bool = False,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW over ``groups``; each group's ``lr`` is ``lr * lr_scale``."""
    for g in groups:
        g["base_lr"] = lr * g["lr_scale"]
        g["lr"] = g["base_lr"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def lr_factor(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    min_factor: float = 0.0,
) -> float:
    """The multiplier of the base learning rate at optimizer step ``step`` (0-based).

    warmup (step < W):  (step + 1) / W                       linear, never exactly 0
    cosine:             m + (1 - m) · ½(1 + cos(π t)),  t = (step - W) / (total - W)
    step:               γ^(number of milestones <= step)     milestones in steps
    constant:           1
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "step":
        return gamma ** sum(step >= m for m in milestones)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"schedule must be 'cosine', 'step' or 'constant', got {schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor


class ModelEma(nn.Module):
    """An exponential moving average of a model's weights (Polyak averaging).

    After each optimizer step: ``ema = decay · ema + (1 - decay) · θ`` for every floating-point
    parameter and buffer (BN running statistics included); integer buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), e.g. 0.999, got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_state, state = self.module.state_dict(), model.state_dict()
        for k, e in ema_state.items():
            if e.is_floating_point():
                e.lerp_(state[k].detach(), 1.0 - self.decay)  # e + (1-d)(θ - e) = d·e + (1-d)·θ
            else:
                e.copy_(state[k])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


# ----------------------------------------------------------------------------- staged unfreezing


def backbone_stages(model: nn.Module) -> list[nn.Module]:
    """The backbone's stages, first to last.

    ``layer1..layerN`` (ResNets); else the children holding parameters outside the head,
    descending while there is only one (VGG's ``features``). A flat sequence with pooling layers
    is cut after each pool (VGG's five conv blocks).
    """
    layers = [getattr(model, f"layer{i}") for i in range(1, 10) if hasattr(model, f"layer{i}")]
    if layers:
        return layers
    new = head_and_attention_params(model)
    parent = model
    while True:
        kids = [m for m in parent.children() if any(id(p) not in new for p in m.parameters())]
        if len(kids) != 1 or not any(True for _ in kids[0].children()):
            break
        parent = kids[0]
    pools = (nn.MaxPool2d, nn.AvgPool2d)
    if not any(isinstance(m, pools) for m in parent.children()):
        return kids
    blocks, current = [], []
    for m in parent.children():
        current.append(m)
        if isinstance(m, pools):
            blocks.append(nn.Sequential(*current))  # a view: the modules stay where they are
            current = []
    blocks += [nn.Sequential(*current)] if current else []
    return [b for b in blocks if any(id(p) not in new for p in b.parameters())]


def parse_unfreeze(spec: str | Sequence[int] | None) -> tuple[int, ...]:
    """``"3,6"`` -> (3, 6): epochs at which the last stage(s), then everything, are unfrozen."""
    if spec is None or spec == "" or spec == ():
        return ()
    try:
        epochs = tuple(int(e) for e in (spec.split(",") if isinstance(spec, str) else spec))
    except ValueError:
        raise ValueError(f"--unfreeze takes epochs like '3,6' (last stages at 3, everything at 6), "
                         f"got {spec!r}") from None
    if len(epochs) not in (1, 2) or any(e < 0 for e in epochs) or list(epochs) != sorted(epochs):
        raise ValueError(f"--unfreeze takes one or two increasing epochs like '3,6', got {spec!r}")
    return epochs


def unfreeze_stage(epoch: int, epochs: tuple[int, ...]) -> int:
    """0: attention + head only; 1: also the last backbone stage(s); 2: everything.

    With one epoch E given, stage 0 runs before E and everything is trainable from E on.
    """
    if not epochs:
        return 2
    if len(epochs) == 1:
        return 0 if epoch < epochs[0] else 2
    return sum(epoch >= e for e in epochs)


def apply_freeze(model: nn.Module, stage: int, *, last_stages: int = 1) -> list[nn.Module]:
    """Set ``requires_grad`` for ``stage`` (see ``unfreeze_stage``); returns the frozen modules'
    BatchNorms, which the training loop keeps in eval mode so their statistics stay fixed too."""
    if stage >= 2:
        model.requires_grad_(True)
        return []
    new = head_and_attention_params(model)
    trainable = set(new)
    if stage == 1:
        for s in backbone_stages(model)[-last_stages:]:
            trainable.update(id(p) for p in s.parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and not any(p.requires_grad for p in m.parameters(recurse=False))]
