"""`senet bench`: what attention costs on this machine - latency, throughput, memory, params, MACs.

With a baseline, the two networks are measured interleaved in one process (after a warmup, round r
times ``iters`` calls of each, the order alternating AB, BA, AB ...) so drift in clock speed or load
hits both alike; the overhead ratio (mean model time / mean baseline time) comes with a 95% paired
bootstrap interval over the rounds. ``--paper`` puts the SENet paper's CPU claim (Hu et al.,
arXiv 1709.01507, Sec. 5: ResNet-50 164 ms vs SE-ResNet-50 167 ms for one 224x224 image, +1.8%) next
to the ratio measured here.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over one step (inference or training). On CPU,
the activation memory of a training step: bytes of the distinct tensors autograd saves for backward
in one forward pass (parameters excluded), counted with saved-tensor hooks.
MACs: ``senet.flops`` (convolutions and linear layers of one image, the paper's "GFLOPs").
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from senet import allocator

PAPER_CPU_MS = {"resnet50": 164.0, "se_resnet50": 167.0}  # SENet paper Sec. 5, one 224x224 image
RUNTIMES = ("torch", "onnxruntime")


@dataclass
class BenchConfig:
    model: str
    baseline: str | None = None
    batch: list[int] = field(default_factory=lambda: [1])
    res: int | None = None
    device: str = "cpu"
    channels_last: bool = False
    compile: bool = False
    train: bool = False
    runtime: str = "torch"
    warmup: int = 3
    rounds: int = 10
    iters: int = 5  # timed calls of each network per round
    seed: int = 0
    # CPU training steps: glibc keeps freed memory, as `senet train` does. Process-wide, so the `senet bench`
    # command applies it before run_bench (which only records it); a library caller calls senet.allocator itself.
    reuse_freed_memory: bool = True
    frozen: bool = False  # senet.freeze the models first (ResNet family, CPU float32 inference)


# ----------------------------------------------------------------------------- statistics


def percentiles(times_s: list[float]) -> dict[str, float]:
    """p50/p90/p99 and mean of per-call latencies, in milliseconds."""
    ms = 1e3 * np.asarray(times_s)
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def paired_ratio_ci(model_rounds: list[float], base_rounds: list[float], *, level: float = 0.95,
                    resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Ratio sum(model) / sum(baseline) of per-round mean times, with a percentile bootstrap interval
    resampling rounds as pairs (each round's model and baseline times stay together)."""
    m, b = np.asarray(model_rounds, float), np.asarray(base_rounds, float)
    if m.shape != b.shape or m.size < 2:
        raise ValueError(f"need >= 2 paired rounds of equal length, got {m.size} and {b.size}; use --rounds 2+")
    idx = np.random.default_rng(seed).integers(0, m.size, size=(resamples, m.size))  # (R, rounds)
    boot = m[idx].sum(1) / b[idx].sum(1)
    tail = 100 * (1 - level) / 2
    return {"ratio": float(m.sum() / b.sum()), "ci_low": float(np.percentile(boot, tail)),
            "ci_high": float(np.percentile(boot, 100 - tail)), "level": level, "rounds": int(m.size)}


def _cluster_resamples(sizes: list[int], resamples: int, seed: int):
    """The two-level bootstrap of rounds measured in several processes (``sizes``: rounds per process): per
    resample, a list of (process, round indices), processes drawn with replacement, then rounds within each."""
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield [(k, rng.integers(0, sizes[k], size=sizes[k])) for k in rng.integers(0, len(sizes), size=len(sizes))]


def clustered_median_ci(groups: list[np.ndarray], *, level: float = 0.95, resamples: int = 2000,
                        seed: int = 0) -> tuple[float, float, float]:
    """The median of per-round values pooled over processes (one array per process), with its interval from
    the same two-level bootstrap as ``clustered_ratio_ci``: (median, low, high)."""
    boot = np.empty(resamples)
    for i, picked in enumerate(_cluster_resamples([g.size for g in groups], resamples, seed)):
        boot[i] = np.median(np.concatenate([groups[k][idx] for k, idx in picked]))
    tail = 100 * (1 - level) / 2
    return float(np.median(np.concatenate(groups))), float(np.percentile(boot, tail)), float(
        np.percentile(boot, 100 - tail))


