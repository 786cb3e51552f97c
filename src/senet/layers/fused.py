"""The fast path of SE (Hu et al., "Squeeze-and-Excitation Networks", arXiv 1709.01507).

The standard SE-ResNet unit (paper Fig. 5b) ends with

    y = relu(x * s + shortcut),   s = σ(a),  a = W2 δ(W1 z),  z = mean_{H,W} x      (eqs. 2-4)

Op by op (``x * s``, ``+ shortcut``, ``relu``) that is three passes over the activation, and autograd
keeps ``x`` (the BN output, for ds = Σ_hw g·x) on top of what the plain ResNet keeps; in backward the
squeeze's gradient dz / HW is a fourth full-size tensor added onto dL/dx. Here:

- the scale, the addition and the ReLU are one ``addcmul`` plus an in-place ``relu_``: the passes
  of the plain unit's ``relu(out + shortcut)``, written into BN's fresh output ``x`` when the unit
  ran its BN itself (below; BN's backward needs its input, not its output);
- backward keeps ``y`` (the next unit's input), z, s and ``c`` with ``x = bn(c) = A c + B`` - ``c`` is
  kept by BN anyway - never ``x``. On CPU the unit runs BN as ``native_batch_norm`` and takes A, B
  from the batch statistics BN computes anyway (``batch_norm_with_affine``):

      dL/da = s (1 - s) Σ_hw g_pre x = s (1 - s) (A Σ_hw g_pre c + B Σ_hw g_pre),   g_pre = g · [y > 0]

  with both sums in one pass through BatchNorm's backward reduction (``channel_sums``). Where the BN
  must be called as a module (hooks, subclasses, other devices), identity units keep ``shortcut``
  instead and use ``x s = y - shortcut`` where y > 0 (no division by s), and units after a downsample
  get A, B from inner reductions (``bn_affine``);
- backward recomputes the tiny FCs from z and writes dL/dx = g_pre s + dL/dz / HW in one pass.

Inference (eager, no autograd) writes into BN's output too and may squeeze through the last 1x1 conv
(``squeeze_through_conv``). See docs/performance.md for what each of these buys on a CPU.

The SE block alone (``SqueezeExcite.forward``) gets the recompute and the fused sums: it keeps x, z and s.

The fast path is the default in eager training on the devices in ``FUSED_TRAINING_DEVICES`` (the CPU; on
CUDA a step is bound by the host's time, and plain autograd ops cost it less: add "cuda" for the memory).
Inference takes the plain ``addcmul`` + ``relu_``;
``torch.compile`` traces, in training, BN's batch statistics and the squeeze from one per-(sample, channel)
``var_mean`` (``compiled_batch_stats_end``), elsewhere a variant without the recompute (the compiler fuses the
rest), and in inference squeezes before BN (``compiled_squeeze_before_bn``); ONNX, JIT and
FX tracing, ``torch.func`` transforms and forward-mode AD take plain ops. The unit calls its ``attn``
module as usual when forward hooks watch the modules the fast path skips (``senet analyze``/``prune``
install them), and within ``reference_path()`` (tests, benchmarks). Backward gives first derivatives only:
create_graph=True (second derivatives) raises, naming reference_path(), instead of being wrong.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad as _forward_ad
from torch.nn.modules import module as _module

_ENABLED = True
# Device types on which the unit runs its training BN as ``native_batch_norm`` for BN's affine map
# (``batch_norm_with_affine``) and BatchNorm's backward kernel gives the per-(sample, channel) sums of the
# backward (``channel_sums``). CPU: docs/performance.md; CUDA: measured on an H100 (docs/performance.md, "CUDA").
BN_KERNEL_DEVICES = ("cpu", "cuda")
# Device types on which eager training takes the memory-saving custom functions (``_ExciteScaleAddReLU``,
# ``_ScaleByExcitation``); elsewhere SE trains on plain autograd ops, as the reference path does. CUDA is not in it
# by default: a CUDA step is bound by the host's time at the batches measured, and those functions' backward (Python,
# and a nested autograd call for the FCs) cost the host ~0.9 ms a unit where plain ops cost less (H100, se_resnet50
# batch 16: 47.6 ms a step against 33.9). Their saving there is memory: peak -29% at batch 64, float32, at the
# same speed (docs/performance.md, "CUDA"). Add "cuda" to train in less memory.
FUSED_TRAINING_DEVICES = ("cpu",)


def trains_fused(t: torch.Tensor) -> bool:
    """Whether eager training on ``t``'s device takes the memory-saving functions: ``FUSED_TRAINING_DEVICES`` as
    it is at this call (a user may add "cuda")."""
    return t.device.type in FUSED_TRAINING_DEVICES


# None outside torch.func transforms (torch >= 2.0; on a torch without it, transforms are not detected)
_functorch_level = getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", lambda: None)


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
    """True when forward or backward hooks (global or on ``modules``) expect these modules to be called."""
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
            or _module._global_backward_pre_hooks):
        return True
    for m in modules:  # a loop, not any(generator): this runs several times per unit, per call
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return True
    return False


def can_fuse(attn: nn.Module, act: nn.Module) -> bool:
    """Whether ``relu(attn(x) + shortcut)`` may run as ``scale_add_relu``: a scale-form block exposing
    ``logits(x)``, ``pooled_logits(z)`` and ``gate``, a ReLU after the addition, nobody watching,
    the fast path enabled."""
    if not (_ENABLED and isinstance(act, nn.ReLU) and callable(getattr(attn, "pooled_logits", None))):
        return False
    gate = attn._modules.get("gate")  # not attn.gate: Module.__getattr__ costs ~0.9 us, per unit, per call
    return not observed(attn, act, attn.gate if gate is None else gate)


def _grad_a(g_pre: torch.Tensor, y: torch.Tensor, s: torch.Tensor, kept: list[torch.Tensor]) -> torch.Tensor:
    """dL/da, (B, C, 1, 1), from what backward kept: [shortcut] or [c, A, B] (see the module docstring)."""
    if len(kept) == 3:
        c, A, B = kept
        gc, gs = channel_sums(g_pre, c)  # Σ_hw g_pre c, Σ_hw g_pre
        gx = gc.mul_(A).add_(gs * B)  # Σ_hw g_pre x
        return gx.mul_(s * (1 - s))
    return channel_dot(g_pre, y, kept[0]).mul_(1 - s)


_DOUBLE_BACKWARD = ("senet's fused SE path has no second derivatives, and this backward was asked for them "
                    "(create_graph=True: a gradient penalty, double backward, Hessian-vector products); run the "
                    "forward inside `with senet.layers.fused.reference_path():`, where autograd gives them")


def _first_order_only(backward):
    """The custom functions' backward for first derivatives only: it raises ``_DOUBLE_BACKWARD`` when run
    with ``create_graph=True`` (autograd runs backward with grad mode on exactly then).

    Not torch's ``once_differentiable``: it links the gradients to an error node whose inputs are
    detached copies, so ``torch.autograd.grad(penalty, inputs=x)`` never reaches that node and silently
    drops the unit's second-order terms (a WGAN-GP-style penalty's gradient through se_resnet came out
    811 against autograd's 1.5e8, no error, before commit 88d0cce); and with SE the last op it returned
    the gradient as a constant."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD)
        return backward(ctx, *grads)
    return wrapper


