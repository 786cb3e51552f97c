"""Which path SE trains on under CUDA (issue 8): se_resnet50's training step with each, interleaved in one process
beside resnet50 and timm's seresnet50 (same weights as ours); and what one inference forward launches.

Paths (``senet.layers.fused``):

    default         as shipped: on CUDA, eager training on plain autograd ops (``FUSED_TRAINING_DEVICES`` is CPU)
    fused           the memory-saving functions on CUDA too ("cuda" added to ``FUSED_TRAINING_DEVICES``): training
                    BN as ``native_batch_norm`` (A, B from its batch statistics), the backward's per-(sample,
                    channel) sums from BatchNorm's backward kernel (``BN_KERNEL_DEVICES``), the FCs recomputed
    fused_portable  as ``fused`` with BN as the module, A, B from two more reductions (``bn_affine``), the sums as
                    plain ``(g * c).sum`` and ``g.sum``
    reference       the unfused reference path (``reference_path``: SE as its module, then the addition, ReLU)

(The first run of this script, at 19d29b4, compared the fused branches before the default changed, with a
``portable_looped`` branch that summed one sample at a time: results/cuda_paths_cuda_s20.json.)

Writes ``benchmarks/results/cuda_paths<tag>.json`` with provenance. Ratios are paired over rounds with 95%
bootstrap intervals, as ``se_overhead.py``'s.

    python benchmarks/cuda_paths.py --device cuda --batch 32 64 --amp-batch 64
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import se_overhead as so  # noqa: E402

from senet.bench import cuda_peak_bytes  # noqa: E402
from senet.layers import fused  # noqa: E402
from senet.models import create_model  # noqa: E402

FUSED = ("cpu", "cuda")
BRANCHES = {"default": {}, "fused": {"FUSED_TRAINING_DEVICES": FUSED},
            "fused_portable": {"FUSED_TRAINING_DEVICES": FUSED, "BN_KERNEL_DEVICES": ("cpu",)}}


@contextlib.contextmanager
def branch(patch: dict):
    """``senet.layers.fused``'s module attributes set as ``patch`` says, for the forward and the backward."""
    saved = {k: getattr(fused, k) for k in patch}
    try:
        for k, v in patch.items():
            setattr(fused, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(fused, k, v)


def train_step(model: torch.nn.Module, x: torch.Tensor, context, amp: torch.dtype | None):
    """One SGD step (forward under ``torch.autocast`` when ``amp``, backward outside it), all within ``context()``."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    autocast = (lambda: torch.autocast(x.device.type, dtype=amp)) if amp else contextlib.nullcontext

    def step() -> None:
        with context():
            opt.zero_grad(set_to_none=True)
            with autocast():
                out = model(x)
            F.cross_entropy(out.float(), labels).backward()
            opt.step()
    return step


def run_case(batch: int, amp: torch.dtype | None, args) -> dict:
    pair = so.timm_pair()  # ours with timm's weights, and timm's seresnet50
    ours = pair["senet_se_resnet50"]
    models = {name: ours if name == "default" else copy.deepcopy(ours) for name in BRANCHES}
    models["reference"] = copy.deepcopy(ours)
    models["resnet50"] = create_model("resnet50")
    models["timm_seresnet50"] = pair["timm_seresnet50"]
    contexts = {**{n: (lambda p=p: branch(p)) for n, p in BRANCHES.items()}, "reference": fused.reference_path}
    x = torch.randn(batch, 3, 224, 224, device=so.DEVICE)
    steps, peak = {}, {}
    for name, model in models.items():
        steps[name] = train_step(model.to(so.DEVICE), x, contexts.get(name, contextlib.nullcontext), amp)
        steps[name]()  # first step: cuDNN's algorithm choice, the allocator's pools
        peak[name] = cuda_peak_bytes(steps[name], so.DEVICE) if so.DEVICE.type == "cuda" else None
    t = so.interleave(steps, rounds=args.rounds, iters=args.iters, warmup=args.warmup)
    res = {"batch": batch, "amp": str(amp) if amp else None, "median_ms": {n: so.median_ms(v) for n, v in t.items()},
           "peak_bytes": peak,
           "vs_default": {n: so.ratio(t[n], t["default"]) for n in t if n != "default"},
           "vs_resnet50": {n: so.ratio(t[n], t["resnet50"]) for n in t if n != "resnet50"},
           "vs_timm_seresnet50": {n: so.ratio(t[n], t["timm_seresnet50"]) for n in t if n != "timm_seresnet50"}}
    print(f"batch {batch}{' ' + str(amp)[6:] if amp else ''}: " + ", ".join(
        f"{n} {v:.2f} ms" for n, v in res["median_ms"].items()))
    for key in ("vs_default", "vs_resnet50", "vs_timm_seresnet50"):
        print(f"  {key}: " + ", ".join(f"{n} {so.fmt(r)}" for n, r in res[key].items()))
    if so.DEVICE.type == "cuda":
        print("  peak MiB: " + ", ".join(f"{n} {b / 2**20:.0f}" for n, b in peak.items()))
    return res


def profile_inference(batch: int, forwards: int = 5) -> dict:
    """What one eager inference forward launches (torch.profiler): per network, the device kernels and the
    ATen ops with their counts, and the host's time per forward (launch-bound at small batches, where every
    op costs its call whatever its size)."""
    import timm
    from torch.profiler import ProfilerActivity, profile

    pair = so.timm_pair()
    nets = {"senet_se_resnet50": pair["senet_se_resnet50"], "timm_seresnet50": pair["timm_seresnet50"],
            "senet_resnet50": create_model("resnet50"), "timm_resnet50": timm.create_model("resnet50")}
    x = torch.randn(batch, 3, 224, 224, device=so.DEVICE)
    out = {}
    for name, net in nets.items():
        net = net.to(so.DEVICE).eval()
        with torch.inference_mode():
            for _ in range(3):
                net(x)
            torch.cuda.synchronize(so.DEVICE)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(forwards):
                    net(x)
                torch.cuda.synchronize(so.DEVICE)
        events = prof.key_averages()
        kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        ops = {e.key: e.count / forwards for e in events
               if e.key.startswith("aten::") and e.device_type == torch.autograd.DeviceType.CPU}
        out[name] = {"kernels_per_forward": kernels / forwards, "aten_ops_per_forward": ops}
    print(f"inference batch {batch}, kernels per forward: " + ", ".join(
        f"{n} {v['kernels_per_forward']:.0f}" for n, v in out.items()))
    ours, theirs = out["senet_se_resnet50"]["aten_ops_per_forward"], out["timm_seresnet50"]["aten_ops_per_forward"]
    diff = {k: ours.get(k, 0) - theirs.get(k, 0) for k in set(ours) | set(theirs)}
    print("  ATen calls per forward, senet - timm: " + ", ".join(
        f"{k[6:]} {v:+.0f}" for k, v in sorted(diff.items(), key=lambda kv: -abs(kv[1])) if v))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda[:N] (cpu: to check the script)")
    p.add_argument("--batch", type=int, nargs="*", default=[32, 64], help="float32 training batches")
    p.add_argument("--amp-batch", type=int, nargs="*", default=[64], help="bfloat16 autocast training batches")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile-batch", type=int, nargs="*", default=[1, 16],
                   help="inference batches whose kernels and ATen calls are counted (CUDA only)")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    so.DEVICE = torch.device(args.device)
    if so.DEVICE.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu to check")
    load = os.getloadavg()
    torch.manual_seed(0)
    results = {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
               "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32, "cases": {}}
    for amp, batches in ((None, args.batch), (torch.bfloat16, args.amp_batch)):
        for b in batches:
            results["cases"][f"train_b{b}{'_bf16' if amp else ''}"] = run_case(b, amp, args)
    if so.DEVICE.type == "cuda":
        results["profiles"] = {f"infer_b{b}": profile_inference(b) for b in args.profile_batch}
    print("wrote", so.save_results(f"cuda_paths{args.tag}", vars(args), results, load))


if __name__ == "__main__":
    main()
