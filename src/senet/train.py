"""Training: ``fit(TrainConfig(...))`` and ``senet train``.

The recipe (SGD/AdamW, warmup + cosine/step, weight decay off norms/biases/attention, label
smoothing, dropout, clipping, AMP, channels_last, torch.compile, EMA), fine-tuning (backbone vs
attention + head learning rates, staged unfreezing: the SE-VGG16 recipe of SENet arXiv 1709.01507
users), knowledge distillation (Hinton et al., arXiv 1503.02531), DDP under ``torchrun``.

Runs survive: the full training state (weights, optimizer, EMA, GradScaler, RNG states of every
rank, loader position, history) is one ``.safetensors`` file written atomically at every epoch end
and every ``checkpoint_every`` steps; ``resume`` continues bit for bit, because every batch is a
pure function of (seed, epoch, step) (see ``senet.data.loader``) and the schedule a pure function
of the step.

Files in ``out`` (rank 0 only): ``config.json``, ``metrics.csv``, ``metrics.jsonl``,
``last.safetensors`` / ``best.safetensors`` / ``ema.safetensors`` (senet checkpoints),
``train_state.safetensors`` (for ``resume``), ``results.json``, ``tensorboard/`` (if installed).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from senet import allocator
from senet import optim as O
from senet.checkpoint import save_checkpoint
from senet.cli import parse_kwargs
from senet.evaluate import AMP_DTYPES, EvalResult, autocast, evaluate
from senet.hub import structure_extra
from senet.provenance import atomic_write_bytes, provenance, write_json

STATE_FILE = "train_state.safetensors"
_STATE_KEY = "senet_train"


@dataclass
class TrainConfig:
    """Everything a run depends on; saved resolved in every checkpoint and results file.

    ``batch_size`` is the global batch (split evenly over DDP processes); ``lr`` is for that batch.
    """

    model: str | None = None  # registered name; None: "se_resnet20", or the `checkpoint`'s network
    checkpoint: str | None = None  # pretrained weights to fine-tune (senet, timm or torchvision file)
    model_kwargs: dict = field(default_factory=dict)  # extra builder arguments, e.g. {"attn": "eca"}
    base: str | None = None  # instead of `model`: "torchvision:resnet50", "timm:NAME" (senet.load_base_model)
    attach: str | None = None  # attention inserted into `base` after `checkpoint` is loaded (identity init)
    attach_where: str = "residual"  # residual | stage | conv | comma-separated module names
    attach_kwargs: dict = field(default_factory=dict)  # attention arguments, e.g. {"reduction": 8}
    data: str = "digits"  # digits | cifar10 | cifar100 | imagefolder:PATH | PATH (an ImageFolder tree)
    root: str | None = None
    download: bool = False  # fetch CIFAR into `root` (needs the internet)
    image_size: int | None = None  # None: the data set's default (digits/CIFAR 32)
    subset: int = 0  # train on the first N training images only (0 = all): smoke tests
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    decay_norm_bias: bool = False  # also decay 1-D params (norm scales/shifts, biases)
    decay_attention: bool = False  # also decay attention-block params
    schedule: str = "cosine"  # cosine | step | constant, after the warmup
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    step_epochs: tuple[int, ...] = ()  # step schedule: decay at these epochs (default 1/2 and 3/4)
    lr_gamma: float = 0.1
    label_smoothing: float = 0.0
    drop_rate: float = 0.0
    grad_clip: float = 0.0  # max global grad L2 norm (0 = off)
    amp: str = "none"  # none | bf16 (CPU or CUDA) | fp16 (CUDA, with GradScaler)
    channels_last: bool = False
    compile: str | None = None  # torch.compile backend ("inductor", "eager", ...); None = off
    ema_decay: float = 0.0  # EMA of weights (0 = off), e.g. 0.999
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out: str | None = None  # None: write nothing (in-process use)
    checkpoint_every: int = 0  # also save the training state every N optimizer steps (0 = epoch ends)
    resume: str | None = None  # a previous run's out directory: continue it exactly
    teacher: str | None = None  # knowledge distillation from this checkpoint
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    backbone_lr_scale: float = 1.0  # backbone lr = lr * this; attention blocks and head get lr
    unfreeze: str = ""  # "E1,E2": attention + head only before E1, + last stage(s) until E2, then all
    unfreeze_last: int = 1  # backbone stages unfrozen at E1
    workers: int = 0
    reuse_freed_memory: bool = True  # CPU: glibc keeps freed memory for the next step (senet.allocator)
    quiet: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; valid: {sorted(known)}")
        d = dict(d)
        if "step_epochs" in d:
            d["step_epochs"] = tuple(d["step_epochs"])
        return cls(**d)


def check_config(cfg: TrainConfig) -> None:
    """ValueError naming the first bad setting and how to fix it."""
    checks = [
        (cfg.epochs >= 1, f"epochs={cfg.epochs} must be >= 1"),
        (cfg.batch_size >= 1, f"batch_size={cfg.batch_size} must be >= 1"),
        (cfg.lr > 0, f"lr={cfg.lr} must be > 0"),
        (cfg.optimizer in ("sgd", "adamw"), f"optimizer={cfg.optimizer!r}: choose 'sgd' or 'adamw'"),
        (cfg.schedule in ("cosine", "step", "constant"),
         f"schedule={cfg.schedule!r}: choose 'cosine', 'step' or 'constant'"),
        (cfg.warmup_epochs >= 0, f"warmup_epochs={cfg.warmup_epochs} must be >= 0"),
        (0 <= cfg.label_smoothing < 1, f"label_smoothing={cfg.label_smoothing} must be in [0, 1), e.g. 0.1"),
        (0 <= cfg.drop_rate < 1, f"drop_rate={cfg.drop_rate} must be in [0, 1)"),
        (cfg.grad_clip >= 0, f"grad_clip={cfg.grad_clip} must be >= 0 (0 = off)"),
        (cfg.amp in AMP_DTYPES, f"amp={cfg.amp!r}: choose one of {list(AMP_DTYPES)}"),
        (cfg.ema_decay == 0 or 0 < cfg.ema_decay < 1, f"ema_decay={cfg.ema_decay} must be 0 (off) or in (0, 1)"),
        (cfg.checkpoint_every >= 0, f"checkpoint_every={cfg.checkpoint_every} must be >= 0 (0 = epoch ends)"),
        (0 <= cfg.kd_alpha <= 1, f"kd_alpha={cfg.kd_alpha} must be in [0, 1]"),
        (cfg.kd_temperature > 0, f"kd_temperature={cfg.kd_temperature} must be > 0"),
        (cfg.subset >= 0, f"subset={cfg.subset} must be >= 0 (0 = all images)"),
        (cfg.unfreeze_last >= 1, f"unfreeze_last={cfg.unfreeze_last} must be >= 1"),
        (cfg.workers >= 0, f"workers={cfg.workers} must be >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    O.parse_unfreeze(cfg.unfreeze)
    if cfg.base and cfg.model and cfg.model != cfg.base:
        raise ValueError(f"model={cfg.model!r} and base={cfg.base!r}: name the network once, as a model "
                         "(senet name) or as --base (torchvision:NAME, timm:NAME)")
    if cfg.attach and not cfg.base:
        raise ValueError(f"attach={cfg.attach!r} needs base: e.g. --base torchvision:resnet50 --attach se")


# ----------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    """This process's place in a ``torchrun`` launch (RANK/WORLD_SIZE/LOCAL_RANK); 0/1/0 alone."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[Dist, torch.device]:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl on CUDA) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else 0)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1:
        return Dist(), dev
    owns = not tdist.is_initialized()
    if owns:
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(tdist.get_rank(), tdist.get_world_size(), local, owns), dev