def _autocast_state(t: torch.Tensor) -> tuple[str, bool, torch.dtype] | None:
    """(device type, enabled, dtype) of autocast for ``t``'s device as forward sees it; None for devices
    autocast does not know (``meta``, ...)."""
    device = t.device.type
    try:
        return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    except (RuntimeError, AttributeError):
        return None


def _recompute_grads(fn, z: torch.Tensor, params: list[torch.Tensor], grad: torch.Tensor,
                     amp: tuple[str, bool, torch.dtype] | None) -> list:
    """[dL/dz, dL/dp for p in params (None where p needs none)] of ``fn(z)`` given dL/d fn(z) = ``grad``.

    ``fn`` runs again under the autocast state forward ran it under (``amp``, from ``_autocast_state``):
    backward usually runs outside ``torch.autocast``, and ``F.linear`` on forward's half-precision ``z``
    with float32 weights would fail there (it did, before commit f752f4e, for every mixed-precision step)."""
    amp_ctx = torch.autocast(amp[0], dtype=amp[2], enabled=amp[1]) if amp is not None else contextlib.nullcontext()
    with torch.enable_grad(), amp_ctx:
        z_ = z.detach().requires_grad_()
        out = fn(z_)
        wanted = [z_, *(p for p in params if p.requires_grad)]
        got = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
    return [next(got), *(next(got) if p.requires_grad else None for p in params)]


