"""Caffe2 ImageNet pickles (detectron2's ImageNetPretrained/MSRA/R-50.pkl) as backbone weights: the names, the
folded batch norms, a strict fit, and refusals of what is not such a file."""

import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from torchvision.models import resnet
from torchvision.ops import FrozenBatchNorm2d

from detectors.backbones import build_backbone
from detectors.config import BackboneConfig
from detectors.engine.checkpoint import CheckpointError
from detectors.msra_weights import load_msra_resnet


def caffe2_resnet_blobs(depths, seed=0):
    """Random arrays under the caffe2 names of a bottleneck ResNet (stage widths 64..512, expansion 4): the stem,
    each block's branch2a/2b/2c, the first block's branch1, a scale/shift per norm, the classifier, and
    momentum blobs as caffe2 saves them."""
    rng = np.random.default_rng(seed)
    blobs = {"conv1_w": rng.standard_normal((64, 3, 7, 7), dtype=np.float32),
             "res_conv1_bn_s": rng.uniform(0.5, 2, 64).astype(np.float32),
             "res_conv1_bn_b": rng.standard_normal(64, dtype=np.float32),
             "fc1000_w": np.zeros((1000, 2048), np.float32), "fc1000_b": np.zeros(1000, np.float32),
             "conv1_w_momentum": np.zeros((64, 3, 7, 7), np.float32)}
    cin = 64
    for stage, (depth, width) in enumerate(zip(depths, (64, 128, 256, 512)), start=2):
        for block in range(depth):
            shapes = {"branch2a": (width, cin, 1, 1), "branch2b": (width, width, 3, 3),
                      "branch2c": (4 * width, width, 1, 1)}
            if block == 0:
                shapes["branch1"] = (4 * width, cin, 1, 1)
            for branch, shape in shapes.items():
                key = f"res{stage}_{block}_{branch}"
                blobs[f"{key}_w"] = rng.standard_normal(shape, dtype=np.float32) * 0.05
                blobs[f"{key}_bn_s"] = rng.uniform(0.5, 2, shape[0]).astype(np.float32)
                blobs[f"{key}_bn_b"] = rng.standard_normal(shape[0], dtype=np.float32)
            cin = 4 * width
    return blobs


@pytest.fixture(scope="module")
def r50_blobs():
    return caffe2_resnet_blobs((3, 4, 6, 3))


