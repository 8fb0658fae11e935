"""Faster R-CNN + DyHead: both box heads' losses and gradients, the RPN's anchors and normaliser against
detectron2's, the RPN and box losses against torchvision's and L1, the pooler, the targets torchvision's heads see,
eval output, a short run."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss as torchvision_fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign, roi_align

from detectors.build import build_detector
from detectors.config import ConfigError, load_config
from detectors.engine.train import train
from detectors.faster_rcnn import SmoothL1RoIHeads, SmoothL1RPN, box_predictor, fastrcnn_loss, fc_box_head, roi_pooler
from test_det_training import _tiny_overrides

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NUM_CLASSES = 3
IMAGE_SIZES = [(128, 128), (100, 120)]


def _model(box_head="fc", fc_dim=32):
    cfg = load_config(CONFIGS / "shapes_tiny.yaml", [
        "model.meta_architecture=faster_rcnn",
        f"model.rcnn.box_head={box_head}",
        f"model.rcnn.fc_dim={fc_dim}",
        "model.backbone.widths=[8, 16, 16, 32]",
        "model.fpn_channels=16",
        "model.dyhead_channels=16",
        "model.dyhead_blocks=1",
        "model.dyhead_backend=sampled",
        "model.score_thresh=0",  # untrained scores are low: keep detections to check
    ])
    torch.manual_seed(0)
    return build_detector(cfg.model, NUM_CLASSES)


def _targets():
    return [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [0.0, 0.0, 120.0, 110.0], [70.0, 20.0, 110.0, 50.0]]),
         "labels": torch.tensor([0, 2, 1]), "iscrowd": torch.tensor([False, True, False])},
        {"boxes": torch.tensor([[30.0, 30.0, 90.0, 80.0]]), "labels": torch.tensor([2])},  # no iscrowd key
    ]


@pytest.mark.parametrize("box_head", ["fc", "task_attention"])
def test_training_losses_reach_neck_box_head_and_predictor(box_head):
    model = _model(box_head).train()
    if box_head == "fc":  # the release: the whole DyHead on the pyramid, two fully connected layers per RoI
        assert all(block.task is not None for block in model.neck.blocks)
        box_head_parts = [("fc6", model.roi_heads.box_head.fc6), ("fc7", model.roi_heads.box_head.fc7)]
    else:  # the paper: task attention in the box head only
        assert all(block.task is None for block in model.neck.blocks)
        box_head_parts = [("RoI task attention", model.roi_heads.box_head.task)]
    losses = model(torch.randn(2, 3, 128, 128), IMAGE_SIZES, _targets())
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    for name, module in [("neck", model.neck), *box_head_parts, ("predictor", model.roi_heads.box_predictor),
                         ("RPN head", model.rpn.head)]:
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name


def test_fc_box_head_is_detectron2s_two_fc_layers():
    """Names fc6/fc7 (what the release converter maps fc1/fc2 to), c2_xavier_fill, ReLU after each layer."""
    torch.manual_seed(0)
    head = fc_box_head(4 * 7 * 7, 32)
    assert isinstance(head, TwoMLPHead) and [name for name, _ in head.named_children()] == ["fc6", "fc7"]
    for layer, fan_in in [(head.fc6, 4 * 7 * 7), (head.fc7, 32)]:
        bound = math.sqrt(3 / fan_in)  # kaiming_uniform_ with a=1: gain 1, U(-sqrt(3 / fan_in), sqrt(3 / fan_in))
        assert 0.9 * bound < layer.weight.abs().max() <= bound and not layer.bias.any()
    out = head(torch.randn(5, 4, 7, 7))
    assert out.shape == (5, 32) and (out >= 0).all()


def test_box_predictor_is_initialised_as_detectron2s():
    # detectron2's FastRCNNOutputLayers: cls_score N(0, 0.01), bbox_pred N(0, 0.001), zero biases; K + 1 classes
    torch.manual_seed(0)
    predictor = box_predictor(256, 3)
    assert predictor.cls_score.out_features == 4 and predictor.bbox_pred.out_features == 16
    assert predictor.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert predictor.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.1)
    assert not predictor.cls_score.bias.any() and not predictor.bbox_pred.bias.any()


def test_unknown_box_head_names_the_valid_ones():
    with pytest.raises(ConfigError, match="box_head: expected one of fc, task_attention, got 'fc7'"):
        _model("fc7")


def _rpn(rpn_class, **kwargs):
    anchors = AnchorGenerator(((32,),), ((1.0,),))
    return rpn_class(anchors, RPNHead(4, 1), 0.7, 0.3, 16, 0.5, {"training": 10, "testing": 10},
                     {"training": 10, "testing": 10}, 0.7, **kwargs)


def test_rpn_loss_is_torchvisions_at_beta_one_ninth_and_l1_at_zero():
    """With ``batch_size_per_image`` labelled anchors sampled in every image, detectron2's normaliser (that
    count x images) is torchvision's (the anchors sampled)."""
    g = torch.Generator().manual_seed(0)
    labels = [torch.randint(-1, 2, (n,), generator=g).float() for n in (40, 30)]  # fg 1, bg 0, ignored -1
    targets = [torch.randn(n, 4, generator=g) for n in (40, 30)]
    objectness, deltas = torch.randn(70, 1, generator=g), torch.randn(70, 4, generator=g)

    def loss(rpn):
        torch.manual_seed(1)  # the sampler draws random permutations
        return rpn.compute_loss(objectness, deltas, labels, targets)

    torchvision_loss = loss(_rpn(RegionProposalNetwork))
    for ours, theirs in zip(loss(_rpn(SmoothL1RPN, smooth_l1_beta=1 / 9)), torchvision_loss):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)

    rpn = _rpn(SmoothL1RPN, smooth_l1_beta=0.0)
    torch.manual_seed(1)
    pos, neg = (torch.cat(masks).nonzero()[:, 0] for masks in rpn.fg_bg_sampler(labels))
    assert 0 < len(pos) and len(pos) + len(neg) == 32  # 16 per image: some anchors are left out
    l1 = (deltas[pos] - torch.cat(targets)[pos]).abs().sum() / (len(pos) + len(neg))
    objectness_loss, box_loss = loss(rpn)
    torch.testing.assert_close(box_loss, l1)
    torch.testing.assert_close(objectness_loss, torchvision_loss[0], rtol=0, atol=0)
    assert box_loss > torchvision_loss[1]  # every |x| >= beta loses beta / 2 in smooth L1


