"""`senet compare`: does attention pay for itself on your data?

Trains a baseline and its attention versions (default ``resnet20`` vs ``se_resnet20``, the CIFAR
ResNets of He et al. 2016 with and without SE, arXiv 1709.01507 Table 4) with one recipe over several
seeds, then reports per model: final validation top-1 mean +- std over seeds; the gain over the
baseline with a 95% Student-t confidence interval on the per-seed paired differences (seed s of
every model shares the data order and augmentation draws); parameters; MACs; CPU latency at batch 1
(median of interleaved repetitions) and its ratio to the baseline's; training time.

Outputs in one directory: ``compare.json`` (everything, with provenance), ``report.md``,
``compare.png`` (learning curves; accuracy against MACs and against latency) and the terminal table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from senet.flops import count_macs, count_params
from senet.provenance import provenance, write_json

# ----------------------------------------------------------------------------- statistics


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; NaN for fewer than 2 values)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_std() needs at least one value")
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan


def _t_density(x: np.ndarray, df: int) -> np.ndarray:
    # Student-t pdf: Γ((ν+1)/2) / (√(νπ) Γ(ν/2)) · (1 + x²/ν)^(-(ν+1)/2)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))


def _t_cdf_pos(t: float, df: int, steps: int = 2000) -> float:
    # P(T <= t) for t >= 0: 1/2 + ∫_0^t pdf, by Simpson's rule (the pdf is smooth and bounded)
    x = np.linspace(0.0, t, steps + 1)
    w = np.ones(steps + 1)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return 0.5 + float((w * _t_density(x, df)).sum() * t / (3 * steps))


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (p in [0.5, 1)), scipy-free.

    Bisection on the CDF; matches ``scipy.stats.t.ppf`` to ~1e-6 relative for df >= 1, p <= 0.999.
    """
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while _t_cdf_pos(hi, df) < p:  # bracket: t_{0.999, 1} ~ 318
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf_pos(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass
class Gain:
    """Paired gain of a model over the baseline, in accuracy points, across n seeds.

    d_s = acc_model(seed s) - acc_baseline(seed s); CI = mean(d) ± t_{(1+level)/2, n-1} · sd(d)/√n.
    ``distinguishable`` is True when the CI excludes 0 (the gain is larger than seed noise).
    """

    mean: float
    std: float
    n: int
    ci_low: float
    ci_high: float
    level: float
    distinguishable: bool
    diffs: list[float] = field(default_factory=list)

    def verdict(self) -> str:
        if self.n < 2:
            return "one seed: no interval, run --seeds 3 or more"
        if not self.distinguishable:
            return "within seed noise (CI contains 0)"
        return "better than the baseline beyond seed noise" if self.mean > 0 else \
            "worse than the baseline beyond seed noise"


def paired_gain(baseline, model, level: float = 0.95) -> Gain:
    """Student-t confidence interval on the per-seed differences ``model - baseline``."""
    b, m = np.asarray(baseline, dtype=np.float64), np.asarray(model, dtype=np.float64)
    if b.shape != m.shape or b.ndim != 1 or b.size == 0:
        raise ValueError(f"paired_gain needs equal-length per-seed lists, got {b.shape} and {m.shape}")
    d = m - b
    mean, std = mean_std(d)
    n = d.size
    if n < 2:
        return Gain(mean, math.nan, n, math.nan, math.nan, level, False, d.tolist())
    half = t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n)
    lo, hi = mean - half, mean + half
    return Gain(mean, std, n, lo, hi, level, bool(lo > 0 or hi < 0), d.tolist())


# ----------------------------------------------------------------------------- cost


def measure_latency(models: dict[str, nn.Module], input_shape: tuple[int, int, int], *,
                    reps: int = 50, warmup: int = 5) -> dict[str, list[float]]:
    """Seconds per batch-1 forward pass, per model, over ``reps`` interleaved rounds.

    Each round runs every model once, rotating which goes first, so slow drifts of the machine
    (other processes, frequency scaling) hit all models alike. Take the median of the lists.
    """
    x = torch.randn(1, *input_shape)  # (1, C, H, W)
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    modes = {n: m.training for n, m in models.items()}
    for m in models.values():
        m.eval()
    with torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                models[n](x)
        for r in range(reps):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                t0 = time.perf_counter()
                models[n](x)
                times[n].append(time.perf_counter() - t0)
    for n, m in models.items():
        m.train(modes[n])
    return times


# ----------------------------------------------------------------------------- summary


