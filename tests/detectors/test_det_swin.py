"""Swin Transformer backbones: level contract, freezing, official-checkpoint conversion, the official backbone's
always-shifted windows, ATSS + DyHead on Swin-T."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import Swin_T_Weights, swin_t
from torchvision.models._api import WeightsEnum
from torchvision.models.swin_transformer import SwinTransformer

from detectors.backbones import SwinBackbone, build_backbone
from detectors.build import build_detector
from detectors.config import BackboneConfig, ModelConfig, load_config
from detectors.engine.checkpoint import CheckpointError
from detectors.swin_weights import load_swin_state_dict, official_key_to_torchvision

REPO = Path(__file__).resolve().parents[2]
SWIN_T_DEPTHS = [2, 2, 6, 2]
# torchvision block suffix -> official block suffix, written out by hand
BLOCK_NAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.relative_position_bias_table": "attn.relative_position_bias_table",
    "attn.qkv.weight": "attn.qkv.weight",
    "attn.qkv.bias": "attn.qkv.bias",
    "attn.proj.weight": "attn.proj.weight",
    "attn.proj.bias": "attn.proj.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.0.weight": "mlp.fc1.weight",
    "mlp.0.bias": "mlp.fc1.bias",
    "mlp.3.weight": "mlp.fc2.weight",
    "mlp.3.bias": "mlp.fc2.bias",
}


def _swin_cfg(**changes) -> BackboneConfig:
    return BackboneConfig(**{"name": "swin_t", "weights": None, "norm": "ln", "freeze_at": 0, **changes})


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    """A swin_t whose every parameter is distinct noise (LayerNorms are not all ones), so a tensor landing in
    the wrong place is caught."""
    torch.manual_seed(0)
    model = swin_t()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    return model


def _official_state_dict(model: torch.nn.Module) -> dict:
    """The official microsoft/Swin-Transformer checkpoint layout of ``model``, nested under "model", with the
    buffers and classifier such a checkpoint carries."""
    sd = model.state_dict()
    official = {
        "patch_embed.proj.weight": sd["features.0.0.weight"],
        "patch_embed.proj.bias": sd["features.0.0.bias"],
        "patch_embed.norm.weight": sd["features.0.2.weight"],
        "patch_embed.norm.bias": sd["features.0.2.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
        "head.weight": sd["head.weight"],
        "head.bias": sd["head.bias"],
    }
    for stage, depth in enumerate(SWIN_T_DEPTHS):
        for block in range(depth):
            prefix = f"layers.{stage}.blocks.{block}."
            for tv_name, official_name in BLOCK_NAMES.items():
                official[prefix + official_name] = sd[f"features.{2 * stage + 1}.{block}.{tv_name}"]
            official[prefix + "attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
            if block % 2:  # the shifted blocks' mask for the classifier's 224x224 input
                official[prefix + "attn_mask"] = torch.zeros(64 // 4**stage, 49, 49)
        if stage < 3:
            for name in ("reduction.weight", "norm.weight", "norm.bias"):
                official[f"layers.{stage}.downsample.{name}"] = sd[f"features.{2 * stage + 2}.{name}"]
    return {"model": official}


@pytest.mark.parametrize("first_level", [3, 2])
def test_levels_strides_channels_and_norms(first_level):
    torch.manual_seed(0)
    backbone = build_backbone(_swin_cfg(), first_level).eval()
    names = [f"c{level}" for level in range(first_level, 6)]
    assert backbone.out_channels == [96, 192, 384, 768][first_level - 2:]
    for height, width in [(128, 128), (128, 96)]:  # 128x96: stages of 32x24 .. 4x3, no multiple of the 7x7 window
        x = torch.randn(1, 3, height, width)
        with torch.no_grad():
            out = backbone(x)
            stage4 = backbone.features(x)  # (N, H/32, W/32, 768), before the C5 norm
        assert list(out) == names
        for (name, feature), channels in zip(out.items(), backbone.out_channels):
            stride = 2 ** int(name[1])
            assert feature.shape == (1, channels, height // stride, width // stride)
            assert feature.dtype == torch.float32 and feature.is_contiguous()
            # a fresh LayerNorm over the channel axis: every location has mean 0 across channels
            torch.testing.assert_close(feature.mean(1), torch.zeros_like(feature[:, 0]), atol=1e-5, rtol=0)
        torch.testing.assert_close(out["c5"], backbone.norms["c5"](stage4).permute(0, 3, 1, 2))
    # nn.LayerNorm's default eps, as the release's norm{i} and torchvision's own Swin norms
    assert all(norm.eps == backbone.features[0][2].eps == 1e-5 for norm in backbone.norms.values())


@pytest.mark.parametrize(
    "freeze_at, frozen_prefixes",
    [
        (0, ()),
        (1, ("features.0.",)),
        (2, ("features.0.", "features.1.", "features.2.")),
        (4, ("features.0.", "features.1.", "features.2.", "features.3.", "features.4.", "features.5.", "features.6.")),
    ],
)
def test_freeze_at_freezes_patch_embedding_then_stages_with_their_merging(freeze_at, frozen_prefixes):
    backbone = build_backbone(_swin_cfg(freeze_at=freeze_at), first_level=2)
    frozen = {name for name, p in backbone.named_parameters() if not p.requires_grad}
    expected = {name for name, _ in backbone.named_parameters() if name.startswith(frozen_prefixes)}
    assert frozen == expected
    assert not any(name.startswith("norms.") for name in frozen)
    modules = dict(backbone.features.named_modules(prefix="features"))
    frozen_modules = {name for name in modules if (name + ".").startswith(frozen_prefixes)}
    assert {name for name, module in modules.items() if not module.training} == frozen_modules  # as built
    backbone.eval().train()
    assert {name for name, module in modules.items() if not module.training} == frozen_modules


def test_rejects_non_layernorm_norm_bad_freeze_at_and_first_level():
    with pytest.raises(ValueError, match="model.backbone.norm: expected ln, Swin's only norm"):
        build_backbone(_swin_cfg(norm="frozen_bn"))
    with pytest.raises(ValueError, match="freeze_at=6"):
        build_backbone(_swin_cfg(freeze_at=6))
    with pytest.raises(ValueError, match="first_level=4"):
        build_backbone(_swin_cfg(), first_level=4)


def test_official_key_spot_renames():
    assert official_key_to_torchvision("layers.0.downsample.reduction.weight") == "features.2.reduction.weight"
    assert official_key_to_torchvision("layers.2.downsample.norm.bias") == "features.6.norm.bias"
    assert official_key_to_torchvision("layers.2.blocks.5.mlp.fc2.bias") == "features.5.5.mlp.3.bias"
    assert official_key_to_torchvision("layers.3.blocks.1.attn.qkv.weight") == "features.7.1.attn.qkv.weight"
    assert official_key_to_torchvision("patch_embed.norm.weight") == "features.0.2.weight"
    with pytest.raises(ValueError, match="absolute_pos_embed"):
        official_key_to_torchvision("absolute_pos_embed")


def test_official_checkpoint_file_loads_every_tensor(source, tmp_path):
    official = _official_state_dict(source)
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save(official, path)
    backbone = build_backbone(_swin_cfg(weights=str(path)))
    loaded = backbone.features.state_dict()
    for name, value in source.features.state_dict().items():
        assert torch.equal(loaded[name], value), name
    spots = {
        "layers.0.downsample.reduction.weight": "2.reduction.weight",
        "layers.1.blocks.1.attn.relative_position_bias_table": "3.1.attn.relative_position_bias_table",
        "layers.2.blocks.5.mlp.fc1.weight": "5.5.mlp.0.weight",
        "patch_embed.proj.weight": "0.0.weight",
    }
    for official_name, tv_name in spots.items():
        assert torch.equal(loaded[tv_name], official["model"][official_name]), official_name


def test_named_torchvision_weights_are_loaded(source, monkeypatch):
    """Served from memory under torchvision's URL for them, so that nothing is downloaded."""
    available = {Swin_T_Weights.IMAGENET1K_V1.url: source.state_dict()}
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda weights, *args, **kwargs: available[weights.url])
    loaded = build_backbone(_swin_cfg(weights="IMAGENET1K_V1")).features.state_dict()
    for name, value in source.features.state_dict().items():
        assert torch.equal(loaded[name], value), name


