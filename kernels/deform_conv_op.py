"""`modulated_deform_conv2d`: the public DCNv2 function, its input checks and its torch.library custom ops.

The forward and the backward are each a custom op (`dyhead_triton::modulated_deform_conv2d` and
`dyhead_triton::modulated_deform_conv2d_backward`) with a fake implementation, tied together by
`register_autograd`, so `torch.compile(fullgraph=True)` traces through them without graph breaks. Eager calls
on plain tensors run the same implementations through a `torch.autograd.Function` instead, which skips the
custom op's dispatch overhead.
"""

import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import deform_conv, deform_conv_backward

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _pair(value, name):
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return (value[0], value[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def _check_runnable(t: Tensor):
    if t.device.type == "cuda":
        return
    # Triton reads TRITON_INTERPRET when the kernels are defined, so the value at import time is what counts.
    if t.device.type == "cpu" and deform_conv.INTERPRET:
        return
    raise RuntimeError(
        f"kernels.modulated_deform_conv2d runs Triton kernels on CUDA tensors; got a {t.device.type} tensor. "
        "Use a reference backend (DyHead backend='torchvision' or 'sampled') or set TRITON_INTERPRET=1 "
        "before importing triton to run the kernels in Triton's CPU interpreter.")


def _autocast(device_type, *tensors):
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype == torch.float32 else t for t in tensors)


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_inputs(input, offset, mask, weight, bias, stride, padding, dilation):
    """Raise TypeError/ValueError/NotImplementedError for anything the kernels do not compute."""
    named = {"input": input, "offset": offset, "mask": mask, "weight": weight}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    for name, t in named.items():
        if t.dtype != input.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but input has {input.dtype}: all tensors need one dtype")
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if input.dim() != 4:
        raise ValueError(f"input must be (N, Cin, H, W), got shape {tuple(input.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be (Cout, Cin, kh, kw), got shape {tuple(weight.shape)}")
    n, cin, h, w = input.shape
    cout, wcin, kh, kw = weight.shape
    if wcin != cin:
        if wcin > 0 and cin % wcin == 0:
            raise NotImplementedError(f"grouped convolution (weight Cin {wcin}, input Cin {cin}) is not supported")
        raise ValueError(f"weight must be (Cout, {cin}, kh, kw) for input Cin={cin}, got shape {tuple(weight.shape)}")
    if kh == 0 or kw == 0:
        raise ValueError(f"weight must have a non-empty kernel, got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"bias must be ({cout},) to match weight, got shape {tuple(bias.shape)}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"need stride >= 1, dilation >= 1, padding >= 0; got {stride}, {dilation}, {padding}")
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"input {tuple(input.shape)} is smaller than the dilated {kh}x{kw} kernel")
    kk = kh * kw
    for name, t, per_group in (("offset", offset, 2 * kk), ("mask", mask, kk)):
        expected = (n, per_group, ho, wo)
        if t.dim() != 4:
            raise ValueError(f"{name} must be {expected} (N, {name} channels, H_out, W_out), "
                             f"got shape {tuple(t.shape)}")
        if t.shape[1] != per_group and t.shape[1] % per_group == 0 and t.shape[1] > 0:
            raise NotImplementedError(f"{name} has {t.shape[1]} channels: {t.shape[1] // per_group} offset groups "
                                      "are not supported (only 1)")
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} must be {expected} (N, {name} channels, H_out, W_out), "
                             f"got shape {tuple(t.shape)}")


def _forward_impl(input: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Optional[Tensor],
                  stride_h: int, stride_w: int, pad_h: int, pad_w: int, dil_h: int, dil_w: int,
                  deterministic: bool) -> Tensor:
    _check_runnable(input)
    with _device_guard(input):
        return deform_conv.deform_conv_forward(input, offset, mask, weight, bias, (stride_h, stride_w),
                                               (pad_h, pad_w), (dil_h, dil_w))


_forward_op = torch.library.custom_op("dyhead_triton::modulated_deform_conv2d", mutates_args=())(_forward_impl)


@_forward_op.register_fake
def _forward_fake(input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                  deterministic):
    return input.new_empty((input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]))


