"""ATSS losses and inference decoding on hand-made predictions with worked-out answers."""

import math

import pytest
import torch
from torchvision.ops import batched_nms, clip_boxes_to_image

from detectors.atss import ATSSHead, centerness_targets, make_anchors

LN2 = math.log(2)
# one anchor per level: a 10-pixel box at the origin and two far away
ANCHORS = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[200.0, 200.0, 240.0, 240.0]]),
           torch.tensor([[300.0, 300.0, 380.0, 380.0]])]


def _outputs(num_anchors=3, num_classes=2):
    return {
        "cls_logits": torch.zeros(1, num_anchors, num_classes, requires_grad=True),
        "bbox_deltas": torch.zeros(1, num_anchors, 4, requires_grad=True),
        "centerness": torch.zeros(1, num_anchors, requires_grad=True),
    }


def _head():
    return ATSSHead(8, num_classes=2, num_levels=3, topk=1)


def test_make_anchors_centres_and_sizes():
    (level,) = make_anchors([(2, 3)], (16,), 8.0, torch.device("cpu"))
    assert level.shape == (6, 4)
    # second location of the second row: centre ((1 + 0.5) * 16, (1 + 0.5) * 16), side 8 * 16
    torch.testing.assert_close(level[4], torch.tensor([24.0 - 64, 24.0 - 64, 24.0 + 64, 24.0 + 64]))
    # third location of the first row, off the diagonal: centre x (2 + 0.5) * 16, y (0 + 0.5) * 16
    torch.testing.assert_close(level[2], torch.tensor([40.0 - 64, 8.0 - 64, 40.0 + 64, 8.0 + 64]))


def test_centerness_targets():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [-3.0, 0.0, 7.0, 10.0]])  # centres (5, 5) and (2, 5)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    torch.testing.assert_close(centerness_targets(anchors, boxes), torch.tensor([1.0, math.sqrt(2 / 8)]))
    # a box whose x1 and y1 differ: the centre (3, 6) in [1, 2, 11, 8] has (l, r, t, b) = (2, 8, 4, 2)
    anchor, box = torch.tensor([[2.0, 5.0, 4.0, 7.0]]), torch.tensor([[1.0, 2.0, 11.0, 8.0]])
    torch.testing.assert_close(centerness_targets(anchor, box), torch.tensor([math.sqrt(2 / 8 * 2 / 4)]))


def test_losses_on_known_case():
    # the box [1,1,9,9] takes the origin anchor (IoU 0.64 against candidates 0.64, 0, 0)
    targets = [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([1])}]
    losses = _head().compute_loss(_outputs(), ANCHORS, targets)
    # logits 0 -> p = 0.5: one positive term 0.25 * 0.5^2 * ln 2 and five negative terms 0.75 * 0.5^2 * ln 2
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(LN2 * (0.0625 + 5 * 0.1875)))
    # zero deltas decode to the anchor [0,0,10,10]: GIoU = IoU 0.64 (the anchor encloses the box), x2 weight
    torch.testing.assert_close(losses["loss_box"], torch.tensor(2 * (1 - 0.64)))
    # centerness target 1 (anchor centre = box centre), logit 0: BCE ln 2 over one positive
    torch.testing.assert_close(losses["loss_centerness"], torch.tensor(LN2))



@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_boxes_of_any_floating_dtype_give_the_float32_losses(dtype):
    """Half or double boxes (the detectors take any floating dtype, as RetinaNet and Faster R-CNN did) are read as
    float32, where the assigner's distance failed on a dtype other than the anchors'."""
    box, labels = torch.tensor([[1.0, 1.0, 9.0, 9.0]]), torch.tensor([1])
    want = _head().compute_loss(_outputs(), ANCHORS, [{"boxes": box, "labels": labels}])
    got = _head().compute_loss(_outputs(), ANCHORS, [{"boxes": box.to(dtype), "labels": labels}])
    for name in want:
        torch.testing.assert_close(got[name], want[name])

def test_exact_box_prediction_has_zero_box_loss():
    head = _head()
    box = torch.tensor([[1.0, 1.0, 9.0, 9.0]])
    outputs = _outputs()
    with torch.no_grad():
        outputs["bbox_deltas"][0, 0] = head.box_coder.encode(box, ANCHORS[0])[0]
    losses = head.compute_loss(outputs, ANCHORS, [{"boxes": box, "labels": torch.tensor([0])}])
    assert losses["loss_box"].abs().item() < 1e-6


