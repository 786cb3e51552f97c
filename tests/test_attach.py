"""senet.attach: attention inserted into torchvision/timm/custom networks (random weights, 64x64 probes)."""

import copy
import io

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet

from senet.layers import list_attentions
from senet.surgery import (
    GatedExcitation,
    attach,
    attached_blocks,
    gates,
    load_attached,
    load_base_model,
    load_weights,
    save_attached,
)

timm = pytest.importorskip("timm")

SIZE = (3, 64, 64)
tv = torchvision.models


def small_cnn(c1=16, c2=32):
    """A user's own nn.Sequential: two conv-BN-ReLU stages with max-pool, a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.Conv2d(c1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, 10),
    )


class Untraceable(nn.Module):
    """A custom CNN torch.fx cannot trace: control flow on tensor values."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        if x.mean() > -1e9:  # data-dependent branch: fx raises TraceError
            x = x + self.body(x)
        return self.fc(torch.nn.functional.max_pool2d(x, 2).mean((2, 3)))


def cheap_vgg(name):
    """torchvision's VGG with its 120M-parameter classifier replaced by one Linear: built on the meta
    device and materialised after the swap, so the test does not pay for the original head."""
    with torch.device("meta"):
        model = getattr(tv, name)(num_classes=10)
        model.classifier = nn.Linear(512 * 7 * 7, 10)
    model.to_empty(device="cpu")
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()  # BN's also resets its running statistics
    return model


# family -> (builder, {rule: expected place names or count})
FAMILIES = {
    "tv_resnet18": (lambda: tv.resnet18(num_classes=10),
                    {"residual": [f"layer{s}.{b}.bn2" for s in range(1, 5) for b in range(2)],
                     "stage": ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]}),
    # ResNeXt 32x4d and Wide-ResNet (width 128) bottlenecks, one block per stage to stay cheap
    "tv_resnext": (lambda: tv_resnet.ResNet(tv_resnet.Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=4,
                                            num_classes=10),
                   {"residual": [f"layer{s}.0.bn3" for s in range(1, 5)]}),
    "tv_wide_resnet": (lambda: tv_resnet.ResNet(tv_resnet.Bottleneck, [1, 1, 1, 1], width_per_group=128,
                                                num_classes=10),
                       {"residual": 4, "stage": ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]}),
    # VGG-11 with BN: after each block's last conv-BN-ReLU, before its max-pool (VGG-16: see below)
    "tv_vgg11_bn": (lambda: cheap_vgg("vgg11_bn"),
                    {"stage": ["features.2", "features.6", "features.13", "features.20", "features.27"]}),
    "tv_mobilenet_v2": (lambda: tv.mobilenet_v2(width_mult=0.35, num_classes=10),
                        {"residual": 10, "stage": 5, "conv": 52}),
    "tv_densenet": (lambda: tv.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16,
                                        num_classes=10),
                    {"stage": ["features.transition1.conv", "features.transition2.conv",
                               "features.transition3.conv", "features.norm5"]}),
    "tv_regnet": (lambda: tv.regnet_x_400mf(num_classes=10), {"residual": 22, "stage": 4}),
    "tv_efficientnet": (lambda: tv.efficientnet_b0(num_classes=10), {"residual": 9, "stage": 5}),
    "timm_resnet18": (lambda: timm.create_model("resnet18", num_classes=10),
                      {"residual": [f"layer{s}.{b}.bn2" for s in range(1, 5) for b in range(2)]}),
    "timm_resnet26": (lambda: timm.create_model("resnet26", num_classes=10),
                      {"residual": [f"layer{s}.{b}.bn3" for s in range(1, 5) for b in range(2)]}),
    # ConvNeXt-atto depths (2, 2, 6, 2): one place per block, after the layer-scaled branch
    "timm_convnext": (lambda: timm.create_model("convnext_atto", num_classes=10),
                      {"residual": 12, "stage": ["stages.0", "stages.1", "stages.2", "stages.3"]}),
    "sequential": (small_cnn, {"stage": ["5", "9"], "conv": ["2", "5", "9"]}),
    "untraceable": (Untraceable, {"stage": ["body.2"], "conv": ["stem.2", "body.2"]}),
}
CASES = [(f, w) for f, (_, rules) in FAMILIES.items() for w in rules]


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("family,where", CASES, ids=[f"{f}-{w}" for f, w in CASES])
def test_identity_init_keeps_logits(family, where):
    build, rules = FAMILIES[family]
    model = build()
    x = torch.randn(2, *SIZE)
    before, params = logits(model, x), {k: v.clone() for k, v in model.state_dict().items()}
    model, report = attach(model, "se", where, input_size=SIZE, reduction=4)
    expected = rules[where]
    names = [p.name for p in report.places]
    assert names == expected if isinstance(expected, list) else len(names) == expected
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)
    # every existing tensor keeps its name and value; new ones live under <place>.attached
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in params.items())
    assert all(".attached." in k for k in state.keys() - params.keys())
    assert set(attached_blocks(model)) == set(names) and set(gates(model).values()) == {0.0}


