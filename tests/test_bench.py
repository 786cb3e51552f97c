"""senet bench: statistics by hand, saved-activation memory by hand, a tiny interleaved run and the CLI."""

import json

import numpy as np
import pytest
import torch
from helpers import fake_allocator
from torch import nn

from senet.bench import (
    BenchConfig,
    activation_bytes,
    clustered_median_ci,
    clustered_ratio_ci,
    format_table,
    paired_ratio_ci,
    percentiles,
    run_bench,
)
from senet.cli import main
from senet.layers import native


def test_percentiles_by_hand():
    stats = percentiles([t / 1000 for t in range(1, 101)])  # 1..100 ms
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["mean_ms"] == pytest.approx(50.5)


def test_paired_ratio_exact_and_noisy():
    base = [1.0, 2.0, 1.5, 3.0]
    exact = paired_ratio_ci([1.1 * b for b in base], base)
    # a constant ratio in every round: every resample gives it, so the interval collapses onto it
    assert exact["ratio"] == pytest.approx(1.1)
    assert exact["ci_low"] == pytest.approx(1.1) and exact["ci_high"] == pytest.approx(1.1)
    rng = np.random.default_rng(1)
    b = rng.uniform(1, 2, 30)
    noisy = paired_ratio_ci(list(1.2 * b * rng.uniform(0.9, 1.1, 30)), list(b))
    assert noisy["ci_low"] < noisy["ratio"] < noisy["ci_high"]
    assert noisy["ci_low"] < 1.2 < noisy["ci_high"] and noisy["ci_high"] - noisy["ci_low"] < 0.1


def test_paired_ratio_needs_two_rounds():
    with pytest.raises(ValueError, match="rounds"):
        paired_ratio_ci([1.0], [1.0])


def test_clustered_ratio_by_hand():
    # two processes, constant ratios 1.1 and 1.3 inside each: the pooled ratio is sum / sum over all rounds
    base = [[1.0, 2.0, 1.0], [2.0, 2.0, 4.0]]
    model = [[1.1 * b for b in base[0]], [1.3 * b for b in base[1]]]
    r = clustered_ratio_ci(model, base)
    assert r["ratio"] == pytest.approx((1.1 * 4 + 1.3 * 8) / 12)
    assert r["per_process"] == pytest.approx([1.1, 1.3]) and r["median_process_ratio"] == pytest.approx(1.2)
    assert r["processes"] == 2 and r["rounds"] == 6
    # resampling processes: a resample of process 0 twice gives 1.1, of process 1 twice 1.3
    assert r["ci_low"] == pytest.approx(1.1) and r["ci_high"] == pytest.approx(1.3)


def test_clustered_ratio_wider_than_pooled_rounds_when_processes_differ():
    # each process shifts the ratio for all its rounds: pooling the rounds as if independent understates
    # the uncertainty, resampling processes does not; with no shift between processes the two agree
    rng = np.random.default_rng(2)
    shifts, noise = [1.00, 1.04, 0.99, 1.03, 1.01, 1.05], 0.01
    base = [list(rng.uniform(1, 2, 20)) for _ in shifts]
    model = [[b * s * rng.normal(1, noise) for b in bs] for s, bs in zip(shifts, base, strict=True)]
    flat = paired_ratio_ci([t for g in model for t in g], [t for g in base for t in g])
    clustered = clustered_ratio_ci(model, base)
    assert clustered["ratio"] == pytest.approx(flat["ratio"])
    assert clustered["ci_high"] - clustered["ci_low"] > 2 * (flat["ci_high"] - flat["ci_low"])
    same = [[b * 1.02 * rng.normal(1, noise) for b in bs] for bs in base]
    flat_same = paired_ratio_ci([t for g in same for t in g], [t for g in base for t in g])
    clustered_same = clustered_ratio_ci(same, base)
    width, flat_width = (clustered_same["ci_high"] - clustered_same["ci_low"],
                         flat_same["ci_high"] - flat_same["ci_low"])
    assert 0.6 * flat_width < width < 1.6 * flat_width


def test_clustered_median_by_hand():
    # two processes, constant values 1 and 3 inside each: the pooled median is 2; a resample that draws one
    # process twice has median 1 or 3, which bound the interval
    mid, low, high = clustered_median_ci([np.full(3, 1.0), np.full(3, 3.0)])
    assert (mid, low, high) == (2.0, 1.0, 3.0)
    # processes are what is resampled: within-process spread alone gives a narrower interval than the same
    # values split across processes that differ
    rng = np.random.default_rng(1)
    spread = [rng.normal(1.0, 0.01, 30) + shift for shift in (0.0, 0.05, -0.05, 0.1)]
    _, lo, hi = clustered_median_ci(spread)
    _, lo_one, hi_one = clustered_median_ci([np.concatenate(spread) - np.repeat([0.0, 0.05, -0.05, 0.1], 30)] * 4)
    assert hi - lo > 3 * (hi_one - lo_one)


