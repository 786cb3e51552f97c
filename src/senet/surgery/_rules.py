"""Placement rules: which modules of a probed network an attention block should follow.

Every rule reads the probe log (``_probe.Call`` per module) and returns module names; attention is
inserted on the output of each named module.

    residual  end of each residual branch, before the addition (SE paper Fig. 5b, "standard"),
              for the residual block classes in ``RESIDUAL_ENDS``
    stage     end of each stage, right before the resolution drops, plus the last feature map
              (SE-VGG16: after the last conv+ReLU of each block, before its max-pool)
    conv      after each conv -> norm -> activation group
"""

from __future__ import annotations

import difflib

from torch import nn

from ._probe import Call, area

ATTR = "attached"  # the child that holds an inserted block: <place>.attached

# Residual block class -> its child whose output ends the residual branch, before the addition.
# A plain nn.Sequential child stands for its last module (found by `_last_leaf`).
RESIDUAL_ENDS: dict[str, str] = {
    "torchvision.models.resnet.BasicBlock": "bn2",  # ResNet-18/34
    "torchvision.models.resnet.Bottleneck": "bn3",  # ResNet-50+, ResNeXt, Wide-ResNet
    "torchvision.models.mobilenetv2.InvertedResidual": "conv",  # ends in the projection BN
    "torchvision.models.efficientnet.MBConv": "block",  # before stochastic depth + addition
    "torchvision.models.efficientnet.FusedMBConv": "block",
    "torchvision.models.regnet.ResBottleneckBlock": "f",  # x + f(x)
    "timm.models.resnet.BasicBlock": "bn2",
    "timm.models.resnet.Bottleneck": "bn3",  # where timm's own `se` goes
    "timm.models.convnext.ConvNeXtBlock": "drop_path",  # drop_path(γ · mlp(...)) + shortcut
    "senet.models.resnet.BasicBlock": "bn2",
    "senet.models.resnet.Bottleneck": "bn3",
}

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_ACT_MODULES = ("torch.nn.modules.activation", "timm.layers.activations", "timm.layers.activations_me")


