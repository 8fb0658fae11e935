"""RetinaNet + DyHead: anchors, matching, losses and decoding on hand-made cases; the built detector and a short run."""

import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, clip_boxes_to_image, sigmoid_focal_loss

from detectors.atss_assigner import BACKGROUND, IGNORE
from detectors.build import build_detector
from detectors.config import BackboneConfig, ModelConfig, RetinaNetConfig, load_config
from detectors.retinanet import RetinaNet, RetinaNetHead, make_retinanet_anchors, match_anchors

REPO = Path(__file__).resolve().parents[2]
GT = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
# one level of five anchors and their IoU with GT: 1 (fg), 100/220 (ignored), 0 (bg), 0.5 (fg), 100/260 (bg)
ANCHORS = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 22.0], [100.0, 100.0, 110.0, 110.0],
                         [0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 26.0]])]
GT_TARGETS = [{"boxes": GT, "labels": torch.tensor([1])}]  # two positives on ANCHORS: anchors 0 and 3
EMPTY_TARGETS = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]


def _per_batch_head(in_channels=8, **kwargs):
    """A head whose losses are divided by each batch's foreground count (momentum 0), the hand-made cases' rule."""
    return RetinaNetHead(in_channels, num_classes=2, loss_normalizer_momentum=0.0, **kwargs)


def _outputs(cls_logits=None, num_anchors=5, num_classes=2):
    if cls_logits is None:
        cls_logits = torch.zeros(1, num_anchors, num_classes)
    return {"cls_logits": cls_logits.clone().requires_grad_(),
            "bbox_deltas": torch.zeros(1, num_anchors, 4, requires_grad=True)}


def _logit(p):
    return math.log(p / (1 - p))


def test_anchors_count_order_and_values():
    level0, level1 = make_retinanet_anchors([(2, 3), (1, 1)], (8, 16), 32.0, [1.0, 2.0], [0.25, 1.0, 4.0],
                                            torch.device("cpu"))
    assert level0.shape == (2 * 3 * 6, 4) and level1.shape == (6, 4)
    # location (y=1, x=2) -> centre (16, 8); its anchors follow at (1 * 3 + 2) * 6, scale-major
    first = (1 * 3 + 2) * 6
    torch.testing.assert_close(level0[first], torch.tensor([-16.0, 0.0, 48.0, 16.0]))  # side 32, h/w 1/4: 64 x 16
    torch.testing.assert_close(level0[first + 4], torch.tensor([-16.0, -24.0, 48.0, 40.0]))  # side 64, square
    torch.testing.assert_close(level0[first + 5], torch.tensor([0.0, -56.0, 32.0, 72.0]))  # side 64, h/w 4: 32 x 128
    # the base side doubles with the stride: 64 on the stride-16 level, centred at the origin
    torch.testing.assert_close(level1[1], torch.tensor([-32.0, -32.0, 32.0, 32.0]))


def test_default_anchors_keep_area_and_aspect_ratio():
    cfg = RetinaNetConfig()
    (level,) = make_retinanet_anchors([(1, 1)], (8,), cfg.anchor_size, cfg.anchor_scales, cfg.aspect_ratios,
                                      torch.device("cpu"))
    w, h = level[:, 2] - level[:, 0], level[:, 3] - level[:, 1]
    sides = torch.tensor([32.0 * s for s in cfg.anchor_scales]).repeat_interleave(3)
    torch.testing.assert_close(w * h, sides**2)
    torch.testing.assert_close(h / w, torch.tensor(cfg.aspect_ratios).repeat(3))


