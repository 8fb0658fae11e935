"""The checks every detector's ``forward`` makes of its arguments, so that a bad call ends in one error naming the
argument and the image, as torchvision's detection models do, rather than in an index error deep in a loss, or in
losses computed from a label of -1 (the last class) or a box with x2 < x1."""

from __future__ import annotations

import bisect
import itertools
import operator
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["check_detector_inputs"]


def check_detector_inputs(
    images: Tensor,
    image_sizes: Sequence[tuple[int, int]],
    targets: Sequence[Mapping[str, Tensor]] | None,
    original_sizes: Sequence[tuple[int, int]] | None,
    num_classes: int,
    training: bool,
) -> None:
    """Raises TypeError (a wrong type or dtype) or ValueError (a wrong shape, length or value) naming the argument
    and the image at fault.

    ``images`` one ``(N, 3, H, W)`` floating tensor; ``image_sizes`` (and ``original_sizes`` when given) N pairs
    of positive ints, ``image_sizes`` within ``(H, W)``. In training ``targets`` is required: N mappings with
    ``boxes`` ``(G, 4)`` floating, finite x1,y1,x2,y2 with x2 > x1 and y2 > y1 (what torchvision requires),
    ``labels`` ``(G,)`` int64 in ``[0, num_classes)`` (every detector here numbers classes from 0, with no
    background class), optionally ``iscrowd`` ``(G,)``, on the images' device; other keys are left alone. In eval
    ``targets`` is not read. The values are checked for the whole batch at once: one host sync per call, which the
    engine's copy of the batch to the device makes anyway.
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images: expected one (N, 3, H, W) float tensor of the padded batch, got a "
                        f"{type(images).__name__} (detectors.data.transforms.pad_batch stacks a list of images)")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected shape (N, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images: expected a floating dtype (normalised pixels), got {images.dtype}")
    n, height, width = images.shape[0], images.shape[2], images.shape[3]
    _check_sizes("image_sizes", image_sizes, n, (height, width))
    if original_sizes is not None:
        _check_sizes("original_sizes", original_sizes, n, None)
    if not training:
        return
    if targets is None:
        raise ValueError("targets are required in training mode")
    if isinstance(targets, Mapping) or not isinstance(targets, Sequence):
        raise TypeError(f"targets: expected a list of one dict per image, got a {type(targets).__name__}")
    if len(targets) != n:
        raise ValueError(f"targets: {len(targets)} dicts for a batch of {n} images")
    for i, target in enumerate(targets):
        _check_target_shapes(i, target, images.device)
    if n == 0:
        return
    boxes = torch.cat([t["boxes"] for t in targets])
    labels = torch.cat([t["labels"] for t in targets])
    # NaN compares false, so a NaN coordinate fails x2 > x1 or y2 > y1; an infinite one may not
    bad_box = ~(boxes.isfinite().all(1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
    bad_label = (labels < 0) | (labels >= num_classes)
    bad = bad_box | bad_label
    if not bool(bad.any()):
        return
    flat = int(torch.nonzero(bad)[0, 0])
    ends = list(itertools.accumulate(len(t["labels"]) for t in targets))
    i = bisect.bisect_right(ends, flat)
    j = flat - (ends[i - 1] if i else 0)
    if bool(bad_box[flat]):
        box = [round(float(v), 2) for v in targets[i]["boxes"][j]]
        raise ValueError(f"targets[{i}]['boxes'][{j}]: {box} is not a box x1,y1,x2,y2 with finite coordinates, "
                         "x2 > x1 and y2 > y1")
    raise ValueError(f"targets[{i}]['labels'][{j}]: {int(labels[flat])} is not a class index in "
                     f"[0, {num_classes}) (labels number the object classes from 0, with no background class)")


def _check_sizes(name: str, sizes: Sequence[tuple[int, int]], n: int, bound: tuple[int, int] | None) -> None:
    """``sizes`` holds N pairs ``(h, w)`` of positive ints, each within ``bound`` when given."""
    # a list of pairs as the data path gives, or any sized container of them: an (N, 2) int tensor or array
    if not hasattr(sizes, "__len__"):
        raise TypeError(f"{name}: expected a list of one (h, w) per image, got a {type(sizes).__name__}")
    if len(sizes) != n:
        raise ValueError(f"{name}: {len(sizes)} sizes for a batch of {n} images")
    for i, size in enumerate(sizes):
        try:
            h, w = (operator.index(v) for v in size)
        except (TypeError, ValueError):
            raise TypeError(f"{name}[{i}]: expected a pair (h, w) of ints, got {size!r}") from None
        if h <= 0 or w <= 0 or (bound is not None and (h > bound[0] or w > bound[1])):
            within = f" within the padded images' {bound[0]}x{bound[1]}" if bound is not None else ""
            raise ValueError(f"{name}[{i}]: expected a positive (h, w){within}, got ({h}, {w})")


def _check_target_shapes(i: int, target: Mapping[str, Tensor], device: torch.device) -> None:
    """One image's target has ``boxes`` ``(G, 4)`` floating, ``labels`` ``(G,)`` int64 and, if any, ``iscrowd``
    ``(G,)``, all on ``device``."""
    if not isinstance(target, Mapping):
        raise TypeError(f"targets[{i}]: expected a dict with 'boxes' and 'labels', got a {type(target).__name__}")
    for key in ("boxes", "labels"):
        if key not in target:
            raise ValueError(f"targets[{i}]: no {key!r} (expected 'boxes' and 'labels', got {sorted(target)})")
    fields = {key: target[key] for key in ("boxes", "labels", "iscrowd") if key in target}
    for key, value in fields.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"targets[{i}][{key!r}]: expected a tensor, got a {type(value).__name__}")
        if value.device != device:
            raise ValueError(f"targets[{i}][{key!r}]: on {value.device}, the images on {device}")
    boxes, labels = fields["boxes"], fields["labels"]
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"targets[{i}]['boxes']: expected shape (G, 4), got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"targets[{i}]['boxes']: expected a floating dtype, got {boxes.dtype}")
    if labels.dtype != torch.int64:
        raise TypeError(f"targets[{i}]['labels']: expected int64 class indices, got {labels.dtype}")
    for key, value in fields.items():
        if key != "boxes" and value.shape != (boxes.shape[0],):
            raise ValueError(f"targets[{i}][{key!r}]: expected shape ({boxes.shape[0]},), one per box, got "
                             f"{tuple(value.shape)}")
