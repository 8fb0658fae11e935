"""ResNet backbones: the slim ResNet against torchvision's resnet18, freezing, levels and channels, torchvision's
named weights, and what is refused."""

import pytest
import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models._api import WeightsEnum

from detectors.backbones import ResNetBackbone, build_backbone, move_stride_to_1x1, prepare_backbone_weights
from detectors.config import BackboneConfig
from detectors.engine.checkpoint import CheckpointError


def _noisy_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Batch norms with distinct affines and statistics, so that a norm in the wrong place changes the output."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def test_slim_at_resnet18_widths_is_torchvision_resnet18():
    """SlimResNet promises torchvision's ResNet layout: at resnet18's widths and depths (the config's defaults)
    it has resnet18's tensors, initialised as torchvision does, and computes resnet18's stages with them."""
    torch.manual_seed(0)
    reference = _noisy_norms(resnet.resnet18()).eval()
    backbone = build_backbone(BackboneConfig(name="slim", weights=None, norm="bn"), first_level=2).eval()
    theirs = {name: value for name, value in reference.state_dict().items() if not name.startswith("fc.")}
    ours = backbone.body.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    # kaiming normal over the fan-out, not PyTorch's default conv init (2.4x smaller here)
    for name in ("conv1.weight", "layer3.0.downsample.0.weight", "layer4.1.conv2.weight"):
        torch.testing.assert_close(ours[name].std(), theirs[name].std(), rtol=0.05, atol=0)

    backbone.body.load_state_dict(theirs)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = backbone(x)
        y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        for level, stage in enumerate((reference.layer1, reference.layer2, reference.layer3, reference.layer4), 2):
            y = stage(y)
            torch.testing.assert_close(out[f"c{level}"], y)
    assert list(out) == ["c2", "c3", "c4", "c5"] and backbone.out_channels == [64, 128, 256, 512]
    assert type(backbone.body.bn1) is torch.nn.BatchNorm2d  # norm bn trains, unlike frozen_bn


@pytest.mark.parametrize(
    "freeze_at, frozen_prefixes",
    [(0, ()), (1, ("conv1.", "bn1.")), (3, ("conv1.", "bn1.", "layer1.", "layer2."))],
)
def test_freeze_at_freezes_the_stem_then_stages(freeze_at, frozen_prefixes):
    cfg = BackboneConfig(name="slim", weights=None, norm="bn", freeze_at=freeze_at, widths=[8, 8, 16, 16],
                         depths=[1, 1, 1, 1])
    params = dict(build_backbone(cfg, first_level=2).body.named_parameters())
    assert {name for name, p in params.items() if not p.requires_grad} == {
        name for name in params if name.startswith(frozen_prefixes)
    }


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_out_channels_are_those_of_the_returned_levels(name):
    backbone = build_backbone(BackboneConfig(name=name, weights=None), first_level=2).eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 96))
    assert [f.shape[1] for f in out.values()] == backbone.out_channels
    assert [tuple(f.shape[2:]) for f in out.values()] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_named_torchvision_weights_are_the_starting_point(monkeypatch):
    """Served from memory under torchvision's URL for them, so that nothing is downloaded."""
    served = _noisy_norms(resnet.resnet18()).state_dict()
    available = {resnet.ResNet18_Weights.IMAGENET1K_V1.url: served}
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda weights, *args, **kwargs: available[weights.url])
    cfg = BackboneConfig(name="resnet18", weights="IMAGENET1K_V1", norm="frozen_bn")
    prepare_backbone_weights(cfg)
    for name, value in build_backbone(cfg).body.state_dict().items():
        assert torch.equal(value, served[name]), name


def test_a_pth_loads_whole_and_another_depths_is_refused(tmp_path):
    """resnet34's blocks have resnet18's shapes where both have them: loading it would fill resnet18 with the first
    blocks of each stage. The classifier may be absent, and a group-norm body takes a batch-norm file's affines."""
    source = _noisy_norms(resnet.resnet18())
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "r18.pth")
    for norm in ("bn", "gn"):
        backbone = build_backbone(BackboneConfig(name="resnet18", weights=str(tmp_path / "r18.pth"), norm=norm))
        loaded = backbone.body.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items() if k in loaded), norm
        assert torch.equal(backbone.body.layer4[1].bn2.weight, source.layer4[1].bn2.weight), norm
    torch.save(resnet.resnet34().state_dict(), tmp_path / "r34.pth")
    # 8 more blocks (1, 2, 4, 1 per stage), each 2 convs and 2 norm weights and biases
    with pytest.raises(CheckpointError, match=r"r34.pth have 48 tensors resnet18 does not, "
                                              r"e.g. \['layer1.2.conv1.weight'.*another depth"):
        build_backbone(BackboneConfig(name="resnet18", weights=str(tmp_path / "r34.pth"), norm="bn"))


def test_group_norm_takes_its_groups_from_the_config():
    """norm: gn builds detectron2's GroupNorm(32) by default, and gn_groups where the config sets it, everywhere."""
    for cfg, groups in ((BackboneConfig(name="resnet18", weights=None, norm="gn"), 32),
                        (BackboneConfig(name="slim", weights=None, norm="gn", gn_groups=4, widths=[4, 8, 8, 12]), 4)):
        norms = [m for m in build_backbone(cfg).body.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
        assert norms and all(isinstance(m, nn.GroupNorm) and m.num_groups == groups for m in norms), cfg.name
    with pytest.raises(ValueError, match=r"gn_groups: expected a divisor of slim's channel counts \(the widths "
                                         r"\[4, 8, 8, 12\]\), got 8"):
        build_backbone(BackboneConfig(name="slim", weights=None, norm="gn", gn_groups=8, widths=[4, 8, 8, 12]))


def test_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match=r"model.backbone.norm: expected frozen_bn, bn or gn \(ln is Swin's\)"):
        build_backbone(BackboneConfig(name="resnet18", weights=None, norm="ln"))
    with pytest.raises(ValueError, match=r"4 widths and 4 depths, got \[8, 16, 32\]"):
        build_backbone(BackboneConfig(name="slim", weights=None, norm="bn", widths=[8, 16, 32], depths=[1, 1, 1]))
    with pytest.raises(ValueError, match="first_level=4"):
        ResNetBackbone(resnet.resnet18(), [64, 128, 256, 512], first_level=4)
    with pytest.raises(ValueError, match="needs Bottleneck blocks, got BasicBlock"):
        move_stride_to_1x1(resnet.resnet18())