def test_head_output_order_matches_anchor_order():
    head = RetinaNetHead(1, num_classes=1, num_anchors=2, num_convs=0)
    with torch.no_grad():
        head.bbox_pred.weight.zero_()
        head.bbox_pred.weight[:, 0, 1, 1] = 1.0  # every output channel copies the input at its location
        head.bbox_pred.bias.copy_(torch.arange(8.0) // 4 * 10 + torch.arange(8.0) % 4)  # anchor a, delta c: 10a + c
        feature = torch.arange(6.0).reshape(1, 1, 2, 3) * 100  # location y * 3 + x holds 100 (y * 3 + x)
        deltas = head([feature])["bbox_deltas"]
    assert deltas.shape == (1, 12, 4) and deltas.dtype == torch.float32
    loc, a, c = torch.meshgrid(torch.arange(6.0), torch.arange(2.0), torch.arange(4.0), indexing="ij")
    torch.testing.assert_close(deltas[0], (100 * loc + 10 * a + c).reshape(12, 4))


def test_match_anchors_thresholds_low_quality_and_empty():
    (anchors,) = ANCHORS
    assert match_anchors(anchors, GT, 0.5, 0.4).tolist() == [0, IGNORE, BACKGROUND, 0, BACKGROUND]
    # with no anchor over 0.5, the gt's best anchors (a tie at 100/220) become foreground all the same
    ties = torch.cat((anchors[[1, 2, 4]], torch.tensor([[0.0, -12.0, 10.0, 10.0]])))
    assert match_anchors(ties, GT, 0.5, 0.4).tolist() == [0, BACKGROUND, BACKGROUND, 0]
    # a box overlapping no anchor takes none
    far = torch.tensor([[500.0, 500.0, 510.0, 510.0]])
    assert match_anchors(anchors, far, 0.5, 0.4).tolist() == [BACKGROUND] * 5
    assert match_anchors(anchors, torch.zeros(0, 4), 0.5, 0.4).tolist() == [BACKGROUND] * 5


def test_losses_on_known_case():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 2)
    head = _per_batch_head()
    losses = head.compute_loss(_outputs(logits), ANCHORS, GT_TARGETS)
    # anchors 0 and 3 are foreground (class 1), 2 and 4 background, 1 ignored; two positives normalise
    valid = [0, 2, 3, 4]
    target = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    expected = sigmoid_focal_loss(logits[0, valid], target, alpha=0.25, gamma=2.0, reduction="sum") / 2
    torch.testing.assert_close(losses["loss_cls"], expected)
    # zero deltas against targets (0, 0, 0, 0) and (0, -0.25, 0, -ln 2): smooth L1 (beta 0.1) |x| - 0.05
    torch.testing.assert_close(losses["loss_box"], torch.tensor((0.25 - 0.05 + math.log(2) - 0.05) / 2))


def test_ignored_anchor_is_left_out_and_exact_deltas_give_zero_box_loss():
    head = _per_batch_head()
    outputs = _outputs()
    with torch.no_grad():
        outputs["bbox_deltas"][0] = head.box_coder.encode(GT.expand(5, 4), ANCHORS[0])
    base = head.compute_loss(outputs, ANCHORS, GT_TARGETS)
    assert base["loss_box"].abs().item() < 1e-6
    with torch.no_grad():
        outputs["cls_logits"][0, 1] = 5.0  # the ignored anchor
    torch.testing.assert_close(head.compute_loss(outputs, ANCHORS, GT_TARGETS)["loss_cls"], base["loss_cls"])
    # logits 0: per class term 0.25 * 0.5^2 * ln 2 (positive) or 0.75 * 0.5^2 * ln 2 (negative), over 2 positives
    torch.testing.assert_close(base["loss_cls"], torch.tensor(math.log(2) * (2 * 0.0625 + 6 * 0.1875) / 2))


def test_crowd_boxes_are_removed_before_matching():
    head = _per_batch_head()
    crowd_box = torch.tensor([[100.0, 100.0, 110.0, 110.0]])  # equal to anchor 2
    with_crowd = [{"boxes": torch.cat((GT, crowd_box)), "labels": torch.tensor([1, 0]),
                   "iscrowd": torch.tensor([0, 1], dtype=torch.uint8)}]
    crowd_losses = head.compute_loss(_outputs(), ANCHORS, with_crowd)
    plain_losses = head.compute_loss(_outputs(), ANCHORS, GT_TARGETS)
    for name in ("loss_cls", "loss_box"):
        torch.testing.assert_close(crowd_losses[name], plain_losses[name])


