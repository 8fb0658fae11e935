"""Post-processing shared by the detectors: mapping detections back to original image pixels."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import clip_boxes_to_image

__all__ = ["rescale_detections"]


def rescale_detections(
    detections: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]], original_sizes: list[tuple[int, int]]
) -> list[dict[str, Tensor]]:
    """Scales each image's ``boxes`` ``(D, 4)`` x1,y1,x2,y2 from input pixels (``image_sizes``, the resized
    content's ``(h, w)``) to original pixels (``original_sizes``) and clips them there, in place; returns
    ``detections``."""
    for det, (h, w), (oh, ow) in zip(detections, image_sizes, original_sizes):
        ratio = torch.tensor([ow / w, oh / h, ow / w, oh / h], device=det["boxes"].device, dtype=det["boxes"].dtype)
        det["boxes"] = clip_boxes_to_image(det["boxes"] * ratio, (oh, ow))
    return detections