class _ExciteScaleAddReLU(torch.autograd.Function):
    """y = relu(x * σ(fc(mean_hw x)) + shortcut) in eager mode: keeps y, z, s and [shortcut] or [c, A, B];
    backward recomputes ``fc`` (the FCs) and folds the squeeze's gradient into dL/dx.

    Shapes: x, shortcut, c (B, C, H, W); z, s (B, C, 1, 1); A, B (1, C, 1, 1).
    """

    @staticmethod
    def forward(ctx, x, shortcut, c, A, B, fc, inplace, *params):
        z = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1), eq. 2
        s = torch.sigmoid(fc(z))  # eq. 3
        # eq. 4 + addition + ReLU: one pass, in-place ReLU; with ``inplace`` into x (BN's fresh output,
        # which nothing keeps: BN's backward needs its input)
        if inplace:
            y = torch.addcmul(shortcut, x, s, out=x).relu_()
            ctx.mark_dirty(x)
        else:
            y = torch.addcmul(shortcut, x, s).relu_()
        ctx.fc, ctx.hw, ctx.kept, ctx.amp = fc, x.shape[2] * x.shape[3], 1 if c is None else 3, _autocast_state(x)
        ctx.save_for_backward(y, z, s, *((shortcut,) if c is None else (c, A, B)), *params)
        return y

    @staticmethod
    @_first_order_only  # the backward keeps no graph: double backward raises, never lies
    def backward(ctx, g):
        y, z, s, *rest = ctx.saved_tensors
        kept, params = rest[:ctx.kept], rest[ctx.kept:]
        g_pre = torch.ops.aten.threshold_backward(g, y, 0)  # g · [y > 0], as ReLU's backward
        dz, *dparams = _recompute_grads(ctx.fc, z, params, _grad_a(g_pre, y, s, kept), ctx.amp)
        grad_x = scale_shift(g_pre, s, dz / ctx.hw)  # g_pre s + dz / HW: one pass
        return grad_x, g_pre, None, None, None, None, None, *dparams


class _SigmoidScaleAddReLU(torch.autograd.Function):
    """y = relu(x * σ(a) + shortcut) for ``torch.compile`` (traceable: no recompute); keeps y, s and
    [shortcut] or [c, A, B]. Shapes: x, shortcut, c (B, C, H, W); a (B, C, 1, 1); A, B (1, C, 1, 1)."""

    @staticmethod
    def forward(ctx, x, a, shortcut, c=None, A=None, B=None):
        s = torch.sigmoid(a)  # (B, C, 1, 1)
        y = torch.addcmul(shortcut, x, s).relu_()
        ctx.save_for_backward(y, s, *((shortcut,) if c is None else (c, A, B)))
        return y

    @staticmethod
    @_first_order_only
    def backward(ctx, g):
        y, s, *kept = ctx.saved_tensors
        g_pre = torch.ops.aten.threshold_backward(g, y, 0)
        return g_pre * s, _grad_a(g_pre, y, s, kept), g_pre, None, None, None


@torch.no_grad()
def bn_affine(bn: nn.BatchNorm2d, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), each (1, C, 1, 1), with ``bn(c) == A * c + B`` for this very call: batch statistics
    (biased variance) in training or without running statistics, else the running ones."""
    if bn.training or bn.running_mean is None:
        # Σ c and Σ c² per (b, c) over H, W (fast inner reductions; var_mean over (0, 2, 3) is ~40x
        # slower on CPU), combined over the batch in float64
        n = c.shape[0] * c.shape[2] * c.shape[3]
        mean = c.sum((2, 3)).double().sum(0) / n  # (C,)
        var = (_sum_squares(c).double().sum(0) / n - mean.square()).clamp_min(0)
    else:
        var, mean = bn.running_var.double(), bn.running_mean.double()
    return _affine_map(bn, mean, torch.rsqrt(var + bn.eps), c.dtype)


@torch.no_grad()
def _affine_map(bn: nn.BatchNorm2d, mean: torch.Tensor, invstd: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), each (1, C, 1, 1): ``bn``'s normalisation with ``mean`` and ``invstd`` (C,) as ``A c + B``."""
    A = invstd if bn.weight is None else invstd * bn.weight
    B = -mean * A if bn.bias is None else bn.bias - mean * A
    return A.view(1, -1, 1, 1).to(dtype), B.view(1, -1, 1, 1).to(dtype)


