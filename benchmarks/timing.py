"""Timing of one benchmark step: warm-up, then many timed repetitions, each behind an L2 flush on a GPU."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import torch

T = TypeVar("T")

# Larger than the L2 of any current GPU (H100: 50 MB): zeroing it evicts the inputs, as a real step would find
# them after the rest of the network ran (triton.testing.do_bench does the same).
L2_FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Policy:
    """How long to warm up and how many repetitions to time.

    Args:
        warmup_s: warm-up lasts at least this long...
        min_warmup: ...and at least this many calls (the first may compile or autotune Triton kernels).
        target_s: time this long in all, as far as min_reps and max_reps allow.
        min_reps, max_reps: bounds on the timed repetitions.
    """

    warmup_s: float
    min_warmup: int
    target_s: float
    min_reps: int
    max_reps: int

    def quick(self) -> Policy:
        """A fifth of the timing effort, for a fast look."""
        return replace(self, warmup_s=self.warmup_s / 5, target_s=self.target_s / 5,
                       min_reps=max(3, self.min_reps // 2), max_reps=max(3, self.max_reps // 5))


GPU_POLICY = Policy(warmup_s=0.1, min_warmup=2, target_s=0.5, min_reps=10, max_reps=200)
CPU_POLICY = Policy(warmup_s=0.05, min_warmup=1, target_s=0.3, min_reps=3, max_reps=20)


@dataclass(frozen=True)
class Timing:
    """Milliseconds per step: the median and the 20th/80th percentiles over `reps` repetitions."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def percentile(samples: list[float], q: float) -> float:
    """The q-quantile (0..1) of the samples, interpolating linearly between order statistics (as numpy does)."""
    ordered = sorted(samples)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(samples_ms: list[float]) -> Timing:
    """Median, p20 and p80 (linear interpolation) of the samples in milliseconds, and their count."""
    return Timing(percentile(samples_ms, 0.5), percentile(samples_ms, 0.2), percentile(samples_ms, 0.8),
                  len(samples_ms))


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(step: Callable[[], object], device: torch.device, policy: Policy) -> float:
    """Run the warm-up and return the duration in seconds of its last call, the estimate of one step."""
    start = time.perf_counter()
    calls, last = 0, 0.0
    while calls < policy.min_warmup or time.perf_counter() - start < policy.warmup_s:
        t0 = time.perf_counter()
        step()
        synchronize(device)
        last = time.perf_counter() - t0
        calls += 1
    return last


def measure(step: Callable[[], object], device: torch.device | str, policy: Policy) -> Timing:
    """Time `step` (one call = one benchmark step) after a warm-up.

    On a GPU each repetition is bracketed by CUDA events right after an L2 flush, and synchronised only at the end,
    so the times are GPU time with launch gaps but without host synchronisation; on the CPU, wall-clock time.
    """
    device = torch.device(device)
    estimate = _warm_up(step, device, policy)
    reps = min(policy.max_reps, max(policy.min_reps, math.ceil(policy.target_s / max(estimate, 1e-6))))
    if device.type != "cuda":
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            samples.append((time.perf_counter() - t0) * 1e3)
        return summarize(samples)

    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    return summarize([start.elapsed_time(end) for start, end in events])


def peak_memory_mb(step: Callable[[], object], device: torch.device | str) -> float | None:
    """MiB allocated at the peak of one step beyond what was allocated before it (inputs and weights not counted).

    None off CUDA, where torch keeps no such statistics.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def cuda_graph(step: Callable[[], T], device: torch.device | str, warmup: int = 2) -> Callable[[], T]:
    """`step` captured in a CUDA graph: the returned callable replays it and returns what the captured call
    returned (the same tensors, refilled by each replay). Inputs are read from where they were at the capture:
    change them in place.

    The warm-up calls run first on a side stream, as CUDA graph capture asks: lazy initialisation, Triton
    autotuning and cuBLAS workspaces must not happen inside the capture.
    """
    device = torch.device(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()

    def replay() -> T:
        graph.replay()
        return outputs
    return replay
