"""Bilinear upsampling (align_corners=True) with a deterministic backward, in Triton.

torch's CUDA backward of bilinear `F.interpolate` scatters each output gradient into its 4 inputs with atomic
adds: its sums depend on the order the atomics land in, and under `torch.use_deterministic_algorithms(True)` it
raises instead of running. DyHead upsamples the coarser branch of every level, so a deterministic training run
of the triton backend needs another backward. Here each input pixel gathers the gradients of the outputs that
read it, in a fixed order: bitwise-repeatable, no atomics.

The forward is torch's own (`F.interpolate`); the backward is its exact adjoint, because it recomputes each
output's source rows, columns and interpolation weights with torch's arithmetic: ``scale = (in - 1) / (out -
1)`` rounded to the math dtype (float32, float64 for float64 tensors), ``src = scale * o``, the lower index
``int(src)``, the upper one the next unless at the border, and the weights ``1 - (src - int(src))`` and
``src - int(src)``. An input row i is read by the outputs o with i - 1 < src(o) < i + 1: the kernel scans a
window of candidates that holds all of them and weighs the others zero.

The same arithmetic as device functions (`axis_scale`, `axis_source`, `bilinear_tile`) lets `level_combine`
read a branch resized without storing the resized map; its backward ends in `upsample_backward`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .deform_conv import acc_tl, autotune_configs
from .deform_conv_op import _FLOAT_DTYPES, _device_guard, eager_call
from .runtime import cdiv, check_runnable, first_config_unless_tuning, first_order_backward, next_power_of_2

# (meta, num_warps, num_stages): input pixels x channels, long along pixels (the maps are NCHW).
GATHER_SPACE = [
    ({"BLOCK_C": 4, "BLOCK_P": 128}, 4, 1),
    ({"BLOCK_C": 8, "BLOCK_P": 128}, 4, 1),
    ({"BLOCK_C": 4, "BLOCK_P": 256}, 8, 1),
]
_INTERPRET_CONFIG = {"BLOCK_C": 4, "BLOCK_P": 16}


@triton.jit
def axis_scale(size_in, size_out, scale, ACC: tl.constexpr):
    """torch's source scale of an align_corners=True resize along one axis in ACC: the float32 argument, or
    for float64 (size_in - 1) / (size_out - 1) computed here (0 for one output)."""
    if ACC == tl.float64:
        scale = tl.where(size_out > 1, (size_in - 1).to(tl.float64) / tl.maximum(size_out - 1, 1).to(tl.float64),
                         0.0)
    return scale


@triton.jit
def axis_source(o, size_in, scale, ACC: tl.constexpr):
    """torch's source of output indices o along one axis: (lower input index, upper one, the upper one's
    weight); the lower one's weight is 1 minus it."""
    src = o.to(ACC) * scale
    low = src.to(tl.int32)
    return low, low + (low < size_in - 1).to(tl.int32), src - low.to(ACC)


