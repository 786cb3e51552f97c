"""The benchmark scripts' own machinery (their timings are not tests: see docs/performance.md)."""

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fake_allocator, needs_kernels, torch_threads
from torch import nn

from senet import allocator
from senet.layers import create_attention, native
from senet.models import _attn
from senet.models.resnet import ResNet

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark(name: str):
    """``benchmarks/<name>.py`` loaded as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


se_overhead = _benchmark("se_overhead")


def test_ablated_se_network_prices_the_parts_it_says():
    torch.manual_seed(0)
    se = ResNet("bottleneck", [1, 1, 1, 1], attn="se", num_classes=5).eval()
    plain = ResNet("bottleneck", [1, 1, 1, 1], attn=None, num_classes=5).eval()
    missing, unexpected = plain.load_state_dict(se.state_dict(), strict=False)
    assert not missing and all(".attn." in k for k in unexpected)
    real_end = _attn.infer_scale_add_relu
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = {p: se_overhead.Ablated(se, p)(x) for p in ("add", "scale", "squeeze")}  # PyTorch's ops
        with native.off():
            full, without_se = se(x), plain(x)
    assert _attn.infer_scale_add_relu is real_end  # restored
    assert torch.equal(out["add"], without_se)  # "add": the unit ends of the network without SE
    assert torch.equal(out["scale"], out["squeeze"])  # the squeeze's value is computed and dropped
    assert not torch.allclose(out["scale"], out["add"]) and not torch.allclose(full, out["scale"])


def test_paired_difference_keeps_rounds_together():
    # a round-wide slowdown hits both subjects of that round: the paired difference ignores it
    b = [0.100, 0.150, 0.100, 0.300, 0.100]  # seconds, rounds 2 and 4 under load
    a = [t + 0.002 for t in b]
    d = se_overhead.paired_difference(a, b)
    assert abs(d["ms"] - 2.0) < 1e-9 and abs(d["ci_low"] - 2.0) < 1e-9 and abs(d["ci_high"] - 2.0) < 1e-9
    d = se_overhead.paired_difference([0.010, 0.012, 0.011, 0.013], [0.009, 0.009, 0.010, 0.010])  # 1, 3, 1, 3 ms
    assert d["rounds"] == 4 and abs(d["ms"] - 2.0) < 1e-9 and d["ci_low"] <= d["ms"] <= d["ci_high"]


def _probe():
    sys.path.insert(0, str(BENCHMARKS))
    return _benchmark("fused_kernel_probe")


def test_fused_squeeze_probe_matches_torch(tmp_path, monkeypatch):
    # the probe's C kernel (BN + squeeze in one pass) against torch, alone and inside a network
    if shutil.which("cc") is None and "CC" not in os.environ:
        pytest.skip("no C compiler")
    probe = _probe()
    dll = probe.build(tmp_path)
    assert max(probe.check(dll).values()) < 1e-5  # the probe's own check, which raises above 1e-5
    bn = torch.nn.BatchNorm2d(3, affine=False).eval()  # no weight, no bias: the kernel's NULL pointers
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(4.0)
    c = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    x, z = probe.bn_squeeze(dll, bn, c)
    by_hand = (c - 0.5) / (4.0 + bn.eps) ** 0.5
    assert torch.allclose(x, by_hand, atol=1e-6) and torch.allclose(z, by_hand.mean((2, 3), keepdim=True), atol=1e-6)
    calls = []
    real_kernel, real_merge = probe.bn_squeeze, _attn.AttnUnit._merge
    monkeypatch.setattr(probe, "bn_squeeze", lambda *a: calls.append(1) or real_kernel(*a))
    torch.manual_seed(0)
    se = ResNet("bottleneck", [1, 1, 1, 1], attn="se", num_classes=5).eval()
    img = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        fused, ref = probe.FusedSqueeze(se, dll)(img), se(img)
    assert len(calls) == 4 and _attn.AttnUnit._merge is real_merge  # every SE unit end; restored after
    assert torch.allclose(fused, ref, atol=1e-5)


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def test_device_flag_names_what_is_wrong(capsys):

    bad = [["block", "--device", "tpu:0"], ["block", "--device", "nonsense"]]
    if not torch.cuda.is_available():
        bad.append(["block", "--device", "cuda"])
    for argv in bad:
        with pytest.raises(SystemExit) as e:
            se_overhead.main(argv)
        assert e.value.code == 2
        assert f"--device {argv[2]!r}" in capsys.readouterr().err


@pytest.mark.parametrize("device", DEVICES)
def test_block_target_runs_where_asked_and_says_so(device, tmp_path, monkeypatch):
    real_bandwidth = se_overhead.bandwidth
    monkeypatch.setattr(se_overhead, "RESULTS", tmp_path)
    monkeypatch.setattr(se_overhead, "SE_SHAPES", [(32, 4)])
    monkeypatch.setattr(se_overhead, "bandwidth", lambda numel, args: real_bandwidth(2**16, args))
    monkeypatch.setattr(se_overhead, "DEVICE", se_overhead.DEVICE)  # main sets it: restore afterwards
    monkeypatch.setattr(se_overhead, "sgemm_gflops", lambda: 0.5)  # a slow core: the bound shows
    calls = fake_allocator(monkeypatch)
    se_overhead.main(["block", "--device", device, "--batch", "2", "--rounds", "2", "--iters", "1", "--warmup", "1",
                      "--tag", "_test", "--reuse-freed-memory"])
    saved = json.loads((tmp_path / "se_overhead_block_test.json").read_text())
    assert saved["device"]["type"] == device and saved["config"]["device"] == device
    assert calls == [1] and saved["device"]["allocator"]["why"] == "test"
    assert saved["config"]["reuse_freed_memory"] is True
    shape = saved["results"]["shapes"]["32x4x4"]
    assert shape["shape"] == [2, 32, 4, 4] and shape["fwd_vs_floor"]["ratio"] > 0
    assert shape["fc_bwd_ms"] > 0 and shape["fwd_bwd_vs_floor_plus_products"]["ratio"] > 0
    if device == "cpu":  # the compute bound: batch 2, W1 2 x 32 and W2 32 x 2, 2 * 2 * 64 FLOPs a product
        assert saved["results"]["sgemm_gflops"] == 0.5
        fwd, bwd = shape["products_at_gemm_rate_ms"]["fwd"], shape["products_at_gemm_rate_ms"]["bwd"]
        assert fwd == pytest.approx(2 * 256 / 0.5e9 * 1e3) and bwd == pytest.approx(2 * fwd)
        # forward: (floor + fwd) / floor; forward + backward: (2 floor + 3 fwd) / (2 floor)
        assert shape["least_fwd_vs_floor"] > 1
        assert shape["least_fwd_bwd_vs_floor"] - 1 == pytest.approx(1.5 * (shape["least_fwd_vs_floor"] - 1))
    else:
        assert saved["results"]["sgemm_gflops"] is None and "least_fwd_vs_floor" not in shape


def test_fc_products_are_the_fcs_forward_and_backward_products():
    # the products priced beside the floor: the shapes of the FCs' outputs and of every gradient, and the
    # values autograd gives for y = W x with those inputs
    se = create_attention("se_released", 64)
    x = torch.randn(3, 64, 5, 5)
    torch.manual_seed(1)
    fwd, bwd = (step() for step in se_overhead.fc_products(se, x).values())
    torch.manual_seed(1)
    z, da, h = torch.randn(3, 64), torch.randn(3, 64), torch.randn(3, 4)
    w1, w2 = se.fc1.weight.detach().requires_grad_(), se.fc2.weight.detach().requires_grad_()
    hh, zz = h.clone().requires_grad_(), z.clone().requires_grad_()
    torch.autograd.backward([hh @ w2.t(), zz @ w1.t()], [da, h])  # upstream: da into W2's output, dh = h into W1's
    torch.testing.assert_close(fwd[0], z @ se.fc1.weight.detach().t())
    torch.testing.assert_close(fwd[1], h @ se.fc2.weight.detach().t())
    for got, want in zip(bwd, [w2.grad, hh.grad, w1.grad, zz.grad], strict=True):
        torch.testing.assert_close(got, want)


@needs_kernels
def test_fma_peak_is_no_slower_than_a_gemm_on_one_core():
    # a bound on any computation of this core: a GEMM (by torch's BLAS, one thread) must not beat it. The probe
    # fails this when its chains spill to memory (it measured 33-41 against sgemm's 81 GFLOP/s that way)
    with torch_threads(1):
        gemm = se_overhead.sgemm_gflops(n=512, reps=5)
        peak = se_overhead.fma_peak_gflops(rounds=2_000_000, reps=3)
    assert peak is not None and peak >= 0.8 * gemm, (peak, gemm)


@needs_kernels
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pins the process to one CPU (Linux)")
def test_fma_peak_of_two_threads_counts_both_threads_work():
    # pinned to one CPU, two threads share its FMA units: each runs its own chains at half the rate, so two
    # threads' peak is one thread's when both threads' multiply-adds are counted (half of it if only one's were,
    # twice if one thread's work were counted twice)
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        one = se_overhead.fma_peak_gflops(rounds=2_000_000, reps=3)
        two = se_overhead.fma_peak_gflops(rounds=2_000_000, reps=3, threads=2)
    finally:
        os.sched_setaffinity(0, cpus)
    assert one is not None and two is not None
    assert 0.7 * one <= two <= 1.4 * one, (one, two)


def test_resnet_target_modes_configure_each_run(tmp_path, monkeypatch):
    # the wiring of --modes for the resnet target, without timing ResNet-50s: what each run is asked to do
    import torch._inductor.config as inductor_config

    calls = []

    def record(models, cfg, batch):
        formats = {n: next(m.parameters()).is_contiguous(memory_format=torch.channels_last) for n, m in models.items()
                   if next(m.parameters()).dim() == 4}
        calls.append((cfg.compile, cfg.channels_last, cfg.train, batch, inductor_config.freezing, formats,
                      sorted(models)))
        return {"per_round_s": {n: [0.1, 0.2, 0.3] for n in models}}

    monkeypatch.setattr(se_overhead, "RESULTS", tmp_path)
    monkeypatch.setattr(se_overhead, "run_subjects", record)
    from senet.models import CifarResNet

    monkeypatch.setattr(se_overhead, "create_model",
                        lambda name: CifarResNet("basic", 1, attn="se" if name.startswith("se_") else None))
    monkeypatch.setattr(se_overhead, "DEVICE", se_overhead.DEVICE)
    se_overhead.main(["resnet", "--modes", "eager", "channels_last", "compile_frozen", "--infer-batch", "1",
                      "--train-batch", "2", "--tag", "_modes"])
    saved = json.loads((tmp_path / "se_overhead_resnet_modes.json").read_text())
    assert sorted(saved["results"]) == sorted(["infer_b1", "train_b2", "channels_last_infer_b1",
                                               "channels_last_train_b2", "compile_frozen_infer_b1"])
    assert [c[:5] for c in calls] == [(False, False, False, 1, False), (False, False, True, 2, False),
                                      (False, True, False, 1, False), (False, True, True, 2, False),
                                      (True, False, False, 1, True)]  # frozen: compiled, inference only
    assert all(all(c[5].values()) == c[1] for c in calls)  # channels_last moves the weights too
    # eager inference, where the native unit ends run, has the same networks on PyTorch's ops beside them
    plain = ["resnet50", "se_resnet50", "se_resnet50_unfused"]
    assert [c[6] for c in calls] == [sorted(plain + ["resnet50_pytorch_ops", "se_resnet50_pytorch_ops"])] + [plain] * 4
    assert saved["results"]["infer_b1"]["vs_resnet50_pytorch_ops"]["se_resnet50"]["ratio"] == 1.0
    assert inductor_config.freezing is False  # restored
    calls.clear()
    se_overhead.main(["resnet", "--pair", "--infer-batch", "1", "--train-batch", "2", "--tag", "_pair"])
    assert [c[6] for c in calls] == [["resnet50", "se_resnet50"]] * 2  # --pair: the two networks alone


@needs_kernels
def test_resnet_target_frozen_mode_times_the_frozen_pair(tmp_path, monkeypatch):
    from senet.models import FrozenResNet

    calls = []

    def record(models, cfg, batch):
        calls.append((cfg.train, batch, {n: type(m).__name__ for n, m in models.items()}))
        return {"per_round_s": {n: [0.1, 0.2, 0.3] for n in models}}

    monkeypatch.setattr(se_overhead, "RESULTS", tmp_path)
    monkeypatch.setattr(se_overhead, "run_subjects", record)
    monkeypatch.setattr(se_overhead, "create_model", lambda name: ResNet(
        "basic", [1, 1, 1, 1], attn="se" if name.startswith("se_") else None, num_classes=10))
    se_overhead.main(["resnet", "--modes", "frozen", "--infer-batch", "1", "--train-batch", "2", "--tag", "_fz"])
    saved = json.loads((tmp_path / "se_overhead_resnet_fz.json").read_text())
    assert sorted(saved["results"]) == ["frozen_infer_b1"]  # inference only: the training case is skipped
    assert calls == [(False, 1, {"se_resnet50": FrozenResNet.__name__, "resnet50": FrozenResNet.__name__})]
    assert saved["results"]["frozen_infer_b1"]["planned_units"] == {"se_resnet50": 4, "resnet50": 4}
    with pytest.raises(SystemExit, match="resnet target"):
        se_overhead.main(["timm", "--modes", "frozen"])


def test_freeze_groups_each_se_network_with_its_plain_one():
    assert se_overhead.net_groups(["resnet50", "se_resnet20", "se_resnet50", "resnet110", "resnet20"]) == [
        ["se_resnet50", "resnet50"], ["se_resnet20", "resnet20"], ["resnet110"]]
    assert se_overhead.net_groups(["se_resnet50"]) == [["se_resnet50"]]


@needs_kernels
def test_freeze_target_times_each_network_eager_and_frozen(tmp_path, monkeypatch):
    monkeypatch.setattr(se_overhead, "RESULTS", tmp_path)
    monkeypatch.setattr(se_overhead, "DEVICE", se_overhead.DEVICE)
    se_overhead.main(["freeze", "--nets", "se_resnet20", "resnet20", "se_resnet32", "--infer-batch", "1",
                      "--rounds", "2", "--iters", "1", "--warmup", "1", "--tag", "_test"])
    saved = json.loads((tmp_path / "se_overhead_freeze_test.json").read_text())
    assert saved["config"]["nets"] == ["se_resnet20", "resnet20", "se_resnet32"] and saved["git_revision"]
    pair, alone = saved["results"]["infer_b1 se_resnet20 resnet20"], saved["results"]["infer_b1 se_resnet32"]
    assert sorted(pair["per_round_s"]) == ["resnet20", "resnet20_frozen", "se_resnet20", "se_resnet20_frozen"]
    assert all(len(r) == 2 for r in pair["per_round_s"].values())  # every subject in every round
    ratios = pair["frozen_to_eager"]["se_resnet20"]
    rounds = pair["per_round_s"]
    assert ratios["ratio"] == pytest.approx(sum(rounds["se_resnet20_frozen"]) / sum(rounds["se_resnet20"]))
    assert set(pair["se_share"]) == {"eager", "frozen"} and "se_share" not in alone
    assert pair["se_share"]["frozen"]["ratio"] == pytest.approx(
        sum(rounds["se_resnet20_frozen"]) / sum(rounds["resnet20_frozen"]))
    assert pair["ratio_pairs"]["se_share"]["eager"] == ["se_resnet20", "resnet20"]
    assert sorted(alone["frozen_to_eager"]) == ["se_resnet32"]
    assert pair["planned_units"] == {"se_resnet20": 9, "resnet20": 9} and alone["planned_units"] == {"se_resnet32": 15}
    with pytest.raises(SystemExit, match="--nets se_vgg16: senet.freeze takes"):
        se_overhead.main(["freeze", "--nets", "se_vgg16", "--infer-batch", "1"])
    from senet.models import frozen as frozen_mod
    monkeypatch.setattr(frozen_mod.native, "library", lambda: None)  # no plans: refused, not timed as if frozen
    with pytest.raises(SystemExit, match="planned no unit of CifarResNet"):
        se_overhead.main(["freeze", "--nets", "resnet20", "--infer-batch", "1"])


def test_traffic_floor_counts_the_bytes_only_se_moves():
    # SE's FC weights, and per unit the smaller of c and (h, W3), against the shapes worked out by hand:
    # stage k of a 224x224 bottleneck ResNet has c = B x C x H x H with C = 256 * 2^(k-1), H = 56 / 2^(k-1),
    # h = B x C/4 x H x H, W3 = C x C/4
    se = ResNet("bottleneck", [1, 1, 1, 1], attn="se", num_classes=5).eval()
    for batch in (1, 2):
        got = se_overhead.se_traffic_floor(se, batch, memory_bytes=2**22)
        want = 0
        for k in range(4):
            ch, hw = 256 * 2**k, 56 // 2**k
            want += 4 * min(batch * ch * hw * hw, batch * ch // 4 * hw * hw + ch * ch // 4)
        fc = sum(4 * p.numel() for name, p in se.named_parameters() if ".attn." in name)
        assert got["units"] == 4 and got["squeeze_bytes"] == want and got["weight_bytes"] == fc
        assert got["floor_ms"] == pytest.approx(got["weights_ms"] + got["squeeze_ms"]) and got["weights_ms"] > 0
        assert got["weights_ms"] == pytest.approx(1e3 * fc / got["memory_read_GBps"] / 1e9)


def _case(se: list[float], base: list[float], floor_ms: float) -> dict:
    """One process's results for a network case, as run_subjects and bench_resnet write them."""
    return {"per_round_s": {"se_resnet50": se, "resnet50": base},
            "ratio_to_resnet50": {"se_resnet50": se_overhead.ratio(se, base)},
            "se_traffic_floor": {"floor_ms": floor_ms}}


