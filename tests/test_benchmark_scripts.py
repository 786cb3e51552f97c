"""The benchmark scripts' own machinery (their timings are not tests: see docs/performance.md)."""

import importlib.util
from pathlib import Path

import torch

from senet.models import _attn
from senet.models.resnet import ResNet

_SPEC = importlib.util.spec_from_file_location(
    "se_overhead", Path(__file__).resolve().parents[1] / "benchmarks" / "se_overhead.py")
se_overhead = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(se_overhead)


def test_ablated_se_network_prices_the_parts_it_says():
    torch.manual_seed(0)
    se = ResNet("bottleneck", [1, 1, 1, 1], attn="se", num_classes=5).eval()
    plain = ResNet("bottleneck", [1, 1, 1, 1], attn=None, num_classes=5).eval()
    missing, unexpected = plain.load_state_dict(se.state_dict(), strict=False)
    assert not missing and all(".attn." in k for k in unexpected)
    real_end = _attn.infer_scale_add_relu
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = {p: se_overhead.Ablated(se, p)(x) for p in ("add", "scale", "squeeze")}
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
