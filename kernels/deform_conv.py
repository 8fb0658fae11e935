"""Triton kernels for the modulated deformable convolution (DCNv2): shared sampling helpers and the forward.

Implicit GEMM: no im2col "columns" buffer is written to global memory. A program owns a tile of output
pixels of one image and walks the taps x input-channel chunks in one flat loop; at the first chunk of each tap
it computes the sample point of every pixel (4 corner positions, 4 bilinear weights times the mask, all shared
by the input channels because there is one offset group), then gathers and blends the corner tiles chunk by
chunk and feeds `tl.dot` with the pre-packed weight. Bilinear weights and accumulators are fp32 (fp64 for
fp64 tensors); products go through `tl.dot` in the storage dtype.

Layouts: the wrappers hand the kernels a channels-last (NHWC) input, so each corner of a sample is one
contiguous channel vector (vectorized, coalesced loads); offset and mask are read through their strides (they
may be slices or `as_strided` views); the weight is packed as [kh*kw*Cin, Cout] (row = tap * Cin + channel);
y and the output gradient are contiguous NCHW, and a pixel tile never spans two images, so its pixels are
contiguous in memory. Reference twin: `torchvision.ops.deform_conv2d` with one offset group.
`deform_conv_backward` holds the backward.
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


@triton.jit
def mma(acc, a, b, FP64: tl.constexpr, DOT: tl.constexpr):
    """acc += a @ b with `tl.dot`'s input_precision DOT. fp64 uses an exact broadcast-multiply-sum because
    fp64 `tl.dot` is not portable."""
    if FP64:
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT)
    return acc


@triton.jit
def tap_sample(off_ptr, msk_ptr, n, oh, ow, valid_p, tap, H, W, KW,
               stride_on, stride_oc, stride_oh, stride_ow,
               stride_mn, stride_mc, stride_mh, stride_mw,
               conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
               ACC: tl.constexpr):
    """Sample point of one tap for a tile of output pixels of image n.

    Returns the top-left corner y0, x0 (int32: offsets are clamped to +-2**30 pixels), the fractional parts
    ly, lx and the mask m (all zero where the sample does not count: unless -1 < y < H and -1 < x < W), which
    of the corners (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1) lie in the image, and their bilinear weights
    times the mask.
    """
    off = off_ptr + n * stride_on + (2 * tap).to(tl.int64) * stride_oc + oh * stride_oh + ow * stride_ow
    dy = tl.load(off, mask=valid_p, other=0.0).to(ACC)
    dx = tl.load(off + stride_oc, mask=valid_p, other=0.0).to(ACC)
    m = tl.load(msk_ptr + n * stride_mn + tap.to(tl.int64) * stride_mc + oh * stride_mh + ow * stride_mw,
                mask=valid_p, other=0.0).to(ACC)
    y0, ly, in_y = _split_coordinate(dy, oh * conv_stride_h - pad_h + (tap // KW) * dil_h, H)
    x0, lx, in_x = _split_coordinate(dx, ow * conv_stride_w - pad_w + (tap % KW) * dil_w, W)
    inside = valid_p & in_y & in_x
    y0 = tl.where(inside, y0, 0)
    x0 = tl.where(inside, x0, 0)
    ly = tl.where(inside, ly, 0.0)
    lx = tl.where(inside, lx, 0.0)
    m = tl.where(inside, m, 0.0)
    ok00, ok01, ok10, ok11 = _corner_masks(y0, x0, inside, H, W)
    w00, w01, w10, w11 = _bilinear_weights(ly, lx, m)
    return y0, x0, ly, lx, m, ok00, ok01, ok10, ok11, w00, w01, w10, w11


@triton.jit
def _split_coordinate(d, base, size):
    """Cell and fraction of the sample coordinate base + d (base an integer), and whether -1 < base + d < size.

    Exact: floor and fraction are taken of the offset d alone, where base + d would round in fp32 (and could
    move a sample across a cell border, where the offset gradient jumps). Offsets beyond +-2**30 (or NaN) are
    clamped far outside.
    """
    f = tl.minimum(tl.maximum(tl.floor(d), -1073741824.0), 1073741824.0)
    cell = base + f.to(tl.int32)
    frac = d - f
    return cell, frac, ((cell >= 0) | ((cell == -1) & (frac > 0))) & (cell < size)


@triton.jit
def _corner_masks(y0, x0, inside, H, W):
    """Which of the 4 corners lie in the image (inside already bounds y0 to [-1, H-1] and x0 to [-1, W-1])."""
    ok_y0 = inside & (y0 >= 0)
    ok_y1 = inside & (y0 + 1 < H)
    ok_x0 = x0 >= 0
    ok_x1 = x0 + 1 < W
    return ok_y0 & ok_x0, ok_y0 & ok_x1, ok_y1 & ok_x0, ok_y1 & ok_x1


@triton.jit
def _bilinear_weights(ly, lx, m):
    """Bilinear weights times the mask of the corners (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1)."""
    hy = 1 - ly
    hx = 1 - lx
    return m * hy * hx, m * hy * lx, m * ly * hx, m * ly * lx


@triton.jit
def load_corners(ptr, cmask, ok00, ok01, ok10, ok11, stride_xh, stride_xw, ACC: tl.constexpr):
    """Gather the 4 corner tiles [BLOCK_P, BLOCK_K] of the input from the pointers of the top-left corners;
    corners outside the image read zero."""
    cm = cmask[None, :]
    v00 = tl.load(ptr, mask=ok00[:, None] & cm, other=0.0).to(ACC)
    v01 = tl.load(ptr + stride_xw, mask=ok01[:, None] & cm, other=0.0).to(ACC)
    v10 = tl.load(ptr + stride_xh, mask=ok10[:, None] & cm, other=0.0).to(ACC)
    v11 = tl.load(ptr + stride_xh + stride_xw, mask=ok11[:, None] & cm, other=0.0).to(ACC)
    return v00, v01, v10, v11


# (meta, num_warps, num_stages). BLOCK_N = 256 covers DyHead's 256 output channels, so every sampled tile is
# gathered and blended once; the wgmma accumulator of a 64 x 256 tile takes 128 registers per thread of one
# warpgroup.
_FWD_SPACE = [
    ({"BLOCK_P": 128, "BLOCK_N": 256, "BLOCK_K": 32}, 8, 3),
    ({"BLOCK_P": 128, "BLOCK_N": 256, "BLOCK_K": 32}, 8, 4),
    ({"BLOCK_P": 128, "BLOCK_N": 256, "BLOCK_K": 64}, 8, 2),
    ({"BLOCK_P": 64, "BLOCK_N": 256, "BLOCK_K": 64}, 8, 3),
    ({"BLOCK_P": 64, "BLOCK_N": 256, "BLOCK_K": 32}, 4, 4),
    ({"BLOCK_P": 128, "BLOCK_N": 128, "BLOCK_K": 32}, 8, 4),
    ({"BLOCK_P": 64, "BLOCK_N": 128, "BLOCK_K": 32}, 4, 3),
]


# fp32 tiles take twice the shared memory (pipeline stages) and registers of 16-bit ones.
_FWD_SPACE_FP32 = [
    ({"BLOCK_P": 64, "BLOCK_N": 128, "BLOCK_K": 32}, 4, 2),
    ({"BLOCK_P": 64, "BLOCK_N": 256, "BLOCK_K": 32}, 8, 2),
    ({"BLOCK_P": 128, "BLOCK_N": 128, "BLOCK_K": 32}, 8, 2),
    ({"BLOCK_P": 64, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 3),
]


def _fwd_prune(configs, named_args, **kwargs):
    """The fp32 space for fp32; one 16-wide config for fp64, which multiplies with a [BLOCK_P, BLOCK_K,
    BLOCK_N] broadcast (see `mma`)."""
    if kwargs.get("FP64"):
        return [triton.Config({"BLOCK_P": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    if named_args["x_ptr"].dtype == torch.float32:
        return autotune_configs(_FWD_SPACE_FP32, None)
    return configs


# P_BUCKET (next power of two of the pixel count) keys the tuning on the problem size without retuning for
# every image size.
@triton.autotune(configs=autotune_configs(_FWD_SPACE, {"BLOCK_P": 32, "BLOCK_N": 16, "BLOCK_K": 16}),
                 key=["C", "Cout", "KK", "P_BUCKET", "DOT"], prune_configs_by={"early_config_prune": _fwd_prune})
@triton.jit
def _fwd_kernel(x_ptr, off_ptr, msk_ptr, w_ptr, b_ptr, y_ptr,
                C, H, W, Cout, Ho, Wo, HoWo, KK, KW, P_BUCKET,
                stride_xn, stride_xc, stride_xh, stride_xw,
                stride_on, stride_oc, stride_oh, stride_ow,
                stride_mn, stride_mc, stride_mh, stride_mw,
                conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
                HAS_BIAS: tl.constexpr, FP64: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[n, co, hw] = sum_{tap, c} sample(x, n, hw, tap)[c] * w[tap * C + c, co] (+ bias[co]).

    Grid: (N * cdiv(Ho*Wo, BLOCK_P), cdiv(Cout, BLOCK_N)). w is the packed [KK*C, Cout] weight (contiguous),
    y a contiguous (N, Cout, Ho, Wo) tensor.
    """
    tiles = tl.cdiv(HoWo, BLOCK_P)
    pid = tl.program_id(0)
    n = (pid // tiles).to(tl.int64)
    hw = (pid % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid_p = hw < HoWo
    oh = hw // Wo
    ow = hw % Wo
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_co = co < Cout
    offs_k = tl.arange(0, BLOCK_K)
    img = x_ptr + n * stride_xn
    c_blocks = tl.cdiv(C, BLOCK_K)

    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC)
    y0 = tl.zeros((BLOCK_P,), dtype=tl.int32)
    x0 = y0
    w00 = tl.zeros((BLOCK_P,), dtype=ACC)
    w01 = w00
    w10 = w00
    w11 = w00
    ok00 = hw < 0
    ok01 = ok00
    ok10 = ok00
    ok11 = ok00
    # One flat loop over (tap, channel chunk): the weight loads pipeline across tap boundaries.
    for it in range(0, KK * c_blocks):
        tap = it // c_blocks
        c0 = (it - tap * c_blocks) * BLOCK_K
        if c0 == 0:
            y0, x0, ly, lx, m, ok00, ok01, ok10, ok11, w00, w01, w10, w11 = tap_sample(
                off_ptr, msk_ptr, n, oh, ow, valid_p, tap, H, W, KW,
                stride_on, stride_oc, stride_oh, stride_ow, stride_mn, stride_mc, stride_mh, stride_mw,
                conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w, ACC)
        c = c0 + offs_k
        cmask = c < C
        # The corner offsets are formed here, not carried: the compiler then sees that they are multiples of
        # the pixel strides, which lets it vectorize the channel loads.
        rows = y0.to(tl.int64) * stride_xh + x0.to(tl.int64) * stride_xw
        v00, v01, v10, v11 = load_corners(img + rows[:, None] + (c * stride_xc)[None, :], cmask,
                                          ok00, ok01, ok10, ok11, stride_xh, stride_xw, ACC)
        val = w00[:, None] * v00 + w01[:, None] * v01 + w10[:, None] * v10 + w11[:, None] * v11
        wt = tl.load(w_ptr + (tap * C + c)[:, None] * Cout + co[None, :],
                     mask=cmask[:, None] & valid_co[None, :], other=0.0)
        acc = mma(acc, val.to(wt.dtype), wt, FP64, DOT)

    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=valid_co, other=0.0).to(ACC)[None, :]
    y_ptrs = y_ptr + n * Cout * HoWo + co[None, :].to(tl.int64) * HoWo + hw[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid_p[:, None] & valid_co[None, :])


