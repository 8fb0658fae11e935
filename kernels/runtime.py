"""Where the kernels may run: CUDA, Triton's CPU interpreter, or nowhere but a compiler.

`INTERPRET` is read once at import, as Triton itself does when the kernels are defined; so is `AUTOTUNE`
(``DYHEAD_AUTOTUNE=0`` turns autotuning off). `compile_only` lets CPU
tensors through the device checks and sizes launches for a GPU of a given SM count, so that a tool that turns
every launch into a compile for a GPU target (`benchmarks/compile_check.py`) drives the real wrappers on a
machine without a GPU.
"""

import contextlib
import functools
import os
import re
from typing import Iterator, Optional

import torch
import triton
from torch import Tensor

__all__ = ["AUTOTUNE", "INTERPRET", "cdiv", "check_runnable", "compile_only", "first_config_unless_tuning",
           "first_order_backward", "interpreter_problem", "matmul_allows_tf32", "next_power_of_2", "sm_count"]

# Triton's own reading of TRITON_INTERPRET (1, true, on, yes in any case), so that the two never disagree
INTERPRET = bool(triton.knobs.runtime.interpret)
# With DYHEAD_AUTOTUNE=0 every autotuned kernel runs the first config of its space that suits its arguments,
# without timing trials: for tests and short runs on a GPU, where tuning costs seconds per kernel and problem
# size (10-20 s per DCN size on an H100) and the results do not depend on the config.
AUTOTUNE = os.environ.get("DYHEAD_AUTOTUNE", "1") != "0"

_compile_only_sms: Optional[int] = None


# Host-side integer helpers. `triton.cdiv` and `triton.next_power_of_2` are constexpr functions in Triton 3.6+:
# called from Python they unwrap their arguments first, 2-3 us a call, and a DyHead block's launches make a
# hundred such calls (grids, plans) on every step.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of Python ints (b > 0)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n for n >= 1 (0 for 0), as `triton.next_power_of_2`."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def matmul_allows_tf32() -> bool:
    """Whether torch's CUDA matmul may run float32 in TF32, read through the precision API: reading the legacy
    ``torch.backends.cuda.matmul.allow_tf32`` raises once the new API has set it, and a legacy assignment (or
    ``torch.set_float32_matmul_precision``) updates the new one too."""
    precision = torch.backends.cuda.matmul.fp32_precision
    if precision == "none":
        precision = torch.backends.fp32_precision
    return precision == "tf32"


@contextlib.contextmanager
def compile_only(sms: int) -> Iterator[None]:
    """Within the block, CPU tensors pass `check_runnable` and `sm_count` of a CPU device is ``sms``.

    The kernels must not actually run on such tensors: the caller intercepts every launch (Triton's
    ``JITFunction.run``) and compiles instead. Under ``TRITON_INTERPRET=1`` there is nothing to compile: the
    kernels are interpreted functions.
    """
    global _compile_only_sms
    if INTERPRET:
        raise RuntimeError("compile_only compiles for a GPU target; unset TRITON_INTERPRET")
    previous, _compile_only_sms = _compile_only_sms, sms
    try:
        yield
    finally:
        _compile_only_sms = previous


class _NoSecondDerivative(torch.autograd.Function):
    """The first ``count`` inputs (gradients) passed on unchanged, tied to the rest (what they depend on) by an
    edge whose backward raises."""

    @staticmethod
    def forward(ctx, count, *tensors):
        return tensors[:count]

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("trying to differentiate twice a Triton kernel's backward, which has no derivative of its "
                           "own (a gradient penalty, create_graph=True): use a pure PyTorch path for that (DyHead's "
                           "backend='sampled'; torchvision's deform_conv2d has none either)")


def first_order_backward(backward):
    """Decorates an autograd Function's ``backward``, written without autograd (it runs under ``no_grad``), so
    that differentiating its gradients raises.

    `torch.autograd.function.once_differentiable` ties the gradients to an error only through output gradients
    that require grad: a loss linear in the output hands the backward a constant one, yet the gradients still
    depend on saved tensors that require grad (the weight), and a gradient penalty lost those terms silently.
    Here the tie runs to both, whenever autograd records the backward (``create_graph``), so that differentiating
    the gradients with respect to anything they depend on reaches the error.
    """

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():
            return grads
        depends_on = [t for t in (*grad_outputs, *ctx.saved_tensors) if isinstance(t, Tensor) and t.requires_grad]
        if not depends_on:
            return grads
        single = not isinstance(grads, tuple)
        grads = [grads] if single else list(grads)
        places = [i for i, g in enumerate(grads) if isinstance(g, Tensor)]
        tied = _NoSecondDerivative.apply(len(places), *(grads[i] for i in places), *depends_on)
        for i, g in zip(places, (tied,) if isinstance(tied, Tensor) else tied):
            grads[i] = g
        return grads[0] if single else tuple(grads)

    return wrapper


def first_config_unless_tuning(configs: list) -> list:
    """An early-config pruner's last step: ``configs``, or only the first of them when `AUTOTUNE` is off (a
    single config left is run without a trial)."""
    return configs if AUTOTUNE else configs[:1]


def _release(version: str) -> tuple[int, int]:
    major, minor = re.findall(r"\d+", version)[:2]
    return int(major), int(minor)


def interpreter_problem(triton_version: str, numpy_version: str) -> Optional[str]:
    """Why Triton's interpreter of ``triton_version`` cannot run these kernels with ``numpy_version``, or None.

    Before 3.7 the interpreter turns a loop bound or index held in a one-element array into an int with
    ``int(array)``, which numpy made an error in 2.4.
    """
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter cannot run with numpy {numpy_version} (it converts "
                "one-element arrays to int, an error since numpy 2.4): install 'numpy<2.4' or triton>=3.7")
    return None


@functools.cache
def _installed_interpreter_problem() -> Optional[str]:
    import numpy
    import triton

    return interpreter_problem(triton.__version__, numpy.__version__)


def check_runnable(t: Tensor, op: str, reference: str) -> None:
    """Raise RuntimeError unless the kernels can take ``t``'s device (and, on the CPU, the interpreter can run).

    Args:
        t: any tensor of the call.
        op: the public name of the op, for the message.
        reference: what to use instead on that device, for the message.
    """
    if t.device.type == "cuda" or (t.device.type == "cpu" and _compile_only_sms is not None):
        return
    if t.device.type == "cpu" and INTERPRET:
        problem = _installed_interpreter_problem()
        if problem:
            raise RuntimeError(f"{op}: {problem}")
        return
    raise RuntimeError(
        f"{op} runs Triton kernels on CUDA tensors; got a {t.device.type} tensor. Use {reference} or set "
        "TRITON_INTERPRET=1 before importing triton to run the kernels in Triton's CPU interpreter.")


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a CUDA device, or a CPU device inside `compile_only`)."""
    if device.type == "cpu" and _compile_only_sms is not None:
        return _compile_only_sms
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