def test_image_without_boxes_is_all_background_with_gradients():
    head = _per_batch_head(num_anchors=5)
    losses = head.compute_loss(_outputs(), ANCHORS, EMPTY_TARGETS)
    # ten negative terms 0.75 * 0.5^2 * ln 2, normalised by max(0, 1)
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(math.log(2) * 10 * 0.1875))
    assert losses["loss_box"].item() == 0
    # every head parameter, the towers' included, still gets a gradient (DDP requires it): a 1x1 feature holds
    # the five anchors
    assert len(head.cls_subnet) == len(head.bbox_subnet) == 8
    losses = head.compute_loss(head([torch.randn(1, 8, 1, 1)]), ANCHORS, EMPTY_TARGETS)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in head.parameters())


def _reference_head(state, features, num_convs, num_classes):
    """The head's outputs from its state dict alone: towers of 3x3 conv + ReLU, final 3x3 convs, anchor-major."""
    def branch(x, tower, final, columns):
        for i in range(num_convs):
            x = F.relu(F.conv2d(x, state[f"{tower}.{2 * i}.weight"], state[f"{tower}.{2 * i}.bias"], padding=1))
        x = F.conv2d(x, state[f"{final}.weight"], state[f"{final}.bias"], padding=1)
        # channel a * columns + c holds anchor a's column c, so channels-last rows are already anchor-major
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, columns)

    cls = torch.cat([branch(f, "cls_subnet", "cls_logits", num_classes) for f in features], dim=1)
    box = torch.cat([branch(f, "bbox_subnet", "bbox_pred", 4) for f in features], dim=1)
    return cls, box


@pytest.mark.parametrize("num_convs", [0, 2])
def test_towers_match_a_functional_reference(num_convs):
    torch.manual_seed(0)
    head = RetinaNetHead(4, num_classes=2, num_anchors=3, num_convs=num_convs)
    tower_keys = {f"{tower}.{2 * i}.{kind}" for tower in ("cls_subnet", "bbox_subnet") for i in range(num_convs)
                  for kind in ("weight", "bias")}
    assert {k for k in head.state_dict() if "subnet" in k} == tower_keys
    for key in tower_keys:
        assert head.state_dict()[key].shape == ((4, 4, 3, 3) if key.endswith("weight") else (4,))
    with torch.no_grad():  # away from the initialisation, so that biases and ReLUs matter
        for param in head.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
        features = [torch.randn(2, 4, 3, 5), torch.randn(2, 4, 2, 2)]
        outputs = head(features)
    cls, box = _reference_head(head.state_dict(), features, num_convs, num_classes=2)
    assert outputs["cls_logits"].shape == (2, (15 + 4) * 3, 2) and outputs["bbox_deltas"].shape == (2, 19 * 3, 4)
    torch.testing.assert_close(outputs["cls_logits"], cls)
    torch.testing.assert_close(outputs["bbox_deltas"], box)


def test_tower_initialisation_is_detectron2s():
    torch.manual_seed(0)
    head = RetinaNetHead(64, num_classes=2, num_convs=4)
    for tower in (head.cls_subnet, head.bbox_subnet):
        assert [type(m) for m in tower] == [torch.nn.Conv2d, torch.nn.ReLU] * 4
        for conv in tower[::2]:
            assert conv.bias.abs().max() == 0
            assert abs(conv.weight.mean().item()) < 1e-3 and conv.weight.std().item() == pytest.approx(0.01, rel=0.05)