def test_pooled_case_by_hand():
    # process 0: se 1.1x resnet50 (1 ms more per round), process 1: 1.3x (6 and 3 ms more)
    parts = [_case([0.011, 0.011], [0.010, 0.010], 1.0), _case([0.026, 0.013], [0.020, 0.010], 2.0)]
    got = se_overhead.pooled_case(parts)
    r = got["ratio_to_resnet50"]["se_resnet50"]
    assert r["ratio"] == pytest.approx(0.061 / 0.050) and r["per_process"] == pytest.approx([1.1, 1.3])
    assert r["processes"] == 2 and r["rounds"] == 4
    assert r["median_round_ratio"] == pytest.approx(1.2)  # per-round ratios 1.1, 1.1, 1.3, 1.3
    floor = got["se_traffic_floor"]
    assert floor["floor_ms"] == pytest.approx(1.5) and floor["floor_ms_per_process"] == [1.0, 2.0]
    assert floor["se_cost_ms"]["ms"] == pytest.approx(2.0)  # median of 1, 1, 6, 3 ms
    assert floor["cost_vs_floor"] == pytest.approx(2.0 / 1.5)
    assert got["per_process"] == parts and got["per_round_s"]["resnet50"] == [[0.010, 0.010], [0.020, 0.010]]


def test_drop_option_both_spellings():
    argv = ["resnet", "--processes", "3", "--rounds", "5", "--processes=4", "--tag", "_x"]
    assert se_overhead.drop_option(argv, "--processes") == ["resnet", "--rounds", "5", "--tag", "_x"]


