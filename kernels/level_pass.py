"""The fused level pass of a DyHead block: per-channel moments and one elementwise combine, in Triton.

After the deformable convs of a block, GroupNorm, the scale attention and the dynamic ReLU of a pyramid level
are per-(image, branch, channel) affine maps whose coefficients follow from per-channel moments of the raw conv
outputs. A level then needs two ops:
- `channel_moments(y)`: mean and M2 (sum of squared deviations from the mean) over H*W per (image, channel);
- `level_combine(branches, scale, shift, coef)`: one pass forming u = sum_b scale_b * y_b + shift and the
  dynamic ReLU max(a1 * u + b1, a2 * u + b2), a last branch of another size read resized (bilinear).
Reference twins: `dyhead.ScaleAttention` and `dyhead.TaskAttention` after GroupNorm (`dyhead.fused` builds
scale, shift and coef from the moments).

A program owns BLOCK_C channels x BLOCK_P pixels of one image, the H*W pixels flattened to one index, and loads
its per-(image, channel) vectors once. Loads are coalesced along pixels for NCHW tensors, along channels for
channels-last ones (each layout has its own autotune configs). The reductions (the moments, the combine's
backward) give each program a run of pixels and write per-run partials that are merged in a fixed order:
deterministic, no atomics. Math in fp32 (fp64 for fp64 tensors).

Each op is a torch.library custom op (`dyhead_triton::channel_moments`, `dyhead_triton::level_combine`, and
their backwards) with a fake implementation and `register_autograd`, so `torch.compile(fullgraph=True)` traces
through it; eager calls on plain tensors take the same implementations through a `torch.autograd.Function`,
without the custom op's dispatch cost.
"""

import functools
import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .deform_conv import acc_dtype, acc_tl, autotune_configs
from .deform_conv_op import _FLOAT_DTYPES, _device_guard, eager_call
from .runtime import (INTERPRET, cdiv, check_runnable, first_config_unless_tuning, first_order_backward,
                      next_power_of_2, sm_count)
from .upsample import axis_scale, bilinear_tile, float32_scale, upsample_backward

# A reduction's pixel run is a multiple of this, and so of every BLOCK_P of its configs (and of 16, see
# `_aligned`).
RUN_ALIGN = 32 if INTERPRET else 256
# Pixel runs per reduction: enough for about this many programs per SM with 64-channel blocks.
PROGRAMS_PER_SM = 4
# Channels per program of the partial merge: it reads (N, S, C, 2) partials, a few KB.
MERGE_BLOCK_C = 16 if INTERPRET else 128

# (meta, num_warps, num_stages). NCHW tiles are long along pixels (BLOCK_P >= BLOCK_C), channels-last tiles
# along channels; `_prune_by_layout` keeps the ones that match the tensors. All compile for sm_90 without
# spills in bf16, fp16 and fp32, with 16-byte global loads where the rows of pixels are 16-byte aligned (8-byte
# ones in 16-bit channels-last reductions).
_ELEMENTWISE_SPACE = [
    ({"BLOCK_C": 4, "BLOCK_P": 512}, 4, 1),
    ({"BLOCK_C": 8, "BLOCK_P": 256}, 4, 1),
    ({"BLOCK_C": 16, "BLOCK_P": 256}, 8, 1),
    ({"BLOCK_C": 64, "BLOCK_P": 16}, 4, 1),
    ({"BLOCK_C": 64, "BLOCK_P": 32}, 4, 1),
    ({"BLOCK_C": 128, "BLOCK_P": 32}, 8, 1),
]
# Reductions: BLOCK_P divides RUN_ALIGN. Channels-last tiles keep each channel vector (8 coefficients, 8 sums in
# the combine's backward) in every thread that holds that channel: short tiles keep them within 128 registers.
_REDUCTION_SPACE = [
    ({"BLOCK_C": 4, "BLOCK_P": 128}, 4, 2),
    ({"BLOCK_C": 4, "BLOCK_P": 256}, 8, 2),
    ({"BLOCK_C": 8, "BLOCK_P": 256}, 8, 2),
    ({"BLOCK_C": 16, "BLOCK_P": 128}, 8, 2),
    ({"BLOCK_C": 32, "BLOCK_P": 16}, 4, 2),
    ({"BLOCK_C": 64, "BLOCK_P": 8}, 4, 2),
    ({"BLOCK_C": 128, "BLOCK_P": 8}, 8, 2),
]
_INTERPRET_CONFIG = {"BLOCK_C": 4, "BLOCK_P": 16}


def keep_tiles(configs, pixels: bool):
    """Pixel-long tiles (BLOCK_P >= BLOCK_C) if pixels, channel-long ones otherwise (the first of them only when
    autotuning is off)."""
    kept = [c for c in configs if (c.kwargs["BLOCK_P"] >= c.kwargs["BLOCK_C"]) == pixels] or configs
    return first_config_unless_tuning(kept)


def _prune_by_layout(configs, named_args, **kwargs):
    """Pixel-long tiles where pixels are contiguous (stride_p == 1), channel-long tiles otherwise."""
    return keep_tiles(configs, named_args["stride_p"] == 1)


def level_autotune(space, key, prune=_prune_by_layout):
    """triton.autotune over space (or the interpreter's one config) with an early pruner by layout."""
    return triton.autotune(configs=autotune_configs(space, _INTERPRET_CONFIG), key=key,
                           prune_configs_by={"early_config_prune": prune})