def test_loss_normaliser_is_a_moving_average_of_the_foreground_count():
    torch.manual_seed(0)
    outputs = _outputs(torch.randn(1, 5, 2))
    per_batch = _per_batch_head().compute_loss(outputs, ANCHORS, GT_TARGETS)  # divided by 2 positives
    head = RetinaNetHead(8, num_classes=2)
    assert head.loss_normalizer.dtype == torch.float32 and head.loss_normalizer.item() == 100.0
    first = head.compute_loss(outputs, ANCHORS, GT_TARGETS)
    normaliser = 0.9 * 100 + 0.1 * 2
    torch.testing.assert_close(head.loss_normalizer, torch.tensor(normaliser))
    for name in ("loss_cls", "loss_box"):
        torch.testing.assert_close(first[name], per_batch[name] * 2 / normaliser)
    # the next batch has no positives: max(0, 1) enters the average, which starts from the stored value
    second = head.compute_loss(outputs, ANCHORS, EMPTY_TARGETS)
    normaliser = 0.9 * normaliser + 0.1 * 1
    torch.testing.assert_close(head.loss_normalizer, torch.tensor(normaliser))
    per_batch_empty = _per_batch_head().compute_loss(outputs, ANCHORS, EMPTY_TARGETS)  # divided by 1
    torch.testing.assert_close(second["loss_cls"], per_batch_empty["loss_cls"] / normaliser)
    # out of training the losses use the stored value and leave it alone
    stored = head.loss_normalizer.clone()
    third = head.eval().compute_loss(outputs, ANCHORS, GT_TARGETS)
    assert torch.equal(head.loss_normalizer, stored)
    torch.testing.assert_close(third["loss_cls"], per_batch["loss_cls"] * 2 / normaliser)


def test_zero_momentum_divides_by_each_batchs_count_bit_for_bit():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 2)
    head = _per_batch_head()
    losses = head.compute_loss(_outputs(logits), ANCHORS, GT_TARGETS)
    assert head.loss_normalizer.item() == 2.0
    valid = [0, 2, 3, 4]
    target = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    focal = sigmoid_focal_loss(logits[0, valid], target, alpha=0.25, gamma=2.0, reduction="sum")
    assert torch.equal(losses["loss_cls"], focal / 2.0)
    losses = head.compute_loss(_outputs(logits), ANCHORS, EMPTY_TARGETS)
    assert head.loss_normalizer.item() == 1.0
    assert torch.equal(losses["loss_cls"], sigmoid_focal_loss(logits[0], torch.zeros(5, 2), reduction="sum"))


def test_loss_normaliser_averages_the_count_over_processes(monkeypatch):
    # two processes: this one has 2 positives and the other 3, so every process averages 2.5
    monkeypatch.setattr("detectors.retinanet.get_world_size", lambda: 2)
    monkeypatch.setattr("detectors.retinanet.sum_across_processes", lambda t: t + 3)
    head = RetinaNetHead(8, num_classes=2)
    head.compute_loss(_outputs(), ANCHORS, GT_TARGETS)
    torch.testing.assert_close(head.loss_normalizer, torch.tensor(0.9 * 100 + 0.1 * 2.5))


def test_loss_normaliser_is_saved_and_restored_with_the_state_dict():
    torch.manual_seed(0)
    outputs = _outputs(torch.randn(1, 5, 2))
    head = RetinaNetHead(8, num_classes=2)
    head.compute_loss(outputs, ANCHORS, GT_TARGETS)
    saved = io.BytesIO()
    torch.save(head.state_dict(), saved)
    assert head.state_dict()["loss_normalizer"].item() == head.loss_normalizer.item() != 100.0
    resumed = RetinaNetHead(8, num_classes=2)
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved))
    assert resumed.loss_normalizer.dtype == torch.float32
    assert torch.equal(resumed.loss_normalizer, head.loss_normalizer)
    # both go on identically
    after, after_resume = (h.compute_loss(outputs, ANCHORS, GT_TARGETS) for h in (head, resumed))
    assert torch.equal(resumed.loss_normalizer, head.loss_normalizer)
    assert all(torch.equal(after[name], after_resume[name]) for name in after)


