"""Bad checkpoint and weights files: a missing, unreadable or ill-fitting file is one clear error naming it, from
the loaders and from the ``dyhead`` command, before any slow work."""

import argparse
import email.message
import io
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from PIL import Image
from torch import nn

from detectors.backbones import build_backbone, prepare_backbone_weights
from detectors.build import build_detector
from detectors.cli import _load_model, main
from detectors.config import BackboneConfig, ConfigError, load_config
from detectors.engine.checkpoint import (CheckpointError, load_checkpoint, load_matching_state, load_model_weights,
                                        save_checkpoint)
from dyhead import DyHead

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "shapes_tiny.yaml"


def _model():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {tmp_path / 'none.pth'}"):
        load_checkpoint(tmp_path / "none.pth")


def test_unreadable_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint\n")
    truncated = tmp_path / "truncated.pth"
    torch.save({"w": torch.randn(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    pickled = tmp_path / "object.pth"
    torch.save({"args": argparse.Namespace(lr=1)}, pickled)  # an object weights_only loading refuses
    why = {garbage: "it is neither a zip archive nor a pickle, as torch.save writes (it starts with b'not a ch')",
           truncated: "Error: ", pickled: "argparse.Namespace"}  # torch's reason, its type named; the refused object
    for path, reason in why.items():
        with pytest.raises(CheckpointError, match=f"{path} is not a readable PyTorch checkpoint") as error:
            load_checkpoint(path)
        assert len(str(error.value).splitlines()) == 1 and reason in str(error.value)


def test_a_folder_names_its_last_checkpoint(tmp_path):
    """A training output folder given for a checkpoint file: the error names the checkpoint it holds, if any."""
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path)
    assert str(error.value) == f"checkpoint {tmp_path} is a folder, not a file"
    save_checkpoint(tmp_path, "model_0000004.pth", {"iteration": 4})
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path)
    assert str(error.value) == (f"checkpoint {tmp_path} is a folder, not a file; "
                                f"its last checkpoint is {tmp_path / 'model_0000004.pth'}")


def test_weights_to_convert_first_say_how(tmp_path):
    """A DyHead neck's state dict (what `dyhead convert` writes without --detector) and a release checkpoint in its
    own names are not a detector's weights: the error says to convert with --detector, where it listed hundreds of
    missing and unexpected tensors."""
    neck = tmp_path / "neck.pth"
    torch.save(DyHead(16, 16, 1).state_dict(), neck)
    release = tmp_path / "release.pth"
    torch.save({"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(1),
                          "backbone.dyhead_tower.0.DyConv.1.conv.weight": torch.zeros(1)}}, release)
    for path, what in ((neck, "holds a DyHead neck's weights alone"),
                       (release, "is a microsoft/DynamicHead checkpoint")):
        with pytest.raises(CheckpointError, match=f"^{path} {what}.*`dyhead convert --detector RELEASE OUT --config"):
            load_model_weights(path)
    ours = tmp_path / "ours.pth"
    torch.save({"model": {"neck.blocks.0.spatial.offset.weight": torch.zeros(1)}, "meta": {"num_classes": 3}}, ours)
    assert load_model_weights(ours)[1] == {"num_classes": 3}


def test_a_good_checkpoint_round_trips(tmp_path):
    state = {"model": _model().state_dict(), "iteration": 3}
    torch.save(state, tmp_path / "ok.pth")
    loaded = load_checkpoint(tmp_path / "ok.pth")
    assert loaded["iteration"] == 3
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())


