"""Task-aware attention: dynamic ReLU with per-channel coefficients from a pooled MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import hard_sigmoid


def squeeze_channels(channels: int) -> int:
    """Hidden width of the coefficient MLP: C // 4, as the release's DYReLU at its reduction of 4 (it rounds to
    a multiple of 4 only for other reductions) and mmdetection's DyReLU."""
    return channels // 4


class TaskAttention(nn.Module):
    """Dynamic ReLU: ``out = max(x * a1 + b1, x * a2 + b2)`` with coefficients predicted per image and channel.

    ``y = hard_sigmoid(fc2(relu(fc1(mean_hw(x)))))`` is split into four C-chunks (y1, y2, y3, y4) and
    ``a1 = (y1 - 0.5) * 2 + 1``, ``b1 = y2 - 0.5``, ``a2 = (y3 - 0.5) * 2``, ``b2 = y4 - 0.5``, so that at
    y = 0.5 the layer is a plain ReLU (a1 = 1, the rest 0).

    Args:
        channels: C.

    fc1: C -> squeeze_channels(C), fc2: -> 4C, both with PyTorch's default init.
    forward(x: (N, C, H, W), any floating dtype) -> (N, C, H, W).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        hidden = squeeze_channels(channels)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, 4 * channels)

    def coefficients(self, pooled: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """pooled: (N, C) spatial means of x -> (a1, b1, a2, b2), each (N, C)."""
        y = hard_sigmoid(self.fc2(F.relu(self.fc1(pooled))))  # (N, 4C)
        y1, y2, y3, y4 = y.split(self.channels, dim=1)
        return (y1 - 0.5) * 2.0 + 1.0, y2 - 0.5, (y3 - 0.5) * 2.0, y4 - 0.5

    def forward(self, x: Tensor) -> Tensor:
        a1, b1, a2, b2 = (t[:, :, None, None] for t in self.coefficients(x.mean(dim=(2, 3))))
        return torch.maximum(x * a1 + b1, x * a2 + b2)