def test_se_vgg16_places_and_added_parameters():
    # REFERENCE.md: SE-VGG16 has one SE block (r = 16, two bias-free Linear) after the last conv+ReLU
    # of each of the five blocks, before its max-pool; each adds 2·C²/r parameters.
    model = cheap_vgg("vgg16")
    x = torch.randn(1, *SIZE)
    before = logits(model, x)
    _, report = attach(model, "se", "stage", input_size=SIZE)
    assert [p.name for p in report.places] == ["features.3", "features.8", "features.15", "features.22",
                                               "features.29"]
    assert [p.channels for p in report.places] == [64, 128, 256, 512, 512]
    gains = len(report.places)  # one scalar g per identity-initialised block
    assert report.added_params == sum(2 * c * c // 16 for c in (64, 128, 256, 512, 512)) + gains == 76_293
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,total", [("resnet50", 28_088_024), ("resnext50_32x4d", 27_559_896)])
def test_se_resnet_parameter_counts_match_the_paper_models(name, total):
    # REFERENCE.md: SE-ResNet-50 (r = 16, FC biases, hidden C // 16) has 28,088,024 parameters and
    # SE-ResNeXt-50 32x4d 27,559,896; "residual" on torchvision's networks must land on exactly those.
    model, report = attach(getattr(tv, name)(), "se_released", "residual", init="plain", input_size=SIZE)
    assert sum(p.numel() for p in model.parameters()) == total
    assert len(report.places) == 16  # 3 + 4 + 6 + 3 bottlenecks


@pytest.mark.parametrize("attn", list_attentions())
def test_every_attention_identity_and_plain(attn):
    x = torch.randn(2, *SIZE)
    base = small_cnn()
    before = logits(base, x)
    ident, _ = attach(copy.deepcopy(base), attn, "stage", input_size=SIZE)
    torch.testing.assert_close(logits(ident, x), before, atol=1e-5, rtol=0)
    plain, report = attach(copy.deepcopy(base), attn, "stage", init="plain", input_size=SIZE)
    blocks = attached_blocks(plain)
    assert report.places and not any(isinstance(b, GatedExcitation) for b in blocks.values())
    # at g = 1 the identity wrapper is the plain block: same weights -> same logits
    for place, gated in attached_blocks(ident).items():
        gated.block.load_state_dict(blocks[place].state_dict())
        gated.gain.data.fill_(1.0)
    torch.testing.assert_close(logits(ident, x), logits(plain, x))


def test_gated_excitation_formula():
    block = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Sigmoid())
    x = torch.randn(2, 8, 5, 5)
    g = GatedExcitation(block, gain=0.3)
    torch.testing.assert_close(g(x), x + 0.3 * (block(x) - x))
    torch.testing.assert_close(GatedExcitation(block, gain=1.0)(x), block(x))
    assert torch.equal(GatedExcitation(block)(x), x)


