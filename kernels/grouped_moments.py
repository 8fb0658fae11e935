"""`channel_moments` of many maps in one launch each way: the maps of a DyHead block.

A DyHead block's 13 deformable conv outputs are views of one buffer (`modulated_deform_conv2d_sets` returns
them so), and the level pass takes per-channel moments of each. One launch per map is 13 forward launches, up
to 13 merges and 13 backward launches per block, plus an addition per map where autograd sums the moments'
gradient with the combine's. Over the shared buffer it is one moments launch, one merge and one backward
launch, and the gradient of the whole buffer is one tensor.

The maps are rows of a small int64 device table (`cached_device_table`: written once per layout, CUDA-graph safe):
each map's first element in the buffer, its pixel count, its first pixel run and its number of runs. Programs are
(run, channel block, image), each run of one map; a program finds its map by a scan over the table. Rows of pixels
of maps whose pixel count and start are multiples of `ALIGN` are read with wide loads, the others element by
element: one kernel has both paths, chosen per map at run time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .deform_conv import acc_dtype, acc_tl
from .deform_conv_op import _device_guard, eager_call
from .device_table import cached_device_table
from .level_pass import (MERGE_BLOCK_C, _REDUCTION_SPACE, _aligned, _check_float_tensor, _check_runnable,
                         _pixel_runs, _tile, channel_moments, first_pixel, keep_tiles, level_autotune, merge_runs,
                         moments_grad, run_moments)
from .runtime import cdiv, first_order_backward, next_power_of_2

# Elements: 16 bytes of bf16/fp16, 32 of fp32. DyHead's two largest map sizes at COCO shapes (100x168, 50x84)
# are multiples of it; the small maps read element by element cost little.
ALIGN = 8
# Table columns per map: first element, H*W, first run, runs, W, first row weight, first column weight (-1: none).
FIELDS = tl.constexpr(7)


def _prune_nchw(configs, named_args, **kwargs):
    """The maps are NCHW: pixel-long tiles."""
    return keep_tiles(configs, True)


@triton.jit
def find_map(table_ptr, r, NUM_MAPS: tl.constexpr, WIDTH: tl.constexpr, RUN_COLUMN: tl.constexpr):
    """(table row, index) of the map that owns run r, in a table of NUM_MAPS rows of WIDTH values whose column
    RUN_COLUMN holds each map's first run: the last map whose first run is <= r (maps without runs share their
    first run with the next map, so they are passed over)."""
    k = tl.full((), 0, tl.int32)
    for i in tl.static_range(1, NUM_MAPS):
        k += (tl.load(table_ptr + i * WIDTH + RUN_COLUMN) <= r).to(tl.int32)
    return table_ptr + k * WIDTH, k


@triton.jit
def program_run(table_ptr, RUN, NUM_MAPS: tl.constexpr, WIDTH: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's pixel run r, channels c and image n, and of its map: the table row, index k, first
    element, H*W, and the run's pixels [start, end). The table: NUM_MAPS rows of WIDTH values, each starting
    (first element, H*W, first run)."""
    r = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2)
    row, k = find_map(table_ptr, r, NUM_MAPS, WIDTH, 2)
    first, hw = tl.load(row), tl.load(row + 1)
    start = (r - tl.load(row + 2)) * RUN
    return r, c, n, row, k, first, hw, start, tl.minimum(start + RUN, hw)


