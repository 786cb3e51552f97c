"""Probe (issue 8, target 2): what would SE cost at batch 1 if its squeeze were fused into BN's pass?

Not part of senet. With ATen's ops as the unit of work the squeeze is a pass of its own over the
BN output ``x`` (``x.mean((2, 3))``), and inside the network that read misses the cache. A kernel
that writes ``x = bn(c)`` and sums each plane of ``x`` as it goes removes that read. This script builds
such a kernel from the C source below (plain C, no torch headers, one thread, through ctypes; it
needs a C compiler, ``$CC`` or ``cc``), checks it against ``torch.batch_norm`` + ``sum`` and times, all
interleaved in one process:

    se_resnet50_fused_squeeze  se_resnet50 whose SE unit ends run BN + squeeze as the kernel, then
                               the same excitation and fused scale + addition + ReLU as senet's path
    se_resnet50                senet's fast path (the default)
    resnet50                   the baseline

    python benchmarks/fused_kernel_probe.py --threads 1 --rounds 60 --iters 3

writes ``benchmarks/results/fused_kernel_probe.json`` (config, versions, device, git revision, load).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from se_overhead import fmt, ratio, run_subjects, save_results  # noqa: E402

from senet.bench import BenchConfig  # noqa: E402
from senet.models import _attn, create_model  # noqa: E402

C_SOURCE = r"""
#include <math.h>
/* x = w (c - mean) / sqrt(var + eps) + b per channel (eval-mode BN) and sums[p] = sum of plane p of x,
   in one pass. c, x: n_planes contiguous planes of hw floats (NCHW, plane p has channel p % channels). */
void bn_eval_plane_sums(const float *c, float *x, float *sums, const float *mean, const float *var,
                        const float *w, const float *b, float eps, long n_planes, long channels, long hw) {
    for (long p = 0; p < n_planes; ++p) {
        long ch = p % channels;
        float a = (w ? w[ch] : 1.0f) / sqrtf(var[ch] + eps);
        float shift = (b ? b[ch] : 0.0f) - mean[ch] * a;
        const float *cp = c + p * hw;
        float *xp = x + p * hw;
        float s = 0.0f;
        #pragma omp simd reduction(+:s)
        for (long i = 0; i < hw; ++i) {
            float v = a * cp[i] + shift;
            xp[i] = v;
            s += v;
        }
        sums[p] = s;
    }
}
"""


def build(workdir: Path) -> ctypes.CDLL:
    """Compile ``C_SOURCE`` into a shared library in ``workdir`` and load it."""
    src, lib = workdir / "bn_sum.c", workdir / "libbn_sum.so"
    src.write_text(C_SOURCE)
    cc = os.environ.get("CC", "cc")
    cmd = [cc, "-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC", str(src), "-o", str(lib)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        raise SystemExit(f"could not build the probe's kernel with {' '.join(cmd)!r}: {detail}\n"
                         "Install a C compiler or point $CC at one.") from None
    dll = ctypes.CDLL(str(lib))
    p = ctypes.c_void_p
    dll.bn_eval_plane_sums.argtypes = [p, p, p, p, p, p, p, ctypes.c_float, ctypes.c_long, ctypes.c_long,
                                       ctypes.c_long]
    dll.bn_eval_plane_sums.restype = None
    return dll


def bn_squeeze(dll: ctypes.CDLL, bn: nn.BatchNorm2d, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bn(c), mean_hw bn(c)) for eval-mode ``bn`` and a contiguous float32 NCHW ``c``: one pass."""
    b, ch, h, w = c.shape
    x, sums = torch.empty_like(c), c.new_empty(b, ch, 1, 1)
    dll.bn_eval_plane_sums(c.data_ptr(), x.data_ptr(), sums.data_ptr(), bn.running_mean.data_ptr(),
                           bn.running_var.data_ptr(), _ptr(bn.weight), _ptr(bn.bias), bn.eps, b * ch, ch, h * w)
    return x, sums.div_(h * w)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def check(dll: ctypes.CDLL) -> dict[str, float]:
    """The kernel against torch.batch_norm + mean at ResNet-50's SE sizes, random statistics."""
    worst = {"x": 0.0, "mean": 0.0}
    for ch, hw in [(256, 56), (512, 28), (1024, 14), (2048, 7)]:
        bn = nn.BatchNorm2d(ch).eval()
        with torch.no_grad():
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.2, 3)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.5)
            c = torch.randn(2, ch, hw, hw)
            x, z = bn_squeeze(dll, bn, c)
            ref = bn(c)
            worst["x"] = max(worst["x"], (x - ref).abs().max().item() / ref.abs().max().item())
            zr = ref.mean((2, 3), keepdim=True)
            worst["mean"] = max(worst["mean"], (z - zr).abs().max().item() / zr.abs().max().item())
    if max(worst.values()) > 1e-5:
        raise SystemExit(f"the probe's kernel disagrees with torch: relative errors {worst}")
    return worst


class FusedSqueeze(nn.Module):
    """``model`` (an SE-ResNet in eval mode) whose SE unit ends take BN + squeeze from the kernel; the
    excitation (``infer_excitation``) and ``relu(x s + shortcut)`` (in place) are senet's own."""

    def __init__(self, model: nn.Module, dll: ctypes.CDLL):
        super().__init__()
        self.model, self.dll = model, dll

    def _merge(self, unit, c, bn, shortcut, conv_in=None, h_mean=None):
        if (isinstance(unit.attn, nn.Identity) or torch.is_grad_enabled() or bn.training
                or c.dtype != torch.float32 or not c.is_contiguous()):
            return self.original(unit, c, bn, shortcut, conv_in, h_mean)
        x, z = bn_squeeze(self.dll, bn, c)
        s = unit.attn.infer_excitation(x, z)
        return torch.addcmul(shortcut, x, s, out=x).relu_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.original = _attn.AttnUnit._merge
        _attn.AttnUnit._merge = lambda unit, *a: self._merge(unit, *a)
        try:
            return self.model(x)
        finally:
            _attn.AttnUnit._merge = self.original


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="the kernel is single-threaded: keep 1")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        dll = build(Path(tmp))
        results: dict = {"kernel_vs_torch_relative_error": check(dll)}
        se = create_model("se_resnet50").eval()
        probe = FusedSqueeze(se, dll)
        with torch.inference_mode():
            img = torch.randn(2, 3, 224, 224)
            results["network_max_abs_diff"] = (probe(img) - se(img)).abs().max().item()
        models = {"se_resnet50_fused_squeeze": probe, "se_resnet50": se, "resnet50": create_model("resnet50")}
        for batch in args.batch:
            cfg = BenchConfig("se_resnet50", "resnet50", warmup=args.warmup, rounds=args.rounds, iters=args.iters)
            res = run_subjects(models, cfg, batch)
            rounds = res["per_round_s"]
            res["fused_squeeze_vs_fast_path"] = ratio(rounds["se_resnet50_fused_squeeze"], rounds["se_resnet50"])
            print(f"  fused squeeze / senet's fast path: {fmt(res['fused_squeeze_vs_fast_path'])}")
            results[f"infer_b{batch}"] = res
    print("wrote", save_results("fused_kernel_probe", {"target": "fused_kernel_probe", **vars(args)}, results, load))


if __name__ == "__main__":
    main()
