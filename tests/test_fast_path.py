"""The fused SE unit end (senet.layers.fused) against the unfused reference path and against numbers.

Reference: the same network under ``reference_path()`` (``act(attn(bn(c)) + shortcut)`` op by op,
autograd's own gradients), and finite differences (gradcheck) for the custom autograd function.
"""

import contextlib
import copy
from functools import partial

import pytest
import torch
from helpers import perturb_bn
from torch import nn

from senet.bench import activation_bytes
from senet.layers import create_attention, fused
from senet.layers.fused import (
    _ExciteScaleAddReLU,
    _SigmoidScaleAddReLU,
    batch_norm_with_affine,
    bn_affine,
    channel_dot,
    channel_sums,
    reference_path,
    scale_add_relu,
    squeeze_through_conv,
)
from senet.layers.se import SqueezeExcite
from senet.models import _attn
from senet.models.resnet import BasicBlock, Bottleneck, ResNet

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: dynamo keeps at most 8 compiled versions of a code object (a unit's
    forward) per process, and this file's compiled tests, run in one process, make more than that."""
    torch._dynamo.reset()


def _net(block: str, dtype: torch.dtype, channels_last: bool, attn: str = "se_released") -> nn.Module:
    model = ResNet(block, [1, 1, 1, 1], attn=attn, num_classes=5).to(dtype)
    for m in model.modules():  # non-trivial BN so eval mode is not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _step(model, x: torch.Tensor, params: nn.Module | None = None):
    """Output, input gradient and parameter gradients of a fixed linear loss (``params``: the module
    holding the parameters when ``model`` is a compiled wrapper)."""
    x = x.detach().clone().requires_grad_()
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in (params or model).named_parameters()}


def _assert_same(fast, ref, dtype):
    (o1, gx1, gp1), (o2, gx2, gp2) = fast, ref
    torch.testing.assert_close(o1, o2, **TOL[dtype])
    # gradients relative to their own scale: float32 sums over H x W round differently
    scale = gx2.abs().max()
    torch.testing.assert_close(gx1 / scale, gx2 / scale, **TOL[dtype])
    assert gp1.keys() == gp2.keys()
    for name in gp2:
        s = gp2[name].abs().max().clamp_min(1e-30)
        torch.testing.assert_close(gp1[name] / s, gp2[name] / s, **TOL[dtype], msg=name)


def _assert_matches_reference(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, run=None) -> None:
    """``_step`` of ``model`` (or of ``run``, a compiled wrapper of it) against a copy of ``model`` on the
    reference path."""
    ref = copy.deepcopy(model)
    got = _step(model, x) if run is None else _step(run, x, params=model)
    with reference_path():
        want = _step(ref, x)
    _assert_same(got, want, dtype)


def _errors(got, truth) -> dict[str, float]:
    """max |got - truth| / max |truth| for the output, the input gradient and each parameter gradient."""
    def err(a, t):
        return ((a.double() - t).abs().max() / t.abs().max().clamp_min(1e-30)).item()
    (o, gx, gp), (to, tgx, tgp) = got, truth
    return {"output": err(o, to), "input": err(gx, tgx), **{n: err(gp[n], tgp[n]) for n in tgp}}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_same_outputs_and_gradients_as_reference(channels_last, train):
    # float64: the fast path equals the reference to rounding. float32: both are compared with the
    # float64 reference, and the fast path may not be less accurate than the float32 reference
    # (train-mode BN over few values amplifies rounding in both to ~1e-4 of the gradients' scale). 64 x 64, so that
    # layer4's BN normalises 12 values a channel, not 3: at 32 x 32 which path's float32 came out nearer float64
    # was a draw (AMD EPYC, seeds 0, 1, 2: median ratio fast / reference 2.33, 0.73, 0.68; at 64 x 64 0.98-1.0).
    net64 = _net("bottleneck", torch.float64, channels_last).train(train)
    nets = {"fast64": net64, "ref64": copy.deepcopy(net64), "fast32": copy.deepcopy(net64).float(),
            "ref32": copy.deepcopy(net64).float()}
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    runs = {}
    for name, net in nets.items():
        with contextlib.nullcontext() if name.startswith("fast") else reference_path():
            runs[name] = _step(net, x.to(next(net.parameters()).dtype))
    _assert_same(runs["fast64"], runs["ref64"], torch.float64)
    fast32, ref32 = _errors(runs["fast32"], runs["ref64"]), _errors(runs["ref32"], runs["ref64"])
    worse = {k: (fast32[k], ref32[k]) for k in ref32 if fast32[k] > 2 * ref32[k] + 1e-6}
    assert not worse, f"fast float32 less accurate than reference float32: {worse}"
    for m1, m2 in zip(nets["fast64"].modules(), nets["ref64"].modules(), strict=True):  # same BN updates
        if isinstance(m1, nn.BatchNorm2d):
            torch.testing.assert_close(m1.running_var, m2.running_var)


@pytest.mark.parametrize("attn", ["se", "se_mobilenetv3"])  # FCs without bias; 1x1 convs + hard-sigmoid
def test_basic_block_and_other_gates_match(attn):
    # 64 x 64: layer4 is 2 x 2 (at 32 x 32 its BN normalised 2 values a channel, and float64 rounding grew past
    # the tolerance on an AMD EPYC: 1.3e-12 of the gradient's scale)
    _assert_matches_reference(_net("basic", torch.float64, False, attn), torch.randn(2, 3, 64, 64, dtype=torch.float64),
                              torch.float64)


