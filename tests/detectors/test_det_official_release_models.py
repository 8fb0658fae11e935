"""The release's Swin-T ATSS, RetinaNet and Faster R-CNN checkpoints -> this project's detectors.

Each synthetic checkpoint has the release's key names and shapes (release_checkpoints.py). Beyond where each
tensor lands, the heads are checked functionally: the converted RetinaNet and Faster R-CNN heads compute what
detectron2's heads compute from the release's tensors, written here with plain torch ops in detectron2's layout.
"""

import functools
import logging
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from detectors.build import build_detector
from detectors.cli import _load_model, main
from detectors.config import ConfigError, load_config
from detectors.official_weights import RELEASE_SETTINGS, convert_official_detector, load_official_detector
from release_checkpoints import random_release

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NO_WEIGHTS = ["model.backbone.weights=null"]


def _model(config, *overrides):
    cfg = load_config(CONFIGS / config, NO_WEIGHTS + list(overrides))
    torch.manual_seed(0)
    return build_detector(cfg.model, num_classes=80)


@pytest.fixture(scope="module")
def swin_release():
    return random_release("atss", "swin")


def test_swin_t_atss_lands_where_expected(swin_release):
    release, model = swin_release, _model("atss_swint_dyhead_2x_ms.yaml")
    own_index = model.backbone.features[1][0].attn.relative_position_index.clone()
    converted = convert_official_detector(release, model.state_dict())
    assert list(converted) == list(model.state_dict())
    model.load_state_dict(converted, strict=True)

    b, features = "backbone.backbone.bottom_up", model.backbone.features
    assert torch.equal(features[0][0].weight, release[f"{b}.patch_embed.proj.weight"])
    assert torch.equal(features[0][2].bias, release[f"{b}.patch_embed.norm.bias"])
    # official stage 2 (0-based) is torchvision's features[5], the merging after it features[6]
    block = features[5][3]
    assert torch.equal(block.attn.qkv.weight, release[f"{b}.layers.2.blocks.3.attn.qkv.weight"])
    assert torch.equal(
        block.attn.relative_position_bias_table, release[f"{b}.layers.2.blocks.3.attn.relative_position_bias_table"]
    )
    assert torch.equal(block.mlp[0].weight, release[f"{b}.layers.2.blocks.3.mlp.fc1.weight"])
    assert torch.equal(block.mlp[3].bias, release[f"{b}.layers.2.blocks.3.mlp.fc2.bias"])
    assert torch.equal(features[6].reduction.weight, release[f"{b}.layers.2.downsample.reduction.weight"])
    assert torch.equal(features[6].norm.bias, release[f"{b}.layers.2.downsample.norm.bias"])
    # the release's norm{i} follows stage i, whose output is level C(i + 2)
    assert torch.equal(model.backbone.norms["c3"].weight, release[f"{b}.norm1.weight"])
    assert torch.equal(model.backbone.norms["c5"].bias, release[f"{b}.norm3.bias"])
    # the position indices are recomputed constants: the model keeps its own, not the checkpoint's layout
    assert torch.equal(features[1][0].attn.relative_position_index, own_index)
    assert torch.equal(model.fpn.inner_blocks[0][0].weight, release["backbone.backbone.fpn_lateral3.weight"])
    assert torch.equal(model.neck.blocks[5].spatial.offset.bias, release["backbone.dyhead_tower.5.offset.bias"])
    with torch.no_grad():
        (det,) = model.eval()(torch.randn(1, 3, 128, 128), [(128, 128)])
    assert det["boxes"].shape[1] == 4


def test_swin_t_release_through_the_cli_keeps_rgb_settings(swin_release, tmp_path):
    src, out = tmp_path / "dyhead_swint_atss_fpn_2x_ms.pth", tmp_path / "swint.pth"
    torch.save({"model": swin_release}, src)
    config = str(CONFIGS / "atss_swint_dyhead_2x_ms.yaml")
    assert main(["convert", "--detector", str(src), str(out), "--config", config, "--set", NO_WEIGHTS[0]]) == 0
    saved = torch.load(out, weights_only=True)
    assert saved["meta"]["release_settings"] == RELEASE_SETTINGS["swin"]
    cfg = load_config(config, NO_WEIGHTS)
    model, _ = _load_model(cfg, out, None, torch.device("cpu"))
    assert torch.equal(model.backbone.norms["c4"].weight, swin_release["backbone.backbone.bottom_up.norm2.weight"])


