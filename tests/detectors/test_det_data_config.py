"""Dataset errors, the shapes generator, transforms, samplers and config loading."""

import json
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from detectors.config import ConfigError, DatasetConfig, ShapesConfig, load_config
from detectors.data.coco import (
    CocoDetection,
    DatasetError,
    ImageLoadError,
    SkippedImage,
    Targets,
    collate,
    load_coco_json,
    read_rgb_image,
    resolve_dataset,
)
from detectors.data.build import build_train_loader
from detectors.data.samplers import InferenceBatchSampler, TrainBatchSampler
from detectors.data.shapes import SHAPE_CLASSES, ensure_shapes
from detectors.data.transforms import DetectionTransform, pad_batch
from detectors.engine.evaluate import BadImageLog, check_categories, coco_metrics, evaluate

TRANSFORM = DetectionTransform([32], 64, 0.0, "RGB", [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])


def _write_set(tmp_path, annotations=None, images=("a.png", "b.png")):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for name in images:
        Image.new("RGB", (40, 20), (10, 20, 30)).save(image_dir / name)
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 20},
                   {"id": 2, "file_name": "b.png", "width": 40, "height": 20}],
        "annotations": annotations if annotations is not None else [
            {"id": 1, "image_id": 1, "bbox": [2, 2, 10, 8], "category_id": 7, "iscrowd": 0},
            {"id": 2, "image_id": 2, "bbox": [5, 5, 10, 10], "category_id": 3, "iscrowd": 0},
        ],
        "categories": [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}],
    }
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(coco))
    return image_dir, ann_file


def test_missing_coco_folder_names_path_and_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("DYHEAD_DATASETS", str(tmp_path))
    with pytest.raises(DatasetError) as err:
        resolve_dataset(DatasetConfig(name="coco_2017_val"), ShapesConfig())
    assert str(tmp_path / "coco" / "val2017") in str(err.value)
    assert "coco/annotations/instances_val2017.json" in str(err.value)
    (tmp_path / "coco" / "val2017").mkdir(parents=True)
    with pytest.raises(DatasetError, match="instances_val2017.json does not exist"):
        resolve_dataset(DatasetConfig(name="coco_2017_val"), ShapesConfig())
    with pytest.raises(DatasetError, match="image_dir and ann_file"):
        resolve_dataset(DatasetConfig(name="my_set"), ShapesConfig())


def test_a_folder_given_as_the_annotation_file_and_a_file_as_the_images_folder_are_named_so(tmp_path):
    """Swapped paths exist: "does not exist" sent the user looking for a path that is there."""
    image_dir, ann_file = _write_set(tmp_path)
    with pytest.raises(DatasetError, match=f"annotation file {image_dir} is not a file"):
        resolve_dataset(DatasetConfig(name="mine", image_dir=str(image_dir), ann_file=str(image_dir)), ShapesConfig())
    with pytest.raises(DatasetError, match=f"images folder {ann_file} is not a folder"):
        resolve_dataset(DatasetConfig(name="mine", image_dir=str(ann_file), ann_file=str(ann_file)), ShapesConfig())


@pytest.mark.parametrize("given", ["image_dir", "ann_file"])
def test_a_shapes_split_given_one_path_is_an_error_not_ignored(tmp_path, given):
    """The generated set's images and annotations go together: one explicit path was silently dropped for them."""
    spec = DatasetConfig(name="shapes_val", **{given: str(tmp_path)})
    with pytest.raises(DatasetError, match=f"'shapes_val' is given only its {given}; give both"):
        resolve_dataset(spec, ShapesConfig(root=str(tmp_path / "shapes"), num_train=1, num_val=1))
    assert not (tmp_path / "shapes").exists()


def test_named_datasets_resolve_to_their_own_split(tmp_path, monkeypatch):
    monkeypatch.setenv("DYHEAD_DATASETS", str(tmp_path))
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (coco / f"{split}2017").mkdir()
        (coco / "annotations" / f"instances_{split}2017.json").write_text("{}")
        assert resolve_dataset(DatasetConfig(name=f"coco_2017_{split}"), ShapesConfig()) == (
            coco / f"{split}2017", coco / "annotations" / f"instances_{split}2017.json")
    shapes = ShapesConfig(root=str(tmp_path / "shapes"), num_train=1, num_val=1, image_size=32, max_object_size=16)
    for split in ("train", "val"):
        image_dir, ann_file = resolve_dataset(DatasetConfig(name=f"shapes_{split}"), shapes)
        assert (image_dir.name, ann_file.name) == (split, f"instances_{split}.json")
        assert image_dir.parent == ann_file.parent.parent == ensure_shapes(shapes)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "top level is not an object"),
        ('{"images": [], "categories": []}', "no 'annotations' list"),
        ('{"images": [{"id": 1}], "annotations": [], "categories": []}', r"images\[0\] lacks file_name"),
        ('{"images": [], "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}], "categories": []}',
         r"annotations\[0\] lacks category_id"),
        ('{"images": [], "annotations": [], "categories": [{"id": 1}]}', r"categories\[0\] lacks name"),
        ('{"images": [3], "annotations": [], "categories": []}', r"images\[0\] lacks id, file_name"),
    ],
)
def test_bad_annotation_files_name_file_and_problem(tmp_path, content, message):
    ann_file = tmp_path / "bad.json"
    ann_file.write_text(content)
    with pytest.raises(DatasetError, match=message) as err:
        load_coco_json(ann_file)
    assert str(ann_file) in str(err.value)


def test_labels_are_contiguous_and_degenerate_boxes_counted(tmp_path):
    annotations = [
        {"id": 1, "image_id": 1, "bbox": [2, 2, 10, 8], "category_id": 7},
        {"id": 2, "image_id": 1, "bbox": [5, 5, 0, 10], "category_id": 3},  # zero width
        {"id": 3, "image_id": 1, "bbox": [50, 5, 10, 10], "category_id": 3},  # outside the 40-pixel image
    ]
    image_dir, ann_file = _write_set(tmp_path, annotations)
    dataset = CocoDetection(image_dir, ann_file, TRANSFORM, remove_empty=True)
    assert dataset.num_degenerate == 2
    assert len(dataset) == 1 and dataset.class_names == ["three", "seven"]
    image, target = dataset[0]
    assert image.shape == (3, 32, 64)  # short side 20 -> 32 is 1.6x, long side 64 is within the bound
    assert target["labels"].tolist() == [1]
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 2.0, 12.0, 10.0]]) * 1.6)
    assert target["orig_size"] == (20, 40)



