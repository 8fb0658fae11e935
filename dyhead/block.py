"""DyHeadBlock (one scale + spatial + task attention step over a pyramid) and DyHead (a stack of them)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TypeVar

from torch import Tensor, nn

from .deform import check_backend, resolve_backend
from .fused import block_forward
from .scale import ScaleAttention
from .spatial import SpatialAttention
from .task import TaskAttention

Pyramid = TypeVar("Pyramid", list, tuple, Mapping)


def check_pyramid(levels: Sequence[Tensor], in_channels: int, names: Sequence[str] | None = None) -> None:
    """Raise ValueError (TypeError for a dtype that is not floating point), naming the level, unless ``levels``
    is a DyHead-compatible pyramid.

    levels: L >= 1 tensors (N, in_channels, H_l, W_l), finest first, all of one batch size, floating dtype and
    device, H_l, W_l >= 1, each level ceil(previous / 2) in size so that the stride-2 branch lines up.
    """
    if len(levels) == 0:
        raise ValueError("DyHead needs at least one pyramid level, got none")
    names = list(names) if names is not None else [str(i) for i in range(len(levels))]
    first = levels[0]
    for name, x, prev in zip(names, levels, [None, *levels[:-1]]):
        where = f"level {name!r}"
        if not hasattr(x, "dim") or x.dim() != 4:
            raise ValueError(f"{where}: expected a 4-d tensor (N, C, H, W), got {getattr(x, 'shape', type(x))}")
        if x.shape[1] != in_channels:
            raise ValueError(f"{where}: has {x.shape[1]} channels, expected in_channels={in_channels}")
        if x.shape[0] != first.shape[0]:
            raise ValueError(f"{where}: batch size {x.shape[0]} differs from the first level's {first.shape[0]}")
        if not x.is_floating_point():
            raise TypeError(f"{where}: dtype {x.dtype} is not floating point (float32/float16/bfloat16/float64)")
        if x.dtype != first.dtype:
            raise ValueError(f"{where}: dtype {x.dtype} differs from the first level's {first.dtype}")
        if x.device != first.device:
            raise ValueError(f"{where}: device {x.device} differs from the first level's {first.device}")
        if 0 in x.shape[-2:]:
            raise ValueError(f"{where}: size {tuple(x.shape[-2:])} has no pixels; every level needs H, W >= 1")
        if prev is not None:
            expected = tuple(-(-s // 2) for s in prev.shape[-2:])
            if tuple(x.shape[-2:]) != expected:
                raise ValueError(
                    f"{where}: size {tuple(x.shape[-2:])} is not ceil(previous / 2) = {expected} of the previous "
                    f"level's {tuple(prev.shape[-2:])}; pad images to a multiple of the coarsest stride"
                )


class DyHeadBlock(nn.Module):
    """One DyHead block: for each level l, spatial branches -> scale-aware mean -> task-aware dynamic ReLU.

    out[l] = TaskAttention(ScaleAttention(SpatialAttention(x)[l])), see each module for its formula; without
    task attention out[l] = ScaleAttention(SpatialAttention(x)[l]). On the triton backend everything after the
    deformable convs runs as the fused level pass (:mod:`dyhead.fused`).

    Args:
        in_channels: Cin of the input levels.
        channels: C of the output levels (divisible by 16).
        backend: deformable conv implementation ("torchvision", "sampled", "triton", "auto").
        high_offsets: how the coarser branch reads offsets ("official" or "crop").
        task_attention: False leaves the task attention out (``task`` is None, no ``task.*`` weights), as the
            paper's two-stage detectors do, whose box head applies it per RoI instead.

    forward(levels: L tensors (N, Cin, H_l, W_l), finest first, H_l = ceil(H_{l-1} / 2) (unchecked here: DyHead
    checks with :func:`check_pyramid`; the deformable convs raise on other sizes)) -> L tensors (N, C, H_l, W_l),
    same dtype.
    """

    def __init__(self, in_channels: int, channels: int, *, backend: str = "auto", high_offsets: str = "official",
                 task_attention: bool = True):
        super().__init__()
        self.spatial = SpatialAttention(in_channels, channels, backend=backend, high_offsets=high_offsets)
        self.scale = ScaleAttention(channels)
        self.task = TaskAttention(channels) if task_attention else None

    def forward(self, levels: Sequence[Tensor]) -> list[Tensor]:
        if resolve_backend(self.spatial.backend, levels[0].device) == "triton":
            return block_forward(self.spatial.convolve(levels), self.scale, self.task)
        out = [self.scale(branches) for branches in self.spatial(levels)]
        return out if self.task is None else [self.task(x) for x in out]


class DyHead(nn.Module):
    """Dynamic Head (Dai et al., CVPR 2021): ``num_blocks`` DyHeadBlocks over a feature pyramid.

    Args:
        in_channels: channels of the input levels (block 0's input).
        channels: channels of every block's output (divisible by 16 for GroupNorm(16)); the paper uses 256.
        num_blocks: blocks stacked; the paper uses 6.
        backend: deformable conv implementation: "torchvision" (alias "torch", ``torchvision.ops.deform_conv2d``),
            "sampled" (pure PyTorch, fast on the CPU), "triton" (fused kernels), or "auto" (triton on CUDA,
            sampled elsewhere).
        high_offsets: "official" reproduces the release's reading of the coarser branch's offsets (the released
            weights need it); "crop" crops them as mmdetection >= 3.3. See :func:`dyhead.spatial.coarser_view`.
        task_attention: False builds the blocks without task-aware attention (see :class:`DyHeadBlock`): the
            paper's neck before a two-stage detector's RoI pooling. The released weights have it (True).

    forward(levels) takes a list, tuple or mapping (e.g. torchvision FPN's OrderedDict) of L >= 1 levels, finest
    first, each (N, in_channels, H_l, W_l) float64/float32/bfloat16/float16 with H_l = ceil(H_{l-1} / 2), and
    returns the same container type (same keys; namedtuples too; a mapping other than a dict comes back as a
    dict) of (N, channels, H_l, W_l).
    """

    def __init__(
        self, in_channels: int, channels: int = 256, num_blocks: int = 6, *, backend: str = "auto",
        high_offsets: str = "official", task_attention: bool = True,
    ) -> None:
        super().__init__()
        # 0 is a multiple of 16: without this check an empty DyHead failed only at its first forward
        if in_channels < 1 or channels < 1:
            raise ValueError(f"in_channels={in_channels} and channels={channels} must be positive")
        if channels % 16 != 0:
            raise ValueError(f"channels={channels} must be divisible by 16 (GroupNorm(16) after every conv)")
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be at least 1")
        self.in_channels = in_channels
        self.channels = channels
        self.blocks = nn.ModuleList(
            DyHeadBlock(in_channels if i == 0 else channels, channels, backend=backend, high_offsets=high_offsets,
                        task_attention=task_attention)
            for i in range(num_blocks)
        )

    @property
    def backend(self) -> str:
        """The deformable conv backend of every block; assign to switch (same weights)."""
        return self.blocks[0].spatial.backend

    @backend.setter
    def backend(self, name: str) -> None:
        name = check_backend(name)
        for block in self.blocks:
            block.spatial.backend = name

    def forward(self, levels: Pyramid) -> Pyramid:
        if isinstance(levels, Mapping):
            names, tensors = list(levels.keys()), list(levels.values())
        elif isinstance(levels, (list, tuple)):
            names, tensors = None, list(levels)
        else:
            raise ValueError(f"DyHead takes a list, tuple or mapping of levels, got {type(levels).__name__}")
        check_pyramid(tensors, self.in_channels, names)
        for block in self.blocks:
            tensors = block(tensors)
        if isinstance(levels, Mapping):
            out = dict(zip(names, tensors))
            return type(levels)(out) if type(levels) in (dict, OrderedDict) else out
        if hasattr(levels, "_fields"):  # a namedtuple takes its fields one by one
            return type(levels)(*tensors)
        return type(levels)(tensors)
