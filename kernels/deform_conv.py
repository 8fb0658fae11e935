"""Triton kernels for the modulated deformable convolution (DCNv2), forward and backward.

Implicit GEMM: no im2col "columns" buffer is written to global memory. A program owns a tile of output
pixels and, for each kernel tap, computes the sample point of every pixel once (4 corner indices, 4 bilinear
weights times the mask, all shared by the input channels because there is one offset group), then gathers and
blends the corner tiles channel chunk by channel chunk. Bilinear weights and accumulators are fp32 (fp64 for
fp64 tensors); products go through `tl.dot` in the storage dtype.

Layouts: input, offset, mask and the output gradient are read through their strides (offset and mask may be
slices or `as_strided` views); the weight is packed as [kh*kw*Cin, Cout] (row = tap * Cin + channel).
Reference twin: `torchvision.ops.deform_conv2d` with one offset group.
"""

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(space, interpret_config):
    """Autotune configs: the GPU search space, or one small config under the (slow) interpreter."""
    if INTERPRET:
        return [triton.Config(interpret_config)]
    return [triton.Config(meta, num_warps=warps, num_stages=stages) for meta, warps, stages in space]


def _fp64_prune(configs, named_args, **kwargs):
    """fp64 multiplies with a [BLOCK_P, BLOCK_K, BLOCK_N] broadcast: only 16-wide tiles fit in registers."""
    if kwargs.get("FP64"):
        return [triton.Config({"BLOCK_P": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    return configs


_PRUNE = {"early_config_prune": _fp64_prune}


@triton.jit
def _mma(acc, a, b, FP64: tl.constexpr, TF32: tl.constexpr):
    """acc += a @ b. fp64 uses an exact broadcast-multiply-sum because fp64 `tl.dot` is not portable."""
    if FP64:
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    elif TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _tap_sample(off_ptr, msk_ptr, n, oh, ow, valid_p, tap, H, W, KW,
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
def _corner_masks(y0, x0, inside, H, W):
    """Which of the 4 corners lie in the image (inside already bounds y0 to [-1, H-1] and x0 to [-1, W-1])."""
    ok_y0 = inside & (y0 >= 0)
    ok_y1 = inside & (y0 + 1 < H)
    ok_x0 = x0 >= 0
    ok_x1 = x0 + 1 < W
    return ok_y0 & ok_x0, ok_y0 & ok_x1, ok_y1 & ok_x0, ok_y1 & ok_x1


@triton.jit
def _load_corners(img, chan, cmask, y0, x0, inside, H, W, stride_xh, stride_xw, ACC: tl.constexpr):
    """Gather the 4 corner tiles [BLOCK_P, BLOCK_K] of the input; corners outside the image read zero."""
    ok00, ok01, ok10, ok11 = _corner_masks(y0, x0, inside, H, W)
    ptr = img[:, None] + chan[None, :] + (y0 * stride_xh + x0 * stride_xw)[:, None]
    v00 = tl.load(ptr, mask=ok00[:, None] & cmask[None, :], other=0.0).to(ACC)
    v01 = tl.load(ptr + stride_xw, mask=ok01[:, None] & cmask[None, :], other=0.0).to(ACC)
    v10 = tl.load(ptr + stride_xh, mask=ok10[:, None] & cmask[None, :], other=0.0).to(ACC)
    v11 = tl.load(ptr + stride_xh + stride_xw, mask=ok11[:, None] & cmask[None, :], other=0.0).to(ACC)
    return v00, v01, v10, v11


@triton.jit
def _pixel_coords(offs_p, Ho, Wo):
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
@triton.autotune(configs=_configs(_FWD_SPACE, {"BLOCK_P": 32, "BLOCK_N": 16, "BLOCK_K": 16}),
                 key=["C", "Cout", "KK", "P_BUCKET"], prune_configs_by=_PRUNE)
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
    n, oh, ow = _pixel_coords(offs_p, Ho, Wo)
    offs_co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_co = offs_co < Cout
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    img = x_ptr + n * stride_xn

    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC)
    for tap in range(0, KK):
        y0, x0, ly, lx, m, inside = _tap_sample(
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
            v00, v01, v10, v11 = _load_corners(img, c * stride_xc, cmask, y0, x0, inside, H, W,
                                               stride_xh, stride_xw, ACC)
            val = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11
            wt = tl.load(w_ptr + (tap * C + c)[:, None] * stride_wk + offs_co[None, :] * stride_wn,
                         mask=cmask[:, None] & valid_co[None, :], other=0.0)
            acc = _mma(acc, val.to(wt.dtype), wt, FP64, TF32)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_co, mask=valid_co, other=0.0).to(ACC)[None, :]
    y_ptrs = (y_ptr + (n * stride_yn + oh * stride_yh + ow * stride_yw)[:, None]
              + offs_co[None, :] * stride_yc)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid_p[:, None] & valid_co[None, :])


_BWD_SPACE = [
    ({"BLOCK_P": 64, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 2),
    ({"BLOCK_P": 64, "BLOCK_N": 32, "BLOCK_K": 64}, 4, 3),
    ({"BLOCK_P": 128, "BLOCK_N": 32, "BLOCK_K": 32}, 4, 3),
    ({"BLOCK_P": 32, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 2),
    ({"BLOCK_P": 128, "BLOCK_N": 64, "BLOCK_K": 32}, 8, 2),
]


# The grad input buffer is an atomic accumulator: zero it before every autotuning trial.
@triton.autotune(configs=_configs(_BWD_SPACE, {"BLOCK_P": 32, "BLOCK_N": 16, "BLOCK_K": 16}),
                 key=["C", "Cout", "KK", "P_BUCKET", "DETERMINISTIC", "GRAD_INPUT", "GRAD_SAMPLE"],
                 reset_to_zero=["gx_ptr"],
                 prune_configs_by=_PRUNE)
@triton.jit
def _bwd_sample_kernel(x_ptr, off_ptr, msk_ptr, w_ptr, gy_ptr,
                       goff_ptr, gmsk_ptr, gx_ptr, gcol_ptr, tgt_ptr, coef_ptr,
                       C, H, W, Cout, Ho, Wo, P, KK, KW, P_BUCKET, S,
                       stride_xn, stride_xc, stride_xh, stride_xw,
                       stride_on, stride_oc, stride_oh, stride_ow,
                       stride_mn, stride_mc, stride_mh, stride_mw,
                       stride_wk, stride_wn,
                       stride_gn, stride_gc, stride_gh, stride_gw,
                       conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
                       GRAD_INPUT: tl.constexpr, GRAD_SAMPLE: tl.constexpr, DETERMINISTIC: tl.constexpr,
                       FP64: tl.constexpr, TF32: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Gradients of offset and mask, and the grad input scatter (or what its deterministic gather needs).

    Per tap and channel chunk: gcol = dY @ w_tap^T (the gradient of the sampled values). Offset and mask
    gradients reduce gcol times the 4 corner values over all channels inside this program, so they need no
    atomics. Grad input: fp32 atomics into gx, or, when DETERMINISTIC, gcol and the (target, weight) of each
    corner are stored for `_grad_input_gather_kernel`. GRAD_INPUT / GRAD_SAMPLE (offset and mask) switch off
    what autograd does not need.
    """
    pid_p = tl.program_id(0)
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid_p = offs_p < P
    n, oh, ow = _pixel_coords(offs_p, Ho, Wo)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    img = x_ptr + n * stride_xn
    gy_rows = gy_ptr + n * stride_gn + oh * stride_gh + ow * stride_gw
    HW = H * W
    gx_img = gx_ptr + n * C * HW

    for tap in range(0, KK):
        y0, x0, ly, lx, m, inside = _tap_sample(
            off_ptr, msk_ptr, n, oh, ow, valid_p, tap, H, W, KW,
            stride_on, stride_oc, stride_oh, stride_ow, stride_mn, stride_mc, stride_mh, stride_mw,
            conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w, ACC)
        ok00, ok01, ok10, ok11 = _corner_masks(y0, x0, inside, H, W)
        w00 = m * (1 - ly) * (1 - lx)
        w01 = m * (1 - ly) * lx
        w10 = m * ly * (1 - lx)
        w11 = m * ly * lx
        corner = y0 * W + x0
        a00 = tl.zeros((BLOCK_P,), dtype=ACC)
        a01 = tl.zeros((BLOCK_P,), dtype=ACC)
        a10 = tl.zeros((BLOCK_P,), dtype=ACC)
        a11 = tl.zeros((BLOCK_P,), dtype=ACC)
        for c0 in range(0, C, BLOCK_K):
            c = c0 + offs_k
            cmask = c < C
            gcol = tl.zeros((BLOCK_P, BLOCK_K), dtype=ACC)
            for co0 in range(0, Cout, BLOCK_N):
                co = co0 + offs_n
                comask = co < Cout
                g = tl.load(gy_rows[:, None] + co[None, :] * stride_gc,
                            mask=valid_p[:, None] & comask[None, :], other=0.0)
                wt = tl.load(w_ptr + (tap * C + c)[None, :] * stride_wk + co[:, None] * stride_wn,
                             mask=comask[:, None] & cmask[None, :], other=0.0)
                gcol = _mma(gcol, g, wt, FP64, TF32)
            if GRAD_SAMPLE:
                v00, v01, v10, v11 = _load_corners(img, c * stride_xc, cmask, y0, x0, inside, H, W,
                                                   stride_xh, stride_xw, ACC)
                a00 += tl.sum(gcol * v00, axis=1)
                a01 += tl.sum(gcol * v01, axis=1)
                a10 += tl.sum(gcol * v10, axis=1)
                a11 += tl.sum(gcol * v11, axis=1)
            if GRAD_INPUT and DETERMINISTIC:
                row = offs_p * KK + tap
                tl.store(gcol_ptr + row[:, None] * C + c[None, :], gcol,
                         mask=valid_p[:, None] & cmask[None, :])
            elif GRAD_INPUT:
                gx = gx_img[:, None] + (c * HW)[None, :] + corner[:, None]
                cm = cmask[None, :]
                tl.atomic_add(gx, gcol * w00[:, None], mask=ok00[:, None] & cm)
                tl.atomic_add(gx + 1, gcol * w01[:, None], mask=ok01[:, None] & cm)
                tl.atomic_add(gx + W, gcol * w10[:, None], mask=ok10[:, None] & cm)
                tl.atomic_add(gx + W + 1, gcol * w11[:, None], mask=ok11[:, None] & cm)
        if GRAD_SAMPLE:
            _store_sample_grads(goff_ptr, gmsk_ptr, a00, a01, a10, a11, ly, lx, m, n, oh, ow, valid_p, tap,
                                KK, Ho, Wo)
        if GRAD_INPUT and DETERMINISTIC:
            _store_corner_entries(tgt_ptr, coef_ptr, offs_p * KK + tap, n * HW + corner, W, S,
                                  w00, w01, w10, w11, ok00, ok01, ok10, ok11, valid_p)


@triton.jit
def _store_sample_grads(goff_ptr, gmsk_ptr, a00, a01, a10, a11, ly, lx, m, n, oh, ow, valid_p, tap, KK, Ho, Wo):
    """Offset (dy, dx) and mask gradients of one tap from a_ij = sum_c gcol[:, c] * corner_ij[:, c]."""
    hy = 1 - ly
    hx = 1 - lx
    g_mask = hy * hx * a00 + hy * lx * a01 + ly * hx * a10 + ly * lx * a11
    g_dy = m * (-hx * a00 - lx * a01 + hx * a10 + lx * a11)
    g_dx = m * (-hy * a00 + hy * a01 - ly * a10 + ly * a11)
    hwo = oh * Wo + ow
    goff = goff_ptr + (n * 2 * KK + 2 * tap) * Ho * Wo + hwo
    tl.store(goff, g_dy.to(goff_ptr.dtype.element_ty), mask=valid_p)
    tl.store(goff + Ho * Wo, g_dx.to(goff_ptr.dtype.element_ty), mask=valid_p)
    tl.store(gmsk_ptr + (n * KK + tap) * Ho * Wo + hwo, g_mask.to(gmsk_ptr.dtype.element_ty), mask=valid_p)


@triton.jit
def _store_corner_entries(tgt_ptr, coef_ptr, row, img_pos, W, S, w00, w01, w10, w11, ok00, ok01, ok10, ok11,
                          valid_p):
    """The 4 (input position, weight) entries of gcol row `row` for the deterministic grad input gather.

    Corners outside the image get the sentinel position S = N*H*W, which sorts after every real one.
    """
    entry = row * 4
    tl.store(tgt_ptr + entry, tl.where(ok00, img_pos, S), mask=valid_p)
    tl.store(tgt_ptr + entry + 1, tl.where(ok01, img_pos + 1, S), mask=valid_p)
    tl.store(tgt_ptr + entry + 2, tl.where(ok10, img_pos + W, S), mask=valid_p)
    tl.store(tgt_ptr + entry + 3, tl.where(ok11, img_pos + W + 1, S), mask=valid_p)
    tl.store(coef_ptr + entry, w00, mask=valid_p)
    tl.store(coef_ptr + entry + 1, w01, mask=valid_p)
    tl.store(coef_ptr + entry + 2, w10, mask=valid_p)
    tl.store(coef_ptr + entry + 3, w11, mask=valid_p)


@triton.autotune(configs=_configs([({"BLOCK_S": 32, "BLOCK_C": 64}, 4, 2), ({"BLOCK_S": 64, "BLOCK_C": 32}, 4, 2),
                                   ({"BLOCK_S": 16, "BLOCK_C": 128}, 4, 2)],
                                  {"BLOCK_S": 16, "BLOCK_C": 16}),
                 key=["C", "S"])
@triton.jit
def _grad_input_gather_kernel(rowptr_ptr, src_ptr, coef_ptr, gcol_ptr, gx_ptr, C, HW, S,
                              BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Deterministic grad input: each input position sums its sorted (gcol row, weight) entries in order.

    rowptr (S + 1) delimits the entries of each of the S = N*H*W input positions; src holds the gcol row
    (pixel * KK + tap) and coef the bilinear weight times mask of each entry.
    """
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_s = pid_s.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    valid_s = offs_s < S
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = c < C
    start = tl.load(rowptr_ptr + offs_s, mask=valid_s, other=0)
    count = tl.load(rowptr_ptr + offs_s + 1, mask=valid_s, other=0) - start
    acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=gcol_ptr.dtype.element_ty)
    for j in range(0, tl.max(count, axis=0)):
        has = j < count
        src = tl.load(src_ptr + start + j, mask=has, other=0)
        coef = tl.load(coef_ptr + start + j, mask=has, other=0.0)
        g = tl.load(gcol_ptr + src[:, None] * C + c[None, :], mask=has[:, None] & cmask[None, :], other=0.0)
        acc += coef[:, None] * g
    n = offs_s // HW
    hw = offs_s % HW
    gx = gx_ptr + (n * C * HW + hw)[:, None] + (c * HW)[None, :]
    tl.store(gx, acc.to(gx_ptr.dtype.element_ty), mask=valid_s[:, None] & cmask[None, :])


_GW_SPACE = [
    ({"BLOCK_P": 64, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 2),
    ({"BLOCK_P": 64, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 3),
    ({"BLOCK_P": 32, "BLOCK_N": 128, "BLOCK_K": 128}, 8, 2),
    ({"BLOCK_P": 64, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 3),
    ({"BLOCK_P": 128, "BLOCK_N": 64, "BLOCK_K": 64}, 8, 2),
]
# Pixels per split-K partial of the grad weight: a multiple of every BLOCK_P above.
GW_PIXELS_PER_SPLIT = 2048


@triton.autotune(configs=_configs(_GW_SPACE, {"BLOCK_P": 32, "BLOCK_N": 16, "BLOCK_K": 16}),
                 key=["C", "Cout", "KK", "P_BUCKET"], prune_configs_by=_PRUNE)
@triton.jit
def _grad_weight_kernel(x_ptr, off_ptr, msk_ptr, gy_ptr, part_ptr,
                        C, H, W, Cout, Ho, Wo, P, KK, KW, P_BUCKET, pixels_per_split,
                        stride_xn, stride_xc, stride_xh, stride_xw,
                        stride_on, stride_oc, stride_oh, stride_ow,
                        stride_mn, stride_mc, stride_mh, stride_mw,
                        stride_gn, stride_gc, stride_gh, stride_gw,
                        conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
                        FP64: tl.constexpr, TF32: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """part[split, tap * C + c, co] = sum over the split's pixels p of sample(x, p, tap)[c] * dY[p, co].

    The sampled tile is regenerated from input, offset and mask; the partials of the splits are summed
    afterwards in a fixed order, so the grad weight is deterministic.
    """
    pid_kc = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    c_blocks = tl.cdiv(C, BLOCK_K)
    tap = pid_kc // c_blocks
    c = (pid_kc % c_blocks) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    cmask = c < C
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    comask = co < Cout
    p_start = split.to(tl.int64) * pixels_per_split
    p_count = tl.minimum(P - p_start, pixels_per_split)

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=ACC)
    for p0 in range(0, p_count, BLOCK_P):
        offs_p = p_start + p0 + tl.arange(0, BLOCK_P)
        valid_p = offs_p < P
        n, oh, ow = _pixel_coords(offs_p, Ho, Wo)
        y0, x0, ly, lx, m, inside = _tap_sample(
            off_ptr, msk_ptr, n, oh, ow, valid_p, tap, H, W, KW,
            stride_on, stride_oc, stride_oh, stride_ow, stride_mn, stride_mc, stride_mh, stride_mw,
            conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w, ACC)
        v00, v01, v10, v11 = _load_corners(x_ptr + n * stride_xn, c * stride_xc, cmask, y0, x0, inside, H, W,
                                           stride_xh, stride_xw, ACC)
        val = ((m * (1 - ly) * (1 - lx))[:, None] * v00 + (m * (1 - ly) * lx)[:, None] * v01
               + (m * ly * (1 - lx))[:, None] * v10 + (m * ly * lx)[:, None] * v11)
        g = tl.load(gy_ptr + (n * stride_gn + oh * stride_gh + ow * stride_gw)[:, None] + co[None, :] * stride_gc,
                    mask=valid_p[:, None] & comask[None, :], other=0.0)
        acc = _mma(acc, tl.trans(val.to(g.dtype)), g, FP64, TF32)

    rows = split.to(tl.int64) * KK * C + tap * C + c
    tl.store(part_ptr + rows[:, None] * Cout + co[None, :], acc, mask=cmask[:, None] & comask[None, :])


def _launch_flags(x):
    """Constexpr flags: fp64 computes exactly; fp32 uses TF32 only where torch's matmul would."""
    fp64 = x.dtype == torch.float64
    tf32 = x.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    return {"FP64": fp64, "TF32": tf32 and not fp64, "ACC": tl.float64 if fp64 else tl.float32}


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def pack_weight(weight):
    """(Cout, Cin, kh, kw) -> (kh*kw*Cin, Cout): row tap * Cin + c holds the tap's weights of channel c."""
    cout, cin, kh, kw = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(kh * kw * cin, cout).contiguous()


def _geometry(x, weight, stride, padding, dilation):
    n, c, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return n, c, h, w, cout, kh, kw, ho, wo


def _conv_args(stride, padding, dilation):
    return (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])


def deform_conv_forward(x, offset, mask, weight, bias, stride, padding, dilation):
    """Forward launch. Shapes as `kernels.modulated_deform_conv2d`; stride/padding/dilation are pairs.

    Returns y: (N, Cout, H_out, W_out), contiguous, in the input's dtype.
    """
    n, c, h, w, cout, kh, kw, ho, wo = _geometry(x, weight, stride, padding, dilation)
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
        *_conv_args(stride, padding, dilation),
        HAS_BIAS=bias is not None, **_launch_flags(x))
    return y


def _grad_input_deterministic(gcol, tgt, coef, n, c, h, w, dtype):
    """Sort the corner entries by target position (stable: fixed order) and gather them per position."""
    s = n * h * w
    tgt_sorted, order = torch.sort(tgt, stable=True)
    rowptr = torch.searchsorted(tgt_sorted, torch.arange(s + 1, device=tgt.device, dtype=tgt.dtype))
    gx = torch.empty((n, c, h, w), device=gcol.device, dtype=dtype)
    grid = lambda meta: (triton.cdiv(s, meta["BLOCK_S"]), triton.cdiv(c, meta["BLOCK_C"]))
    _grad_input_gather_kernel[grid](rowptr, order // 4, coef[order], gcol, gx, c, h * w, s)
    return gx


def backward_shapes(x, offset, mask, weight, needs):
    """Shapes of deform_conv_backward's results; a gradient autograd does not need is an empty (0,) tensor."""
    need_input, need_sample, need_weight = needs
    shapes = (x.shape, offset.shape, mask.shape, weight.shape)
    return [shape if need else (0,) for shape, need in zip(shapes, (need_input, need_sample, need_sample,
                                                                     need_weight))] + [(weight.shape[0],)]


def deform_conv_backward(grad_out, x, offset, mask, weight, stride, padding, dilation, deterministic,
                         needs=(True, True, True)):
    """Backward launches. grad_out: (N, Cout, H_out, W_out), any strides.

    needs: whether grad input, grad offset and mask, and grad weight are wanted.
    Returns (grad_input, grad_offset, grad_mask, grad_weight, grad_bias) shaped as `backward_shapes` says
    (offset and mask gradients contiguous), in the input's dtype; accumulation in fp32 (fp64 for fp64).
    """
    n, c, h, w, cout, kh, kw, ho, wo = _geometry(x, weight, stride, padding, dilation)
    kk = kh * kw
    p = n * ho * wo
    acc = _acc_dtype(x)
    need_input, need_sample, need_weight = needs
    grad_bias = grad_out.sum(dim=(0, 2, 3), dtype=acc).to(x.dtype)
    shapes = backward_shapes(x, offset, mask, weight, needs)[:4]
    if p == 0 or c == 0 or cout == 0:
        return (*(x.new_zeros(shape) for shape in shapes), grad_bias)
    # Every element of these is written below when needed; unneeded ones stay empty (0,) tensors.
    grad_input, grad_offset, grad_mask, grad_weight = (x.new_empty(shape) for shape in shapes)
    wp = pack_weight(weight)
    flags = _launch_flags(x)
    geo = (c, h, w, cout, ho, wo, p, kk, kw, triton.next_power_of_2(p))
    conv = _conv_args(stride, padding, dilation)

    if need_input or need_sample:
        deterministic = deterministic and need_input
        if deterministic:
            gx_acc = x.new_empty((0,), dtype=acc)
            gcol = x.new_empty((p * kk, c), dtype=acc)
            tgt = x.new_empty((p * kk * 4,), dtype=torch.int64)
            coef = x.new_empty((p * kk * 4,), dtype=acc)
        else:
            gx_acc = x.new_zeros((n, c, h, w) if need_input else (0,), dtype=acc)
            gcol = tgt = coef = gx_acc
        grid = lambda meta: (triton.cdiv(p, meta["BLOCK_P"]),)
        _bwd_sample_kernel[grid](
            x, offset, mask, wp, grad_out, grad_offset, grad_mask, gx_acc, gcol, tgt, coef, *geo, n * h * w,
            *x.stride(), *offset.stride(), *mask.stride(), *wp.stride(), *grad_out.stride(), *conv,
            GRAD_INPUT=need_input, GRAD_SAMPLE=need_sample, DETERMINISTIC=deterministic, **flags)
        if deterministic:
            grad_input = _grad_input_deterministic(gcol, tgt, coef, n, c, h, w, x.dtype)
        elif need_input:
            grad_input = gx_acc.to(x.dtype)
    if not need_weight:
        return grad_input, grad_offset, grad_mask, grad_weight, grad_bias

    splits = triton.cdiv(p, GW_PIXELS_PER_SPLIT)
    part = x.new_empty((splits, kk * c, cout), dtype=acc)
    grid = lambda meta: (kk * triton.cdiv(c, meta["BLOCK_K"]), triton.cdiv(cout, meta["BLOCK_N"]), splits)
    _grad_weight_kernel[grid](
        x, offset, mask, grad_out, part, *geo, GW_PIXELS_PER_SPLIT,
        *x.stride(), *offset.stride(), *mask.stride(), *grad_out.stride(), *conv, **flags)
    grad_weight = part.sum(dim=0).reshape(kh, kw, c, cout).permute(3, 2, 0, 1).to(weight.dtype)
    return grad_input, grad_offset, grad_mask, grad_weight.contiguous(), grad_bias
