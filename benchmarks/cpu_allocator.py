"""What ``senet.allocator.reuse_freed_memory`` (glibc keeping freed memory; ``senet train``'s CPU default) does to
a CPU training step (or, ``--infer``, an inference forward): step time, page faults, system time and peak resident
memory, with glibc's default and with it, for each network (default: se_resnet50 and resnet50, 224x224, batch 16,
SGD with momentum, random data).

The setting is process-wide, so each side runs in its own fresh process: ``--pairs K`` pairs of processes, one
after another (never side by side), the order within a pair alternating (default first, then reuse first, ...).
In each process the networks' steps alternate round by round. Ratios: reuse / default of each network's median
step, per pair, with a bootstrap interval over pairs (``senet.bench.paired_ratio_ci``); and within each side,
se_resnet50 / resnet50 over its processes' rounds (issue 8's training-step target, ``clustered_ratio_ci``).

    python benchmarks/cpu_allocator.py --pairs 4 --steps 5 --threads 1 --tag amd_s22
    python benchmarks/cpu_allocator.py --infer --batch 1 --pairs 4 --steps 40 --warmup 5 --threads 1 --tag amd_s22

With ``--infer`` a step is one forward under ``inference_mode`` (results ``cpu_allocator_infer_*.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from senet import allocator, create_model
from senet.bench import clustered_ratio_ci, paired_ratio_ci
from senet.evaluate import provenance, write_json

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("default", "reuse")


def make_step(args, nets: dict) -> Callable[[str], None]:
    """``--infer``: a forward under ``inference_mode`` (eval mode); else a training step (SGD with momentum)."""
    x, y = torch.randn(args.batch, 3, args.image_size, args.image_size), torch.randint(0, 1000, (args.batch,))
    if args.infer:
        for m in nets.values():
            m.eval()

        def forward(name):
            with torch.inference_mode():
                nets[name](x)
        return forward
    opts = {n: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for n, m in nets.items()}

    def step(name):
        opts[name].zero_grad(set_to_none=True)
        logits = nets[name](x)
        F.cross_entropy(logits, y % logits.shape[1]).backward()
        opts[name].step()
    return step


def child(args) -> dict:
    """One process: ``args.child`` is the allocator side; every network's step, rounds alternating."""
    state = allocator.reuse_freed_memory() if args.child == "reuse" else allocator.state()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    nets = {n: create_model(n) for n in args.models}
    step = make_step(args, nets)

    for _ in range(args.warmup):
        for n in nets:
            step(n)
    times = {n: [] for n in nets}
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for r in range(args.steps):
        for n in list(nets) if r % 2 == 0 else list(nets)[::-1]:
            t = time.perf_counter()
            step(n)
            times[n].append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    steps = args.steps * len(nets)
    return {"mode": args.child, "allocator": state, "step_s": times,
            "minor_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
            "system_s_per_step": (r1.ru_stime - r0.ru_stime) / steps,
            "user_s_per_step": (r1.ru_utime - r0.ru_utime) / steps,
            "peak_rss_mb": r1.ru_maxrss / 1024}  # Linux: KiB


def run_pairs(args, argv: list[str]) -> list[dict]:
    out = []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    for k in range(args.pairs):
        order = MODES if k % 2 == 0 else MODES[::-1]
        pair = {"order": list(order)}
        for mode in order:
            print(f"pair {k + 1}/{args.pairs}: {mode}", flush=True)
            proc = subprocess.run([sys.executable, __file__, *argv, "--child", mode], env=env, text=True,
                                  stdout=subprocess.PIPE)
            if proc.returncode:
                raise SystemExit(f"pair {k + 1}, {mode}: the process exited with {proc.returncode}; nothing written")
            pair[mode] = p = json.loads(proc.stdout.strip().splitlines()[-1])
            print("  " + ", ".join(f"{n} {1e3 * np.median(t):.0f} ms" for n, t in p["step_s"].items())
                  + f"; {p['minor_faults_per_step']:.0f} faults and {p['system_s_per_step']:.2f} s system a step, "
                  f"peak RSS {p['peak_rss_mb']:.0f} MB", flush=True)
        out.append(pair)
    return out


def summarise(pairs: list[dict], models: list[str]) -> dict:
    med = {m: {n: [float(np.median(p[m]["step_s"][n])) for p in pairs] for n in models} for m in MODES}
    res = {"reuse_vs_default": {n: paired_ratio_ci(med["reuse"][n], med["default"][n]) for n in models}}
    for key in ("minor_faults_per_step", "system_s_per_step", "peak_rss_mb"):
        res[key] = {m: [p[m][key] for p in pairs] for m in MODES}
    res["median_step_ms"] = {m: {n: 1e3 * float(np.median(v)) for n, v in med[m].items()} for m in MODES}
    if len(models) == 2 and len(pairs) >= 2:
        a, b = models
        res[f"{a}_vs_{b}"] = {m: clustered_ratio_ci([p[m]["step_s"][a] for p in pairs],
                                                    [p[m]["step_s"][b] for p in pairs]) for m in MODES}
    return res


def report(res: dict, models: list[str]) -> None:
    for n in models:
        r = res["reuse_vs_default"][n]
        print(f"{n}: step {res['median_step_ms']['default'][n]:.0f} -> {res['median_step_ms']['reuse'][n]:.0f} ms, "
              f"reuse/default {r['ratio']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
    for key, unit in (("minor_faults_per_step", ""), ("system_s_per_step", " s"), ("peak_rss_mb", " MB")):
        print(f"{key}: " + "; ".join(f"{m} {float(np.median(v)):.4g}{unit}" for m, v in res[key].items()))
    for key in (k for k in res if k.endswith(f"_vs_{models[-1]}")):
        print(key + ": " + "; ".join(f"{m} {r['ratio']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
                                    for m, r in res[key].items()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["se_resnet50", "resnet50"])
    p.add_argument("--infer", action="store_true", help="time inference forwards instead of training steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5, help="measured rounds per process (one step of each network)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pairs", type=int, default=4, help="pairs of processes (default, reuse)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.pairs < 2 or args.steps < 2:
        p.error(f"--pairs {args.pairs} --steps {args.steps}: need at least 2 of each for an interval")
    pairs = run_pairs(args, argv)
    res = summarise(pairs, args.models)
    report(res, args.models)
    path = RESULTS / f"cpu_allocator{'_infer' if args.infer else ''}{'_' + args.tag if args.tag else ''}.json"
    torch.set_num_threads(args.threads)
    write_json(path, {**provenance(vars(args), "cpu"), "results": res, "pairs": pairs})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
