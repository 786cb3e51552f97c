"""Frozen CPU inference for senet's ResNet family: the fast path's checks made once, at freeze time.

In eager inference every residual unit end checks, on every call, that its native kernel applies: the modules'
types and hooks, BN's mode, each weight's dtype, layout and size (``senet.layers.native``). Alone these checks
take microseconds, but inside a network at batch 1 the convolutions between two unit ends push the objects they
read out of the caches, and timed there (se_resnet50, batch 1, one thread) the 16 SE unit ends spent ~1.4 ms a
forward in Python against ~0.8 ms for resnet50's plain ends (docs/performance.md, item 20). Frozen,
se_resnet50's SE costs +0.6% [-0.4, +1.5] over resnet50 at batch 1 (40 processes, AMD EPYC; section "The means'
handle"), and the CIFAR ResNets, whose units do little work a call, run 20-24% faster at batch 1 (section "Frozen
inference again").

:func:`freeze` returns a snapshot of the model that runs each unit from a plan made once: its convolutions
through ``F.conv2d`` with their arguments kept, its BN + ReLU passes and its unit end (SE or plain) as the
same native kernels with the weights' addresses kept. The outputs are bit for bit the eager model's (same
kernels, same arguments, same decisions), and only the activations are checked per call. This is the contract
of inductor's and TorchScript's freezing: the snapshot does not follow later changes made inside it (hooks
registered on its modules, modules or parameters replaced, ``.data`` reassigned). Changes made through the
frozen model itself are followed: ``.to()``/``.float()``/``.double()`` and the like plan it again,
``load_state_dict`` copies into the tensors the plans read, ``train()`` and autograd, tracing, compiling,
exporting, global hooks, other dtypes, devices or layouts all run the snapshot's own eager forward.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from senet.layers import fused, native

from .cifar import CifarResNet, ShortcutA
from .resnet import BasicBlock, Bottleneck, ResNet

_F32 = torch.float32


def _alias(t: torch.Tensor | None) -> torch.Tensor | None:
    """A tensor sharing ``t``'s storage: keeps the memory a plan points to alive whatever happens to ``t``."""
    return None if t is None else t.detach()


def _conv_args(conv: nn.Module) -> tuple | None:
    """``F.conv2d``'s arguments after the input for a plain, unhooked, zero-padded ``nn.Conv2d`` with NCHW float32
    weights (its forward is exactly that call), or None."""
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or fused.observed(conv):
        return None
    w, b = conv._parameters["weight"], conv._parameters.get("bias")
    if w is None or not native._float_params((w,), w.numel()) or not native._float_params((b,), w.shape[0]):
        return None
    return _alias(w), _alias(b), conv.stride, conv.padding, conv.dilation, conv.groups


def _bn_args(bn: nn.Module, channels: int) -> tuple | None:
    """The native kernels' BN arguments (running mean, running variance, weight, bias addresses, eps) for an
    unhooked eval-mode ``nn.BatchNorm2d`` over ``channels`` (``native._bn_tensors``), with the tensors kept."""
    if fused.observed(bn) or (ts := native._bn_tensors(bn, channels)) is None:
        return None
    w, b, rm, rv = (_alias(t) for t in ts)
    return (rm.data_ptr(), rv.data_ptr(), native._ptr(w), native._ptr(b), bn.eps), (w, b, rm, rv)


