"""The tools together: one loader (``senet.load_model``) for every kind of checkpoint, ``senet train
--base/--attach``, and ``senet eval`` reproducing a run's own validation."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torchvision.models as tv
from safetensors.torch import load_file
from torch import nn

import senet
from senet.checkpoint import save_checkpoint
from senet.cli import main
from senet.data import create_datasets, create_loaders
from senet.evaluate import evaluate
from senet.models import create_model
from senet.prune import prune_blocks
from senet.surgery import GatedExcitation, attach, attached_blocks, load_base_model, save_attached

LAST = "layer3.2.attn"  # se_resnet20's last SE block (64 channels)


def _digits_val(size: int):
    bundle = create_datasets("digits", None, image_size=size)
    return bundle, create_loaders(bundle, 256).val


def _pruned_checkpoint(path):
    model = create_model("se_resnet20", num_classes=10, in_chans=1).eval()
    done = prune_blocks(model, {LAST: torch.full((64,), 0.7)}, torch.randn(2, 1, 8, 8))
    assert done[0].action == "folded"
    save_checkpoint(path, model, arch="se_resnet20", model_kwargs={"num_classes": 10, "in_chans": 1},
                    extra={"pruned": {"blocks": [LAST]}})
    return model, 8


def _attached_checkpoint(path):
    model = load_base_model("torchvision:resnet18", num_classes=10, in_chans=1)
    attach(model, "se", "stage", input_size=(1, 16, 16), reduction=8)
    for b in attached_blocks(model).values():
        b.gain.data.uniform_(0.3, 1.0)  # attention active: a rebuild without it would differ
    save_attached(path, model)
    return model.eval(), 16


@pytest.mark.parametrize("make", [_pruned_checkpoint, _attached_checkpoint], ids=["pruned", "attached"])
def test_eval_and_export_any_checkpoint(make, tmp_path):
    path = tmp_path / "m.safetensors"
    model, size = make(path)
    loaded = senet.load_model(path)
    x = torch.randn(3, 1, size, size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # senet eval: the same figures as evaluating the in-memory model on the same images
    assert main(["eval", str(path), "--data", "digits", "--image-size", str(size), "--out", str(tmp_path)]) == 0
    got = json.loads((tmp_path / "eval-m.json").read_text())["result"]
    bundle, val = _digits_val(size)
    ref = evaluate(model, val, device="cpu", num_classes=10)
    assert got["top1"] == ref.top1 and got["confusion"] == ref.confusion.tolist()
    # senet export: onnxruntime on the written file agrees with the in-memory model
    ort = pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(path), "--format", "onnx", "--exporter", "torchscript", "--opset", "17",
                 "--res", str(size), "--out", str(onnx_path)]) == 0
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x[:2].numpy()})  # exported with batch 2
    np.testing.assert_allclose(out, model(x[:2]).detach().numpy(), atol=1e-4, rtol=1e-4)


def test_stem_adapted_to_one_channel_after_loading(tmp_path):
    src = tv.resnet18(num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "pre.pth")
    with pytest.warns(UserWarning, match="fc.weight"):  # 1000-class head kept random for 10 classes
        gray = load_base_model("torchvision:resnet18", num_classes=10, in_chans=1, checkpoint=tmp_path / "pre.pth")
    assert gray.conv1.weight.shape == (64, 1, 7, 7)
    # the pretrained trunk sees a gray image x exactly as it saw (x, x, x)
    trunk, ref_trunk = nn.Sequential(*list(gray.children())[:-1]), nn.Sequential(*list(src.children())[:-1])
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(trunk.eval()(x), ref_trunk.eval()(x.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="in_chans=2"):
        load_base_model("torchvision:resnet18", in_chans=2)


def test_recorded_structure_is_not_rebuilt_as_something_else(tmp_path):
    path = tmp_path / "a.safetensors"
    model, _ = _attached_checkpoint(path)
    same = senet.create_model(None, checkpoint=path)  # delegates to load_model
    blocks = attached_blocks(same)
    assert blocks.keys() == attached_blocks(model).keys() and same.arch_name == "torchvision:resnet18"
    assert all(isinstance(b, GatedExcitation) for b in blocks.values())
    with pytest.raises(ValueError, match="rebuilds only as recorded"):
        senet.create_model(None, checkpoint=path, num_classes=5)


# ----------------------------------------------------------------------------- senet train --base/--attach

RECIPE = ["--data", "digits", "--image-size", "16", "--subset", "64", "--batch-size", "32", "--epochs", "2",
          "--lr", "0.05", "--backbone-lr-scale", "0.1", "--unfreeze", "1", "--quiet"]


def test_gates_are_grouped_as_attention():
    from senet import optim as O

    model = load_base_model("torchvision:resnet18", num_classes=10, in_chans=1)
    attach(model, "se", "residual", input_size=(1, 16, 16), reduction=8)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in O.param_groups(model, weight_decay=5e-4)}
    gains = {n for n in names.values() if n.endswith(".attached.gain")}
    assert len(gains) == 8 and gains <= groups["head.no_decay"]  # full lr, no decay, trained at stage 0
    assert all(".attached." in n or n.startswith("fc.") for n in groups["head.no_decay"] | groups["head.decay"])


def test_train_base_attach_digits_eval_and_exact_resume(tmp_path, monkeypatch, capsys):
    import senet.train as T

    torch.save(tv.resnet18(num_classes=1000).state_dict(), tmp_path / "pre.pth")  # "pretrained", 3-channel
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="fc.weight"):
        assert main(["train", "--base", "torchvision:resnet18", "--attach", "se", "--attach-kwargs", "reduction=8",
                     "--checkpoint", str(tmp_path / "pre.pth"), *RECIPE, "--out", str(run)]) == 0
    res = json.loads((run / "results.json").read_text())["result"]
    assert [h["stage"] for h in res["history"]] == [0, 2]  # attention + head first, then everything
    model = senet.load_model(run / "last.safetensors")
    assert model.conv1.weight.shape == (64, 1, 7, 7) and len(attached_blocks(model)) == 8
    gains = [b.gain.item() for b in attached_blocks(model).values()]
    assert all(g != 0.0 for g in gains)  # zero at insertion; the gates trained
    # senet eval reads data and image size from the checkpoint and reproduces the run's last validation
    capsys.readouterr()
    assert main(["eval", str(run / "last.safetensors"), "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "eval-last.json").read_text())
    assert payload["config"]["data"]["name"] == "digits" and payload["config"]["data"]["image_size"] == 16
    assert payload["result"]["top1"] == res["history"][-1]["val_top1"]
    # exact resume: stop after epoch 1's checkpoint, resume, same weights bit for bit
    cfg = T.TrainConfig.from_dict({**json.loads((run / "config.json").read_text())["config"],
                                   "out": str(tmp_path / "cut")})
    step = T.train_step

    def stop_at_epoch_2(r, images, labels):
        if r.progress.step == r.steps_per_epoch:
            raise KeyboardInterrupt
        return step(r, images, labels)

    monkeypatch.setattr(T, "train_step", stop_at_epoch_2)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="fc.weight"):
        T.fit(cfg)
    monkeypatch.setattr(T, "train_step", step)
    resumed = T.fit(T.TrainConfig(resume=str(tmp_path / "cut"), quiet=True))
    assert resumed.resumed_at == [2]
    a, b = load_file(run / "last.safetensors"), load_file(tmp_path / "cut" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_attach_user_errors(tmp_path, capsys):
    assert main(["train", "--attach", "se", "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert "needs base" in capsys.readouterr().err
    assert main(["train", "resnet20", "--base", "torchvision:resnet18", "--out", str(tmp_path / "b")]) == 2
    assert "name the network once" in capsys.readouterr().err
    assert main(["train", "--base", "torchvision:resnet18", "--attach", "se", "--attach-kwargs", "r8",
                 "--out", str(tmp_path / "c")]) == 2
    assert "--attach-kwargs takes KEY=VALUE" in capsys.readouterr().err


# ----------------------------------------------------------------------------- provenance


def test_provenance_in_one_place(tmp_path, monkeypatch):
    import subprocess
    from pathlib import Path

    from senet import provenance as P

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(P.__file__).parent, capture_output=True,
                          text=True).stdout.strip()
    if "SENET_GIT_REVISION" in os.environ:  # the checkout's own answer, not a copy's
        monkeypatch.delenv("SENET_GIT_REVISION")
        P.git_revision.cache_clear()
    rev = P.git_revision()
    assert rev is None if not head else rev.removesuffix("-dirty") == head
    hits = P.git_revision.cache_info().hits
    assert P.git_revision() == rev and P.git_revision.cache_info().hits == hits + 1  # computed once
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    monkeypatch.setenv("SENET_UNRELATED_VAR", "x")
    block = P.provenance({"lr": 0.1}, "cpu")
    assert block["device"]["env"]["MALLOC_MMAP_MAX_"] == "0" and "SENET_UNRELATED_VAR" not in block["device"]["env"]
    assert block["versions"] == {**P.versions(), "torch": torch.__version__, "senet": senet.__version__}
    assert block["device"]["type"] == "cpu" and block["git_revision"] == rev and block["config"] == {"lr": 0.1}
    path = P.write_json(tmp_path / "r.json", {**block, "x": np.float32(0.5), "a": np.arange(2), "p": tmp_path})
    back = json.loads(path.read_text())
    assert (back["x"], back["a"], back["p"]) == (0.5, [0, 1], str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind



def test_git_revision_of_a_copy_comes_from_the_environment(monkeypatch):
    """A copy of the tree sent to a GPU machine (no .git, or one at another commit) records the revision it was
    told, marked as told; without it and without git, None."""
    import subprocess

    from senet import provenance as P

    def no_git(*args, **kwargs):
        raise subprocess.CalledProcessError(128, args[0], stderr="fatal: not a git repository")

    monkeypatch.setattr(P.subprocess, "run", no_git)
    P.git_revision.cache_clear()
    try:
        monkeypatch.delenv("SENET_GIT_REVISION", raising=False)
        assert P.git_revision() is None
        P.git_revision.cache_clear()
        monkeypatch.setenv("SENET_GIT_REVISION", " 7d9a03d\n")
        assert P.git_revision() == "7d9a03d (from SENET_GIT_REVISION)"
        monkeypatch.undo()  # git answers again: the given revision still wins
        monkeypatch.setenv("SENET_GIT_REVISION", "7d9a03d")
        P.git_revision.cache_clear()
        assert P.git_revision() == "7d9a03d (from SENET_GIT_REVISION)"
    finally:
        P.git_revision.cache_clear()  # the real revision for the tests after this one

def test_data_settings_read_where_train_stores_them():
    from senet.checkpoint import data_settings

    trained = {"extra": {"train": {"config": {"data": "cifar10", "root": "/c", "image_size": 16}}}}
    assert data_settings(trained) == ("cifar10", "/c", 16)
    assert data_settings(trained, image_size=24) == ("cifar10", "/c", 24)
    assert data_settings(trained, data="digits") == ("digits", None, 16)  # the root belongs to cifar10
    assert data_settings({"extra": {"config": {"data": "digits", "image_size": 8}}}) == ("digits", None, 8)
    assert data_settings({"extra": {}}) == ("digits", None, None)


def test_every_help_page_renders(capsys):
    """``senet --help`` and each command's ``--help``: argparse %-formats help strings, and a bare "95% CI"
    in the bench command's summary made ``senet --help`` itself end in a traceback (before commit 5ba5479)."""
    import argparse

    from senet.cli import build_parser

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    assert "usage: senet" in top and "95% CI" in top
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"train", "bench", "export", "analyze", "prune"} <= set(sub.choices)
    for command in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0, command
        assert f"usage: senet {command}" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "bench", "export"])
def test_model_flag_gets_a_hint_not_a_prefix_match(command, capsys):
    """timm's scripts spell it ``--model NAME``; argparse's prefix matching read that as ``--model-arg``
    and failed with a message about KEY=VALUE. Now: no prefix matching, and the fix is named."""
    with pytest.raises(SystemExit) as e:
        main([command, "--model", "resnet20"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --model" in err and f"senet {command} NAME" in err
    assert "KEY=VALUE" not in err


def test_compare_models_spaced_gets_the_comma_form(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", "--models", "resnet20", "se_resnet20"])
    assert e.value.code == 2
    assert "--models resnet20,se_resnet20" in capsys.readouterr().err
