"""Where the kernels run (`kernels.runtime`): the interpreter's version check and the device checks."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import kernels.runtime as runtime
from kernels import channel_moments

INTERPRET = runtime.INTERPRET


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ("3.6.0", "2.4.6", True),  # seen: every interpreted kernel with a runtime loop bound failed
    ("3.6.0", "2.3.5", False),  # seen: the whole CPU suite passed
    ("3.6.1+git1234", "2.4.0rc1", True),
    ("3.7.0", "2.4.6", False),  # 3.7 squeezes the array first
    ("3.8.0", "2.4.6", False),
])
def test_interpreter_problem_knows_triton_36_with_numpy_24(triton_version, numpy_version, broken):
    problem = runtime.interpreter_problem(triton_version, numpy_version)
    assert (problem is not None) == broken
    if broken:
        assert "numpy<2.4" in problem and triton_version in problem


@pytest.mark.parametrize("value, on", [("true", True), ("ON", True), ("1", True), ("0", False), ("", False)])
def test_interpret_reads_the_variable_as_triton_does(value, on):
    env = {**os.environ, "TRITON_INTERPRET": value}
    code = "import triton, kernels.runtime as r; print(r.INTERPRET, bool(triton.knobs.runtime.interpret))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(on), str(on)]


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("0", False)])
def test_autotune_reads_dyhead_autotune(monkeypatch, value, on):
    """Read at import: a fresh copy of the module reads the variable as set now."""
    if value is None:
        monkeypatch.delenv("DYHEAD_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("DYHEAD_AUTOTUNE", value)
    spec = importlib.util.spec_from_file_location("runtime_copy", runtime.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy.AUTOTUNE is on


def test_tf32_is_read_as_either_api_set_it(fp32_precision):
    torch.backends.fp32_precision = "none"
    torch.backends.cuda.matmul.fp32_precision = "none"
    assert not runtime.matmul_allows_tf32()  # torch's default: IEEE float32
    torch.backends.cuda.matmul.allow_tf32 = True
    assert runtime.matmul_allows_tf32()
    torch.set_float32_matmul_precision("highest")
    assert not runtime.matmul_allows_tf32()
    torch.set_float32_matmul_precision("high")
    assert runtime.matmul_allows_tf32()


def test_compile_only_passes_cpu_tensors_for_its_block_only(monkeypatch):
    """A compile for a GPU target sizes launches for the given SM count; a nested block gives the outer one's back."""
    monkeypatch.setattr(runtime, "INTERPRET", False)
    cpu, x = torch.device("cpu"), torch.zeros(1)
    with runtime.compile_only(132):
        runtime.check_runnable(x, "op", "ref")
        with runtime.compile_only(108):
            assert runtime.sm_count(cpu) == 108
        assert runtime.sm_count(cpu) == 132
    with pytest.raises(RuntimeError, match="op runs Triton kernels on CUDA tensors; got a cpu tensor. Use ref"):
        runtime.check_runnable(x, "op", "ref")


@pytest.mark.skipif(not INTERPRET, reason="the check guards the interpreter")
def test_an_interpreter_that_cannot_run_is_reported_before_any_kernel(monkeypatch):
    monkeypatch.setattr(runtime, "_installed_interpreter_problem", lambda: "this interpreter cannot run here")
    with pytest.raises(RuntimeError, match="channel_moments: this interpreter cannot run here"):
        channel_moments(torch.zeros(1, 2, 3, 3))


@pytest.mark.skipif(not INTERPRET, reason="checks the interpreter's refusal")
def test_compile_only_refuses_the_interpreter():
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        with runtime.compile_only(132):
            pass


def _space_configs(space):
    import triton
    return [triton.Config(meta, num_warps=warps, num_stages=stages) for meta, warps, stages in space]


@pytest.mark.parametrize("autotune", [True, False])
def test_autotuning_off_leaves_each_pruner_the_first_config_that_suits(monkeypatch, autotune):
    from kernels import deform_conv, deform_conv_backward, level_pass
    monkeypatch.setattr(runtime, "AUTOTUNE", autotune)
    monkeypatch.setattr(deform_conv, "INTERPRET", False)  # the GPU spaces (the interpreter has one config)
    bf16, fp32 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    fwd = _space_configs(deform_conv._FWD_SPACE)
    kept = deform_conv._fwd_prune(fwd, {"x_ptr": bf16})
    assert [c.kwargs for c in kept] == [c.kwargs for c in (fwd if autotune else fwd[:1])]
    # fp32 swaps in its own space before the cut.
    kept = deform_conv_backward._bwd_prune(_space_configs(deform_conv_backward._BWD_SPACE), {"x_ptr": fp32})
    fp32_space = deform_conv_backward._BWD_SPACE_FP32
    assert len(kept) == (len(fp32_space) if autotune else 1)
    assert (kept[0].kwargs, kept[0].num_warps) == (fp32_space[0][0], fp32_space[0][1])
    # The layout filter runs first: a channels-last tensor gets a channel-long tile even when the cut is made.
    reductions = _space_configs(level_pass._REDUCTION_SPACE)
    kept = level_pass._prune_by_layout(reductions, {"stride_p": 256})
    assert kept and all(c.kwargs["BLOCK_C"] > c.kwargs["BLOCK_P"] for c in kept)
    assert len(kept) == (sum(c.kwargs["BLOCK_C"] > c.kwargs["BLOCK_P"] for c in reductions) if autotune else 1)
    gather = _space_configs(deform_conv_backward._GATHER_SPACE)
    assert len(deform_conv_backward._gather_prune(gather, {})) == (len(gather) if autotune else 1)


def test_host_integer_helpers_match_triton():
    import triton
    for n in range(0, 300):
        assert runtime.next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 2, 7, 16, 64, 128):
            assert runtime.cdiv(n, d) == triton.cdiv(n, d)
    assert runtime.next_power_of_2(2**40 + 1) == 2**41


class _Scale(torch.autograd.Function):
    """y = w * x, its backward written without autograd as the kernels' are."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return w * x

    @staticmethod
    @runtime.first_order_backward
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum().reshape(w.shape) if ctx.needs_input_grad[1] else None


def test_first_order_backward_gives_the_gradients_and_raises_when_they_are_differentiated():
    """A loss linear in the output hands backward a constant gradient, yet d loss/dx = w depends on w: a penalty
    on it must raise, not train without its terms (`once_differentiable` let it through)."""
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    gx, gw = torch.autograd.grad(_Scale.apply(x, w).sum(), [x, w])
    assert not gx.requires_grad and torch.equal(gx, torch.full_like(x, 1.5)) and gw.item() == x.sum().item()
    loss = _Scale.apply(x, w).sum()
    gx, = torch.autograd.grad(loss, x, create_graph=True)
    assert torch.equal(gx, torch.full_like(x, 1.5))
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(loss + gx.square().sum(), w)
    # unused by the penalty, the marked gradients cost nothing: create_graph alone does not raise
    gx, gw = torch.autograd.grad(_Scale.apply(x, w).square().sum(), [x, w], create_graph=True)
    assert torch.allclose(gx, 2 * w * w * x) and gw.requires_grad
