"""ResNet and Swin Transformer backbones returning C2-C5 or C3-C5 (strides 4, 8, 16, 32)."""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable, Iterator
from urllib.error import URLError

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet, swin_transformer
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

from .config import SWIN_NAMES, BackboneConfig, ConfigError, check_backbone
from .engine.checkpoint import CheckpointError, load_checkpoint
from .msra_weights import is_msra_pickle, load_msra_resnet
from .swin_weights import load_swin_state_dict

__all__ = ["SlimResNet", "ResNetBackbone", "SwinBackbone", "AlwaysShiftedWindowAttention", "build_backbone",
           "move_stride_to_1x1", "prepare_backbone_weights"]

_BATCH_NORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _norm_layer(norm: str, gn_groups: int) -> Callable[[int], nn.Module]:
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return partial(nn.GroupNorm, gn_groups)
    raise ValueError(f"unknown backbone norm {norm!r}; expected frozen_bn, bn or gn")


class SlimResNet(nn.Module):
    """A narrow ResNet of torchvision ``BasicBlock`` s, for small from-scratch configs.

    Same layout as torchvision's ResNet (stem conv 7x7/2 + max-pool, four stages, stride 2 from the second
    on) and the same attribute names (``conv1``, ``bn1``, ``layer1``..``layer4``), with free stage widths.
    It has no ``forward``: detection reads its stages through ``ResNetBackbone``.

    Args:
        widths: output channels of the four stages.
        depths: number of blocks in each stage.
        norm_layer: normalisation module constructor taking the channel count.
    """

    def __init__(self, widths: list[int], depths: list[int], norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        if len(widths) != 4 or len(depths) != 4:
            raise ValueError(f"SlimResNet needs 4 widths and 4 depths, got {widths} and {depths}")
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch = widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or in_ch != width:
                down = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride=stride, bias=False), norm_layer(width))
            blocks = [resnet.BasicBlock(in_ch, width, stride, down, norm_layer=norm_layer)]
            blocks += [resnet.BasicBlock(width, width, norm_layer=norm_layer) for _ in range(depth - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            in_ch = width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def move_stride_to_1x1(body: resnet.ResNet) -> None:
    """Moves the stride of every stage's first ``Bottleneck`` from its 3x3 conv (torchvision, "ResNet v1.5") to
    its first 1x1 conv, as in the original MSRA ResNet and detectron2's ``RESNETS.STRIDE_IN_1X1``.

    Output shapes do not change (a 1x1 conv with stride 2 and no padding keeps ceil(H/2) rows, as the 3x3 conv
    with padding 1 did); the 3x3 conv then sees every position of the half-resolution map instead of the 1x1
    conv seeing every position of the full one. The shortcut keeps its stride.
    """
    for stage in (body.layer1, body.layer2, body.layer3, body.layer4):
        block = stage[0]
        if not isinstance(block, resnet.Bottleneck):
            raise ValueError(f"stride_in_1x1 needs Bottleneck blocks, got {type(block).__name__}")
        block.conv1.stride, block.conv2.stride = block.conv2.stride, block.conv1.stride


class ResNetBackbone(nn.Module):
    """Wraps a ResNet so that it returns C2-C5 or C3-C5.

    Args:
        body: a torchvision-style ResNet (``conv1``, ``bn1``, ``layer1``..``layer4``).
        out_channels: channels of C2, C3, C4, C5.
        freeze_at: 0 trains everything; 1 freezes the stem; k > 1 also freezes ``layer1``..``layer{k-1}``.
        first_level: 2 returns C2-C5 (Faster R-CNN's P2-P6), 3 returns C3-C5.

    Forward: ``(N, 3, H, W)`` float -> ``OrderedDict`` ``{"c2"?, "c3", "c4", "c5"}`` of ``(N, C_l, H/s, W/s)``
    for strides s = 4, 8, 16, 32 (rounded up). ``out_channels`` lists the returned levels' channels.
    """

    def __init__(self, body: nn.Module, out_channels: list[int], freeze_at: int = 2, first_level: int = 3):
        super().__init__()
        if first_level not in (2, 3):
            raise ValueError(f"first_level={first_level}: the backbone returns C2-C5 or C3-C5")
        frozen = ["conv1", "bn1"] + [f"layer{i}" for i in range(1, freeze_at)] if freeze_at > 0 else []
        for name, param in body.named_parameters():
            if name.split(".")[0] in frozen:
                param.requires_grad_(False)
        levels = range(first_level, 6)
        self.body = IntermediateLayerGetter(body, {f"layer{level - 1}": f"c{level}" for level in levels})
        self.out_channels = list(out_channels[first_level - 2:])

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """``(N, 3, H, W)`` -> ``{"c2"?, "c3", "c4", "c5"}``."""
        return self.body(x)


class AlwaysShiftedWindowAttention(swin_transformer.ShiftedWindowAttention):
    """torchvision's Swin window attention as the official Swin detection backbone runs it: always shifted.

    torchvision stops shifting along an axis whose padded map is a single window (size <= window, e.g. a Swin-T
    stage 4 under 224 px). The detection release (Swin-Transformer-Object-Detection, whose backbone DyHead's
    ``extra/swint.py`` copies) pads every map to a multiple of the window and rolls by ``shift_size`` in every
    shifted block whatever its size, with the mask that splits each axis into ``[0, Hp - window)``,
    ``[Hp - window, Hp - shift)`` and ``[Hp - shift, Hp)``; within a single window that splits the window in
    two, so the outputs differ. Maps larger than the window on both axes give torchvision's result.

    Same parameters, buffers and names as ``ShiftedWindowAttention`` (it only replaces ``forward``); a shift
    of 0 is plain window attention (no roll, an all-zero mask).

    Forward: ``(B, H, W, C)`` float -> ``(B, H, W, C)`` in the same dtype.
    """

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, channels = x.shape
        win_h, win_w = self.window_size
        shift_h, shift_w = self.shift_size
        x = F.pad(x, (0, 0, 0, -width % win_w, 0, -height % win_h))
        padded_h, padded_w = x.shape[1:3]
        x = torch.roll(x, shifts=(-shift_h, -shift_w), dims=(1, 2))
        rows, cols = padded_h // win_h, padded_w // win_w
        tokens = win_h * win_w
        x = x.view(batch, rows, win_h, cols, win_w, channels).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(batch * rows * cols, tokens, channels)

        head_dim = channels // self.num_heads
        qkv = self.qkv(x).reshape(x.shape[0], tokens, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * head_dim**-0.5, qkv[1], qkv[2]
        attn = q.matmul(k.transpose(-2, -1)) + self.get_relative_position_bias()  # (B*nW, heads, N, N)
        # region of every rolled position: 0 before the last window, 1 in it up to the wrapped-around strip, 2 in
        # that strip; tokens of different regions were not neighbours before the roll
        region_h = torch.zeros(padded_h, dtype=torch.long, device=x.device)
        region_h[padded_h - win_h:] = 1
        region_h[padded_h - shift_h:] = 2  # empty for a shift of 0
        region_w = torch.zeros(padded_w, dtype=torch.long, device=x.device)
        region_w[padded_w - win_w:] = 1
        region_w[padded_w - shift_w:] = 2
        region = (3 * region_h[:, None] + region_w).view(rows, win_h, cols, win_w).permute(0, 2, 1, 3)
        region = region.reshape(rows * cols, tokens)
        # -100 rather than -inf, as the release (and torchvision): a masked pair keeps a negligible weight
        mask = (region[:, :, None] != region[:, None, :]).to(x.dtype) * -100.0  # (nW, N, N)
        attn = (attn.view(batch, rows * cols, self.num_heads, tokens, tokens) + mask[None, :, None]).flatten(0, 1)
        attn = F.dropout(F.softmax(attn, dim=-1), p=self.attention_dropout, training=self.training)
        x = attn.matmul(v).transpose(1, 2).reshape(x.shape[0], tokens, channels)
        x = F.dropout(self.proj(x), p=self.dropout, training=self.training)

        x = x.view(batch, rows, cols, win_h, win_w, channels).permute(0, 1, 3, 2, 4, 5)
        x = torch.roll(x.reshape(batch, padded_h, padded_w, channels), shifts=(shift_h, shift_w), dims=(1, 2))
        return x[:, :height, :width].contiguous()


class SwinBackbone(nn.Module):
    """Wraps a torchvision Swin Transformer so that it returns C2-C5 or C3-C5 in NCHW.

    Every returned level has its own LayerNorm on its stage's output (before the patch merging), as the
    official Swin detection backbone's ``norm{i}`` layers; the classifier's final norm and head are not kept.
    The shifted blocks' attention becomes ``AlwaysShiftedWindowAttention`` (in ``body`` too, whose modules
    this shares), so maps of at most one window per axis shift as in the official backbone.

    Args:
        body: a torchvision ``SwinTransformer``; only its ``features`` (patch embedding, then stages with a
            patch merging after each but the last) are used.
        freeze_at: 0 trains everything; 1 freezes the patch embedding; k > 1 also freezes stages 1..k-1 and
            the patch merging after each, up to 5 (the official backbone's ``frozen_stages`` for k >= 1).
            Frozen parts stay in eval mode, so stochastic depth never drops their blocks.
        first_level: 2 returns C2-C5 (Faster R-CNN's P2-P6), 3 returns C3-C5.

    Forward: ``(N, 3, H, W)`` float with H, W multiples of 32 -> ``OrderedDict`` ``{"c2"?, "c3", "c4", "c5"}``
    of contiguous ``(N, C_l, H/s, W/s)`` float for strides s = 4, 8, 16, 32, where C_l is the embedding width
    times 1, 2, 4, 8 (96..768 for Swin-T/S, 128..1024 for Swin-B). ``out_channels`` lists the returned
    levels' channels. Windows that do not divide a stage's size are padded inside the window attention.
    """

    def __init__(self, body: swin_transformer.SwinTransformer, freeze_at: int = 0, first_level: int = 3):
        super().__init__()
        if first_level not in (2, 3):
            raise ValueError(f"first_level={first_level}: the backbone returns C2-C5 or C3-C5")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at={freeze_at}: expected 0 to 5 for Swin (patch embedding, then 4 stages)")
        self.features = body.features
        for module in self.features.modules():
            # the exact class: Swin V2's subclass has other parameters. Swapping the class rather than building
            # a new module keeps the loaded parameters themselves, their names and the random state.
            if type(module) is swin_transformer.ShiftedWindowAttention and any(module.shift_size):
                module.__class__ = AlwaysShiftedWindowAttention
        embed_dim = self.features[0][0].out_channels
        # features[2i + 1] is stage i + 1, whose output is level C(i + 2)
        self.taps = {2 * (level - 2) + 1: f"c{level}" for level in range(first_level, 6)}
        self.out_channels = [embed_dim * 2 ** (level - 2) for level in range(first_level, 6)]
        self.norms = nn.ModuleDict(
            {name: nn.LayerNorm(channels) for name, channels in zip(self.taps.values(), self.out_channels)}
        )
        self.num_frozen = 2 * freeze_at - 1 if freeze_at > 0 else 0  # leading entries of ``features``
        for param in self.features[: self.num_frozen].parameters():
            param.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> SwinBackbone:
        """Sets train/eval mode, keeping the frozen leading stages in eval mode."""
        super().train(mode)
        self.features[: self.num_frozen].eval()
        return self

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """``(N, 3, H, W)`` -> ``{"c2"?, "c3", "c4", "c5"}``."""
        out = OrderedDict()
        for index, layer in enumerate(self.features):
            x = layer(x)  # (N, H/s, W/s, C): torchvision's Swin is channels-last throughout
            name = self.taps.get(index)
            if name is not None:
                # contiguous NCHW like the ResNets, so nothing downstream inherits a channels-last layout
                out[name] = self.norms[name](x).permute(0, 3, 1, 2).contiguous()
        return out


def _weights_family(name: str):
    """The torchvision weights enum of backbone ``name`` (None for slim and unknown names)."""
    if name in SWIN_NAMES:
        return swin_transformer.__dict__[f"Swin_{name[-1].upper()}_Weights"]
    return resnet.__dict__.get(f"ResNet{name[6:]}_Weights") if name.startswith("resnet") else None


def _torchvision_weights(cfg: BackboneConfig):
    """The torchvision weights ``cfg.weights`` names; None for a file or no weights."""
    if cfg.weights is None or Path(cfg.weights).suffix:
        return None
    family = _weights_family(cfg.name)
    if family is None:
        raise ConfigError(f"model.backbone.weights {cfg.weights!r}: {cfg.name} has no torchvision weights; give a "
                          ".pth file or null")
    if cfg.weights not in family.__members__:
        raise ConfigError(f"model.backbone.weights {cfg.weights!r} names no torchvision weights of {cfg.name}; "
                          f"expected one of {', '.join(family.__members__)}, a .pth file or null")
    return family[cfg.weights]


@contextmanager
def _downloading(weights) -> Iterator[None]:
    """Turns a failed download of torchvision ``weights`` (no network, or content failing the file name's
    SHA-256 prefix, such as a proxy's error page) into a CheckpointError that says what to do."""
    try:
        yield
    except URLError as exc:
        raise CheckpointError(
            f"backbone weights {weights}: downloading {weights.url} failed ({exc.reason}); without a network, put "
            f"that file in {_hub_checkpoints()} (or give a .pth file as model.backbone.weights)"
        ) from None
    except RuntimeError as exc:
        # torch.hub's only signal of a bad checksum is this message; it has already deleted the partial file
        if not str(exc).startswith("invalid hash value"):
            raise
        raise CheckpointError(
            f"backbone weights {weights}: the file downloaded from {weights.url} is not torchvision's ({exc}); "
            f"try again, or put a good copy in {_hub_checkpoints()}"
        ) from None


def _hub_checkpoints() -> Path:
    """The folder of torch.hub's cache where torchvision's weights are downloaded to and read from."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def prepare_backbone_weights(cfg: BackboneConfig) -> None:
    """Reports bad ``cfg.weights`` (a name torchvision does not have, a missing file, a failed download) before
    anything slow runs: named weights are fetched into torch's hub cache, where the backbone's build reads them."""
    weights = _torchvision_weights(cfg)
    if weights is not None:
        with _downloading(weights):
            weights.get_state_dict(progress=True, check_hash=True)
    elif cfg.weights is not None and not Path(cfg.weights).is_file():
        raise CheckpointError(f"backbone weights {cfg.weights} do not exist")


def _build_swin(cfg: BackboneConfig, first_level: int) -> SwinBackbone:
    torchvision_weights = _torchvision_weights(cfg)
    with _downloading(torchvision_weights):
        body = swin_transformer.__dict__[cfg.name](weights=torchvision_weights)
    if cfg.weights is not None and Path(cfg.weights).suffix:
        try:
            load_swin_state_dict(body.features, load_checkpoint(cfg.weights), source=cfg.weights)
        except ValueError as exc:  # the message names the file
            raise CheckpointError(str(exc)) from None
    return SwinBackbone(body, cfg.freeze_at, first_level)


def build_backbone(cfg: BackboneConfig, first_level: int = 3) -> ResNetBackbone | SwinBackbone:
    """Builds the backbone described by ``cfg`` returning C{first_level}-C5, loading pretrained weights when
    it names them; settings that do not go together are a ConfigError (:func:`detectors.config.check_backbone`)."""
    check_backbone(cfg)
    if cfg.name in SWIN_NAMES:
        return _build_swin(cfg, first_level)
    norm_layer = _norm_layer(cfg.norm, cfg.gn_groups)
    if cfg.name == "slim":
        _torchvision_weights(cfg)  # slim has none: a weights name is an error, not ignored
        body = SlimResNet(cfg.widths, cfg.depths, norm_layer)
        out_channels = list(cfg.widths)
    elif cfg.name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
        torchvision_weights = _torchvision_weights(cfg)
        with _downloading(torchvision_weights):
            body = resnet.__dict__[cfg.name](weights=torchvision_weights, norm_layer=norm_layer)
        expansion = 1 if cfg.name in ("resnet18", "resnet34") else 4
        out_channels = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]
        if cfg.stride_in_1x1:
            move_stride_to_1x1(body)
    else:
        raise ValueError(f"unknown backbone {cfg.name!r}; expected slim, resnet18/34/50/101/152 or swin_t/s/b")
    if cfg.weights is not None and Path(cfg.weights).suffix:
        _load_resnet_weights(body, cfg)
    return ResNetBackbone(body, out_channels, cfg.freeze_at, first_level)


def _load_resnet_weights(body: nn.Module, cfg: BackboneConfig) -> None:
    """Loads a torchvision ``.pth`` state dict (its classifier ignored) or a caffe2 ``.pkl`` into ``body``, all of
    whose tensors they must provide. Beyond the classifier and the batch-norm statistics that other norms do not
    keep, they must have nothing else: blocks the body lacks are another depth's, which would load half a model."""
    if is_msra_pickle(cfg.weights):
        try:
            state = load_msra_resnet(cfg.weights)
        except (FileNotFoundError, ValueError) as exc:  # the message names the file
            raise CheckpointError(str(exc)) from None
    else:
        state = load_checkpoint(cfg.weights)
    try:
        missing, unexpected = body.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors of other shapes: weights of another ResNet
        raise CheckpointError(f"backbone weights {cfg.weights} do not fit {cfg.name}: "
                              f"{str(exc).strip().splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.startswith("fc.")]  # the classifier, which the backbone drops
    if missing:
        raise CheckpointError(f"backbone weights {cfg.weights} lack {len(missing)} tensors, e.g. {missing[:3]}")
    unexpected = [k for k in unexpected
                  if not k.startswith("fc.") and k.rpartition(".")[2] not in _BATCH_NORM_STATISTICS]
    if unexpected:
        raise CheckpointError(f"backbone weights {cfg.weights} have {len(unexpected)} tensors {cfg.name} does not, "
                              f"e.g. {unexpected[:3]}: a ResNet of another depth")
