"""One convolution weight over every level of a pyramid, as one convolution of a canvas.

DyHead's offset conv (3x3, Cin -> 27, one weight per block) runs on each of the five levels: five convolutions
forward, five backward, and eight additions of the weight's and bias's per-level gradients. Here the levels are
laid side by side on one canvas with zero gaps between them as wide as the conv's padding (the finest on the
left, the others stacked in a column on its right), so that one `F.conv2d` of the canvas computes every level's
output: in a gap the kernel reads the zeros that padding would give. The canvas is written by one Triton launch
from the levels' buffer and read back by one into the outputs' buffer. Backward writes the canvas again from the
inputs (it is not kept: a second copy of the input) and the output gradient's canvas, runs one convolution
backward, and reads the input gradient back: the weight's and bias's gradients come out summed.

The level table depends on shapes only and is written once per pyramid size (`cached_device_table`). Programs
are (canvas row x column block, channel block, image): every canvas element is visited once, so the gaps are
written as zeros in the same pass (no fill launch) and dropped on the way back.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .deform_conv import autotune_configs
from .deform_conv_op import _FLOAT_DTYPES, _device_guard, autocast_enabled, eager_call
from .device_table import cached_device_table
from .grouped_moments import _root, _start_in, view_gradients
from .runtime import cdiv, check_runnable, first_config_unless_tuning, first_order_backward, next_power_of_2

# Table columns per level: its first canvas row, first canvas column, H, W, and its first pixel in the flat
# buffers (element = pixel * C: one table for the input and output buffers whatever their channel counts).
FIELDS = tl.constexpr(5)

_SPACE = [
    ({"BLOCK_C": 8, "BLOCK_W": 64}, 4, 2),
    ({"BLOCK_C": 4, "BLOCK_W": 128}, 4, 2),
    ({"BLOCK_C": 16, "BLOCK_W": 64}, 8, 2),
    ({"BLOCK_C": 8, "BLOCK_W": 128}, 8, 2),
    ({"BLOCK_C": 32, "BLOCK_W": 32}, 8, 2),
]
_INTERPRET_CONFIG = {"BLOCK_C": 4, "BLOCK_W": 16}


def _prune(configs, named_args, **kwargs):
    return first_config_unless_tuning(configs)


# W_BUCKET (next power of two of the width) keys the tuning without retuning for every image width, as
# multi-scale training would.
@triton.autotune(configs=autotune_configs(_SPACE, _INTERPRET_CONFIG), key=["C", "W_BUCKET", "TO_CANVAS"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _canvas_kernel(canvas_ptr, flat_ptr, table_ptr, C, HEIGHT, WIDTH, W_BUCKET,
                   stride_n, stride_c, stride_h, stride_w,
                   NUM_LEVELS: tl.constexpr, TO_CANVAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    """TO_CANVAS: canvas = the levels placed on it, zero elsewhere; else: each level = its place on the canvas.

    Grid (HEIGHT * cdiv(WIDTH, BLOCK_W), cdiv(C, BLOCK_C), N). canvas: (N, C, HEIGHT, WIDTH) with the given
    element strides; flat: each level's (N, C, H, W) contiguous at C times its first pixel; table: (NUM_LEVELS,
    FIELDS) int64.
    """
    pid = tl.program_id(0)
    blocks_w = tl.cdiv(WIDTH, BLOCK_W)
    y = pid // blocks_w
    x = (pid % blocks_w) * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2).to(tl.int64)
    on_canvas = (c < C)[:, None] & (x < WIDTH)[None, :]
    canvas = canvas_ptr + n * stride_n + c[:, None].to(tl.int64) * stride_c + y * stride_h + x[None, :] * stride_w
    if TO_CANVAS:
        value = tl.zeros((BLOCK_C, BLOCK_W), dtype=canvas_ptr.dtype.element_ty)
    else:
        value = tl.load(canvas, mask=on_canvas)
    for l in tl.static_range(NUM_LEVELS):
        row = table_ptr + l * FIELDS
        y0 = tl.load(row).to(tl.int32)
        h = tl.load(row + 2).to(tl.int32)
        # A canvas row crosses at most two levels: the others are skipped whole.
        if (y >= y0) & (y < y0 + h):
            x0 = tl.load(row + 1).to(tl.int32)
            w = tl.load(row + 3).to(tl.int32)
            inside = on_canvas & ((x >= x0) & (x < x0 + w))[None, :]
            level = (flat_ptr + tl.load(row + 4) * C + (n * C + c[:, None]) * h * w + (y - y0) * w
                     + (x[None, :] - x0))
            if TO_CANVAS:
                value = tl.where(inside, tl.load(level, mask=inside), value)
            else:
                tl.store(level, value, mask=inside)
    if TO_CANVAS:
        tl.store(canvas, value, mask=on_canvas)


@dataclass(frozen=True)
class CanvasPlan:
    """Where each of N images' levels lies on the canvas: origins (y0, x0) per level, the canvas's (height,
    width), all levels' pixels in the flat buffers (N*H*W each, level after level), and the device table of
    it all (with each level's first pixel there)."""

    origins: tuple[tuple[int, int], ...]
    height: int
    width: int
    n: int
    pixels: int
    table: Tensor


@functools.cache
def canvas_layout(sizes: tuple[tuple[int, int], ...], gap_h: int, gap_w: int):
    """(origins, height, width) of a canvas that holds levels of the given (H, W) with gaps of at least gap_h
    rows and gap_w columns between any two of them: the first level at (0, 0), the others in a column to its
    right, top to bottom. For a pyramid that halves level by level the column is about as tall as the first
    level, so the canvas is about 1.5 times the first level's area (COCO's 5 levels: 13% more than their sum)."""
    (h0, w0), rest = sizes[0], sizes[1:]
    origins, y = [(0, 0)], 0
    for h, _ in rest:
        origins.append((y, w0 + gap_w))
        y += h + gap_h
    height = max(h0, y - gap_h)
    width = w0 + (gap_w + max(w for _, w in rest) if rest else 0)
    return tuple(origins), height, width


def plan_canvas(sizes: Sequence[tuple[int, int]], n: int, gaps: tuple[int, int], device: torch.device) -> CanvasPlan:
    """The `CanvasPlan` of N images of levels of the given sizes, gaps (rows, columns) apart."""
    sizes = tuple((int(h), int(w)) for h, w in sizes)
    origins, height, width = canvas_layout(sizes, *gaps)
    starts, total = [], 0
    for h, w in sizes:
        starts.append(total)
        total += n * h * w
    values = [v for (y0, x0), (h, w), start in zip(origins, sizes, starts) for v in (y0, x0, h, w, start)]
    return CanvasPlan(origins, height, width, n, total, cached_device_table(values, device))


def _launch(canvas: Tensor, flat: Tensor, plan: CanvasPlan, to_canvas: bool) -> None:
    n, c = canvas.shape[:2]
    grid = lambda meta: (plan.height * cdiv(plan.width, meta["BLOCK_W"]), cdiv(c, meta["BLOCK_C"]), n)
    with _device_guard(canvas):
        _canvas_kernel[grid](canvas, flat, plan.table, c, plan.height, plan.width, next_power_of_2(plan.width),
                             *canvas.stride(),
                             NUM_LEVELS=len(plan.origins), TO_CANVAS=to_canvas)


def levels_to_canvas(flat: Tensor, plan: CanvasPlan, c: int) -> Tensor:
    """The canvas (N, C, height, width), contiguous in flat's dtype, from flat (C * plan.pixels,) contiguous:
    each level's (N, C, H, W) in turn; zero outside the levels."""
    canvas = flat.new_empty((plan.n, c, plan.height, plan.width))
    _launch(canvas, flat, plan, True)
    return canvas


def canvas_to_levels(canvas: Tensor, plan: CanvasPlan) -> Tensor:
    """flat (C * plan.pixels,) in canvas's dtype: each level's (N, C, H, W) in turn, read from its place on
    canvas (N, C, height, width), any strides."""
    flat = canvas.new_empty((canvas.shape[1] * plan.pixels,))
    _launch(canvas, flat, plan, False)
    return flat


class _CanvasConv(torch.autograd.Function):
    """The levels' buffer -> canvas -> one convolution -> the outputs' buffer.

    The canvas is not kept for the backward, which writes it again from the inputs: they are kept anyway by
    what else reads them (a DyHead block's deformable convs), and a kept canvas would be a second copy of the
    block's input (30% of what a block keeps for its backward)."""

    @staticmethod
    def forward(ctx, flat, weight, bias, plan, padding, *inputs):
        canvas = levels_to_canvas(flat, plan, weight.shape[1])
        out = canvas_to_levels(F.conv2d(canvas, weight, bias, padding=padding), plan)
        ctx.save_for_backward(weight, *inputs)
        ctx.plan, ctx.padding, ctx.has_bias = plan, padding, bias is not None
        return out

    @staticmethod
    @first_order_backward
    def backward(ctx, grad):
        weight, *inputs = ctx.saved_tensors
        need_weight, need_bias = ctx.needs_input_grad[1:3]
        need_inputs = any(ctx.needs_input_grad[5:])
        cout, cin = weight.shape[:2]
        # Under autocast the forward convolved a cast of the inputs: the same cast gives the same canvas.
        canvas = levels_to_canvas(_levels_buffer(inputs).to(weight.dtype), ctx.plan, cin)
        d_canvas, d_weight, d_bias = torch.ops.aten.convolution_backward(
            levels_to_canvas(grad.contiguous(), ctx.plan, cout), canvas, weight, [cout] if ctx.has_bias else None,
            [1, 1], list(ctx.padding), [1, 1], False, [0, 0], 1, [need_inputs, need_weight, need_bias])
        d_inputs = (None,) * len(inputs)
        if need_inputs:
            # Each level's span of the one gradient, in the level's dtype (autocast convolved a cast of it)
            d_flat = canvas_to_levels(d_canvas, ctx.plan)
            firsts = itertools.accumulate((x.numel() for x in inputs[:-1]), initial=0)
            d_inputs = tuple(g.to(x.dtype) for g, x in zip(view_gradients(d_flat, [x.shape for x in inputs],
                                                                           firsts), inputs))
        return (None, d_weight, d_bias, None, None, *d_inputs)


def _check_inputs(inputs, weight, bias):
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise TypeError(f"inputs must be a non-empty list or tuple of tensors (N, Cin, H, W), got {inputs!r:.80}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a Tensor (Cout, Cin, kh, kw), got {type(weight).__name__}")
    if weight.dim() != 4 or weight.shape[2] % 2 == 0 or weight.shape[3] % 2 == 0:
        raise ValueError(f"weight must be (Cout, Cin, kh, kw) with odd kh and kw (a 'same' convolution), got shape "
                         f"{tuple(weight.shape)}")
    first = inputs[0]
    for l, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            raise TypeError(f"inputs[{l}] must be a Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != weight.shape[1]:
            raise ValueError(f"inputs[{l}] must be (N, Cin, H, W) with Cin = weight.shape[1] = {weight.shape[1]}, "
                             f"got shape {tuple(x.shape)}")
        if x.shape[0] != first.shape[0]:
            raise ValueError(f"inputs[{l}] has batch size {x.shape[0]}, inputs[0] has {first.shape[0]}")
    for name, t in [(f"inputs[{l}]", x) for l, x in enumerate(inputs)] + [("weight", weight), ("bias", bias)]:
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device}, inputs[0] on {first.device}: one device for all")
        # The levels share one buffer, so one dtype; F.conv2d's weight and bias follow it unless autocast casts all
        if t.dtype != first.dtype and (name.startswith("inputs") or not autocast_enabled(first)):
            raise TypeError(f"{name} is {t.dtype}, inputs[0] {first.dtype}: one dtype for all")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be (Cout,) = ({weight.shape[0]},), got shape {tuple(bias.shape)}")


def _levels_buffer(inputs: Sequence[Tensor]) -> Tensor:
    """The inputs as one contiguous buffer, level after level: the tensor they are already laid out in (a DyHead
    block's output levels are views of one), else a concatenation."""
    base = _root(inputs[0])
    first = 0
    for x in inputs:
        if not (base.is_contiguous() and base.dtype == x.dtype) or _start_in(x, base) != first:
            return torch.cat([x.reshape(-1) for x in inputs])
        first += x.numel()
    return base.view(-1)[:first]


def pyramid_conv2d(inputs: Sequence[Tensor], weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2))`` of every level x, as one flat buffer.

    Eagerly on plain tensors (CUDA, or CPU under ``TRITON_INTERPRET=1``) it is one convolution of a canvas that
    holds all levels with zero gaps between them (module docstring): the canvas written and read by one Triton
    launch each way; each input's gradient is its span of one tensor. Under
    tracing (torch.compile) it is a convolution per level, concatenated. The results agree to rounding (the
    convolution algorithm may differ with the size).

    Args:
        inputs: L >= 1 tensors (N, Cin, H_l, W_l) of one N, dtype (float32/float16/bfloat16/float64) and device,
            any sizes.
        weight: (Cout, Cin, kh, kw), kh and kw odd; bias: (Cout,) or None. Autocast applies as to `F.conv2d`.

    Returns:
        (sum_l N*Cout*H_l*W_l,): each level's output (N, Cout, H_l, W_l) in turn, contiguous, in the dtype
        `F.conv2d` gives (the inputs', or autocast's).

    Raises:
        TypeError / ValueError: inputs, weight or bias of the wrong type, shape, dtype or device (the message
            names the argument).
        RuntimeError: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    _check_inputs(inputs, weight, bias)
    padding = (weight.shape[2] // 2, weight.shape[3] // 2)
    n, c = inputs[0].shape[:2]
    sizes = [tuple(x.shape[2:]) for x in inputs]
    grouped = (eager_call(*inputs, weight, *([] if bias is None else [bias]))
               and n * c * weight.shape[0] > 0 and all(h * w > 0 for h, w in sizes))
    if not grouped:
        return torch.cat([F.conv2d(x, weight, bias, padding=padding).reshape(-1) for x in inputs])
    check_runnable(inputs[0], "kernels.pyramid_conv2d", "F.conv2d per level")
    plan = plan_canvas(sizes, n, padding, inputs[0].device)
    # The inputs themselves are the Function's differentiable inputs: what the launch reads is their data.
    flat = _levels_buffer(inputs).detach()
    device_type = flat.device.type
    if autocast_enabled(flat):
        # What autocast does to F.conv2d's arguments, done here: the backward's canvas must see the same.
        dtype = torch.get_autocast_dtype(device_type)
        flat, weight, bias = (t if t is None or t.dtype == torch.float64 else t.to(dtype) for t in (flat, weight, bias))
    return _CanvasConv.apply(flat, weight, bias, plan, padding, *inputs)
