"""RetinaNet (Lin et al., ICCV 2017) with an FPN and a DyHead neck, as in the DyHead paper's Table 6.

detectron2's ``MODEL.RETINANET`` defaults as the official release (``dyhead_r50_retina_fpn_1x.yaml``) used them:
on top of DyHead, a class tower and a box tower of ``NUM_CONVS`` 3x3 convolution + ReLU layers each (4 in the
release; 0 leaves DyHead as the only tower), then one 3x3 convolution for the class logits and one for the box
deltas, all shared across levels. Both losses are divided by an exponential moving average of the foreground
anchor count (momentum 0.9, starting at 100), as detectron2's RetinaNet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, sigmoid_focal_loss

from .atss_assigner import BACKGROUND, IGNORE
from .box_coder import BoxCoder
from .config import ModelConfig
from .detections import select_detections
from .engine.distributed import get_world_size, sum_across_processes
from .one_stage import OneStageDetector
from .pyramid import PYRAMID_STRIDES, build_fpn_dyhead

__all__ = ["RetinaNetHead", "RetinaNet", "make_retinanet_anchors", "match_anchors", "build_retinanet_dyhead"]

STRIDES = PYRAMID_STRIDES[3]


def make_retinanet_anchors(
    sizes: list[tuple[int, int]],
    strides: tuple[int, ...],
    anchor_size: float,
    scales: Sequence[float],
    aspect_ratios: Sequence[float],
    device: torch.device,
) -> list[Tensor]:
    """Anchors of every scale and aspect ratio at every location, as detectron2's ``DefaultAnchorGenerator``.

    On a level of stride ``s`` the base side is ``anchor_size * s / strides[0]``; each anchor has side
    ``base * scale`` squared as its area and height / width ``ratio``. Centres are ``(x * s, y * s)``
    (detectron2's offset 0).

    Args:
        sizes: ``(H_l, W_l)`` of each level.
        strides: stride of each level, finest first.
        anchor_size: base side on the first level.
        scales, aspect_ratios: the A = ``len(scales) * len(aspect_ratios)`` anchors of a location, scale-major.

    Returns:
        Per level, ``(H_l * W_l * A, 4)`` float32 x1,y1,x2,y2 in ``(H, W, A)`` order.
    """
    anchors = []
    for (h, w), stride in zip(sizes, strides):
        cell = []
        for scale in scales:
            side = anchor_size * stride / strides[0] * scale
            for ratio in aspect_ratios:
                half_w, half_h = side / math.sqrt(ratio) / 2, side * math.sqrt(ratio) / 2
                cell.append([-half_w, -half_h, half_w, half_h])
        ys = torch.arange(h, device=device, dtype=torch.float32) * stride
        xs = torch.arange(w, device=device, dtype=torch.float32) * stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack((cx, cy, cx, cy), dim=-1).reshape(-1, 1, 4)
        anchors.append((centres + torch.tensor(cell, device=device)).reshape(-1, 4))
    return anchors


def match_anchors(anchors: Tensor, boxes: Tensor, fg_iou_thresh: float, bg_iou_thresh: float) -> Tensor:
    """Matches anchors to boxes by IoU, as detectron2's ``Matcher`` with ``allow_low_quality_matches``.

    An anchor takes the box it overlaps most when that IoU is at least ``fg_iou_thresh``, is background
    under ``bg_iou_thresh`` and ignored in between; besides, each box's highest-IoU anchors (ties included)
    are foreground, so that no box is left without an anchor.

    Args:
        anchors: ``(A, 4)`` float x1,y1,x2,y2.
        boxes: ``(G, 4)`` float x1,y1,x2,y2; G may be 0 (every anchor is then background).

    Returns:
        ``(A,)`` int64: the index of the matched box, ``BACKGROUND`` (-1) or ``IGNORE`` (-2).
    """
    if boxes.shape[0] == 0:
        return torch.full((anchors.shape[0],), BACKGROUND, dtype=torch.int64, device=anchors.device)
    iou = box_iou(boxes, anchors)  # (G, A)
    best_iou, best_box = iou.max(dim=0)
    matched = torch.where(best_iou >= fg_iou_thresh, best_box, IGNORE)
    matched[best_iou < bg_iou_thresh] = BACKGROUND
    best_per_box = iou.max(dim=1, keepdim=True).values
    # a box touching no anchor would otherwise make every anchor with IoU 0 its "best" one
    low_quality = ((iou == best_per_box) & (best_per_box > 0)).any(dim=0)
    matched[low_quality] = best_box[low_quality]
    return matched


def _tower(channels: int, num_convs: int) -> nn.Sequential:
    """``num_convs`` x (3x3 convolution ``channels`` -> ``channels`` with bias, ReLU), as detectron2's subnets."""
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, kernel_size=3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


def _levels_last(x: Tensor, columns: int) -> Tensor:
    """``(N, A * columns, H, W)`` -> ``(N, H * W * A, columns)``, the anchors' ``(H, W, A)`` order."""
    n, _, h, w = x.shape
    return x.reshape(n, -1, columns, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, columns)


class RetinaNetHead(nn.Module):
    """Class logits and box deltas for every anchor on every pyramid level, their losses and decoding.

    Args:
        in_channels: channels of the neck's output.
        num_classes: number of object classes (no background class: the classifier is sigmoid).
        num_anchors: anchors per location (scales x aspect ratios).
        prior_prob: initial foreground probability of the classifier (sets the class bias).
        focal_alpha, focal_gamma: sigmoid focal loss parameters.
        smooth_l1_beta: smooth L1 transition point of the box loss (0: L1).
        fg_iou_thresh, bg_iou_thresh: IoU at or above which an anchor is foreground, under which background.
        box_coder: encodes/decodes boxes relative to anchors; detectron2's RetinaNet weights (1, 1, 1, 1).
        num_convs: 3x3 convolution (with bias) + ReLU layers in each of ``cls_subnet`` and ``bbox_subnet``, the
            towers between the neck and ``cls_logits`` / ``bbox_pred`` (detectron2's names and layout); 0: none.
        loss_normalizer_momentum: momentum m of the loss normaliser, the float32 buffer ``loss_normalizer``
            (initially 100, saved with the state dict), which each training ``compute_loss`` sets to
            ``m * loss_normalizer + (1 - m) * max(foreground anchors, 1)``; 0 divides by each batch's count.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_anchors: int = 9,
        prior_prob: float = 0.01,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        smooth_l1_beta: float = 0.1,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.4,
        box_coder: BoxCoder | None = None,
        num_convs: int = 4,
        loss_normalizer_momentum: float = 0.9,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.cls_subnet = _tower(in_channels, num_convs)
        self.bbox_subnet = _tower(in_channels, num_convs)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, kernel_size=3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=3, padding=1)
        for conv in [*self.cls_subnet[::2], *self.bbox_subnet[::2], self.cls_logits, self.bbox_pred]:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.smooth_l1_beta = smooth_l1_beta
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.box_coder = box_coder or BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.loss_normalizer_momentum = loss_normalizer_momentum
        # a buffer rather than detectron2's python attribute, so that checkpoints carry it and resume is exact
        self.register_buffer("loss_normalizer", torch.tensor(100.0))

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        """Per-level features ``(N, C, H_l, W_l)`` -> predictions of all levels concatenated, in the anchors' order.

        Returns:
            ``cls_logits`` ``(N, sum H_l W_l A, K)`` and ``bbox_deltas`` ``(N, sum H_l W_l A, 4)``, float32.
        """
        cls = [_levels_last(self.cls_logits(self.cls_subnet(f)), self.num_classes) for f in features]  # (N, HWA, K)
        box = [_levels_last(self.bbox_pred(self.bbox_subnet(f)), 4) for f in features]  # (N, HWA, 4)
        return {"cls_logits": torch.cat(cls, dim=1).float(), "bbox_deltas": torch.cat(box, dim=1).float()}

    def compute_loss(
        self, outputs: dict[str, Tensor], anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Focal and smooth L1 losses, both normalised by ``loss_normalizer``.

        In training, ``loss_normalizer`` first moves towards this batch's foreground anchor count averaged over
        processes (at least 1), with momentum ``loss_normalizer_momentum``; every process holds the same value.

        Args:
            outputs: the result of ``forward``.
            anchors: per level ``(H_l W_l A, 4)`` float32, as from ``make_retinanet_anchors``.
            targets: per image ``boxes`` ``(G, 4)`` float x1,y1,x2,y2 in input pixels, ``labels`` ``(G,)``
                int64 in ``[0, K)``, optionally ``iscrowd`` ``(G,)`` (crowd boxes are left out).

        Returns:
            ``loss_cls`` and ``loss_box``, scalar float32 tensors.
        """
        all_anchors = torch.cat(anchors)
        cls_targets, valid, pos_img, pos_idx, box_targets = [], [], [], [], []
        for i, target in enumerate(targets):
            boxes, labels = target["boxes"].float(), target["labels"]
            crowd = target.get("iscrowd")
            if crowd is not None:
                keep = ~crowd.bool()
                boxes, labels = boxes[keep], labels[keep]
            matched = match_anchors(all_anchors, boxes, self.fg_iou_thresh, self.bg_iou_thresh)
            pos = torch.nonzero(matched >= 0).squeeze(1)
            onehot = torch.zeros_like(outputs["cls_logits"][i])
            onehot[pos, labels[matched[pos]]] = 1.0
            cls_targets.append(onehot)
            valid.append(matched != IGNORE)
            pos_img.append(torch.full_like(pos, i))
            pos_idx.append(pos)
            box_targets.append(self.box_coder.encode(boxes[matched[pos]], all_anchors[pos]))
        cls_targets_t = torch.stack(cls_targets)  # (N, HWA, K)
        valid_t = torch.stack(valid)  # (N, HWA)
        pos_img_t, pos_idx_t = torch.cat(pos_img), torch.cat(pos_idx)

        if self.training:
            # The release's detectron2 averaged each process's own count; the mean over processes has the same
            # expectation and keeps this buffer equal on every rank (DDP broadcasts buffers from rank 0).
            num_pos = sum_across_processes(torch.tensor(float(pos_idx_t.numel()), device=all_anchors.device))
            count = max(num_pos.item() / get_world_size(), 1.0)
            momentum = self.loss_normalizer_momentum
            with torch.no_grad():  # float32 operations on a value every process shares: all get the same result
                self.loss_normalizer.mul_(momentum).add_((1 - momentum) * count)
        # a python float, as before the moving average: momentum 0 then reproduces the per-batch division bit for
        # bit (CUDA multiplies by the reciprocal of a host scalar but divides by a device tensor), and the losses
        # keep no reference to the buffer, which the next forward changes in place
        normaliser = self.loss_normalizer.item()
        loss_cls = sigmoid_focal_loss(
            outputs["cls_logits"][valid_t],
            cls_targets_t[valid_t],
            alpha=self.focal_alpha,
            gamma=self.focal_gamma,
            reduction="sum",
        )
        # indexing with no positives still puts bbox_pred in the graph (zero gradient), which DDP requires
        deltas = outputs["bbox_deltas"][pos_img_t, pos_idx_t]  # (P, 4)
        loss_box = F.smooth_l1_loss(deltas, torch.cat(box_targets), beta=self.smooth_l1_beta, reduction="sum")
        return {"loss_cls": loss_cls / normaliser, "loss_box": loss_box / normaliser}

    @torch.no_grad()
    def postprocess(
        self,
        outputs: dict[str, Tensor],
        anchors: list[Tensor],
        image_sizes: list[tuple[int, int]],
        score_thresh: float = 0.05,
        pre_nms_topk: int = 1000,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
    ) -> list[dict[str, Tensor]]:
        """Decodes predictions into detections, as detectron2's RetinaNet inference.

        Per level, the (anchor, class) pairs with ``sigmoid(cls) > score_thresh`` are candidates, of which
        the ``pre_nms_topk`` best are decoded; then :func:`select_detections` (class-wise NMS over all levels,
        at most ``detections_per_img`` kept, clipping to the image, empty boxes dropped).

        Args:
            outputs: the result of ``forward``.
            anchors: per level ``(H_l W_l A, 4)``.
            image_sizes: ``(h, w)`` of each image's unpadded content, in input pixels.

        Returns:
            Per image ``boxes`` ``(D, 4)`` float32 x1,y1,x2,y2 in input pixels, inside the image, ``scores``
            ``(D,)`` float32, ``labels`` ``(D,)`` int64, sorted by decreasing score.
        """
        per_level = [a.shape[0] for a in anchors]
        cls_levels = outputs["cls_logits"].split(per_level, dim=1)
        box_levels = outputs["bbox_deltas"].split(per_level, dim=1)
        results = []
        for i, size in enumerate(image_sizes):
            boxes_all, scores_all, labels_all = [], [], []
            for cls, box, level_anchors in zip(cls_levels, box_levels, anchors):
                prob = cls[i].sigmoid().flatten()  # (HWA * K,), anchor-major
                candidates = torch.nonzero(prob > score_thresh).squeeze(1)
                scores, order = prob[candidates].topk(min(pre_nms_topk, candidates.numel()))
                anchor_idx = candidates[order] // self.num_classes
                boxes_all.append(self.box_coder.decode(box[i][anchor_idx], level_anchors[anchor_idx]))
                scores_all.append(scores)
                labels_all.append(candidates[order] % self.num_classes)
            boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
            results.append(select_detections(boxes, scores, labels, size, nms_thresh, detections_per_img))
        return results


class RetinaNet(OneStageDetector):
    """RetinaNet detector: backbone -> FPN (P3-P7) -> neck -> ``RetinaNetHead``, A anchors per location.

    The calling convention is ``OneStageDetector``'s; targets as in ``RetinaNetHead.compute_loss``.

    Args:
        backbone, fpn, neck: as ``OneStageDetector``.
        head: the RetinaNet head, with ``len(anchor_scales) * len(aspect_ratios)`` anchors per location.
        anchor_size: anchor side on P3 before scaling; doubles per level.
        anchor_scales, aspect_ratios: the anchors of each location.
        score_thresh, pre_nms_topk, nms_thresh, detections_per_img: inference settings.
    """

    def __init__(
        self,
        backbone: nn.Module,
        fpn: nn.Module,
        neck: nn.Module,
        head: RetinaNetHead,
        anchor_size: float = 32.0,
        anchor_scales: Sequence[float] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        score_thresh: float = 0.05,
        pre_nms_topk: int = 1000,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
    ):
        if head.num_anchors != len(anchor_scales) * len(aspect_ratios):
            raise ValueError(
                f"the head predicts {head.num_anchors} anchors per location but {len(anchor_scales)} scales x "
                f"{len(aspect_ratios)} aspect ratios make {len(anchor_scales) * len(aspect_ratios)}"
            )
        super().__init__(backbone, fpn, neck, head, score_thresh, pre_nms_topk, nms_thresh, detections_per_img)
        self.anchor_size = anchor_size
        self.anchor_scales = list(anchor_scales)
        self.aspect_ratios = list(aspect_ratios)

    def make_anchors(self, sizes: list[tuple[int, int]], device: torch.device) -> list[Tensor]:
        """Per level ``(H_l, W_l)`` -> ``(H_l W_l A, 4)`` float32, see ``make_retinanet_anchors``."""
        return make_retinanet_anchors(
            sizes, STRIDES[: len(sizes)], self.anchor_size, self.anchor_scales, self.aspect_ratios, device
        )


def build_retinanet_dyhead(cfg: ModelConfig, num_classes: int) -> RetinaNet:
    """RetinaNet with a ResNet, an FPN with P6/P7 from P5 and a DyHead neck, as ``cfg`` describes."""
    backbone, fpn, neck = build_fpn_dyhead(cfg, first_level=3)
    retina = cfg.retinanet
    head = RetinaNetHead(
        cfg.dyhead_channels,
        num_classes,
        num_anchors=len(retina.anchor_scales) * len(retina.aspect_ratios),
        prior_prob=cfg.prior_prob,
        focal_alpha=cfg.focal_alpha,
        focal_gamma=cfg.focal_gamma,
        smooth_l1_beta=retina.smooth_l1_beta,
        fg_iou_thresh=retina.fg_iou_thresh,
        bg_iou_thresh=retina.bg_iou_thresh,
        num_convs=retina.num_convs,
        loss_normalizer_momentum=retina.loss_normalizer_momentum,
    )
    return RetinaNet(
        backbone,
        fpn,
        neck,
        head,
        anchor_size=retina.anchor_size,
        anchor_scales=retina.anchor_scales,
        aspect_ratios=retina.aspect_ratios,
        score_thresh=cfg.score_thresh,
        pre_nms_topk=cfg.pre_nms_topk,
        nms_thresh=cfg.nms_thresh,
        detections_per_img=cfg.detections_per_img,
    )
