"""Small int64 tables (level sizes, strides, data pointers) written on the device by a kernel that takes the
values as its arguments.

A host-to-device copy of such a table cannot live in a CUDA graph: the captured copy would read, at every
replay, host memory that was freed after the capture. Kernel arguments are part of the captured launch, so a
graph replays the table it was captured with, which is the right one: a replay reuses the captured addresses.
Eager calls pay one small launch instead of one copy.

Triton specializes every int of a tuple argument on its width (i32/i64), on == 1 and on divisibility by 16, and
`do_not_specialize` does not reach into tuples: each new pattern of values would compile again. The values are
therefore passed encoded as ``(v << 4) + 1 + _BIAS``: always i64, odd, never 1, one compile per table length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import triton
import triton.language as tl

_BIAS = tl.constexpr(1 << 60)
_LIMIT = 1 << 55  # |v| below this keeps the encoding inside int64


@triton.jit
def _write_kernel(out_ptr, encoded, COUNT: tl.constexpr):
    """out[i] = decode(encoded[i]) for i < COUNT (one program)."""
    for i in tl.static_range(COUNT):
        tl.store(out_ptr + i, (encoded[i] - _BIAS) >> 4)


def device_table(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """values (Python ints, |v| < 2**55: sizes, strides, element offsets, data pointers) as an int64 tensor
    (len(values),) on device, written by one kernel launch (no host-to-device copy: CUDA-graph safe).

    CPU devices need ``TRITON_INTERPRET=1``, like every kernel here.

    Raises:
        ValueError: a value that is not an int or is out of range (see `encode`).
    """
    encoded = encode(values)
    out = torch.empty((len(encoded),), dtype=torch.int64, device=device)
    if encoded:
        _write_kernel[(1,)](out, encoded, COUNT=len(encoded), num_warps=1)
    return out


# cached_device_table's tables by (values, device). Never evicted: a CUDA graph that read one must find it at
# every replay. Only tables of shapes go here, so a run keeps as many as it sees pyramid sizes (a few KB each).
_CACHE: dict[tuple, torch.Tensor] = {}


def cached_device_table(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """`device_table(values, device)`, written once per content and device and then reused: no launch per call.

    For tables that depend on shapes only (sizes, element offsets): data pointers would grow the cache without
    end. Inside a CUDA graph capture an unseen table is written as `device_table` writes it and not kept (the
    capture's memory pool owns it).
    """
    key = (tuple(values), device)
    table = _CACHE.get(key)
    if table is None:
        table = device_table(values, device)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _CACHE[key] = table
    return table


@contextlib.contextmanager
def tables_cached_here_dropped() -> Iterator[None]:
    """`cached_device_table` forgets at the end of the block the tables it cached within it. For blocks that
    stub out Triton launches (`benchmarks.host_ops`): their tables were never written, and a later real launch
    reading one from the cache would take garbage for sizes and offsets."""
    before = set(_CACHE)
    try:
        yield
    finally:
        for key in set(_CACHE) - before:
            del _CACHE[key]


def encode(values: Sequence[int]) -> tuple[int, ...]:
    """The kernel's arguments for values: each ``(v << 4) + 1 + 2**60``, in [2**59, 2**61) and 1 modulo 16.

    Raises:
        ValueError: a value that is not an int or is out of range.
    """
    # Whole-list checks first: this runs at every grouped launch, and a per-value loop costs more than the launch.
    if values and (not set(map(type, values)) <= {int} or min(values) <= -_LIMIT or max(values) >= _LIMIT):
        bad = next(v for v in values if type(v) is not int or not -_LIMIT < v < _LIMIT)
        raise ValueError(f"device_table takes ints of magnitude below 2**55, got {bad!r}")
    offset = 1 + _BIAS.value
    return tuple([(v << 4) + offset for v in values])


def device_tables(device: torch.device, *tables: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Several int64 tables written by one launch (`device_table` of their concatenation): views, one per
    table."""
    flat = device_table([v for table in tables for v in table], device)
    return flat.split([len(table) for table in tables])