def test_crowd_boxes_are_removed_before_assignment_as_the_release():
    # detectron2's data loader drops crowd annotations before the release's ATSS sees them: a crowd box takes no
    # anchor and the anchor inside it stays an ordinary negative of the classification loss
    box = torch.tensor([[1.0, 1.0, 9.0, 9.0]])
    crowd_box = torch.tensor([[190.0, 190.0, 250.0, 250.0]])  # around the second anchor
    with_crowd = [{"boxes": torch.cat((box, crowd_box)), "labels": torch.tensor([1, 0]),
                   "iscrowd": torch.tensor([False, True])}]
    plain = [{"boxes": box, "labels": torch.tensor([1])}]
    crowd_losses = _head().compute_loss(_outputs(), ANCHORS, with_crowd)
    plain_losses = _head().compute_loss(_outputs(), ANCHORS, plain)
    for name in plain_losses:
        torch.testing.assert_close(crowd_losses[name], plain_losses[name])
    # one positive term and five negative ones, as test_losses_on_known_case
    torch.testing.assert_close(crowd_losses["loss_cls"], torch.tensor(LN2 * (0.0625 + 5 * 0.1875)))


def test_no_positives_gives_zero_box_losses_with_gradients():
    outputs = _outputs()
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = _head().compute_loss(outputs, ANCHORS, targets)
    # all six terms negative, normalised by max(num_pos, 1)
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(LN2 * 6 * 0.1875))
    assert losses["loss_box"].item() == 0 and losses["loss_centerness"].item() == 0
    sum(losses.values()).backward()
    assert all(t.grad is not None for t in outputs.values())


@pytest.mark.parametrize("boxes", [[[1.0, 1.0, 9.0, 9.0]], []], ids=["positives", "none"])
def test_every_process_makes_the_same_collective_calls_with_or_without_positives(monkeypatch, boxes):
    # under DDP a process whose batch has no positives must still join each cross-process sum, or its next
    # collective (the gradient all-reduce) pairs with another process's sum
    import detectors.atss as atss

    calls = []
    monkeypatch.setattr(atss, "sum_across_processes", lambda t: calls.append(tuple(t.shape)) or t)
    targets = [{"boxes": torch.tensor(boxes).reshape(-1, 4), "labels": torch.ones(len(boxes), dtype=torch.int64)}]
    _head().compute_loss(_outputs(), ANCHORS, targets)
    assert calls == [(), ()]  # the positives count, then the centerness targets' sum


def _logit(p):
    return math.log(p / (1 - p))


def test_postprocess_scores_threshold_nms_and_clipping():
    head = _head()
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [40.0, 40.0, 60.0, 60.0],
                             [0.0, 50.0, 10.0, 60.0]])]
    cls = torch.full((1, 4, 2), -10.0)
    cls[0, 0, 0] = _logit(0.9)  # kept
    cls[0, 1, 0] = _logit(0.8)  # same class, IoU 0.82 with the first: suppressed
    cls[0, 1, 1] = _logit(0.7)  # other class at the same place: kept
    cls[0, 2, 1] = _logit(0.04)  # under the 0.05 threshold
    cls[0, 3, 0] = _logit(0.5)  # kept, clipped to the 55-pixel-high image
    ctr = torch.tensor([[0.0, _logit(0.5), 0.0, 0.0]])
    outputs = {"cls_logits": cls, "bbox_deltas": torch.zeros(1, 4, 4), "centerness": ctr}
    (det,) = head.postprocess(outputs, anchors, [(55, 100)])
    torch.testing.assert_close(det["scores"], torch.tensor([0.45, 0.35, 0.25]))
    assert det["labels"].tolist() == [0, 1, 0]
    torch.testing.assert_close(
        det["boxes"], torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [0.0, 50.0, 10.0, 55.0]])
    )
    (top1,) = head.postprocess(outputs, anchors, [(55, 100)], detections_per_img=1)
    assert top1["scores"].tolist() == pytest.approx([0.45])
    (pre1,) = head.postprocess(outputs, anchors, [(55, 100)], pre_nms_topk=1)
    assert pre1["scores"].tolist() == pytest.approx([0.45])


