"""Spatial-aware attention: modulated deformable convs that bring each level and its neighbours to one size."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

import kernels

from .deform import ModulatedDeformConv2d, check_backend, deform_conv2d_sets, resolve_backend

HIGH_OFFSETS = ("official", "crop")


class DeformConvNorm(nn.Module):
    """A 3x3 modulated deformable conv (padding 1, with bias) followed by GroupNorm(16, Cout).

    forward(x: (N, Cin, H, W), offset: (N, 18, Hout, Wout), mask: (N, 9, Hout, Wout), backend) ->
    (N, Cout, Hout, Wout), Hout = ceil(H / stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = ModulatedDeformConv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(16, out_channels)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor, backend: str = "auto") -> Tensor:
        return self.norm(self.conv(x, offset, mask, backend))


def check_high_offsets(mode: str) -> str:
    """Return ``mode`` if it is one of `HIGH_OFFSETS`; ValueError otherwise."""
    if mode not in HIGH_OFFSETS:
        raise ValueError(f"unknown high_offsets {mode!r}: expected one of {', '.join(HIGH_OFFSETS)}")
    return mode


def coarser_view(t: Tensor, height: int, width: int, mode: str) -> Tensor:
    """Offsets or mask computed at a level's size (N, K, H, W), as read by the conv on the coarser level.

    ``"official"``: the released CUDA op indexes each image's contiguous [K, H, W] block as if it were
    [K, height, width], i.e. it reads that image's first K*height*width values. The released weights were trained
    with it. Here it is a view without a copy when each image's block is contiguous (true of a channel slice
    of the offset conv's output), else a view of a contiguous copy; views rather than ``as_strided`` with a
    storage offset, which ``torch.compile`` cannot trace.
    ``"crop"``: ``t[..., :height, :width]``, as mmdetection >= 3.3 does.
    Returns (N, K, height, width); ValueError for another mode.
    """
    # checked here too, not only by SpatialAttention: a misspelt mode (or one assigned to its high_offsets
    # later) would otherwise read as "official"
    if check_high_offsets(mode) == "crop":
        return t[..., :height, :width]
    n, k, h, w = t.shape
    if t.stride()[1:] != (h * w, w, 1):
        t = t.contiguous()
    return t.flatten(1)[:, :k * height * width].unflatten(1, (k, height, width))


class SpatialAttention(nn.Module):
    """The three branches that reach pyramid level l, each a deformable conv + GroupNorm at level l's size.

    ``om = offset(x[l])`` (a 3x3 conv to 27 channels); offsets ``om[:, :18]`` ((dy, dx) per tap, taps row-major),
    mask ``sigmoid(om[:, 18:])``. With these:

    - ``same``: on x[l], stride 1;
    - ``finer``: on x[l-1] (if l > 0), stride 2, whose output has x[l]'s size when H_l = ceil(H_{l-1} / 2);
    - ``coarser``: on x[l+1] (if l < L-1), stride 1, then bilinear upsampling (align_corners=True) to x[l]'s size.
      Its offsets were computed at x[l]'s size: ``high_offsets`` says how they are read (:func:`coarser_view`).

    Args:
        in_channels: Cin of the levels.
        channels: Cout of every branch (divisible by 16 for GroupNorm).
        backend: deformable conv implementation, see :mod:`dyhead.deform`.
        high_offsets: "official" or "crop".

    Initialised as the release: the offset conv keeps PyTorch's default Conv2d init, not zeros (the release's
    init_weights reaches only its deformable convs' containers and the scale attention; mmdetection zero-inits
    it), so training starts from random offsets and masks; the deformable convs as :class:`ModulatedDeformConv2d`.
    forward(levels: L tensors (N, Cin, H_l, W_l)) -> for each level l its 1 to 3 branches, each
    (N, Cout, H_l, W_l), in the order same, finer, coarser.
    """

    def __init__(self, in_channels: int, channels: int, *, backend: str = "auto", high_offsets: str = "official"):
        super().__init__()
        self.backend = check_backend(backend)
        self.high_offsets = check_high_offsets(high_offsets)
        self.offset = nn.Conv2d(in_channels, 27, kernel_size=3, padding=1)
        self.coarser = DeformConvNorm(in_channels, channels, stride=1)
        self.same = DeformConvNorm(in_channels, channels, stride=1)
        self.finer = DeformConvNorm(in_channels, channels, stride=2)

    def convolve(self, levels: Sequence[Tensor]) -> list[list[tuple[Tensor, nn.GroupNorm]]]:
        """Every level's branches before their GroupNorm, in forward's order: (deformable conv output, its
        GroupNorm). A coarser branch's output is at x[l+1]'s size; forward normalises it, then upsamples it.
        All the block's deformable convs run in one call (one launch on triton)."""
        triton = resolve_backend(self.backend, levels[0].device) == "triton"
        if triton:
            # All levels' offset convs as one (its weight's gradient comes out summed over the levels), into one
            # buffer of the oms. The deformable kernels take the mask logits and every offset and mask as a
            # view of that buffer, apply the sigmoid while sampling and write the gradients into the buffer's
            # directly: no sigmoid, no gradient per view to pad (the coarser views) and add up.
            om_buffer = kernels.pyramid_conv2d(levels, self.offset.weight, self.offset.bias)
            shapes = [(x.shape[0], self.offset.out_channels, *x.shape[2:]) for x in levels]
            oms = [part.view(shape) for part, shape in zip(om_buffer.split([math.prod(s) for s in shapes]), shapes)]
        else:  # the release's ops
            oms = [self.offset(x) for x in levels]  # (N, 27, H_l, W_l)
        # split, not two slices: its backward is one concatenation, where each slice's backward pads with zeros.
        offsets, logits = zip(*(om.split([18, 9], dim=1) for om in oms))  # (N, 18 | 9, H_l, W_l)
        offsets, masks = list(offsets), list(logits) if triton else [t.sigmoid() for t in logits]
        last = len(levels) - 1
        sets = [(self.same, range(last + 1), offsets, masks)]
        if last:
            sizes = [coarse.shape[-2:] for coarse in levels[1:]]
            sets += [(self.finer, range(last), offsets[1:], masks[1:]),
                     (self.coarser, range(1, last + 1),
                      [coarser_view(t, *size, self.high_offsets) for t, size in zip(offsets, sizes)],
                      [coarser_view(t, *size, self.high_offsets) for t, size in zip(masks, sizes)])]
        branches, indices, set_offsets, set_masks = zip(*sets)
        outs = deform_conv2d_sets(self.backend, levels, [b.conv.weight for b in branches],
                                  [b.conv.bias for b in branches], indices, set_offsets, set_masks,
                                  [b.conv.stride for b in branches], self.same.conv.padding,
                                  sample_bases=[om_buffer] if triton else None, mask_logits=triton)
        same, finer, coarser = outs if last else (outs[0], [], [])
        return [[(same[l], self.same.norm)]
                + ([(finer[l - 1], self.finer.norm)] if l > 0 else [])
                + ([(coarser[l], self.coarser.norm)] if l < last else [])
                for l in range(len(levels))]

    def forward(self, levels: Sequence[Tensor]) -> list[list[Tensor]]:
        out = []
        for x, branches in zip(levels, self.convolve(levels)):
            normed = [norm(y) for y, norm in branches]
            out.append([b if b.shape[-2:] == x.shape[-2:] else
                        F.interpolate(b, size=x.shape[-2:], mode="bilinear", align_corners=True) for b in normed])
        return out