def test_freeze_target_pools_processes(tmp_path, monkeypatch):
    # --processes for the freeze target: each process's rounds (made up here: measure is not timed) pooled per
    # case, every ratio by the names of its rounds, the processes' own ratios kept
    seen = []

    def fake_measure(subjects, batch, cfg, device):
        for s in subjects:  # eager 10 ms, frozen 9 ms; the SE network k ms slower in process k
            base = 0.009 if s.name.endswith("_frozen") else 0.010
            s.times[batch] = [[base + (0.001 * len(seen) if s.name.startswith("se_") else 0.0)]] * 2
        return {s.name: {"p50_ms": 1.0} for s in subjects}

    def fake_run_child(cmd):
        seen.append(cmd)
        se_overhead.main(cmd[2:])
        return 0

    monkeypatch.setattr(se_overhead, "RESULTS", tmp_path)
    monkeypatch.setattr(se_overhead, "measure", fake_measure)
    monkeypatch.setattr(se_overhead, "run_child", fake_run_child)
    monkeypatch.setattr(se_overhead, "DEVICE", se_overhead.DEVICE)
    se_overhead.main(["freeze", "--nets", "se_resnet20", "resnet20", "--infer-batch", "1", "--rounds", "2",
                      "--processes", "2", "--tag", "_pooled"])
    assert len(seen) == 2
    saved = json.loads((tmp_path / "se_overhead_freeze_pooled.json").read_text())
    case = saved["results"]["infer_b1 se_resnet20 resnet20"]
    frozen = case["se_share"]["frozen"]
    assert frozen["per_process"] == pytest.approx([0.010 / 0.009, 0.011 / 0.009]) and frozen["processes"] == 2
    assert frozen["ratio"] == pytest.approx((0.020 + 0.022) / 0.036)
    assert case["se_share"]["eager"]["ratio"] == pytest.approx((0.022 + 0.024) / 0.040)
    assert case["frozen_to_eager"]["resnet20"]["ratio"] == pytest.approx(0.9)
    assert case["planned_units"] == {"se_resnet20": 9, "resnet20": 9} and len(saved["results"]["processes"]) == 2
    # and the pooled file pools again with itself (--pool), each of its processes counted
    se_overhead.main(["freeze", "--pool", str(tmp_path / "se_overhead_freeze_pooled.json"),
                      str(tmp_path / "se_overhead_freeze_pooled.json"), "--tag", "_again"])
    again = json.loads((tmp_path / "se_overhead_freeze_again.json").read_text())
    assert again["results"]["infer_b1 se_resnet20 resnet20"]["se_share"]["frozen"]["processes"] == 4