def test_postprocess_clips_after_nms_and_drops_empty_boxes_as_the_release():
    """The release's ATSS inference: NMS on the unclipped boxes, then detectron2's detector_postprocess clips and
    drops what is left empty."""
    # IoU 5000 / 10000 = 0.5 unclipped, 1 once clipped to the 100 x 100 image; the third lies right of it
    anchors = [torch.tensor([[-50.0, 0.0, 50.0, 100.0], [0.0, 0.0, 50.0, 100.0], [120.0, 10.0, 150.0, 40.0]])]
    cls = torch.full((1, 3, 2), -10.0)
    cls[0, 0, 0], cls[0, 1, 0], cls[0, 2, 1] = _logit(0.9), _logit(0.8), _logit(0.7)
    outputs = {"cls_logits": cls, "bbox_deltas": torch.zeros(1, 3, 4), "centerness": torch.zeros(1, 3)}
    (det,) = _head().postprocess(outputs, anchors, [(100, 100)], nms_thresh=0.6)
    torch.testing.assert_close(det["boxes"], torch.tensor([[0.0, 0.0, 50.0, 100.0]] * 2))
    torch.testing.assert_close(det["scores"], torch.tensor([0.45, 0.4]))  # times sigmoid(0) centerness
    assert det["labels"].tolist() == [0, 0]
    # clipping before NMS would keep the first box and the empty one instead
    clipped = clip_boxes_to_image(anchors[0], (100, 100))
    assert batched_nms(clipped, torch.tensor([0.45, 0.4, 0.35]), torch.tensor([0, 0, 1]), 0.6).tolist() == [0, 2]


def test_detector_maps_boxes_back_to_original_size():
    from detectors.atss import build_atss_dyhead
    from detectors.config import BackboneConfig, ModelConfig

    torch.manual_seed(0)
    backbone = BackboneConfig(name="slim", weights=None, norm="gn", gn_groups=8, freeze_at=0, widths=[8, 8, 16, 16],
                              depths=[1, 1, 1, 1])
    cfg = ModelConfig(backbone=backbone, fpn_channels=32, dyhead_channels=32, dyhead_blocks=1,
                      dyhead_backend="torchvision", score_thresh=0.0, detections_per_img=20)
    model = build_atss_dyhead(cfg, num_classes=3).eval()
    torch.nn.init.zeros_(model.head.cls_logits.bias)  # untrained scores near 0.5, so there are detections
    images = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        (plain,) = model(images, [(100, 120)])
        (mapped,) = model(images, [(100, 120)], original_sizes=[(200, 240)])
    assert len(plain["boxes"]) == 20
    assert plain["boxes"][:, 2].max() <= 120 and plain["boxes"][:, 3].max() <= 100
    torch.testing.assert_close(mapped["boxes"], plain["boxes"] * 2)
    torch.testing.assert_close(mapped["scores"], plain["scores"])


def test_r50_config_builds_frozen_backbone_and_runs():
    from pathlib import Path

    from torchvision.ops import FrozenBatchNorm2d

    from detectors.atss import build_atss_dyhead
    from detectors.config import load_config

    config = Path(__file__).resolve().parents[2] / "configs" / "atss_r50_dyhead_1x.yaml"
    cfg = load_config(config, ["model.backbone.weights=null", "model.dyhead_blocks=1", "model.backbone.freeze_at=2"])
    model = build_atss_dyhead(cfg.model, num_classes=80).eval()
    body = model.backbone.body
    assert model.backbone.out_channels == [512, 1024, 2048]
    assert isinstance(body.bn1, FrozenBatchNorm2d) and not any(
        isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules()
    )
    # FREEZE_AT 2 (detectron2's default; the release trained everything): the stem and the first stage are frozen
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    with torch.no_grad():
        features = model.neck(model.fpn(model.backbone(torch.randn(1, 3, 256, 128))))
    assert [tuple(f.shape) for f in features.values()] == [
        (1, 256, 32, 16), (1, 256, 16, 8), (1, 256, 8, 4), (1, 256, 4, 2), (1, 256, 2, 1)
    ]


