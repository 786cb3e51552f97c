"""What SE costs on this machine (issue 8), against the memory floor, ResNet-50, timm and the paper.

SENet (Hu et al., arXiv 1709.01507) adds ~0.1% of ResNet-50's MACs, but its squeeze and scale are
memory-bound passes over whole activations. One sub-benchmark per target; every one measures its
subjects interleaved in one process (warmup, then rounds alternating AB, BA, ...): networks with
``senet.bench.measure``, tensors with the same scheme here. It reports medians and ratios with 95%
paired-bootstrap intervals (``senet.bench.paired_ratio_ci``, plus the median of per-round ratios) and
writes ``benchmarks/results/se_overhead_<target>.json`` with provenance (config, versions, device,
threads, git revision) and the load average before and after.

    block   1. the SE block alone at ResNet-50's SE activation sizes vs the memory-traffic floor
    resnet  2. se_resnet50 vs resnet50 (and the unfused reference path), 224x224
    decompose  2. where se_resnet50's inference overhead goes (structure, scale, squeeze, excitation)
    inplace  2. the same on the native path, timed inside the forward: convolutions, kernels, Python
    timm    3. ours vs timm seresnet50, same weights: eager, channels_last, torch.compile
    fc      Linear vs 1x1-conv SE FCs in se_resnet50 (same weights), eager, vs resnet50
    pool    senet's max pooling (native kernel) vs PyTorch's: the stem's pooling alone, and both networks
    memory  4. saved activations of a training step: SE over the baseline
    onnx    5. se_resnet50 in onnxruntime vs PyTorch eager, batch 1
    freeze  senet.freeze vs the eager model, inference, per network (ResNet-50 and CIFAR pairs)

    python benchmarks/se_overhead.py block --threads 1    (commands used: docs/performance.md)

``--processes K`` (resnet, timm, freeze) runs the target in K fresh processes one after the other, each with
``--rounds`` interleaved rounds, and pools them: a process's state (where its weights landed in memory,
what else ran then) moves a ratio for all of its rounds, by as much as SE costs at batch 1, so one
process's interval understates the uncertainty; the pooled intervals resample processes, then rounds
(``senet.bench.clustered_ratio_ci``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from senet import allocator
from senet.bench import (
    BenchConfig,
    Subject,
    _timed,
    activation_bytes,
    clustered_median_ci,
    clustered_ratio_ci,
    make_step,
    measure,
    onnx_step,
    paired_ratio_ci,
    settle,
)
from senet.evaluate import provenance, write_json
from senet.flops import count_macs
from senet.layers import create_attention, native
from senet.layers.fused import reference_path
from senet.layers.pool import MaxPool2d
from senet.models import create_model, freeze, model_info

CPU = torch.device("cpu")
DEVICE = CPU  # where every target runs (``--device``; main sets it): one device per process
RESULTS = Path(__file__).parent / "results"
# ResNet-50's SE inputs (C, H = W) per stage at 224x224: conv2_x .. conv5_x (ResNet paper Table 1)
SE_SHAPES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]


# ----------------------------------------------------------------------------- measurement


def timed(step: Callable[[], object], iters: int) -> list[float]:
    """Seconds of each of ``iters`` calls on ``DEVICE`` (``senet.bench``'s timer: CUDA synchronised)."""
    return _timed(step, DEVICE, iters)


def window(step: Callable[[], object], iters: int) -> float:
    """Mean seconds a call over ``iters`` calls. On the CPU the mean of ``timed``; on CUDA the calls queue back to
    back and the clock stops at one synchronisation, as the device runs them in a program: a step of tens of
    microseconds is not charged a synchronisation and an idle queue each."""
    if DEVICE.type != "cuda":
        return float(np.mean(timed(step, iters)))
    torch.cuda.synchronize(DEVICE)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize(DEVICE)
    return (time.perf_counter() - t0) / iters


def interleave(steps: dict[str, Callable[[], object]], *, rounds: int, iters: int, warmup: int) -> dict[str, list]:
    """Per-round mean seconds of every step (``window``); the order alternates AB.., ..BA each round. A step marked
    with ``settle_s`` (an onnxruntime session) is followed by that untimed pause."""
    names = list(steps)
    for n in names:
        timed(steps[n], warmup)
        settle(steps[n])
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            out[n].append(window(steps[n], iters))
            settle(steps[n])  # onnxruntime's threads stop spinning before the next step (senet.bench.settle)
    return out


def ratio(num: list[float], den: list[float]) -> dict[str, float]:
    """sum(num) / sum(den) over paired rounds with its 95% bootstrap interval (``senet.bench``), and the
    median of the per-round ratios with a bootstrap interval (robust to a round hit by other load)."""
    mid, low, high = median_ci(np.asarray(num) / np.asarray(den))
    return {**paired_ratio_ci(num, den), "median_round_ratio": mid, "median_ci_low": low, "median_ci_high": high}


def median_ci(values: np.ndarray, resamples: int = 2000) -> tuple[float, float, float]:
    """The median of per-round values with its 95% bootstrap interval (rounds resampled, fixed seed)."""
    idx = np.random.default_rng(0).integers(0, values.size, size=(resamples, values.size))
    boot = np.median(values[idx], axis=1)
    return float(np.median(values)), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def paired_difference(a: list[float], b: list[float]) -> dict[str, float]:
    """Median of the per-round differences ``a - b`` (seconds in, ms out) with a 95% bootstrap interval:
    each round's pair stays together, so load that hits both of a round's subjects cancels."""
    mid, low, high = median_ci(1e3 * (np.asarray(a, float) - np.asarray(b, float)))
    return {"ms": mid, "ci_low": low, "ci_high": high, "rounds": len(a)}


def median_ms(rounds: list[float]) -> float:
    return 1e3 * float(np.median(rounds))


def pooled_ratio(num: list[list[float]], den: list[list[float]]) -> dict:
    """``ratio`` over several processes' paired rounds (one list per process; ``clustered_ratio_ci``)."""
    per_round = [np.asarray(a, float) / np.asarray(b, float) for a, b in zip(num, den, strict=True)]
    mid, low, high = clustered_median_ci(per_round)
    return {**clustered_ratio_ci(num, den), "median_round_ratio": mid, "median_ci_low": low, "median_ci_high": high}


def pooled_case(parts: list[dict]) -> dict:
    """One network case (``run_subjects``' results, plus what ``bench_resnet`` adds) from several processes:
    every ratio and SE's cost against its floor pooled over processes; each process's own results kept."""
    rounds = {n: [p["per_round_s"][n] for p in parts] for n in parts[0]["per_round_s"]}
    out: dict = {"per_round_s": rounds, "per_process": parts}
    for key, entry in parts[0].items():
        if key.startswith("ratio_to_") or key == "vs_resnet50_pytorch_ops":
            base = key.removeprefix("ratio_to_") if key.startswith("ratio_to_") else "resnet50_pytorch_ops"
            out[key] = {n: pooled_ratio(rounds[n], rounds[base]) for n in entry}
    pairs = parts[0].get("ratio_pairs", {})  # the freeze target's ratios, named by their rounds
    for key, spec in pairs.items():
        out[key] = {k: pooled_ratio(rounds[a], rounds[b]) for k, (a, b) in spec.items()}
    for key in ("ratio_pairs", "planned_units"):
        if key in parts[0]:
            out[key] = parts[0][key]
    if "se_traffic_floor" in parts[0]:
        diffs = [1e3 * (np.asarray(a, float) - np.asarray(b, float))
                 for a, b in zip(rounds["se_resnet50"], rounds["resnet50"], strict=True)]
        mid, low, high = clustered_median_ci(diffs)
        floor = float(np.mean([p["se_traffic_floor"]["floor_ms"] for p in parts]))
        out["se_traffic_floor"] = {
            "floor_ms": floor, "floor_ms_per_process": [p["se_traffic_floor"]["floor_ms"] for p in parts],
            "se_cost_ms": {"ms": mid, "ci_low": low, "ci_high": high, "rounds": sum(d.size for d in diffs),
                           "processes": len(diffs)}, "cost_vs_floor": mid / floor if floor else None}
    return out


# the targets --processes and --pool pool (their cases carry per_round_s)
POOLED_TARGETS = ("resnet", "timm", "freeze")
# what a pooled file keeps of each process's provenance (``device``: its threads, native kernels, environment)
PROCESS_PROVENANCE = ("git_revision", "created", "load_avg_before", "load_avg_after", "device")
# what must agree between results files pooled by --pool (what is timed, and how)
POOL_SAME = ("device", "threads", "pair", "modes", "infer_batch", "train_batch")


def run_processes(args, argv: list[str]) -> None:
    """``--processes K``: the target in K fresh processes one after another (never side by side: each
    would be the other's load), each writing its own results to a temporary file; then the pooled file."""
    load = os.getloadavg()
    child_argv = drop_option(argv, "--processes")
    parts = []
    with tempfile.TemporaryDirectory(prefix="se_overhead_") as tmp:
        for k in range(args.processes):
            print(f"process {k + 1}/{args.processes}", flush=True)
            out = Path(tmp) / f"process_{k}.json"
            code = run_child([sys.executable, str(Path(__file__).resolve()), *child_argv, "--child-out", str(out)])
            if code != 0:
                raise SystemExit(f"process {k + 1}/{args.processes} exited with {code}; no results written")
            parts.append(json.loads(out.read_text()))
    results, processes, measured = pool_payloads(parts)
    header = f"{args.processes} processes, {args.rounds} rounds each (training {args.train_rounds})"
    write_pooled(args, results, processes, header, load, measured)


def _cases(results: dict) -> list[str]:
    """The network cases of a results file's ``results`` (not the pooled files' provenance entries)."""
    return [k for k in results if k not in ("processes", "pooled_from")]


def pool_payloads(payloads: list[dict]) -> tuple[dict, list[dict], dict]:
    """(results, processes' provenance, what was measured with) of results files pooled as one run: a single
    process's file adds its cases as one process, a ``--processes`` (or ``--pool``) file each of its processes.
    What was measured with: the ``versions`` and ``device`` of the processes that timed (the first process's
    device that is known; pooled files agree on versions, and each process keeps its own device), not those of
    the process that pools: a ``--processes`` parent runs nothing at the target's thread count. (Files pooled
    before this recorded the parent's device block and no device per process; where no process's device is
    known, the first file's own block stands in.)"""
    processes: list[dict] = []
    for data in payloads:
        res = data["results"]
        processes += res["processes"] if "processes" in res else [{k: data.get(k) for k in PROCESS_PROVENANCE}]
    results = {key: pooled_case([part for data in payloads for part in _parts(data, key)])
               for key in _cases(payloads[0]["results"])}
    measured = {"versions": payloads[0].get("versions"),
                "device": next((p["device"] for p in processes if p.get("device")), payloads[0].get("device"))}
    return results, processes, {k: v for k, v in measured.items() if v is not None}


def _parts(data: dict, key: str) -> list[dict]:
    """Case ``key`` of a results file per process: the file's own, or a pooled file's processes' (kept there)."""
    res = data["results"]
    return res[key]["per_process"] if "processes" in res else [res[key]]


def write_pooled(args, results: dict, processes: list[dict], header: str, load: tuple, measured: dict,
                 sources=None, config: dict | None = None) -> None:
    """Print the pooled ``results`` (one ``pooled_case`` per case) and save them with each process's provenance
    (and, from ``--pool``, the files they came from) under ``config`` (default: this command's) and the
    ``measured`` versions and device (``pool_payloads``)."""
    print(f"pooled over {header}; intervals resample processes, then rounds:")
    for key, res in results.items():
        lines = [(f"{n}/{rk.removeprefix('ratio_to_')}", r) for rk in res if rk.startswith("ratio_to_")
                 for n, r in res[rk].items()]
        lines += [(f"{rk} {n}: {a}/{b}", res[rk][n]) for rk, spec in res.get("ratio_pairs", {}).items()
                  for n, (a, b) in spec.items()]
        for label, r in lines:
            print(f"  {key} {label} {fmt(r)}; per process " + ", ".join(f"{v:.3f}" for v in r["per_process"]))
        if "se_traffic_floor" in res:
            f, c = res["se_traffic_floor"], res["se_traffic_floor"]["se_cost_ms"]
            print(f"  {key} SE's cost {c['ms']:.2f} ms [{c['ci_low']:.2f}, {c['ci_high']:.2f}] against its traffic "
                  f"floor {f['floor_ms']:.2f} ms (mean over processes)")
    results["processes"] = processes
    if sources is not None:
        results["pooled_from"] = sources
    print("wrote", save(args.target, config or {"target": args.target, **vars(args)}, results, load,
                        measured=measured))


def pool_files(parser: argparse.ArgumentParser, args) -> None:
    """``--pool FILE ...``: measure nothing; pool results files of this target (single processes or
    ``--processes`` runs, which contribute each of their processes) as if their processes were one run.
    The files must agree on ``POOL_SAME``, the cases, the networks and the library versions."""
    load = os.getloadavg()
    runs = []
    for path in args.pool:
        try:
            data = json.loads(Path(path).read_text())
            config, results = data["config"], data["results"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            parser.error(f"--pool {path}: not a readable results file of this script ({type(e).__name__}: {e})")
        if config.get("target") != args.target:
            parser.error(f"--pool {path}: a results file of the {config.get('target')!r} target; pool it with "
                         f"`{config.get('target')} --pool ...`, not {args.target!r}")
        runs.append((str(path), data))
    first_path, first = runs[0]
    cases = sorted(_cases(first["results"]))
    for path, data in runs[1:]:
        differ = [k for k in POOL_SAME if data["config"].get(k) != first["config"].get(k)]
        if sorted(_cases(data["results"])) != cases:
            differ.append("cases")
        if data.get("versions") != first.get("versions"):
            differ.append("versions")
        if differ:
            parser.error(f"--pool: {path} and {first_path} measured different things ({', '.join(differ)} differ); "
                         "pool only runs of the same command and library versions")
    for key in cases:
        for path, data in runs:
            if not all("per_round_s" in part for part in _parts(data, key)):
                parser.error(f"--pool {path}: its {key!r} holds no per-round times to pool (a freeze file written "
                             "before this target pooled, in one entry per batch); run the target again")
        names = [sorted(part["per_round_s"]) for _, data in runs for part in _parts(data, key)]
        if any(n != names[0] for n in names):
            parser.error(f"--pool: the files time different networks in {key} ({names[0]} and others); "
                         "pool only runs of the same command")
    results, processes, measured = pool_payloads([data for _, data in runs])
    sources = [{"file": Path(path).name, "git_revision": data.get("git_revision"), "created": data.get("created"),
                "config": data["config"], **({"pooled_from": data["results"]["pooled_from"]}
                                             if "pooled_from" in data["results"] else {})} for path, data in runs]
    write_pooled(args, results, processes, f"{len(processes)} processes from {len(runs)} files", load, measured,
                 sources, pooled_config([data["config"] for _, data in runs], args, len(processes)))


def pooled_config(configs: list[dict], args, processes: int) -> dict:
    """The config a ``--pool`` file records: what its sources measured (``POOL_SAME`` and every other setting
    they share; a setting they differ in, such as ``rounds``, is None here and kept in each ``pooled_from``
    entry), with the number of ``processes`` pooled and this command's ``tag`` and ``pool``. So a pooled file
    says what was timed, and pools again."""
    keys = dict.fromkeys(k for c in configs for k in c)
    shared = {k: configs[0].get(k) if all(c.get(k) == configs[0].get(k) for c in configs) else None for k in keys}
    return {**shared, "target": args.target, "processes": processes, "tag": args.tag, "pool": args.pool}


def run_child(cmd: list[str]) -> int:
    """Run one of ``--processes``' runs (its output goes straight to ours) and give its exit status."""
    return subprocess.run(cmd).returncode


def drop_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without the option ``name`` and its value (``name V`` or ``name=V``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def fmt(r: dict) -> str:
    return (f"{r['ratio']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] (median of rounds "
            f"{r['median_round_ratio']:.3f} [{r['median_ci_low']:.3f}, {r['median_ci_high']:.3f}])")


def save(target: str, config: dict, results: dict, load_before: tuple, path: Path | None = None,
         measured: dict | None = None) -> Path:
    return save_results(f"se_overhead_{target}{config['tag']}", config, results, load_before, path, measured)


def save_results(name: str, config: dict, results: dict, load_before: tuple, path: Path | None = None,
                 measured: dict | None = None) -> Path:
    """``benchmarks/results/<name>.json`` (or ``path``): provenance, the load average before and after, the
    results. ``measured``: the versions and device of the processes that timed, where not this one (pools)."""
    payload = {**provenance(config, DEVICE), **(measured or {}), "load_avg_before": load_before,
               "load_avg_after": os.getloadavg(), "cpus": os.cpu_count(), "results": results}
    return write_json(path or RESULTS / f"{name}.json", payload)


# ----------------------------------------------------------------------------- 1. block vs floor


def bandwidth(numel: int, args) -> dict[str, float]:
    """Copy (clone: one read + one write) and reduction (mean over H, W: one read) bandwidth, GB/s."""
    x = torch.randn(numel // 4096, 64, 8, 8, device=DEVICE)  # (N, 64, 8, 8): far larger than the caches
    t = interleave({"clone": x.clone, "mean": lambda: x.mean((2, 3))}, rounds=args.rounds, iters=args.iters,
                   warmup=args.warmup)
    nbytes = x.numel() * x.element_size()
    return {"bytes": nbytes, "copy_GBps": 2 * nbytes / np.median(t["clone"]) / 1e9,
            "reduce_GBps": nbytes / np.median(t["mean"]) / 1e9}


def sgemm_gflops(n: int = 2048, reps: int = 10) -> float:
    """This core's float32 GEMM rate (best of ``reps`` n x n x n products), GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b, reps))
    return 2 * n**3 / best / 1e9


FMA_PEAK_SOURCE = r"""
typedef float vf __attribute__((vector_size(64)));
/* n rounds of 12 independent multiply-add chains of 16 floats each (the compiler splits them to the widest
   vectors -march=native has), named one by one so that they stay in registers: what the core's FMA units do
   at most, no memory traffic */
#define STEP(a) a = a * b + c
float fma_chains(long n, float seed) {
    vf b = (vf){0} + 0.999999f, c = (vf){0} + 1e-7f, s0 = (vf){0} + seed;  /* distinct starts: none merged */
    vf a0 = s0, a1 = s0 + 1, a2 = s0 + 2, a3 = s0 + 3, a4 = s0 + 4, a5 = s0 + 5, a6 = s0 + 6, a7 = s0 + 7,
       a8 = s0 + 8, a9 = s0 + 9, a10 = s0 + 10, a11 = s0 + 11;
    for (long k = 0; k < n; ++k) {
        STEP(a0); STEP(a1); STEP(a2); STEP(a3); STEP(a4); STEP(a5);
        STEP(a6); STEP(a7); STEP(a8); STEP(a9); STEP(a10); STEP(a11);
    }
    vf s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
    return s[0];
}
"""


def fma_peak_gflops(rounds: int = 20_000_000, reps: int = 5, threads: int = 1) -> float | None:
    """The float32 peak (GFLOP/s) of ``threads`` cores: independent fused multiply-adds with no memory traffic,
    compiled here with ``-march=native``, run by ``threads`` threads at once (ctypes lets go of the GIL; best of
    ``reps``). No computation on those cores runs faster, whatever its library; a GEMM by the BLAS torch brings
    can run well below it (on an AMD EPYC 81-86 against 116 GFLOP/s on one core: sgemm is not a floor there).
    Two threads on one core's hardware threads share its FMA units, which this measures as it is. None without a
    C compiler."""
    import ctypes
    cc = native._compiler()
    if cc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp) / "peak.c", Path(tmp) / "peak.so"
        src.write_text(FMA_PEAK_SOURCE)
        flags = ["-O2", "-ffp-contract=fast", "-shared", "-fPIC", *native.arch_flags()]  # as native's build
        done = subprocess.run([cc, *flags, str(src), "-o", str(lib)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} could not build the FMA peak probe: {done.stderr.strip()[-300:]}")
        fn = ctypes.CDLL(str(lib)).fma_chains
        fn.argtypes, fn.restype = [ctypes.c_long, ctypes.c_float], ctypes.c_float
        with ThreadPoolExecutor(threads) as pool:
            def run(n: int) -> None:
                list(pool.map(lambda _: fn(n, 1.0), range(threads)))
            run(rounds // 10)  # every thread started and warm
            best = min(timed(lambda: run(rounds), reps))
    # a multiply and an add per float: 12 chains of 16 floats a round, on each thread
    return 2 * 12 * 16 * rounds * threads / best / 1e9


def block_steps(se: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The floor's two passes and the block's forward and forward + backward (dL/dx and dL/dW)."""
    xg, g, params = x.clone().requires_grad_(), torch.randn_like(x), list(se.parameters())

    def fwd():
        with torch.no_grad():
            return se(x)

    def fwd_bwd():
        return torch.autograd.grad(se(xg), [xg, *params], g)
    return {"mean": lambda: x.mean((2, 3)), "clone": x.clone, "fwd": fwd, "fwd_bwd": fwd_bwd, **fc_products(se, x)}


def fc_products(se: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The FCs' matrix products on their own, by PyTorch's BLAS (sgemm), to price the compute the memory
    floor leaves out: forward W1 z and W2 h; backward dW2 = da^T h, dh = da W2, dW1 = dh^T z, dz = dh W1
    (B x C by C x C/r each: at batch 16 and 2048 channels as many FLOPs as the floor's bytes take time)."""
    w1, w2 = se.fc1.weight.detach(), se.fc2.weight.detach()
    b, c = x.shape[:2]
    z, da = torch.randn(b, c, device=x.device), torch.randn(b, c, device=x.device)
    h = dh = torch.randn(b, w1.shape[0], device=x.device)

    def fwd():
        return z @ w1.t(), h @ w2.t()

    def bwd():
        return da.t() @ h, da @ w2, dh.t() @ z, dh @ w1
    return {"fc_fwd": fwd, "fc_bwd": bwd}


def bench_block(args) -> dict:
    """SE block (released form: FCs with bias, r = 16) alone, forward and forward + backward.

    Floor: forward = one read (squeeze) + one read and one write (scale) = t(mean) + t(clone) of the
    same tensor; backward adds one read of the gradient, one of x and one write of dL/dx = again
    t(mean) + t(clone). That backward count is a lower bound, not a plan: dL/dx = g s + dz / HW needs
    dz, which needs ds = Σ g x over the whole plane first, so a backward that cannot keep g in cache
    between its two passes reads g twice (docs/performance.md, "Target 1 again on the AMD EPYC").
    """
    results = {"dram": bandwidth(2**26, args), "shapes": {}}
    # a bound below which no block can go unless its FCs' products overlap its passes over memory (the squeeze
    # must end before the excitation starts, and it before the scale): floor + the products' FLOPs at this
    # core's best GEMM rate (2048^3 sgemm; measured on the CPU only, where the kernels' products run)
    gflops = sgemm_gflops() if DEVICE.type == "cpu" else None
    results["sgemm_gflops"] = gflops
    for c, hw in SE_SHAPES:
        x = torch.randn(args.batch, c, hw, hw, device=DEVICE)
        se = create_attention("se_released", c).to(DEVICE)
        t = interleave(block_steps(se, x), rounds=args.rounds, iters=args.iters, warmup=args.warmup)
        floor = [m + cl for m, cl in zip(t["mean"], t["clone"], strict=True)]
        nbytes = x.numel() * 4
        # second view, not the target's floor: add the FC weights' traffic (read W forward; read W and
        # write dW backward) priced at this tensor's measured read and copy rates
        w = sum(p.numel() * p.element_size() for p in se.parameters())
        w_fwd = [w / nbytes * m for m in t["mean"]]
        w_bwd = [w / nbytes * cl for cl in t["clone"]]
        results["shapes"][f"{c}x{hw}x{hw}"] = {
            "shape": list(x.shape), "bytes": nbytes, **{f"{k}_ms": median_ms(v) for k, v in t.items()},
            "read_GBps": nbytes / np.median(t["mean"]) / 1e9, "copy_GBps": 2 * nbytes / np.median(t["clone"]) / 1e9,
            "fwd_vs_floor": ratio(t["fwd"], floor), "fwd_bwd_vs_floor": ratio(t["fwd_bwd"], [2 * f for f in floor]),
            "weight_bytes": w,
            "fwd_vs_floor_with_weights": ratio(t["fwd"], [f + a for f, a in zip(floor, w_fwd, strict=True)]),
            "fwd_bwd_vs_floor_with_weights": ratio(t["fwd_bwd"], [2 * f + a + b for f, a, b in
                                                                  zip(floor, w_fwd, w_bwd, strict=True)]),
            # third view, not the target's floor either: the floor plus the FCs' products timed by BLAS
            "fwd_vs_floor_plus_products": ratio(t["fwd"], [f + a for f, a in zip(floor, t["fc_fwd"], strict=True)]),
            "fwd_bwd_vs_floor_plus_products": ratio(t["fwd_bwd"], [2 * f + a + b for f, a, b in zip(
                floor, t["fc_fwd"], t["fc_bwd"], strict=True)]),
        }
        r = results["shapes"][f"{c}x{hw}x{hw}"]
        print(f"{tuple(x.shape)}: mean {r['mean_ms']:.2f} clone {r['clone_ms']:.2f} fwd {r['fwd_ms']:.2f} "
              f"fwd+bwd {r['fwd_bwd_ms']:.2f} ms; fwd/floor {fmt(r['fwd_vs_floor'])}, "
              f"fwd+bwd/floor {fmt(r['fwd_bwd_vs_floor'])}; with FC weights: fwd "
              f"{r['fwd_vs_floor_with_weights']['ratio']:.3f}, "
              f"fwd+bwd {r['fwd_bwd_vs_floor_with_weights']['ratio']:.3f}; FC products (BLAS) fwd {r['fc_fwd_ms']:.2f} "
              f"bwd {r['fc_bwd_ms']:.2f} ms, with them: fwd {r['fwd_vs_floor_plus_products']['ratio']:.3f}, "
              f"fwd+bwd {r['fwd_bwd_vs_floor_plus_products']['ratio']:.3f}")
        if gflops:
            # forward W1 z and W2 h; backward dW2, dh, dW1, dz: each 2 B C C/r FLOPs
            product_flops = 2 * x.shape[0] * se.fc1.weight.numel()
            fwd_ms = 2 * product_flops / gflops / 1e6
            bwd_ms, floor_ms = 2 * fwd_ms, median_ms(floor)
            r["products_at_gemm_rate_ms"] = {"fwd": fwd_ms, "bwd": bwd_ms}
            r["least_fwd_vs_floor"] = (floor_ms + fwd_ms) / floor_ms
            r["least_fwd_bwd_vs_floor"] = (2 * floor_ms + fwd_ms + bwd_ms) / (2 * floor_ms)
            print(f"{tuple(x.shape)}: the products at {gflops:.0f} GFLOP/s take {fwd_ms:.3f} ms forward, {bwd_ms:.3f} "
                  f"backward: no block under {r['least_fwd_vs_floor']:.3f}x its floor forward, "
                  f"{r['least_fwd_bwd_vs_floor']:.3f}x forward + backward unless they overlap its passes")
    return results


# ----------------------------------------------------------------------------- 2./3. networks


class Within(nn.Module):
    """``model`` run within ``context()``: ``unfused`` (the reference path: SE's scale, the addition and the
    ReLU as separate ops) or ``pytorch_ops`` (senet's native unit ends off, PyTorch's ops only, as before the
    native kernels; for resnet50 torchvision's ``bn``, ``+= identity``, ``relu``)."""

    def __init__(self, model: nn.Module, context: Callable[[], contextlib.AbstractContextManager]):
        super().__init__()
        self.model, self.context = model, context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.context():
            return self.model(x)


def planned(frozen: nn.Module) -> nn.Module:
    """``frozen`` (``senet.freeze``'s snapshot), refused where no unit runs from a plan: timing it would time
    the eager forward under another name."""
    if not frozen.planned:
        raise SystemExit(f"senet.freeze planned no unit of {type(frozen.model).__name__} (native kernels: "
                         f"{native.status()['why']}): nothing frozen to time")
    return frozen


def unfused(model: nn.Module) -> Within:
    return Within(model, reference_path)


def pytorch_ops(model: nn.Module) -> Within:
    return Within(model, native.off)


def round_means(subjects: list[Subject], batch: int) -> dict[str, list[float]]:
    """Each subject's mean seconds a call in each round of ``measure`` at ``batch``."""
    return {s.name: [float(np.mean(r)) for r in s.times[batch]] for s in subjects}


def run_subjects(models: dict[str, nn.Module], cfg: BenchConfig, batch: int) -> dict:
    """``senet.bench.measure`` over named models; ratios of each to the last one (the baseline)."""
    subjects = [Subject(n, m.to(DEVICE), (3, 224, 224)) for n, m in models.items()]
    res = measure(subjects, batch, cfg, DEVICE)
    base = subjects[-1]
    per_round = round_means(subjects, batch)
    out = {"per_call": res, "per_round_s": per_round, "ratio_to_" + base.name: {
        s.name: ratio(per_round[s.name], per_round[base.name]) for s in subjects[:-1]}}
    print(f"  batch {batch} {'train' if cfg.train else 'infer'}: " + ", ".join(
        f"{s.name} {res[s.name]['p50_ms']:.1f} ms" for s in subjects) + " | " + ", ".join(
        f"{n}/{base.name} {fmt(r)}" for n, r in out["ratio_to_" + base.name].items()))
    return out


def bench_resnet(args) -> dict:
    """se_resnet50 (fast path, default) and the same weights unfused, vs resnet50; in each of ``--modes``
    (default eager; keys without a prefix are eager, others are prefixed with their mode)."""
    results = {}
    for mode in args.modes or ["eager"]:
        torch._dynamo.reset()  # compiled code is shared by module instances: a mode must not reuse another's
        se, r50 = create_model("se_resnet50"), create_model("resnet50")
        if mode == "frozen":  # senet.freeze: both networks' checks made once (inference only), the pair alone
            models = {"se_resnet50": planned(freeze(se)), "resnet50": planned(freeze(r50))}
        else:
            models = {"se_resnet50": se, "se_resnet50_unfused": unfused(copy.deepcopy(se)), "resnet50": r50}
        if mode == "channels_last":
            models = {n: m.to(memory_format=torch.channels_last) for n, m in models.items()}
        # eager inference is where the native unit ends run: the same networks on PyTorch's ops beside them
        ops = {"se_resnet50_pytorch_ops": pytorch_ops(se), "resnet50_pytorch_ops": pytorch_ops(r50)}
        prefix = "" if mode == "eager" else f"{mode}_"
        for key, cfg, batch in network_cases(args, mode):
            if mode != "eager":
                print(f"{mode}:")
            subjects = models
            if args.pair:
                subjects = {"se_resnet50": models["se_resnet50"], "resnet50": models["resnet50"]}
            elif mode == "eager" and not cfg.train:
                subjects = {"se_resnet50": se, **ops, "se_resnet50_unfused": models["se_resnet50_unfused"],
                            "resnet50": r50}
            with inductor_freezing(mode == "compile_frozen"):
                res = results[prefix + key] = run_subjects(subjects, cfg, batch)
            if mode == "frozen":
                res["planned_units"] = {n: m.planned for n, m in subjects.items()}
            r = res["per_round_s"]
            if mode in ("eager", "frozen") and not cfg.train:
                res["se_traffic_floor"] = cost_against_floor(se, batch, r["se_resnet50"], r["resnet50"])
            if "resnet50_pytorch_ops" in subjects:
                res["vs_resnet50_pytorch_ops"] = {n: ratio(r[n], r["resnet50_pytorch_ops"])
                                                  for n in ("se_resnet50", "se_resnet50_pytorch_ops")}
                print("  vs resnet50_pytorch_ops: " + ", ".join(
                    f"{n} {fmt(v)}" for n, v in res["vs_resnet50_pytorch_ops"].items()))
    return results


def read_GBps(nbytes: int, reps: int = 30) -> float:
    """How fast this core reads ``nbytes`` that it has just read (``sum``, median of ``reps``): the cache's
    rate where they fit, memory's where they do not."""
    x = torch.ones(max(1, nbytes // 4), device=DEVICE)
    x.sum()
    seconds = window(x.sum, reps) if DEVICE.type == "cuda" else float(np.median(timed(x.sum, reps)))
    return x.numel() * 4 / seconds / 1e9


def se_traffic_floor(se: nn.Module, batch: int, memory_bytes: int = 2**28) -> dict:
    """A lower bound on what SE adds to a 224x224 inference at ``batch``: the bytes only SE moves, each priced
    at the fastest rate this machine reads them. The FCs' weights (read once a forward, and not still cached
    from the last: the convolutions' ~100 MB of weights pass through the caches in between) at memory's rate;
    per SE unit the squeeze's read of the smaller of its input ``c`` and the last 1x1 conv's input and weight
    (``native._through_conv``) at the rate of a just-read tensor of that size. It leaves out everything not
    traffic: the products, the checks and calls."""
    units = []

    def record(conv, inputs, out):
        units.append((out.numel(), inputs[0].numel() + conv.weight.numel()))

    probe = copy.deepcopy(se)
    fc_bytes = 0
    for m in probe.modules():
        attn = getattr(m, "attn", None)
        if attn is not None and hasattr(m, "conv3") and any(True for _ in attn.parameters()):
            fc_bytes += sum(p.numel() * p.element_size() for p in attn.parameters())
            m.conv3.register_forward_hook(record)
    with torch.inference_mode():
        probe(torch.zeros(batch, 3, 224, 224, device=DEVICE))
    memory = read_GBps(memory_bytes)  # far larger than the caches
    squeeze = [4 * min(c, through) for c, through in units]
    rates = {n: read_GBps(n) for n in set(squeeze)}
    weights_ms, squeeze_ms = 1e3 * fc_bytes / memory / 1e9, sum(1e3 * n / rates[n] / 1e9 for n in squeeze)
    return {"units": len(units), "weight_bytes": fc_bytes, "memory_read_GBps": memory, "weights_ms": weights_ms,
            "squeeze_bytes": sum(squeeze), "squeeze_read_GBps": {str(n): r for n, r in sorted(rates.items())},
            "squeeze_ms": squeeze_ms, "floor_ms": weights_ms + squeeze_ms}


def cost_against_floor(se: nn.Module, batch: int, with_se: list[float], without: list[float]) -> dict:
    """``se_traffic_floor`` beside what SE costs (median paired per-round difference of the two networks)."""
    floor = se_traffic_floor(se, batch)
    floor["se_cost_ms"] = cost = paired_difference(with_se, without)
    floor["floor_vs_resnet50"] = floor["floor_ms"] / median_ms(without)
    floor["cost_vs_floor"] = cost["ms"] / floor["floor_ms"] if floor["floor_ms"] else None
    if floor["floor_ms"]:
        print(f"  SE's cost {cost['ms']:.2f} ms [{cost['ci_low']:.2f}, {cost['ci_high']:.2f}] against its traffic "
              f"floor {floor['floor_ms']:.2f} ms (FC weights {floor['weights_ms']:.2f} at "
              f"{floor['memory_read_GBps']:.1f} GB/s, squeeze {floor['squeeze_ms']:.2f}): "
              f"{floor['cost_vs_floor']:.2f}x; the floor is "
              f"{100 * floor['floor_vs_resnet50']:.2f}% of resnet50")
    return floor


def inductor_freezing(on: bool):
    """Inductor's freezing (parameters as constants: BN folded into convs, weights prepacked) while ``on``."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=on)


def network_cases(args, mode: str = "eager") -> list[tuple[str, BenchConfig, int]]:
    """(results key, config, batch) for each ``--infer-batch`` and ``--train-batch`` of a network target.
    ``compile_frozen`` (inductor's freezing: BN folded into the convs, weights prepacked) is inference only."""
    opts = {"channels_last": mode == "channels_last", "compile": mode in ("compile", "compile_frozen")}
    infer = [(f"infer_b{b}", BenchConfig("se_resnet50", "resnet50", warmup=args.warmup, rounds=args.rounds,
                                         iters=args.iters, **opts), b) for b in args.infer_batch]
    train = [(f"train_b{b}", BenchConfig("se_resnet50", "resnet50", train=True, warmup=1, rounds=args.train_rounds,
                                         iters=1, **opts), b) for b in args.train_batch]
    if mode in ("compile_frozen", "frozen") and train:
        print(f"{mode}: inference only (the weights are frozen); training skipped")
        train = []
    return infer + train


class Ablated(nn.Module):
    """se_resnet50 whose SE unit ends (inference) do only part of SE's work, to price each part:

    ``add``      ``relu(x + shortcut)`` in place: the plain unit's work in the SE network's layout
    ``scale``    + the scale by a fixed ``s`` (``addcmul`` instead of ``add``)
    ``squeeze``  + the squeeze (``mean_hw x``, or through the last 1x1 conv as the fast path does)
    and the unablated network adds the excitation (two FCs, ReLU, sigmoid) to that. These are the parts
    of the PyTorch-ops path: the native unit ends (``senet.layers.native``), one call each, are off here.
    """

    def __init__(self, model: nn.Module, part: str):
        super().__init__()
        self.model, self.part, self.fixed = model, part, {}

    def _scale(self, attn, x, shortcut, *, z=None, inplace=False):
        s = self.fixed.get((id(attn), x.shape[0]))
        if s is None:  # made once per unit and batch (setdefault would build a tensor on every call)
            s = self.fixed[(id(attn), x.shape[0])] = torch.full((x.shape[0], x.shape[1], 1, 1), 0.5,
                                                                         dtype=x.dtype, device=x.device)
        return torch.addcmul(shortcut, x, s, out=x).relu_()

    def _squeeze(self, attn, x, shortcut, *, z=None, inplace=False):
        if z is None:
            x.mean((2, 3), keepdim=True)
        return self._scale(attn, x, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from senet.models import _attn

        ends = {"add": lambda attn, x, sc, **kw: x.add_(sc).relu_(), "scale": self._scale, "squeeze": self._squeeze}
        saved = _attn.infer_scale_add_relu, _attn.squeeze_through_conv
        _attn.infer_scale_add_relu = ends[self.part]
        if self.part != "squeeze":
            _attn.squeeze_through_conv = lambda *a: None
        try:
            with native.off():
                return self.model(x)
        finally:
            _attn.infer_scale_add_relu, _attn.squeeze_through_conv = saved


def bench_decompose(args) -> dict:
    """Where se_resnet50's inference overhead over resnet50 goes on PyTorch's ops (the native unit ends
    off): the same se_resnet50 with its SE unit ends ablated step by step (``Ablated``), all interleaved
    with resnet50; the steps' paired per-round differences price the structure (no SE work), the scale,
    the squeeze and the excitation."""
    se = create_model("se_resnet50")
    models = {"se_resnet50": pytorch_ops(se), **{f"se_only_{p}": Ablated(se, p) for p in ("squeeze", "scale", "add")},
              "resnet50": pytorch_ops(create_model("resnet50"))}
    results = {}
    for batch in args.infer_batch:
        cfg = BenchConfig("se_resnet50", "resnet50", warmup=args.warmup, rounds=args.rounds, iters=args.iters)
        res = run_subjects(models, cfg, batch)
        steps = {"structure": ("se_only_add", "resnet50"), "scale_vs_add": ("se_only_scale", "se_only_add"),
                 "squeeze": ("se_only_squeeze", "se_only_scale"), "excitation": ("se_resnet50", "se_only_squeeze"),
                 "total": ("se_resnet50", "resnet50")}
        rounds = res["per_round_s"]
        res["parts_ms"] = {k: paired_difference(rounds[a], rounds[b]) for k, (a, b) in steps.items()}
        print("  parts (median paired per-round differences, ms, 95% CI): " + ", ".join(
            f"{k} {v['ms']:+.2f} [{v['ci_low']:+.2f}, {v['ci_high']:+.2f}]" for k, v in res["parts_ms"].items()))
        results[f"infer_b{batch}"] = res
    return results


class InPlaceClock:
    """Inside a network's forward, the time spent in its convolutions (``nn.Conv2d._conv_forward``) and in the
    native kernels' calls (``senet.layers.native``'s library), and how many calls of each: with ``total`` the
    forward's time, ``total - conv - native`` is everything else (Python, module calls, the checks before each
    kernel). Both networks make as many timed calls (same convolutions, one kernel call per unit end and per
    conv-BN-ReLU), so what the timers add cancels in their differences."""

    def __init__(self):
        self.ns = {"conv": 0, "native": 0}
        self.calls = {"conv": 0, "native": 0}

    def reset(self) -> None:
        for d in (self.ns, self.calls):
            d.update(conv=0, native=0)

    def _timed(self, part: str, fn: Callable) -> Callable:
        ns, calls, clock = self.ns, self.calls, time.perf_counter_ns

        def call(*a):
            t0 = clock()
            out = fn(*a)
            ns[part] += clock() - t0
            calls[part] += 1
            return out
        return call

    @contextlib.contextmanager
    def installed(self):
        lib = native.library()
        if lib is None:
            raise SystemExit(f"inplace: the native kernels are not available here ({native.status()['why']})")
        proxy = type("TimedKernels", (), {n: staticmethod(self._timed("native", getattr(lib, n)))
                                          for n in native._SIGNATURES})()
        conv_forward = nn.Conv2d._conv_forward
        timed_conv = self._timed("conv", conv_forward)
        nn.Conv2d._conv_forward = lambda conv, x, w, b: timed_conv(conv, x, w, b)
        native._state["lib"] = proxy
        try:
            yield self
        finally:
            nn.Conv2d._conv_forward = conv_forward
            native._state["lib"] = lib


def bench_inplace(args) -> dict:
    """Where se_resnet50's inference overhead over resnet50 goes on the default (native) path, timed inside
    the forward (``InPlaceClock``): the convolutions (what SE's passes do to the caches they leave), the native
    kernels (SE's squeeze, excitation and scale against the plain unit end) and the rest (Python: the checks
    and calls around each kernel). Both networks interleaved in one process; medians of the paired per-round
    differences."""
    if DEVICE.type != "cpu":
        raise SystemExit("inplace: the native kernels run on the CPU; use --device cpu")
    models = {"se_resnet50": create_model("se_resnet50").eval(), "resnet50": create_model("resnet50").eval()}
    clock = InPlaceClock()
    results = {}
    for batch in args.infer_batch:
        x = torch.randn(batch, 3, 224, 224)
        rounds: dict[str, dict[str, list[float]]] = {n: {"total": [], "conv": [], "native": []} for n in models}
        calls: dict[str, dict[str, int]] = {}
        with torch.inference_mode(), clock.installed():
            for _ in range(args.warmup):
                for m in models.values():
                    m(x)
            for r in range(args.rounds):
                for name in models if r % 2 == 0 else list(models)[::-1]:
                    clock.reset()
                    t0 = time.perf_counter_ns()
                    for _ in range(args.iters):
                        models[name](x)
                    total = time.perf_counter_ns() - t0
                    for part, ns in (("total", total), *clock.ns.items()):
                        rounds[name][part].append(ns / args.iters / 1e9)
                    calls[name] = {k: v // args.iters for k, v in clock.calls.items()}
        for parts in rounds.values():
            parts["other"] = [t - c - k for t, c, k in zip(parts["total"], parts["conv"], parts["native"],
                                                                 strict=True)]
        se, base = rounds["se_resnet50"], rounds["resnet50"]
        res = {"per_round_s": rounds, "calls_per_forward": calls,
               "median_ms": {n: {p: median_ms(v) for p, v in parts.items()} for n, parts in rounds.items()},
               "se_cost_ms": {p: paired_difference(se[p], base[p]) for p in se},
               "ratio_to_resnet50": ratio(se["total"], base["total"])}
        parts = ", ".join(f"{k} {v['ms']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]"
                          for k, v in res["se_cost_ms"].items())
        print(f"inplace batch {batch}: timed calls per forward {calls}; SE's cost (median paired per-round "
              f"differences, ms, 95% CI): {parts}; ratio {fmt(res['ratio_to_resnet50'])}")
        results[f"infer_b{batch}"] = res
    return results


def timm_pair() -> dict[str, nn.Module]:
    """Ours and timm's seresnet50 with the same weights (timm's mapped onto ours by senet.convert)."""
    import timm

    from senet.convert import load_into, to_senet_names

    theirs = timm.create_model("seresnet50")
    ours = create_model("se_resnet50")
    load_into(ours, to_senet_names(theirs.state_dict(), "timm_resnet"))
    with torch.no_grad():
        x = torch.randn(2, 3, 224, 224)
        diff = (ours.eval()(x) - theirs.eval()(x)).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"ours and timm's seresnet50 differ by {diff:.2e} with the same weights")
    return {"senet_se_resnet50": ours, "timm_seresnet50": theirs}


def bench_timm(args) -> dict:
    if "frozen" in (args.modes or []):
        raise SystemExit("timm: --modes frozen is for the resnet target (senet.freeze has no timm counterpart)")
    results = {}
    for mode in args.modes or ["eager", "channels_last", "compile"]:
        torch._dynamo.reset()
        pair = timm_pair()
        if mode == "channels_last":
            pair = {n: m.to(memory_format=torch.channels_last) for n, m in pair.items()}
        cases = [(False, b) for b in args.infer_batch[:1]] + [(True, b) for b in args.train_batch[:1]]
        if mode == "compile_frozen":
            cases = [c for c in cases if not c[0]]  # freezing is for inference
        for train, batch in cases:  # --infer-batch / --train-batch with no value: skip that step
            cfg = BenchConfig("se_resnet50", "timm_seresnet50", channels_last=mode == "channels_last",
                              compile=mode in ("compile", "compile_frozen"), train=train,
                              warmup=2 if train else args.warmup, rounds=args.train_rounds if train else args.rounds,
                              iters=1 if train else args.iters)
            print(f"{mode}:")
            with inductor_freezing(mode == "compile_frozen"):
                results[f"{mode}_{'train' if train else 'infer'}_b{batch}"] = run_subjects(pair, cfg, batch)
    return results


def bench_fc(args) -> dict:
    """The issue's "Linear vs 1x1 conv FCs" in eager PyTorch: se_resnet50 with its SE FCs as ``nn.Linear``
    (the paper's form, the default) and as 1x1 ``nn.Conv2d`` (timm's, MobileNetV3's), same weights,
    vs resnet50, interleaved; inference and training step."""
    from senet.convert import load_into

    se = create_model("se_resnet50")
    se_conv = create_model("se_resnet50", attn_kwargs={"fc": "conv"})
    load_into(se_conv, se.state_dict())  # Linear (C, h) -> 1x1 conv (C, h, 1, 1): same weights
    with torch.no_grad():
        x = torch.randn(2, 3, 224, 224)
        diff = (se.eval()(x) - se_conv.eval()(x)).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"Linear and 1x1-conv FCs differ by {diff:.2e} with the same weights")
    models = {"se_resnet50_linear_fc": se, "se_resnet50_conv_fc": se_conv, "resnet50": create_model("resnet50")}
    results = {}
    for key, cfg, batch in network_cases(args):
        results[key] = res = run_subjects(models, cfg, batch)
        res["conv_fc_vs_linear_fc"] = ratio(res["per_round_s"]["se_resnet50_conv_fc"],
                                            res["per_round_s"]["se_resnet50_linear_fc"])
        print(f"  conv FCs / Linear FCs: {fmt(res['conv_fc_vs_linear_fc'])}")
    return results


def pytorch_pooling(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose senet ``MaxPool2d`` modules are ``nn.MaxPool2d`` with the same settings: the network
    pooling with PyTorch's kernel, as before ``senet.layers.pool`` (same weights, same outputs)."""
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if type(m) is MaxPool2d:
            plain = nn.MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, m.return_indices, m.ceil_mode)
            model.set_submodule(name, plain)
    return model


def pool_steps(pools: dict[str, nn.Module], x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """``<name>_forward`` (under ``no_grad``) and ``<name>_forward_backward`` of each pooling module on ``x``."""
    xg = x.clone().requires_grad_()
    g = torch.randn_like(pools[next(iter(pools))](x.detach()))

    def forward(pool):
        def step():
            with torch.no_grad():
                return pool(x)
        return step

    def training(pool):
        def step():
            xg.grad = None
            pool(xg).backward(g)
        return step

    return {f"{n}_{kind}": make(pool) for kind, make in (("forward", forward), ("forward_backward", training))
            for n, pool in pools.items()}


def bench_pool(args) -> dict:
    """Max pooling through senet's native kernel (``senet.layers.pool.MaxPool2d``) against PyTorch's NCHW kernel:
    ResNet's stem pooling alone (3x3, stride 2, padding 1, 64 x 112 x 112 per image; forward under ``no_grad``
    and forward + backward, at each ``--infer-batch``), then resnet50 and se_resnet50 with each, interleaved
    (``--infer-batch``, ``--train-batch``)."""
    results = {}
    ours, theirs = MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1)
    for batch in args.infer_batch:
        x = torch.randn(batch, 64, 112, 112, device=DEVICE).relu_()  # a ReLU's output, as in the stem
        with torch.no_grad():
            same = torch.equal(ours(x), theirs(x))
        steps = pool_steps({"senet": ours, "pytorch": theirs}, x)
        t = interleave(steps, rounds=args.rounds, iters=args.iters, warmup=args.warmup)
        res = results[f"stem_pool_b{batch}"] = {
            "shape": [batch, 64, 112, 112], "same_output": same, "median_ms": {n: median_ms(v) for n, v in t.items()},
            "senet_over_pytorch": {k: ratio(t[f"senet_{k}"], t[f"pytorch_{k}"])
                                   for k in ("forward", "forward_backward")}}
        print(f"stem pooling, batch {batch}: " + ", ".join(f"{n} {v:.2f} ms" for n, v in res["median_ms"].items())
              + " | senet / pytorch: " + ", ".join(f"{k} {fmt(r)}" for k, r in res["senet_over_pytorch"].items()))
    nets = {}
    for name in ("se_resnet50", "resnet50"):
        nets[name] = create_model(name)
        nets[name + "_pytorch_pool"] = pytorch_pooling(nets[name])
    for key, cfg, batch in network_cases(args):
        res = results[key] = run_subjects(nets, cfg, batch)
        r = res["per_round_s"]
        res["senet_pool_vs_pytorch_pool"] = {n: ratio(r[n], r[n + "_pytorch_pool"])
                                             for n in ("se_resnet50", "resnet50")}
        res["se_over_plain"] = {p: ratio(r["se_resnet50" + p], r["resnet50" + p]) for p in ("", "_pytorch_pool")}
        print("  senet pooling / PyTorch's: " + ", ".join(
            f"{n} {fmt(v)}" for n, v in res["senet_pool_vs_pytorch_pool"].items()) + " | se_resnet50 / resnet50: "
            + ", ".join(f"{p or 'senet pooling'} {fmt(v)}" for p, v in res["se_over_plain"].items()))
    return results


# ----------------------------------------------------------------------------- 4. memory, 5. onnx


def bench_memory(args) -> dict:
    """Bytes autograd saves in one training forward at 224x224 (senet.bench.activation_bytes); in each of
    ``--modes`` eager (default) and compile (keys prefixed ``compile_``: what the compiled forward saves for the
    compiled backward, after a first step compiled both)."""
    import timm

    modes = args.modes or ["eager"]
    if other := [m for m in modes if m not in ("eager", "compile")]:
        raise SystemExit(f"memory: --modes {' '.join(other)}: this target measures eager and compile only")
    x = torch.randn(args.train_batch[0], 3, 224, 224, device=DEVICE)
    out, pairs = {}, []
    for mode in modes:
        torch._dynamo.reset()
        nets = {"resnet50": create_model("resnet50"), "se_resnet50": create_model("se_resnet50"),
                "timm_resnet50": timm.create_model("resnet50"), "timm_seresnet50": timm.create_model("seresnet50")}
        prefix = "" if mode == "eager" else "compile_"
        for name, net in nets.items():
            net = net.to(DEVICE)
            if mode == "compile":
                net = torch.compile(net)
                net(x).sum().backward()  # compiled (forward and backward) before the forward that is counted
            out[prefix + name] = activation_bytes(net, x)
        if mode == "eager":
            with reference_path():
                out["se_resnet50_unfused"] = activation_bytes(nets["se_resnet50"], x)
            pairs.append(("se_resnet50_unfused", "resnet50"))
        pairs += [(prefix + "se_resnet50", prefix + "resnet50"), (prefix + "timm_seresnet50", prefix + "timm_resnet50"),
                  (prefix + "se_resnet50", prefix + "timm_seresnet50")]
    res = {"batch": x.shape[0], "bytes": out, "se_over_baseline": {f"{a} / {b}": out[a] / out[b] - 1 for a, b in pairs}}
    for k, v in out.items():
        print(f"{k}: {v / 2**20:.1f} MiB")
    print({k: f"{100 * v:+.2f}%" for k, v in res["se_over_baseline"].items()})
    return res


def bench_onnx(args) -> dict:
    """se_resnet50, batch 1, 224x224: onnxruntime session (threads = torch's) vs PyTorch eager; beside it
    the same weights with 1x1-conv FCs in onnxruntime, and resnet50 both ways (what the convolutions allow)."""
    from senet.convert import load_into
    from senet.export import temp_onnx_session

    se = create_model("se_resnet50").eval()
    se_conv = create_model("se_resnet50", attn_kwargs={"fc": "conv"}).eval()
    load_into(se_conv, se.state_dict())  # Linear (C, h) -> 1x1 conv (C, h, 1, 1): same weights
    plain = create_model("resnet50").eval()
    x = torch.randn(1, 3, 224, 224)

    graphs = {}

    def ort(model, name):
        sess, graphs[name] = temp_onnx_session(model, (3, 224, 224), optimized_ops=True)
        return onnx_step(sess, {sess.get_inputs()[0].name: x.numpy()})
    steps = {"torch_eager": make_step(se, x, train=False, runtime="torch", input_size=(3, 224, 224)),
             "onnxruntime": ort(se, "se_resnet50"), "onnxruntime_conv_fc": ort(se_conv, "se_resnet50_conv_fc"),
             "resnet50_torch_eager": make_step(plain, x, train=False, runtime="torch", input_size=(3, 224, 224)),
             "resnet50_onnxruntime": ort(plain, "resnet50")}
    t = interleave(steps, rounds=args.rounds, iters=args.iters, warmup=args.warmup)
    # the compute floor: se_resnet50's multiply-adds at the float32 GEMM rate (what ORT's convolutions can at best
    # run at), and, strictly, at the peak FMA rate, both on torch's threads (onnxruntime runs as many); the target
    # needs onnxruntime <= torch eager / 1.8
    nt = torch.get_num_threads()
    gflops, peak = sgemm_gflops(), fma_peak_gflops(threads=nt)
    floor_ms = 2 * count_macs(se) / gflops / 1e6
    peak_floor_ms = 2 * count_macs(se) / peak / 1e6 if peak else None
    out = {**{f"{k}_ms": median_ms(v) for k, v in t.items()},
           "sgemm_gflops": gflops, "se_resnet50_compute_floor_ms": floor_ms, "fma_peak_gflops": peak,
           "fma_peak_threads": nt, "se_resnet50_peak_floor_ms": peak_floor_ms, "optimized_graph_ops": graphs,
           "target_onnxruntime_ms": median_ms(t["torch_eager"]) / 1.8,
           "speedup_torch_over_ort": ratio(t["torch_eager"], t["onnxruntime"]),
           "speedup_torch_over_ort_conv_fc": ratio(t["torch_eager"], t["onnxruntime_conv_fc"]),
           "resnet50_speedup_torch_over_ort": ratio(t["resnet50_torch_eager"], t["resnet50_onnxruntime"]),
           "ort_se_overhead": ratio(t["onnxruntime"], t["resnet50_onnxruntime"]),
           "torch_se_overhead": ratio(t["torch_eager"], t["resnet50_torch_eager"])}
    print(", ".join(f"{k} {median_ms(v):.1f} ms" for k, v in t.items()))
    for name, ops in graphs.items():
        print(f"{name}: onnxruntime's optimized graph: {ops}")
    print(f"float32 GEMM {gflops:.0f} GFLOP/s -> se_resnet50 compute floor {floor_ms:.1f} ms; "
          + (f"peak FMA rate {peak:.0f} GFLOP/s ({nt} threads) -> {peak_floor_ms:.1f} ms; " if peak else "")
          + f"the target needs onnxruntime <= {out['target_onnxruntime_ms']:.1f} ms")
    for k, v in out.items():
        if isinstance(v, dict) and "ratio" in v:
            print(f"{k}: {fmt(v)}")
    return out


def check_device(parser: argparse.ArgumentParser, args) -> torch.device:
    """``--device`` as a torch.device, or a usage error that names what is wrong."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r}: not a device; use cpu or cuda[:N]")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r}: this benchmark runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device!r}: torch {torch.__version__} sees no CUDA device here; use --device cpu")
    if device.type == "cuda" and args.target in ("onnx", "all"):
        parser.error("the onnx target measures onnxruntime on the CPU; run it with --device cpu")
    return device


# freeze's default networks: ImageNet's ResNet-50 pair and two CIFAR pairs (small units: the checks weigh more)
FREEZE_NETS = ["se_resnet50", "resnet50", "se_resnet20", "resnet20", "se_resnet110", "resnet110"]


def net_groups(names: list[str]) -> list[list[str]]:
    """``names`` in groups measured together: an SE network with its plain one (``se_X`` beside ``X``), the rest
    alone; in the order given."""
    groups, done = [], set()
    for n in names:
        if n in done:
            continue
        mate = n.removeprefix("se_") if n.startswith("se_") else "se_" + n
        group = [n, mate] if mate in names and mate not in done else [n]
        groups.append(sorted(group, key=lambda g: not g.startswith("se_")))
        done.update(group)
    return groups


def bench_freeze(args) -> dict:
    """``senet.freeze`` against the eager model, inference at each ``--infer-batch``: every network of
    ``--nets`` eager and frozen, interleaved with its SE or plain mate (one ``measure`` per group): frozen /
    eager per network, and for a pair SE's share (``se_X`` / ``X``) eager and frozen."""
    if DEVICE.type != "cpu":
        raise SystemExit(f"freeze: senet.freeze plans CPU inference; got --device {DEVICE}")
    subjects: dict[str, list[Subject]] = {}
    for name in args.nets:  # all built (and refused, naming the network) before anything is timed
        torch.manual_seed(0)
        try:
            model, shape = create_model(name).eval(), model_info(name).input_size
            frozen = planned(freeze(model))
        except (KeyError, TypeError, ValueError) as err:
            raise SystemExit(f"freeze: --nets {name}: {err}") from err
        subjects[name] = [Subject(name, model, shape), Subject(name + "_frozen", frozen, shape)]
    results: dict = {}
    cfg = BenchConfig(args.nets[0], args.nets[0], warmup=args.warmup, rounds=args.rounds, iters=args.iters)
    for batch in args.infer_batch:
        for group in net_groups(args.nets):
            timed_here = [s for name in group for s in subjects[name]]
            res = measure(timed_here, batch, cfg, DEVICE)
            per_round = round_means(timed_here, batch)
            # the ratios as (numerator, denominator) rounds' names, so that --processes and --pool pool them too
            pairs = {"frozen_to_eager": {n: [n + "_frozen", n] for n in group}}
            if len(group) == 2:
                se, plain = group
                pairs["se_share"] = {"eager": [se, plain], "frozen": [se + "_frozen", plain + "_frozen"]}
            entry = results[f"infer_b{batch} {' '.join(group)}"] = {
                "per_call": res, "per_round_s": per_round,
                "planned_units": {n: subjects[n][1].model.planned for n in group}, "ratio_pairs": pairs,
                **{key: {k: ratio(per_round[a], per_round[b]) for k, (a, b) in spec.items()}
                   for key, spec in pairs.items()}}
            line = ", ".join(f"{n} {res[n]['p50_ms']:.2f} -> {res[n + '_frozen']['p50_ms']:.2f} ms "
                             f"({fmt(entry['frozen_to_eager'][n])})" for n in group)
            if "se_share" in entry:
                line += " | " + ", ".join(f"{se}/{plain} {k} {fmt(v)}" for k, v in entry["se_share"].items())
            print(f"  batch {batch} frozen / eager: {line}")
    return results


TARGETS = {"block": bench_block, "resnet": bench_resnet, "decompose": bench_decompose,
           "inplace": bench_inplace, "timm": bench_timm,
           "fc": bench_fc, "pool": bench_pool, "memory": bench_memory, "onnx": bench_onnx, "freeze": bench_freeze}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", choices=[*TARGETS, "all"])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (onnx: cpu only)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch (and onnxruntime) threads, same for all sides (1: see docs/performance.md)")
    p.add_argument("--batch", type=int, default=16, help="block: batch of the SE activations")
    p.add_argument("--infer-batch", type=int, nargs="*", default=[1, 16], help="none: skip inference")
    p.add_argument("--train-batch", type=int, nargs="*", default=[16], help="none: skip training")
    p.add_argument("--tag", default="", help="suffix of the results file name")
    p.add_argument("--pair", action="store_true",
                   help="resnet: se_resnet50 and resnet50 only (more rounds in the same time)")
    p.add_argument("--modes", nargs="+", choices=["eager", "channels_last", "compile", "compile_frozen", "frozen"],
                   help="timm (default: eager channels_last compile), resnet and memory (default: eager; memory: "
                        "eager, compile); compile_frozen: torch.compile with inductor's freezing, inference only; "
                        "frozen (resnet): senet.freeze, inference only")
    p.add_argument("--nets", nargs="+", default=FREEZE_NETS, metavar="NAME",
                   help="freeze: senet's ResNet-family networks (se_X beside X is also timed as a pair)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--train-rounds", type=int, default=6, help="rounds of one training step each")
    p.add_argument("--processes", type=int, default=1,
                   help="resnet, timm, freeze: run the target in this many fresh processes, one after another, "
                        "--rounds each, and pool them (intervals resample processes, then rounds)")
    p.add_argument("--pool", nargs="+", metavar="FILE",
                   help="resnet, timm, freeze: measure nothing; pool these results files of the target (single runs or "
                        "--processes runs) as if their processes had been one run")
    p.add_argument("--reuse-freed-memory", action="store_true",
                   help="first tell glibc to keep freed memory (senet.allocator, as senet train does on CPU; "
                        "recorded under device.allocator)")
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)  # one of --processes' runs writes here
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = check_device(p, args)
    if args.pool:
        if args.target not in POOLED_TARGETS or args.processes != 1:
            p.error(f"--pool: pools results files of the resnet, timm or freeze target, alone (got {args.target!r}"
                    f"{', --processes ' + str(args.processes) if args.processes != 1 else ''})")
        return pool_files(p, args)
    if args.processes < 1:
        p.error(f"--processes {args.processes}: give 1 (this process) or more")
    if args.processes > 1:
        if args.target not in POOLED_TARGETS:
            p.error(f"--processes {args.processes}: only the resnet, timm and freeze targets pool processes; "
                    f"run {args.target} with --processes 1")
        if min(args.rounds, args.train_rounds) < 2:
            p.error(f"--rounds {args.rounds}, --train-rounds {args.train_rounds}: each process needs >= 2 of each "
                    "to pair")
        return run_processes(args, argv)
    torch.set_num_threads(args.threads)
    if args.reuse_freed_memory:
        print("allocator:", allocator.reuse_freed_memory()["why"])
    for target in TARGETS if args.target == "all" else [args.target]:
        load = os.getloadavg()
        torch.manual_seed(0)
        results = TARGETS[target](args)
        print("wrote", save(target, {"target": target, **vars(args)}, results, load, args.child_out))


if __name__ == "__main__":
    main()
