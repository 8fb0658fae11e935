"""Faster R-CNN (Ren et al., NeurIPS 2015) with an FPN and DyHead: the paper's two-stage recipe (Sec. 3.4).

The scale- and spatial-aware attention refine P2-P6 before RoI pooling (a DyHead neck without task attention);
the task-aware attention replaces the box head's fully connected layers: each RoI's pooled features go through
a dynamic ReLU whose coefficients come from that RoI's mean feature, then straight into the class and box
predictors. The RPN, RoI sampling, losses and box decoding are torchvision's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import LevelMapper

from dyhead import TaskAttention

from .config import ModelConfig
from .detections import rescale_detections
from .pyramid import PYRAMID_STRIDES, build_fpn_dyhead

__all__ = [
    "RoITaskHead", "FasterRCNN", "torchvision_targets", "roi_pooler", "box_predictor", "build_faster_rcnn_dyhead",
]

STRIDES = PYRAMID_STRIDES[2]
ROI_LEVELS = ("c2", "c3", "c4", "c5")  # the FPN's names of P2-P5; P6 ("pool") feeds only the RPN


class RoITaskHead(nn.Module):
    """The box head: DyHead's task-aware attention in place of the two fully connected layers.

    Args:
        channels: C of the pooled RoI features.

    forward(x: (R, C, P, P) float RoI features) -> (R, C * P * P), same dtype: each RoI's dynamic ReLU
    (coefficients from its mean over the P x P bins), flattened for ``FastRCNNPredictor``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.task = TaskAttention(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.task(x).flatten(1)


def torchvision_targets(targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Our targets as torchvision's detection heads want them.

    Args:
        targets: per image ``boxes`` ``(G, 4)`` float x1,y1,x2,y2, ``labels`` ``(G,)`` int64 in ``[0, K)``,
            optionally ``iscrowd`` ``(G,)``.

    Returns:
        Per image ``boxes`` ``(G', 4)`` float32 and ``labels`` ``(G',)`` int64 in ``[1, K]`` (0 is torchvision's
        background), crowd boxes removed as detectron2's data loader does.
    """
    out = []
    for target in targets:
        keep = ~target["iscrowd"].bool() if "iscrowd" in target else slice(None)
        out.append({"boxes": target["boxes"][keep].float(), "labels": target["labels"][keep] + 1})
    return out


class FasterRCNN(nn.Module):
    """Faster R-CNN: backbone -> FPN (P2-P6) -> neck -> RPN -> RoI heads (RoIAlign on P2-P5, box head).

    In training, ``forward(images, image_sizes, targets)`` returns the dict of losses ``loss_objectness``,
    ``loss_rpn_box_reg`` (RPN), ``loss_classifier`` and ``loss_box_reg`` (box head); in eval it returns one
    dict per image with ``boxes`` (x1,y1,x2,y2 float32), ``scores`` and ``labels`` (int64 in
    ``[0, num_classes)``), in input pixels or, when ``original_sizes`` is given, in original image pixels.

    Args:
        backbone: returns an ordered dict of C2-C5 and has ``out_channels``.
        fpn: turns C2-C5 into P2-P6 (an ordered dict whose P2-P5 keys are ``ROI_LEVELS``).
        neck: refines P2-P6, same container in and out.
        rpn: torchvision's region proposal network over all neck levels.
        roi_heads: torchvision's RoI heads whose predictor has K + 1 classes, background first.
    """

    def __init__(
        self, backbone: nn.Module, fpn: nn.Module, neck: nn.Module, rpn: RegionProposalNetwork, roi_heads: RoIHeads
    ):
        super().__init__()
        self.backbone = backbone
        self.fpn = fpn
        self.neck = neck
        self.rpn = rpn
        self.roi_heads = roi_heads

    def forward(
        self, images: Tensor, image_sizes: list[tuple[int, int]], targets: list[dict[str, Tensor]] | None = None,
        original_sizes: list[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses (training) or detections (eval), as the class says.

        ``images`` ``(N, 3, H, W)`` normalised float, H and W multiples of 64 (P6's stride); ``image_sizes`` each
        image's ``(h, w)`` before padding; ``targets`` (training only) as ``torchvision_targets`` takes them;
        ``original_sizes`` (eval only) the ``(h, w)`` to rescale the boxes to.
        """
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        features = self.neck(self.fpn(self.backbone(images)))
        batch = ImageList(images, [(int(h), int(w)) for h, w in image_sizes])
        shifted = torchvision_targets(targets) if self.training else None
        # torchvision makes anchors in the features' dtype and decodes boxes in the deltas': under bfloat16
        # autocast, coordinates past 1024 would step by 8 pixels. The heads are a small part of the cost.
        with torch.autocast(images.device.type, enabled=False):
            features = {name: level.float() for name, level in features.items()}
            proposals, rpn_losses = self.rpn(batch, features, shifted)
            detections, roi_losses = self.roi_heads(features, proposals, batch.image_sizes, shifted)
        if self.training:
            return {**rpn_losses, **roi_losses}
        for det in detections:
            det["labels"] = det["labels"] - 1
        if original_sizes is not None:
            rescale_detections(detections, batch.image_sizes, original_sizes)
        return detections

    @property
    def num_classes(self) -> int:
        """Number of object classes K (the predictor's background class not counted)."""
        return self.roi_heads.box_predictor.cls_score.out_features - 1


def roi_pooler(resolution: int, sampling_ratio: int) -> MultiScaleRoIAlign:
    """RoIAlign on P2-P5, each RoI on the FPN paper's level for its size (224 pixels at P4).

    Returns a pooler of ``(R, C, resolution, resolution)`` features whose level scales are fixed to the strides.
    """
    pooler = MultiScaleRoIAlign(list(ROI_LEVELS), resolution, sampling_ratio)
    # Left unset, torchvision infers them from the first batch's largest image content and keeps them for good:
    # a content well under its padded size rounds to the wrong power of two.
    pooler.scales = [1.0 / s for s in STRIDES[: len(ROI_LEVELS)]]
    pooler.map_levels = LevelMapper(k_min=2, k_max=5)  # P2-P5
    return pooler


def box_predictor(in_features: int, num_classes: int) -> FastRCNNPredictor:
    """Class scores (K + 1, background first) and class-specific box deltas from ``(R, in_features)``,
    initialised as detectron2's: weights N(0, 0.01) and N(0, 0.001), zero biases."""
    predictor = FastRCNNPredictor(in_features, num_classes + 1)
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    for layer in (predictor.cls_score, predictor.bbox_pred):
        nn.init.zeros_(layer.bias)
    return predictor


def build_faster_rcnn_dyhead(cfg: ModelConfig, num_classes: int) -> FasterRCNN:
    """Faster R-CNN with a ResNet, an FPN with P6 pooled from P5, a DyHead neck without task attention and the
    task-attention box head, as ``cfg`` (its ``rcnn`` section and the shared inference settings) describes."""
    rc = cfg.rcnn
    backbone, fpn, neck = build_fpn_dyhead(cfg, first_level=2, task_attention=False)
    anchors = AnchorGenerator(
        tuple((rc.anchor_size * 2**level,) for level in range(len(STRIDES))),
        (tuple(rc.aspect_ratios),) * len(STRIDES),
    )
    rpn = RegionProposalNetwork(
        anchors,
        RPNHead(cfg.dyhead_channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=rc.rpn_fg_iou_thresh,
        bg_iou_thresh=rc.rpn_bg_iou_thresh,
        batch_size_per_image=rc.rpn_batch_size_per_image,
        positive_fraction=rc.rpn_positive_fraction,
        pre_nms_top_n={"training": rc.rpn_pre_nms_topk_train, "testing": rc.rpn_pre_nms_topk_test},
        post_nms_top_n={"training": rc.rpn_post_nms_topk_train, "testing": rc.rpn_post_nms_topk_test},
        nms_thresh=rc.rpn_nms_thresh,
    )
    roi_heads = RoIHeads(
        roi_pooler(rc.pooler_resolution, rc.pooler_sampling_ratio),
        RoITaskHead(cfg.dyhead_channels),
        box_predictor(cfg.dyhead_channels * rc.pooler_resolution**2, num_classes),
        fg_iou_thresh=rc.roi_fg_iou_thresh,
        bg_iou_thresh=rc.roi_bg_iou_thresh,
        batch_size_per_image=rc.roi_batch_size_per_image,
        positive_fraction=rc.roi_positive_fraction,
        bbox_reg_weights=None,  # torchvision's (10, 10, 5, 5), as detectron2's
        score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh,
        detections_per_img=cfg.detections_per_img,
    )
    return FasterRCNN(backbone, fpn, neck, rpn, roi_heads)
