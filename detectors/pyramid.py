"""The shared front of every detector here: backbone -> FPN -> DyHead neck."""

from __future__ import annotations

from torch import nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from dyhead import DyHead

from .backbones import build_backbone
from .config import ModelConfig

__all__ = ["PYRAMID_STRIDES", "build_fpn_dyhead"]

PYRAMID_STRIDES = {2: (4, 8, 16, 32, 64), 3: (8, 16, 32, 64, 128)}


def build_fpn_dyhead(
    cfg: ModelConfig, first_level: int = 3, task_attention: bool = True
) -> tuple[nn.Module, nn.Module, DyHead]:
    """Backbone, FPN and DyHead neck for a five-level pyramid starting at P{first_level}.

    first_level 3: P3-P7, P6 and P7 from P5 (ATSS, RetinaNet); first_level 2: P2-P6, P6 a stride-2 max-pool
    of P5 (Faster R-CNN). The FPN returns an ``OrderedDict`` of ``(N, fpn_channels, H/s, W/s)`` for the
    strides in ``PYRAMID_STRIDES[first_level]``; the neck maps it to ``dyhead_channels`` with the same keys.
    ``task_attention`` False leaves the task-aware attention out of the neck (two-stage detectors apply it
    per RoI in the box head).
    """
    backbone = build_backbone(cfg.backbone, first_level)
    extra = LastLevelP6P7(cfg.fpn_channels, cfg.fpn_channels) if first_level == 3 else LastLevelMaxPool()
    fpn = FeaturePyramidNetwork(backbone.out_channels, cfg.fpn_channels, extra_blocks=extra)
    neck = DyHead(
        cfg.fpn_channels,
        cfg.dyhead_channels,
        cfg.dyhead_blocks,
        backend=cfg.dyhead_backend,
        high_offsets=cfg.dyhead_high_offsets,
        task_attention=task_attention,
    )
    return backbone, fpn, neck
