"""Post-processing shared by the detectors: choosing the detections among decoded candidates, and mapping them
back to original image pixels."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image

__all__ = ["rescale_detections", "select_detections"]


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


def select_detections(
    boxes: Tensor, scores: Tensor, labels: Tensor, size: tuple[int, int], nms_thresh: float, detections_per_img: int
) -> dict[str, Tensor]:
    """One image's detections from its decoded candidates, in the order of detectron2's dense detectors.

    Class-wise NMS on the unclipped boxes keeps at most ``detections_per_img``; only then are the boxes clipped to
    the image and those left empty dropped (detectron2's ``detector_postprocess``). Clipping first would change
    which boxes NMS suppresses: two boxes overlapping little may become one after clipping. detectron2 clips after
    scaling the boxes to the original image size; scaling by positive factors leaves the same boxes empty.

    Args:
        boxes: ``(D, 4)`` float x1,y1,x2,y2 in input pixels, unclipped.
        scores: ``(D,)`` float.
        labels: ``(D,)`` int64.
        size: ``(h, w)`` of the image's unpadded content.
        nms_thresh: IoU above which NMS suppresses the lower-scored box of a class.

    Returns:
        ``boxes`` ``(D', 4)`` clipped to ``size`` with positive width and height, ``scores`` ``(D',)``, ``labels``
        ``(D',)``, sorted by decreasing score, D' <= ``detections_per_img``.
    """
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
    boxes = clip_boxes_to_image(boxes[keep], size)
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    keep = keep[nonempty]
    return {"boxes": boxes[nonempty], "scores": scores[keep], "labels": labels[keep]}
