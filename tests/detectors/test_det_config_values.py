"""Config values: null spelt None, mappings merged into a section, malformed YAML and out-of-range values."""

import functools
import re
from pathlib import Path

import pytest
import torch

from detectors.cli import main
from detectors.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_none_is_null_in_overrides_and_files(tmp_path):
    """None and none read as YAML's null, as detectron2 and mmdetection read them; quoted, "None" stays a string."""
    cfg = load_config(CONFIGS / "atss_r50_dyhead_1x.yaml", ["model.backbone.weights=None", "data.shapes.root=none",
                                                            "model.num_classes=None", "data.train.image_dir='None'"])
    assert (cfg.model.backbone.weights, cfg.data.shapes.root, cfg.model.num_classes) == (None, None, None)
    assert cfg.data.train.image_dir == "None"
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  backbone: {weights: None}\n")
    assert load_config(path).model.backbone.weights is None


def test_a_mapping_override_changes_only_the_keys_it_names(tmp_path):
    """The section keeps the config file's other values, nested sections merge too, and unknown keys still fail."""
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  fpn_channels: 64\n"
                    "  backbone: {name: slim, weights: null, norm: bn, widths: [8, 16, 16, 32]}")
    backbone = load_config(path, ["model.backbone={name: resnet18, freeze_at: 1}"]).model.backbone
    assert (backbone.name, backbone.freeze_at, backbone.weights, backbone.norm) == ("resnet18", 1, None, "bn")
    assert backbone.widths == [8, 16, 16, 32]
    model = load_config(path, ["model={backbone: {norm: gn, gn_groups: 8}, dyhead_blocks: 2}"]).model
    assert (model.backbone.name, model.backbone.norm, model.fpn_channels, model.dyhead_blocks) == ("slim", "gn", 64, 2)
    assert model.backbone.gn_groups == 8
    with pytest.raises(ConfigError, match="unknown config key.*model.backbone.nme; valid keys at 'model.backbone'"):
        load_config(path, ["model.backbone={nme: resnet18}"])
    with pytest.raises(ConfigError, match="model.backbone: expected a mapping, got 'resnet18'"):
        load_config(path, ["model.backbone=resnet18"])


def test_malformed_yaml_is_a_config_error_naming_the_override_or_file(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"override 'solver.steps=\[1,2' is not valid YAML: expected ',' or ']', "
                                          r"but got '<stream end>' at line 1, column 5$"):
        load_config(None, ["solver.steps=[1,2"])
    path = tmp_path / "c.yaml"
    path.write_text("solver:\n  base_lr: 0.01\n   steps: [1, 2]\n")
    with pytest.raises(ConfigError, match=f"config file {path} is not valid YAML: mapping values are not allowed "
                                          "here at line 3, column 9$"):
        load_config(path)
    # the CLI's promise for config errors: one line and exit status 2, not a traceback
    assert main(["train", "--config", str(CONFIGS / "shapes_tiny.yaml"), "--set", "solver.steps=[1,2"]) == 2
    assert capsys.readouterr().err == ("dyhead train: error: override 'solver.steps=[1,2' is not valid YAML: "
                                       "expected ',' or ']', but got '<stream end>' at line 1, column 5\n")


