"""Triton kernels for the backward of the modulated deformable convolution (DCNv2).

One fused kernel computes every gradient but the bias's. A program owns one tap, one chunk of input channels,
one chunk of output channels and a run of pixels of one image. For each pixel tile of the run it loads the
output gradient dY once and
- forms gcol = dY @ w_tap^T, the gradient of the sampled values of its channels (`tl.dot`);
- reduces gcol times the 4 corner values over its channels into the offset and mask gradients;
- scatters gcol times the 4 bilinear weights to the corners, as fp32 atomics into an NHWC buffer where each
  corner is a contiguous channel vector (or stores gcol for the deterministic gather);
- accumulates the grad weight as sampled tile^T @ dY (`tl.dot`), regenerating the sampled tile from the same
  corner values, so the input is gathered once for all the gradients.
What sums over programs (offset and mask gradients over channel and output chunks, the grad weight over pixel
runs) goes through fp32 atomics, or, deterministically, through per-program partials summed in a fixed order.
Layouts and the grouped launch over a list of levels as in `deform_conv`: the pixel runs of all levels share
the grid's last axis, and every per-level buffer is packed level after level.
"""

from math import prod

import torch
import triton
import triton.language as tl

from .deform_conv import (_FIELDS, _HOWO, acc_dtype, autotune_configs, channels_last, find_level,
                          grouped_input, launch_flags, level_args, level_arguments, load_corners, mma, pack_weights,
                          sample_grad_args, stacked_sample_grads, tap_sample, transpose_last, transpose_levels,
                          transpose_row)
from .runtime import INTERPRET, cdiv, first_config_unless_tuning, next_power_of_2, sm_count

# Only BLOCK_P is tuned: the wrapper fixes BLOCK_K and BLOCK_N (`_bwd_blocks`), because the partial buffers
# are shaped by them. With BLOCK_N = 256 the fp32 accumulators need 8 warps to stay in registers.
_BWD_SPACE = [
    ({"BLOCK_P": 64}, 8, 2),
    ({"BLOCK_P": 64}, 8, 3),
    ({"BLOCK_P": 32}, 8, 3),
]
# fp32: operands of twice the bytes, twice the registers.
_BWD_SPACE_FP32 = [
    ({"BLOCK_P": 64}, 8, 2),
    ({"BLOCK_P": 32}, 8, 2),
]
# A pixel run is a multiple of every BLOCK_P above (under the interpreter: of its one config's).
PIXEL_ALIGN = 32 if INTERPRET else 128
# Pixel runs per launch: about this many programs per SM, to fill the GPU and keep the tail wave short.
PROGRAMS_PER_SM = 8
MAX_GRID_Z = 65535


def _bwd_prune(configs, named_args, **kwargs):
    """The fp32 space for fp32; one 16-wide config for fp64, which multiplies with a broadcast (see `mma`)."""
    if kwargs.get("FP64"):
        return [triton.Config({"BLOCK_P": 16}, num_warps=4, num_stages=1)]
    if named_args["x_ptr"].dtype == torch.float32:
        configs = autotune_configs(_BWD_SPACE_FP32, None)
    return first_config_unless_tuning(configs)


@triton.jit
def _accumulate(ptrs, val, mask, DETERMINISTIC: tl.constexpr):
    """Add val into a buffer shared by programs (fp32 atomics), or store it as this program's partial."""
    if DETERMINISTIC:
        tl.store(ptrs, val, mask=mask)
    else:
        # Only the sum matters, not the order against other memory operations: relaxed is enough.
        tl.atomic_add(ptrs, val, mask=mask, sem="relaxed")


