"""python -m benchmarks.compile_check: compile every Triton kernel of the triton path for a GPU, without one.

The real wrappers run on CPU tensors: the deformable conv alone (forward and backward, atomic and deterministic), a
DyHead block on the triton backend (grouped convs and the fused level pass, forward and backward), the one-map
moments and the one-level combine. Each kernel launch they make is turned into a compile for the target instead,
through Triton's own binder, so every specialization and every autotune config the pruners keep is compiled as a GPU
run would compile it. Nothing runs: the outputs are garbage and the run proves only that the kernels build, and what
they cost in registers, stack (spills), shared memory and the width of their global loads and stores (in the JSON).

    python -m benchmarks.compile_check                              # sm_90, every dtype, COCO shapes
    python -m benchmarks.compile_check --dtypes bfloat16 --shapes small --first-config --json out.json

Exits 1 if any kernel failed to compile (all failures are listed) or if a kernel of the `kernels` package was
never launched (the workloads no longer cover it). Needs the ``ptxas`` and ``cuobjdump`` that
Triton's wheel ships; TRITON_INTERPRET must be unset (the interpreter has nothing to compile).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

from kernels.runtime import INTERPRET

from .run import name_list

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
# (channels, batch, level sizes finest first): the COCO pyramid of the benchmarks, or a few pixels per level.
# Triton specializes integer arguments on divisibility by 16, so the COCO sizes compile what a COCO run compiles.
SHAPES = {
    "coco": (256, 2, [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]),
    # The first level has more pixels than one reduction run (level_pass.RUN_ALIGN), so the moments merge too.
    "small": (256, 1, [(24, 32), (12, 16), (6, 8)]),
}
SM_COUNTS = {80: 108, 86: 84, 89: 128, 90: 132, 100: 148, 120: 170}


@dataclass
class Compiled:
    """One compiled specialization: the kernel, its constexprs and launch config, and what ptxas made of it."""

    kernel: str
    workload: str
    dtype: str
    constexprs: dict
    num_warps: int
    num_stages: int
    registers: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    compile_s: float = 0.0
    global_ops: dict = field(default_factory=dict)
    error: str | None = None


@dataclass
class Session:
    """What the interception saw while a workload ran."""

    arch: int
    first_config: bool
    workload: str = ""
    dtype: str = ""
    records: list[Compiled] = field(default_factory=list)


class _TargetDriver:
    """Stands in for Triton's CUDA driver: reports the target and device 0, and launches nothing."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self) -> bool:
        return True


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack frame bytes) of the one function in a cubin, from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    registers = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    if registers is None or stack is None:
        raise RuntimeError(f"unexpected cuobjdump output: {text[:500]}")
    return int(registers.group(1)), int(stack.group(1))


def defined_kernels() -> set[str]:
    """Names of the launchable Triton kernels of every `kernels` module: the ``@triton.jit`` functions, autotuned
    or not, named ``*_kernel`` (the others are device functions that kernels call)."""
    import kernels
    from triton.runtime.jit import JITFunction, KernelInterface

    names = set()
    for info in pkgutil.iter_modules(kernels.__path__, "kernels."):
        for value in vars(importlib.import_module(info.name)).values():
            if isinstance(value, KernelInterface):
                while not isinstance(value, JITFunction):
                    value = value.fn
                if value.fn.__name__.endswith("_kernel"):
                    names.add(value.fn.__name__)
    return names


# A global memory instruction of the PTX, with the byte count of a cp.async (its third operand, often in hex).
_GLOBAL_OP = re.compile(r"^\s*(?:@!?%p\d+\s+)?((?:ld|st|atom|red)\.global[\w.]*|cp\.async\.c[ag]\.shared\.global[\w.]*)"
                        r"(?:\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+))?", re.M)


def global_ops(ptx: str) -> dict[str, int]:
    """Counts of the PTX's global memory instructions by opcode (with width), a cp.async keyed ``op/bytes``:
    how wide the kernel's loads and stores came out, e.g. ``{"cp.async.cg.shared.global/16": 24}``."""
    counts: dict[str, int] = {}
    for op, size in _GLOBAL_OP.findall(ptx):
        key = f"{op}/{int(size, 0)}" if size else op
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _constexprs(jit_fn, kwargs: dict) -> dict:
    names = {p.name for p in jit_fn.params if p.is_constexpr}
    return {k: (v if isinstance(v, (int, float, bool, str)) else str(v)) for k, v in kwargs.items() if k in names}