def _downsample(down: nn.Module, channels: int) -> tuple | None:
    """("identity",) for ``nn.Identity``; ("module", forward) for ``ShortcutA`` (CIFAR; no parameters, its own
    forward); ("conv_bn", conv args, BN tensors, eps) for ``nn.Sequential(conv, bn)`` run as its modules would
    (``F.conv2d``, then ``F.batch_norm`` on running statistics); else None."""
    if type(down) is nn.Identity and not fused.observed(down):
        return ("identity",)
    if type(down) is ShortcutA and not fused.observed(down):
        return "module", down.forward
    if type(down) is not nn.Sequential or len(down) != 2 or fused.observed(down):
        return None
    conv, bn = down[0], down[1]
    conv_args, bn_args = _conv_args(conv), _bn_args(bn, channels)
    if conv_args is None or bn_args is None:
        return None
    w, b, rm, rv = bn_args[1]
    return "conv_bn", conv_args, (rm, rv, w, b), bn.eps


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the kernels read it (a convolution may hand back another layout); the same values."""
    return t if t.is_contiguous() else t.contiguous()


class _UnitPlan:
    """One residual unit (``Bottleneck`` or ``BasicBlock``) with SE at ``standard`` or no attention, run as its
    eager inference runs it (``Bottleneck.forward``, ``AttnUnit._merge``, ``native``), minus the checks."""

    def __init__(self, convs: list[tuple], bns: list[tuple], down: tuple, se: tuple | None, through: tuple | None,
                 lib, keep: list):
        self.convs, self.bns, self.down, self.se, self.through, self.lib = convs, bns, down, se, through, lib
        self.keep = keep  # the tensors whose addresses the plan holds (aliases: the memory stays valid)
        self.squeeze_mean = se is not None and len(convs) == 3  # Bottleneck: the 3x3's pass gives mean_hw h

    @classmethod
    def build(cls, unit: nn.Module, lib) -> _UnitPlan | None:
        """The plan of ``unit``, or None where its eager forward must run (another attention or placement, hooks,
        other module types, weights that are not float32 NCHW on the CPU)."""
        if type(unit) not in (Bottleneck, BasicBlock) or unit.attn_placement != "standard" or fused.observed(unit):
            return None
        act, attn = unit._modules["act"], unit._modules["attn"]
        if type(act) is not nn.ReLU or fused.observed(act):
            return None
        names = ("1", "2", "3") if type(unit) is Bottleneck else ("1", "2")
        mods = unit._modules
        convs = [_conv_args(mods["conv" + k]) for k in names]
        bns = [_bn_args(mods["bn" + k], mods["conv" + k].out_channels) for k in names]
        if any(a is None for a in convs) or any(a is None for a in bns):
            return None
        out_channels = mods["conv" + names[-1]].out_channels
        down = _downsample(mods["downsample"], out_channels)
        if down is None:
            return None
        keep = [t for a in convs for t in a[:2]] + [t for a in bns for t in a[1]]
        se = through = None
        if type(attn) is nn.Identity:
            if fused.observed(attn):
                return None
        elif fused.can_fuse(attn, act) and (weights := native._se_weights(attn, out_channels)) is not None:
            w1, b1, w2, b2 = (_alias(t) for t in weights)
            keep += [w1, b1, w2, b2]
            se = (w1.data_ptr(), native._ptr(b1), w2.data_ptr(), native._ptr(b2), w1.shape[0])
            last = mods["conv" + names[-1]]
            if fused.plain_pointwise_conv(last):  # the squeeze may read conv3's input (native._through_conv)
                w3, b3 = convs[-1][0], convs[-1][1]
                through = (w3.data_ptr(), native._ptr(b3), w3.numel(), w3.shape[1])
        else:
            return None
        return cls(convs, [a[0] for a in bns], down, se, through, lib, keep)

    def _bn_relu(self, c: torch.Tensor, bn: tuple, nt: int, mean: bool) -> native.Means | None:
        """``relu(bn(c))`` into ``c`` (``native.bn_relu``, in place), returning mean_hw of it (B, C) if asked."""
        n, ch, h, w = c.shape
        tmp, hm = native.bn_relu_scratch(c, n, ch, mean)  # the means as a handle, no tensor view: native.Means
        rm, rv, bw, bb, eps = bn
        self.lib.senet_bn_relu(c.data_ptr(), c.data_ptr(), rm, rv, bw, bb, eps, n, ch, h * w,
                               native._ptr(hm), tmp.data_ptr(), nt)
        return hm

    def __call__(self, x: torch.Tensor, nt: int) -> torch.Tensor:
        convs, bns = self.convs, self.bns
        if self.down[0] == "identity":
            shortcut = x
        elif self.down[0] == "module":
            shortcut = _contiguous(self.down[1](x))
        else:
            _, (w, b, stride, padding, dilation, groups), (rm, rv, bw, bb), eps = self.down
            shortcut = _contiguous(F.batch_norm(F.conv2d(x, w, b, stride, padding, dilation, groups),
                                                rm, rv, bw, bb, False, 0.0, eps))
        h, h_mean = x, None
        for i in range(len(convs) - 1):
            w, b, stride, padding, dilation, groups = convs[i]
            h = _contiguous(F.conv2d(h, w, b, stride, padding, dilation, groups))
            h_mean = self._bn_relu(h, bns[i], nt, self.squeeze_mean and i == len(convs) - 2)
        w, b, stride, padding, dilation, groups = convs[-1]
        c = _contiguous(F.conv2d(h, w, b, stride, padding, dilation, groups))
        n, ch, hh, ww = c.shape
        rm, rv, bw, bb, eps = bns[-1]
        if shortcut.shape != c.shape:
            raise RuntimeError(f"frozen unit: shortcut {tuple(shortcut.shape)} and branch {tuple(c.shape)} differ")
        if self.se is None:
            tmp = c.new_empty(2 * ch)
            self.lib.senet_bn_add_relu(c.data_ptr(), shortcut.data_ptr(), c.data_ptr(), rm, rv, bw, bb, eps,
                                       n, ch, hh * ww, tmp.data_ptr(), nt)
            return c
        w1, b1, w2, b2, r = self.se
        hin = w3 = b3 = hm = None
        ch_in = 0
        if self.through is not None:  # native._through_conv's decision, on the same sizes
            pw3, pb3, w3_numel, w3_in = self.through
            hm_ok = h_mean is not None
            if native.squeeze_through_pays(c.numel(), 0 if hm_ok else h.numel(), w3_numel, n):
                hin, w3, b3, ch_in = h.data_ptr(), pw3, pb3, w3_in
                hm = h_mean.data_ptr() if hm_ok else None
        tmp = c.new_empty(native.se_unit_end_scratch(n, ch, r, ch_in))
        self.lib.senet_se_unit_end(c.data_ptr(), shortcut.data_ptr(), c.data_ptr(), rm, rv, bw, bb, eps, w1, b1,
                                   w2, b2, n, ch, r, hh * ww, hin, w3, b3, ch_in, hm, tmp.data_ptr(), nt)
        return c


def _eager_step(unit: nn.Module) -> Callable[[torch.Tensor, int], torch.Tensor]:
    return lambda x, nt: unit(x)


def _path(prefix: str) -> str:
    """A state dict's prefix ("layer1.0.") as the module path its ``_metadata`` keys ("layer1.0"; the root: "")."""
    return prefix[:-1]