def test_torchvision_layout_loads_too(source):
    target = swin_t()
    load_swin_state_dict(target.features, source.state_dict())
    loaded = target.features.state_dict()
    for name, value in source.features.state_dict().items():
        assert torch.equal(loaded[name], value), name


def _corrupt(state: dict, key: str, value=None) -> dict:
    model = dict(state["model"])
    if value is None:
        del model[key]
    else:
        model[key] = value
    return {"model": model}


def test_missing_unexpected_and_misshapen_tensors_are_named(source):
    official = _official_state_dict(source)
    target = swin_t().features
    with pytest.raises(ValueError, match=r"features\.3\.0\.attn\.qkv\.weight"):
        load_swin_state_dict(target, _corrupt(official, "layers.1.blocks.0.attn.qkv.weight"))
    with pytest.raises(ValueError, match=r"layers\.0\.blocks\.2\.norm1\.weight"):
        load_swin_state_dict(target, _corrupt(official, "layers.0.blocks.2.norm1.weight", torch.ones(96)))
    with pytest.raises(ValueError, match=r"layers\.2\.blocks\.1\.attn\.relative_position_bias_table.*\(169, 12\)"):
        load_swin_state_dict(
            target, _corrupt(official, "layers.2.blocks.1.attn.relative_position_bias_table", torch.zeros(529, 12))
        )
    with pytest.raises(ValueError, match="absolute_pos_embed"):
        load_swin_state_dict(target, _corrupt(official, "absolute_pos_embed", torch.zeros(1, 96, 56, 56)))
    with pytest.raises(ValueError, match="neither a torchvision nor an official"):
        load_swin_state_dict(target, {"conv1.weight": torch.zeros(1)})


