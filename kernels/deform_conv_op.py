"""The public DCNv2 functions, their input checks and their torch.library custom ops:
`modulated_deform_conv2d` (one conv), `modulated_deform_conv2d_sets` (several weight sets, each over some of one
list of inputs, in one launch) and `modulated_deform_conv2d_pyramid` (one weight set over a list of levels).

The forward and the backward are each a custom op (`dyhead_triton::modulated_deform_conv2d` and
`dyhead_triton::modulated_deform_conv2d_backward`; `..._sets` and `..._sets_backward`) with a fake
implementation, tied together by `register_autograd`, so `torch.compile(fullgraph=True)` traces through them
without graph breaks. Eager calls on plain tensors run the same implementations through a
`torch.autograd.Function` instead, which skips the custom op's dispatch overhead. The sets ops return one
flat buffer per result (custom op outputs may not alias each other), split into the convs' views outside.
"""

import contextlib
import operator
from collections.abc import Sequence
from math import prod
from typing import Optional

import torch
from torch import Tensor

from . import deform_conv, deform_conv_backward
from .runtime import check_runnable, first_order_backward

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def eager_call(*tensors) -> bool:
    """Whether a call takes the autograd.Function path, which skips the custom op's dispatch: plain tensors
    (a module's weights are Parameters) outside tracing, on a real device. Tensor subclasses (fake and
    functional tensors among them), meta tensors (shapes only: the fake implementation) and traced code go
    through the custom op."""
    return (all(type(t) in (Tensor, torch.nn.Parameter) and not t.is_meta for t in tensors)
            and not torch.compiler.is_compiling())


def autocast_enabled(t) -> bool:
    """Whether autocast is on for ``t``'s device (meta tensors have no autocast, and asking raises)."""
    return isinstance(t, Tensor) and not t.is_meta and torch.is_autocast_enabled(t.device.type)


def conv_pair(value, name: str) -> tuple[int, int]:
    """A stride, padding or dilation as (h, w) Python ints, from an integer or a sequence of two: any integer
    type (``operator.index``: numpy integers, integer 0-d tensors), as torchvision takes them. TypeError, naming
    the argument, for anything else, floats and bools included (torchvision would read True as 1)."""
    pair = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else (value, value)
    if len(pair) == 2 and not any(isinstance(v, bool) for v in pair):
        try:
            return operator.index(pair[0]), operator.index(pair[1])
        except TypeError:
            pass
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def _conv_pairs(stride, padding, dilation):
    return conv_pair(stride, "stride"), conv_pair(padding, "padding"), conv_pair(dilation, "dilation")


def _check_runnable(t: Tensor):
    check_runnable(t, "kernels.modulated_deform_conv2d",
                   "a reference backend (DyHead backend='torchvision' or 'sampled')")


def _autocast(device_type, *tensors):
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype == torch.float32 else t for t in tensors)


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_offset_mask_shapes(offset: Tensor, mask: Tensor, n: int, kh: int, kw: int, ho: int, wo: int) -> None:
    """ValueError unless offset is (n, 2*kh*kw, ho, wo) and mask (n, kh*kw, ho, wo), naming the one that is not."""
    for name, t, per_tap in (("offset", offset, 2), ("mask", mask, 1)):
        expected = (n, per_tap * kh * kw, ho, wo)
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} must be {expected} (N, {name} channels, H_out, W_out), "
                             f"got shape {tuple(t.shape)}")


