"""Checkpoints from timm / torchvision / senet load into senet networks with the same logits.

Nothing can be downloaded, so the sources are timm and torchvision models built with random
weights (BN statistics perturbed so they matter), saved to .pth (a plain dict) and .safetensors.
The reference is the source model itself: its logits on the same input in eval mode.
"""

import json
import os

import pytest
import timm
import torch
import torchvision
from helpers import perturb_bn
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import senet
from senet import cli
from senet.checkpoint import build_from_checkpoint, load_checkpoint, save_checkpoint
from senet.convert import LoadReport, load_checkpoint_into, load_into, prepare
from senet.models import ResNet

ATOL = 1e-4


def scaled_atol(ref: torch.Tensor) -> float:
    """ATOL for logits up to 1 in size, relative 1e-5 of the largest beyond: with BN statistics perturbed, the
    random networks' logits reach the hundreds, and float32 rounding (senet's native unit ends compute
    ``bn(c) + shortcut`` in one expression, PyTorch in three) moves them by ~1e-6 of that. A wrong mapping
    moves them by their own size."""
    return ATOL * max(1.0, 0.1 * ref.abs().max().item())

# (library, source name, senet model it must map to)
SOURCES = [
    ("timm", "seresnet50", "se_resnet50"),
    ("timm", "seresnext50_32x4d", "se_resnext50_32x4d"),
    ("timm", "resnet50", "resnet50"),
    ("timm", "legacy_seresnet50", "legacy_se_resnet50"),
    ("timm", "legacy_seresnext50_32x4d", "legacy_se_resnext50_32x4d"),
    ("torchvision", "resnet50", "resnet50"),
    ("torchvision", "resnext50_32x4d", "resnext50_32x4d"),
]



def build_source(lib: str, name: str, **kwargs) -> nn.Module:
    model = timm.create_model(name, **kwargs) if lib == "timm" else getattr(torchvision.models, name)(**kwargs)
    return perturb_bn(model)


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Lazily build each source once: (model, .pth path, .safetensors path)."""
    cache = {}
    root = tmp_path_factory.mktemp("sources")

    def get(lib: str, name: str):
        if (lib, name) not in cache:
            torch.manual_seed(0)
            model = build_source(lib, name)
            state = model.state_dict()
            pth, st = root / f"{lib}_{name}.pth", root / f"{lib}_{name}.safetensors"
            torch.save(dict(state), pth)
            save_file({k: v.contiguous() for k, v in state.items()}, str(st))
            cache[lib, name] = (model, pth, st)
        return cache[lib, name]

    return get


@pytest.fixture(scope="module")
def x():
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("lib,name,arch", SOURCES, ids=[f"{lib}-{name}" for lib, name, _ in SOURCES])
def test_source_round_trips_to_equal_logits(lib, name, arch, saved, x, tmp_path):
    source, pth, st = saved(lib, name)
    ref = logits(source, x)

    model = senet.create_model(checkpoint=pth)  # name detected from the layout
    assert model.arch_name == arch
    r = model.load_report
    assert (r.new, r.skipped, r.unexpected) == ([], [], [])
    assert len(r.loaded) == len(source.state_dict())
    torch.testing.assert_close(logits(model, x), ref, atol=scaled_atol(ref), rtol=0)

    # `senet convert` from the .safetensors copy writes the same tensors under the same arch, so
    # build_from_checkpoint(out) computes these logits (that path is checked in the round trip below).
    out = tmp_path / "converted.safetensors"
    assert cli.main(["convert", str(st), str(out)]) == 0
    converted, header = load_checkpoint(out)
    assert header["arch"] == arch and name in header["provenance"]["source"]
    assert header["model_kwargs"] == {"num_classes": 1000}
    ours = model.state_dict()
    assert converted.keys() == ours.keys()
    for key, value in converted.items():
        assert torch.equal(value, ours[key]), key


def test_senet154_full_key_mapping_on_meta():
    """Every one of legacy_senet154's 1144 tensors lands on a senet154 tensor of the same size."""
    with torch.device("meta"):
        src = timm.create_model("legacy_senet154")
        ours = senet.models.create_model("senet154")
    state, source, _, _ = prepare(src.state_dict())
    assert (source.arch, source.layout) == ("senet154", "timm_legacy")
    report = load_into(ours, state, source=source, arch="senet154")  # strict: raises on any clash
    assert (len(report.loaded), report.new, report.skipped, report.unexpected) == (1144, [], [], [])


