"""Triton kernels for the modulated deformable convolution (DCNv2), forward and backward.

Implicit GEMM: no im2col "columns" buffer is written to global memory. A program owns a tile of output
pixels and, for each kernel tap, computes the sample point of every pixel once (4 corner indices, 4 bilinear
weights times the mask, all shared by the input channels because there is one offset group), then gathers and
blends the corner tiles channel chunk by channel chunk. Bilinear weights and accumulators are fp32 (fp64 for
fp64 tensors); products go through `tl.dot` in the storage dtype.

Layouts: input, offset, mask and the output gradient are read through their strides (offset and mask may be
slices or `as_strided` views); the weight is packed as [kh*kw*Cin, Cout] (row = tap * Cin + channel).
Reference twin: `torchvision.ops.deform_conv2d` with one offset group. This module holds the shared sampling
helpers and the forward; `deform_conv_backward` the backward.
"""

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def autotune_configs(space, interpret_config):
    """Autotune configs: the GPU search space, or one small config under the (slow) interpreter."""
    if INTERPRET:
        return [triton.Config(interpret_config)]
    return [triton.Config(meta, num_warps=warps, num_stages=stages) for meta, warps, stages in space]


def fp64_prune(configs, named_args, **kwargs):
    """fp64 multiplies with a [BLOCK_P, BLOCK_K, BLOCK_N] broadcast: only 16-wide tiles fit in registers."""
    if kwargs.get("FP64"):
        return [triton.Config({"BLOCK_P": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    return configs


PRUNE_FP64 = {"early_config_prune": fp64_prune}


@triton.jit
def mma(acc, a, b, FP64: tl.constexpr, TF32: tl.constexpr):
    """acc += a @ b. fp64 uses an exact broadcast-multiply-sum because fp64 `tl.dot` is not portable."""
    if FP64:
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    elif TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def tap_sample(off_ptr, msk_ptr, n, oh, ow, valid_p, tap, H, W, KW,
                stride_on, stride_oc, stride_oh, stride_ow,
                stride_mn, stride_mc, stride_mh, stride_mw,
                conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
                ACC: tl.constexpr):
    """Sample point of one tap for a tile of output pixels.

    Returns the top-left corner (int64), the fractional parts, the mask (zero where the sample does not count)
    and whether the sample counts (-1 < y < H and -1 < x < W).
    """
    ki = tap // KW
    kj = tap % KW
    off = off_ptr + n * stride_on + oh * stride_oh + ow * stride_ow
    dy = tl.load(off + (2 * tap) * stride_oc, mask=valid_p, other=0.0).to(ACC)
    dx = tl.load(off + (2 * tap + 1) * stride_oc, mask=valid_p, other=0.0).to(ACC)
    m = tl.load(msk_ptr + n * stride_mn + tap * stride_mc + oh * stride_mh + ow * stride_mw,
                mask=valid_p, other=0.0).to(ACC)
    y = (oh * conv_stride_h - pad_h + ki * dil_h).to(ACC) + dy
    x = (ow * conv_stride_w - pad_w + kj * dil_w).to(ACC) + dx
    inside = valid_p & (y > -1) & (y < H) & (x > -1) & (x < W)
    # Samples that do not count are moved to 0 so that floor and the int cast stay well defined.
    y = tl.where(inside, y, 0.0)
    x = tl.where(inside, x, 0.0)
    y0 = tl.floor(y)
    x0 = tl.floor(x)
    m = tl.where(inside, m, 0.0)
    return y0.to(tl.int64), x0.to(tl.int64), y - y0, x - x0, m, inside


@triton.jit
def corner_masks(y0, x0, inside, H, W):
    """Which of the 4 corners lie in the image (inside already bounds y0 to [-1, H-1] and x0 to [-1, W-1])."""
    ok_y0 = inside & (y0 >= 0)
    ok_y1 = inside & (y0 + 1 < H)
    ok_x0 = x0 >= 0
    ok_x1 = x0 + 1 < W
    return ok_y0 & ok_x0, ok_y0 & ok_x1, ok_y1 & ok_x0, ok_y1 & ok_x1


@triton.jit
def load_corners(img, chan, cmask, y0, x0, inside, H, W, stride_xh, stride_xw, ACC: tl.constexpr):
    """Gather the 4 corner tiles [BLOCK_P, BLOCK_K] of the input; corners outside the image read zero."""
    ok00, ok01, ok10, ok11 = corner_masks(y0, x0, inside, H, W)
    ptr = img[:, None] + chan[None, :] + (y0 * stride_xh + x0 * stride_xw)[:, None]
    v00 = tl.load(ptr, mask=ok00[:, None] & cmask[None, :], other=0.0).to(ACC)
    v01 = tl.load(ptr + stride_xw, mask=ok01[:, None] & cmask[None, :], other=0.0).to(ACC)
    v10 = tl.load(ptr + stride_xh, mask=ok10[:, None] & cmask[None, :], other=0.0).to(ACC)
    v11 = tl.load(ptr + stride_xh + stride_xw, mask=ok11[:, None] & cmask[None, :], other=0.0).to(ACC)
    return v00, v01, v10, v11


@triton.jit
def pixel_coords(offs_p, Ho, Wo):
    n = offs_p // (Ho * Wo)
    hw = offs_p % (Ho * Wo)
    return n, hw // Wo, hw % Wo


_FWD_SPACE = [
    ({"BLOCK_P": 128, "BLOCK_N": 128, "BLOCK_K": 32}, 8, 3),
    ({"BLOCK_P": 128, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 3),
    ({"BLOCK_P": 64, "BLOCK_N": 128, "BLOCK_K": 32}, 4, 3),
    ({"BLOCK_P": 64, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 2),
    ({"BLOCK_P": 128, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 2),
    ({"BLOCK_P": 64, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 4),
    ({"BLOCK_P": 32, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 2),
]


# P_BUCKET (next power of two of the pixel count) keys the tuning on the problem size without retuning for
# every image size.
@triton.autotune(configs=autotune_configs(_FWD_SPACE, {"BLOCK_P": 32, "BLOCK_N": 16, "BLOCK_K": 16}),
                 key=["C", "Cout", "KK", "P_BUCKET"], prune_configs_by=PRUNE_FP64)
@triton.jit
def _fwd_kernel(x_ptr, off_ptr, msk_ptr, w_ptr, b_ptr, y_ptr,
                C, H, W, Cout, Ho, Wo, P, KK, KW, P_BUCKET,
                stride_xn, stride_xc, stride_xh, stride_xw,
                stride_on, stride_oc, stride_oh, stride_ow,
                stride_mn, stride_mc, stride_mh, stride_mw,
                stride_wk, stride_wn,
                stride_yn, stride_yc, stride_yh, stride_yw,
                conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
                HAS_BIAS: tl.constexpr, FP64: tl.constexpr, TF32: tl.constexpr, ACC: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[p, co] = sum_{tap, c} sample(x, p, tap)[c] * w[tap * C + c, co] (+ bias[co])."""
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid_p = offs_p < P
    n, oh, ow = pixel_coords(offs_p, Ho, Wo)
    offs_co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_co = offs_co < Cout
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    img = x_ptr + n * stride_xn

    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC)
    for tap in range(0, KK):
        y0, x0, ly, lx, m, inside = tap_sample(
            off_ptr, msk_ptr, n, oh, ow, valid_p, tap, H, W, KW,
            stride_on, stride_oc, stride_oh, stride_ow, stride_mn, stride_mc, stride_mh, stride_mw,
            conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w, ACC)
        w00 = (m * (1 - ly) * (1 - lx))[:, None]
        w01 = (m * (1 - ly) * lx)[:, None]
        w10 = (m * ly * (1 - lx))[:, None]
        w11 = (m * ly * lx)[:, None]
        for c0 in range(0, C, BLOCK_K):
            c = c0 + offs_k
            cmask = c < C
            v00, v01, v10, v11 = load_corners(img, c * stride_xc, cmask, y0, x0, inside, H, W,
                                               stride_xh, stride_xw, ACC)
            val = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11
            wt = tl.load(w_ptr + (tap * C + c)[:, None] * stride_wk + offs_co[None, :] * stride_wn,
                         mask=cmask[:, None] & valid_co[None, :], other=0.0)
            acc = mma(acc, val.to(wt.dtype), wt, FP64, TF32)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_co, mask=valid_co, other=0.0).to(ACC)[None, :]
    y_ptrs = (y_ptr + (n * stride_yn + oh * stride_yh + ow * stride_yw)[:, None]
              + offs_co[None, :] * stride_yc)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid_p[:, None] & valid_co[None, :])


def launch_flags(x):
    """Constexpr flags: fp64 computes exactly; fp32 uses TF32 only where torch's matmul would."""
    fp64 = x.dtype == torch.float64
    tf32 = x.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    return {"FP64": fp64, "TF32": tf32 and not fp64, "ACC": tl.float64 if fp64 else tl.float32}


def acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def pack_weight(weight):
    """(Cout, Cin, kh, kw) -> (kh*kw*Cin, Cout): row tap * Cin + c holds the tap's weights of channel c."""
    cout, cin, kh, kw = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(kh * kw * cin, cout).contiguous()


def geometry(x, weight, stride, padding, dilation):
    n, c, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return n, c, h, w, cout, kh, kw, ho, wo


def conv_args(stride, padding, dilation):
    return (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])


def deform_conv_forward(x, offset, mask, weight, bias, stride, padding, dilation):
    """Forward launch. Shapes as `kernels.modulated_deform_conv2d`; stride/padding/dilation are pairs.

    Returns y: (N, Cout, H_out, W_out), contiguous, in the input's dtype.
    """
    n, c, h, w, cout, kh, kw, ho, wo = geometry(x, weight, stride, padding, dilation)
    y = x.new_empty((n, cout, ho, wo))
    p = n * ho * wo
    if p == 0 or cout == 0:
        return y
    if c == 0:
        return y.copy_(bias[None, :, None, None].expand_as(y)) if bias is not None else y.zero_()
    wp = pack_weight(weight)
    grid = lambda meta: (triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(cout, meta["BLOCK_N"]))
    _fwd_kernel[grid](
        x, offset, mask, wp, bias if bias is not None else wp, y,
        c, h, w, cout, ho, wo, p, kh * kw, kw, triton.next_power_of_2(p),
        *x.stride(), *offset.stride(), *mask.stride(), *wp.stride(), *y.stride(),
        *conv_args(stride, padding, dilation),
        HAS_BIAS=bias is not None, **launch_flags(x))
    return y
