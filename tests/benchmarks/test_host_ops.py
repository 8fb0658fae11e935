"""The host-cost proxy (`benchmarks.host_ops`): what it counts as a launch, and DyHead's triton path against the
torchvision path."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from benchmarks import host_ops
from dyhead import DyHead
from kernels.runtime import INTERPRET

aten = torch.ops.aten


@triton.jit
def _double_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    keep = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=keep) * 2, mask=keep)


@pytest.mark.parametrize("op, launches", [
    (aten.add.Tensor, True), (aten.add_.Tensor, True), (aten.copy_.default, True), (aten.sum.default, True),
    (aten.view.default, False), (aten.t.default, False), (aten.split_with_sizes.default, False),
    (aten.empty.memory_format, False), (aten.empty_like.default, False), (aten.detach.default, False),
    (aten._foreach_add_.Scalar, True),  # in place, returns nothing: an optimizer's update
])
def test_views_and_allocations_are_not_launches(op, launches):
    assert host_ops.launches_kernel(op) is launches


def test_counts_aten_ops_by_name_without_views():
    x = torch.randn(4, 6, requires_grad=True)
    fwd, bwd = host_ops.count_step(lambda: [(x * 2).t().reshape(-1).sum()], [x])
    # Flattening the transpose copies it (clone, then an unsafe view that is not counted).
    assert fwd.aten == {"mul": 1, "clone": 1, "sum": 1} and not fwd.triton
    # sum's backward expands (a view), the reshape and transpose go back as views, mul's backward multiplies.
    assert bwd.aten == {"mul": 1} and not bwd.triton


@pytest.mark.skipif(not INTERPRET, reason="launches a Triton kernel on CPU tensors")
def test_counts_triton_launches_and_not_the_interpreters_own_work():
    from triton.runtime.interpreter import InterpretedFunction
    run = InterpretedFunction.run
    x = torch.arange(8.0)
    count = host_ops.HostCount()
    with host_ops.counting(count):
        y = x + 1
        for _ in range(2):
            _double_kernel[(1,)](y, 8, BLOCK=8)
    assert count.triton == {"_double_kernel": 2}
    assert count.aten == {"add": 1}  # the interpreter copies tensors in and out: not counted
    assert torch.equal(y, (x + 1) * 4)
    assert count.total == 3 and InterpretedFunction.run is run  # the launch hook is gone after the block


@pytest.mark.skipif(not INTERPRET, reason="launches a Triton kernel on CPU tensors")
def test_stubbed_launches_do_not_run_and_the_timer_times_each_step():
    from triton.runtime.interpreter import InterpretedFunction
    run = InterpretedFunction.run
    x = torch.arange(8.0)
    with host_ops.launches_stubbed():
        _double_kernel[(1,)](x, 8, BLOCK=8)
    assert torch.equal(x, torch.arange(8.0)) and InterpretedFunction.run is run
    _double_kernel[(1,)](x, 8, BLOCK=8)
    assert torch.equal(x, torch.arange(8.0) * 2)

    w = torch.ones(3, requires_grad=True)
    calls = []

    def forward():
        calls.append(1)
        y = w * 2
        _double_kernel[(1,)](y.detach(), 3, BLOCK=4)
        return [y]

    seconds = host_ops.time_step(forward, [w], repeats=4)
    assert len(seconds) == 4 and all(s > 0 for s in seconds) and len(calls) == 5  # one untimed warm-up
    assert InterpretedFunction.run is run


@pytest.mark.skipif(not INTERPRET, reason="launches a Triton kernel on CPU tensors")
def test_tables_cached_under_stubbed_launches_are_not_kept():
    """A shape table cached under stubbed launches was never written: a later real launch must write its own."""
    from kernels.device_table import cached_device_table
    values = [3, 141, 59, 26]
    with host_ops.launches_stubbed():
        cached_device_table(values, torch.device("cpu"))
    assert cached_device_table(values, torch.device("cpu")).tolist() == values


def test_saved_bytes_counts_each_kept_storage_once_and_leaves_inputs_out():
    x = torch.randn(4, 6, requires_grad=True)

    def forward():
        y = x.sin()  # keeps x: an input
        z = y.exp()  # keeps its output
        return [z[:, :3] * z[:, 3:]]  # keeps two views of z's storage

    assert host_ops.saved_bytes(forward, [x]) == (4 * 6 * 4, 1)
    assert host_ops.saved_bytes(lambda: [x.sin()], [x]) == (0, 0)
    assert host_ops.saved_bytes(lambda: [x.sin()], []) == (4 * 6 * 4, 1)


@pytest.mark.skipif(not INTERPRET, reason="the triton backend on CPU tensors runs in the interpreter")
def test_dyhead_triton_step_asks_less_than_half_of_the_torchvision_steps():
    """Counted with the launches stubbed: a count needs the launches, not the interpreter's run of them (which
    took a minute of CI); the host reads nothing back from a kernel's output."""
    totals = {}
    for backend in ("triton", "torchvision"):
        forward, inputs = host_ops.dyhead_step(backend, channels=16, batch=2, num_levels=5, num_blocks=1, size=8,
                                               device="cpu", dtype=torch.float32)
        with host_ops.launches_stubbed():
            host_ops.count_step(forward, inputs)
            fwd, bwd = host_ops.count_step(forward, inputs)
        totals[backend] = fwd.total + bwd.total
        if backend == "triton":
            # All deformable convs of the block in one forward and one backward launch.
            assert fwd.triton["_fwd_kernel"] == 1 and bwd.triton["_bwd_kernel"] == 1
            assert "deform_conv2d" not in fwd.aten
        else:
            assert fwd.aten["deform_conv2d"] == 13  # 5 same + 4 finer + 4 coarser
    assert totals["triton"] < totals["torchvision"] / 2