@triton.jit
def _pixel_weights(w_ptr, row, p, end):
    """The map's pooling weight of pixels p (row weight x column weight; zero past end)."""
    width = tl.load(row + 4)
    valid = p < end
    return (tl.load(w_ptr + tl.load(row + 5) + p // width, mask=valid, other=0.0)
            * tl.load(w_ptr + tl.load(row + 6) + p % width, mask=valid, other=0.0))


@triton.jit
def _run_weighted_sum(x_ptr, w_ptr, row, n, c, C, start, end, hw,
                      ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """sum over pixels p in [start, end) of w[p] x[n, c, p] per channel c ([BLOCK_C], ACC)."""
    total = tl.zeros((BLOCK_C,), dtype=ACC)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        offs, mask = _tile(n, c, p, C, end, C * hw, hw, 1, 1)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        total += tl.sum(x * _pixel_weights(w_ptr, row, p, end)[None, :], axis=1)
    return total


@level_autotune(_REDUCTION_SPACE, key=["C", "P_BUCKET", "NUM_MAPS"], prune=_prune_nchw)
@triton.jit
def _grouped_moments_kernel(x_ptr, w_ptr, table_ptr, part_ptr, C, P_BUCKET, RUN, NUM_MAPS: tl.constexpr,
                            ALIGN: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """(mean - x[n, c, 0], M2, weighted sum or 0) per channel of image n over pixel run r of its map (x[n, c, 0]
    the map's first pixel: `run_moments`'s shift).

    Grid (R, cdiv(C, BLOCK_C), N), R the maps' runs in all. x: the buffer, each map (N, C, HW) contiguous at its
    first element; w: the pooling weights (ACC); table: (NUM_MAPS, FIELDS) int64; part: (R, N, C, 3)
    contiguous, ACC.
    """
    r, c, n, row, _, first, hw, start, end = program_run(table_ptr, RUN, NUM_MAPS, FIELDS, BLOCK_C)
    shift = first_pixel(x_ptr + first, n, c, C, C * hw, hw, ACC)
    if (first % ALIGN == 0) & (hw % ALIGN == 0):
        mean, m2 = run_moments(x_ptr + _aligned(first, ALIGN), n, c, C, start, end, C * hw, hw, 1, shift,
                               ALIGN, ACC, BLOCK_C, BLOCK_P)
    else:
        mean, m2 = run_moments(x_ptr + first, n, c, C, start, end, C * hw, hw, 1, shift, 1, ACC, BLOCK_C,
                               BLOCK_P)
    pooled = tl.zeros_like(mean)
    if tl.load(row + 5) >= 0:
        pooled = _run_weighted_sum(x_ptr + first, w_ptr, row, n, c, C, start, end, hw, ACC, BLOCK_C, BLOCK_P)
    out = part_ptr + ((r.to(tl.int64) * tl.num_programs(2) + n) * C + c) * 3
    tl.store(out, mean, mask=c < C)
    tl.store(out + 1, m2, mask=c < C)
    tl.store(out + 2, pooled, mask=c < C)


@triton.jit
def _grouped_merge_kernel(x_ptr, part_ptr, table_ptr, out_ptr, C, RUN, BLOCK_C: tl.constexpr):
    """out[k, n, c] = map k's runs' (mean, M2) merged in run order (the map's first pixel added back to the
    mean), then the sum of the runs' weighted sums if the map has weights, else the mean; zero for a map without
    runs.

    Grid (cdiv(C, BLOCK_C), N, K). x and table: `_grouped_moments_kernel`'s; part: (R, N, C, 3), out:
    (K, N, C, 3), both contiguous in one float dtype.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(1).to(tl.int64)
    k = tl.program_id(2).to(tl.int64)
    num_n = tl.num_programs(1)
    row = table_ptr + k * FIELDS
    runs = tl.load(row + 3)
    valid = c < C
    run = part_ptr + ((tl.load(row + 2) * num_n + n) * C + c) * 3
    step = num_n * C * 3
    hw = tl.load(row + 1)
    mean, m2 = merge_runs(run, step, valid, runs, RUN, hw)
    if runs > 0:
        mean += first_pixel(x_ptr + tl.load(row), n, c, C, C * hw, hw, mean.dtype)
    pooled = mean
    if tl.load(row + 5) >= 0:
        pooled = tl.zeros_like(mean)
        for s in range(runs):
            pooled += tl.load(run + s * step + 2, mask=valid, other=0.0)
    out = out_ptr + ((k * num_n + n) * C + c) * 3
    tl.store(out, mean, mask=valid)
    tl.store(out + 1, m2, mask=valid)
    tl.store(out + 2, pooled, mask=valid)


@triton.jit
def _store_run_grad(x_ptr, dx_ptr, w_ptr, row, n, c, C, start, end, hw, mean, g_mean, g_m2, g_pooled,
                    WEIGHTED: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr):
    """dx = `moments_grad` (+ g_pooled w[p] if WEIGHTED) over pixels [start, end) of image n's channels c; x
    and dx at the map's start."""
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        offs, mask = _tile(n, c, p, C, end, C * hw, hw, 1, ALIGN)
        dx = moments_grad(tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC), mean, g_mean, g_m2)
        if WEIGHTED:
            dx += g_pooled[:, None] * _pixel_weights(w_ptr, row, p, end)[None, :]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@level_autotune(_REDUCTION_SPACE, key=["C", "P_BUCKET", "NUM_MAPS"], prune=_prune_nchw)
@triton.jit
def _grouped_moments_backward_kernel(x_ptr, w_ptr, table_ptr, mom_ptr, g_ptr, dx_ptr, C, P_BUCKET, RUN,
                                     stride_gk, stride_gn, stride_gc, stride_g3, NUM_MAPS: tl.constexpr,
                                     ALIGN: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                                     BLOCK_P: tl.constexpr):
    """dx = g_mean / HW + 2 g_M2 (x - mean) + (g_pooled w[p], or g_pooled / HW without weights) over pixel run
    r of its map, per channel of image n.

    Grid, x, w and table as `_grouped_moments_kernel`; dx laid out as x; mom: (K, N, C, 3) contiguous, ACC;
    g: (K, N, C, 3) through its strides (an expanded gradient is read in place).
    """
    _, c, n, row, k, first, hw, start, end = program_run(table_ptr, RUN, NUM_MAPS, FIELDS, BLOCK_C)
    valid = c < C
    k = k.to(tl.int64)
    mean = tl.load(mom_ptr + ((k * tl.num_programs(2) + n) * C + c) * 3, mask=valid, other=0.0)
    g = g_ptr + k * stride_gk + n.to(tl.int64) * stride_gn + c * stride_gc
    g_mean = tl.load(g, mask=valid, other=0.0).to(ACC)
    g_m2 = 2 * tl.load(g + stride_g3, mask=valid, other=0.0).to(ACC)
    g_pooled = tl.load(g + 2 * stride_g3, mask=valid, other=0.0).to(ACC)
    if tl.load(row + 5) >= 0:
        _store_run_grad(x_ptr + first, dx_ptr + first, w_ptr, row, n, c, C, start, end, hw, mean,
                        g_mean / hw.to(ACC), g_m2, g_pooled, True, 1, ACC, BLOCK_P)
    elif (first % ALIGN == 0) & (hw % ALIGN == 0):
        aligned_first = _aligned(first, ALIGN)
        _store_run_grad(x_ptr + aligned_first, dx_ptr + aligned_first, w_ptr, row, n, c, C, start, end, hw, mean,
                        (g_mean + g_pooled) / hw.to(ACC), g_m2, g_pooled, False, ALIGN, ACC, BLOCK_P)
    else:
        _store_run_grad(x_ptr + first, dx_ptr + first, w_ptr, row, n, c, C, start, end, hw, mean,
                        (g_mean + g_pooled) / hw.to(ACC), g_m2, g_pooled, False, 1, ACC, BLOCK_P)


# ---------------------------------------------------------------------------------------------------------------
# Launch wrappers. A map's place is (first element in the buffer, H, W, first row weight, first column weight;
# the weights -1 for none), or None for a row of zeros.


def _map_table(places, run):
    """The kernels' table (K x FIELDS values) and the number of runs R in all."""
    values, total = [], 0
    for place in places:
        first, h, w, row_w, col_w = place if place is not None else (0, 0, 1, -1, -1)
        runs = cdiv(h * w, run)
        values += [first, h * w, total, runs, w, row_w, col_w]
        total += runs
    return values, total


def _plan(base: Tensor, places, n: int, c: int):
    """(device table, RUN, runs in all, pixel bucket) of the maps: made by the forward, reused by the backward."""
    hws = [place[1] * place[2] for place in places if place is not None]
    run, _ = _pixel_runs(n, c, max(hws), base.device)
    values, total = _map_table(places, run)
    return cached_device_table(values, base.device), run, total, next_power_of_2(max(hws))


def grouped_moments_forward(base: Tensor, weights: Tensor, places, n: int, c: int):
    """(out, plan): out (K, N, C, 3) contiguous (mean, M2, pooled) in float32 (float64) of the K maps (N, C, H, W)
    at places in base (contiguous), pooled with weights (1-D, float32/float64) where a place has them; zeros for
    a None place. plan: `_plan`'s, for the backward (None where there was nothing to launch)."""
    out = base.new_empty((len(places), n, c, 3), dtype=acc_dtype(base))
    if n * c == 0 or all(place is None for place in places):
        return out.zero_(), None
    plan = table, run, total, bucket = _plan(base, places, n, c)
    part = base.new_empty((total, n, c, 3), dtype=out.dtype)
    grid = lambda meta: (total, cdiv(c, meta["BLOCK_C"]), n)
    _grouped_moments_kernel[grid](base, weights, table, part, c, bucket, run, NUM_MAPS=len(places), ALIGN=ALIGN,
                                  ACC=acc_tl(base))
    _grouped_merge_kernel[(cdiv(c, MERGE_BLOCK_C), n, len(places))](base, part, table, out, c, run,
                                                                    BLOCK_C=MERGE_BLOCK_C)
    return out, plan


def grouped_moments_backward(grad: Tensor, base: Tensor, weights: Tensor, moments: Tensor, places, plan) -> Tensor:
    """d base (like base) from grad (K, N, C, 3) of `grouped_moments_forward` and its plan; written only where
    the maps are (`view_gradients` reads nothing else)."""
    d_base = torch.empty_like(base)
    if plan is None:
        return d_base
    _, n, c, _ = moments.shape
    table, run, total, bucket = plan
    grid = lambda meta: (total, cdiv(c, meta["BLOCK_C"]), n)
    _grouped_moments_backward_kernel[grid](base, weights, table, moments, grad, d_base, c, bucket, run,
                                           *grad.stride(), NUM_MAPS=len(places), ALIGN=ALIGN, ACC=acc_tl(base))
    return d_base


# ---------------------------------------------------------------------------------------------------------------
# Input checks, autograd and the public function.


def _check_maps(maps):
    if not isinstance(maps, (list, tuple)):
        raise TypeError(f"maps must be a list or tuple of tensors (N, C, H, W) or None, got {type(maps).__name__}")
    tensors = [(k, m) for k, m in enumerate(maps) if m is not None]
    if not tensors:
        raise ValueError("maps must hold at least one tensor (N, C, H, W)")
    k0, first = tensors[0]
    for k, m in tensors:
        _check_float_tensor(f"maps[{k}]", m)
        if m.dim() != 4:
            raise ValueError(f"maps[{k}] must be (N, C, H, W), got shape {tuple(m.shape)}")
        if m.shape[2] * m.shape[3] == 0:
            raise ValueError(f"maps[{k}] must have H*W > 0 pixels to take moments over, got shape {tuple(m.shape)}")
        if m.shape[:2] != first.shape[:2]:
            raise ValueError(f"maps[{k}] has (N, C) = {tuple(m.shape[:2])} but maps[{k0}] has "
                             f"{tuple(first.shape[:2])}: the maps need one N and C")
        if m.dtype != first.dtype:
            raise TypeError(f"maps[{k}] has dtype {m.dtype} but maps[{k0}] has {first.dtype}: the maps need one dtype")
        if m.device != first.device:
            raise ValueError(f"maps[{k}] is on {m.device} but maps[{k0}] is on {first.device}")
    return first


def _check_pool_weights(maps, pool_weights, first):
    if not isinstance(pool_weights, (list, tuple)) or len(pool_weights) != len(maps):
        raise ValueError(f"pool_weights must be a list or tuple of {len(maps)} entries (one per map), "
                         f"got {pool_weights!r:.80}")
    acc = acc_dtype(first)
    for k, (m, pair) in enumerate(zip(maps, pool_weights)):
        if pair is None:
            continue
        if m is None:
            raise ValueError(f"pool_weights[{k}] is given but maps[{k}] is None")
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"pool_weights[{k}] must be None or a pair (row weights (H,), column weights (W,))")
        for name, t, size in (("row", pair[0], m.shape[2]), ("column", pair[1], m.shape[3])):
            if not isinstance(t, Tensor):
                raise TypeError(f"pool_weights[{k}]'s {name} weights must be a Tensor, got {type(t).__name__}")
            if t.dtype != acc:
                raise TypeError(f"pool_weights[{k}]'s {name} weights must be {acc} for {first.dtype} maps, "
                                f"got {t.dtype}")
            if tuple(t.shape) != (size,):
                raise ValueError(f"pool_weights[{k}]'s {name} weights must be ({size},) for maps[{k}] of shape "
                                 f"{tuple(m.shape)}, got shape {tuple(t.shape)}")
            if t.device != first.device:
                raise ValueError(f"pool_weights[{k}] is on {t.device} but the maps are on {first.device}")


def _root(t: Tensor) -> Tensor:
    """The tensor whose memory ``t`` is a view of (``t`` itself if it is none): the grouped launches read and
    write the maps where they lie in it. Autograd never goes through it: the maps stay the Functions' inputs and
    get their spans of the one gradient (`view_gradients`), so their own gradient hooks and autograd.grad see
    everything, whether or not the tensor itself requires grad."""
    return t if t._base is None else t._base


def view_gradients(d_base: Tensor, shapes, firsts) -> tuple[Tensor, ...]:
    """The gradient of each view of a buffer from the buffer's gradient ``d_base``: its span, starting at element
    ``firsts[i]``, in ``shapes[i]`` (views of ``d_base``: no copy; autograd assembles them for the buffer once)."""
    flat = d_base.view(-1)
    return tuple(flat[first:first + math.prod(shape)].view(shape) for shape, first in zip(shapes, firsts))


def autograd_inputs(base: Tensor, views, buffer_gradient: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
    """(buffer, views) to give a grouped Function that reads ``views`` in ``base``: with ``buffer_gradient`` the
    buffer is the differentiable input and no view is (where the buffer requires grad as the views do: else
    their gradient would be lost; and where the views, which share no element, fill it: the backward writes the
    buffer's gradient only where they are); otherwise the views are, and the buffer is only the memory the
    launch reads."""
    if (buffer_gradient and all(v.requires_grad == base.requires_grad for v in views)
            and sum(v.numel() for v in views) == base.numel()):
        return base, ()
    return base.detach(), tuple(views)


def _start_in(t: Tensor, base: Tensor):
    """t's first element relative to base's, if t is a contiguous view inside it; else None."""
    first = t.storage_offset() - base.storage_offset()
    inside = _root(t) is base and t.is_contiguous() and 0 <= first and first + t.numel() <= base.numel()
    return first if inside else None


def _shared_places(maps, pool_weights):
    """(base, weights, places) where every map is a contiguous NCHW view of one contiguous tensor, no two maps
    sharing an element, and every pooling weight a view of another; None otherwise."""
    tensors = [m for m in maps if m is not None]
    base = _root(tensors[0])
    pairs = [pair for pair in pool_weights if pair is not None]
    # Without weights the kernels get an empty one of their dtype, which they never read.
    weights = _root(pairs[0][0]) if pairs else base.new_empty((0,), dtype=acc_dtype(base))
    if not (base.is_contiguous() and base.dtype == tensors[0].dtype and weights.is_contiguous()
            and weights.dtype == acc_dtype(base)):
        return None
    places, spans = [], []
    for m, pair in zip(maps, pool_weights):
        if m is None:
            places.append(None)
            continue
        first = _start_in(m, base)
        starts = (-1, -1) if pair is None else tuple(_start_in(t, weights) for t in pair)
        if first is None or None in starts:
            return None
        places.append((first, *m.shape[2:], *starts))
        spans.append((first, first + m.numel()))
    spans.sort()
    if any(a_end > b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])):
        return None
    return base, weights, places