def clustered_ratio_ci(model_groups: list[list[float]], base_groups: list[list[float]], *, level: float = 0.95,
                       resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """``paired_ratio_ci`` over rounds measured in several processes (``groups``: one list of paired per-round
    times per process). A process's state (where its tensors landed in memory, what else ran then) moves
    both subjects' times and their ratio for all of its rounds, so rounds of one process are not independent
    samples: the interval comes from a two-level bootstrap, processes resampled first and then rounds within
    each chosen process. The ratio is sum(model) / sum(baseline) over all rounds, as ``paired_ratio_ci``."""
    if len(model_groups) != len(base_groups) or len(model_groups) < 2:
        raise ValueError(f"need >= 2 processes with paired rounds, got {len(model_groups)} and {len(base_groups)}")
    groups = []
    for k, (m, b) in enumerate(zip(model_groups, base_groups, strict=True)):
        m, b = np.asarray(m, float), np.asarray(b, float)
        if m.shape != b.shape or m.size < 2:
            raise ValueError(f"process {k}: need >= 2 paired rounds of equal length, got {m.size} and {b.size}")
        groups.append((m, b))
    boot = np.empty(resamples)
    for i, picked in enumerate(_cluster_resamples([m.size for m, _ in groups], resamples, seed)):
        num = den = 0.0
        for k, idx in picked:
            m, b = groups[k]
            num, den = num + m[idx].sum(), den + b[idx].sum()
        boot[i] = num / den
    tail = 100 * (1 - level) / 2
    per_process = [float(m.sum() / b.sum()) for m, b in groups]
    return {"ratio": float(sum(m.sum() for m, _ in groups) / sum(b.sum() for _, b in groups)),
            "ci_low": float(np.percentile(boot, tail)), "ci_high": float(np.percentile(boot, 100 - tail)),
            "level": level, "rounds": int(sum(m.size for m, _ in groups)), "processes": len(groups),
            "per_process": per_process, "median_process_ratio": float(np.median(per_process))}


# ----------------------------------------------------------------------------- memory


def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward of ``x`` (params excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    was_training = model.training
    buffers = [(b, b.clone()) for b in model.buffers()]  # the train-mode forward moves BN's running statistics
    model.train()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for b, before in buffers:
                b.copy_(before)
    return sum(storages.values())


def cuda_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


# ----------------------------------------------------------------------------- runners


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# onnxruntime's idle workers spin-wait after a run (its default, which its back-to-back runs gain from) for 30-100 ms
# here, taking their cores from whatever is timed next: on 2 cores (AMD EPYC, 2 threads) resnet50 in torch took
# 128 ms right after a session's run against 82 ms 0.3 s later, and a second session 97 ms against 68 ms
# (docs/performance.md, section 5). An onnxruntime step is followed by this untimed pause (``settle``).
ORT_SETTLE_S = 0.25


def onnx_step(sess, feed: dict) -> Callable[[], None]:
    """``sess.run`` on ``feed`` as a timed step, marked to be waited out (``ORT_SETTLE_S``) before the next one."""
    def run() -> None:
        sess.run(None, feed)
    run.settle_s = ORT_SETTLE_S
    return run


def settle(step: Callable[[], None]) -> None:
    """Wait, untimed, for what ``step`` leaves running after its calls (onnxruntime's spinning threads) to stop."""
    pause = getattr(step, "settle_s", 0.0)
    if pause:
        time.sleep(pause)


def make_step(model: nn.Module, x: torch.Tensor, *, train: bool, runtime: str, input_size) -> Callable[[], None]:
    """One timed unit of work: a forward pass, or forward + backward + SGD step with ``train``."""
    if runtime == "onnxruntime":
        from senet.export import temp_onnx_session

        sess, _ = temp_onnx_session(model, input_size)
        return onnx_step(sess, {sess.get_inputs()[0].name: x.cpu().numpy()})
    if not train:
        model.eval()

        def infer() -> None:
            with torch.inference_mode():
                model(x)
        return infer
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), labels).backward()
        opt.step()
    return train_step


@dataclass
class Subject:
    """One network under test and everything measured about it."""

    name: str
    model: nn.Module
    input_size: tuple[int, int, int]
    params: int = 0
    macs: int = 0
    times: dict[int, list[list[float]]] = field(default_factory=dict)  # batch -> rounds -> per-call seconds