@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_a_box_that_float32_closes_is_dropped_from_the_item(tmp_path, flip_prob):
    """A box 1e-7 pixel wide has an area in the annotation check's float64 and none in float32: the item leaves it
    out, with its label and crowd flag, so that no box without area reaches the detector (which refuses it)."""
    annotations = [{"id": 1, "image_id": 1, "bbox": [30, 2, 1e-7, 5], "category_id": 3, "iscrowd": 1},
                   {"id": 2, "image_id": 1, "bbox": [2, 2, 10, 8], "category_id": 7, "iscrowd": 0}]
    image_dir, ann_file = _write_set(tmp_path, annotations)
    transform = DetectionTransform([32], 64, flip_prob, "RGB", [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    dataset = CocoDetection(image_dir, ann_file, transform)
    assert dataset.num_degenerate == 0 and len(dataset.records[0]["boxes"]) == 2
    _, target = dataset[(0, (1,))]
    assert target["labels"].tolist() == [1] and target["iscrowd"].tolist() == [False]
    assert len(target["boxes"]) == 1 and bool((target["boxes"][:, 2:] > target["boxes"][:, :2]).all())

def test_boxes_are_clipped_at_the_top_and_left_too(tmp_path):
    image_dir, ann_file = _write_set(tmp_path, [{"id": 1, "image_id": 1, "bbox": [-5, -3, 15, 10], "category_id": 7}])
    dataset = CocoDetection(image_dir, ann_file, TRANSFORM)
    assert dataset.records[0]["boxes"].tolist() == [[0, 0, 10, 7]] and dataset.num_degenerate == 0


def test_labels_follow_the_category_ids_in_increasing_order_whatever_the_files_order(tmp_path):
    image_dir, ann_file = _write_set(tmp_path)
    data = json.loads(ann_file.read_text())
    data["categories"] = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]
    ann_file.write_text(json.dumps(data))
    dataset = CocoDetection(image_dir, ann_file, TRANSFORM)
    assert dataset.category_ids == [3, 7] and dataset.class_names == ["three", "seven"]
    assert [r["labels"].tolist() for r in dataset.records] == [[1], [0]]  # image 1 holds a 7, image 2 a 3


def test_batches_give_the_resized_image_sizes_as_height_and_width(tmp_path):
    """The model masks and clips with image_sizes: the resized (h, w) of each image, not the original size."""
    image_dir, ann_file = _write_set(tmp_path)
    dataset = CocoDetection(image_dir, ann_file, TRANSFORM)
    batch = collate([dataset[0], dataset[1]], size_divisibility=32)
    assert batch["images"].shape == (2, 3, 32, 64)
    assert batch["image_sizes"] == [(32, 64), (32, 64)]  # 40 x 20 resized to short side 32
    assert [t["orig_size"] for t in batch["targets"]] == [(20, 40), (20, 40)]


def test_square_images_group_with_the_landscape_ones(tmp_path):
    image_dir, ann_file = _write_set(tmp_path)
    data = json.loads(ann_file.read_text())
    data["images"] += [{"id": 3, "file_name": "c.png", "width": 20, "height": 20},
                       {"id": 4, "file_name": "d.png", "width": 20, "height": 40}]
    ann_file.write_text(json.dumps(data))
    assert CocoDetection(image_dir, ann_file, TRANSFORM).aspect_groups() == [0, 0, 0, 1]


def test_a_training_item_is_augmented_by_its_seed(tmp_path):
    """An (index, seed) key draws the augmentation: with flip_prob 1 the boxes come back flipped."""
    image_dir, ann_file = _write_set(tmp_path)
    dataset = CocoDetection(image_dir, ann_file, DetectionTransform([32], 64, 1.0, "RGB", [0.0] * 3, [1.0] * 3))
    _, target = dataset[(0, (0, 0, 0))]
    # [2, 2, 12, 10] x 1.6 in a 64-pixel-wide image, mirrored
    torch.testing.assert_close(target["boxes"], torch.tensor([[64 - 19.2, 3.2, 64 - 3.2, 16.0]]))
    _, target = dataset[0]  # a plain index: no augmentation
    torch.testing.assert_close(target["boxes"], torch.tensor([[3.2, 3.2, 19.2, 16.0]]))


def test_explicit_paths_win_over_a_named_datasets_place(tmp_path, monkeypatch):
    monkeypatch.setenv("DYHEAD_DATASETS", str(tmp_path / "nowhere"))
    image_dir, ann_file = _write_set(tmp_path)
    for name in ("coco_2017_val", "shapes_val"):
        spec = DatasetConfig(name=name, image_dir=str(image_dir), ann_file=str(ann_file))
        shapes = ShapesConfig(root=str(tmp_path / "shapes"), num_train=1, num_val=1, image_size=32, max_object_size=16)
        assert resolve_dataset(spec, shapes) == (image_dir, ann_file)
    assert not (tmp_path / "shapes").exists()  # nothing generated


def test_missing_and_corrupt_images(tmp_path):
    image_dir, ann_file = _write_set(tmp_path, images=("a.png",))
    (image_dir / "b.png").write_bytes(b"not a png")
    dataset = CocoDetection(image_dir, ann_file, TRANSFORM)
    with pytest.raises(ImageLoadError, match="b.png: cannot decode"):
        dataset[1]
    (image_dir / "b.png").unlink()
    with pytest.raises(ImageLoadError, match="b.png: file not found"):
        dataset[1]
    skipping = CocoDetection(image_dir, ann_file, TRANSFORM, skip_bad_images=True)
    batch = collate([skipping[0], skipping[1]], size_divisibility=128)
    assert batch["images"].shape == (1, 3, 128, 128)
    assert [s.path for s in batch["skipped"]] == [str(image_dir / "b.png")]
    assert isinstance(skipping[1], SkippedImage)


def test_an_image_past_pillows_pixel_limit_is_a_bad_image(tmp_path, monkeypatch):
    """Pillow refuses an image of more than twice Image.MAX_IMAGE_PIXELS (a decompression bomb) with an error that
    is neither OSError nor ValueError: named as a bad image (or skipped), also where the entry gives no size (then
    left unknown), not its traceback. A limit of 10 pixels stands for the real 179 million."""
    image_dir, ann_file = _write_set(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(ValueError, match="exceeds limit of 20 pixels"):
        read_rgb_image(image_dir / "a.png")
    with pytest.raises(ImageLoadError, match="a.png: cannot decode .*exceeds limit"):
        CocoDetection(image_dir, ann_file, TRANSFORM)[0]
    assert isinstance(CocoDetection(image_dir, ann_file, TRANSFORM, skip_bad_images=True)[0], SkippedImage)
    data = json.loads(ann_file.read_text())
    for entry in data["images"]:
        del entry["width"], entry["height"]
    ann_file.write_text(json.dumps(data))
    assert [r["width"] for r in CocoDetection(image_dir, ann_file, TRANSFORM).records] == [None, None]
    assert isinstance(CocoDetection(image_dir, ann_file, TRANSFORM, skip_bad_images=True)[1], SkippedImage)


def test_bad_images_are_warned_about_once_each_and_counted(caplog):
    log = BadImageLog(logging.getLogger("test.bad_images"))
    a, b = SkippedImage("a.png", "file not found"), SkippedImage("b.png", "cannot decode")
    with caplog.at_level(logging.WARNING):
        log.update([a])
        log.update([a, b])  # a again: an image met in every epoch
        log.update([b])
    assert [r.getMessage() for r in caplog.records] == ["skipping image a.png: file not found (1 skipped so far)",
                                                        "skipping image b.png: cannot decode (2 skipped so far)"]


def test_batches_from_a_worker_carry_one_tensor_per_target_field(tmp_path):
    folder = ensure_shapes(ShapesConfig(root=str(tmp_path), num_train=4, num_val=1, image_size=64,
                                        max_object_size=30))
    dataset = CocoDetection(folder / "train", folder / "annotations" / "instances_train.json",
                            DetectionTransform([64], 64, 0.0, "RGB", [0.0] * 3, [1.0] * 3))
    in_process = next(iter(DataLoader(dataset, batch_size=4, collate_fn=collate)))
    from_worker = next(iter(DataLoader(dataset, batch_size=4, collate_fn=collate, num_workers=1)))
    assert torch.equal(from_worker["images"], in_process["images"])
    assert len(from_worker["targets"]) == 4
    for got, expected in zip(from_worker["targets"], in_process["targets"]):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value, key
    for field in ("boxes", "labels", "iscrowd"):
        assert len({t[field].untyped_storage().data_ptr() for t in from_worker["targets"]}) == 1, field


def test_targets_pickle_with_images_without_boxes_and_when_empty():
    targets = Targets([
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 1},
        {"boxes": torch.rand(2, 4), "labels": torch.tensor([3, 1]), "image_id": 2},
    ])
    back = pickle.loads(pickle.dumps(targets))
    assert isinstance(back, Targets) and [t["image_id"] for t in back] == [1, 2]
    for got, expected in zip(back, targets):
        assert torch.equal(got["boxes"], expected["boxes"]) and torch.equal(got["labels"], expected["labels"])
    assert back[0]["boxes"].shape == (0, 4)
    assert pickle.loads(pickle.dumps(Targets())) == []


def test_shapes_set_is_deterministic_and_coco(tmp_path):
    cfg = ShapesConfig(root=str(tmp_path / "a"), num_train=3, num_val=2, image_size=64, max_object_size=30)
    folder = ensure_shapes(cfg)
    again = ensure_shapes(ShapesConfig(**{**cfg.__dict__, "root": str(tmp_path / "b")}))
    for name in ("annotations/instances_train.json", "train/000002.png", "val/000001.png"):
        assert (folder / name).read_bytes() == (again / name).read_bytes()
    coco = load_coco_json(folder / "annotations" / "instances_train.json")
    assert [c["name"] for c in coco.dataset["categories"]] == list(SHAPE_CLASSES)
    assert all(2 <= len(coco.imgToAnns[i]) <= 6 for i in coco.imgs)
    for ann in coco.dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64 and min(w, h) >= 12 * 0.6 * 0.7
        # the area is the shape's pixels (COCO's mask area, which COCOeval's size ranges read), not its box's:
        # about half the box for a triangle or a diamond
        half_box = SHAPE_CLASSES[ann["category_id"] - 1] in ("triangle", "diamond")
        assert 0.4 < ann["area"] / (w * h) < 0.75 if half_box else 0.6 < ann["area"] / (w * h) < 1.2
    dataset = CocoDetection(folder / "train", folder / "annotations" / "instances_train.json",
                            DetectionTransform([64], 64, 0.0, "RGB", [0.0] * 3, [1.0] * 3))
    assert len(dataset) == 3 and dataset.num_degenerate == 0


def test_the_shapes_set_is_made_once_and_its_splits_differ(tmp_path, monkeypatch):
    import detectors.data.shapes as shapes

    cfg = ShapesConfig(root=str(tmp_path), num_train=2, num_val=2, image_size=32, max_object_size=16)
    folder = ensure_shapes(cfg)

    def fail(*args):
        raise AssertionError("the finished set was made again")

    monkeypatch.setattr(shapes, "_write_split", fail)
    assert ensure_shapes(cfg) == folder
    assert (folder / "train" / "000001.png").read_bytes() != (folder / "val" / "000001.png").read_bytes()


def test_train_sampler_resumes_and_shards():
    groups = [0, 1] * 10
    full = TrainBatchSampler(groups, 3, seed=5)
    stream = iter(full)
    first = [next(stream) for _ in range(12)]
    assert all(len({groups[i] for i, _ in batch}) == 1 for batch in first)  # aspect-ratio grouping
    resumed = iter(TrainBatchSampler(groups, 3, seed=5, start_batch=7))
    assert [next(resumed) for _ in range(5)] == first[7:]
    # without grouping, two processes see disjoint halves of each epoch
    r0 = iter(TrainBatchSampler([0] * 20, 5, seed=5, rank=0, world_size=2, start_batch=0))
    r1 = iter(TrainBatchSampler([0] * 20, 5, seed=5, rank=1, world_size=2, start_batch=0))
    seen0 = {i for _ in range(2) for i, _ in next(r0)}
    seen1 = {i for _ in range(2) for i, _ in next(r1)}
    assert not seen0 & seen1 and len(seen0 | seen1) == 20
    shards = [list(InferenceBatchSampler(7, 2, rank=r, world_size=2)) for r in range(2)]
    assert shards == [[[0, 2], [4, 6]], [[1, 3], [5]]]


def test_each_epoch_is_its_own_permutation_and_every_item_its_own_seed():
    """Epoch e visits the images in randperm(n) of a generator seeded seed + e; each item's augmentation seed is
    (seed, epoch, position), distinct for every item of every epoch."""
    stream = iter(TrainBatchSampler([0] * 8, 4, seed=5))
    items = [item for _ in range(4) for item in next(stream)]
    for epoch in range(2):
        expected = torch.randperm(8, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        assert [index for index, _ in items[8 * epoch: 8 * epoch + 8]] == expected
    assert [key for _, key in items] == [(5, e, p) for e in range(2) for p in range(8)]


def test_as_many_training_images_as_processes_is_enough():
    r1 = iter(TrainBatchSampler([0, 0], 1, seed=0, rank=1, world_size=2))
    assert len(next(r1)) == 1


def test_the_number_of_test_batches_counts_the_last_partial_one():
    assert [len(InferenceBatchSampler(n, 3)) for n in (0, 1, 3, 4, 7)] == [0, 1, 1, 2, 3]
    assert len(InferenceBatchSampler(7, 2, rank=1, world_size=2)) == 2  # images 1, 3, 5: [1, 3], [5]


@pytest.mark.parametrize("height, width, expected", [
    (320, 640, (667, 1333)),  # 2:1: 666.5 rounds up, as detectron2's int(x + 0.5); round() gave 666
    (480, 640, (800, 1067)),
    (427, 640, (800, 1199)),
    (640, 480, (1067, 800)),
    (100, 1000, (133, 1333)),
])
def test_resize_sizes_are_detectron2s(height, width, expected):
    """COCO-style 800 / 1333 resizing: detectron2's ResizeShortestEdge sizes, worked out by hand."""
    transform = DetectionTransform([800], 1333, 0.0, "RGB", [0.0] * 3, [1.0] * 3)
    assert transform.output_size(height, width, 800) == expected


def test_more_processes_than_training_images_is_an_error_not_a_hang(tmp_path):
    with pytest.raises(ValueError, match="4 processes from 3 images"):
        TrainBatchSampler([0, 0, 0], 1, seed=0, rank=3, world_size=4)
    image_dir, ann_file = _write_set(tmp_path)
    dataset = CocoDetection(image_dir, ann_file, TRANSFORM, remove_empty=True)
    with pytest.raises(DatasetError, match=r"ann.json: cannot sample batches for 4 processes from 2 images"):
        build_train_loader(load_config(None, ["solver.ims_per_batch=4"]), dataset, 3, 4, 0)


def test_training_transform_flips_boxes():
    transform = DetectionTransform([20], 100, 1.0, "BGR255", [1.0, 2.0, 3.0], [1.0, 1.0, 1.0])
    image = Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8) + np.array([10, 20, 30], dtype=np.uint8))
    pixels, boxes = transform(image, torch.tensor([[0.0, 2.0, 10.0, 8.0]]), np.random.default_rng(0))
    torch.testing.assert_close(boxes, torch.tensor([[30.0, 2.0, 40.0, 8.0]]))
    assert pixels[:, 0, 0].tolist() == [29.0, 18.0, 7.0]  # BGR order, mean subtracted, 0-255 range


