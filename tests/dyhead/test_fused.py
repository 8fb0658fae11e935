"""dyhead.fused (the triton backend's level pass) against the reference modules it replaces."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dyhead import ScaleAttention, TaskAttention
from dyhead.fused import block_forward, group_norm_affine, shape_constants

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
needs_kernels = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                   reason="the Triton kernels need CUDA or TRITON_INTERPRET=1 (CPU interpreter)")


def moments(y):
    mean = y.mean(dim=(2, 3))
    return torch.stack([mean, (y - mean[..., None, None]).square().sum(dim=(2, 3))], -1)


def random_norm(c):
    norm = nn.GroupNorm(16, c).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm


def test_shape_constants_are_made_once_per_content():
    # A CUDA graph replays reads of these tensors: the same content must give the same, unchanged tensor.
    cpu = torch.device("cpu")
    first = shape_constants([35.0, 12.0, 0.5, 2.0], torch.float64, cpu)
    assert torch.equal(first, torch.tensor([35.0, 12.0, 0.5, 2.0], dtype=torch.float64))
    assert shape_constants([35.0, 12.0, 0.5, 2.0], torch.float64, cpu) is first
    assert shape_constants([35.0, 12.0, 0.5, 3.0], torch.float64, cpu) is not first
    assert shape_constants([35.0, 12.0, 0.5, 2.0], torch.float32, cpu).dtype == torch.float32


def test_group_norm_affine_is_group_norm():
    torch.manual_seed(0)
    y = torch.randn(3, 32, 5, 7, dtype=torch.float64) * torch.rand(1, 32, 1, 1, dtype=torch.float64) * 4 + 3
    norm = random_norm(32)
    pixels = torch.full((1, 1, 1), 35.0, dtype=torch.float64)
    a, d = group_norm_affine(moments(y)[None], pixels, norm.weight[None, None], norm.bias[None, None], 16, norm.eps)
    torch.testing.assert_close(y * a[0, ..., None, None] + d[0, ..., None, None], norm(y), rtol=1e-12, atol=1e-12)


# Per level, the sizes of its branches (the first the level's, another size the coarser branch).
PYRAMIDS = {
    "one level": [[(7, 9)]],
    "three levels": [[(7, 9), (4, 5)], [(4, 5), (4, 5), (2, 3)], [(2, 3), (2, 3)]],
    "same+finer only": [[(7, 9), (7, 9)], [(3, 3)]],
}


@needs_kernels
@pytest.mark.parametrize("pyramid", PYRAMIDS.values(), ids=PYRAMIDS.keys())
def test_block_forward_matches_the_reference_modules(pyramid):
    """Output and every gradient (branches, GroupNorm, scale attention and MLP parameters) in float64."""
    torch.manual_seed(1)
    c = 32
    scale, task = ScaleAttention(c).double(), TaskAttention(c).double()
    with torch.no_grad():
        scale.conv.weight.normal_(0, 0.3)  # attention weights off the hard sigmoid's flat parts
        scale.conv.bias.fill_(0.5)
    norms = [random_norm(c) for _ in range(3)]  # same, finer, coarser: shared by the levels, as in a block
    ys = [[torch.randn(2, c, h, w, dtype=torch.float64, requires_grad=True) for h, w in sizes] for sizes in pyramid]

    def reference():
        out = []
        for level in ys:
            size = level[0].shape[-2:]
            branches = [norm(y) for y, norm in zip(level, norms)]
            out.append(task(scale([b if b.shape[-2:] == size else
                                   F.interpolate(b, size=size, mode="bilinear", align_corners=True)
                                   for b in branches])))
        return out

    leaves = [*(y for level in ys for y in level), *(p for m in (*norms, scale, task) for p in m.parameters())]
    weights = [torch.randn(2, c, *level[0].shape[-2:], dtype=torch.float64) for level in ys]
    expected = reference()
    expected_grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(expected, weights)), leaves,
                                         allow_unused=True)  # a one-level pyramid has no finer branch
    out = block_forward([[(y.to(DEVICE), norm.to(DEVICE)) for y, norm in zip(level, norms)] for level in ys],
                        scale.to(DEVICE), task.to(DEVICE))
    grads = torch.autograd.grad(sum((o * w.to(DEVICE)).sum() for o, w in zip(out, weights)), leaves, allow_unused=True)
    for o, e in zip(out, expected):
        torch.testing.assert_close(o.cpu(), e, rtol=1e-11, atol=1e-11)
    for g, e in zip(grads, expected_grads):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g.cpu(), e, rtol=1e-10, atol=1e-10)
