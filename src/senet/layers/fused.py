"""The fast path of SE inside a residual unit (Hu et al., "Squeeze-and-Excitation Networks", arXiv 1709.01507).

The standard SE-ResNet unit (paper Fig. 5b) ends with

    y = relu(x * s + shortcut),   s = σ(W2 δ(W1 mean_{H,W} x))          (eqs. 2-4)

Written as three ops (``x * s``, ``+ shortcut``, ``relu``) it makes three passes over the activation
and autograd keeps ``x`` (the BN output, needed for ds = Σ_hw g·x) on top of what the plain ResNet
keeps. Here the scale, the addition and the ReLU are one ``addcmul`` plus an in-place ``relu_``
(the same passes as the plain unit's ``relu(out + shortcut)``), and with a sigmoid gate a custom
autograd function keeps only ``y``, ``s`` and ``shortcut``: ``y`` is the next unit's input and an
identity ``shortcut`` is this unit's input, both kept by the convolutions anyway. Where ``y > 0``,
``x s = y - shortcut``, so the gradient of the gate's logits a (s = σ(a)) needs no ``x``:

    dL/da_c = s_c (1 - s_c) Σ_hw g_pre x = (1 - s_c) Σ_hw g_pre (y - shortcut),  g_pre = g · [y > 0]

(no division by s, so saturated gates stay exact up to rounding). Other gates keep ``x``.

The fast path is the default. It steps aside, and the unit calls its ``attn`` module as usual, when
anything observes the modules it would skip (forward hooks on ``attn``/``act``, as ``senet analyze``
and ``senet prune`` install), and while ``reference_path()`` is active (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as _module

_ENABLED = True


@contextlib.contextmanager
def reference_path() -> Iterator[None]:
    """Within this context residual units call their attention module unfused (the reference)."""
    global _ENABLED
    before, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = before


def observed(*modules: nn.Module) -> bool:
    """True when forward hooks (global or on ``modules``) expect these modules to be called."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def can_fuse(attn: nn.Module, act: nn.Module) -> bool:
    """Whether ``relu(attn(x) + shortcut)`` may run as ``scale_add_relu``: a scale-form block exposing
    ``logits(x)`` and ``gate``, a ReLU after the addition, nobody watching, the fast path enabled."""
    return (_ENABLED and callable(getattr(attn, "logits", None)) and isinstance(act, nn.ReLU)
            and not observed(attn, act, attn.gate))


class _SigmoidScaleAddReLU(torch.autograd.Function):
    """y = relu(x * σ(a) + shortcut), saving y, s and either ``shortcut`` or, given ``x = A c + B``
    (a BatchNorm's per-channel affine map of ``c``), ``c``, A and B - never x.

    Shapes: x, shortcut, c (B, C, H, W); a (B, C, 1, 1); A, B (1, C, 1, 1).
    """

    @staticmethod
    def forward(ctx, x, a, shortcut, c=None, A=None, B=None):
        s = torch.sigmoid(a)  # (B, C, 1, 1)
        y = torch.addcmul(shortcut, x, s).relu_()  # (B, C, H, W): one pass + the in-place ReLU
        ctx.from_bn = c is not None
        ctx.save_for_backward(y, s, *((c, A, B) if ctx.from_bn else (shortcut,)))
        return y

    @staticmethod
    @once_differentiable  # the backward keeps no graph: double backward raises, never lies
    def backward(ctx, g):
        y, s, *kept = ctx.saved_tensors
        g_pre = torch.ops.aten.threshold_backward(g, y, 0)  # g · [y > 0], as ReLU's backward
        grad_x = g_pre * s
        if ctx.from_bn:  # Σ_hw g_pre x = A Σ_hw g_pre c + B Σ_hw g_pre; times σ' = s (1 - s)
            c, A, B = kept
            gx = channel_dot(g_pre, c).mul_(A).add_(g_pre.sum((2, 3), keepdim=True) * B)
            grad_a = gx.mul_(s * (1 - s))
        else:  # Σ_hw g_pre (y - shortcut) = s Σ_hw g_pre x; times (1 - s) is dL/da
            grad_a = channel_dot(g_pre, y, kept[0]).mul_(1 - s)
        return grad_x, grad_a, g_pre, None, None, None