def test_clustered_ratio_needs_two_processes_of_two_rounds():
    with pytest.raises(ValueError, match="processes"):
        clustered_ratio_ci([[1.0, 1.0]], [[1.0, 1.0]])
    with pytest.raises(ValueError, match="process 1"):
        clustered_ratio_ci([[1.0, 1.0], [1.0]], [[1.0, 1.0], [1.0]])


def test_activation_bytes_by_hand():
    # Linear saves its input (B, 4); ReLU saves its output (B, 8); weights are not activations
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    assert activation_bytes(model, torch.randn(3, 4)) == 4 * (3 * 4 + 3 * 8)
    # conv saves its input (B, 2, 5, 5); the weights (parameters) are excluded
    conv = nn.Conv2d(2, 3, 3, bias=False)
    assert activation_bytes(conv, torch.randn(1, 2, 5, 5)) == 4 * 2 * 5 * 5


def test_interleaved_bench_with_baseline():
    cfg = BenchConfig("se_resnet20", "resnet20", batch=[2], res=8, rounds=3, iters=1, warmup=1)
    payload = run_bench(cfg)
    subjects = {s["name"]: s for s in payload["subjects"]}
    # SE on resnet20 (r=16, no biases): 2 * C * (C // 16) per unit, 3 units per stage of C = 16, 32, 64
    added = sum(3 * 2 * c * (c // 16) for c in (16, 32, 64))
    assert subjects["se_resnet20"]["params"] - subjects["resnet20"]["params"] == added
    assert subjects["se_resnet20"]["macs"] - subjects["resnet20"]["macs"] == added  # FC MACs = FC weights
    entry = payload["batches"][2]
    for r in entry["results"].values():
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["throughput_img_s"] > 0
        assert r["memory_bytes"] > 0
    # SE saves more activations (the pooled vector, FC inputs, gate output, the scaled map)
    res = entry["results"]
    assert res["se_resnet20"]["memory_bytes"] > res["resnet20"]["memory_bytes"]
    o = entry["overhead"]
    assert o["rounds"] == 3 and o["ci_low"] <= o["ratio"] <= o["ci_high"]


def test_onnxruntime_and_train_modes():
    ort = run_bench(BenchConfig("se_resnet20", batch=[1], res=8, runtime="onnxruntime", rounds=1, iters=1))
    assert ort["batches"][1]["results"]["se_resnet20"]["p50_ms"] > 0
    train = run_bench(BenchConfig("se_resnet20", batch=[2], res=8, train=True, rounds=1, iters=1, warmup=1))
    assert train["batches"][2]["results"]["se_resnet20"]["p50_ms"] > 0
    with pytest.raises(ValueError, match="onnxruntime"):
        run_bench(BenchConfig("se_resnet20", runtime="onnxruntime", train=True))


def test_onnxruntime_windows_are_waited_out_before_the_next_network(monkeypatch):
    # onnxruntime's threads spin-wait after a run and would slow whatever is timed next: after every window of an
    # onnxruntime session (warmup included) comes an untimed pause of ORT_SETTLE_S, and a torch step has none
    import senet.bench as bench
    import senet.export as export

    events = []

    class Session:
        def __init__(self, name):
            self.name = name

        def get_inputs(self):
            return [type("Input", (), {"name": "input"})]

        def run(self, outputs, feed):
            events.append(self.name)

    names = iter(["se_resnet20", "resnet20"])
    monkeypatch.setattr(export, "temp_onnx_session", lambda model, size, **kw: (Session(next(names)), None))
    monkeypatch.setattr(bench.time, "sleep", lambda s: events.append(s))
    run_bench(BenchConfig("se_resnet20", "resnet20", batch=[1], res=8, runtime="onnxruntime", rounds=3, iters=2,
                          warmup=1))
    pause = bench.ORT_SETTLE_S
    want = ["se_resnet20", pause, "resnet20", pause]  # warmup
    for order in (["se_resnet20", "resnet20"], ["resnet20", "se_resnet20"], ["se_resnet20", "resnet20"]):
        for name in order:
            want += [name, name, pause]
    assert events == want
    events.clear()
    run_bench(BenchConfig("se_resnet20", "resnet20", batch=[1], res=8, rounds=2, iters=1, warmup=1))
    assert events == []


def test_frozen_bench_times_the_frozen_networks(monkeypatch, capsys):
    from senet.models import FrozenResNet
    from senet.models import frozen as frozen_mod

    calls, plans = [], []
    forward, plan = FrozenResNet.forward, frozen_mod._UnitPlan.__call__
    monkeypatch.setattr(FrozenResNet, "forward", lambda self, x: calls.append(type(self.model).__name__)
                        or forward(self, x))
    monkeypatch.setattr(frozen_mod._UnitPlan, "__call__", lambda self, x, nt: plans.append(1) or plan(self, x, nt))
    cfg = BenchConfig("se_resnet18", "resnet18", batch=[1], res=32, rounds=2, iters=1, warmup=1, frozen=True)
    payload = run_bench(cfg)
    assert set(calls) == {"ResNet"} and len(calls) >= 2 * (1 + 2)  # both networks: warm-up + 2 rounds (+ memory)
    subjects = {s["name"]: s for s in payload["subjects"]}
    if native.library() is not None:  # the models are built in training mode: the snapshots are planned in eval
        assert subjects["se_resnet18"]["planned_units"] == 8 and len(plans) >= 2 * 8 * (1 + 2)
        assert "units run from plans: se_resnet18 8, resnet18 8" in format_table(payload, cfg)
    assert subjects["se_resnet18"]["params"] > subjects["resnet18"]["params"]  # counted through the snapshot
    assert payload["batches"][1]["overhead"]["rounds"] == 2
    for flags in ({"train": True}, {"compile": True}, {"channels_last": True}, {"runtime": "onnxruntime"}):
        with pytest.raises(ValueError, match="--frozen times senet.freeze"):
            run_bench(BenchConfig("resnet18", batch=[1], res=32, frozen=True, **flags))
    with pytest.raises(ValueError, match="--frozen: senet.freeze takes one of senet's ResNet-family"):
        run_bench(BenchConfig("mobilenet_v3_small", batch=[1], res=32, frozen=True, rounds=1, iters=1))
    assert main(["bench", "mobilenet_v3_small", "--frozen", "--res", "32", "--rounds", "1", "--iters", "1"]) == 2
    assert "ResNet-family" in capsys.readouterr().err


def test_cli_bench_json_with_provenance(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "se_resnet20", "--baseline", "resnet20", "--res", "8", "--rounds", "2", "--iters", "1",
                 "--warmup", "0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "time ratio" in text and "95% CI" in text
    payload = json.loads(out.read_text())
    assert payload["config"]["baseline"] == "resnet20" and payload["versions"]["senet"]
    assert payload["device"]["type"] == "cpu" and "git_revision" in payload
    from senet.layers import native

    # the inference timings ran the native unit ends where this machine builds them: the file says which
    assert payload["device"]["native_kernels"] == native.report() and native.report()["available"] is not None
    assert main(["bench"]) == 2  # neither MODEL nor --paper


@pytest.mark.parametrize("flags, applied", [(["--train"], True), (["--train", "--no-reuse-freed-memory"], False),
                                            ([], False)])
def test_cli_bench_training_keeps_freed_memory_like_train(flags, applied, tmp_path, monkeypatch):
    fake_allocator(monkeypatch)
    out = tmp_path / "b.json"
    assert main(["bench", "resnet20", "--res", "8", "--rounds", "1", "--iters", "1", "--warmup", "0", *flags,
                 "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["device"]["allocator"]["applied"] is applied
    assert payload["config"]["reuse_freed_memory"] is ("--no-reuse-freed-memory" not in flags)


def test_batch_one_on_a_one_by_one_map():
    """se_resnet20 at 4x4 ends on a 1x1 map: at batch 1 a train-mode BN has one value per channel. The
    inference benchmark still runs (the memory figure, a training forward, is reported as not measured;
    before commit aee8451 the whole bench failed with BatchNorm's message); a training benchmark says
    what to change."""
    payload = run_bench(BenchConfig("se_resnet20", batch=[1], res=4, rounds=1, iters=1, warmup=0))
    row = payload["batches"][1]["results"]["se_resnet20"]
    assert row["memory_bytes"] is None and row["memory_kind"].startswith("not measured")
    assert row["p50_ms"] > 0
    with pytest.raises(ValueError, match="larger --batch or --res"):
        run_bench(BenchConfig("se_resnet20", batch=[1], res=4, train=True, rounds=1, iters=1, warmup=0))


def test_activation_bytes_leaves_the_model_as_it_was():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert activation_bytes(model, torch.randn(2, 3, 6, 6)) > 0
    assert not model.training
    for k, v in model.state_dict().items():  # running statistics and the step count untouched
        assert torch.equal(v, before[k]), k
