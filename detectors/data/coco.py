"""COCO-format detection datasets read through pycocotools, with clear errors on bad data."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from ..config import DatasetConfig, ShapesConfig
from .shapes import ensure_shapes
from .transforms import DetectionTransform, pad_batch

__all__ = [
    "DatasetError",
    "ImageLoadError",
    "SkippedImage",
    "resolve_dataset",
    "load_coco_json",
    "read_rgb_image",
    "CocoDetection",
    "Targets",
    "collate",
]

logger = logging.getLogger(__name__)

COCO_LAYOUT = """expected layout under $DYHEAD_DATASETS (default ./datasets):
  coco/annotations/instances_train2017.json
  coco/annotations/instances_val2017.json
  coco/train2017/*.jpg
  coco/val2017/*.jpg"""


class DatasetError(RuntimeError):
    """A dataset folder or annotation file is missing or malformed."""


class ImageLoadError(RuntimeError):
    """An image file is missing or cannot be decoded."""


@dataclass
class SkippedImage:
    """Stands in for a sample whose image could not be read, when skipping bad images is enabled."""

    path: str
    reason: str
    image_id: Any = None


def _datasets_root() -> Path:
    return Path(os.environ.get("DYHEAD_DATASETS", "datasets"))


def resolve_dataset(spec: DatasetConfig, shapes: ShapesConfig) -> tuple[Path, Path]:
    """The images folder and annotation file of a dataset spec, checked to exist.

    ``coco_2017_{train,val}`` resolve under ``$DYHEAD_DATASETS``; ``shapes_{train,val}`` are generated on
    first use; any other name needs ``image_dir`` and ``ann_file``. Explicit paths always win (the shapes set
    takes both or neither).
    """
    layout = ""
    if spec.name in ("coco_2017_train", "coco_2017_val"):
        split = spec.name.split("_")[-1]
        root = _datasets_root() / "coco"
        image_dir = Path(spec.image_dir or root / f"{split}2017")
        ann_file = Path(spec.ann_file or root / "annotations" / f"instances_{split}2017.json")
        layout = "\n" + COCO_LAYOUT
    elif spec.name in ("shapes_train", "shapes_val") and not (spec.image_dir and spec.ann_file):
        if spec.image_dir or spec.ann_file:  # the generated files are each other's: one path alone cannot win
            given = "ann_file" if spec.ann_file else "image_dir"
            raise DatasetError(f"dataset {spec.name!r} is given only its {given}; give both image_dir and ann_file, or "
                               "neither for the generated shapes set")
        folder = ensure_shapes(shapes)
        split = spec.name.split("_")[-1]
        image_dir, ann_file = folder / split, folder / "annotations" / f"instances_{split}.json"
    else:
        if not spec.image_dir or not spec.ann_file:
            raise DatasetError(
                f"dataset {spec.name!r} is not a named dataset (coco_2017_train, coco_2017_val, shapes_train, "
                "shapes_val); give its images folder and COCO annotation file as image_dir and ann_file"
            )
        image_dir, ann_file = Path(spec.image_dir), Path(spec.ann_file)
    if not image_dir.is_dir():
        problem = "is not a folder" if image_dir.exists() else "does not exist"
        raise DatasetError(f"dataset {spec.name!r}: images folder {image_dir} {problem}{layout}")
    if not ann_file.is_file():
        problem = "is not a file" if ann_file.exists() else "does not exist"
        raise DatasetError(f"dataset {spec.name!r}: annotation file {ann_file} {problem}{layout}")
    return image_dir, ann_file


_REQUIRED = {
    "images": ("id", "file_name"),
    "annotations": ("image_id", "bbox", "category_id"),
    "categories": ("id", "name"),
}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


def _is_id(v: Any) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def _is_size(v: Any) -> bool:
    return v is None or (_is_number(v) and v > 0 and v == int(v))


# What a field must hold where an entry gives it; pycocotools and COCOeval take any JSON value and fail late (after
# training, at the final evaluation) or read it wrongly: "0" as iscrowd is truthy, a NaN area counts in every size
# range, a string annotation id is stored in COCOeval's float array of matched ids.
_FIELDS = {
    "images": {"id": (_is_id, "an integer or a string"),
               "file_name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
               "width": (_is_size, "a positive whole number (or null: the file's)"),
               "height": (_is_size, "a positive whole number (or null: the file's)")},
    "categories": {"id": (_is_id, "an integer or a string")},
    "annotations": {"id": (lambda v: _is_id(v) and not isinstance(v, str), "an integer"),
                    "image_id": (_is_id, "an integer or a string"),
                    "category_id": (_is_id, "an integer or a string"),
                    "iscrowd": (lambda v: not isinstance(v, str) and v in (0, 1), "0 or 1"),
                    "area": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0")},
}


def load_coco_json(ann_file: Path) -> COCO:
    """Reads and checks a COCO annotation file; errors name the file and what is wrong with it."""
    try:
        data = json.loads(Path(ann_file).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"annotation file {ann_file} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"annotation file {ann_file} is not COCO JSON: the top level is not an object")
    for section, keys in _REQUIRED.items():
        if not isinstance(data.get(section), list):
            raise DatasetError(f"annotation file {ann_file} is not COCO JSON: it has no '{section}' list")
        for i, entry in enumerate(data[section]):
            missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
            if missing:
                raise DatasetError(
                    f"annotation file {ann_file} is not COCO JSON: {section}[{i}] lacks {', '.join(missing)}"
                )
    for section, fields in _FIELDS.items():
        for i, entry in enumerate(data[section]):
            for key, (valid, expected) in fields.items():
                if key in entry and not valid(entry[key]):
                    raise DatasetError(
                        f"annotation file {ann_file}: {section}[{i}] has {key} {entry[key]!r}, not {expected}"
                    )
    _check_ids(ann_file, data)
    _fill_eval_fields(ann_file, data["annotations"])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _check_ids(ann_file: Path, data: dict) -> None:
    """Ids must be unique: pycocotools' index keeps the last entry of a repeated one and drops the others. Image
    and category ids are all integers or all strings: both are sorted, and Python cannot order the two."""
    for section in ("images", "categories", "annotations"):
        seen, first = set(), None
        for i, entry in enumerate(data[section]):
            if "id" not in entry:
                continue
            if entry["id"] in seen:
                raise DatasetError(f"annotation file {ann_file}: {section}[{i}] repeats id {entry['id']!r}")
            if first is None:
                first = i
            elif type(entry["id"]) is not type(data[section][first]["id"]):
                raise DatasetError(f"annotation file {ann_file}: {section}[{i}] has id {entry['id']!r} and "
                                   f"{section}[{first}] {data[section][first]['id']!r}: the ids are all integers "
                                   "or all strings")
            seen.add(entry["id"])


def _fill_eval_fields(ann_file: Path, annotations: list[dict]) -> None:
    """Gives annotations the fields COCOeval reads but hand-made files often lack: ``iscrowd`` 0, ``area``
    from the box, and unused ``id`` s."""
    filled = {"iscrowd": 0, "area": 0, "id": 0}
    next_id = 1 + max((a["id"] for a in annotations if isinstance(a.get("id"), int)), default=0)
    for ann in annotations:
        if "iscrowd" not in ann:
            ann["iscrowd"], filled["iscrowd"] = 0, filled["iscrowd"] + 1
        if "area" not in ann:
            box = ann["bbox"]
            ann["area"] = box[2] * box[3] if _is_box(box) else 0.0
            filled["area"] += 1
        if "id" not in ann:
            ann["id"], next_id, filled["id"] = next_id, next_id + 1, filled["id"] + 1
    if any(filled.values()):
        logger.info("%s: filled in %s", ann_file,
                    ", ".join(f"{field} of {n} annotations" for field, n in filled.items() if n))


def _is_box(box: Any) -> bool:
    """Whether box is [x, y, width, height] of finite numbers."""
    return isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) for v in box)


def _box_and_label(ann_file: Path, ann: dict, label_of: dict[Any, int]) -> tuple[list[float], int]:
    """An annotation's (x, y, width, height) and contiguous label; DatasetError naming it when either is bad."""
    where = f"annotation file {ann_file}: annotation {ann['id']!r} (image {ann['image_id']!r})"
    if not _is_box(ann["bbox"]):
        raise DatasetError(f"{where} has bbox {ann['bbox']!r}, not [x, y, width, height] of finite numbers")
    if ann["category_id"] not in label_of:
        raise DatasetError(f"{where} has category_id {ann['category_id']!r}, which 'categories' does not list")
    return ann["bbox"], label_of[ann["category_id"]]


class CocoDetection(Dataset):
    """A COCO-format detection dataset.

    Boxes are converted to x1,y1,x2,y2 and clipped to the image; boxes with no area after clipping are
    dropped and counted (``num_degenerate``); one that float32 rounding closes (narrower than about 1e-4 pixel) is
    dropped from the item. Category ids map to contiguous labels ``0..K-1`` in id order.

    Items are addressed by an index or, in training, by ``(index, seed)`` where ``seed`` is a tuple of ints
    seeding the random augmentation, so that results depend on neither worker count nor resumption.

    Args:
        image_dir: folder of the images named by ``file_name``.
        ann_file: COCO JSON annotation file.
        transform: resize/flip/normalise.
        remove_empty: drop images without any non-crowd box (training).
        skip_bad_images: return a ``SkippedImage`` for unreadable images instead of raising.

    An item is ``(image, target)``: image ``(3, h, w)`` float32; target ``boxes`` ``(G, 4)`` float32 in the
    transformed image's pixels, ``labels`` ``(G,)`` int64, ``iscrowd`` ``(G,)`` bool, ``image_id`` int,
    ``orig_size`` and ``size`` ``(h, w)``.
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        transform: DetectionTransform,
        remove_empty: bool = False,
        skip_bad_images: bool = False,
    ):
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.coco = load_coco_json(self.ann_file)
        if not self.coco.imgs:  # a test split of none scored -1 everywhere, as if nothing were wrong
            raise DatasetError(f"annotation file {self.ann_file} lists no images")
        self.category_ids = sorted(self.coco.getCatIds())
        self.class_names = [self.coco.cats[c]["name"] for c in self.category_ids]
        label_of = {cat: i for i, cat in enumerate(self.category_ids)}
        self.num_degenerate = 0
        self.records: list[dict[str, Any]] = []
        sized_from_files = 0
        for image_id in sorted(self.coco.imgs):
            info = self.coco.imgs[image_id]
            width, height = info.get("width"), info.get("height")
            if width is None or height is None:  # boxes are clipped and images grouped by the size
                size = _upright_size(self.image_dir / info["file_name"])
                if size is not None:
                    (width, height), sized_from_files = size, sized_from_files + 1
            boxes, labels, crowd = [], [], []
            for ann in self.coco.imgToAnns.get(image_id, []):
                (x, y, w, h), label = _box_and_label(self.ann_file, ann, label_of)
                x1, y1 = max(0.0, x), max(0.0, y)
                x2 = x + w if width is None else min(x + w, width)
                y2 = y + h if height is None else min(y + h, height)
                if x2 <= x1 or y2 <= y1:
                    self.num_degenerate += 1
                    continue
                boxes.append([x1, y1, x2, y2])
                labels.append(label)
                crowd.append(bool(ann.get("iscrowd", 0)))
            if remove_empty and not any(not c for c in crowd):
                continue
            self.records.append(
                {
                    "image_id": image_id,
                    "file_name": info["file_name"],
                    "width": width,
                    "height": height,
                    "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                    "labels": np.asarray(labels, dtype=np.int64),
                    "iscrowd": np.asarray(crowd, dtype=bool),
                }
            )
        if sized_from_files:
            logger.info("%s: read the sizes of %d images from their files (their entries give none)", self.ann_file,
                        sized_from_files)
        if self.num_degenerate:
            logger.warning("%s: dropped %d degenerate boxes (no area)", self.ann_file, self.num_degenerate)
        if remove_empty and not self.records:
            raise DatasetError(
                f"{self.ann_file}: none of its {len(self.coco.imgs)} images has a box to train on (non-crowd, with "
                f"an area: {self.num_degenerate} degenerate boxes were dropped)"
            )
        orphans = sum(len(anns) for image_id, anns in self.coco.imgToAnns.items() if image_id not in self.coco.imgs)
        if orphans:
            logger.warning("%s: ignored %d annotations whose image_id is not in 'images'", self.ann_file, orphans)

    def __len__(self) -> int:
        return len(self.records)

    def aspect_groups(self) -> list[int]:
        """Per image, 0 for landscape (w >= h) and 1 for portrait, from the annotation file's sizes."""
        return [int((r["height"] or 0) > (r["width"] or 0)) for r in self.records]

    def __getitem__(self, key: int | tuple[int, tuple[int, ...]]) -> tuple[torch.Tensor, dict] | SkippedImage:
        index, seed = (key, None) if isinstance(key, int) else key
        record = self.records[index]
        path = self.image_dir / record["file_name"]
        try:
            image = read_rgb_image(path, record["width"], record["height"])
        except (OSError, ValueError) as exc:
            if isinstance(exc, FileNotFoundError):
                reason = "file not found"
            elif isinstance(exc, (_SizeMismatch, _UnsupportedDepth)):
                reason = str(exc)
            else:
                reason = f"cannot decode ({exc})"
            if self.skip_bad_images:
                return SkippedImage(str(path), reason, record["image_id"])
            raise ImageLoadError(f"image {path}: {reason}") from None
        rng = None if seed is None else np.random.default_rng(list(seed))
        orig_size = (image.height, image.width)
        pixels, boxes = self.transform(image, torch.from_numpy(record["boxes"]), rng)
        # A box narrower than float32's step at its coordinates (about 1e-4 pixel at 1000), kept in float64, closes
        # in float32, the resize or the flip, and the detectors refuse boxes without area (detectron2's mapper drops
        # them after its transforms too).
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {
            "boxes": boxes[keep],
            "labels": torch.from_numpy(record["labels"])[keep],
            "iscrowd": torch.from_numpy(record["iscrowd"])[keep],
            "image_id": record["image_id"],
            "orig_size": orig_size,
            "size": tuple(pixels.shape[1:]),
        }
        return pixels, target


class _SizeMismatch(ValueError):
    """An image's pixels are not the size its annotation entry gives."""


class _UnsupportedDepth(ValueError):
    """An image's pixels have no 8-bit reading: floats, or integers beyond 16 bits."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """image as 8-bit RGB. 16-bit gray keeps the high byte of each value (value >> 8), the byte that OpenCV's
    IMREAD_COLOR (mmdetection's reader) keeps of any 16-bit PNG and Pillow of a colour one, in all three
    channels; 32-bit integers (mode "I") are read so when they fit in 16 bits. Pillow's own conversion clips
    both at 255: white. Raises _UnsupportedDepth for floats (mode "F") and integers beyond 16 bits, which have
    no standard 8-bit reading."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 0xFFFF):
            raise _UnsupportedDepth(f"its pixels are 32-bit integers from {values.min()} to {values.max()}, "
                                    "beyond the 16 bits that have an 8-bit reading")
        return Image.fromarray((values >> 8).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        raise _UnsupportedDepth("its pixels are floating point (mode F), which have no standard 8-bit reading; "
                                "save it with 8 or 16 bits per channel")
    return image.convert("RGB")


def _quarter_turn(img: Image.Image) -> int | None:
    """The EXIF orientation of img where it turns the image a quarter (5 to 8: width and height swap upright)."""
    orientation = img.getexif().get(0x0112, 1)
    return orientation if orientation in (5, 6, 7, 8) else None


def _upright_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of the image at path as `read_rgb_image` reads it (EXIF orientations 5 to 8 turn it a
    quarter), from its header alone; None when it cannot be opened (reading it later reports why)."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            turned = _quarter_turn(img)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return (height, width) if turned else (width, height)


def read_rgb_image(path: Path, width: int | None = None, height: int | None = None) -> Image.Image:
    """The image at path as 8-bit RGB (`_to_rgb`), turned upright by its EXIF orientation (as detectron2 and
    mmdetection read images), checked against an annotation's width and height where given (boxes are in that
    size's pixels). Raises OSError (FileNotFoundError when missing) or ValueError when it cannot be read, has
    no 8-bit reading or is not that size (or more pixels than Pillow's decompression-bomb guard allows)."""
    try:
        with Image.open(path) as img:
            turned = _quarter_turn(img)
            image = _to_rgb(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError as exc:  # neither an OSError nor a ValueError
        raise ValueError(str(exc)) from None
    if (width is not None and width != image.width) or (height is not None and height != image.height):
        # An annotation tool that ignored the orientation gives the stored size, which a viewer does not show.
        upright = (f" (upright by its EXIF orientation {turned}; {image.height}x{image.width} as stored)"
                   if turned else "")
        raise _SizeMismatch(f"its pixels are {image.width}x{image.height}{upright}, the annotation file says "
                            f"{width}x{height}")
    return image


class Targets(list):
    """A batch's targets, one dict per image (``boxes`` (n, 4) float32, ``labels`` (n,) int64, ``iscrowd``
    (n,) bool, plus plain values), that pickle (as from a DataLoader worker to the main process) with one tensor per
    field for the whole batch, unpickled as per-image views of it: every tensor that crosses costs its own
    file-descriptor round trip (~0.4 ms), and the three fields of 16 images made 48."""

    def __reduce__(self):
        if not self:
            return Targets, ()
        fields = [k for k, v in self[0].items() if isinstance(v, torch.Tensor)]
        packed = {k: (torch.cat([t[k] for t in self]), [len(t[k]) for t in self]) for k in fields}
        rest = [{k: v for k, v in t.items() if k not in packed} for t in self]
        return _unpack_targets, (packed, rest)


def _unpack_targets(packed: dict[str, tuple[torch.Tensor, list[int]]], rest: list[dict]) -> Targets:
    parts = {k: joined.split(lengths) for k, (joined, lengths) in packed.items()}
    return Targets({**other, **{k: parts[k][i] for k in parts}} for i, other in enumerate(rest))


def collate(samples: list, size_divisibility: int = 128) -> dict[str, Any]:
    """Batches ``CocoDetection`` items.

    Returns:
        ``images`` ``(N, 3, H, W)`` padded to ``size_divisibility`` (None if every item was skipped),
        ``image_sizes`` and ``targets`` (a `Targets` list of dicts) per kept item, and ``skipped``: the
        ``SkippedImage`` s of the batch.
    """
    kept = [s for s in samples if not isinstance(s, SkippedImage)]
    skipped = [s for s in samples if isinstance(s, SkippedImage)]
    return {
        "images": pad_batch([s[0] for s in kept], size_divisibility) if kept else None,
        "image_sizes": [t["size"] for _, t in kept],
        "targets": Targets(t for _, t in kept),
        "skipped": skipped,
    }
