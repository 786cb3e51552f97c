"""Threading one attention argument through a residual network: per-stage plans and placements.

Placements follow the SE paper's integration study (Hu et al., arXiv 1709.01507, Fig. 5, Table 14):

    standard   x + A(F(x))          on the residual branch, before the addition (Fig. 5b)
    pre        x + F(A(x))          before the residual unit, residual branch only (SE-PRE, 5c)
    post       A(relu(x + F(x)))    after the addition and its ReLU (SE-POST, 5d)
    identity   A(x) + F(x)          on the identity branch (SE-Identity, 5e)
    after_3x3  A inside F, right after the (first) 3x3 conv + BN + ReLU (Table 14, "3x3")

``A`` is built over the channels it sees there: the unit's input (pre), the 3x3 conv's output
(after_3x3) or the unit's output (the rest).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial

import torch
from torch import nn

from senet.layers import create_attention, list_attentions, native
from senet.layers._common import NoScript
from senet.layers.fused import (
    batch_norm_with_affine,
    can_fuse,
    compiled,
    compiled_batch_stats_end,
    compiled_inference,
    compiled_squeeze_before_bn,
    eager,
    fresh_output,
    infer_scale_add_relu,
    inference,
    observed,
    scale_add_relu,
    squeeze_through_conv,
    trains_fused,
)

PLACEMENTS = ("standard", "pre", "post", "identity", "after_3x3")

AttnFactory = Callable[[int], nn.Module]  # channels -> attention block (or nn.Identity)


def _identity(channels: int) -> nn.Module:
    return nn.Identity()


def check_placement(placement: str) -> str:
    if placement not in PLACEMENTS:
        raise ValueError(f"attn_placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    return placement


def stage_attention(
    attn: str | None,
    attn_kwargs: Mapping | Sequence[Mapping] | None,
    attn_stages: Iterable[int] | None,
    num_stages: int,
) -> list[AttnFactory]:
    """One attention factory per stage (1-based stage ``k`` is module ``layer{k}``).

    ``attn_kwargs`` is one dict for every stage or a sequence of ``num_stages`` dicts (e.g. a
    reduction per stage: ``[{"reduction": 8}, {"reduction": 16}, ...]``). Stages outside
    ``attn_stages`` (default: all) get ``nn.Identity``.
    """
    if attn is not None and attn != "none" and attn not in list_attentions():
        raise ValueError(f"unknown attn {attn!r}; choose one of {list_attentions()} or None")
    if attn_kwargs is None or isinstance(attn_kwargs, Mapping):
        per_stage = [dict(attn_kwargs or {})] * num_stages
    elif isinstance(attn_kwargs, Sequence) and len(attn_kwargs) == num_stages \
            and all(isinstance(k, Mapping) for k in attn_kwargs):
        per_stage = [dict(k) for k in attn_kwargs]
    else:
        raise ValueError(f"attn_kwargs must be a dict or a list of {num_stages} dicts (one per stage), "
                         f"got {attn_kwargs!r}")
    stages = set(range(1, num_stages + 1)) if attn_stages is None else set(attn_stages)
    bad = sorted(s for s in stages if s not in range(1, num_stages + 1))
    if bad:
        raise ValueError(f"attn_stages {bad} out of range; stages are numbered 1..{num_stages} "
                         f"(layer1..layer{num_stages})")
    if attn is None or attn == "none":
        return [_identity] * num_stages
    return [partial(create_attention, attn, **kw) if s + 1 in stages else _identity
            for s, kw in enumerate(per_stage)]


def conv_bn_relu(conv: nn.Module, bn: nn.Module, act: nn.Module, x: torch.Tensor,
                 mean: bool = False) -> tuple[torch.Tensor, native.Means | None]:
    """``(act(bn(conv(x))), None)``; in eager inference with a plain ReLU and nobody watching ``bn`` or it,
    BN and the ReLU in one native pass (``native.bn_relu``; into the conv's fresh output when a plain,
    unhooked ``nn.Conv2d`` wrote it), which with ``mean`` also gives ``mean_hw`` of the result, (B, C),
    for an SE unit end's squeeze through the next 1x1 conv (``AttnUnit._merge``'s ``h_mean``)."""
    c = conv(x)
    if type(act) is nn.ReLU and inference() and c.is_cpu and not observed(bn, act):
        out = native.bn_relu(bn, c, type(conv) is nn.Conv2d and not observed(conv), mean)
        if out is not None:
            return out
    return act(bn(c)), None


class AttnUnit(NoScript, nn.Module):
    """Base of residual units: holds ``attn`` (always a module) and applies it where placed."""

    def __init__(self, make_attn: AttnFactory, placement: str, channels: dict[str, int]):
        super().__init__()
        self.attn_placement = check_placement(placement)
        where = placement if placement in ("pre", "after_3x3") else "out"
        self.attn = make_attn(channels[where])

    def _at(self, where: str, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x) if self.attn_placement == where else x

    def _merge(self, c: torch.Tensor, bn: nn.Module, shortcut: torch.Tensor,
               conv_in: tuple[nn.Module, torch.Tensor] | None = None,
               h_mean: native.Means | torch.Tensor | None = None) -> torch.Tensor:
        """The unit's end, ``post(act(standard(bn(c)) + shortcut))``. SE at ``standard`` runs fused:
        scale, addition and ReLU in one pass, and nothing the plain unit does not keep is kept for
        backward but the pooled ``z``, ``s`` and BN's affine map (vectors; see ``senet.layers.fused``).

        ``conv_in=(conv, h)`` says ``c == conv(h)``: inference may then squeeze from ``h``
        (``squeeze_through_conv``), and the native kernel from ``h_mean``, ``mean_hw h`` (B, Ch), where the pass
        that wrote ``h`` gave it (``conv_bn_relu``). The result is written into ``bn``'s fresh output when nobody
        watches ``bn`` (as torchvision's ``out += identity``), in training and inference."""
        fused = self.attn_placement == "standard" and can_fuse(self.attn, self.act)
        if fused and torch.is_grad_enabled() and eager() and trains_fused(c):
            # BN keeps c for its backward anyway: with BN's affine map known for free, SE's backward
            # needs nothing else (see senet.layers.fused)
            with_affine = batch_norm_with_affine(bn, c)
            if with_affine is not None:
                out, A, B = with_affine
                return scale_add_relu(self.attn, out, shortcut, source=(bn, c), affine=(A, B), inplace=True)
        if inference() and c.is_cpu and not observed(bn):  # the native kernels: CPU only
            y = self._native_end(fused, c, bn, shortcut, conv_in, h_mean)
            if y is not None:
                return y
        if fused and compiled(bn):  # before bn(c), which in training would update BN's running statistics
            y = compiled_batch_stats_end(self.attn, bn, c, shortcut)
            if y is not None:  # placement "standard": nothing after the ReLU
                return y
        out = bn(c)
        fresh = fresh_output(bn)
        if fused and inference():
            z = None
            if conv_in is not None and getattr(self.attn, "pool", "avg") == "avg":
                z = squeeze_through_conv(*conv_in, bn, out)
            return infer_scale_add_relu(self.attn, out, shortcut, z=z, inplace=fresh)
        if fused:
            if compiled_inference():  # here, not first: no check on eager's path; the compiler drops the unused out
                y = compiled_squeeze_before_bn(self.attn, bn, c, shortcut, self.act, conv_in)
                if y is not None:  # placement "standard": nothing after the ReLU
                    return y
            # an identity shortcut is this unit's input, kept by conv1 anyway; a computed one is not
            keep_c = not isinstance(getattr(self, "downsample", None), (nn.Identity, type(None)))
            return scale_add_relu(self.attn, out, shortcut, source=(bn, c) if keep_c else None)
        if fresh and (self.attn_placement != "standard" or isinstance(self.attn, nn.Identity)):
            return self._at("post", self.act(out.add_(shortcut)))
        out = self._at("standard", out)
        return self._at("post", self.act(out + shortcut))

    def _native_end(self, fused: bool, c: torch.Tensor, bn: nn.Module, shortcut: torch.Tensor,
                    conv_in: tuple[nn.Module, torch.Tensor] | None,
                    h_mean: native.Means | torch.Tensor | None) -> torch.Tensor | None:
        """The unit's end in one native call (``senet.layers.native``; eager inference, nobody watching ``bn``),
        or None where the kernels do not apply: SE at ``standard`` (``fused``) or no attention at the end.

        The result goes into ``c`` itself when ``conv_in`` says a plain, unhooked ``nn.Conv2d`` made it: then
        nothing else holds ``c`` (no autograd in inference), and a fresh output would cost its page faults
        (se_resnet50, batch 1: 0.935 [0.913, 0.960] of the time with a fresh one; docs/performance.md)."""
        conv = None if conv_in is None else conv_in[0]
        inplace = type(conv) is nn.Conv2d and not observed(conv)
        if fused:
            return native.se_unit_end(self.attn, bn, c, shortcut, inplace, conv_in, h_mean)
        act = self.act
        if type(act) is not nn.ReLU or observed(act) or (
                self.attn_placement == "standard" and not isinstance(self.attn, nn.Identity)):
            return None
        y = native.bn_add_relu(bn, c, shortcut, inplace)
        return None if y is None else self._at("post", y)
