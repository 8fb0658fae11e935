"""pytest-benchmark suite: `pytest benchmarks --benchmark-only` times every (op, impl, dtype) after checking it.

The runner (`python -m benchmarks.run`) is what records results; this suite gives the same measurements the
pytest-benchmark way (compare runs with --benchmark-autosave / --benchmark-compare). Targets are not asserted.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.ops import DTYPES, IMPLS, OPS, rel_errors
from benchmarks.timing import L2_FLUSH_BYTES


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", list(OPS))
def test_bench(benchmark, problems, device, op, impl, dtype):
    if device.type == "cpu" and impl == "triton":
        pytest.skip("Triton runs on the CPU only in its interpreter: a correctness smoke, not a benchmark")
    if device.type == "cpu" and impl == "torchvision" and dtype == "bfloat16":
        pytest.skip("torchvision has no bfloat16 CPU kernel, and autocast does not cover its op on the CPU")
    problem = problems(op)
    try:
        step = problem.step(impl, getattr(torch, dtype))
        results = step()
    except (ImportError, NotImplementedError) as exc:
        pytest.skip(f"{impl} is not available: {exc}")
    errors = rel_errors(results, problem.reference())
    check, bad = problem.check(impl, getattr(torch, dtype), errors)  # the runner's check: "floor" passes
    assert check != "fail", f"{problem.result_names()[bad]}: {errors[bad]:.2e}"
    benchmark.extra_info.update(max_rel_err=max(errors), gflop=OPS[op].flops(problem.shapes) / 1e9)

    if device.type == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)

        def setup():
            flush.zero_()  # cold L2, as in the runner
            torch.cuda.synchronize(device)  # the host timer starts when setup returns: the flush is not timed

        def run():
            step()
            torch.cuda.synchronize(device)

        benchmark.pedantic(run, setup=setup, rounds=20, warmup_rounds=2)
    else:
        benchmark.pedantic(step, rounds=5, warmup_rounds=1)