@pytest.mark.parametrize("from_bn", [False, True], ids=["keep_shortcut", "keep_bn_input"])
def test_custom_function_gradcheck(from_bn):
    # finite differences, not autograd, are the reference here
    g = torch.Generator().manual_seed(0)
    x, sc = (torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g) for _ in range(2))
    a = torch.randn(2, 3, 1, 1, dtype=torch.float64, generator=g) * 3  # some saturated gates
    if not from_bn:
        torch.autograd.gradcheck(_SigmoidScaleAddReLU.apply, (x.requires_grad_(), a.requires_grad_(),
                                                              sc.requires_grad_()))
        return
    c = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g) * 2 + 1
    A = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64).view(1, 3, 1, 1)
    B = torch.tensor([0.1, -0.3, 0.7], dtype=torch.float64).view(1, 3, 1, 1)

    def f(c, a, sc):  # x = A c + B: the function only sees its value, autograd carries dL/dx to c
        return _SigmoidScaleAddReLU.apply(A * c + B, a, sc, c.detach(), A, B)
    torch.autograd.gradcheck(f, (c.requires_grad_(), a.requires_grad_(), sc.requires_grad_()))


@pytest.mark.parametrize("with_b", [True, False], ids=["with_b", "b_none"])
def test_centred_scale_function_gradcheck(with_b):
    # compiled training's scale pass, relu((c - mean) k + b + shortcut), against finite differences: every input
    # (mean per channel, k and b per sample and channel)
    g = torch.Generator().manual_seed(2)
    c, sc = (torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    mean = torch.randn(1, 3, 1, 1, dtype=torch.float64, generator=g, requires_grad=True)
    k, b = (torch.randn(2, 3, 1, 1, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    if with_b:
        torch.autograd.gradcheck(fused._CentredScaleAddReLU.apply, (c, mean, k, b, sc))
    else:
        torch.autograd.gradcheck(lambda c, mean, k, sc: fused._CentredScaleAddReLU.apply(c, mean, k, None, sc),
                                 (c, mean, k, sc))


@pytest.mark.parametrize("from_bn,inplace", [(False, False), (True, False), (True, True)],
                         ids=["keep_shortcut", "keep_bn_input", "keep_bn_input_inplace"])
def test_recompute_function_gradcheck(from_bn, inplace):
    # the eager function: SE's FCs recomputed in backward, the squeeze's gradient folded into dL/dx;
    # in place: y written into x (a fresh A c + B, as BN's output in a unit)
    se = create_attention("se_released", 4, reduction=2).double()
    g = torch.Generator().manual_seed(1)
    x, sc, c = (torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    A = torch.tensor([0.5, 2.0, -1.0, 1.5], dtype=torch.float64).view(1, 4, 1, 1)
    B = torch.tensor([0.1, -0.3, 0.7, 0.0], dtype=torch.float64).view(1, 4, 1, 1)

    def f(inp, sc, *params):
        if from_bn:  # inp is c; the function sees x = A c + B and keeps c
            return _ExciteScaleAddReLU.apply(A * inp + B, sc, inp.detach(), A, B, se.pooled_logits, inplace, *params)
        return _ExciteScaleAddReLU.apply(inp, sc, None, None, None, se.pooled_logits, False, *params)
    torch.autograd.gradcheck(f, (c if from_bn else x, sc, *se.parameters()))


def test_eager_training_takes_the_recompute_function():
    unit = _unit("bottleneck")
    y = unit(torch.randn(2, 16, 6, 6, requires_grad=True))
    assert type(y.grad_fn).__name__ == "_ExciteScaleAddReLUBackward"
    with torch.no_grad():
        assert unit(torch.randn(2, 16, 6, 6)).grad_fn is None


@pytest.mark.parametrize("train", [True, False])
def test_bn_affine_reproduces_batchnorm(train):
    bn = nn.BatchNorm2d(4).double().train(train)
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.uniform_(-1, 1)
    c = torch.randn(3, 4, 5, 5, dtype=torch.float64) * 3 + 2
    A, B = bn_affine(bn, c)
    torch.testing.assert_close(A * c + B, bn(c))
    # float32 with a mean 5x the spread: Σ c² - n mean² must not lose the variance
    bn32, c32 = copy.deepcopy(bn).float(), (torch.randn(8, 4, 14, 14) + 5)
    A, B = bn_affine(bn32, c32)
    torch.testing.assert_close(A * c32 + B, bn32(c32), rtol=1e-4, atol=1e-4)


def test_saved_activations_drop_the_bn_output():
    # The reference keeps every SE unit's x = bn(c) (ds = Σ g x needs it); the fast path keeps none of
    # it: over the plain ResNet it saves only vectors, counted here by hand.
    torch.manual_seed(0)
    b, x = 2, torch.randn(2, 3, 64, 64)
    se, plain = ResNet("bottleneck", [2, 1, 1, 1], attn="se_released"), ResNet("bottleneck", [2, 1, 1, 1])
    fast = activation_bytes(se, x)
    with reference_path():
        ref = activation_bytes(se, x)
    base = activation_bytes(plain, x)
    # SE units (C, H = W, downsample?): layer1 two units at 256 x 16 x 16 (the second without downsample),
    # then 512 x 8, 1024 x 4, 2048 x 2
    units = [(256, 16, True), (256, 16, False), (512, 8, True), (1024, 4, True), (2048, 2, True)]
    x_bytes = sum(4 * b * c * hw * hw for c, hw, _ in units)  # every unit's bn output, float32
    # the pooled z and the scale s (B, C) (backward recomputes the FCs), and BN's affine map A, B (C each)
    # taken from BN's own batch statistics in every unit
    vectors = sum(4 * (b * 2 * c + 2 * c) for c, _, _ in units)
    ab_bytes = sum(4 * 2 * c for c, _, _ in units)
    hidden_bytes = sum(4 * b * (c // 16) for c, _, _ in units)  # δ(W1 z), kept by the reference only
    # and the reference pools the stem with PyTorch's kernel, which keeps an int64 index per output (64 x 16 x 16),
    # senet's (``senet.layers.pool``) one byte per output
    index_bytes = (8 - 1) * b * 64 * 16 * 16
    assert fast - base == vectors
    assert ref - fast == x_bytes + hidden_bytes - ab_bytes + index_bytes


@pytest.mark.parametrize("where, shape, exact", [
    ("layer1.0.attn", (2, 256, 8, 8), False),  # senet analyze/prune hook `attn`: the unit calls it
    ("layer2.0.attn.fc1", (2, 512 // 16), True),  # inference runs the FCs as plain ops unless watched
])
def test_hooks_see_the_unfused_call(where, shape, exact):
    # a watched module is called as a module, and the output stays the same
    model = _net("bottleneck", torch.float64, False).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    seen = []
    with torch.no_grad():
        want = model(x)
        handle = model.get_submodule(where).register_forward_hook(lambda m, a, o: seen.append(o.shape))
        got = model(x)
        handle.remove()
    assert seen == [shape]
    if exact:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want)


def test_no_grad_path_is_plain_ops():
    se = create_attention("se_released", 32)
    x, sc = torch.randn(2, 32, 5, 5), torch.randn(2, 32, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(scale_add_relu(se, x, sc), torch.relu(se(x) + sc))


def _unit(block: str) -> nn.Module:
    planes = 8 if block == "bottleneck" else 32
    cls = Bottleneck if block == "bottleneck" else BasicBlock
    cout = planes * cls.expansion  # 32 either way: SE hidden 32 // 16 = 2
    down = nn.Sequential(nn.Conv2d(16, cout, 1, bias=False), nn.BatchNorm2d(cout))
    return cls(16, planes, downsample=down, make_attn=partial(create_attention, "se_released"))


COMPILED = [  # (backend, dtype, channels_last, train): aot_eager is cheap, inductor's C++ build is not
    ("aot_eager", torch.float64, False, True), ("aot_eager", torch.float64, True, False),
    ("aot_eager", torch.float32, True, True), ("inductor", torch.float32, False, True),
]
# inductor's cold C++ build dominates this file's time: it gets the smaller (basic) unit



@pytest.mark.parametrize("backend,dtype,channels_last,train", COMPILED,
                         ids=["aot-f64-nchw-train", "aot-f64-nhwc-eval", "aot-f32-nhwc-train", "inductor-f32"])
def test_torch_compile_matches_eager_reference(backend, dtype, channels_last, train):
    # fullgraph: the custom autograd function must trace without graph breaks
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    unit = _unit("basic" if backend == "inductor" else "bottleneck").to(dtype=dtype, memory_format=fmt).train(train)
    x = torch.randn(2, 16, 6, 6, dtype=dtype).contiguous(memory_format=fmt)
    _assert_matches_reference(unit, x, dtype, run=torch.compile(unit, backend=backend, fullgraph=True))


BN_KINDS = {  # the unit end's BN (bn3): what nn.BatchNorm2d's training forward does with each
    "momentum": dict(), "cumulative": dict(momentum=None), "batch-stats-only": dict(track_running_stats=False),
    "no-affine": dict(affine=False),
}


@pytest.mark.parametrize("kind", [*BN_KINDS, "nhwc", "eval-bn", "hooked-bn"])
def test_compiled_training_end_combines_batch_statistics(kind, monkeypatch):
    # compiled, a unit end whose BN uses the batch's statistics squeezes each sample's channel means from one
    # var_mean and combines BN's statistics from them: two training steps give the reference's outputs,
    # gradients and BN buffers (running statistics, batches counted); BN with running statistics (eval mode)
    # or hooked takes the traced custom function as before
    taken = []
    real = _attn.compiled_batch_stats_end
    monkeypatch.setattr(_attn, "compiled_batch_stats_end", lambda *a: taken.append(real(*a)) or taken[-1])
    unit = perturb_bn(_unit("bottleneck")).train()
    unit.bn3 = bn = nn.BatchNorm2d(32, **BN_KINDS.get(kind, {}))
    with torch.no_grad():
        for t, lo in ((bn.weight, 0.5), (bn.bias, -0.5), (bn.running_mean, -0.5), (bn.running_var, 0.5)):
            if t is not None:
                t.uniform_(lo, lo + 1)
    unit = unit.double()
    if kind == "eval-bn":
        bn.eval()
    if kind == "hooked-bn":
        unit.bn3.register_forward_hook(lambda m, i, o: None)  # watched: the module must be called
    fmt = torch.channels_last if kind == "nhwc" else torch.contiguous_format
    unit = unit.to(memory_format=fmt)
    ref, run = copy.deepcopy(unit), torch.compile(unit, backend="aot_eager", fullgraph=True)
    for step in range(2):
        x = torch.randn(3, 16, 6, 6, dtype=torch.float64).contiguous(memory_format=fmt)
        got = _step(run, x, params=unit)
        with reference_path():
            want = _step(ref, x)
        _assert_same(got, want, torch.float64)
        for (name, b1), b2 in zip(unit.named_buffers(), ref.buffers(), strict=True):
            torch.testing.assert_close(b1, b2, **TOL[torch.float64], msg=f"step {step}: {name}")
        unit.zero_grad(), ref.zero_grad()
    if kind in ("eval-bn", "hooked-bn"):  # declined (eval) or not asked (hooked: the module must be called)
        assert all(t is None for t in taken)
    else:  # traced once per compilation
        assert taken and all(t is not None for t in taken)
    if kind == "cumulative":
        assert unit.bn3.num_batches_tracked.item() == 2 and ref.bn3.num_batches_tracked.item() == 2


def test_compiled_training_keeps_what_the_plain_unit_keeps():
    # inductor's partitioner decides what a compiled forward keeps: an SE unit end in training keeps no whole
    # tensor more than the plain unit (only vectors: a few KiB here); c - mean kept was a whole tensor (3 MiB)
    saved = {}
    for attn in ("se_released", None):
        make = partial(create_attention, attn) if attn else (lambda c: nn.Identity())
        unit = Bottleneck(256, 64, downsample=nn.Identity(), make_attn=make).train()
        x = torch.randn(2, 256, 14, 14)
        run = torch.compile(unit)
        run(x.clone().requires_grad_()).sum().backward()
        saved[attn] = activation_bytes(run, x)
    assert saved["se_released"] - saved[None] < x[0, :, 0, 0].numel() * 4 * 2 * 8  # vectors, never x's 392 KiB


def test_compiled_training_end_float32_as_accurate_as_reference():
    # float32: the combined statistics are no less accurate than BN's own against a float64 truth, with BN's
    # input far from zero (conv3's bias: channel means 75-260 standard deviations, where E[c^2] - mean^2
    # would cancel)
    unit64 = perturb_bn(_unit("bottleneck").double()).train()
    unit64.conv3.bias = nn.Parameter(torch.linspace(30.0, 60.0, 32, dtype=torch.float64))
    units = {"compiled": copy.deepcopy(unit64).float(), "ref32": copy.deepcopy(unit64).float(), "ref64": unit64}
    x = torch.randn(3, 16, 6, 6, dtype=torch.float64)
    runs = {}
    for name, unit in units.items():
        if name == "compiled":
            runs[name] = _step(torch.compile(unit, backend="aot_eager", fullgraph=True), x.float(), params=unit)
        else:
            with reference_path():
                runs[name] = _step(unit, x.to(next(unit.parameters()).dtype))
    compiled, ref32 = _errors(runs["compiled"], runs["ref64"]), _errors(runs["ref32"], runs["ref64"])
    worse = {k: (compiled[k], ref32[k]) for k in ref32 if compiled[k] > 2 * ref32[k] + 1e-6}
    assert not worse, f"compiled float32 less accurate than reference float32: {worse}"
    for m1, m2 in zip(units["compiled"].modules(), units["ref64"].modules(), strict=True):
        if isinstance(m1, nn.BatchNorm2d):
            torch.testing.assert_close(m1.running_var.double(), m2.running_var, rtol=1e-5, atol=1e-6)


def _assert_compiled_inference_matches_reference(model: nn.Module, x: torch.Tensor) -> None:
    """``model`` compiled (aot_eager, fullgraph) in inference gives the reference path's values (float64)."""
    with torch.inference_mode():
        with reference_path():
            want = model(x)
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("attn", ["se_released", "se_mobilenetv3"])  # sigmoid; hard-sigmoid with 1x1-conv FCs
@pytest.mark.parametrize("hook_bn", [False, True], ids=["plain", "hooked-bn"])
def test_compiled_inference_squeezes_before_bn(block, attn, hook_bn, monkeypatch):
    # compiled inference squeezes c before BN (mean_hw bn(c) = bn(mean_hw c) with running statistics) so
    # that the compiler fuses BN into the scale's pass; the same values as the reference, and only where
    # it holds: a hook on BN may change its output, so the unit then squeezes bn(c) as usual
    traced = []
    real = _attn.compiled_squeeze_before_bn
    monkeypatch.setattr(_attn, "compiled_squeeze_before_bn", lambda *a: traced.append(real(*a)) or traced[-1])
    planes = 8 if block == "bottleneck" else 32
    cls = Bottleneck if block == "bottleneck" else BasicBlock
    cout = planes * cls.expansion
    down = nn.Sequential(nn.Conv2d(16, cout, 1, bias=False), nn.BatchNorm2d(cout))
    unit = perturb_bn(cls(16, planes, downsample=down, make_attn=partial(create_attention, attn)).double())
    bn = unit.bn3 if block == "bottleneck" else unit.bn2
    if hook_bn:
        bn.register_forward_hook(lambda m, i, o: o * 1.5)  # a hook that changes BN's output
    _assert_compiled_inference_matches_reference(unit, torch.randn(3, 16, 6, 6, dtype=torch.float64))
    assert [t is not None for t in traced] == [not hook_bn]  # traced once; declined where BN is hooked


@pytest.mark.parametrize("through_conv", [False, True], ids=["squeeze_c", "squeeze_through_conv3"])
def test_compiled_inference_squeezes_through_conv3(through_conv, monkeypatch):
    # compiled inference squeezes conv3's input h (mean_hw c = W3 mean_hw h + b3) where that reads fewer
    # elements: the same values as the reference; the small net's tensors are below the threshold, so it is
    # forced (or forbidden) here, and each unit end is traced once
    monkeypatch.setattr(fused, "COMPILED_SQUEEZE_THROUGH_CONV_MIN_SAVING", -10**9 if through_conv else 10**18)
    taken = []
    real = fused.squeeze_through_conv
    monkeypatch.setattr(fused, "squeeze_through_conv", lambda *a, **k: taken.append(real(*a, **k)) or taken[-1])
    net = _net("bottleneck", torch.float64, False).eval()
    for m in net.modules():  # a bias on conv3 too: the formula's b3
        if hasattr(m, "conv3"):
            m.conv3.bias = nn.Parameter(torch.randn(m.conv3.out_channels, dtype=torch.float64))
    _assert_compiled_inference_matches_reference(net, torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert len(taken) == 4 and all((z is not None) == through_conv for z in taken)


# --- the SE block alone: x * s(mean x) with the squeeze's gradient folded into the scale's -----------


@pytest.mark.parametrize("attn", ["se", "se_released", "se_mobilenetv3"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_block_backward_matches_reference(attn, channels_last):
    block = create_attention(attn, 32).double()
    x = torch.randn(3, 32, 5, 7, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)

    def run():
        xg = x.clone().requires_grad_()
        y = block(xg)
        return y.grad_fn, [y, *torch.autograd.grad(y, [xg, *block.parameters()], g)]
    fn, got = run()
    with reference_path():
        ref_fn, want = run()
    assert type(fn).__name__ == "_ScaleByExcitationBackward" and type(ref_fn).__name__ == "MulBackward0"
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_block_gradcheck_and_no_double_backward():
    block = create_attention("se_released", 32).double()
    x = torch.randn(2, 32, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(block, (x,))  # finite differences through x and every FC parameter
    with pytest.raises(RuntimeError, match="reference_path"):  # a wrong second derivative is never returned
        torch.autograd.grad(block(x).sum(), x, create_graph=True)


@pytest.mark.parametrize("where", ["block_last", "network"])
def test_second_derivatives_raise_and_say_what_to_do(where):
    """A gradient penalty (``create_graph=True``, then the gradient of the gradient). Under torch's
    ``once_differentiable`` both came out silently wrong before commit 88d0cce: ``autograd.grad(penalty,
    x)`` never reached its error node (the network: 811 against 1.5e8), and with SE the last op the
    gradient was returned as a constant. Now ``create_graph=True`` raises, naming the fix; under
    ``reference_path()`` it is autograd's (checked against gradgradcheck)."""
    torch.manual_seed(0)
    model = (create_attention("se_released", 32) if where == "block_last" else _net("bottleneck", torch.float64,
                                                                                      False).train()).double()
    shape = (2, 32, 4, 4) if where == "block_last" else (2, 3, 32, 32)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

    def penalty_grad():
        (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        return torch.autograd.grad(g.square().sum(), x)[0]

    with pytest.raises(RuntimeError, match=r"no second derivatives.*reference_path"):
        penalty_grad()
    with reference_path():
        got = penalty_grad()
        assert got.abs().sum() > 0
        if where == "block_last":
            torch.autograd.gradgradcheck(lambda t: model(t), (x,))


def test_channel_dot_by_hand():
    g, x = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    want = torch.tensor([[sum(g[b, c].flatten()[i] * x[b, c].flatten()[i] for i in range(20)) for c in range(3)]
                         for b in range(2)]).view(2, 3, 1, 1)
    torch.testing.assert_close(channel_dot(g, x), want)
    cl = torch.channels_last
    torch.testing.assert_close(channel_dot(g.contiguous(memory_format=cl), x.contiguous(memory_format=cl)), want)


def test_block_under_torch_compile_matches_eager():
    # compiled, the block traces its plain expression (fullgraph: no break on the custom function)
    block = create_attention("se_released", 32)
    x = torch.randn(2, 32, 5, 5)
    got = _step(torch.compile(block, backend="aot_eager", fullgraph=True), x, params=block)
    want = _step(copy.deepcopy(block), x)
    _assert_same(got, want, torch.float32)


# ----------------------------------------------------------------------------- inference (no autograd)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("through_conv", [False, True], ids=["squeeze_x", "squeeze_through_conv3"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("batch", [1, 2])
def test_inference_path_matches_reference(channels_last, through_conv, mode, batch, monkeypatch):
    # the small net's tensors are below the threshold: force the squeeze through conv3 (or forbid it)
    monkeypatch.setattr(fused, "SQUEEZE_THROUGH_CONV_MIN_SAVING", -10**9 if through_conv else 10**18)
    taken = []
    monkeypatch.setattr(_attn, "squeeze_through_conv", lambda *a: taken.append(squeeze_through_conv(*a)) or taken[-1])
    net = _net("bottleneck", torch.float64, channels_last).eval()
    x = torch.randn(batch, 3, 32, 32, dtype=torch.float64)
    before = x.clone()
    with getattr(torch, mode)():
        got = net(x)
    with torch.no_grad(), reference_path():
        want = net(x)
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    assert torch.equal(x, before)
    assert len(taken) == 4 and all((z is not None) == through_conv for z in taken)


@pytest.mark.parametrize("batch", [1, 3], ids=["gemv", "gemm"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("given_z", [False, True], ids=["squeeze_x", "given_z"])
def test_infer_excitation_matches_the_modules(batch, bias, given_z):
    # the lean inference excitation: mean, two linears, in-place ReLU and sigmoid, no module calls
    se = create_attention("se", 48, bias=bias).double()
    x = torch.randn(batch, 48, 5, 7, dtype=torch.float64)
    want = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean((2, 3)))))).view(batch, 48, 1, 1)  # eqs. 2-3, by modules
    with torch.inference_mode():
        got = se.infer_excitation(x, x.mean((2, 3), keepdim=True) if given_z else None)
    assert got.shape == (batch, 48, 1, 1)
    torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_infer_excitation_steps_aside_where_the_modules_matter():
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    calls = []
    hooked = create_attention("se_released", 16).double()
    hooked.fc1.register_forward_hook(lambda *a: calls.append("fc1"))

    class Doubled(SqueezeExcite):  # a subclass's own pooled_logits is honoured
        def pooled_logits(self, z):
            return 2 * super().pooled_logits(z)

    swapped = create_attention("se_released", 16).double()
    weight = 2 * swapped.fc1.weight.detach()
    del swapped.fc1.weight
    swapped.fc1.weight = weight  # a plain tensor attribute, no parameter (as pruning utilities leave it)
    blocks = [hooked, create_attention("se_released", 16, gate="hard_sigmoid").double(),
              create_attention("se_released", 16, fc="conv").double(), Doubled(16, bias=True).double(), swapped]
    for block in blocks:
        with torch.no_grad():
            torch.testing.assert_close(block.infer_excitation(x), block.excitation(x), **TOL[torch.float64])
    assert calls == ["fc1", "fc1"]  # infer_excitation and excitation both called the hooked module


@pytest.mark.parametrize("through_conv", [False, True], ids=["squeeze_x", "through_conv"])
@pytest.mark.parametrize("batch", [1, 2])
def test_inference_under_autocast_matches_reference(batch, through_conv, monkeypatch):
    # the lean excitation steps aside under autocast (F.linear casts, its weights would not be cast);
    # the squeeze through conv3 mixes bfloat16 values with float32 BN statistics; bfloat16 on the CPU
    monkeypatch.setattr(fused, "SQUEEZE_THROUGH_CONV_MIN_SAVING", -10**9 if through_conv else 10**9)
    net = _net("bottleneck", torch.float32, False).eval()
    x = torch.randn(batch, 3, 32, 32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = net(x)
        with reference_path():
            want = net(x)
    with torch.inference_mode():
        exact = net(x)  # float32
    assert got.dtype == want.dtype == torch.bfloat16
    # fused or not, both round differently in bfloat16 (8 bits): each is as close to float32 as the other
    err_got, err_want = (got.float() - exact).abs().max(), (want.float() - exact).abs().max()
    assert err_got <= 2 * err_want + 1e-3 and err_want <= 2 * err_got + 1e-3
    torch.testing.assert_close(got.float(), exact, rtol=5e-2, atol=1e-2)


def test_cheap_onnx_export_flag_follows_torch(monkeypatch):
    from torch.onnx._internal.exporter import _flags
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    for dynamo_flag in (False, True):
        for script_flag in (False, True):
            monkeypatch.setattr(_flags, "_is_onnx_exporting", dynamo_flag)
            monkeypatch.setattr(GLOBALS, "_in_onnx_export", script_flag)
            assert fused._in_onnx_export() == torch.onnx.is_in_onnx_export() == (dynamo_flag or script_flag)
            assert fused.eager() == (not (dynamo_flag or script_flag))


def test_plain_resnet_inference_adds_in_place_with_the_same_result():
    net = _net("bottleneck", torch.float64, False, attn=None).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        got = net(x)
        with reference_path():
            want = net(x)
    assert torch.equal(got, want)


@pytest.mark.parametrize("attn", ["se_released", None])
def test_inference_never_writes_into_a_watched_bn_output(attn):
    net = _net("bottleneck", torch.float32, False, attn=attn).eval()
    seen = []
    net.layer1[0].bn3.register_forward_hook(lambda m, a, out: seen.append((out, out.clone())))
    with torch.no_grad():
        net(torch.randn(2, 3, 32, 32))
    (out, copy_at_hook), = seen
    assert torch.equal(out, copy_at_hook)


def test_squeeze_through_conv_by_hand(monkeypatch):
    monkeypatch.setattr(fused, "SQUEEZE_THROUGH_CONV_MIN_SAVING", -10**9)
    conv, bn = nn.Conv2d(8, 24, 1, bias=True).double(), nn.BatchNorm2d(24).double()
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(-2, 2)
    bn.bias.data.uniform_(-1, 1)
    bn.eval()
    h = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    with torch.no_grad():
        x = bn(conv(h))
        # A (W mean h + b) + B written out: A = γ / sqrt(σ² + ε), B = β - μ A
        A = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        by_hand = (conv.weight[:, :, 0, 0] @ h.mean((2, 3)).T + conv.bias[:, None]).T * A
        by_hand += bn.bias - bn.running_mean * A
        got = squeeze_through_conv(conv, h, bn, x)
    torch.testing.assert_close(got, x.mean((2, 3), keepdim=True), **TOL[torch.float64])
    torch.testing.assert_close(got.flatten(1), by_hand, **TOL[torch.float64])
    # where it is not exact (or not 1x1 / one group / eval statistics) it declines
    for other in (nn.Conv2d(8, 24, 1, stride=2), nn.Conv2d(8, 24, 3, padding=1), nn.Conv2d(8, 24, 1, groups=2)):
        assert squeeze_through_conv(other.double(), h, bn, x) is None
    assert squeeze_through_conv(conv, h, nn.BatchNorm2d(24, track_running_stats=False).double().eval(), x) is None
    assert squeeze_through_conv(conv, h, bn.train(), x) is None
    monkeypatch.setattr(fused, "SQUEEZE_THROUGH_CONV_MIN_SAVING", 2**18)  # the default: these are tiny
    assert squeeze_through_conv(conv, h, bn.eval(), x) is None
    # a minimum given (torch.compile's): taken at exactly that many elements fewer read, not one more
    saving = x.numel() - h.numel() - conv.weight.numel()
    assert squeeze_through_conv(conv, h, bn, x, min_saving=saving) is not None
    assert squeeze_through_conv(conv, h, bn, x, min_saving=saving + 1) is None


@pytest.mark.parametrize("hooked", ["conv3", "bn3"])
def test_squeeze_through_conv_declines_for_hooked_modules(hooked, monkeypatch):
    # a forward hook may change conv3's or bn3's output: then mean_hw x is not computable from h
    monkeypatch.setattr(fused, "SQUEEZE_THROUGH_CONV_MIN_SAVING", -10**9)
    net = _net("bottleneck", torch.float64, False).eval()
    for unit in (m for m in net.modules() if hasattr(m, "conv3")):
        getattr(unit, hooked).register_forward_hook(lambda mod, inp, out: 2 * out)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.inference_mode():
        got = net(x)
        with reference_path():
            want = net(x)
    torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("attn", ["se_released", None])
def test_inference_leaves_the_units_input_alone(attn, monkeypatch):
    # an identity shortcut is the caller's tensor: the in-place end may write into BN's output only
    monkeypatch.setattr(fused, "SQUEEZE_THROUGH_CONV_MIN_SAVING", -10**9)
    make = partial(create_attention, attn) if attn else (lambda c: nn.Identity())
    unit = Bottleneck(32, 8, downsample=nn.Identity(), make_attn=make).double().eval()
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64)
    before = x.clone()
    with torch.no_grad():
        got = unit(x)
        assert torch.equal(x, before)
        with reference_path():
            want = unit(x)
    torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_with_affine_is_batchnorm(momentum, affine):
    # the training fast path runs BN as native_batch_norm to keep its statistics: same output,
    # gradients, running statistics and step count as nn.BatchNorm2d, and A c + B == bn(c)
    bn = nn.BatchNorm2d(6, momentum=momentum, affine=affine).double()
    if affine:
        bn.weight.data.uniform_(0.5, 2), bn.bias.data.uniform_(-1, 1)
    ref = copy.deepcopy(bn)
    for _ in range(2):
        c = (torch.randn(3, 6, 5, 4, dtype=torch.float64) * 2 + 1).requires_grad_()
        c_ref = c.detach().clone().requires_grad_()
        out, A, B = batch_norm_with_affine(bn, c)
        want = ref(c_ref)
        torch.testing.assert_close(out, want, **TOL[torch.float64])
        torch.testing.assert_close(A * c.detach() + B, want.detach(), **TOL[torch.float64])
        g = torch.randn_like(want)
        out.backward(g), want.backward(g)
        torch.testing.assert_close(c.grad, c_ref.grad, **TOL[torch.float64])
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(bn, name), getattr(ref, name), **TOL[torch.float64], msg=name)
        if affine:
            torch.testing.assert_close(bn.weight.grad, ref.weight.grad, **TOL[torch.float64])


def test_batch_norm_with_affine_declines_or_refuses():
    bn, c = nn.BatchNorm2d(4), torch.randn(2, 4, 3, 3)
    handle = bn.register_forward_hook(lambda *a: None)
    assert batch_norm_with_affine(bn, c) is None  # hooked: the module must be called
    handle.remove()

    class MyBN(nn.BatchNorm2d):
        pass
    assert batch_norm_with_affine(MyBN(4), c) is None  # a subclass may compute something else
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert batch_norm_with_affine(bn, c) is None
    out, A, B = batch_norm_with_affine(bn.eval(), c)  # eval: the running statistics' map
    torch.testing.assert_close(A * c + B, out)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_with_affine(nn.BatchNorm2d(4), torch.randn(1, 4, 1, 1))


def test_plain_resnet_training_adds_in_place_with_the_same_gradients():
    net = _net("bottleneck", torch.float64, False, attn=None).train()
    _assert_matches_reference(net, torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided"])
def test_scale_shift_is_x_times_scale_plus_shift(dtype, layout, monkeypatch):
    x = torch.randn(3, 5, 4, 6, dtype=dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(3, 5, 4, 12, dtype=dtype)[..., ::2]
    scale, shift = torch.rand(3, 5, 1, 1, dtype=dtype), torch.randn(3, 5, 1, 1, dtype=dtype)
    want = torch.empty_like(x)
    for b in range(3):
        for c in range(5):
            want[b, c] = x[b, c] * scale[b, c, 0, 0] + shift[b, c, 0, 0]
    calls, real = [], torch.addcmul
    monkeypatch.setattr(torch, "addcmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = fused.scale_shift(x, scale, shift)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, **TOL[dtype])
    assert calls == ([] if layout == "nchw" else [1])  # NCHW: BatchNorm's kernel, not addcmul


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "mixed"])
def test_channel_sums_by_hand(dtype, layout):
    # BatchNorm's backward used as a fused per-(b, c) reduction: Σ_hw g x and Σ_hw g
    gen = torch.Generator().manual_seed(0)
    g, x = (torch.randn(3, 5, 4, 6, dtype=dtype, generator=gen) for _ in range(2))
    want_gx = torch.einsum("bchw,bchw->bc", g.double(), x.double()).view(3, 5, 1, 1)
    want_gs = g.double().sum((2, 3), keepdim=True)
    cl = torch.channels_last
    if layout == "nhwc":
        g, x = g.contiguous(memory_format=cl), x.contiguous(memory_format=cl)
    elif layout == "mixed":
        x = x.contiguous(memory_format=cl)
    gx, gs = channel_sums(g, x)
    tol = TOL[dtype]
    torch.testing.assert_close(gx.double(), want_gx, **tol)
    torch.testing.assert_close(gs.double(), want_gs, **tol)
    assert gx.shape == gs.shape == (3, 5, 1, 1) and gx.dtype == dtype


@pytest.mark.parametrize("where", ["bn3", "attn"])
def test_backward_hooks_fire(where):
    # a full backward hook (Grad-CAM style) on a module the fast path would skip: the unit calls it,
    # and the results equal an unhooked run's
    net = _net("bottleneck", torch.float64, False).train()
    plain = copy.deepcopy(net)
    seen = []
    handle = getattr(net.layer1[0], where).register_full_backward_hook(lambda m, gin, gout: seen.append(m))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    got = _step(net, x)
    handle.remove()
    assert seen == [getattr(net.layer1[0], where)]
    want = _step(plain, x)  # the hooked unit runs unfused: same values up to float64 rounding
    for a, b in [(got[0], want[0]), (got[1], want[1]), *((got[2][n], want[2][n]) for n in want[2])]:
        torch.testing.assert_close(a / b.abs().max(), b / b.abs().max(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_the_paths_other_devices_take_match_reference(channels_last, train, monkeypatch):
    # On devices outside BN_KERNEL_DEVICES (and in half precision) BatchNorm's kernels do not stand in
    # (channel_sums, scale_shift fall back to plain ops) and training BN runs as the module (A, B from
    # bn_affine's reductions). Those branches, forced on the CPU, against the reference in float64;
    # tests/test_devices.py runs CUDA's own where a GPU is present.
    real_with_affine, calls = _attn.batch_norm_with_affine, []
    monkeypatch.setattr(fused, "_bn_kernels_fit", lambda *tensors, devices=None: calls.append(1) and False)
    monkeypatch.setattr(_attn, "batch_norm_with_affine",
                        lambda bn, c: None if bn.training else real_with_affine(bn, c))
    net = _net("bottleneck", torch.float64, channels_last).train(train)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    _assert_matches_reference(net, x.contiguous(memory_format=torch.channels_last) if channels_last else x,
                              torch.float64)
    assert calls  # the fallbacks were asked for, and taken


@pytest.mark.parametrize("train,grad", [(True, True), (False, True), (False, False)],
                         ids=["train", "eval_grad", "no_grad"])
def test_empty_batch_behaves_like_the_reference(train, grad):
    """A batch of 0 samples (a detection head with no boxes, an uneven last shard): the same empty outputs,
    gradients and BN state as the reference. Before commit fbc1187 BatchNorm's backward kernel on the
    empty view divided by zero (SIGFPE: the process died) and training raised where the module does not."""
    results = []
    for ctx in (contextlib.nullcontext, reference_path):
        torch.manual_seed(0)
        model = _net("bottleneck", torch.float64, False).train(train)
        block = create_attention("se_released", 32).double()
        x = torch.randn(0, 3, 32, 32, dtype=torch.float64, requires_grad=grad)
        xb = torch.randn(0, 32, 5, 5, dtype=torch.float64, requires_grad=grad)
        with ctx(), torch.set_grad_enabled(grad):
            out, outb = model(x), block(xb)
            if grad:
                (out.sum() + outb.sum()).backward()
        assert out.shape == (0, 5) and outb.shape == xb.shape
        grads = [x.grad, xb.grad] + [p.grad for p in (*model.parameters(), *block.parameters())] if grad else []
        results.append((grads, copy.deepcopy(model.state_dict())))
    (g_fast, s_fast), (g_ref, s_ref) = results
    for a, b in zip(g_fast, g_ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, equal_nan=True)
    for k in s_ref:
        torch.testing.assert_close(s_fast[k], s_ref[k], equal_nan=True)
