"""Detectron2-style box coder: boxes as (dx, dy, dw, dh) deltas relative to anchors."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["BoxCoder"]


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


class BoxCoder:
    """Encodes boxes relative to anchors and decodes them back, as detectron2's ``Box2BoxTransform``.

    Widths are ``x2 - x1`` (no +1). ``dw``/``dh`` are clamped at decode time to ``log(1000 / 16)`` so
    that an untrained head cannot produce overflowing boxes.

    Args:
        weights: divisors-to-be of (dx, dy, dw, dh): deltas are multiplied by them when encoding.
        scale_clamp: upper bound on decoded ``dw``/``dh``.
    """

    def __init__(
        self,
        weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        scale_clamp: float = math.log(1000.0 / 16),
    ):
        self.weights = weights
        self.scale_clamp = scale_clamp

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """``boxes``, ``anchors``: ``(..., 4)`` float x1,y1,x2,y2 -> deltas ``(..., 4)`` of the same dtype."""
        wx, wy, ww, wh = self.weights
        ax, ay, aw, ah = _centre_size(anchors)
        bx, by, bw, bh = _centre_size(boxes)
        return torch.stack(
            (wx * (bx - ax) / aw, wy * (by - ay) / ah, ww * torch.log(bw / aw), wh * torch.log(bh / ah)), dim=-1
        )

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """``deltas``, ``anchors``: ``(..., 4)`` -> boxes ``(..., 4)`` x1,y1,x2,y2 in the deltas' dtype."""
        anchors = anchors.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        ax, ay, aw, ah = _centre_size(anchors)
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.scale_clamp)
        cx = dx * aw + ax
        cy = dy * ah + ay
        w = torch.exp(dw) * aw
        h = torch.exp(dh) * ah
        return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)
