"""The release's whole ATSS + DyHead checkpoints (microsoft/DynamicHead) in :class:`detectors.atss.ATSS`'s names.

The release builds ATSS (``extra/atss.py``) on ``build_retinanet_resnet_fpn_dyhead_backbone``
(``extra/resnet.py``): a DyHead (``dyhead/dyhead.py``) that holds detectron2's FPN as ``backbone``, which holds
the ResNet as ``bottom_up``. Its state dict (``model`` entry of a detectron2 checkpoint) therefore reads::

    backbone.backbone.bottom_up.stem.conv1.{weight, norm.*}          -> backbone.body.conv1 / bn1
    backbone.backbone.bottom_up.res{s}.{b}.conv{j}.{weight, norm.*}  -> backbone.body.layer{s-1}.{b}.conv{j} / bn{j}
    backbone.backbone.bottom_up.res{s}.{b}.shortcut.{weight, norm.*} -> backbone.body.layer{s-1}.{b}.downsample.0 / .1
    backbone.backbone.fpn_lateral{k}.{weight, bias}                  -> fpn.inner_blocks.{k - k_min}.0
    backbone.backbone.fpn_output{k}.{weight, bias}                   -> fpn.layer_blocks.{k - k_min}.0
    backbone.backbone.top_block.p{6,7}.{weight, bias}                -> fpn.extra_blocks.p{6,7}
    backbone.dyhead_tower.{i}.*                                      -> neck.blocks.{i}.* (see dyhead.official)
    head.{cls_logits, bbox_pred, centerness}.{weight, bias}          -> head.* (1x1 convs, one anchor per location)
    head.scales.{l}.scale, shape (1,)                                -> head.scales.{l}.scale, shape ()

``norm.*`` are detectron2's FrozenBN buffers ``weight``, ``bias``, ``running_mean``, ``running_var``, the same four
as torchvision's ``FrozenBatchNorm2d``. ``k_min`` is the finest FPN input (3 for ATSS: P3-P5 from res3-res5, P6
and P7 from P5 with 256 input channels, as ``LastLevelP6P7(256, 256, "p5")`` there and torchvision's
``LastLevelP6P7(256, 256)`` here). ``pixel_mean``/``pixel_std`` and anchor buffers, which older detectron2
versions saved, are input settings rather than weights and are skipped.

The weights alone do not reproduce the release: it kept detectron2's defaults for the MSRA R50, which
:data:`RELEASE_SETTINGS` lists as config overrides.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from typing import Any, Callable

from torch import Tensor

from dyhead.official import official_tower_name, read_checkpoint

from .build import build_detector
from .config import ConfigError, ModelConfig

__all__ = ["RELEASE_SETTINGS", "convert_official_detector", "load_official_detector"]

logger = logging.getLogger(__name__)

# The settings the release's R50 ATSS was trained and evaluated with that differ from this project's defaults
# (detectron2's config defaults, kept by configs/dyhead_r50_atss_fpn_1x.yaml): stride in the 1x1 conv
# (MODEL.RESNETS.STRIDE_IN_1X1), BGR pixels in [0, 255] minus the caffe means (INPUT.FORMAT, MODEL.PIXEL_MEAN,
# MODEL.PIXEL_STD), and the release's reading of the coarser branch's offsets.
RELEASE_SETTINGS: dict[str, Any] = {
    "model.backbone.stride_in_1x1": True,
    "model.dyhead_high_offsets": "official",
    "data.input.format": "BGR255",
    "data.input.pixel_mean": [103.53, 116.28, 123.675],
    "data.input.pixel_std": [1.0, 1.0, 1.0],
}

_RESNET = r"backbone\.backbone\.bottom_up\."
_NORM = r"norm\.(weight|bias|running_mean|running_var)"
_BLOCK_CONV = {"conv1": "conv1", "conv2": "conv2", "conv3": "conv3", "shortcut": "downsample.0"}
_BLOCK_NORM = {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3", "shortcut": "downsample.1"}
_FPN_BLOCKS = {"lateral": "inner_blocks", "output": "layer_blocks"}
# Input settings and anchors that some detectron2 versions saved with the weights; ours come from the config.
_SKIPPED = re.compile(r"pixel_mean|pixel_std|anchor_generator\.cell_anchors\.\d+")


def _rules(first_fpn_level: int) -> list[tuple[re.Pattern, Callable[[re.Match], str]]]:
    """(pattern on an official key, our name for a match), tried in order."""
    return [
        (re.compile(_RESNET + r"stem\.conv1\.weight"), lambda m: "backbone.body.conv1.weight"),
        (re.compile(_RESNET + r"stem\.conv1\." + _NORM), lambda m: f"backbone.body.bn1.{m[1]}"),
        (
            re.compile(_RESNET + r"res([2-5])\.(\d+)\.(conv[123]|shortcut)\.weight"),
            lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.{_BLOCK_CONV[m[3]]}.weight",
        ),
        (
            re.compile(_RESNET + r"res([2-5])\.(\d+)\.(conv[123]|shortcut)\." + _NORM),
            lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.{_BLOCK_NORM[m[3]]}.{m[4]}",
        ),
        (
            re.compile(r"backbone\.backbone\.fpn_(lateral|output)(\d)\.(weight|bias)"),
            lambda m: f"fpn.{_FPN_BLOCKS[m[1]]}.{int(m[2]) - first_fpn_level}.0.{m[3]}",
        ),
        (
            re.compile(r"backbone\.backbone\.top_block\.(p6|p7)\.(weight|bias)"),
            lambda m: f"fpn.extra_blocks.{m[1]}.{m[2]}",
        ),
        (re.compile(r"head\.(cls_logits|bbox_pred|centerness)\.(weight|bias)"), lambda m: m[0]),
        (re.compile(r"head\.scales\.(\d)\.scale"), lambda m: m[0]),
    ]


def _listed(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _our_name(key: str, rules) -> str | None:
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
    state_dict: Mapping[str, Tensor], reference: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Maps the release's whole ATSS + DyHead state dict to :class:`detectors.atss.ATSS`'s names.

    Args:
        state_dict: the release's keys (see the module docstring), or a detectron2 checkpoint dict holding them
            under ``model``; a leading ``module.`` (a DDP-wrapped save) is dropped.
        reference: the target model's ``state_dict()``; when given, the result must have exactly its keys and
            shapes.

    Returns:
        ``{our name: tensor}``; the box scales become 0-d tensors, everything else is passed through.

    Raises:
        ValueError naming the official keys that have no counterpart here (e.g. a RetinaNet or Swin checkpoint)
        or map to the same name, and, against ``reference``, the model's tensors the checkpoint lacks, the
        converted tensors the model lacks, and each shape mismatch with both names and both shapes.
    """
    state_dict = _unwrap(state_dict)
    levels = [int(m[1]) for k in state_dict if (m := re.fullmatch(r"backbone\.backbone\.fpn_lateral(\d)\.weight", k))]
    rules = _rules(min(levels, default=3))
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
        out[name] = value.reshape(()) if name.startswith("head.scales.") and value.numel() == 1 else value
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} official key(s) have no counterpart in this project's ATSS + DyHead (not a ResNet "
            f"ATSS + DyHead checkpoint of microsoft/DynamicHead, e.g. its RetinaNet or Swin-T?): "
            f"{_listed([repr(key) for key in unmapped])}"
        )
    if skipped:
        logger.info("skipped %d input-setting buffers (set in the config instead): %s", len(skipped), skipped)
    if reference is not None:
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


