"""The attention families beyond SE (CBAM, BAM, SK, GE, GC, SRM, GCT, coordinate attention) checked
against independent references: timm's modules fed the same weights, the papers' formulas computed
by hand, and the papers' parameter counts. The generic block contract is in test_layers.py."""

import math

import pytest
import torch
from helpers import randomize
from torch import nn
from torch.nn import functional as F

from senet.layers import cbam_from_timm, cbam_to_timm, create_attention
from senet.layers._common import floored_width

timm_layers = pytest.importorskip("timm.layers")

RESNET50 = 25_557_032  # torchvision resnet50, REFERENCE.md
# ResNet-50 bottleneck outputs: (channels, blocks) per stage
RESNET50_STAGES = ((256, 3), (512, 4), (1024, 6), (2048, 3))



def _randomize(module: nn.Module) -> nn.Module:
    """Every parameter and BN statistic random, eval mode, float64, so every weight matters."""
    return randomize(module, 0.3).double()

def _block(name, channels, **kw):
    return _randomize(create_attention(name, channels, **kw))


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _x(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def _bn(t, bn):  # eval-mode BatchNorm by hand
    shape = (1, -1) + (1,) * (t.dim() - 2)
    return (t - bn.running_mean.view(shape)) / (bn.running_var.view(shape) + bn.eps).sqrt() \
        * bn.weight.view(shape) + bn.bias.view(shape)


# --- CBAM ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True])
def test_cbam_matches_timm_both_ways(bias):
    from timm.layers.cbam import CbamModule

    theirs = _randomize(CbamModule(64, rd_ratio=1 / 16, mlp_bias=bias))
    ours = create_attention("cbam", 64, bias=bias).double().eval()
    ours.load_state_dict(cbam_from_timm(theirs.state_dict()))
    x = _x(2, 64, 5, 7)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=1e-10)
    ours = _block("cbam", 64, bias=bias)
    back = CbamModule(64, mlp_bias=bias).double().eval()
    back.load_state_dict(cbam_to_timm(ours.state_dict()))
    torch.testing.assert_close(back(x), ours(x), atol=1e-10, rtol=1e-10)


def test_cbam_by_hand():
    b = _block("cbam", 32, reduction=4)
    x = _x(2, 32, 4, 6)

    def mlp(z):  # W1 δ(W0 z + b0) + b1 on (B, C)
        w0, w1 = b.fc1.weight[:, :, 0, 0], b.fc2.weight[:, :, 0, 0]
        return torch.relu(z @ w0.T + b.fc1.bias) @ w1.T + b.fc2.bias

    mc = torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))  # eq. 2
    f = x * mc[:, :, None, None]
    pooled = torch.stack([f.mean(1), f.amax(1)], 1)
    ms = torch.sigmoid(_bn(F.conv2d(pooled, b.spatial_conv.weight, padding=3), b.spatial_bn))  # eq. 3
    torch.testing.assert_close(b(x), f * ms)


def test_cbam_resnet50_count_is_paper_28_09m():
    # REFERENCE.md / Woo et al.: ResNet-50 + CBAM 28.09M. One CBAM per bottleneck (16), MLP with biases and
    # a 7x7 conv + BN: exactly SE-ResNet-50 (28,088,024, REFERENCE.md) + 16 x (2*49 + 2).
    added = sum(n * _params(create_attention("cbam", c)) for c, n in RESNET50_STAGES)
    assert RESNET50 + added == 28_088_024 + 16 * 100
    assert round((RESNET50 + added) / 1e6, 2) == 28.09


def test_cbam_bad_kernel():
    with pytest.raises(ValueError, match="kernel_size must be a positive odd integer.*got 4"):
        create_attention("cbam", 64, kernel_size=4)


# --- BAM ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("combine", ["add", "mul"])
def test_bam_by_hand(combine):
    b = _block("bam", 32, reduction=4, combine=combine)
    x = _x(2, 32, 9, 11)
    ch, sp = b.channel, b.spatial
    z = x.mean((2, 3), keepdim=True)
    mc = _bn(F.conv2d(torch.relu(_bn(F.conv2d(z, ch[0][0].weight, ch[0][0].bias), ch[0][1])),
                      ch[1].weight, ch[1].bias), ch[2])  # eq. 3, (B, C, 1, 1)
    t = torch.relu(_bn(F.conv2d(x, sp[0][0].weight, sp[0][0].bias), sp[0][1]))
    for i in (1, 2):  # two 3x3 convs, dilation 4, "same" padding
        t = torch.relu(_bn(F.conv2d(t, sp[i][0].weight, sp[i][0].bias, padding=4, dilation=4), sp[i][1]))
    ms = _bn(F.conv2d(t, sp[3].weight, sp[3].bias), sp[4])  # eq. 4, (B, 1, H, W)
    m = torch.sigmoid(mc + ms if combine == "add" else mc * ms)
    torch.testing.assert_close(b(x), x + x * m)  # eq. 1