def test_rpn_loss_divides_sums_by_batch_size_per_image_times_images():
    """detectron2's RPN normaliser: the first image has 6 labelled anchors, fewer than batch_size_per_image (16),
    and still counts 16; torchvision's would be the 22 anchors sampled."""
    labels = [torch.full((40,), -1.0), torch.full((30,), -1.0)]
    labels[0][[3, 17]] = 1.0
    labels[0][[0, 5, 9, 20]] = 0.0
    labels[1][:3] = 1.0
    labels[1][3:16] = 0.0  # 3 + 13: exactly a full sample
    g = torch.Generator().manual_seed(0)
    targets = [torch.randn(n, 4, generator=g) for n in (40, 30)]
    objectness, deltas = torch.randn(70, 1, generator=g), torch.randn(70, 4, generator=g)
    rpn = _rpn(SmoothL1RPN, smooth_l1_beta=0.0)
    objectness_loss, box_loss = rpn.compute_loss(objectness, deltas, labels, targets)

    # every labelled anchor is sampled (at most 8 positives, negatives up to 16): nothing random is left
    y, logits = torch.cat(labels), objectness[:, 0]
    sampled, pos = y >= 0, y == 1
    bce = -(y * F.logsigmoid(logits) + (1 - y) * F.logsigmoid(-logits))[sampled].sum()
    l1 = (deltas[pos] - torch.cat(targets)[pos]).abs().sum()
    torch.testing.assert_close(objectness_loss, bce / (16 * 2))
    torch.testing.assert_close(box_loss, l1 / (16 * 2))
    torchvision_objectness, _ = _rpn(RegionProposalNetwork).compute_loss(objectness, deltas, labels, targets)
    torch.testing.assert_close(torchvision_objectness, bce / 22)


