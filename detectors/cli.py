"""The ``dyhead`` command: ``train``, ``eval``, ``predict``, ``convert`` and ``bench``."""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import signal
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .build import build_detector
from .config import Config, ConfigError, load_config
from .data.build import build_dataset
from .data.coco import DatasetError, ImageLoadError, read_rgb_image
from .data.coco_categories import COCO_CATEGORIES
from .data.transforms import DetectionTransform, pad_batch
from .engine.checkpoint import (CheckpointError, last_checkpoint, load_matching_state, load_model_weights,
                                write_atomically)
from .engine.evaluate import autocast, check_categories, evaluate, write_json
from .engine.logger import setup_logging
from .engine.stop import TrainingInterrupted
from .engine.train import FINAL_CHECKPOINT, setup_runtime, train

__all__ = ["main", "build_parser"]

logger = logging.getLogger("detectors.cli")


def _score(text: str) -> float:
    """--score-thresh: a score in [0, 1], as model.score_thresh (else argparse's error): NaN or one past 1 drops
    every detection without a word, and one below 0 would pass on to the model as its threshold."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a score in [0, 1], got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dyhead``."""
    parser = argparse.ArgumentParser(
        prog="dyhead", description="Train, evaluate and run DyHead detectors (ATSS, RetinaNet, Faster R-CNN)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, output_help: str) -> None:
        p.add_argument("--config", required=True, help="YAML config file, e.g. configs/shapes_tiny.yaml")
        p.add_argument("--output-dir", type=Path, default=Path("out"), help=output_help)
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config field (dotted key, YAML value); repeatable",
        )

    p = sub.add_parser("train", help="train, then evaluate on the test split")
    common(p, "folder for checkpoints, logs and metrics")
    p.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
    p = sub.add_parser("eval", help="evaluate weights on the test split (COCO bbox metrics)")
    common(p, "folder for metrics.json and the detections")
    p.add_argument("--weights", required=True, type=Path, help="checkpoint or state dict")
    p = sub.add_parser(
        "predict", help="detect objects in images; writes a PNG with boxes and a JSON per image",
        # the JSON's boxes are corners, not COCO's x, y, width, height (eval's results): say so where it is read
        description="Detect objects in images. For each image DIR/NAME.EXT, writes OUTPUT_DIR/NAME.png (the image "
        "upright, with each detection's box, class name and score) and OUTPUT_DIR/NAME.json: {\"image\": path, "
        "\"detections\": [{\"box\": [x1, y1, x2, y2], \"score\", \"label\": class name, \"category_id\": the "
        "training set's id}]}, boxes by their corners in the original image's pixels (dyhead eval writes COCO's [x, "
        "y, width, height]). Weights that record no categories (a bare state dict) give each label's index as its "
        "name and id.",
    )
    common(p, "folder for the annotated images and JSON files")
    p.add_argument("--weights", required=True, type=Path, help="checkpoint or state dict")
    p.add_argument("--score-thresh", type=_score, default=0.2,
                   help="lowest score drawn and written (below model.score_thresh, the model's too)")
    p.add_argument("images", nargs="+", type=Path,
                   help="image files, folders of them, or quoted glob patterns ('photos/*.jpg')")
    p = sub.add_parser(
        "convert",
        help="official or mmdetection DyHead weights -> a state dict of dyhead.DyHead; with --detector, one of the "
        "release's whole detector checkpoints -> weights for dyhead eval/predict",
        description="Without --detector: the DyHead tower of an official (detectron2) or mmdetection checkpoint -> "
        "a state dict of dyhead.DyHead. With --detector: a whole microsoft/DynamicHead checkpoint (ATSS R50 or "
        "Swin-T, RetinaNet R50 or Faster R-CNN R50: backbone, FPN, DyHead and head) -> a checkpoint that the "
        "detector of --config loads strictly (the config that fits is named when another one is given). Evaluate "
        "it with the release's input settings that the command prints, e.g. for the R50 models dyhead eval "
        "--config configs/atss_r50_dyhead_1x.yaml --weights OUT.pth --set "
        "model.backbone.stride_in_1x1=true --set data.input.format=BGR255 --set "
        "'data.input.pixel_mean=[103.53,116.28,123.675]' --set 'data.input.pixel_std=[1.0,1.0,1.0]' "
        "(each config's header lists them). The output is written through a temporary file.",
    )
    p.add_argument("weights", type=Path, help="official (detectron2) or mmdetection checkpoint")
    p.add_argument("output", type=Path, help="where to write the converted state dict (.pth)")
    p.add_argument(
        "--detector", action="store_true",
        help="convert the whole official detector (backbone, FPN, DyHead, head), not just DyHead",
    )
    p.add_argument(
        "--config", help="with --detector: the config whose model the weights must fit exactly (default: the "
        "built-in defaults, the paper's ATSS R50, as configs/atss_r50_dyhead_1x.yaml)",
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="with --detector: override a field of that config; repeatable",
    )
    sub.add_parser("bench", help="kernel benchmarks; the arguments of python -m benchmarks.run follow", add_help=False)
    return parser


