"""Experiment configuration: nested dataclasses loaded from YAML, with dotted ``key=value`` overrides.

A config file holds only the fields it changes; everything else keeps the defaults below, which are the
paper's ATSS + DyHead R50 1x values as microsoft/DynamicHead trained them (configs/dyhead_r50_atss_fpn_1x.yaml,
extra/config.py and train_net.py over detectron2's defaults): nothing frozen, weight decay grouped by name with 1e-4
on biases. Deliberately not the release's: torchvision's ImageNet R50 and its RGB input (stride in the 3x3 conv, see
``BackboneConfig`` and ``InputConfig``), and ``solver.amp`` (bf16 autocast; the published configs set it false,
as the release trained in fp32). Unknown keys are errors that list the valid ones, so a typo never
silently falls back to a default, and values no run can use (a period of 0, unsorted steps...) are errors when
the config is read rather than a crash or a hang later.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "BackboneConfig",
    "RetinaNetConfig",
    "RCNNConfig",
    "ModelConfig",
    "DatasetConfig",
    "ShapesConfig",
    "InputConfig",
    "DataConfig",
    "SolverConfig",
    "Config",
    "ConfigError",
    "SWIN_NAMES",
    "check_backbone",
    "load_config",
    "apply_overrides",
    "config_to_dict",
]


class ConfigError(ValueError):
    """A config file or override is not valid YAML, names an unknown key or holds a value of the wrong type or
    outside its field's range, or settings that do not go together."""


SWIN_NAMES = ("swin_t", "swin_s", "swin_b")


@dataclass
class BackboneConfig:
    """Backbone returning C2-C5 or C3-C5 (what the detector asks for).

    ``name`` is a torchvision ResNet (``resnet18``/``34``/``50``/``101``/``152``), ``slim``, a
    from-scratch BasicBlock ResNet whose stage ``widths`` and ``depths`` are set here, or a torchvision Swin
    Transformer (``swin_t``/``swin_s``/``swin_b``). ``weights`` is a torchvision weights name (e.g.
    ``IMAGENET1K_V1``), a path to a ``.pth`` state dict, or null for random init; for the ResNets a caffe2 ``.pkl``
    (detectron2's ``ImageNetPretrained/MSRA/R-50.pkl``, ``detectors.msra_weights``) is converted, and for Swin the
    ``.pth`` may also be an official microsoft/Swin-Transformer checkpoint, whose keys are converted. ``norm`` is
    ``frozen_bn`` (pretrained, detectron2's choice), ``bn`` or ``gn`` (from scratch; GroupNorm of ``gn_groups``
    groups, detectron2's 32, which must divide every channel count) for the ResNets, and must be ``ln`` for Swin,
    which only has LayerNorm. ``freeze_at`` 0 trains everything (the release's FREEZE_AT -1),
    k freezes the stem (1) and the first ``k - 1`` stages, as detectron2's FREEZE_AT; for Swin the stem is the
    patch embedding and a frozen stage takes the patch merging after it along. ``stride_in_1x1`` puts each
    stage's stride 2 in the first block's 1x1 conv instead of its 3x3 conv (resnet50/101/152 only): the original
    MSRA ResNet and detectron2's default (RESNETS.STRIDE_IN_1X1), which the release's R50 models were trained
    with; torchvision's ImageNet weights want it false.
    """

    name: Literal["slim", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "swin_t", "swin_s",
                  "swin_b"] = "resnet50"
    weights: str | None = "IMAGENET1K_V1"
    norm: Literal["frozen_bn", "bn", "gn", "ln"] = "frozen_bn"
    gn_groups: int = 32  # GroupNorm's groups where norm is gn (detectron2's and mmdetection's 32)
    freeze_at: int = 0  # the release's FREEZE_AT -1 (extra/config.py), not detectron2's generic 2
    stride_in_1x1: bool = False
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])


