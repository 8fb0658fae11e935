"""Scale-aware attention: how much each branch reaching a pyramid level counts."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import hard_sigmoid


class ScaleAttention(nn.Module):
    """Weight each branch by ``hsig(relu(conv1x1(avgpool(branch))))`` and average the weighted branches.

    out = (1/B) * sum_b branch_b * hard_sigmoid(relu(w . mean_hw(branch_b) + c)), one scalar weight per image
    and branch, with ``hard_sigmoid(t) = relu6(t + 3) / 6``. There is no residual.

    Args:
        channels: C of every branch.

    Initialised as the release: conv weight N(0, 0.01), bias zero.
    forward(branches: B tensors (N, C, H, W), any floating dtype) -> (N, C, H, W).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size=1)
        nn.init.normal_(self.conv.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv.bias)

    def attention(self, pooled: Tensor) -> Tensor:
        """pooled: (N, C, 1, 1) spatial means of branches -> their attention weights (N, 1, 1, 1) in [0, 1]."""
        return hard_sigmoid(F.relu(self.conv(pooled)))

    def weight(self, branch: Tensor) -> Tensor:
        """branch: (N, C, H, W) -> its attention weight (N, 1, 1, 1) in [0, 1]."""
        return self.attention(F.adaptive_avg_pool2d(branch, 1))

    def forward(self, branches: Sequence[Tensor]) -> Tensor:
        weighted = [branch * self.weight(branch) for branch in branches]
        return torch.stack(weighted).mean(dim=0)
