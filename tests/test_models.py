"""senet.models: every registered network, checked against papers, timm/torchvision and hand formulas."""

from pathlib import Path

import pytest
import torch
from helpers import perturb_bn
from torch import nn

from senet.flops import count_macs, count_params
from senet.layers import SqueezeExcite
from senet.models import (
    Bottleneck,
    CifarResNet,
    ResNet,
    create_model,
    list_models,
    model_info,
    register_model,
)
from senet.models._attn import PLACEMENTS, stage_attention

ROOT = Path(__file__).resolve().parents[1]


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs)



# --- every registered model ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name):
    model = create_model(name, num_classes=7)
    # 32x32 for all: ImageNet nets reach 1x1 in stage 4 (batch 2 keeps train-mode BN defined there);
    # Inception-ResNet-v2's unpadded convs need 75x75 at least.
    size = 75 if "inception_resnet" in name else 32
    x = torch.randn(2, 3, size, size, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 7)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters outside the graph: {no_grad[:5]}"


def test_registry_lookup_and_errors():
    assert "se_resnet50" in list_models() and "se_resnet20" in list_models()
    assert set(list_models("se_resnext*")) == {"se_resnext50_32x4d", "se_resnext101_32x4d"}
    assert model_info("resnet20").input_size == (3, 32, 32)
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet50")(lambda **kw: nn.Identity())
    with pytest.raises(ValueError, match="unknown model 'se_resnet51'"):
        create_model("se_resnet51")
    with pytest.raises(ValueError, match="unknown attn 'sqz'"):
        _meta("resnet18", attn="sqz")
    with pytest.raises(ValueError, match=r"attn_stages \[5\]"):
        _meta("se_resnet18", attn_stages=(1, 5))
    with pytest.raises(ValueError, match="one per stage"):
        _meta("se_resnet18", attn_kwargs=[{"reduction": 8}] * 3)
    with pytest.raises(ValueError, match="attn_placement"):
        _meta("se_resnet18", attn_placement="middle")


# --- parameter counts: papers, timm, hand formulas ------------------------------------------------


@pytest.mark.parametrize("name,count", [
    ("resnet50", 25_557_032), ("se_resnet50", 28_088_024), ("se_resnext50_32x4d", 27_559_896),
    ("legacy_se_resnet50", 28_088_024), ("legacy_se_resnext50_32x4d", 27_559_896),
])
def test_exact_param_counts(name, count):  # REFERENCE.md "exact parameter counts that users check"
    assert count_params(_meta(name)) == count


@pytest.mark.parametrize("ours,theirs", [
    ("resnet18", "resnet18"), ("se_resnet18", "seresnet18"), ("resnext101_32x4d", "resnext101_32x4d"),
    ("se_resnet152", "seresnet152"), ("legacy_se_resnet101", "legacy_seresnet101"),
    ("senet154", "legacy_senet154"),
])
def test_param_counts_match_timm(ours, theirs):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        reference = timm.create_model(theirs)
    assert count_params(_meta(ours)) == count_params(reference)


# SE-ResNet-50 adds (2/r) Σ_s N_s C_s² bias-free parameters (REFERENCE.md); N_s = 3,4,6,3, C_s = 256..2048.
_SUM_NC2 = 3 * 256**2 + 4 * 512**2 + 6 * 1024**2 + 3 * 2048**2


@pytest.mark.parametrize("r,paper_m", [(2, 45.7), (4, 35.7), (8, 30.7), (16, 28.1), (32, 26.9)])
def test_se_reduction_ablation_params(r, paper_m):  # SE paper Table 10
    total = count_params(_meta("resnet50", attn="se", attn_kwargs={"reduction": r}))
    assert total - 25_557_032 == 2 * _SUM_NC2 // r
    # The paper's r = 4 / 8 entries sit ~0.1M above the formula (35.62M / 30.59M here); 0.5% covers them.
    assert abs(total / 1e6 - paper_m) / paper_m < 0.005