def test_rpn_anchors_are_detectron2s_unrounded_on_fixed_strides():
    """detectron2's DefaultAnchorGenerator with the release's sizes 32-512, ratios (h / w) 0.5, 1, 2 and offset 0,
    here on 96 x 160 pixels (padded to 32 only): P6 is 2 x 3, where torchvision would take a stride of 96 // 2."""
    generator = _model().rpn.anchor_generator
    grid = [(24, 40), (12, 20), (6, 10), (3, 5), (2, 3)]
    features = [torch.zeros(1, 1, h, w) for h, w in grid]
    batch = ImageList(torch.zeros(2, 3, 96, 160), [(96, 160), (90, 150)])
    anchors = generator(batch, features)
    expected = []
    for level, (h, w) in enumerate(grid):
        stride, side = 4 * 2**level, 32 * 2**level
        for y in range(h):
            for x in range(w):
                for ratio in (0.5, 1.0, 2.0):
                    width = math.sqrt(side**2 / ratio)
                    height = ratio * width
                    cx, cy = x * stride, y * stride
                    expected.append([cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2])
    assert len(anchors) == 2 and generator.num_anchors_per_location() == [3] * 5
    for image_anchors in anchors:
        torch.testing.assert_close(image_anchors, torch.tensor(expected))
    torchvision_anchors = AnchorGenerator(tuple((32 * 2**level,) for level in range(5)), ((0.5, 1.0, 2.0),) * 5)
    theirs = torchvision_anchors(batch, features)[0]
    torch.testing.assert_close(theirs[0], torch.tensor([-23.0, -11.0, 23.0, 11.0]))  # 45.25 x 22.63, rounded
    p6 = slice(len(expected) - 2 * 3 * 3, None)
    assert (theirs[p6] - anchors[0][p6]).abs().max() > 16  # a third of P6's 64-pixel stride off at x = 2


def _roi_heads_inputs():
    g = torch.Generator().manual_seed(0)
    features = {k: torch.randn(2, 4, 128 // s, 128 // s, generator=g) for k, s in
                zip(["c2", "c3", "c4", "c5"], [4, 8, 16, 32])}
    corners = torch.rand(2, 20, 2, generator=g) * 80
    proposals = list(torch.cat([corners, corners + 8 + torch.rand(2, 20, 2, generator=g) * 40], dim=2))
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 110.0, 50.0]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[30.0, 30.0, 90.0, 80.0]]), "labels": torch.tensor([2])}]
    return features, proposals, [(128, 128), (100, 120)], targets


def _roi_heads(heads_class, **kwargs):
    torch.manual_seed(0)
    predictor = box_predictor(16, 3)
    for layer in (predictor.cls_score, predictor.bbox_pred):  # deltas of the size of the targets
        torch.nn.init.normal_(layer.weight, std=0.3)
    return heads_class(roi_pooler(2, 2, True), fc_box_head(4 * 2 * 2, 16), predictor, 0.5, 0.5, 16, 0.25, None,
                       0.0, 0.5, 100, **kwargs)