def test_bam_resnet50_count_is_paper_25_92m():
    # Park et al. (ImageNet table): ResNet-50 + BAM 25.92M; one BAM at each of the 3 stage
    # boundaries, on 256, 512 and 1024 channels, r = 16.
    added = sum(_params(create_attention("bam", c)) for c in (256, 512, 1024))
    assert round((RESNET50 + added) / 1e6, 2) == 25.92


def test_bam_bad_kwargs():
    with pytest.raises(ValueError, match="combine must be one of"):
        create_attention("bam", 64, combine="max")
    with pytest.raises(ValueError, match="dilation must be an integer >= 1.*got 0"):
        create_attention("bam", 64, dilation=0)


# --- SK -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels,groups", [(64, 1), (64, 8)])
def test_sk_matches_timm(channels, groups):
    theirs = _randomize(timm_layers.SelectiveKernel(channels, kernel_size=[3, 5], split_input=False,
                                                    rd_channels=32, groups=groups))
    ours = create_attention("sk", channels, groups=groups).double().eval()
    assert ours.hidden == 32
    rename = {"attn.fc_reduce.": "fc_reduce.", "attn.bn.": "bn.", "attn.fc_select.": "fc_select."}
    for i in (0, 1):
        rename |= {f"paths.{i}.conv.": f"branches.{i}.0.", f"paths.{i}.bn.": f"branches.{i}.1."}
    state = {}
    for k, v in theirs.state_dict().items():
        prefix = next(p for p in rename if k.startswith(p))
        state[rename[prefix] + k[len(prefix):]] = v
    ours.load_state_dict(state)
    x = _x(2, channels, 7, 5)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("channels,kw,d", [(64, {}, 32), (1024, {}, 64), (2048, {"reduction": 8}, 256),
                                           (8, {}, 32), (64, {"min_hidden": 2}, 4), (64, {"hidden": 5}, 5)])
def test_sk_hidden_is_max_c_over_r_and_l(channels, kw, d):
    args = {"reduction": 16, "hidden": None, "divisor": 1, "hidden_from": None, "min_hidden": 32, **kw}
    assert floored_width(channels, **args) == d  # d = max(C/r, L), eq. 4
    if channels <= 64:
        assert create_attention("sk", channels, **kw).hidden == d


def test_sk_selection_is_softmax_over_branches():
    b = _block("sk", 32, dilations=(1, 2, 3))
    x = _x(2, 32, 6, 6)
    a = b.excitation(x)
    assert a.shape == (2, 3, 32, 1, 1)
    torch.testing.assert_close(a.sum(1), torch.ones(2, 32, 1, 1, dtype=torch.float64))
    torch.testing.assert_close(b(x), sum(a[:, m] * b.branches[m](x) for m in range(3)))  # eq. 6


def test_sk_bad_kwargs():
    with pytest.raises(ValueError, match="groups must be a positive divisor of channels=48, got 5"):
        create_attention("sk", 48, groups=5)
    with pytest.raises(ValueError, match="dilations must be a tuple of >= 2"):
        create_attention("sk", 48, dilations=(1,))
    with pytest.raises(ValueError, match="min_hidden must be a positive integer"):
        create_attention("sk", 48, min_hidden=0)


# --- GE -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("extent", [0, 2, 4, 8])
def test_ge_parameter_free_matches_timm(extent):
    theirs = timm_layers.GatherExcite(32, extent=extent, use_mlp=False)
    ours = create_attention("ge", 32, extent=extent)
    assert _params(ours) == 0
    for shape in [(2, 32, 9, 7), (1, 32, 1, 1), (2, 32, 16, 16)]:
        x = _x(*shape)
        torch.testing.assert_close(ours(x), theirs(x))


def test_ge_global_is_se_without_mlp():
    x = _x(2, 16, 5, 3)
    torch.testing.assert_close(create_attention("ge", 16)(x), x * torch.sigmoid(x.mean((2, 3), keepdim=True)))


