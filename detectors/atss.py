"""ATSS detector (Zhang et al., CVPR 2020) with an FPN and a DyHead neck, as in the DyHead release.

The head is the release's ``extra/atss.py`` with ``NUM_CONVS 0``: DyHead already is the tower, so the
head is three 1x1 convolutions (class logits, box deltas, centerness) shared across levels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from .atss_assigner import ATSSAssigner
from .box_coder import BoxCoder
from .config import ModelConfig
from .detections import select_detections
from .engine.distributed import get_world_size, sum_across_processes
from .one_stage import OneStageDetector
from .pyramid import PYRAMID_STRIDES, build_fpn_dyhead

__all__ = ["Scale", "ATSSHead", "ATSS", "make_anchors", "centerness_targets", "build_atss_dyhead"]

STRIDES = PYRAMID_STRIDES[3]


class Scale(nn.Module):
    """Multiplies its input by a learnable scalar (one per level on the box deltas).

    Args:
        init: initial value.
    """

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        """Any shape -> same shape."""
        return x * self.scale


def make_anchors(
    sizes: list[tuple[int, int]], strides: tuple[int, ...], scale: float, device: torch.device
) -> list[Tensor]:
    """One square anchor per location, centred at ``(x + 0.5) * stride`` with side ``scale * stride``.

    Args:
        sizes: ``(H_l, W_l)`` of each level.
        strides: stride of each level.
        scale: anchor side in strides (8 in ATSS).

    Returns:
        Per level, ``(H_l * W_l, 4)`` float32 x1,y1,x2,y2 in row-major location order.
    """
    anchors = []
    for (h, w), stride in zip(sizes, strides):
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack((cx, cy, cx, cy), dim=-1).reshape(-1, 4)
        half = scale * stride / 2
        anchors.append(centres + torch.tensor([-half, -half, half, half], device=device))
    return anchors


def centerness_targets(anchors: Tensor, boxes: Tensor) -> Tensor:
    """FCOS centerness of anchor centres inside their boxes.

    Args:
        anchors, boxes: ``(P, 4)`` float x1,y1,x2,y2, matched row by row; the anchor centres lie inside.

    Returns:
        ``(P,)`` float in (0, 1]: ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))``.
    """
    cx = (anchors[:, 0] + anchors[:, 2]) / 2
    cy = (anchors[:, 1] + anchors[:, 3]) / 2
    lr = torch.stack((cx - boxes[:, 0], boxes[:, 2] - cx), dim=1)
    tb = torch.stack((cy - boxes[:, 1], boxes[:, 3] - cy), dim=1)
    ratio = (lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values)
    return ratio.clamp(min=0).sqrt()


class ATSSHead(nn.Module):
    """Classification, box and centerness predictions on every pyramid level, their losses and decoding.

    Args:
        in_channels: channels of the neck's output.
        num_classes: number of object classes (no background class: the classifier is sigmoid).
        num_levels: number of pyramid levels (one learnable box scale each).
        prior_prob: initial foreground probability of the classifier (sets the class bias).
        focal_alpha, focal_gamma: sigmoid focal loss parameters.
        reg_loss_weight: weight of the GIoU loss.
        topk: ATSS candidates per level.
        box_coder: encodes/decodes boxes relative to anchors.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_levels: int = 5,
        prior_prob: float = 0.01,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        reg_loss_weight: float = 2.0,
        topk: int = 9,
        box_coder: BoxCoder | None = None,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.cls_logits = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, kernel_size=1)
        self.centerness = nn.Conv2d(in_channels, 1, kernel_size=1)
        for conv in (self.cls_logits, self.bbox_pred, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.reg_loss_weight = reg_loss_weight
        self.assigner = ATSSAssigner(topk)
        self.box_coder = box_coder or BoxCoder()

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        """Per-level features ``(N, C, H_l, W_l)`` -> predictions with all levels concatenated (A = sum H_l W_l).

        Returns:
            ``cls_logits`` ``(N, A, K)``, ``bbox_deltas`` ``(N, A, 4)``, ``centerness`` ``(N, A)``, all float32.
        """
        cls, box, ctr = [], [], []
        for feature, scale in zip(features, self.scales):
            n = feature.shape[0]
            cls.append(self.cls_logits(feature).reshape(n, self.num_classes, -1).transpose(1, 2))  # (N, HW, K)
            box.append(scale(self.bbox_pred(feature)).reshape(n, 4, -1).transpose(1, 2))  # (N, HW, 4)
            ctr.append(self.centerness(feature).reshape(n, -1))  # (N, HW)
        return {
            "cls_logits": torch.cat(cls, dim=1).float(),
            "bbox_deltas": torch.cat(box, dim=1).float(),
            "centerness": torch.cat(ctr, dim=1).float(),
        }

    def compute_loss(
        self, outputs: dict[str, Tensor], anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Focal, GIoU and centerness losses, normalised by the positives averaged over processes.

        Args:
            outputs: the result of ``forward``.
            anchors: per level ``(H_l W_l, 4)`` float32, as from ``make_anchors``.
            targets: per image ``boxes`` ``(G, 4)`` float x1,y1,x2,y2 in input pixels, ``labels`` ``(G,)``
                int64 in ``[0, K)``, optionally ``iscrowd`` ``(G,)`` (crowd boxes are left out, as detectron2's
                data loader does for the release: anchors over them stay negatives).

        Returns:
            ``loss_cls``, ``loss_box`` and ``loss_centerness``, scalar float32 tensors.
        """
        all_anchors = torch.cat(anchors)
        per_level = [a.shape[0] for a in anchors]
        cls_targets, pos_anchor, pos_box, pos_img, pos_idx = [], [], [], [], []
        for i, target in enumerate(targets):
            boxes, labels = target["boxes"].float(), target["labels"]
            crowd = target.get("iscrowd")
            if crowd is not None:
                keep = ~crowd.bool()
                boxes, labels = boxes[keep], labels[keep]
            matched = self.assigner(all_anchors, per_level, boxes)
            pos = torch.nonzero(matched >= 0).squeeze(1)
            onehot = torch.zeros_like(outputs["cls_logits"][i])
            onehot[pos, labels[matched[pos]]] = 1.0
            cls_targets.append(onehot)
            pos_anchor.append(all_anchors[pos])
            pos_box.append(boxes[matched[pos]])
            pos_img.append(torch.full_like(pos, i))
            pos_idx.append(pos)
        cls_targets_t = torch.stack(cls_targets)  # (N, A, K)
        pos_img_t, pos_idx_t = torch.cat(pos_img), torch.cat(pos_idx)
        pos_anchor_t, pos_box_t = torch.cat(pos_anchor), torch.cat(pos_box).float()

        world = get_world_size()
        num_pos = sum_across_processes(torch.tensor(float(pos_idx_t.numel()), device=all_anchors.device))
        num_pos_avg = max(num_pos.item() / world, 1.0)
        loss_cls = (
            sigmoid_focal_loss(
                outputs["cls_logits"],
                cls_targets_t,
                alpha=self.focal_alpha,
                gamma=self.focal_gamma,
                reduction="sum",
            )
            / num_pos_avg
        )
        deltas = outputs["bbox_deltas"][pos_img_t, pos_idx_t]  # (P, 4)
        ctr_logits = outputs["centerness"][pos_img_t, pos_idx_t]  # (P,)
        ctr_targets = centerness_targets(pos_anchor_t, pos_box_t)
        # every process joins this sum, positives or not: one that skipped it would pair its next collective
        # (DDP's gradient all-reduce) with the others' sum
        ctr_sum_avg = sum_across_processes(ctr_targets.sum()).item() / world
        if pos_idx_t.numel() == 0:
            # keeps every head parameter in the graph, which DDP requires
            zero = outputs["bbox_deltas"].sum() * 0 + outputs["centerness"].sum() * 0
            return {"loss_cls": loss_cls, "loss_box": zero, "loss_centerness": zero}
        pred_boxes = self.box_coder.decode(deltas, pos_anchor_t)
        giou = generalized_box_iou_loss(pred_boxes, pos_box_t, reduction="none")
        loss_box = self.reg_loss_weight * (giou * ctr_targets).sum() / max(ctr_sum_avg, 1e-6)
        loss_ctr = F.binary_cross_entropy_with_logits(ctr_logits, ctr_targets, reduction="sum") / num_pos_avg
        return {"loss_cls": loss_cls, "loss_box": loss_box, "loss_centerness": loss_ctr}

    @torch.no_grad()
    def postprocess(
        self,
        outputs: dict[str, Tensor],
        anchors: list[Tensor],
        image_sizes: list[tuple[int, int]],
        score_thresh: float = 0.05,
        pre_nms_topk: int = 1000,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
    ) -> list[dict[str, Tensor]]:
        """Decodes predictions into detections, as the release's ATSS inference.

        Per level, locations and classes with ``sigmoid(cls) > score_thresh`` are candidates, of which the
        ``pre_nms_topk`` best by ``sigmoid(cls) * sigmoid(centerness)`` are decoded; then
        :func:`select_detections` (class-wise NMS over all levels, at most ``detections_per_img`` kept, clipping
        to the image, empty boxes dropped).

        Args:
            outputs: the result of ``forward``.
            anchors: per level ``(H_l W_l, 4)``.
            image_sizes: ``(h, w)`` of each image's unpadded content, in input pixels.

        Returns:
            Per image ``boxes`` ``(D, 4)`` float32 x1,y1,x2,y2 in input pixels, inside the image, ``scores``
            ``(D,)`` float32, ``labels`` ``(D,)`` int64, sorted by decreasing score.
        """
        per_level = [a.shape[0] for a in anchors]
        cls_levels = outputs["cls_logits"].split(per_level, dim=1)
        box_levels = outputs["bbox_deltas"].split(per_level, dim=1)
        ctr_levels = outputs["centerness"].split(per_level, dim=1)
        results = []
        for i, size in enumerate(image_sizes):
            boxes_all, scores_all, labels_all = [], [], []
            for cls, box, ctr, level_anchors in zip(cls_levels, box_levels, ctr_levels, anchors):
                prob = cls[i].sigmoid()  # (HW, K)
                candidates = prob > score_thresh
                scores = (prob * ctr[i].sigmoid()[:, None])[candidates]
                keep = scores.topk(min(pre_nms_topk, scores.numel())).indices
                loc, label = torch.nonzero(candidates)[keep].unbind(1)
                boxes_all.append(self.box_coder.decode(box[i][loc], level_anchors[loc]))
                scores_all.append(scores[keep])
                labels_all.append(label)
            boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
            results.append(select_detections(boxes, scores, labels, size, nms_thresh, detections_per_img))
        return results


class ATSS(OneStageDetector):
    """ATSS detector: backbone -> FPN (P3-P7) -> neck -> ``ATSSHead``, one square anchor per location.

    The calling convention is ``OneStageDetector``'s; targets as in ``ATSSHead.compute_loss``.

    Args:
        backbone, fpn, neck: as ``OneStageDetector``.
        head: the ATSS head.
        anchor_scale: anchor side in strides.
        score_thresh, pre_nms_topk, nms_thresh, detections_per_img: inference settings.
    """

    def __init__(
        self,
        backbone: nn.Module,
        fpn: nn.Module,
        neck: nn.Module,
        head: ATSSHead,
        anchor_scale: float = 8.0,
        score_thresh: float = 0.05,
        pre_nms_topk: int = 1000,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
    ):
        super().__init__(backbone, fpn, neck, head, score_thresh, pre_nms_topk, nms_thresh, detections_per_img)
        self.anchor_scale = anchor_scale

    def make_anchors(self, sizes: list[tuple[int, int]], device: torch.device) -> list[Tensor]:
        """Per level ``(H_l, W_l)`` -> ``(H_l W_l, 4)`` float32, see ``make_anchors``."""
        return make_anchors(sizes, STRIDES[: len(sizes)], self.anchor_scale, device)


def build_atss_dyhead(cfg: ModelConfig, num_classes: int) -> ATSS:
    """ATSS with a ResNet, an FPN with P6/P7 from P5 and a DyHead neck, as ``cfg`` describes."""
    backbone, fpn, neck = build_fpn_dyhead(cfg, first_level=3)
    head = ATSSHead(
        cfg.dyhead_channels,
        num_classes,
        num_levels=len(STRIDES),
        prior_prob=cfg.prior_prob,
        focal_alpha=cfg.focal_alpha,
        focal_gamma=cfg.focal_gamma,
        reg_loss_weight=cfg.reg_loss_weight,
        topk=cfg.atss_topk,
    )
    return ATSS(
        backbone,
        fpn,
        neck,
        head,
        anchor_scale=cfg.anchor_scale,
        score_thresh=cfg.score_thresh,
        pre_nms_topk=cfg.pre_nms_topk,
        nms_thresh=cfg.nms_thresh,
        detections_per_img=cfg.detections_per_img,
    )