def write_pickle(path, data, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return path


class _Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 wrote its str (BINSTRING), which Python 3 reads back as text in the reader's
    encoding."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_python2_str(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_python2_str


def write_python2_pickle(path, blobs):
    """``blobs`` as Python 2 and numpy 1 wrote Detectron's R-50.pkl: protocol 2, str keys, array bytes as str,
    ``numpy.core`` module names."""
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump({key.encode(): value for key, value in blobs.items()})
    path.write_bytes(buffer.getvalue().replace(b"numpy._core.", b"numpy.core."))
    return path


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_names_and_folded_norms(tmp_path, r50_blobs, protocol):
    state = load_msra_resnet(write_pickle(tmp_path / "R-50.pkl", r50_blobs, protocol))
    pairs = {"conv1.weight": "conv1_w", "layer1.0.conv1.weight": "res2_0_branch2a_w",
             "layer2.0.downsample.0.weight": "res3_0_branch1_w", "layer3.5.conv3.weight": "res4_5_branch2c_w",
             "layer4.2.conv2.weight": "res5_2_branch2b_w", "bn1.weight": "res_conv1_bn_s",
             "layer4.0.downsample.1.bias": "res5_0_branch1_bn_b", "layer2.3.bn2.weight": "res3_3_branch2b_bn_s"}
    for ours, theirs in pairs.items():
        assert torch.equal(state[ours], torch.from_numpy(r50_blobs[theirs])), ours
    assert not any(k.startswith("fc") for k in state)

    body = resnet.resnet50(norm_layer=FrozenBatchNorm2d)
    body.fc = torch.nn.Identity()
    body.load_state_dict(state)  # strict: every tensor of the feature stages, nothing else
    # A frozen norm computes exactly x * scale + shift of the caffe2 affine.
    x = torch.randn(1, 128, 3, 3)
    scale, shift = (torch.from_numpy(r50_blobs[f"res3_3_branch2b_bn_{p}"])[:, None, None] for p in "sb")
    torch.testing.assert_close(body.layer2[3].bn2(x), x * scale + shift, rtol=1e-6, atol=1e-6)


def test_builds_the_backbone_strictly(tmp_path, r50_blobs):
    path = write_pickle(tmp_path / "R-50.pkl", r50_blobs)
    backbone = build_backbone(BackboneConfig(name="resnet50", weights=str(path), stride_in_1x1=True))
    assert torch.equal(backbone.body.conv1.weight, torch.from_numpy(r50_blobs["conv1_w"]))
    assert torch.equal(backbone.body.layer4[2].conv3.weight, torch.from_numpy(r50_blobs["res5_2_branch2c_w"]))
    assert backbone.body.layer2[0].conv1.stride == (2, 2)  # the MSRA layout the weights were trained with

    r101 = caffe2_resnet_blobs((3, 4, 23, 3))  # 17 more res4 blocks, each 3 convs and 3 norm weights and biases
    with pytest.raises(CheckpointError, match=r"R-101.pkl have 153 tensors resnet50 does not.*another depth"):
        build_backbone(BackboneConfig(name="resnet50", weights=str(write_pickle(tmp_path / "R-101.pkl", r101))))
    partial = {k: v for k, v in r50_blobs.items() if not k.startswith("res5")}
    with pytest.raises(CheckpointError, match="lack"):
        build_backbone(BackboneConfig(name="resnet50", weights=str(write_pickle(tmp_path / "p.pkl", partial))))


class Payload:
    def __reduce__(self):
        return (os.system, ("echo owned",))


@pytest.mark.parametrize("make, message", [
    (lambda p: write_pickle(p, {"res2_0_branch2a_w": Payload()}), r"not a caffe2 weights pickle \(it names "),
    (lambda p: p.write_bytes(b"\x80\x02not a pickle"), "not a caffe2 weights pickle"),
    (lambda p: p.write_bytes(b""), "not a caffe2 weights pickle"),
    (lambda p: write_pickle(p, [np.zeros(3)]), "a dict of named arrays"),
    (lambda p: write_pickle(p, {1: np.zeros(3, np.float32)}), "a dict of named arrays"),
    (lambda p: write_pickle(p, {"head_cls_w": np.zeros(3, np.float32)}), "'head_cls_w' is not part of a ResNet"),
    (lambda p: write_pickle(p, {"res6_0_branch2a_w": np.zeros(3, np.float32)}), "'res6_0_branch2a_w' is not part"),
    (lambda p: write_pickle(p, {"res2_0_branch2a_w": np.zeros(3, np.int64)}), "not a floating-point array"),
    (lambda p: write_pickle(p, {"fc1000_w": np.zeros(3, np.float32)}), "no ResNet weights"),
    (lambda p: None, "do not exist"),
])
def test_refuses_what_is_not_a_caffe2_resnet(tmp_path, make, message):
    path = tmp_path / "R-50.pkl"
    make(path)
    with pytest.raises(CheckpointError, match=message):
        build_backbone(BackboneConfig(name="resnet50", weights=str(path)))


@pytest.mark.parametrize("write", [
    lambda path, blobs: write_pickle(path, {"blobs": blobs, "cfg": "..."}),  # Detectron1 detection models
    write_python2_pickle,
])
def test_other_forms_of_the_same_weights(tmp_path, r50_blobs, write):
    other = load_msra_resnet(write(tmp_path / "other.pkl", r50_blobs))
    flat = load_msra_resnet(write_pickle(tmp_path / "f.pkl", r50_blobs))
    assert other.keys() == flat.keys() and all(torch.equal(other[k], flat[k]) for k in flat)


def test_statistics_in_the_pickle_are_kept(tmp_path, r50_blobs):
    """Some pickles carry batch norm statistics (``_bn_rm``/``_bn_riv``): they are used, not replaced by the
    folded defaults. float64 here: the state is float32 whatever the pickle holds."""
    rng = np.random.default_rng(1)
    stats = {"res_conv1_bn_rm": rng.standard_normal(64), "res_conv1_bn_riv": rng.uniform(0.5, 2, 64),
             "res3_0_branch1_bn_rm": rng.standard_normal(512), "res3_0_branch1_bn_riv": rng.uniform(0.5, 2, 512)}
    state = load_msra_resnet(write_pickle(tmp_path / "R-50.pkl", {**r50_blobs, **stats}))
    pairs = {"bn1.running_mean": "res_conv1_bn_rm", "bn1.running_var": "res_conv1_bn_riv",
             "layer2.0.downsample.1.running_mean": "res3_0_branch1_bn_rm",
             "layer2.0.downsample.1.running_var": "res3_0_branch1_bn_riv"}
    for ours, theirs in pairs.items():
        assert state[ours].dtype == torch.float32
        assert torch.equal(state[ours], torch.from_numpy(stats[theirs]).float()), ours
