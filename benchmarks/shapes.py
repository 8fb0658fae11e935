"""Problem sizes: the COCO pyramid the speed claims are about, and a small set that runs in seconds on a CPU."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShapeSet:
    """A batch of feature pyramids, finest level first.

    Args:
        name: how the set is chosen on the command line.
        batch: images per batch (N).
        channels: channels of every level (C); DyHead's in_channels and channels are both this.
        levels: (H, W) per level, P3 first; each is ceil(previous / 2), as DyHead's stride-2 branch needs.
    """

    name: str
    batch: int
    channels: int
    levels: tuple[tuple[int, int], ...]

    def level_shapes(self) -> list[tuple[int, int, int, int]]:
        """(N, C, H, W) of every level."""
        return [(self.batch, self.channels, h, w) for h, w in self.levels]

    def dcn_shape(self) -> tuple[int, int, int, int]:
        """(N, C, H, W) of the single deformable conv benchmark: the finest level, P3."""
        return self.level_shapes()[0]

    def describe(self, pyramid: bool) -> str:
        """The record's "shape": "2x256x100x168" for P3 alone, "2x256x[100x168,50x84,...]" for the pyramid."""
        if not pyramid:
            return "x".join(str(s) for s in self.dcn_shape())
        sizes = ",".join(f"{h}x{w}" for h, w in self.levels)
        return f"{self.batch}x{self.channels}x[{sizes}]"


# Batch 2 of an 800x1333 COCO image, P3-P7 at strides 8-128, the levels the issue lists: those of 800x1344
# (padded to a multiple of 32; the detectors pad to 128, 800x1408, whose P3 is 100x176).
COCO = ShapeSet("coco", batch=2, channels=256, levels=((100, 168), (50, 84), (25, 42), (13, 21), (7, 11)))

# Same structure (5 levels, odd sizes at the coarse end, GroupNorm(16)-compatible channels), tiny sizes.
SMALL = ShapeSet("small", batch=1, channels=32, levels=((16, 24), (8, 12), (4, 6), (2, 3), (1, 2)))

# Large enough for CPU figures worth quoting (im2col and per-op overheads no longer dominate), still minutes.
MEDIUM = ShapeSet("medium", batch=2, channels=64, levels=((32, 48), (16, 24), (8, 12), (4, 6), (2, 3)))

SHAPE_SETS = {s.name: s for s in (COCO, MEDIUM, SMALL)}
