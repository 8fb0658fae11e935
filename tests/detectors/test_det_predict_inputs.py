"""What ``dyhead predict`` runs on: files and folders of images, checked before the model loads."""

import os
from pathlib import Path

import pytest
from PIL import Image

from detectors.cli import _predict_inputs, main
from detectors.config import ConfigError
from detectors.data.coco import ImageLoadError

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "shapes_tiny.yaml"


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6)).save(path)
    return path


def test_folders_give_their_images_in_name_order(tmp_path):
    b, a = _image(tmp_path / "in" / "b.jpg"), _image(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "sub.png").mkdir()
    c = _image(tmp_path / "c.PNG")
    assert _predict_inputs([c, tmp_path / "in"], tmp_path / "out") == [c, a, b]


def test_quoted_glob_patterns_give_their_images_in_name_order(tmp_path):
    """As detectron2's demo takes them ('photos/*.jpg'): the shell leaves a quoted pattern to predict."""
    b, a = _image(tmp_path / "in" / "b.jpg"), _image(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    assert _predict_inputs([tmp_path / "in" / "*"], tmp_path / "out") == [a, b]
    assert _predict_inputs([tmp_path / "in" / "?.jpg"], tmp_path / "out") == [b]
    with pytest.raises(ImageLoadError, match=r"pattern .*\*\.gif matches no image files"):
        _predict_inputs([tmp_path / "in" / "*.gif"], tmp_path / "out")


def test_an_image_named_twice_is_predicted_once(tmp_path):
    """By itself and in its folder, twice as given, or through a path of another spelling: one image, whose
    outputs collide with nothing, in the place it was first named."""
    b, a = _image(tmp_path / "in" / "b.jpg"), _image(tmp_path / "in" / "a.png")
    again = tmp_path / "in" / ".." / "in" / "b.jpg"
    assert _predict_inputs([b, tmp_path / "in", b, again, tmp_path / "in" / "*.png"], tmp_path / "out") == [b, a]


def test_bad_inputs_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageLoadError, match=f"folder {tmp_path / 'empty'} holds no image files"):
        _predict_inputs([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(ImageLoadError, match=f"image {tmp_path / 'x.png'}: file not found"):
        _predict_inputs([tmp_path / "x.png"], tmp_path / "out")
    one, other = _image(tmp_path / "a" / "x.png"), _image(tmp_path / "b" / "x.jpg")
    with pytest.raises(ConfigError, match=f"images {one} and {other} would both write x.png and x.json"):
        _predict_inputs([one, other], tmp_path / "out")
    with pytest.raises(ConfigError, match=f"image {one} would be overwritten by its annotated copy"):
        _predict_inputs([one], tmp_path / "a")
    (tmp_path / "out" / "x.json").mkdir(parents=True)  # else the rename onto it is IsADirectoryError's traceback
    with pytest.raises(ConfigError, match=f"image {one} would write {tmp_path / 'out' / 'x.json'}, which is a folder"):
        _predict_inputs([one], tmp_path / "out")


def test_cli_names_a_missing_image_before_reading_weights(tmp_path, capsys):
    code = main(["predict", "--config", str(CONFIG), "--weights", str(tmp_path / "none.pth"), "--output-dir",
                 str(tmp_path / "out"), str(tmp_path / "missing.png")])
    err = capsys.readouterr().err
    assert code == 2 and f"dyhead predict: error: image {tmp_path / 'missing.png'}: file not found" in err


def _writing_to(output_dir, command, tmp_path, image):
    """dyhead train, eval or predict of shapes_tiny (its data under tmp_path) into output_dir; image is eval's and
    predict's weights, and predict's input."""
    argv = [command, "--config", str(CONFIG), "--set", f"data.shapes.root={tmp_path / 'data'}", "--output-dir",
            str(output_dir)]
    inputs = {"train": [], "eval": ["--weights", str(image)], "predict": ["--weights", str(image), str(image)]}
    return argv + inputs[command]


@pytest.mark.parametrize("command", ["train", "eval", "predict"])
def test_an_output_dir_that_is_a_file_is_named(tmp_path, capsys, command):
    """A file where --output-dir (or a folder above it) would go: one line naming it, before any slow work, not
    mkdir's traceback after the model was built."""
    (tmp_path / "taken").write_text("a file")
    image = _image(tmp_path / "x.png")
    for output_dir in (tmp_path / "taken", tmp_path / "taken" / "out"):
        code = main(_writing_to(output_dir, command, tmp_path, image))
        err = capsys.readouterr().err
        assert code == 2 and err == (f"dyhead {command}: error: --output-dir {output_dir}: {tmp_path / 'taken'} is a "
                                     "file, not a folder\n")
    assert not (tmp_path / "data").exists()


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder where no file can be created: read-only by its mode, or for root (who ignores modes) /sys, whose
    file system refuses new files to everyone."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        folder = Path("/sys")
        if not folder.is_dir():
            pytest.skip("running as root without /sys: no folder refuses new files")
    yield folder
    (tmp_path / "read-only").chmod(0o755)


@pytest.mark.parametrize("command", ["train", "eval", "predict", "convert"])
def test_an_output_folder_that_cannot_be_written_is_named(tmp_path, capsys, unwritable_folder, command):
    """An output folder that cannot be made or written in: one line naming it and the folder that refuses, before
    any data is made or weights read, not a PermissionError (or torch.save's RuntimeError) traceback at the first
    write; nothing is left behind."""
    image = _image(tmp_path / "x.png")
    for output_dir in (unwritable_folder, unwritable_folder / "out"):
        if command == "convert":
            argv, argument = ["convert", str(image), str(output_dir / "y.pth")], f"output {output_dir / 'y.pth'}"
        else:
            argv, argument = _writing_to(output_dir, command, tmp_path, image), f"--output-dir {output_dir}"
        code = main(argv)
        err = capsys.readouterr().err
        refused = f"dyhead {command}: error: {argument}: cannot write in {unwritable_folder} ("
        assert code == 2 and err.startswith(refused) and err.endswith(")\n") and "\n" not in err[:-1]
        assert not (unwritable_folder / "out").exists()
    assert not (tmp_path / "data").exists()


def test_help_documents_the_json_per_image(capsys):
    """Its boxes are corners, where eval's COCO results are x, y, width, height: a reader must not have to guess."""
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert '"box": [x1, y1, x2, y2]' in text and '"category_id"' in text and "original image's pixels" in text


def test_a_score_thresh_below_the_models_keeps_those_detections(tmp_path):
    """--score-thresh is the lowest score written, also below model.score_thresh (0.05), which the model would
    otherwise apply first (as detectron2's demo lowers the model's threshold): an untrained model scores ~0.01."""
    import dataclasses
    import json

    import torch

    from detectors.build import build_detector
    from detectors.config import load_config

    cfg = load_config(CONFIG)
    torch.manual_seed(0)
    model = build_detector(dataclasses.replace(cfg.model, backbone=dataclasses.replace(cfg.model.backbone,
                                                                                       weights=None)), 4)
    weights = tmp_path / "w.pth"
    torch.save({"model": model.state_dict(), "meta": {"num_classes": 4}}, weights)
    image = _image(tmp_path / "x.png")
    argv = ["predict", "--config", str(CONFIG), "--weights", str(weights), "--output-dir", str(tmp_path / "out")]
    assert main(argv + ["--score-thresh", "0.001", str(image)]) == 0
    scores = [d["score"] for d in json.loads((tmp_path / "out" / "x.json").read_text())["detections"]]
    assert scores and min(scores) < cfg.model.score_thresh


@pytest.mark.parametrize("value", ["nan", "inf", "1.5", "-0.1", "high"])
def test_a_score_thresh_outside_0_to_1_is_an_argparse_error(tmp_path, capsys, value):
    """NaN or a threshold past 1 would write every image without its detections, one below 0 would become the
    model's own threshold: refused as model.score_thresh is, before anything is read."""
    image = _image(tmp_path / "x.png")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", str(CONFIG), "--weights", str(tmp_path / "none.pth"), "--output-dir",
              str(tmp_path / "out"), f"--score-thresh={value}", str(image)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument --score-thresh: expected a score in [0, 1], got '{value}'" in err
    assert not (tmp_path / "out").exists()


def test_predict_drops_labels_past_the_recorded_categories(tmp_path):
    """A model with more outputs than the weights' categories (model.num_classes above the training set's count):
    its extra labels have no class name or id, and predict leaves them out, as evaluate does."""
    import dataclasses
    import json

    import torch

    from detectors.build import build_detector
    from detectors.config import load_config

    cfg = load_config(CONFIG)
    torch.manual_seed(0)
    model = build_detector(dataclasses.replace(cfg.model, backbone=dataclasses.replace(cfg.model.backbone,
                                                                                       weights=None)), 6)
    weights = tmp_path / "w.pth"
    meta = {"num_classes": 6, "class_names": ["a", "b"], "category_ids": [11, 12]}
    torch.save({"model": model.state_dict(), "meta": meta}, weights)
    image = _image(tmp_path / "x.png")
    argv = ["predict", "--config", str(CONFIG), "--weights", str(weights), "--output-dir", str(tmp_path / "out"),
            "--score-thresh", "0.001", str(image)]
    assert main(argv) == 0
    detections = json.loads((tmp_path / "out" / "x.json").read_text())["detections"]
    assert detections and {(d["label"], d["category_id"]) for d in detections} <= {("a", 11), ("b", 12)}


def test_an_unreadable_image_stops_predict_unless_skipped(tmp_path, capsys):
    """Checked before the model loads: the names. Read one by one: an image that does not decode stops the run
    with its name, or with data.skip_bad_images is skipped with a warning while the others are predicted."""
    import torch

    from detectors.build import build_detector
    from detectors.config import load_config

    torch.manual_seed(0)
    cfg = load_config(CONFIG)
    weights = tmp_path / "w.pth"
    torch.save({"model": build_detector(cfg.model, 4).state_dict(), "meta": {"num_classes": 4}}, weights)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"not a png")
    _image(tmp_path / "in" / "b.png")
    argv = ["predict", "--config", str(CONFIG), "--weights", str(weights), "--output-dir", str(tmp_path / "out"),
            str(tmp_path / "in")]
    assert main(argv) == 2
    assert f"image {tmp_path / 'in' / 'a.png'}: cannot read" in capsys.readouterr().err
    assert not (tmp_path / "out" / "b.json").exists()
    assert main(argv + ["--set", "data.skip_bad_images=true"]) == 0
    assert (tmp_path / "out" / "b.json").exists() and not (tmp_path / "out" / "a.json").exists()
    err = capsys.readouterr().err
    assert "a.png: cannot read" in err and "predicted 1 of 2 images; 1 could not be read" in err


def test_predict_stopped_while_writing_leaves_no_cut_off_output(tmp_path, capsys, monkeypatch):
    """Ctrl-C while an annotated image is being written: exit status 130 with one line, and neither a truncated
    PNG under the image's name nor a temporary in the output folder."""
    import torch

    from detectors.build import build_detector
    from detectors.config import load_config

    cfg = load_config(CONFIG)
    weights = tmp_path / "w.pth"
    torch.save({"model": build_detector(cfg.model, 4).state_dict(), "meta": {"num_classes": 4}}, weights)
    image = _image(tmp_path / "x.jpg")
    save = Image.Image.save

    def save_half_then_interrupt(image, fp, *args, **kwargs):
        save(image, fp, *args, **kwargs)
        with open(fp, "r+b") as f:
            f.truncate(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", save_half_then_interrupt)
    argv = ["predict", "--config", str(CONFIG), "--weights", str(weights), "--output-dir", str(tmp_path / "out"),
            str(image)]
    assert main(argv) == 130
    assert capsys.readouterr().err.endswith("dyhead predict: interrupted by SIGINT\n")
    assert list((tmp_path / "out").iterdir()) == []


def test_predict_writes_boxes_in_the_original_images_pixels(tmp_path, monkeypatch):
    """The model (a stub here) gets the resized image's size and the original's, and answers in the original's
    pixels; predict writes those boxes (rounded to 2 decimals) with scores at or above --score-thresh, the
    weights' class names and ids, and the PNG at the original size. The model runs in eval mode."""
    import json

    import torch
    from torch import nn

    import detectors.cli as cli

    calls = []

    class Fixed(nn.Module):
        num_classes = 2

        def forward(self, images, image_sizes, original_sizes):
            calls.append((self.training, image_sizes, original_sizes))
            h, w = original_sizes[0]
            return [{"boxes": torch.tensor([[1.234, 2.0, w - 0.5, h], [0.0, 0.0, 1.0, 1.0], [3.0, 3.0, 4.0, 4.0]]),
                     "scores": torch.tensor([0.25, 0.125, 0.75]), "labels": torch.tensor([1, 0, 0])}]

    monkeypatch.setattr(cli, "build_detector", lambda cfg, num_classes: Fixed())
    weights = tmp_path / "w.pth"
    torch.save({"model": {}, "meta": {"num_classes": 2, "class_names": ["a", "b"], "category_ids": [11, 12]}},
               weights)
    image = tmp_path / "in" / "x.jpg"
    image.parent.mkdir()
    Image.new("RGB", (40, 20)).save(image)
    out = tmp_path / "out"
    argv = ["predict", "--config", str(CONFIG), "--weights", str(weights), "--output-dir", str(out),
            "--score-thresh", "0.25", str(image)]
    assert main(argv) == 0
    # shapes_tiny's max_size_test=128 limits the longer side: 40 x 20 -> 128 x 64 (sizes are height, width)
    assert calls == [(False, [(64, 128)], [(20, 40)])]
    assert json.loads((out / "x.json").read_text()) == {"image": str(image), "detections": [
        {"box": [1.23, 2.0, 39.5, 20.0], "score": 0.25, "label": "b", "category_id": 12},
        {"box": [3.0, 3.0, 4.0, 4.0], "score": 0.75, "label": "a", "category_id": 11},
    ]}
    with Image.open(out / "x.png") as drawn:
        assert drawn.size == (40, 20) and drawn.getpixel((20, 2)) == (255, 0, 0)  # the first box's top edge


def test_eval_logs_to_its_output_folder_and_predict_does_not(tmp_path, monkeypatch):
    """eval's log.txt sits beside its metrics; predict's folder holds only the annotated images and JSON files."""
    import logging

    import detectors.cli as cli

    def work(cfg, args):
        logging.getLogger("detectors.cli").info("working in %s", args.output_dir)

    monkeypatch.setattr(cli, "_eval", work)
    monkeypatch.setattr(cli, "_predict", work)
    for command, extra in (("eval", []), ("predict", ["x.png"])):
        out = tmp_path / command
        assert main([command, "--config", str(CONFIG), "--weights", "w.pth", "--output-dir", str(out)] + extra) == 0
    assert (tmp_path / "eval" / "log.txt").read_text().endswith(f"working in {tmp_path / 'eval'}\n")
    assert not (tmp_path / "predict").exists()
