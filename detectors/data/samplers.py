"""Deterministic, resumable batch samplers for training and sharded evaluation."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["TrainBatchSampler", "InferenceBatchSampler"]


class TrainBatchSampler(Sampler):
    """An endless stream of training batches, the same for a given seed whatever the worker count.

    Epoch ``e`` visits the images in the order ``randperm(n, seed + e)``. Process ``rank`` of ``world_size``
    takes every ``world_size``-th image of that stream; with aspect-ratio grouping, images wait in one
    bucket per group until a bucket holds ``batch_size``. Each item is ``(index, (seed, epoch, position))``,
    the second part seeding that image's augmentation. ``start_batch`` batches are skipped (without loading
    any image) so that a resumed run sees exactly the batches the uninterrupted run would have.

    Args:
        group_ids: aspect-ratio group of each image (all zeros to disable grouping).
        batch_size: images per batch in this process.
        seed: data-order seed shared by all processes.
        rank, world_size: this process's share of the stream.
        start_batch: number of batches to skip.
    """

    def __init__(
        self, group_ids: list[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start_batch: int = 0
    ):
        if len(group_ids) < world_size:  # a process without an image would wait for its first batch forever
            raise ValueError(f"cannot sample batches for {world_size} processes from {len(group_ids)} images")
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch

    def _batches(self) -> Iterator[list[tuple[int, tuple[int, int, int]]]]:
        n = len(self.group_ids)
        buckets: dict[int, list] = {}
        epoch = 0
        while True:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            for position in range(self.rank, n, self.world_size):
                index = order[position]
                bucket = buckets.setdefault(self.group_ids[index], [])
                bucket.append((index, (self.seed, epoch, position)))
                if len(bucket) == self.batch_size:
                    yield bucket[:]
                    bucket.clear()
            epoch += 1

    def __iter__(self) -> Iterator[list[tuple[int, tuple[int, int, int]]]]:
        batches = self._batches()
        for _ in range(self.start_batch):
            next(batches)
        yield from batches


class InferenceBatchSampler(Sampler):
    """Process ``rank`` takes images ``rank, rank + world_size, ...`` in order, in batches; no image is
    repeated, so gathered results cover the set exactly once.

    Args:
        size: number of images.
        batch_size: images per batch in this process.
        rank, world_size: this process's share.
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, size, world_size))
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, len(self.indices), self.batch_size):
            yield self.indices[start : start + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)
