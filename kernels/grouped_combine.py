"""`level_combine` of every level of a DyHead block in one launch each way.

A DyHead block ends with one `level_combine` per pyramid level, and the branches it reads are views of the
block's one conv output buffer (`modulated_deform_conv2d_sets`). Level by level that is per level a forward
launch, a backward launch, a sum of the backward's partials and a gather for the resized branch, and the 13
branch gradients are concatenated into the buffer's. Here the levels are rows of a table and:

- forward: one launch writes every level's output into one buffer (split into the levels' views outside, as
  the sets op does: custom op outputs may not alias);
- backward: one launch writes the branch gradients straight into the conv buffer's gradient, a resized
  branch's gradient (at the level's size) into a scratch buffer, and per-run partial sums of the parameter
  gradients; one launch sums each level's partials in run order and one gathers the resized branches'
  gradients to their own size (the upsampling's adjoint, `kernels.upsample`).

The table depends on the shapes only, so it is written to the device once per pyramid size
(`cached_device_table`). Programs are (pixel run, channel block, image), each run of one level, as in
`kernels.grouped_moments`. A level whose pixel count and places are multiples of `ALIGN` is read and written with
wide loads; the kernels hold both paths and choose per level at run time.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .deform_conv import acc_tl, autotune_configs
from .deform_conv_op import _device_guard, autocast_enabled, eager_call
from .device_table import cached_device_table
from .grouped_moments import ALIGN, _root, _start_in, autograd_inputs, find_map, program_run, view_gradients
from .level_pass import (MERGE_BLOCK_C, _INTERPRET_CONFIG, _REDUCTION_SPACE, _aligned, _autocast_combine,
                         _check_combine_inputs, _check_runnable, _coefficients, _lines, _pixel_runs, _store_sums,
                         _tile, combine_tile_backward, keep_tiles, level_autotune, level_combine, zero_sums)
from .runtime import cdiv, first_config_unless_tuning, first_order_backward, next_power_of_2
from .upsample import GATHER_SPACE, axis_scale, bilinear_tile, float32_scale, gather_tile

# Table columns per level:
#  0 first element of its output in the output buffer   1 H*W   2 first pixel run   3 pixel runs   4 W
#  5, 6, 7 first element of the branch in slot 0, 1, 2 in the branches' buffer (-1: no such branch)
#  8 the resized slot (-1: none)   9, 10 its H_IN, W_IN   11, 12 float32 bits of its source scales (rows, columns)
#  13 first element of its gradient (at the level's size) in the scratch buffer
#  14 1 if H*W and every place read or written at the level's size are multiples of ALIGN
#  15 first gather run   16 gather runs (the resized branch's own pixels; 0 without one)
WIDTH = tl.constexpr(17)
# Parameter gradient rows per (level, image): d scale of slots 0, 1, 2, d shift, d a1, d b1, d a2, d b2.
ROWS = 8


def _prune_nchw(configs, named_args, **kwargs):
    """The levels are NCHW: pixel-long tiles."""
    return keep_tiles(configs, True)


@triton.jit
def _level_coefficients(scale_ptr, shift_ptr, coef_ptr, l, n, c, C):
    """`_coefficients` of level l: scale (L, N, 3, C), shift (L, N, C), coef (L, N, 4, C), contiguous."""
    ln = l.to(tl.int64) * tl.num_programs(2)
    return _coefficients(scale_ptr + ln * 3 * C, shift_ptr + ln * C, coef_ptr + ln * 4 * C, n, c, C, 3)


@triton.jit
def _resized_source(row):
    """(H_IN, W_IN, float32 source scale of rows, of columns) of the level's resized branch (columns 9-12)."""
    h_in = tl.load(row + 9)
    w_in = tl.load(row + 10)
    scale_h = tl.load(row + 11).to(tl.int32).to(tl.float32, bitcast=True)
    scale_w = tl.load(row + 12).to(tl.int32).to(tl.float32, bitcast=True)
    return h_in, w_in, scale_h, scale_w


