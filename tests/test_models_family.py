"""VGG, BN-Inception, Inception-ResNet-v2, MobileNet v1/v2/v3, ShuffleNet v1 and their SE versions:
paper counts (SENet Tables 2-3, REFERENCE.md), hand formulas, and the same logits as torchvision/timm."""

import pytest
import torch
from helpers import perturb_bn
from torch import nn

import senet
from senet.flops import count_macs, count_params
from senet.layers import ECA, SqueezeExcite
from senet.models import create_model
from senet.models.shufflenet import channel_shuffle
from senet.models.vgg import ActAttn


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs)


def _macs(name: str, size: int = 224) -> float:
    return count_macs(_meta(name), (3, size, size), device="meta") / 1e9



def _se_params(channels: list[int], r: int = 16) -> int:
    """Bias-free SE parameters: 2 C^2 / r per block (REFERENCE.md)."""
    return sum(2 * c * (c // r) for c in channels)


# --- SENet Tables 2 and 3: GFLOPs (= MACs at 224, Inception-ResNet-v2 at 299) and parameters ----------------

@pytest.mark.parametrize("name,paper", [
    ("vgg16_bn", 15.47), ("se_vgg16_bn", 15.48), ("bninception", 2.03), ("se_bninception", 2.04),
    ("mobilenet_v1", 0.569), ("se_mobilenet_v1", 0.572),
])
def test_macs_within_1_percent_of_senet_tables(name, paper):
    assert abs(_macs(name) - paper) / paper < 0.01


@pytest.mark.parametrize("name,paper_m", [("mobilenet_v1", 4.2), ("se_mobilenet_v1", 4.7)])
def test_mobilenet_params_table_3(name, paper_m):
    assert abs(count_params(_meta(name)) / 1e6 - paper_m) / paper_m < 0.01


def test_shufflenet_counts_match_the_official_release():
    # SENet Table 3 rounds to "0.140" / "1.8M"; the official ShuffleNet-Series release (megvii) lists
    # ShuffleNetV1 1.0x (group=3) at 137.46M FLOPs (MACs) and 1.86M parameters: ours, exactly.
    assert count_macs(_meta("shufflenet_v1_g3"), device="meta") == 137_460_672
    assert round(count_params(_meta("shufflenet_v1_g3")) / 1e6, 2) == 1.87  # 1,865,728
    # What the conv+linear convention leaves out: the stride-2 units' 3x3 average pools (9 ops per
    # output) and the residual additions; with them, the paper's 140M within 1%.
    pools = 9 * (24 * 28**2 + 240 * 14**2 + 480 * 7**2)
    adds = 3 * 240 * 28**2 + 7 * 480 * 14**2 + 3 * 960 * 7**2
    assert abs((137_460_672 + pools + adds) / 1e6 - 140) / 140 < 0.01


def test_se_parameter_increments_by_hand():
    # One SE per block on the channels named in each docstring; bias-free, hidden C // 16.
    increments = {
        ("vgg16", "se_vgg16"): _se_params([64, 128, 256, 512, 512]),
        ("mobilenet_v1", "se_mobilenet_v1"): _se_params([64, 128, 128, 256, 256] + [512] * 6 + [1024] * 2),
        # ShuffleNet: the branch of a stride-2 unit carries C_out - C_in channels (216, 240, 480).
        ("shufflenet_v1_g3", "se_shufflenet_v1_g3"): _se_params([216] + [240] * 3 + [240] + [480] * 7 + [480] +
                                                               [960] * 3),
        ("mobilenet_v2", "se_mobilenet_v2"): _se_params([16, 24, 24, 32, 32, 32] + [64] * 4 + [96] * 3 + [160] * 3
                                                         + [320]),
        ("inception_resnet_v2", "se_inception_resnet_v2"): _se_params([320] * 10 + [1088] * 20 + [2080] * 10),
    }
    for (base, se), added in increments.items():
        assert count_params(_meta(se)) - count_params(_meta(base)) == added, se
    assert 0.6e6 < increments[("shufflenet_v1_g3", "se_shufflenet_v1_g3")] < 0.62e6  # Table 3: 1.8M -> 2.4M
    # SE-BN-Inception (released form, FC biases): one block per Inception module.
    outs = [256, 320, 576, 576, 576, 608, 608, 1056, 1024, 1024]
    assert count_params(_meta("se_bninception")) - count_params(_meta("bninception")) == \
        _se_params(outs) + sum(c // 16 + c for c in outs)


def test_inception_resnet_v2_counts_equal_timm():
    # SENet Table 2 gives 11.75 GFLOPs at 299; the TF-slim network of the released weights (timm's)
    # counts 13.16 G with the same counter: see docs/models_family.md.
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        reference = timm.create_model("inception_resnet_v2")
    ours = _meta("inception_resnet_v2")
    assert count_params(ours) == count_params(reference) == 55_843_464
    assert count_macs(ours, (3, 299, 299), device="meta") == count_macs(reference, (3, 299, 299), device="meta")
    assert round(_macs("se_inception_resnet_v2", 299) - _macs("inception_resnet_v2", 299), 2) == 0.01  # as Table 2


@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"])
def test_param_counts_equal_torchvision(name):
    tv = pytest.importorskip("torchvision")
    with torch.device("meta"):
        reference = tv.models.get_model(name)
    assert count_params(_meta(name)) == count_params(reference)


# --- placement and structure -------------------------------------------------------------------------------


def test_se_vgg16_sits_after_the_last_relu_of_each_block_before_its_pool():
    model = _meta("se_vgg16_bn")
    slots = [i for i, m in enumerate(model.features) if isinstance(m, ActAttn)]
    assert slots == [5, 12, 22, 32, 42]  # torchvision vgg16_bn: the ReLUs before the pools at 6, 13, 23, 33, 43
    assert all(isinstance(model.features[i + 1], nn.MaxPool2d) for i in slots)
    se = [model.features[i].attn for i in slots]
    assert [m.channels for m in se] == [64, 128, 256, 512, 512]
    assert all(isinstance(m.fc1, nn.Linear) and m.fc1.bias is None and m.hidden == m.channels // 16 for m in se)


def test_act_attn_is_se_of_relu():
    block = ActAttn(SqueezeExcite(32)).eval()
    x = torch.randn(2, 32, 5, 5)
    u = torch.relu(x)
    s = torch.sigmoid(block.attn.fc2(torch.relu(block.attn.fc1(u.mean((2, 3))))))  # eq. 3, by hand
    torch.testing.assert_close(block(x), u * s[:, :, None, None])


def test_channel_shuffle_by_hand():
    x = torch.arange(6.0).view(1, 6, 1, 1)  # groups of 2: [0 1 2] [3 4 5]
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]


def test_eca_mobilenet_v2_kernels_and_v3_hidden_widths():
    eca = [m for m in _meta("eca_mobilenet_v2").modules() if isinstance(m, ECA)]
    assert [(m.channels, m.kernel_size) for m in eca][::4] == [(16, 1), (32, 1), (64, 1), (96, 3), (320, 3)]
    se = [m for m in _meta("mobilenet_v3_large").modules() if isinstance(m, SqueezeExcite)]
    # MobileNetV3: hidden = make_divisible(expanded / 4, 8) on the 8 SE rows of Table 1.
    assert [(m.channels, m.hidden) for m in se] == [(72, 24), (120, 32), (120, 32), (480, 120), (672, 168),
                                                    (672, 168), (960, 240), (960, 240)]
    assert all(isinstance(m.gate, nn.Hardsigmoid) for m in se)
    assert not any(isinstance(m, SqueezeExcite) for m in _meta("mobilenet_v3_large", attn=None).modules())


@pytest.mark.parametrize("name,attn,count", [
    ("vgg16", "eca", 5), ("mobilenet_v1", "eca", 13), ("mobilenet_v3_small", "eca", 9),
    ("shufflenet_v1_g3", "eca", 16), ("bninception", "eca", 10), ("inception_resnet_v2", "eca", 40),
])
def test_any_attention_everywhere(name, attn, count):
    assert sum(isinstance(m, ECA) for m in _meta(name, attn=attn).modules()) == count


def test_attn_stages_and_errors():
    model = _meta("se_shufflenet_v1_g3", attn_stages=(3,))
    assert sum(isinstance(m, SqueezeExcite) for m in model.modules()) == 4
    with pytest.raises(ValueError, match="attn_stages"):
        _meta("se_vgg16", attn_stages=(6,))
    with pytest.raises(ValueError, match="groups must be one of"):
        _meta("shufflenet_v1_g3", groups=5)
    with pytest.raises(ValueError, match="width_mult"):
        _meta("mobilenet_v2", width_mult=0)
    with pytest.raises(ValueError, match="variant"):
        senet.models.mobilenet.MobileNetV3("medium")
    with pytest.raises(ValueError, match="at least 75x75"):
        create_model("inception_resnet_v2", num_classes=2)(torch.randn(1, 3, 74, 74))


@pytest.mark.parametrize("name,size,shapes", [
    ("se_vgg16", 32, [(64, 32), (128, 16), (256, 8), (512, 4), (512, 2)]),
    ("se_mobilenet_v1", 64, [(64, 32), (128, 16), (256, 8), (512, 4), (1024, 2)]),
    ("mobilenet_v2", 64, [(16, 32), (24, 16), (32, 8), (96, 4), (1280, 2)]),
    ("mobilenet_v3_large", 64, [(16, 32), (24, 16), (40, 8), (112, 4), (960, 2)]),
    ("mobilenet_v3_small", 64, [(16, 32), (16, 16), (24, 8), (48, 4), (576, 2)]),
    ("se_shufflenet_v1_g3", 64, [(240, 8), (480, 4), (960, 2)]),
    ("se_bninception", 64, [(320, 8), (608, 4), (1024, 2)]),
])
def test_features_only(name, size, shapes):
    model = create_model(name, features_only=True).eval()
    feats = model(torch.randn(1, 3, size, size))
    assert [(f.shape[1], f.shape[-1]) for f in feats] == shapes
    assert [i["channels"] for i in model.feature_info] == [c for c, _ in shapes]
    assert [size // i["reduction"] for i in model.feature_info] == [s for _, s in shapes]


# --- torchvision / timm checkpoints: same keys, same logits -------------------------------------------------


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"])
def test_torchvision_mobilenet_checkpoint_gives_equal_logits(name, tmp_path):
    tv = pytest.importorskip("torchvision")
    reference = perturb_bn(tv.models.get_model(name, weights=None, num_classes=10))
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
    ours = senet.create_model(checkpoint=path).eval()  # the network and num_classes detected from the keys
    assert (ours.arch_name, ours.arch_kwargs) == (name, {"num_classes": 10})
    report = ours.load_report
    assert not report.skipped and not report.unexpected
    assert [k for k in report.new if not k.endswith("num_batches_tracked")] == []
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=1e-4)


def test_torchvision_mobilenet_v2_into_eca_mobilenet_v2_reports_only_attention(tmp_path):
    tv = pytest.importorskip("torchvision")
    path = tmp_path / "mnv2.pth"
    torch.save(tv.models.mobilenet_v2(weights=None, num_classes=10).state_dict(), path)
    ours = senet.create_model("eca_mobilenet_v2", checkpoint=path, num_classes=10, warn=False)
    assert sorted(ours.load_report.new) == sorted(k for k in ours.state_dict() if ".attn." in k)
    assert len(ours.load_report.new) == 17  # one ECA conv per block


def test_torchvision_vgg16_bn_checkpoint(tmp_path):
    tv = pytest.importorskip("torchvision")
    reference = perturb_bn(tv.models.vgg16_bn(weights=None, num_classes=10))
    path = tmp_path / "vgg16_bn.pth"
    torch.save(reference.state_dict(), path)
    se = senet.create_model("se_vgg16_bn", checkpoint=path, num_classes=10, warn=False)
    report = se.load_report
    attn_keys = [k for k in se.state_dict() if ".attn." in k]
    assert len(attn_keys) == 10  # fc1/fc2 weights of 5 bias-free SE blocks
    assert sorted(report.new) == sorted(attn_keys) and not report.unexpected and not report.skipped
    assert sorted(report.loaded) == sorted(reference.state_dict())
    assert "no attention blocks" in str(report)
    del se
    plain = senet.create_model(checkpoint=path).eval()
    assert plain.arch_name == "vgg16_bn"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain(x), reference(x), atol=1e-4, rtol=1e-4)


def test_timm_inception_resnet_v2_gives_equal_logits():
    timm = pytest.importorskip("timm")
    reference = perturb_bn(timm.create_model("inception_resnet_v2", num_classes=10))
    ours = create_model("inception_resnet_v2", num_classes=10).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 75, 75)  # the smallest valid input
    torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=1e-4)


# --- export ---------------------------------------------------------------------------------------------------


def test_se_vgg16_features_onnx_parity(tmp_path):
    """The VGG family's ONNX check (its 120M-parameter classifier is left out; the SE blocks are in)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = perturb_bn(create_model("se_vgg16_bn", features_only=True))
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "se_vgg16_bn.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    outs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    for got, want in zip(outs, model(x), strict=True):
        torch.testing.assert_close(torch.from_numpy(got), want.detach(), atol=1e-4, rtol=1e-4)
