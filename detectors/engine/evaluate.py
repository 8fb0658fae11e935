"""COCO bbox evaluation of a detector, sharded over processes and gathered on the main one."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from tqdm import tqdm

from ..config import Config
from ..data.build import build_test_loader
from ..data.coco import CocoDetection, DatasetError
from .checkpoint import write_atomically
from .distributed import all_gather_objects, get_rank, get_world_size, is_main_process

__all__ = ["evaluate", "check_categories", "coco_metrics", "write_json", "autocast", "BadImageLog"]

logger = logging.getLogger("detectors.evaluate")

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when ``enabled``; a no-op context on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def write_json(path: Path, obj) -> None:
    """Writes JSON through `write_atomically`."""
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj)))


class BadImageLog:
    """Warns once per unreadable image (when skipping them is enabled) and counts them."""

    def __init__(self, log: logging.Logger):
        self.log = log
        self.seen: set[str] = set()

    def update(self, skipped: list) -> None:
        """Records a batch's ``SkippedImage`` s."""
        for item in skipped:
            if item.path not in self.seen:
                self.seen.add(item.path)
                self.log.warning("skipping image %s: %s (%d skipped so far)", item.path, item.reason, len(self.seen))


def coco_metrics(
    dataset: CocoDetection, results: list[dict], skipped: set = frozenset()
) -> dict[str, dict[str, float]]:
    """Runs ``COCOeval`` (bbox) and returns ``{"bbox": {AP, AP50, AP75, APs, APm, APl}}`` in percent.

    A metric COCOeval cannot compute (no ground truth of that size) is reported as -1, as COCOeval does.
    skipped: ids of images that were not read (``data.skip_bad_images``), left out of the score: counted, their
    objects would be misses of a detector that never saw them.
    """
    image_ids = [r["image_id"] for r in dataset.records if r["image_id"] not in skipped]
    if not image_ids:
        raise DatasetError(f"{dataset.ann_file}: none of its {len(dataset.records)} images could be read, nothing "
                           "to score (data.skip_bad_images skipped them all)")
    if skipped:
        logger.warning("scoring %d of the %d images: %d could not be read", len(image_ids), len(dataset.records),
                       len(skipped))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # pycocotools prints its tables
        if results:
            coco_dt = dataset.coco.loadRes([dict(r) for r in results])  # loadRes adds keys to the dicts
        else:  # loadRes cannot read an empty list; no detections still scores 0, or -1 where no ground truth
            coco_dt = COCO()
            coco_dt.dataset = {"images": dataset.coco.dataset["images"],
                               "categories": dataset.coco.dataset["categories"], "annotations": []}
            coco_dt.createIndex()
        coco_eval = COCOeval(dataset.coco, coco_dt, "bbox")
        coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    logger.info("COCOeval bbox:\n%s", out.getvalue().split("DONE")[-1].strip())
    stats = coco_eval.stats[: len(METRIC_NAMES)]
    return {"bbox": {name: float(v * 100) if v >= 0 else -1.0 for name, v in zip(METRIC_NAMES, stats)}}


def check_categories(category_ids: list[int], dataset: CocoDetection) -> None:
    """Warns when ``dataset`` has categories that no label of the model (``category_ids``) stands for."""
    missing = sorted(set(dataset.category_ids) - set(category_ids))
    if missing:
        logger.warning("%s has categories the model has no label for (ids %s): their AP is 0",
                       dataset.ann_file, ", ".join(map(str, missing)))


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: CocoDetection, cfg: Config, device: torch.device, output_dir: Path | None,
    category_ids: list[int] | None = None,
) -> dict[str, dict[str, float]]:
    """Detects on every test image and scores the detections.

    Each process runs its share of the images; the main process gathers all detections, writes
    ``coco_instances_results.json`` and ``metrics.json`` to ``output_dir`` (when given) and returns the
    metrics; the other processes return an empty dict.

    category_ids: the dataset category id of each model label, i.e. the training set's ``category_ids``; None
    takes the test set's, the same list where both splits name the same categories. Detections of a label
    past its end (a model with more classes than categories) are dropped.
    """
    if category_ids is None:
        category_ids = dataset.category_ids
    loader = build_test_loader(cfg, dataset, get_rank(), get_world_size())
    was_training = model.training
    model.eval()
    bad_images = BadImageLog(logger)
    results, skipped = [], []
    for batch in tqdm(loader, desc="eval", disable=not is_main_process(), dynamic_ncols=True, leave=False):
        bad_images.update(batch["skipped"])
        skipped += [item.image_id for item in batch["skipped"]]
        if batch["images"] is None:
            continue
        with autocast(device, cfg.solver.amp):
            detections = model(
                batch["images"].to(device),
                batch["image_sizes"],
                original_sizes=[t["orig_size"] for t in batch["targets"]],
            )
        for det, target in zip(detections, batch["targets"]):
            boxes = det["boxes"].float().cpu()
            boxes[:, 2:] -= boxes[:, :2]  # COCO results are x, y, w, h
            for box, score, label in zip(boxes.tolist(), det["scores"].float().tolist(), det["labels"].tolist()):
                if label >= len(category_ids):
                    continue
                results.append(
                    {
                        "image_id": target["image_id"],
                        "category_id": category_ids[label],
                        "bbox": [round(v, 2) for v in box],
                        "score": round(score, 5),
                    }
                )
    model.train(was_training)
    parts = all_gather_objects((results, skipped))
    if not is_main_process():
        return {}
    gathered = [r for part, _ in parts for r in part]
    metrics = coco_metrics(dataset, gathered, {i for _, ids in parts for i in ids})
    if output_dir is not None:
        write_json(output_dir / "coco_instances_results.json", gathered)
        write_json(output_dir / "metrics.json", metrics)
    logger.info("bbox: %s", ", ".join(f"{k} {v:.2f}" for k, v in metrics["bbox"].items()))
    return metrics