def test_a_state_dict_that_does_not_fit_says_how():
    model, source = _model(), _model()
    state = source.state_dict()
    del state["0.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["2.weight"] = torch.zeros(5, 4)
    with pytest.raises(CheckpointError) as error:
        load_matching_state(model, state, "w.pth")
    message = str(error.value)
    assert message.startswith("w.pth does not fit the model this config builds")
    assert "1 missing (e.g. 0.bias)" in message and "1 unexpected (e.g. extra.weight)" in message
    assert "1 of another shape (e.g. 2.weight (5, 4) vs (2, 4))" in message
    load_matching_state(model, source.state_dict(), "good.pth")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


def test_backbone_weights_that_are_unreadable_or_do_not_fit(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01")
    with pytest.raises(CheckpointError, match="garbage.pth is not a readable PyTorch checkpoint"):
        build_backbone(BackboneConfig(name="resnet18", weights=str(garbage)))
    state = build_backbone(BackboneConfig(name="resnet18", weights=None)).body.state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    wrong = tmp_path / "wrong.pth"
    torch.save(state, wrong)
    with pytest.raises(CheckpointError, match="wrong.pth do not fit resnet18: .*conv1.weight"):
        build_backbone(BackboneConfig(name="resnet18", weights=str(wrong)))


def _cli_args(tmp_path):
    # A data root that eval would have to generate: it must fail on the weights first.
    return ["--config", str(CONFIG), "--set", f"data.shapes.root={tmp_path / 'data'}", "--set", "device=cpu"]


def test_cli_eval_names_an_unreadable_weights_file_before_making_data(tmp_path, capsys):
    weights = tmp_path / "w.pth"
    weights.write_text("hello\n")
    code = main(["eval", "--weights", str(weights), "--output-dir", str(tmp_path / "out")] + _cli_args(tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and f"dyhead eval: error: {weights} is not a readable PyTorch checkpoint" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "data").exists()


def test_cli_eval_names_weights_of_another_model_before_making_data(tmp_path, capsys):
    """A checkpoint recording its class count is fitted to the config's model before the test set is read or
    generated (a 2000-image shapes set took 11 s before the same error)."""
    cfg = load_config(CONFIG)
    weights = tmp_path / "w.pth"
    torch.save({"model": build_detector(cfg.model, 4).state_dict(), "meta": {"num_classes": 4}}, weights)
    code = main(["eval", "--weights", str(weights), "--output-dir", str(tmp_path / "out"), "--set",
                 "model.dyhead_blocks=3"] + _cli_args(tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and f"dyhead eval: error: {weights} does not fit the model this config builds" in err
    assert "missing (e.g. neck.blocks.2." in err  # the third block's, which the weights lack
    assert not (tmp_path / "data").exists()


def test_cli_predict_names_weights_of_another_model(tmp_path, capsys):
    weights = tmp_path / "other.pth"
    torch.save({"model": _model().state_dict(), "meta": {"num_classes": 4}}, weights)
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 6)).save(image)
    code = main(["predict", "--weights", str(weights), "--output-dir", str(tmp_path / "out"), str(image)]
                + _cli_args(tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and f"dyhead predict: error: {weights} does not fit the model this config builds" in err
    assert "4 unexpected (e.g. 0.weight, 0.bias, 2.weight)" in err and "Traceback" not in err


def test_backbone_weights_names_are_checked():
    with pytest.raises(ConfigError, match="'IMAGENET' names no torchvision weights of resnet18; expected one of "
                                          "IMAGENET1K_V1, DEFAULT"):
        build_backbone(BackboneConfig(name="resnet18", weights="IMAGENET"))
    with pytest.raises(ConfigError, match="slim has no torchvision weights"):
        build_backbone(BackboneConfig(name="slim", weights="IMAGENET1K_V1", norm="bn"))
    with pytest.raises(ConfigError, match="'IMAGENET' names no torchvision weights of swin_t; expected one of "
                                          "IMAGENET1K_V1, DEFAULT"):
        build_backbone(BackboneConfig(name="swin_t", weights="IMAGENET", norm="ln"))


def test_a_failed_download_says_where_the_file_goes(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(CheckpointError) as error:
        prepare_backbone_weights(BackboneConfig(name="resnet18", weights="IMAGENET1K_V1"))
    with pytest.raises(CheckpointError):
        build_backbone(BackboneConfig(name="resnet18", weights="IMAGENET1K_V1"))
    message = str(error.value)
    assert "downloading https://download.pytorch.org/models/resnet18" in message and "(no network)" in message
    assert f"put that file in {tmp_path / 'hub' / 'checkpoints'}" in message


class _Response(io.BytesIO):
    """What urlopen returns, without headers."""

    def info(self):
        return email.message.Message()


def test_a_download_that_is_not_torchvisions_file_is_refused(tmp_path, monkeypatch):
    """torchvision's file names carry the first digits of their SHA-256: other content fails and is not cached,
    where the build would have loaded it. The error is a CheckpointError (the CLI's one-line message), not
    torch.hub's bare RuntimeError."""
    monkeypatch.setattr(torch.hub, "urlopen", lambda request: _Response(b"a proxy's error page"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="the file downloaded from https://download.pytorch.org/models/"
                                              r"resnet18-.* is not torchvision's \(invalid hash value"):
        prepare_backbone_weights(BackboneConfig(name="resnet18", weights="IMAGENET1K_V1"))
    assert not any((tmp_path / "hub" / "checkpoints").iterdir())


def test_cli_train_names_missing_backbone_weights_before_making_data(tmp_path, capsys):
    missing = tmp_path / "r18.pth"
    code = main(["train", "--output-dir", str(tmp_path / "out"), "--set", "model.backbone.name=resnet18",
                 "--set", "model.backbone.norm=frozen_bn", "--set", f"model.backbone.weights={missing}"]
                + _cli_args(tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and f"dyhead train: error: backbone weights {missing} do not exist" in err
    assert not (tmp_path / "data").exists()


def test_eval_weights_replace_the_backbone_weights_without_reading_them(tmp_path):
    """A trained model's checkpoint holds its backbone: eval and predict never read (or download) the config's
    pretrained backbone weights, which may be gone or out of reach."""
    cfg = load_config(CONFIG, ["device=cpu"])
    trained = build_detector(cfg.model, 3)
    torch.save({"model": trained.state_dict(), "meta": {"num_classes": 3}}, tmp_path / "w.pth")
    cfg.model.backbone.weights = str(tmp_path / "gone.pth")
    model, _ = _load_model(cfg, tmp_path / "w.pth", None, torch.device("cpu"))
    for (name, a), b in zip(model.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_class_count_comes_from_the_config_then_the_weights_then_the_dataset(tmp_path):
    cfg = load_config(CONFIG, ["device=cpu"])
    torch.manual_seed(0)
    state = build_detector(cfg.model, 3).state_dict()
    torch.save({"model": state, "meta": {"num_classes": 3}}, tmp_path / "w.pth")
    torch.save(state, tmp_path / "bare.pth")
    cpu = torch.device("cpu")
    assert _load_model(cfg, tmp_path / "w.pth", 4, cpu)[0].num_classes == 3  # the weights' over the dataset's
    assert _load_model(cfg, tmp_path / "bare.pth", 3, cpu)[0].num_classes == 3
    with pytest.raises(ConfigError, match="bare.pth does not record its class count; set model.num_classes"):
        _load_model(cfg, tmp_path / "bare.pth", None, cpu)
    cfg.model.num_classes = 3
    assert _load_model(cfg, tmp_path / "bare.pth", 4, cpu)[0].num_classes == 3
