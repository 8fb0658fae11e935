"""Process-group helpers: work the same whether or not the script was started by ``torchrun``."""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from ..config import ConfigError

__all__ = [
    "init_distributed",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "sum_across_processes",
    "all_gather_objects",
    "barrier",
    "broadcast_buffers",
]


def is_distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank, 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes, 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 writes logs, metrics and checkpoints."""
    return get_rank() == 0


def init_distributed(device: str) -> torch.device:
    """Joins the process group that ``torchrun`` describes in the environment, if any.

    Args:
        device: ``auto``, ``cpu`` or ``cuda``; ``auto`` picks CUDA when available.

    Returns:
        This process's device (``cuda:LOCAL_RANK`` on GPUs). NCCL is used on CUDA, gloo on the CPU.

    Raises:
        ConfigError: ``cuda`` where torch finds no CUDA device (torch's own error is a traceback about drivers).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda, but torch finds no CUDA device (torch.cuda.is_available() is false); "
                          "set device to auto or cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return dev


def sum_across_processes(value: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over all processes (the tensor itself when not distributed); not differentiable."""
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Waits for every process (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copies rank 0's buffers (BatchNorm's running statistics) into every process's ``module`` (no-op when not
    distributed)."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)