@pytest.mark.parametrize("override, allowed", [
    ("solver.checkpoint_period=0", ">= 1"),
    ("solver.log_period=0", ">= 1"),
    ("solver.ims_per_batch=0", ">= 1"),
    ("data.num_workers=-1", ">= 0"),
    ("data.test_ims_per_batch=0", ">= 1"),
    ("solver.steps=[950, 800]", "iterations >= 1 in increasing order"),
    ("solver.max_iter=-5", ">= 0"),
    ("solver.base_lr=0", "> 0"),
    ("solver.gamma=0", "> 0"),
    ("solver.warmup_factor=1.5", r"in \(0, 1\]"),
    ("solver.eval_period=-1", ">= 0"),
    ("solver.betas=[0.9, 1.0]", r"two values in \[0, 1\)"),
    ("solver.momentum=1", r"in \[0, 1\)"),
    ("solver.momentum=-0.1", r"in \[0, 1\)"),
    ("solver.weight_decay=-1e-4", ">= 0"),
    ("data.input.size_divisibility=0", ">= 1"),
    ("data.input.min_size_train=[]", "one or more sizes >= 1"),
    ("data.input.pixel_std=[1.0, 0.0, 1.0]", "three values > 0"),
    ("data.input.flip_prob=2", r"in \[0, 1\]"),
    ("model.score_thresh=1.5", r"in \[0, 1\]"),
    ("model.nms_thresh=1.5", r"in \[0, 1\]"),
    ("data.input.max_size_test=0", ">= 1"),
    ("data.input.pixel_mean=[0.5, 0.5]", "three values, one per channel"),
    ("data.shapes.min_object_size=0", ">= 1"),
    ("model.num_classes=0", ">= 1, or null for the training set's count"),
    ("model.backbone.freeze_at=6", r"in \[0, 5\]"),
    ("model.backbone.freeze_at=-1", r"in \[0, 5\]"),
    ("model.backbone.widths=[16, 32, 64]", "four values >= 1, one per stage"),
    ("model.backbone.widths=[0, 32, 64, 128]", "four values >= 1, one per stage"),
    ("model.backbone.depths=[1, 1, 0, 1]", "four values >= 1, one per stage"),
    ("model.backbone.gn_groups=0", "> 0"),
    ("model.fpn_channels=0", ">= 1"),
    ("model.dyhead_channels=24", r"a positive multiple of 16 \(GroupNorm\(16\) after every conv\)"),
    ("model.dyhead_channels=0", "a positive multiple of 16"),
    ("model.dyhead_blocks=0", ">= 1"),
    ("model.anchor_scale=0", "> 0"),
    ("model.atss_topk=0", ">= 1"),
    ("model.prior_prob=0", r"in \(0, 1\)"),
    ("model.prior_prob=1", r"in \(0, 1\)"),
    ("model.focal_alpha=1.5", r"in \[0, 1\], or -1 for no weighting"),
    ("model.focal_alpha=-0.5", r"in \[0, 1\], or -1 for no weighting"),
    ("model.focal_gamma=-1", ">= 0"),
    ("model.reg_loss_weight=-1", ">= 0"),
    ("model.pre_nms_topk=0", ">= 1"),
    ("model.detections_per_img=0", ">= 1"),
    ("model.retinanet.num_convs=-1", ">= 0"),
    ("model.retinanet.loss_normalizer_momentum=1", r"in \[0, 1\)"),
    ("model.retinanet.anchor_size=0", "> 0"),
    ("model.retinanet.anchor_scales=[]", "one or more values > 0"),
    ("model.retinanet.aspect_ratios=[1.0, 0.0]", "one or more values > 0"),
    ("model.retinanet.fg_iou_thresh=1.5", r"in \[0, 1\]"),
    ("model.retinanet.bg_iou_thresh=-0.1", r"in \[0, 1\]"),
    ("model.retinanet.smooth_l1_beta=-1", ">= 0"),
    ("model.rcnn.fc_dim=0", ">= 1"),
    ("model.rcnn.rpn_smooth_l1_beta=-1", ">= 0"),
    ("model.rcnn.roi_smooth_l1_beta=-1", ">= 0"),
    ("model.rcnn.anchor_size=0", "> 0"),
    ("model.rcnn.aspect_ratios=[]", "one or more values > 0"),
    ("model.rcnn.rpn_fg_iou_thresh=1.5", r"in \[0, 1\]"),
    ("model.rcnn.rpn_bg_iou_thresh=-0.1", r"in \[0, 1\]"),
    ("model.rcnn.rpn_batch_size_per_image=0", ">= 1"),
    ("model.rcnn.rpn_positive_fraction=1.5", r"in \[0, 1\]"),
    ("model.rcnn.rpn_pre_nms_topk_train=0", ">= 1"),
    ("model.rcnn.rpn_pre_nms_topk_test=0", ">= 1"),
    ("model.rcnn.rpn_post_nms_topk_train=0", ">= 1"),
    ("model.rcnn.rpn_post_nms_topk_test=0", ">= 1"),
    ("model.rcnn.rpn_nms_thresh=1.5", r"in \[0, 1\]"),
    ("model.rcnn.roi_fg_iou_thresh=1.5", r"in \[0, 1\]"),
    ("model.rcnn.roi_bg_iou_thresh=-0.1", r"in \[0, 1\]"),
    ("model.rcnn.roi_batch_size_per_image=0", ">= 1"),
    ("model.rcnn.roi_positive_fraction=1.5", r"in \[0, 1\]"),
    ("model.rcnn.pooler_resolution=0", ">= 1"),
    ("model.rcnn.pooler_sampling_ratio=-1", ">= 0"),
])
def test_out_of_range_values_fail_when_the_config_is_read(override, allowed):
    """Each would crash, hang or silently change the run after the data is read; the error names key, range, value."""
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=rf"^{key}: expected {allowed}.*, got "):
        load_config(CONFIGS / "shapes_tiny.yaml", [override])