def test_training_moves_gates_and_blocks():
    model, _ = attach(tv.resnet18(num_classes=4), "se", "residual", input_size=(3, 32, 32))
    blocks = attached_blocks(model)
    w0 = {p: b.block.fc1.weight.clone() for p, b in blocks.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    model.train()
    for step in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if step == 0:  # dL/dg = Σ (A(x) - x) · dL/dy is non-zero at g = 0
            assert all(b.gain.grad is not None and b.gain.grad.abs() > 0 for b in blocks.values())
        opt.step()
    assert all(abs(g) > 0 for g in gates(model).values())
    assert all(not torch.equal(blocks[p].block.fc1.weight, w0[p]) for p in blocks)
    assert torch.isfinite(loss)


def test_deepcopy_keeps_its_own_blocks():
    model, _ = attach(small_cnn(), "se", "stage", input_size=SIZE)
    twin = copy.deepcopy(model)
    x = torch.randn(2, *SIZE)
    before = logits(model, x)
    for b in attached_blocks(twin).values():
        b.gain.data.fill_(1.0)
    assert (logits(twin, x) - before).abs().max() > 1e-4  # the copy's hooks run the copy's blocks
    torch.testing.assert_close(logits(model, x), before)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_parity(dynamo):
    ort = pytest.importorskip("onnxruntime")
    # the torch.export-based exporter is slow on big graphs: a small CNN there, ResNet-18 for TorchScript
    model = small_cnn() if dynamo else tv.resnet18(num_classes=10)
    model, _ = attach(model, "se", "stage" if dynamo else "residual", input_size=SIZE, reduction=4)
    x = torch.randn(2, *SIZE)
    base = logits(model, x)
    for b in attached_blocks(model).values():
        b.gain.data.fill_(0.7)
    ref = logits(model, x)
    assert (ref - base).abs().max() > 1e-4  # attention is active, so parity below checks it was exported
    if dynamo:
        blob = torch.onnx.export(model, (x,), dynamo=True, input_names=["x"]).model_proto.SerializeToString()
    else:
        buf = io.BytesIO()
        torch.onnx.export(model, (x,), buf, input_names=["x"], dynamo=False)
        blob = buf.getvalue()
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"x": x.numpy()})
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-4, rtol=1e-4)


def test_save_load_round_trip(tmp_path):
    model = load_base_model("torchvision:resnet18", num_classes=10)
    attach(model, "se", "residual", input_size=SIZE, reduction=8)
    attach(model, "eca", "stage", init="plain", input_size=SIZE)
    for b in attached_blocks(model).values():
        if isinstance(b, GatedExcitation):
            b.gain.data.uniform_(0.2, 1.0)
    path = save_attached(tmp_path / "m.safetensors", model)
    loaded = load_attached(path)
    assert [s.to_dict() for s in loaded.senet_attach] == [
        {**s.to_dict(), "where": [p.name for p in s.places]} for s in model.senet_attach]
    assert loaded.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(logits(loaded, x), logits(model, x))


def test_timm_base_and_pretrained_checkpoint(tmp_path):
    # A "pretrained" 1000-class checkpoint fine-tuned on 5 classes: the head is skipped with a warning.
    src = timm.create_model("resnet18", num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "pre.pth")
    with pytest.warns(UserWarning, match="fc.weight"):
        model = load_base_model("timm:resnet18", num_classes=5, checkpoint=tmp_path / "pre.pth")
    assert torch.equal(model.conv1.weight, src.conv1.weight) and model.fc.out_features == 5
    assert model.senet_base == {"spec": "timm:resnet18", "kwargs": {"num_classes": 5}}