@dataclass
class RetinaNetConfig:
    """RetinaNet specifics (detectron2's ``MODEL.RETINANET`` defaults).

    Anchors per level: ``anchor_size x 2**(l) x s`` for s in ``anchor_scales`` and every aspect ratio, where
    ``anchor_size`` is the side at P3 (4 x stride). ``num_convs`` 3x3 conv + ReLU layers form each of the class
    and box towers on top of the neck (detectron2's 4, which the release kept; 0 leaves DyHead as the only
    tower). The losses are divided by an exponential moving average of the foreground count with momentum
    ``loss_normalizer_momentum`` (detectron2's 0.9, starting at 100; 0 divides by each batch's count).
    """

    num_convs: int = 4
    loss_normalizer_momentum: float = 0.9

    anchor_size: float = 32.0
    anchor_scales: list[float] = field(default_factory=lambda: [1.0, 2 ** (1 / 3), 2 ** (2 / 3)])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.4
    smooth_l1_beta: float = 0.1


@dataclass
class RCNNConfig:
    """Faster R-CNN specifics: RPN and box head, as the release's dyhead_r50_rcnn_fpn_1x.yaml over detectron2's
    defaults (its RPN top-k 2000/1000 and 1000 after NMS, its 7x7 pooler, where detectron2's are 12000/6000,
    2000 and 14).

    ``box_head`` is ``fc`` (the release's detector: the whole DyHead, task attention included, on P2-P6, then
    detectron2's two fully connected layers of ``fc_dim``) or ``task_attention`` (the paper's Sec. 3.4 recipe:
    DyHead without task attention on P2-P6, the task-aware attention on each RoI in place of the fully connected
    layers). Box losses are smooth L1 with the given beta (detectron2's 0: L1); ``pooler_aligned`` is
    detectron2's ROIAlignV2 (half-pixel shift).
    """

    box_head: Literal["fc", "task_attention"] = "fc"
    fc_dim: int = 1024
    rpn_smooth_l1_beta: float = 0.0
    roi_smooth_l1_beta: float = 0.0
    pooler_aligned: bool = True

    anchor_size: float = 32.0  # side at P2; doubles per level
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_topk_train: int = 2000
    rpn_pre_nms_topk_test: int = 1000
    rpn_post_nms_topk_train: int = 1000
    rpn_post_nms_topk_test: int = 1000
    rpn_nms_thresh: float = 0.7
    roi_fg_iou_thresh: float = 0.5
    roi_bg_iou_thresh: float = 0.5
    roi_batch_size_per_image: int = 512
    roi_positive_fraction: float = 0.25
    pooler_resolution: int = 7
    pooler_sampling_ratio: int = 0


@dataclass
class ModelConfig:
    """A detector with an FPN and a DyHead neck; defaults are the paper's ATSS R50 values.

    ``meta_architecture`` is ``atss`` (P3-P7, the release's detector), ``retinanet`` (P3-P7) or
    ``faster_rcnn`` (P2-P6). The fields below ``dyhead_high_offsets`` are shared by the one-stage heads and
    the box head's inference; ``retinanet`` and ``rcnn`` hold what only one architecture reads.
    """

    meta_architecture: Literal["atss", "retinanet", "faster_rcnn"] = "atss"
    num_classes: int | None = None  # null: taken from the training set's categories
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn_channels: int = 256
    dyhead_channels: int = 256
    dyhead_blocks: int = 6
    dyhead_backend: Literal["auto", "torchvision", "torch", "sampled", "triton"] = "auto"
    dyhead_high_offsets: Literal["official", "crop"] = "official"
    anchor_scale: float = 8.0  # ATSS: anchor side = anchor_scale x stride
    atss_topk: int = 9
    prior_prob: float = 0.01
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    reg_loss_weight: float = 2.0
    score_thresh: float = 0.05
    pre_nms_topk: int = 1000
    nms_thresh: float = 0.6
    detections_per_img: int = 100
    retinanet: RetinaNetConfig = field(default_factory=RetinaNetConfig)
    rcnn: RCNNConfig = field(default_factory=RCNNConfig)


@dataclass
class DatasetConfig:
    """One dataset split.

    ``name`` is ``coco_2017_train``/``coco_2017_val`` (resolved under ``$DYHEAD_DATASETS``, default
    ``./datasets``), ``shapes_train``/``shapes_val`` (the synthetic set, generated on first use), or any
    other label, in which case ``image_dir`` and ``ann_file`` give the images folder and COCO JSON file.
    """

    name: str = "coco_2017_train"
    image_dir: str | None = None
    ann_file: str | None = None