def test_senet154_structure_gives_equal_logits(tmp_path, x):
    """SENet-154's deep stem, 64-group 3x3s, halved 1x1 and 3x3 downsamples, one unit per stage."""
    from timm.models.senet import SEBottleneck, SENet

    src = perturb_bn(SENet(SEBottleneck, [1, 1, 1, 1], groups=64, reduction=16, inplanes=128, input_3x3=True,
                           downsample_kernel_size=3, downsample_padding=1, num_classes=10))
    torch.save(src.state_dict(), tmp_path / "s154.pth")
    ours = ResNet("bottleneck", [1, 1, 1, 1], groups=64, width_per_group=4, conv1_ratio=0.5, deep_stem=True,
                  pool_ceil=True, down_kernel=3, attn="se_released", num_classes=10)
    report = load_checkpoint_into(ours, tmp_path / "s154.pth")
    assert (report.new, report.unexpected) == ([], [])
    torch.testing.assert_close(logits(ours, x), logits(src, x), atol=ATOL, rtol=0)


def _attn_keys_by_hand() -> list[str]:
    # SE-ResNet-50: 3, 4, 6, 3 units (ResNet paper Table 1), one SE (fc1, fc2 with biases) each.
    return [f"layer{s}.{b}.attn.{fc}.{p}" for s, n in enumerate((3, 4, 6, 3), start=1)
            for b in range(n) for fc in ("fc1", "fc2") for p in ("weight", "bias")]


def test_resnet50_into_se_resnet50_fills_all_but_attention(saved, tmp_path):
    source, _, _ = saved("timm", "resnet50")
    wrapped = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}  # DDP around compile
    torch.save(wrapped, tmp_path / "ddp.pth")
    with pytest.warns(UserWarning, match="64 new"):  # named explicitly
        model = senet.create_model("se_resnet50", checkpoint=tmp_path / "ddp.pth")
    r = model.load_report
    assert sorted(r.new) == sorted(_attn_keys_by_hand())
    assert (r.skipped, r.unexpected) == ([], [])
    notes = " ".join(r.notes)
    assert "'module.'" in notes and "'_orig_mod.'" in notes and "no attention blocks" in notes
    ours = model.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(ours[key], value), key
    assert "layer*.*.attn.fc*.weight (32)" in str(r)


def test_num_classes_mismatch_skips_head_and_says_so(tmp_path, x):
    src = build_source("torchvision", "resnet18")  # 1000 classes
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    with pytest.warns(UserWarning, match="skipped"):
        model = senet.create_model("resnet18", checkpoint=tmp_path / "r18.pth", num_classes=10)
    r = model.load_report
    assert r.skipped == ["fc.weight", "fc.bias"] and r.new == []
    assert any("num_classes" in n and "(1000, 512)" in n for n in r.notes)
    assert model.fc.out_features == 10
    # Everything before the head was loaded: the pooled features equal torchvision's.
    with torch.no_grad():
        tv_feats = nn.Sequential(*list(src.children())[:-1])(x).flatten(1)
        ours = model.eval().forward_features(x)[-1].mean((2, 3))
    torch.testing.assert_close(ours, tv_feats, atol=ATOL, rtol=0)


def test_num_classes_taken_from_checkpoint_and_container_unwrapped(tmp_path):
    src = build_source("torchvision", "resnet18", num_classes=7)
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, tmp_path / "train.pth")
    model = senet.create_model("resnet18", checkpoint=tmp_path / "train.pth")
    assert model.fc.out_features == 7
    assert any("'state_dict'" in n for n in model.load_report.notes)


def test_wrong_architecture_names_first_mismatched_keys(saved):
    _, pth, _ = saved("timm", "seresnext50_32x4d")
    with pytest.raises(ValueError) as err:
        senet.create_model("se_resnet50", checkpoint=pth)
    msg = str(err.value)
    assert "layer1.0.conv1.weight: checkpoint (128, 64, 1, 1) vs model (64, 64, 1, 1)" in msg
    assert "'se_resnext50_32x4d'" in msg  # what to build instead


def test_wrong_depth_names_missing_keys_and_non_strict_loads_what_fits(tmp_path):
    src = build_source("torchvision", "resnet18")
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"missing from the checkpoint: layer1\.2\.conv1\.weight"):
        senet.create_model("resnet34", checkpoint=tmp_path / "r18.pth")
    with pytest.warns(UserWarning):
        model = senet.create_model("resnet34", checkpoint=tmp_path / "r18.pth", strict=False)
    assert "layer1.2.conv1.weight" in model.load_report.new
    assert torch.equal(model.conv1.weight, src.conv1.weight)