class _GroupedMoments(torch.autograd.Function):
    """The moments of maps that lie in one buffer, read there in one launch. The one gradient the backward
    launch writes goes to the buffer (an input when the caller asks so) or, in spans, to the maps."""

    @staticmethod
    def forward(ctx, base, weights, places, n, c, *maps):
        _check_runnable(base, "channel_moments_grouped")
        with _device_guard(base):
            out, plan = grouped_moments_forward(base, weights, places, n, c)
        ctx.save_for_backward(base, weights, out)
        # The plan's device table too: the backward writes none of its own.
        ctx.places, ctx.plan = places, plan
        ctx.shapes = [m.shape for m in maps]
        return out

    @staticmethod
    @first_order_backward
    def backward(ctx, grad):
        base, weights, out = ctx.saved_tensors
        need_base, need_maps = ctx.needs_input_grad[0], any(ctx.needs_input_grad[5:])
        d_base, d_maps = None, (None,) * len(ctx.shapes)
        if need_base or need_maps:
            with _device_guard(base):
                d_base = grouped_moments_backward(grad, base, weights, out, ctx.places, ctx.plan)
        if need_maps:
            d_maps = view_gradients(d_base, ctx.shapes, [place[0] for place in ctx.places if place is not None])
        return (d_base if need_base else None, None, None, None, None, *d_maps)