@dataclass
class ShapesConfig:
    """Parameters of the synthetic shapes set; changing any of them writes a new cache folder."""

    root: str | None = None  # null: $DYHEAD_DATASETS/shapes
    num_train: int = 2000
    num_val: int = 200
    image_size: int = 128
    min_objects: int = 2
    max_objects: int = 6
    min_object_size: int = 12
    max_object_size: int = 64
    seed: int = 0


@dataclass
class InputConfig:
    """Resizing, flipping, normalisation and padding of input images.

    ``format`` is ``RGB`` (pixels in [0, 1] as torchvision's weights expect) or ``BGR255`` (caffe-style
    pixels in [0, 255], as MSRA/detectron2 weights expect); ``pixel_mean``/``pixel_std`` are in that space.
    ``size_divisibility`` pads each batch's height and width to a multiple of it. The release pads to the
    coarsest stride (its DyHead backbone's ``size_divisibility``): 128 for P3-P7 (ATSS, RetinaNet), 64 for P2-P6
    (Faster R-CNN), which makes every level exactly half the previous one. Any other value runs too: each level is
    then ceil(previous / 2), which DyHead accepts and the anchors and RoI pooler, on fixed strides, stay aligned
    with; the features then differ from the release's only as far as the padding changes them.
    """

    min_size_train: list[int] = field(default_factory=lambda: [800])
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    flip_prob: float = 0.5
    format: Literal["RGB", "BGR255"] = "RGB"
    pixel_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    pixel_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    size_divisibility: int = 128  # P7's stride, as the release pads P3-P7


@dataclass
class DataConfig:
    """Datasets and data loading."""

    train: DatasetConfig = field(default_factory=DatasetConfig)
    test: DatasetConfig = field(default_factory=lambda: DatasetConfig(name="coco_2017_val"))
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    input: InputConfig = field(default_factory=InputConfig)
    num_workers: int = 4  # per process
    test_ims_per_batch: int = 1  # per process
    aspect_ratio_grouping: bool = True
    skip_bad_images: bool = False  # warn once per unreadable image and go on instead of failing


