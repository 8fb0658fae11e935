"""ResNet weights from a caffe2 ImageNet pickle (detectron2's ``ImageNetPretrained/MSRA/R-50.pkl``, ``R-101.pkl``),
the weights the release's R50 models started from, renamed to torchvision's ResNet.

The pickle maps caffe2 names to numpy arrays: ``conv1_w`` and ``res_conv1_bn_{s,b}`` for the stem,
``res{stage}_{block}_branch{2a,2b,2c,1}_w`` for a block's convs and its projection shortcut, and ``..._bn_s`` /
``..._bn_b`` for the scale and shift of the batch norm folded into an affine (its statistics are gone), plus the
classifier ``fc1000_{w,b}``. It is read with an unpickler that only builds numpy arrays and plain containers,
as ``torch.load(weights_only=True)`` does for tensors: a pickle naming anything else is refused.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["is_msra_pickle", "load_msra_resnet"]

# What a pickled dict of numpy arrays names: under numpy 1 and 2, at pickle protocols 2 (which Python 3 writes
# bytes with through _codecs.encode) to 5.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("collections", "OrderedDict"),
}
_STAGES = {"2": "layer1", "3": "layer2", "4": "layer3", "5": "layer4"}
_BRANCHES = {"branch2a": ("conv1", "bn1"), "branch2b": ("conv2", "bn2"), "branch2c": ("conv3", "bn3"),
             "branch1": ("downsample.0", "downsample.1")}
_BLOCK = re.compile(r"res(\d)_(\d+)_(branch2a|branch2b|branch2c|branch1)_(w|bn_s|bn_b|bn_rm|bn_riv)")
_STEM = re.compile(r"(conv1_w|res_conv1_bn_(s|b|rm|riv))")
_NORM_PARTS = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}
# Not part of the feature extractor: the classifier, and caffe2's optimiser state.
_UNUSED = re.compile(r"fc1000_[wb]|.*_momentum")
# torchvision's FrozenBatchNorm2d/BatchNorm2d divide by sqrt(running_var + eps); a variance of 1 - eps makes the
# folded scale exact, as detectron2's FrozenBatchNorm2d does for these weights.
_EPS = 1e-5


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, not only numpy arrays")
        if module.startswith(("numpy.core.", "numpy._core.")):  # numpy 2 renamed the package: read either
            module = f"numpy.{'_core' if hasattr(np, '_core') else 'core'}.{module.rsplit('.', 1)[1]}"
        return super().find_class(module, name)


def is_msra_pickle(path: str | Path) -> bool:
    """Whether ``path`` names a caffe2 pickle (``.pkl``) rather than a torch state dict."""
    return Path(path).suffix == ".pkl"


def _read_blobs(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights {path} do not exist")
    try:
        with path.open("rb") as f:
            data = _ArraysOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ModuleNotFoundError) as exc:
        raise ValueError(f"backbone weights {path}: not a caffe2 weights pickle ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("blobs"), dict):  # Detectron1 detection models nest them
        data = data["blobs"]
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ValueError(f"backbone weights {path}: not a caffe2 weights pickle (a dict of named arrays)")
    return data


def _torchvision_name(key: str) -> str | None:
    """torchvision's ResNet name for a caffe2 key; None for the keys the backbone does not use."""
    if _UNUSED.fullmatch(key):
        return None
    match = _STEM.fullmatch(key)
    if match:
        return "conv1.weight" if key == "conv1_w" else f"bn1.{_NORM_PARTS[match[2]]}"
    match = _BLOCK.fullmatch(key)
    if match is None or match[1] not in _STAGES:
        raise ValueError(f"caffe2 key {key!r} is not part of a ResNet")
    stage, block, branch, part = match.groups()
    conv, norm = _BRANCHES[branch]
    suffix = f"{conv}.weight" if part == "w" else f"{norm}.{_NORM_PARTS[part.removeprefix('bn_')]}"
    return f"{_STAGES[stage]}.{int(block)}.{suffix}"


def load_msra_resnet(path: str | Path) -> dict[str, Tensor]:
    """The torchvision ResNet state dict (without ``fc``) of a caffe2 ImageNet pickle.

    Every batch norm gets the pickle's scale and shift as ``weight``/``bias``, and ``running_mean`` 0 and
    ``running_var`` 1 - 1e-5 where the pickle has no statistics, so that a ``FrozenBatchNorm2d`` (eps 1e-5)
    computes exactly ``x * scale + shift``. The weights expect what the caffe2 model was trained on: BGR pixels in
    [0, 255] minus the caffe means (std 1) and, for the bottleneck ResNets, the stride in the 1x1 conv
    (``data.input.format: BGR255``, ``model.backbone.stride_in_1x1: true``).

    Returns: {name: float32 tensor}, e.g. ``layer1.0.conv1.weight`` (64, 64, 1, 1).
    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a pickle of named numpy arrays, names something other than numpy arrays, or
            holds a key that is not part of a caffe2 ResNet (named in the message).
    """
    path = Path(path)
    state: dict[str, Tensor] = {}
    norms: dict[str, int] = {}  # name: channels
    for key, value in _read_blobs(path).items():
        try:
            name = _torchvision_name(key)
        except ValueError as exc:
            raise ValueError(f"backbone weights {path}: {exc}") from None
        if name is None:
            continue
        if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"backbone weights {path}: {key} is not a floating-point array")
        state[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        if "_bn_" in key:
            norms[name.rsplit(".", 1)[0]] = value.shape[0]
    if not state:
        raise ValueError(f"backbone weights {path}: no ResNet weights (caffe2 names such as res2_0_branch2a_w)")
    for norm, channels in norms.items():
        state.setdefault(f"{norm}.running_mean", torch.zeros(channels))
        state.setdefault(f"{norm}.running_var", torch.full((channels,), 1 - _EPS))
    return state