@triton.jit
def _aligned(v, ALIGN: tl.constexpr):
    """v, a multiple of ALIGN (the wrapper checks), in a form the compiler knows to be one: rows of pixels then
    start aligned and masks are constant over ALIGN pixels, which lets it vectorize the loads."""
    return (v // ALIGN) * ALIGN


@triton.jit
def _tile(n, c, p, C, end, stride_n, stride_c, stride_p, ALIGN: tl.constexpr):
    """Element offsets (int64, [BLOCK_C, BLOCK_P]) of channels c x pixels p of image n, and the mask of
    c < C and p < end."""
    rows = n.to(tl.int64) * _aligned(stride_n, ALIGN) + c.to(tl.int64) * _aligned(stride_c, ALIGN)
    offs = rows[:, None] + p.to(tl.int64)[None, :] * stride_p
    return offs, (c < C)[:, None] & (p < _aligned(end, ALIGN))[None, :]


@triton.jit
def _chan_merge(mean, m2, count_a, delta, m2_b, count_b):
    """(mean, M2) of two disjoint sets of count_a >= 0 and count_b > 0 values from those of each (Chan et al.);
    delta = mean_b - mean."""
    count = count_a + count_b
    return mean + delta * (count_b / count), m2 + m2_b + delta * delta * (count_a * (count_b / count))


@triton.jit
def first_pixel(x_ptr, n, c, C, stride_n, stride_c, ACC: tl.constexpr):
    """x[n, c, pixel 0] per channel c ([BLOCK_C], ACC; zero where c >= C): the shift of `run_moments`."""
    offs = n.to(tl.int64) * stride_n + c.to(tl.int64) * stride_c
    return tl.load(x_ptr + offs, mask=c < C, other=0.0).to(ACC)


@triton.jit
def run_moments(x_ptr, n, c, C, start, end, stride_n, stride_c, stride_p, shift,
                 ALIGN: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """(mean - shift, M2) per channel c of image n over pixels [start, end) of x, in ACC ([BLOCK_C] each).

    Tiles are merged in pixel order, each from its exact two-pass moments about the running mean: centred
    values keep their precision where the mean is large against the spread. The runs of a map share one shift
    per channel (a value of the map: `first_pixel`) and their means are kept about it, so that the merge of the
    runs adds no rounding of a large mean either.
    """
    mean = tl.zeros((BLOCK_C,), dtype=ACC)
    m2 = tl.zeros((BLOCK_C,), dtype=ACC)
    for p0 in range(start, end, BLOCK_P):
        offs, mask = _tile(n, c, p0 + tl.arange(0, BLOCK_P), C, end, stride_n, stride_c, stride_p, ALIGN)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - shift[:, None]
        x = tl.where(mask, x - mean[:, None], 0.0)
        count = tl.minimum(end - p0, BLOCK_P).to(ACC)
        delta = tl.sum(x, axis=1) / count
        d = tl.where(mask, x - delta[:, None], 0.0)
        mean, m2 = _chan_merge(mean, m2, (p0 - start).to(ACC), delta, tl.sum(d * d, axis=1), count)
    return mean, m2


@level_autotune(_REDUCTION_SPACE, key=["C", "P_BUCKET", "stride_p"])
@triton.jit
def _moments_kernel(x_ptr, part_ptr, C, HW, P_BUCKET, RUN, stride_n, stride_c, stride_p,
                    ALIGN: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """(mean - x[n, c, 0], M2) of x over pixel run s (pixels [s*RUN, min((s+1)*RUN, HW))) per channel of
    image n; the mean itself where S == 1 (part is then the output: no merge follows).

    Grid (S, cdiv(C, BLOCK_C), N). x: (N, C, HW) through its strides; part: (N, S, C, 2) contiguous, ACC.
    """
    s = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2)
    start = s * RUN
    shift = first_pixel(x_ptr, n, c, C, stride_n, stride_c, ACC)
    mean, m2 = run_moments(x_ptr, n, c, C, start, tl.minimum(start + RUN, HW), stride_n, stride_c, stride_p,
                           shift, ALIGN, ACC, BLOCK_C, BLOCK_P)
    if tl.num_programs(0) == 1:
        mean += shift
    out = part_ptr + ((n.to(tl.int64) * tl.num_programs(0) + s) * C + c) * 2
    tl.store(out, mean, mask=c < C)
    tl.store(out + 1, m2, mask=c < C)


@triton.jit
def merge_runs(run, step, valid, S, RUN, HW):
    """(mean, M2) of S >= 0 runs' (mean, M2), merged in run order: the first at run (a [BLOCK_C] pointer block
    to each channel's mean, M2 next to it), the others step elements apart; run s counts
    min(RUN, HW - s*RUN) pixels. Zero where not valid or S == 0."""
    valid = valid & (S > 0)
    mean = tl.load(run, mask=valid, other=0.0)
    m2 = tl.load(run + 1, mask=valid, other=0.0)
    for s in range(1, S):
        run += step
        count_a = (s * RUN).to(mean.dtype)
        count_b = tl.minimum(RUN, HW - s * RUN).to(mean.dtype)
        mean, m2 = _chan_merge(mean, m2, count_a, tl.load(run, mask=valid, other=0.0) - mean,
                               tl.load(run + 1, mask=valid, other=0.0), count_b)
    return mean, m2


@triton.jit
def _moments_merge_kernel(x_ptr, part_ptr, out_ptr, C, HW, RUN, S, stride_n, stride_c, BLOCK_C: tl.constexpr):
    """out[n, c] = the S runs' (mean, M2) of part[n, :, c] merged in run order, the shift x[n, c, 0] added back
    to the mean.

    Grid (cdiv(C, BLOCK_C), N). x: `_moments_kernel`'s; part: (N, S, C, 2), out: (N, C, 2), both contiguous in
    one float dtype.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(1).to(tl.int64)
    valid = c < C
    mean, m2 = merge_runs(part_ptr + n * S * C * 2 + c * 2, C * 2, valid, S, RUN, HW)
    mean += first_pixel(x_ptr, n, c, C, stride_n, stride_c, mean.dtype)
    out = out_ptr + (n * C + c) * 2
    tl.store(out, mean, mask=valid)
    tl.store(out + 1, m2, mask=valid)


@triton.jit
def moments_grad(x, mean, g_mean_per_pixel, two_g_m2):
    """d x on a tile x (ACC) from the per-channel gradients of its (mean, M2): g_mean / HW + 2 g_M2 (x - mean),
    given g_mean / HW and 2 g_M2."""
    return g_mean_per_pixel[:, None] + two_g_m2[:, None] * (x - mean[:, None])


@level_autotune(_ELEMENTWISE_SPACE, key=["C", "P_BUCKET", "stride_p"])
@triton.jit
def _moments_backward_kernel(x_ptr, mom_ptr, g_ptr, dx_ptr, C, HW, P_BUCKET,
                             stride_n, stride_c, stride_p, stride_dn, stride_dc, stride_dp,
                             stride_gn, stride_gc, stride_gk,
                             ALIGN: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """dx = g_mean / HW + 2 * g_m2 * (x - mean) per (image, channel).

    Grid (cdiv(HW, BLOCK_P), cdiv(C, BLOCK_C), N). x, dx: (N, C, HW) through their strides; mom: (N, C, 2)
    contiguous, ACC; g: (N, C, 2) through its strides (an expanded gradient is read in place).
    """
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2).to(tl.int64)
    valid = c < C
    mean = tl.load(mom_ptr + (n * C + c) * 2, mask=valid, other=0.0)
    g = g_ptr + n * stride_gn + c * stride_gc
    g_mean = tl.load(g, mask=valid, other=0.0).to(ACC) / HW
    g_m2 = 2 * tl.load(g + stride_gk, mask=valid, other=0.0).to(ACC)
    offs, mask = _tile(n, c, p, C, HW, stride_n, stride_c, stride_p, ALIGN)
    dx = moments_grad(tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC), mean, g_mean, g_m2)
    d_offs, _ = _tile(n, c, p, C, HW, stride_dn, stride_dc, stride_dp, ALIGN)
    tl.store(dx_ptr + d_offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _coefficients(scale_ptr, shift_ptr, coef_ptr, n, c, C, B: tl.constexpr):
    """Per-channel vectors of image n: scale of branches 0, 1, 2 (zero past B), shift, a1, b1, a2, b2.
    scale (N, B, C), shift (N, C), coef (N, 4, C): contiguous."""
    valid = c < C
    scale = scale_ptr + n * B * C + c
    coef = coef_ptr + n * 4 * C + c
    s0 = tl.load(scale, mask=valid, other=0.0)
    s1 = tl.zeros_like(s0)
    s2 = tl.zeros_like(s0)
    if B > 1:
        s1 = tl.load(scale + C, mask=valid, other=0.0)
    if B > 2:
        s2 = tl.load(scale + 2 * C, mask=valid, other=0.0)
    shift = tl.load(shift_ptr + n * C + c, mask=valid, other=0.0)
    a1 = tl.load(coef, mask=valid, other=0.0)
    b1 = tl.load(coef + C, mask=valid, other=0.0)
    a2 = tl.load(coef + 2 * C, mask=valid, other=0.0)
    b2 = tl.load(coef + 3 * C, mask=valid, other=0.0)
    return s0, s1, s2, shift, a1, b1, a2, b2


@triton.jit
def _branch(y_ptr, offs, mask, n, c, p, resize, RESIZE: tl.constexpr, ACC: tl.constexpr):
    """A branch's tile in ACC: read at offs, or (RESIZE) resized bilinearly from its own size, resize being
    `bilinear_tile`'s (W_OUT, H_IN, W_IN, scale_h, scale_w, strides)."""
    if RESIZE:
        return bilinear_tile(y_ptr, n, c, p, mask, *resize, ACC)
    else:
        return tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _mix(y0_ptr, y1_ptr, y2_ptr, offs, mask, n, c, p, resize, s0, s1, s2, shift,
         B: tl.constexpr, RESIZED: tl.constexpr, ACC: tl.constexpr):
    """u = sum_b scale_b * y_b + shift on a tile, and the branch tiles y_b in ACC (zero past B); with
    RESIZED, branch B - 1 is read resized (see `_branch`)."""
    y0 = tl.load(y0_ptr + offs, mask=mask, other=0.0).to(ACC)
    y1 = tl.zeros_like(y0)
    y2 = tl.zeros_like(y0)
    u = s0[:, None] * y0 + shift[:, None]
    if B > 1:
        y1 = _branch(y1_ptr, offs, mask, n, c, p, resize, RESIZED and B == 2, ACC)
        u += s1[:, None] * y1
    if B > 2:
        y2 = _branch(y2_ptr, offs, mask, n, c, p, resize, RESIZED, ACC)
        u += s2[:, None] * y2
    return u, y0, y1, y2


@triton.jit
def _lines(u, a1, b1, a2, b2):
    """The dynamic ReLU's two lines a1 * u + b1 and a2 * u + b2 on a tile."""
    return a1[:, None] * u + b1[:, None], a2[:, None] * u + b2[:, None]


@level_autotune(_ELEMENTWISE_SPACE, key=["C", "P_BUCKET", "stride_p", "B", "RESIZED"])
@triton.jit
def _combine_kernel(y0_ptr, y1_ptr, y2_ptr, scale_ptr, shift_ptr, coef_ptr, out_ptr, C, HW, P_BUCKET,
                    stride_n, stride_c, stride_p, W_OUT, H_IN, W_IN, scale_h, scale_w,
                    stride_rn, stride_rc, stride_rh, stride_rw,
                    B: tl.constexpr, RESIZED: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """out = max(a1 * u + b1, a2 * u + b2), u = sum_{b < B} scale_b * y_b + shift, per (image, channel).

    Grid (cdiv(HW, BLOCK_P), cdiv(C, BLOCK_C), N). The branches y_b and out: (N, C, HW) with one set of
    strides, except with RESIZED the last branch: (N, C, H_IN, W_IN) through its strides stride_r*, resized
    bilinearly to the output's rows of W_OUT (scale_h, scale_w: float32 source scales); scale, shift, coef as
    `_coefficients` reads them, in ACC.
    """
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2)
    s0, s1, s2, shift, a1, b1, a2, b2 = _coefficients(scale_ptr, shift_ptr, coef_ptr, n, c, C, B)
    offs, mask = _tile(n, c, p, C, HW, stride_n, stride_c, stride_p, ALIGN)
    resize = (W_OUT, H_IN, W_IN, axis_scale(H_IN, HW // W_OUT, scale_h, ACC), axis_scale(W_IN, W_OUT, scale_w, ACC),
              stride_rn, stride_rc, stride_rh, stride_rw)
    u, _, _, _ = _mix(y0_ptr, y1_ptr, y2_ptr, offs, mask, n, c, p, resize, s0, s1, s2, shift, B, RESIZED, ACC)
    line1, line2 = _lines(u, a1, b1, a2, b2)
    out = tl.maximum(line1, line2, propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_max_grad(g, line1, line2):
    """g split between the lines as torch.maximum's backward does: all to the larger one, half to each on a
    tie (and all to both where one is NaN)."""
    half = 0.5 * g
    tie = line1 == line2
    return tl.where(tie, half, tl.where(line1 < line2, 0.0, g)), tl.where(tie, half, tl.where(line1 > line2, 0.0, g))


@triton.jit
def zero_sums(BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """The combine backward's 8 per-channel sums, zero: d scale_0, 1, 2, d shift, d a1, d b1, d a2, d b2."""
    zero = tl.zeros((BLOCK_C,), dtype=ACC)
    return zero, zero, zero, zero, zero, zero, zero, zero


@triton.jit
def combine_tile_backward(g, u, y0, y1, y2, sums, a1, b1, a2, b2, B: tl.constexpr, WRITE_SUMS: tl.constexpr):
    """(du, sums): the gradient of the mix u on a tile from the output's g (g on the winning line times its
    slope, half each on ties), and with WRITE_SUMS the tile's sums per channel added to sums (`zero_sums`'
    order): du * y_b (d scale_b, b < B), du (d shift), g * u and g on line 1 (d a1, d b1) and line 2."""
    line1, line2 = _lines(u, a1, b1, a2, b2)
    g1, g2 = _split_max_grad(g, line1, line2)
    du = g1 * a1[:, None] + g2 * a2[:, None]
    if WRITE_SUMS:
        d0, d1, d2, d_shift, d_a1, d_b1, d_a2, d_b2 = sums
        d0 += tl.sum(du * y0, axis=1)
        if B > 1:
            d1 += tl.sum(du * y1, axis=1)
        if B > 2:
            d2 += tl.sum(du * y2, axis=1)
        sums = (d0, d1, d2, d_shift + tl.sum(du, axis=1), d_a1 + tl.sum(g1 * u, axis=1), d_b1 + tl.sum(g1, axis=1),
                d_a2 + tl.sum(g2 * u, axis=1), d_b2 + tl.sum(g2, axis=1))
    return du, sums


@triton.jit
def _store_sums(part_ptr, n, s, c, C, sums, B: tl.constexpr):
    """Row block (n, s) of the (N, S, B + 5, C) partials: sums in `zero_sums`' order, d scale_b for b < B."""
    d0, d1, d2, d_shift, d_a1, d_b1, d_a2, d_b2 = sums
    valid = c < C
    row = part_ptr + (n.to(tl.int64) * tl.num_programs(0) + s) * (B + 5) * C + c
    tl.store(row, d0, mask=valid)
    if B > 1:
        tl.store(row + C, d1, mask=valid)
    if B > 2:
        tl.store(row + 2 * C, d2, mask=valid)
    row += B * C
    tl.store(row, d_shift, mask=valid)
    tl.store(row + C, d_a1, mask=valid)
    tl.store(row + 2 * C, d_b1, mask=valid)
    tl.store(row + 3 * C, d_a2, mask=valid)
    tl.store(row + 4 * C, d_b2, mask=valid)


@level_autotune(_REDUCTION_SPACE, key=["C", "P_BUCKET", "stride_p", "B", "RESIZED", "WRITE_DY", "WRITE_SUMS"])
@triton.jit
def _combine_backward_kernel(g_ptr, y0_ptr, y1_ptr, y2_ptr, scale_ptr, shift_ptr, coef_ptr,
                             dy0_ptr, dy1_ptr, dy2_ptr, part_ptr, C, HW, P_BUCKET, RUN,
                             stride_n, stride_c, stride_p, stride_gn, stride_gc, stride_gp,
                             W_OUT, H_IN, W_IN, scale_h, scale_w, stride_rn, stride_rc, stride_rh, stride_rw,
                             B: tl.constexpr, RESIZED: tl.constexpr, WRITE_DY: tl.constexpr,
                             WRITE_SUMS: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """`_combine_kernel`'s gradients on pixel run s of image n, from the output gradient g.

    With du = g * (a1 where line 1 wins, a2 where line 2 wins; half each on ties): d y_b = du * scale_b
    (WRITE_DY) and the run's sums per channel (WRITE_SUMS) of du * y_b (d scale_b), du (d shift),
    g * u and g on line 1 (d a1, d b1) and on line 2 (d a2, d b2), stored as `_store_sums` says.
    Grid (S, cdiv(C, BLOCK_C), N). Branches and d y_b: (N, C, HW) with one set of strides, g through its own;
    with RESIZED the last branch is read as `_combine_kernel` reads it and its d y_b, at the output's size,
    is the gradient of its resized map.
    """
    s = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2)
    s0, s1, s2, shift, a1, b1, a2, b2 = _coefficients(scale_ptr, shift_ptr, coef_ptr, n, c, C, B)
    sums = zero_sums(BLOCK_C, ACC)
    start = s * RUN
    end = tl.minimum(start + RUN, HW)
    resize = (W_OUT, H_IN, W_IN, axis_scale(H_IN, HW // W_OUT, scale_h, ACC), axis_scale(W_IN, W_OUT, scale_w, ACC),
              stride_rn, stride_rc, stride_rh, stride_rw)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        offs, mask = _tile(n, c, p, C, end, stride_n, stride_c, stride_p, ALIGN)
        g_offs, _ = _tile(n, c, p, C, end, stride_gn, stride_gc, stride_gp, ALIGN)
        g = tl.load(g_ptr + g_offs, mask=mask, other=0.0).to(ACC)
        u, y0, y1, y2 = _mix(y0_ptr, y1_ptr, y2_ptr, offs, mask, n, c, p, resize, s0, s1, s2, shift, B, RESIZED,
                             ACC)
        du, sums = combine_tile_backward(g, u, y0, y1, y2, sums, a1, b1, a2, b2, B, WRITE_SUMS)
        if WRITE_DY:
            tl.store(dy0_ptr + offs, (du * s0[:, None]).to(dy0_ptr.dtype.element_ty), mask=mask)
            if B > 1:
                tl.store(dy1_ptr + offs, (du * s1[:, None]).to(dy1_ptr.dtype.element_ty), mask=mask)
            if B > 2:
                tl.store(dy2_ptr + offs, (du * s2[:, None]).to(dy2_ptr.dtype.element_ty), mask=mask)
    if WRITE_SUMS:
        _store_sums(part_ptr, n, s, c, C, sums, B)


# ---------------------------------------------------------------------------------------------------------------
# Launch wrappers: shapes and dtypes are checked by the public functions.


def _flat_strides(t: Tensor):
    """(stride_n, stride_c, stride_p) that put element (n, c, h, w) of t at n*stride_n + c*stride_c +
    (h*W + w)*stride_p, or None where H and W do not merge into one pixel index (a crop, say)."""
    _, _, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if h == 1 or sh == w * sw:
        return sn, sc, sw
    if w == 1:
        return sn, sc, sh
    return None


def _flat(t: Tensor):
    """t, copied to contiguous only where its pixels do not merge, and its `_flat_strides`."""
    strides = _flat_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = _flat_strides(t)
    return t, strides


def _memory_format(t: Tensor):
    """The memory format of what the ops write for a tensor like t: channels-last if t is, else NCHW."""
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _align(hw, *strides):
    """The largest power of two up to 16 that divides H*W and the image and channel strides (see `_aligned`)."""
    g = math.gcd(hw, *strides)
    return min(g & -g, 16) if g else 16


def _pixel_runs(n, c, hw, device):
    """(RUN, S): the H*W pixels as S runs of RUN (a multiple of RUN_ALIGN), for the reductions' grids."""
    sms = 1 if INTERPRET else sm_count(device)
    splits = max(1, PROGRAMS_PER_SM * sms // (n * cdiv(c, 64)))
    run = cdiv(cdiv(hw, splits), RUN_ALIGN) * RUN_ALIGN
    return run, cdiv(hw, run)


def moments_forward(x: Tensor) -> Tensor:
    """x (N, C, H, W), any strides, H*W > 0 -> (N, C, 2) contiguous [mean, M2] in float32 (float64)."""
    n, c, h, w = x.shape
    out = x.new_empty((n, c, 2), dtype=acc_dtype(x))
    if out.numel() == 0:
        return out
    x, strides = _flat(x)
    hw = h * w
    run, splits = _pixel_runs(n, c, hw, x.device)
    part = out if splits == 1 else x.new_empty((n, splits, c, 2), dtype=out.dtype)
    grid = lambda meta: (splits, cdiv(c, meta["BLOCK_C"]), n)
    _moments_kernel[grid](x, part, c, hw, next_power_of_2(hw), run, *strides,
                          ALIGN=_align(hw, *strides[:2]), ACC=acc_tl(x))
    if splits > 1:
        _moments_merge_kernel[(cdiv(c, MERGE_BLOCK_C), n)](x, part, out, c, hw, run, splits, *strides[:2],
                                                           BLOCK_C=MERGE_BLOCK_C)
    return out


def moments_backward(grad: Tensor, x: Tensor, moments: Tensor) -> Tensor:
    """d x (shape and dtype of x; channels-last if x is) from grad (N, C, 2) of `moments_forward(x)`."""
    dx = torch.empty_like(x, memory_format=_memory_format(x))
    if dx.numel() == 0:
        return dx
    x, strides = _flat(x)
    d_strides = _flat_strides(dx)
    n, c, h, w = x.shape
    hw = h * w
    grid = lambda meta: (cdiv(hw, meta["BLOCK_P"]), cdiv(c, meta["BLOCK_C"]), n)
    _moments_backward_kernel[grid](x, moments, grad, dx, c, hw, next_power_of_2(hw), *strides, *d_strides,
                                   *grad.stride(), ALIGN=_align(hw, *strides[:2], *d_strides[:2]), ACC=acc_tl(x))
    return dx


def _like_output(branches: Sequence[Tensor]):
    """The branches in the memory format of the output (a copy only of those not in it), and its strides."""
    fmt = _memory_format(branches[0])
    ys = [b.contiguous(memory_format=fmt) for b in branches]
    return ys, _flat_strides(ys[0])


def _three(ts):
    """Three tensors for the kernels' three branch pointers; past len(ts) the first, which the kernels then
    never touch."""
    return [*ts, *[ts[0]] * (3 - len(ts))]


def resized(branches: Sequence[Tensor]) -> bool:
    """Whether the last of the branches has another size than the first: the kernels resize it."""
    return len(branches) > 1 and branches[-1].shape[-2:] != branches[0].shape[-2:]


def _resize_args(ys: Sequence[Tensor]):
    """The kernels' (W_OUT, H_IN, W_IN, scale_h, scale_w, and the 4 strides) for reading the last branch
    resized to the first's size (values the kernels ignore when it is not resized)."""
    _, _, h, w = ys[0].shape
    h_in, w_in = ys[-1].shape[-2:]
    return (w, h_in, w_in, float32_scale(h_in, h), float32_scale(w_in, w), *ys[-1].stride())


def combine_forward(branches: Sequence[Tensor], scale: Tensor, shift: Tensor, coef: Tensor) -> Tensor:
    """The level combine: 1 to 3 branches (N, C, H, W) of one dtype (the last may have another H, W: it is
    resized), scale (N, B, C), shift (N, C), coef (N, 4, C) in float32 (float64) -> (N, C, H, W) in the
    branches' dtype (channels-last if branches[0] is)."""
    ys, strides = _like_output(branches)
    out = torch.empty_like(ys[0])
    if out.numel() == 0:
        return out
    n, c, h, w = out.shape
    hw = h * w
    grid = lambda meta: (cdiv(hw, meta["BLOCK_P"]), cdiv(c, meta["BLOCK_C"]), n)
    _combine_kernel[grid](*_three(ys), scale.contiguous(), shift.contiguous(), coef.contiguous(), out,
                          c, hw, next_power_of_2(hw), *strides, *_resize_args(ys), B=len(ys),
                          RESIZED=resized(ys), ALIGN=_align(hw, *strides[:2]), ACC=acc_tl(out))
    return out


def combine_backward(grad: Tensor, branches: Sequence[Tensor], scale: Tensor, shift: Tensor, coef: Tensor,
                     need_branches: bool, need_params: bool) -> tuple[list[Tensor], Tensor]:
    """Gradients of `combine_forward` from grad (N, C, H, W), any strides.

    Returns (d branches: B tensors like the output, a resized last branch's at its own size and contiguous,
    or [] unless need_branches; d params: (N, B + 5, C) in float32 (float64), rows d scale_0..B-1, d shift,
    d a1, d b1, d a2, d b2, or an empty (0,) tensor unless need_params).
    """
    ys, strides = _like_output(branches)
    n, c, h, w = ys[0].shape
    hw, nb = h * w, len(ys)
    # A resized branch's gradient is first its resized map's, at the output's size.
    d_ys = [torch.empty_like(ys[0]) for _ in ys] if need_branches else []
    d_params = scale.new_empty((n, nb + 5, c) if need_params else (0,))
    if not (need_branches or need_params) or n * c == 0:
        return _resized_gradient(d_ys, ys), d_params
    if hw == 0:
        return _resized_gradient([d.zero_() for d in d_ys], ys), d_params.zero_()
    grad, g_strides = _flat(grad)
    run, splits = _pixel_runs(n, c, hw, grad.device)
    part = d_params if splits == 1 or not need_params else scale.new_empty((n, splits, nb + 5, c))
    grid = lambda meta: (splits, cdiv(c, meta["BLOCK_C"]), n)
    _combine_backward_kernel[grid](
        grad, *_three(ys), scale.contiguous(), shift.contiguous(), coef.contiguous(), *_three(d_ys or ys), part,
        c, hw, next_power_of_2(hw), run, *strides, *g_strides, *_resize_args(ys), B=nb,
        RESIZED=resized(ys), WRITE_DY=need_branches, WRITE_SUMS=need_params,
        ALIGN=_align(hw, *strides[:2], *g_strides[:2]), ACC=acc_tl(d_params))
    if part is not d_params:
        torch.sum(part, dim=1, out=d_params)
    return _resized_gradient(d_ys, ys), d_params


def _resized_gradient(d_ys: list[Tensor], ys: Sequence[Tensor]) -> list[Tensor]:
    """d_ys with a resized last branch's gradient taken from its resized map's to its own size."""
    if d_ys and resized(ys):
        d_ys[-1] = upsample_backward(d_ys[-1], tuple(ys[-1].shape[-2:]))
    return d_ys


# ---------------------------------------------------------------------------------------------------------------
# Input checks, custom ops, autograd and the public functions.


def _check_runnable(t: Tensor, op: str):
    check_runnable(t, f"kernels.level_pass.{op}",
                   "the reference path (GroupNorm, dyhead.ScaleAttention and dyhead.TaskAttention)")


def _check_float_tensor(name: str, t):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def _check_moments_input(x):
    _check_float_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"x must have H*W > 0 pixels to take moments over, got shape {tuple(x.shape)}")


def _check_combine_inputs(branches, scale, shift, coef):
    if not isinstance(branches, (list, tuple)):
        raise TypeError(f"branches must be a list or tuple of 1 to 3 tensors (N, C, H, W), "
                        f"got {type(branches).__name__}")
    if not 1 <= len(branches) <= 3:
        raise ValueError(f"branches must hold 1 to 3 tensors (N, C, H, W), got {len(branches)}")
    for i, b in enumerate(branches):
        _check_float_tensor(f"branches[{i}]", b)
    first = branches[0]
    if first.dim() != 4:
        raise ValueError(f"branches[0] must be (N, C, H, W), got shape {tuple(first.shape)}")
    last = len(branches) - 1
    for i, b in enumerate(branches[1:], 1):
        if i == last and b.dim() == 4 and b.shape[:2] == first.shape[:2] and b.shape[2] * b.shape[3] > 0:
            pass  # the last branch may have another size: it is resized
        elif b.shape != first.shape:
            expected = (f"(N, C, H', W') = {tuple(first.shape[:2])} + (H', W') with H'*W' > 0 (the last branch is "
                        "resized to branches[0]'s size)" if i == last else f"{tuple(first.shape)} like branches[0]")
            raise ValueError(f"branches[{i}] must be {expected}, got shape {tuple(b.shape)}")
        if b.dtype != first.dtype:
            raise TypeError(f"branches[{i}] has dtype {b.dtype} but branches[0] has {first.dtype}: the branches "
                            "need one dtype")
        if b.device != first.device:
            raise ValueError(f"branches[{i}] is on {b.device} but branches[0] is on {first.device}")
    n, c = first.shape[:2]
    acc = acc_dtype(first)
    for name, t, shape, symbols in (("scale", scale, (n, len(branches), c), "(N, B, C)"),
                                    ("shift", shift, (n, c), "(N, C)"), ("coef", coef, (n, 4, c), "(N, 4, C)")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor {symbols} = {shape}, got {type(t).__name__}")
        if t.dtype != acc:
            raise TypeError(f"{name} must be {acc} for {first.dtype} branches, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {symbols} = {shape}, got shape {tuple(t.shape)}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but the branches are on {first.device}")


def _autocast_combine(branches, scale, shift, coef):
    """Under autocast: branches of different floating dtypes promoted to the widest, the per-channel
    quantities to the branches' math dtype (they may come out of autocast matmuls in half precision)."""
    dtypes = [b.dtype for b in branches if isinstance(b, Tensor) and b.dtype in _FLOAT_DTYPES]
    if len(dtypes) != len(branches):
        return branches, scale, shift, coef
    dtype = functools.reduce(torch.promote_types, dtypes)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    params = [t.to(acc) if isinstance(t, Tensor) and t.dtype in _FLOAT_DTYPES else t for t in (scale, shift, coef)]
    return [b.to(dtype) for b in branches], *params


def _moments_impl(x: Tensor) -> Tensor:
    _check_runnable(x, "channel_moments")
    with _device_guard(x):
        return moments_forward(x)


_moments_op = torch.library.custom_op("dyhead_triton::channel_moments", mutates_args=())(_moments_impl)


@_moments_op.register_fake
def _moments_fake(x):
    return x.new_empty((x.shape[0], x.shape[1], 2), dtype=acc_dtype(x))


def _moments_backward_impl(grad: Tensor, x: Tensor, moments: Tensor) -> Tensor:
    _check_runnable(x, "channel_moments")
    with _device_guard(x):
        return moments_backward(grad, x, moments)


_moments_backward_op = torch.library.custom_op("dyhead_triton::channel_moments_backward",
                                               mutates_args=())(_moments_backward_impl)


@_moments_backward_op.register_fake
def _moments_backward_fake(grad, x, moments):
    return torch.empty_like(x, memory_format=_memory_format(x))


def _moments_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output)


def _moments_backward(ctx, grad):
    return _moments_backward_op(grad, *ctx.saved_tensors)


_moments_op.register_autograd(_moments_backward, setup_context=_moments_setup_context)


class _EagerMoments(torch.autograd.Function):
    """`dyhead_triton::channel_moments` without the custom op's dispatch."""

    @staticmethod
    def forward(ctx, x):
        output = _moments_impl(x)
        _moments_setup_context(ctx, (x,), output)
        return output

    @staticmethod
    @first_order_backward
    def backward(ctx, grad):
        return _moments_backward_impl(grad, *ctx.saved_tensors)


def channel_moments(x: Tensor) -> Tensor:
    """Per-(image, channel) mean and M2 over the pixels: the statistics of GroupNorm and of average pooling.

    out[n, c, 0] = mean over (h, w) of x[n, c], out[n, c, 1] = M2 = sum over (h, w) of (x[n, c] - mean)^2
    (so the biased variance is M2 / (H*W)). Robust to a large mean: values are taken about the map's first
    pixel, and each program's pixel run gets an exact per-tile mean and M2, merged with Chan's formula in a
    fixed order (deterministic, no atomics).
    Differentiable: d x = d mean / (H*W) + 2 * d M2 * (x - mean), one elementwise kernel.

    Args:
        x: (N, C, H, W), H*W > 0, float32/float16/bfloat16/float64, any strides (read in place unless H and W
            do not merge into one pixel index, e.g. a crop, which is copied). Under autocast: used as it is.
            CUDA, or CPU under ``TRITON_INTERPRET=1``.

    Returns:
        (N, C, 2) contiguous, float32 (float64 for float64 x).

    Raises:
        TypeError / ValueError: not a floating tensor, not 4-d, no pixels.
        RuntimeError: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    _check_moments_input(x)
    if eager_call(x):
        return _EagerMoments.apply(x)
    return _moments_op(x)


def _combine_impl(branches: list[Tensor], scale: Tensor, shift: Tensor, coef: Tensor) -> Tensor:
    _check_runnable(branches[0], "level_combine")
    with _device_guard(branches[0]):
        return combine_forward(branches, scale, shift, coef)


_combine_op = torch.library.custom_op("dyhead_triton::level_combine", mutates_args=())(_combine_impl)


@_combine_op.register_fake
def _combine_fake(branches, scale, shift, coef):
    return torch.empty_like(branches[0], memory_format=_memory_format(branches[0]))


def _combine_backward_impl(grad: Tensor, branches: list[Tensor], scale: Tensor, shift: Tensor, coef: Tensor,
                           need_branches: bool, need_params: bool) -> tuple[list[Tensor], Tensor]:
    _check_runnable(grad, "level_combine")
    with _device_guard(grad):
        return combine_backward(grad, branches, scale, shift, coef, need_branches, need_params)


_combine_backward_op = torch.library.custom_op("dyhead_triton::level_combine_backward",
                                               mutates_args=())(_combine_backward_impl)


@_combine_backward_op.register_fake
def _combine_backward_fake(grad, branches, scale, shift, coef, need_branches, need_params):
    fmt = _memory_format(branches[0])
    d_branches = [torch.empty_like(b, memory_format=fmt) for b in branches] if need_branches else []
    if d_branches and resized(branches):
        d_branches[-1] = torch.empty_like(branches[-1], memory_format=torch.contiguous_format)
    n, c = branches[0].shape[:2]
    return d_branches, scale.new_empty((n, len(branches) + 5, c) if need_params else (0,))


def _combine_setup_context(ctx, inputs, output):
    branches, scale, shift, coef = inputs
    ctx.save_for_backward(*branches, scale, shift, coef)


def _combine_gradients(backward, ctx, grad, need_branches, need_scale, need_shift, need_coef):
    """([d branch_b or None], d scale, d shift, d coef; None where not needed); backward is the custom
    backward op or its implementation."""
    *branches, scale, shift, coef = ctx.saved_tensors
    nb = len(branches)
    d_branches, d_params = backward(grad, branches, scale, shift, coef, any(need_branches),
                                    need_scale or need_shift or need_coef)
    d_branches = [d if need else None for d, need in zip(d_branches, need_branches)] or [None] * nb
    return (d_branches, d_params[:, :nb] if need_scale else None, d_params[:, nb] if need_shift else None,
            d_params[:, nb + 1:] if need_coef else None)


def _combine_backward(ctx, grad):
    need_branches, *need_params = ctx.needs_input_grad
    return _combine_gradients(_combine_backward_op, ctx, grad, need_branches, *need_params)


_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup_context)


class _EagerCombine(torch.autograd.Function):
    """`dyhead_triton::level_combine` without the custom op's dispatch; arguments (scale, shift, coef,
    *branches), as apply takes tensors only."""

    @staticmethod
    def forward(ctx, scale, shift, coef, *branches):
        output = _combine_impl(list(branches), scale, shift, coef)
        _combine_setup_context(ctx, (branches, scale, shift, coef), output)
        return output

    @staticmethod
    @first_order_backward
    def backward(ctx, grad):
        need_scale, need_shift, need_coef, *need_branches = ctx.needs_input_grad
        d_branches, *d_params = _combine_gradients(_combine_backward_impl, ctx, grad, need_branches, need_scale,
                                                   need_shift, need_coef)
        return (*d_params, *d_branches)


def level_combine(branches: Sequence[Tensor], scale: Tensor, shift: Tensor, coef: Tensor) -> Tensor:
    """The elementwise end of a DyHead level: a per-channel affine mix of the branches and the dynamic ReLU.

    out = max(a1 * u + b1, a2 * u + b2) with u = sum_b scale[:, b] * branches[b] + shift and
    (a1, b1, a2, b2) = coef[:, 0..3], every coefficient broadcast per (image, channel); the math is fp32 (fp64
    for float64 branches). Differentiable in the branches, scale, shift and coef; the backward is one fused
    pass over the pixels (recomputing u) whose per-channel sums are per-program partials summed in a fixed
    order (deterministic, no atomics). On ties of the two lines the gradient is split half/half, as
    ``torch.maximum``'s.

    A last branch (of B >= 2) of another size than branches[0] is resized to it inside the kernels, bilinearly
    with ``align_corners=True``: ``F.interpolate(branches[-1], branches[0].shape[-2:], mode="bilinear",
    align_corners=True)`` in torch's arithmetic, without the resized map in memory; its gradient goes through
    the gather of `kernels.upsample_bilinear` (deterministic). DyHead's coarser branch is read so.

    Args:
        branches: list or tuple of B = 1 to 3 tensors (N, C, H, W) of one shape (but for a resized last one),
            dtype (float32/float16/bfloat16/float64) and device (CUDA, or CPU under ``TRITON_INTERPRET=1``).
            NCHW or channels-last (as branches[0]) are read in place, other layouts copied.
        scale: (N, B, C), shift: (N, C), coef: (N, 4, C): float32 (float64 with float64 branches).

    Under autocast the branches are used as they come (promoted to the widest dtype if they differ) and
    scale, shift and coef are cast to float32 (float64 for float64 branches).

    Returns:
        (N, C, H, W) in the branches' dtype, channels-last if branches[0] is.

    Raises:
        TypeError / ValueError: non-tensors, non-floating or mixed dtypes, B not in 1..3, mismatched shapes or
            devices (the message names the argument and the expected shape).
        RuntimeError: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    if (isinstance(branches, (list, tuple)) and branches and isinstance(branches[0], Tensor)
            and torch.is_autocast_enabled(branches[0].device.type)):
        branches, scale, shift, coef = _autocast_combine(branches, scale, shift, coef)
    _check_combine_inputs(branches, scale, shift, coef)
    if eager_call(*branches, scale, shift, coef):
        return _EagerCombine.apply(scale, shift, coef, *branches)
    return _combine_op(list(branches), scale, shift, coef)
