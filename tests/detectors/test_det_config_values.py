"""Config values: null spelt None, mappings merged into a section, malformed YAML and out-of-range values."""

from pathlib import Path

import pytest

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
    path.write_text("model:\n  fpn_channels: 64\n  backbone: {name: slim, weights: null, norm: bn, widths: [8, 16]}")
    backbone = load_config(path, ["model.backbone={name: resnet18, freeze_at: 1}"]).model.backbone
    assert (backbone.name, backbone.freeze_at, backbone.weights, backbone.norm) == ("resnet18", 1, None, "bn")
    assert backbone.widths == [8, 16]
    model = load_config(path, ["model={backbone: {norm: gn}, dyhead_blocks: 2}"]).model
    assert (model.backbone.name, model.backbone.norm, model.fpn_channels, model.dyhead_blocks) == ("slim", "gn", 64, 2)
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


def test_an_override_value_may_hold_an_equals_sign():
    """The key ends at the first '=': a path such as a=b/ann.json is the value, whole."""
    cfg = load_config(None, ["data.train.ann_file=/data/run=3/ann.json", "data.test.image_dir=x==y"])
    assert (cfg.data.train.ann_file, cfg.data.test.image_dir) == ("/data/run=3/ann.json", "x==y")


def test_overrides_check_bools_ints_and_sections_and_allow_spaces():
    """A number is not a bool nor a bool a number (YAML reads true as a bool, 1 as an int); a key below a plain value
    names the section it is not; spaces around the key are allowed."""
    with pytest.raises(ConfigError, match="data.aspect_ratio_grouping: expected bool, got 1"):
        load_config(None, ["data.aspect_ratio_grouping=1"])
    with pytest.raises(ConfigError, match="solver.max_iter: expected int, got True"):
        load_config(None, ["solver.max_iter=true"])
    with pytest.raises(ConfigError, match="unknown config section 'solver.base_lr'; valid sections under 'solver'"):
        load_config(None, ["solver.base_lr.x=1"])
    assert load_config(None, [" solver.max_iter = 7"]).solver.max_iter == 7