def _timed(step: Callable[[], None], device: torch.device, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def measure(subjects: list[Subject], batch: int, cfg: BenchConfig, device: torch.device) -> dict[str, dict]:
    """Warm up, then time every subject interleaved for ``cfg.rounds`` rounds at ``batch``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    steps, memory = [], {}
    for s in subjects:
        x = torch.randn(batch, *s.input_size, generator=gen).to(device)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        model = torch.compile(s.model) if cfg.compile else s.model
        steps.append(make_step(model, x, train=cfg.train, runtime=cfg.runtime, input_size=s.input_size))
        memory[s.name] = _memory(s.model, x, steps[-1], cfg, device)
    for step in steps:
        _timed(step, device, cfg.warmup)
        settle(step)
    rounds: list[list[list[float]]] = [[] for _ in subjects]
    for r in range(cfg.rounds):
        order = range(len(subjects)) if r % 2 == 0 else reversed(range(len(subjects)))  # AB, BA, ...
        for i in order:
            rounds[i].append(_timed(steps[i], device, cfg.iters))
            settle(steps[i])
    results = {}
    for s, rs in zip(subjects, rounds, strict=True):
        s.times[batch] = rs
        flat = [t for r in rs for t in r]
        stats = percentiles(flat)
        results[s.name] = {**stats, "throughput_img_s": batch / (stats["mean_ms"] / 1e3), **memory[s.name]}
    return results


def _memory(model: nn.Module, x: torch.Tensor, step, cfg: BenchConfig, device: torch.device) -> dict:
    if cfg.runtime == "onnxruntime":
        return {"memory_bytes": None, "memory_kind": "not measured (onnxruntime)"}
    if device.type == "cuda":
        return {"memory_bytes": cuda_peak_bytes(step, device), "memory_kind": "cuda max_memory_allocated"}
    try:
        return {"memory_bytes": activation_bytes(model, x), "memory_kind": "saved activations, training forward"}
    except ValueError as err:  # train-mode BN with one value per channel (batch 1, a 1x1 map): inference still runs
        if cfg.train:
            raise ValueError(f"{err}: a training step needs more than one value per BatchNorm channel; use a "
                             "larger --batch or --res") from err
        return {"memory_bytes": None, "memory_kind": f"not measured: a training forward fails here ({err})"}


# ----------------------------------------------------------------------------- the benchmark


def _subject(spec: str, res: int | None, device: torch.device, channels_last: bool, frozen: bool = False) -> Subject:
    from senet.export import load_spec
    from senet.flops import count_macs, count_params
    from senet.models import freeze

    loaded = load_spec(spec)
    c, h, w = loaded.input_size
    size = (c, res or h, res or w)
    model = loaded.model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    macs = count_macs(model, size, device=device)
    if frozen:
        try:
            model = freeze(model)
        except TypeError as err:  # not a ResNet-family model: say so as the command's other errors do
            raise ValueError(f"--frozen: {err}") from None
    return Subject(spec, model, size, count_params(model), macs)


def run_bench(cfg: BenchConfig) -> dict:
    """Measure ``cfg.model`` (and ``cfg.baseline``) at every batch size; returns the results payload."""
    if cfg.runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {list(RUNTIMES)}, got {cfg.runtime!r}")
    if cfg.runtime == "onnxruntime" and (cfg.train or cfg.device != "cpu" or cfg.compile):
        raise ValueError("--runtime onnxruntime benchmarks CPU inference only; drop --train/--compile/--device")
    if cfg.frozen and (cfg.train or cfg.compile or cfg.channels_last or cfg.runtime != "torch"
                       or torch.device(cfg.device).type != "cpu"):
        raise ValueError("--frozen times senet.freeze's CPU inference (float32, NCHW, eager): drop --train, --compile, "
                         "--channels-last, --runtime and --device")
    if cfg.rounds < 1 or cfg.iters < 1 or any(b < 1 for b in cfg.batch):
        raise ValueError(f"rounds={cfg.rounds}, iters={cfg.iters} and batch={cfg.batch} must all be >= 1")
    device = torch.device(cfg.device)
    specs = [cfg.model] + ([cfg.baseline] if cfg.baseline else [])
    subjects = [_subject(s, cfg.res, device, cfg.channels_last, cfg.frozen) for s in specs]
    if len({s.input_size for s in subjects}) > 1:
        raise ValueError(f"model and baseline expect different inputs {[s.input_size for s in subjects]}; "
                         "pass --res and compare networks with the same input channels")
    per_batch = {}
    for b in cfg.batch:
        per_batch[b] = {"results": measure(subjects, b, cfg, device)}
        if cfg.baseline:
            m, base = subjects
            per_batch[b]["overhead"] = paired_ratio_ci([np.mean(r) for r in m.times[b]],
                                                       [np.mean(r) for r in base.times[b]], seed=cfg.seed)
    return {"subjects": [{"name": s.name, "params": s.params, "macs": s.macs, "input_size": s.input_size,
                          **({"planned_units": s.model.planned} if cfg.frozen else {})}  # senet.freeze's plans
                         for s in subjects], "batches": per_batch}


def format_table(payload: dict, cfg: BenchConfig) -> str:
    subjects = {s["name"]: s for s in payload["subjects"]}
    w = max(len(n) for n in subjects)
    step = "train step" if cfg.train else "inference"
    lines = [f"{step}, {cfg.runtime} on {cfg.device}, {cfg.rounds} rounds x {cfg.iters} calls (MACs: conv+linear)",
             f"{'model':<{w}}  batch  {'params':>11}  {'MACs':>14}  {'p50 ms':>8}  {'p90 ms':>8}  {'p99 ms':>8}"
             f"  {'img/s':>8}  {'memory MB':>9}"]
    for b, entry in payload["batches"].items():
        for name, r in entry["results"].items():
            s = subjects[name]
            mem = "n/a" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 2**20:.1f}"
            lines.append(f"{name:<{w}}  {b:>5}  {s['params']:>11,}  {s['macs']:>14,}  {r['p50_ms']:8.2f}  "
                         f"{r['p90_ms']:8.2f}  {r['p99_ms']:8.2f}  {r['throughput_img_s']:8.1f}  {mem:>9}")
        if "overhead" in entry:
            o = entry["overhead"]
            lines.append(f"  batch {b}: {cfg.model} / {cfg.baseline} time ratio {o['ratio']:.3f} "
                         f"[{o['ci_low']:.3f}, {o['ci_high']:.3f}] 95% CI (paired bootstrap, {o['rounds']} rounds)")
    if cfg.frozen:
        lines.append("frozen (senet.freeze), residual units run from plans: " + ", ".join(
            f"{n} {s['planned_units']}" for n, s in subjects.items()))
    kinds = {r["memory_kind"] for e in payload["batches"].values() for r in e["results"].values()}
    lines.append("memory: " + "; ".join(sorted(kinds)))
    return "\n".join(lines)


def paper_line(payload: dict) -> str:
    o = payload["batches"][1]["overhead"]
    paper = PAPER_CPU_MS["se_resnet50"] / PAPER_CPU_MS["resnet50"]
    r = {s: payload["batches"][1]["results"][s]["p50_ms"] for s in PAPER_CPU_MS}
    return (f"paper (Hu et al. Sec. 5, CPU, 1 image 224x224): resnet50 164 ms, se_resnet50 167 ms, ratio "
            f"{paper:.3f} (+{100 * (paper - 1):.1f}%)\nhere: resnet50 {r['resnet50']:.1f} ms, se_resnet50 "
            f"{r['se_resnet50']:.1f} ms (p50), ratio {o['ratio']:.3f} [{o['ci_low']:.3f}, {o['ci_high']:.3f}] "
            f"({100 * (o['ratio'] - 1):+.1f}%)")


# ----------------------------------------------------------------------------- `senet bench`


def _config(args: argparse.Namespace) -> BenchConfig:
    if args.paper:
        return BenchConfig("se_resnet50", "resnet50", [1], 224, "cpu", rounds=args.rounds, iters=args.iters,
                           warmup=args.warmup)
    if not args.model:
        raise ValueError("name a MODEL (registered name or checkpoint) or pass --paper")
    return BenchConfig(args.model, args.baseline, args.batch, args.res, args.device, args.channels_last,
                       args.compile, args.train, args.runtime, args.warmup, args.rounds, args.iters,
                       reuse_freed_memory=args.reuse_freed_memory, frozen=args.frozen)


def _command(args: argparse.Namespace) -> int:
    from senet.provenance import provenance, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _config(args)
    if cfg.train and cfg.reuse_freed_memory and torch.device(cfg.device).type == "cpu":
        allocator.reuse_freed_memory()  # time the step as `senet train` runs it; recorded in the provenance
    payload = run_bench(cfg)
    print(format_table(payload, cfg))
    if args.paper:
        print(paper_line(payload))
    if args.out:
        path = write_json(args.out, {**provenance(asdict(cfg), cfg.device), **payload,
                                     **({"paper_ms": PAPER_CPU_MS} if args.paper else {})})
        print(f"wrote {path}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="latency percentiles, throughput, memory, params and MACs; "
                                     "overhead vs a baseline with a 95%% CI")
    p.add_argument("model", nargs="?", help="registered model name or senet checkpoint")
    p.add_argument("--baseline", default=None, help="a second model measured interleaved with MODEL")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    p.add_argument("--res", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the models first")
    p.add_argument("--frozen", action="store_true",
                   help="senet.freeze the models first (ResNet family; CPU inference: the same outputs, the fast "
                        "path's checks made once)")
    p.add_argument("--train", action="store_true", help="time a training step (forward + backward + SGD)")
    p.add_argument("--no-reuse-freed-memory", dest="reuse_freed_memory", action="store_false",
                   help="--train on CPU: leave glibc returning freed memory to the system (by default it keeps "
                        "it, as senet train does: senet.allocator)")
    p.add_argument("--runtime", choices=RUNTIMES, default="torch",
                   help="onnxruntime: export to ONNX (checked against eager) and time the session")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls of each model first")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds (the CI resamples these)")
    p.add_argument("--iters", type=int, default=5, help="timed calls per model per round")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--paper", action="store_true",
                   help="resnet50 vs se_resnet50, batch 1, 224x224, CPU, next to the paper's 164 vs 167 ms")
    p.add_argument("--out", default=None, help="write the results JSON (with provenance) here")
    p.set_defaults(func=_command)
