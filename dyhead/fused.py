"""The per-level work of a DyHead block on the Triton level-pass kernels (``backend="triton"``).

After the deformable convs, the reference path runs GroupNorm on each branch, upsamples the coarser one, then
the scale attention and the dynamic ReLU: some fifty small ops per level. All of it is affine per (image,
channel) once a few spatial means are known: GroupNorm is ``y * a + d`` given its group statistics, bilinear
upsampling (weights summing to one) commutes with that, and both attentions read only spatial means of affine
maps of the raw conv outputs. So a level costs per-channel moments of each raw branch, some arithmetic on
(N, B, C) tensors (batched over the block's levels), and one elementwise pass (`kernels.level_combine`). The
attention and coefficient math is the modules' own (`ScaleAttention.attention`, `TaskAttention.coefficients`):
it lives there once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import channel_moments, level_combine

from .scale import ScaleAttention
from .task import TaskAttention


def group_norm_affine(moments: Tensor, pixels: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float
                      ) -> tuple[Tensor, Tensor]:
    """GroupNorm of maps as ``y * a + d`` per (map, image, channel).

    moments: (..., N, C, 2) per-channel (mean, M2) of each map y over its pixels, float32/float64;
    pixels: (..., 1, 1) the maps' pixel counts; weight, bias: (..., 1, C) the GroupNorm affine of each map.
    Returns (a, d), each (..., N, C) in the moments' dtype.
    """
    *batch, n, c, _ = moments.shape
    mean, m2 = moments.view(*batch, n, groups, c // groups, 2).unbind(-1)
    mu = mean.mean(-1, keepdim=True)  # every channel counts the same pixels
    pixels = pixels[..., None]
    # Chan's merge of the channels' moments into their group's.
    m2_group = m2.sum(-1, keepdim=True) + pixels * (mean - mu).square().sum(-1, keepdim=True)
    rstd = (m2_group / (pixels * (c // groups)) + eps).rsqrt()
    a = rstd * weight.to(rstd.dtype).view(*weight.shape[:-1], groups, -1)
    d = bias.to(rstd.dtype).view(*bias.shape[:-1], groups, -1) - mu * a
    return a.reshape(*batch, n, c), d.reshape(*batch, n, c)


def block_forward(levels: Sequence[Sequence[tuple[Tensor, nn.GroupNorm]]], scale: ScaleAttention,
                  task: TaskAttention) -> list[Tensor]:
    """A block's output from every level's branches before GroupNorm; same result as the reference
    ``[task(scale([upsample?(norm(y)) for y, norm in branches])) for branches in levels]``.

    levels: per level 1 to 3 (y, norm) pairs as `SpatialAttention.convolve` returns them, y (N, C, H_b, W_b) in
        the model's dtype; the first has the level's size, a branch of another size (the coarser one) is
        normalised and upsampled to it (bilinear, align_corners=True).
    Returns L tensors (N, C, H_l, W_l) in y's dtype.

    The small per-(image, channel) math of all levels runs batched over a (level, branch slot) grid of
    L x 3, the missing branches zero (GroupNorm weight and bias zero, so they add nothing): a few dozen small
    launches per block instead of per level.
    """
    maps, moments, means, weights, biases, pixels, inv_branches = [], [], [], [], [], [], []
    for branches in levels:
        size = branches[0][0].shape[-2:]
        level_maps = []
        for y, norm in branches:
            m = channel_moments(y)
            mean = m[..., 0]
            pixels.append(y.shape[-2] * y.shape[-1])
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=True)
                mean = channel_moments(y)[..., 0]  # the attentions pool the upsampled map
            level_maps.append(y)
            moments.append(m)
            means.append(mean)
            weights.append(norm.weight)
            biases.append(norm.bias)
        missing = 3 - len(branches)
        moments += [torch.zeros_like(moments[-1])] * missing
        means += [torch.zeros_like(means[-1])] * missing
        weights += [torch.zeros_like(weights[-1])] * missing
        biases += [torch.zeros_like(biases[-1])] * missing
        pixels += [1] * missing
        inv_branches.append(1.0 / len(branches))
        maps.append(level_maps)
    num, norm = len(levels), levels[0][0][1]
    n, c, _ = moments[0].shape
    acc = moments[0].dtype
    counts = torch.tensor(pixels, dtype=acc).to(moments[0].device, non_blocking=True).view(num, 3, 1, 1)
    inv_b = torch.tensor(inv_branches, dtype=acc).to(moments[0].device, non_blocking=True).view(num, 1, 1, 1)
    a, d = group_norm_affine(torch.stack(moments).view(num, 3, n, c, 2), counts,
                             torch.stack(weights).view(num, 3, 1, c), torch.stack(biases).view(num, 3, 1, c),
                             norm.num_groups, norm.eps)  # (L, 3, N, C)
    mean = torch.stack(means).view(num, 3, n, c)
    pooled = a * mean + d  # spatial means of the normalised branches
    param = scale.conv.weight.dtype
    att = scale.attention(pooled.view(-1, c, 1, 1).to(param)).view(num, 3, n, 1).to(acc)
    weight = att * a * inv_b  # u = sum_b weight_b * y_b + shift is the scale attention's mean
    shift = (att * d).sum(1) * inv_b[:, 0]  # (L, N, C)
    pooled_u = (weight * mean).sum(1) + shift
    coef = torch.stack(task.coefficients(pooled_u.view(-1, c).to(param)), 1).to(acc).view(num, n, 4, c)
    weight = weight.transpose(1, 2)  # (L, N, 3, C)
    return [level_combine(level_maps, weight[l, :, :len(level_maps)], shift[l], coef[l])
            for l, level_maps in enumerate(maps)]