def _all_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        tdist.all_reduce(t)
    return t


# ----------------------------------------------------------------------------- losses


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *, alpha: float,
            temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Hinton et al. (arXiv 1503.02531): (1 - α)·CE(s, y) + α·T²·KL(softmax(t/T) || softmax(s/T)).

    The T² keeps the soft-target gradients on the scale of the hard-target ones.
    """
    ce = F.cross_entropy(student, labels, label_smoothing=label_smoothing)
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                  reduction="batchmean")
    return (1 - alpha) * ce + alpha * t * t * kl


# ----------------------------------------------------------------------------- the run


@dataclass
class Progress:
    """Where a run is: the part of the training state that is not tensors."""

    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # batches done in it
    step: int = 0  # optimizer steps done in all
    history: list[dict] = field(default_factory=list)
    best_top1: float = -1.0
    best_epoch: int = -1
    train_time_s: float = 0.0
    resumed_at: list[int] = field(default_factory=list)  # steps at which the run was resumed


@dataclass
class Run:
    """Everything ``train_one_epoch`` and the checkpoints touch."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    model: nn.Module  # the plain model (what is saved)
    net: nn.Module  # what is called: model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    loaders: Any  # senet.data.Loaders
    bundle: Any  # senet.data.DataBundle
    arch: str
    model_kwargs: dict
    steps_per_epoch: int
    ema: O.ModelEma | None = None
    scaler: torch.amp.GradScaler | None = None
    teacher: nn.Module | None = None
    progress: Progress = field(default_factory=Progress)
    totals: torch.Tensor | None = None  # (3,) float64: loss sum, correct, seen in this epoch
    stage: int = -1
    frozen_bn: list[nn.Module] = field(default_factory=list)
    out: Path | None = None
    logger: Any = None

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.cfg.amp]

    def lr_factor(self, step: int) -> float:
        cfg, spe = self.cfg, self.steps_per_epoch
        milestones = cfg.step_epochs or (cfg.epochs // 2, cfg.epochs * 3 // 4)
        return O.lr_factor(step, total_steps=cfg.epochs * spe, warmup_steps=round(cfg.warmup_epochs * spe),
                           schedule=cfg.schedule, milestones=[m * spe for m in milestones],
                           gamma=cfg.lr_gamma, min_factor=cfg.min_lr_ratio)


def _loss(run: Run, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    cfg = run.cfg
    logits = logits.float()
    if run.teacher is None:
        return F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
    with torch.no_grad(), autocast(run.device, run.amp_dtype):
        t_logits = run.teacher(images).float()
    if t_logits.shape != logits.shape:
        raise ValueError(f"teacher outputs {tuple(t_logits.shape)} but the student {tuple(logits.shape)}: "
                         "the teacher must be trained on the same classes")
    return kd_loss(logits, t_logits, labels, alpha=cfg.kd_alpha, temperature=cfg.kd_temperature,
                   label_smoothing=cfg.label_smoothing)


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step at ``run.progress.step``; returns (loss, logits), detached."""
    O.set_lr(run.optimizer, run.lr_factor(run.progress.step))
    with autocast(run.device, run.amp_dtype):
        logits = run.net(images)  # (B, K)
    loss = _loss(run, logits, images, labels)
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:  # fp16: scale the loss so small gradients do not underflow
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    if run.cfg.grad_clip > 0:
        params = [p for p in run.model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, run.cfg.grad_clip)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    if run.ema is not None:
        run.ema.update(run.model)
    return loss.detach(), logits.detach()


def train_one_epoch(run: Run, epoch: int) -> dict:
    """Train epoch ``epoch`` from batch ``run.progress.batch`` on; checkpoints every N steps.

    Returns ``{"train_loss", "train_acc", "images"}`` summed over all ranks.
    """
    cfg, p, dev = run.cfg, run.progress, run.device
    _set_stage(run, epoch)
    run.model.train()
    for m in run.frozen_bn:  # a frozen stage keeps its BN statistics too
        m.eval()
    run.loaders.train.set_epoch(epoch, start_step=p.batch)
    global_batch = cfg.batch_size
    bar = tqdm(total=run.steps_per_epoch * global_batch, initial=p.batch * global_batch, unit="img",
               unit_scale=True, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=cfg.quiet or not run.dist.main,
               leave=False, dynamic_ncols=True)
    mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
    for images, labels in run.loaders.train:
        images = images.to(dev, non_blocking=True, memory_format=mf)
        labels = labels.to(dev, non_blocking=True)
        loss, logits = train_step(run, images, labels)
        b = labels.numel()
        run.totals[0] += loss.double() * b
        run.totals[1] += (logits.argmax(1) == labels).sum()
        run.totals[2] += b
        p.step += 1
        p.batch += 1
        bar.update(global_batch)
        if p.step % 10 == 0 and not bar.disable:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{run.optimizer.param_groups[0]['lr']:.2e}")
        if cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0:
            save_state(run)
    bar.close()
    totals = _all_sum(run.totals.clone(), run.dist)
    seen = max(totals[2].item(), 1.0)
    return {"train_loss": totals[0].item() / seen, "train_acc": 100.0 * totals[1].item() / seen,
            "images": int(totals[2].item())}


def _set_stage(run: Run, epoch: int) -> None:
    """Apply the unfreezing stage of ``epoch``; rewrap DDP when the trainable set changes."""
    stage = O.unfreeze_stage(epoch, O.parse_unfreeze(run.cfg.unfreeze))
    if stage == run.stage:
        return
    run.frozen_bn = O.apply_freeze(run.model, stage, last_stages=run.cfg.unfreeze_last)
    run.stage = stage
    run.net = _wrap(run.model, run.dist, run.device, run.cfg)


def _wrap(model: nn.Module, d: Dist, device: torch.device, cfg: TrainConfig) -> nn.Module:
    net = model
    if d.world > 1:  # DDP reduces only the parameters that require grad when it is built
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net, backend=cfg.compile)
    return net


@torch.no_grad()
def validate(run: Run) -> EvalResult:
    """Evaluate (the EMA weights when EMA is on) on every rank's val shard, then sum over ranks."""
    model = run.ema.module if run.ema is not None else run.model
    if run.dist.world > 1:  # every rank scores with rank 0's BN statistics
        for b in model.buffers():
            tdist.broadcast(b, 0)
    k = run.bundle.num_classes
    with torch.random.fork_rng(devices=[]):  # evaluation must not move the training RNG
        r = evaluate(model, run.loaders.val, device=run.device, num_classes=k, amp_dtype=run.amp_dtype)
    if run.dist.world == 1:
        return r
    conf = _all_sum(torch.as_tensor(r.confusion, device=run.device), run.dist).cpu().numpy()
    sums = torch.tensor([r.loss * r.num_samples, r.top5 * r.num_samples / 100, r.num_samples],
                        dtype=torch.float64, device=run.device)
    loss_sum, hits, n = _all_sum(sums, run.dist).tolist()
    return EvalResult.from_counts(conf, loss_sum, round(hits), int(n), r.topk, r.seconds)


def _end_epoch(run: Run, epoch: int, stats: dict, seconds: float) -> dict:
    p = run.progress
    val = validate(run)
    p.train_time_s += seconds
    rec = {"epoch": epoch + 1, "step": p.step, "lr": run.optimizer.param_groups[0]["lr"], **stats,
           "val_loss": float(val.loss), "val_top1": float(val.top1), "val_top5": float(val.top5),
           "epoch_time_s": seconds,
           "images_per_s": stats["images"] / max(seconds, 1e-9), "train_time_s": p.train_time_s,
           "stage": run.stage}
    p.history.append(rec)
    improved = val.top1 > p.best_top1
    if improved:
        p.best_top1, p.best_epoch = val.top1, epoch + 1
    p.epoch, p.batch = epoch + 1, 0
    run.totals.zero_()
    if run.out is not None and run.dist.main:
        run.logger.log(rec)
        if improved:
            best = run.ema.module if run.ema is not None else run.model
            _save_weights(run, run.out / "best.safetensors", best)
    save_state(run)
    if run.dist.main and not run.cfg.quiet:
        tqdm.write(f"epoch {epoch + 1}/{run.cfg.epochs}  loss {rec['train_loss']:.4f}  "
                   f"acc {rec['train_acc']:.2f}%  val top-1 {val.top1:.2f}%  top-5 {val.top5:.2f}%  "
                   f"val loss {val.loss:.4f}  {rec['images_per_s']:.0f} img/s  {seconds:.1f}s")
    return rec


# ----------------------------------------------------------------------------- checkpoints


def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(s: dict, device: torch.device) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], device)
    name, keys, *rest = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()  # own storage: safetensors refuses shared memory