def test_main_prints_a_row_per_backend(capsys):
    assert host_ops.main(["--backends", "torchvision", "--levels", "2", "--size", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "\ntorchvision " in out and "torchvision forward: " in out and "deform_conv2d 4" in out


def test_dyhead_step_halves_each_level_rounding_up():
    """DyHead's stride-2 branch lands on the next level's grid only if each level is ceil(previous / 2)."""
    forward, inputs = host_ops.dyhead_step("torchvision", channels=16, batch=1, num_levels=3, num_blocks=1, size=5,
                                           device="cpu", dtype=torch.float32)
    levels, params = inputs[:3], inputs[3:]
    assert [tuple(t.shape) for t in levels] == [(1, 16, 5, 5), (1, 16, 3, 3), (1, 16, 2, 2)]
    assert len(params) == len(list(DyHead(16, 16, 1).parameters()))  # a training step differentiates them all
    assert all(t.requires_grad for t in inputs)
    assert [tuple(y.shape) for y in forward()] == [tuple(t.shape) for t in levels]


def test_main_sums_counts_and_reports_host_time_and_saved_bytes(monkeypatch, capsys):
    """With steps whose counts and kept storages are known: exp then sin (backward: cos and two muls; exp's output
    kept), once for "triton", twice for "torchvision"."""
    def dyhead_step(backend, **sizes):
        x = torch.randn(4, 6, requires_grad=True)

        def forward():
            y = x
            for _ in range(1 if backend == "triton" else 2):
                y = y.exp().sin()
            return [y]
        return forward, [x]

    monkeypatch.setattr(host_ops, "dyhead_step", dyhead_step)
    monkeypatch.setattr(host_ops, "time_step", lambda forward, inputs, repeats: [0.004, 0.002, 0.003])
    argv = ["--backends", "triton,torchvision", "--device", "cpu", "--time", "--saved", "--top", "1"]
    assert host_ops.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:4]}
    assert rows == {"triton": ["2", "0", "3", "0", "5"], "torchvision": ["4", "0", "6", "0", "10"]}
    assert "median 3.000 ms (min 2.000) of 30 steps" in "\n".join(lines)
    assert "triton       0.00 MiB in 1 storages, 0.50x of torchvision" in lines
    assert "torchvision forward: exp 2" in lines and "torchvision backward: mul 4" in lines
    host_ops.main(argv[:4] + ["--top", "0"])
    assert "forward:" not in capsys.readouterr().out


def test_triton_on_the_cpu_needs_the_interpreter(monkeypatch, capsys):
    monkeypatch.setattr(host_ops, "INTERPRET", False)
    assert host_ops.main(["--backends", "triton", "--device", "cpu"]) == 2
    assert "needs TRITON_INTERPRET=1" in capsys.readouterr().err