def test_per_stage_reduction_and_stages():
    base = 25_557_032
    stage_only = count_params(_meta("resnet50", attn="se", attn_stages=(3,)))
    assert stage_only - base == 6 * 2 * 1024**2 // 16  # SE on conv4_x only (paper: stage 4, C = 1024)
    per_stage = [{"reduction": r} for r in (4, 8, 16, 32)]
    total = count_params(_meta("resnet50", attn="se", attn_kwargs=per_stage))
    assert total - base == sum(n * 2 * c * c // r for n, c, r in
                               zip((3, 4, 6, 3), (256, 512, 1024, 2048), (4, 8, 16, 32), strict=True))


@pytest.mark.parametrize("name,paper_m", [
    ("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66), ("resnet56", 0.85), ("resnet110", 1.7),
    ("resnet164", 1.7), ("wrn16_8", 11.0),
])
def test_cifar_param_counts(name, paper_m):  # ResNet Table 6, pre-act ResNet Table 3, WRN Table 1
    digits = 2 if paper_m < 1 else 1
    assert round(count_params(_meta(name)) / 1e6, digits) == paper_m


def test_eca_kernels_and_cbam():
    eca = _meta("eca_resnet50")
    assert [eca.layer1[0].attn.kernel_size, eca.layer2[0].attn.kernel_size, eca.layer3[0].attn.kernel_size,
            eca.layer4[0].attn.kernel_size] == [3, 5, 5, 7]
    assert count_params(eca) - 25_557_032 == 3 * 3 + 4 * 5 + 6 * 5 + 3 * 7
    # CBAM paper Table: ResNet-50 + CBAM 28.09M.
    assert round(count_params(_meta("cbam_resnet50")) / 1e6, 2) == 28.09


# --- placements ----------------------------------------------------------------------------------


@pytest.mark.parametrize("placement,channels", [
    ("standard", [256, 256, 256]), ("post", [256, 256, 256]), ("identity", [256, 256, 256]),
    ("pre", [64, 256, 256]), ("after_3x3", [64, 64, 64]),
])
def test_placement_builds_attention_over_the_right_channels(placement, channels):
    model = _meta("resnet50", attn="se", attn_placement=placement)
    se = [m for m in model.modules() if isinstance(m, SqueezeExcite)]
    assert len(se) == 16  # one per unit: 3 + 4 + 6 + 3
    assert [m.channels for m in se[:3]] == channels
    only4 = _meta("resnet50", attn="se", attn_placement=placement, attn_stages=(4,))
    assert sum(isinstance(m, SqueezeExcite) for m in only4.modules()) == 3


def _reference_bottleneck(u: Bottleneck, x: torch.Tensor, placement: str) -> torch.Tensor:
    """SE paper Fig. 5, written out from the unit's own layers."""
    A = u.attn  # noqa: N806
    relu = torch.relu

    def residual(t):
        t = relu(u.bn1(u.conv1(t)))
        t = relu(u.bn2(u.conv2(t)))
        if placement == "after_3x3":
            t = A(t)
        return u.bn3(u.conv3(t))

    short = u.downsample(x)
    if placement == "standard":
        return relu(A(residual(x)) + short)
    if placement == "pre":
        return relu(residual(A(x)) + short)
    if placement == "post":
        return A(relu(residual(x) + short))
    if placement == "identity":
        return relu(residual(x) + A(short))
    return relu(residual(x) + short)  # after_3x3


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_placement_matches_figure_5(placement):
    make = stage_attention("se", {"reduction": 2}, None, 1)[0]
    down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    unit = Bottleneck(8, 4, stride=2, downsample=down, make_attn=make, placement=placement).eval()
    perturb_bn(unit)
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(unit(x), _reference_bottleneck(unit, x, placement))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_cifar_placements_run(placement):
    for name in ("se_resnet20", "se_resnet164"):
        y = create_model(name, attn_placement=placement, attn_kwargs={"reduction": 4})(torch.randn(2, 3, 16, 16))
        assert y.shape == (2, 10) and torch.isfinite(y).all()


# --- features mode ---------------------------------------------------------------------------------


def test_features_only_shapes():
    model = create_model("se_resnet18", features_only=True).eval()
    feats = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    assert [i["channels"] for i in model.feature_info] == [64, 128, 256, 512]
    assert not hasattr(model, "fc")
    cifar = create_model("wrn16_8", features_only=True).eval()
    feats = cifar(torch.randn(1, 3, 32, 32))
    assert [tuple(f.shape[1:]) for f in feats] == [(128, 32, 32), (256, 16, 16), (512, 8, 8)]
    senet = _meta("senet154", features_only=True)
    assert [i["channels"] for i in senet.feature_info] == [256, 512, 1024, 2048]


# --- same weights, same logits as timm / torchvision -----------------------------------------------


def _load_by_name(ours: nn.Module, theirs: dict, rename: list[tuple[str, str]]) -> None:
    mapped = {}
    for key, value in theirs.items():
        for old, new in rename:
            key = key.replace(old, new)
        mapped[key] = value
    own = ours.state_dict()
    ours.load_state_dict({k: v.reshape(own[k].shape) for k, v in mapped.items()}, strict=True)


def test_torchvision_resnet_state_dict_loads_as_is():
    tv = pytest.importorskip("torchvision")
    reference = tv.models.resnet18(num_classes=10).eval()
    perturb_bn(reference)
    ours = create_model("resnet18", num_classes=10).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["seresnet", "legacy_seresnet", "legacy_senet154"])