@pytest.mark.parametrize("argv, says", [(["block", "--processes", "2"], "only the resnet, timm and freeze targets"),
                                        (["resnet", "--processes", "0"], "--processes 0"),
                                        (["resnet", "--processes", "2", "--rounds", "1"], "--rounds 1")])
def test_processes_flag_names_what_is_wrong(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(se_overhead, "DEVICE", se_overhead.DEVICE)
    with pytest.raises(SystemExit) as e:
        se_overhead.main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_processes_run_one_after_another_and_pool(tmp_path, monkeypatch):
    # each "process" runs main with the parent's arguments but --processes, writing where --child-out says; the
    # parent pools what they wrote. Here a process is main called in this one (no ResNet-50s timed: run_subjects
    # gives each process its own made-up rounds), and in the end a second process fails.
    seen, runs = [], []

    def fake_run_subjects(models, cfg, batch):
        k = len(runs)
        runs.append(sorted(models))
        se, base = [0.011 + 0.001 * k, 0.012 + 0.001 * k], [0.010, 0.010]
        return {"per_round_s": {"se_resnet50": se, "resnet50": base},
                "ratio_to_resnet50": {"se_resnet50": se_overhead.ratio(se, base)}}

    def fake_run_child(cmd):
        seen.append(cmd)
        assert cmd[0] == se_overhead.sys.executable and cmd[1].endswith("se_overhead.py")
        se_overhead.main(cmd[2:])
        out = Path(cmd[-1])  # a real child is another process, with its own device block (threads, kernels)
        out.write_text(json.dumps({**json.loads(out.read_text()), "device": {"threads": 1, "child": len(seen)}}))
        return 0

    monkeypatch.setattr(se_overhead, "RESULTS", tmp_path)
    monkeypatch.setattr(se_overhead, "run_subjects", fake_run_subjects)
    monkeypatch.setattr(se_overhead, "cost_against_floor", lambda se, batch, a, b: {"floor_ms": 1.0})
    monkeypatch.setattr(se_overhead, "run_child", fake_run_child)
    from senet.models import CifarResNet

    monkeypatch.setattr(se_overhead, "create_model",
                        lambda name: CifarResNet("basic", 1, attn="se" if name.startswith("se_") else None))
    monkeypatch.setattr(se_overhead, "DEVICE", se_overhead.DEVICE)
    se_overhead.main(["resnet", "--pair", "--infer-batch", "1", "--train-batch", "--rounds", "2", "--processes", "3",
                      "--tag", "_pooled"])
    assert len(seen) == 3 and all("--processes" not in c and c[-2] == "--child-out" for c in seen)
    assert len({c[-1] for c in seen}) == 3 and runs == [["resnet50", "se_resnet50"]] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["se_overhead_resnet_pooled.json"]  # children's files: temp
    saved = json.loads((tmp_path / "se_overhead_resnet_pooled.json").read_text())
    r = saved["results"]["infer_b1"]["ratio_to_resnet50"]["se_resnet50"]
    assert r["per_process"] == pytest.approx([1.15, 1.25, 1.35]) and r["processes"] == 3
    assert r["ratio"] == pytest.approx((0.023 + 0.025 + 0.027) / 0.060)
    assert saved["config"]["processes"] == 3 and len(saved["results"]["processes"]) == 3
    # the device the processes timed on, each its own, not the parent's (which times nothing)
    assert [p["device"]["child"] for p in saved["results"]["processes"]] == [1, 2, 3]
    assert saved["device"] == {"threads": 1, "child": 1}
    assert saved["results"]["infer_b1"]["se_traffic_floor"]["floor_ms"] == 1.0

    def failing_run_child(cmd):
        return 1 if len(seen) == 1 else fake_run_child(cmd)  # the second process fails

    seen.clear()
    monkeypatch.setattr(se_overhead, "run_child", failing_run_child)
    with pytest.raises(SystemExit, match="process 2/3 exited with 1; no results written"):
        se_overhead.main(["resnet", "--pair", "--infer-batch", "1", "--train-batch", "--rounds", "2",
                          "--processes", "3", "--tag", "_failed"])
    assert not (tmp_path / "se_overhead_resnet_failed.json").exists()


def _results_file(path, results: dict, processes: int | None = None, **config) -> str:
    """A results file as this script writes it: one process's, or with ``processes`` a --processes run's."""
    prov = {"git_revision": "abc", "created": "2026-11-22T10:00:00+0000", "load_avg_before": [0.1, 0.1, 0.1],
            "load_avg_after": [0.2, 0.2, 0.2]}
    cfg = {"target": "resnet", "device": "cpu", "threads": 1, "pair": True, "modes": None, "infer_batch": [16],
           "train_batch": [], **config}
    if processes is not None:
        results = {key: se_overhead.pooled_case(parts) for key, parts in results.items()}
        results["processes"] = [prov] * processes
    path.write_text(json.dumps({**prov, "config": cfg, "versions": {"torch": "2.14.1"}, "device": {"threads": 1},
                                "results": results}))
    return str(path)


def test_pool_files_pools_every_process_of_every_file(tmp_path, monkeypatch):
    a1, a2 = _case([0.011, 0.011], [0.010, 0.010], 1.0), _case([0.026, 0.013], [0.020, 0.010], 2.0)
    b = _case([0.030, 0.031, 0.029], [0.030, 0.030, 0.030], 3.0)
    fa = _results_file(tmp_path / "a.json", {"infer_b16": [a1, a2]}, processes=2, rounds=2)  # a --processes 2 run
    fb = _results_file(tmp_path / "b.json", {"infer_b16": b}, rounds=3)  # a single process
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(se_overhead, "RESULTS", out)
    monkeypatch.setattr(se_overhead, "DEVICE", se_overhead.DEVICE)
    se_overhead.main(["resnet", "--pool", fa, fb, "--tag", "_both"])
    saved = json.loads((out / "se_overhead_resnet_both.json").read_text())
    r = saved["results"]["infer_b16"]["ratio_to_resnet50"]["se_resnet50"]
    assert r["processes"] == 3 and r["rounds"] == 7
    assert r["per_process"] == pytest.approx([1.1, 1.3, 1.0])
    assert r["ratio"] == pytest.approx((0.022 + 0.039 + 0.090) / (0.020 + 0.030 + 0.090))  # sums over all rounds
    assert r == se_overhead.pooled_case([a1, a2, b])["ratio_to_resnet50"]["se_resnet50"]
    assert saved["results"]["infer_b16"]["se_traffic_floor"]["floor_ms"] == pytest.approx(2.0)  # mean of 1, 2, 3
    assert len(saved["results"]["processes"]) == 3
    assert [s["file"] for s in saved["results"]["pooled_from"]] == ["a.json", "b.json"]
    assert saved["config"]["pool"] == [fa, fb]
    assert saved["versions"] == {"torch": "2.14.1"} and saved["device"] == {"threads": 1}  # the sources', not ours
    # the pooled file's config is what its sources measured (not the --pool command's defaults), so it pools again
    cfg = saved["config"]
    assert (cfg["pair"], cfg["infer_batch"], cfg["train_batch"], cfg["threads"]) == (True, [16], [], 1)
    assert cfg["processes"] == 3 and cfg["tag"] == "_both" and cfg["rounds"] is None  # rounds: 2 vs 3, per source
    c = _case([0.012, 0.012], [0.010, 0.010], 1.0)
    fc = _results_file(tmp_path / "c.json", {"infer_b16": c}, rounds=2)
    both = str(out / "se_overhead_resnet_both.json")
    se_overhead.main(["resnet", "--pool", both, fc, "--tag", "_again"])
    again = json.loads((out / "se_overhead_resnet_again.json").read_text())
    r = again["results"]["infer_b16"]["ratio_to_resnet50"]["se_resnet50"]
    assert r["per_process"] == pytest.approx([1.1, 1.3, 1.0, 1.2]) and r["rounds"] == 9
    assert r == se_overhead.pooled_case([a1, a2, b, c])["ratio_to_resnet50"]["se_resnet50"]
    assert again["config"]["processes"] == 4 and len(again["results"]["processes"]) == 4
    assert again["device"] == {"threads": 1}
    # a file pooled before processes kept their device: the first process whose device is known speaks for them
    legacy = json.loads(Path(both).read_text())
    legacy["device"] = {"threads": 2, "parent": True}
    for proc in legacy["results"]["processes"]:
        proc.pop("device", None)
    Path(both).write_text(json.dumps(legacy))
    se_overhead.main(["resnet", "--pool", both, fc, "--tag", "_legacy"])
    assert json.loads((out / "se_overhead_resnet_legacy.json").read_text())["device"] == {"threads": 1}  # c's
    se_overhead.main(["resnet", "--pool", both, "--tag", "_legacy_alone"])
    assert json.loads((out / "se_overhead_resnet_legacy_alone.json").read_text())["device"]["parent"]
    first_source = again["results"]["pooled_from"][0]
    assert first_source["file"] == "se_overhead_resnet_both.json"
    assert [s["file"] for s in first_source["pooled_from"]] == ["a.json", "b.json"]  # where its processes came from


@pytest.mark.parametrize("second, says", [
    ({"threads": 2}, "threads differ"),
    ({"target": "timm"}, "the 'timm' target"),
    ({"infer_batch": [1]}, "infer_batch"),
    ("garbage", "not a readable results file"),
])
def test_pool_files_refuses_what_it_cannot_pool(second, says, tmp_path, capsys, monkeypatch):
    case = _case([0.011, 0.012], [0.010, 0.010], 1.0)
    first = _results_file(tmp_path / "a.json", {"infer_b16": case})
    if second == "garbage":
        (tmp_path / "b.json").write_text("{not json")
        other = str(tmp_path / "b.json")
    else:
        other = _results_file(tmp_path / "b.json", {"infer_b16": case}, **second)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(se_overhead, "RESULTS", out)
    monkeypatch.setattr(se_overhead, "DEVICE", se_overhead.DEVICE)
    with pytest.raises(SystemExit) as e:
        se_overhead.main(["resnet", "--pool", first, other])
    assert e.value.code == 2 and says in capsys.readouterr().err
    assert not list(out.iterdir())  # nothing written


@pytest.mark.parametrize("argv", [["block", "--pool", "x.json"], ["resnet", "--pool", "x.json", "--processes", "2"]])
def test_pool_flag_goes_alone_with_a_pooled_target(argv, capsys, monkeypatch):
    monkeypatch.setattr(se_overhead, "DEVICE", se_overhead.DEVICE)
    with pytest.raises(SystemExit) as e:
        se_overhead.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--pool: pools results files of the resnet, timm or freeze target" in err


def test_pool_target_sets_senets_pooling_against_pytorchs(tmp_path, monkeypatch):
    from senet.layers.pool import MaxPool2d
    from senet.models import ResNet

    built = {}

    def small(name):
        built[name] = ResNet("bottleneck", [1, 1, 1, 1], attn="se" if name.startswith("se_") else None)
        return built[name]

    monkeypatch.setattr(se_overhead, "RESULTS", tmp_path)
    monkeypatch.setattr(se_overhead, "create_model", small)
    monkeypatch.setattr(se_overhead, "DEVICE", se_overhead.DEVICE)
    se_overhead.main(["pool", "--infer-batch", "1", "--train-batch", "--rounds", "2", "--iters", "1", "--warmup", "1",
                      "--tag", "_test"])
    saved = json.loads((tmp_path / "se_overhead_pool_test.json").read_text())["results"]
    stem = saved["stem_pool_b1"]
    assert stem["same_output"] is True and stem["shape"] == [1, 64, 112, 112]
    assert set(stem["median_ms"]) == {"senet_forward", "pytorch_forward", "senet_forward_backward",
                                      "pytorch_forward_backward"}
    assert all(r["ratio"] > 0 for r in stem["senet_over_pytorch"].values())
    nets = saved["infer_b1"]
    assert sorted(nets["per_round_s"]) == ["resnet50", "resnet50_pytorch_pool", "se_resnet50",
                                           "se_resnet50_pytorch_pool"]
    assert set(nets["senet_pool_vs_pytorch_pool"]) == {"se_resnet50", "resnet50"} and "train_b16" not in saved
    # the "before" networks: copies pooling with PyTorch's module, same outputs, the originals untouched
    model = built["se_resnet50"].eval()
    before = se_overhead.pytorch_pooling(model)
    assert type(before.maxpool) is torch.nn.MaxPool2d and type(model.maxpool) is MaxPool2d
    assert (before.maxpool.kernel_size, before.maxpool.stride, before.maxpool.padding) == (3, 2, 1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(before(x), model(x))


@needs_kernels
def test_inplace_clock_counts_every_conv_and_kernel_call_and_changes_nothing():
    from senet.models import create_model

    torch.manual_seed(0)
    net = create_model("se_resnet50", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        want = net(x)
        conv_forward, lib = nn.Conv2d._conv_forward, native.library()
        clock = se_overhead.InPlaceClock()
        with clock.installed():
            got = net(x)
        assert nn.Conv2d._conv_forward is conv_forward and native._state["lib"] is lib  # put back
    assert torch.equal(got, want)
    assert clock.calls["conv"] == sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 53
    # one native call per unit end (16) and per conv-BN-ReLU (stem + two per unit), and the stem's pooling
    assert clock.calls["native"] == 16 + 1 + 2 * 16 + 1
    assert clock.ns["conv"] > 0 and clock.ns["native"] > 0


@needs_kernels
def test_inplace_target_prices_the_parts_of_se_cost(tmp_path, monkeypatch):
    monkeypatch.setattr(se_overhead, "RESULTS", tmp_path)
    monkeypatch.setattr(se_overhead, "DEVICE", se_overhead.DEVICE)
    se_overhead.main(["inplace", "--infer-batch", "1", "--rounds", "2", "--iters", "1", "--warmup", "1",
                      "--tag", "_t"])
    saved = json.loads((tmp_path / "se_overhead_inplace_t.json").read_text())
    res = saved["results"]["infer_b1"]
    assert res["calls_per_forward"]["se_resnet50"] == res["calls_per_forward"]["resnet50"] == {"conv": 53,
                                                                                               "native": 50}
    for parts in res["per_round_s"].values():
        for t, c, k, o in zip(parts["total"], parts["conv"], parts["native"], parts["other"], strict=True):
            assert 0 < c < t and 0 < k < t and o == pytest.approx(t - c - k)
    cost = res["se_cost_ms"]
    assert set(cost) == {"total", "conv", "native", "other"} and all(v["rounds"] == 2 for v in cost.values())


@pytest.mark.parametrize("infer", [False, True])
def test_cpu_allocator_runs_each_side_in_its_own_processes(infer, tmp_path, monkeypatch):
    # real child processes (tiny CIFAR ResNets at 8x8); the summary is checked by hand against what they reported
    bench = _benchmark("cpu_allocator")
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    assert bench.main(["--models", "se_resnet20", "resnet20", "--batch", "2", "--image-size", "8", "--steps", "2",
                       "--warmup", "1", "--pairs", "2", "--tag", "t", *(["--infer"] if infer else [])]) == 0
    out = json.loads((tmp_path / f"cpu_allocator{'_infer' if infer else ''}_t.json").read_text())
    pairs, res = out["pairs"], out["results"]
    assert [p["order"] for p in pairs] == [["default", "reuse"], ["reuse", "default"]]
    for p in pairs:
        assert p["default"]["allocator"]["applied"] is False
        assert p["reuse"]["allocator"]["applied"] is (allocator._unsupported() is None)
        assert all(len(t) == 2 for side in ("default", "reuse") for t in p[side]["step_s"].values())
    med = {m: [float(np.median(p[m]["step_s"]["se_resnet20"])) for p in pairs] for m in ("default", "reuse")}
    assert res["reuse_vs_default"]["se_resnet20"]["ratio"] == pytest.approx(sum(med["reuse"]) / sum(med["default"]))
    se = sum(sum(p["reuse"]["step_s"]["se_resnet20"]) for p in pairs)
    base = sum(sum(p["reuse"]["step_s"]["resnet20"]) for p in pairs)
    assert res["se_resnet20_vs_resnet20"]["reuse"]["ratio"] == pytest.approx(se / base)
    assert res["peak_rss_mb"]["default"] == [p["default"]["peak_rss_mb"] for p in pairs]
    assert out["config"]["pairs"] == 2 and out["config"]["infer"] is infer
    assert "git_revision" in out and out["device"]["threads"] == 1


def test_interleave_waits_out_an_onnxruntime_step(monkeypatch):
    # the onnx target interleaves onnxruntime sessions with torch: every window of a session (warmup included) is
    # followed by senet.bench's untimed pause, so its spinning threads do not slow the next step
    import senet.bench as bench

    events = []
    session = type("Session", (), {"run": lambda self, outputs, feed: events.append("ort")})()
    monkeypatch.setattr(bench.time, "sleep", lambda s: events.append(s))
    steps = {"torch": lambda: events.append("torch"), "ort": bench.onnx_step(session, {})}
    t = se_overhead.interleave(steps, rounds=2, iters=2, warmup=1)
    pause = bench.ORT_SETTLE_S
    assert events == ["torch", "ort", pause, "torch", "torch", "ort", "ort", pause, "ort", "ort", pause,
                      "torch", "torch"]
    assert [len(v) for v in t.values()] == [2, 2]


def test_pool_refuses_a_freeze_file_of_the_old_layout(tmp_path, capsys, monkeypatch):
    # freeze files written before the target pooled keep one entry per batch, groups inside: named, not a KeyError
    monkeypatch.setattr(se_overhead, "DEVICE", se_overhead.DEVICE)
    old = _results_file(tmp_path / "old.json", {"infer_b1": {"se_resnet20 resnet20": {"per_round_s": {}}}},
                        target="freeze")
    with pytest.raises(SystemExit) as e:
        se_overhead.main(["freeze", "--pool", old, old])
    assert e.value.code == 2 and "holds no per-round times" in capsys.readouterr().err
