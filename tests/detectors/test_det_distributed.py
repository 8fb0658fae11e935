"""The process-group helpers on 2 CPU processes (gloo)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import detectors.engine.train as engine
from detectors.engine.distributed import all_gather_objects, get_rank, get_world_size, sum_across_processes


def _on_process(rank: int, work, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        result = work(rank)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def _on_two_processes(work, tmp_path):
    """``work(rank)`` on 2 gloo processes; what rank 0's returned."""
    out = tmp_path / "result.pt"
    mp.spawn(_on_process, args=(work, str(tmp_path / "store"), str(out)), nprocs=2)
    return torch.load(out)


def _evaluate_after_a_step(rank: int) -> list:
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    model(torch.randn(2, 3, 5, 5) + rank).sum().backward()  # each process's own batch statistics
    evaluated = engine._evaluation_model(model)
    assert evaluated is model.module
    return all_gather_objects([b.clone() for b in evaluated.buffers()])


@pytest.mark.slow
def test_every_process_evaluates_rank_0s_running_statistics(tmp_path):
    first, second = _on_two_processes(_evaluate_after_a_step, tmp_path)
    assert not torch.equal(first[0], torch.zeros(4))  # the step updated the running mean
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _reduce_and_gather(rank: int) -> dict:
    value = torch.tensor([1.0, 10.0]) * (rank + 1)
    summed = sum_across_processes(value)
    gathered = all_gather_objects({"rank": rank})
    return {"summed": summed, "value": value, "gathered": gathered, "rank": get_rank(),
            "world_size": get_world_size()}


@pytest.mark.slow
def test_losses_are_summed_and_objects_gathered_across_processes(tmp_path):
    """What the training log's losses (their mean over processes) and the evaluation's detections rest on."""
    result = _on_two_processes(_reduce_and_gather, tmp_path)
    assert result["summed"].tolist() == [3.0, 30.0] and result["value"].tolist() == [1.0, 10.0]  # input untouched
    assert result["gathered"] == [{"rank": 0}, {"rank": 1}]  # in rank order
    assert (result["rank"], result["world_size"]) == (0, 2)


def test_the_device_is_this_processs_gpu_when_there_is_one(monkeypatch):
    """``auto`` takes CUDA where there is one, on the GPU of LOCAL_RANK, as ``cuda`` does; a single process joins
    no group."""
    from detectors.engine.distributed import init_distributed

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert init_distributed("auto") == torch.device("cuda", 1) and chosen == [1]
    assert init_distributed("cuda") == torch.device("cuda", 1) and chosen == [1, 1]
    assert init_distributed("cpu") == torch.device("cpu") and chosen == [1, 1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert init_distributed("auto") == torch.device("cpu")
    assert not dist.is_initialized() and get_world_size() == 1 and get_rank() == 0