def _load_model(cfg: Config, weights: Path, num_classes: int | None, device: torch.device,
                loaded: tuple[dict, dict] | None = None):
    """The detector of cfg with the weights loaded, on device in eval mode, and the weights' metadata.
    num_classes: the dataset's, where there is one (config and metadata come first); loaded: what
    `load_model_weights(weights)` returned, when it was read already."""
    state, meta = loaded or load_model_weights(weights)
    num_classes = _recorded_classes(cfg, meta) or num_classes
    if num_classes is None:
        raise ConfigError(f"{weights} does not record its class count; set model.num_classes")
    _warn_on_settings(cfg, meta.get("release_settings", {}), weights)
    # The weights hold the backbone's: its pretrained ones would be read (or downloaded) only to be replaced.
    model_cfg = dataclasses.replace(cfg.model, backbone=dataclasses.replace(cfg.model.backbone, weights=None))
    model = build_detector(model_cfg, num_classes)
    load_matching_state(model, state, weights)
    return model.to(device).eval(), meta


def _recorded_classes(cfg: Config, meta: dict) -> int | None:
    """The class count that the config, then the weights' metadata, give (a dataset's comes after them)."""
    return cfg.model.num_classes or meta.get("num_classes")


def _warn_on_settings(cfg: Config, settings: dict, weights: Path) -> None:
    """Warns when weights converted from the release meet a config without the settings they were trained with."""
    differ = {}
    for key, value in settings.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if node != value:
            differ[key] = value
    if differ:
        logger.warning(
            "%s holds the release's weights, which expect other settings than this config; add %s",
            weights, _set_flags(differ),
        )


def _set_flags(settings: dict) -> str:
    """``--set`` flags for ``{dotted key: value}``, quoted for a shell."""
    def as_yaml(value):
        return json.dumps(value) if isinstance(value, (bool, list)) else str(value)

    return " ".join(f"--set '{key}={as_yaml(value)}'" for key, value in settings.items())


def _eval(cfg: Config, args: argparse.Namespace) -> None:
    device = setup_runtime(cfg)
    # The weights are read, and fitted to the model where the class count is known without the data, before the
    # data is read (seconds for COCO's annotations) or generated (minutes for a shapes set).
    loaded = load_model_weights(args.weights)
    model = meta = None
    if _recorded_classes(cfg, loaded[1]):
        model, meta = _load_model(cfg, args.weights, None, device, loaded)
    test_set = build_dataset(cfg, train=False)
    if model is None:  # a bare state dict: the test set's class count
        model, meta = _load_model(cfg, args.weights, len(test_set.category_ids), device, loaded)
    # weights that record no categories (a bare state dict) take the test set's, in id order
    category_ids = meta.get("category_ids") or test_set.category_ids
    check_categories(category_ids, test_set)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    evaluate(model, test_set, cfg, device, args.output_dir, category_ids)