def _prefix(path: str) -> str:
    return path + "." if path else ""


def _drop_model_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """``state_dict``'s post-hook: ``prefix + "model." + key`` -> ``prefix + key``, in place and in order; the
    version records (``_metadata``, keyed by module path) follow."""
    inner = prefix + "model."
    for key in [k for k in state_dict if k.startswith(prefix)]:
        value = state_dict.pop(key)
        state_dict[prefix + key.removeprefix(inner)] = value
    meta = getattr(state_dict, "_metadata", None)
    for path in [p for p in meta or () if _prefix(p).startswith(inner)]:
        meta[_path(prefix + _prefix(path)[len(inner):])] = meta.pop(path)


def _add_model_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs: list[str]) -> None:
    """``load_state_dict``'s pre-hook: ``prefix + key`` -> ``prefix + "model." + key``, version records too;
    keys already under ``model.`` (a checkpoint of the wrapper itself) are left as they are."""
    module.__dict__["_loading_at"] = prefix, error_msgs, len(error_msgs)  # for _report_model_keys
    inner = prefix + "model."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)
    meta = getattr(state_dict, "_metadata", None)
    for path in [p for p in meta or () if _prefix(p).startswith(prefix) and not _prefix(p).startswith(inner)]:
        meta.setdefault(_path(inner + _prefix(path)[len(prefix):]), meta[path])


def _report_model_keys(module: nn.Module, incompatible) -> None:
    """``load_state_dict``'s post-hook: the missing and unexpected keys, and the keys named by the errors the
    model's modules added (a size mismatch, a value that is not a tensor), named as the model's (no ``model.``)."""
    prefix, errors, start = module.__dict__.pop("_loading_at", ("", [], 0))
    inner = prefix + "model."
    for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
        keys[:] = [prefix + k[len(inner):] if k.startswith(inner) else k for k in keys]
    named = re.compile(r'(size mismatch for |the parameter named ")' + re.escape(inner))  # torch's two phrasings
    errors[start:] = [named.sub(lambda m: m.group(1) + prefix, e) for e in errors[start:]]