def load_official_detector(
    path: str | os.PathLike, cfg: ModelConfig | None = None
) -> tuple[dict[str, Tensor], int]:
    """Reads the release's ATSS + DyHead checkpoint and converts it for the detector ``cfg`` describes.

    Args:
        path: a detectron2 checkpoint (``model_final.pth``, ``dyhead_r50_atss_fpn_1x.pth``) or a bare state dict.
        cfg: the target model (default: ``ModelConfig()``, the paper's ATSS R50). It is built on the CPU with
            random weights (``backbone.weights`` is ignored) and as many classes as the checkpoint's classifier
            has, unless ``cfg.num_classes`` says otherwise; the converted weights must match it exactly.

    Returns:
        The state dict in the model's key order, and the class count.

    Raises:
        FileNotFoundError for a missing file; ConfigError when ``cfg`` is not an ATSS; ValueError naming the
        file when it is not a readable checkpoint, and as :func:`convert_official_detector` otherwise.
    """
    path = os.fspath(path)
    cfg = ModelConfig() if cfg is None else cfg
    if cfg.meta_architecture != "atss":
        raise ConfigError(
            f"the release's detector checkpoints convert to ATSS; the config describes {cfg.meta_architecture}"
        )
    checkpoint = read_checkpoint(path, "official checkpoint")
    classifier = _unwrap(checkpoint).get("head.cls_logits.weight")
    num_classes = cfg.num_classes or (classifier.shape[0] if classifier is not None else 80)
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, weights=None))
    reference = build_detector(cfg, num_classes).state_dict()
    try:
        return convert_official_detector(checkpoint, reference), num_classes
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