def test_a_config_of_another_backbone_or_detector_is_named(swin_release, tmp_path):
    src = tmp_path / "swint.pth"
    torch.save(swin_release, src)
    r50_atss = load_config(CONFIGS / "atss_r50_dyhead_1x.yaml", NO_WEIGHTS).model
    with pytest.raises(ConfigError, match="configs/atss_swint_dyhead_2x_ms.yaml"):
        load_official_detector(src, r50_atss)
    retinanet = load_config(CONFIGS / "retinanet_r50_dyhead_1x.yaml", NO_WEIGHTS).model
    with pytest.raises(ConfigError, match="describes retinanet"):
        load_official_detector(src, retinanet)


def test_retinanet_lands_where_expected_and_its_head_computes_detectron2s():
    release, model = random_release("retinanet", "resnet"), _model("retinanet_r50_dyhead_1x.yaml")
    converted = convert_official_detector(release, model.state_dict())
    model.load_state_dict(converted, strict=True)
    head = model.head
    assert torch.equal(head.cls_logits.weight, release["head.cls_score.weight"])
    assert torch.equal(head.cls_subnet[6].bias, release["head.cls_subnet.6.bias"])
    assert torch.equal(head.bbox_subnet[2].weight, release["head.bbox_subnet.2.weight"])
    assert head.loss_normalizer == 100  # the model's own starting value: the release does not save it

    features = torch.randn(2, 256, 3, 5)
    with torch.no_grad():
        ours = head([features])

    def detectron2_branch(tower, final, columns):
        x = features
        for i in range(4):
            x = F.relu(F.conv2d(x, release[f"head.{tower}.{2 * i}.weight"], release[f"head.{tower}.{2 * i}.bias"],
                                padding=1))
        y = F.conv2d(x, release[f"head.{final}.weight"], release[f"head.{final}.bias"], padding=1)
        n, _, h, w = y.shape  # detectron2's permute_to_N_HWA_K: channels are (anchor, column)
        return y.view(n, -1, columns, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, columns)

    torch.testing.assert_close(ours["cls_logits"], detectron2_branch("cls_subnet", "cls_score", 80))
    torch.testing.assert_close(ours["bbox_deltas"], detectron2_branch("bbox_subnet", "bbox_pred", 4))


@pytest.fixture(scope="module")
def rcnn_release():
    return random_release("faster_rcnn", "resnet")


def test_faster_rcnn_lands_where_expected_and_predicts_detectron2s_classes(rcnn_release):
    release, model = rcnn_release, _model("faster_rcnn_r50_dyhead_1x.yaml")
    converted = convert_official_detector(release, model.state_dict())
    model.load_state_dict(converted, strict=True)
    assert torch.equal(model.fpn.inner_blocks[0][0].weight, release["backbone.backbone.fpn_lateral2.weight"])
    assert torch.equal(model.fpn.layer_blocks[3][0].bias, release["backbone.backbone.fpn_output5.bias"])
    rpn = model.rpn.head
    assert torch.equal(rpn.conv[0][0].weight, release["proposal_generator.rpn_head.conv.weight"])
    assert torch.equal(rpn.cls_logits.bias, release["proposal_generator.rpn_head.objectness_logits.bias"])
    assert torch.equal(rpn.bbox_pred.weight, release["proposal_generator.rpn_head.anchor_deltas.weight"])
    box_head = model.roi_heads.box_head
    assert torch.equal(box_head.fc6.weight, release["roi_heads.box_head.fc1.weight"])
    assert torch.equal(box_head.fc7.bias, release["roi_heads.box_head.fc2.bias"])
    assert all(block.task is not None for block in model.neck.blocks)  # the release's DyHead is whole

    x = torch.randn(5, 1024)
    with torch.no_grad():
        scores, deltas = model.roi_heads.box_predictor(x)
    p = "roi_heads.box_predictor"
    # detectron2: K + 1 scores with the background last, and 4 deltas per object class only
    theirs = F.softmax(F.linear(x, release[f"{p}.cls_score.weight"], release[f"{p}.cls_score.bias"]), dim=1)
    ours = F.softmax(scores, dim=1)
    torch.testing.assert_close(ours[:, 1:], theirs[:, :80])
    torch.testing.assert_close(ours[:, 0], theirs[:, 80])
    their_deltas = F.linear(x, release[f"{p}.bbox_pred.weight"], release[f"{p}.bbox_pred.bias"]).view(5, 80, 4)
    torch.testing.assert_close(deltas.view(5, 81, 4)[:, 1:], their_deltas)
    assert not deltas.view(5, 81, 4)[:, 0].any()


def test_faster_rcnn_needs_the_fc_box_head(rcnn_release, tmp_path):
    src = tmp_path / "dyhead_r50_rcnn_fpn_1x.pth"
    torch.save({"model": rcnn_release}, src)
    cfg = load_config(CONFIGS / "faster_rcnn_r50_dyhead_1x.yaml", NO_WEIGHTS + ["model.rcnn.box_head=task_attention"])
    with pytest.raises(ConfigError, match="box_head=task_attention"):
        load_official_detector(src, cfg.model)
    release = load_official_detector(src, load_config(CONFIGS / "faster_rcnn_r50_dyhead_1x.yaml", NO_WEIGHTS).model)
    assert (release.architecture, release.num_classes) == ("faster_rcnn", 80)
    assert release.settings == RELEASE_SETTINGS["resnet"]


