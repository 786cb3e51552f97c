"""Squeeze-and-Excitation (Hu et al., "Squeeze-and-Excitation Networks", arXiv 1709.01507).

    z = F_sq(u) = mean_{H,W} u                       (eq. 2, global average pooling)
    s = F_ex(z) = σ(W2 δ(W1 z)),  W1: C/r x C, W2: C x C/r      (eq. 3)
    x̃_c = s_c · u_c                                  (eq. 4)

The defaults are exactly eq. 3: two bias-free FCs, r = 16, ReLU, sigmoid, average pooling.
Every knob the implementations in the wild differ in is an argument (see ``_common``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from ._common import (
    NoScript,
    check_channels,
    check_choice,
    check_input,
    create_act,
    create_gate,
    global_pool,
    hidden_width,
)
from .fused import _autocast_state, can_recompute, eager, inference, observed, scale_by_excitation


class SqueezeExcite(NoScript, nn.Module):
    """SE block: ``x * gate(fc2(act(fc1(pool(x)))))``.

    Args:
        channels: C, the channels scaled (input == output shape).
        reduction: r; hidden width ``hidden_from // r`` (at least 1).
        hidden: explicit hidden width (overrides ``reduction``).
        divisor: round the hidden width to a multiple of this (1 = off).
        hidden_from: channel count the hidden width is computed from (default ``channels``).
        fc: ``"linear"`` (nn.Linear, the paper) or ``"conv"`` (1x1 nn.Conv2d, MobileNetV3/timm).
        bias: FC biases (the paper's equations: none; the released Caffe models: yes).
        act: inner activation δ. gate: σ (``sigmoid``, ``hard_sigmoid``, ``tanh``, ...).
        pool: squeeze by ``"avg"`` (the paper) or ``"max"`` (ablation, Table 11).
    """

    paper = "Squeeze-and-Excitation Networks (Hu et al.)"
    arxiv = "1709.01507"
    summary = "x * σ(W2 δ(W1 avgpool(x))): two FCs through a C/r bottleneck"

    def __init__(
        self,
        channels: int,
        *,
        reduction: float = 16,
        hidden: int | None = None,
        divisor: int = 1,
        hidden_from: int | None = None,
        fc: str = "linear",
        bias: bool = False,
        act: str | type[nn.Module] = "relu",
        gate: str | type[nn.Module] = "sigmoid",
        pool: str = "avg",
    ):
        super().__init__()
        self.channels = check_channels(channels)
        self.hidden = hidden_width(channels, reduction, hidden, divisor, hidden_from)
        self.fc_kind = check_choice("fc", fc, ("linear", "conv"))
        self.pool = check_choice("pool", pool, ("avg", "max"))
        layer = nn.Linear if fc == "linear" else _conv1x1
        self.fc1 = layer(channels, self.hidden, bias=bias)
        self.act = create_act(act)
        self.fc2 = layer(self.hidden, channels, bias=bias)
        self.gate = create_gate(gate)

    def pooled_logits(self, z: torch.Tensor) -> torch.Tensor:
        """W2 δ(W1 z) for the pooled z (B, C, 1, 1); same shape out."""
        b = z.shape[0]
        if self.fc_kind == "linear":
            z = z.flatten(1)  # (B, C)
            if self._functional():  # the same ops without three module calls (~14 us per block)
                h = F.linear(z, self.fc1.weight, self.fc1.bias)
                h = torch.relu(h) if torch.is_grad_enabled() else h.relu_()
                return F.linear(h, self.fc2.weight, self.fc2.bias).view(b, self.channels, 1, 1)
        return self.fc2(self.act(self.fc1(z))).view(b, self.channels, 1, 1)

    def _plain_fcs(self) -> tuple[nn.Linear, nn.Linear] | None:
        """(fc1, fc2) when they are plain ``nn.Linear`` with a plain ``nn.ReLU`` between, nobody hooking
        them (their ops may then run directly); else None."""
        m = self._modules  # one dict, not six Module.__getattr__ calls (they cost ~0.4 us each)
        fc1, act, fc2 = m["fc1"], m["act"], m["fc2"]
        if type(fc1) is nn.Linear and type(fc2) is nn.Linear and type(act) is nn.ReLU and not observed(fc1, act, fc2):
            return fc1, fc2
        return None

    def _functional(self) -> bool:
        """Plain FCs (``_plain_fcs``) in eager mode: call their ops directly."""
        return eager() and self._plain_fcs() is not None

    def infer_excitation(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """``excitation(x)`` for eager inference (no autograd), ``z``: ``mean_hw x`` (B, C, 1, 1) when known.

        The same values up to float rounding in as few Python steps as possible where nothing can tell
        the difference (this very class, plain Linear FCs, ReLU and sigmoid modules that nobody hooks,
        ``x`` in the weights' dtype, no autocast): six tensor calls, no module calls, ReLU and sigmoid in
        place. Inside a network at batch 1 every Python step costs ~10x what it costs in a loop (the
        convolutions evict the interpreter's and dispatcher's data from the caches): a module call or
        a check is worth ~10 us there, a share of ResNet-50's ~90 ms that the 2 % target cannot spare
        (docs/performance.md). Callers: ``forward`` and the residual units, both only in eager inference.
        """
        weights = self._lean_weights()
        if weights is not None and not _autocast(x) and x.dtype == weights[0].dtype:
            w1, b1, w2, b2 = weights
            b = x.shape[0]
            z = x.mean((2, 3)) if z is None else z.view(b, self.channels)  # (B, C)
            return F.linear(F.linear(z, w1, b1).relu_(), w2, b2).sigmoid_().view(b, self.channels, 1, 1)
        return self.gate(self.logits(x) if z is None else self.pooled_logits(z))

    def _lean_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None] | None:
        """(W1, b1, W2, b2) when this block is exactly eq. 3 run by plain modules nobody hooks (this very
        class, average pooling, ``_plain_fcs``, an ``nn.Sigmoid`` gate), so its excitation may be computed
        from the weights directly (``infer_excitation``, ``senet.layers.native``); else None."""
        if type(self) is not SqueezeExcite or self.pool != "avg":
            return None
        fcs = self._plain_fcs()
        gate = self._modules["gate"]  # not self.gate: Module.__getattr__ costs ~0.4-0.9 us, hot
        if fcs is None or type(gate) is not nn.Sigmoid or observed(gate):
            return None
        p1, p2 = fcs[0]._parameters, fcs[1]._parameters
        w1, w2 = p1.get("weight"), p2.get("weight")
        if w1 is None or w2 is None:
            return None
        return w1, p1.get("bias"), w2, p2.get("bias")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The gate's input W2 δ(W1 z), shaped (B, C, 1, 1) (``senet.layers.fused`` applies the gate)."""
        check_input(x, self.channels, type(self).__name__)
        return self.pooled_logits(global_pool(x, self.pool))

    def excite(self, z: torch.Tensor) -> torch.Tensor:
        """s = σ(W2 δ(W1 z)) from the pooled z, (B, C, 1, 1) -> (B, C, 1, 1)."""
        return self.gate(self.pooled_logits(z))

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """The scale s, shaped (B, C, 1, 1)."""
        return self.gate(self.logits(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "avg" and can_recompute(self, x):  # training: one pass less backward
            check_input(x, self.channels, type(self).__name__)
            y = native.se_scale_train(self, x)  # forward and backward each one native call where it applies
            return scale_by_excitation(x, self.excite, tuple(self.parameters())) if y is None else y
        if inference():
            check_input(x, self.channels, type(self).__name__)
            y = native.se_scale(self, x)  # squeeze, excitation and scale in one native call where it applies
            return x * self.infer_excitation(x) if y is None else y
        return x * self.excitation(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}, fc={self.fc_kind}, pool={self.pool}"


def _autocast(x: torch.Tensor) -> bool:
    """Autocast on for ``x``'s device; True for devices autocast does not know (``meta``, ...): they take
    the module path, which is right everywhere."""
    state = _autocast_state(x)
    return state is None or state[1]


def _conv1x1(cin: int, cout: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, bias=bias)


def se_released(channels: int, **kwargs) -> SqueezeExcite:
    """The released Caffe SENets' form: FCs with biases (hidden C // 16)."""
    return SqueezeExcite(channels, **{"bias": True, **kwargs})


se_released.paper, se_released.arxiv = SqueezeExcite.paper, SqueezeExcite.arxiv
se_released.summary = "SE as in the released Caffe SENets: FCs with biases, hidden C // 16"


def se_mobilenetv3(channels: int, **kwargs) -> SqueezeExcite:
    """The MobileNetV3 form (arXiv 1905.02244): 1x1 convs with bias, hidden = make_divisible(C/4, 8),
    hard-sigmoid gate."""
    preset = {"reduction": 4, "divisor": 8, "fc": "conv", "bias": True, "gate": "hard_sigmoid"}
    return SqueezeExcite(channels, **{**preset, **kwargs})


se_mobilenetv3.paper, se_mobilenetv3.arxiv = "Searching for MobileNetV3 (Howard et al.)", "1905.02244"
se_mobilenetv3.summary = "SE as in MobileNetV3: 1x1 convs with bias, hidden make_divisible(C/4, 8), hard-sigmoid"


class EffectiveSE(NoScript, nn.Module):
    """eSE, effective SE (Lee & Park, "CenterMask", arXiv 1911.06667): one C x C FC, no reduction.

    ``x * hard_sigmoid(W avgpool(x) + b)``, W a 1x1 conv with bias (VoVNetV2).
    """

    paper = "CenterMask: Real-Time Anchor-Free Instance Segmentation (Lee & Park)"
    arxiv = "1911.06667"
    summary = "x * hσ(W avgpool(x) + b): one CxC FC, no channel reduction"

    def __init__(self, channels: int, *, bias: bool = True, gate: str | type[nn.Module] = "hard_sigmoid",
                 pool: str = "avg"):
        super().__init__()
        self.channels = check_channels(channels)
        self.pool = check_choice("pool", pool, ("avg", "max"))
        self.fc = nn.Conv2d(channels, channels, 1, bias=bias)
        self.gate = create_gate(gate)

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, type(self).__name__)
        return self.gate(self.fc(global_pool(x, self.pool)))  # (B, C, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excitation(x)