# The atomic accumulators are zeroed before every autotuning trial.
@triton.autotune(configs=autotune_configs(_BWD_SPACE, {"BLOCK_P": 32}),
                 key=["C", "Cout", "KK", "P_BUCKET", "DOT", "BLOCK_N", "BLOCK_K", "DETERMINISTIC", "GRAD_INPUT",
                      "GRAD_SAMPLE", "GRAD_WEIGHT", "GROUPED"],
                 reset_to_zero=["gs_ptr", "gx_ptr", "gw_ptr"],
                 prune_configs_by={"early_config_prune": _bwd_prune})
@triton.jit
def _bwd_kernel(x_ptr, off_ptr, msk_ptr, w_ptr, gy_ptr,
                gs_ptr, gx_ptr, gw_ptr, gcol_ptr, tgt_ptr, coef_ptr, table_ptr,
                N, C, Cout, KK, KW, P_BUCKET, PIX, LEVELS, X_PIXELS, O_PIXELS, GS_NUMEL,
                H, W, Ho, Wo, HoWo,
                stride_on, stride_oc, stride_oh, stride_ow,
                stride_mn, stride_mc, stride_mh, stride_mw,
                conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
                gos, stride_gon, stride_goc, stride_goh, stride_gow,
                gms, stride_gmn, stride_gmc, stride_gmh, stride_gmw,
                GROUPED: tl.constexpr, GRAD_INPUT: tl.constexpr, GRAD_SAMPLE: tl.constexpr,
                GRAD_WEIGHT: tl.constexpr, DETERMINISTIC: tl.constexpr, MASK_LOGITS: tl.constexpr,
                FP64: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """All gradients but the bias's, for one (tap, channel chunk, output chunk, pixel run).

    Grid: (KK * cdiv(C, BLOCK_K), cdiv(Cout, BLOCK_N), sum over convs of N * cdiv(Ho*Wo, PIX)). x, w, table
    and GROUPED as in `_fwd_kernel`; gy: the output gradient, laid out as y, or when GROUPED channels-last
    (O_PIXELS, Cout); X_PIXELS / O_PIXELS: pixels of all packed inputs / outputs of all convs and images.
    Outputs (fp32; with atomics R = 1, else one row per partial):
    gs [R, GS_NUMEL]: the offset gradient of each conv, (N, 2*KK, Ho, Wo) ((dy, dx) per tap) from element gos
    with strides stride_gon ... stride_gow, and its mask gradient (N, KK, Ho, Wo) from gms with stride_gmn ...
    (`SampleGrads`; GROUPED: from the table); R = cdiv(C, BLOCK_K) * cdiv(Cout, BLOCK_N); MASK_LOGITS: the
    masks hold logits (the modulation is their sigmoid) and get the logits' gradient;
    gw [S, KK*C, Cout] per weight set with atomics, else [runs, KK*C, Cout] per pixel run; gx: the packed NHWC
    grad input (atomics; convs reading the same input add into the same rows) or, when DETERMINISTIC,
    gcol [cdiv(Cout, BLOCK_N), O_PIXELS*KK, C] and the corner entries tgt, coef [O_PIXELS*KK*4] for
    `_grad_input_gather_kernel`. GRAD_INPUT / GRAD_SAMPLE (offset and mask) / GRAD_WEIGHT switch off what
    autograd does not need.
    """
    pid_kc = tl.program_id(0)
    nb = tl.program_id(1)
    pid_s = tl.program_id(2)
    run = pid_s
    x_start = 0
    o_start = 0
    wset = 0
    if GROUPED:
        level, run = find_level(pid_s, table_ptr, LEVELS, _FIELDS, _HOWO, N, PIX)
        (H, W, Ho, Wo, HoWo, x_start, o_start,
         off_ptr, stride_on, stride_oc, stride_oh, stride_ow,
         msk_ptr, stride_mn, stride_mc, stride_mh, stride_mw,
         wset, conv_stride_h, conv_stride_w) = level_args(table_ptr, level, off_ptr, msk_ptr)
        w_ptr += wset.to(tl.int64) * KK * C * Cout
        if GRAD_SAMPLE:
            (gos, stride_gon, stride_goc, stride_goh, stride_gow,
             gms, stride_gmn, stride_gmc, stride_gmh, stride_gmw) = sample_grad_args(table_ptr, level)
    c_blocks = tl.cdiv(C, BLOCK_K)
    tap = pid_kc // c_blocks
    cb = pid_kc % c_blocks
    splits = tl.cdiv(HoWo, PIX)
    n = (run // splits).to(tl.int64)
    hw_start = (run % splits) * PIX
    hw_end = tl.minimum(hw_start + PIX, HoWo)
    c = cb * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = c < C
    co = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    comask = co < Cout
    # NHWC strides as multiples of C, as in the forward: the corner gathers and grad-input atomics stay
    # vectorized.
    img = x_ptr + (x_start + n * H * W) * C
    stride_xh = W * C
    # This image's first output pixel over all levels and images.
    pixel0 = o_start + n * HoWo
    if GROUPED:
        # dY channels-last (the wrapper transposes it): its channel vectors stay 16-byte aligned whatever the
        # level sizes, where the NCHW pixel runs of odd-sized levels would load element by element.
        gy_rows = gy_ptr + pixel0 * Cout + co[None, :]
    else:
        gy_cols = gy_ptr + pixel0 * Cout + co[None, :].to(tl.int64) * HoWo
    # w_tap^T for this program's channels, [BLOCK_N, BLOCK_K]: loaded once for the whole pixel run.
    wt = tl.load(w_ptr + (tap * C + c)[None, :] * Cout + co[:, None], mask=comask[:, None] & cmask[None, :],
                 other=0.0)
    # The grad weight transposed, [BLOCK_N, BLOCK_K]: M = BLOCK_N (256) suits wgmma and BLOCK_K can stay small.
    gwt_acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)

    for t in range(0, tl.cdiv(hw_end - hw_start, BLOCK_P)):
        hw = hw_start + t * BLOCK_P + tl.arange(0, BLOCK_P)
        valid_p = hw < hw_end
        oh = hw // Wo
        ow = hw % Wo
        y0, x0, ly, lx, m, ok00, ok01, ok10, ok11, w00, w01, w10, w11 = tap_sample(
            off_ptr, msk_ptr, n, oh, ow, valid_p, tap, H, W, KW,
            stride_on, stride_oc, stride_oh, stride_ow, stride_mn, stride_mc, stride_mh, stride_mw,
            conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w, MASK_LOGITS, ACC)
        if GROUPED:
            gy_tile = gy_rows + (hw.to(tl.int64) * Cout)[:, None]
        else:
            gy_tile = gy_cols + hw[:, None]
        g = tl.load(gy_tile, mask=valid_p[:, None] & comask[None, :], other=0.0)
        if GRAD_SAMPLE or GRAD_WEIGHT:
            rows = y0.to(tl.int64) * stride_xh + x0.to(tl.int64) * C
            v00, v01, v10, v11 = load_corners(img + rows[:, None] + c[None, :], cmask,
                                              ok00, ok01, ok10, ok11, stride_xh, C, ACC)
        if GRAD_SAMPLE or GRAD_INPUT:
            gcol = mma(tl.zeros((BLOCK_P, BLOCK_K), dtype=ACC), g, wt, FP64, DOT)
        if GRAD_SAMPLE:
            a00 = tl.sum(gcol * v00, axis=1)
            a01 = tl.sum(gcol * v01, axis=1)
            a10 = tl.sum(gcol * v10, axis=1)
            a11 = tl.sum(gcol * v11, axis=1)
            hy = 1 - ly
            hx = 1 - lx
            if DETERMINISTIC:
                row = (cb * tl.num_programs(1) + nb).to(tl.int64)
            else:
                row = 0
            gs = gs_ptr + row * GS_NUMEL
            goff = (gs + gos + n * stride_gon + (2 * tap).to(tl.int64) * stride_goc + oh * stride_goh
                    + ow * stride_gow)
            _accumulate(goff, m * (hx * (a10 - a00) + lx * (a11 - a01)), valid_p, DETERMINISTIC)
            _accumulate(goff + stride_goc, m * (hy * (a01 - a00) + ly * (a11 - a10)), valid_p, DETERMINISTIC)
            g_mask = hy * (hx * a00 + lx * a01) + ly * (hx * a10 + lx * a11)
            if MASK_LOGITS:
                g_mask = g_mask * m * (1 - m)  # m is zero where the sample does not count, and so is g_mask
            gmask = (gs + gms + n * stride_gmn + tap.to(tl.int64) * stride_gmc + oh * stride_gmh
                     + ow * stride_gmw)
            _accumulate(gmask, g_mask, valid_p, DETERMINISTIC)
        if GRAD_INPUT and DETERMINISTIC:
            entry = (pixel0 + hw) * KK + tap
            tl.store(gcol_ptr + ((nb.to(tl.int64) * O_PIXELS * KK + entry) * C)[:, None] + c[None, :], gcol,
                     mask=valid_p[:, None] & cmask[None, :])
            _store_corner_entries(tgt_ptr, coef_ptr, entry, x_start + (n * H + y0) * W + x0, W, X_PIXELS,
                                  w00, w01, w10, w11, ok00, ok01, ok10, ok11, valid_p & (cb == 0) & (nb == 0))
        elif GRAD_INPUT:
            gx = gx_ptr + ((x_start + (n * H + y0) * W + x0) * C)[:, None] + c[None, :]
            cm = cmask[None, :]
            tl.atomic_add(gx, gcol * w00[:, None], mask=ok00[:, None] & cm, sem="relaxed")
            tl.atomic_add(gx + C, gcol * w01[:, None], mask=ok01[:, None] & cm, sem="relaxed")
            tl.atomic_add(gx + W * C, gcol * w10[:, None], mask=ok10[:, None] & cm, sem="relaxed")
            tl.atomic_add(gx + (W + 1) * C, gcol * w11[:, None], mask=ok11[:, None] & cm, sem="relaxed")
        if GRAD_WEIGHT:
            val = w00[:, None] * v00 + w01[:, None] * v01 + w10[:, None] * v10 + w11[:, None] * v11
            gwt_acc = mma(gwt_acc, tl.trans(g), val.to(g.dtype), FP64, DOT)

    if GRAD_WEIGHT:
        if DETERMINISTIC:
            row = pid_s.to(tl.int64)  # one row per pixel run: row * KK * C can pass 2**31 where Cout is small
        else:
            row = wset
        gw = gw_ptr + ((row * KK + tap) * C + c.to(tl.int64))[None, :] * Cout + co[:, None]
        _accumulate(gw, gwt_acc, comask[:, None] & cmask[None, :], DETERMINISTIC)


@triton.jit
def _store_corner_entries(tgt_ptr, coef_ptr, entry, pos, W, S, w00, w01, w10, w11, ok00, ok01, ok10, ok11,
                          store):
    """The 4 (input position, weight) entries of gcol row `entry` for the deterministic grad input gather.

    pos is the top-left corner's position in the packed NHWC input; corners outside the image get the sentinel
    position S (the packed input's pixels), which sorts after every real one.
    """
    e = entry * 4
    tl.store(tgt_ptr + e, tl.where(ok00, pos, S), mask=store)
    tl.store(tgt_ptr + e + 1, tl.where(ok01, pos + 1, S), mask=store)
    tl.store(tgt_ptr + e + 2, tl.where(ok10, pos + W, S), mask=store)
    tl.store(tgt_ptr + e + 3, tl.where(ok11, pos + W + 1, S), mask=store)
    tl.store(coef_ptr + e, w00, mask=store)
    tl.store(coef_ptr + e + 1, w01, mask=store)
    tl.store(coef_ptr + e + 2, w10, mask=store)
    tl.store(coef_ptr + e + 3, w11, mask=store)


_GATHER_SPACE = [
    ({"BLOCK_S": 32, "BLOCK_C": 64}, 4, 2),
    ({"BLOCK_S": 64, "BLOCK_C": 32}, 4, 2),
    ({"BLOCK_S": 16, "BLOCK_C": 128}, 4, 2),
]


def _gather_prune(configs, named_args, **kwargs):
    return first_config_unless_tuning(configs)


# S_BUCKET (next power of two of S) keys the tuning without retuning for every image size.
@triton.autotune(configs=autotune_configs(_GATHER_SPACE, {"BLOCK_S": 16, "BLOCK_C": 16}), key=["C", "S_BUCKET"],
                 prune_configs_by={"early_config_prune": _gather_prune})
@triton.jit
def _grad_input_gather_kernel(rowptr_ptr, src_ptr, coef_ptr, gcol_ptr, gx_ptr, C, S, S_BUCKET,
                              BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Deterministic grad input: each input position sums its sorted (gcol row, weight) entries in order.

    rowptr (S + 1) delimits the entries of each of the S input positions (pixels of the packed input); src
    holds the gcol row (output pixel * KK + tap) and coef the bilinear weight times mask of each entry.
    gx: packed NHWC (S, C).
    """
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_s = pid_s.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    valid_s = offs_s < S
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    start = tl.load(rowptr_ptr + offs_s, mask=valid_s, other=0)
    count = (tl.load(rowptr_ptr + offs_s + 1, mask=valid_s, other=0) - start).to(tl.int32)
    acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=gcol_ptr.dtype.element_ty)
    for j in range(0, tl.max(count, axis=0)):
        # Entries loaded as [BLOCK_S, 1] columns: 1-D loads here trip a layout pass of Triton 3.6.
        has = (j < count)[:, None]
        entry = start[:, None] + j
        src = tl.load(src_ptr + entry, mask=has, other=0)
        coef = tl.load(coef_ptr + entry, mask=has, other=0.0)
        g = tl.load(gcol_ptr + src * C + c[None, :], mask=has & cmask[None, :], other=0.0)
        acc += coef * g
    tl.store(gx_ptr + offs_s[:, None] * C + c[None, :], acc, mask=valid_s[:, None] & cmask[None, :])


def _grad_input_deterministic(gcol, tgt, coef, gx):
    """Sort the corner entries by target position (stable: fixed order) and gather them per position into gx,
    the packed NHWC (S, C) grad input in gcol's dtype."""
    s, c = gx.shape
    tgt_sorted, order = torch.sort(tgt, stable=True)
    rowptr = torch.searchsorted(tgt_sorted, torch.arange(s + 1, device=tgt.device, dtype=tgt.dtype))
    grid = lambda meta: (cdiv(s, meta["BLOCK_S"]), cdiv(c, meta["BLOCK_C"]))
    _grad_input_gather_kernel[grid](rowptr, order // 4, coef[order], gcol, gx, c, s, next_power_of_2(s))


def _bwd_blocks(x, cout):
    """(BLOCK_N, BLOCK_K) of the backward. 16-bit types: all of DyHead's 256 output channels in one chunk, so
    the input is gathered once; fp32 (twice the bytes) takes half of both to limit register spills."""
    if INTERPRET or x.dtype == torch.float64:
        return 16, 16
    if x.dtype == torch.float32:
        return min(128, max(16, next_power_of_2(cout))), 32
    return min(256, max(16, next_power_of_2(cout))), 64


def _pixels_per_program(x, n, howos, programs_per_run):
    """Pixels of one program's run: a multiple of PIXEL_ALIGN sized for about PROGRAMS_PER_SM programs per
    SM (one run per program under the interpreter's few pixels), within the grid's z limit. howos: the output
    pixels of each level's image."""
    if INTERPRET:
        return PIXEL_ALIGN
    sms = sm_count(x.device)
    runs_per_image = cdiv(cdiv(PROGRAMS_PER_SM * sms, programs_per_run), n)
    pix = cdiv(cdiv(sum(howos), runs_per_image), PIXEL_ALIGN) * PIXEL_ALIGN
    min_pix = cdiv(cdiv(sum(howos), MAX_GRID_Z // n), PIXEL_ALIGN) * PIXEL_ALIGN
    pix = max(pix, min_pix)
    # Each level rounds its runs up: with several levels min_pix may fall short.
    while n * sum(cdiv(howo, pix) for howo in howos) > MAX_GRID_Z:
        pix += PIXEL_ALIGN
    return pix


def backward_shapes(x, offset, mask, weight, needs):
    """Shapes of a one-conv backward's results: grad input, the offset and mask gradients flat one after the
    other, grad weight and bias; a gradient autograd does not need is an empty (0,) tensor."""
    shapes = (x.shape, (offset.numel() + mask.numel(),), weight.shape)
    return [shape if need else (0,) for shape, need in zip(shapes, needs)] + [(weight.shape[0],)]


def flat_backward_shapes(levels, needs, sample_numel):
    """Shapes of deform_conv_backward's results for `Levels` levels: flat grad input (the packed inputs, each
    input's block in its NCHW layout), flat offset and mask gradients (sample_numel elements, laid out as a
    `SampleGrads` says), grad weights (S, Cout, Cin, kh, kw) and biases (S, Cout); (0,) where not needed."""
    sets = len(levels.set_convs)
    shapes = ((levels.x_pixels * levels.c,), (sample_numel,), (sets, levels.cout, levels.c, levels.kh, levels.kw))
    return [shape if need else (0,) for shape, need in zip(shapes, needs)] + [(sets, levels.cout)]


def deform_conv_backward(grad_out, xs, offsets, masks, weights, levels, padding, dilation, deterministic,
                         needs=(True, True, True), sample_grads=None, mask_logits=False):
    """Backward launch of the convs `levels` plans, as `deform_conv.deform_conv_forward`. grad_out: the flat
    output gradient (sum over convs of N*Cout*H_out*W_out,) laid out as the forward's y, any strides.

    needs: whether grad input, grad offset and mask, and grad weight are wanted. sample_grads: where the offset
    and mask gradients go (`SampleGrads`; None: `stacked_sample_grads`, each conv its own). mask_logits: the
    masks hold logits (as in the forward); their gradient is the logits'.
    Returns (grad_input, grad_sample, grad_weight, grad_bias) shaped as `flat_backward_shapes` says (all
    contiguous; the first two flat), in the inputs' dtype; an input read by several convs gets the sum of
    their gradients, a weight set the sum over its convs, a gradient element of sample_grads the sum of the
    convs that share it; accumulation in fp32 (fp64 for fp64).
    """
    n, c, cout, kk = levels.n, levels.c, levels.cout, levels.kh * levels.kw
    x = xs[0]
    acc = acc_dtype(x)
    sets = len(levels.set_convs)
    need_input, need_sample, need_weight = needs
    grad_out = grad_out.contiguous()
    layout = sample_grads or stacked_sample_grads(levels)
    shapes = flat_backward_shapes(levels, needs, layout.numel)[:3]
    if levels.o_pixels == 0 or c == 0 or cout == 0 or not any(needs):
        return (*(x.new_zeros(shape) for shape in shapes), _bias_gradient(grad_out, levels))
    # Deterministic partials are stored, not added: there each conv gets its own gradient elements, and convs
    # that share elements of `layout` are summed into them afterwards, in conv order.
    kernel_layout = stacked_sample_grads(levels) if deterministic and sample_grads is not None else layout
    block_n, block_k = _bwd_blocks(x, cout)
    c_blocks, n_blocks = cdiv(c, block_k), cdiv(cout, block_n)
    howos = [ho * wo for _, _, ho, wo in levels.sizes]
    pix = _pixels_per_program(x, n, howos, kk * c_blocks * n_blocks)
    conv_runs = [n * cdiv(howo, pix) for howo in howos]
    runs = sum(conv_runs)
    deterministic = bool(deterministic)
    # With atomics the sums over programs land in one row each (one per weight set for the grad weight), all in
    # one zeroed buffer (one memset); deterministically every program writes its own row of partials.
    gs_shape = ((c_blocks * n_blocks if deterministic else 1), kernel_layout.numel) if need_sample else (0,)
    gw_shape = ((runs if deterministic else sets), kk * c, cout) if need_weight else (0,)
    gx_shape = (levels.x_pixels, c) if need_input and not deterministic else (0,)
    gs, gw, gx = _accumulators(x, acc, (gs_shape, gw_shape, gx_shape), zero=not deterministic)
    empty = x.new_empty((0,), dtype=acc)
    gathered = need_input and deterministic
    gcol = x.new_empty((n_blocks, levels.o_pixels * kk, c), dtype=acc) if gathered else empty
    tgt = x.new_empty((levels.o_pixels * kk * 4,), dtype=torch.int64) if gathered else empty
    coef = x.new_empty((levels.o_pixels * kk * 4,), dtype=acc) if gathered else empty
    if gathered:
        gx = x.new_empty((levels.x_pixels, c), dtype=acc)
    grad_input, grad_sample, grad_weight = (x.new_empty(shape) for shape in shapes)
    if levels.grouped:
        # dY of each conv to channels-last, and the NHWC grad input back to each input's NCHW block: grouped
        # transposes whose tables go up with the level table.
        gy = grad_out.new_empty((levels.o_pixels, cout))
        dy_rows = [transpose_row(cout, ho * wo, grad_out.data_ptr() + start * cout * gy.element_size(),
                                 (cout * ho * wo, ho * wo, 1), gy.data_ptr() + start * cout * gy.element_size())
                   for (_, _, ho, wo), start in zip(levels.sizes, levels.o_starts)]
        unpack = [transpose_row(h * w, c, gx.data_ptr() + start * c * gx.element_size(), (h * w * c, c, 1),
                                grad_input.data_ptr() + start * c * grad_input.element_size())
                  for (h, w), start in zip(levels.input_sizes, levels.input_starts)] if need_input else []
        xl, table, gy_table, *unpack_table = grouped_input(xs, offsets, masks, levels,
                                                           [dy_rows, unpack] if unpack else [dy_rows],
                                                           kernel_layout)
        transpose_levels(grad_out, gy, gy_table, dy_rows, n)
        o_bounds = [*levels.o_starts, levels.o_pixels]
        grad_bias = _set_sums(gy, [(o_bounds[a], o_bounds[b]) for a, b in levels.set_convs])
    else:
        xl = channels_last(x)
        table, gy = xl, grad_out
        grad_bias = _bias_gradient(grad_out, levels)
    _bwd_kernel[(kk * c_blocks, n_blocks, runs)](
        xl, offsets[0], masks[0], pack_weights(weights), gy, gs, gx, gw, gcol, tgt, coef, table,
        n, c, cout, kk, levels.kw, next_power_of_2(levels.o_pixels), pix, len(levels.sizes),
        levels.x_pixels, levels.o_pixels, kernel_layout.numel,
        *level_arguments(levels, offsets[0], masks[0], padding, dilation),
        *((0,) * 10 if levels.grouped else (*kernel_layout.offsets[0], *kernel_layout.masks[0])),
        GROUPED=levels.grouped, GRAD_INPUT=need_input, GRAD_SAMPLE=need_sample, GRAD_WEIGHT=need_weight,
        DETERMINISTIC=deterministic, MASK_LOGITS=mask_logits, BLOCK_N=block_n, BLOCK_K=block_k, **launch_flags(x))

    # Always a copy: a view of the accumulators would alias another output of the custom op.
    if need_input:
        if deterministic:
            _grad_input_deterministic(gcol.sum(dim=0) if n_blocks > 1 else gcol[0], tgt, coef, gx)
        if levels.grouped:
            transpose_levels(gx, grad_input, unpack_table[0], unpack, n)
        else:
            h, w = levels.input_sizes[0]
            transpose_last(gx.view(n, h * w, c), grad_input.view(n, c, h * w))
    if need_sample:
        sample = gs.sum(dim=0) if gs.shape[0] > 1 else gs[0]
        if kernel_layout is not layout:
            sample = _relayout(sample, kernel_layout, layout, levels)
        grad_sample = sample.to(x.dtype, copy=True)
    if need_weight:
        if deterministic:
            run_bounds = [sum(conv_runs[:k]) for k in range(len(conv_runs) + 1)]
            gw = _set_sums(gw, [(run_bounds[a], run_bounds[b]) for a, b in levels.set_convs])
        grad_weight = gw.view(sets, levels.kh, levels.kw, c, cout).permute(0, 4, 3, 1, 2).to(
            x.dtype, memory_format=torch.contiguous_format, copy=True)
    return grad_input, grad_sample, grad_weight, grad_bias


def _relayout(src, src_layout, dst_layout, levels):
    """The offset and mask gradients of src (laid out as src_layout) laid out as dst_layout, each conv's added
    in conv order (a fixed order: deterministic where convs share elements)."""
    dst = src.new_zeros((dst_layout.numel,))
    n, kk = levels.n, levels.kh * levels.kw
    for k, (_, _, ho, wo) in enumerate(levels.sizes):
        for src_views, dst_views, channels in ((src_layout.offsets, dst_layout.offsets, 2 * kk),
                                               (src_layout.masks, dst_layout.masks, kk)):
            (s0, *s_strides), (d0, *d_strides) = src_views[k], dst_views[k]
            size = (n, channels, ho, wo)
            dst.as_strided(size, d_strides, d0).add_(src.as_strided(size, s_strides, src.storage_offset() + s0))
    return dst


def _set_sums(rows, bounds):
    """(S, ...) sums of rows[a:b] over each set's (a, b) row range: a fixed order (one reduction per set)."""
    if len(bounds) == 1 and bounds[0] == (0, rows.shape[0]):
        return rows.sum(dim=0, keepdim=True)
    return torch.stack([rows[a:b].sum(dim=0) for a, b in bounds])


def _bias_gradient(grad_out, levels):
    """(S, Cout): per weight set, the sum over images and pixels of its convs' blocks of the flat output
    gradient: one reduction per conv (a grouped launch reduces its channels-last copy of dY per set instead)."""
    n, cout = levels.n, levels.cout
    sums = [grad_out[start * cout:(start + n * ho * wo) * cout].view(n, cout, ho * wo).sum(dim=(0, 2))
            for (_, _, ho, wo), start in zip(levels.sizes, levels.o_starts)]
    if len(sums) == 1:
        return sums[0][None]
    return torch.stack([torch.stack(sums[a:b]).sum(dim=0) for a, b in levels.set_convs])


def _accumulators(x, dtype, shapes, zero):
    """Views of one buffer (one allocation, one memset when zero) with the given shapes; each view starts at a
    multiple of 64 elements, so the kernels' vectorized atomics stay aligned."""
    sizes = [cdiv(prod(shape), 64) * 64 for shape in shapes]
    buf = (x.new_zeros if zero else x.new_empty)((sum(sizes),), dtype=dtype)
    views, start = [], 0
    for shape, size in zip(shapes, sizes):
        views.append(buf[start:start + prod(shape)].view(shape))
        start += size
    return views
