"""Faster R-CNN (Ren et al., NeurIPS 2015) with an FPN and DyHead, with either of two box heads.

``fc``, the release's detector (microsoft/DynamicHead ``dyhead_r50_rcnn_fpn_1x``, the 40.3 AP row): the whole
DyHead, task-aware attention included, refines P2-P6; the box head is detectron2's ``FastRCNNConvFCHead``, two
fully connected layers of 1024 with ReLU on each RoI's flattened 256 x 7 x 7 features.

``task_attention``, the paper's two-stage recipe (Sec. 3.4): the scale- and spatial-aware attention refine P2-P6
(a DyHead neck without task attention); the task-aware attention replaces the fully connected layers: each RoI's
pooled features go through a dynamic ReLU whose coefficients come from that RoI's mean feature, then straight
into the class and box predictors.

Both use torchvision's RPN, RoI sampling and box decoding with detectron2's anchors, losses and pooler: the RPN's
anchors are detectron2's ``DefaultAnchorGenerator``'s (unrounded, on fixed strides); the box regression of the RPN
and of the box head is smooth L1 with a configurable beta (detectron2's 0, plain L1, where torchvision hard-codes
1/9); the RPN's losses are sums divided by ``batch_size_per_image`` x images, the box head's by the number of
sampled RoIs; RoIAlign may take detectron2's half-pixel shift (ROIAlignV2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import LevelMapper

from dyhead import TaskAttention

from .config import ConfigError, ModelConfig
from .detections import rescale_detections
from .inputs import check_detector_inputs
from .pyramid import PYRAMID_STRIDES, build_fpn_dyhead

__all__ = [
    "BOX_HEADS", "RoITaskHead", "FixedStrideAnchorGenerator", "SmoothL1RPN", "fastrcnn_loss", "SmoothL1RoIHeads",
    "FasterRCNN", "torchvision_targets", "LevelRoIAlign", "roi_pooler", "fc_box_head", "box_predictor",
    "build_faster_rcnn_dyhead",
]

STRIDES = PYRAMID_STRIDES[2]
ROI_LEVELS = ("c2", "c3", "c4", "c5")  # the FPN's names of P2-P5; P6 ("pool") feeds only the RPN
BOX_HEADS = ("fc", "task_attention")


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


class FixedStrideAnchorGenerator(AnchorGenerator):
    """detectron2's ``DefaultAnchorGenerator`` (offset 0) behind torchvision's anchor generator interface.

    Args:
        sizes: one anchor side (the square root of its area) per level, finest first.
        aspect_ratios: height / width of a location's anchors, the same on every level.
        strides: each level's stride in input pixels.

    Level l has ``len(aspect_ratios)`` anchors per location, of width ``sqrt(size_l**2 / ratio)`` and height
    ``ratio * width``, centred at ``(x * stride_l, y * stride_l)``. torchvision's own generator rounds the corners
    to integers and takes each stride as the padded image size // the level's size, which is off whenever the
    padding is not a multiple of the coarsest stride (96 pixels make P6 2 wide: a "stride" of 48).

    ``forward(image_list, feature_maps)``: ``feature_maps`` the levels ``(N, C, H_l, W_l)`` -> per image the same
    ``(sum H_l W_l A, 4)`` x1,y1,x2,y2 in the levels' dtype, level-major, then ``(H, W, A)`` order.
    """

    def __init__(self, sizes: Sequence[float], aspect_ratios: Sequence[float], strides: Sequence[int]):
        super().__init__(tuple((size,) for size in sizes), (tuple(aspect_ratios),) * len(sizes))
        self.strides = list(strides)

    def generate_anchors(
        self,
        scales: Sequence[float],
        aspect_ratios: Sequence[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device = torch.device("cpu"),
    ) -> Tensor:
        """``(len(scales) * len(aspect_ratios), 4)`` anchors centred at 0, scale-major; computed in double
        precision before the cast, as detectron2's."""
        cells = []
        for size in scales:
            for ratio in aspect_ratios:
                w = math.sqrt(size**2 / ratio)
                h = ratio * w
                cells.append([-w / 2, -h / 2, w / 2, h / 2])
        return torch.tensor(cells, dtype=dtype, device=device)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        device = feature_maps[0].device
        grid_sizes = [list(level.shape[-2:]) for level in feature_maps]
        # Filled on the device, as torchvision does: a tensor from a host value would be a copy per call.
        strides = [[torch.full((), s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(feature_maps[0].dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


class SmoothL1RPN(RegionProposalNetwork):
    """torchvision's region proposal network with detectron2's loss: smooth L1 beta and normaliser.

    Args:
        *args, **kwargs: as ``RegionProposalNetwork``.
        smooth_l1_beta: beta of the box regression loss; 0 is L1 (detectron2's RPN.SMOOTH_L1_BETA), torchvision's
            own is 1/9.

    The anchor sampling is torchvision's, the normaliser detectron2's: the objectness binary cross-entropy of the
    sampled anchors and the box loss of the sampled positives are both summed and divided by
    ``batch_size_per_image`` x images. torchvision averages the first over the sampled anchors and divides the
    second by their count: the same only when every image has ``batch_size_per_image`` labelled anchors.
    """

    def __init__(self, *args, smooth_l1_beta: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.smooth_l1_beta = smooth_l1_beta

    def compute_loss(
        self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Objectness and box losses, both scalars, as the class says.

        Args:
            objectness: ``(A, 1)`` float logits of all images' anchors, concatenated image-major.
            pred_bbox_deltas: ``(A, 4)`` float deltas in the same order.
            labels: per image ``(A_i,)`` float, 1 foreground, 0 background, -1 ignored.
            regression_targets: per image ``(A_i, 4)`` float target deltas.
        """
        normaliser = self.fg_bg_sampler.batch_size_per_image * len(labels)
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(sampled_pos))[0]
        sampled = torch.cat([pos, torch.where(torch.cat(sampled_neg))[0]])
        labels = torch.cat(labels)
        regression_targets = torch.cat(regression_targets)
        box_loss = F.smooth_l1_loss(
            pred_bbox_deltas[pos], regression_targets[pos], beta=self.smooth_l1_beta, reduction="sum"
        )
        objectness_loss = F.binary_cross_entropy_with_logits(
            objectness.flatten()[sampled], labels[sampled], reduction="sum"
        )
        return objectness_loss / normaliser, box_loss / normaliser


def fastrcnn_loss(
    class_logits: Tensor, box_regression: Tensor, labels: list[Tensor], regression_targets: list[Tensor], beta: float
) -> tuple[Tensor, Tensor]:
    """The box head's classification and box losses: torchvision's ``fastrcnn_loss`` with smooth L1 beta ``beta``.

    Args:
        class_logits: ``(R, K + 1)`` float, background first, for the sampled RoIs of all images.
        box_regression: ``(R, (K + 1) * 4)`` float class-specific deltas.
        labels: per image ``(R_i,)`` int64 in ``[0, K]``, 0 background.
        regression_targets: per image ``(R_i, 4)`` float target deltas.
        beta: smooth L1 beta; 0 is L1.

    Returns:
        Cross-entropy averaged over the R RoIs, and the box loss of the foreground RoIs' own-class deltas summed
        and divided by R (torchvision's and detectron2's normaliser).
    """
    labels = torch.cat(labels)
    regression_targets = torch.cat(regression_targets)
    classification_loss = F.cross_entropy(class_logits, labels)
    pos = torch.where(labels > 0)[0]
    per_class = box_regression.reshape(len(class_logits), -1, 4)
    box_loss = F.smooth_l1_loss(per_class[pos, labels[pos]], regression_targets[pos], beta=beta, reduction="sum")
    return classification_loss, box_loss / labels.numel()


class SmoothL1RoIHeads(RoIHeads):
    """torchvision's RoI heads, boxes only, with the box loss's smooth L1 beta as a parameter.

    Args:
        *args, **kwargs: as ``RoIHeads`` without the mask and keypoint modules.
        smooth_l1_beta: beta of the box regression loss; 0 is L1 (detectron2's ROI_BOX_HEAD.SMOOTH_L1_BETA),
            torchvision's own is 1/9.

    ``forward(features, proposals, image_shapes, targets=None)`` returns ``(detections, losses)`` as
    ``RoIHeads``: in training no detections and ``loss_classifier`` / ``loss_box_reg`` (:func:`fastrcnn_loss`)
    on the RoIs it samples; in eval one dict per image with ``boxes`` ``(D, 4)`` float, ``scores`` ``(D,)`` and
    ``labels`` ``(D,)`` int64 in ``[1, K]``, and no losses.
    """

    def __init__(self, *args, smooth_l1_beta: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.smooth_l1_beta = smooth_l1_beta

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """``features`` the pyramid by name, ``proposals`` per image ``(P_i, 4)`` float x1,y1,x2,y2,
        ``image_shapes`` each image's ``(h, w)``, ``targets`` (training) per image ``boxes`` and ``labels``."""
        if self.training:
            proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        if self.training:
            losses = fastrcnn_loss(class_logits, box_regression, labels, regression_targets, self.smooth_l1_beta)
            return [], dict(zip(("loss_classifier", "loss_box_reg"), losses))
        boxes, scores, classes = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        return [{"boxes": b, "labels": c, "scores": s} for b, s, c in zip(boxes, scores, classes)], {}


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
        rpn: a torchvision region proposal network (``SmoothL1RPN``) over all neck levels.
        roi_heads: torchvision RoI heads (``SmoothL1RoIHeads``) whose predictor has K + 1 classes, background
            first.
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

        ``images`` ``(N, 3, H, W)`` normalised float, padded: the release pads H and W to multiples of 64 (P6's
        stride), each level then exactly half the previous one; other sizes make each level ceil(previous / 2),
        which the neck accepts and the anchors and pooler, on fixed strides, stay aligned with. ``image_sizes``
        each image's ``(h, w)`` before padding; ``targets`` (training only) as ``torchvision_targets`` takes them;
        ``original_sizes`` (eval only) the ``(h, w)`` to rescale the boxes to. A bad argument is a TypeError or
        ValueError from ``check_detector_inputs``, named with the image at fault.
        """
        check_detector_inputs(images, image_sizes, targets, original_sizes, self.num_classes, self.training)
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


class LevelRoIAlign(MultiScaleRoIAlign):
    """RoIAlign of each RoI on its FPN level (the FPN paper's formula, 224 pixels at P4), with fixed level strides.

    Args:
        featmap_names: names of the pooled levels, finest first.
        strides: their strides, powers of two doubling per level.
        output_size: P, the side of the pooled features.
        sampling_ratio: RoIAlign's samples per bin side; 0 adapts it to the bin size.
        aligned: shift the boxes by half a pixel (detectron2's ROIAlignV2) instead of torchvision's default.

    ``forward(x, boxes, image_shapes)``: ``x`` the pyramid by name, ``boxes`` per image ``(R_i, 4)`` float
    x1,y1,x2,y2 in input pixels -> ``(sum R_i, C, P, P)`` in the dtype of the first level, image-major.
    ``image_shapes`` is not used: the scales come from ``strides``.
    """

    def __init__(
        self, featmap_names: list[str], strides: list[int], output_size: int, sampling_ratio: int, aligned: bool
    ):
        super().__init__(featmap_names, output_size, sampling_ratio)
        # torchvision would infer the scales from the first batch's largest image content and keep them for good:
        # a content well under its padded size rounds to the wrong power of two.
        self.scales = [1.0 / s for s in strides]
        self.map_levels = LevelMapper(k_min=int(math.log2(strides[0])), k_max=int(math.log2(strides[-1])))
        self.aligned = aligned

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        levels = self.map_levels(boxes)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        features = [x[name] for name in self.featmap_names]
        result = features[0].new_zeros((len(rois), features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(feature, rois[idx], self.output_size, scale, self.sampling_ratio, self.aligned)
            # under autocast the levels may come in different dtypes, and an in-place copy does not cast by itself
            result[idx] = pooled.to(result.dtype)
        return result


def roi_pooler(resolution: int, sampling_ratio: int, aligned: bool) -> LevelRoIAlign:
    """RoIAlign on P2-P5 (:class:`LevelRoIAlign`) of ``(R, C, resolution, resolution)`` features."""
    return LevelRoIAlign(list(ROI_LEVELS), list(STRIDES[: len(ROI_LEVELS)]), resolution, sampling_ratio, aligned)


def fc_box_head(in_features: int, fc_dim: int) -> TwoMLPHead:
    """detectron2's ``FastRCNNConvFCHead`` with two fully connected layers: ``(R, C, P, P)`` float RoI features,
    flattened to ``in_features = C * P * P``, -> ``fc6`` -> ReLU -> ``fc7`` -> ReLU -> ``(R, fc_dim)``.

    torchvision's ``TwoMLPHead`` initialised as detectron2's ``c2_xavier_fill``: weights Kaiming-uniform with
    ``a = 1``, zero biases.
    """
    head = TwoMLPHead(in_features, fc_dim)
    for layer in (head.fc6, head.fc7):
        nn.init.kaiming_uniform_(layer.weight, a=1)
        nn.init.zeros_(layer.bias)
    return head


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
    """Faster R-CNN with a ResNet, an FPN with P6 pooled from P5, a DyHead neck and the box head
    ``cfg.rcnn.box_head`` names, as ``cfg`` (its ``rcnn`` section and the shared inference settings) describes.

    ``fc`` (the release's): the whole DyHead, then :func:`fc_box_head`; ``task_attention`` (the paper's): DyHead
    without task attention, then :class:`RoITaskHead`. Either way the RPN and RoI heads take the configured smooth
    L1 betas and the pooler ``cfg.rcnn.pooler_aligned``.
    """
    rc = cfg.rcnn
    if rc.box_head not in BOX_HEADS:
        raise ConfigError(f"unknown model.rcnn.box_head {rc.box_head!r}; expected one of {', '.join(BOX_HEADS)}")
    fc = rc.box_head == "fc"
    backbone, fpn, neck = build_fpn_dyhead(cfg, first_level=2, task_attention=fc)
    pooled_features = cfg.dyhead_channels * rc.pooler_resolution**2
    if fc:
        box_head, box_features = fc_box_head(pooled_features, rc.fc_dim), rc.fc_dim
    else:
        box_head, box_features = RoITaskHead(cfg.dyhead_channels), pooled_features
    anchors = FixedStrideAnchorGenerator(
        [rc.anchor_size * 2**level for level in range(len(STRIDES))], rc.aspect_ratios, STRIDES
    )
    rpn = SmoothL1RPN(
        anchors,
        RPNHead(cfg.dyhead_channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=rc.rpn_fg_iou_thresh,
        bg_iou_thresh=rc.rpn_bg_iou_thresh,
        batch_size_per_image=rc.rpn_batch_size_per_image,
        positive_fraction=rc.rpn_positive_fraction,
        pre_nms_top_n={"training": rc.rpn_pre_nms_topk_train, "testing": rc.rpn_pre_nms_topk_test},
        post_nms_top_n={"training": rc.rpn_post_nms_topk_train, "testing": rc.rpn_post_nms_topk_test},
        nms_thresh=rc.rpn_nms_thresh,
        smooth_l1_beta=rc.rpn_smooth_l1_beta,
    )
    roi_heads = SmoothL1RoIHeads(
        roi_pooler(rc.pooler_resolution, rc.pooler_sampling_ratio, rc.pooler_aligned),
        box_head,
        box_predictor(box_features, num_classes),
        fg_iou_thresh=rc.roi_fg_iou_thresh,
        bg_iou_thresh=rc.roi_bg_iou_thresh,
        batch_size_per_image=rc.roi_batch_size_per_image,
        positive_fraction=rc.roi_positive_fraction,
        bbox_reg_weights=None,  # torchvision's (10, 10, 5, 5), as detectron2's
        score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh,
        detections_per_img=cfg.detections_per_img,
        smooth_l1_beta=rc.roi_smooth_l1_beta,
    )
    return FasterRCNN(backbone, fpn, neck, rpn, roi_heads)
