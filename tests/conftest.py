"""Seeds torch's global generator per test, so that a test's random data does not depend on which tests ran
before it in the same pytest-xdist worker (a bound that holds for one draw may fail for another)."""
from __future__ import annotations

import zlib

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch_per_test(request: pytest.FixtureRequest) -> None:
    # crc32 of the test id rather than hash(): str hashes are salted per process
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
