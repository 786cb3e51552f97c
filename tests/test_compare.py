"""`senet.evaluate` and `senet.compare`: figures checked against hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from senet.evaluate import EvalResult, evaluate


class _FixedLogits(nn.Module):
    """Returns the logits row stored for each sample id (the input is the id)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids.long().view(-1)]


def _loader(labels, batch):
    ids = torch.arange(len(labels))
    y = torch.tensor(labels)
    return [(ids[i:i + batch], y[i:i + batch]) for i in range(0, len(labels), batch)]


# 6 samples, 6 classes. Rows are ranked so top-1 / top-5 membership is known by construction.
_LOGITS = torch.tensor([
    [9.0, 1, 2, 3, 4, 5],   # label 0: top-1 correct
    [1.0, 9, 2, 3, 4, 5],   # label 1: top-1 correct
    [9.0, 8, 2, 3, 4, 5],   # label 2: ranked 6th of 6 -> wrong even at top-5
    [9.0, 1, 2, 8, 4, 5],   # label 3: top-1 says 0, label ranked 2nd -> top-5 hit
    [1.0, 9, 2, 3, 4, 5],   # label 4: top-1 says 1, label ranked 3rd -> top-5 hit
    [1.0, 2, 3, 4, 5, 9],   # label 5: top-1 correct
])
_LABELS = [0, 1, 2, 3, 4, 5]


def test_evaluate_matches_hand_counts():
    model = _FixedLogits(_LOGITS)
    model.train()
    r = evaluate(model, _loader(_LABELS, batch=4), device="cpu", num_classes=6)
    assert isinstance(r, EvalResult)
    assert r.num_samples == 6 and r.topk == 5
    assert r.top1 == pytest.approx(100 * 3 / 6)
    assert r.top5 == pytest.approx(100 * 5 / 6)
    # mean cross-entropy by hand: logsumexp(row) - row[label]
    by_hand = np.mean([math.log(sum(math.exp(v) for v in row)) - row[t]
                       for row, t in zip(_LOGITS.tolist(), _LABELS, strict=True)])
    assert r.loss == pytest.approx(by_hand, rel=1e-6)
    expected = np.zeros((6, 6), dtype=np.int64)
    for t, p in [(0, 0), (1, 1), (2, 0), (3, 0), (4, 1), (5, 5)]:
        expected[t, p] += 1
    np.testing.assert_array_equal(r.confusion, expected)
    np.testing.assert_allclose(r.per_class, [100, 100, 0, 0, 0, 100])
    assert model.training, "evaluate() must restore the model's mode"


def test_evaluate_caps_topk_and_reports_empty_classes():
    # 3 classes: top-5 is capped at top-3, which always hits; class 2 has no samples
    logits = torch.tensor([[0.0, 1, 2], [3.0, 2, 1], [0.0, 5, 1]])
    r = evaluate(_FixedLogits(logits), _loader([0, 0, 1], batch=2), device="cpu", num_classes=3)
    assert r.topk == 3 and r.top5 == 100.0
    assert r.top1 == pytest.approx(100 * 2 / 3)
    assert r.per_class[0] == 50.0 and r.per_class[1] == 100.0 and np.isnan(r.per_class[2])
    assert r.to_dict()["per_class"][2] is None


def test_evaluate_rejects_wrong_width_and_bad_labels():
    model = _FixedLogits(_LOGITS)
    with pytest.raises(ValueError, match="num_classes=4"):
        evaluate(model, _loader(_LABELS, 6), device="cpu", num_classes=4)
    with pytest.raises(ValueError, match="label 7"):
        evaluate(model, [(torch.arange(2), torch.tensor([0, 7]))], device="cpu", num_classes=6)


def test_senet_eval_writes_json_and_png(tmp_path):
    import json

    from senet.checkpoint import save_checkpoint
    from senet.cli import main
    from senet.data import create_datasets
    from senet.models import create_model

    kwargs = {"num_classes": 10, "in_chans": 1}
    model = create_model("resnet18", **kwargs)
    ckpt = save_checkpoint(tmp_path / "r18.safetensors", model, arch="resnet18", model_kwargs=kwargs)
    rc = main(["eval", str(ckpt), "--data", "digits", "--image-size", "8", "--out", str(tmp_path / "out")])
    assert rc == 0
    payload = json.loads((tmp_path / "out" / "eval-r18.json").read_text())
    png = tmp_path / "out" / "eval-r18-confusion.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("config", "versions", "device", "git_revision", "created"):
        assert key in payload
    assert payload["versions"]["torch"] == torch.__version__
    # confusion rows count the val split's true labels, whatever the (random) model predicts
    val = create_datasets("digits", image_size=8).val
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    conf = np.asarray(payload["result"]["confusion"])
    np.testing.assert_array_equal(conf.sum(1), torch.bincount(labels, minlength=10).numpy())
    assert payload["result"]["top1"] == pytest.approx(100 * np.trace(conf) / len(val))


def test_senet_eval_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    from senet.cli import main

    assert main(["eval", str(tmp_path / "nope.safetensors")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
