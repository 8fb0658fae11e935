"""The release's whole ATSS + DyHead checkpoint (microsoft/DynamicHead) -> detectors.atss.ATSS, and the R50's
stride placement.

The synthetic checkpoint has the key names and shapes of the release's dyhead_r50_atss_fpn_1x model, written
in release_checkpoints.py from detectron2's naming rather than from the converter's tables.
"""

import logging
import re
from pathlib import Path

import pytest
import torch

from detectors.backbones import build_backbone
from detectors.build import build_detector
from detectors.cli import _load_model, main
from detectors.config import BackboneConfig, load_config
from detectors.official_weights import RELEASE_SETTINGS, convert_official_detector
from release_checkpoints import random_release

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "atss_r50_dyhead_1x.yaml"
RESNET_SETTINGS = RELEASE_SETTINGS["resnet"]


@pytest.fixture(scope="module")
def release():
    return random_release("atss", "resnet")


@pytest.fixture(scope="module")
def release_file(release, tmp_path_factory):
    path = tmp_path_factory.mktemp("release") / "dyhead_r50_atss_fpn_1x.pth"
    torch.save({"model": release, "iteration": 89999}, path)
    return path


@pytest.fixture(scope="module")
def atss():
    cfg = load_config(CONFIG, ["model.backbone.weights=null"])
    return build_detector(cfg.model, num_classes=80)


def test_release_checkpoint_loads_strictly_and_lands_where_expected(release, atss):
    converted = convert_official_detector({"model": release, "iteration": 89999}, atss.state_dict())
    assert list(converted) == list(atss.state_dict())
    atss.load_state_dict(converted, strict=True)

    r, body = "backbone.backbone.bottom_up", atss.backbone.body
    assert torch.equal(body.conv1.weight, release[f"{r}.stem.conv1.weight"])
    assert torch.equal(body.bn1.bias, release[f"{r}.stem.conv1.norm.bias"])
    assert torch.equal(body.layer3[2].bn2.running_var, release[f"{r}.res4.2.conv2.norm.running_var"])
    assert torch.equal(body.layer4[1].conv3.weight, release[f"{r}.res5.1.conv3.weight"])
    assert torch.equal(body.layer2[0].downsample[0].weight, release[f"{r}.res3.0.shortcut.weight"])
    assert torch.equal(body.layer2[0].downsample[1].running_mean, release[f"{r}.res3.0.shortcut.norm.running_mean"])
    fpn = atss.fpn
    assert torch.equal(fpn.inner_blocks[0][0].weight, release["backbone.backbone.fpn_lateral3.weight"])
    assert torch.equal(fpn.inner_blocks[2][0].bias, release["backbone.backbone.fpn_lateral5.bias"])
    assert torch.equal(fpn.layer_blocks[0][0].weight, release["backbone.backbone.fpn_output3.weight"])
    assert torch.equal(fpn.layer_blocks[2][0].weight, release["backbone.backbone.fpn_output5.weight"])
    assert torch.equal(fpn.extra_blocks.p6.weight, release["backbone.backbone.top_block.p6.weight"])
    assert torch.equal(fpn.extra_blocks.p7.bias, release["backbone.backbone.top_block.p7.bias"])
    block = atss.neck.blocks[3]
    assert torch.equal(block.spatial.offset.weight, release["backbone.dyhead_tower.3.offset.weight"])
    assert torch.equal(block.spatial.coarser.conv.weight, release["backbone.dyhead_tower.3.DyConv.0.conv.weight"])
    assert torch.equal(block.task.fc2.bias, release["backbone.dyhead_tower.3.relu.fc.2.bias"])
    assert torch.equal(atss.head.cls_logits.weight, release["head.cls_logits.weight"])
    assert torch.equal(atss.head.centerness.bias, release["head.centerness.bias"])
    assert atss.head.scales[2].scale.shape == () and atss.head.scales[2].scale == release["head.scales.2.scale"][0]


@pytest.mark.parametrize(
    "key",
    [
        "backbone.backbone.bottom_up.res2.0.conv4.weight",
        "backbone.backbone.bottom_up.res3.1.conv1.norm.num_batches_tracked",
        "head.cls_score.weight",  # the release's RetinaNet
        "backbone.dyhead_tower.0.DyConv.3.conv.weight",
    ],
)
def test_an_unmapped_key_is_named(release, key):
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        convert_official_detector({**release, key: torch.zeros(1)}, architecture="atss")