def test_values_at_the_edge_of_their_range_load(tmp_path):
    """A 0 with a meaning stays allowed, steps may lie past max_iter, and an override can correct a file's value."""
    cfg = load_config(CONFIGS / "shapes_tiny.yaml", [
        "solver.eval_period=0", "solver.warmup_iters=0", "solver.clip_grad_norm=0", "data.num_workers=0",
        "num_threads=0", "solver.max_iter=0", "solver.steps=[]", "model.score_thresh=0", "solver.warmup_factor=1",
        "data.shapes.min_objects=0", "data.input.flip_prob=1", "model.nms_thresh=1",
    ])
    assert (cfg.solver.max_iter, cfg.solver.steps, cfg.model.score_thresh) == (0, [], 0.0)
    assert (cfg.data.input.flip_prob, cfg.model.nms_thresh) == (1.0, 1.0)
    assert load_config(None, ["solver.max_iter=10", "solver.steps=[5, 20]"]).solver.steps == [5, 20]
    path = tmp_path / "c.yaml"
    path.write_text("solver:\n  log_period: 0\n")
    assert load_config(path, ["solver.log_period=1"]).solver.log_period == 1
    with pytest.raises(ConfigError, match=r"data.shapes.max_objects: expected >= data.shapes.min_objects \(5\), got 4"):
        load_config(None, ["data.shapes.min_objects=5", "data.shapes.max_objects=4"])
    assert load_config(None, ["data.shapes.min_objects=5", "data.shapes.max_objects=5"]).data.shapes.max_objects == 5
    model = load_config(None, [
        "model.backbone.freeze_at=5", "model.dyhead_channels=16", "model.focal_alpha=-1", "model.focal_gamma=0",
        "model.reg_loss_weight=0", "model.retinanet.num_convs=0", "model.retinanet.loss_normalizer_momentum=0",
        "model.retinanet.smooth_l1_beta=0", "model.rcnn.pooler_sampling_ratio=0", "model.num_classes=1",
        "model.retinanet.bg_iou_thresh=0.5", "model.rcnn.rpn_bg_iou_thresh=0.7",
    ]).model
    assert (model.backbone.freeze_at, model.dyhead_channels, model.focal_alpha, model.num_classes) == (5, 16, -1, 1)
    assert (model.retinanet.num_convs, model.retinanet.bg_iou_thresh, model.rcnn.rpn_bg_iou_thresh) == (0, 0.5, 0.7)
    assert (model.retinanet.loss_normalizer_momentum, model.rcnn.pooler_sampling_ratio, model.focal_gamma) == (0, 0, 0)