def summarize_model(name: str, runs: list[dict], baseline_top1: list[float] | None, *, params: int,
                    macs: int | None, latency_s: list[float], baseline_latency_ms: float | None) -> dict:
    """One model's row: accuracy over seeds, paired gain, cost. ``runs`` are per-seed results in seed order."""
    top1 = [r["top1"] for r in runs]
    acc_mean, acc_std = mean_std(top1)
    lat = np.asarray(latency_s) * 1e3  # ms
    lat_ms = float(np.median(lat))
    gain = paired_gain(baseline_top1, top1) if baseline_top1 is not None else None
    train_mean, train_std = mean_std([r["train_seconds"] for r in runs])
    return {
        "name": name,
        "top1": top1,
        "top1_mean": acc_mean,
        "top1_std": acc_std,
        "top5_mean": mean_std([r["top5"] for r in runs])[0],
        "loss_mean": mean_std([r["loss"] for r in runs])[0],
        "gain": asdict(gain) if gain else None,
        "verdict": gain.verdict() if gain else "baseline",
        "params": params,
        "macs": macs,
        "latency_ms": lat_ms,
        "latency_ms_iqr": [float(np.percentile(lat, 25)), float(np.percentile(lat, 75))],
        "latency_reps": int(lat.size),
        "latency_ratio": lat_ms / baseline_latency_ms if baseline_latency_ms else 1.0,
        "train_seconds": [r["train_seconds"] for r in runs],
        "train_seconds_mean": train_mean,
        "train_seconds_std": train_std,
        "curves": [r["curve"] for r in runs],  # per seed: val top-1 per epoch
    }


def _pm(mean: float, std: float, digits: int = 2) -> str:
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _gain_cell(row: dict) -> str:
    g = row["gain"]
    if g is None:
        return "(baseline)"
    if g["n"] < 2:
        return f"{g['mean']:+.2f}"
    return f"{g['mean']:+.2f} [{g['ci_low']:+.2f}, {g['ci_high']:+.2f}]"


def _macs_cell(macs: int | None) -> str:
    return "n/a" if macs is None else f"{macs / 1e6:.3f}M"