def test_a_ddp_saved_checkpoint_converts_alike(release):
    wrapped = {"model": {f"module.{key}": value for key, value in release.items()}}
    converted, plain = convert_official_detector(wrapped), convert_official_detector(release)
    assert converted.keys() == plain.keys() and all(torch.equal(converted[k], plain[k]) for k in plain)


def test_missing_keys_are_named(release, atss):
    partial = dict(release)
    del partial["head.scales.4.scale"], partial["backbone.backbone.bottom_up.res5.2.conv3.norm.running_var"]
    with pytest.raises(ValueError, match="nothing for 2 of the model's tensors") as err:
        convert_official_detector(partial, atss.state_dict())
    assert "'head.scales.4.scale'" in str(err.value) and "'backbone.body.layer4.2.bn3.running_var'" in str(err.value)


def test_a_converted_tensor_the_model_lacks_is_named(release, atss):
    sixth_level = {**release, "head.scales.5.scale": torch.ones(1)}
    with pytest.raises(ValueError, match="1 converted tensors are not in the model: 'head.scales.5.scale' -> "):
        convert_official_detector(sixth_level, atss.state_dict())


def test_a_shape_mismatch_names_both_keys_and_shapes(release, atss):
    wrong = {**release, "backbone.backbone.fpn_lateral4.weight": torch.zeros(256, 512, 1, 1)}
    with pytest.raises(ValueError, match="1 shapes differ") as err:
        convert_official_detector(wrong, atss.state_dict())
    assert (
        "'backbone.backbone.fpn_lateral4.weight' (256, 512, 1, 1) -> 'fpn.inner_blocks.1.0.weight' (256, 1024, 1, 1)"
        in str(err.value)
    )


def _header_overrides():
    header = CONFIG.read_text().split("\nmodel:")[0]
    return re.findall(r"--set '?([\w.]+=[^\s']+)'?", header)


def test_the_config_header_names_the_release_settings():
    overrides = _header_overrides()
    assert "model.backbone.stride_in_1x1=true" in overrides
    cfg = load_config(CONFIG, overrides)
    for key, value in RESNET_SETTINGS.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value, key
    defaults = load_config(CONFIG)  # the config itself stays on torchvision's RGB ImageNet weights
    assert defaults.data.input.format == "RGB" and not defaults.model.backbone.stride_in_1x1


def test_cli_round_trip_loads_for_eval(release_file, tmp_path, monkeypatch, caplog):
    out = tmp_path / "converted" / "atss_r50_release.pth"
    assert main(["convert", "--detector", str(release_file), str(out), "--config", str(CONFIG)]) == 0
    assert not out.with_name(out.name + ".tmp").exists()
    saved = torch.load(out, weights_only=True)
    assert saved["meta"]["num_classes"] == 80 and saved["meta"]["release_settings"] == RESNET_SETTINGS
    assert saved["model"]["head.scales.0.scale"].shape == ()
    # COCO's categories, so that predict names its labels and eval scores them under COCO's ids
    ids, names = saved["meta"]["category_ids"], saved["meta"]["class_names"]
    assert (ids[0], names[0]) == (1, "person") and (ids[-1], names[-1]) == (90, "toothbrush")
    assert len(ids) == len(set(ids)) == 80 and ids == sorted(ids) and 12 not in ids

    monkeypatch.setattr(logging.getLogger("detectors"), "propagate", True)  # main() turned it off
    with caplog.at_level(logging.WARNING, logger="detectors.cli"):
        _load_model(load_config(CONFIG, ["model.backbone.weights=null"]), out, None, torch.device("cpu"))
    assert "stride_in_1x1=true" in caplog.text and "BGR255" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="detectors.cli"):
        model, meta = _load_model(load_config(CONFIG, _header_overrides()), out, None, torch.device("cpu"))
    assert caplog.text == ""
    assert model.backbone.body.layer2[0].conv1.stride == (2, 2)
    torch.testing.assert_close(model.fpn.extra_blocks.p6.weight, saved["model"]["fpn.extra_blocks.p6.weight"])
    with torch.no_grad():
        (det,) = model(torch.randn(1, 3, 128, 128), [(128, 128)])
    assert det["boxes"].shape[1] == 4 and det["boxes"].shape[0] == det["scores"].shape[0]


