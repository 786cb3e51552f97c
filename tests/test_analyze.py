"""senet analyze / senet prune on networks whose excitations are known by construction."""

import json
import math

import pytest
import torch
from torch import nn

from senet.analyze import attention_blocks, block_stats, plot_class_means, record_excitations
from senet.checkpoint import save_checkpoint
from senet.cli import main
from senet.export import load_spec
from senet.flops import count_macs, count_params
from senet.models import create_model
from senet.prune import prune_blocks

LAST = "layer3.2.attn"


def _constant_model(bias: float, in_chans: int = 3, num_classes: int = 4) -> nn.Module:
    """resnet20 with SE (FC biases); the last block's fc2 has zero weights and bias ``bias``:
    its excitation is sigmoid(bias) for every input and channel."""
    model = create_model("resnet20", attn="se_released", num_classes=num_classes, in_chans=in_chans).eval()
    for m in model.modules():  # non-trivial BN, so folding into it is really exercised
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    se = model.get_submodule(LAST)
    nn.init.zeros_(se.fc2.weight)
    nn.init.constant_(se.fc2.bias, bias)
    return model


def _batches(n=2, b=6, size=8, classes=4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(b, 3, size, size, generator=g), torch.arange(b) % classes) for _ in range(n)]


@pytest.mark.parametrize("bias,saturated", [(0.0, 0.0), (5.0, 1.0)])
def test_constant_block_flagged_and_saturation(bias, saturated):
    model = _constant_model(bias)
    lively = model.get_submodule("layer1.0.attn")  # large FC weights: an excitation that moves with the input
    with torch.no_grad():
        lively.fc1.weight.mul_(30)
        lively.fc2.weight.mul_(30)
    rec = record_excitations(model, _batches())
    assert len(rec.labels) == 12 and set(rec.excitations) == set(attention_blocks(model))
    e = rec.excitations[LAST]  # (12, 64)
    assert e.shape == (12, 64)
    torch.testing.assert_close(e, torch.full_like(e, 1 / (1 + math.exp(-bias))))
    st = block_stats(LAST, e, rec.labels, 4)
    assert st.flagged and st.variation < 1e-7 and st.specificity == 0.0
    assert st.saturation == saturated  # sigmoid(5) = 0.9933 > 0.95; sigmoid(0) = 0.5
    assert rec.scale_form[LAST]  # SE is u * s(u)
    moving = block_stats("layer1.0.attn", rec.excitations["layer1.0.attn"], rec.labels, 4)
    assert not moving.flagged and moving.variation > 0.05


def test_specificity_by_hand():
    # one channel: class 0 -> 0.1, 0.3; class 1 -> 0.7, 0.9
    e = torch.tensor([[0.1], [0.3], [0.7], [0.9]])
    st = block_stats("b", e, torch.tensor([0, 0, 1, 1]), 3)
    # class means 0.2, 0.8, overall 0.5: B = 0.5*0.09 + 0.5*0.09 = 0.09; W = 0.01; S = 9
    assert st.between == pytest.approx(0.09) and st.within == pytest.approx(0.01)
    assert st.specificity == pytest.approx(9.0)
    assert st.variation == pytest.approx(math.sqrt(0.1)) and not st.flagged
    assert st.saturation == 0.0 and math.isnan(st.class_means[2][0])  # class 2 has no samples
    assert st.class_means[0][0] == pytest.approx(0.2) and st.class_means[1][0] == pytest.approx(0.8)


def test_plot_writes_png(tmp_path):
    rec = record_excitations(_constant_model(1.0), _batches(n=1))
    stats = [block_stats(n, e, rec.labels, 4) for n, e in rec.excitations.items()]
    path = plot_class_means(stats, tmp_path / "fig6.png", channels=16)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[0] > 100