def test_postprocess_scores_decoding_nms_and_clipping():
    head = RetinaNetHead(8, num_classes=2)
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [40.0, 30.0, 60.0, 50.0]]),
               torch.tensor([[0.0, 50.0, 10.0, 60.0], [80.0, 80.0, 90.0, 90.0]])]
    cls = torch.full((1, 5, 2), -10.0)
    cls[0, 0, 0] = _logit(0.9)  # kept
    cls[0, 1, 0] = _logit(0.8)  # same class, IoU 0.82 with the first: suppressed
    cls[0, 1, 1] = _logit(0.7)  # other class at the same place: kept
    cls[0, 2, 1] = _logit(0.6)  # kept, its deltas move and widen it
    cls[0, 3, 0] = _logit(0.5)  # second level, clipped to the 55-pixel-high image
    cls[0, 4, 1] = _logit(0.04)  # under the 0.05 threshold
    deltas = torch.zeros(1, 5, 4)
    deltas[0, 2] = torch.tensor([0.1, 0.0, math.log(2), 0.0])  # centre x 50 + 0.1 * 20, width 40
    (det,) = head.postprocess({"cls_logits": cls, "bbox_deltas": deltas}, anchors, [(55, 100)])
    torch.testing.assert_close(det["scores"], torch.tensor([0.9, 0.7, 0.6, 0.5]))
    assert det["labels"].dtype == torch.int64 and det["labels"].tolist() == [0, 1, 1, 0]
    torch.testing.assert_close(det["boxes"], torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [32.0, 30.0, 72.0, 50.0], [0.0, 50.0, 10.0, 55.0]]))
    (top2,) = head.postprocess({"cls_logits": cls, "bbox_deltas": deltas}, anchors, [(55, 100)], detections_per_img=2)
    assert top2["scores"].tolist() == pytest.approx([0.9, 0.7])
    # the top 1 of each level before NMS
    (pre1,) = head.postprocess({"cls_logits": cls, "bbox_deltas": deltas}, anchors, [(55, 100)], pre_nms_topk=1)
    assert pre1["scores"].tolist() == pytest.approx([0.9, 0.5])


def test_postprocess_clips_after_nms_and_drops_empty_boxes_as_detectron2():
    """detectron2's order: NMS on the unclipped boxes, then clipping and dropping what is left empty."""
    head = RetinaNetHead(8, num_classes=2)
    # IoU 5000 / 10000 = 0.5 unclipped, 1 once clipped to the 100 x 100 image; the third lies right of it
    anchors = [torch.tensor([[-50.0, 0.0, 50.0, 100.0], [0.0, 0.0, 50.0, 100.0], [120.0, 10.0, 150.0, 40.0]])]
    cls = torch.full((1, 3, 2), -10.0)
    cls[0, 0, 0], cls[0, 1, 0], cls[0, 2, 1] = _logit(0.9), _logit(0.8), _logit(0.7)
    outputs = {"cls_logits": cls, "bbox_deltas": torch.zeros(1, 3, 4)}
    (det,) = head.postprocess(outputs, anchors, [(100, 100)], nms_thresh=0.6)
    torch.testing.assert_close(det["boxes"], torch.tensor([[0.0, 0.0, 50.0, 100.0]] * 2))
    torch.testing.assert_close(det["scores"], torch.tensor([0.9, 0.8]))
    assert det["labels"].tolist() == [0, 0]
    # clipping before NMS would keep the first box and the empty one instead
    clipped = clip_boxes_to_image(anchors[0], (100, 100))
    assert batched_nms(clipped, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 1]), 0.6).tolist() == [0, 2]