@triton.jit
def bilinear_tile(x_ptr, n, c, p, mask, W_OUT, H_IN, W_IN, scale_h, scale_w,
                  stride_n, stride_c, stride_h, stride_w, ACC: tl.constexpr):
    """x (N, C, H_IN, W_IN, through its strides) resized bilinearly (align_corners=True) at output pixels p
    (flattened over rows of W_OUT) of image n, channels c: a [BLOCK_C, BLOCK_P] tile in ACC, torch's formula
    (zero where not mask). scale_h, scale_w: `axis_scale`'s."""
    h0, h1, fh = axis_source(p // W_OUT, H_IN, scale_h, ACC)
    w0, w1, fw = axis_source(p % W_OUT, W_IN, scale_w, ACC)
    rows = x_ptr + n.to(tl.int64) * stride_n + c.to(tl.int64)[:, None] * stride_c
    top = rows + (h0.to(tl.int64) * stride_h)[None, :]
    bottom = rows + (h1.to(tl.int64) * stride_h)[None, :]
    left = (w0.to(tl.int64) * stride_w)[None, :]
    right = (w1.to(tl.int64) * stride_w)[None, :]
    fw = fw[None, :]
    upper = ((1.0 - fw) * tl.load(top + left, mask=mask, other=0.0).to(ACC)
             + fw * tl.load(top + right, mask=mask, other=0.0).to(ACC))
    lower = ((1.0 - fw) * tl.load(bottom + left, mask=mask, other=0.0).to(ACC)
             + fw * tl.load(bottom + right, mask=mask, other=0.0).to(ACC))
    return (1.0 - fh)[None, :] * upper + fh[None, :] * lower


@triton.jit
def _axis_window(i, size_in, size_out):
    """For input indices i: the first output index of the window that holds every output reading i (int32),
    and the window's length (a scalar)."""
    # The outputs reading i have src = scale * o in (i - 1, i + 1), o in ((i - 1) / scale, (i + 1) / scale):
    # integer bounds past each side cover the rounding of scale and src.
    first = tl.maximum(((i - 1) * (size_out - 1)) // tl.maximum(size_in - 1, 1) - 1, 0)
    length = 2 * (size_out - 1) // tl.maximum(size_in - 1, 1) + 5
    return first, tl.where(size_in == 1, size_out, length)


@triton.jit
def _axis_weight(o, i, size_in, size_out, scale, ACC: tl.constexpr):
    """The weight with which output index o reads input index i along one axis (zero if it does not, or if o
    is past the output), torch's arithmetic."""
    low, high, frac = axis_source(o, size_in, scale, ACC)
    weight = tl.where(low == i, 1.0 - frac, 0.0) + tl.where(high == i, frac, 0.0)
    return tl.where(o < size_out, weight, 0.0)


@triton.jit
def gather_tile(g_ptr, n, c, p, valid, H_IN, W_IN, H_OUT, W_OUT, scale_h, scale_w,
                stride_gn, stride_gc, stride_gh, stride_gw, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_P: tl.constexpr):
    """The upsampling's adjoint at input pixels p (flattened over rows of W_IN) of image n, channels c: per
    pixel the sum over outputs (h, w) of weight_h(h, i) * weight_w(w, j) * g[n, c, h, w] in a fixed order, a
    [BLOCK_C, BLOCK_P] tile in ACC (zero where not valid). g: (N, C, H_OUT, W_OUT) through its strides;
    scale_h, scale_w: the float32 scales (`float32_scale`)."""
    i = p // W_IN
    j = p % W_IN
    scale_h = axis_scale(H_IN, H_OUT, scale_h, ACC)
    scale_w = axis_scale(W_IN, W_OUT, scale_w, ACC)
    first_h, rows = _axis_window(i, H_IN, H_OUT)
    first_w, cols = _axis_window(j, W_IN, W_OUT)
    g_rows = g_ptr + n.to(tl.int64) * stride_gn + c.to(tl.int64)[:, None] * stride_gc
    total = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    for a in range(rows):
        h = first_h + a
        weight_h = _axis_weight(h, i, H_IN, H_OUT, scale_h, ACC)
        for b in range(cols):
            w = first_w + b
            weight = weight_h * _axis_weight(w, j, W_IN, W_OUT, scale_w, ACC)
            read = valid & (weight != 0.0)[None, :]
            g = tl.load(g_rows + (h.to(tl.int64) * stride_gh + w * stride_gw)[None, :], mask=read, other=0.0)
            total += g.to(ACC) * weight[None, :]
    return total


# P_BUCKET and OUT_BUCKET (next powers of two of the input's and the output's pixel counts) key the tuning
# without retuning for every image size.
@triton.autotune(configs=autotune_configs(GATHER_SPACE, _INTERPRET_CONFIG),
                 key=["C", "P_BUCKET", "OUT_BUCKET"],
                 prune_configs_by={"early_config_prune": lambda configs, *args, **kwargs:
                                   first_config_unless_tuning(configs)})
@triton.jit
def _upsample_backward_kernel(g_ptr, dx_ptr, C, H_IN, W_IN, H_OUT, W_OUT, P_BUCKET, OUT_BUCKET, scale_h, scale_w,
                              stride_gn, stride_gc, stride_gh, stride_gw,
                              ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """dx = `gather_tile` of g over every input pixel.

    Grid (cdiv(H_IN * W_IN, BLOCK_P), cdiv(C, BLOCK_C), N). g: (N, C, H_OUT, W_OUT) through its strides;
    dx: (N, C, H_IN, W_IN) contiguous.
    """
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2).to(tl.int64)
    valid = (c < C)[:, None] & (p < H_IN * W_IN)[None, :]
    total = gather_tile(g_ptr, n, c, p, valid, H_IN, W_IN, H_OUT, W_OUT, scale_h, scale_w,
                        stride_gn, stride_gc, stride_gh, stride_gw, ACC, BLOCK_C, BLOCK_P)
    out = dx_ptr + (n * C + c.to(tl.int64)[:, None]) * (H_IN * W_IN) + p[None, :]
    tl.store(out, total.to(dx_ptr.dtype.element_ty), mask=valid)


def float32_scale(size_in: int, size_out: int) -> float:
    """torch's float32 source scale of an align_corners=True resize along one axis (a Triton float argument
    is float32, so the value must be one exactly); `axis_scale` recomputes it for float64."""
    if size_out <= 1:
        return 0.0
    return float(np.float32(size_in - 1) / np.float32(size_out - 1))


def upsample_backward(grad: Tensor, input_size: tuple[int, int]) -> Tensor:
    """d input (N, C, H_in, W_in), contiguous in grad's dtype, from grad (N, C, H_out, W_out) of a bilinear
    align_corners=True resize."""
    n, c, h_out, w_out = grad.shape
    h_in, w_in = input_size
    dx = grad.new_empty((n, c, h_in, w_in))
    if dx.numel() == 0:
        return dx
    if h_out * w_out == 0:
        return dx.zero_()
    grid = lambda meta: (cdiv(h_in * w_in, meta["BLOCK_P"]), cdiv(c, meta["BLOCK_C"]), n)
    _upsample_backward_kernel[grid](grad, dx, c, h_in, w_in, h_out, w_out, next_power_of_2(h_in * w_in),
                                    next_power_of_2(h_out * w_out), float32_scale(h_in, h_out),
                                    float32_scale(w_in, w_out), *grad.stride(),
                                    ACC=acc_tl(grad))
    return dx


class _Upsample(torch.autograd.Function):
    """torch's forward, the gathering backward."""

    @staticmethod
    def forward(ctx, x, size):
        ctx.input_size = tuple(x.shape[-2:])
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)

    @staticmethod
    @first_order_backward
    def backward(ctx, grad):
        check_runnable(grad, "kernels.upsample_bilinear", "F.interpolate")
        with _device_guard(grad):
            return upsample_backward(grad, ctx.input_size), None


def upsample_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=True)`` whose backward is deterministic.

    The forward is torch's; the backward gathers, for each input pixel, the output gradients that read it
    (Triton, fp32 accumulation, fp64 for float64): bitwise-repeatable, and it runs under
    ``torch.use_deterministic_algorithms(True)``, where torch's CUDA backward raises. It is torch's gradient
    up to the order of the sums. Under tracing (torch.compile) it is ``F.interpolate``.

    Args:
        x: (N, C, H, W) float32/float16/bfloat16/float64, CUDA (or CPU under ``TRITON_INTERPRET=1``; the
            forward alone runs anywhere).
        size: (H_out, W_out).

    Returns:
        (N, C, H_out, W_out) in x's dtype, as ``F.interpolate`` returns it.

    Raises:
        TypeError / ValueError: x not a floating 4-d tensor, size not two positive ints.
        RuntimeError (backward): CPU tensors without ``TRITON_INTERPRET=1``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    size = tuple(size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"size must be two positive ints (H_out, W_out), got {size}")
    if not eager_call(x):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    return _Upsample.apply(x, size)
