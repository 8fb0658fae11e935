"""Faster R-CNN + DyHead: losses and gradients, the targets torchvision's heads see, eval output, a short run."""

import json
from pathlib import Path

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from detectors.build import build_detector
from detectors.config import load_config
from detectors.engine.train import train
from test_det_training import _tiny_overrides

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NUM_CLASSES = 3
IMAGE_SIZES = [(128, 128), (100, 120)]


def _model():
    cfg = load_config(CONFIGS / "shapes_tiny.yaml", [
        "model.meta_architecture=faster_rcnn",
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


def test_training_losses_reach_neck_roi_task_attention_and_predictor():
    model = _model().train()
    assert all(block.task is None for block in model.neck.blocks)  # task attention is in the box head
    losses = model(torch.randn(2, 3, 128, 128), IMAGE_SIZES, _targets())
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    for name, module in [("neck", model.neck), ("RoI task attention", model.roi_heads.box_head.task),
                         ("predictor", model.roi_heads.box_predictor), ("RPN head", model.rpn.head)]:
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name


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


def test_roi_pooler_scales_are_the_strides_whatever_the_first_batch():
    """torchvision would infer them from the first batch's largest content: 70 pixels of content padded to
    128 would give P2 a scale of 1/2."""
    model = _model().eval()
    features = {k: torch.randn(1, 16, 128 // s, 128 // s) for k, s in zip(["c2", "c3", "c4", "c5"], [4, 8, 16, 32])}
    boxes = [torch.tensor([[5.0, 5.0, 60.0, 66.0], [10.0, 0.0, 30.0, 20.0]])]
    ours = model.roi_heads.box_roi_pool(features, boxes, [(70, 70)])
    inferred = MultiScaleRoIAlign(["c2", "c3", "c4", "c5"], 7, 0)
    torch.testing.assert_close(ours, inferred(features, boxes, [(128, 128)]))
    assert MultiScaleRoIAlign(["c2", "c3", "c4", "c5"], 7, 0)(features, boxes, [(70, 70)]).sub(ours).abs().max() > 0


def test_r50_config_loads():
    cfg = load_config(CONFIGS / "faster_rcnn_r50_dyhead_1x.yaml")
    assert cfg.model.meta_architecture == "faster_rcnn" and cfg.model.backbone.name == "resnet50"
    assert cfg.model.nms_thresh == 0.5 and cfg.model.rcnn.pooler_resolution == 7
    assert (cfg.solver.base_lr, cfg.solver.ims_per_batch, cfg.solver.max_iter) == (0.02, 16, 90000)
    assert cfg.data.input.size_divisibility == 128


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
