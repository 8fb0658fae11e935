"""`modulated_deform_conv2d` and `modulated_deform_conv2d_pyramid`: the public DCNv2 functions (one level; a
list of levels sharing the weight, in one launch), their input checks and their torch.library custom ops.

The forward and the backward are each a custom op (`dyhead_triton::modulated_deform_conv2d` and
`dyhead_triton::modulated_deform_conv2d_backward`; `..._pyramid` and `..._pyramid_backward`) with a fake
implementation, tied together by `register_autograd`, so `torch.compile(fullgraph=True)` traces through them
without graph breaks. Eager calls on plain tensors run the same implementations through a
`torch.autograd.Function` instead, which skips the custom op's dispatch overhead. The pyramid ops return one
flat buffer per result (custom op outputs may not alias each other), split into the levels' views outside.
"""

import contextlib
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from . import deform_conv, deform_conv_backward
from .runtime import check_runnable

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _pair(value, name):
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return (value[0], value[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def _conv_pairs(stride, padding, dilation):
    return _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")


def _check_runnable(t: Tensor):
    check_runnable(t, "kernels.modulated_deform_conv2d",
                   "a reference backend (DyHead backend='torchvision' or 'sampled')")


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
        y = deform_conv.deform_conv_forward([input], [offset], [mask], weight, bias, (stride_h, stride_w),
                                            (pad_h, pad_w), (dil_h, dil_w))
    return y.view(input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])


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
    needs = (need_input, need_sample, need_weight)
    with _device_guard(input):
        grads = deform_conv_backward.deform_conv_backward(
            grad_out.reshape(-1), [input], [offset], [mask], weight, (stride_h, stride_w), (pad_h, pad_w),
            (dil_h, dil_w), deterministic, needs)
    shapes = deform_conv_backward.backward_shapes(input, offset, mask, weight, needs)
    return tuple(g.view(shape) for g, shape in zip(grads, shapes))


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
    stride, padding, dilation = _conv_pairs(stride, padding, dilation)
    _check_inputs(input, offset, mask, weight, bias, stride, padding, dilation)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    args = (input, offset, mask, weight, bias, *stride, *padding, *dilation, bool(deterministic))
    # Traced code (torch.compile, fake tensors, tensor subclasses) goes through the custom op; plain eager
    # tensors take the same implementation without its dispatch cost.
    if type(input) is Tensor and not torch.compiler.is_compiling():
        return _EagerDeformConv.apply(*args)
    return _forward_op(*args)


def _check_lists(inputs, offsets, masks):
    """Raise TypeError/ValueError unless inputs, offsets and masks are sequences with one entry per level."""
    for name, seq in (("inputs", inputs), ("offsets", offsets), ("masks", masks)):
        if not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a list or tuple of Tensors, got {type(seq).__name__}")
    if len(inputs) == 0:
        raise ValueError("inputs must hold at least one level")
    if not len(inputs) == len(offsets) == len(masks):
        raise ValueError(f"inputs, offsets and masks must have one entry per level, got {len(inputs)}, "
                         f"{len(offsets)} and {len(masks)}")


def _check_levels(inputs, offsets, masks, weight, bias, stride, padding, dilation):
    """`_check_inputs` for each level (its message prefixed with the level), and one N for all levels (the
    shared weight already asks for one Cin, dtype and device)."""
    for level, (input, offset, mask) in enumerate(zip(inputs, offsets, masks)):
        try:
            _check_inputs(input, offset, mask, weight, bias, stride, padding, dilation)
        except (TypeError, ValueError, NotImplementedError) as error:
            raise type(error)(f"level {level}: {error}") from None
        if input.shape[0] != inputs[0].shape[0]:
            raise ValueError(f"level {level}: input has batch size {input.shape[0]} but level 0 has "
                             f"{inputs[0].shape[0]}: all levels need one N")


def _pyramid_forward_impl(inputs: list[Tensor], offsets: list[Tensor], masks: list[Tensor], weight: Tensor,
                          bias: Optional[Tensor], stride_h: int, stride_w: int, pad_h: int, pad_w: int, dil_h: int,
                          dil_w: int, deterministic: bool) -> Tensor:
    _check_runnable(inputs[0])
    with _device_guard(inputs[0]):
        return deform_conv.deform_conv_forward(inputs, offsets, masks, weight, bias, (stride_h, stride_w),
                                               (pad_h, pad_w), (dil_h, dil_w))


_pyramid_forward_op = torch.library.custom_op("dyhead_triton::modulated_deform_conv2d_pyramid",
                                              mutates_args=())(_pyramid_forward_impl)


@_pyramid_forward_op.register_fake
def _pyramid_forward_fake(inputs, offsets, masks, weight, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                          deterministic):
    pixels = sum(offset.shape[0] * offset.shape[2] * offset.shape[3] for offset in offsets)
    return inputs[0].new_empty((pixels * weight.shape[0],))


def _pyramid_backward_impl(grad_out: Tensor, inputs: list[Tensor], offsets: list[Tensor], masks: list[Tensor],
                           weight: Tensor, stride_h: int, stride_w: int, pad_h: int, pad_w: int, dil_h: int,
                           dil_w: int, deterministic: bool, need_input: bool, need_sample: bool,
                           need_weight: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_runnable(inputs[0])
    with _device_guard(inputs[0]):
        return deform_conv_backward.deform_conv_backward(
            grad_out, inputs, offsets, masks, weight, (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w),
            deterministic, (need_input, need_sample, need_weight))


_pyramid_backward_op = torch.library.custom_op("dyhead_triton::modulated_deform_conv2d_pyramid_backward",
                                               mutates_args=())(_pyramid_backward_impl)


@_pyramid_backward_op.register_fake
def _pyramid_backward_fake(grad_out, inputs, offsets, masks, weight, stride_h, stride_w, pad_h, pad_w, dil_h,
                           dil_w, deterministic, need_input, need_sample, need_weight):
    levels = deform_conv.levels_of(inputs, weight, (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w))
    shapes = deform_conv_backward.flat_backward_shapes(levels, weight, (need_input, need_sample, need_weight))
    return tuple(inputs[0].new_empty(shape) for shape in shapes)


def _split(flat, shapes):
    """Views of the flat buffer, one per shape, level after level."""
    return [part.view(shape) for part, shape in zip(flat.split([shape.numel() for shape in shapes]), shapes)]


def _pyramid_setup_context(ctx, inputs, output):
    xs, offsets, masks, weight, bias, *conv, deterministic = inputs
    ctx.save_for_backward(*xs, *offsets, *masks, weight)
    ctx.levels = len(xs)
    ctx.conv = conv
    ctx.has_bias = bias is not None
    ctx.deterministic = deterministic


def _pyramid_gradients(backward, ctx, grad_out, needs):
    """The gradients of (inputs, offsets, masks, weight, bias) as lists of per-level views (None where autograd
    does not need them) and tensors, and None for the 7 non-tensor arguments. needs: the needs_input_grad of
    (inputs, offsets, masks, weight, bias), lists for the lists; backward: the custom backward op or its
    implementation."""
    saved, levels = ctx.saved_tensors, ctx.levels
    xs, offsets, masks = (list(saved[i * levels:(i + 1) * levels]) for i in range(3))
    need_x, need_offset, need_mask, need_weight, need_bias = needs[:5]
    need_sample = any(need_offset) or any(need_mask)
    grad_x, grad_offset, grad_mask, grad_weight, grad_bias = backward(
        grad_out, xs, offsets, masks, saved[3 * levels], *ctx.conv, ctx.deterministic, any(need_x), need_sample,
        need_weight)
    lists = []
    for flat, tensors, need in ((grad_x, xs, need_x), (grad_offset, offsets, need_offset),
                                (grad_mask, masks, need_mask)):
        grads = _split(flat, [t.shape for t in tensors]) if any(need) else tensors
        lists.append([g if wanted else None for g, wanted in zip(grads, need)])
    return (*lists, grad_weight if need_weight else None, grad_bias if ctx.has_bias and need_bias else None,
            None, None, None, None, None, None, None)


def _pyramid_backward(ctx, grad_out):
    return _pyramid_gradients(_pyramid_backward_op, ctx, grad_out, ctx.needs_input_grad)


_pyramid_forward_op.register_autograd(_pyramid_backward, setup_context=_pyramid_setup_context)


class _EagerPyramid(torch.autograd.Function):
    """The pyramid custom ops without their dispatch, for eager calls (see `_EagerDeformConv`). Takes the
    number of levels, then the levels' inputs, offsets and masks flattened, then the op's other arguments."""

    @staticmethod
    def forward(ctx, levels, *args):
        inputs = (list(args[:levels]), list(args[levels:2 * levels]), list(args[2 * levels:3 * levels]),
                  *args[3 * levels:])
        output = _pyramid_forward_impl(*inputs)
        _pyramid_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out):
        levels, need = ctx.levels, ctx.needs_input_grad[1:]
        needs = (*(need[i * levels:(i + 1) * levels] for i in range(3)), *need[3 * levels:])
        grad_x, grad_offset, grad_mask, *rest = _pyramid_gradients(_pyramid_backward_impl, ctx, grad_out, needs)
        return (None, *grad_x, *grad_offset, *grad_mask, *rest)


def modulated_deform_conv2d_pyramid(inputs: Sequence[Tensor], offsets: Sequence[Tensor], masks: Sequence[Tensor],
                                    weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=1,
                                    dilation=1, *, deterministic: Optional[bool] = None) -> list[Tensor]:
    """`modulated_deform_conv2d` on each level of a list that shares one weight, in one forward launch and one
    backward launch for all levels (plus a constant number of packing launches) instead of one per level.

    Same result as ``[modulated_deform_conv2d(x, o, m, weight, bias, stride, padding, dilation,
    deterministic=deterministic) for x, o, m in zip(inputs, offsets, masks)]``: the same precision, autocast
    behaviour and determinism; differentiable in every tensor, the weight and bias gradients summed over the
    levels. The launch cost is what it saves: a DyHead block makes 13 deformable convs with 3 weight sets,
    most of them on levels of a few hundred pixels.

    Args:
        inputs: L >= 1 tensors (N, Cin, H_l, W_l): one N, Cin, dtype and device, any H_l, W_l.
        offsets: L tensors (N, 2*kh*kw, H_out_l, W_out_l), read through their strides (slices and
            ``as_strided`` views are used in place).
        masks: L tensors (N, kh*kw, H_out_l, W_out_l), any strides.
        weight: (Cout, Cin, kh, kw), shared by the levels.
        bias: (Cout,) or None.
        stride, padding, dilation: int or (h, w) pair, shared by the levels.
        deterministic: as in `modulated_deform_conv2d`.

    Returns:
        L tensors (N, Cout, H_out_l, W_out_l) in the inputs' dtype: views of one buffer.

    Raises:
        TypeError / ValueError / NotImplementedError: as `modulated_deform_conv2d`, the message naming the level;
            also lists of different lengths, no level, or levels with different N.
        RuntimeError: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    _check_lists(inputs, offsets, masks)
    inputs, offsets, masks = list(inputs), list(offsets), list(masks)
    if isinstance(inputs[0], Tensor) and torch.is_autocast_enabled(inputs[0].device.type):
        device_type = inputs[0].device.type
        inputs, offsets, masks = (list(_autocast(device_type, *seq)) for seq in (inputs, offsets, masks))
        weight, bias = _autocast(device_type, weight, bias)
    stride, padding, dilation = _conv_pairs(stride, padding, dilation)
    _check_levels(inputs, offsets, masks, weight, bias, stride, padding, dilation)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    conv = (*stride, *padding, *dilation, bool(deterministic))
    if all(type(x) is Tensor for x in inputs) and not torch.compiler.is_compiling():
        flat = _EagerPyramid.apply(len(inputs), *inputs, *offsets, *masks, weight, bias, *conv)
    else:
        flat = _pyramid_forward_op(inputs, offsets, masks, weight, bias, *conv)
    n, cout = inputs[0].shape[0], weight.shape[0]
    return _split(flat, [torch.Size((n, cout, *offset.shape[2:])) for offset in offsets])