@triton.jit
def _resize_of(row, C, hw, width, ACC: tl.constexpr):
    """`bilinear_tile`'s (W_OUT, H_IN, W_IN, scale_h, scale_w, strides) for the level's resized branch, an
    NCHW map at its place."""
    h_in, w_in, scale_h, scale_w = _resized_source(row)
    return (width, h_in, w_in, axis_scale(h_in, hw // width, scale_h, ACC), axis_scale(w_in, width, scale_w, ACC),
            C * h_in * w_in, h_in * w_in, w_in, 1)


@triton.jit
def _add_branch(u, y_ptr, row, b: tl.constexpr, s, offs, mask, n, c, p, resize, ALIGN: tl.constexpr,
                ACC: tl.constexpr):
    """(u + s * y_b, y_b) for the level's branch in slot b, read at offs or, in the resized slot, resized
    bilinearly from its own size; (u, zeros) where the level has no branch b."""
    y = tl.zeros_like(u)
    first = tl.load(row + 5 + b)
    if first >= 0:
        if tl.load(row + 8) == b:
            y = bilinear_tile(y_ptr + first, n, c, p, mask, *resize, ACC)
        else:
            y = tl.load(y_ptr + _aligned(first, ALIGN) + offs, mask=mask, other=0.0).to(ACC)
        u += s[:, None] * y
    return u, y


@triton.jit
def _grouped_mix(y_ptr, row, offs, mask, n, c, p, resize, s0, s1, s2, shift, ALIGN: tl.constexpr,
                 ACC: tl.constexpr):
    """u = sum_b scale_b * y_b + shift on a tile of the level, and its branch tiles y_b (zeros where none)."""
    y0 = tl.load(y_ptr + _aligned(tl.load(row + 5), ALIGN) + offs, mask=mask, other=0.0).to(ACC)
    u = s0[:, None] * y0 + shift[:, None]
    u, y1 = _add_branch(u, y_ptr, row, 1, s1, offs, mask, n, c, p, resize, ALIGN, ACC)
    u, y2 = _add_branch(u, y_ptr, row, 2, s2, offs, mask, n, c, p, resize, ALIGN, ACC)
    return u, y0, y1, y2


@triton.jit
def _combine_run(y_ptr, out_ptr, row, coefs, n, c, C, start, end, hw,
                 ALIGN: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr):
    """The level's output over pixels [start, end) of image n, channels c."""
    s0, s1, s2, shift, a1, b1, a2, b2 = coefs
    resize = _resize_of(row, C, hw, tl.load(row + 4), ACC)
    out = out_ptr + _aligned(tl.load(row), ALIGN)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        offs, mask = _tile(n, c, p, C, end, C * hw, hw, 1, ALIGN)
        u, _, _, _ = _grouped_mix(y_ptr, row, offs, mask, n, c, p, resize, s0, s1, s2, shift, ALIGN, ACC)
        line1, line2 = _lines(u, a1, b1, a2, b2)
        value = tl.maximum(line1, line2, propagate_nan=tl.PropagateNan.ALL)
        tl.store(out + offs, value.to(out_ptr.dtype.element_ty), mask=mask)


@level_autotune(_REDUCTION_SPACE, key=["C", "P_BUCKET", "NUM_LEVELS"], prune=_prune_nchw)
@triton.jit
def _grouped_combine_kernel(y_ptr, scale_ptr, shift_ptr, coef_ptr, out_ptr, table_ptr, C, P_BUCKET, RUN,
                            NUM_LEVELS: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """`level_combine` of pixel run r of its level, per channel of image n.

    Grid (R, cdiv(C, BLOCK_C), N), R the levels' runs in all. y: the branches' buffer, each branch (N, C, H, W)
    contiguous at its place; out: the output buffer, each level's (N, C, H, W) contiguous at its place; scale,
    shift, coef as `_level_coefficients` reads them, in ACC; table: (NUM_LEVELS, WIDTH) int64.
    """
    _, c, n, row, l, _, hw, start, end = program_run(table_ptr, RUN, NUM_LEVELS, WIDTH, BLOCK_C)
    coefs = _level_coefficients(scale_ptr, shift_ptr, coef_ptr, l, n, c, C)
    if tl.load(row + 14) != 0:
        _combine_run(y_ptr, out_ptr, row, coefs, n, c, C, start, end, hw, ALIGN, ACC, BLOCK_P)
    else:
        _combine_run(y_ptr, out_ptr, row, coefs, n, c, C, start, end, hw, 1, ACC, BLOCK_P)


@triton.jit
def _store_branch_grad(dy_ptr, dres_ptr, row, b: tl.constexpr, d, offs, mask, ALIGN: tl.constexpr):
    """The gradient d (a tile at the level's size) of the level's branch in slot b: at the branch's place in
    dy, or, for the resized slot, at its place in the scratch dres; nowhere if the level has no branch b."""
    first = tl.load(row + 5 + b)
    if first >= 0:
        if tl.load(row + 8) == b:
            tl.store(dres_ptr + _aligned(tl.load(row + 13), ALIGN) + offs, d.to(dres_ptr.dtype.element_ty),
                     mask=mask)
        else:
            tl.store(dy_ptr + _aligned(first, ALIGN) + offs, d.to(dy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_backward_run(g_ptr, y_ptr, dy_ptr, dres_ptr, row, coefs, n, c, C, start, end, hw,
                          WRITE_DY: tl.constexpr, WRITE_SUMS: tl.constexpr, ALIGN: tl.constexpr,
                          ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The level's gradients over pixels [start, end) of image n, channels c, as `_combine_backward_kernel`
    computes them for one level: the branch gradients stored (WRITE_DY), the 8 per-channel sums returned
    (`zero_sums`' order; zeros unless WRITE_SUMS)."""
    s0, s1, s2, shift, a1, b1, a2, b2 = coefs
    sums = zero_sums(BLOCK_C, ACC)
    resize = _resize_of(row, C, hw, tl.load(row + 4), ACC)
    g_level = g_ptr + _aligned(tl.load(row), ALIGN)
    dy0 = dy_ptr + _aligned(tl.load(row + 5), ALIGN)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        offs, mask = _tile(n, c, p, C, end, C * hw, hw, 1, ALIGN)
        g = tl.load(g_level + offs, mask=mask, other=0.0).to(ACC)
        u, y0, y1, y2 = _grouped_mix(y_ptr, row, offs, mask, n, c, p, resize, s0, s1, s2, shift, ALIGN, ACC)
        du, sums = combine_tile_backward(g, u, y0, y1, y2, sums, a1, b1, a2, b2, 3, WRITE_SUMS)
        if WRITE_DY:
            tl.store(dy0 + offs, (du * s0[:, None]).to(dy_ptr.dtype.element_ty), mask=mask)
            _store_branch_grad(dy_ptr, dres_ptr, row, 1, du * s1[:, None], offs, mask, ALIGN)
            _store_branch_grad(dy_ptr, dres_ptr, row, 2, du * s2[:, None], offs, mask, ALIGN)
    return sums


@level_autotune(_REDUCTION_SPACE, key=["C", "P_BUCKET", "NUM_LEVELS", "WRITE_DY", "WRITE_SUMS"],
                prune=_prune_nchw)
@triton.jit
def _grouped_combine_backward_kernel(g_ptr, y_ptr, scale_ptr, shift_ptr, coef_ptr, dy_ptr, dres_ptr, part_ptr,
                                     table_ptr, C, P_BUCKET, RUN, NUM_LEVELS: tl.constexpr,
                                     WRITE_DY: tl.constexpr, WRITE_SUMS: tl.constexpr, ALIGN: tl.constexpr,
                                     ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """`_grouped_combine_kernel`'s gradients on pixel run r of its level, from the output gradient g.

    With du as `level_combine`'s backward forms it: d y_b = du * scale_b (WRITE_DY) into dy, laid out as y (a
    resized branch's into dres, at its place there), and the run's 8 per-channel sums (WRITE_SUMS) into part
    (N, R, 8, C) as `_store_sums` lays them out. g: laid out as the output buffer; grid, y, scale, shift, coef
    and table as `_grouped_combine_kernel`.
    """
    r, c, n, row, l, _, hw, start, end = program_run(table_ptr, RUN, NUM_LEVELS, WIDTH, BLOCK_C)
    coefs = _level_coefficients(scale_ptr, shift_ptr, coef_ptr, l, n, c, C)
    if tl.load(row + 14) != 0:
        sums = _combine_backward_run(g_ptr, y_ptr, dy_ptr, dres_ptr, row, coefs, n, c, C, start, end, hw, WRITE_DY,
                                     WRITE_SUMS, ALIGN, ACC, BLOCK_C, BLOCK_P)
    else:
        sums = _combine_backward_run(g_ptr, y_ptr, dy_ptr, dres_ptr, row, coefs, n, c, C, start, end, hw, WRITE_DY,
                                     WRITE_SUMS, 1, ACC, BLOCK_C, BLOCK_P)
    if WRITE_SUMS:
        _store_sums(part_ptr, n, r, c, C, sums, 3)


@triton.jit
def _sum_runs_kernel(part_ptr, table_ptr, out_ptr, C, R, BLOCK: tl.constexpr):
    """out[l, n] = the sum of level l's runs' partials part[n, r] in run order (deterministic).

    Grid (cdiv(8 * C, BLOCK), N, L). part: (N, R, 8, C), out: (L, N, 8, C), contiguous in one float dtype.
    """
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n = tl.program_id(1).to(tl.int64)
    l = tl.program_id(2).to(tl.int64)
    row = table_ptr + l * WIDTH
    valid = j < 8 * C
    run = part_ptr + (n * R + tl.load(row + 2)) * 8 * C + j
    total = tl.load(run, mask=valid, other=0.0)  # every level has a run: it has pixels
    for s in range(1, tl.load(row + 3)):
        total += tl.load(run + s * 8 * C, mask=valid, other=0.0)
    tl.store(out_ptr + (l * tl.num_programs(1) + n) * 8 * C + j, total, mask=valid)


@triton.autotune(configs=autotune_configs(GATHER_SPACE, _INTERPRET_CONFIG), key=["C", "P_BUCKET", "NUM_LEVELS"],
                 prune_configs_by={"early_config_prune": lambda configs, *args, **kwargs:
                                   first_config_unless_tuning(configs)})
@triton.jit
def _gather_resized_kernel(dres_ptr, dy_ptr, table_ptr, C, P_BUCKET, RUN, NUM_LEVELS: tl.constexpr,
                           ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The gradient of each level's resized branch at its place in dy: `gather_tile` of its resized map's
    gradient (in dres, at the level's size) over the branch's own pixels, run r of them.

    Grid (G, cdiv(C, BLOCK_C), N), G the gather runs in all; table as `_grouped_combine_kernel`'s.
    """
    r = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2)
    row, _ = find_map(table_ptr, r, NUM_LEVELS, WIDTH, 15)
    hw = tl.load(row + 1)
    width = tl.load(row + 4)
    h_in, w_in, scale_h, scale_w = _resized_source(row)
    src = dres_ptr + tl.load(row + 13)
    dst = dy_ptr + tl.load(row + 5 + tl.load(row + 8))
    start = (r - tl.load(row + 15)) * RUN
    end = tl.minimum(start + RUN, h_in * w_in)
    rows = (n.to(tl.int64) * C + c.to(tl.int64)[:, None]) * (h_in * w_in)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        valid = (c < C)[:, None] & (p < end)[None, :]
        total = gather_tile(src, n, c, p, valid, h_in, w_in, hw // width, width, scale_h, scale_w,
                            C * hw, hw, width, 1, ACC, BLOCK_C, BLOCK_P)
        tl.store(dst + rows + p[None, :], total.to(dy_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------------------------------------------
# Launch wrappers. A level's places: per branch (first element in the branches' buffer, H, W), the first at the
# level's size.


@dataclass(frozen=True)
class GroupedPlan:
    """What the launches of one pyramid's shapes need: the device table and its sizes."""

    table: Tensor
    levels: int
    run: int  # pixels per run of the levels
    runs: int  # runs in all
    bucket: int  # the largest level's pixels, to the next power of 2 (an autotune key)
    gather_run: int
    gather_runs: int
    gather_bucket: int
    out_numel: int  # the output buffer's elements
    scratch_numel: int  # the resized branches' gradients at their levels' sizes


def _float32_bits(value: float) -> int:
    return struct.unpack("<i", struct.pack("<f", value))[0]


def plan_levels(places, n: int, c: int, device: torch.device) -> GroupedPlan:
    """The `GroupedPlan` of levels at places (each level's pixel count > 0, n * c > 0)."""
    run, _ = _pixel_runs(n, c, max(h * w for (_, h, w), *_ in places), device)
    coarse = [branches[-1][1] * branches[-1][2] for branches in places
              if len(branches) > 1 and branches[-1][1:] != branches[0][1:]]
    gather_run = _pixel_runs(n, c, max(coarse), device)[0] if coarse else run
    values, out_first, runs, gather_runs, scratch = [], 0, 0, 0, 0
    for branches in places:
        _, h, w = branches[0]
        hw = h * w
        firsts = [first for first, _, _ in branches] + [-1] * (3 - len(branches))
        _, h_in, w_in = branches[-1]
        resized = len(branches) > 1 and (h_in, w_in) != (h, w)
        slot, d_first = (len(branches) - 1, scratch) if resized else (-1, -1)
        at_size = [hw, out_first, *(firsts[:len(branches) - 1] if resized else firsts)] + ([d_first] if resized else [])
        aligned = all(v % ALIGN == 0 for v in at_size if v >= 0)
        level_gathers = cdiv(h_in * w_in, gather_run) if resized else 0
        values += [out_first, hw, runs, cdiv(hw, run), w, *firsts, slot,
                   *((h_in, w_in) if resized else (1, 1)),
                   _float32_bits(float32_scale(h_in, h)) if resized else 0,
                   _float32_bits(float32_scale(w_in, w)) if resized else 0,
                   d_first, int(aligned), gather_runs, level_gathers]
        out_first += n * c * hw
        runs += cdiv(hw, run)
        gather_runs += level_gathers
        scratch += n * c * hw if resized else 0
    bucket = next_power_of_2(max(h * w for (_, h, w), *_ in places))
    gather_bucket = next_power_of_2(max(coarse)) if coarse else 1
    return GroupedPlan(cached_device_table(values, device), len(places), run, runs, bucket, gather_run,
                       gather_runs, gather_bucket, out_first, scratch)


def grouped_combine_forward(base: Tensor, scale: Tensor, shift: Tensor, coef: Tensor, plan: GroupedPlan,
                            n: int, c: int) -> Tensor:
    """The output buffer (plan.out_numel,) in base's dtype: each level's (N, C, H, W) in turn. base: the
    branches' buffer; scale (L, N, 3, C), shift (L, N, C), coef (L, N, 4, C) contiguous in float32 (float64)."""
    out = base.new_empty((plan.out_numel,))
    grid = lambda meta: (plan.runs, cdiv(c, meta["BLOCK_C"]), n)
    _grouped_combine_kernel[grid](base, scale, shift, coef, out, plan.table, c, plan.bucket, plan.run,
                                  NUM_LEVELS=plan.levels, ALIGN=ALIGN, ACC=acc_tl(base))
    return out


def grouped_combine_backward(grad: Tensor, base: Tensor, scale: Tensor, shift: Tensor, coef: Tensor,
                             plan: GroupedPlan, n: int, c: int, need_base: bool,
                             need_params: bool) -> tuple[Tensor | None, Tensor | None]:
    """(d base or None, d params (L, N, 8, C) in scale's dtype or None) from grad (plan.out_numel,) contiguous:
    rows d scale of slots 0, 1, 2, d shift, d a1, d b1, d a2, d b2. d base is written only where the branches
    are (`view_gradients` reads nothing else)."""
    d_base = torch.empty_like(base) if need_base else None
    scratch = base.new_empty((plan.scratch_numel if need_base else 0,))
    part = scale.new_empty((n, plan.runs, ROWS, c) if need_params else (0,))
    grid = lambda meta: (plan.runs, cdiv(c, meta["BLOCK_C"]), n)
    acc = acc_tl(base)
    _grouped_combine_backward_kernel[grid](
        grad, base, scale, shift, coef, base if d_base is None else d_base, scratch, part, plan.table, c,
        plan.bucket, plan.run, NUM_LEVELS=plan.levels, WRITE_DY=need_base, WRITE_SUMS=need_params, ALIGN=ALIGN,
        ACC=acc)
    d_params = None
    if need_params:
        d_params = scale.new_empty((plan.levels, n, ROWS, c))
        _sum_runs_kernel[(cdiv(ROWS * c, MERGE_BLOCK_C), n, plan.levels)](part, plan.table, d_params, c,
                                                                          plan.runs, BLOCK=MERGE_BLOCK_C)
    if need_base and plan.gather_runs:
        grid = lambda meta: (plan.gather_runs, cdiv(c, meta["BLOCK_C"]), n)
        _gather_resized_kernel[grid](scratch, d_base, plan.table, c, plan.gather_bucket, plan.gather_run,
                                     NUM_LEVELS=plan.levels, ACC=acc)
    return d_base, d_params


# ---------------------------------------------------------------------------------------------------------------
# Input checks, autograd and the public function.


def _check_grouped_inputs(levels, scale, shift, coef):
    if not isinstance(levels, (list, tuple)) or not levels:
        raise TypeError(f"levels must be a non-empty list or tuple of levels, each a list of 1 to 3 branches, "
                        f"got {levels!r:.80}")
    for t, name in ((scale, "scale"), (shift, "shift"), (coef, "coef")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    first = levels[0][0] if isinstance(levels[0], (list, tuple)) and levels[0] else None
    if not isinstance(first, Tensor) or first.dim() != 4:
        raise ValueError(f"levels[0] must start with a tensor (N, C, H, W), got {first!r:.80}")
    num, (n, c) = len(levels), first.shape[:2]
    for name, t, shape, symbols in (("scale", scale, (num, n, 3, c), "(L, N, 3, C)"),
                                    ("shift", shift, (num, n, c), "(L, N, C)"),
                                    ("coef", coef, (num, n, 4, c), "(L, N, 4, C)")):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {symbols} = {shape} for {num} levels of {tuple(first.shape)}, "
                             f"got shape {tuple(t.shape)}")
    for l, branches in enumerate(levels):
        if not isinstance(branches, (list, tuple)):
            raise TypeError(f"levels[{l}] must be a list or tuple of 1 to 3 tensors, got {type(branches).__name__}")
        head = branches[0] if branches else None
        if isinstance(head, Tensor) and head.dim() == 4 and (
                head.shape[:2] != first.shape[:2] or head.dtype != first.dtype or head.device != first.device):
            raise ValueError(f"levels[{l}] has (N, C) = {tuple(head.shape[:2])}, {head.dtype} on {head.device} but "
                             f"levels[0] has {tuple(first.shape[:2])}, {first.dtype} on {first.device}: the levels "
                             "need one N, C, dtype and device")
        try:
            _check_combine_inputs(branches, scale[l, :, :len(branches)], shift[l], coef[l])
        except (TypeError, ValueError) as error:
            raise type(error)(f"levels[{l}]: {error}") from None


def _shared_places(levels):
    """(base, places) where every branch is a contiguous NCHW view of one contiguous tensor, no two
    sharing an element; None otherwise."""
    base = _root(levels[0][0])
    if not (base.is_contiguous() and base.dtype == levels[0][0].dtype):
        return None
    places, spans = [], []
    for branches in levels:
        level = []
        for y in branches:
            first = _start_in(y, base)
            if first is None:
                return None
            level.append((first, *y.shape[2:]))
            spans.append((first, first + y.numel()))
        places.append(tuple(level))
    spans.sort()
    if any(a_end > b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])):
        return None
    return base, tuple(places)


class _GroupedCombine(torch.autograd.Function):
    """The levels' outputs as one buffer from branches that lie in one buffer, read there in one launch. The one
    branch gradient the backward launch writes goes to the branches' buffer (an input when the caller asks so)
    or, in spans, to the branches."""

    @staticmethod
    def forward(ctx, base, scale, shift, coef, plan, n, c, firsts, *branches):
        _check_runnable(base, "level_combine_grouped")
        with _device_guard(base):
            out = grouped_combine_forward(base, scale, shift, coef, plan, n, c)
        ctx.save_for_backward(base, scale, shift, coef)
        ctx.plan, ctx.n, ctx.c, ctx.firsts = plan, n, c, firsts
        ctx.shapes = [y.shape for y in branches]
        return out

    @staticmethod
    @first_order_backward
    def backward(ctx, grad):
        base, scale, shift, coef = ctx.saved_tensors
        need_base, need_scale, need_shift, need_coef = ctx.needs_input_grad[:4]
        need_branches = any(ctx.needs_input_grad[8:])
        with _device_guard(base):
            d_base, d_params = grouped_combine_backward(grad.contiguous(), base, scale, shift, coef, ctx.plan,
                                                        ctx.n, ctx.c, need_base or need_branches,
                                                        need_scale or need_shift or need_coef)
        d_branches = view_gradients(d_base, ctx.shapes, ctx.firsts) if need_branches else (None,) * len(ctx.shapes)
        return (d_base if need_base else None, d_params[:, :, :3] if need_scale else None,
                d_params[:, :, 3] if need_shift else None, d_params[:, :, 4:] if need_coef else None, None, None,
                None, None, *d_branches)


def level_combine_grouped(levels: Sequence[Sequence[Tensor]], scale: Tensor, shift: Tensor, coef: Tensor, *,
                          buffer_gradient: bool = False) -> list[Tensor]:
    """`level_combine` of L levels: out[l] = level_combine(levels[l], scale[l, :, :B_l], shift[l], coef[l]).

    Where every branch is a contiguous NCHW view of one contiguous tensor, no two sharing an element (the
    outputs of `modulated_deform_conv2d_sets`, as a DyHead block passes them), it is one launch forward and
    three backward for all levels, the outputs are views of one buffer, and each branch's gradient is its span
    of one tensor. Otherwise, and under tracing (torch.compile), it is `level_combine` per level. The results
    agree to rounding: the pixel runs whose sums are added may differ.

    Args:
        levels: L >= 1 lists of B_l = 1 to 3 branches as `level_combine` takes them (the last one of another
            size is resized bilinearly, align_corners=True), of one N, C, dtype (float32/float16/bfloat16/
            float64) and device (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        scale: (L, N, 3, C), the mix weight of each level's branch slots (slots past B_l are not read, and get a
            zero gradient); shift: (L, N, C); coef: (L, N, 4, C) (a1, b1, a2, b2): float32 (float64 with float64
            branches).
        buffer_gradient: on the one-launch path, where the branches fill their tensor, that one tensor is the
            gradient of the branches' tensor instead, which autograd adds to the tensor's other gradients once
            rather than branch by branch; the branches get none of it (hooks on them and autograd.grad with
            respect to them miss it). For callers whose branches are intermediate values, such as DyHead's level
            pass.

    Under autocast, as `level_combine`: the branches promoted to the widest of their dtypes, scale, shift and
    coef cast to its math dtype.

    Returns:
        L tensors (N, C, H_l, W_l) in the branches' dtype.

    Raises:
        TypeError / ValueError: what `level_combine` raises for a level (the message names it), scale, shift or
            coef of the wrong shape, levels of different N, C, dtype or device.
        RuntimeError: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    flat = [b for branches in levels for b in branches] if isinstance(levels, (list, tuple)) and all(
        isinstance(branches, (list, tuple)) for branches in levels) else []
    if flat and autocast_enabled(flat[0]):
        flat, scale, shift, coef = _autocast_combine(flat, scale, shift, coef)
        sizes = [len(branches) for branches in levels]
        levels = [flat[sum(sizes[:l]):sum(sizes[:l + 1])] for l in range(len(levels))]
    _check_grouped_inputs(levels, scale, shift, coef)
    n, c = levels[0][0].shape[:2]
    grouped = (eager_call(*flat, scale, shift, coef) and n * c > 0
               and all(branches[0].shape[2] * branches[0].shape[3] > 0 for branches in levels))
    shared = _shared_places(levels) if grouped else None
    if shared is None:
        return [level_combine(branches, scale[l, :, :len(branches)], shift[l], coef[l])
                for l, branches in enumerate(levels)]
    base, places = shared
    plan = plan_levels(places, n, c, base.device)
    firsts = [branch[0] for level in places for branch in level]
    base, views = autograd_inputs(base, [y for level in levels for y in level], buffer_gradient)
    out = _GroupedCombine.apply(base, scale.contiguous(), shift.contiguous(), coef.contiguous(), plan, n, c, firsts,
                                *views)
    sizes = [branches[0].shape for branches in levels]
    return [part.view(shape) for part, shape in zip(out.split([s.numel() for s in sizes]), sizes)]