def _pack_state(run: Run, rngs: list[dict], totals: torch.Tensor) -> bytes:
    """The training state as one safetensors blob: tensors, and a JSON header for the rest."""
    tensors = {f"model/{k}": _cpu(v) for k, v in run.model.state_dict().items()}
    if run.ema is not None:
        tensors.update({f"ema/{k}": _cpu(v) for k, v in run.ema.module.state_dict().items()})
    opt = run.optimizer.state_dict()
    opt_json = {"param_groups": opt["param_groups"], "state": {}}
    for pid, st in opt["state"].items():
        opt_json["state"][str(pid)] = {k: v for k, v in st.items() if not torch.is_tensor(v)}
        tensors.update({f"optim/{pid}/{k}": _cpu(v) for k, v in st.items() if torch.is_tensor(v)})
    rng_json = []
    for r, s in enumerate(rngs):
        tensors[f"rng/{r}/torch"] = _cpu(s["torch"])
        tensors[f"rng/{r}/numpy"] = _cpu(s["numpy"][1])
        if s["cuda"] is not None:
            tensors[f"rng/{r}/cuda"] = _cpu(s["cuda"])
        rng_json.append({"numpy": [s["numpy"][0], *s["numpy"][2:]], "python": s["python"]})
    tensors["totals"] = _cpu(totals)
    meta = {"config": run.cfg.to_dict(), "arch": run.arch, "model_kwargs": run.model_kwargs,
            "extra": structure_extra(run.model), "world_size": run.dist.world,
            "progress": dataclasses.asdict(run.progress), "optimizer": opt_json,
            "rng": rng_json, "scaler": run.scaler.state_dict() if run.scaler is not None else None}
    return st_save(tensors, metadata={_STATE_KEY: json.dumps(meta)})


