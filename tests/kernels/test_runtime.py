"""Where the kernels run (`kernels.runtime`): the interpreter's version check and the device checks."""

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