def test_box_loss_is_centerness_weighted_and_centerness_loss_is_per_positive():
    """The release's ATSS loss: GIoU weighted by each positive's centerness target and divided by the targets'
    sum; the centerness BCE divided by the positives' count. Two images, one positive each, with centerness
    targets 1 and sqrt(4 / 8 * 4 / 4) and different GIoUs, so that either normaliser swapped gives another value."""
    outputs = {"cls_logits": torch.zeros(2, 3, 2), "bbox_deltas": torch.zeros(2, 3, 4),
               "centerness": torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])}
    targets = [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([1])},
               # IoU 72 / 124 with the origin anchor, over mean + std 0.529 of (0.581, 0, 0); centre (7, 5)
               {"boxes": torch.tensor([[1.0, 1.0, 13.0, 9.0]]), "labels": torch.tensor([0])}]
    losses = _head().compute_loss(outputs, ANCHORS, targets)
    ctr = torch.tensor([1.0, math.sqrt(0.5)], dtype=torch.float64)  # (l, r, t, b) = (4, 4, 4, 4) and (4, 8, 4, 4)
    # zero deltas decode to the anchor [0,0,10,10]: GIoU 0.64 (it encloses the first box); the second's enclosing
    # box [0,0,13,10] has area 130 against the union 124
    giou_loss = torch.tensor([1 - 0.64, 1 - (72 / 124 - (130 - 124) / 130)], dtype=torch.float64)
    expected_box = 2 * (giou_loss * ctr).sum() / ctr.sum()
    torch.testing.assert_close(losses["loss_box"], expected_box.float())
    # BCE of logits 0 and 1 against the targets, over two positives
    bce = LN2 + (math.log1p(math.exp(1.0)) - ctr[1].item() * 1.0)
    torch.testing.assert_close(losses["loss_centerness"], torch.tensor(bce / 2))
    # two positive terms and ten negative ones, over two positives
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(LN2 * (2 * 0.0625 + 10 * 0.1875) / 2))


def test_normalisers_are_the_counts_averaged_over_processes(monkeypatch):
    # the release's ATSS: num_pos_avg_per_gpu = max(reduce_sum(num_pos) / num_gpus, 1) and the centerness sum
    # likewise. Two processes with the same batch: the sums double, the averages and so the losses stay those of
    # test_losses_on_known_case
    import detectors.atss as atss

    monkeypatch.setattr(atss, "get_world_size", lambda: 2)
    monkeypatch.setattr(atss, "sum_across_processes", lambda t: t * 2)
    outputs = _outputs()
    with torch.no_grad():
        outputs["centerness"][0, 0] = 1.0
    targets = [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([1])}]
    losses = _head().compute_loss(outputs, ANCHORS, targets)
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(LN2 * (0.0625 + 5 * 0.1875)))
    torch.testing.assert_close(losses["loss_box"], torch.tensor(2 * (1 - 0.64)))
    # centerness target 1, logit 1: BCE softplus(1) - 1
    torch.testing.assert_close(losses["loss_centerness"], torch.tensor(math.log1p(math.exp(1.0)) - 1.0))


def test_postprocess_thresholds_the_class_probability_before_the_centerness_product():
    # the release's ATSS inference: candidates are sigmoid(cls) > 0.05; only then are scores multiplied by
    # sigmoid(centerness). p = 0.08 with centerness 0.5 scores 0.04, under the threshold, and is still kept
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 60.0, 60.0]])]
    cls = torch.full((1, 2, 2), -10.0)
    cls[0, 0, 0] = _logit(0.08)
    cls[0, 1, 1] = _logit(0.04)  # under the threshold whatever its centerness
    ctr = torch.tensor([[0.0, 10.0]])
    outputs = {"cls_logits": cls, "bbox_deltas": torch.zeros(1, 2, 4), "centerness": ctr}
    (det,) = _head().postprocess(outputs, anchors, [(100, 100)])
    torch.testing.assert_close(det["scores"], torch.tensor([0.04]))
    assert det["labels"].tolist() == [0]
    torch.testing.assert_close(det["boxes"], anchors[0][:1])


def test_rescale_detections_scales_x_by_widths_and_y_by_heights_then_clips():
    from detectors.detections import rescale_detections

    # input content 100 x 120 (h, w) from an original 150 x 360: x times 3, y times 1.5, then clipped to 360 x 150
    det = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0], [100.0, 90.0, 130.0, 110.0]]),
           "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])}
    (out,) = rescale_detections([det], [(100, 120)], [(150, 360)])
    torch.testing.assert_close(out["boxes"], torch.tensor([[30.0, 30.0, 90.0, 60.0], [300.0, 135.0, 360.0, 150.0]]))