def check_conv_arguments(stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> None:
    """ValueError unless the (h, w) pairs have stride >= 1, dilation >= 1 and padding >= 0."""
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"need stride >= 1, dilation >= 1, padding >= 0; got {stride}, {dilation}, {padding}")


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
    check_conv_arguments(stride, padding, dilation)
    ho, wo = deform_conv.conv_output_size(h, w, kh, kw, stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(f"input {tuple(input.shape)} is smaller than the dilated {kh}x{kw} kernel")
    # the offset's channels say the offset groups (as in torchvision); the mask then has to match them
    per_group = 2 * kh * kw
    if offset.dim() == 4 and offset.shape[1] != per_group and offset.shape[1] % per_group == 0 and offset.shape[1] > 0:
        raise NotImplementedError(f"offset has {offset.shape[1]} channels: {offset.shape[1] // per_group} offset "
                                  "groups are not supported (only 1)")
    check_offset_mask_shapes(offset, mask, n, kh, kw, ho, wo)
    # Per-image sizes the kernels index in int32 (the image, pixel and channel terms are int64)
    if weight.numel() >= 2**31 or (w + 1) * cin >= 2**31:
        raise ValueError(f"weight {tuple(weight.shape)} or an input row (W*Cin = {w * cin}) has 2**31 elements or "
                         "more, beyond the kernels' int32 indexing of them")


def _one_conv(input, weight, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w):
    """The `deform_conv.Levels` of the one-conv op: one input, one weight set."""
    return deform_conv.plan_convs([input], weight.shape, [0], [1], [(stride_h, stride_w)], (pad_h, pad_w),
                                  (dil_h, dil_w))


def _forward_impl(input: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Optional[Tensor],
                  stride_h: int, stride_w: int, pad_h: int, pad_w: int, dil_h: int, dil_w: int,
                  deterministic: bool) -> Tensor:
    _check_runnable(input)
    levels = _one_conv(input, weight, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
    # Allocated in its shape, not viewed from a flat buffer: autograd forbids in-place ops on a view that a
    # custom Function returns, which torchvision's output takes (an in-place activation, a residual's +=).
    with _device_guard(input):
        return deform_conv.deform_conv_forward([input], [offset], [mask], [weight], [] if bias is None else [bias],
                                               [] if bias is None else [0], levels, (pad_h, pad_w), (dil_h, dil_w),
                                               shape=(input.shape[0], weight.shape[0], offset.shape[2],
                                                      offset.shape[3]))


_forward_op = torch.library.custom_op("dyhead_triton::modulated_deform_conv2d", mutates_args=())(_forward_impl)


@_forward_op.register_fake
def _forward_fake(input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                  deterministic):
    return input.new_empty((input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]))


def _backward_impl(grad_out: Tensor, input: Tensor, offset: Tensor, mask: Tensor, weight: Tensor,
                   stride_h: int, stride_w: int, pad_h: int, pad_w: int, dil_h: int, dil_w: int,
                   deterministic: bool, need_input: bool, need_sample: bool,
                   need_weight: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_runnable(input)
    needs = (need_input, need_sample, need_weight)
    levels = _one_conv(input, weight, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
    with _device_guard(input):
        grads = deform_conv_backward.deform_conv_backward(
            grad_out.reshape(-1), [input], [offset], [mask], [weight], levels, (pad_h, pad_w), (dil_h, dil_w),
            deterministic, needs)
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
    grad_input, grad_sample, grad_weight, grad_bias = backward(grad_out, input, offset, mask, weight, *ctx.conv,
                                                               ctx.deterministic, need[0], need[1] or need[2],
                                                               need[3])
    if need[1] or need[2]:
        grad_offset, grad_mask = _split(grad_sample, [offset.shape, mask.shape])
    else:
        grad_offset = grad_mask = grad_sample
    grads = (grad_input, grad_offset, grad_mask, grad_weight, grad_bias)
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
    @first_order_backward
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
    or in TF32 where torch's CUDA matmul does (``runtime.matmul_allows_tf32``); float64 is
    exact. Sample positions are exact in every dtype (floor and fraction of the offset alone). A NaN offset or
    mask makes its output pixel NaN, as on torchvision's CUDA kernel (README: non-finite values); an infinite
    offset is a sample outside the image. Under autocast,
    float32 tensors are cast to the autocast dtype (the kernels take half precision directly, where
    torchvision's op autocasts to float32).

    Args:
        input: (N, Cin, H, W).
        offset: (N, 2*kh*kw, H_out, W_out), (dy, dx) interleaved per tap, taps row-major. Read through its
            strides: slices and ``as_strided`` views are used in place.
        mask: (N, kh*kw, H_out, W_out), the modulation (already passed through the sigmoid); any strides.
        weight: (Cout, Cin, kh, kw).
        bias: (Cout,) or None.
        stride, padding, dilation: an integer (numpy and integer 0-d tensors too) or an (h, w) pair of them.
        deterministic: bitwise-reproducible gradients (grad input by a sorted gather instead of atomics, which
            costs a (N*H_out*W_out*kh*kw, Cin) fp32 buffer); None follows
            ``torch.are_deterministic_algorithms_enabled()``.

    Returns:
        (N, Cout, H_out, W_out) in the input's dtype.

    Raises:
        TypeError / ValueError: non-tensor or non-floating inputs, mixed dtypes or devices, wrong ranks or
            shapes (the message names the argument and the expected shape); a weight or an input row (W*Cin)
            of 2**31 elements or more.
        NotImplementedError: offset groups or convolution groups > 1.
        RuntimeError: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    if autocast_enabled(input):
        input, offset, mask, weight, bias = _autocast(input.device.type, input, offset, mask, weight, bias)
    stride, padding, dilation = _conv_pairs(stride, padding, dilation)
    _check_inputs(input, offset, mask, weight, bias, stride, padding, dilation)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    args = (input, offset, mask, weight, bias, *stride, *padding, *dilation, bool(deterministic))
    # Traced code (torch.compile, fake tensors, tensor subclasses) goes through the custom op; plain eager
    # tensors take the same implementation without its dispatch cost.
    if eager_call(input, offset, mask, weight, *([] if bias is None else [bias])):
        return _EagerDeformConv.apply(*args)
    return _forward_op(*args)


def _check_list(name, seq):
    if not isinstance(seq, Sequence):
        raise TypeError(f"{name} must be a list or tuple, got {type(seq).__name__}")


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


def _check_set_lists(inputs, weights, biases, levels, offsets, masks, strides):
    """Raise TypeError/ValueError unless the lists of a `modulated_deform_conv2d_sets` call have the structure
    it needs: one entry per set, non-empty sets with one offset and mask per level, indices in range."""
    for name, seq in (("inputs", inputs), ("weights", weights), ("biases", biases), ("levels", levels),
                      ("offsets", offsets), ("masks", masks), ("strides", strides)):
        _check_list(name, seq)
    if len(inputs) == 0 or len(weights) == 0:
        raise ValueError(f"need at least one input and one weight set, got {len(inputs)} and {len(weights)}")
    counts = {"weights": len(weights), "biases": len(biases), "levels": len(levels), "offsets": len(offsets),
              "masks": len(masks), "strides": len(strides)}
    if len(set(counts.values())) > 1:
        raise ValueError("need one entry per weight set in each of "
                         + ", ".join(f"{name} ({count})" for name, count in counts.items()))
    for s, (indices, set_offsets, set_masks) in enumerate(zip(levels, offsets, masks)):
        for name, seq in (("levels", indices), ("offsets", set_offsets), ("masks", set_masks)):
            _check_list(f"{name}[{s}]", seq)
        if len(indices) == 0:
            raise ValueError(f"set {s}: runs on no level (levels[{s}] is empty)")
        if not len(indices) == len(set_offsets) == len(set_masks):
            raise ValueError(f"set {s}: levels, offsets and masks need one entry per level, got {len(indices)}, "
                             f"{len(set_offsets)} and {len(set_masks)}")
        for i in indices:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(inputs):
                raise ValueError(f"set {s}: level index {i!r} is out of range for {len(inputs)} inputs")


def _check_set_tensors(inputs, weights, biases, levels, offsets, masks, strides, padding, dilation):
    """`_check_inputs` for each conv of a `modulated_deform_conv2d_sets` call (the message naming the set and
    level), one shape for the weights, and one N, Cin, dtype and device for all inputs, used or not."""
    first = inputs[0]
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            raise TypeError(f"inputs[{i}] must be a Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"inputs[{i}] must be (N, Cin, H, W), got shape {tuple(x.shape)}")
        if x.dtype != first.dtype:
            raise TypeError(f"inputs[{i}] has dtype {x.dtype} but inputs[0] has {first.dtype}: all tensors need "
                            "one dtype")
        if x.shape[:2] != first.shape[:2] or x.device != first.device:
            raise ValueError(f"inputs[{i}] is ({x.shape[0]}, {x.shape[1]}, ...) on {x.device} but inputs[0] is "
                             f"({first.shape[0]}, {first.shape[1]}, ...) on {first.device}: all inputs need one "
                             "N (batch size), Cin and device")
    for s, (weight, bias, indices, set_offsets, set_masks) in enumerate(zip(weights, biases, levels, offsets,
                                                                           masks)):
        for j, (i, offset, mask) in enumerate(zip(indices, set_offsets, set_masks)):
            try:
                _check_inputs(inputs[i], offset, mask, weight, bias, strides[s], padding, dilation)
            except (TypeError, ValueError, NotImplementedError) as error:
                raise type(error)(f"set {s}, level {j}: {error}") from None
        if weight.shape != weights[0].shape:
            raise ValueError(f"weights[{s}] has shape {tuple(weight.shape)} but weights[0] has "
                             f"{tuple(weights[0].shape)}: the sets need one weight shape")


# Per conv, where it reads its offsets and mask in the op's sample bases: (base index, first element relative to
# the base's, n, c, h, w element strides) for the offset, then the same for the mask.
_VIEW_INTS = 12


def _each_view(views, levels):
    """(is an offset, base index, first element, strides, shape) of each view, conv after conv, each conv's
    offset before its mask."""
    kk = levels.kh * levels.kw
    for k, (_, _, ho, wo) in enumerate(levels.sizes):
        row = views[k * _VIEW_INTS:(k + 1) * _VIEW_INTS]
        for is_offset, (b, start, *strides), channels in ((True, row[:6], 2 * kk), (False, row[6:], kk)):
            yield is_offset, b, start, tuple(strides), (levels.n, channels, ho, wo)


def _sample_views(bases, views, levels):
    """The offsets and masks the convs read, as tensors: a base itself where a view is all of it (no new
    view), else an `as_strided` view of it."""
    offsets, masks = [], []
    for is_offset, b, start, strides, shape in _each_view(views, levels):
        base = bases[b]
        whole = start == 0 and tuple(base.shape) == shape and tuple(base.stride()) == strides
        (offsets if is_offset else masks).append(
            base if whole else base.as_strided(shape, strides, base.storage_offset() + start))
    return offsets, masks


def _sample_grads(bases, views, levels):
    """The `deform_conv.SampleGrads` that put each base's gradient in the flat buffer, base after base, each
    contiguous: a view of a contiguous base lands where it reads; a tensor that is its own (non-contiguous)
    base gets a contiguous gradient."""
    starts = [0]
    for base in bases:
        starts.append(starts[-1] + base.numel())
    offsets, masks = [], []
    for is_offset, b, start, strides, (_, channels, ho, wo) in _each_view(views, levels):
        place = ((starts[b] + start, *strides) if bases[b].is_contiguous()
                 else (starts[b], channels * ho * wo, ho * wo, wo, 1))
        (offsets if is_offset else masks).append(place)
    return deform_conv.SampleGrads(offsets, masks, starts[-1])


def _sets_forward_impl(inputs: list[Tensor], bases: list[Tensor], weights: list[Tensor], biases: list[Tensor],
                       bias_sets: list[int], views: list[int], conv_inputs: list[int], set_sizes: list[int],
                       strides: list[int], pad_h: int, pad_w: int, dil_h: int, dil_w: int, mask_logits: bool,
                       deterministic: bool) -> Tensor:
    _check_runnable(inputs[0])
    levels = _plan(inputs, weights, conv_inputs, set_sizes, strides, pad_h, pad_w, dil_h, dil_w)
    offsets, masks = _sample_views(bases, views, levels)
    with _device_guard(inputs[0]):
        return deform_conv.deform_conv_forward(inputs, offsets, masks, weights, biases, bias_sets, levels,
                                               (pad_h, pad_w), (dil_h, dil_w), mask_logits)


def _plan(inputs, weights, conv_inputs, set_sizes, strides, pad_h, pad_w, dil_h, dil_w):
    pairs = [(strides[2 * s], strides[2 * s + 1]) for s in range(len(set_sizes))]
    return deform_conv.plan_convs(inputs, weights[0].shape, conv_inputs, set_sizes, pairs, (pad_h, pad_w),
                                  (dil_h, dil_w))


_sets_forward_op = torch.library.custom_op("dyhead_triton::modulated_deform_conv2d_sets",
                                           mutates_args=())(_sets_forward_impl)


@_sets_forward_op.register_fake
def _sets_forward_fake(inputs, bases, weights, biases, bias_sets, views, conv_inputs, set_sizes, strides, pad_h,
                       pad_w, dil_h, dil_w, mask_logits, deterministic):
    levels = _plan(inputs, weights, conv_inputs, set_sizes, strides, pad_h, pad_w, dil_h, dil_w)
    return inputs[0].new_empty((levels.o_pixels * levels.cout,))


def _sets_backward_impl(grad_out: Tensor, inputs: list[Tensor], bases: list[Tensor], weights: list[Tensor],
                        views: list[int], conv_inputs: list[int], set_sizes: list[int], strides: list[int],
                        pad_h: int, pad_w: int, dil_h: int, dil_w: int, mask_logits: bool, deterministic: bool,
                        need_input: bool, need_sample: bool, need_weight: bool
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_runnable(inputs[0])
    levels = _plan(inputs, weights, conv_inputs, set_sizes, strides, pad_h, pad_w, dil_h, dil_w)
    offsets, masks = _sample_views(bases, views, levels)
    with _device_guard(inputs[0]):
        return deform_conv_backward.deform_conv_backward(
            grad_out, inputs, offsets, masks, weights, levels, (pad_h, pad_w), (dil_h, dil_w), deterministic,
            (need_input, need_sample, need_weight), _sample_grads(bases, views, levels), mask_logits)


_sets_backward_op = torch.library.custom_op("dyhead_triton::modulated_deform_conv2d_sets_backward",
                                            mutates_args=())(_sets_backward_impl)


@_sets_backward_op.register_fake
def _sets_backward_fake(grad_out, inputs, bases, weights, views, conv_inputs, set_sizes, strides, pad_h, pad_w,
                        dil_h, dil_w, mask_logits, deterministic, need_input, need_sample, need_weight):
    levels = _plan(inputs, weights, conv_inputs, set_sizes, strides, pad_h, pad_w, dil_h, dil_w)
    shapes = deform_conv_backward.flat_backward_shapes(levels, (need_input, need_sample, need_weight),
                                                       sum(base.numel() for base in bases))
    return tuple(inputs[0].new_empty(shape) for shape in shapes)


def _split(flat, shapes):
    """Views of the flat buffer, one per shape, one after the other."""
    return [part.view(shape) for part, shape in zip(flat.split([prod(shape) for shape in shapes]), shapes)]


def _sets_setup_context(ctx, inputs, output):
    xs, bases, weights, biases, bias_sets, *plan = inputs
    ctx.save_for_backward(*xs, *bases, *weights)
    ctx.counts = (len(xs), len(bases), len(weights))
    ctx.plan = plan
    ctx.bias_sets = bias_sets


def _sets_gradients(backward, ctx, grad_out, needs):
    """The gradients of (inputs, bases, weights, biases) as lists (None where autograd does not need them), and
    None for the 11 non-tensor arguments. needs: the needs_input_grad of those four lists; backward: the
    custom backward op or its implementation."""
    saved = ctx.saved_tensors
    num_inputs, num_bases, num_sets = ctx.counts
    xs, bases, weights = (list(saved[:num_inputs]), list(saved[num_inputs:num_inputs + num_bases]),
                          list(saved[num_inputs + num_bases:]))
    need_x, need_base, need_weight, need_bias = needs
    if isinstance(need_bias, bool):  # the custom op's flag for an empty list
        need_bias = [need_bias] * len(ctx.bias_sets)
    grad_x, grad_sample, grad_weight, grad_bias = backward(
        grad_out, xs, bases, weights, *ctx.plan, any(need_x), any(need_base), any(need_weight))
    lists = []
    for flat, tensors, need in ((grad_x, xs, need_x), (grad_sample, bases, need_base)):
        grads = _split(flat, [t.shape for t in tensors]) if any(need) else tensors
        lists.append([g if wanted else None for g, wanted in zip(grads, need)])
    grad_weights = grad_weight.unbind(0) if any(need_weight) else weights
    lists.append([g if wanted else None for g, wanted in zip(grad_weights, need_weight)])
    lists.append([grad_bias[s] if wanted else None for s, wanted in zip(ctx.bias_sets, need_bias)])
    # An empty bias_sets reads as an empty list of tensors to torch.library: its "gradient" must be one too.
    return (*lists, [] if not ctx.bias_sets else None, *(None,) * 10)


def _sets_backward(ctx, grad_out):
    return _sets_gradients(_sets_backward_op, ctx, grad_out, ctx.needs_input_grad[:4])


_sets_forward_op.register_autograd(_sets_backward, setup_context=_sets_setup_context)


class _EagerSets(torch.autograd.Function):
    """The sets custom ops without their dispatch, for eager calls (see `_EagerDeformConv`). Takes the numbers
    of inputs, sample bases, sets and biases, then those tensors flattened, then the op's other arguments."""

    @staticmethod
    def forward(ctx, num_inputs, num_bases, num_sets, num_biases, *args):
        sizes = (num_inputs, num_bases, num_sets, num_biases)
        bounds = [sum(sizes[:k]) for k in range(5)]
        inputs = (*(list(args[a:b]) for a, b in zip(bounds[:-1], bounds[1:])), *args[bounds[-1]:])
        output = _sets_forward_impl(*inputs)
        _sets_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_out):
        num_inputs, num_bases, num_sets = ctx.counts
        need = ctx.needs_input_grad[4:]
        sizes = (num_inputs, num_bases, num_sets, len(ctx.bias_sets))
        bounds = [sum(sizes[:k]) for k in range(5)]
        needs = [need[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        grads = _sets_gradients(_sets_backward_impl, ctx, grad_out, needs)
        return (None, None, None, None, *(g for group in grads[:4] for g in group), *(None,) * 11)


def _strides_nest(t: Tensor) -> bool:
    """Whether t's strides nest: in increasing order, each past the span of the smaller ones. Then no two elements
    share memory; the converse does not hold (some interleaved ``as_strided`` layouts overlap nowhere and fail)."""
    span = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride < span:
            return False
        span = stride * size
    return True


def _find_views(sample_bases, named):
    """Per (name, tensor) of named, (index of the sample base it is a view of, first element relative to the
    base's); ValueError for a tensor in no base, or one whose elements overlap (gradients would collide)."""
    places = []
    for b, base in enumerate(sample_bases):
        if not isinstance(base, Tensor):
            raise TypeError(f"sample_bases[{b}] must be a Tensor, got {type(base).__name__}")
        if not base.is_contiguous():
            raise ValueError(f"sample_bases[{b}] must be contiguous (its gradient is laid out as it is)")
    storages = [base.untyped_storage().data_ptr() for base in sample_bases]
    for name, t in named:
        start, storage_of_t = None, t.untyped_storage().data_ptr()
        for b, (base, storage) in enumerate(zip(sample_bases, storages)):
            if t.dtype != base.dtype:
                continue
            if t.numel() == 0:  # an empty batch: nothing is read or written, any base of its dtype will do
                start = (b, 0)
                break
            if storage_of_t != storage:
                continue
            first = t.storage_offset() - base.storage_offset()
            last = first + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
            if min(t.stride()) >= 0 and 0 <= first and last < base.numel():
                start = (b, first)
                break
        if start is None:
            raise ValueError(f"{name} is not a view inside any of sample_bases")
        if not _strides_nest(t):
            raise ValueError(f"{name} may have elements that share memory (its strides do not nest), where its "
                             "gradient would collide with itself: pass a view with nested strides, or no sample_bases")
        places.append(start)
    return places


def _sample_args(offsets, masks, sample_bases=None):
    """The sets ops' (bases, views) arguments for the convs' offsets and masks (flat over the convs): the
    sample_bases they are views of, or without, the offsets and masks themselves."""
    num_convs = len(offsets)
    named = [(f"offsets, conv {k}", t) for k, t in enumerate(offsets)] + [(f"masks, conv {k}", t)
                                                                          for k, t in enumerate(masks)]
    if sample_bases is not None:
        bases = list(sample_bases)
        places = _find_views(bases, named)
    else:
        bases = [t for _, t in named]
        places = [(k, 0) for k in range(2 * num_convs)]
    views = []
    for k in range(num_convs):
        for (b, start), t in ((places[k], offsets[k]), (places[num_convs + k], masks[k])):
            views += [b, start, *t.stride()]
    return bases, views


def _run_sets(inputs, offsets, masks, weights, biases, conv_inputs, set_sizes, strides, padding, dilation,
              deterministic, sample_bases=None, mask_logits=False):
    """The checked arguments of a sets launch (offsets and masks flat over the convs, biases per set or None,
    strides pairs per set) through the eager Function or the custom op; returns every conv's output,
    (N, Cout, H_out, W_out) views of one buffer. sample_bases: see `modulated_deform_conv2d_sets` (eager calls
    only: traced calls differentiate the offsets and masks themselves, as without)."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    # The ops take the biases that exist and their sets: a list holding None would not be differentiable.
    bias_sets = [s for s, b in enumerate(biases) if b is not None]
    biases = [biases[s] for s in bias_sets]
    tensors = (*inputs, *offsets, *masks, *weights, *biases)
    eager = eager_call(*tensors)
    bases, views = _sample_args(offsets, masks, sample_bases if eager else None)
    plan = (views, list(conv_inputs), list(set_sizes), [v for pair in strides for v in pair], *padding, *dilation,
            bool(mask_logits), bool(deterministic))
    if eager:
        flat = _EagerSets.apply(len(inputs), len(bases), len(weights), len(biases), *inputs, *bases, *weights,
                                *biases, bias_sets, *plan)
    else:
        flat = _sets_forward_op(list(inputs), bases, list(weights), biases, bias_sets, *plan)
    n, cout = inputs[0].shape[0], weights[0].shape[0]
    return _split(flat, [torch.Size((n, cout, *offset.shape[2:])) for offset in offsets])


def _autocast_all(inputs, offsets, masks, weights, biases):
    device_type = inputs[0].device.type
    return tuple(list(_autocast(device_type, *seq)) for seq in (inputs, offsets, masks, weights, biases))


def modulated_deform_conv2d_pyramid(inputs: Sequence[Tensor], offsets: Sequence[Tensor], masks: Sequence[Tensor],
                                    weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=1,
                                    dilation=1, *, deterministic: Optional[bool] = None) -> list[Tensor]:
    """`modulated_deform_conv2d` on each level of a list that shares one weight, in one forward launch and one
    backward launch for all levels (plus a constant number of packing launches) instead of one per level:
    `modulated_deform_conv2d_sets` with one weight set.

    Same result as ``[modulated_deform_conv2d(x, o, m, weight, bias, stride, padding, dilation,
    deterministic=deterministic) for x, o, m in zip(inputs, offsets, masks)]``: the same precision, autocast
    behaviour and determinism; differentiable in every tensor, the weight and bias gradients summed over the
    levels.

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
    weights, biases = [weight], [bias]
    if autocast_enabled(inputs[0]):
        inputs, offsets, masks, weights, biases = _autocast_all(inputs, offsets, masks, weights, biases)
    stride, padding, dilation = _conv_pairs(stride, padding, dilation)
    _check_levels(inputs, offsets, masks, weights[0], biases[0], stride, padding, dilation)
    return _run_sets(inputs, offsets, masks, weights, biases, range(len(inputs)), [len(inputs)], [stride],
                     padding, dilation, deterministic)


def modulated_deform_conv2d_sets(inputs: Sequence[Tensor], weights: Sequence[Tensor],
                                 biases: Optional[Sequence[Optional[Tensor]]], levels: Sequence[Sequence[int]],
                                 offsets: Sequence[Sequence[Tensor]], masks: Sequence[Sequence[Tensor]],
                                 strides=None, padding=1, dilation=1, *, deterministic: Optional[bool] = None,
                                 sample_bases: Optional[Sequence[Tensor]] = None,
                                 mask_logits: bool = False) -> list[list[Tensor]]:
    """Several weight sets, each `modulated_deform_conv2d` on some of one list of inputs, in one forward launch
    and one backward launch for all (plus a constant number of packing launches).

    ``out[s][j] = modulated_deform_conv2d(inputs[levels[s][j]], offsets[s][j], masks[s][j], weights[s],
    biases[s], strides[s], padding, dilation)``: the same precision, autocast behaviour and determinism,
    differentiable in every tensor. The inputs are packed channels-last once however many convs read them, and
    an input's gradient sums those convs' in one buffer. A DyHead block is 13 convs of 3 weight sets over 5
    levels: one launch each way instead of three (`modulated_deform_conv2d_pyramid` per set) or thirteen.

    Args:
        inputs: I >= 1 tensors (N, Cin, H_i, W_i): one N, Cin, dtype and device, any H_i, W_i.
        weights: S >= 1 tensors (Cout, Cin, kh, kw) of one shape.
        biases: S entries (Cout,) or None each, or None for no bias at all.
        levels: S non-empty lists of indices into inputs: the inputs set s runs on.
        offsets, masks: S lists, one (N, 2*kh*kw, H_out, W_out) / (N, kh*kw, H_out, W_out) tensor per entry of
            levels[s], read through their strides (slices and ``as_strided`` views are used in place; one
            tensor may feed several convs).
        strides: S entries, an int or (h, w) pair each; or one int for every set (None: 1). padding,
            dilation: int or (h, w) pair, shared by the sets.
        deterministic: as in `modulated_deform_conv2d`.
        sample_bases: contiguous tensors that every offset and mask is a view of (say each level's offset-conv
            output, of which DyHead's offsets, masks and coarser-level views are all views). The backward then
            writes their gradients straight into the bases' gradients, convs that share elements adding into
            them, instead of one gradient per view that autograd pads and sums: the gradients go to the bases,
            none to the views. Used by eager calls; traced calls (and offsets or masks that autocast had to
            cast) differentiate the offsets and masks as without.
        mask_logits: the masks hold logits; the modulation is their sigmoid, applied while sampling (their
            gradient is the logits').

    Returns:
        S lists of (N, Cout, H_out, W_out) tensors in the inputs' dtype, out[s][j] for levels[s][j]: views of
        one buffer.

    Raises:
        TypeError / ValueError / NotImplementedError: as `modulated_deform_conv2d`, the message naming the set
            and level; also lists of mismatched lengths, no set or input, an empty set, an index out of range,
            weights of different shapes, inputs with different N or Cin; an offset or mask that is no view inside
            sample_bases, or whose elements overlap.
        RuntimeError: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    _check_list("weights", weights)
    if strides is None or not isinstance(strides, Sequence):  # one stride for every set
        strides = [1 if strides is None else strides] * len(weights)
    biases = [None] * len(weights) if biases is None else biases
    _check_set_lists(inputs, weights, biases, levels, offsets, masks, strides)
    strides = [conv_pair(stride, f"strides[{s}]") for s, stride in enumerate(strides)]
    padding, dilation = conv_pair(padding, "padding"), conv_pair(dilation, "dilation")
    inputs, weights, biases = list(inputs), list(weights), list(biases)
    offsets, masks = [list(seq) for seq in offsets], [list(seq) for seq in masks]
    if autocast_enabled(inputs[0]):
        device_type = inputs[0].device.type
        inputs, weights, biases = (list(_autocast(device_type, *seq)) for seq in (inputs, weights, biases))
        before = [t for nested in (offsets, masks) for seq in nested for t in seq]
        offsets, masks = ([list(_autocast(device_type, *seq)) for seq in nested] for nested in (offsets, masks))
        after = [t for nested in (offsets, masks) for seq in nested for t in seq]
        if any(a is not b for a, b in zip(before, after)):
            sample_bases = None  # the cast copies are no views of the bases
    _check_set_tensors(inputs, weights, biases, levels, offsets, masks, strides, padding, dilation)
    flat = _run_sets(inputs, [o for seq in offsets for o in seq], [m for seq in masks for m in seq], weights,
                     biases, [i for seq in levels for i in seq], [len(seq) for seq in levels], strides, padding,
                     dilation, deterministic, sample_bases, mask_logits)
    bounds = [sum(len(seq) for seq in levels[:s]) for s in range(len(levels) + 1)]
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