def _tiny_model_config(**changes):
    backbone = BackboneConfig(name="slim", weights=None, norm="gn", gn_groups=8, freeze_at=0, widths=[8, 8, 16, 16],
                              depths=[1, 1, 1, 1])
    return ModelConfig(meta_architecture="retinanet", backbone=backbone, fpn_channels=32, dyhead_channels=32,
                       dyhead_blocks=1, dyhead_backend="torchvision", **changes)


def test_built_detector_trains_and_predicts():
    torch.manual_seed(0)
    model = build_detector(_tiny_model_config(score_thresh=0.0, detections_per_img=20), num_classes=3)
    assert isinstance(model, RetinaNet) and model.num_classes == 3
    images = torch.randn(2, 3, 128, 128)
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 50.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model.train()(images, [(128, 128), (100, 120)], targets)
    assert set(losses) == {"loss_cls", "loss_box"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for part in (model.neck, model.head.cls_subnet, model.head.bbox_subnet, model.head.cls_logits,
                 model.head.bbox_pred):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    with torch.no_grad():
        plain, _ = model.eval()(images, [(100, 120), (128, 128)])
        (single,) = model(images[:1], [(100, 120)])
        (mapped,) = model(images[:1], [(100, 120)], original_sizes=[(200, 240)])
    assert plain["boxes"].shape == (20, 4) and plain["boxes"].dtype == torch.float32
    assert plain["scores"].shape == (20,) and plain["labels"].dtype == torch.int64
    assert plain["labels"].min() >= 0 and plain["labels"].max() < 3
    assert plain["boxes"][:, 2].max() <= 120 and plain["boxes"][:, 3].max() <= 100
    # against the same batch: the untrained scores tie to 1e-8, which batching the image with another moves
    torch.testing.assert_close(mapped["boxes"], single["boxes"] * 2)


def test_built_detector_has_detectron2s_tower_names_and_the_normaliser_buffer():
    model = build_detector(_tiny_model_config(retinanet=RetinaNetConfig(num_convs=2)), num_classes=3)
    state = model.state_dict()
    towers = {k: tuple(v.shape) for k, v in state.items() if "subnet" in k}
    assert towers == {f"head.{tower}.{i}.{kind}": (32, 32, 3, 3) if kind == "weight" else (32,)
                      for tower in ("cls_subnet", "bbox_subnet") for i in (0, 2) for kind in ("weight", "bias")}
    assert state["head.loss_normalizer"].item() == 100.0 and model.head.loss_normalizer_momentum == 0.9
    plain = build_detector(_tiny_model_config(retinanet=RetinaNetConfig(num_convs=0, loss_normalizer_momentum=0.0)),
                           num_classes=3)
    assert not any("subnet" in k for k in plain.state_dict()) and plain.head.loss_normalizer_momentum == 0.0


def test_r50_config_loads_as_retinanet():
    cfg = load_config(REPO / "configs" / "retinanet_r50_dyhead_1x.yaml")
    assert cfg.model.meta_architecture == "retinanet" and cfg.model.nms_thresh == 0.5
    # detectron2's MODEL.RETINANET defaults but for the release's SMOOTH_L1_LOSS_BETA 0
    assert cfg.model.retinanet == RetinaNetConfig(smooth_l1_beta=0.0)
    assert (cfg.solver.ims_per_batch, cfg.solver.base_lr, cfg.solver.max_iter) == (16, 0.01, 90000)


@pytest.mark.slow
def test_shapes_tiny_retinanet_runs_and_loss_falls(tmp_path):
    from test_det_training import CONFIG, _tiny_overrides

    from detectors.engine.train import train

    # momentum 0: the moving average would climb from 100 towards the ~300 positives of a batch here and, tripling
    # the divisor, make the logged losses fall without any learning
    overrides = _tiny_overrides(tmp_path / "data", 60) + ["model.meta_architecture=retinanet",
                                                          "data.shapes.num_train=64", "solver.base_lr=0.004",
                                                          "model.retinanet.loss_normalizer_momentum=0"]
    metrics = train(load_config(CONFIG, overrides), tmp_path / "out")
    out = tmp_path / "out"
    assert set(metrics) == {"bbox"} and set(metrics["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert json.loads((out / "metrics.json").read_text()) == metrics
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["iter"] for r in steps] == list(range(1, 61))

    def fall(name):  # mean of the last 8 logged values over the mean of the first 8
        values = [r[name] for r in steps]
        return sum(values[-8:]) / sum(values[:8])

    # 0.11-0.70, 0.07-0.64 and 0.73-0.80 over seeds 0-2 (with detectron2's four-conv towers): the box loss moves
    # slowly in 60 iterations of a tiny model
    assert fall("loss") < 0.8 and fall("loss_cls") < 0.7 and fall("loss_box") < 1.0


def test_match_anchors_threshold_edges_are_detectron2s():
    # detectron2's Matcher(thresholds [0.4, 0.5]): IoU < 0.4 background, 0.4 <= IoU < 0.5 ignored, >= 0.5 foreground.
    # IoUs 40 / 100 = 0.4 and 50 / 100 = 0.5 exactly; the box's best anchor (IoU 1) is foreground as well
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 4.0], [0.0, 0.0, 10.0, 5.0],
                            [0.0, 0.0, 10.0, 3.9]])
    assert match_anchors(anchors, gt, 0.5, 0.4).tolist() == [0, IGNORE, 0, BACKGROUND]