def _one_map(m, pair):
    """channel_moments(m) and m's pooled value per (image, channel): (N, C, 3)."""
    moments = channel_moments(m)
    if pair is None:
        pooled = moments[..., 0]
    else:
        row, col = (t.detach() for t in pair)
        pooled = torch.einsum("nchw,h,w->nc", m.to(row.dtype), row, col)
    return torch.cat((moments, pooled[..., None]), dim=-1)


def channel_moments_grouped(maps: Sequence[Tensor | None],
                            pool_weights: Sequence[tuple[Tensor, Tensor] | None] | None = None, *,
                            buffer_gradient: bool = False) -> Tensor:
    """`channel_moments` of K maps stacked, and a weighted spatial mean of each: one launch each way.

    out[k, ..., :2] = channel_moments(maps[k]); out[k, ..., 2] = sum over (h, w) of row[h] * col[w] *
    maps[k][..., h, w] for pool_weights[k] = (row, col), else the mean out[k, ..., 0]. DyHead pools a branch
    that it upsamples: the mean of a bilinear upsampling is such a weighted mean of the map, so the upsampled map
    need not be read. Zeros where maps[k] is None.

    Where the maps are contiguous NCHW views of one contiguous tensor, no two sharing an element (the outputs of
    `modulated_deform_conv2d_sets`), and the weights views of another, it takes one moments launch, one merge
    and one backward launch for all, and each map's gradient is its span of one tensor. Otherwise, and under
    tracing (torch.compile), it is `channel_moments` per map, stacked. The results agree to rounding: the pixel
    runs that are merged may differ.

    Args:
        maps: K >= 1 entries, each a tensor (N, C, H_k, W_k) with H_k*W_k > 0 or None (a row of zeros, with no
            gradient); the tensors of one N, C, dtype (float32/float16/bfloat16/float64) and device (CUDA, or CPU
            under ``TRITON_INTERPRET=1``), any H_k, W_k.
        pool_weights: None, or K entries, each None or a pair (row (H_k,), col (W_k,)) of float32 tensors
            (float64 for float64 maps) on the maps' device. Constants: they get no gradient.
        buffer_gradient: on the one-launch path, where the maps fill their tensor, that one tensor is the
            gradient of the maps' tensor instead, which autograd adds to the tensor's other gradients once rather
            than map by map; the maps get none of it (hooks on them and autograd.grad with respect to them miss
            it). For callers whose maps are intermediate values, such as DyHead's level pass.

    Returns:
        (K, N, C, 3) contiguous [mean, M2, pooled] per map, image and channel, float32 (float64 for float64 maps).

    Raises:
        TypeError / ValueError: not a list, no tensor, a non-floating or non-4-d map, maps of different N, C,
            dtype or device, a map without pixels; pool_weights of the wrong length, or weights of the wrong
            shape, dtype or device, or for a None map.
        RuntimeError: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    first = _check_maps(maps)
    if pool_weights is None:
        pool_weights = [None] * len(maps)
    _check_pool_weights(maps, pool_weights, first)
    tensors = [m for m in maps if m is not None] + [t for pair in pool_weights if pair is not None for t in pair]
    shared = _shared_places(maps, pool_weights) if eager_call(*tensors) else None
    if shared is None:
        zeros = first.new_zeros((*first.shape[:2], 3), dtype=acc_dtype(first)) if any(m is None for m in maps) else None
        return torch.stack([zeros if m is None else _one_map(m, pair) for m, pair in zip(maps, pool_weights)])
    base, weights, places = shared
    base, views = autograd_inputs(base, [m for m in maps if m is not None], buffer_gradient)
    return _GroupedMoments.apply(base, weights, places, first.shape[0], first.shape[1], *views)