def test_roi_box_loss_is_torchvisions_at_beta_one_ninth_and_l1_at_zero():
    features, proposals, image_shapes, targets = _roi_heads_inputs()

    def forward(heads):
        torch.manual_seed(1)  # the sampler draws random permutations
        return heads(features, proposals, image_shapes, targets)

    torchvision_heads = _roi_heads(RoIHeads).train()
    detections, torchvision_losses = forward(torchvision_heads)
    detections_ours, ours = forward(_roi_heads(SmoothL1RoIHeads, smooth_l1_beta=1 / 9).train())
    assert detections == detections_ours == [] and set(ours) == {"loss_classifier", "loss_box_reg"}
    for name in ours:
        torch.testing.assert_close(ours[name], torchvision_losses[name], rtol=0, atol=0)

    heads = _roi_heads(SmoothL1RoIHeads, smooth_l1_beta=0.0).train()
    torch.manual_seed(1)
    sampled, _, labels, regression_targets = heads.select_training_samples(proposals, targets)
    with torch.no_grad():
        logits, deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, sampled, image_shapes)))
    labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
    assert 0 < (labels > 0).sum() < len(labels) == 32  # 16 per image, foreground and background
    l1 = sum((deltas[i].view(-1, 4)[labels[i]] - regression_targets[i]).abs().sum() for i in range(len(labels))
             if labels[i] > 0) / len(labels)
    _, losses = forward(heads)
    torch.testing.assert_close(losses["loss_box_reg"], l1)
    for ours, theirs in zip(fastrcnn_loss(logits, deltas, [labels], [regression_targets], 1 / 9),
                            torchvision_fastrcnn_loss(logits, deltas, [labels], [regression_targets])):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(losses["loss_classifier"], torch.nn.functional.cross_entropy(logits, labels))
    torch.testing.assert_close(losses["loss_classifier"], torchvision_losses["loss_classifier"], rtol=0, atol=0)
    assert losses["loss_box_reg"] > torchvision_losses["loss_box_reg"]

    torchvision_heads.eval()
    with torch.no_grad():
        expected, _ = torchvision_heads(features, proposals, image_shapes)
        got, no_losses = heads.eval()(features, proposals, image_shapes)
    assert no_losses == {} and len(got) == 2 and all(len(det["boxes"]) for det in got)
    for det, want in zip(got, expected):
        assert det.keys() == want.keys()
        for key in det:
            torch.testing.assert_close(det[key], want[key], rtol=0, atol=0)


def test_torchvision_heads_see_labels_plus_one_without_crowd_boxes():
    model = _model().train()
    seen = {}
    model.rpn.register_forward_pre_hook(lambda module, args: seen.update(rpn=args[2]))
    model.roi_heads.register_forward_pre_hook(lambda module, args: seen.update(roi=args[3]))
    targets = _targets()
    model(torch.randn(2, 3, 128, 128), IMAGE_SIZES, targets)
    expected_boxes = [targets[0]["boxes"][[0, 2]], targets[1]["boxes"]]
    for stage in ("rpn", "roi"):
        for got, boxes, labels in zip(seen[stage], expected_boxes, [[1, 2], [3]]):
            torch.testing.assert_close(got["boxes"], boxes)
            assert got["labels"].tolist() == labels and got["labels"].dtype == torch.int64
    assert targets[0]["labels"].tolist() == [0, 2, 1]  # the caller's targets are left alone


def test_eval_detections_structure_and_label_shift():
    model = _model().eval()
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        detections = model(images, IMAGE_SIZES, original_sizes=[(256, 256), (50, 60)])
    assert model.num_classes == NUM_CLASSES and len(detections) == 2
    for det, (h, w) in zip(detections, [(256, 256), (50, 60)]):
        assert set(det) == {"boxes", "scores", "labels"}
        assert 0 < len(det["boxes"]) <= 100 and det["boxes"].shape[1] == 4
        assert det["labels"].dtype == torch.int64
        assert 0 <= det["labels"].min() and det["labels"].max() < NUM_CLASSES
        assert (det["boxes"][:, 2] <= w).all() and (det["boxes"][:, 3] <= h).all()
    # a classifier sure of torchvision's class 1 (0 is its background) detects only our class 0
    cls_score = model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        cls_score.weight.zero_()
        cls_score.bias.copy_(torch.tensor([0.0, 10.0, 0.0, 0.0]))
        detections = model(images, IMAGE_SIZES)
    assert all(len(det["labels"]) and (det["labels"] == 0).all() for det in detections)