def test_a_weights_file_that_does_not_fit_is_a_checkpoint_error(tmp_path):
    """CheckpointError, which the CLI reports in one line, rather than the loader's ValueError."""
    path = tmp_path / "swin_stem_only.pth"
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(96, 3, 4, 4)}}, path)
    with pytest.raises(CheckpointError, match=r"swin_stem_only\.pth: lacks"):
        build_backbone(_swin_cfg(weights=str(path)))


def _release_window_attention(x: torch.Tensor, attn: torch.nn.Module, shift: int) -> torch.Tensor:
    """The official Swin detection backbone's (shifted) window attention of ``x`` (1, H, W, C), written over the
    whole padded map rather than window by window: a token attends to the tokens of its window, with the
    relative position bias read from the table by coordinates and -100 between the shift mask's regions. The
    map is padded to a multiple of the 7x7 window and rolled by ``shift`` whatever its size."""
    _, height, width, channels = x.shape
    window, heads = 7, attn.num_heads
    x = torch.roll(F.pad(x, (0, 0, 0, -width % window, 0, -height % window)), (-shift, -shift), (1, 2))
    padded_h, padded_w = x.shape[1:3]
    regions = torch.zeros(padded_h, padded_w)
    if shift:  # the release's slices, assigned in its order
        count = 0
        for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                regions[rows, cols] = count
                count += 1
    ys, xs = torch.meshgrid(torch.arange(padded_h), torch.arange(padded_w), indexing="ij")
    ys, xs, regions = ys.flatten(), xs.flatten(), regions.flatten()
    dy, dx = ys[:, None] - ys[None], xs[:, None] - xs[None]
    bias = attn.relative_position_bias_table[((dy + window - 1) * (2 * window - 1) + dx + window - 1).clamp(0, 168)]
    bias = bias.permute(2, 0, 1) - 100.0 * (regions[:, None] != regions[None])  # (heads, HW, HW)
    same_window = (ys[:, None] // window == ys[None] // window) & (xs[:, None] // window == xs[None] // window)
    bias = bias.masked_fill(~same_window, float("-inf"))
    qkv = F.linear(x.reshape(-1, channels), attn.qkv.weight, attn.qkv.bias).view(-1, 3, heads, channels // heads)
    q, k, v = qkv.unbind(1)  # (HW, heads, head_dim) each
    logits = torch.einsum("qhd,khd->hqk", q, k) * (channels // heads) ** -0.5 + bias
    out = torch.einsum("hqk,khd->qhd", logits.softmax(-1), v).reshape(-1, channels)
    out = F.linear(out, attn.proj.weight, attn.proj.bias).view(1, padded_h, padded_w, channels)
    return torch.roll(out, (shift, shift), (1, 2))[:, :height, :width]


def _small_swin() -> SwinTransformer:
    """A 4-stage Swin with 7x7 windows, 16 channels and every parameter distinct noise."""
    torch.manual_seed(0)
    body = SwinTransformer([4, 4], 16, [2, 2, 2, 2], [1, 2, 2, 4], [7, 7], stochastic_depth_prob=0.0)
    with torch.no_grad():
        for param in body.parameters():
            param.normal_(0, 0.3)
    return body.eval()


@pytest.mark.parametrize("stage4_size", [(5, 6), (5, 12), (10, 12)])
def test_windows_shift_as_in_the_official_backbone_at_every_size(stage4_size):
    # stage 4 at 5x6 is one padded window (torchvision shifts neither axis), at 5x12 one window high (it shifts
    # only along the width), at 10x12 two by two (it shifts both, as the release)
    plain = _small_swin()
    backbone = SwinBackbone(copy.deepcopy(plain)).eval()
    height, width = stage4_size
    image = torch.randn(1, 3, 32 * height, 32 * width)
    with torch.no_grad():
        stage4_input = plain.features[:7](image)
        torch.testing.assert_close(backbone.features[:7](image), stage4_input)  # stages 1-3 shift in both
        ours = backbone.features[7](stage4_input)
        reference = stage4_input
        for index, block in enumerate(plain.features[7]):
            attended = _release_window_attention(block.norm1(reference), block.attn, shift=3 * (index % 2))
            reference = reference + attended
            reference = reference + block.mlp(block.norm2(reference))
        torchvision_out = plain.features[7](stage4_input)
    # values reach ~30: float32 rounding of the two orders of summation stays near 2e-5
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-5)
    if stage4_size == (10, 12):
        torch.testing.assert_close(ours, torchvision_out)
    else:  # not shifting moves outputs by ~7 or more
        assert (torchvision_out - reference).abs().max() > 1.0
    assert backbone.features.state_dict().keys() == plain.features.state_dict().keys()


def test_atss_dyhead_on_swin_t_trains():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=_swin_cfg(), fpn_channels=32, dyhead_channels=32, dyhead_blocks=1,
                      dyhead_backend="sampled")
    model = build_detector(cfg, num_classes=3).train()
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]]), "labels": torch.tensor([1])}]
    losses = model(torch.randn(1, 3, 128, 128), [(128, 128)], targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    features = model.backbone.features
    for param in (features[0][0].weight, features[7][1].mlp[3].weight, model.backbone.norms["c3"].weight):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_swin_t_config_loads():
    cfg = load_config(REPO / "configs" / "atss_swint_dyhead_2x_ms.yaml")
    backbone = cfg.model.backbone
    assert (backbone.name, backbone.norm, backbone.freeze_at) == ("swin_t", "ln", 0)
    assert (cfg.solver.optimizer, cfg.solver.base_lr, cfg.solver.weight_decay) == ("adamw", 1e-4, 0.05)
    assert cfg.solver.ims_per_batch * cfg.solver.max_iter == 16 * 180000
    assert cfg.data.input.min_size_train == [640, 672, 704, 736, 768, 800]