def _timm_param_ge(channels, extent, mlp):
    """timm's GatherExcite forward with the parametric gather (and MLP) its constructor means to build.

    timm 1.0.31's constructor raises for ``extra_params=True`` and ``use_mlp=True`` (``*dd`` passed
    positionally), so the same sub-layers are assembled here from timm's own ``create_conv2d`` and
    ``ConvMlp``; the gather, interpolation and gate of its forward are timm's.
    """
    module = timm_layers.GatherExcite(channels, extent=extent, use_mlp=False)
    gather = nn.Sequential()
    steps = int(math.log2(extent))
    for i in range(1, steps + 1):
        gather.add_module(f"conv{i}", timm_layers.create_conv2d(channels, channels, 3, stride=2, depthwise=True))
        gather.add_module(f"norm{i}", nn.BatchNorm2d(channels))
        if i < steps:
            gather.add_module(f"act{i}", nn.ReLU(inplace=True))
    module.gather = gather
    if mlp:
        module.mlp = timm_layers.ConvMlp(channels, channels // 16, act_layer=nn.ReLU)
    return _randomize(module)


@pytest.mark.parametrize("extent,mlp", [(2, False), (4, False), (8, True)])
def test_ge_param_matches_timm(extent, mlp):
    theirs = _timm_param_ge(64, extent, mlp)
    ours = create_attention("ge_param", 64, extent=extent, mlp=mlp).double().eval()
    ours.load_state_dict(theirs.state_dict())
    for shape in [(2, 64, 9, 7), (1, 64, 1, 1), (2, 64, 16, 16)]:
        x = _x(*shape)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=1e-10)


def test_ge_param_global_by_hand():
    # GE-θ, global extent: one depthwise conv spanning the whole map (no padding) + BN -> (B, C, 1, 1).
    b = _block("ge_param", 16, extent=0, feat_size=(5, 3))
    x = _x(2, 16, 5, 3)
    g = torch.einsum("bchw,chw->bc", x, b.gather.conv1.weight[:, 0])[:, :, None, None]
    torch.testing.assert_close(b(x), x * torch.sigmoid(_bn(g, b.gather.norm1)))
    assert _params(b) == 16 * 5 * 3 + 2 * 16


def test_ge_bad_kwargs():
    with pytest.raises(ValueError, match="extent must be an integer >= 0.*got -1"):
        create_attention("ge", 32, extent=-1)
    with pytest.raises(ValueError, match="power of two.*got 6"):
        create_attention("ge_param", 32, extent=6)
    with pytest.raises(ValueError, match=r"needs feat_size=\(H, W\)"):
        create_attention("ge_param", 32, extent=0)
    b = create_attention("ge_param", 32, extent=0, feat_size=7)
    with pytest.raises(ValueError, match=r"feat_size=\(7, 7\).*input is \(5, 5\)"):
        b(torch.randn(1, 32, 5, 5))


# --- GC -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fusion", ["add", "scale"])
def test_gc_matches_timm(fusion):
    theirs = _randomize(timm_layers.GlobalContext(64, fuse_add=fusion == "add", fuse_scale=fusion == "scale",
                                                  rd_channels=4))
    ours = create_attention("gc", 64, fusion=fusion, eps=1e-6).double().eval()  # timm's LayerNorm2d eps
    mlp = "mlp_add." if fusion == "add" else "mlp_scale."
    state = {k.replace(mlp, ""): v for k, v in theirs.state_dict().items()}
    state["norm.weight"], state["norm.bias"] = state["norm.weight"].view(4, 1, 1), state["norm.bias"].view(4, 1, 1)
    ours.load_state_dict(state)
    x = _x(2, 64, 6, 5)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=1e-10)


def test_gc_add_starts_as_identity_and_counts():
    b = create_attention("gc", 256)
    x = torch.randn(2, 256, 3, 4)
    torch.testing.assert_close(b(x), x)
    h = 256 // 16  # W_k (C + 1), W_v1 (C h + h), LN (2h), W_v2 (h C + C)
    assert _params(b) == (256 + 1) + (256 * h + h) + 2 * h + (h * 256 + 256)


def test_gc_bad_fusion():
    with pytest.raises(ValueError, match="fusion must be one of"):
        create_attention("gc", 64, fusion="concat")


# --- SRM ----------------------------------------------------------------------------------------

