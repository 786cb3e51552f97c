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
    model = create_model("resnet20", **kwargs)
    ckpt = save_checkpoint(tmp_path / "r20.safetensors", model, arch="resnet20", model_kwargs=kwargs)
    rc = main(["eval", str(ckpt), "--data", "digits", "--image-size", "8", "--out", str(tmp_path / "out")])
    assert rc == 0
    payload = json.loads((tmp_path / "out" / "eval-r20.json").read_text())
    png = tmp_path / "out" / "eval-r20-confusion.png"
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


# ----------------------------------------------------------------------------- statistics


def test_mean_std_by_hand():
    from senet.compare import mean_std

    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert std == pytest.approx(math.sqrt(5 / 3))  # sample std: sum of squares 5, n - 1 = 3
    assert math.isnan(mean_std([7.0])[1])


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (29, 2.0452)])
def test_t_quantile_matches_tables(df, expected):
    from senet.compare import t_quantile

    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)  # printed t tables, two-sided 95%


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    from senet.compare import t_quantile

    for df in (2, 5, 17):
        for p in (0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-7)


def test_paired_gain_by_hand():
    from senet.compare import paired_gain

    g = paired_gain([90.0, 91.0, 92.0], [91.0, 93.0, 92.5])  # d = 1, 2, 0.5
    sd = math.sqrt(((1 - 7 / 6) ** 2 + (2 - 7 / 6) ** 2 + (0.5 - 7 / 6) ** 2) / 2)
    half = 4.302653 * sd / math.sqrt(3)
    assert g.diffs == [1.0, 2.0, 0.5] and g.n == 3
    assert g.mean == pytest.approx(7 / 6) and g.std == pytest.approx(sd)
    assert (g.ci_low, g.ci_high) == (pytest.approx(7 / 6 - half, abs=1e-5), pytest.approx(7 / 6 + half, abs=1e-5))
    assert not g.distinguishable and "noise" in g.verdict()

    g = paired_gain([90.0, 90.0, 90.0, 90.0], [91.0, 91.1, 90.9, 91.0])  # d sd = sqrt(0.02 / 3)
    half = 3.182446 * math.sqrt(0.02 / 3) / 2
    assert g.ci_low == pytest.approx(1 - half, abs=1e-5) and g.distinguishable
    assert g.verdict().startswith("better")


def test_paired_gain_uses_the_pairing():
    from senet.compare import mean_std, paired_gain

    base, model = [70.0, 80.0, 90.0], [71.0, 81.0, 91.0]
    assert mean_std(base)[1] == pytest.approx(10.0)  # unpaired, seed noise would swamp the +1
    g = paired_gain(base, model)
    assert g.mean == pytest.approx(1.0) and g.std == pytest.approx(0.0) and g.distinguishable
    g = paired_gain([80.0, 80.0, 80.0], [78.0, 78.5, 77.5])
    assert g.distinguishable and g.verdict().startswith("worse")


def test_paired_gain_edge_cases():
    from senet.compare import paired_gain

    g = paired_gain([90.0], [91.0])
    assert g.n == 1 and math.isnan(g.ci_low) and not g.distinguishable and "seeds" in g.verdict()
    with pytest.raises(ValueError, match="equal-length"):
        paired_gain([1.0, 2.0], [1.0])