def test_built_retinanet_takes_the_configs_settings(monkeypatch):
    """Every RetinaNet setting of the config reaches the model: none left at a default that happens to match."""
    retina = RetinaNetConfig(num_convs=0, anchor_size=16.0, anchor_scales=[1.0], aspect_ratios=[1.0],
                             fg_iou_thresh=0.6, bg_iou_thresh=0.3, smooth_l1_beta=0.2)
    cfg = _tiny_model_config(retinanet=retina, prior_prob=0.1, focal_alpha=0.3, focal_gamma=1.5, score_thresh=0.2,
                             pre_nms_topk=7, nms_thresh=0.3, detections_per_img=4)
    model = build_detector(cfg, num_classes=3).eval()
    head = model.head
    assert (head.num_anchors, head.fg_iou_thresh, head.bg_iou_thresh, head.smooth_l1_beta) == (1, 0.6, 0.3, 0.2)
    assert (head.focal_alpha, head.focal_gamma) == (0.3, 1.5)
    torch.testing.assert_close(head.cls_logits.bias, torch.full((3,), -math.log(0.9 / 0.1)))
    # one square anchor of side 16 * stride / 8 centred at the origin on P3-P7, strides 8 to 128
    anchors = model.make_anchors([(1, 1)] * 5, torch.device("cpu"))
    for level, stride in zip(anchors, (8, 16, 32, 64, 128), strict=True):
        torch.testing.assert_close(level, torch.tensor([[-stride, -stride, stride, stride]], dtype=torch.float32))
    calls = []
    monkeypatch.setattr(head, "postprocess", lambda outputs, anchors, sizes, *settings: calls.append(settings) or [])
    with torch.no_grad():
        model(torch.randn(1, 3, 128, 128), [(128, 128)])
    assert calls == [(0.2, 7, 0.3, 4)]  # score_thresh, pre_nms_topk, nms_thresh, detections_per_img


def test_prediction_layers_are_initialised_as_detectron2s():
    # detectron2's RetinaNetHead: cls_score and bbox_pred N(0, 0.01), bbox_pred's bias 0, cls_score's the prior's
    # -log((1 - 0.01) / 0.01)
    torch.manual_seed(0)
    head = RetinaNetHead(64, num_classes=2, num_convs=0)
    for conv in (head.cls_logits, head.bbox_pred):
        assert conv.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert head.bbox_pred.bias.abs().max() == 0
    torch.testing.assert_close(head.cls_logits.bias, torch.full((18,), -math.log(99.0)))