def test_an_extreme_aspect_ratio_keeps_at_least_one_pixel():
    """A 1 x 5000 strip: the short side 800 would make the long side 4e6, so the long side is set to 1333 and the
    short side shrinks to 800 * 1333 / 4e6 = 0.27 pixels, which must still be one pixel, not zero."""
    transform = DetectionTransform([800], 1333, 0.0, "RGB", [0.0] * 3, [1.0] * 3)
    assert transform.output_size(1, 5000, 800) == (1, 1333)
    assert transform.output_size(5000, 1, 800) == (1333, 1)


def test_boxes_scale_by_the_width_and_height_factors_separately():
    """A 7 x 3 image resized to short side 4 becomes 9 x 4 (9.33 rounded): x scales by 9/7, y by 4/3. A box over
    the whole image must cover the whole resized image."""
    transform = DetectionTransform([4], 100, 0.0, "RGB", [0.0] * 3, [1.0] * 3)
    image = Image.new("RGB", (7, 3))
    pixels, boxes = transform(image, torch.tensor([[0.0, 0.0, 7.0, 3.0], [3.5, 1.5, 7.0, 3.0]]), None)
    assert pixels.shape == (3, 4, 9)
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 9.0, 4.0], [4.5, 2.0, 9.0, 4.0]]))