def test_same_logits_as_timm(variant):
    """One unit per stage of each timm family with the same weights: our wiring == theirs."""
    pytest.importorskip("timm")
    from timm.models import resnet as timm_resnet
    from timm.models import senet as timm_senet

    stages = (1, 1, 1, 1)
    if variant == "seresnet":
        reference = timm_resnet.ResNet(timm_resnet.Bottleneck, stages, num_classes=10,
                                       block_args={"attn_layer": "se"})
        ours = ResNet("bottleneck", stages, attn="se_released", num_classes=10)
        rename = [(".se.", ".attn.")]
    elif variant == "legacy_seresnet":
        reference = timm_senet.SENet(timm_senet.SEResNetBottleneck, stages, groups=1, reduction=16, num_classes=10)
        ours = ResNet("bottleneck", stages, attn="se_released", stride_in_1x1=True, pool_ceil=True, num_classes=10)
        rename = [("layer0.", ""), ("se_module", "attn"), ("last_linear", "fc")]
    else:
        reference = timm_senet.SENet(timm_senet.SEBottleneck, stages, groups=64, reduction=16, inplanes=128,
                                     input_3x3=True, downsample_kernel_size=3, downsample_padding=1,
                                     num_classes=10)
        ours = ResNet("bottleneck", stages, groups=64, width_per_group=4, conv1_ratio=0.5, deep_stem=True,
                      pool_ceil=True, down_kernel=3, attn="se_released", num_classes=10)
        rename = [("layer0.conv1", "conv1.0"), ("layer0.bn1", "conv1.1"), ("layer0.conv2", "conv1.3"),
                  ("layer0.bn2", "conv1.4"), ("layer0.conv3", "conv1.6"), ("layer0.bn3", "bn1"),
                  ("se_module", "attn"), ("last_linear", "fc")]
    reference.eval(), ours.eval()
    perturb_bn(reference)
    _load_by_name(ours, reference.state_dict(), rename)
    x = torch.randn(1, 3, 67, 67)  # odd size: the Caffe ceil-mode pool differs from padding 1 here
    torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-4)


# --- MACs ------------------------------------------------------------------------------------------


def test_macs_hand_formula_and_flop_counter():
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4)
    assert count_macs(conv, (8, 10, 10)) == 12 * 5 * 5 * (8 // 4) * 9
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model("se_resnet20").eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 32, 32))
    assert count_macs(model, (3, 32, 32)) == counter.get_total_flops() // 2  # conv + mm, 2 FLOPs per MAC


