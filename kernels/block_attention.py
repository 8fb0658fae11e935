"""A DyHead block's attention math, from its branches' moments to the combine's coefficients, in one launch each way.

Between the grouped moments and the grouped combine, a block's math is small: per (level, image) and per
branch slot, GroupNorm as ``y * a + d`` from the group statistics, the scale attention's pooled logit and hard
sigmoid, the mix weights and shift, and the task attention's two-layer MLP on the pooled mean to the dynamic
ReLU's four coefficients. On (L, N, C) tensors that is some forty small torch ops forward and seventy backward
(`dyhead.fused.block_forward`'s reference path, which runs under tracing): each a launch from the host. Here a
program owns one (level, image) row and does all of it; backward, one program per row recomputes the row and
writes the moments' gradient and per-row parameter partials, which one sum (and two products for the MLP's
weights) reduces in a fixed order.

Per row the C-long vectors are tiles [slot (4, the 3 branch slots padded), group, channel in group], so that
GroupNorm's group sums are sums over the last axis. The MLP's mat-vecs run in chunks through a per-row scratch
in global memory (the pooled mean, the hidden layer, their gradients), read back after a barrier: a mat-vec
needs its whole input vector, which a program's registers hold in the tile layout only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .deform_conv import acc_tl
from .deform_conv_op import _device_guard, eager_call
from .device_table import cached_device_table
from .runtime import check_runnable, first_order_backward, next_power_of_2

# Table columns per level: its branch count B, then per slot b < 3: the slot's pixel count and the index of its
# GroupNorm in the stacked parameters (-1: no branch in the slot).
WIDTH = tl.constexpr(7)
SLOTS = tl.constexpr(4)  # the 3 slots, padded to a power of two
WARPS = 8  # a row's tiles are [SLOTS, BLOCK_G, BLOCK_CG]: 1024 elements at C = 256, 16 groups


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    """Correctly rounded square root (Triton's fp32 `sqrt` is an approximation; `sqrt_rn` takes fp32 only)."""
    if ACC == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _row_slots(table_ptr, l, b, valid_b):
    """(branches of level l, per-slot pixel count and GroupNorm index, [SLOTS]) from the level table."""
    row = table_ptr + l * WIDTH
    branches = tl.load(row)
    count = tl.load(row + 1 + 2 * b, mask=valid_b, other=1)
    norm = tl.load(row + 2 + 2 * b, mask=valid_b, other=-1)
    return branches, count, norm


@triton.jit
def _hard_sigmoid(t):
    """relu6(t + 3) / 6 (`dyhead.activations.hard_sigmoid`), NaN in NaN out as in torch."""
    return tl.minimum(tl.maximum(t + 3.0, 0.0, propagate_nan=tl.PropagateNan.ALL), 6.0,
                      propagate_nan=tl.PropagateNan.ALL) / 6.0


@triton.jit
def _row_forward(mom_ptr, nw_ptr, nb_ptr, sw_ptr, sb_ptr, table_ptr, l, n, N, C, CG, eps,
                 ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr):
    """Row (level l, image n) up to the mix: the tiles and scalars both kernels need.

    Returns (c, valid, in_c, b, count, norm, inv, pm, mu, rstd, dev, gw, a, d, sw, z, r, att, weight,
    shift): c [1, BLOCK_G, BLOCK_CG] the channel index and in_c its mask, valid the mask of [SLOTS, BLOCK_G,
    BLOCK_CG] (the 3 slots); b the slots; per slot count/norm [SLOTS]; the pooled mean
    pm of the raw branch, its group mean mu and inverse std rstd [SLOTS, BLOCK_G], dev = channel mean - mu, GroupNorm
    weight gw, a and d (GroupNorm = y * a + d), the scale conv weight sw [1, BLOCK_G, BLOCK_CG], the attention
    logit z, r = relu(z), att = hard_sigmoid(r) [SLOTS], weight = att * a / B and shift [1, BLOCK_G, BLOCK_CG].
    """
    b = tl.arange(0, SLOTS)
    g = tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_CG)
    valid_b = b < 3
    branches, count, norm = _row_slots(table_ptr, l, b, valid_b)
    c = g[None, :, None] * CG + j[None, None, :]
    in_c = (j[None, None, :] < CG) & (c < C)
    valid = valid_b[:, None, None] & in_c
    slot = (3 * l + b).to(tl.int64)
    mom = mom_ptr + ((slot[:, None, None] * N + n) * C + c) * 3
    mean = tl.load(mom, mask=valid, other=0.0).to(ACC)
    m2 = tl.load(mom + 1, mask=valid, other=0.0).to(ACC)
    pm = tl.load(mom + 2, mask=valid, other=0.0).to(ACC)
    has_norm = valid & (norm >= 0)[:, None, None]
    gw = tl.load(nw_ptr + norm[:, None, None] * C + c, mask=has_norm, other=0.0).to(ACC)
    gb = tl.load(nb_ptr + norm[:, None, None] * C + c, mask=has_norm, other=0.0).to(ACC)
    sw = tl.load(sw_ptr + c, mask=in_c, other=0.0).to(ACC)
    countf = count.to(ACC)
    # GroupNorm of the branch: every channel counts the same pixels, so the group's moments are Chan's merge
    # of its channels'.
    mu = tl.sum(mean, axis=2) / CG
    dev = tl.where(valid, mean - mu[:, :, None], 0.0)
    m2_group = tl.sum(m2, axis=2) + countf[:, None] * tl.sum(dev * dev, axis=2)
    rstd = 1.0 / _sqrt(m2_group / (countf[:, None] * CG) + eps, ACC)
    a = rstd[:, :, None] * gw
    d = gb - mu[:, :, None] * a
    # Scale attention: the pooled mean of the normalised branch, a 1x1 conv to one logit, relu, hard sigmoid.
    # NaN passes through relu and the hard sigmoid, as through torch's: a diverged branch must reach the loss.
    z = tl.sum(tl.sum(sw * (a * pm + d), axis=2), axis=1) + tl.load(sb_ptr).to(ACC)
    r = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    att = _hard_sigmoid(r)
    inv = 1.0 / branches.to(ACC)
    att_b = tl.where(valid_b, att, 0.0)[:, None, None]
    weight = att_b * a * inv
    shift = tl.sum(att_b * d, axis=0)[None, :, :] * inv
    return c, valid, in_c, b, count, norm, inv, pm, mu, rstd, dev, gw, a, d, sw, z, r, att, weight, shift


