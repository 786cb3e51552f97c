"""The fast path under what users wrap models in: torch.func transforms (per-sample gradients, Jacobians,
vmap), forward-mode AD, torch.fx symbolic tracing (torchvision's feature extractor), meta tensors,
checkpointing and saved-tensor hooks.

The fast path's custom autograd functions have no ``setup_context``, vmap rule or ``jvp``, and its
``out=`` writes have no batching rule; before it stepped aside for these, every one of them raised where
the plain ops work. Each case runs the same float64 network both ways and compares with the reference
(``reference_path()``, op by op).
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from helpers import perturb_bn
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap
from torch.utils.checkpoint import checkpoint

from senet.layers import create_attention, fused, list_attentions
from senet.layers.fused import reference_path
from senet.models import create_model
from senet.models.resnet import ResNet

F64 = dict(rtol=1e-9, atol=1e-11)


def _net(block: str) -> nn.Module:
    torch.manual_seed(0)
    return perturb_bn(ResNet(block, [1, 1, 1, 1], attn="se_released", num_classes=5).double())  # eval mode


def _both(run):
    """``run()`` on the fast path and on the reference path, flattened to lists of tensors."""
    def flat(out):
        if isinstance(out, dict):
            return [t for v in out.values() for t in flat(v)]
        if isinstance(out, (tuple, list)):
            return [t for v in out for t in flat(v)]
        return [out]
    fast = flat(run())
    with reference_path():
        ref = flat(run())
    assert len(fast) == len(ref) > 0
    return fast, ref


def _assert_same(run):
    fast, ref = _both(run)
    for f, r in zip(fast, ref, strict=True):  # relative to each tensor's scale (train-mode BN rounds differently)
        scale = r.abs().max().clamp_min(1e-30)
        torch.testing.assert_close(f / scale, r / scale, **F64)


@pytest.mark.parametrize("block", ["bottleneck", "basic"])
def test_func_grad_and_per_sample_gradients(block):
    model = _net(block)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 4, 2])

    def loss(p, xb, yb):
        return nn.functional.cross_entropy(functional_call(model, p, (xb,)), yb)

    _assert_same(lambda: grad(loss)(params, x, y))
    per_sample = vmap(grad(lambda p, xb, yb: loss(p, xb[None], yb[None])), in_dims=(None, 0, 0))
    _assert_same(lambda: per_sample(params, x, y))
    # per-sample gradients are the batch gradients of one-sample batches (eval-mode BN: independent)
    got = per_sample(params, x, y)
    one = grad(loss)(params, x[1:2], y[1:2])
    torch.testing.assert_close(got["fc.weight"][1], one["fc.weight"], **F64)


@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad"])
def test_vmap_inference(grad_mode):
    model, x = _net("bottleneck"), torch.randn(3, 3, 32, 32, dtype=torch.float64)

    def run():
        with torch.set_grad_enabled(grad_mode):
            return vmap(lambda xb: model(xb[None])[0])(x)

    _assert_same(run)
    with torch.no_grad():
        torch.testing.assert_close(run(), model(x), **F64)  # eval mode: vmap over samples == the batch


def test_jvp_and_forward_mode_ad():
    model, x = _net("bottleneck"), torch.randn(2, 3, 32, 32, dtype=torch.float64)
    v = torch.randn_like(x)
    _assert_same(lambda: jvp(model, (x,), (v,)))

    def dual():
        with fwAD.dual_level():
            return fwAD.unpack_dual(model(fwAD.make_dual(x, v))).tangent

    _assert_same(dual)
    # the tangent is the directional derivative: a central difference agrees
    eps = 1e-6
    with torch.no_grad():
        fd = (model(x + eps * v) - model(x - eps * v)) / (2 * eps)
    torch.testing.assert_close(dual(), fd, rtol=1e-5, atol=1e-7)


def test_block_alone_under_transforms():
    torch.manual_seed(0)
    se = create_attention("se_released", 16).double()
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    _assert_same(lambda: grad(lambda t: se(t).square().sum())(x))
    _assert_same(lambda: jacrev(lambda t: se(t).sum((2, 3)))(x))

    def dual():
        with fwAD.dual_level():
            return fwAD.unpack_dual(se(fwAD.make_dual(x, torch.ones_like(x)))).tangent

    _assert_same(dual)


def test_transformed_follows_torch():
    assert not fused._transformed() and fused.eager()
    seen = []

    def probe(t):
        seen.append((fused._transformed(), fused.eager()))
        return t

    vmap(probe)(torch.ones(2, 3))
    grad(lambda t: probe(t).sum())(torch.ones(3))
    with fwAD.dual_level():
        seen.append((fused._transformed(), fused.eager()))
    assert seen == [(True, False)] * 3
    assert not fused._transformed()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_meta_tensors(train, grad_mode):
    """Shape inference on the meta device (``torch.is_autocast_enabled('meta')`` raises)."""
    with torch.device("meta"):
        model = ResNet("bottleneck", [1, 1, 1, 1], attn="se_released", num_classes=5)
        x = torch.randn(2, 3, 64, 64, requires_grad=grad_mode)
    model.train(train)
    with torch.set_grad_enabled(grad_mode):
        out = model(x)
        if grad_mode:
            out.sum().backward()
    assert out.shape == (2, 5) and out.is_meta
    assert not grad_mode or model.fc.weight.grad.shape == (5, 2048)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant):
    def run():
        model = _net("bottleneck").train()
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
        h = model.maxpool(model.act(model.bn1(model.conv1(x))))
        for layer in (model.layer1, model.layer2):
            h = checkpoint(layer, h, use_reentrant=reentrant)
        (h * torch.linspace(-1, 1, h.numel(), dtype=h.dtype).view_as(h)).sum().backward()
        return [x.grad] + [p.grad for p in model.parameters() if p.grad is not None]

    _assert_same(run)


def test_saved_tensor_hooks():
    def run():
        model = _net("bottleneck").train()
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        with torch.autograd.graph.save_on_cpu():
            out = model(x)
        out.sum().backward()
        return [p.grad for p in model.parameters()]

    _assert_same(run)


@pytest.mark.parametrize("name", ["se_resnet50", "se_resnext50_32x4d", "se_resnet20", "se_bninception",
                                  "se_inception_resnet_v2", "se_mobilenet_v2", "se_vgg16", "cbam_resnet50"])
def test_fx_symbolic_trace(name):
    """Before commit 62424c3 no attention network traced (the fast path's checks and the blocks' input
    checks asked proxies for their shapes)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=5).eval()
    size = 160 if "inception_resnet" in name else 64
    x = torch.randn(2, 3, size, size)
    graph = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), rtol=1e-5, atol=1e-5)
        with reference_path():
            torch.testing.assert_close(graph(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list_attentions())
def test_fx_symbolic_trace_blocks(name):
    torch.manual_seed(0)
    block = create_attention(name, 64).eval()
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(block)(x), block(x))


def test_torchvision_feature_extractor():
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = create_model("se_resnet50", num_classes=5).eval()
    extractor = create_feature_extractor(model, {"layer3": "c4", "fc": "logits"})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out["logits"], model(x))
        torch.testing.assert_close(out["c4"], model.layer3(model.layer2(model.layer1(
            model.maxpool(model.act(model.bn1(model.conv1(x))))))))
    # training through the extracted graph (plain ops) and the model (fast path): the same gradients
    # (float64: train-mode BN over 2 x 2 x 2 values at stage 4 amplifies float32 rounding)
    extractor.double().train(), model.double().train()
    xg = x.double().requires_grad_()
    extractor(xg)["logits"].sum().backward()
    g_extracted = xg.grad
    xg.grad = None
    model(xg).sum().backward()
    torch.testing.assert_close(g_extracted, xg.grad, rtol=1e-9, atol=1e-12)