@contextlib.contextmanager
def intercept_launches(session: Session) -> Iterator[None]:
    """Within the block, a Triton launch compiles the kernel for ``session.arch`` and records it instead of
    running; an autotuned launch compiles every config its pruner keeps (the first only with
    ``session.first_config``). The kernels' device checks let CPU tensors through (`kernels.runtime`)."""
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from kernels.runtime import compile_only

    jit_run, autotuner_run = JITFunction.run, Autotuner.run
    seen = set()

    def compile_launch(self, *args, grid, warmup, **kwargs):
        record = Compiled(self.fn.__name__, session.workload, session.dtype, _constexprs(self, kwargs),
                          kwargs.get("num_warps", 4), kwargs.get("num_stages", 3))
        # A launch's dtype is in its pointers, not its constexprs: the workload's dtype stands for it.
        key = (record.kernel, record.dtype, json.dumps(record.constexprs, sort_keys=True), record.num_warps,
               record.num_stages)
        if key in seen:
            return
        seen.add(key)
        start = time.perf_counter()
        try:
            kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
            record.registers, record.stack_bytes = _resources(kernel.asm["cubin"])
            record.shared_bytes = kernel.metadata.shared
            record.global_ops = global_ops(kernel.asm["ptx"])
        except Exception as error:  # every failure is reported; the wrapper goes on with the next launch
            record.error = f"{type(error).__name__}: {error}"[:2000]
        record.compile_s = time.perf_counter() - start
        session.records.append(record)

    def compile_configs(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)
        for config in configs[:1] if session.first_config else configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs = None

    JITFunction.run, Autotuner.run = compile_launch, compile_configs
    # Not `driver.active`: that would create the CUDA driver, which fails on a machine without a GPU.
    previous_driver = driver._active
    driver.set_active(_TargetDriver(session.arch))
    try:
        with compile_only(SM_COUNTS.get(session.arch, 132)):
            yield
    finally:
        JITFunction.run, Autotuner.run = jit_run, autotuner_run
        driver.set_active(previous_driver)


def _dcn_workload(dtype: torch.dtype, shape) -> None:
    """One level's deformable conv, forward and backward of all five tensors, atomic and deterministic."""
    from kernels import modulated_deform_conv2d

    channels, batch, levels = shape
    h, w = levels[0]
    x = torch.randn(batch, channels, h, w, dtype=dtype, requires_grad=True)
    offset_mask = torch.randn(batch, 27, h, w, dtype=dtype, requires_grad=True)
    weight = torch.randn(channels, channels, 3, 3, dtype=dtype, requires_grad=True)
    bias = torch.randn(channels, dtype=dtype, requires_grad=True)
    for deterministic in (False, True):
        y = modulated_deform_conv2d(x, offset_mask[:, :18], offset_mask[:, 18:], weight, bias,
                                    deterministic=deterministic)
        y.backward(torch.ones_like(y))


def _dyhead_workload(dtype: torch.dtype, shape) -> None:
    """One DyHead block on the triton backend over the pyramid, forward and backward."""
    from dyhead import DyHead

    channels, batch, levels = shape
    neck = DyHead(channels, channels, num_blocks=1, backend="triton").to(dtype)
    features = [torch.randn(batch, channels, h, w, dtype=dtype, requires_grad=True) for h, w in levels]
    outputs = neck(features)
    torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])


def _moments_workload(dtype: torch.dtype, shape) -> None:
    """channel_moments of the first level on its own (the block takes its moments grouped), NCHW and
    channels-last, forward and backward."""
    from kernels import channel_moments

    channels, batch, levels = shape
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(batch, channels, *levels[0], dtype=dtype).to(memory_format=memory_format)
        channel_moments(x.requires_grad_()).sum().backward()


