"""The per-level work of a DyHead block on the Triton level-pass kernels (``backend="triton"``).

After the deformable convs, the reference path runs GroupNorm on each branch, upsamples the coarser one, then
the scale attention and the dynamic ReLU: some fifty small ops per level. All of it is affine per (image,
channel) once a few spatial means are known: GroupNorm is ``y * a + d`` given its group statistics, bilinear
upsampling (weights summing to one) commutes with that, and both attentions read only spatial means of affine
maps of the raw conv outputs; the mean of an upsampled map is a weighted mean of the map itself
(`upsampled_mean_weights`). So a block costs per-channel moments of every raw branch (all in one launch each
way, `kernels.channel_moments_grouped`, the branches being views of the convs' one output buffer), some
arithmetic on (N, B, C) tensors batched over the block's levels, and one elementwise pass over all levels
(`kernels.level_combine_grouped`: one launch forward, three backward; it reads the coarser branch upsampled, so
the upsampled map is never stored). The attention and coefficient math is the modules' own
(`ScaleAttention.attention`, `TaskAttention.coefficients`): it lives there once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from kernels import channel_moments_grouped, level_combine_grouped

from .scale import ScaleAttention
from .task import TaskAttention


def group_norm_affine(mean: Tensor, m2: Tensor, pixels: Tensor, weight: Tensor, bias: Tensor, groups: int,
                      eps: float) -> tuple[Tensor, Tensor]:
    """GroupNorm of maps as ``y * a + d`` per (map, image, channel).

    mean, m2: (..., N, C) per-channel mean and M2 (sum of squared deviations) of each map y over its pixels,
    float32/float64; pixels: (..., 1, 1) the maps' pixel counts; weight, bias: (..., 1, C) the GroupNorm affine
    of each map. Returns (a, d), each (..., N, C) in the moments' dtype.
    """
    *batch, n, c = mean.shape
    mean, m2 = mean.view(*batch, n, groups, c // groups), m2.view(*batch, n, groups, c // groups)
    mu = mean.mean(-1, keepdim=True)  # every channel counts the same pixels
    pixels = pixels[..., None]
    # Chan's merge of the channels' moments into their group's.
    m2_group = m2.sum(-1, keepdim=True) + pixels * (mean - mu).square().sum(-1, keepdim=True)
    rstd = (m2_group / (pixels * (c // groups)) + eps).rsqrt()
    a = rstd * weight.to(rstd.dtype).view(*weight.shape[:-1], groups, -1)
    d = bias.to(rstd.dtype).view(*bias.shape[:-1], groups, -1) - mu * a
    return a.reshape(*batch, n, c), d.reshape(*batch, n, c)


# shape_constants' tensors, by content. Never evicted: a CUDA graph that read one must find it unchanged at every
# replay. Keys are the pyramid's level sizes, so a run makes as many as it sees image sizes (bytes each).
_SHAPE_CONSTANTS: dict[tuple, Tensor] = {}


def shape_constants(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """values (numbers that depend only on the levels' shapes) as a 1-D tensor of dtype on device, copied to the
    device once per content and then reused.

    Reuse is what lets a CUDA graph capture the block: a host-to-device copy inside the capture would replay
    from freed host memory. So inside a capture an unseen content is an error (run the module once before
    capturing, as autotuning needs anyway); under torch.compile the values are a graph constant.
    """
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    key = (tuple(values), dtype, device)
    constants = _SHAPE_CONSTANTS.get(key)
    if constants is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("DyHead's triton backend met new pyramid sizes inside a CUDA graph capture: run "
                               "the module once on these sizes before capturing it (a warm-up)")
        with torch.inference_mode(False):  # an inference tensor, kept, would break a later training step
            constants = torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
        _SHAPE_CONSTANTS[key] = constants
    return constants


def upsampled_mean_weights(size_in: int, size_out: int) -> tuple[float, ...]:
    """w (size_in,) such that the mean of a bilinear resize (align_corners=True) of x from size_in to size_out
    along one axis is sum_i w[i] x[i]: each output's two interpolation weights, as torch computes them, summed at
    the inputs they read and divided by size_out. The mean of a 2-D resize is then sum_ij row[i] col[j] x[i, j].
    """
    scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    weights = [0.0] * size_in
    for o in range(size_out):
        src = scale * o
        i = int(src)
        step = 1 if i < size_in - 1 else 0
        frac = src - i
        weights[i] += (1.0 - frac) / size_out
        weights[i + step] += frac / size_out
    return tuple(weights)


# upsampling_pool_weights' (row, col) views by (resizes, dtype, device); never evicted, see _SHAPE_CONSTANTS.
_POOL_WEIGHTS: dict[tuple, list[tuple[Tensor, Tensor]]] = {}


def upsampling_pool_weights(resizes: Sequence[tuple[tuple[int, int], tuple[int, int]]], dtype: torch.dtype,
                            device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """Per resize ((H_in, W_in), (H_out, W_out)) the `upsampled_mean_weights` (row (H_in,), col (W_in,)) on
    device in dtype: views of one `shape_constants` tensor, made once per content."""
    key = (tuple(resizes), dtype, device)
    pairs = None if torch.compiler.is_compiling() else _POOL_WEIGHTS.get(key)
    if pairs is None:
        axes = [upsampled_mean_weights(size_in, size_out) for sizes_in, sizes_out in resizes
                for size_in, size_out in zip(sizes_in, sizes_out)]
        with torch.inference_mode(False):  # views kept for training calls: no inference views of the constants
            views = shape_constants([w for axis in axes for w in axis], dtype, device).split([len(a) for a in axes])
        pairs = list(zip(views[0::2], views[1::2]))
        if not torch.compiler.is_compiling():
            _POOL_WEIGHTS[key] = pairs
    return pairs


def block_forward(levels: Sequence[Sequence[tuple[Tensor, nn.GroupNorm]]], scale: ScaleAttention,
                  task: TaskAttention | None) -> list[Tensor]:
    """A block's output from every level's branches before GroupNorm; same result as the reference
    ``[task(scale([upsample?(norm(y)) for y, norm in branches])) for branches in levels]``, without ``task(...)``
    when task is None (a block without task attention).

    levels: per level 1 to 3 (y, norm) pairs as `SpatialAttention.convolve` returns them, y (N, C, H_b, W_b) in
        the model's dtype; the first has the level's size, a branch of another size (the coarser one, last) is
        normalised and upsampled to it (bilinear, align_corners=True).
    Returns L tensors (N, C, H_l, W_l) in y's dtype. ValueError where a level's maps hold one value per
    GroupNorm group in all (N * C / groups * H_l * W_l == 1), as torch's GroupNorm raises on the reference path.

    The small per-(image, channel) math of all levels runs batched over a (level, branch slot) grid of
    L x 3, a missing branch's slot zero (zero moments, GroupNorm weight and bias, so it adds nothing): a few
    dozen small launches per block instead of per level. Without task attention the dynamic ReLU gets the
    identity coefficients a1 = a2 = 1, b1 = b2 = 0 (max(u, u) = u; the kernel splits a tie's gradient half/half,
    which sums to 1), so the same fused kernels run. The branches are intermediate values: where they are views
    of one buffer, their gradient goes to it as one tensor, not to them (`kernels.channel_moments_grouped`).
    """
    slot_maps, resized, norm_slots, pixels, inv_branches = [], {}, [], [], []
    norms = list(dict.fromkeys(norm for branches in levels for _, norm in branches))  # the block's GroupNorms
    groups = norms[0].num_groups
    for l, branches in enumerate(levels):
        n, c, h, w = branches[0][0].shape
        # torch's GroupNorm raises on N * C / groups * H * W == 1 (one value per group: the output would be the
        # bias alone), and so does the reference path; no GroupNorm runs here, so the check is ours. Every branch
        # has some level's size, so checking each level's covers the coarser branches too.
        if n * (c // groups) * h * w == 1:
            raise ValueError(f"level {l}: its {h}x{w} maps of N={n} image(s) and C={c} channels hold one value per "
                             f"GroupNorm({groups}) group, which torch's GroupNorm refuses on the reference "
                             "backends: use more channels, a larger image or more images")
        size = branches[0][0].shape[-2:]
        for y, norm in branches:
            pixels.append(y.shape[-2] * y.shape[-1])
            slot_maps.append(y)
            norm_slots.append(norms.index(norm))
            if y.shape[-2:] != size:
                # The attentions pool the upsampled map: a weighted mean of y, taken with y's moments; the
                # combine reads y upsampled.
                resized[len(slot_maps) - 1] = (tuple(y.shape[-2:]), tuple(size))
        missing = 3 - len(branches)
        slot_maps += [None] * missing  # zero moments
        norm_slots += [len(norms)] * missing  # the zero row appended to the norms' parameters
        pixels += [1] * missing
        inv_branches.append(1.0 / len(branches))
    num, eps = len(levels), norms[0].eps
    acc = torch.float64 if slot_maps[0].dtype == torch.float64 else torch.float32
    pool_weights = [None] * len(slot_maps)
    for k, pair in zip(resized, upsampling_pool_weights(list(resized.values()), acc, slot_maps[0].device)):
        pool_weights[k] = pair
    # One launch each way for the block's conv outputs (views of one buffer): (3L, N, C, 3).
    # The branches are this block's intermediate values: their gradients go to their buffer as one tensor.
    moments = channel_moments_grouped(slot_maps, pool_weights, buffer_gradient=True)
    branches = [[y for y, _ in level] for level in levels]
    if torch.compiler.is_compiling():
        weight, shift, coef = _attention(moments, num, pixels, inv_branches, norm_slots, norms, groups, eps, scale,
                                         task)
        return level_combine_grouped(branches, weight, shift, coef, buffer_gradient=True)
    task_params = None if task is None else (task.fc1.weight, task.fc1.bias, task.fc2.weight, task.fc2.bias)
    weight, shift, coef = kernels.block_attention(
        moments, pixels, [k if k < len(norms) else -1 for k in norm_slots],
        torch.stack([norm.weight for norm in norms]), torch.stack([norm.bias for norm in norms]), groups, eps,
        scale.conv.weight.view(-1), scale.conv.bias, task_params)
    return level_combine_grouped(branches, weight, shift, coef, buffer_gradient=True)


def _attention(moments: Tensor, num: int, pixels: list[int], inv_branches: list[float], norm_slots: list[int],
               norms: list[nn.GroupNorm], groups: int, eps: float, scale: ScaleAttention,
               task: TaskAttention | None) -> tuple[Tensor, Tensor, Tensor]:
    """`kernels.block_attention` in torch ops, with the modules' own attention math: (weight (L, N, 3, C), shift
    (L, N, C), coef (L, N, 4, C)) from the moments (3L, N, C, 3) of the block's (level, slot) grid, its slots'
    pixel counts and GroupNorm indices (len(norms) for an empty slot) and its levels' 1 / branches."""
    n, c = moments.shape[1:3]
    acc = moments.dtype
    counts, inv_b, slots = shape_constants(pixels + inv_branches + norm_slots, acc, moments.device).split(
        [3 * num, num, 3 * num])
    slots = slots.long()
    # Gathered from one stacked copy: each parameter then gets one gradient, not one per level to accumulate.
    norm_weight = F.pad(torch.stack([norm.weight for norm in norms]), (0, 0, 0, 1))[slots]  # (3L, C)
    norm_bias = F.pad(torch.stack([norm.bias for norm in norms]), (0, 0, 0, 1))[slots]
    # One unbind: its backward is one stack, where slicing the columns would pad each column's gradient.
    mean, m2, pooled_mean = moments.view(num, 3, n, c, 3).unbind(-1)
    a, d = group_norm_affine(mean, m2, counts.view(num, 3, 1, 1),
                             norm_weight.view(num, 3, 1, c), norm_bias.view(num, 3, 1, c), groups,
                             eps)  # (L, 3, N, C)
    inv_b = inv_b.view(num, 1, 1, 1)
    pooled = a * pooled_mean + d  # spatial means of the normalised branches
    param = scale.conv.weight.dtype
    att = scale.attention(pooled.view(-1, c, 1, 1).to(param)).view(num, 3, n, 1).to(acc)
    weight = att * a * inv_b  # u = sum_b weight_b * y_b + shift is the scale attention's mean
    shift = (att * d).sum(1) * inv_b[:, 0]  # (L, N, C)
    if task is None:
        one, zero = torch.ones_like(shift), torch.zeros_like(shift)
        coef = torch.stack((one, zero, one, zero), 2)  # (L, N, 4, C)
    else:
        pooled_u = (weight * pooled_mean).sum(1) + shift
        coef = torch.stack(task.coefficients(pooled_u.view(-1, c).to(param)), 1).to(acc).view(num, n, 4, c)
    return weight.transpose(1, 2), shift, coef
