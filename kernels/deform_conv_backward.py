"""Triton kernels for the backward of the modulated deformable convolution (DCNv2).

Grad offset and mask, and the grad input scatter: one pass per pixel tile that forms the gradient of the sampled
values (gcol = dY @ w_tap^T) chunk by chunk and reduces it over all input channels in-program. Grad input by fp32
atomics, or deterministically by a sorted gather. Grad weight: an implicit GEMM over pixels that regenerates the
sampled tile, with split-K partials summed in a fixed order. Layouts as in `deform_conv`.
"""

import torch
import triton
import triton.language as tl

from .deform_conv import (PRUNE_FP64, acc_dtype, autotune_configs, conv_args, corner_masks, geometry,
                          launch_flags, load_corners, mma, pack_weight, pixel_coords, tap_sample)

_BWD_SPACE = [
    ({"BLOCK_P": 64, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 2),
    ({"BLOCK_P": 64, "BLOCK_N": 32, "BLOCK_K": 64}, 4, 3),
    ({"BLOCK_P": 128, "BLOCK_N": 32, "BLOCK_K": 32}, 4, 3),
    ({"BLOCK_P": 32, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 2),
    ({"BLOCK_P": 128, "BLOCK_N": 64, "BLOCK_K": 32}, 8, 2),
]


# The grad input buffer is an atomic accumulator: zero it before every autotuning trial.
@triton.autotune(configs=autotune_configs(_BWD_SPACE, {"BLOCK_P": 32, "BLOCK_N": 16, "BLOCK_K": 16}),
                 key=["C", "Cout", "KK", "P_BUCKET", "DETERMINISTIC", "GRAD_INPUT", "GRAD_SAMPLE"],
                 reset_to_zero=["gx_ptr"],
                 prune_configs_by=PRUNE_FP64)
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
    n, oh, ow = pixel_coords(offs_p, Ho, Wo)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    img = x_ptr + n * stride_xn
    gy_rows = gy_ptr + n * stride_gn + oh * stride_gh + ow * stride_gw
    HW = H * W
    gx_img = gx_ptr + n * C * HW

    for tap in range(0, KK):
        y0, x0, ly, lx, m, inside = tap_sample(
            off_ptr, msk_ptr, n, oh, ow, valid_p, tap, H, W, KW,
            stride_on, stride_oc, stride_oh, stride_ow, stride_mn, stride_mc, stride_mh, stride_mw,
            conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w, ACC)
        ok00, ok01, ok10, ok11 = corner_masks(y0, x0, inside, H, W)
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
                gcol = mma(gcol, g, wt, FP64, TF32)
            if GRAD_SAMPLE:
                v00, v01, v10, v11 = load_corners(img, c * stride_xc, cmask, y0, x0, inside, H, W,
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
                # Only the sum matters, not the order against other memory operations: relaxed is enough.
                gx = gx_img[:, None] + (c * HW)[None, :] + corner[:, None]
                cm = cmask[None, :]
                tl.atomic_add(gx, gcol * w00[:, None], mask=ok00[:, None] & cm, sem="relaxed")
                tl.atomic_add(gx + 1, gcol * w01[:, None], mask=ok01[:, None] & cm, sem="relaxed")
                tl.atomic_add(gx + W, gcol * w10[:, None], mask=ok10[:, None] & cm, sem="relaxed")
                tl.atomic_add(gx + W + 1, gcol * w11[:, None], mask=ok11[:, None] & cm, sem="relaxed")
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


_GATHER_SPACE = [
    ({"BLOCK_S": 32, "BLOCK_C": 64}, 4, 2),
    ({"BLOCK_S": 64, "BLOCK_C": 32}, 4, 2),
    ({"BLOCK_S": 16, "BLOCK_C": 128}, 4, 2),
]


@triton.autotune(configs=autotune_configs(_GATHER_SPACE, {"BLOCK_S": 16, "BLOCK_C": 16}), key=["C", "S"])
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


@triton.autotune(configs=autotune_configs(_GW_SPACE, {"BLOCK_P": 32, "BLOCK_N": 16, "BLOCK_K": 16}),
                 key=["C", "Cout", "KK", "P_BUCKET"], prune_configs_by=PRUNE_FP64)
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
        n, oh, ow = pixel_coords(offs_p, Ho, Wo)
        y0, x0, ly, lx, m, inside = tap_sample(
            off_ptr, msk_ptr, n, oh, ow, valid_p, tap, H, W, KW,
            stride_on, stride_oc, stride_oh, stride_ow, stride_mn, stride_mc, stride_mh, stride_mw,
            conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w, ACC)
        v00, v01, v10, v11 = load_corners(x_ptr + n * stride_xn, c * stride_xc, cmask, y0, x0, inside, H, W,
                                           stride_xh, stride_xw, ACC)
        val = ((m * (1 - ly) * (1 - lx))[:, None] * v00 + (m * (1 - ly) * lx)[:, None] * v01
               + (m * ly * (1 - lx))[:, None] * v10 + (m * ly * lx)[:, None] * v11)
        g = tl.load(gy_ptr + (n * stride_gn + oh * stride_gh + ow * stride_gw)[:, None] + co[None, :] * stride_gc,
                    mask=valid_p[:, None] & comask[None, :], other=0.0)
        acc = mma(acc, tl.trans(val.to(g.dtype)), g, FP64, TF32)

    rows = split.to(tl.int64) * KK * C + tap * C + c
    tl.store(part_ptr + rows[:, None] * Cout + co[None, :], acc, mask=cmask[:, None] & comask[None, :])


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
    n, c, h, w, cout, kh, kw, ho, wo = geometry(x, weight, stride, padding, dilation)
    kk = kh * kw
    p = n * ho * wo
    acc = acc_dtype(x)
    need_input, need_sample, need_weight = needs
    grad_bias = grad_out.sum(dim=(0, 2, 3), dtype=acc).to(x.dtype)
    shapes = backward_shapes(x, offset, mask, weight, needs)[:4]
    if p == 0 or c == 0 or cout == 0:
        return (*(x.new_zeros(shape) for shape in shapes), grad_bias)
    # Every element of these is written below when needed; unneeded ones stay empty (0,) tensors.
    grad_input, grad_offset, grad_mask, grad_weight = (x.new_empty(shape) for shape in shapes)
    wp = pack_weight(weight)
    flags = launch_flags(x)
    geo = (c, h, w, cout, ho, wo, p, kk, kw, triton.next_power_of_2(p))
    conv = conv_args(stride, padding, dilation)

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
