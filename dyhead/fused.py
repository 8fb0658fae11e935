"""The per-level work of a DyHead block on the Triton level-pass kernels (``backend="triton"``).

After the deformable convs, the reference path runs GroupNorm on each branch, upsamples the coarser one, then
the scale attention and the dynamic ReLU: some fifty small ops per level. All of it is affine per (image,
channel) once a few spatial means are known: GroupNorm is ``y * a + d`` given its group statistics, bilinear
upsampling (weights summing to one) commutes with that, and both attentions read only spatial means of affine
maps of the raw conv outputs. So a level costs per-channel moments of each raw branch, some arithmetic on
(N, B, C) tensors, and one elementwise pass (`kernels.level_pass.level_combine`). The attention and coefficient
math is the modules' own (`ScaleAttention.attention`, `TaskAttention.coefficients`): it lives there once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import channel_moments, level_combine

from .scale import ScaleAttention
from .task import TaskAttention


def group_norm_affine(moments: Tensor, pixels: int, norm: nn.GroupNorm) -> tuple[Tensor, Tensor]:
    """GroupNorm of a map as ``y * a + d`` per (image, channel).

    moments: (N, C, 2) per-channel (mean, M2) of the map y over its `pixels` pixels, float32/float64.
    Returns (a, d), each (N, C) in the moments' dtype.
    """
    n, c, _ = moments.shape
    groups = norm.num_groups
    mean, m2 = moments.view(n, groups, c // groups, 2).unbind(-1)
    mu = mean.mean(-1, keepdim=True)  # every channel counts the same pixels
    # Chan's merge of the channels' moments into their group's.
    m2_group = m2.sum(-1, keepdim=True) + pixels * (mean - mu).square().sum(-1, keepdim=True)
    rstd = (m2_group / (pixels * (c // groups)) + norm.eps).rsqrt()
    a = rstd * norm.weight.to(rstd.dtype).view(groups, -1)
    d = norm.bias.to(rstd.dtype).view(groups, -1) - mu * a
    return a.reshape(n, c), d.reshape(n, c)


def level_forward(branches: Sequence[tuple[Tensor, nn.GroupNorm]], scale: ScaleAttention, task: TaskAttention
                  ) -> Tensor:
    """One level of a block from its branches before GroupNorm; same result as the reference
    ``task(scale([upsample?(norm(y)) for y, norm in branches]))``.

    branches: 1 to 3 (y, norm) pairs as `SpatialAttention.convolve` returns them, y (N, C, H_b, W_b) in the
        model's dtype; the first has the level's size, a branch of another size (the coarser one) is
        normalised and upsampled to it (bilinear, align_corners=True).
    Returns (N, C, H, W) in y's dtype.
    """
    size = branches[0][0].shape[-2:]
    maps, affines, means = [], [], []
    for y, norm in branches:
        moments = channel_moments(y)
        affines.append(group_norm_affine(moments, y.shape[-2] * y.shape[-1], norm))
        mean = moments[..., 0]
        if y.shape[-2:] != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=True)
            mean = channel_moments(y)[..., 0]  # the attentions pool the upsampled map
        maps.append(y)
        means.append(mean)
    a = torch.stack([a for a, _ in affines], 1)  # (N, B, C)
    d = torch.stack([d for _, d in affines], 1)
    mean = torch.stack(means, 1)
    n, b, c = a.shape
    pooled = a * mean + d  # spatial means of the normalised branches
    param = scale.conv.weight.dtype
    att = scale.attention(pooled.view(n * b, c, 1, 1).to(param)).view(n, b, 1).to(a.dtype)
    weight = att * a / b  # u = sum_b weight_b * y_b + shift is the scale attention's mean
    shift = (att * d).sum(1) / b
    coef = torch.stack(task.coefficients(((weight * mean).sum(1) + shift).to(param)), 1).to(a.dtype)
    return level_combine(maps, weight, shift, coef)
