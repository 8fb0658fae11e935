"""The shared body of the one-stage detectors: backbone -> FPN -> neck -> dense head, with anchors per level."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .detections import rescale_detections
from .inputs import check_detector_inputs

__all__ = ["OneStageDetector"]


class OneStageDetector(nn.Module):
    """A dense detector over a five-level pyramid; subclasses say where the anchors are (``make_anchors``).

    In training, ``forward(images, image_sizes, targets)`` returns the head's dict of losses; in eval it returns
    one dict per image with ``boxes`` (x1,y1,x2,y2 float32), ``scores`` and ``labels`` (int64 in
    ``[0, num_classes)``), in input pixels or, when ``original_sizes`` is given, in original image pixels.

    Args:
        backbone: returns an ordered dict of C3-C5 and has ``out_channels``.
        fpn: turns C3-C5 into P3-P7 (an ordered dict).
        neck: refines P3-P7, same container in and out.
        head: has ``num_classes``, ``forward(features) -> outputs``, ``compute_loss(outputs, anchors, targets)``
            and ``postprocess(outputs, anchors, image_sizes, score_thresh, pre_nms_topk, nms_thresh,
            detections_per_img)``.
        score_thresh, pre_nms_topk, nms_thresh, detections_per_img: inference settings.
    """

    def __init__(
        self,
        backbone: nn.Module,
        fpn: nn.Module,
        neck: nn.Module,
        head: nn.Module,
        score_thresh: float = 0.05,
        pre_nms_topk: int = 1000,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
    ):
        super().__init__()
        self.backbone = backbone
        self.fpn = fpn
        self.neck = neck
        self.head = head
        self.score_thresh = score_thresh
        self.pre_nms_topk = pre_nms_topk
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    def make_anchors(self, sizes: list[tuple[int, int]], device: torch.device) -> list[Tensor]:
        """Per level ``(H_l, W_l)`` -> that level's anchors ``(H_l W_l A, 4)`` float32, in the head's order."""
        raise NotImplementedError

    def forward(
        self,
        images: Tensor,
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
        original_sizes: list[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses (training) or detections (eval).

        Args:
            images: ``(N, 3, H, W)`` float, normalised, padded so that H and W are multiples of 128.
            image_sizes: ``(h, w)`` of each image's content before padding.
            targets: training only; see the head's ``compute_loss``.
            original_sizes: eval only; ``(h, w)`` to rescale the boxes to.

        Raises:
            TypeError, ValueError: an argument ``check_detector_inputs`` refuses, named with the image at fault.
        """
        check_detector_inputs(images, image_sizes, targets, original_sizes, self.num_classes, self.training)
        features = list(self.neck(self.fpn(self.backbone(images))).values())
        outputs = self.head(features)
        anchors = self.make_anchors([tuple(f.shape[-2:]) for f in features], images.device)
        if self.training:
            return self.head.compute_loss(outputs, anchors, targets)
        detections = self.head.postprocess(
            outputs, anchors, image_sizes, self.score_thresh, self.pre_nms_topk, self.nms_thresh,
            self.detections_per_img,
        )
        if original_sizes is not None:
            rescale_detections(detections, image_sizes, original_sizes)
        return detections

    @property
    def num_classes(self) -> int:
        """Number of object classes K."""
        return self.head.num_classes