def test_head_initialisation_and_output_layout_are_the_releases():
    """The release's ATSS head: weights N(0, 0.01), zero biases but the class bias -log((1 - p) / p) for the prior
    p, one Scale(1.0) per level on the box deltas. Outputs are channels-last per location, row-major, levels
    concatenated: checked against 1x1 convolutions written as matrix products."""
    torch.manual_seed(0)
    head = ATSSHead(64, num_classes=3, num_levels=2)  # the default prior 0.01
    torch.testing.assert_close(head.cls_logits.bias, torch.full((3,), -math.log(99.0)))
    assert head.bbox_pred.bias.abs().max() == 0 and head.centerness.bias.abs().max() == 0
    for conv in (head.cls_logits, head.bbox_pred, head.centerness):
        assert conv.weight.std().item() == pytest.approx(0.01, rel=0.25)
    assert [s.scale.item() for s in head.scales] == [1.0, 1.0]
    with torch.no_grad():
        for param in head.parameters():
            param.copy_(torch.randn_like(param))
        head.scales[0].scale.fill_(1.0)
        head.scales[1].scale.fill_(2.0)
        features = [torch.randn(2, 64, 2, 3), torch.randn(2, 64, 1, 2)]
        outputs = head(features)

    def conv1x1(feature, conv):  # (N, C, H, W) -> (N, H * W, out)
        return feature.flatten(2).transpose(1, 2) @ conv.weight.flatten(1).T + conv.bias

    cls = torch.cat([conv1x1(f, head.cls_logits) for f in features], dim=1)
    box = torch.cat([conv1x1(features[0], head.bbox_pred), 2.0 * conv1x1(features[1], head.bbox_pred)], dim=1)
    ctr = torch.cat([conv1x1(f, head.centerness)[..., 0] for f in features], dim=1)
    assert outputs["cls_logits"].shape == (2, 8, 3)
    torch.testing.assert_close(outputs["cls_logits"], cls)
    torch.testing.assert_close(outputs["bbox_deltas"], box)
    torch.testing.assert_close(outputs["centerness"], ctr)


def test_focal_loss_targets_the_boxs_class():
    # the origin anchor's logits (0, 2) for the box of class 1: its class-1 term is positive, with p = sigmoid(2);
    # the other five terms are negatives at p = 0.5. By hand: positive alpha (1 - p)^2 (-log p), negative
    # (1 - alpha) p^2 (-log (1 - p))
    outputs = _outputs()
    with torch.no_grad():
        outputs["cls_logits"][0, 0, 1] = 2.0
    targets = [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([1])}]
    losses = _head().compute_loss(outputs, ANCHORS, targets)
    p = 1 / (1 + math.exp(-2.0))
    expected = 0.25 * (1 - p) ** 2 * -math.log(p) + 5 * 0.75 * 0.25 * LN2
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(expected))


def test_box_loss_of_one_positive_is_its_giou_loss_whatever_its_centerness():
    # GIoU weighted by the centerness target and divided by the targets' sum: one positive with target sqrt(0.5)
    # (centre (5, 5) in [1, 1, 13, 9]) gives twice its plain GIoU loss. The enclosing box of the anchor [0,0,10,10]
    # and the box is [0,0,13,10]: area 130, union 124, intersection 72
    targets = [{"boxes": torch.tensor([[1.0, 1.0, 13.0, 9.0]]), "labels": torch.tensor([0])}]
    losses = _head().compute_loss(_outputs(), ANCHORS, targets)
    torch.testing.assert_close(losses["loss_box"], torch.tensor(2 * (1 - (72 / 124 - 6 / 130))))


@pytest.mark.parametrize("threshold, count", [(0.5, 0), (0.49, 2)])
def test_postprocess_keeps_only_probabilities_strictly_over_the_threshold(threshold, count):
    # the release's candidate_inds = box_cls.sigmoid() > pre_nms_thresh: logits 0 give p = 0.5 exactly, not a
    # candidate at the threshold 0.5
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    outputs = {"cls_logits": torch.zeros(1, 1, 2), "bbox_deltas": torch.zeros(1, 1, 4), "centerness": torch.zeros(1, 1)}
    (det,) = _head().postprocess(outputs, anchors, [(100, 100)], score_thresh=threshold)
    assert len(det["scores"]) == count


