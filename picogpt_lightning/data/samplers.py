"""Train-loader samplers that shard across DDP ranks themselves and resume part-way through an epoch.

Lightning injects a DistributedSampler into a loader only when the loader's sampler is not one
already (Trainer's `use_distributed_sampler`). These samplers are DistributedSamplers, so under
DDP Lightning keeps them as they are, and they take this rank's share themselves; the data
module passes them the world size and rank. Validation loaders have no sampler of their own, so
there Lightning does inject its DistributedSampler.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized

import torch
from torch.utils.data import DistributedSampler

from picogpt_lightning.errors import UserError


class ResumableSampler(DistributedSampler):
    """A shuffled order that depends only on ``seed`` and the epoch, sharded across ranks, resumable mid-epoch.

    The order and the sharding are DistributedSampler's (``randperm`` seeded with ``seed + epoch``, rank r
    taking every ``num_replicas``-th index), so a run gives the batches Lightning's own sampler would.
    ``resume_at(n)`` makes the next pass start after the first n samples of this rank's share: the rest
    of an interrupted epoch, so a resumed run sees exactly the batches the uninterrupted run would have.
    ``len`` stays the whole share, as Lightning counts the restored batches.
    """

    def __init__(self, dataset: Sized, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def epoch_order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=generator).tolist()

    def resume_at(self, samples_done: int) -> None:
        self.start = samples_done

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        while len(order) < self.total_size:  # repeat the start so every rank gets as many (DistributedSampler's rule)
            order += order[: self.total_size - len(order)]
        start, self.start = self.start, 0  # only the first pass after a resume starts part-way
        return iter(order[self.rank : self.total_size : self.num_replicas][start:])


class LengthGroupedSampler(ResumableSampler):
    """Random order in which neighbouring samples have similar lengths, so batches carry little padding.

    Shuffles all indices, cuts them into megabatches of ``megabatch_size * batch_size`` and sorts each
    megabatch by length (longest first), the idea behind transformers' ``group_by_length``. The order
    depends only on ``seed`` and the epoch set by ``set_epoch``, so every rank computes the same order
    and takes its own share of it (neighbours in the order, so a rank's batches stay grouped too).
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int = 0, megabatch_size: int = 50,
        num_replicas: int = 1, rank: int = 0,
    ):
        if batch_size < 1 or megabatch_size < 1:
            raise UserError(f"batch_size and megabatch_size must be positive, got {batch_size} and {megabatch_size}")
        super().__init__(lengths, seed=seed, num_replicas=num_replicas, rank=rank)
        self.lengths = list(lengths)
        self.group_size = megabatch_size * batch_size * num_replicas

    def epoch_order(self) -> list[int]:
        order = super().epoch_order()
        grouped = []
        for start in range(0, len(order), self.group_size):
            group = order[start : start + self.group_size]
            grouped += sorted(group, key=lambda index: self.lengths[index], reverse=True)
        return grouped


class RunningSampler(ResumableSampler):
    """Sample numbers that run on across epochs: epoch e yields e * len(dataset) + i for this rank's i.

    Rank r takes positions r, r + world, r + 2 * world, ... of each epoch, so ranks never share a
    number. Nothing is shuffled or held in memory: a dataset that turns each number into its own
    window (StoreWindows) gets fresh windows at every step, however large the corpus.
    """

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0  # only the first pass after a resume starts part-way
        size, base = len(self.dataset), self.epoch * len(self.dataset)
        # positions past the end wrap to the start, so every rank gets as many (DistributedSampler's rule)
        return (base + (self.rank + k * self.num_replicas) % size for k in range(start, self.num_samples))