def save_state(run: Run) -> None:
    """Write ``train_state.safetensors`` (+ ``last.safetensors``) atomically; collective under DDP."""
    rngs = [_rng_state(run.device)]
    totals = _all_sum(run.totals.clone(), run.dist)  # rank 0 carries the epoch's running sums
    if run.dist.world > 1:
        gathered = [None] * run.dist.world
        tdist.all_gather_object(gathered, rngs[0])
        rngs = gathered
    if run.out is None or not run.dist.main:
        return
    _save_weights(run, run.out / "last.safetensors", run.model)
    if run.ema is not None:
        _save_weights(run, run.out / "ema.safetensors", run.ema.module)
    atomic_write_bytes(run.out / STATE_FILE, _pack_state(run, rngs, totals))


def _save_weights(run: Run, path: Path, model: nn.Module) -> None:
    p = run.progress
    # the attach/pruned records let senet.load_model (eval, export, --teacher) rebuild the network
    save_checkpoint(path, model, arch=run.arch, model_kwargs=run.model_kwargs,
                    extra={"train": {"config": run.cfg.to_dict(), "epoch": p.epoch, "step": p.step,
                                     "best_top1": p.best_top1}, **structure_extra(model)})


def read_state(path: str | Path, *, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` of a training-state file (``tensors=False``: the JSON part only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training state at {str(path)!r}")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(_STATE_KEY, "null"))
        if meta is None:
            raise ValueError(f"{str(path)!r} is not a senet training state (written by `senet train`)")
        found = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}  # noqa: SIM118
    return found, meta


def _sub(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_state(run: Run, path: Path) -> None:
    """Restore everything ``save_state`` wrote into an already-built ``run``."""
    tensors, meta = read_state(path)
    if meta["world_size"] != run.dist.world:
        raise ValueError(f"{str(path)!r} was written by {meta['world_size']} process(es); resume it with the "
                         f"same number (this launch has {run.dist.world})")
    run.model.load_state_dict(_sub(tensors, "model/"))
    if run.ema is not None:
        run.ema.module.load_state_dict(_sub(tensors, "ema/"))
    opt = meta["optimizer"]
    state = {int(pid): {**st, **_sub(tensors, f"optim/{pid}/")} for pid, st in opt["state"].items()}
    run.optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})
    if run.scaler is not None and meta["scaler"]:
        run.scaler.load_state_dict(meta["scaler"])
    run.progress = Progress(**meta["progress"])
    run.progress.resumed_at.append(run.progress.step)
    run.totals = tensors["totals"].to(run.device) if run.dist.main else torch.zeros_like(run.totals)
    r = run.dist.rank
    mine = meta["rng"][r]
    _set_rng_state({"torch": tensors[f"rng/{r}/torch"], "cuda": tensors.get(f"rng/{r}/cuda"),
                    "numpy": [mine["numpy"][0], tensors[f"rng/{r}/numpy"], *mine["numpy"][1:]],
                    "python": mine["python"]}, run.device)


# ----------------------------------------------------------------------------- metrics files


class MetricsLogger:
    """Per-epoch records to ``metrics.csv``, ``metrics.jsonl`` and TensorBoard (if installed)."""

    def __init__(self, out: Path, history: list[dict]):
        self.csv, self.jsonl = out / "metrics.csv", out / "metrics.jsonl"
        # Rewrite from the checkpoint's history: drops rows of epochs a killed run did not checkpoint.
        self._rewrite(history)
        self.tb = None
        with contextlib.suppress(ImportError):  # tensorboard is optional
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))

    def _rewrite(self, history: list[dict]) -> None:
        buf = io.StringIO()
        if history:
            w = csv.DictWriter(buf, fieldnames=list(history[0]))
            w.writeheader()
            w.writerows(history)
        atomic_write_bytes(self.csv, buf.getvalue().encode())
        atomic_write_bytes(self.jsonl, "".join(json.dumps(h) + "\n" for h in history).encode())

    def log(self, rec: dict) -> None:
        new = not self.csv.stat().st_size
        with self.csv.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rec))
            if new:
                w.writeheader()
            w.writerow(rec)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------- building a run


def _build_model(cfg: TrainConfig, bundle, resumed: dict | None) -> nn.Module:
    from senet import hub

    if resumed is not None:  # the saved state holds the weights: no need for the pretrained file
        return hub.build_model(resumed["arch"], resumed["model_kwargs"], resumed.get("extra"))
    kwargs = _model_kwargs(cfg, bundle)
    if cfg.base:
        return _build_attached(cfg, bundle, kwargs)
    if cfg.checkpoint:
        return hub.create_model(cfg.model, checkpoint=cfg.checkpoint, strict=True, warn=not cfg.quiet, **kwargs)
    return hub.create_model(cfg.model or "se_resnet20", **kwargs)


def _build_attached(cfg: TrainConfig, bundle, kwargs: dict) -> nn.Module:
    """``cfg.base`` with ``cfg.checkpoint`` loaded (3-channel stems adapted to 1-channel data after
    loading), then ``cfg.attach`` inserted at ``cfg.attach_where`` with zero gates (output unchanged)."""
    from senet.surgery import RULES, attach, load_base_model

    model = load_base_model(cfg.base, checkpoint=cfg.checkpoint, **kwargs)
    if cfg.attach:
        where = cfg.attach_where if cfg.attach_where in RULES else cfg.attach_where.split(",")
        size = (bundle.in_chans, bundle.image_size, bundle.image_size)
        _, report = attach(model, cfg.attach, where, init="identity", input_size=size, **cfg.attach_kwargs)
        if not cfg.quiet and os.environ.get("RANK", "0") == "0":
            print(report)
    model.arch_name, model.arch_kwargs = cfg.base, dict(model.senet_base["kwargs"])
    return model


def _model_kwargs(cfg: TrainConfig, bundle) -> dict:
    kwargs = {"num_classes": bundle.num_classes, "in_chans": bundle.in_chans, **cfg.model_kwargs}
    if cfg.drop_rate:
        kwargs["drop_rate"] = cfg.drop_rate
    return kwargs


def _build_teacher(cfg: TrainConfig, device: torch.device) -> nn.Module | None:
    if not cfg.teacher:
        return None
    from senet import hub

    teacher = hub.load_model(cfg.teacher, map_location=device)  # any checkpoint: attached, pruned, foreign
    mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return teacher.to(memory_format=mf).requires_grad_(False)


def _resolve(config: TrainConfig) -> tuple[TrainConfig, Path | None]:
    """The config a run uses: a resumed run's own (``quiet``, ``workers`` and ``reuse_freed_memory`` may
    change: they do not change the result), and its out dir."""
    if not config.resume:
        out = Path(config.out) if config.out else None
        first = os.environ.get("RANK", "0") == "0"  # other ranks may start after rank 0 wrote config.json
        if first and out is not None and ((out / STATE_FILE).exists() or (out / "config.json").exists()):
            raise ValueError(f"{str(out)!r} already holds a run; continue it with --resume {out} or pick "
                             "another --out")
        return config, out
    out = Path(config.resume)
    state = out / STATE_FILE
    if state.is_file():
        saved = read_state(state, tensors=False)[1]["config"]
    elif (out / "config.json").is_file():  # killed before its first checkpoint: start it again
        saved = json.loads((out / "config.json").read_text())["config"]
    else:
        raise FileNotFoundError(f"--resume {str(out)!r}: no {STATE_FILE} or config.json there; "
                                "pass the out directory of a `senet train` run")
    cfg = TrainConfig.from_dict({**saved, "quiet": config.quiet, "workers": config.workers,
                                 "reuse_freed_memory": config.reuse_freed_memory, "resume": str(out), "out": str(out)})
    return cfg, out


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(config: TrainConfig, model: nn.Module | None = None) -> Run:
    """Resolve the config, join DDP, build data, model, optimizer, EMA; restore a resumed state."""
    from senet.data import create_datasets, create_loaders

    cfg, out = _resolve(config)
    check_config(cfg)
    d, device = init_distributed(cfg.device)
    if cfg.reuse_freed_memory and device.type == "cpu":
        allocator.reuse_freed_memory()  # before the first step's buffers; recorded in config.json
    if AMP_DTYPES[cfg.amp] is torch.float16 and device.type != "cuda":
        raise ValueError("amp='fp16' needs CUDA; on CPU use amp='bf16'")
    if cfg.batch_size % d.world:
        raise ValueError(f"batch_size={cfg.batch_size} (global) must divide evenly over {d.world} processes")
    _seed_all(cfg.seed)  # the same initial weights on every rank
    bundle = create_datasets(_data_name(cfg.data), cfg.root, image_size=cfg.image_size, download=cfg.download)
    if cfg.subset:
        bundle = _subset(bundle, cfg.subset)
    loaders = create_loaders(bundle, cfg.batch_size // d.world, workers=cfg.workers, distributed=d.world > 1,
                             seed=cfg.seed, drop_last=True)
    for loader in loaders:  # the DataLoader's worker base seed must not draw from the global RNG
        loader.generator = torch.Generator().manual_seed(cfg.seed)
    steps = len(loaders.train.batch_sampler)
    if steps == 0:
        raise ValueError(f"batch_size={cfg.batch_size} exceeds the {len(bundle.train)} training images; "
                         "lower --batch-size")
    state_file = out / STATE_FILE if out is not None and (out / STATE_FILE).is_file() else None
    if model is None:
        model = _build_model(cfg, bundle, read_state(state_file, tensors=False)[1] if state_file else None)
    arch = getattr(model, "arch_name", cfg.model or type(model).__name__)
    model_kwargs = getattr(model, "arch_kwargs", _model_kwargs(cfg, bundle))
    if not cfg.base:
        cfg = dataclasses.replace(cfg, model=arch)
    mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=mf)
    groups = O.param_groups(model, weight_decay=cfg.weight_decay, backbone_lr_scale=cfg.backbone_lr_scale,
                            decay_norm_bias=cfg.decay_norm_bias, decay_attention=cfg.decay_attention)
    optimizer = O.build_optimizer(groups, cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    run = Run(cfg=cfg, dist=d, device=device, model=model, net=model, optimizer=optimizer, loaders=loaders,
              bundle=bundle, arch=arch, model_kwargs=model_kwargs, steps_per_epoch=steps,
              ema=O.ModelEma(model, cfg.ema_decay) if cfg.ema_decay else None,
              scaler=torch.amp.GradScaler(device.type) if AMP_DTYPES[cfg.amp] is torch.float16 else None,
              teacher=_build_teacher(cfg, device), out=out,
              totals=torch.zeros(3, dtype=torch.float64, device=device))
    _seed_all(cfg.seed + d.rank)  # dropout masks differ across ranks, like their data
    if state_file is not None:
        load_state(run, state_file)
    if out is not None and d.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", provenance(cfg.to_dict(), device))
        run.logger = MetricsLogger(out, run.progress.history)
    return run


def _data_name(data: str) -> str:
    """A bare directory path means an ImageFolder tree."""
    from senet.data import list_datasets

    known = {n.split(":")[0] for n in list_datasets()} | {"cifar-10", "cifar-100"}
    if data.lower() in known or data.lower().startswith("imagefolder:") or not Path(data).is_dir():
        return data
    return f"imagefolder:{data}"


def _subset(bundle, n: int):
    from senet.data.memory import InMemoryImages

    ds = bundle.train
    if not isinstance(ds, InMemoryImages):
        raise ValueError("subset works on in-memory data sets (digits, CIFAR); drop --subset")
    small = InMemoryImages(ds.images[:n], ds.labels[:n], mean=ds.mean, std=ds.std, image_size=ds.image_size,
                           pad=ds.pad, flip=ds.flip)
    return dataclasses.replace(bundle, train=small)


# ----------------------------------------------------------------------------- fit


@dataclass
class RunResult:
    """What ``fit`` returns (on every rank; metrics are global sums, files come from rank 0)."""

    config: dict
    history: list[dict]
    final: dict  # the last epoch's record
    best_top1: float
    best_epoch: int
    train_time_s: float
    params: int
    world_size: int
    resumed_at: list[int] = field(default_factory=list)
    out: str | None = None
    paths: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def fit(config: TrainConfig, *, model: nn.Module | None = None) -> RunResult:
    """Train ``config.model`` (or ``model``, an already-built network) as ``config`` says.

    With ``config.resume`` the saved run continues where its last checkpoint left it.
    """
    run = setup(config, model)
    try:
        for epoch in range(run.progress.epoch, run.cfg.epochs):
            start = time.perf_counter()
            stats = train_one_epoch(run, epoch)
            _end_epoch(run, epoch, stats, time.perf_counter() - start)
        return _finish(run)
    finally:
        if run.logger is not None:
            run.logger.close()
        if run.dist.owns_group:
            tdist.destroy_process_group()


def _finish(run: Run) -> RunResult:
    p = run.progress
    paths = {}
    if run.out is not None:
        names = {"config": "config.json", "metrics_csv": "metrics.csv", "metrics_jsonl": "metrics.jsonl",
                 "last": "last.safetensors", "best": "best.safetensors", "state": STATE_FILE,
                 "results": "results.json"}
        if run.ema is not None:
            names["ema"] = "ema.safetensors"
        paths = {k: str(run.out / n) for k, n in names.items()}
    result = RunResult(config=run.cfg.to_dict(), history=p.history, final=p.history[-1] if p.history else {},
                       best_top1=p.best_top1, best_epoch=p.best_epoch, train_time_s=p.train_time_s,
                       params=sum(t.numel() for t in run.model.parameters()), world_size=run.dist.world,
                       resumed_at=p.resumed_at,
                       out=str(run.out) if run.out else None, paths=paths)
    if run.out is not None and run.dist.main:
        problems = run.bundle.problems
        payload = {**provenance(run.cfg.to_dict(), run.device), "result": result.to_dict(),
                   "data": {"name": run.bundle.name, "train": len(run.bundle.train),
                            "val": len(run.bundle.val), "skipped": problems.as_dict()}}
        write_json(run.out / "results.json", payload)
        problems.report()
    return result


# ----------------------------------------------------------------------------- CLI


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(e) for e in text.split(",") if e.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected epochs like '30,60', got {text!r}") from None


# Flags that may be given with --resume (they do not change the result).
_RESUME_OK = {"resume", "quiet", "workers", "reuse_freed_memory"}


def _train_cmd(args: argparse.Namespace) -> int:
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    if given.get("resume"):
        extra = sorted(set(given) - _RESUME_OK)
        if extra:
            raise ValueError(f"--resume continues the saved config; drop {['--' + e.replace('_', '-') for e in extra]}"
                             " or start a new run with another --out")
    elif "out" not in given:
        name = (given.get("model") or given.get("base", "").replace(":", "-")
                or (Path(given["checkpoint"]).stem if given.get("checkpoint") else "se_resnet20"))
        given["out"] = str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    for key, flag in (("model_kwargs", "--model-arg"), ("attach_kwargs", "--attach-kwargs")):
        if key in given:
            given[key] = parse_kwargs(given[key], flag)
    result = fit(TrainConfig.from_dict(given))
    if result.out and int(os.environ.get("RANK", "0")) == 0 and not result.config["quiet"]:
        print(f"best val top-1 {result.best_top1:.2f}% (epoch {result.best_epoch}); "
              f"train time {result.train_time_s:.1f}s; files in {result.out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (recipe, fine-tuning, KD, resume, DDP under torchrun)",
                       description=__doc__.splitlines()[0], argument_default=argparse.SUPPRESS)
    a = p.add_argument
    a("model", nargs="?", help="registered model name (default se_resnet20, or the --checkpoint's network)")
    a("--checkpoint", help="fine-tune from these weights (senet, timm or torchvision file)")
    a("--model-arg", dest="model_kwargs", action="append", metavar="KEY=VALUE",
      help="extra model builder argument, e.g. attn=eca or drop_rate=0.1 (repeatable)")
    a("--base", help="fine-tune a network senet does not register: torchvision:NAME or timm:NAME "
                     "(random weights; --checkpoint loads into it)")
    a("--attach", metavar="ATTN", help="insert this attention into --base with zero gates, e.g. se")
    a("--attach-where", help="residual (default) | stage | conv | comma-separated module names")
    a("--attach-kwargs", action="extend", nargs="+", metavar="KEY=VALUE",
      help="attention arguments, e.g. reduction=8")
    a("--data", help="digits (default) | cifar10 | cifar100 | PATH or imagefolder:PATH (train/ and val/ class folders)")
    a("--root", help="where cifar10/cifar100 live")
    a("--download", action="store_true", help="download CIFAR into --root (needs the internet)")
    a("--image-size", type=int)
    a("--subset", type=int, help="use only the first N training images")
    a("--epochs", type=int)
    a("--batch-size", type=int, help="global batch size (split over DDP processes)")
    a("--optimizer", choices=["sgd", "adamw"])
    a("--lr", type=float)
    a("--momentum", type=float)
    a("--nesterov", action="store_true")
    a("--weight-decay", type=float)
    a("--decay-norm-bias", action="store_true", help="also decay norms and biases")
    a("--decay-attention", action="store_true", help="also decay attention-block parameters")
    a("--schedule", choices=["cosine", "step", "constant"])
    a("--warmup-epochs", type=float)
    a("--min-lr-ratio", type=float)
    a("--step-epochs", type=_int_list, help="step schedule decay epochs, e.g. 30,60")
    a("--lr-gamma", type=float)
    a("--label-smoothing", type=float)
    a("--drop-rate", type=float)
    a("--grad-clip", type=float, help="max gradient L2 norm (0 = off)")
    a("--amp", choices=list(AMP_DTYPES))
    a("--channels-last", action="store_true")
    a("--compile", nargs="?", const="inductor", metavar="BACKEND", help="torch.compile (default backend inductor)")
    a("--ema-decay", type=float, help="EMA of weights, e.g. 0.999 (0 = off)")
    a("--seed", type=int)
    a("--device", help="auto | cpu | cuda | cuda:N")
    a("--out", help="output directory (default runs/MODEL-TIME)")
    a("--checkpoint-every", type=int, help="save the training state every N steps too")
    a("--resume", metavar="DIR", help="continue the run in DIR exactly")
    a("--teacher", metavar="CHECKPOINT", help="distil from this checkpoint's soft targets")
    a("--kd-alpha", type=float)
    a("--kd-temperature", type=float)
    a("--backbone-lr-scale", type=float, help="backbone lr = lr * this (e.g. 0.1 when fine-tuning)")
    a("--unfreeze", help="'E1,E2': attention+head only before E1, last stage(s) from E1, all from E2")
    a("--unfreeze-last", type=int)
    a("--workers", type=int)
    a("--no-reuse-freed-memory", dest="reuse_freed_memory", action="store_false",
      help="on CPU, leave glibc returning freed memory to the system (senet.allocator; the default keeps it: "
           "fewer page faults, faster steps, higher resident memory)")
    a("--quiet", action="store_true")
    p.set_defaults(func=_train_cmd)


__all__ = ["Progress", "Run", "RunResult", "TrainConfig", "fit", "kd_loss", "train_one_epoch", "validate"]