def test_the_resize_is_bilinear():
    """A 2 x 1 image of 0 and 200 doubled to 4 x 2: pixel centres at x = -0.25, 0.25, 0.75, 1.25 of the source
    interpolate to 0, 50, 150, 200 (nearest would give 0, 0, 200, 200)."""
    transform = DetectionTransform([2], 100, 0.0, "RGB", [0.0] * 3, [1 / 255] * 3)
    stored = np.array([[[0, 0, 0], [200, 200, 200]]], dtype=np.uint8)
    pixels, _ = transform(Image.fromarray(stored), torch.zeros(0, 4), None)
    torch.testing.assert_close(pixels, torch.tensor([0.0, 50.0, 150.0, 200.0]).expand(3, 2, 4))


def test_the_flip_moves_the_pixels_with_the_boxes():
    """A white square at x 0-10, y 2-8 of a black 40 x 20 image: after the flip the box is x 30-40 and the white
    pixels are inside it (the same rows), the left part black."""
    transform = DetectionTransform([20], 100, 1.0, "RGB", [0.0] * 3, [1.0] * 3)
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[2:8, 0:10] = 255
    pixels, boxes = transform(Image.fromarray(stored), torch.tensor([[0.0, 2.0, 10.0, 8.0]]), np.random.default_rng(0))
    torch.testing.assert_close(boxes, torch.tensor([[30.0, 2.0, 40.0, 8.0]]))
    expected = np.zeros((20, 40), dtype=np.float32)
    expected[2:8, 30:40] = 1.0
    for channel in pixels:
        np.testing.assert_array_equal(channel.numpy(), expected)


def test_training_draws_each_short_side_of_the_list_and_testing_takes_the_first():
    transform = DetectionTransform([10, 20, 30], 1000, 0.0, "RGB", [0.0] * 3, [1.0] * 3)
    image = Image.new("RGB", (40, 20))
    drawn = {transform(image, torch.zeros(0, 4), np.random.default_rng(seed))[0].shape[1] for seed in range(30)}
    assert drawn == {10, 20, 30}
    assert transform(image, torch.zeros(0, 4), None)[0].shape[1:] == (10, 20)


def test_the_train_and_test_transforms_take_their_own_sizes_and_only_training_flips():
    cfg = load_config(None, ["data.input.min_size_train=[16]", "data.input.max_size_train=28",
                             "data.input.min_size_test=12", "data.input.max_size_test=30", "data.input.flip_prob=1.0"])
    image = Image.new("RGB", (40, 20))
    box = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    train = DetectionTransform.from_config(cfg.data.input, train=True)
    pixels, boxes = train(image, box, np.random.default_rng(0))
    assert pixels.shape[1:] == (14, 28)  # short side 16 would make the long side 32 > 28
    torch.testing.assert_close(boxes, torch.tensor([[21.0, 0.0, 28.0, 14.0]]))  # flipped
    test = DetectionTransform.from_config(cfg.data.input, train=False)
    pixels, boxes = test(image, box, np.random.default_rng(0))
    assert pixels.shape[1:] == (12, 24)
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 6.0, 12.0]]))  # not flipped


def test_a_batch_is_zero_padded_at_the_bottom_right_to_the_next_multiple():
    """(5, 7) and (9, 3) images padded to multiples of 4: (12, 8), each image at the top left, zeros elsewhere."""
    a, b = torch.full((3, 5, 7), 1.0), torch.full((3, 9, 3), 2.0)
    batch = pad_batch([a, b], 4)
    assert batch.shape == (2, 3, 12, 8)
    expected = torch.zeros(2, 3, 12, 8)
    expected[0, :, :5, :7] = 1.0
    expected[1, :, :9, :3] = 2.0
    assert torch.equal(batch, expected)
    assert pad_batch([torch.ones(3, 8, 4)], 4).shape == (1, 3, 8, 4)  # already a multiple: no padding


def test_config_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("solver:\n  base_lr: 1\n  steps: [5, 6]\n")
    cfg = load_config(path, ["solver.max_iter=7", "model.backbone.widths=[1, 2, 3, 4]", "model.num_classes=null"])
    assert cfg.solver.base_lr == 1.0 and isinstance(cfg.solver.base_lr, float)
    assert (cfg.solver.max_iter, cfg.model.backbone.widths, cfg.solver.steps) == (7, [1, 2, 3, 4], [5, 6])
    with pytest.raises(ConfigError, match="solver.bse_lr.*valid keys under 'solver'.*base_lr"):
        load_config(path, ["solver.bse_lr=1"])
    with pytest.raises(ConfigError, match="solver.max_iter: expected int"):
        load_config(path, ["solver.max_iter=ten"])
    # YAML 1.1 reads exponents without a dot as strings; a float field takes them, other fields do not
    path.write_text("solver:\n  weight_decay: 1e-4\n")
    cfg = load_config(path, ["solver.base_lr=+2E-3"])
    assert (cfg.solver.weight_decay, cfg.solver.base_lr) == (1e-4, 2e-3)
    with pytest.raises(ConfigError, match="solver.max_iter: expected int"):
        load_config(path, ["solver.max_iter=1e3"])
    with pytest.raises(ConfigError, match="solver.base_lr: expected float"):
        load_config(path, ["solver.base_lr=1e"])
    path.write_text("solver:\n  warmup: 3\n")
    with pytest.raises(ConfigError, match="unknown config key.*solver.warmup.*warmup_iters"):
        load_config(path)


def test_config_values_from_a_fixed_set_are_checked_on_load(tmp_path):
    """Names of optimisers, backbones, norms, architectures... fail when the config is read, before any data."""
    cfg = load_config(None, ["solver.optimizer=adamw", "model.backbone.name=swin_t", "model.backbone.norm=ln",
                             "model.dyhead_backend=torch"])
    assert (cfg.solver.optimizer, cfg.model.backbone.name, cfg.model.dyhead_backend) == ("adamw", "swin_t", "torch")
    with pytest.raises(ConfigError, match="solver.optimizer: expected one of sgd, adamw, got 'adam'"):
        load_config(None, ["solver.optimizer=adam"])
    with pytest.raises(ConfigError, match="model.backbone.norm: expected one of frozen_bn, bn, gn, ln, got 1"):
        load_config(None, ["model.backbone.norm=1"])
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  meta_architecture: fcos\n")
    with pytest.raises(ConfigError, match="c.yaml: model.meta_architecture: expected one of atss, retinanet, "
                                          "faster_rcnn, got 'fcos'"):
        load_config(path)


