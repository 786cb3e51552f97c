"""The attention-block contract, checked for every registered block, and the SE family checked
against independent references: the papers' formulas computed by hand, their parameter counts,
and torchvision's / timm's modules fed the same weights."""

import io
import math

import numpy as np
import pytest
import torch
from helpers import randomize
from torch import nn

import senet
from senet.layers import create_attention, list_attentions, odd_kernel

C = 32
ALL = list_attentions()


def _block(name, channels=C, **kw):
    torch.manual_seed(0)
    block = create_attention(name, channels, **kw)
    return randomize(block, 0.5)  # gates, norms and biases all matter in comparisons


# --- the contract, for every registered block -------------------------------------------------

@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(2, C, 5, 7), (1, C, 1, 1), (3, C, 8, 8)])
def test_shape_and_finite(name, shape):
    x = torch.randn(shape)
    y = _block(name)(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_input_and_params(name):
    block = _block(name).train()
    x = torch.randn(2, C, 6, 6, requires_grad=True)
    block(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in block.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reached {pname}"


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(name, dtype):
    block = _block(name)
    x = torch.randn(2, C, 6, 5)
    ref = block(x)
    y = block.to(dtype)(x.to(dtype))
    assert y.dtype == dtype
    # The float32 reference itself carries float32 rounding (SK sums 288 products per output).
    tol = 1e-5 if dtype == torch.float64 else 1e-1
    torch.testing.assert_close(y.float(), ref, atol=tol * ref.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("name", ALL)
def test_channels_last_matches_contiguous(name):
    block = _block(name)
    x = torch.randn(2, C, 7, 6)
    ref = block(x)
    torch.testing.assert_close(block(x.to(memory_format=torch.channels_last)), ref,
                               atol=1e-6 * ref.abs().max().item(), rtol=1e-5)


def onnx_bytes(module, x, dynamo):
    """Export with the torch.export-based exporter (PyTorch's default) or the TorchScript one; batch dynamic."""
    if dynamo:
        batch = torch.export.Dim("batch")
        return torch.onnx.export(module, (x,), dynamo=True, input_names=["x"],
                                 dynamic_shapes=({0: batch},)).model_proto.SerializeToString()
    buf = io.BytesIO()
    torch.onnx.export(module, (x,), buf, input_names=["x"], dynamo=False, dynamic_axes={"x": {0: "batch"}})
    return buf.getvalue()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_parity(name, dynamo):
    ort = pytest.importorskip("onnxruntime")
    block = _block(name)
    sess = ort.InferenceSession(onnx_bytes(block, torch.randn(2, C, 6, 5), dynamo), providers=["CPUExecutionProvider"])
    for batch in (2, 3):  # the batch axis is dynamic
        xb = torch.randn(batch, C, 6, 5)
        (out,) = sess.run(None, {"x": xb.numpy()})
        np.testing.assert_allclose(out, block(xb).detach().numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_torch_export(name):
    block = _block(name)
    x = torch.randn(2, C, 6, 5)
    ep = torch.export.export(block, (x,))
    torch.testing.assert_close(ep.module()(x), block(x))


@pytest.mark.parametrize("name", ALL)
def test_torch_compile_traces(name):
    # backend="eager" checks that dynamo captures the block (no graph break in our code) without
    # paying for inductor code generation in every test; one full inductor compile is below.
    block = _block(name)
    x = torch.randn(2, C, 6, 5)
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x))


def test_torch_compile_inductor_se():
    block = _block("se")
    x = torch.randn(2, C, 6, 5)
    torch.testing.assert_close(torch.compile(block)(x), block(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_docstring_names_paper(name):
    d = senet.layers.describe_attention(name)
    assert re_arxiv(d["arxiv"]), d
    assert d["summary"] and d["paper"]


def re_arxiv(s):
    import re

    return re.fullmatch(r"\d{4}\.\d{4,5}", s) is not None


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_wrong_input_named(name):
    block = _block(name)
    with pytest.raises(ValueError, match="4D"):
        block(torch.randn(2, C, 8))
    with pytest.raises(ValueError, match=f"built for {C} channels but the input has {C + 1}"):
        block(torch.randn(2, C + 1, 4, 4))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("channels", [0, -3, 2.5])
def test_bad_channels(name, channels):
    with pytest.raises(ValueError, match="channels"):
        create_attention(name, channels)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown attention 'nope'.*'se'"):
        create_attention("nope", 8)
    with pytest.raises(ValueError, match="unknown gate 'softsign'.*hard_sigmoid"):
        create_attention("se", 64, gate="softsign")
    with pytest.raises(ValueError, match="unknown activation 'blah'"):
        create_attention("se", 64, act="blah")
    with pytest.raises(ValueError, match="fc must be one of"):
        create_attention("se", 64, fc="mlp")
    with pytest.raises(ValueError, match="pool must be one of"):
        create_attention("se", 64, pool="median")


def test_empty_hidden_layer_refused():
    with pytest.raises(ValueError, match=r"reduction=16 on 8 channels leaves an empty hidden layer"):
        create_attention("se", 8)
    with pytest.raises(ValueError, match="hidden must be a positive integer"):
        create_attention("se", 8, hidden=0)
    with pytest.raises(ValueError, match="reduction must be a positive number"):
        create_attention("se", 8, reduction=0)
    assert create_attention("se", 8, reduction=16, divisor=8).hidden == 8  # rounding never empties


@pytest.mark.parametrize("k", [2, 4, 0, -1])
def test_eca_even_kernel_refused(k):
    with pytest.raises(ValueError, match=f"kernel_size must be a positive odd integer, got {k}"):
        create_attention("eca", 64, kernel_size=k)


def test_se_gc_groups_must_divide():
    with pytest.raises(ValueError, match="divisor of channels=24"):
        create_attention("se_gc", 24, groups=5)


# --- SE against eq. 2-4 by hand ------------------------------------------------------------------

def _se_by_hand(x, w1, w2, b1=None, b2=None, gate=torch.sigmoid, pool="avg"):
    z = x.mean((2, 3)) if pool == "avg" else x.amax((2, 3))  # (B, C), eq. 2
    h = torch.relu(z @ w1.T + (0 if b1 is None else b1))  # δ(W1 z)
    s = gate(h @ w2.T + (0 if b2 is None else b2))  # σ(W2 δ(W1 z)), eq. 3
    return x * s[:, :, None, None]  # eq. 4


def test_se_default_is_paper_eq3():
    block = _block("se", 64)
    assert block.hidden == 4 and block.fc1.bias is None and block.fc2.bias is None
    assert isinstance(block.fc1, nn.Linear) and block.pool == "avg"
    x = torch.randn(3, 64, 5, 4, dtype=torch.float64)
    block = block.double()
    torch.testing.assert_close(block(x), _se_by_hand(x, block.fc1.weight, block.fc2.weight))


def test_se_conv_bias_maxpool_hardsigmoid_by_hand():
    block = _block("se", 48, fc="conv", bias=True, pool="max", gate="hard_sigmoid", reduction=4).double()
    x = torch.randn(2, 48, 3, 7, dtype=torch.float64)
    w1, w2 = block.fc1.weight[:, :, 0, 0], block.fc2.weight[:, :, 0, 0]
    expect = _se_by_hand(x, w1, w2, block.fc1.bias, block.fc2.bias,
                         gate=lambda t: torch.clamp(t + 3, 0, 6) / 6, pool="max")
    torch.testing.assert_close(block(x), expect)


@pytest.mark.parametrize("channels,r", [(64, 16), (256, 16), (2048, 16), (96, 8), (64, 2)])
def test_se_parameter_count_is_2c2_over_r(channels, r):
    block = create_attention("se", channels, reduction=r)
    assert sum(p.numel() for p in block.parameters()) == 2 * channels * channels // r


def test_hidden_width_knobs():
    assert create_attention("se", 100, reduction=16).hidden == 6  # C // r, no rounding by default
    assert create_attention("se", 100, reduction=16, divisor=8).hidden == 8
    assert create_attention("se", 100, hidden=7).hidden == 7
    # EfficientNet habit: hidden from the block's input channels (e.g. 16), scaled channels 96.
    b = create_attention("se", 96, reduction=4, hidden_from=16, fc="conv", bias=True, act="silu")
    assert b.hidden == 4 and b.fc1.weight.shape == (4, 96, 1, 1) and b.fc2.weight.shape == (96, 4, 1, 1)


def test_released_preset_has_biases():
    b = create_attention("se_released", 256)
    assert b.fc1.bias is not None and b.hidden == 16
    assert sum(p.numel() for p in b.parameters()) == 2 * 256 * 16 + 16 + 256


@pytest.mark.parametrize("channels", [16, 72, 120, 240, 672, 960])
def test_mobilenetv3_preset_matches_torchvision(channels):
    """torchvision MobileNetV3: SqueezeExcitation(C, _make_divisible(C // 4, 8), scale_activation=Hardsigmoid)."""
    tv_ops = pytest.importorskip("torchvision.ops")
    from torchvision.models._utils import _make_divisible

    ours = _block("se_mobilenetv3", channels)
    theirs = tv_ops.SqueezeExcitation(channels, _make_divisible(channels // 4, 8), scale_activation=nn.Hardsigmoid)
    assert ours.hidden == theirs.fc1.out_channels
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, channels, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))


def test_se_matches_torchvision_squeeze_excitation():
    tv_ops = pytest.importorskip("torchvision.ops")
    ours = _block("se", 64, fc="conv", bias=True, reduction=8)
    theirs = tv_ops.SqueezeExcitation(64, 8)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 64, 7, 3)
    torch.testing.assert_close(ours(x), theirs(x))


def test_se_matches_timm_semodule():
    timm_layers = pytest.importorskip("timm.layers")
    ours = _block("se_released", 128, fc="conv")
    theirs = timm_layers.SEModule(128, rd_ratio=1 / 16, bias=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 128, 5, 6)
    torch.testing.assert_close(ours(x), theirs(x))


def test_linear_and_conv_se_agree_on_same_weights():
    lin = _block("se", 64, bias=True)
    conv = create_attention("se", 64, bias=True, fc="conv").eval()
    conv.load_state_dict({k: (v[:, :, None, None] if v.dim() == 2 else v) for k, v in lin.state_dict().items()})
    x = torch.randn(2, 64, 4, 4)
    torch.testing.assert_close(conv(x), lin(x))


def test_ese_matches_timm():
    timm_layers = pytest.importorskip("timm.layers")
    ours = _block("ese", 64)
    theirs = timm_layers.EffectiveSEModule(64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 64, 5, 3)
    torch.testing.assert_close(ours(x), theirs(x))
    assert sum(p.numel() for p in ours.parameters()) == 64 * 64 + 64


# --- the ECA paper's SE variants ----------------------------------------------------------------

def test_se_var1_by_hand():
    x = torch.randn(2, C, 4, 5)
    torch.testing.assert_close(_block("se_var1")(x), x * torch.sigmoid(x.mean((2, 3), keepdim=True)))
    assert sum(p.numel() for p in create_attention("se_var1", C).parameters()) == 0


def test_se_var2_by_hand():
    b = _block("se_var2")
    x = torch.randn(2, C, 4, 5)
    expect = x * torch.sigmoid(b.weight[None, :, None, None] * x.mean((2, 3), keepdim=True))
    torch.testing.assert_close(b(x), expect)
    assert sum(p.numel() for p in b.parameters()) == C


def test_se_var3_by_hand():
    b = _block("se_var3")
    x = torch.randn(2, C, 4, 5)
    w = b.fc.weight[:, :, 0, 0]
    torch.testing.assert_close(b(x), x * torch.sigmoid(x.mean((2, 3)) @ w.T)[:, :, None, None])
    assert sum(p.numel() for p in b.parameters()) == C * C


@pytest.mark.parametrize("groups", [16, 4, 2])
def test_se_gc_by_hand(groups):
    b = _block("se_gc", C, groups=groups)
    x = torch.randn(2, C, 4, 5)
    # A grouped FC is a block-diagonal full FC.
    g = C // groups
    w = torch.block_diag(*[b.fc.weight[i * g:(i + 1) * g, :, 0, 0] for i in range(groups)])
    torch.testing.assert_close(b(x), x * torch.sigmoid(x.mean((2, 3)) @ w.T)[:, :, None, None])
    assert sum(p.numel() for p in b.parameters()) == C * C // groups


# --- ECA ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels,k", [(1, 1), (16, 3), (64, 3), (128, 5), (256, 5), (512, 5), (1024, 5),
                                        (2048, 7), (4096, 7)])
def test_eca_adaptive_kernel(channels, k):
    # k = |log2(C)/2 + 1/2|_odd computed by hand: t = int(...), t + 1 if t is even.
    t = int(abs(math.log2(channels) / 2 + 0.5))
    assert k == (t if t % 2 else t + 1) == odd_kernel(channels)
    block = create_attention("eca", channels)
    assert block.kernel_size == k and sum(p.numel() for p in block.parameters()) == k


@pytest.mark.parametrize("circular", [False, True])
def test_eca_by_hand(circular):
    b = _block("ceca" if circular else "eca", C, kernel_size=5)
    x = torch.randn(2, C, 3, 4)
    y = x.mean((2, 3))  # (B, C)
    w = b.conv.weight.view(5)
    s = torch.zeros_like(y)
    for c in range(C):  # s_c = σ(Σ_j w_j y_{c+j-2}), zero or circular padding
        for j in range(5):
            idx = c + j - 2
            if circular:
                s[:, c] += w[j] * y[:, idx % C]
            elif 0 <= idx < C:
                s[:, c] += w[j] * y[:, idx]
    torch.testing.assert_close(b(x), x * torch.sigmoid(s)[:, :, None, None])


@pytest.mark.parametrize("name", ["eca", "ceca"])
def test_eca_matches_timm(name):
    timm_layers = pytest.importorskip("timm.layers")
    ours = _block(name, 64, kernel_size=3)
    theirs = (timm_layers.EcaModule if name == "eca" else timm_layers.CecaModule)(64, kernel_size=3)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 64, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))


# --- sSE / scSE ---------------------------------------------------------------------------------

def test_sse_by_hand():
    b = _block("sse")
    x = torch.randn(2, C, 4, 5)
    q = torch.sigmoid(torch.einsum("bchw,c->bhw", x, b.conv.weight.view(C)) + b.conv.bias)
    torch.testing.assert_close(b(x), x * q[:, None])
    assert sum(p.numel() for p in b.parameters()) == C + 1


@pytest.mark.parametrize("combine", ["add", "max"])
def test_scse_combines_branches(combine):
    b = _block("scse", combine=combine, reduction=4)
    x = torch.randn(2, C, 4, 5)
    c, s = b.cse(x), b.sse(x)
    torch.testing.assert_close(b(x), c + s if combine == "add" else torch.maximum(c, s))
    with pytest.raises(ValueError, match="combine must be one of"):
        create_attention("scse", C, combine="mean")


def test_factory_passes_kwargs_and_none():
    assert isinstance(create_attention(None, 8), nn.Identity)
    assert isinstance(create_attention("none", 8), nn.Identity)
    assert create_attention("se", 64, reduction=4).hidden == 16
