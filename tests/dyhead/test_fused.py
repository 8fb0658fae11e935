"""dyhead.fused (the triton backend's level pass) against the reference modules it replaces."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dyhead import ScaleAttention, TaskAttention
from dyhead.fused import group_norm_affine, level_forward

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


def test_group_norm_affine_is_group_norm():
    torch.manual_seed(0)
    y = torch.randn(3, 32, 5, 7, dtype=torch.float64) * torch.rand(1, 32, 1, 1, dtype=torch.float64) * 4 + 3
    norm = random_norm(32)
    a, d = group_norm_affine(moments(y), 35, norm)
    torch.testing.assert_close(y * a[..., None, None] + d[..., None, None], norm(y), rtol=1e-12, atol=1e-12)


@needs_kernels
@pytest.mark.parametrize("sizes", [[(7, 9)], [(7, 9), (7, 9)], [(7, 9), (7, 9), (4, 5)], [(7, 9), (4, 5)]],
                         ids=["same", "same+finer", "all three", "same+coarser"])
def test_level_forward_matches_the_reference_modules(sizes):
    """Output and every gradient (branches, GroupNorm, scale attention and MLP parameters) in float64."""
    torch.manual_seed(1)
    c = 32
    scale, task = ScaleAttention(c).double(), TaskAttention(c).double()
    with torch.no_grad():
        scale.conv.weight.normal_(0, 0.3)  # attention weights off the hard sigmoid's flat parts
        scale.conv.bias.fill_(0.5)
    norms = [random_norm(c) for _ in sizes]
    ys = [torch.randn(2, c, h, w, dtype=torch.float64, requires_grad=True) for h, w in sizes]
    size = sizes[0]

    def reference():
        branches = [norm(y) for y, norm in zip(ys, norms)]
        branches = [b if b.shape[-2:] == size else F.interpolate(b, size=size, mode="bilinear", align_corners=True)
                    for b in branches]
        return task(scale(branches))

    leaves = [*ys, *(p for m in (*norms, scale, task) for p in m.parameters())]
    weight = torch.randn(2, c, *size, dtype=torch.float64)
    expected = reference()
    expected_grads = torch.autograd.grad((expected * weight).sum(), leaves)
    out = level_forward([(y.to(DEVICE), norm.to(DEVICE)) for y, norm in zip(ys, norms)], scale.to(DEVICE),
                        task.to(DEVICE))
    grads = torch.autograd.grad((out * weight.to(DEVICE)).sum(), leaves)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-11, atol=1e-11)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-10, atol=1e-10)
