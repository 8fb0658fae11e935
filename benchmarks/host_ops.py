"""What a step asks of the host: the kernel-launching aten ops and the Triton launches it dispatches.

A DyHead step on a GPU is bound by the host when it is made of many small launches (tens of microseconds of
Python and dispatch each, v2 of kernels/PERF_NOTES.md). The count needs no GPU: the same ops dispatch on the CPU,
where the Triton kernels run in the interpreter (``TRITON_INTERPRET=1``). An aten op counts once however many
kernels it launches (torchvision's deformable conv included); views, allocations and the interpreter's own
work inside a Triton launch are left out.

``--time`` also times the triton backend's step with every Triton launch made a no-op after a real warm-up:
milliseconds of our Python, torch's dispatch and the small CPU aten ops per step, the part of the host cost
that does not depend on the GPU (Triton's own launcher, tens of microseconds a launch on a GPU, is left out).

``--saved`` also sums the bytes of the distinct storages that autograd keeps from the forward for the backward,
the step's inputs and parameters left out: the CPU's proxy of the activation memory behind a training step's
peak on a GPU (the GPU peak adds the backward's temporaries and the allocator's rounding).

    TRITON_INTERPRET=1 python -m benchmarks.host_ops [--backends triton,torchvision] [--blocks 1] [--top 15]
        [--time] [--saved]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dyhead import DyHead
from kernels.device_table import tables_cached_here_dropped
from kernels.runtime import INTERPRET

# Ops that allocate or describe memory without running a kernel.
NO_LAUNCH = {
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_strided.default,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.new_empty.default,
    torch.ops.aten.new_empty_strided.default,
    torch.ops.aten._unsafe_view.default,  # a view the schema does not mark as one
    torch.ops.aten.sym_size.int,
    torch.ops.aten.sym_stride.int,
    torch.ops.aten.sym_numel.default,
    torch.ops.aten.sym_storage_offset.default,
    torch.ops.aten.is_contiguous.default,
    torch.ops.aten.is_contiguous.memory_format,
}


def launches_kernel(func: torch._ops.OpOverload) -> bool:
    """Whether an aten op runs a kernel: not a view (an output aliasing an input without writing it) and not an
    allocation. In-place ops alias their input too, but write it."""
    if func in NO_LAUNCH:
        return False
    returns = func._schema.returns
    return not any(r.alias_info is not None and not r.alias_info.is_write for r in returns)


@dataclass
class HostCount:
    """Kernel-launching aten ops by name and Triton launches by kernel name, of one phase of a step."""

    aten: Counter = field(default_factory=Counter)
    triton: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.triton.values())


class _AtenCounter(TorchDispatchMode):
    def __init__(self, count: HostCount):
        super().__init__()
        self.count = count
        self.in_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_triton and launches_kernel(func):
            self.count.aten[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def _launch_classes() -> list[type]:
    """The Triton classes whose ``run`` is one kernel launch (the autotuner's ``run`` calls one of these)."""
    from triton.runtime import jit
    from triton.runtime.interpreter import InterpretedFunction
    return [jit.JITFunction, InterpretedFunction]


@contextlib.contextmanager
def _launches_replaced(wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """Within the block each launch class's ``run`` is ``wrap(run)``; the originals come back after it."""
    originals = {cls: cls.run for cls in _launch_classes()}
    for cls, run in originals.items():
        cls.run = wrap(run)
    try:
        yield
    finally:
        for cls, run in originals.items():
            cls.run = run


@contextlib.contextmanager
def counting(count: HostCount) -> Iterator[None]:
    """Count into ``count`` what the enclosed code dispatches, on this thread and autograd's."""
    mode = _AtenCounter(count)

    def wrap(run):
        @functools.wraps(run)
        def counted(self, *args, **kwargs):
            if kwargs.get("warmup"):
                return run(self, *args, **kwargs)
            count.triton[getattr(self, "__name__", None) or self.fn.__name__] += 1
            mode.in_triton += 1
            try:
                return run(self, *args, **kwargs)
            finally:
                mode.in_triton -= 1
        return counted

    with _launches_replaced(wrap), mode:
        yield


@contextlib.contextmanager
def launches_stubbed() -> Iterator[None]:
    """Within the block every Triton launch returns at once without running its kernel (outputs keep whatever
    their allocations held): only the host's work around the launches is left. The shape tables cached within
    it were never written: they leave the cache with the block."""
    with tables_cached_here_dropped(), _launches_replaced(lambda run: lambda self, *args, **kwargs: None):
        yield


def time_step(forward: Callable[[], list[torch.Tensor]], inputs: list[torch.Tensor], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``forward`` plus the gradients of ``inputs``, Triton launches
    stubbed (`launches_stubbed`). Call it on a warmed-up step: the launches it stubs would otherwise have
    autotuned, compiled and filled caches."""
    def step():
        outputs = forward()
        torch.autograd.grad(outputs, inputs, [torch.ones_like(y) for y in outputs])

    seconds = []
    with launches_stubbed():
        step()
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start)
    return seconds


def count_step(forward: Callable[[], list[torch.Tensor]], inputs: list[torch.Tensor]) -> tuple[HostCount, HostCount]:
    """(forward, backward) counts of one call of ``forward`` and of the gradients of ``inputs`` given gradients
    of its outputs (made before counting, as a loss's backward would hand them in).

    Call it on a warmed-up step: first calls autotune, compile and fill caches."""
    fwd, bwd = HostCount(), HostCount()
    with counting(fwd):
        outputs = forward()
    grads = [torch.ones_like(y) for y in outputs]
    with counting(bwd):
        torch.autograd.grad(outputs, inputs, grads)
    return fwd, bwd


def saved_bytes(forward: Callable[[], list[torch.Tensor]], inputs: list[torch.Tensor]) -> tuple[int, int]:
    """(bytes, storages) that autograd keeps for the backward of one call of ``forward``: distinct storages,
    each counted whole, the storages of ``inputs`` left out (they exist without the step)."""
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        forward()
    for t in inputs:
        storages.pop(t.untyped_storage().data_ptr(), None)
    return sum(storages.values()), len(storages)


def dyhead_step(backend: str, *, channels: int, batch: int, num_levels: int, num_blocks: int, size: int,
                device: str, dtype: torch.dtype) -> tuple[Callable[[], list[torch.Tensor]], list[torch.Tensor]]:
    """A DyHead forward on random levels (finest ``size`` x ``size``) returning its output levels, and the tensors
    a training step differentiates (the levels and every parameter)."""
    gen = torch.Generator().manual_seed(0)
    model = DyHead(channels, channels, num_blocks, backend=backend).to(device, dtype)
    sizes = [size]
    for _ in range(num_levels - 1):
        sizes.append(-(-sizes[-1] // 2))
    levels = [torch.randn(batch, channels, s, s, generator=gen, dtype=dtype).to(device).requires_grad_()
              for s in sizes]

    def forward() -> list[torch.Tensor]:
        return model(levels)

    return forward, [*levels, *model.parameters()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="triton,torchvision", help="comma-separated DyHead backends")
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--levels", type=int, default=5)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=16, help="the finest level's height and width")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--top", type=int, default=12, help="list this many most frequent ops per backend (0: none)")
    p.add_argument("--time", action="store_true",
                   help="also time the triton backend's step with Triton launches stubbed (host milliseconds)")
    p.add_argument("--repeats", type=int, default=30, help="timed steps for --time")
    p.add_argument("--saved", action="store_true",
                   help="also sum the bytes autograd keeps for the backward (activation memory, per backend)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    if "triton" in backends and args.device == "cpu" and not INTERPRET:
        print("the triton backend on the CPU needs TRITON_INTERPRET=1 (set before Python starts)", file=sys.stderr)
        return 2
    print(f"per step of {args.blocks} block(s), {args.levels} levels, batch {args.batch}, {args.channels} channels, "
          f"finest {args.size}x{args.size}, {args.device}: kernel-launching aten ops + Triton launches")
    print(f"{'backend':<12} {'fwd aten':>9} {'fwd triton':>11} {'bwd aten':>9} {'bwd triton':>11} {'total':>7}")
    tops, seconds, saved = [], [], []
    for backend in backends:
        forward, params = dyhead_step(backend, channels=args.channels, batch=args.batch, num_levels=args.levels,
                                      num_blocks=args.blocks, size=args.size, device=args.device,
                                      dtype=torch.float32)
        count_step(forward, params)  # warm-up: autotuning, compiles, shape constants
        fwd, bwd = count_step(forward, params)
        print(f"{backend:<12} {sum(fwd.aten.values()):>9} {sum(fwd.triton.values()):>11} "
              f"{sum(bwd.aten.values()):>9} {sum(bwd.triton.values()):>11} {fwd.total + bwd.total:>7}")
        tops.append((backend, fwd, bwd))
        if args.time and backend == "triton":
            seconds = time_step(forward, params, args.repeats)
        if args.saved:
            saved.append((backend, *saved_bytes(forward, params)))
    if seconds:
        print(f"\ntriton host time per step, Triton launches stubbed: median {statistics.median(seconds) * 1e3:.3f} "
              f"ms (min {min(seconds) * 1e3:.3f}) of {args.repeats} steps on {torch.get_num_threads()} thread(s)")
    if saved:
        print("\nkept for the backward (distinct storages, inputs and parameters left out):")
        for backend, nbytes, count in saved:
            ratio = f", {nbytes / saved[-1][1]:.2f}x of {saved[-1][0]}" if len(saved) > 1 else ""
            print(f"{backend:<12} {nbytes / 2**20:.2f} MiB in {count} storages{ratio}")
    for backend, fwd, bwd in tops if args.top else []:
        for phase, count in (("forward", fwd), ("backward", bwd)):
            ops = (count.aten + Counter({f"triton:{k}": v for k, v in count.triton.items()})).most_common(args.top)
            print(f"\n{backend} {phase}: " + ", ".join(f"{name} {n}" for name, n in ops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