def test_select_detections_drops_boxes_left_without_height():
    from detectors.detections import select_detections

    # the second box lies below the 100 x 100 image: clipped to [20, 100, 30, 100], zero height, dropped
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 120.0, 30.0, 140.0], [50.0, 90.0, 60.0, 120.0]])
    det = select_detections(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 1, 2]), (100, 100), 0.6, 100)
    torch.testing.assert_close(det["boxes"], torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 90.0, 60.0, 100.0]]))
    torch.testing.assert_close(det["scores"], torch.tensor([0.9, 0.7]))
    assert det["labels"].tolist() == [0, 2]


def test_built_atss_takes_the_configs_settings(monkeypatch):
    """Every ATSS setting of the config reaches the model: none left at a default that happens to match the tests."""
    from detectors.atss import build_atss_dyhead
    from detectors.config import BackboneConfig, ModelConfig

    backbone = BackboneConfig(name="slim", weights=None, norm="gn", gn_groups=8, freeze_at=0, widths=[8, 8, 16, 16],
                              depths=[1, 1, 1, 1])
    cfg = ModelConfig(backbone=backbone, fpn_channels=32, dyhead_channels=32, dyhead_blocks=1,
                      dyhead_backend="torchvision", dyhead_high_offsets="crop", anchor_scale=6.0, atss_topk=5,
                      prior_prob=0.1, focal_alpha=0.3, focal_gamma=1.5, reg_loss_weight=1.5, score_thresh=0.2,
                      pre_nms_topk=7, nms_thresh=0.3, detections_per_img=4)
    model = build_atss_dyhead(cfg, num_classes=3).eval()
    head = model.head
    assert (head.assigner.topk, head.focal_alpha, head.focal_gamma, head.reg_loss_weight) == (5, 0.3, 1.5, 1.5)
    torch.testing.assert_close(head.cls_logits.bias, torch.full((3,), -math.log(0.9 / 0.1)))
    assert model.neck.blocks[0].spatial.high_offsets == "crop"
    # one anchor of side 6 strides per location of P3-P7, strides 8 to 128, centred half a stride in
    anchors = model.make_anchors([(1, 1)] * 5, torch.device("cpu"))
    expected = [torch.tensor([[s / 2 - 3 * s, s / 2 - 3 * s, s / 2 + 3 * s, s / 2 + 3 * s]]) for s in (8, 16, 32, 64, 128)]
    for level, want in zip(anchors, expected, strict=True):
        torch.testing.assert_close(level, want)
    calls = []
    monkeypatch.setattr(head, "postprocess", lambda outputs, anchors, sizes, *settings: calls.append(settings) or [])
    with torch.no_grad():
        model(torch.randn(1, 3, 128, 128), [(128, 128)])
    assert calls == [(0.2, 7, 0.3, 4)]  # score_thresh, pre_nms_topk, nms_thresh, detections_per_img


def test_postprocess_reads_each_images_own_predictions():
    # two images over the same anchors: image 0 has anchor 0 at class 0 (p 0.9, centerness 0.5, no deltas), image 1
    # anchor 1 at class 1 (p 0.8, centerness 0.25) moved right by dx 1 = 0.1 anchor widths (weight 10): 2 pixels
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 60.0, 60.0]])]
    cls = torch.full((2, 2, 2), -10.0)
    cls[0, 0, 0], cls[1, 1, 1] = _logit(0.9), _logit(0.8)
    ctr = torch.tensor([[0.0, -10.0], [-10.0, _logit(0.25)]])
    deltas = torch.zeros(2, 2, 4)
    deltas[1, 1, 0] = 1.0
    outputs = {"cls_logits": cls, "bbox_deltas": deltas, "centerness": ctr}
    first, second = _head().postprocess(outputs, anchors, [(100, 100), (100, 100)])
    torch.testing.assert_close(first["boxes"], torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    torch.testing.assert_close(first["scores"], torch.tensor([0.45]))
    assert first["labels"].tolist() == [0]
    torch.testing.assert_close(second["boxes"], torch.tensor([[42.0, 40.0, 62.0, 60.0]]))
    torch.testing.assert_close(second["scores"], torch.tensor([0.2]))
    assert second["labels"].tolist() == [1]
