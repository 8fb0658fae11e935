"""A test-only restatement of the official DyHead forward, from the issue's semantics, on raw official keys.

Written from the release's description with ``torchvision.ops.deform_conv2d`` directly, not from the library's
modules, so that the library is checked against an independent statement of the math.
"""

import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d


def official_state_dict(num_blocks, in_channels, channels, generator, prefix="backbone.dyhead_tower"):
    """Random tensors under the release's key names (the GN and bias entries random too, to catch mix-ups)."""
    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    hidden = channels // 4
    sd = {}
    for i in range(num_blocks):
        cin = in_channels if i == 0 else channels
        p = f"{prefix}.{i}"
        for j in range(3):
            sd[f"{p}.DyConv.{j}.conv.weight"] = r(channels, cin, 3, 3)
            sd[f"{p}.DyConv.{j}.conv.bias"] = r(channels)
            sd[f"{p}.DyConv.{j}.bn.weight"] = 1 + r(channels)
            sd[f"{p}.DyConv.{j}.bn.bias"] = r(channels)
        sd[f"{p}.AttnConv.1.weight"] = r(1, channels, 1, 1, scale=0.5)
        sd[f"{p}.AttnConv.1.bias"] = r(1) + 1.0
        sd[f"{p}.relu.fc.0.weight"] = r(hidden, channels, scale=0.5)
        sd[f"{p}.relu.fc.0.bias"] = r(hidden)
        sd[f"{p}.relu.fc.2.weight"] = r(4 * channels, hidden, scale=0.5)
        sd[f"{p}.relu.fc.2.bias"] = r(4 * channels)
        # Large offsets so that samples cross pixel borders and leave the image.
        sd[f"{p}.offset.weight"] = r(27, cin, 3, 3, scale=0.5)
        sd[f"{p}.offset.bias"] = r(27, scale=1.0)
    return sd


def _hsig(t):
    return torch.clamp(t + 3, 0, 6) / 6


def _dcn_gn(sd, p, j, x, offset, mask, stride):
    y = deform_conv2d(x, offset, sd[f"{p}.DyConv.{j}.conv.weight"], sd[f"{p}.DyConv.{j}.conv.bias"],
                      stride=stride, padding=1, mask=mask)
    return F.group_norm(y, 16, sd[f"{p}.DyConv.{j}.bn.weight"], sd[f"{p}.DyConv.{j}.bn.bias"])


def _first_values(t, h, w):
    """Each image's first K*h*w values of its contiguous [K, H, W] block, read as [K, h, w]."""
    n, k = t.shape[:2]
    return t.contiguous().reshape(n, -1)[:, : k * h * w].reshape(n, k, h, w)


def official_forward(sd, levels, num_blocks, high_offsets, prefix="backbone.dyhead_tower"):
    """levels: list of (N, C, H_l, W_l) float64 -> list after num_blocks official blocks."""
    for i in range(num_blocks):
        p = f"{prefix}.{i}"
        out = []
        for l, x in enumerate(levels):
            om = F.conv2d(x, sd[f"{p}.offset.weight"], sd[f"{p}.offset.bias"], padding=1)
            offset, mask = om[:, :18], torch.sigmoid(om[:, 18:])
            feats = [_dcn_gn(sd, p, 1, x, offset, mask, 1)]
            if l > 0:
                feats.append(_dcn_gn(sd, p, 2, levels[l - 1], offset, mask, 2))
            if l < len(levels) - 1:
                hc, wc = levels[l + 1].shape[-2:]
                if high_offsets == "official":
                    off_c, mask_c = _first_values(offset, hc, wc), _first_values(mask, hc, wc)
                else:
                    off_c, mask_c = offset[..., :hc, :wc], mask[..., :hc, :wc]
                y = _dcn_gn(sd, p, 0, levels[l + 1], off_c, mask_c, 1)
                feats.append(F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=True))
            total = 0
            for f in feats:
                a = F.conv2d(f.mean(dim=(2, 3), keepdim=True), sd[f"{p}.AttnConv.1.weight"], sd[f"{p}.AttnConv.1.bias"])
                total = total + f * _hsig(F.relu(a))
            m = total / len(feats)
            c = m.shape[1]
            y = F.linear(m.mean(dim=(2, 3)), sd[f"{p}.relu.fc.0.weight"], sd[f"{p}.relu.fc.0.bias"])
            y = _hsig(F.linear(F.relu(y), sd[f"{p}.relu.fc.2.weight"], sd[f"{p}.relu.fc.2.bias"]))
            a1, b1, a2, b2 = [t[:, :, None, None] for t in y.split(c, dim=1)]
            a1, b1, a2, b2 = (a1 - 0.5) * 2 + 1, b1 - 0.5, (a2 - 0.5) * 2, b2 - 0.5
            out.append(torch.max(m * a1 + b1, m * a2 + b2))
        levels = out
    return levels
