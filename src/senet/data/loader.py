"""Loaders whose every batch is a pure function of (seed, epoch, step): resumable bit for bit.

Positioning a loader at epoch e, step s (e.g. to resume a run killed mid-epoch)::

    loaders = create_loaders(bundle, 128, workers=4, seed=run_seed)
    loaders.train.set_epoch(e, start_step=s)   # before iterating; s = batches already done in epoch e
    for x, y in loaders.train: ...             # yields batches s, s+1, ... of epoch e

The sample order of epoch e is DistributedSampler's (a permutation seeded from the run seed and e,
padded so every rank gets as many batches) cut into batches; each sample's augmentation is seeded
from (seed, e, sample index). Neither depends on worker count, on the global RNG, or on where
iteration started, so batches s.. after a resume equal batches s.. of an uninterrupted epoch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from ._common import DataBundle, DataProblems, SkippedSample
from .memory import Batch, InMemoryImages, Samples
from .transforms import mix_seed, sample_seed


class EpochBatchSampler(Sampler):
    """Batches of ``(index, sample_seed)`` for one rank; order and seeds fixed by (seed, epoch).

    shuffle=True (training): DistributedSampler's permutation and padding (every rank gets
    ceil(N / replicas) samples, so DDP ranks step in lockstep). shuffle=False (evaluation): rank r
    takes indices r, r + replicas, ... with no padding, so no sample is counted twice.
    """

    def __init__(self, size: int, batch_size: int, *, shuffle: bool, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in 0..{num_replicas - 1}")
        self.size, self.batch_size, self.shuffle = size, batch_size, shuffle
        self.seed, self.num_replicas, self.rank, self.drop_last = seed, num_replicas, rank, drop_last
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch ``epoch`` from batch ``start_step`` on (until the next ``set_epoch``)."""
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step={start_step} is outside 0..{len(self)} (batches per epoch)")
        self.epoch, self.start_step = int(epoch), int(start_step)

    def indices(self) -> list[int]:
        """This rank's sample indices for the current epoch, in order."""
        if not self.shuffle:
            return list(range(self.rank, self.size, self.num_replicas))
        order = DistributedSampler(range(self.size), num_replicas=self.num_replicas, rank=self.rank,
                                   shuffle=True, seed=mix_seed(self.seed), drop_last=False)
        order.set_epoch(self.epoch)
        return list(order)

    def _count(self) -> int:
        if self.shuffle:
            return -(-self.size // self.num_replicas)  # DistributedSampler pads to ceil(N / R)
        return len(range(self.rank, self.size, self.num_replicas))

    def __len__(self) -> int:
        """Batches in a whole epoch (not counting ``start_step``)."""
        n = self._count()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        idx = self.indices()
        for step in range(self.start_step, len(self)):
            chunk = idx[step * self.batch_size:(step + 1) * self.batch_size]
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in chunk]


def collate(items: list) -> Batch:
    """Stack (image, label) samples into a ``Batch``, setting ``SkippedSample``s aside."""
    if isinstance(items, Samples):  # InMemoryImages.__getitems__ built the batch already
        return items.batch
    good = [it for it in items if not isinstance(it, SkippedSample)]
    skipped = [it for it in items if isinstance(it, SkippedSample)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    return Batch(torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), skipped)


class EpochLoader(DataLoader):
    """A DataLoader yielding ``(images (B, C, H, W), labels (B,))``; see the module doc for resuming.

    Skipped files are recorded in ``problems`` (the bundle's); a batch left empty by them is not
    yielded (steps still count from the sampler, so resume positions stay valid). Iterating never
    touches the global RNG.
    """

    def __init__(self, dataset, batch_sampler: EpochBatchSampler, *, workers: int, problems: DataProblems,
                 pin_memory: bool = False):
        # A private generator: the DataLoader draws its worker base seed from it at every iter(), which
        # would otherwise consume the global RNG (and shift the model's dropout draws on resume).
        super().__init__(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate,
                         pin_memory=pin_memory, generator=torch.Generator().manual_seed(batch_sampler.seed))
        self.problems = problems

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.batch_sampler.set_epoch(epoch, start_step)

    def __iter__(self):
        for images, labels, skipped in super().__iter__():
            for s in skipped:
                self.problems.add(s.path, s.reason)
            if len(labels):
                yield images, labels


class Loaders(NamedTuple):
    train: EpochLoader
    val: EpochLoader


def _world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 1, 0
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs an initialised process group: launch with torchrun and call "
                         "torch.distributed.init_process_group first")
    return dist.get_world_size(), dist.get_rank()


def create_loaders(bundle: DataBundle, batch_size: int, *, workers: int = 0, distributed: bool = False,
                   seed: int = 0, drop_last: bool = False, pin_memory: bool = False) -> Loaders:
    """Train (shuffled, augmented) and val (in order) loaders for ``bundle``.

    ``batch_size`` is per process. ``distributed``: shard across the initialised process group's
    ranks (val shards are uneven by at most one sample: sum counts across ranks). In-memory data
    (digits, CIFAR) is batched vectorised in the main process, so ``workers`` is ignored for it.
    """
    if workers < 0:
        raise ValueError(f"workers={workers} must be 0 (load in the main process) or more")
    replicas, rank = _world(distributed)

    def make(ds, shuffle: bool) -> EpochLoader:
        sampler = EpochBatchSampler(len(ds), batch_size, shuffle=shuffle, seed=seed, num_replicas=replicas,
                                    rank=rank, drop_last=drop_last and shuffle)
        w = 0 if isinstance(ds, InMemoryImages) else workers
        return EpochLoader(ds, sampler, workers=w, problems=bundle.problems, pin_memory=pin_memory)

    return Loaders(make(bundle.train, True), make(bundle.val, False))
