"""Loading the release's and mmdetection's weights."""

import logging

import pytest
import torch

from dyhead import DyHead, convert_state_dict, load_official
from official_reference import official_state_dict


def test_whole_detector_checkpoint_with_model_entry(tmp_path, caplog):
    g = torch.Generator().manual_seed(0)
    sd = official_state_dict(2, 16, 16, g)
    sd["backbone.bottom_up.stem.conv1.weight"] = torch.randn(8, 3, 7, 7)
    sd["proposal_generator.head.cls_logits.weight"] = torch.randn(80, 16, 1, 1)
    path = tmp_path / "model_final.pth"
    torch.save({"model": sd, "iteration": 90000}, path)
    with caplog.at_level(logging.INFO, logger="dyhead.official"):
        converted = load_official(path)
    assert "left out 2 keys" in caplog.text and "cls_logits" in caplog.text
    model = DyHead(16, 16, 2).double()
    missing, unexpected = model.load_state_dict(converted, strict=True)
    assert not missing and not unexpected
    block = model.blocks[1]
    p = "backbone.dyhead_tower.1"
    torch.testing.assert_close(block.spatial.coarser.conv.weight, sd[f"{p}.DyConv.0.conv.weight"])
    torch.testing.assert_close(block.spatial.same.norm.bias, sd[f"{p}.DyConv.1.bn.bias"])
    torch.testing.assert_close(block.spatial.finer.conv.bias, sd[f"{p}.DyConv.2.conv.bias"])
    torch.testing.assert_close(block.scale.conv.weight, sd[f"{p}.AttnConv.1.weight"])
    torch.testing.assert_close(block.task.fc2.weight, sd[f"{p}.relu.fc.2.weight"])
    torch.testing.assert_close(block.spatial.offset.bias, sd[f"{p}.offset.bias"])


def test_names_that_only_end_in_the_block_prefix_are_left_out():
    """dyhead_tower / dyhead_blocks must be a whole name component: 'my_dyhead_tower.0...' is not DyHead's."""
    w = torch.zeros(27, 16, 3, 3)
    assert convert_state_dict({"backbone.my_dyhead_tower.0.offset.weight": w,
                               "neck.xdyhead_blocks.0.spatial_conv_offset.weight": w}) == {}
    assert list(convert_state_dict({"dyhead_tower.0.offset.weight": w})) == ["blocks.0.spatial.offset.weight"]


class Opaque:
    """An arbitrary pickled object, which torch.load(weights_only=True) refuses."""


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    """Weights only: a checkpoint that would run arbitrary unpickling is refused even when it holds DyHead keys."""
    path = tmp_path / "pickled.pth"
    torch.save({"model": official_state_dict(1, 16, 16, torch.Generator().manual_seed(4)), "extra": Opaque()}, path)
    with pytest.raises(ValueError, match="pickled.pth is not a readable PyTorch checkpoint"):
        load_official(path)