class FrozenResNet(nn.Module):
    """What :func:`freeze` returns: ``model`` (a snapshot) with a plan per residual unit. Call it like the model;
    ``model`` is the snapshot itself (its eager forward runs wherever the plans do not apply)."""

    def __init__(self, model: ResNet | CifarResNet):
        super().__init__()
        self.model = model
        self.training = model.training  # the plans need BN in eval mode: a snapshot of an eval model starts planned
        # the state dict is the model's, key for key: a frozen model's checkpoint loads into the unfrozen model
        # and back (inside another module too: the hooks get that module's prefix)
        self.register_state_dict_post_hook(_drop_model_prefix)
        self.register_load_state_dict_pre_hook(_add_model_prefix)
        self.register_load_state_dict_post_hook(_report_model_keys)
        self._plan()

    def _plan(self) -> None:
        """A step per unit (its plan, or its module), or per stage where hooks watch the stage; nothing when
        hooks watch the network itself (they expect its forward) or the kernels are unavailable."""
        lib = native.library()
        self.planned = 0
        self._stages: list[list[Callable]] = []
        whole = lib is None or fused.observed(self.model)
        for k in range(1, 5):
            if (stage := self.model._modules.get(f"layer{k}")) is None:  # CifarResNet: three stages
                break
            if whole or fused.observed(stage):
                self._stages.append([_eager_step(stage)])
                continue
            steps = []
            for unit in stage:
                plan = _UnitPlan.build(unit, lib)
                self.planned += plan is not None
                steps.append(plan if plan is not None else _eager_step(unit))
            self._stages.append(steps)

    def train(self, mode: bool = True):  # the plans read BN's running statistics: eval mode plans them again
        out = super().train(mode)
        self._plan()
        return out

    def _apply(self, fn, recurse=True):  # .to(), .float(), .double(), .cuda(), ...: plan the result again
        out = super()._apply(fn, recurse)
        self._plan()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:  # with assign=True the parameters are new tensors, even where loading then fails on another
            self._plan()

    def __getstate__(self):  # copy.deepcopy, pickle: the plans hold addresses, so a copy plans its own
        state = self.__dict__.copy()
        state.pop("_stages", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._plan()

    def _ready(self, x: torch.Tensor) -> bool:
        """Whether this call may run the plans: eager CPU float32 NCHW inference, nothing watching."""
        return (not self.training and not torch.is_grad_enabled() and fused._ENABLED and not native._off
                and native._state["lib"] is not None and type(x) is torch.Tensor and x.dtype is _F32 and x.is_cpu
                and x.dim() == 4 and x.is_contiguous() and not native._cpu_autocast() and fused.eager()
                and not (_module._global_forward_hooks or _module._global_forward_pre_hooks
                         or _module._global_backward_hooks or _module._global_backward_pre_hooks))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        model = self.model
        nt = native._threads() if self.planned else None
        if nt is None or not self._ready(x):
            return model(x)
        x = model.forward_stem(x)
        feats = []
        for steps in self._stages:
            for step in steps:
                x = step(x, nt)
            feats.append(x)
        feats[-1] = x = model.forward_end(x)
        return feats if model.features_only else model.forward_head(x)


def freeze(model: nn.Module) -> FrozenResNet:
    """A frozen snapshot of ``model`` (one of senet's ResNet family: resnet*, se_resnet*, resnext*, se_resnext*,
    senet154, ..., and the CIFAR ResNets) for CPU inference, in eval mode: the same outputs, bit for bit, with
    the fast path's checks made once here instead of on every call (see the module docstring for what the
    snapshot does not follow).

    Units with other attention blocks or placements, hooks or other module types (the pre-activation units of
    ``preact_resnet110``, ``resnet164``, ``wrn16_8``) keep their eager forward;
    ``FrozenResNet.planned`` counts those that run from a plan. The model is copied: it is left as it was.
    """
    if not isinstance(model, ResNet | CifarResNet):
        raise TypeError(f"senet.freeze takes one of senet's ResNet-family models (resnet*, se_resnet*, "
                        f"se_resnext*, senet154, the CIFAR ResNets, ...), got {type(model).__name__}; other models "
                        "run as they are (or with torch.compile)")
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise ValueError(f"senet.freeze plans CPU inference; the model is on {sorted(devices)}: freeze it on the "
                         "CPU (model.cpu()), or use it as it is there")
    return FrozenResNet(copy.deepcopy(model).eval())


__all__ = ["FrozenResNet", "freeze"]
