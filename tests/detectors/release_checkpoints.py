"""Key names and shapes of the release's detector checkpoints (microsoft/DynamicHead), for synthetic stand-ins.

Written from detectron2's and the release's module naming (each detector's ``backbone`` is a DyHead whose
``backbone`` is detectron2's FPN, whose ``bottom_up`` is the ResNet or Swin of ``extra/swint.py``), not from the
converter's tables, so that the tests check the converter against an independent statement of the layout.
"""

import torch

R50_BLOCKS = {2: 3, 3: 4, 4: 6, 5: 3}  # res2..res5
FROZEN_BN = ("weight", "bias", "running_mean", "running_var")
SWIN_T = {"embed_dim": 96, "depths": (2, 2, 6, 2), "heads": (3, 6, 12, 24), "window": 7}


class _Shapes(dict):
    def conv_norm(self, prefix, shape):
        self[f"{prefix}.weight"] = shape
        self.update({f"{prefix}.norm.{p}": (shape[0],) for p in FROZEN_BN})

    def weight_bias(self, prefix, shape):
        self[f"{prefix}.weight"] = shape
        self[f"{prefix}.bias"] = (shape[0],)


def _resnet50(shapes, prefix):
    shapes.conv_norm(f"{prefix}.stem.conv1", (64, 3, 7, 7))
    cin = 64
    for stage, depth in R50_BLOCKS.items():
        width = 64 * 2 ** (stage - 2)
        for b in range(depth):
            p = f"{prefix}.res{stage}.{b}"
            if b == 0:
                shapes.conv_norm(f"{p}.shortcut", (4 * width, cin, 1, 1))
            shapes.conv_norm(f"{p}.conv1", (width, cin, 1, 1))
            shapes.conv_norm(f"{p}.conv2", (width, width, 3, 3))
            shapes.conv_norm(f"{p}.conv3", (4 * width, width, 1, 1))
            cin = 4 * width
    return {stage: 256 * 2 ** (stage - 2) for stage in R50_BLOCKS}


def _swin_t(shapes, prefix):
    """The release's SwinTransformer (mmdetection's Swin layout) with OUT_FEATURES stage3-stage5."""
    dim, window = SWIN_T["embed_dim"], SWIN_T["window"]
    shapes.weight_bias(f"{prefix}.patch_embed.proj", (dim, 3, 4, 4))
    shapes.weight_bias(f"{prefix}.patch_embed.norm", (dim,))
    channels = {}
    for i, (depth, heads) in enumerate(zip(SWIN_T["depths"], SWIN_T["heads"])):
        d = dim * 2**i
        for j in range(depth):
            p = f"{prefix}.layers.{i}.blocks.{j}"
            shapes.weight_bias(f"{p}.norm1", (d,))
            shapes[f"{p}.attn.relative_position_bias_table"] = ((2 * window - 1) ** 2, heads)
            shapes[f"{p}.attn.relative_position_index"] = (window**2, window**2)
            shapes.weight_bias(f"{p}.attn.qkv", (3 * d, d))
            shapes.weight_bias(f"{p}.attn.proj", (d, d))
            shapes.weight_bias(f"{p}.norm2", (d,))
            shapes.weight_bias(f"{p}.mlp.fc1", (4 * d, d))
            shapes.weight_bias(f"{p}.mlp.fc2", (d, 4 * d))
        if i < 3:
            shapes[f"{prefix}.layers.{i}.downsample.reduction.weight"] = (2 * d, 4 * d)
            shapes.weight_bias(f"{prefix}.layers.{i}.downsample.norm", (4 * d,))
        if i >= 1:  # stage{i + 2} in OUT_FEATURES
            shapes.weight_bias(f"{prefix}.norm{i}", (d,))
            channels[i + 2] = d
    return channels