def batch_norm_with_affine(bn: nn.Module, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(bn(c), A, B)`` with ``bn(c) == A c + B`` for this very call, without another pass over ``c``:
    in training (CPU) from the batch statistics ``native_batch_norm`` computes anyway (``nn.BatchNorm2d``'s
    forward written out: momentum, ``num_batches_tracked``), in eval mode from the running ones. None
    where it cannot: not a plain ``nn.BatchNorm2d``, hooked, other devices or autocast in training."""
    if type(bn) is not nn.BatchNorm2d or observed(bn) or c.dim() != 4 or c.numel() == 0:
        return None  # an empty batch too: the module handles it (an empty output)
    if not bn.training and bn.running_mean is not None:
        return bn(c), *bn_affine(bn, c)
    if (c.device.type not in BN_KERNEL_DEVICES or torch.is_autocast_enabled(c.device.type)
            or c.shape[1] != bn.num_features):
        return None
    _batch_values(c)
    factor = _count_batch(bn) if bn.training and bn.track_running_stats else 0.0
    out, mean, invstd = torch.native_batch_norm(c, bn.weight, bn.bias, bn.running_mean, bn.running_var, True,
                                                factor, bn.eps)
    return out, *_affine_map(bn, mean, invstd, c.dtype)


def _sum_squares(c: torch.Tensor) -> torch.Tensor:
    """Σ_hw c² per (b, c), (B, C). vector_norm is fast on NCHW but ~25x slower on channels_last, where
    the sample-buffered product is used instead."""
    if c.is_contiguous():
        return torch.linalg.vector_norm(c, dim=(2, 3)).square()
    return channel_dot(c, c).flatten(1)


def _bn_kernels_fit(*tensors: torch.Tensor, devices: tuple[str, ...] = ("cpu",)) -> bool:
    """Whether BatchNorm's kernels may stand in for per-(b, c) ops on ``tensors`` (``channel_sums``,
    ``scale_shift``): eager, on one of ``devices``, all float32 or all float64, none empty (on an empty batch,
    viewed as zero channels, BatchNorm's CPU backward kernel divides by zero: SIGFPE, the process dies)."""
    dtype, device = tensors[0].dtype, tensors[0].device
    return (not torch.compiler.is_compiling() and dtype in (torch.float32, torch.float64)
            and device.type in devices
            and all(t.device == device and t.dtype == dtype and t.numel() > 0 for t in tensors))


def scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` with ``scale``, ``shift`` (B, C, 1, 1): a fresh (B, C, H, W) tensor in one pass.

    The backward's ``dL/dx = g s + dL/dz / HW``. On an NCHW tensor ATen's ``addcmul`` with two operands
    broadcast over H, W leaves its vectorised loop: 2.5-4x the time of a copy at ResNet-50's SE sizes
    (CPU, batch 16). BatchNorm's inference kernel computes exactly ``x * weight + bias`` per channel when
    mean is 0, variance 1 and eps 0, vectorised along H, W: on ``x`` viewed as one sample of B*C
    channels it is one call at copy speed, bit for bit the same values here. channels_last tensors
    (broadcast along the contiguous C: vectorised anyway), other devices (CUDA's addcmul broadcasts at copy
    speed), dtypes and compiled code: addcmul.
    """
    if not (_bn_kernels_fit(x, scale, shift) and x.dim() == 4 and x.is_contiguous()):
        return torch.addcmul(shift, x, scale)
    B, C, H, W = x.shape
    n = B * C
    out, _, _ = torch.native_batch_norm(x.view(1, n, H, W), scale.reshape(n), shift.reshape(n), x.new_zeros(n),
                                        x.new_ones(n), False, 0.0, 0.0)
    return out.view(B, C, H, W)


def channel_sums(g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_hw g x, Σ_hw g) for every (b, c), each (B, C, 1, 1), in one pass over ``g`` and ``x``.

    ATen has no op that reduces a product without writing it, but BatchNorm's backward computes
    exactly these two sums per channel, fused: with mean 0 and inverse deviation 1 its weight and bias
    gradients are Σ g x and Σ g. NCHW tensors are viewed as one sample of B*C channels (one call);
    channels_last ones go sample by sample on the CPU. About 3x faster than ``channel_dot`` + ``sum`` here
    (CPU float32, ResNet-50's SE activations). On CUDA (``BN_KERNEL_DEVICES``) NCHW tensors take the same one
    call. Elsewhere (other devices/dtypes, channels_last on CUDA, compiled): those two.
    """
    if not _bn_kernels_fit(g, x, devices=BN_KERNEL_DEVICES) or g.shape != x.shape:
        return channel_dot(g, x), g.sum((2, 3), keepdim=True)
    B, C, H, W = g.shape
    mask = [False, True, True]
    if g.is_contiguous() and x.is_contiguous():
        n = B * C
        zeros, ones = g.new_zeros(n), g.new_ones(n)  # weight: CUDA's kernel shapes the weight's gradient like it
        _, gx, gs = torch.ops.aten.native_batch_norm_backward(g.view(1, n, H, W), x.view(1, n, H, W), ones, None,
                                                              None, zeros, ones, True, 0.0, mask)
        return gx.view(B, C, 1, 1), gs.view(B, C, 1, 1)
    cl = torch.channels_last
    if g.device.type != "cpu" or not (g.is_contiguous(memory_format=cl) and x.is_contiguous(memory_format=cl)):
        return channel_dot(g, x), g.sum((2, 3), keepdim=True)
    gx, gs = g.new_empty(B, C, 1, 1), g.new_empty(B, C, 1, 1)
    zeros, ones = g.new_zeros(C), g.new_ones(C)
    for b in range(B):
        _, gx_b, gs_b = torch.ops.aten.native_batch_norm_backward(g[b:b + 1], x[b:b + 1], None, None, None, zeros,
                                                                  ones, True, 0.0, mask)
        gx[b, :, 0, 0], gs[b, :, 0, 0] = gx_b, gs_b
    return gx, gs


def channel_dot(g: torch.Tensor, x: torch.Tensor, minus: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_hw g (x - minus) for every (b, c), as (B, C, 1, 1). On the CPU the product goes through one
    sample-sized buffer (cache-resident, allocated once) instead of a fresh full-size temporary. Elsewhere
    the plain expression: on CUDA a loop over samples is two launches each (compiled: the compiler fuses it)."""
    if torch.compiler.is_compiling() or g.shape[0] == 0 or g.device.type != "cpu":
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
        ctx.excite, ctx.amp = excite, _autocast_state(x)
        ctx.save_for_backward(x, z, s, *params)
        return x * s  # eq. 4

    @staticmethod
    @_first_order_only  # the backward keeps no graph: double backward raises, never lies
    def backward(ctx, g):
        x, z, s, *params = ctx.saved_tensors
        dz, *dparams = _recompute_grads(ctx.excite, z, params, channel_sums(g, x)[0], ctx.amp)  # dL/ds = Σ_hw g x
        grad_x = scale_shift(g, s, dz / (x.shape[2] * x.shape[3]))  # g s + dz / HW, (B, C, H, W)
        return grad_x, None, *dparams


def can_recompute(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``block(x)`` may run as ``scale_by_excitation``: grad needed, eager mode, fast path
    enabled, nobody hooked on the block's sub-modules (their forward runs again in backward)."""
    if not (_ENABLED and torch.is_grad_enabled()) or _plain_ops_only() or torch.compiler.is_compiling():
        return False
    if not trains_fused(x) or observed(block, *block.modules()):
        return False
    return x.requires_grad or any(p.requires_grad for p in block.parameters())


def scale_by_excitation(x: torch.Tensor, excite, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``x * excite(mean_hw x)`` (SE, eqs. 2-4) with the backward of ``_ScaleByExcitation``;
    ``params``: every parameter ``excite`` uses."""
    return _ScaleByExcitation.apply(x, excite, *params)


def _onnx_export_flag():
    """A cheap ``torch.onnx.is_in_onnx_export``: the public function imports two modules on every call
    (~2.5 us, several times per residual unit); read the same two flags directly where this torch has
    them, else call it."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:  # another torch layout: the public function, whatever it costs
        return torch.onnx.is_in_onnx_export
    if not (hasattr(_flags, "_is_onnx_exporting") and hasattr(GLOBALS, "in_onnx_export")):
        return torch.onnx.is_in_onnx_export
    return lambda: GLOBALS.in_onnx_export or _flags._is_onnx_exporting


_in_onnx_export = _onnx_export_flag()


def _transformed() -> bool:
    """Inside a ``torch.func`` transform (grad, vmap, jvp, jacrev, ...) or a forward-mode AD dual level.

    The custom autograd functions here have no ``setup_context``, vmap rule or ``jvp``, and ``out=``
    writes have no batching rule: under these the units must run their plain ops (which support them).
    Two cheap reads (~0.1 us): this runs several times per unit, per call."""
    return _functorch_level() is not None or _forward_ad._current_level >= 0


def _fx_flag():
    """A cheap ``torch.fx`` symbolic-tracing check (``symbolic_trace``, torchvision's
    ``create_feature_extractor``, FX quantization): the flag ``is_fx_symbolic_tracing`` reads, where this
    torch has it (~0.06 us against ~0.5 us), else that function, else never."""
    from torch.fx import _symbolic_trace

    tls = getattr(_symbolic_trace, "_is_fx_tracing_tls", None)
    if tls is not None:
        return lambda: getattr(tls, "flag", False)
    return getattr(_symbolic_trace, "is_fx_symbolic_tracing", lambda: False)


_fx_tracing = _fx_flag()


def _plain_ops_only() -> bool:
    """Traced (JIT, ONNX, FX), exported or transformed (``_transformed``): only plain ops will do."""
    if torch.compiler.is_compiling():  # dynamo folds the public checks; it refuses to trace the flags
        return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()
    return (torch.jit.is_tracing() or _in_onnx_export() or torch.compiler.is_exporting() or _transformed()
            or _fx_tracing())


def eager() -> bool:
    """Plain eager execution: not traced, exported, compiled or transformed."""
    return not (_plain_ops_only() or torch.compiler.is_compiling())


def fresh_output(bn: nn.Module) -> bool:
    """Whether ``bn``'s output is a fresh tensor a unit may write its result into: a plain BatchNorm2d
    (its backward needs its input, not its output) nobody hooks, eager, fast path enabled."""
    return _ENABLED and eager() and isinstance(bn, nn.BatchNorm2d) and not observed(bn)


def inference() -> bool:
    """Eager, fast path enabled, no autograd: units may write into their own fresh tensors."""
    return _ENABLED and not torch.is_grad_enabled() and eager()


def compiled_inference() -> bool:
    """``torch.compile`` tracing without autograd (not an export, which keeps plain ops), fast path enabled."""
    return not torch.is_grad_enabled() and compiled()


def compiled_squeeze_before_bn(attn: nn.Module, bn: nn.Module, c: torch.Tensor, shortcut: torch.Tensor,
                               act: nn.Module, conv_in: tuple[nn.Module, torch.Tensor] | None = None
                               ) -> torch.Tensor | None:
    """``act(attn(bn(c)) + shortcut)`` for a compiler, or None where it does not apply.

    With running statistics BN is affine per channel, so ``mean_hw bn(c) = bn(mean_hw c)``: the squeeze
    reads ``c`` and ``bn(c)`` is needed only inside the scale's pass, which inductor then fuses with BN,
    the addition and the ReLU. Written as ``x = bn(c)``, then ``mean_hw x`` and ``x * s``, it writes ``x``
    and reads it twice (se_resnet50, batch 1, compiled: 0.968 [0.948, 0.993] of that time; with
    inductor's freezing, which folds BN into the conv anyway, no change; docs/performance.md).
    ``conv_in=(conv, h)``: ``c == conv(h)``; the squeeze then reads ``h`` and the conv's weight instead of
    ``c`` wherever that is ``COMPILED_SQUEEZE_THROUGH_CONV_MIN_SAVING`` elements fewer (``squeeze_through_conv``).
    """
    if not (type(bn) is nn.BatchNorm2d and not bn.training and bn.running_mean is not None and c.dim() == 4
            and getattr(attn, "pool", "avg") == "avg" and not observed(bn)):
        return None
    z = None
    if conv_in is not None:
        z = squeeze_through_conv(*conv_in, bn, c, min_saving=COMPILED_SQUEEZE_THROUGH_CONV_MIN_SAVING)
    if z is None:
        z = _bn_on_pooled(bn, c.mean((2, 3), keepdim=True))
    return act(bn(c) * attn.gate(attn.pooled_logits(z)) + shortcut)


def compiled(batch_norm: nn.Module | None = None) -> bool:
    """``torch.compile`` tracing (not an export, which keeps plain ops), fast path enabled; with ``batch_norm``,
    also that it is a plain ``nn.BatchNorm2d`` nobody hooks (a hook may change its output)."""
    if not (_ENABLED and torch.compiler.is_compiling()) or _plain_ops_only():
        return False
    return batch_norm is None or (type(batch_norm) is nn.BatchNorm2d and not observed(batch_norm))


def compiled_batch_stats_end(attn: nn.Module, bn: nn.BatchNorm2d, c: torch.Tensor,
                             shortcut: torch.Tensor) -> torch.Tensor | None:
    """``relu(attn(bn(c)) + shortcut)`` for a compiler where BN normalises with the batch's statistics (training),
    or None where it does not apply. The caller has checked ``compiled(bn)`` and that ``attn`` is a fused SE block.

    BN's statistics are combined from per-(sample, channel) ones: ``var_mean`` over H, W gives each sample's
    channel means ``m`` and variances ``v``, and over the batch ``mean = mean_b m``, ``var = mean_b v + mean_b
    (m - mean)²`` (exact, and as stable as a two-pass variance). The squeeze needs exactly ``m``: with
    ``bn(c) = (c - mean) A + B``, ``z = (m - mean) A + B``. The forward then reads ``c`` twice, as BN alone does,
    and autograd's backward needs only per-(sample, channel) sums of ``g`` and ``g (c - mean)``: the compiler
    makes it one reduction pass and one elementwise pass, as for the plain unit. Written as ``bn(c)``,
    ``mean_hw x`` and ``x * s``, the squeeze and its gradient cost a pass each (se_resnet50 compiled, one thread,
    batch-8 training step: 0.97 of that time; docs/performance.md, item 18). ``c`` is centred before it is
    scaled, as BN does (``c A + B`` loses float32 digits where a channel's mean is far from zero). Running
    statistics are updated as ``nn.BatchNorm2d`` does.
    """
    if (c.dim() != 4 or c.shape[1] != bn.num_features or getattr(attn, "pool", "avg") != "avg"
            or c.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled(c.device.type)):
        return None
    if not (bn.training or bn.running_mean is None):
        return None  # running statistics: compiled_squeeze_before_bn's case
    n = _batch_values(c)
    v, m = torch.var_mean(c, (2, 3), correction=0, keepdim=True)  # (B, C, 1, 1) each, one pass over c
    mean = m.mean(0, keepdim=True)
    var = v.mean(0, keepdim=True) + (m - mean).square().mean(0, keepdim=True)  # (1, C, 1, 1), biased
    A = torch.rsqrt(var + bn.eps)  # bn(c) = (c - mean) A + B, centred first as BN does: no cancellation
    if bn.weight is not None:
        A = A * bn.weight.view(1, -1, 1, 1)
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        _update_running_stats(bn, mean.view(-1), var.view(-1), n)
    if bn.bias is None:
        s = attn.gate(attn.pooled_logits((m - mean) * A))  # z = mean_hw bn(c)
        return _CentredScaleAddReLU.apply(c, mean, s * A, None, shortcut)
    B = bn.bias.view(1, -1, 1, 1)
    s = attn.gate(attn.pooled_logits((m - mean) * A + B))
    return _CentredScaleAddReLU.apply(c, mean, s * A, s * B, shortcut)


class _CentredScaleAddReLU(torch.autograd.Function):
    """y = relu((c - mean) k + b + shortcut) for a compiler, keeping ``c`` (which BN's backward keeps anyway) and
    ``y``: written as plain ops, autograd keeps ``c - mean`` for ``dL/dk``, and inductor then writes that whole
    tensor in forward (se_resnet50 compiled: +26.6% activation memory, a slower step). Shapes: c, shortcut
    (B, C, H, W); mean (1, C, 1, 1); k, b (B, C, 1, 1) or b None."""

    @staticmethod
    def forward(ctx, c, mean, k, b, shortcut):
        y = torch.relu((c - mean) * k + (shortcut if b is None else b + shortcut))
        ctx.has_b = b is not None
        ctx.save_for_backward(c, mean, k, y)
        return y

    @staticmethod
    @_first_order_only
    def backward(ctx, g):
        c, mean, k, y = ctx.saved_tensors
        g_pre = torch.ops.aten.threshold_backward(g, y, 0)
        db = g_pre.sum((2, 3), keepdim=True)  # (B, C, 1, 1)
        # c - mean again, but not as forward's op: the same op would be merged with forward's (CSE) and kept,
        # a whole tensor (test_compiled_training_keeps_what_the_plain_unit_keeps)
        dk = (g_pre * torch.add(c, mean, alpha=-1)).sum((2, 3), keepdim=True)
        dmean = -(db * k).sum(0, keepdim=True)
        return g_pre * k, dmean, dk, db if ctx.has_b else None, g_pre


def _batch_values(c: torch.Tensor) -> int:
    """How many values per channel BN's batch statistics are taken over; for one, ``F.batch_norm``'s own error
    (same words)."""
    n = c.numel() // c.shape[1]
    if n == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {c.size()}")
    return n


@torch.no_grad()
def _count_batch(bn: nn.BatchNorm2d, dtype: torch.dtype | None = None) -> float | torch.Tensor:
    """What ``nn.BatchNorm2d``'s training forward does before it normalises: ``num_batches_tracked`` + 1, and the
    factor of the running statistics' update, the momentum or, when that is None, the cumulative average's
    1 / batches (with ``dtype``: a tensor of it, not a ``float()`` of a value a compiler traces)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            tracked = bn.num_batches_tracked
            factor = 1.0 / (float(tracked) if dtype is None else tracked.to(dtype))
    return factor


@torch.no_grad()
def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """``nn.BatchNorm2d``'s training update (``_count_batch``) from the batch's ``mean`` and biased ``var`` (C,)
    over ``n`` values per channel, the running variance unbiased."""
    factor = _count_batch(bn, mean.dtype)
    bn.running_mean.mul_(1 - factor).add_(mean.detach() * factor)
    bn.running_var.mul_(1 - factor).add_(var.detach() * (n / (n - 1)) * factor)


def _bn_on_pooled(bn: nn.BatchNorm2d, pooled: torch.Tensor) -> torch.Tensor:
    """``bn`` with its running statistics on a pooled (B, C, 1, 1) vector: eval-mode BN is affine per channel,
    so ``bn(mean_hw c) == mean_hw bn(c)``. One call instead of building BN's affine map (a dozen small ops)."""
    return torch.batch_norm(pooled, bn.weight, bn.bias, bn.running_mean, bn.running_var, False, 0.0, bn.eps, False)


# The squeeze goes through the last 1x1 conv when that reads at least this many fewer elements (1 MiB
# of float32); below it the few extra tiny ops cost about what the smaller read saves.
SQUEEZE_THROUGH_CONV_MIN_SAVING = 2**18
# The same under torch.compile, where the extra ops cost no calls of their own (inductor fuses the mean and
# runs the product as one GEMM): se_resnet50 compiled, one thread, against squeezing c (scratch A/B, medians
# of per-round ratios): batch 8 0.963 [0.943, 0.983] (12 rounds, 2^18) and 0.991 [0.956, 0.996] (30 rounds,
# 2^15); batch 1 0.999 [0.980, 1.004] (60 rounds, 2^15); docs/performance.md.
COMPILED_SQUEEZE_THROUGH_CONV_MIN_SAVING = 2**15


def plain_pointwise_conv(conv: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` 1x1, stride 1, no padding, one group, nobody hooking it (a hook may change its
    output): then ``mean_hw conv(h) = W mean_hw h + b``, the squeeze may read ``h`` instead of its output."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding in ((0, 0), "valid") and conv.groups == 1 and not observed(conv))


def squeeze_through_conv(conv: nn.Module, h: torch.Tensor, bn: nn.Module, x: torch.Tensor,
                         min_saving: int | None = None) -> torch.Tensor | None:
    """mean_hw x for ``x = bn(conv(h))``, computed from ``h`` in inference, or None where that does not pay.

    For a 1x1 conv (stride 1, no padding, one group) and BN with running statistics (eval mode), neither hooked,
    ``mean_hw bn(conv(h)) = A (W mean_hw h + b) + B``: it reads ``h`` (ResNet bottleneck: C/4 channels,
    ResNeXt 32x4d: C/2) and ``W`` instead of ``x`` - used when that is at least
    ``min_saving`` (default ``SQUEEZE_THROUGH_CONV_MIN_SAVING``) elements fewer. Exact up to float rounding.
    Returns (B, C, 1, 1).
    """
    if min_saving is None:
        min_saving = SQUEEZE_THROUGH_CONV_MIN_SAVING
    saving = x.numel() - h.numel()  # first: where it declines (most units at batch 1) it costs ~nothing
    if saving < min_saving or type(conv) is not nn.Conv2d or h.dim() != 4:
        return None
    weight = conv.weight
    if saving - weight.numel() < min_saving or not plain_pointwise_conv(conv):
        return None
    if not (isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.running_mean is not None):
        return None
    if observed(bn):  # a hook may have changed its output: x need not be bn(conv(h))
        return None
    mean_c = F.linear(h.mean((2, 3)), weight.flatten(1), conv.bias)  # mean_hw conv(h), (B, C)
    return _bn_on_pooled(bn, mean_c.view(*mean_c.shape, 1, 1))


def infer_scale_add_relu(attn: nn.Module, x: torch.Tensor, shortcut: torch.Tensor, *,
                         z: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
    """``relu(attn(x) + shortcut)`` in inference: one ``addcmul`` + ``relu_``, written into ``x`` itself
    when ``inplace`` (``x`` is a fresh tensor nobody else holds, as the plain ResNet's ``out += identity``);
    ``z``: the pooled ``mean_hw x`` (B, C, 1, 1) when already known (``squeeze_through_conv``)."""
    infer = getattr(attn, "infer_excitation", None)
    if infer is not None:
        s = infer(x, z)
    else:
        s = attn.gate(attn.logits(x) if z is None else attn.pooled_logits(z))
    if inplace:
        return torch.addcmul(shortcut, x, s, out=x).relu_()
    return _plain(x, s, shortcut)


def _plain(x: torch.Tensor, s: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shortcut, x, s).relu_()  # relu(x * s + shortcut)


def scale_add_relu(attn: nn.Module, x: torch.Tensor, shortcut: torch.Tensor, *,
                   source: tuple[nn.BatchNorm2d, torch.Tensor] | None = None,
                   affine: tuple[torch.Tensor, torch.Tensor] | None = None, inplace: bool = False) -> torch.Tensor:
    """``relu(attn(x) + shortcut)`` for a scale-form block (``attn(x) == x * attn.gate(attn.logits(x))``).

    ``source=(bn, c)`` says ``x == bn(c)``: backward then keeps ``c`` (which ``bn`` keeps anyway)
    instead of ``shortcut`` - for units whose shortcut is computed (a downsample), not their input.
    ``affine=(A, B)``: ``x == A c + B`` is already known (``batch_norm_with_affine``); else ``bn_affine``.
    ``inplace``: ``x`` is a fresh tensor that nothing else holds or saves: the result may go into it.
    """
    if _plain_ops_only() or not isinstance(attn.gate, nn.Sigmoid) or getattr(attn, "pool", "avg") != "avg":
        return _plain(x, attn.gate(attn.logits(x)), shortcut)
    params = tuple(attn.parameters()) if torch.is_grad_enabled() else ()
    compiling = torch.compiler.is_compiling()
    needs_grad = params and (x.requires_grad or shortcut.requires_grad or any(p.requires_grad for p in params))
    if not (needs_grad and (compiling or trains_fused(x))):  # before anything to keep is computed
        return _plain(x, attn.gate(attn.logits(x)), shortcut)
    keep = (None, None, None)
    if source is not None and affine is not None:
        keep = (source[1], *affine)
    elif source is not None and isinstance(source[0], nn.BatchNorm2d) and not observed(source[0]):
        keep = (source[1], *bn_affine(*source))
    if compiling or observed(*attn.modules()):  # no recompute: traceable, hooks fire once
        return _SigmoidScaleAddReLU.apply(x, attn.logits(x), shortcut, *keep)
    return _ExciteScaleAddReLU.apply(x, shortcut, *keep, attn.pooled_logits, inplace, *params)