def test_old_checkpoints_still_load():
    model = tv.resnet18(num_classes=10).train()
    model.bn1.eval()  # a frozen BN stays frozen: the probe restores every module's mode
    old = copy.deepcopy(model.state_dict())
    attach(model, "se", "residual", input_size=SIZE)
    assert model.training and not model.bn1.training and model.layer1[0].bn2.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in old.items())  # probe left BN stats alone
    result = model.load_state_dict(old, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(".attached." in k for k in result.missing_keys)


def test_conv_rule_with_select():
    _, report = attach(tv.resnet18(), "se", "conv", select=lambda name, c: c >= 256, input_size=SIZE)
    assert report.places and all(p.channels >= 256 for p in report.places)
    assert all(p.name.startswith(("layer3", "layer4")) for p in report.places)


def test_torch_fx_fails_but_attach_works():
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(Untraceable())
    _, report = attach(Untraceable(), "se", ["body.1"], input_size=SIZE)
    assert [p.name for p in report.places] == ["body.1"]


@pytest.mark.parametrize("kwargs,match", [
    ({"where": "residual"}, r"no place in Sequential matches where='residual'"),
    ({"where": ["9", "99"]}, r"no module named '99'.*did you mean \['9'"),
    ({"where": "stage", "attn": "se_gc", "groups": 12}, r"'se_gc' does not fit place '5' \(16 channels\)"),
    ({"where": "stage", "reduction": 32}, r"does not fit place '5' \(16 channels\).*reduction"),
    ({"where": "stage", "select": lambda n, c: c > 999}, r"no place in Sequential matches where='stage' and select"),
    ({"where": "stage", "attn": "nope"}, r"unknown attention 'nope'"),
    ({"where": "stage", "init": "zeros"}, r"init must be one of"),
    ({"where": "everywhere"}, r"where must be one of"),
    ({"where": "9"}, r"to attach after module '9' pass where=\['9'\]"),
])
def test_errors_name_the_place_and_roll_back(kwargs, match):
    model = small_cnn()
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match=match):
        attach(model, **{"attn": "se", "input_size": SIZE, **kwargs})
    assert set(model.state_dict()) == keys and not attached_blocks(model)  # nothing left half-inserted


def test_rollback_when_a_later_place_does_not_fit():
    model = small_cnn(16, 24)  # SE-GC with 16 groups fits 16 channels, not 24
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match=r"does not fit place '9' \(24 channels\)"):
        attach(model, "se_gc", "stage", input_size=SIZE)
    assert set(model.state_dict()) == keys and not model[5]._forward_hooks


def test_container_place_is_refused():
    model = FAMILIES["tv_densenet"][0]()
    with pytest.raises(ValueError, match=r"'features.denseblock1'.*runs its children itself"):
        attach(model, "se", ["features.denseblock1"], input_size=SIZE)


def test_already_attached_and_shared_modules():
    model, _ = attach(tv.resnet18(), "se", ["layer1.0.bn2"], input_size=SIZE)
    with pytest.raises(ValueError, match=r"'layer1.0.bn2'.*already has attention attached"):
        attach(model, "eca", ["layer1.0.bn2"], input_size=SIZE)
    with pytest.raises(ValueError, match=r"'layer1.0.bn2.attached'.*inserted by senet.attach"):
        attach(model, "eca", ["layer1.0.bn2.attached"], input_size=SIZE)
    with pytest.raises(ValueError, match=r"'layer1.0.relu'.*runs 2 times"):
        attach(model, "se", ["layer1.0.relu"], input_size=SIZE)


def test_load_base_model_errors(tmp_path):
    with pytest.raises(ValueError, match="torchvision has no model 'resnet9'"):
        load_base_model("torchvision:resnet9")
    with pytest.raises(ValueError, match="use 'torchvision:NAME'"):
        load_base_model("keras:resnet50")
    with pytest.raises(ValueError, match="no attach record"):
        save_attached(tmp_path / "x.safetensors", tv.resnet18())
    torch.save(tv.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="does not fit"):
        load_weights(small_cnn(), tmp_path / "r18.pth")


def test_top_level_names():
    import senet
    import senet.surgery

    assert senet.attach is senet.surgery.attach and callable(senet.attach)
    model, report = senet.attach(nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU()), "se", where=["0"],
                                 input_size=(3, 8, 8), reduction=4)
    assert [p.name for p in report.places] == ["0"]
