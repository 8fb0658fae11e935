"""Adaptive Training Sample Selection (Zhang et al., CVPR 2020), as in the ATSS release."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

__all__ = ["ATSSAssigner", "BACKGROUND", "IGNORE"]

BACKGROUND = -1
IGNORE = -2  # RetinaNet's matcher: IoU between its two thresholds (ATSS ignores no anchor)


def _centres(boxes: Tensor) -> Tensor:
    return (boxes[:, :2] + boxes[:, 2:]) / 2


def _inside(points: Tensor, boxes: Tensor, margin: float) -> Tensor:
    """``(P, 2)`` points, ``(G, 4)`` boxes -> ``(P, G)`` bool: the point lies more than ``margin`` inside."""
    ltrb = torch.cat((points[:, None] - boxes[None, :, :2], boxes[None, :, 2:] - points[:, None]), dim=2)
    return ltrb.min(dim=2).values > margin


class ATSSAssigner:
    """Assigns each anchor to a ground-truth box or to the background.

    For every ground truth, the ``topk`` anchors of each level whose centres are closest to its centre are
    candidates; those whose IoU reaches the mean + standard deviation of the candidates' IoUs and whose
    centre lies inside the box are positives. An anchor positive for several boxes goes to the one it
    overlaps most. Every anchor is a positive or ``BACKGROUND``: crowd boxes are removed before, as
    detectron2's data loader does for the release.

    Args:
        topk: candidates per level and ground truth (9 in the paper).
    """

    def __init__(self, topk: int = 9):
        self.topk = topk

    def __call__(self, anchors: Tensor, num_anchors_per_level: list[int], gt_boxes: Tensor) -> Tensor:
        """Matches one image's anchors.

        Args:
            anchors: ``(A, 4)`` float x1,y1,x2,y2, all levels concatenated, finest first.
            num_anchors_per_level: how many of ``anchors`` belong to each level; sums to A.
            gt_boxes: ``(G, 4)`` float x1,y1,x2,y2, no crowd boxes.

        Returns:
            ``(A,)`` int64: the index of the matched box in ``gt_boxes`` or ``BACKGROUND`` (-1).
        """
        num_anchors = anchors.shape[0]
        matched = torch.full((num_anchors,), BACKGROUND, dtype=torch.int64, device=anchors.device)
        num_gt = gt_boxes.shape[0]
        anchor_centres = _centres(anchors)
        if num_gt > 0:
            ious = box_iou(anchors, gt_boxes)  # (A, G)
            # exact differences, as the release: cdist's default matrix-product form (past 25 points) errs by
            # ~0.1 pixel at a thousand pixels from the origin and would swap near-equidistant candidates
            distances = torch.cdist(
                anchor_centres, _centres(gt_boxes), compute_mode="donot_use_mm_for_euclid_dist"
            )  # (A, G)
            candidates = []
            start = 0
            for count in num_anchors_per_level:
                k = min(self.topk, count)
                _, idx = distances[start : start + count].topk(k, dim=0, largest=False)
                candidates.append(idx + start)
                start += count
            candidate_idx = torch.cat(candidates)  # (C, G)
            gt_range = torch.arange(num_gt, device=anchors.device)
            candidate_ious = ious[candidate_idx, gt_range]  # (C, G)
            threshold = candidate_ious.mean(0) + candidate_ious.std(0)
            centre_inside = _inside(anchor_centres, gt_boxes, 0.01)[candidate_idx, gt_range]
            is_pos = (candidate_ious >= threshold) & centre_inside  # (C, G)

            pos_ious = torch.full_like(ious, -1.0)
            gt_idx = gt_range.expand_as(candidate_idx)
            pos_ious[candidate_idx[is_pos], gt_idx[is_pos]] = ious[candidate_idx[is_pos], gt_idx[is_pos]]
            best_iou, best_gt = pos_ious.max(dim=1)
            matched = torch.where(best_iou >= 0, best_gt, matched)
        return matched