def test_cli_rejects_another_detector_or_no_detector(tmp_path, capsys):
    src, out = tmp_path / "retinanet.pth", tmp_path / "out.pth"
    torch.save({"model": {"head.cls_score.weight": torch.zeros(720, 256, 3, 3),
                          "backbone.dyhead_tower.0.offset.weight": torch.zeros(27, 256, 3, 3)}}, src)
    assert main(["convert", "--detector", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert "retinanet.pth" in err and "retinanet" in err.split("retinanet.pth")[1]
    assert "configs/retinanet_r50_dyhead_1x.yaml" in err
    assert not out.exists()
    torch.save({"model": {"backbone.fpn.weight": torch.zeros(1)}}, src)
    assert main(["convert", "--detector", str(src), str(out)]) == 2
    assert "not a microsoft/DynamicHead detector" in capsys.readouterr().err and not out.exists()
    assert main(["convert", str(src), str(out), "--config", str(CONFIG)]) == 2
    assert "--detector only" in capsys.readouterr().err


def test_cli_names_a_checkpoint_of_this_library(tmp_path, capsys):
    """A `dyhead train` checkpoint has an ATSS head's names too: it is named as this library's, which needs no
    converting, where the converter reported every tensor as an official key without a counterpart."""
    src = tmp_path / "model_final.pth"
    model = build_detector(load_config(CONFIG.parent / "shapes_tiny.yaml", ["model.dyhead_blocks=1"]).model, 3)
    torch.save({"model": model.state_dict(), "iteration": 2}, src)
    assert main(["convert", "--detector", str(src), str(tmp_path / "out.pth")]) == 2
    assert capsys.readouterr().err == (
        f"dyhead convert: error: {src}: not a microsoft/DynamicHead detector: no DyHead tower "
        "(backbone.dyhead_tower.N) among its keys; its names are this library's (a `dyhead train` checkpoint?), "
        "which eval and predict read as they are\n")


def test_cli_names_the_config_that_fits_for_a_config_of_the_slim_backbone(release_file, tmp_path, capsys):
    """The shapes configs' slim ResNet is in no release: the R50 ATSS config is named, not 400 tensors that do not
    fit."""
    shapes_tiny = CONFIG.parent / "shapes_tiny.yaml"
    assert main(["convert", "--detector", str(release_file), str(tmp_path / "out.pth"), "--config",
                 str(shapes_tiny)]) == 2
    assert capsys.readouterr().err == (
        f"dyhead convert: error: {release_file} holds the release's atss with a resnet backbone; the config's "
        "backbone is slim (use configs/atss_r50_dyhead_1x.yaml)\n")


def _strides(backbone):
    return {name: m.stride for name, m in backbone.named_modules() if isinstance(m, torch.nn.Conv2d)}


def test_stride_in_1x1_moves_only_the_first_blocks_stride():
    torch.manual_seed(0)
    v15 = build_backbone(BackboneConfig(name="resnet50", weights=None))
    msra = build_backbone(BackboneConfig(name="resnet50", weights=None, stride_in_1x1=True))
    msra.load_state_dict(v15.state_dict())
    before, after = _strides(v15), _strides(msra)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {f"body.layer{i}.0.conv{j}" for i in (2, 3, 4) for j in (1, 2)}
    for i in (2, 3, 4):
        assert after[f"body.layer{i}.0.conv1"] == (2, 2) and after[f"body.layer{i}.0.conv2"] == (1, 1)
        assert after[f"body.layer{i}.0.downsample.0"] == (2, 2)
    x = torch.randn(1, 3, 67, 93)  # odd sizes: both placements round up the same way
    with torch.no_grad():
        ours, theirs = v15.eval()(x), msra.eval()(x)
    assert [t.shape for t in ours.values()] == [t.shape for t in theirs.values()]
    assert not torch.allclose(ours["c3"], theirs["c3"])


@pytest.mark.parametrize("name", ["resnet18", "slim", "swin_t"])
def test_stride_in_1x1_needs_bottleneck_blocks(name):
    norm = "ln" if name.startswith("swin") else "bn"
    with pytest.raises(ValueError, match="stride_in_1x1"):
        build_backbone(BackboneConfig(name=name, weights=None, norm=norm, stride_in_1x1=True))