def mmdet_state_dict(num_blocks, c, g):
    sd = {}
    for i in range(num_blocks):
        p = f"neck.1.dyhead_blocks.{i}"
        for role in ("high", "mid", "low"):
            sd[f"{p}.spatial_conv_{role}.conv.weight"] = torch.randn(c, c, 3, 3, generator=g)
            sd[f"{p}.spatial_conv_{role}.norm.weight"] = torch.randn(c, generator=g)
            sd[f"{p}.spatial_conv_{role}.norm.bias"] = torch.randn(c, generator=g)
        sd[f"{p}.spatial_conv_offset.weight"] = torch.randn(27, c, 3, 3, generator=g)
        sd[f"{p}.spatial_conv_offset.bias"] = torch.randn(27, generator=g)
        sd[f"{p}.scale_attn_module.1.weight"] = torch.randn(1, c, 1, 1, generator=g)
        sd[f"{p}.scale_attn_module.1.bias"] = torch.randn(1, generator=g)
        sd[f"{p}.task_attn_module.conv1.conv.weight"] = torch.randn(c // 4, c, 1, 1, generator=g)
        sd[f"{p}.task_attn_module.conv1.conv.bias"] = torch.randn(c // 4, generator=g)
        sd[f"{p}.task_attn_module.conv2.conv.weight"] = torch.randn(4 * c, c // 4, 1, 1, generator=g)
        sd[f"{p}.task_attn_module.conv2.conv.bias"] = torch.randn(4 * c, generator=g)
    return sd


def test_mmdetection_names(caplog):
    sd = mmdet_state_dict(2, 32, torch.Generator().manual_seed(1))
    with caplog.at_level(logging.WARNING, logger="dyhead.official"):
        converted = convert_state_dict({"state_dict": sd, "meta": {}})
    assert "no bias" in caplog.text
    model = DyHead(32, 32, 2)
    model.load_state_dict(converted, strict=True)
    block = model.blocks[0]
    p = "neck.1.dyhead_blocks.0"
    torch.testing.assert_close(block.spatial.coarser.conv.weight, sd[f"{p}.spatial_conv_high.conv.weight"])
    torch.testing.assert_close(block.spatial.finer.norm.weight, sd[f"{p}.spatial_conv_low.norm.weight"])
    assert torch.count_nonzero(block.spatial.same.conv.bias) == 0
    torch.testing.assert_close(block.task.fc1.weight, sd[f"{p}.task_attn_module.conv1.conv.weight"].flatten(1))
    torch.testing.assert_close(block.scale.conv.bias, sd[f"{p}.scale_attn_module.1.bias"])


def test_mmdetection_zero_biases_keep_the_checkpoint_dtype():
    """The added zero biases have the dtype of the weights beside them (a half checkpoint stays half)."""
    sd = {k: v.half() for k, v in mmdet_state_dict(1, 16, torch.Generator().manual_seed(3)).items()}
    converted = convert_state_dict(sd)
    assert {v.dtype for v in converted.values()} == {torch.float16}
    assert torch.count_nonzero(converted["blocks.0.spatial.finer.conv.bias"]) == 0


def test_mmdetection_task_attention_same_function():
    """A 1x1 conv on the pooled vector and the converted linear layer compute the same coefficients."""
    sd = mmdet_state_dict(1, 16, torch.Generator().manual_seed(2))
    model = DyHead(16, 16, 1)
    model.load_state_dict(convert_state_dict(sd))
    x = torch.randn(2, 16, 5, 5)
    pooled = x.mean(dim=(2, 3), keepdim=True)
    p = "neck.1.dyhead_blocks.0.task_attn_module"
    h = torch.relu(torch.nn.functional.conv2d(pooled, sd[f"{p}.conv1.conv.weight"], sd[f"{p}.conv1.conv.bias"]))
    y = torch.nn.functional.conv2d(h, sd[f"{p}.conv2.conv.weight"], sd[f"{p}.conv2.conv.bias"])
    y = torch.clamp((y + 3) / 6, 0, 1) - 0.5
    a1, b1, a2, b2 = y.split(16, dim=1)
    expected = torch.max(x * (a1 * 2 + 1) + b1, x * (a2 * 2) + b2)
    torch.testing.assert_close(model.blocks[0].task(x), expected)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_official(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match=r"junk.pth.*not a readable.*neither a zip archive nor a pickle.*b'this is "):
        load_official(junk)
    empty = tmp_path / "empty.pth"
    empty.touch()
    with pytest.raises(ValueError, match="empty.pth is not a readable PyTorch checkpoint: the file is empty"):
        load_official(empty)
    with pytest.raises(ValueError, match=f"DyHead checkpoint {tmp_path} is a folder, not a file"):
        load_official(tmp_path)
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="resnet.pth has no DyHead weights"):
        load_official(other)
    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(ValueError, match="tensor.pth holds a Tensor"):
        load_official(tensor_only)