def table_rows(models: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the terminal table and the markdown report."""
    header = ["model", "top-1 % (mean ± std)", "gain vs baseline [95% CI]", "params", "MACs",
              "latency ms (b=1)", "latency ×", "train s"]
    rows = [[
        r["name"],
        _pm(r["top1_mean"], r["top1_std"]),
        _gain_cell(r),
        f"{r['params']:,}",
        _macs_cell(r["macs"]),
        f"{r['latency_ms']:.2f}",
        f"{r['latency_ratio']:.3f}",
        _pm(r["train_seconds_mean"], r["train_seconds_std"], 1),
    ] for r in models]
    return header, rows


def format_table(models: list[dict]) -> str:
    header, rows = table_rows(models)
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out += [f"{r['name']}: {r['verdict']}" for r in models[1:]]
    return "\n".join(out)


def markdown_report(payload: dict, plot_name: str) -> str:
    cfg, models = payload["config"], payload["models"]
    header, rows = table_rows(models)
    md = [
        f"# senet compare: {', '.join(m['name'] for m in models)} on {payload['data']['name']}",
        "",
        f"Baseline `{models[0]['name']}`; {cfg['seeds']} seeds ({', '.join(map(str, payload['seeds']))}), "
        f"{cfg['epochs']} epoch{'s' if cfg['epochs'] > 1 else ''} each, image size {payload['data']['image_size']}, "
        f"{payload['data']['train_size']} train / {payload['data']['val_size']} val images. "
        "Accuracy is the final epoch's validation top-1. The gain is paired by seed (same data order "
        "and augmentation per seed) with a Student-t 95% confidence interval on the per-seed differences; "
        "it is distinguishable from seed noise only when the interval excludes 0.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", "## Verdict", ""]
    md += [f"- `{r['name']}` vs `{models[0]['name']}`: {_gain_cell(r)} points, {r['verdict']}; "
           f"latency ×{r['latency_ratio']:.3f}, params {r['params'] - models[0]['params']:+,}."
           for r in models[1:]]
    md += ["", f"![learning curves and accuracy against cost]({plot_name})", "", "## Per-seed top-1", ""]
    md += [f"- `{r['name']}`: " + ", ".join(f"{a:.2f}" for a in r["top1"]) for r in models]
    dev = payload["device"]
    md += ["", "## Provenance", "",
           f"senet {payload['versions']['senet']}, torch {payload['versions']['torch']}, "
           f"git {payload['git_revision']}, trained on {dev['type']} ({dev['name']}), latency on CPU with "
           f"{payload['latency_threads']} thread(s), {payload['created']}; total wall time "
           f"{payload['total_seconds']:.0f} s. Full figures and config in `compare.json`.", ""]
    return "\n".join(md)


def plot_compare(models: list[dict], path: str | Path) -> Path:
    """Three panels: val top-1 per epoch (mean over seeds, ±1 std band); top-1 vs MACs; top-1 vs latency."""
    from senet.plotting import pyplot, save_figure

    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(models):
        c = colors[i % len(colors)]
        curves = np.asarray(r["curves"], dtype=np.float64)  # (seeds, epochs)
        epochs = np.arange(1, curves.shape[1] + 1)
        mu, sd = curves.mean(0), curves.std(0, ddof=1) if len(curves) > 1 else np.zeros(curves.shape[1])
        axes[0].plot(epochs, mu, color=c, marker="o", ms=3, label=r["name"])
        axes[0].fill_between(epochs, mu - sd, mu + sd, color=c, alpha=0.2)
        err = 0 if math.isnan(r["top1_std"]) else r["top1_std"]
        for ax, x in ((axes[1], (r["macs"] or math.nan) / 1e6), (axes[2], r["latency_ms"])):
            ax.errorbar(x, r["top1_mean"], yerr=err, fmt="o", color=c, capsize=4, label=r["name"])
    axes[0].set(xlabel="epoch", ylabel="val top-1 %", title="learning curves (mean ± std over seeds)")
    axes[1].set(xlabel="MACs per image (M)", ylabel="val top-1 %", title="accuracy vs MACs")
    axes[2].set(xlabel="CPU latency, batch 1 (ms, median)", ylabel="val top-1 %", title="accuracy vs latency")
    for ax in axes[1:]:
        ax.ticklabel_format(axis="x", useOffset=False, style="plain")
        ax.margins(x=0.25)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- the job


@dataclass
class CompareConfig:
    """One comparison. Defaults: the no-argument run, on digits, under 5 minutes on 2 CPU cores."""

    models: list[str] = field(default_factory=lambda: ["resnet20", "se_resnet20"])  # first = baseline
    data: str = "digits"
    root: str | None = None
    image_size: int | None = 16  # digits are 8x8: 16 keeps all three CIFAR stages above 4x4
    seeds: int = 4  # >= 3 for a usable t interval (t_{0.975, 2} = 4.30, t_{0.975, 3} = 3.18)
    epochs: int = 6
    batch_size: int = 64
    lr: float | None = None  # None: the training engine's default (SGD, cosine, 0.1 at batch 64)
    recipe: dict = field(default_factory=dict)  # any other TrainConfig field, e.g. {"label_smoothing": 0.1}
    device: str = "cpu"
    threads: int = 1  # torch CPU threads for training; 1 is fastest on a small, shared machine (docs/compare.md)
    workers: int = 0
    subset: int = 0  # first N training images only (0 = all; quick checks)
    latency_reps: int = 50
    latency_threads: int = 1  # batch-1 CPU latency on one thread: the least noisy on a shared machine
    out: str | None = None
    epoch_bars: bool = False  # show `senet train`'s per-epoch progress bar inside each run

    def check(self) -> None:
        if len(self.models) < 2:
            raise ValueError(f"--models needs a baseline and at least one model to compare, got {self.models}")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"--models lists a model twice: {self.models}")
        reserved = {"model", "seed", "data", "root", "image_size", "epochs", "batch_size", "lr", "out", "device"}
        if reserved & set(self.recipe):
            raise ValueError(f"set {sorted(reserved & set(self.recipe))} with their own options, not --recipe")
        for key in ("seeds", "epochs", "batch_size", "threads", "latency_reps", "latency_threads"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        from senet.models import model_info

        for name in self.models:
            model_info(name)  # ValueError naming the unknown model


def train_config(cfg: CompareConfig, model: str, seed: int):
    """The ``TrainConfig`` of one (model, seed) run: every model gets the same recipe."""
    from senet.train import TrainConfig

    fields_ = {"model": model, "seed": seed, "data": cfg.data, "root": cfg.root, "image_size": cfg.image_size,
               "subset": cfg.subset, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "device": cfg.device,
               "workers": cfg.workers, "quiet": not cfg.epoch_bars, "out": None, **cfg.recipe}
    if cfg.lr is not None:
        fields_["lr"] = cfg.lr
    return TrainConfig.from_dict(fields_)


def train_one(cfg: CompareConfig, model: str, seed: int) -> dict:
    """Train one (model, seed); returns the final epoch's val figures, the curve and the train time."""
    from senet.train import fit

    result = fit(train_config(cfg, model, seed))
    final = result.final
    return {"model": model, "seed": seed, "top1": final["val_top1"], "top5": final["val_top5"],
            "loss": final["val_loss"], "curve": [h["val_top1"] for h in result.history],
            "train_seconds": result.train_time_s, "best_top1": result.best_top1, "config": result.config}


class _Eta:
    """Progress across the whole job: runs done, elapsed, and the remaining time from per-model averages."""

    def __init__(self, total: int, report=print):
        self.total, self.done, self.start, self.report = total, 0, time.perf_counter(), report
        self.seconds: dict[str, list[float]] = {}

    def begin(self, model: str, seed: int) -> None:
        self.report(f"[{self.done + 1}/{self.total}] training {model}, seed {seed} ...")

    def end(self, model: str, run: dict, seconds: float, remaining: list[str]) -> None:
        self.done += 1
        self.seconds.setdefault(model, []).append(seconds)
        mean_all = float(np.mean([t for ts in self.seconds.values() for t in ts]))
        eta = sum(np.mean(self.seconds[m]) if m in self.seconds else mean_all for m in remaining)
        elapsed = time.perf_counter() - self.start
        self.report(f"[{self.done}/{self.total}] {model} seed {run['seed']}: val top-1 {run['top1']:.2f}% "
                    f"({seconds:.0f}s) | elapsed {_hms(elapsed)}, ETA {_hms(eta)} (+ latency)")


def _hms(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def run_compare(cfg: CompareConfig, report=print) -> dict:
    """Train every model over every seed (seed-major, so drifts of the machine hit all models alike),
    measure cost, and return the JSON payload (provenance included)."""
    cfg.check()
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, start, report)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: CompareConfig, start: float, report) -> dict:
    from senet.data import create_datasets

    bundle = create_datasets(cfg.data, cfg.root, image_size=cfg.image_size)
    runs = _train_all(cfg, report)
    rows = _rows(cfg, bundle, runs, report)
    data = bundle.describe()
    data["train_size"] = min(cfg.subset, data["train_size"]) if cfg.subset else data["train_size"]
    base = cfg.models[0]
    payload = {**provenance(asdict(cfg), _device(cfg)), "train_config": runs[base][0]["config"],
               "data": data, "seeds": list(range(cfg.seeds)), "baseline": base,
               "latency_threads": cfg.latency_threads, "models": rows,
               "runs": {m: [{k: v for k, v in r.items() if k != "config"} for r in rs] for m, rs in runs.items()}}
    payload["total_seconds"] = time.perf_counter() - start
    return payload