def test_macs_at_224_paper_convention():  # SE paper Table 2 (stride in 1x1, the Caffe convention)
    assert abs(count_macs(_meta("legacy_se_resnet50"), device="meta") / 1e9 - 3.87) / 3.87 < 0.01
    assert abs(count_macs(_meta("resnet50", stride_in_1x1=True), device="meta") / 1e9 - 3.86) / 3.86 < 0.01


# --- export, compile, hub --------------------------------------------------------------------------


@pytest.mark.parametrize("name,size", [
    ("se_resnet18", 64), ("se_resnet20", 32), ("se_wrn16_8", 16),
    # one per family of models/inception.py, mobilenet.py, shufflenet.py (VGG's 120M-parameter
    # classifier is too big to export here: tests/test_models_family.py exports its features)
    ("se_bninception", 32), ("mobilenet_v3_small", 32), ("eca_mobilenet_v2", 32),
    ("se_shufflenet_v1_g3", 32),
])
def test_onnx_parity(name, size, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = create_model(name, num_classes=10).eval()
    perturb_bn(model)
    x = torch.randn(2, 3, size, size)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), model(x).detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    model = create_model("se_resnet20", attn_placement="identity").eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # whole graph, no breaks
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(compiled(x), model(x))


def test_torch_hub_local():
    model = torch.hub.load(str(ROOT), "se_resnet20", source="local", num_classes=5, trust_repo=True)
    assert isinstance(model, CifarResNet)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


# --- the paper table -------------------------------------------------------------------------------


def test_paper_table_within_one_percent_and_committed():
    from senet.papertable import paper_rows, render

    rows = paper_rows()
    # Rows that cannot match (models/inception.py, shufflenet.py) carry their reason.
    bad = [r["network"] for r in rows if not (r["ok"] or r.get("explained"))]
    assert len(rows) == 20 and not bad, bad
    assert [r["network"] for r in rows if not r["ok"]] == [
        "Inception-ResNet-v2 (299x299)", "SE-Inception-ResNet-v2 (299x299)", "ShuffleNet 1x g=3 (Table 3)",
        "SE-ShuffleNet 1x g=3 (Table 3)"]
    committed = (ROOT / "docs" / "paper_table.md").read_text()
    table = [line for line in render(rows).splitlines() if line.startswith("|")]
    assert table == [line for line in committed.splitlines() if line.startswith("|")], \
        "docs/paper_table.md is stale: run `senet paper-table`"


def test_pretrained_spelling():
    """timm's and torchvision's ``pretrained=``: False is accepted (code written for timm runs), True
    says how to load weights (it was a TypeError about an unexpected keyword)."""
    import senet

    for build in (senet.create_model, create_model):
        model = build("se_resnet20", pretrained=False)
        assert sum(p.numel() for p in model.parameters()) == count_params(create_model("se_resnet20"))
        with pytest.raises(ValueError, match=r"downloads no weights.*checkpoint="):
            build("se_resnet20", pretrained=True)
    assert senet.create_model("se_resnet20", pretrained=False).arch_kwargs == {}


@pytest.mark.parametrize("name", ["se_resnet50", "se_resnet20", "se_bninception", "se_shufflenet_v1_g3",
                                  "se_mobilenet_v2", "se_vgg16", "se_inception_resnet_v2"])  # each forward
def test_one_image_without_a_batch_dimension_gets_the_fix_named(name):
    """conv2d takes an unbatched (C, H, W) image, so every network failed at its first BatchNorm with torch's
    "expected 4D input"; now each network names the fix."""
    model = create_model(name, num_classes=3).eval()
    with pytest.raises(ValueError, match=r"expects a batch of images.*x\.unsqueeze\(0\)"):
        model(torch.randn(3, 80, 80))
    with pytest.raises(ValueError, match="expects a batch of images"):
        model(torch.randn(1, 1, 3, 80, 80))