@dataclass
class SolverConfig:
    """Optimiser and schedule; ``ims_per_batch`` is the total over all processes.

    ``decay_groups`` says which weight decay each parameter gets: ``by_type`` is detectron2's grouping
    (``weight_decay_norm`` on normalisation layers, ``weight_decay_bias`` on other biases), ``by_name`` the
    release's ``train_net.py`` (``weight_decay_bias`` on every parameter named ``*bias*``, ``weight_decay`` on
    everything else, norms included).
    """

    optimizer: Literal["sgd", "adamw"] = "sgd"
    base_lr: float = 0.01
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0
    # the release's train_net.py: by name, with detectron2's 2021 WEIGHT_DECAY_BIAS (a copy of WEIGHT_DECAY, 1e-4)
    weight_decay_bias: float = 1e-4
    decay_groups: Literal["by_type", "by_name"] = "by_name"
    ims_per_batch: int = 16
    max_iter: int = 90000
    steps: list[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0  # 0 disables clipping
    amp: bool = True  # bf16 autocast, CUDA only
    checkpoint_period: int = 5000
    eval_period: int = 0  # 0: evaluate once, after training
    log_period: int = 20


@dataclass
class Config:
    """A whole experiment."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available, else cpu; cuda: this process's GPU
    num_threads: int = 0  # CPU intra-op threads per process; 0 keeps torch's default
    deterministic: bool = False  # CUDA: deterministic cuDNN kernels and no cuDNN autotuning


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` and converts ints to floats where a float is wanted."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        where = f"'{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + '.' * bool(prefix) + k for k in unknown)}; "
            f"valid keys at {where}: {', '.join(types_)}"
        )
    kwargs = {k: _convert(v, types_[k], prefix + "." * bool(prefix) + k) for k, v in data.items()}
    return cls(**kwargs)


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader that also reads ``None`` and ``none`` as null, as detectron2's and mmdetection's
    configs do: ``--set model.backbone.weights=None`` means no weights, not a file named None."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^(?:None|none)$"), list("Nn"))


def _read_yaml(text: str, source: str) -> Any:
    """The YAML ``text`` as Python values; ConfigError naming ``source`` and YAML's reason when it is malformed."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        # YAML's own message spans several lines (context, a caret under the text); the problem and its place fit one
        if isinstance(exc, yaml.MarkedYAMLError) and exc.problem and exc.problem_mark:
            mark = exc.problem_mark
            reason = f"{exc.problem} at line {mark.line + 1}, column {mark.column + 1}"
        else:
            reason = str(exc).splitlines()[0]
        raise ConfigError(f"{source} is not valid YAML: {reason}") from None


def _merged(base: dict, update: dict) -> dict:
    """``base`` with ``update``'s values; a mapping that both hold is merged key by key rather than replaced."""
    merged = dict(base)
    for key, value in update.items():
        both = isinstance(base.get(key), dict) and isinstance(value, dict)
        merged[key] = _merged(base[key], value) if both else value
    return merged


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Applies ``key=value`` overrides (dotted keys, YAML values) to ``cfg`` in place and returns it.

    Example: ``["solver.base_lr=0.02", "data.input.min_size_train=[640, 800]"]``. ``None`` and ``none`` are null,
    as YAML's ``null`` and ``~``. A mapping given to a section changes only the keys it names:
    ``model.backbone={name: resnet18}`` keeps the backbone's other settings.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node, path = cfg, ""
        for part in parts[:-1]:
            types_ = _field_types(type(node))
            if part not in types_ or not dataclasses.is_dataclass(types_[part]):
                sections = [k for k, t in types_.items() if dataclasses.is_dataclass(t)]
                raise ConfigError(
                    f"unknown config section '{path + part}'; valid sections"
                    f"{' under ' + repr(path[:-1]) if path else ''}: {', '.join(sections)}"
                )
            node, path = getattr(node, part), path + part + "."
        types_ = _field_types(type(node))
        name = parts[-1]
        if name not in types_:
            raise ConfigError(
                f"unknown config key '{path + name}'; valid keys"
                f"{' under ' + repr(path[:-1]) if path else ''}: {', '.join(types_)}"
            )
        value = _read_yaml(raw, f"override {item!r}")
        if dataclasses.is_dataclass(types_[name]) and isinstance(value, dict):
            value = _merged(dataclasses.asdict(getattr(node, name)), value)
        setattr(node, name, _convert(value, types_[name], path + name))
    return cfg


_AT_LEAST_0 = (lambda v: v >= 0, ">= 0")
_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_POSITIVE = (lambda v: v > 0, "> 0")
_FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
_PER_STAGE = (lambda v: len(v) == 4 and min(v) >= 1, "four values >= 1, one per stage")
_SOME_POSITIVE = (lambda v: len(v) > 0 and min(v) > 0, "one or more values > 0")

# Checked when the config is read because, out of range, these values crash (a period of 0), hang (0 images per
# batch) or quietly change the run (unsorted steps, a threshold above 1) only later, after the data is read. A 0
# with a meaning stays allowed: eval_period, warmup_iters, clip_grad_norm, num_workers, num_threads, and max_iter
# (evaluation without training).
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "solver.base_lr": _POSITIVE,
    "solver.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "solver.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two values in [0, 1)"),
    "solver.weight_decay": _AT_LEAST_0,
    "solver.weight_decay_norm": _AT_LEAST_0,
    "solver.weight_decay_bias": _AT_LEAST_0,
    "solver.ims_per_batch": _AT_LEAST_1,
    "solver.max_iter": _AT_LEAST_0,
    "solver.steps": (lambda v: all(s >= 1 for s in v) and v == sorted(v), "iterations >= 1 in increasing order"),
    "solver.gamma": _POSITIVE,
    "solver.warmup_iters": _AT_LEAST_0,
    "solver.warmup_factor": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "solver.clip_grad_norm": _AT_LEAST_0,
    "solver.checkpoint_period": _AT_LEAST_1,
    "solver.eval_period": _AT_LEAST_0,
    "solver.log_period": _AT_LEAST_1,
    "data.num_workers": _AT_LEAST_0,
    "data.test_ims_per_batch": _AT_LEAST_1,
    "data.input.min_size_train": (lambda v: len(v) > 0 and min(v) >= 1, "one or more sizes >= 1"),
    "data.input.max_size_train": _AT_LEAST_1,
    "data.input.min_size_test": _AT_LEAST_1,
    "data.input.max_size_test": _AT_LEAST_1,
    "data.input.flip_prob": _FRACTION,
    "data.input.pixel_mean": (lambda v: len(v) == 3, "three values, one per channel"),
    "data.input.pixel_std": (lambda v: len(v) == 3 and min(v) > 0, "three values > 0, one per channel"),
    "data.input.size_divisibility": _AT_LEAST_1,
    "data.shapes.num_train": _AT_LEAST_1,
    "data.shapes.num_val": _AT_LEAST_1,
    "data.shapes.image_size": _AT_LEAST_1,
    "data.shapes.min_objects": _AT_LEAST_0,
    "data.shapes.min_object_size": _AT_LEAST_1,
    "model.score_thresh": _FRACTION,
    "model.nms_thresh": _FRACTION,
    "num_threads": _AT_LEAST_0,
    "model.num_classes": (lambda v: v is None or v >= 1, ">= 1, or null for the training set's count"),
    "model.backbone.freeze_at": (lambda v: 0 <= v <= 5, "in [0, 5]"),
    "model.backbone.gn_groups": _POSITIVE,
    "model.backbone.widths": _PER_STAGE,
    "model.backbone.depths": _PER_STAGE,
    "model.fpn_channels": _AT_LEAST_1,
    "model.dyhead_channels": (lambda v: v >= 16 and v % 16 == 0,
                              "a positive multiple of 16 (GroupNorm(16) after every conv)"),
    "model.dyhead_blocks": _AT_LEAST_1,
    "model.anchor_scale": _POSITIVE,
    "model.atss_topk": _AT_LEAST_1,
    "model.prior_prob": (lambda v: 0 < v < 1, "in (0, 1)"),
    "model.focal_alpha": (lambda v: 0 <= v <= 1 or v == -1, "in [0, 1], or -1 for no weighting"),
    "model.focal_gamma": _AT_LEAST_0,
    "model.reg_loss_weight": _AT_LEAST_0,
    "model.pre_nms_topk": _AT_LEAST_1,
    "model.detections_per_img": _AT_LEAST_1,
    "model.retinanet.num_convs": _AT_LEAST_0,
    "model.retinanet.loss_normalizer_momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.retinanet.anchor_size": _POSITIVE,
    "model.retinanet.anchor_scales": _SOME_POSITIVE,
    "model.retinanet.aspect_ratios": _SOME_POSITIVE,
    "model.retinanet.fg_iou_thresh": _FRACTION,
    "model.retinanet.bg_iou_thresh": _FRACTION,
    "model.retinanet.smooth_l1_beta": _AT_LEAST_0,
    "model.rcnn.fc_dim": _AT_LEAST_1,
    "model.rcnn.rpn_smooth_l1_beta": _AT_LEAST_0,
    "model.rcnn.roi_smooth_l1_beta": _AT_LEAST_0,
    "model.rcnn.anchor_size": _POSITIVE,
    "model.rcnn.aspect_ratios": _SOME_POSITIVE,
    "model.rcnn.rpn_fg_iou_thresh": _FRACTION,
    "model.rcnn.rpn_bg_iou_thresh": _FRACTION,
    "model.rcnn.rpn_batch_size_per_image": _AT_LEAST_1,
    "model.rcnn.rpn_positive_fraction": _FRACTION,
    "model.rcnn.rpn_pre_nms_topk_train": _AT_LEAST_1,
    "model.rcnn.rpn_pre_nms_topk_test": _AT_LEAST_1,
    "model.rcnn.rpn_post_nms_topk_train": _AT_LEAST_1,
    "model.rcnn.rpn_post_nms_topk_test": _AT_LEAST_1,
    "model.rcnn.rpn_nms_thresh": _FRACTION,
    "model.rcnn.roi_fg_iou_thresh": _FRACTION,
    "model.rcnn.roi_bg_iou_thresh": _FRACTION,
    "model.rcnn.roi_batch_size_per_image": _AT_LEAST_1,
    "model.rcnn.roi_positive_fraction": _FRACTION,
    "model.rcnn.pooler_resolution": _AT_LEAST_1,
    "model.rcnn.pooler_sampling_ratio": _AT_LEAST_0,
}

