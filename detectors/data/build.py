"""Datasets and data loaders from a ``Config``."""

from __future__ import annotations

import atexit
import multiprocessing
import signal
from functools import partial

import torch
from torch.utils.data import DataLoader

from ..config import Config, ConfigError
from .coco import CocoDetection, DatasetError, collate, resolve_dataset
from .samplers import InferenceBatchSampler, TrainBatchSampler
from .transforms import DetectionTransform

__all__ = ["build_dataset", "build_train_loader", "build_test_loader"]


def build_dataset(cfg: Config, train: bool) -> CocoDetection:
    """The training split (images without boxes removed) or the test split, with their transforms."""
    spec = cfg.data.train if train else cfg.data.test
    image_dir, ann_file = resolve_dataset(spec, cfg.data.shapes)
    return CocoDetection(
        image_dir,
        ann_file,
        DetectionTransform.from_config(cfg.data.input, train),
        remove_empty=train,
        skip_bad_images=cfg.data.skip_bad_images,
    )


def _ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker leaves SIGINT/SIGTERM to the main process, which stops training with a checkpoint
    (`engine.stop`). Ctrl-C, ``timeout`` and cluster schedulers signal the whole process group: a worker that
    died of it would make the main process fail at its next batch, before it could save. Workers still exit
    when the main process does (`_kill_loader_workers`)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def _kill_loader_workers() -> None:
    """Kills the daemonic children (loader workers) still alive when the main process exits. multiprocessing's own
    exit handler ends them with SIGTERM, which they ignore, and then waits for them: forever, where an error left a
    loader's iterator alive (its traceback's frames hold it), as a bad image in a worker did. torch's SIGCHLD
    handler, which reports a worker that died of a signal as a failure, is let go first: the process is done."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()


# Registered after multiprocessing's handler (imported with torch), so run before it: atexit runs the last first.
atexit.register(_kill_loader_workers)


def _loader(cfg: Config, dataset: CocoDetection, batch_sampler) -> DataLoader:
    workers = cfg.data.num_workers
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=partial(collate, size_divisibility=cfg.data.input.size_divisibility),
        prefetch_factor=2 if workers > 0 else None,
        # Each iter() draws the workers' base seed from this generator. Left to torch's global one, that draw
        # would shift the model's random stream (Faster R-CNN's box sampling) on resume, which restores the
        # stream before the loader starts. The augmentation is seeded per item (the sampler's keys).
        generator=torch.Generator().manual_seed(cfg.seed),
        worker_init_fn=_ignore_stop_signals,
    )


def build_train_loader(cfg: Config, dataset: CocoDetection, rank: int, world_size: int, start_batch: int) -> DataLoader:
    """Endless training batches of ``ims_per_batch / world_size`` images, skipping ``start_batch``."""
    if cfg.solver.ims_per_batch % world_size:
        raise ConfigError(f"solver.ims_per_batch={cfg.solver.ims_per_batch} is not divisible by {world_size} processes")
    groups = dataset.aspect_groups() if cfg.data.aspect_ratio_grouping else [0] * len(dataset)
    try:
        sampler = TrainBatchSampler(
            groups, cfg.solver.ims_per_batch // world_size, cfg.seed, rank, world_size, start_batch=start_batch
        )
    except ValueError as exc:  # fewer images than processes
        raise DatasetError(f"{dataset.ann_file}: {exc}") from None
    return _loader(cfg, dataset, sampler)


def build_test_loader(cfg: Config, dataset: CocoDetection, rank: int, world_size: int) -> DataLoader:
    """This process's share of the test set, in order."""
    return _loader(cfg, dataset, InferenceBatchSampler(len(dataset), cfg.data.test_ims_per_batch, rank, world_size))