@pytest.mark.parametrize(
    "annotation, message",
    [
        ({"category_id": 5}, r"annotation 9 \(image 1\) has category_id 5, which 'categories' does not list"),
        ({"bbox": [1, 2, 3]}, r"annotation 9 \(image 1\) has bbox \[1, 2, 3\], not \[x, y, width, height\]"),
        ({"bbox": [1, 2, "3", 4]}, "has bbox"),
        ({"bbox": [1, 2, float("nan"), 4]}, "of finite numbers"),
    ],
)
def test_corrupt_annotations_name_the_annotation(tmp_path, annotation, message):
    bad = {"id": 9, "image_id": 1, "bbox": [2, 2, 10, 8], "category_id": 7, **annotation}
    image_dir, ann_file = _write_set(tmp_path, [bad])
    with pytest.raises(DatasetError, match=message) as err:
        CocoDetection(image_dir, ann_file, TRANSFORM)
    assert str(ann_file) in str(err.value)


@pytest.mark.parametrize("section", ["images", "categories", "annotations"])
def test_repeated_ids_are_an_error(tmp_path, section):
    image_dir, ann_file = _write_set(tmp_path)
    data = json.loads(ann_file.read_text())
    data[section][1]["id"] = data[section][0]["id"]
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=rf"{section}\[1\] repeats id"):
        load_coco_json(ann_file)


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("annotations", "area", "80", "a finite number >= 0"),
        ("annotations", "area", float("nan"), "a finite number >= 0"),
        ("annotations", "iscrowd", "0", "0 or 1"),
        ("annotations", "id", "a1", "an integer"),
        ("annotations", "image_id", [1], "an integer or a string"),
        ("images", "width", 40.5, "a positive whole number"),
        ("images", "height", 0, "a positive whole number"),
        ("images", "file_name", None, "a non-empty string"),
        ("categories", "id", None, "an integer or a string"),
    ],
)
def test_fields_that_cocoeval_would_misread_name_the_entry(tmp_path, section, key, value, expected):
    """A field of the wrong type is refused when the file is read: pycocotools takes it, and COCOeval failed on it
    (a string area or annotation id, after a whole training run) or read it wrongly ("0" as iscrowd is truthy)."""
    _, ann_file = _write_set(tmp_path)
    data = json.loads(ann_file.read_text())
    data[section][1][key] = value
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=re.escape(f"{section}[1] has {key} {value!r}, not {expected}")) as err:
        load_coco_json(ann_file)
    assert str(ann_file) in str(err.value)


@pytest.mark.parametrize("section", ["images", "categories"])
def test_ids_of_integers_and_strings_together_are_an_error(tmp_path, section):
    """The loader sorts image and category ids, and Python cannot order an integer and a string."""
    _, ann_file = _write_set(tmp_path)
    data = json.loads(ann_file.read_text())
    data[section][1]["id"] = "x"
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=rf"{section}\[1\] has id 'x' and {section}\[0\] \d: the ids are all "):
        load_coco_json(ann_file)


def test_string_ids_boolean_crowds_and_whole_float_sizes_are_read(tmp_path):
    """Unusual but valid: string image ids throughout, iscrowd as a JSON boolean, a size written 40.0 or null."""
    image_dir, ann_file = _write_set(tmp_path)
    data = json.loads(ann_file.read_text())
    for entry in data["images"]:
        entry["id"] = f"img{entry['id']}"
    for ann, crowd in zip(data["annotations"], (False, True)):
        ann["image_id"], ann["iscrowd"] = f"img{ann['image_id']}", crowd
    data["images"][0]["width"], data["images"][1]["height"] = 40.0, None
    ann_file.write_text(json.dumps(data))
    dataset = CocoDetection(image_dir, ann_file, TRANSFORM)
    assert [(r["image_id"], r["iscrowd"].tolist()) for r in dataset.records] == [("img1", [False]), ("img2", [True])]
    assert dataset[1][1]["orig_size"] == (20, 40)


def test_annotations_without_eval_fields_are_evaluated(tmp_path):
    """Hand-made files often leave out id, area and iscrowd, which COCOeval reads: they are filled in."""
    annotations = [{"image_id": 1, "bbox": [2, 2, 10, 8], "category_id": 7},
                   {"image_id": 2, "bbox": [5, 5, 10, 10], "category_id": 3, "id": 4}]
    image_dir, ann_file = _write_set(tmp_path, annotations)
    dataset = CocoDetection(image_dir, ann_file, TRANSFORM)
    anns = dataset.coco.dataset["annotations"]
    assert [(a["id"], a["area"], a["iscrowd"]) for a in anns] == [(5, 80, 0), (4, 100, 0)]
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in annotations]
    assert coco_metrics(dataset, results)["bbox"]["AP50"] == pytest.approx(100.0)


def test_image_size_must_match_the_annotation(tmp_path):
    image_dir, ann_file = _write_set(tmp_path)
    Image.new("RGB", (30, 20)).save(image_dir / "b.png")
    with pytest.raises(ImageLoadError, match="b.png: its pixels are 30x20, the annotation file says 40x20"):
        CocoDetection(image_dir, ann_file, TRANSFORM)[1]
    skipped = CocoDetection(image_dir, ann_file, TRANSFORM, skip_bad_images=True)[1]
    assert isinstance(skipped, SkippedImage) and "30x20" in skipped.reason


def test_exif_orientation_is_applied(tmp_path):
    """A photo stored on its side with EXIF orientation 6 is read upright, in the size the annotation gives."""
    image_dir, ann_file = _write_set(tmp_path)
    stored = Image.new("RGB", (20, 40), (200, 0, 0))
    stored.paste((0, 0, 200), (0, 0, 20, 20))  # top half blue as stored: the right half once upright
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    stored.save(image_dir / "a.png", exif=exif)
    image, target = CocoDetection(image_dir, ann_file, TRANSFORM)[0]
    assert target["orig_size"] == (20, 40)
    assert image[2, :, -1].min() > image[0, :, -1].max()  # blue on the right
    assert image[0, :, 0].min() > image[2, :, 0].max()  # red on the left


def test_a_size_mismatch_of_an_exif_turned_image_says_so(tmp_path):
    """An annotation tool that ignored EXIF orientation 6 gives the stored 20 x 40, which no viewer shows: the error
    names the orientation and the stored size beside the upright one."""
    image_dir, ann_file = _write_set(tmp_path)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20)).save(image_dir / "a.png", exif=exif)
    with pytest.raises(ImageLoadError, match=re.escape(
            "a.png: its pixels are 20x40 (upright by its EXIF orientation 6; 40x20 as stored), the annotation file "
            "says 40x20")):
        CocoDetection(image_dir, ann_file, TRANSFORM)[0]


def test_image_entries_without_a_size_take_the_files(tmp_path):
    """A hand-made file without width/height: boxes are clipped to the image as read (upright, EXIF turned) and
    the aspect groups are right; before, boxes stayed outside and every image counted as landscape."""
    image_dir, ann_file = _write_set(tmp_path, annotations=[
        {"id": 1, "image_id": 1, "bbox": [30, 2, 20, 8], "category_id": 7},  # past the 40-pixel width
        {"id": 2, "image_id": 2, "bbox": [2, 30, 10, 20], "category_id": 3},  # past the 40-pixel height, upright
        {"id": 3, "image_id": 2, "bbox": [2, 45, 10, 5], "category_id": 3},  # wholly below it: degenerate
    ])
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20)).save(image_dir / "b.png", exif=exif)  # 20 wide and 40 high once upright
    data = json.loads(ann_file.read_text())
    for entry in data["images"]:
        del entry["width"], entry["height"]
    ann_file.write_text(json.dumps(data))
    dataset = CocoDetection(image_dir, ann_file, TRANSFORM)
    assert [r["boxes"].tolist() for r in dataset.records] == [[[30, 2, 40, 10]], [[2, 30, 12, 40]]]
    assert dataset.num_degenerate == 1 and dataset.aspect_groups() == [0, 1]
    assert dataset[1][1]["orig_size"] == (40, 20)  # the size check passes against the filled-in size