def _backward_impl(grad_out: Tensor, input: Tensor, offset: Tensor, mask: Tensor, weight: Tensor,
                   stride_h: int, stride_w: int, pad_h: int, pad_w: int, dil_h: int, dil_w: int,
                   deterministic: bool, need_input: bool, need_sample: bool,
                   need_weight: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_runnable(input)
    with _device_guard(input):
        return deform_conv_backward.deform_conv_backward(
            grad_out, input, offset, mask, weight, (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w),
            deterministic, (need_input, need_sample, need_weight))


_backward_op = torch.library.custom_op("dyhead_triton::modulated_deform_conv2d_backward",
                                       mutates_args=())(_backward_impl)


@_backward_op.register_fake
def _backward_fake(grad_out, input, offset, mask, weight, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                   deterministic, need_input, need_sample, need_weight):
    needs = (need_input, need_sample, need_weight)
    shapes = deform_conv_backward.backward_shapes(input, offset, mask, weight, needs)
    return tuple(input.new_empty(shape) for shape in shapes)


def _setup_context(ctx, inputs, output):
    input, offset, mask, weight, bias, *conv, deterministic = inputs
    ctx.save_for_backward(input, offset, mask, weight)
    ctx.conv = conv
    ctx.has_bias = bias is not None
    ctx.deterministic = deterministic


def _gradients(backward, ctx, grad_out):
    """The gradients of (input, offset, mask, weight, bias), None where autograd does not need them, and None
    for the 7 non-tensor arguments; backward is the custom backward op or its implementation."""
    input, offset, mask, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = backward(grad_out, input, offset, mask, weight, *ctx.conv, ctx.deterministic,
                     need[0], need[1] or need[2], need[3])
    wanted = (*need[:4], ctx.has_bias and need[4])
    return (*(g if w else None for g, w in zip(grads, wanted)), None, None, None, None, None, None, None)


def _backward(ctx, grad_out):
    return _gradients(_backward_op, ctx, grad_out)


class _EagerDeformConv(torch.autograd.Function):
    """The custom ops' forward and backward without their dispatch, for eager calls: the dispatch costs about
    0.6 ms a call on the H100 host (torch 2.11), more than the kernels take at most pyramid levels."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out):
        return _gradients(_backward_impl, ctx, grad_out)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def modulated_deform_conv2d(input: Tensor, offset: Tensor, mask: Tensor, weight: Tensor,
                            bias: Optional[Tensor] = None, stride=1, padding=1, dilation=1, *,
                            deterministic: Optional[bool] = None) -> Tensor:
    """Modulated deformable convolution (DCNv2) with one offset group, in Triton.

    Same result as ``torchvision.ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation,
    mask)``; the PyTorch reference twin is ``dyhead.deform_conv2d_torchvision``. Differentiable in all five
    tensors. All tensors share one dtype (float32/float16/bfloat16/float64) and one device: CUDA, or the CPU
    under ``TRITON_INTERPRET=1``. float16/bfloat16 accumulate in float32; float32 multiplies in true fp32,
    or in TF32 where ``torch.backends.cuda.matmul.allow_tf32`` is set (as torch's matmul does); float64 is
    exact. Sample positions are exact in every dtype (floor and fraction of the offset alone). Under autocast,
    float32 tensors are cast to the autocast dtype (the kernels take half precision directly, where
    torchvision's op autocasts to float32).

    Args:
        input: (N, Cin, H, W).
        offset: (N, 2*kh*kw, H_out, W_out), (dy, dx) interleaved per tap, taps row-major. Read through its
            strides: slices and ``as_strided`` views are used in place.
        mask: (N, kh*kw, H_out, W_out), the modulation (already passed through the sigmoid); any strides.
        weight: (Cout, Cin, kh, kw).
        bias: (Cout,) or None.
        stride, padding, dilation: int or (h, w) pair.
        deterministic: bitwise-reproducible gradients (grad input by a sorted gather instead of atomics, which
            costs a (N*H_out*W_out*kh*kw, Cin) fp32 buffer); None follows
            ``torch.are_deterministic_algorithms_enabled()``.

    Returns:
        (N, Cout, H_out, W_out) in the input's dtype.

    Raises:
        TypeError / ValueError: non-tensor or non-floating inputs, mixed dtypes or devices, wrong ranks or
            shapes (the message names the argument and the expected shape).
        NotImplementedError: offset groups or convolution groups > 1.
        RuntimeError: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    if isinstance(input, Tensor) and torch.is_autocast_enabled(input.device.type):
        input, offset, mask, weight, bias = _autocast(input.device.type, input, offset, mask, weight, bias)
    stride = _pair(stride, "stride")
    padding = _pair(padding, "padding")
    dilation = _pair(dilation, "dilation")
    _check_inputs(input, offset, mask, weight, bias, stride, padding, dilation)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    args = (input, offset, mask, weight, bias, *stride, *padding, *dilation, bool(deterministic))
    # Traced code (torch.compile, fake tensors, tensor subclasses) goes through the custom op; plain eager
    # tensors take the same implementation without its dispatch cost.
    if type(input) is Tensor and not torch.compiler.is_compiling():
        return _EagerDeformConv.apply(*args)
    return _forward_op(*args)