def test_fold_constant_block_exact_with_fewer_params():
    model = _constant_model(0.7)
    x = _batches(n=1)[0][0]
    with torch.no_grad():
        before = model(x)
    params, macs = count_params(model), count_macs(model, (3, 8, 8), device="cpu")
    se = model.get_submodule(LAST)
    se_params = sum(p.numel() for p in se.parameters())
    assert se_params == 64 * 4 + 4 + 4 * 64 + 64  # fc1 (C -> C/16) + fc2, with biases
    done = prune_blocks(model, {LAST: torch.full((64,), 1 / (1 + math.exp(-0.7)))}, x)
    assert done[0].action == "folded" and done[0].into == "layer3.2.bn2"
    assert isinstance(model.get_submodule(LAST), nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
    assert params - count_params(model) == se_params
    assert macs - count_macs(model, (3, 8, 8), device="cpu") == 2 * 64 * 4


def test_non_foldable_placement_becomes_identity():
    # SE-POST scales relu(x + F(x)): no single layer produces it, so the block is removed
    model = create_model("resnet20", attn="se", attn_placement="post").eval()
    done = prune_blocks(model, {LAST: torch.full((64,), 0.5)}, torch.randn(2, 3, 8, 8))
    assert done[0].action == "identity" and done[0].into is None


def test_cli_analyze_and_prune_on_digits(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "c.safetensors", _constant_model(4.0, in_chans=1, num_classes=10),
                           arch="resnet20", model_kwargs={"attn": "se_released", "num_classes": 10, "in_chans": 1})
    common = ["--data", "digits", "--image-size", "8", "--batch-size", "128"]
    assert main(["analyze", str(ckpt), *common, "--max-samples", "128", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "analyze-c.json").read_text())
    last = next(b for b in report["blocks"] if b["name"] == LAST)
    assert last["flagged"] and last["saturation"] == 1.0 and report["config"]["samples"] == 128
    assert (tmp_path / "analyze-c.png").stat().st_size > 1000
    out = tmp_path / "p.safetensors"
    assert main(["prune", str(ckpt), *common, "--blocks", LAST, "--out", str(out)]) == 0
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["before"]["top1"] == result["after"]["top1"]  # exact fold: same predictions
    assert result["before"]["params"] - result["after"]["params"] == 64 * 4 + 4 + 4 * 64 + 64
    assert result["pruned"] == [{"name": LAST, "action": "folded", "into": "layer3.2.bn2"}]
    # the pruned checkpoint loads back (Identity in place of the block) with the folded weights
    original, pruned = load_spec(str(ckpt)).model, load_spec(str(out)).model
    assert isinstance(pruned.get_submodule(LAST), nn.Identity)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), original(x), atol=1e-5, rtol=0)
    assert main(["prune", str(ckpt), *common, "--blocks", "nope.attn"]) == 2


# ----------------------------------------------------------------------------- every family, found by type

# Expected {block name: channels} from the papers' tables, not from the code.
_V3_SMALL_SE = [16, 96, 240, 240, 120, 144, 288, 576, 576]  # MobileNetV3 Table 2: "exp size" of the SE rows
# ShuffleNet Table 1 (g = 3): 240 / 480 / 960 output channels over 4 / 8 / 4 units; SE gates the residual
# branch, whose width in each stage's stride-2 unit is out - in (in: 24 after the stem, then 240, 480).
_SHUFFLE_G3 = [240 - 24] + [240] * 3 + [480 - 240] + [480] * 7 + [960 - 480] + [960] * 3
# BN-Inception (Ioffe & Szegedy, arXiv 1502.03167, Fig. 5 as released): 3a..3c, 4a..4e, 5a, 5b outputs
_BNINCEPTION = [256, 320, 576, 576, 576, 608, 608, 1056, 1024, 1024]
FAMILY_BLOCKS = [
    ("mobilenet_v3_small", {"num_classes": 4}, 32,  # SE in torchvision's slot, not at `attn`
     dict(zip(["features.1.block.1"] + [f"features.{i}.block.2" for i in range(4, 12)], _V3_SMALL_SE, strict=True))),
    ("se_shufflenet_v1_g3", {"num_classes": 4}, 32,
     dict(zip([f"stage{s}.{u}.attn" for s, n in ((2, 4), (3, 8), (4, 4)) for u in range(n)], _SHUFFLE_G3,
              strict=True))),
    ("se_bninception", {"num_classes": 4}, 64,
     dict(zip([f"stage{s}.{u}.attn" for s, n in ((3, 2), (4, 5), (5, 3)) for u in range(n)], _BNINCEPTION,
              strict=True))),
    # the 102M-weight classifier is not what is tested: its features only (SE after each of the 5 blocks)
    ("se_vgg16_bn", {"features_only": True}, 32,
     {f"features.{i}.attn": c for i, c in zip((5, 12, 22, 32, 42), (64, 128, 256, 512, 512), strict=True)}),
]


