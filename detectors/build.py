"""Builds the detector that a config's ``model.meta_architecture`` names."""

from __future__ import annotations

from torch import nn

from .atss import build_atss_dyhead
from .config import ConfigError, ModelConfig
from .faster_rcnn import build_faster_rcnn_dyhead
from .retinanet import build_retinanet_dyhead

__all__ = ["ARCHITECTURES", "build_detector"]

ARCHITECTURES = {
    "atss": build_atss_dyhead,
    "faster_rcnn": build_faster_rcnn_dyhead,
    "retinanet": build_retinanet_dyhead,
}


def build_detector(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The detector ``cfg`` describes, with ``num_classes`` object classes (no background class).

    Every detector takes ``(images (N, 3, H, W) float, image_sizes, targets=None, original_sizes=None)`` and
    returns a dict of scalar losses in training, per-image ``boxes``/``scores``/``labels`` in eval, and has a
    ``num_classes`` attribute.
    """
    if cfg.meta_architecture not in ARCHITECTURES:
        raise ConfigError(
            f"unknown model.meta_architecture {cfg.meta_architecture!r}; expected one of {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[cfg.meta_architecture](cfg, num_classes)