@pytest.mark.parametrize("orientation, upright", [(1, (40, 20)), (2, (40, 20)), (3, (40, 20)), (4, (40, 20)),
                                                  (5, (20, 40)), (6, (20, 40)), (7, (20, 40)), (8, (20, 40))])
def test_entries_without_a_size_take_the_upright_size_of_each_exif_orientation(tmp_path, orientation, upright):
    """EXIF orientations 5 to 8 turn the stored 40 x 20 image a quarter (5 and 7 mirrored too): 20 wide, 40 high."""
    image_dir, ann_file = _write_set(tmp_path)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (40, 20)).save(image_dir / "a.png", exif=exif)
    data = json.loads(ann_file.read_text())
    del data["images"][0]["width"], data["images"][0]["height"]
    ann_file.write_text(json.dumps(data))
    dataset = CocoDetection(image_dir, ann_file, TRANSFORM)
    assert (dataset.records[0]["width"], dataset.records[0]["height"]) == upright
    assert dataset[0][1]["orig_size"] == upright[::-1]  # the pixels as read have that size


def _gray16(values, mode):
    """A gray image of the 16-bit values in mode "I;16", "I;16B" or "I"."""
    if mode == "I;16B":
        return Image.frombytes(mode, values.shape[::-1], values.astype(">u2").tobytes())
    return Image.fromarray(values if mode == "I;16" else values.astype(np.int32))


@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("I;16B", ".tif"), ("I", ".tif")])
def test_16_bit_gray_images_keep_their_high_byte(tmp_path, mode, suffix):
    """Pillow's convert("RGB") clips 16-bit gray at 255, all white: each value's high byte is read instead, as
    OpenCV reads 16-bit PNGs, in all three channels."""
    values = np.random.default_rng(0).integers(0, 65536, (20, 40)).astype(np.uint16)
    values[0, :4] = 0, 255, 256, 65535
    path = tmp_path / f"gray16{suffix}"
    _gray16(values, mode).save(path)
    assert Image.open(path).mode == mode
    expected = np.repeat((values // 256).astype(np.uint8)[..., None], 3, axis=2)
    np.testing.assert_array_equal(np.asarray(read_rgb_image(path)), expected)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK"])
def test_8_bit_images_read_as_pillow_converts_them(tmp_path, mode):
    """Images of 8 bits per channel (or fewer) are read as before: Pillow's conversion to RGB."""
    stored = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 40, 3)).astype(np.uint8)).convert(mode)
    path = tmp_path / ("a.jpg" if mode == "CMYK" else "a.png")
    stored.save(path)
    np.testing.assert_array_equal(np.asarray(read_rgb_image(path)), np.asarray(Image.open(path).convert("RGB")))


@pytest.mark.parametrize("pixels, message", [
    (np.full((20, 40), 0.5, np.float32), "a.png: its pixels are floating point (mode F)"),
    (np.full((20, 40), 70000, np.int32), "a.png: its pixels are 32-bit integers from 70000 to 70000, beyond"),
])
def test_images_without_an_8_bit_reading_are_named(tmp_path, pixels, message):
    image_dir, ann_file = _write_set(tmp_path)
    Image.fromarray(pixels).save(image_dir / "a.png", format="TIFF")  # Pillow reads it by its content
    with pytest.raises(ImageLoadError, match=re.escape(message)):
        CocoDetection(image_dir, ann_file, TRANSFORM)[0]


def test_annotations_of_unknown_images_are_reported(tmp_path, caplog):
    annotations = [{"id": 1, "image_id": 1, "bbox": [2, 2, 10, 8], "category_id": 7},
                   {"id": 2, "image_id": 99, "bbox": [2, 2, 10, 8], "category_id": 7}]
    image_dir, ann_file = _write_set(tmp_path, annotations)
    with caplog.at_level("WARNING"):
        dataset = CocoDetection(image_dir, ann_file, TRANSFORM)
    assert len(dataset) == 2 and "ignored 1 annotations whose image_id is not in 'images'" in caplog.text


def test_no_detections_score_zero_and_minus_one_where_there_is_no_ground_truth(tmp_path):
    image_dir, ann_file = _write_set(tmp_path)  # two boxes of area 80 and 100: small objects only
    metrics = coco_metrics(CocoDetection(image_dir, ann_file, TRANSFORM), [])["bbox"]
    assert metrics == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": -1.0, "APl": -1.0}


class _FixedDetector(torch.nn.Module):
    """Detects each image's one ground-truth box (in original pixels), or ``box`` (x1, y1, x2, y2 in original pixels)
    in every image, with the given label and score."""

    def __init__(self, dataset, label, box=None, score=0.9):
        super().__init__()
        self.dataset, self.label, self.box, self.score = dataset, label, box, score

    def forward(self, images, image_sizes, original_sizes=None):
        assert not self.training
        out = []
        for size in original_sizes:
            boxes = [self.box]
            if self.box is None:
                (record,) = [r for r in self.dataset.records if (r["height"], r["width"]) == tuple(size)]
                boxes = record["boxes"]
            out.append({"boxes": torch.tensor(boxes), "scores": torch.tensor([self.score]),
                        "labels": torch.tensor([self.label])})
        return out


def _eval_config():
    """Evaluation settings for the small test sets here: no workers, images scaled to short side 32."""
    return load_config(None, ["data.num_workers=0", "data.input.min_size_test=32", "data.input.max_size_test=64"])