def _train_all(cfg: CompareConfig, report) -> dict[str, list[dict]]:
    """Every (seed, model) run, seed-major; ``{model: [run of seed 0, seed 1, ...]}``."""
    order = [(s, m) for s in range(cfg.seeds) for m in cfg.models]
    eta = _Eta(len(order), report)
    runs: dict[str, list[dict]] = {m: [] for m in cfg.models}
    for i, (seed, model) in enumerate(order):
        eta.begin(model, seed)
        t0 = time.perf_counter()
        run = train_one(cfg, model, seed)
        runs[model].append(run)
        eta.end(model, run, time.perf_counter() - t0, [m for _, m in order[i + 1:]])
        if cfg.out:  # finished runs survive an interrupted comparison
            _append_jsonl(Path(cfg.out) / "runs.jsonl", {k: v for k, v in run.items() if k != "config"})
    return runs


def _rows(cfg: CompareConfig, bundle, runs: dict[str, list[dict]], report) -> list[dict]:
    """Per-model summary rows: accuracy and gain from ``runs``, params/MACs/latency from fresh networks."""
    report(f"measuring batch-1 CPU latency ({cfg.latency_reps} interleaved rounds, "
           f"{cfg.latency_threads} thread(s)) ...")
    shape = (bundle.in_chans, bundle.image_size, bundle.image_size)  # (C, H, W)
    nets = {m: _build(m, bundle, cfg.recipe.get("model_kwargs") or {}) for m in cfg.models}
    latency = _latency(nets, shape, cfg)
    base = cfg.models[0]
    base_ms = float(np.median(latency[base])) * 1e3
    return [summarize_model(m, runs[m], None if m == base else [r["top1"] for r in runs[base]],
                            params=count_params(nets[m]), macs=count_macs(nets[m], shape),
                            latency_s=latency[m], baseline_latency_ms=None if m == base else base_ms)
            for m in cfg.models]