def test_srm_by_hand():
    b = _block("srm", 8)
    x = _x(3, 8, 4, 5)
    expect = torch.empty_like(x)
    for n in range(3):
        for c in range(8):
            v = x[n, c].flatten()
            mu = v.sum() / v.numel()
            sigma = math.sqrt(((v - mu) ** 2).sum() / v.numel() + 1e-5)  # eq. 2, 1/HW
            z = b.cfc[c, 0] * mu + b.cfc[c, 1] * sigma  # eq. 3
            z = (z - b.bn.running_mean[c]) / math.sqrt(b.bn.running_var[c] + b.bn.eps) * b.bn.weight[c] \
                + b.bn.bias[c]
            expect[n, c] = x[n, c] / (1 + torch.exp(-z))
    torch.testing.assert_close(b(x), expect)


def test_srm_counts():
    assert _params(create_attention("srm", 64)) == 4 * 64  # CFC 2C + BN 2C
    # Lee et al.'s ImageNet table: SRM-ResNet-50 25.62M (one SRM per bottleneck; 25,617,448 exactly).
    added = sum(n * _params(create_attention("srm", c)) for c, n in RESNET50_STAGES)
    assert RESNET50 + added == 25_617_448 and round((RESNET50 + added) / 1e6, 2) == 25.62


# --- GCT ----------------------------------------------------------------------------------------

def test_gct_by_hand():
    b = _block("gct", 6).requires_grad_(False)
    x = _x(2, 6, 3, 4)
    alpha, gamma, beta = (p.view(6) for p in (b.alpha, b.gamma, b.beta))
    expect = torch.empty_like(x)
    for n in range(2):
        s = [alpha[c] * math.sqrt(float((x[n, c] ** 2).sum()) + 1e-5) for c in range(6)]  # eq. 1
        norm = math.sqrt(sum(float(v) ** 2 for v in s) + 1e-5)
        for c in range(6):
            s_hat = math.sqrt(6) * s[c] / norm  # eq. 2
            expect[n, c] = x[n, c] * (1 + torch.tanh(gamma[c] * s_hat + beta[c]))  # eq. 3
    torch.testing.assert_close(b(x), expect)


def test_gct_starts_as_identity_with_3c_params():
    b = create_attention("gct", 64)
    x = torch.randn(2, 64, 5, 5)
    torch.testing.assert_close(b(x), x)
    assert _params(b) == 3 * 64


# --- coordinate attention -----------------------------------------------------------------------

def test_coord_by_hand():
    b = _block("coord", 16, hidden=4)
    x = _x(2, 16, 5, 3)

    def conv(t, layer):  # 1x1 conv as a matmul over channels
        return torch.einsum("oc,bc...->bo...", layer.weight[:, :, 0, 0], t) + layer.bias.view(1, -1, 1)

    z = torch.cat([x.mean(3), x.mean(2)], dim=2)  # (B, C, H + W), eq. 4-5
    f = F.hardswish(_bn(conv(z, b.conv1), b.bn1))  # eq. 6
    g_h = torch.sigmoid(conv(f[:, :, :5], b.conv_h))  # (B, C, H), eq. 7
    g_w = torch.sigmoid(conv(f[:, :, 5:], b.conv_w))  # (B, C, W), eq. 8
    torch.testing.assert_close(b(x), x * g_h[:, :, :, None] * g_w[:, :, None, :])  # eq. 9


@pytest.mark.parametrize("channels,mip", [(16, 8), (256, 8), (512, 16), (1280, 40)])
def test_coord_mip_is_max_8_c_over_32(channels, mip):
    b = create_attention("coord", channels)
    assert b.hidden == mip
    assert _params(b) == (channels * mip + mip) + 2 * mip + 2 * (mip * channels + channels)


@pytest.mark.parametrize("kw", [{"extent": 4}, {"extent": 2, "mlp": True}])
def test_ge_windowed_exports_to_onnx(kw):
    # The generic ONNX check builds "ge" with its default global extent; the pooled-window path too.
    import io

    ort = pytest.importorskip("onnxruntime")
    block = _block("ge", 32, **kw).float()
    x = torch.randn(2, 32, 9, 7)
    buf = io.BytesIO()
    torch.onnx.export(block, (x,), buf, input_names=["x"], output_names=["y"], dynamo=False)
    (out,) = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), block(x), atol=1e-5, rtol=1e-5)
