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
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .deform_conv_op import _device_guard, eager_call
from .level_pass import _acc, _check_float_tensor, _check_runnable, level_autotune

# (meta, num_warps, num_stages): input pixels x channels; NCHW tiles long along pixels.
_GATHER_SPACE = [
    ({"BLOCK_C": 4, "BLOCK_P": 128}, 4, 1),
    ({"BLOCK_C": 8, "BLOCK_P": 128}, 4, 1),
    ({"BLOCK_C": 4, "BLOCK_P": 256}, 8, 1),
]


@triton.jit
def _axis_window(i, size_in, size_out, scale, ACC: tl.constexpr):
    """For input indices i: the first output index of the window that holds every output reading i (int32),
    and the window's length (a scalar)."""
    if ACC == tl.float64:
        scale = tl.where(size_out > 1, (size_in - 1).to(tl.float64) / tl.maximum(size_out - 1, 1).to(tl.float64),
                         0.0)
    # The outputs reading i have src = scale * o in (i - 1, i + 1), o in ((i - 1) / scale, (i + 1) / scale):
    # integer bounds past each side cover the rounding of scale and src.
    first = tl.maximum(((i - 1) * (size_out - 1)) // tl.maximum(size_in - 1, 1) - 1, 0)
    length = 2 * (size_out - 1) // tl.maximum(size_in - 1, 1) + 5
    return first, tl.where(size_in == 1, size_out, length), scale


@triton.jit
def _axis_weight(o, i, size_in, size_out, scale, ACC: tl.constexpr):
    """The weight with which output index o reads input index i along one axis (zero if it does not, or if o
    is past the output), torch's arithmetic."""
    src = o.to(ACC) * scale
    low = src.to(tl.int32)
    high = low + (low < size_in - 1).to(tl.int32)
    frac = src - low.to(ACC)
    weight = tl.where(low == i, 1.0 - frac, 0.0) + tl.where(high == i, frac, 0.0)
    return tl.where(o < size_out, weight, 0.0)


@level_autotune(_GATHER_SPACE, key=["C", "H_IN", "W_IN", "H_OUT", "W_OUT"])
@triton.jit
def _upsample_backward_kernel(g_ptr, dx_ptr, C, H_IN, W_IN, H_OUT, W_OUT, scale_h, scale_w,
                              stride_gn, stride_gc, stride_gh, stride_gw, stride_p,
                              ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """dx[n, c, i, j] = sum over outputs (h, w) of weight_h(h, i) * weight_w(w, j) * g[n, c, h, w], summed in
    a fixed order.

    Grid (cdiv(H_IN * W_IN, BLOCK_P), cdiv(C, BLOCK_C), N). g: (N, C, H_OUT, W_OUT) through its strides;
    dx: (N, C, H_IN, W_IN) contiguous (stride_p is 1, a named argument for the layout pruner).
    """
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2).to(tl.int64)
    i = p // W_IN
    j = p % W_IN
    valid = (c < C)[:, None] & (p < H_IN * W_IN)[None, :]
    first_h, rows, scale_h = _axis_window(i, H_IN, H_OUT, scale_h, ACC)
    first_w, cols, scale_w = _axis_window(j, W_IN, W_OUT, scale_w, ACC)
    g_rows = g_ptr + n * stride_gn + c.to(tl.int64)[:, None] * stride_gc
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
    out = dx_ptr + (n * C + c.to(tl.int64)[:, None]) * (H_IN * W_IN) + p[None, :] * stride_p
    tl.store(out, total.to(dx_ptr.dtype.element_ty), mask=valid)


def _float32_scale(size_in: int, size_out: int) -> float:
    """torch's float32 source scale of an align_corners=True resize (a Triton float argument is float32, so
    the value must be one exactly)."""
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
    grid = lambda meta: (triton.cdiv(h_in * w_in, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]), n)
    _upsample_backward_kernel[grid](grad, dx, c, h_in, w_in, h_out, w_out, _float32_scale(h_in, h_out),
                                    _float32_scale(w_in, w_out), *grad.stride(), 1, ACC=_acc(grad))
    return dx


class _Upsample(torch.autograd.Function):
    """torch's forward, the gathering backward."""

    @staticmethod
    def forward(ctx, x, size):
        ctx.input_size = tuple(x.shape[-2:])
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        _check_runnable(grad, "upsample_bilinear")
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
    _check_float_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    size = tuple(size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"size must be two positive ints (H_out, W_out), got {size}")
    if not eager_call(x):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    return _Upsample.apply(x, size)
