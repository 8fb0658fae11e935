"""`dyhead convert` and `dyhead bench`."""

import json

import torch

from detectors.cli import main
from dyhead import DyHead


def test_convert_official_checkpoint(tmp_path, capsys):
    sd = {}
    model = DyHead(16, 16, 2)
    names = {"spatial.coarser.conv": "DyConv.0.conv", "spatial.same.conv": "DyConv.1.conv",
             "spatial.finer.conv": "DyConv.2.conv", "spatial.coarser.norm": "DyConv.0.bn",
             "spatial.same.norm": "DyConv.1.bn", "spatial.finer.norm": "DyConv.2.bn", "spatial.offset": "offset",
             "scale.conv": "AttnConv.1", "task.fc1": "relu.fc.0", "task.fc2": "relu.fc.2"}
    expected = {}
    for key, value in model.state_dict().items():
        _, i, rest = key.split(".", 2)
        module, param = rest.rsplit(".", 1)
        value = torch.randn_like(value)
        sd[f"backbone.dyhead_tower.{i}.{names[module]}.{param}"] = value
        expected[key] = value
    src, dst = tmp_path / "official.pth", tmp_path / "out" / "dyhead.pth"
    torch.save({"model": sd}, src)
    assert main(["convert", str(src), str(dst)]) == 0
    assert f"{src}: {len(expected)} tensors of 2 DyHead blocks -> {dst}" in capsys.readouterr().err
    converted = torch.load(dst, weights_only=True)
    assert converted.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(converted[key], expected[key])


def test_convert_rejects_a_file_without_dyhead_weights(tmp_path, capsys):
    src = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, src)
    assert main(["convert", str(src), str(tmp_path / "x.pth")]) == 2
    assert "resnet.pth has no DyHead weights" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()


def test_bench_runs_the_benchmark_runner(tmp_path):
    status = main(["bench", "--device", "cpu", "--ops", "dcn_fwd", "--impls", "torchvision,sampled",
                   "--dtypes", "float32", "--quick", "--no-profile", "--out", str(tmp_path)])
    assert status == 0
    (results,) = tmp_path.glob("*.json")
    rows = json.loads(results.read_text())["records"]
    assert {(r["op"], r["impl"]) for r in rows} == {("dcn_fwd", "torchvision"), ("dcn_fwd", "sampled")}
    assert all(r["median_ms"] > 0 for r in rows)


def test_convert_refuses_config_or_set_without_detector(tmp_path, capsys):
    src = tmp_path / "official.pth"
    torch.save({"model": {}}, src)
    for extra in (["--config", "configs/shapes_tiny.yaml"], ["--set", "model.num_classes=3"]):
        assert main(["convert", str(src), str(tmp_path / "x.pth")] + extra) == 2
        assert capsys.readouterr().err == "dyhead convert: error: --config and --set apply to --detector only\n"
    assert not (tmp_path / "x.pth").exists()


def test_convert_names_a_missing_file(tmp_path, capsys):
    """FileNotFoundError is an error of the command (2, one line), with or without --detector."""
    missing = tmp_path / "none.pth"
    for extra, kind in (([], "DyHead checkpoint"), (["--detector"], "official checkpoint")):
        assert main(["convert", str(missing), str(tmp_path / "x.pth")] + extra) == 2
        assert capsys.readouterr().err == f"dyhead convert: error: {kind} not found: {missing}\n"


def test_convert_names_an_output_that_is_a_folder_or_lies_under_a_file(tmp_path, capsys):
    """Checked before the input is read: not IsADirectoryError's or mkdir's traceback after converting, with the
    converted state dict left behind in OUT.tmp."""
    src = tmp_path / "official.pth"
    torch.save({"model": {}}, src)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    for output, message in ((tmp_path / "folder", f"output {tmp_path / 'folder'} is a folder; give the file to write"),
                            (tmp_path / "file" / "x.pth", f"output {tmp_path / 'file' / 'x.pth'}: {tmp_path / 'file'} "
                                                          "is a file, not a folder")):
        assert main(["convert", str(src), str(output)]) == 2
        assert capsys.readouterr().err == f"dyhead convert: error: {message}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder", "official.pth"]
