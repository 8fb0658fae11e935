"""Fixtures of the pytest-benchmark suite: the COCO shapes on a GPU, the small CPU set without one."""

from __future__ import annotations

import pytest
import torch

from benchmarks.ops import Problem, make_problem
from benchmarks.shapes import COCO, SMALL


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def problems(device):
    """problems(op) -> the op's Problem, built once per session (its float64 reference is the costly part)."""
    shapes = COCO if device.type == "cuda" else SMALL
    cache: dict[str, Problem] = {}

    def get(op: str) -> Problem:
        if op not in cache:
            cache[op] = make_problem(op, shapes, device)
        return cache[op]

    return get
