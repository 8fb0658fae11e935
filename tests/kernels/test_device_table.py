"""kernels.device_table: int64 tables written by a kernel from its arguments, against torch.tensor of the same
values. Run under TRITON_INTERPRET=1 on the CPU, compiled on a GPU."""

import os

import pytest
import torch

import kernels.device_table
from kernels.device_table import cached_device_table, device_table, device_tables, encode, tables_cached_here_dropped
from kernels.runtime import INTERPRET

DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET,
                                reason="the kernel needs a GPU or TRITON_INTERPRET=1")

# What a level table holds, and the values the encoding must get right: 0, 1, multiples of 16, negatives, int32
# limits, addresses.
VALUES = [0, 1, -1, 16, 17, -16, 100, 168, 2**31 - 1, 2**31, -2**31, 2**47 + 24, 0x7F3A_1C00_0200, 2**55 - 1,
          -(2**55) + 1]


def test_values_round_trip():
    table = device_table(VALUES, torch.device(DEVICE))
    assert table.dtype == torch.int64 and table.device.type == DEVICE
    assert torch.equal(table.cpu(), torch.tensor(VALUES, dtype=torch.int64))
    assert device_table([-7], torch.device(DEVICE)).tolist() == [-7]


def test_encoding_specializes_alike():
    # Triton specializes int arguments on width, == 1 and divisibility by 16: every encoded value must look the
    # same to it, so that one compile serves every table of a length.
    for e in encode(VALUES):
        assert 2**31 <= e < 2**63 and e % 16 == 1


def test_several_tables_in_one_launch():
    a, b, c = device_tables(torch.device(DEVICE), [3, 4], [], [5, 2**40, -7])
    assert a.tolist() == [3, 4] and b.tolist() == [] and c.tolist() == [5, 2**40, -7]


def test_cached_table_written_once_per_content():
    device = torch.device(DEVICE)
    values = [7, 2**33 + 5, -3, 4096 + os.getpid()]  # the pid: contents no other test caches
    first = cached_device_table(values, device)
    assert torch.equal(first.cpu(), torch.tensor(values, dtype=torch.int64))
    assert cached_device_table(tuple(values), device) is first  # the same table, not a new launch
    other = cached_device_table(values[:-1] + [values[-1] + 1], device)
    assert other is not first and other[-1].item() == values[-1] + 1


def test_cached_tables_per_device_and_not_from_a_graph_capture(monkeypatch):
    """The same values on another device are another table; one written during a CUDA graph capture belongs to
    the capture's memory pool and is not kept; a block's drop leaves the tables cached before it."""
    writes = []
    capturing = []
    monkeypatch.setattr(kernels.device_table, "device_table",
                        lambda values, device: writes.append(device.type) or torch.tensor(values))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: bool(capturing))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    values = [11, 4096 + os.getpid()]
    with tables_cached_here_dropped():
        on_cpu = cached_device_table(values, cpu)
        with tables_cached_here_dropped():
            on_gpu = cached_device_table(values, cuda)
            assert on_gpu is not on_cpu and cached_device_table(values, cuda) is on_gpu
        assert cached_device_table(values, cpu) is on_cpu
        capturing.append(True)
        captured = cached_device_table(values[::-1], cuda)
        assert cached_device_table(values[::-1], cuda) is not captured
    assert writes == ["cpu", "cuda", "cuda", "cuda"]


def test_empty_table():
    assert device_table([], torch.device(DEVICE)).shape == (0,)


@pytest.mark.parametrize("bad", [2**55, -(2**55), 1.5, True], ids=["too-large", "too-small", "float", "bool"])
def test_bad_values_raise(bad):
    with pytest.raises(ValueError, match="2\\*\\*55"):
        device_table([1, bad], torch.device(DEVICE))
