"""The process-group helpers on 2 CPU processes (gloo)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import detectors.engine.train as engine


def _evaluate_after_a_step(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
        model(torch.randn(2, 3, 5, 5) + rank).sum().backward()  # each process's own batch statistics
        evaluated = engine._evaluation_model(model)
        assert evaluated is model.module
        buffers = [b.clone() for b in evaluated.buffers()]
        gathered = [None, None]
        dist.all_gather_object(gathered, buffers)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_process_evaluates_rank_0s_running_statistics(tmp_path):
    out = tmp_path / "buffers.pt"
    mp.spawn(_evaluate_after_a_step, args=(str(tmp_path / "store"), str(out)), nprocs=2)
    first, second = torch.load(out)
    assert not torch.equal(first[0], torch.zeros(4))  # the step updated the running mean
    for a, b in zip(first, second):
        assert torch.equal(a, b)