def _dyhead_tower(shapes, blocks, c=256):
    for i in range(blocks):
        p = f"backbone.dyhead_tower.{i}"
        for j in range(3):
            shapes.weight_bias(f"{p}.DyConv.{j}.conv", (c, c, 3, 3))
            shapes.weight_bias(f"{p}.DyConv.{j}.bn", (c,))
        shapes.weight_bias(f"{p}.AttnConv.1", (1, c, 1, 1))
        shapes.weight_bias(f"{p}.relu.fc.0", (c // 4, c))
        shapes.weight_bias(f"{p}.relu.fc.2", (4 * c, c // 4))
        shapes.weight_bias(f"{p}.offset", (27, c, 3, 3))


def release_shapes(architecture="atss", backbone="resnet", num_classes=80, dyhead_blocks=6, c=256, anchors=9):
    """{official key: shape} of the release's ``architecture`` (atss/retinanet/faster_rcnn) on ``backbone``
    (resnet: R50, swin: Swin-T); ``anchors`` per position for RetinaNet."""
    shapes = _Shapes()
    bottom_up = "backbone.backbone.bottom_up"
    channels = _swin_t(shapes, bottom_up) if backbone == "swin" else _resnet50(shapes, bottom_up)
    first = 2 if architecture == "faster_rcnn" else 3
    for level in range(first, 6):
        shapes.weight_bias(f"backbone.backbone.fpn_lateral{level}", (c, channels[level], 1, 1))
        shapes.weight_bias(f"backbone.backbone.fpn_output{level}", (c, c, 3, 3))
    if architecture != "faster_rcnn":  # LastLevelP6P7; Faster R-CNN's LastLevelMaxPool has no weights
        for extra in ("p6", "p7"):
            shapes.weight_bias(f"backbone.backbone.top_block.{extra}", (c, c, 3, 3))
    _dyhead_tower(shapes, dyhead_blocks, c)
    if architecture == "atss":
        shapes.weight_bias("head.cls_logits", (num_classes, c, 1, 1))
        shapes.weight_bias("head.bbox_pred", (4, c, 1, 1))
        shapes.weight_bias("head.centerness", (1, c, 1, 1))
        shapes.update({f"head.scales.{level}.scale": (1,) for level in range(5)})
    elif architecture == "retinanet":  # detectron2's RetinaNetHead, NUM_CONVS 4
        for tower in ("cls_subnet", "bbox_subnet"):
            for i in range(4):
                shapes.weight_bias(f"head.{tower}.{2 * i}", (c, c, 3, 3))
        shapes.weight_bias("head.cls_score", (anchors * num_classes, c, 3, 3))
        shapes.weight_bias("head.bbox_pred", (anchors * 4, c, 3, 3))
    else:  # StandardRPNHead (3 anchors), FastRCNNConvFCHead (2 x 1024), FastRCNNOutputLayers
        shapes.weight_bias("proposal_generator.rpn_head.conv", (c, c, 3, 3))
        shapes.weight_bias("proposal_generator.rpn_head.objectness_logits", (3, c, 1, 1))
        shapes.weight_bias("proposal_generator.rpn_head.anchor_deltas", (3 * 4, c, 1, 1))
        shapes.weight_bias("roi_heads.box_head.fc1", (1024, c * 7 * 7))
        shapes.weight_bias("roi_heads.box_head.fc2", (1024, 1024))
        shapes.weight_bias("roi_heads.box_predictor.cls_score", (num_classes + 1, 1024))
        shapes.weight_bias("roi_heads.box_predictor.bbox_pred", (num_classes * 4, 1024))
    return dict(shapes)


def random_release(architecture="atss", backbone="resnet", seed=0, **kwargs):
    """A state dict with the release's keys and shapes and random values (integer position indices)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in release_shapes(architecture, backbone, **kwargs).items():
        if key.endswith("relative_position_index"):
            state[key] = torch.randint(0, 169, shape, generator=g)
        else:
            state[key] = torch.randn(shape, generator=g)
    return state