def test_heads_decode_boxes_in_float32_under_bfloat16_autocast():
    model = _model().eval()
    seen = {}
    model.roi_heads.register_forward_pre_hook(lambda module, args: seen.update(features=args[0], proposals=args[1]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        detections = model(torch.randn(2, 3, 128, 128), IMAGE_SIZES)
    assert all(t.dtype == torch.float32 for t in [*seen["features"].values(), *seen["proposals"]])
    assert all(det["boxes"].dtype == det["scores"].dtype == torch.float32 for det in detections)


def _pyramid(size, batch=1, channels=16):
    return {k: torch.randn(batch, channels, size // s, size // s) for k, s in
            zip(["c2", "c3", "c4", "c5"], [4, 8, 16, 32])}


def test_roi_pooler_scales_are_the_strides_whatever_the_first_batch():
    """torchvision would infer them from the first batch's largest content: 70 pixels of content padded to
    128 would give P2 a scale of 1/2."""
    features = _pyramid(128)
    boxes = [torch.tensor([[5.0, 5.0, 60.0, 66.0], [10.0, 0.0, 30.0, 20.0]])]
    ours = roi_pooler(7, 0, aligned=False)(features, boxes, [(70, 70)])
    inferred = MultiScaleRoIAlign(["c2", "c3", "c4", "c5"], 7, 0)
    torch.testing.assert_close(ours, inferred(features, boxes, [(128, 128)]), rtol=0, atol=0)
    assert MultiScaleRoIAlign(["c2", "c3", "c4", "c5"], 7, 0)(features, boxes, [(70, 70)]).sub(ours).abs().max() > 0
    assert _model().roi_heads.box_roi_pool.aligned  # detectron2's ROIAlignV2 by default


def test_aligned_roi_pooler_is_roi_align_v2_on_each_rois_fpn_level():
    torch.manual_seed(0)
    features = _pyramid(512, batch=2, channels=3)
    # sides ~58, 20, 145, 265 and 490 pixels: levels 2, 2 (clamped), 3, 4, 5
    boxes = [torch.tensor([[5.0, 5.0, 60.0, 66.0], [0.0, 0.0, 150.0, 140.0], [0.0, 0.0, 500.0, 480.0]]),
             torch.tensor([[20.0, 30.0, 300.0, 280.0], [10.0, 0.0, 30.0, 20.0]])]
    pooled = roi_pooler(7, 0, aligned=True)(features, boxes, [(512, 512)] * 2)
    levels = []
    for image, image_boxes in enumerate(boxes):
        for box in image_boxes:
            side = ((box[2] - box[0]) * (box[3] - box[1])).sqrt().item()
            levels.append(min(max(math.floor(4 + math.log2(side / 224)), 2), 5))
            expected = roi_align(features[f"c{levels[-1]}"][image:image + 1], [box[None]], 7, 1 / 2 ** levels[-1], 0,
                                 aligned=True)
            torch.testing.assert_close(pooled[len(levels) - 1], expected[0])
    assert levels == [2, 3, 5, 4, 2]
    unaligned = roi_pooler(7, 0, aligned=False)(features, boxes, [(512, 512)] * 2)
    torchvision_pooler = MultiScaleRoIAlign(["c2", "c3", "c4", "c5"], 7, 0)
    torch.testing.assert_close(unaligned, torchvision_pooler(features, boxes, [(512, 512)] * 2), rtol=0, atol=0)
    assert (pooled - unaligned).abs().max() > 1e-3


def test_r50_config_loads():
    cfg = load_config(CONFIGS / "faster_rcnn_r50_dyhead_1x.yaml")
    assert cfg.model.meta_architecture == "faster_rcnn" and cfg.model.backbone.name == "resnet50"
    assert cfg.model.nms_thresh == 0.5 and cfg.model.rcnn.pooler_resolution == 7
    assert (cfg.solver.base_lr, cfg.solver.ims_per_batch, cfg.solver.max_iter) == (0.02, 16, 90000)
    assert cfg.data.input.size_divisibility == 64  # P6's stride, as the release pads


@pytest.mark.slow
def test_shapes_tiny_trains_and_loss_falls(tmp_path):
    out = tmp_path / "out"
    overrides = _tiny_overrides(tmp_path / "data", 30) + ["model.meta_architecture=faster_rcnn"]
    metrics = train(load_config(CONFIGS / "shapes_tiny.yaml", overrides), out)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert set(metrics["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    names = ["loss", "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"]
    logged = {name: [r[name] for r in records if "loss" in r] for name in names}
    assert all(len(values) == 30 for values in logged.values())
    # the last 5 iterations against the first 5: the classifier soon learns that most RoIs are background, and
    # objectness shows the RPN learning too
    for name in ("loss", "loss_objectness"):
        assert sum(logged[name][-5:]) < 0.8 * sum(logged[name][:5]), name


def test_built_rpn_and_roi_heads_take_their_own_matcher_and_sampler_settings():
    """Each RPN and RoI-head setting reaches its own torchvision module: distinct values, so that one read from
    the other stage's field (or from its fg / bg twin) fails. The defaults are the release's (detectron2's):
    RPN IoU 0.7 / 0.3, 256 anchors half positive; RoIs IoU 0.5, 512 a quarter positive."""
    settings = {"rpn_fg_iou_thresh": 0.71, "rpn_bg_iou_thresh": 0.29, "rpn_batch_size_per_image": 250,
                "rpn_positive_fraction": 0.45, "rpn_pre_nms_topk_train": 1900, "rpn_pre_nms_topk_test": 900,
                "rpn_post_nms_topk_train": 800, "rpn_post_nms_topk_test": 700, "rpn_nms_thresh": 0.66,
                "roi_fg_iou_thresh": 0.55, "roi_bg_iou_thresh": 0.45, "roi_batch_size_per_image": 500,
                "roi_positive_fraction": 0.3}
    base = ["model.meta_architecture=faster_rcnn", "model.backbone.widths=[8, 16, 16, 32]", "model.fpn_channels=16",
            "model.dyhead_channels=16", "model.dyhead_blocks=1", "model.dyhead_backend=sampled"]
    inference = ["model.score_thresh=0.2", "model.nms_thresh=0.3", "model.detections_per_img=7"]
    cfg = load_config(CONFIGS / "shapes_tiny.yaml",
                      base + inference + [f"model.rcnn.{k}={v}" for k, v in settings.items()])
    model = build_detector(cfg.model, NUM_CLASSES)
    rpn, roi = model.rpn, model.roi_heads
    assert (rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold) == (0.71, 0.29)
    assert (rpn.fg_bg_sampler.batch_size_per_image, rpn.fg_bg_sampler.positive_fraction) == (250, 0.45)
    assert rpn._pre_nms_top_n == {"training": 1900, "testing": 900}
    assert rpn._post_nms_top_n == {"training": 800, "testing": 700} and rpn.nms_thresh == 0.66
    assert (roi.proposal_matcher.high_threshold, roi.proposal_matcher.low_threshold) == (0.55, 0.45)
    assert (roi.fg_bg_sampler.batch_size_per_image, roi.fg_bg_sampler.positive_fraction) == (500, 0.3)
    # the shared inference settings reach the RoI heads' post-processing
    assert (roi.score_thresh, roi.nms_thresh, roi.detections_per_img) == (0.2, 0.3, 7)

    default = build_detector(load_config(CONFIGS / "shapes_tiny.yaml", base).model, NUM_CLASSES)
    rpn, roi = default.rpn, default.roi_heads
    assert (rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold) == (0.7, 0.3)
    assert (rpn.fg_bg_sampler.batch_size_per_image, rpn.fg_bg_sampler.positive_fraction) == (256, 0.5)
    assert (roi.proposal_matcher.high_threshold, roi.proposal_matcher.low_threshold) == (0.5, 0.5)
    assert (roi.fg_bg_sampler.batch_size_per_image, roi.fg_bg_sampler.positive_fraction) == (512, 0.25)