def _one_box_test_set(tmp_path, categories):
    """A test set of one 40x20 image holding one box [2, 2, 10, 8] (x, y, w, h) of category 7; the file's
    categories are ``categories`` ({id: name})."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    Image.new("RGB", (40, 20)).save(image_dir / "a.png")
    ann_file = tmp_path / "val.json"
    ann_file.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 20}],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [2, 2, 10, 8], "category_id": 7, "iscrowd": 0}],
        "categories": [{"id": i, "name": name} for i, name in categories.items()],
    }))
    return CocoDetection(image_dir, ann_file, TRANSFORM)


def test_evaluation_maps_labels_through_the_training_categories(tmp_path, caplog):
    """A model trained on categories (3, 7) says label 1 for category 7; a test set naming only 7 (and 9, which
    the model lacks) must score it as 7, not as its own second category."""
    test_set = _one_box_test_set(tmp_path, {7: "seven", 9: "nine"})
    cfg = _eval_config()
    trained_on = [3, 7]
    check_categories(trained_on, test_set)
    assert "categories the model has no label for (ids 9)" in caplog.text
    model = _FixedDetector(test_set, label=1).eval()
    metrics = evaluate(model, test_set, cfg, torch.device("cpu"), tmp_path, trained_on)
    assert json.loads((tmp_path / "coco_instances_results.json").read_text())[0]["category_id"] == 7
    assert metrics["bbox"]["AP50"] == pytest.approx(100.0)
    # a label with no category (a model with more classes than its training set) is dropped
    evaluate(_FixedDetector(test_set, label=2).eval(), test_set, cfg, torch.device("cpu"), tmp_path, trained_on)
    assert json.loads((tmp_path / "coco_instances_results.json").read_text()) == []


@pytest.mark.parametrize("annotations", [[], [{"id": 1, "image_id": 1, "bbox": [2, 2, 10, 8], "category_id": 7,
                                               "iscrowd": 1},
                                              {"id": 2, "image_id": 2, "bbox": [50, 5, 10, 10], "category_id": 3}]],
                         ids=["no annotations", "crowd and outside only"])
def test_a_training_set_without_boxes_names_the_file(tmp_path, annotations):
    image_dir, ann_file = _write_set(tmp_path, annotations)
    assert len(CocoDetection(image_dir, ann_file, TRANSFORM)) == 2  # a test set may have no boxes
    with pytest.raises(DatasetError, match=f"{ann_file}: none of its 2 images has a box to train on"):
        CocoDetection(image_dir, ann_file, TRANSFORM, remove_empty=True)


def test_rgb_transform_scales_to_unit_range_then_subtracts_the_mean_and_divides_by_the_std():
    # torchvision-style RGB input: pixels / 255 in RGB order, then (x - mean) / std per channel
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    transform = DetectionTransform([20], 100, 0.0, "RGB", mean, std)
    image = Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8) + np.array([51, 102, 204], dtype=np.uint8))
    pixels, _ = transform(image, torch.zeros(0, 4), None)
    expected = [(51 / 255 - 0.1) / 0.5, (102 / 255 - 0.2) / 0.25, (204 / 255 - 0.3) / 2.0]
    torch.testing.assert_close(pixels[:, 5, 7], torch.tensor(expected))


def test_bgr255_transform_subtracts_the_mean_then_divides_by_the_std():
    # caffe-style: BGR order in [0, 255], then (x - mean) / std with the std not 1
    transform = DetectionTransform([20], 100, 0.0, "BGR255", [1.0, 2.0, 3.0], [2.0, 4.0, 8.0])
    image = Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8) + np.array([10, 20, 30], dtype=np.uint8))
    pixels, _ = transform(image, torch.zeros(0, 4), None)
    torch.testing.assert_close(pixels[:, 0, 0], torch.tensor([(30 - 1) / 2, (20 - 2) / 4, (10 - 3) / 8]))


def test_evaluation_writes_coco_xywh_boxes(tmp_path):
    """Detections are x1,y1,x2,y2; COCO results are x,y,w,h: the ground truth [2, 2, 10, 8] detected exactly is
    written as itself and scores AP75 100 (read as x1,y1,x2,y2 it would be [2, 2, 12, 10], IoU 0.67)."""
    test_set = _one_box_test_set(tmp_path, {7: "seven"})
    cfg = _eval_config()
    metrics = evaluate(_FixedDetector(test_set, label=0).eval(), test_set, cfg, torch.device("cpu"), tmp_path)
    (result,) = json.loads((tmp_path / "coco_instances_results.json").read_text())
    assert result["bbox"] == [2, 2, 10, 8] and result["category_id"] == 7
    assert metrics["bbox"]["AP75"] == pytest.approx(100.0)


def test_evaluation_reports_each_iou_threshold_and_size_in_percent(tmp_path):
    """The ground truth [2, 2, 10, 8] (x, y, w, h; area 80, small) detected 2 pixels to the right: IoU 64 / 96 = 0.67,
    a hit at the IoU thresholds 0.5 to 0.65 and a miss at 0.7 to 0.95, so AP 4/10, AP50 1, AP75 0, APs as AP, no
    medium or large ground truth."""
    test_set = _one_box_test_set(tmp_path, {7: "seven"})
    metrics = evaluate(_FixedDetector(test_set, 0, box=[4.0, 2.0, 14.0, 10.0]).eval(), test_set, _eval_config(),
                       torch.device("cpu"), tmp_path)
    expected = {"AP": 40.0, "AP50": 100.0, "AP75": 0.0, "APs": 40.0, "APm": -1.0, "APl": -1.0}
    assert metrics == {"bbox": pytest.approx(expected)}
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


def test_evaluation_writes_plain_coco_results_rounded(tmp_path):
    """Each result holds only the four fields of COCO's results format (not those COCOeval's loadRes adds), the box to
    0.01 pixel and the score to 1e-5."""
    test_set = _one_box_test_set(tmp_path, {7: "seven"})
    model = _FixedDetector(test_set, 0, box=[2.25, 2.5, 12.75, 10.25], score=0.123456).eval()
    evaluate(model, test_set, _eval_config(), torch.device("cpu"), tmp_path)
    results = json.loads((tmp_path / "coco_instances_results.json").read_text())
    assert results == [{"image_id": 1, "category_id": 7, "bbox": [2.25, 2.5, 10.5, 7.75], "score": 0.12346}]


def test_evaluation_restores_training_mode_and_reports_skipped_images(tmp_path, caplog):
    image_dir, ann_file = _write_set(tmp_path, images=("a.png",))  # b.png is missing
    test_set = CocoDetection(image_dir, ann_file, TRANSFORM, skip_bad_images=True)
    model = _FixedDetector(test_set, 0, box=[2.0, 2.0, 12.0, 10.0]).train()
    with caplog.at_level(logging.WARNING):
        evaluate(model, test_set, _eval_config(), torch.device("cpu"), None)
    assert model.training
    assert f"skipping image {image_dir / 'b.png'}: file not found (1 skipped so far)" in caplog.text


def test_images_that_could_not_be_read_are_left_out_of_the_score(tmp_path, caplog):
    """b.png (category 3's only box) is missing and skipped: a.png's box detected exactly scores AP50 100 over the
    images that were read, not 50 with b's box counted as a miss; with no image read there is nothing to score."""
    image_dir, ann_file = _write_set(tmp_path, images=("a.png",))
    test_set = CocoDetection(image_dir, ann_file, TRANSFORM, skip_bad_images=True)
    model = _FixedDetector(test_set, 1, box=[2.0, 2.0, 12.0, 10.0])
    with caplog.at_level(logging.WARNING):
        metrics = evaluate(model, test_set, _eval_config(), torch.device("cpu"), None)
    assert metrics["bbox"]["AP50"] == pytest.approx(100.0)
    assert "scoring 1 of the 2 images: 1 could not be read" in caplog.text
    (image_dir / "a.png").unlink()
    with pytest.raises(DatasetError, match=f"{ann_file}: none of its 2 images could be read"):
        evaluate(model, test_set, _eval_config(), torch.device("cpu"), None)


def test_the_bad_image_count_is_of_all_batches(caplog):
    log = BadImageLog(logging.getLogger("test.bad_images"))
    with caplog.at_level(logging.WARNING):
        log.update([SkippedImage("a.png", "file not found")])
        log.update([SkippedImage("b.png", "cannot decode")])
    assert caplog.records[-1].getMessage() == "skipping image b.png: cannot decode (2 skipped so far)"


def test_a_set_without_images_is_an_error_for_the_test_split_too(tmp_path):
    """COCOeval scores a test split of no images -1 everywhere, which read as a finished evaluation."""
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "one"}]}))
    with pytest.raises(DatasetError, match=f"annotation file {ann_file} lists no images"):
        CocoDetection(tmp_path, ann_file, TRANSFORM)


def test_only_the_training_split_drops_images_without_boxes(tmp_path):
    """The test split keeps them: detections on an image without objects are false positives COCOeval must count."""
    from detectors.data.build import build_dataset

    image_dir, ann_file = _write_set(tmp_path, annotations=[
        {"id": 1, "image_id": 1, "bbox": [2, 2, 10, 8], "category_id": 7, "iscrowd": 0}])
    split = f"{{name: mine, image_dir: {image_dir}, ann_file: {ann_file}}}"
    cfg = load_config(None, [f"data.train={split}", f"data.test={split}"])
    assert [r["image_id"] for r in build_dataset(cfg, train=True).records] == [1]
    assert [r["image_id"] for r in build_dataset(cfg, train=False).records] == [1, 2]