def test_measure_latency_interleaves_models():
    from senet.compare import measure_latency

    calls = []

    class Tap(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return x

    times = measure_latency({"a": Tap("a"), "b": Tap("b"), "c": Tap("c")}, (1, 2, 2), reps=4, warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    rounds = calls[3:]  # after one warmup round
    assert rounds == list("abc" "bca" "cab" "abc")  # each round rotates who runs first


# ----------------------------------------------------------------------------- senet compare


def test_senet_compare_tiny_run(tmp_path, capsys):
    import json

    from senet.cli import main

    out = tmp_path / "cmp"
    rc = main(["compare", "--models", "resnet20,se_resnet20", "--seeds", "2", "--epochs", "1", "--subset", "64",
               "--image-size", "8", "--batch-size", "32", "--latency-reps", "3", "--recipe", "label_smoothing=0.1",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "gain vs baseline" in printed and "se_resnet20" in printed and "ETA" in printed
    payload = json.loads((out / "compare.json").read_text())
    for key in ("config", "versions", "device", "git_revision", "created", "train_config", "data"):
        assert key in payload, key
    assert payload["config"]["seeds"] == 2 and payload["seeds"] == [0, 1]
    assert payload["train_config"]["label_smoothing"] == 0.1 and payload["train_config"]["epochs"] == 1
    base, se = payload["models"]
    assert [base["name"], se["name"]] == ["resnet20", "se_resnet20"] and base["gain"] is None
    # the gain is the per-seed paired difference of the final val top-1
    runs = payload["runs"]
    diffs = [s["top1"] - b["top1"] for b, s in zip(runs["resnet20"], runs["se_resnet20"], strict=True)]
    assert se["gain"]["diffs"] == pytest.approx(diffs)
    assert se["top1"] == [r["top1"] for r in runs["se_resnet20"]]
    assert all(len(c) == 1 for c in se["curves"])
    # SE adds (2/r) Σ N_s C_s² bias-free FC weights (SENet eq. 3, r = 16; 3 blocks per stage of 16/32/64)
    added = 2 * 3 * (16**2 + 32**2 + 64**2) // 16
    assert se["params"] - base["params"] == added == se["macs"] - base["macs"]
    assert se["latency_ratio"] == pytest.approx(se["latency_ms"] / base["latency_ms"])
    md = (out / "report.md").read_text()
    assert "| model |" in md and "se_resnet20" in md and "compare.png" in md and "git" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["model"], r["seed"]) for r in lines] == [("resnet20", 0), ("se_resnet20", 0),
                                                        ("resnet20", 1), ("se_resnet20", 1)]  # seed-major
    assert main(["compare", "--out", str(out)]) == 2  # never mixes two comparisons in one directory


def test_senet_compare_rejects_bad_models(tmp_path, capsys):
    from senet.cli import main

    assert main(["compare", "--models", "resnet20", "--out", str(tmp_path)]) == 2
    assert "baseline and at least one" in capsys.readouterr().err
    assert main(["compare", "--models", "resnet20,nope_net", "--out", str(tmp_path)]) == 2
    assert "nope_net" in capsys.readouterr().err
    assert main(["compare", "--recipe", "epochs=3", "--out", str(tmp_path)]) == 2
    assert "own options" in capsys.readouterr().err


def test_senet_eval_on_a_trained_checkpoint_reuses_its_data_settings(tmp_path):
    import json

    from senet.cli import main
    from senet.train import TrainConfig, fit

    run = fit(TrainConfig(model="resnet20", image_size=8, subset=64, epochs=1, batch_size=32, device="cpu",
                          quiet=True, out=str(tmp_path / "run")))
    assert main(["eval", run.paths["last"]]) == 0  # no --data / --image-size: taken from the checkpoint
    payload = json.loads((tmp_path / "run" / "eval-last.json").read_text())
    assert payload["config"]["data"]["name"] == "digits" and payload["config"]["data"]["image_size"] == 8
    # the same weights on the same val split: the training loop's last validation
    assert payload["result"]["top1"] == pytest.approx(run.final["val_top1"])
    assert payload["result"]["loss"] == pytest.approx(run.final["val_loss"], rel=1e-5)


def test_evaluate_under_bf16_autocast_reports_float32_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    x, y = torch.randn(20, 3, 2, 2), torch.randint(0, 4, (20,))
    loader = [(x[:10], y[:10]), (x[10:], y[10:])]
    full = evaluate(model, loader, device="cpu", num_classes=4)
    half = evaluate(model, loader, device="cpu", num_classes=4, amp_dtype=torch.bfloat16)
    by_hand = torch.nn.functional.cross_entropy(model(x), y).item()
    assert full.loss == pytest.approx(by_hand, rel=1e-6)
    assert half.loss == pytest.approx(by_hand, rel=2e-2)  # bf16 logits: ~3 significant digits
    assert isinstance(half.loss, float) and half.confusion.sum() == 20
