"""kernels.channel_moments_grouped and kernels.upsample_bilinear on a CUDA GPU, in the storage dtypes the CPU
tests cannot run: the block's maps at DyHead's COCO sizes (256 channels, P3 to P7 and the finer and coarser
maps, views of one buffer), so the wide-load path, the element-wise path, many runs per map and the pooling
weights all run compiled. Truth: float64 torch on the CPU, fed the same rounded values. Run with
`pytest -m cuda tests/kernels` (without TRITON_INTERPRET).

Bounds (relative norm error): the moments and pooled means are fp32 sums, 1e-5 for every dtype; the buffer's
gradient is stored in the maps' dtype: fp32 1e-5, fp16 2e-3, bf16 1e-2 (storage rounding with margin).
"""

import torch
import torch.nn.functional as F
from deform_conv_cases import rel_err
from test_grouped_moments import reference
from test_level_pass_cuda import DTYPES, STORAGE_TOL, pytestmark  # noqa: F401 (pytestmark: CUDA only)

from dyhead.fused import upsampling_pool_weights
from kernels import channel_moments_grouped, upsample_bilinear

LEVELS = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
# The block's 13 conv outputs, 3 slots per level: the level's size, then the finer branch (at the level's size) or
# None, then the coarser branch (at the next level's size, pooled as its upsampling) or None.
SLOTS = [LEVELS[0], None, LEVELS[1]] + [s for l in range(1, 4) for s in (LEVELS[l], LEVELS[l], LEVELS[l + 1])] + [
    LEVELS[4], LEVELS[4], None]


@DTYPES
def test_block_maps_against_float64(dtype):
    n, c = 2, 256
    gen = torch.Generator().manual_seed(0)
    counts = [0 if s is None else n * c * s[0] * s[1] for s in SLOTS]
    flat64 = (torch.randn(sum(counts), generator=gen, dtype=torch.float64) + 3).to(dtype).double()
    resizes = {k: (SLOTS[k], LEVELS[(k // 3)]) for k in range(len(SLOTS)) if k % 3 == 2 and SLOTS[k]}
    pairs = [None] * len(SLOTS)
    for k, pair in zip(resizes, upsampling_pool_weights(list(resizes.values()), torch.float32, torch.device("cuda"))):
        pairs[k] = pair

    def maps_of(t):
        parts = t.split(counts)
        return [None if s is None else p.view(n, c, *s) for p, s in zip(parts, SLOTS)]

    ref_flat = flat64.clone().requires_grad_()
    expected = reference(maps_of(ref_flat), [None if p is None else tuple(w.double().cpu() for w in p)
                                             for p in pairs])
    g_out = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(expected, ref_flat, g_out)
    flat = flat64.to("cuda", dtype).requires_grad_()
    out = channel_moments_grouped(maps_of(flat), pairs)
    (g,) = torch.autograd.grad(out, flat, g_out.to("cuda", torch.float32))
    assert type(out.grad_fn).__name__ == "_GroupedMomentsBackward"
    for k in range(3):
        assert rel_err(out[..., k].cpu().double(), expected[..., k].detach()) < 1e-5, k
    assert g.dtype == dtype and rel_err(g.cpu().double(), g_ref) < STORAGE_TOL[dtype]
    # The pooled column of a coarser map is the mean of its upsampling, as DyHead uses it.
    k = 2
    up = F.interpolate(maps_of(ref_flat.detach())[k], size=LEVELS[0], mode="bilinear", align_corners=True)
    assert rel_err(out[k, ..., 2].cpu().double(), up.mean(dim=(2, 3))) < 1e-5


@DTYPES
def test_upsample_backward_against_float64(dtype):
    gen = torch.Generator().manual_seed(1)
    x64 = torch.randn(2, 256, 50, 84, generator=gen, dtype=torch.float64).to(dtype).double()
    g64 = torch.randn(2, 256, 100, 168, generator=gen, dtype=torch.float64).to(dtype).double()
    x_ref = x64.clone().requires_grad_()
    (d_ref,) = torch.autograd.grad(F.interpolate(x_ref, size=(100, 168), mode="bilinear", align_corners=True),
                                   x_ref, g64)
    x = x64.to("cuda", dtype).requires_grad_()
    y = upsample_bilinear(x, (100, 168))
    runs = [torch.autograd.grad(y, x, g64.to("cuda", dtype), retain_graph=True)[0] for _ in range(2)]
    assert torch.equal(*runs)
    assert runs[0].dtype == dtype and rel_err(runs[0].cpu().double(), d_ref) < STORAGE_TOL[dtype]