def launch_flags(x):
    """Constexpr flags: fp64 computes exactly; fp32 multiplies in true fp32 (`tl.dot` "ieee", CUDA-core FMAs),
    or in TF32 where `torch.backends.cuda.matmul.allow_tf32` lets torch's own matmul do so; 16-bit types
    ignore DOT."""
    fp64 = x.dtype == torch.float64
    dot = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return {"FP64": fp64, "DOT": dot, "ACC": tl.float64 if fp64 else tl.float32}


def acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@triton.jit
def _transpose_kernel(src_ptr, dst_ptr, A, B, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """dst[n, b, a] = src[n, a, b], both contiguous, cast to dst's dtype. Grid: (cdiv(A, BLOCK_A) *
    cdiv(B, BLOCK_B), N). Tiled, so that loads and stores are both coalesced."""
    blocks_b = tl.cdiv(B, BLOCK_B)
    a = (tl.program_id(0) // blocks_b) * BLOCK_A + tl.arange(0, BLOCK_A)
    b = (tl.program_id(0) % blocks_b) * BLOCK_B + tl.arange(0, BLOCK_B)
    base = tl.program_id(1).to(tl.int64) * A * B
    mask = (a < A)[:, None] & (b < B)[None, :]
    tile = tl.load(src_ptr + base + a[:, None].to(tl.int64) * B + b[None, :], mask=mask)
    tl.store(dst_ptr + base + b[None, :].to(tl.int64) * A + a[:, None], tile.to(dst_ptr.dtype.element_ty), mask=mask)


def transpose_last(src, dst):
    """dst (N, B, A) = src (N, A, B) transposed, both contiguous (torch's permuted copy is several times
    slower); returns dst."""
    n, a, b = src.shape
    block = 16 if INTERPRET else 64
    _transpose_kernel[(triton.cdiv(a, block) * triton.cdiv(b, block), n)](src, dst, a, b, BLOCK_A=block,
                                                                         BLOCK_B=block)
    return dst


def channels_last(x):
    """The (N, C, H, W) input with NHWC memory (no copy if it already is): corners are channel vectors."""
    n, c, h, w = x.shape
    if x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
        nhwc = torch.empty((n, h, w, c), device=x.device, dtype=x.dtype)
        transpose_last(x.view(n, c, h * w), nhwc.view(n, h * w, c))
        return nhwc.permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last)


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
    if n * ho * wo == 0 or cout == 0:
        return y
    if c == 0:
        return y.copy_(bias[None, :, None, None].expand_as(y)) if bias is not None else y.zero_()
    xl = channels_last(x)
    wp = pack_weight(weight)
    grid = lambda meta: (n * triton.cdiv(ho * wo, meta["BLOCK_P"]), triton.cdiv(cout, meta["BLOCK_N"]))
    _fwd_kernel[grid](
        xl, offset, mask, wp, bias if bias is not None else wp, y,
        c, h, w, cout, ho, wo, ho * wo, kh * kw, kw, triton.next_power_of_2(n * ho * wo),
        *xl.stride(), *offset.stride(), *mask.stride(), *conv_args(stride, padding, dilation),
        HAS_BIAS=bias is not None, **launch_flags(x))
    return y