def test_match_anchors_gives_each_box_its_own_low_quality_anchor():
    # two boxes, each overlapping only one anchor, by 100 / 220 (under 0.5): both anchors are foreground, each for its box
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])
    anchors = torch.tensor([[0.0, 0.0, 10.0, 22.0], [100.0, 100.0, 110.0, 122.0], [50.0, 50.0, 60.0, 60.0]])
    assert match_anchors(anchors, boxes, 0.5, 0.4).tolist() == [0, 1, BACKGROUND]


@pytest.mark.parametrize("threshold, count", [(0.5, 0), (0.49, 2)])
def test_postprocess_keeps_only_probabilities_strictly_over_the_threshold(threshold, count):
    # detectron2's keep_idxs = predicted_prob > test_score_thresh: logits 0 give p = 0.5 exactly
    outputs = {"cls_logits": torch.zeros(1, 1, 2), "bbox_deltas": torch.zeros(1, 1, 4)}
    (det,) = RetinaNetHead(8, num_classes=2, num_anchors=1).postprocess(
        outputs, [torch.tensor([[0.0, 0.0, 10.0, 10.0]])], [(100, 100)], score_thresh=threshold)
    assert len(det["scores"]) == count


def test_postprocess_splits_anchor_and_class_with_three_classes():
    # the flattened (anchor, class) index is 3a + k: anchor 0's class 2 (index 2) and anchor 1's class 0 (index 3)
    head = RetinaNetHead(8, num_classes=3, num_anchors=1)
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])]
    cls = torch.full((1, 2, 3), -10.0)
    cls[0, 0, 2], cls[0, 1, 0] = _logit(0.9), _logit(0.8)
    (det,) = head.postprocess({"cls_logits": cls, "bbox_deltas": torch.zeros(1, 2, 4)}, anchors, [(100, 100)])
    assert det["labels"].tolist() == [2, 0]
    torch.testing.assert_close(det["boxes"], anchors[0])
    torch.testing.assert_close(det["scores"], torch.tensor([0.9, 0.8]))


def test_postprocess_reads_each_images_own_predictions():
    # two images over the same anchors: image 0 has anchor 0 at class 0 (p 0.9, no deltas), image 1 anchor 1 at
    # class 1 (p 0.8) moved right by dx 0.1 anchor widths (weight 1): 2 pixels
    head = RetinaNetHead(8, num_classes=2, num_anchors=1)
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 60.0, 60.0]])]
    cls = torch.full((2, 2, 2), -10.0)
    cls[0, 0, 0], cls[1, 1, 1] = _logit(0.9), _logit(0.8)
    deltas = torch.zeros(2, 2, 4)
    deltas[1, 1, 0] = 0.1
    dets = head.postprocess({"cls_logits": cls, "bbox_deltas": deltas}, anchors, [(100, 100), (100, 100)])
    expected = [([0.0, 0.0, 10.0, 10.0], 0.9, 0), ([42.0, 40.0, 62.0, 60.0], 0.8, 1)]
    for det, (box, score, label) in zip(dets, expected, strict=True):
        torch.testing.assert_close(det["boxes"], torch.tensor([box]))
        torch.testing.assert_close(det["scores"], torch.tensor([score]))
        assert det["labels"].tolist() == [label]


def test_box_targets_are_unclamped_deltas():
    # the box's only anchor (a low-quality match, IoU 1/3) is three times its height: targets dy (5 - 15) / 30 and
    # dh log(1/3) = -1.10, past 1; zero deltas give smooth L1 (beta 0.1) |x| - 0.05 on each, over one positive
    head = _per_batch_head()
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 30.0]])]
    losses = head.compute_loss(_outputs(num_anchors=1), anchors, GT_TARGETS)
    torch.testing.assert_close(losses["loss_box"], torch.tensor(1 / 3 - 0.05 + math.log(3) - 0.05))