def test_cli_errors_are_one_line(tmp_path, saved, capsys):
    _, pth, _ = saved("timm", "seresnext50_32x4d")
    assert cli.main(["convert", str(pth), str(tmp_path / "o.safetensors"), "--arch", "se_resnet50"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("senet convert: error:") and "\n" not in err and "layer1.0.conv1.weight" in err
    assert not (tmp_path / "o.safetensors").exists()
    assert cli.main(["convert", str(pth), str(tmp_path / "o.pth")]) == 2
    assert ".safetensors" in capsys.readouterr().err


class NotAWeight:
    """A custom class: unpickling it would run code from this module."""


def test_pickle_with_custom_class_is_refused(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1), "config": NotAWeight()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights only"):
        senet.create_model("resnet18", checkpoint=tmp_path / "evil.pth")
    (tmp_path / "w.npz").write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        senet.create_model("resnet18", checkpoint=tmp_path / "w.npz")


def test_our_format_round_trip_with_header_and_provenance(tmp_path, x):
    model = senet.create_model("se_resnet18", num_classes=5, attn_placement="pre").eval()
    perturb_bn(model)
    kwargs = {"num_classes": 5, "attn_placement": "pre"}
    path = save_checkpoint(tmp_path / "m.safetensors", model, arch="se_resnet18", model_kwargs=kwargs,
                           extra={"epoch": 3, "optimizer": {"lr": 0.1}}, source="test")
    state, header = load_checkpoint(path)
    assert header["format"] == "senet" and header["format_version"] == 1
    assert (header["arch"], header["model_kwargs"], header["num_classes"]) == ("se_resnet18", kwargs, 5)
    prov = header["provenance"]
    assert (prov["senet"], prov["torch"], prov["source"]) == (senet.__version__, torch.__version__, "test")
    assert {"git_revision", "created"} <= set(prov)
    assert header["extra"] == {"epoch": 3, "optimizer": {"lr": 0.1}}
    with safe_open(str(path), framework="pt") as f:  # any safetensors reader sees the header
        assert json.loads(f.metadata()["senet"])["arch"] == "se_resnet18"
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    ref = logits(model, x)
    torch.testing.assert_close(logits(build_from_checkpoint(path), x), ref, atol=0, rtol=0)
    rebuilt = senet.create_model(checkpoint=path)  # name and kwargs from the header
    assert rebuilt.arch_name == "se_resnet18" and rebuilt.load_report.new == []
    torch.testing.assert_close(logits(rebuilt, x), ref, atol=0, rtol=0)
    again = tmp_path / "again.safetensors"  # `senet convert` of our own format keeps arch and kwargs
    assert cli.main(["convert", str(path), str(again)]) == 0
    assert load_checkpoint(again)[1]["model_kwargs"] == kwargs


def test_foreign_or_newer_safetensors_is_not_our_format(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="without a senet header"):
        load_checkpoint(tmp_path / "plain.safetensors")
    header = {"format": "senet", "format_version": 2, "arch": "resnet18", "model_kwargs": {}}
    save_file({"w": torch.zeros(2)}, str(tmp_path / "new.safetensors"), metadata={"senet": json.dumps(header)})
    with pytest.raises(ValueError, match="upgrade senet"):
        load_checkpoint(tmp_path / "new.safetensors")


def test_atomic_write_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    first = nn.Linear(3, 2)
    save_checkpoint(path, first, arch="first", extra={"step": 1})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("senet.provenance.os.fsync", disk_full)  # fails after the bytes were written
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, nn.Linear(3, 2), arch="second", extra={"step": 2})
    monkeypatch.undo()
    state, header = load_checkpoint(path)
    assert (header["arch"], header["extra"]) == ("first", {"step": 1})
    assert torch.equal(state["weight"], first.weight)
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]  # no temp file left behind
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(path, first, arch="x", extra={"bad": object()})
    assert load_checkpoint(path)[1]["arch"] == "first"


def test_load_report_prints_counts_and_groups():
    r = LoadReport(source="timm x", arch="y", loaded=["a"], new=[f"layer1.{i}.attn.fc1.weight" for i in range(8)],
                   notes=["hello"])
    text = str(r)
    assert text.splitlines()[0].endswith("1 loaded, 8 new, 0 skipped, 0 unexpected")
    assert "layer*.*.attn.fc*.weight (8)" in text and "note: hello" in text


def test_nothing_fits_is_an_error_even_non_strict():
    model = senet.models.create_model("resnet18")
    with pytest.raises(ValueError, match="nothing in the checkpoint fits"):
        load_checkpoint_into(model, {"foo.weight": torch.zeros(3)}, strict=False)


def test_legacy_basic_block_seresnet_is_not_proposed():
    """timm's legacy_seresnet18 applies ReLU before SE: no senet network computes that."""
    with torch.device("meta"):
        state = timm.create_model("legacy_seresnet18").state_dict()
    _, source, _, _ = prepare(state)
    assert source.arch is None and "legacy_seresnet18" in source.name
    with pytest.raises(ValueError, match="cannot tell which senet network"):
        senet.create_model(checkpoint=state)
