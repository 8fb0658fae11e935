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

Grouped launch: one launch serves a list of convs over a list of inputs (a feature pyramid) that share N, Cin,
the kernel size and the weights' shape, but differ in H, W, stride and weight set (DyHead's block: 13 convs of 3
weight sets over 5 levels). The inputs are packed channels-last into one (sum_i N*H_i*W_i, Cin) buffer, once
however many convs read them, the weight sets into one [S*kh*kw*Cin, Cout] buffer, and the outputs into one
flat buffer (conv after conv, each (N, Cout, H_out, W_out)). Conv k owns the next N * cdiv(H_out*W_out,
BLOCK_P) programs; each program finds its conv (`find_level`: a table row is called a level) and reads its sizes,
buffer starts, offset/mask pointers and strides, weight set and stride from an int64 table (`LEVEL_FIELDS`;
written per call by a kernel, `device_table`, so that CUDA graphs can capture the launch). With one conv on one
input (GROUPED False) the same values come as kernel arguments instead: no table, and the compiler keeps its
divisibility knowledge of them.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .device_table import device_tables
from .runtime import INTERPRET, cdiv, first_config_unless_tuning, matmul_allows_tf32, next_power_of_2


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
               MASK_LOGITS: tl.constexpr, ACC: tl.constexpr):
    """Sample point of one tap for a tile of output pixels of image n.

    Returns the top-left corner y0, x0 (int32: offsets are clamped to +-2**30 pixels), the fractional parts
    ly, lx and the mask m (MASK_LOGITS: the sigmoid of what msk_ptr holds) (all zero where the sample does not
    count: unless -1 <= y < H and -1 <= x < W), which
    of the corners (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1) lie in the image, and their bilinear weights
    times the mask. A sample at y = -1 (or x = -1) reads 0, as outside, but counts: its offset gradient is the
    one-sided one torchvision gives there, which zero offsets with padding 1 meet at every border tap.
    A NaN offset or mask, inside the image or not, keeps its NaN in ly, lx or m, and so in the weights, while
    its corners stay unread: the output pixel turns NaN, as torchvision's NaN weights (NaN * 0 outside) make it
    on CUDA (where one coordinate is NaN and the other outside, torchvision returns a zero sample instead).
    Dropping the sample instead would hide a diverging offset conv from the loss.
    """
    # int64 throughout: a strided view (channels-last, as_strided) can put rows 2**31 elements apart
    oh64 = oh.to(tl.int64)
    ow64 = ow.to(tl.int64)
    off = off_ptr + n * stride_on + (2 * tap).to(tl.int64) * stride_oc + oh64 * stride_oh + ow64 * stride_ow
    dy = tl.load(off, mask=valid_p, other=0.0).to(ACC)
    dx = tl.load(off + stride_oc, mask=valid_p, other=0.0).to(ACC)
    m = tl.load(msk_ptr + n * stride_mn + tap.to(tl.int64) * stride_mc + oh64 * stride_mh + ow64 * stride_mw,
                mask=valid_p, other=0.0).to(ACC)
    if MASK_LOGITS:
        m = tl.sigmoid(m)
    y0, ly, in_y = _split_coordinate(dy, oh * conv_stride_h - pad_h + (tap // KW) * dil_h, H)
    x0, lx, in_x = _split_coordinate(dx, ow * conv_stride_w - pad_w + (tap % KW) * dil_w, W)
    inside = valid_p & in_y & in_x
    weighs = inside | (valid_p & ((dy != dy) | (dx != dx) | (m != m)))
    y0 = tl.where(inside, y0, 0)
    x0 = tl.where(inside, x0, 0)
    ly = tl.where(weighs, ly, 0.0)
    lx = tl.where(weighs, lx, 0.0)
    m = tl.where(weighs, m, 0.0)
    ok00, ok01, ok10, ok11 = _corner_masks(y0, x0, inside, H, W)
    w00, w01, w10, w11 = _bilinear_weights(ly, lx, m)
    return y0, x0, ly, lx, m, ok00, ok01, ok10, ok11, w00, w01, w10, w11


@triton.jit
def _split_coordinate(d, base, size):
    """Cell and fraction of the sample coordinate base + d (base an integer), and whether -1 <= base + d < size.

    Exact: floor and fraction are taken of the offset d alone, where base + d would round in fp32 (and could
    move a sample across a cell border, where the offset gradient jumps). Offsets beyond +-2**30 (or NaN) are
    clamped far outside.
    """
    f = tl.minimum(tl.maximum(tl.floor(d), -1073741824.0), 1073741824.0)
    cell = base + f.to(tl.int32)
    frac = d - f
    return cell, frac, (cell >= -1) & (cell < size)


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


# A grouped launch's int64 level table: one row per conv, these fields in this order (`grouped_input` writes
# the rows, `level_args` and `sample_grad_args` read them). x_start and o_start: the first pixel of the conv's
# input in the packed input and of its output in the flat output, counted over all images; set: its weight set;
# grad_offset, grad_mask and their strides: where the backward puts the conv's offset and mask gradients in its
# flat buffer (`SampleGrads`).
LEVEL_FIELDS = ("H", "W", "Ho", "Wo", "HoWo", "x_start", "o_start",
                "offset", "stride_on", "stride_oc", "stride_oh", "stride_ow",
                "mask", "stride_mn", "stride_mc", "stride_mh", "stride_mw",
                "set", "conv_stride_h", "conv_stride_w",
                "grad_offset", "stride_gon", "stride_goc", "stride_goh", "stride_gow",
                "grad_mask", "stride_gmn", "stride_gmc", "stride_gmh", "stride_gmw")
_FIELDS = tl.constexpr(len(LEVEL_FIELDS))
_HOWO = tl.constexpr(LEVEL_FIELDS.index("HoWo"))
_GRAD_OFFSET = tl.constexpr(LEVEL_FIELDS.index("grad_offset"))


@triton.jit
def find_level(pid, table_ptr, LEVELS, FIELDS: tl.constexpr, COUNT: tl.constexpr, SCALE, UNIT):
    """The level of program pid and pid's index among that level's programs, where level l owns the next
    SCALE * cdiv(table[l, COUNT], UNIT) programs (table: int64 rows of FIELDS). A scan of scalar loads: a
    pyramid has a handful of levels."""
    level = pid * 0
    start = pid * 0
    for l in range(0, LEVELS - 1):
        count = SCALE * tl.cdiv(tl.load(table_ptr + l * FIELDS + COUNT).to(tl.int32), UNIT)
        past = (level == l) & (pid >= start + count)
        level = tl.where(past, l + 1, level)
        start = tl.where(past, start + count, start)
    return level, pid - start


@triton.jit
def level_args(table_ptr, level, off_ptr, msk_ptr):
    """The level's row of the table (`LEVEL_FIELDS`): sizes, weight set and conv stride as int32, pixel starts
    and strides as int64, and its offset and mask pointers, typed like off_ptr and msk_ptr."""
    row = table_ptr + level * _FIELDS
    H = tl.load(row).to(tl.int32)
    W = tl.load(row + 1).to(tl.int32)
    Ho = tl.load(row + 2).to(tl.int32)
    Wo = tl.load(row + 3).to(tl.int32)
    HoWo = tl.load(row + 4).to(tl.int32)
    x_start = tl.load(row + 5)
    o_start = tl.load(row + 6)
    off = tl.load(row + 7).to(tl.pointer_type(off_ptr.dtype.element_ty))
    msk = tl.load(row + 12).to(tl.pointer_type(msk_ptr.dtype.element_ty))
    return (H, W, Ho, Wo, HoWo, x_start, o_start,
            off, tl.load(row + 8), tl.load(row + 9), tl.load(row + 10), tl.load(row + 11),
            msk, tl.load(row + 13), tl.load(row + 14), tl.load(row + 15), tl.load(row + 16),
            tl.load(row + 17).to(tl.int32), tl.load(row + 18).to(tl.int32), tl.load(row + 19).to(tl.int32))


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
        configs = autotune_configs(_FWD_SPACE_FP32, None)
    return first_config_unless_tuning(configs)


@triton.jit
def sample_grad_args(table_ptr, level):
    """The level's gradient fields (`LEVEL_FIELDS`, from grad_offset): the first element and (n, c, h, w)
    strides of its offset gradient, then of its mask gradient, all int64."""
    row = table_ptr + level * _FIELDS + _GRAD_OFFSET
    return (tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4),
            tl.load(row + 5), tl.load(row + 6), tl.load(row + 7), tl.load(row + 8), tl.load(row + 9))


# P_BUCKET (next power of two of the pixel count) keys the tuning on the problem size without retuning for
# every image size.
@triton.autotune(configs=autotune_configs(_FWD_SPACE, {"BLOCK_P": 32, "BLOCK_N": 16, "BLOCK_K": 16}),
                 key=["C", "Cout", "KK", "P_BUCKET", "DOT", "GROUPED"],
                 prune_configs_by={"early_config_prune": _fwd_prune})
@triton.jit
def _fwd_kernel(x_ptr, off_ptr, msk_ptr, w_ptr, b_ptr, y_ptr, table_ptr,
                N, C, Cout, KK, KW, P_BUCKET, LEVELS,
                H, W, Ho, Wo, HoWo,
                stride_on, stride_oc, stride_oh, stride_ow,
                stride_mn, stride_mc, stride_mh, stride_mw,
                conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
                GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, Y_INT64: tl.constexpr, MASK_LOGITS: tl.constexpr,
                FP64: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[n, co, hw] = sum_{tap, c} sample(x, n, hw, tap)[c] * w[tap * C + c, co] (+ bias[co]), per conv.

    Grid: (sum over convs of N * cdiv(Ho*Wo, BLOCK_P), cdiv(Cout, BLOCK_N)). x: the packed NHWC input
    (sum_i N*H_i*W_i, C); w: the packed weight sets [S*KK*C, Cout] (contiguous); b: the biases (S, Cout); y: the
    flat output, conv after conv (N, Cout, Ho, Wo) contiguous. GROUPED: each conv's sizes, starts, offset/mask
    pointers and strides, weight set and conv stride come from the LEVELS rows of table_ptr (`level_args`)
    instead of the arguments H ... conv_stride_w (one conv, set 0). Y_INT64: an image's Cout*Ho*Wo outputs
    may pass 2**31. MASK_LOGITS: the masks hold logits, whose sigmoid is the modulation.
    """
    pid = tl.program_id(0)
    x_start = 0
    o_start = 0
    if GROUPED:
        level, pid = find_level(pid, table_ptr, LEVELS, _FIELDS, _HOWO, N, BLOCK_P)
        (H, W, Ho, Wo, HoWo, x_start, o_start,
         off_ptr, stride_on, stride_oc, stride_oh, stride_ow,
         msk_ptr, stride_mn, stride_mc, stride_mh, stride_mw,
         wset, conv_stride_h, conv_stride_w) = level_args(table_ptr, level, off_ptr, msk_ptr)
        w_ptr += wset.to(tl.int64) * KK * C * Cout
        b_ptr += wset * Cout
    tiles = tl.cdiv(HoWo, BLOCK_P)
    n = (pid // tiles).to(tl.int64)
    hw = (pid % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid_p = hw < HoWo
    oh = hw // Wo
    ow = hw % Wo
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_co = co < Cout
    offs_k = tl.arange(0, BLOCK_K)
    # NHWC strides as multiples of C: the compiler then knows every corner's channel vector starts at a
    # multiple of C (so 16-byte aligned when C is a multiple of 16), level table or not.
    img = x_ptr + (x_start + n * H * W) * C
    stride_xh = W * C
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
                conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w, MASK_LOGITS, ACC)
        c = c0 + offs_k
        cmask = c < C
        # The corner offsets are formed here, not carried: the compiler then sees that they are multiples of
        # the pixel strides, which lets it vectorize the channel loads.
        rows = y0.to(tl.int64) * stride_xh + x0.to(tl.int64) * C
        v00, v01, v10, v11 = load_corners(img + rows[:, None] + c[None, :], cmask,
                                          ok00, ok01, ok10, ok11, stride_xh, C, ACC)
        val = w00[:, None] * v00 + w01[:, None] * v01 + w10[:, None] * v10 + w11[:, None] * v11
        wt = tl.load(w_ptr + (tap * C + c)[:, None] * Cout + co[None, :],
                     mask=cmask[:, None] & valid_co[None, :], other=0.0)
        acc = mma(acc, val.to(wt.dtype), wt, FP64, DOT)

    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=valid_co, other=0.0).to(ACC)[None, :]
    y_img = y_ptr + (o_start + n * HoWo) * Cout
    if Y_INT64:
        y_ptrs = y_img + co[None, :].to(tl.int64) * HoWo + hw[:, None]
    else:
        # int32 offsets, widened only at the store: a grouped launch stores element by element (the level sizes
        # are unknown to the compiler), and 64-bit offsets of the whole tile would spill.
        y_ptrs = y_img + (co[None, :] * HoWo + hw[:, None])
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid_p[:, None] & valid_co[None, :])


def launch_flags(x):
    """Constexpr flags: fp64 computes exactly; fp32 multiplies in true fp32 (`tl.dot` "ieee", CUDA-core FMAs),
    or in TF32 where torch's own CUDA matmul does (`matmul_allows_tf32`); 16-bit types ignore DOT."""
    fp64 = x.dtype == torch.float64
    dot = "tf32" if matmul_allows_tf32() else "ieee"
    return {"FP64": fp64, "DOT": dot, "ACC": acc_tl(x)}


def acc_dtype(x):
    """The math dtype of the kernels for x's dtype: float64 for float64, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def acc_tl(x):
    """`acc_dtype` as the kernels' ACC constexpr (a Triton dtype)."""
    return tl.float64 if x.dtype == torch.float64 else tl.float32


# A grouped transpose's table: per level, its programs, sizes, source pointer and strides, and destination.
TRANSPOSE_FIELDS = ("tiles", "A", "B", "src", "stride_sn", "stride_sa", "stride_sb", "dst")
_T_FIELDS = tl.constexpr(len(TRANSPOSE_FIELDS))
TRANSPOSE_BLOCK = 16 if INTERPRET else 64


@triton.jit
def _transpose_kernel(src_ptr, dst_ptr, table_ptr, A, B, LEVELS, GROUPED: tl.constexpr,
                      BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """dst[n, b, a] = src[n, a, b], cast to dst's dtype; dst contiguous. Tiled, so that loads and stores are
    both coalesced.

    Grid: (sum over levels of cdiv(A, BLOCK_A) * cdiv(B, BLOCK_B), N). One level: src contiguous (N, A, B).
    GROUPED: each level's A, B, source (pointer, strides) and destination pointer come from the LEVELS rows
    of table_ptr (`TRANSPOSE_FIELDS`).
    """
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    if GROUPED:
        level, pid = find_level(pid, table_ptr, LEVELS, _T_FIELDS, 0, 1, 1)
        row = table_ptr + level * _T_FIELDS
        A = tl.load(row + 1).to(tl.int32)
        B = tl.load(row + 2).to(tl.int32)
        src_ptr = tl.load(row + 3).to(tl.pointer_type(src_ptr.dtype.element_ty))
        dst_ptr = tl.load(row + 7).to(tl.pointer_type(dst_ptr.dtype.element_ty))
    blocks_b = tl.cdiv(B, BLOCK_B)
    a = (pid // blocks_b) * BLOCK_A + tl.arange(0, BLOCK_A)
    b = (pid % blocks_b) * BLOCK_B + tl.arange(0, BLOCK_B)
    base = n * A * B
    mask = (a < A)[:, None] & (b < B)[None, :]
    if GROUPED:
        src = (src_ptr + n * tl.load(row + 4) + a[:, None].to(tl.int64) * tl.load(row + 5)
               + b[None, :] * tl.load(row + 6))
    else:
        src = src_ptr + base + a[:, None].to(tl.int64) * B + b[None, :]
    tile = tl.load(src, mask=mask)
    tl.store(dst_ptr + base + b[None, :].to(tl.int64) * A + a[:, None], tile.to(dst_ptr.dtype.element_ty), mask=mask)


def transpose_last(src, dst):
    """dst (N, B, A) = src (N, A, B) transposed, both contiguous (torch's permuted copy is several times
    slower); returns dst."""
    n, a, b = src.shape
    block = TRANSPOSE_BLOCK
    _transpose_kernel[(cdiv(a, block) * cdiv(b, block), n)](src, dst, src, a, b, 1, GROUPED=False,
                                                            BLOCK_A=block, BLOCK_B=block)
    return dst


def transpose_row(a, b, src, src_strides, dst):
    """One level's row of a grouped transpose (`TRANSPOSE_FIELDS`): dst (int address, contiguous (N, b, a))
    = src (int address, (N, a, b) with the given element strides) transposed."""
    tiles = cdiv(a, TRANSPOSE_BLOCK) * cdiv(b, TRANSPOSE_BLOCK)
    return [tiles, a, b, src, *src_strides, dst]


def transpose_levels(src, dst, table, rows, n):
    """Launch the grouped transpose of `rows` (a list of `transpose_row`s, written as table); src and dst are
    tensors of the source's and destination's dtypes (only their types count)."""
    tiles = sum(row[0] for row in rows)
    _transpose_kernel[(tiles, n)](src, dst, table, 0, 0, len(rows), GROUPED=True, BLOCK_A=TRANSPOSE_BLOCK,
                                  BLOCK_B=TRANSPOSE_BLOCK)


def channels_last(x):
    """The (N, C, H, W) input with NHWC memory (no copy if it already is): corners are channel vectors."""
    n, c, h, w = x.shape
    if x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
        nhwc = torch.empty((n, h, w, c), device=x.device, dtype=x.dtype)
        transpose_last(x.view(n, c, h * w), nhwc.view(n, h * w, c))
        return nhwc.permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last)


def pack_weights(weights):
    """S weights (Cout, Cin, kh, kw) -> one (S*kh*kw*Cin, Cout) buffer (a stack and a copy): row
    (s*kh*kw + tap)*Cin + c holds set s's weights of channel c at the tap."""
    cout, cin, kh, kw = weights[0].shape
    stacked = weights[0][None] if len(weights) == 1 else torch.stack(weights)
    # contiguous(), not reshape: a channels-last weight would reshape to a strided view.
    return stacked.permute(0, 3, 4, 2, 1).contiguous().view(len(weights) * kh * kw * cin, cout)


def stack_biases(biases, bias_sets, num_sets):
    """The (S, Cout) biases of a launch from the biases of the sets bias_sets (zeros for the others), or None
    when no set has one; contiguous, as the kernel reads them."""
    if not biases:
        return None
    if num_sets == 1:
        return biases[0].contiguous()[None]  # a strided view (a slice of a larger tensor) would be misread
    if list(bias_sets) == list(range(num_sets)):
        return torch.stack(biases)
    zeros = biases[0].new_zeros(biases[0].shape)
    return torch.stack([biases[bias_sets.index(s)] if s in bias_sets else zeros for s in range(num_sets)])


@dataclass
class Levels:
    """Sizes of a launch: convs over a list of inputs that share N, Cin and the weights' shape.

    Per conv (a row of the level table), in set order: sizes (H, W, H_out, W_out), strides (sh, sw), sets (its
    weight set), x_starts / o_starts (the first pixel of its input in the packed input / of its output in the
    flat output, counted over all images). Per input: input_sizes (H, W) and input_starts (first pixel in the
    packed input). x_pixels / o_pixels: the totals; set_convs: each set's (first, end) conv indices.
    """
    n: int
    c: int
    cout: int
    kh: int
    kw: int
    sizes: list
    strides: list
    sets: list
    x_starts: list
    o_starts: list
    input_sizes: list
    input_starts: list
    x_pixels: int
    o_pixels: int
    set_convs: list

    @property
    def grouped(self):
        """Whether the launch needs the level table: anything but one conv on one input."""
        return len(self.sizes) > 1 or len(self.input_sizes) > 1


def conv_output_size(h, w, kh, kw, stride, padding, dilation):
    """(H_out, W_out) of a kh x kw conv over an H x W input; stride, padding, dilation: (h, w) pairs."""
    return ((h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1,
            (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1)


def plan_convs(inputs, weight_shape, conv_inputs, set_sizes, strides, padding, dilation):
    """The `Levels` of convs over inputs (each (N, Cin, H_i, W_i)): conv k reads inputs[conv_inputs[k]]; the
    first set_sizes[0] convs use weight set 0 and strides[0], the next set_sizes[1] set 1, and so on."""
    cout, _, kh, kw = weight_shape
    n, c = inputs[0].shape[:2]
    input_sizes, input_starts, x_pixels = [], [], 0
    for x in inputs:
        input_sizes.append(tuple(x.shape[-2:]))
        input_starts.append(x_pixels)
        x_pixels += n * x.shape[-2] * x.shape[-1]
    sets = [s for s, size in enumerate(set_sizes) for _ in range(size)]
    sizes, conv_strides, o_starts, o_pixels = [], [], [], 0
    for i, s in zip(conv_inputs, sets):
        h, w = input_sizes[i]
        ho, wo = conv_output_size(h, w, kh, kw, strides[s], padding, dilation)
        sizes.append((h, w, ho, wo))
        conv_strides.append(tuple(strides[s]))
        o_starts.append(o_pixels)
        o_pixels += n * ho * wo
    bounds = [sum(set_sizes[:s]) for s in range(len(set_sizes) + 1)]
    return Levels(n, c, cout, kh, kw, sizes, conv_strides, sets, [input_starts[i] for i in conv_inputs], o_starts,
                  input_sizes, input_starts, x_pixels, o_pixels, list(zip(bounds[:-1], bounds[1:])))


@dataclass
class SampleGrads:
    """Where a backward launch puts the convs' offset and mask gradients: one flat buffer of `numel` elements;
    per conv, offsets[k] / masks[k] = (first element, n, c, h, w element strides) of its offset's / mask's
    gradient. Convs whose gradients share elements add into them (atomics only: see `deform_conv_backward`)."""
    offsets: list
    masks: list
    numel: int


def stacked_sample_grads(levels):
    """The `SampleGrads` that give each conv its own contiguous gradients: every conv's offset gradient (N,
    2*kh*kw, H_out, W_out), conv after conv, then every conv's mask gradient (N, kh*kw, H_out, W_out)."""
    kk = levels.kh * levels.kw
    offsets, masks = [], []
    for (_, _, ho, wo), start in zip(levels.sizes, levels.o_starts):
        offsets.append((start * 2 * kk, 2 * kk * ho * wo, ho * wo, wo, 1))
        masks.append((2 * kk * levels.o_pixels + start * kk, kk * ho * wo, ho * wo, wo, 1))
    return SampleGrads(offsets, masks, 3 * kk * levels.o_pixels)


def level_arguments(levels, offset, mask, padding, dilation):
    """The kernels' per-conv arguments H ... conv_stride_w, then padding and dilation: a one-conv launch's
    values; placeholders for what the kernels read from the level table (GROUPED)."""
    if levels.grouped:
        return (0,) * 15 + (*padding, *dilation)
    h, w, ho, wo = levels.sizes[0]
    return (h, w, ho, wo, ho * wo, *offset.stride(), *mask.stride(), *levels.strides[0], *padding, *dilation)


def grouped_input(xs, offsets, masks, levels, extra_rows=(), sample_grads=None):
    """The inputs of a grouped launch: the inputs packed channels-last into one (x_pixels, Cin) buffer (one
    grouped transpose), the level table (rows of `LEVEL_FIELDS`, one per conv; the gradient fields from
    sample_grads, zero without) and, written by the same `device_tables` launch, the tables of extra_rows (lists
    of `transpose_row`s). Returns (packed, table, *extra tables)."""
    x0 = xs[0]
    packed = x0.new_empty((levels.x_pixels, levels.c))
    # Each (N, C, H, W) input read as (N, C, H*W): a view for NCHW and channels-last memory alike.
    flat = [x.flatten(2) for x in xs]
    pack_rows = [transpose_row(levels.c, h * w, v.data_ptr(), v.stride(),
                               packed.data_ptr() + start * levels.c * packed.element_size())
                 for v, (h, w), start in zip(flat, levels.input_sizes, levels.input_starts)]
    table_rows = []
    no_grads = [(0,) * 5] * len(levels.sizes)
    grad_offsets, grad_masks = (sample_grads.offsets, sample_grads.masks) if sample_grads else (no_grads, no_grads)
    for (h, w, ho, wo), x_start, o_start, offset, mask, wset, stride, grad_offset, grad_mask in zip(
            levels.sizes, levels.x_starts, levels.o_starts, offsets, masks, levels.sets, levels.strides,
            grad_offsets, grad_masks):
        table_rows += [h, w, ho, wo, ho * wo, x_start, o_start,
                       offset.data_ptr(), *offset.stride(), mask.data_ptr(), *mask.stride(), wset, *stride,
                       *grad_offset, *grad_mask]
    table, pack_table, *extra = device_tables(x0.device, table_rows, sum(pack_rows, []),
                                              *(sum(rows, []) for rows in extra_rows))
    transpose_levels(x0, packed, pack_table, pack_rows, levels.n)
    return (packed, table, *extra)


def deform_conv_forward(xs, offsets, masks, weights, biases, bias_sets, levels, padding, dilation,
                        mask_logits=False, shape=None):
    """Forward launch of the convs `levels` plans (`plan_convs`) over the inputs xs (one launch for all; one
    conv on one input is the plain op). offsets, masks: per conv, shapes as `kernels.modulated_deform_conv2d`
    (mask_logits: the masks hold logits, modulation = their sigmoid); weights: per set (Cout, Cin, kh, kw);
    biases: (Cout,) each, of the sets bias_sets (the others have none); all sharing N, Cin, dtype and device;
    padding/dilation are pairs.

    Returns y: flat (sum over convs of N*Cout*H_out*W_out,), conv after conv each (N, Cout, H_out, W_out)
    contiguous, in the inputs' dtype; or, given shape, those elements allocated in that shape (contiguous).
    """
    n, c, cout = levels.n, levels.c, levels.cout
    y = xs[0].new_empty(shape or (levels.o_pixels * cout,))
    if levels.o_pixels == 0 or cout == 0:
        return y
    bias = stack_biases(biases, bias_sets, len(weights))
    if c == 0:
        for (_, _, ho, wo), start, wset in zip(levels.sizes, levels.o_starts, levels.sets):
            level = y.view(-1)[start * cout:(start + n * ho * wo) * cout].view(n, cout, ho * wo)
            if bias is not None:
                level.copy_(bias[wset, :, None].expand_as(level))
            else:
                level.zero_()
        return y
    wp = pack_weights(weights)
    if levels.grouped:
        xl, table = grouped_input(xs, offsets, masks, levels)
    else:
        xl = channels_last(xs[0])
        table = xl
    grid = lambda meta: (sum(n * cdiv(ho * wo, meta["BLOCK_P"]) for _, _, ho, wo in levels.sizes),
                         cdiv(cout, meta["BLOCK_N"]))
    _fwd_kernel[grid](
        xl, offsets[0], masks[0], wp, bias if bias is not None else wp, y, table,
        n, c, cout, levels.kh * levels.kw, levels.kw, next_power_of_2(levels.o_pixels), len(levels.sizes),
        *level_arguments(levels, offsets[0], masks[0], padding, dilation),
        GROUPED=levels.grouped, HAS_BIAS=bias is not None,
        Y_INT64=cout * max(ho * wo for _, _, ho, wo in levels.sizes) >= 2**31, MASK_LOGITS=mask_logits,
        **launch_flags(xs[0]))
    return y
