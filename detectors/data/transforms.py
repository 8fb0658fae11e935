"""Image transforms for detection: short-side resize, horizontal flip, normalisation, batch padding."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor

from ..config import InputConfig

__all__ = ["DetectionTransform", "pad_batch"]


class DetectionTransform:
    """Resizes (and in training flips) an image and its boxes, then converts it to a normalised tensor.

    The short side is resized to ``min_size`` (in training, one of ``min_sizes`` drawn per image) unless
    the long side would then exceed ``max_size``, in which case the long side is set to ``max_size``.

    Args:
        min_sizes: candidate short sides.
        max_size: bound on the long side.
        flip_prob: probability of a horizontal flip (0 at test time).
        pixel_format: ``RGB`` (pixels scaled to [0, 1]) or ``BGR255`` (caffe-style, in [0, 255]).
        pixel_mean, pixel_std: per-channel statistics in ``pixel_format`` order and range.
    """

    def __init__(
        self,
        min_sizes: list[int],
        max_size: int,
        flip_prob: float,
        pixel_format: str,
        pixel_mean: list[float],
        pixel_std: list[float],
    ):
        if pixel_format not in ("RGB", "BGR255"):
            raise ValueError(f"unknown pixel format {pixel_format!r}; expected RGB or BGR255")
        self.min_sizes = list(min_sizes)
        self.max_size = max_size
        self.flip_prob = flip_prob
        self.bgr255 = pixel_format == "BGR255"
        self.mean = torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1)

    @classmethod
    def from_config(cls, cfg: InputConfig, train: bool) -> DetectionTransform:
        """The training or test transform of an ``InputConfig``."""
        if train:
            return cls(cfg.min_size_train, cfg.max_size_train, cfg.flip_prob, cfg.format, cfg.pixel_mean, cfg.pixel_std)
        return cls([cfg.min_size_test], cfg.max_size_test, 0.0, cfg.format, cfg.pixel_mean, cfg.pixel_std)

    def output_size(self, height: int, width: int, min_size: int) -> tuple[int, int]:
        """``(h, w)`` after resizing an image of ``height`` x ``width``: the short side to ``min_size`` unless the
        long side would pass ``max_size``, rounded half up. The float operations are detectron2's
        (ResizeShortestEdge) in its order, so that sizes ending in exactly .5 (a 2:1 image: 666.5 x 1333) round
        the same way: Python's round() took them to the even side."""
        scale = min_size / min(height, width)
        new_h, new_w = (min_size, scale * width) if height < width else (scale * height, min_size)
        if max(new_h, new_w) > self.max_size:
            shrink = self.max_size / max(new_h, new_w)
            new_h, new_w = new_h * shrink, new_w * shrink
        return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))

    def __call__(self, image: Image.Image, boxes: Tensor, rng: np.random.Generator | None) -> tuple[Tensor, Tensor]:
        """Transforms one image.

        Args:
            image: an RGB PIL image.
            boxes: ``(G, 4)`` float32 x1,y1,x2,y2 in image pixels.
            rng: source of the random choices; None picks the first size and never flips.

        Returns:
            ``(3, h, w)`` float32 normalised image and ``(G, 4)`` float32 boxes in its pixels.
        """
        min_size = self.min_sizes[0] if rng is None else self.min_sizes[rng.integers(len(self.min_sizes))]
        h, w = self.output_size(image.height, image.width, min_size)
        if (h, w) != (image.height, image.width):
            boxes = boxes * torch.tensor([w / image.width, h / image.height] * 2, dtype=torch.float32)
            image = image.resize((w, h), Image.BILINEAR)
        pixels = pil_to_tensor(image).float()  # (3, h, w) RGB in [0, 255]
        if rng is not None and rng.random() < self.flip_prob:
            pixels = pixels.flip(-1)
            boxes = torch.stack((w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]), dim=1)
        pixels = pixels.flip(0) if self.bgr255 else pixels / 255.0
        return (pixels - self.mean) / self.std, boxes


def pad_batch(images: list[Tensor], size_divisibility: int) -> Tensor:
    """Stacks ``(3, h_i, w_i)`` images into ``(N, 3, H, W)``, zero-padded at the bottom/right so that H and
    W are the smallest multiples of ``size_divisibility`` holding every image."""
    height = math.ceil(max(img.shape[1] for img in images) / size_divisibility) * size_divisibility
    width = math.ceil(max(img.shape[2] for img in images) / size_divisibility) * size_divisibility
    batch = images[0].new_zeros(len(images), 3, height, width)
    for img, slot in zip(images, batch):
        slot[:, : img.shape[1], : img.shape[2]].copy_(img)
    return batch
