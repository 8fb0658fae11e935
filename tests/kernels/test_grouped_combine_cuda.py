"""kernels.level_combine_grouped on a CUDA GPU, in the storage dtypes the CPU tests cannot run: a DyHead block's
5 levels at COCO sizes (256 channels, P3 to P7, the 13 branches views of one buffer in the sets op's order), so
the wide-load and element-wise paths, many runs per level and the resized branches' gather all run compiled.
Truth: float64 torch on the CPU (F.interpolate, torch.maximum), fed the same rounded values. Run with
`pytest -m cuda tests/kernels` (without TRITON_INTERPRET).

Bounds (relative norm error): outputs and the buffer's gradient are stored in the branches' dtype, the parameter
gradients are fp32 sums: fp32 1e-5, fp16 2e-3, bf16 1e-2 (storage rounding with margin).
"""

import torch
from test_grouped_combine import check_against_reference
from test_level_pass_cuda import DTYPES, STORAGE_TOL, pytestmark  # noqa: F401 (pytestmark: CUDA only)

LEVELS = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
# Per level: its own size, the finer branch (strided to the level's size) and the coarser one (the next level's
# size) where the level has them.
BRANCHES = [[LEVELS[0], LEVELS[1]]] + [[LEVELS[l], LEVELS[l], LEVELS[l + 1]] for l in range(1, 4)] + [
    [LEVELS[4], LEVELS[4]]]
ORDER = [(l, 0) for l in range(5)] + [(l, 1) for l in range(1, 5)] + [(0, 1)] + [(l, 2) for l in range(1, 4)]


@DTYPES
def test_dyhead_block_levels_against_float64(dtype):
    outs, grads = check_against_reference(BRANCHES, ORDER, dtype, n=2, c=256, tol=STORAGE_TOL)
    assert [o.shape[-2:] for o in outs] == [torch.Size(s) for s in LEVELS]


@DTYPES
def test_gradients_repeat_bitwise(dtype):
    _, first = check_against_reference(BRANCHES, ORDER, dtype, n=2, c=256, tol=STORAGE_TOL, seed=3)
    _, second = check_against_reference(BRANCHES, ORDER, dtype, n=2, c=256, tol=STORAGE_TOL, seed=3)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