def test_nested_blocks_are_part_of_the_outer_one():
    # scSE holds an SE (cse) and an sSE (sse), both registered types: one block per unit, not three
    blocks = attention_blocks(create_model("resnet20", attn="scse"))
    assert list(blocks) == [f"layer{s}.{u}.attn" for s in (1, 2, 3) for u in range(3)]
    assert {type(b).__name__ for b in blocks.values()} == {"SpatialChannelSE"}


@pytest.mark.parametrize("name,kwargs,size,expected", FAMILY_BLOCKS, ids=[f[0] for f in FAMILY_BLOCKS])
def test_analyze_finds_every_block_of_each_family(name, kwargs, size, expected):
    model = create_model(name, **kwargs)
    g = torch.Generator().manual_seed(0)
    rec = record_excitations(model, [(torch.randn(4, 3, size, size, generator=g), torch.arange(4) % 2)])
    assert {n: e.shape for n, e in rec.excitations.items()} == {n: (4, c) for n, c in expected.items()}
    assert not rec.skipped and list(rec.excitations) == list(expected)  # network order
    stats = [block_stats(n, e, rec.labels, 2) for n, e in rec.excitations.items()]
    assert all(0 <= s.saturation <= 1 and math.isfinite(s.variation) for s in stats)


def test_analyze_and_prune_attached_torchvision_resnet18():
    import torchvision

    from senet import attach

    model, _ = attach(torchvision.models.resnet18(num_classes=3), "se", input_size=(3, 32, 32))
    for p in model.parameters():  # gates g = 0.5: the wrapper's scale 1 + g (s - 1) is not all ones
        if p.dim() == 0:
            p.data.fill_(0.5)
    model.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rec = record_excitations(model, [(x, torch.arange(4) % 3)])
    widths = {n.removesuffix(".attached"): e.shape[1] for n, e in rec.excitations.items()}
    assert widths == {f"layer{s}.{u}.bn2": c for s, c in ((1, 64), (2, 128), (3, 256), (4, 512)) for u in range(2)}
    # GatedExcitation(u) = u * (1 + g (s - 1)): checked against the forward for every block
    assert all(n.endswith(".attached") for n in rec.excitations) and all(rec.scale_form.values())
    e = rec.excitations["layer1.0.bn2.attached"]
    assert ((e - 1).abs() > 1e-4).any() and ((e > 0.5) & (e < 1.5)).all()  # 1 + 0.5 (s - 1), s in (0, 1)
    # each wrapper's constant scale folds exactly into bn2 (prune_blocks checks the logits to 1e-5)
    done = prune_blocks(model, {n: e.mean(0) for n, e in rec.excitations.items()}, x)
    assert [(d.action, d.into) for d in done] == [("folded", n.removesuffix(".attached")) for n in rec.excitations]


def test_prune_folds_mobilenet_v3_only_where_exact():
    model = create_model("mobilenet_v3_small", num_classes=4).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rec = record_excitations(model, [(x, torch.arange(4))])
    done = {d.name: d for d in prune_blocks(model, {n: e.mean(0) for n, e in rec.excitations.items()}, x)}
    # the first SE row follows dw conv + BN + ReLU: s̄ relu(v) = relu(s̄ v) folds into the BN;
    # the others follow hard-swish, which no constant commutes with: removed, not folded
    assert (done["features.1.block.1"].action, done["features.1.block.1"].into) == ("folded", "features.1.block.0.1")
    assert all(d.action == "identity" for n, d in done.items() if n != "features.1.block.1")
    assert not any(isinstance(m, nn.Module) and type(m).__name__ == "SqueezeExcite" for m in model.modules())