def _combine_workload(dtype: torch.dtype, shape) -> None:
    """level_combine of the first level on its own (the block combines its levels grouped; one level at a time
    is the op under torch.compile and for branches that share no buffer), NCHW and channels-last, with the
    second level as the resized branch, forward and backward, and upsample_bilinear's backward."""
    from kernels import level_combine, upsample_bilinear

    channels, batch, levels = shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for memory_format in (torch.contiguous_format, torch.channels_last):
        branches = [torch.randn(batch, channels, *size, dtype=dtype).to(memory_format=memory_format).requires_grad_()
                    for size in (levels[0], levels[0], levels[1])]
        scale, shift, coef = (torch.randn(batch, rows, channels, dtype=acc, requires_grad=True) for rows in (3, 1, 4))
        level_combine(branches, scale, shift[:, 0], coef).sum().backward()
    x = torch.randn(batch, channels, *levels[1], dtype=dtype, requires_grad=True)
    upsample_bilinear(x, levels[0]).sum().backward()


WORKLOADS = {"dcn": _dcn_workload, "dyhead_block": _dyhead_workload, "moments": _moments_workload,
             "combine": _combine_workload}


def check(arch: int, dtypes: list[str], shapes: str, first_config: bool, log=print) -> Session:
    """Compile every kernel launch of the workloads for ``sm_<arch>``; returns what was compiled, each
    specialization (kernel, dtype, constexprs, launch config) once."""
    session = Session(arch, first_config)
    with intercept_launches(session):
        for dtype_name in dtypes:
            for name, workload in WORKLOADS.items():
                session.workload, session.dtype = name, dtype_name
                before = len(session.records)
                start = time.perf_counter()
                workload(DTYPES[dtype_name], SHAPES[shapes])
                log(f"{dtype_name:9s} {name:13s} {len(session.records) - before:3d} new specializations in "
                    f"{time.perf_counter() - start:6.1f} s")
    return session


def table(session: Session) -> str:
    """A markdown table of the compiled specializations, one row each."""
    rows = ["| kernel | dtype | constexprs | warps | stages | registers | stack B | shared KiB | compile s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in session.records:
        # ACC, the accumulator dtype, follows from the row's dtype.
        consts = ", ".join(f"{k}={v}" for k, v in r.constexprs.items() if k != "ACC")
        if r.error:
            rows.append(f"| {r.kernel} | {r.dtype} | {consts} | {r.num_warps} | {r.num_stages} | FAILED: "
                        f"{r.error.splitlines()[0][:120]} | | | |")
        else:
            rows.append(f"| {r.kernel} | {r.dtype} | {consts} | {r.num_warps} | {r.num_stages} | {r.registers} | "
                        f"{r.stack_bytes} | {r.shared_bytes / 1024:.1f} | {r.compile_s:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    import triton

    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    p.add_argument("--dtypes", type=lambda t: name_list(t, DTYPES), default=list(DTYPES),
                   help="comma-separated, default all")
    p.add_argument("--shapes", choices=sorted(SHAPES), default="coco",
                   help="coco: the benchmarks' P3-P7 pyramid (default); small: a few pixels per level")
    p.add_argument("--first-config", action="store_true", help="only the first autotune config each pruner keeps")
    p.add_argument("--json", help="also write the records here")
    args = p.parse_args(argv)
    if INTERPRET:
        p.error("unset TRITON_INTERPRET: the interpreter has nothing to compile")
    session = check(args.arch, args.dtypes, args.shapes, args.first_config)
    print(table(session))
    failed = [r for r in session.records if r.error]
    uncovered = sorted(defined_kernels() - {r.kernel for r in session.records})
    print(f"sm_{args.arch}, triton {triton.__version__}, torch {torch.__version__}: {len(session.records)} "
          f"specializations, {len(failed)} failed")
    if uncovered:
        print(f"never launched by the workloads, so not checked: {', '.join(uncovered)}")
    if args.json:
        meta = {"arch": args.arch, "triton": triton.__version__, "torch": torch.__version__, "shapes": args.shapes,
                "first_config": args.first_config, "uncovered": uncovered, "command": " ".join(sys.argv)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "records": [asdict(r) for r in session.records]}, f, indent=1)
    return 1 if failed or uncovered else 0


if __name__ == "__main__":
    sys.exit(main())