def qualname(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def is_plain_sequential(module: nn.Module) -> bool:
    """An nn.Sequential whose forward runs its children in order (an appended child runs last)."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def problem(rec: Call) -> str | None:
    """Why attention cannot follow this module, or None if it can."""
    m = rec.module
    if rec.name == "":
        return "is the whole model; name a submodule"
    if ATTR in rec.name.split("."):
        return "is (inside) an attention block inserted by senet.attach"
    if ATTR in m._modules:
        return f"already has attention attached ({rec.name}.{ATTR})"
    if isinstance(m, (nn.ModuleList, nn.ModuleDict)):
        return f"is a {type(m).__name__}, which runs its children itself; name a module inside it"
    if rec.calls == 0:
        return "did not run in the forward pass"
    if rec.calls > 1:
        return (f"runs {rec.calls} times per forward pass (a shared module, e.g. one ReLU reused in a "
                f"block), so attention after it would apply {rec.calls} times; name a module that runs once")
    if area(rec.y) is None:
        shape = tuple(rec.y.shape) if hasattr(rec.y, "shape") else type(rec.y).__name__
        return f"outputs {shape}, not an (N, C, H, W) feature map"
    return None


def explicit_places(calls: dict[str, Call], names: list[str]) -> list[str]:
    """Check user-given names; raise ValueError naming the first bad one."""
    for name in names:
        if name not in calls:
            close = difflib.get_close_matches(name, [n for n in calls if n], n=3)
            hint = f"; did you mean {close}?" if close else "; see model.named_modules()"
            raise ValueError(f"no module named {name!r} in the model{hint}")
        why = problem(calls[name])
        if why:
            raise ValueError(f"cannot attach after {name!r}: it {why}")
    if len(set(names)) != len(names):
        raise ValueError(f"module names repeat in where={names}; name each place once")
    return list(names)


def _last_leaf(calls: dict[str, Call], name: str) -> str:
    while is_plain_sequential(calls[name].module) and calls[name].children:
        name = calls[name].children[-1]
    return name


def residual_places(calls: dict[str, Call]) -> list[str]:
    out = []
    for name, rec in calls.items():
        child = RESIDUAL_ENDS.get(qualname(rec.module))
        if child is None or not getattr(rec.module, "use_res_connect", True):
            continue  # not a residual block, or one without the shortcut (stride 2 / width change)
        end = _last_leaf(calls, f"{name}.{child}" if name else child)
        if problem(calls[end]) is None:
            out.append(end)
    return out


def _producer(calls: dict[str, Call], t: object, too_big) -> Call | None:
    """The module to attach after so that attention sees tensor ``t`` in its final state.

    Producers are modules whose output *is* ``t``. Only those whose ends are consecutive events up
    to the last one hold its final value (a BN's output later changed in place by `+=` or an in-place
    ReLU does not count). Prefer a real module over a Sequential (appending would change its
    length) or an Identity, then the outermost (latest end).
    """
    prods = sorted((c for c in calls.values() if c.name and c.y is t), key=lambda c: -c.end)
    if t is None or not prods:
        return None  # e.g. the model's input: nothing to attach after
    final = prods[:1]
    for c in prods[1:]:  # an nn.Identity in between (timm's norm_pre) changes nothing
        last = final[-1]
        if c.end != (last.start if isinstance(last.module, nn.Identity) else last.end) - 1:
            break
        final.append(c)
    ok = [c for c in final if problem(c) is None and not too_big(c.name)]
    if not ok:
        return None
    return max(ok, key=lambda c: (not isinstance(c.module, (nn.Sequential, nn.Identity)), c.end))


def _is_global_pool(c: Call) -> bool:
    return c.leaf and not isinstance(c.module, nn.Conv2d) and area(c.y) == 1 < (area(c.x) or 0)


def _downsampling_chains(ran: dict[str, Call]) -> list[list[Call]]:
    """Per leaf that lowers the resolution (global pools aside): it and the enclosing modules making
    the same single step (e.g. ``layer2.0.conv2`` -> ``layer2.0`` -> ``layer2``), outermost first."""
    chains = []
    for leaf in ran.values():
        if not (leaf.leaf and area(leaf.x) and area(leaf.y) and area(leaf.y) < area(leaf.x)) \
                or _is_global_pool(leaf):
            continue
        chain, parent = [leaf], leaf.name.rpartition(".")[0]
        while parent in ran and (area(ran[parent].x), area(ran[parent].y)) == (area(leaf.x), area(leaf.y)):
            chain.append(ran[parent])
            parent = parent.rpartition(".")[0]
        chains.append(chain[::-1])
    return chains


def stage_places(calls: dict[str, Call]) -> list[str]:
    ran = {n: c for n, c in calls.items() if n and c.calls == 1}
    chains = _downsampling_chains(ran)
    outer = [ch[0].name for ch in chains]

    def too_big(name: str) -> bool:  # spans several resolution steps, e.g. VGG's whole `features`
        return any(o.startswith(name + ".") for o in outer)

    ends: dict[str, Call] = {}
    for chain in chains:
        for d in chain:  # the outermost step first; fall back inwards (DenseNet's dense blocks)
            pick = _producer(calls, d.x, too_big)
            if pick:
                ends[pick.name] = pick
                break
    # The last feature map: the last 4D output before the head's global pool (the last one; SE
    # blocks inside EfficientNet pool too), or anywhere if forward() pools (MobileNetV2).
    head = max((c.start for c in ran.values() if _is_global_pool(c)), default=float("inf"))
    maps = [c for c in ran.values() if area(c.y) and c.end < head]
    if maps:
        pick = _producer(calls, max(maps, key=lambda c: c.end).y, too_big)
        if pick:
            ends.setdefault(pick.name, pick)
    return _drop_stem(ran, sorted(ends.values(), key=lambda c: c.end))


def _drop_stem(ran: dict[str, Call], ends: list[Call]) -> list[str]:
    """Keep stage ends whose stretch (since the previous end, at their resolution) holds a conv,
    except a stem: a first stretch whose only conv is itself strided (ResNet's 7x7/2, then max-pool)."""
    convs = [c for c in ran.values() if isinstance(c.module, nn.Conv2d) and area(c.y)]
    out, prev = [], -1
    for i, e in enumerate(ends):
        stretch = [c for c in convs if prev < c.end <= e.end and area(c.y) == area(e.y)]
        stem = i == 0 and len(stretch) == 1 and area(stretch[0].y) < area(stretch[0].x)
        if stretch and not stem:
            out.append(e.name)
        prev = e.end
    return out


def conv_places(calls: dict[str, Call]) -> list[str]:
    ran = {n: c for n, c in calls.items() if n and c.calls == 1}
    leaves = sorted((c for c in ran.values() if c.leaf), key=lambda c: c.start)
    out: dict[str, None] = {}
    for conv in leaves:
        if not isinstance(conv.module, nn.Conv2d) or not area(conv.y) or area(conv.x) == 1:
            continue  # a 1x1 conv on a pooled vector is an FC (e.g. inside an SE block)
        cur = conv
        while True:
            nxt = next((c for c in leaves if c.start > cur.end and c.x is cur.y), None)
            if nxt is None or not (isinstance(nxt.module, _NORMS) or type(nxt.module).__module__ in _ACT_MODULES):
                break
            cur = nxt
        if problem(cur) is None:
            out[cur.name] = None
    return list(out)


RULES = {"residual": residual_places, "stage": stage_places, "conv": conv_places}