@torch.no_grad()
def bn_affine(bn: nn.BatchNorm2d, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), each (1, C, 1, 1), with ``bn(c) == A * c + B`` for this very call: batch statistics
    (biased variance) in training or without running statistics, else the running ones."""
    if bn.training or bn.running_mean is None:
        var, mean = torch.var_mean(c, (0, 2, 3), correction=0)  # (C,)
    else:
        var, mean = bn.running_var, bn.running_mean
    A = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        A = A * bn.weight
    B = -mean * A if bn.bias is None else bn.bias - mean * A
    return A.view(1, -1, 1, 1).to(c.dtype), B.view(1, -1, 1, 1).to(c.dtype)


def channel_dot(g: torch.Tensor, x: torch.Tensor, minus: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_hw g (x - minus) for every (b, c), as (B, C, 1, 1). The product goes through one sample-sized
    buffer (cache-resident, allocated once) instead of a fresh full-size temporary (compiled: the plain
    expression, which the compiler fuses)."""
    if torch.compiler.is_compiling():
        return (g * (x if minus is None else x - minus)).sum((2, 3), keepdim=True)
    out = torch.empty(g.shape[0], g.shape[1], 1, 1, dtype=g.dtype, device=g.device)
    buf = torch.empty_like(g[0])  # (C, H, W), g's memory format
    for b in range(g.shape[0]):
        prod = torch.mul(g[b], x[b], out=buf) if minus is None else torch.sub(x[b], minus[b], out=buf).mul_(g[b])
        torch.sum(prod, (1, 2), keepdim=True, out=out[b])
    return out


class _ScaleByExcitation(torch.autograd.Function):
    """x * excite(mean_hw x), saving x, the pooled z and s; backward recomputes the (tiny) excitation.

    dL/dx = g s + (dL/dz) / HW in one pass (the squeeze's gradient folded into the scale's).
    Shapes: x, g (B, C, H, W); z, s (B, C, 1, 1).
    """

    @staticmethod
    def forward(ctx, x, excite, *params):
        z = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1), eq. 2
        s = excite(z)  # eq. 3 (no graph: forward runs without grad)
        ctx.excite = excite
        ctx.save_for_backward(x, z, s, *params)
        return x * s  # eq. 4

    @staticmethod
    @once_differentiable  # the backward keeps no graph: double backward raises, never lies
    def backward(ctx, g):
        x, z, s, *params = ctx.saved_tensors
        ds = channel_dot(g, x)  # dL/ds = Σ_hw g x, (B, C, 1, 1)
        with torch.enable_grad():
            z_ = z.detach().requires_grad_()
            s_ = ctx.excite(z_)
            wanted = [z_, *(p for p in params if p.requires_grad)]
            got = iter(torch.autograd.grad(s_, wanted, ds, allow_unused=True))
        dz = next(got)
        grad_x = torch.addcmul(dz / (x.shape[2] * x.shape[3]), g, s)  # g s + dz / HW, (B, C, H, W)
        return (grad_x, None, *(next(got) if p.requires_grad else None for p in params))


def can_recompute(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``block(x)`` may run as ``scale_by_excitation``: grad needed, eager mode, fast path
    enabled, nobody hooked on the block's sub-modules (their forward runs again in backward)."""
    if not (_ENABLED and torch.is_grad_enabled()) or _tracing() or torch.compiler.is_compiling():
        return False
    if observed(block, *block.modules()):
        return False
    return x.requires_grad or any(p.requires_grad for p in block.parameters())


def scale_by_excitation(x: torch.Tensor, excite, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``x * excite(mean_hw x)`` (SE, eqs. 2-4) with the backward of ``_ScaleByExcitation``;
    ``params``: every parameter ``excite`` uses."""
    return _ScaleByExcitation.apply(x, excite, *params)


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def _plain(x: torch.Tensor, s: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shortcut, x, s).relu_()  # relu(x * s + shortcut)


def scale_add_relu(attn: nn.Module, x: torch.Tensor, shortcut: torch.Tensor, *,
                   source: tuple[nn.BatchNorm2d, torch.Tensor] | None = None) -> torch.Tensor:
    """``relu(attn(x) + shortcut)`` for a scale-form block (``attn(x) == x * attn.gate(attn.logits(x))``).

    ``source=(bn, c)`` says ``x == bn(c)``: backward then keeps ``c`` (which ``bn`` keeps anyway)
    instead of ``shortcut`` - for units whose shortcut is computed (a downsample), not their input.
    """
    a = attn.logits(x)  # (B, C, 1, 1), the gate's input
    grad = torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or shortcut.requires_grad)
    if not grad or _tracing() or not isinstance(attn.gate, nn.Sigmoid):
        return _plain(x, attn.gate(a), shortcut)
    if source is None or not isinstance(source[0], nn.BatchNorm2d) or observed(source[0]):
        return _SigmoidScaleAddReLU.apply(x, a, shortcut)
    bn, c = source
    return _SigmoidScaleAddReLU.apply(x, a, shortcut, c, *bn_affine(bn, c))