def _check_output_dir(folder: Path, argument: str) -> None:
    """ConfigError naming ``argument`` (the option and its value) when ``folder``, or the nearest of the folders
    above it that exists, is a file, or when no file can be created there: making or writing the folder would end
    in a traceback (predict's after the model was built, convert's after the input was read)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{argument}: {existing} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()  # a file without a name once closed: nothing is left
    except OSError as exc:
        raise ConfigError(f"{argument}: cannot write in {existing} ({exc.strerror})") from None


def _predict_inputs(paths: list[Path], output_dir: Path) -> list[Path]:
    """The image files predict runs on, checked before the model loads: files as given, each folder's image
    files and each glob pattern's in name order, each file once. Two with one name would write the same outputs,
    none may be one of its outputs, and no output may be a folder."""
    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}

    def images_among(candidates) -> list[Path]:
        return sorted(p for p in candidates if p.suffix.lower() in extensions and p.is_file())

    files = []
    for path in paths:
        if path.is_dir():
            found = images_among(path.iterdir())
            if not found:
                raise ImageLoadError(f"folder {path} holds no image files")
            files += found
        elif path.is_file():
            files.append(path)
        elif any(c in str(path) for c in "*?["):  # quoted, so the shell left it: detectron2's demo takes these too
            found = images_among(map(Path, glob.glob(str(path))))
            if not found:
                raise ImageLoadError(f"pattern {path} matches no image files")
            files += found
        else:
            raise ImageLoadError(f"image {path}: file not found")
    first_of = {}
    for path in files:
        earlier = first_of.setdefault(path.stem, path)
        if earlier.resolve() != path.resolve():  # else one image named twice (a file and its folder...): kept once
            raise ConfigError(f"images {earlier} and {path} would both write {path.stem}.png and {path.stem}.json "
                              f"in {output_dir}; predict them into separate folders")
        if (output_dir / f"{path.stem}.png").resolve() == path.resolve():
            raise ConfigError(f"image {path} would be overwritten by its annotated copy; choose another --output-dir")
        taken = [out for out in (output_dir / f"{path.stem}.png", output_dir / f"{path.stem}.json") if out.is_dir()]
        if taken:
            raise ConfigError(f"image {path} would write {taken[0]}, which is a folder; choose another --output-dir")
    return list(first_of.values())


@torch.no_grad()
def _predict(cfg: Config, args: argparse.Namespace) -> None:
    device = setup_runtime(cfg)
    images = _predict_inputs(args.images, args.output_dir)
    # The model drops scores below its own threshold before they get here: a lower --score-thresh lowers it too
    # (as detectron2's demo does), else it would silently act as model.score_thresh.
    if args.score_thresh < cfg.model.score_thresh:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, score_thresh=args.score_thresh))
    model, meta = _load_model(cfg, args.weights, None, device)
    names = meta.get("class_names") or [str(i) for i in range(model.num_classes)]
    category_ids = meta.get("category_ids") or list(range(model.num_classes))
    transform = DetectionTransform.from_config(cfg.data.input, train=False)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    skipped = 0
    for path in images:
        try:
            image = read_rgb_image(path)
        except (OSError, ValueError) as exc:
            if not cfg.data.skip_bad_images:
                raise ImageLoadError(f"image {path}: cannot read ({exc}); data.skip_bad_images=true predicts the "
                                     "others") from None
            logger.warning("image %s: cannot read (%s); skipped", path, exc)
            skipped += 1
            continue
        pixels, _ = transform(image, torch.zeros(0, 4), None)
        with autocast(device, cfg.solver.amp):
            (det,) = model(
                pad_batch([pixels], cfg.data.input.size_divisibility).to(device),
                [tuple(pixels.shape[1:])],
                original_sizes=[(image.height, image.width)],
            )
        keep = (det["scores"] >= args.score_thresh) & (det["labels"] < len(category_ids))  # as evaluate does
        records = [
            {"box": [round(v, 2) for v in box], "score": round(score, 4), "label": names[label],
             "category_id": category_ids[label]}
            for box, score, label in zip(
                det["boxes"][keep].float().tolist(), det["scores"][keep].float().tolist(), det["labels"][keep].tolist()
            )
        ]
        draw = ImageDraw.Draw(image)
        for r in records:
            draw.rectangle(r["box"], outline=(255, 0, 0), width=2)
            draw.text((r["box"][0] + 2, r["box"][1] + 1), f"{r['label']} {r['score']:.2f}", fill=(255, 255, 0))
        # through temporaries: Ctrl-C (or a full disk) mid-write leaves no cut-off PNG or JSON under the name
        write_atomically(args.output_dir / f"{path.stem}.png", lambda tmp: image.save(tmp, format="PNG"))
        write_json(args.output_dir / f"{path.stem}.json", {"image": str(path), "detections": records})
        logger.info("%s: %d detections -> %s", path, len(records), args.output_dir / f"{path.stem}.png")
    if skipped:
        logger.warning("predicted %d of %d images; %d could not be read", len(images) - skipped, len(images), skipped)


def _save_atomic(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: torch.save(obj, tmp))


def _convert(args: argparse.Namespace) -> None:
    from dyhead import load_official

    if args.output.is_dir():
        raise ConfigError(f"output {args.output} is a folder; give the file to write")
    _check_output_dir(args.output.parent, f"output {args.output}")
    if args.detector:
        _convert_detector(args)
        return
    if args.config or args.overrides:
        raise ConfigError("--config and --set apply to --detector only")
    state = load_official(args.weights)
    blocks = 1 + max(int(key.split(".")[1]) for key in state)
    _save_atomic(state, args.output)
    logger.info("%s: %d tensors of %d DyHead blocks -> %s", args.weights, len(state), blocks, args.output)


def _convert_detector(args: argparse.Namespace) -> None:
    from .official_weights import load_official_detector

    cfg = load_config(args.config, args.overrides)
    release = load_official_detector(args.weights, cfg.model)
    meta = {"num_classes": release.num_classes, "release_settings": release.settings}
    if release.num_classes == len(COCO_CATEGORIES):  # the release trained on COCO: its labels are COCO's, by id
        meta["category_ids"] = [category_id for category_id, _ in COCO_CATEGORIES]
        meta["class_names"] = [name for _, name in COCO_CATEGORIES]
    _save_atomic({"model": release.state, "meta": meta}, args.output)
    logger.info(
        "%s: %d tensors of a %s + DyHead detector with %d classes -> %s; evaluate it with %s",
        args.weights, len(release.state), release.architecture, release.num_classes, args.output,
        _set_flags(release.settings),
    )


def _interrupted(args: argparse.Namespace) -> str:
    """The line for a command that SIGINT ended; for train, what ``--resume`` does from the output folder's
    last checkpoint (`FINAL_CHECKPOINT`: training finished and only the final evaluation is left)."""
    if args.command != "train":
        return f"dyhead {args.command}: interrupted by SIGINT"
    try:
        checkpoint = last_checkpoint(args.output_dir)
    except FileNotFoundError:  # the pointer names a file that is gone: --resume will say so
        checkpoint = None
    if checkpoint is None:
        return "dyhead train: interrupted by SIGINT before the first checkpoint"
    if checkpoint.name == FINAL_CHECKPOINT:
        return (f"dyhead train: interrupted by SIGINT after training; {checkpoint} is saved: --resume runs the "
                "final evaluation")
    return f"dyhead train: interrupted by SIGINT; --resume continues from {checkpoint}"


def _message(exc: Exception) -> str:
    """exc's message. An error raised in a DataLoader worker comes back to the main process as one of its type whose
    message is the worker's whole traceback, which ends in the error's own line: that line is the message."""
    text = str(exc)
    own_line = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    if text.startswith(f"Caught {type(exc).__name__} in DataLoader worker") and own_line in text:
        return text.rsplit(own_line, 1)[1].rstrip("\n")
    return text


def main(argv: list[str] | None = None) -> int:
    """Runs ``dyhead``; returns the exit status (2 for configuration and data errors, reported in one line;
    128 + the signal's number for a training stopped by SIGINT/SIGTERM, after its checkpoint; 130 for any
    other SIGINT, also reported in one line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        # The benchmarks own their options; a package that detectors do not otherwise depend on.
        from benchmarks.run import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "convert":
            setup_logging(None, main_process=True)
            try:
                _convert(args)
            except ValueError as exc:  # not a checkpoint, or no DyHead keys: the message names the file
                raise ConfigError(str(exc)) from None
            return 0
        cfg = load_config(args.config, args.overrides)
        _check_output_dir(args.output_dir, f"--output-dir {args.output_dir}")
        if args.command == "train":
            try:
                train(cfg, args.output_dir, resume=args.resume)
            except TrainingInterrupted as stop:
                sys.stderr.write(f"dyhead train: {stop}\n")
                return 128 + stop.signum  # the shell's code for a process ended by that signal
            return 0
        setup_logging(args.output_dir if args.command == "eval" else None, main_process=True)
        if args.command == "eval":
            _eval(cfg, args)
        else:
            _predict(cfg, args)
    except (ConfigError, CheckpointError, DatasetError, ImageLoadError, FileNotFoundError) as exc:
        sys.stderr.write(f"dyhead {args.command}: error: {_message(exc)}\n")
        return 2
    except KeyboardInterrupt:
        # Where the training loop's own handler is not installed (eval, predict, convert, train's setup and final
        # evaluation) or after its second SIGINT: a line instead of a traceback.
        sys.stderr.write(_interrupted(args) + "\n")
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