def _set_of_orientations(tmp_path, sizes):
    """A set of one box per image, the images of (width, height) ``sizes``."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    images = []
    for i, (width, height) in enumerate(sizes, 1):
        Image.new("RGB", (width, height)).save(image_dir / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": width, "height": height})
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({
        "images": images, "categories": [{"id": 1, "name": "one"}],
        "annotations": [{"id": i, "image_id": i, "bbox": [1, 1, 5, 5], "category_id": 1}
                        for i in range(1, len(sizes) + 1)],
    }))
    return CocoDetection(image_dir, ann_file, TRANSFORM, remove_empty=True)


def test_the_train_loader_groups_by_aspect_ratio_only_when_asked(tmp_path):
    """Images 1, 2 landscape, 3, 4 portrait, 2 per batch. Grouped, every batch holds one orientation; not grouped,
    the batches are consecutive pairs of each epoch's randperm(4) (seed 0 + epoch)."""
    dataset = _set_of_orientations(tmp_path, [(40, 20), (40, 20), (20, 40), (20, 40)])
    portrait = [0, 0, 1, 1]
    grouped = load_config(None, ["solver.ims_per_batch=2", "seed=0", "data.num_workers=0"])
    batches = iter(build_train_loader(grouped, dataset, 0, 1, 0).batch_sampler)
    assert all(len({portrait[i] for i, _ in next(batches)}) == 1 for _ in range(8))
    plain = load_config(None, ["solver.ims_per_batch=2", "seed=0", "data.num_workers=0",
                               "data.aspect_ratio_grouping=false"])
    batches = iter(build_train_loader(plain, dataset, 0, 1, 0).batch_sampler)
    got = [[i for i, _ in next(batches)] for _ in range(4)]
    orders = [torch.randperm(4, generator=torch.Generator().manual_seed(epoch)).tolist() for epoch in range(2)]
    assert got == [order[k:k + 2] for order in orders for k in (0, 2)]


def test_each_process_takes_its_share_of_the_batch(tmp_path):
    dataset = _set_of_orientations(tmp_path, [(40, 20)] * 4)
    cfg = load_config(None, ["solver.ims_per_batch=4", "data.num_workers=0"])
    assert [len(next(iter(build_train_loader(cfg, dataset, rank, 2, 0).batch_sampler))) for rank in (0, 1)] == [2, 2]
    with pytest.raises(ConfigError, match="solver.ims_per_batch=4 is not divisible by 3 processes"):
        build_train_loader(cfg, dataset, 0, 3, 0)


def test_the_test_loader_takes_test_ims_per_batch_images_per_batch(tmp_path):
    from detectors.data.build import build_test_loader

    dataset = _set_of_orientations(tmp_path, [(40, 20)] * 3)
    cfg = load_config(None, ["solver.ims_per_batch=4", "data.test_ims_per_batch=2", "data.num_workers=0"])
    assert list(build_test_loader(cfg, dataset, 0, 1).batch_sampler) == [[0, 1], [2]]
    assert list(build_test_loader(cfg, dataset, 1, 2).batch_sampler) == [[1]]


def test_the_loaders_pad_to_the_configs_size_divisibility_and_skip_as_it_says(tmp_path):
    from detectors.data.build import build_dataset, build_test_loader

    image_dir, ann_file = _write_set(tmp_path, images=("a.png",))  # b.png is missing
    split = f"{{name: mine, image_dir: {image_dir}, ann_file: {ann_file}}}"
    cfg = load_config(None, [f"data.test={split}", "data.num_workers=0", "data.input.size_divisibility=32",
                             "data.input.min_size_test=32", "data.input.max_size_test=64", "data.skip_bad_images=true"])
    batches = list(build_test_loader(cfg, build_dataset(cfg, train=False), 0, 1))
    assert batches[0]["images"].shape == (1, 3, 32, 64)  # 32 x 64, already multiples of 32
    assert batches[1]["images"] is None and [s.path for s in batches[1]["skipped"]] == [str(image_dir / "b.png")]


def test_the_train_loader_leaves_the_global_rng_alone_and_its_workers_ignore_stop_signals(tmp_path):
    """A loader's iterator draws its workers' base seed from its own generator: drawn from torch's global one, it
    would shift the model's random stream on resume. Its workers leave SIGINT/SIGTERM to the main process."""
    dataset = _set_of_orientations(tmp_path, [(40, 20)] * 2)
    loader = build_train_loader(load_config(None, ["solver.ims_per_batch=2", "data.num_workers=0"]), dataset, 0, 1, 0)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        loader.worker_init_fn(0)
        assert [signal.getsignal(s) for s in previous] == [signal.SIG_IGN, signal.SIG_IGN]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_WORKER_ERROR_SCRIPT = """
from torch.utils.data import DataLoader
from detectors.data.build import _ignore_stop_signals

class Bad:
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise ValueError("bad item")

try:
    next(iter(DataLoader(Bad(), num_workers=1, worker_init_fn=_ignore_stop_signals)))
except ValueError:
    pass
"""


def test_a_process_whose_loader_worker_failed_exits(tmp_path):
    """An error in a worker leaves the loader's iterator alive in its traceback's frames until the process exits,
    where multiprocessing's SIGTERM, which the workers ignore, left the exit waiting for them forever."""
    script = tmp_path / "worker_error.py"
    script.write_text(_WORKER_ERROR_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # this checkout's detectors
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr  # nor torch's worker-killed error


def test_an_image_error_from_a_loader_worker_is_one_line_from_the_cli(tmp_path, capsys, monkeypatch):
    """torch raises a worker's error again in the main process with the worker's traceback as its message; dyhead
    prints the error's own line, as with data.num_workers=0."""
    from torch._utils import ExceptionWrapper

    import detectors.cli as cli

    def eval_in_a_worker(cfg, args):
        try:
            raise ImageLoadError("image b.png: file not found")
        except ImageLoadError:
            ExceptionWrapper(where="in DataLoader worker process 0").reraise()

    monkeypatch.setattr(cli, "_eval", eval_in_a_worker)
    config = Path(__file__).resolve().parents[2] / "configs" / "shapes_tiny.yaml"
    code = cli.main(["eval", "--config", str(config), "--weights", "w.pth", "--output-dir", str(tmp_path / "out")])
    assert (code, capsys.readouterr().err) == (2, "dyhead eval: error: image b.png: file not found\n")


def test_the_shapes_cache_folder_is_named_by_the_parameters_and_the_generator_version(tmp_path, monkeypatch):
    """Same parameters, same folder (whatever the root); another parameter or generator version, another folder: a
    set from an older generator must not be reused."""
    import detectors.data.shapes as shapes

    cfg = ShapesConfig(root=str(tmp_path))
    folder = shapes.shapes_root(cfg)
    assert folder.parent == tmp_path and shapes.shapes_root(ShapesConfig(root=str(tmp_path))) == folder
    assert shapes.shapes_root(ShapesConfig(root=str(tmp_path / "x"))).name == folder.name
    assert shapes.shapes_root(ShapesConfig(root=str(tmp_path), seed=cfg.seed + 1)) != folder
    monkeypatch.setattr(shapes, "_GENERATOR_VERSION", shapes._GENERATOR_VERSION + 1)
    assert shapes.shapes_root(cfg) != folder
