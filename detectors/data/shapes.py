"""A deterministic synthetic detection set: filled shapes on textured backgrounds, in COCO format.

The set is written once as PNG files plus COCO JSON annotation files, so training and evaluation read it
through exactly the same code path (pycocotools, PIL decoding) as COCO itself. The folder name carries a
hash of the generator parameters; a finished folder holds a ``DONE`` marker and is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..config import ShapesConfig

__all__ = ["SHAPE_CLASSES", "shapes_root", "ensure_shapes", "render_image"]

logger = logging.getLogger(__name__)

SHAPE_CLASSES = ("square", "circle", "triangle", "diamond")
_GENERATOR_VERSION = 3  # 3: areas are the shapes' pixel counts, not their boxes'
_MAX_COVERED = 0.35  # overlapping shapes occur, but no shape's box is mostly covered by a later one


def _polygon(kind: str, cx: float, cy: float, size: float, aspect: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of bounding size ``size`` (a circle is drawn as a 48-gon)."""
    half_w, half_h = size / 2 * aspect, size / 2 / aspect
    if kind == "square":
        pts = [(-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h)]
    elif kind == "circle":
        pts = [(half_w * math.cos(t), half_h * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    elif kind == "triangle":
        pts = [(0.0, -half_h), (half_w, half_h), (-half_w, half_h)]
    else:
        pts = [(0.0, -half_h), (half_w, 0.0), (0.0, half_h), (-half_w, 0.0)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _background(rng: np.random.RandomState, size: int) -> Image.Image:
    """Blurred colour noise over a random base colour plus faint stripes."""
    base = rng.randint(0, 256, size=3)
    noise = rng.randint(-60, 61, size=(size // 8 + 1, size // 8 + 1, 3))
    coarse = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    fine = rng.randint(-20, 21, size=(size, size, 1))
    period = rng.uniform(6, 20)
    stripes = (12 * np.sin(np.arange(size) * 2 * math.pi / period))[None, :, None]
    pixels = np.asarray(coarse, dtype=np.float64) + fine + stripes
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7))


def _covered(a: list[float], b: list[float]) -> float:
    """Fraction of the smaller box's area that the other box covers."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / smaller


def render_image(rng: np.random.RandomState,
                 cfg: ShapesConfig) -> tuple[Image.Image, list[tuple[int, list[float], int]]]:
    """Draws one image.

    Returns:
        The RGB image (``cfg.image_size`` square) and a list of ``(class index, [x1, y1, x2, y2], area)``, boxes
        tight around each drawn shape and the pixels it covers (the area COCO gives an object, from its mask,
        which COCOeval's small/medium/large ranges read), in drawing order.
    """
    size = cfg.image_size
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    objects: list[tuple[int, list[float], int]] = []
    wanted = rng.randint(cfg.min_objects, cfg.max_objects + 1)
    for _ in range(wanted * 10):
        if len(objects) == wanted:
            break
        cls = rng.randint(len(SHAPE_CLASSES))
        obj = rng.uniform(cfg.min_object_size, cfg.max_object_size)
        aspect = math.sqrt(rng.uniform(0.6, 1.6)) if SHAPE_CLASSES[cls] != "circle" else 1.0
        angle = rng.uniform(-0.35, 0.35)
        cx, cy = rng.uniform(obj / 2, size - obj / 2, size=2)
        pts = _polygon(SHAPE_CLASSES[cls], cx, cy, obj, aspect, angle)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        box = [max(0.0, min(xs)), max(0.0, min(ys)), min(float(size), max(xs)), min(float(size), max(ys))]
        if any(_covered(box, other) > _MAX_COVERED for _, other, _ in objects):
            continue
        colour = tuple(int(v) for v in rng.randint(0, 256, size=3))
        draw.polygon(pts, fill=colour, outline=tuple(max(0, v - 60) for v in colour))
        mask = Image.new("1", (size, size))
        ImageDraw.Draw(mask).polygon(pts, fill=1, outline=1)
        objects.append((cls, box, int(np.count_nonzero(np.asarray(mask)))))
    return img, objects


def shapes_root(cfg: ShapesConfig) -> Path:
    """The cache folder for these parameters: ``<root>/shapes-<hash>``."""
    base = Path(cfg.root) if cfg.root else Path(os.environ.get("DYHEAD_DATASETS", "datasets")) / "shapes"
    params = {k: v for k, v in asdict(cfg).items() if k != "root"}
    params["version"] = _GENERATOR_VERSION
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return base / f"shapes-{digest}"


def _write_split(folder: Path, split: str, count: int, seed: int, cfg: ShapesConfig) -> None:
    image_dir = folder / split
    image_dir.mkdir(parents=True)
    rng = np.random.RandomState(seed)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        img, objects = render_image(rng, cfg)
        file_name = f"{image_id:06d}.png"
        img.save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": img.width, "height": img.height})
        for cls, (x1, y1, x2, y2), area in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cls + 1,
                    "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                    "area": area,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CLASSES)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (folder / "annotations").mkdir(exist_ok=True)
    (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def ensure_shapes(cfg: ShapesConfig) -> Path:
    """Generates the set if its cache folder is not complete yet; returns the folder.

    Layout: ``{train,val}/*.png`` and ``annotations/instances_{train,val}.json``. Generation writes to a
    temporary sibling folder renamed at the end, so an interrupted run never leaves a half-written set
    that looks finished; concurrent generators (e.g. DDP ranks) each write their own and the first rename
    wins.
    """
    folder = shapes_root(cfg)
    if (folder / "DONE").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    logger.info("generating the shapes dataset (%d train, %d val) in %s", cfg.num_train, cfg.num_val, folder)
    _write_split(tmp, "train", cfg.num_train, cfg.seed, cfg)
    _write_split(tmp, "val", cfg.num_val, cfg.seed + 1_000_003, cfg)
    (tmp / "DONE").write_text("")
    try:
        os.rename(tmp, folder)
    except OSError:
        # another process finished first: its folder is identical, ours is dropped
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "DONE").is_file():
            raise
    return folder