@pytest.mark.parametrize("low, high", [
    ("data.shapes.min_object_size", "data.shapes.max_object_size"),
    ("data.shapes.max_object_size", "data.shapes.image_size"),
    ("model.retinanet.bg_iou_thresh", "model.retinanet.fg_iou_thresh"),
    ("model.rcnn.rpn_bg_iou_thresh", "model.rcnn.rpn_fg_iou_thresh"),
    ("model.rcnn.roi_bg_iou_thresh", "model.rcnn.roi_fg_iou_thresh"),
])
def test_bounds_that_cross_fail(low, high):
    """Faster R-CNN's matchers assert low <= high only when built (after the data is read), RetinaNet's would
    silently take anchors between the two as both background and foreground, and the shapes generator would draw
    sizes from a reversed range or objects cut off by the image's border. Equal bounds load."""
    small, large = ("0.4", "0.6") if "iou" in low else ("40", "60")
    with pytest.raises(ConfigError, match=rf"^{high}: expected >= {low} \({large}\), got {small}$"):
        load_config(None, [f"{low}={large}", f"{high}={small}"])
    cfg = load_config(None, [f"{low}={large}", f"{high}={large}"])
    assert str(functools.reduce(getattr, high.split("."), cfg)) == large


def _train_error(tmp_path, capsys, overrides):
    """What ``dyhead train`` on shapes_tiny with ``overrides`` prints to stderr, once it has exited with status 2
    without writing its data (a root of its own under ``tmp_path``)."""
    data = tmp_path / "data"
    sets = [arg for override in [*overrides, f"data.shapes.root={data}"] for arg in ("--set", override)]
    assert main(["train", "--config", str(CONFIGS / "shapes_tiny.yaml"), "--output-dir", str(tmp_path / "out"),
                 *sets]) == 2
    assert not data.exists()
    return capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["model.backbone.name=swin_t"], "model.backbone.norm: expected ln, Swin's only norm, for swin_t, got 'bn'"),
    (["model.backbone.norm=ln"], r"model.backbone.norm: expected frozen_bn, bn or gn \(ln is Swin's\) for slim, "
                                 "got 'ln'"),
    (["model.backbone.name=resnet34", "model.backbone.stride_in_1x1=true"],
     r"model.backbone.stride_in_1x1: applies to the bottleneck ResNets \(resnet50/101/152\), not resnet34"),
    (["model.backbone.norm=gn"], r"model.backbone.gn_groups: expected a divisor of slim's channel counts \(the widths "
                                 r"\[16, 32, 64, 128\]\), got 32"),
    (["model.backbone={name: resnet18, weights: null, norm: gn, gn_groups: 48}"],
     r"model.backbone.gn_groups: expected a divisor of resnet18's channel counts \(64 and its multiples\), got 48"),
])
def test_backbone_settings_that_do_not_go_together_fail_when_the_config_is_read(tmp_path, capsys, overrides, message):
    """The CLI ends on one line with exit status 2 before any data is written, where it raised from the backbone's
    build, with a traceback, after the synthetic set had been generated."""
    with pytest.raises(ConfigError, match=f"^{message}$"):
        load_config(CONFIGS / "shapes_tiny.yaml", overrides)
    assert re.fullmatch(f"dyhead train: error: {message}\n", _train_error(tmp_path, capsys, overrides))


def test_a_device_torch_cannot_use_fails_before_any_data(tmp_path, capsys, monkeypatch):
    """A device name outside auto/cpu/cuda fails when the config is read, and cuda without a CUDA device when the
    run starts, on one line with exit status 2: both were torch's tracebacks (about drivers, or a list of every
    device type torch knows)."""
    with pytest.raises(ConfigError, match="^device: expected one of auto, cpu, cuda, got 'gpu'$"):
        load_config(None, ["device=gpu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _train_error(tmp_path, capsys, ["device=cuda"]) == (
        "dyhead train: error: device: cuda, but torch finds no CUDA device (torch.cuda.is_available() is false); "
        "set device to auto or cpu\n")