def _append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _device(cfg: CompareConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _build(name: str, bundle, model_kwargs: dict) -> nn.Module:
    # the trained architecture; the weights do not change dense float32 latency, params or MACs
    from senet.models import create_model

    return create_model(name, **{"num_classes": bundle.num_classes, "in_chans": bundle.in_chans, **model_kwargs})


def _latency(nets: dict[str, nn.Module], shape, cfg: CompareConfig) -> dict[str, list[float]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.latency_threads)
    try:
        return measure_latency(nets, shape, reps=cfg.latency_reps)
    finally:
        torch.set_num_threads(threads)


def write_outputs(payload: dict, out: Path) -> dict[str, Path]:
    """``compare.json``, ``report.md`` and ``compare.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    png = plot_compare(payload["models"], out / "compare.png")
    md = out / "report.md"
    md.write_text(markdown_report(payload, png.name))
    return {"json": write_json(out / "compare.json", payload), "markdown": md, "plot": png}


# ----------------------------------------------------------------------------- CLI


def _compare_command(args: argparse.Namespace) -> int:
    from senet.cli import parse_kwargs

    cfg = CompareConfig(
        models=[m.strip() for m in args.models.split(",") if m.strip()], data=args.data, root=args.root,
        image_size=args.image_size, seeds=args.seeds, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, recipe=parse_kwargs(args.recipe or [], "--recipe"), device=args.device, threads=args.threads,
        workers=args.workers,
        subset=args.subset, latency_reps=args.latency_reps, latency_threads=args.latency_threads,
        out=args.out or str(Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"),
        epoch_bars=sys.stderr.isatty(),
    )
    cfg.check()
    out = Path(cfg.out)
    if (out / "compare.json").exists() or (out / "runs.jsonl").exists():
        raise ValueError(f"{str(out)!r} already holds a comparison; pick another --out")
    print(f"senet compare: {', '.join(cfg.models)} (baseline {cfg.models[0]}) on {cfg.data}, "
          f"{cfg.seeds} seeds x {cfg.epochs} epochs -> {out}")
    payload = run_compare(cfg)
    paths = write_outputs(payload, out)
    print()
    print(format_table(payload["models"]))
    print(f"\ntotal {_hms(payload['total_seconds'])}; wrote {paths['markdown']}, {paths['json']}, {paths['plot']}")
    return 0


def add_parser(sub) -> None:
    d = CompareConfig()
    p = sub.add_parser("compare", help="train a baseline and its attention versions over seeds; is the gain real?",
                       description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--models", default=",".join(d.models), help="comma-separated registered names; the first is the baseline "
      f"(default {','.join(d.models)})")
    a("--data", default=d.data, help="digits (default) | cifar10 | cifar100 | imagefolder:PATH")
    a("--root", default=None, help="where cifar10/cifar100 live")
    a("--image-size", type=int, default=d.image_size, help=f"input resolution (default {d.image_size})")
    a("--seeds", type=int, default=d.seeds, help=f"seeds 0..N-1 per model (default {d.seeds}; >= 3 for a CI)")
    a("--epochs", type=int, default=d.epochs, help=f"epochs per run (default {d.epochs})")
    a("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    a("--lr", type=float, default=None, help="peak learning rate (default: senet train's)")
    a("--recipe", action="append", metavar="KEY=VALUE",
      help="any other `senet train` setting for every run, e.g. label_smoothing=0.1 (repeatable)")
    a("--subset", type=int, default=0, help="train on the first N training images only")
    a("--device", default=d.device, help="training device: cpu (default), cuda, auto ...")
    a("--threads", type=int, default=d.threads, help=f"torch CPU threads for training (default {d.threads})")
    a("--workers", type=int, default=d.workers, help="DataLoader workers (ImageFolder data)")
    a("--latency-reps", type=int, default=d.latency_reps,
      help=f"interleaved batch-1 timing rounds (default {d.latency_reps})")
    a("--latency-threads", type=int, default=d.latency_threads, help="CPU threads for the latency test")
    a("--out", default=None, help="output directory (default runs/compare-TIME)")
    p.set_defaults(func=_compare_command)