def test_saved_input_settings_anchors_and_swin_masks_are_skipped(swin_release, monkeypatch, caplog):
    """Some detectron2 versions saved these with the weights; the model recomputes them."""
    extras = {"pixel_mean": torch.zeros(3, 1, 1), "pixel_std": torch.ones(3, 1, 1),
              "anchor_generator.cell_anchors.0": torch.zeros(9, 4),
              "backbone.backbone.bottom_up.layers.0.blocks.1.attn_mask": torch.zeros(64, 49, 49)}
    monkeypatch.setattr(logging.getLogger("detectors"), "propagate", True)  # main() may have turned it off
    with caplog.at_level(logging.INFO, logger="detectors.official_weights"):
        converted = convert_official_detector({**extras, **swin_release}, architecture="atss")
    assert converted.keys() == convert_official_detector(swin_release, architecture="atss").keys()
    skipped = len(extras) + sum(key.endswith("relative_position_index") for key in swin_release)
    assert f"skipped {skipped} input settings and recomputed buffers: pixel_mean, pixel_std" in caplog.text


def test_two_keys_for_one_tensor_are_refused(swin_release):
    block = "backbone.backbone.bottom_up.layers.0.blocks.1.mlp"
    mixed = {**swin_release, f"{block}.0.weight": swin_release[f"{block}.fc1.weight"]}  # torchvision's name too
    with pytest.raises(ValueError, match=re.escape(
        f"official keys '{block}.fc1.weight' and '{block}.0.weight' both map to 'backbone.features.1.1.mlp.0.weight'"
    )):
        convert_official_detector(mixed, architecture="atss")


@pytest.mark.parametrize(
    "architecture, config, overrides, release_args",
    [
        ("atss", "atss_r50_dyhead_1x.yaml", [], {}),
        ("retinanet", "retinanet_r50_dyhead_1x.yaml", [], {}),
        # one anchor scale: 3 anchors per position, as a model trained with that setting has
        ("retinanet", "retinanet_r50_dyhead_1x.yaml", ["model.retinanet.anchor_scales=[1.0]"], {"anchors": 3}),
        ("faster_rcnn", "faster_rcnn_r50_dyhead_1x.yaml", [], {}),
    ],
)
def test_the_class_count_is_the_checkpoints(architecture, config, overrides, release_args, tmp_path):
    src = tmp_path / "model_final.pth"
    torch.save({"model": random_release(architecture, num_classes=3, dyhead_blocks=1, **release_args)}, src)
    cfg = load_config(CONFIGS / config, NO_WEIGHTS + ["model.dyhead_blocks=1"] + overrides).model
    assert load_official_detector(src, cfg).num_classes == 3


def test_a_configs_class_count_must_be_the_checkpoints(tmp_path):
    src = tmp_path / "model_final.pth"
    torch.save({"model": random_release("atss", num_classes=3, dyhead_blocks=1)}, src)
    overrides = ["model.dyhead_blocks=1", "model.num_classes=5"]
    cfg = load_config(CONFIGS / "atss_r50_dyhead_1x.yaml", NO_WEIGHTS + overrides)
    with pytest.raises(ValueError, match="shapes differ.*'head.cls_logits.weight' \\(3, 256, 1, 1\\) -> "
                                         "'head.cls_logits.weight' \\(5, 256, 1, 1\\)"):
        load_official_detector(src, cfg.model)


def test_swin_release_settings_are_the_releases_and_the_swin_t_configs():
    """The release's configs/dyhead_swint_atss_fpn_2x_ms.yaml reads RGB with PIXEL_MEAN [123.675, 116.28, 103.53]
    and PIXEL_STD [58.395, 57.12, 57.375] on [0, 255]; the Swin-T config here evaluates the release's model with
    its input as it stands."""
    settings = RELEASE_SETTINGS["swin"]
    assert settings["data.input.format"] == "RGB"
    torch.testing.assert_close(torch.tensor(settings["data.input.pixel_mean"]) * 255,
                               torch.tensor([123.675, 116.28, 103.53]))
    torch.testing.assert_close(torch.tensor(settings["data.input.pixel_std"]) * 255,
                               torch.tensor([58.395, 57.12, 57.375]))
    cfg = load_config(CONFIGS / "atss_swint_dyhead_2x_ms.yaml")
    for key, value in settings.items():
        assert functools.reduce(getattr, key.split("."), cfg) == value, key
