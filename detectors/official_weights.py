"""The release's whole detectors (microsoft/DynamicHead) in this project's names.

The release builds its detectors on detectron2 with DyHead as the backbone: ``build_*_fpn_dyhead_backbone``
(``extra/resnet.py``, ``extra/swint.py``) returns a DyHead (``dyhead/dyhead.py``) that holds detectron2's FPN as
``backbone``, which holds the ResNet or Swin as ``bottom_up``. A checkpoint's state dict (``model`` entry of a
detectron2 checkpoint) therefore reads, for every detector::

    backbone.backbone.bottom_up.stem.conv1.{weight, norm.*}          -> backbone.body.conv1 / bn1
    backbone.backbone.bottom_up.res{s}.{b}.conv{j}.{weight, norm.*}  -> backbone.body.layer{s-1}.{b}.conv{j} / bn{j}
    backbone.backbone.bottom_up.res{s}.{b}.shortcut.{weight, norm.*} -> backbone.body.layer{s-1}.{b}.downsample.0 / .1
    backbone.backbone.bottom_up.{patch_embed, layers}.*              -> backbone.features.* (Swin, as swin_weights)
    backbone.backbone.bottom_up.norm{i}.*                            -> backbone.norms.c{i+2}.* (Swin's level norms)
    backbone.backbone.fpn_lateral{k}.{weight, bias}                  -> fpn.inner_blocks.{k - k_min}.0
    backbone.backbone.fpn_output{k}.{weight, bias}                   -> fpn.layer_blocks.{k - k_min}.0
    backbone.backbone.top_block.p{6,7}.{weight, bias}                -> fpn.extra_blocks.p{6,7} (one-stage only)
    backbone.dyhead_tower.{i}.*                                      -> neck.blocks.{i}.* (see dyhead.official)

and then the detector's own head:

- ATSS (``extra/atss.py``): ``head.{cls_logits, bbox_pred, centerness}`` -> the same names; ``head.scales.{l}.scale``
  of shape (1,) -> shape ().
- RetinaNet (detectron2's ``RetinaNetHead``): ``head.{cls_subnet, bbox_subnet}.{2i}`` -> the same names,
  ``head.cls_score`` -> ``head.cls_logits``, ``head.bbox_pred`` -> the same; anchors in the same order.
- Faster R-CNN (detectron2's ``StandardRPNHead``, ``FastRCNNConvFCHead``, ``FastRCNNOutputLayers``):
  ``proposal_generator.rpn_head.{conv, objectness_logits, anchor_deltas}`` -> ``rpn.head.{conv.0.0, cls_logits,
  bbox_pred}``; ``roi_heads.box_head.fc{1,2}`` -> ``roi_heads.box_head.fc{6,7}``;
  ``roi_heads.box_predictor.cls_score`` has the background class last and torchvision's first, so its rows are
  rotated; ``roi_heads.box_predictor.bbox_pred`` has no background box, so four zero rows are put in front.

``norm.*`` are detectron2's FrozenBN buffers ``weight``, ``bias``, ``running_mean``, ``running_var``, the same four
as torchvision's ``FrozenBatchNorm2d``. ``k_min`` is the finest FPN input: 3 for the one-stage detectors (P3-P5,
P6 and P7 from P5 as ``LastLevelP6P7(256, 256, "p5")`` there and torchvision's ``LastLevelP6P7(256, 256)``
here), 2 for Faster R-CNN (P2-P5, P6 a parameter-free max pool). ``pixel_mean``/``pixel_std``, anchor buffers and
Swin's relative position indices, which some detectron2 versions saved, are input settings or recomputed
constants rather than weights: they are skipped, and the model keeps its own.

The weights alone do not reproduce the release: the ResNet models kept detectron2's defaults for the MSRA R50,
which :data:`RELEASE_SETTINGS` lists as config overrides per backbone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from dyhead.official import official_tower_name, read_checkpoint

from .build import build_detector
from .config import SWIN_NAMES, ConfigError, ModelConfig
from .swin_weights import official_key_to_torchvision

__all__ = [
    "RELEASE_SETTINGS", "RELEASE_CONFIGS", "ReleaseDetector", "release_kind", "convert_official_detector",
    "load_official_detector",
]

logger = logging.getLogger(__name__)

# The settings the release's models were trained and evaluated with that differ from this project's defaults,
# per backbone. The R50 models kept detectron2's defaults for MSRA weights: stride in the 1x1 conv
# (MODEL.RESNETS.STRIDE_IN_1X1), BGR pixels in [0, 255] minus the caffe means (INPUT.FORMAT, MODEL.PIXEL_MEAN,
# MODEL.PIXEL_STD). The Swin-T model reads RGB with the ImageNet statistics (its PIXEL_MEAN/STD are these times
# 255). All of them read the coarser branch's offsets the release's way.
RELEASE_SETTINGS: dict[str, dict[str, Any]] = {
    "resnet": {
        "model.backbone.stride_in_1x1": True,
        "model.dyhead_high_offsets": "official",
        "data.input.format": "BGR255",
        "data.input.pixel_mean": [103.53, 116.28, 123.675],
        "data.input.pixel_std": [1.0, 1.0, 1.0],
    },
    "swin": {
        "model.dyhead_high_offsets": "official",
        "data.input.format": "RGB",
        "data.input.pixel_mean": [0.485, 0.456, 0.406],
        "data.input.pixel_std": [0.229, 0.224, 0.225],
    },
}

_BOTTOM_UP = "backbone.backbone.bottom_up."
_NORM = r"norm\.(weight|bias|running_mean|running_var)"
_BLOCK_CONV = {"conv1": "conv1", "conv2": "conv2", "conv3": "conv3", "shortcut": "downsample.0"}
_BLOCK_NORM = {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3", "shortcut": "downsample.1"}
_FPN_BLOCKS = {"lateral": "inner_blocks", "output": "layer_blocks"}
_RPN_HEAD = {"conv": "conv.0.0", "objectness_logits": "cls_logits", "anchor_deltas": "bbox_pred"}
# Input settings, anchors and Swin's position indices (both layouts have them, in different shapes), which some
# detectron2 versions saved with the weights; the model recomputes them.
_SKIPPED = re.compile(
    r"(pixel_mean|pixel_std|(proposal_generator\.)?anchor_generator\.cell_anchors\.\d+"
    r"|backbone\.backbone\.bottom_up\..*(relative_position_index|attn_mask))"
)
# The model's own state that a release checkpoint cannot hold: recomputed buffers and training-only statistics.
_MODEL_OWN = re.compile(r".*(relative_position_index|loss_normalizer)")

_Rule = tuple[re.Pattern, Callable[[re.Match], "str | None"]]


class ReleaseDetector(NamedTuple):
    """What :func:`load_official_detector` returns.

    ``state``: the state dict in the model's key order; ``num_classes``: K of the checkpoint's classifier;
    ``architecture``: ``atss``/``retinanet``/``faster_rcnn``; ``settings``: the release's config overrides for its
    backbone (an entry of :data:`RELEASE_SETTINGS`).
    """

    state: dict[str, Tensor]
    num_classes: int
    architecture: str
    settings: dict[str, Any]


def release_kind(keys) -> tuple[str, str]:
    """(architecture, backbone kind) of a release state dict, from its key names.

    Raises ValueError when the keys are not those of a microsoft/DynamicHead detector (a head and its DyHead
    tower).
    """
    keys = list(keys)
    if any(k.startswith(("proposal_generator.", "roi_heads.")) for k in keys):
        architecture = "faster_rcnn"
    elif any(k.startswith(("head.cls_score.", "head.cls_subnet.")) for k in keys):
        architecture = "retinanet"
    elif any(k.startswith("head.centerness.") for k in keys):
        architecture = "atss"
    else:
        raise ValueError(
            "not a microsoft/DynamicHead detector: no ATSS (head.centerness), RetinaNet (head.cls_score) or "
            f"Faster R-CNN (proposal_generator, roi_heads) keys among {_listed([repr(k) for k in keys], 5)}"
        )
    if not any(official_tower_name(k) for k in keys):  # a head's names alone match this library's own too
        ours = any(k.startswith("neck.blocks.") for k in keys)
        raise ValueError(
            "not a microsoft/DynamicHead detector: no DyHead tower (backbone.dyhead_tower.N) among its keys"
            + ("; its names are this library's (a `dyhead train` checkpoint?), which eval and predict read as they are"
               if ours else "")
        )
    backbone = "swin" if any(k.startswith(_BOTTOM_UP + "patch_embed.") for k in keys) else "resnet"
    return architecture, backbone


def _swin_name(m: re.Match) -> str | None:
    try:
        return f"backbone.{official_key_to_torchvision(m[1])}"
    except ValueError:
        return None


def _common_rules(first_fpn_level: int) -> list[_Rule]:
    """(pattern on an official key, our name for a match or None) for the backbone and FPN, tried in order."""
    bottom_up = re.escape(_BOTTOM_UP)
    return [
        (re.compile(bottom_up + r"stem\.conv1\.weight"), lambda m: "backbone.body.conv1.weight"),
        (re.compile(bottom_up + r"stem\.conv1\." + _NORM), lambda m: f"backbone.body.bn1.{m[1]}"),
        (
            re.compile(bottom_up + r"res([2-5])\.(\d+)\.(conv[123]|shortcut)\.weight"),
            lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.{_BLOCK_CONV[m[3]]}.weight",
        ),
        (
            re.compile(bottom_up + r"res([2-5])\.(\d+)\.(conv[123]|shortcut)\." + _NORM),
            lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.{_BLOCK_NORM[m[3]]}.{m[4]}",
        ),
        (re.compile(bottom_up + r"norm([0-3])\.(weight|bias)"), lambda m: f"backbone.norms.c{int(m[1]) + 2}.{m[2]}"),
        (re.compile(bottom_up + r"((patch_embed|layers)\..+)"), _swin_name),
        (
            re.compile(r"backbone\.backbone\.fpn_(lateral|output)(\d)\.(weight|bias)"),
            lambda m: f"fpn.{_FPN_BLOCKS[m[1]]}.{int(m[2]) - first_fpn_level}.0.{m[3]}",
        ),
        (
            re.compile(r"backbone\.backbone\.top_block\.(p6|p7)\.(weight|bias)"),
            lambda m: f"fpn.extra_blocks.{m[1]}.{m[2]}",
        ),
    ]


_HEAD_RULES: dict[str, list[_Rule]] = {
    "atss": [
        (re.compile(r"head\.(cls_logits|bbox_pred|centerness)\.(weight|bias)"), lambda m: m[0]),
        (re.compile(r"head\.scales\.(\d)\.scale"), lambda m: m[0]),
    ],
    "retinanet": [
        (re.compile(r"head\.(cls_subnet|bbox_subnet)\.(\d+)\.(weight|bias)"), lambda m: m[0]),
        (re.compile(r"head\.cls_score\.(weight|bias)"), lambda m: f"head.cls_logits.{m[1]}"),
        (re.compile(r"head\.bbox_pred\.(weight|bias)"), lambda m: m[0]),
    ],
    "faster_rcnn": [
        (
            re.compile(r"proposal_generator\.rpn_head\.(conv|objectness_logits|anchor_deltas)\.(weight|bias)"),
            lambda m: f"rpn.head.{_RPN_HEAD[m[1]]}.{m[2]}",
        ),
        (
            re.compile(r"roi_heads\.box_head\.fc([12])\.(weight|bias)"),
            lambda m: f"roi_heads.box_head.fc{int(m[1]) + 5}.{m[2]}",
        ),
        (re.compile(r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)"), lambda m: m[0]),
    ],
}
# The configs that describe each release model, for error messages.
RELEASE_CONFIGS = {
    ("atss", "resnet"): "configs/atss_r50_dyhead_1x.yaml",
    ("atss", "swin"): "configs/atss_swint_dyhead_2x_ms.yaml",
    ("retinanet", "resnet"): "configs/retinanet_r50_dyhead_1x.yaml",
    ("faster_rcnn", "resnet"): "configs/faster_rcnn_r50_dyhead_1x.yaml",
}


def _our_layout(name: str, value: Tensor) -> Tensor:
    """A release tensor in the layout of our parameter ``name``: detectron2's box predictor (background class last,
    no background box) as torchvision's, ATSS's (1,) box scales as 0-d; everything else as it is."""
    if name.startswith("roi_heads.box_predictor.cls_score."):
        return torch.cat((value[-1:], value[:-1]))
    if name.startswith("roi_heads.box_predictor.bbox_pred."):
        return torch.cat((value.new_zeros((4, *value.shape[1:])), value))
    if name.startswith("head.scales.") and value.numel() == 1:
        return value.reshape(())
    return value


def _listed(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _our_name(key: str, rules: list[_Rule]) -> str | None:
    if key.startswith("backbone.dyhead_tower."):
        name = official_tower_name(key)
        return None if name is None else f"neck.{name}"
    for pattern, rename in rules:
        if m := pattern.fullmatch(key):
            return rename(m)
    return None


def _unwrap(checkpoint: Mapping) -> dict[str, Tensor]:
    if isinstance(checkpoint.get("model"), Mapping):
        checkpoint = checkpoint["model"]
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def convert_official_detector(
    state_dict: Mapping[str, Tensor], reference: Mapping[str, Tensor] | None = None, architecture: str | None = None
) -> dict[str, Tensor]:
    """Maps one of the release's whole detector state dicts to this project's names.

    Args:
        state_dict: the release's keys (see the module docstring), or a detectron2 checkpoint dict holding them
            under ``model``; a leading ``module.`` (a DDP-wrapped save) is dropped.
        reference: the target model's ``state_dict()``; when given, the result has exactly its keys, in its
            order, and shapes; what a checkpoint cannot hold (recomputed buffers such as Swin's position index,
            training statistics such as RetinaNet's loss normaliser) is taken from it.
        architecture: ``atss``, ``retinanet`` or ``faster_rcnn``; by default read from the keys (:func:`release_kind`).

    Returns:
        ``{our name: tensor}``: ATSS's box scales become 0-d tensors, Faster R-CNN's box predictor gets
        torchvision's background-first layout, everything else is passed through.

    Raises:
        ValueError naming the official keys that have no counterpart in that detector or map to the same name,
        and, against ``reference``, the model's tensors the checkpoint lacks, the converted tensors the model
        lacks, and each shape mismatch with both names and both shapes.
    """
    state_dict = _unwrap(state_dict)
    architecture = architecture or release_kind(state_dict)[0]
    levels = [int(m[1]) for k in state_dict if (m := re.fullmatch(r"backbone\.backbone\.fpn_lateral(\d)\.weight", k))]
    rules = _common_rules(min(levels, default=3)) + _HEAD_RULES[architecture]
    out: dict[str, Tensor] = {}
    source: dict[str, str] = {}
    unmapped, skipped = [], []
    for key, value in state_dict.items():
        if _SKIPPED.fullmatch(key):
            skipped.append(key)
            continue
        name = _our_name(key, rules)
        if name is None:
            unmapped.append(key)
            continue
        if name in source:
            raise ValueError(f"official keys {source[name]!r} and {key!r} both map to {name!r}")
        source[name] = key
        out[name] = _our_layout(name, value)
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} official key(s) have no counterpart in this project's {architecture} + DyHead: "
            f"{_listed([repr(key) for key in unmapped])}"
        )
    if skipped:
        logger.info("skipped %d input settings and recomputed buffers: %s", len(skipped), _listed(skipped, 4))
    if reference is not None:
        for name in reference:
            if name not in out and _MODEL_OWN.fullmatch(name):
                out[name], source[name] = reference[name].clone(), "(the model's own)"
        _check(out, source, reference)
        out = {name: out[name] for name in reference}
    return out


def _check(out: Mapping[str, Tensor], source: Mapping[str, str], reference: Mapping[str, Tensor]) -> None:
    missing = [repr(name) for name in reference if name not in out]
    unexpected = [f"{source[name]!r} -> {name!r}" for name in out if name not in reference]
    shapes = [
        f"{source[name]!r} {tuple(out[name].shape)} -> {name!r} {tuple(reference[name].shape)}"
        for name in out
        if name in reference and out[name].shape != reference[name].shape
    ]
    problems = []
    if missing:
        problems.append(f"the checkpoint has nothing for {len(missing)} of the model's tensors: {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} converted tensors are not in the model: {_listed(unexpected, 6)}")
    if shapes:
        problems.append(f"{len(shapes)} shapes differ (official -> ours): {_listed(shapes, 6)}")
    if problems:
        raise ValueError("; ".join(problems))


def _num_classes(state: Mapping[str, Tensor], architecture: str, cfg: ModelConfig) -> int | None:
    """K of the checkpoint's classifier, or None when it has none."""
    if architecture == "faster_rcnn":
        scores = state.get("roi_heads.box_predictor.cls_score.weight")
        return None if scores is None else scores.shape[0] - 1
    if architecture == "retinanet":
        scores = state.get("head.cls_score.weight")
        anchors = len(cfg.retinanet.anchor_scales) * len(cfg.retinanet.aspect_ratios)
        return None if scores is None else scores.shape[0] // anchors
    scores = state.get("head.cls_logits.weight")
    return None if scores is None else scores.shape[0]


def _check_config(path: str, architecture: str, kind: str, cfg: ModelConfig) -> None:
    config = RELEASE_CONFIGS.get((architecture, kind))
    hint = f" (use {config})" if config else ""
    if cfg.meta_architecture != architecture:
        raise ConfigError(
            f"{path} holds the release's {architecture} with a {kind} backbone; the config describes "
            f"{cfg.meta_architecture}{hint}"
        )
    name = cfg.backbone.name
    # slim, this project's own small backbone, is in no release: its dump of mismatched tensors would name no config
    family = "swin" if name in SWIN_NAMES else "resnet" if name.startswith("resnet") else name
    if family != kind:
        raise ConfigError(
            f"{path} holds the release's {architecture} with a {kind} backbone; the config's backbone is "
            f"{cfg.backbone.name}{hint}"
        )
    if architecture == "faster_rcnn" and cfg.rcnn.box_head != "fc":
        raise ConfigError(
            f"{path} holds the release's Faster R-CNN, whose box head has two fully connected layers; the config "
            f"has model.rcnn.box_head={cfg.rcnn.box_head} (set it to fc)"
        )


def load_official_detector(path: str | os.PathLike, cfg: ModelConfig | None = None) -> ReleaseDetector:
    """Reads one of the release's detector checkpoints and converts it for the detector ``cfg`` describes.

    Args:
        path: a detectron2 checkpoint (``dyhead_r50_atss_fpn_1x.pth``, ``dyhead_r50_retina_fpn_1x.pth``,
            ``dyhead_r50_rcnn_fpn_1x.pth``, ``dyhead_swint_atss_fpn_2x_ms.pth``, a ``model_final.pth``) or a bare
            state dict.
        cfg: the target model (default: ``ModelConfig()``, the paper's ATSS R50): the checkpoint's architecture,
            backbone family and, for Faster R-CNN, the ``fc`` box head. It is built on the CPU with random weights
            (``backbone.weights`` is ignored) and as many classes as the checkpoint's classifier has, unless
            ``cfg.num_classes`` says otherwise; the converted weights must match it exactly.

    Raises:
        FileNotFoundError for a missing file; ConfigError when ``cfg`` describes another detector than the
        checkpoint holds (naming the config that fits); ValueError naming the file when it is not a readable
        checkpoint, not a release detector, or as :func:`convert_official_detector` otherwise.
    """
    path = os.fspath(path)
    cfg = ModelConfig() if cfg is None else cfg
    state = _unwrap(read_checkpoint(path, "official checkpoint"))
    try:
        architecture, kind = release_kind(state)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    _check_config(path, architecture, kind, cfg)
    num_classes = cfg.num_classes or _num_classes(state, architecture, cfg) or 80
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, weights=None))
    reference = build_detector(cfg, num_classes).state_dict()
    try:
        converted = convert_official_detector(state, reference, architecture)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return ReleaseDetector(converted, num_classes, architecture, RELEASE_SETTINGS[kind])