@triton.jit
def _matvec_chunk(w_ptr, x_ptr, o, valid_o, K, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum over k < K of w[o, k] * x[k] ([BLOCK_O], ACC) for w (rows, K) contiguous and x (K,)."""
    total = tl.zeros(o.shape, dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        valid_k = k < K
        x = tl.load(x_ptr + k, mask=valid_k, other=0.0).to(ACC)
        w = tl.load(w_ptr + o[:, None].to(tl.int64) * K + k[None, :], mask=valid_o[:, None] & valid_k[None, :],
                    other=0.0).to(ACC)
        total += tl.sum(w * x[None, :], axis=1)
    return total


@triton.jit
def _matvec_t_chunk(w_ptr, x_ptr, k, valid_k, O, K, ACC: tl.constexpr, BLOCK_O: tl.constexpr):
    """sum over o < O of w[o, k] * x[o] ([BLOCK_K], ACC) for w (O, K) contiguous and x (O,): w^T x."""
    total = tl.zeros(k.shape, dtype=ACC)
    for o0 in range(0, O, BLOCK_O):
        o = o0 + tl.arange(0, BLOCK_O)
        valid_o = o < O
        x = tl.load(x_ptr + o, mask=valid_o, other=0.0).to(ACC)
        w = tl.load(w_ptr + o[:, None].to(tl.int64) * K + k[None, :], mask=valid_o[:, None] & valid_k[None, :],
                    other=0.0).to(ACC)
        total += tl.sum(w * x[:, None], axis=0)
    return total


@triton.jit
def _attention_fwd_kernel(mom_ptr, table_ptr, nw_ptr, nb_ptr, sw_ptr, sb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                          weight_ptr, shift_ptr, coef_ptr, pu_ptr, h_ptr, N, C, CG, HIDDEN, eps,
                          HAS_TASK: tl.constexpr, ACC: tl.constexpr, BLOCK_G: tl.constexpr,
                          BLOCK_CG: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row (l, n) = program: weight (L, N, 3, C), shift (L, N, C), coef (L, N, 4, C); with HAS_TASK also the
    pooled mean of the mix pu (L*N, C) and the MLP's hidden layer h (L*N, HIDDEN), which the backward reads.

    Grid (L * N,). moments (3L, N, C, 3) [mean, M2, pooled mean] of each slot's raw branch; nw, nb (K, C)
    GroupNorm weights and biases; sw (C,), sb (1,) the scale conv; w1 (HIDDEN, C), b1, w2 (4C, HIDDEN), b2 the
    task MLP; table (L, WIDTH) int64.
    """
    row = tl.program_id(0)
    l = row // N
    n = row % N
    (c, valid, in_c, b, _, _, _, pm, _, _, _, _, _, _, _, _, _, _, weight,
     shift) = _row_forward(mom_ptr, nw_ptr, nb_ptr, sw_ptr, sb_ptr, table_ptr, l, n, N, C, CG, eps, ACC,
                           BLOCK_G, BLOCK_CG)
    row64 = row.to(tl.int64)
    tl.store(weight_ptr + (row64 * 3 + b[:, None, None]) * C + c, weight, mask=valid)
    tl.store(shift_ptr + row64 * C + c, shift, mask=in_c)
    coef_row = coef_ptr + row64 * 4 * C
    if HAS_TASK:
        pu = tl.sum(weight * pm, axis=0)[None, :, :] + shift
        tl.store(pu_ptr + row64 * C + c, pu, mask=in_c)
        tl.debug_barrier()
        for m0 in range(0, HIDDEN, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)
            valid_m = m < HIDDEN
            z1 = _matvec_chunk(w1_ptr, pu_ptr + row64 * C, m, valid_m, C, ACC, BLOCK_M)
            z1 += tl.load(b1_ptr + m, mask=valid_m, other=0.0).to(ACC)
            tl.store(h_ptr + row64 * HIDDEN + m, tl.maximum(z1, 0.0, propagate_nan=tl.PropagateNan.ALL),
                     mask=valid_m)
        tl.debug_barrier()
        for o0 in range(0, 4 * C, BLOCK_M):
            o = o0 + tl.arange(0, BLOCK_M)
            valid_o = o < 4 * C
            z2 = _matvec_chunk(w2_ptr, h_ptr + row64 * HIDDEN, o, valid_o, HIDDEN, ACC, BLOCK_M)
            z2 += tl.load(b2_ptr + o, mask=valid_o, other=0.0).to(ACC)
            y = _hard_sigmoid(z2)
            # (a1, b1, a2, b2) = ((y1 - 0.5) * 2 + 1, y2 - 0.5, (y3 - 0.5) * 2, y4 - 0.5), the C-chunks of y.
            q = o // C
            centred = y - 0.5
            value = tl.where(q % 2 == 0, centred * 2.0, centred) + tl.where(q == 0, 1.0, 0.0)
            tl.store(coef_row + o, value, mask=valid_o)
    else:
        for o0 in range(0, 4 * C, BLOCK_M):
            o = o0 + tl.arange(0, BLOCK_M)
            q = o // C
            tl.store(coef_row + o, tl.where(q % 2 == 0, 1.0, 0.0).to(ACC), mask=o < 4 * C)


@triton.jit
def _attention_bwd_kernel(mom_ptr, table_ptr, nw_ptr, nb_ptr, sw_ptr, sb_ptr, w1_ptr, w2_ptr, b2_ptr, pu_ptr,
                          h_ptr, dweight_ptr, dshift_ptr, dcoef_ptr, dweight_rows, dshift_rows, dcoef_rows,
                          dmom_ptr, part_ptr, dpu_ptr, N, C, CG, HIDDEN, PART, eps,
                          NUM_NORMS: tl.constexpr, HAS_TASK: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row (l, n) = program: the moments' gradient d moments (3L, N, C, 3), and the row's parameter partials
    (`partial_layout`: d GroupNorm weights and biases (NUM_NORMS, C) each, d scale conv weight (C) and bias (1),
    d fc2 and fc1 pre-activations (4C, HIDDEN)) at part + row * PART; dpu (L*N, C) is scratch.

    Grid (L * N,). d weight (L, N, 3, C), d shift (L, N, C), d coef (L, N, 4, C): channels contiguous, slots C
    apart, rows (l, n) the given strides apart; the other arguments as the forward's.
    """
    row = tl.program_id(0)
    l = row // N
    n = row % N
    (c, valid, in_c, b, count, norm, inv, pm, mu, rstd, dev, gw, a, d, sw, z, r, att, weight,
     _) = _row_forward(mom_ptr, nw_ptr, nb_ptr, sw_ptr, sb_ptr, table_ptr, l, n, N, C, CG, eps, ACC, BLOCK_G,
                       BLOCK_CG)
    row64 = row.to(tl.int64)
    part = part_ptr + row64 * PART
    dz2_row = part + 2 * NUM_NORMS * C + C + 1
    dz1_row = dz2_row + 4 * C
    dpu = tl.zeros((1, BLOCK_G, BLOCK_CG), dtype=ACC)
    if HAS_TASK:
        h_row = h_ptr + row64 * HIDDEN
        for o0 in range(0, 4 * C, BLOCK_M):
            o = o0 + tl.arange(0, BLOCK_M)
            valid_o = o < 4 * C
            z2 = _matvec_chunk(w2_ptr, h_row, o, valid_o, HIDDEN, ACC, BLOCK_M)
            z2 += tl.load(b2_ptr + o, mask=valid_o, other=0.0).to(ACC)
            dy = tl.load(dcoef_ptr + row64 * dcoef_rows + o, mask=valid_o, other=0.0).to(ACC)
            dy = tl.where((o // C) % 2 == 0, dy * 2.0, dy)
            # hard_sigmoid = relu6(t + 3) / 6: relu6's gradient is 1 strictly inside (0, 6), as torch's.
            dz2 = tl.where((z2 + 3.0 > 0.0) & (z2 + 3.0 < 6.0), dy / 6.0, 0.0)
            tl.store(dz2_row + o, dz2, mask=valid_o)
        tl.debug_barrier()
        for m0 in range(0, HIDDEN, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)
            valid_m = m < HIDDEN
            dh = _matvec_t_chunk(w2_ptr, dz2_row, m, valid_m, 4 * C, HIDDEN, ACC, BLOCK_M)
            h = tl.load(h_row + m, mask=valid_m, other=0.0)
            tl.store(dz1_row + m, tl.where(h > 0.0, dh, 0.0), mask=valid_m)
        tl.debug_barrier()
        for k0 in range(0, C, BLOCK_M):
            k = k0 + tl.arange(0, BLOCK_M)
            valid_k = k < C
            tl.store(dpu_ptr + row64 * C + k, _matvec_t_chunk(w1_ptr, dz1_row, k, valid_k, HIDDEN, C, ACC, BLOCK_M),
                     mask=valid_k)
        tl.debug_barrier()
        dpu = tl.load(dpu_ptr + row64 * C + c, mask=in_c, other=0.0)
    d_weight = tl.load(dweight_ptr + row64 * dweight_rows + b[:, None, None] * C + c, mask=valid, other=0.0)
    d_shift = tl.load(dshift_ptr + row64 * dshift_rows + c, mask=in_c, other=0.0).to(ACC)
    # pu = sum_b weight_b * pm_b + shift
    d_weight = d_weight.to(ACC) + dpu * pm
    d_pm = dpu * weight
    d_shift += dpu
    # weight_b = att_b * a_b / B, shift = sum_b att_b * d_b / B
    att_b = tl.where(b < 3, att, 0.0)[:, None, None]
    d_att = tl.sum(tl.sum(d_weight * a + d_shift * d, axis=2), axis=1) * inv
    d_a = d_weight * att_b * inv
    d_d = d_shift * att_b * inv
    # att = relu6(relu(z) + 3) / 6, z = sum_c sw * (a * pm + d) + sb
    dz = tl.where((z > 0.0) & (r + 3.0 > 0.0) & (r + 3.0 < 6.0) & (b < 3), d_att / 6.0, 0.0)
    dz3 = dz[:, None, None]
    d_sw = tl.sum(dz3 * (a * pm + d), axis=0)
    d_pooled = dz3 * sw
    d_a += d_pooled * pm
    d_pm += d_pooled * a
    d_d += d_pooled
    # a = rstd * gw, d = gb - mu * a
    d_a -= mu[:, :, None] * d_d
    d_gw = d_a * rstd[:, :, None]
    d_rstd = tl.sum(d_a * gw, axis=2)
    d_mu = -tl.sum(d_d * a, axis=2)
    # rstd = (M2_group / (count * CG) + eps)^(-1/2), M2_group = sum m2 + count * sum dev^2
    countf = count.to(ACC)[:, None]
    d_m2 = -0.5 * rstd * rstd * rstd * d_rstd / (countf * CG)
    d_mu -= 2.0 * countf * d_m2 * tl.sum(dev, axis=2)
    d_mean = 2.0 * countf[:, :, None] * d_m2[:, :, None] * dev + d_mu[:, :, None] / CG
    slot = (3 * l + b).to(tl.int64)
    dmom = dmom_ptr + ((slot[:, None, None] * N + n) * C + c) * 3
    tl.store(dmom, d_mean, mask=valid)
    tl.store(dmom + 1, d_m2[:, :, None] + tl.zeros_like(d_mean), mask=valid)
    tl.store(dmom + 2, d_pm, mask=valid)
    # The row's parameter partials: channel vectors [BLOCK_G, BLOCK_CG].
    c2 = tl.arange(0, BLOCK_G)[:, None] * CG + tl.arange(0, BLOCK_CG)[None, :]
    in_c2 = (tl.arange(0, BLOCK_CG)[None, :] < CG) & (c2 < C)
    for k in tl.static_range(NUM_NORMS):
        mine = (norm == k)[:, None, None]
        tl.store(part + k * C + c2, tl.sum(tl.where(mine, d_gw, 0.0), axis=0), mask=in_c2)
        tl.store(part + (NUM_NORMS + k) * C + c2, tl.sum(tl.where(mine, d_d, 0.0), axis=0), mask=in_c2)
    tl.store(part + 2 * NUM_NORMS * C + c2, d_sw, mask=in_c2)
    tl.store(part + 2 * NUM_NORMS * C + C, tl.sum(dz, axis=0))


@dataclass(frozen=True)
class AttentionPlan:
    """The level table (`WIDTH` columns per level, on the device) and its sizes."""

    table: Tensor
    levels: int
    num_norms: int


def plan_attention(slot_pixels: Sequence[int], slot_norms: Sequence[int], num_norms: int,
                   device: torch.device) -> AttentionPlan:
    """The `AttentionPlan` of L levels of 3 slots each: slot_pixels, slot_norms (3L,) as `block_attention`
    takes them. Shapes only: the table is written once per content."""
    values = []
    for l in range(len(slot_norms) // 3):
        norms = slot_norms[3 * l:3 * l + 3]
        values.append(sum(k >= 0 for k in norms))
        for pixels, k in zip(slot_pixels[3 * l:3 * l + 3], norms):
            values += [pixels, k]
    return AttentionPlan(cached_device_table(values, device), len(slot_norms) // 3, num_norms)


def partial_layout(num_norms: int, c: int, hidden: int) -> list[int]:
    """Lengths of the backward's per-row parameter partials, in their order along a row: d GroupNorm weights,
    d GroupNorm biases (num_norms * C each), d scale conv weight (C), d scale conv bias (1), d fc2
    pre-activation (4C), d fc1 pre-activation (hidden)."""
    return [num_norms * c, num_norms * c, c, 1, 4 * c, hidden]


def _meta(c: int, groups: int) -> dict:
    cg = c // groups
    return dict(BLOCK_G=next_power_of_2(groups), BLOCK_CG=next_power_of_2(cg), BLOCK_M=64,
                num_warps=WARPS)


def _rows(t: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, int]:
    """(t, its stride between (level, image) rows) for a (L, N, [S,] C) tensor whose channels are contiguous,
    slots C apart and rows evenly spaced (a view of the combine's gradient buffer); else a contiguous copy."""
    t = t.expand(shape)
    levels, n = shape[:2]
    inner = (1,) if len(shape) == 3 else (shape[-1], 1)
    if t.stride()[2:] != inner or (levels > 1 and n > 1 and t.stride(0) != n * t.stride(1)):
        t = t.contiguous()
    # Row l * N + i sits that many row strides in. torch leaves the stride of a size-1 dim free (a contiguous
    # tensor may hold any there), so it is read off a dim of size > 1: images, or levels where N is 1.
    return t, t.stride(1) if n > 1 else t.stride(0)


class _BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, moments, norm_weight, norm_bias, scale_weight, scale_bias, w1, b1, w2, b2, plan, groups, eps):
        n, c = moments.shape[1:3]
        rows, has_task = plan.levels * n, w1 is not None
        hidden = w1.shape[0] if has_task else 0
        weight = moments.new_empty((plan.levels, n, 3, c))
        shift = moments.new_empty((plan.levels, n, c))
        coef = moments.new_empty((plan.levels, n, 4, c))
        pu = moments.new_empty((rows, c) if has_task else (0,))
        h = moments.new_empty((rows, hidden) if has_task else (0,))
        task = (w1, b1, w2, b2) if has_task else (moments,) * 4
        with _device_guard(moments):
            _attention_fwd_kernel[(rows,)](moments, plan.table, norm_weight, norm_bias, scale_weight, scale_bias,
                                           *task, weight, shift, coef, pu, h, n, c, c // groups, hidden, eps,
                                           HAS_TASK=has_task, ACC=acc_tl(moments), **_meta(c, groups))
        ctx.save_for_backward(moments, norm_weight, norm_bias, scale_weight, scale_bias, *task, pu, h)
        ctx.plan, ctx.groups, ctx.eps, ctx.has_task = plan, groups, eps, has_task
        return weight, shift, coef

    @staticmethod
    @first_order_backward
    def backward(ctx, d_weight, d_shift, d_coef):
        moments, norm_weight, norm_bias, scale_weight, scale_bias, w1, b1, w2, b2, pu, h = ctx.saved_tensors
        plan, has_task = ctx.plan, ctx.has_task
        n, c = moments.shape[1:3]
        rows, hidden = plan.levels * n, (w1.shape[0] if has_task else 0)
        zero = moments.new_zeros(())
        d_weight, weight_rows = _rows(zero if d_weight is None else d_weight, (plan.levels, n, 3, c))
        d_shift, shift_rows = _rows(zero if d_shift is None else d_shift, (plan.levels, n, c))
        d_coef, coef_rows = _rows(zero if d_coef is None else d_coef, (plan.levels, n, 4, c))
        lengths = partial_layout(plan.num_norms, c, hidden)
        part = moments.new_empty((rows, sum(lengths)))
        d_moments = torch.empty_like(moments)
        dpu = moments.new_empty((rows, c) if has_task else (0,))
        with _device_guard(moments):
            _attention_bwd_kernel[(rows,)](
                moments, plan.table, norm_weight, norm_bias, scale_weight, scale_bias, w1, w2, b2, pu, h,
                d_weight, d_shift, d_coef, weight_rows, shift_rows, coef_rows, d_moments, part, dpu, n, c,
                c // ctx.groups, hidden, sum(lengths), ctx.eps, NUM_NORMS=plan.num_norms, HAS_TASK=has_task,
                ACC=acc_tl(moments), **_meta(c, ctx.groups))
        # Every small parameter's gradient in one fixed-order sum over the rows.
        d_nw, d_nb, d_sw, d_sb, d_b2, d_b1 = part.sum(0).split(lengths)
        grads = [d_moments, d_nw.view(plan.num_norms, c), d_nb.view(plan.num_norms, c), d_sw, d_sb]
        if has_task:
            dz2, dz1 = part[:, -(4 * c + hidden):].split([4 * c, hidden], dim=1)
            grads += [dz1.t() @ pu, d_b1, dz2.t() @ h, d_b2]
        else:
            grads += [None] * 4
        grads = [g if g is None or g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(grads, ctx.saved_tensors)]
        return (*grads, None, None, None)


def _check(moments, slot_pixels, slot_norms, norm_weight, norm_bias, groups, scale_weight, scale_bias, task):
    if not isinstance(moments, Tensor) or moments.dim() != 4 or moments.shape[0] % 3 or moments.shape[3] != 3:
        raise ValueError(f"moments must be a (3L, N, C, 3) tensor, got {getattr(moments, 'shape', moments)!r:.80}")
    if moments.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"moments must be float32 or float64, got {moments.dtype}")
    slots, _, c, _ = moments.shape
    if len(slot_pixels) != slots or len(slot_norms) != slots:
        raise ValueError(f"slot_pixels and slot_norms need one entry per slot (3L = {slots}), got "
                         f"{len(slot_pixels)} and {len(slot_norms)}")
    if groups < 1 or c % groups:
        raise ValueError(f"groups={groups} must divide the {c} channels")
    k = norm_weight.shape[0] if isinstance(norm_weight, Tensor) else 0
    if any(not -1 <= s < k for s in slot_norms) or any(p < 1 for p in slot_pixels):
        raise ValueError(f"slot_norms must be in [-1, {k}) and slot_pixels >= 1, got {list(slot_norms)} and "
                         f"{list(slot_pixels)}")
    expected = [("norm_weight", norm_weight, (k, c)), ("norm_bias", norm_bias, (k, c)),
                ("scale_weight", scale_weight, (c,)), ("scale_bias", scale_bias, (1,))]
    if task is not None:
        if len(task) != 4 or not isinstance(task[0], Tensor) or task[0].dim() != 2:
            raise ValueError("task must be None or (fc1 weight (hidden, C), fc1 bias, fc2 weight (4C, hidden), "
                             "fc2 bias)")
        hidden = task[0].shape[0]
        expected += [("fc1 weight", task[0], (hidden, c)), ("fc1 bias", task[1], (hidden,)),
                     ("fc2 weight", task[2], (4 * c, hidden)), ("fc2 bias", task[3], (4 * c,))]
    for name, t, shape in expected:
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be a tensor of shape {shape}, got {getattr(t, 'shape', t)!r:.80}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if t.device != moments.device:
            raise ValueError(f"{name} is on {t.device}, moments on {moments.device}: one device for all")


def block_attention(moments: Tensor, slot_pixels: Sequence[int], slot_norms: Sequence[int], norm_weight: Tensor,
                    norm_bias: Tensor, groups: int, eps: float, scale_weight: Tensor, scale_bias: Tensor,
                    task: Sequence[Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A DyHead block's mix weights, shift and dynamic-ReLU coefficients from its branches' moments, in one
    launch (backward: one launch, one sum, two matrix products). Eager calls only: under tracing, and for the
    reference, `dyhead.fused.block_forward` computes the same with torch ops.

    Per level l and image n, with slot b (< 3) holding branch y_b (or nothing), GroupNorm k = slot_norms[3l + b]:
    ``a_b = rstd_bg * norm_weight[k]``, ``d_b = norm_bias[k] - mean_bg * a_b`` (GroupNorm of y_b is
    ``y_b * a_b + d_b``; group statistics from the channel moments), ``att_b = hard_sigmoid(relu(scale_weight .
    (a_b * pooled_b + d_b) + scale_bias))``, ``weight_b = att_b * a_b / B_l``, ``shift = sum_b att_b * d_b / B_l``
    (B_l the level's branches; an empty slot's weight is zero), and with task = (fc1 weight, fc1 bias, fc2
    weight, fc2 bias), y = hard_sigmoid(fc2(relu(fc1(sum_b weight_b * pooled_b + shift)))) split in four C-chunks,
    ``coef = ((y1 - 0.5) * 2 + 1, y2 - 0.5, (y3 - 0.5) * 2, y4 - 0.5)``; without it coef = (1, 0, 1, 0).

    Args:
        moments: (3L, N, C, 3) contiguous [mean, M2, pooled mean] of each slot's branch per image and channel
            (`kernels.channel_moments_grouped`), float32 or float64: the math's dtype. Zeros for an empty slot.
        slot_pixels: (3L,) ints, each slot's pixel count (1 for an empty slot); slot_norms: (3L,) ints, the index
            of the slot's GroupNorm in norm_weight/norm_bias, -1 for an empty slot.
        norm_weight, norm_bias: (K, C) the GroupNorms' affine parameters; groups, eps: theirs.
        scale_weight: (C,), scale_bias: (1,) the scale attention's 1x1 conv.
        task: None or (fc1 weight (hidden, C), fc1 bias (hidden,), fc2 weight (4C, hidden), fc2 bias (4C,)).
        Parameters in any floating dtype (read in moments' dtype; gradients in their own).

    Returns:
        weight (L, N, 3, C), shift (L, N, C), coef (L, N, 4, C), contiguous in moments' dtype.

    Raises:
        TypeError / ValueError: arguments of the wrong type, shape, dtype or device (the message names them).
        RuntimeError: CPU tensors without ``TRITON_INTERPRET=1``, or a traced call.
    """
    _check(moments, slot_pixels, slot_norms, norm_weight, norm_bias, groups, scale_weight, scale_bias, task)
    if not eager_call(moments, norm_weight, norm_bias, scale_weight, scale_bias, *(task or ())):
        raise RuntimeError("kernels.block_attention runs eagerly only; under tracing use dyhead.fused's torch path")
    check_runnable(moments, "kernels.block_attention", "dyhead.fused's torch path")
    plan = plan_attention(list(slot_pixels), list(slot_norms), norm_weight.shape[0], moments.device)
    w1, b1, w2, b2 = (t.contiguous() for t in task) if task is not None else (None,) * 4
    return _BlockAttention.apply(moments.contiguous(), norm_weight.contiguous(), norm_bias.contiguous(),
                                 scale_weight.contiguous(), scale_bias.contiguous(), w1, b1, w2, b2, plan, groups,
                                 float(eps))
