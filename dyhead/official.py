"""Weights of the official release (microsoft/DynamicHead) and of mmdetection's DyHead, in this module's names.

Official (detectron2) names, per block i under ``...dyhead_tower.{i}.``:
``DyConv.{0,1,2}.conv.{weight,bias}`` (0 reads the coarser level, 1 the same level, 2 the finer one with
stride 2), ``DyConv.{j}.bn.{weight,bias}`` (GroupNorm), ``AttnConv.1.{weight,bias}`` (scale attention),
``relu.fc.{0,2}.{weight,bias}`` (dynamic ReLU MLP), ``offset.{weight,bias}`` (offset/mask conv).

mmdetection names, per block i under ``...dyhead_blocks.{i}.``: ``spatial_conv_{high,mid,low}.conv.weight``
(high = coarser, mid = same, low = finer; no bias), ``spatial_conv_{...}.norm.*``, ``spatial_conv_offset.*``,
``scale_attn_module.1.*``, ``task_attn_module.conv{1,2}.conv.*`` (1x1 convs in place of linear layers).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

_OFFICIAL_BLOCK = re.compile(r"(?:^|\.)dyhead_tower\.(\d+)\.(.+)$")
_MMDET_BLOCK = re.compile(r"(?:^|\.)dyhead_blocks\.(\d+)\.(.+)$")

# torch.save writes a zip archive, or with _use_new_zipfile_serialization=False a pickle (protocol 2 or later)
_CHECKPOINT_MAGICS = (b"PK\x03\x04", b"\x80")
_ROLES = ("coarser", "same", "finer")
_PARAMS = ("weight", "bias")


def _name_table(branch: dict[str, str], norms: dict[str, str], others: dict[str, str]) -> dict[str, str]:
    """{source suffix inside a block: our name inside a block}, expanded over branches, norms and params."""
    table = {}
    for src_branch, role in branch.items():
        for src_norm, ours in norms.items():
            for p in _PARAMS:
                table[f"{src_branch}.{src_norm}.{p}"] = f"spatial.{role}.{ours}.{p}"
    for src, ours in others.items():
        for p in _PARAMS:
            table[f"{src}.{p}"] = f"{ours}.{p}"
    return table


_OFFICIAL_NAMES = _name_table(
    {f"DyConv.{j}": role for j, role in enumerate(_ROLES)},
    {"conv": "conv", "bn": "norm"},
    {"AttnConv.1": "scale.conv", "relu.fc.0": "task.fc1", "relu.fc.2": "task.fc2", "offset": "spatial.offset"},
)
_MMDET_NAMES = _name_table(
    {f"spatial_conv_{src}": role for src, role in zip(("high", "mid", "low"), _ROLES)},
    {"conv": "conv", "norm": "norm"},
    {"spatial_conv_offset": "spatial.offset", "scale_attn_module.1": "scale.conv",
     "task_attn_module.conv1.conv": "task.fc1", "task_attn_module.conv2.conv": "task.fc2"},
)


def _unwrap(checkpoint: Mapping) -> Mapping:
    for key in ("model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return checkpoint[key]
    return checkpoint


def official_tower_name(key: str) -> str | None:
    """:class:`dyhead.DyHead`'s name ``blocks.{i}.<name>`` for an official key ``...dyhead_tower.{i}.<suffix>``;
    None when ``key`` is not a DyHead tower weight of the release."""
    m = _OFFICIAL_BLOCK.search(key)
    name = _OFFICIAL_NAMES.get(m[2]) if m else None
    return None if name is None else f"blocks.{m[1]}.{name}"


def read_checkpoint(path: str | os.PathLike, kind: str = "DyHead checkpoint") -> Mapping:
    """A checkpoint file's dict, read on the CPU with ``torch.load(weights_only=True)``.

    FileNotFoundError naming ``kind`` and the path for a missing file; ValueError naming the file when it is not
    a readable checkpoint or does not hold a dict.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{kind} {path} is a folder, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load reports a bad file through many types (pickle, zip, key errors)
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {_load_failure(path, exc)}") from exc
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict or checkpoint dict")
    return checkpoint


def _load_failure(path: str, exc: Exception) -> str:
    """What went wrong reading ``path``: the file's kind when it is not one torch.load reads (its own error, such as
    "KeyError: 101" for a text file, says nothing), else the sentence of the error that does, with its type."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return "the file is empty"
    if not head.startswith(_CHECKPOINT_MAGICS):
        return f"it is neither a zip archive nor a pickle, as torch.save writes (it starts with {head!r})"
    text, marker = str(exc), "WeightsUnpickler error:"
    if marker in text:  # what weights_only refused, after a paragraph on loading with weights_only=False
        text = text.split(marker, 1)[1]
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {line.split('. ', 1)[0]}" if line else type(exc).__name__


def convert_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map an official or mmdetection DyHead state dict to :class:`dyhead.DyHead`'s names.

    state_dict: the DyHead's own weights, a whole detector's (keys outside DyHead are left out and logged at
    INFO level), or a checkpoint dict with a ``model`` (detectron2) or ``state_dict`` (mmdetection) entry.
    mmdetection's deformable convs have no bias: a zero bias is added for each (logged as a warning) and its
    1x1 task-attention convs become linear weights. Returns {"blocks.{i}.<name>": tensor}; empty when nothing
    matched.
    """
    state_dict = _unwrap(state_dict)
    out: dict[str, Tensor] = {}
    left_out: list[str] = []
    zero_bias: list[str] = []
    for key, value in state_dict.items():
        name = None
        if _OFFICIAL_BLOCK.search(key):
            name = official_tower_name(key)
        elif m := _MMDET_BLOCK.search(key):
            suffix = _MMDET_NAMES.get(m[2])
            if suffix is not None:
                name = f"blocks.{m[1]}.{suffix}"
                if suffix.startswith("task.fc") and suffix.endswith("weight"):
                    value = value.flatten(1)
                if suffix.startswith("spatial.") and suffix.endswith(".conv.weight"):
                    bias_name = name[: -len("weight")] + "bias"
                    zero_bias.append(bias_name)
                    out[bias_name] = torch.zeros(value.shape[0], dtype=value.dtype)
        if name is None:
            left_out.append(key)
            continue
        out[name] = value
    if left_out:
        logger.info("convert_state_dict: left out %d keys that are not DyHead's: %s", len(left_out), left_out)
    if zero_bias:
        logger.warning("convert_state_dict: mmdetection's deformable convs have no bias; zero bias for %s", zero_bias)
    return out


def load_official(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a checkpoint file (official, detectron2 or mmdetection) and return :func:`convert_state_dict` of it.

    Loads with ``torch.load(weights_only=True)``. FileNotFoundError for a missing file; ValueError naming the file
    when it is not a readable checkpoint or holds no DyHead keys.
    """
    converted = convert_state_dict(read_checkpoint(path))
    if not converted:
        raise ValueError(
            f"{path} has no DyHead weights: expected keys like 'backbone.dyhead_tower.0.DyConv.1.conv.weight' "
            "(official) or 'neck.1.dyhead_blocks.0.spatial_conv_mid.conv.weight' (mmdetection)"
        )
    return converted