# Pairs (low, high) that must not cross: the matchers' background threshold above the foreground one is
# torchvision's bare assertion in Faster R-CNN, and in RetinaNet silently marks anchors between them as both; a
# shape larger than the image is drawn cut off by its border.
_ORDERED = (
    ("data.shapes.min_objects", "data.shapes.max_objects"),
    ("data.shapes.min_object_size", "data.shapes.max_object_size"),
    ("data.shapes.max_object_size", "data.shapes.image_size"),
    ("model.retinanet.bg_iou_thresh", "model.retinanet.fg_iou_thresh"),
    ("model.rcnn.rpn_bg_iou_thresh", "model.rcnn.rpn_fg_iou_thresh"),
    ("model.rcnn.roi_bg_iou_thresh", "model.rcnn.roi_fg_iou_thresh"),
)


def check_backbone(cfg: BackboneConfig) -> None:
    """Raises ConfigError where the backbone's settings do not go together: Swin has only LayerNorm and the
    ResNets none, only a bottleneck has the 1x1 conv that ``stride_in_1x1`` moves the stride into, and GroupNorm's
    groups must divide every channel count."""
    swin = cfg.name in SWIN_NAMES
    if swin != (cfg.norm == "ln"):
        expected = "ln, Swin's only norm," if swin else "frozen_bn, bn or gn (ln is Swin's)"
        raise ConfigError(f"model.backbone.norm: expected {expected} for {cfg.name}, got {cfg.norm!r}")
    if cfg.stride_in_1x1 and cfg.name not in ("resnet50", "resnet101", "resnet152"):
        raise ConfigError("model.backbone.stride_in_1x1: applies to the bottleneck ResNets (resnet50/101/152), "
                          f"not {cfg.name}")
    # slim's channel counts are its widths; torchvision's ResNets have a 64-channel stem and multiples of it after
    slim = cfg.name == "slim"
    if cfg.norm == "gn" and any(c % cfg.gn_groups for c in (cfg.widths if slim else [64])):
        counts = f"the widths {cfg.widths}" if slim else "64 and its multiples"
        raise ConfigError(f"model.backbone.gn_groups: expected a divisor of {cfg.name}'s channel counts ({counts}), "
                          f"got {cfg.gn_groups}")


def _check_ranges(cfg: Config) -> None:
    """Raises ConfigError naming the first key of ``_RANGES`` whose value is outside its range, the value and the
    range; then the first pair of ``_ORDERED`` that crosses, and backbone settings that do not go together."""
    for key, (ok, allowed) in _RANGES.items():
        value = functools.reduce(getattr, key.split("."), cfg)
        if not ok(value):
            raise ConfigError(f"{key}: expected {allowed}, got {value!r}")
    for low_key, high_key in _ORDERED:
        low, high = (functools.reduce(getattr, key.split("."), cfg) for key in (low_key, high_key))
        if high < low:
            raise ConfigError(f"{high_key}: expected >= {low_key} ({low}), got {high}")
    check_backbone(cfg.model.backbone)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Reads a YAML file (or the defaults when ``path`` is None), applies ``overrides`` and checks the values'
    ranges (``_RANGES``) and relations on the result, so that an override can correct a file's value."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = _read_yaml(path.read_text(), f"config file {path}") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    try:
        cfg = _from_dict(Config, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    cfg = apply_overrides(cfg, overrides or [])
    _check_ranges(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """The config as plain dicts and lists, ready for ``yaml.safe_dump``."""
    return dataclasses.asdict(cfg)
