"""Global Context block (Cao et al., "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and
Beyond", arXiv 1904.11492).

    context:    α = softmax_{HW}(W_k x)           W_k: 1x1 conv C -> 1 (with bias), (B, 1, H·W)
                c = Σ_j α_j x_j                     attention pooling, (B, C, 1, 1)
    transform:  t = W_v2 ReLU(LN(W_v1 c))         W_v1: C -> C/r, LN over [C/r, 1, 1], W_v2: C/r -> C
    fusion:     y = x + t      ("add", the paper's default, eq. 4)
                y = x ⊙ σ(t)   ("scale", the SE-like alternative of its Table 2)

All convs have biases; with ``fusion="add"`` W_v2 starts at zero (the authors' ``last_zero_init``)
so an added block begins as the identity. ``fusion="add"`` matches timm's ``GlobalContext(fuse_add=True,
fuse_scale=False)``, ``"scale"`` its default; timm's LayerNorm uses eps 1e-6, the authors' 1e-5.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import NoScript, check_channels, check_choice, check_input, create_act, create_gate, hidden_width


class GlobalContext(NoScript, nn.Module):
    """GC block: attention-pooled context through a LayerNorm bottleneck, added to (or scaling) every position.

    Args:
        channels: C.
        reduction, hidden, divisor, hidden_from: the bottleneck width C/r (r = 16).
        fusion: ``"add"`` (paper default) or ``"scale"``.
        act: the bottleneck activation (ReLU). gate: σ, used by ``fusion="scale"`` only.
        eps: the LayerNorm epsilon.
    """

    paper = "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond (Cao et al.)"
    arxiv = "1904.11492"
    summary = "x + W2 ReLU(LN(W1 Σ_j softmax(W_k x)_j x_j)): attention-pooled global context, added"

    def __init__(
        self,
        channels: int,
        *,
        reduction: float = 16,
        hidden: int | None = None,
        divisor: int = 1,
        hidden_from: int | None = None,
        fusion: str = "add",
        act: str | type[nn.Module] = "relu",
        gate: str | type[nn.Module] = "sigmoid",
        eps: float = 1e-5,
    ):
        super().__init__()
        self.channels = check_channels(channels)
        self.hidden = h = hidden_width(channels, reduction, hidden, divisor, hidden_from)
        self.fusion = check_choice("fusion", fusion, ("add", "scale"))
        self.conv_attn = nn.Conv2d(channels, 1, 1)  # W_k
        self.fc1 = nn.Conv2d(channels, h, 1)  # W_v1
        self.norm = nn.LayerNorm([h, 1, 1], eps=eps)
        self.act = create_act(act)
        self.fc2 = nn.Conv2d(h, channels, 1)  # W_v2
        self.gate = create_gate(gate) if fusion == "scale" else nn.Identity()
        if fusion == "add":  # start as the identity
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def context_attention(self, x: torch.Tensor) -> torch.Tensor:
        """α, the softmax over positions, shaped (B, 1, H, W)."""
        check_input(x, self.channels, type(self).__name__)
        logits = self.conv_attn(x)  # (B, 1, H, W)
        return logits.flatten(2).softmax(-1).view_as(logits)

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel term, (B, C, 1, 1): t added ("add") or σ(t) multiplied ("scale")."""
        alpha = self.context_attention(x).flatten(2)  # (B, 1, HW)
        context = torch.bmm(x.flatten(2), alpha.transpose(1, 2))  # (B, C, 1) = Σ_j α_j x_j
        t = self.fc2(self.act(self.norm(self.fc1(context.unsqueeze(-1)))))  # (B, C, 1, 1)
        return self.gate(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.excitation(x)
        return x + t if self.fusion == "add" else x * t

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}, fusion={self.fusion}"
