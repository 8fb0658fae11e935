"""dyhead.fused (the triton backend's level pass) against the reference modules it replaces."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dyhead import ScaleAttention, TaskAttention
from dyhead.fused import (block_forward, group_norm_affine, shape_constants, upsampled_mean_weights,
                          upsampling_pool_weights)
from kernels.runtime import INTERPRET

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
    # Made under inference_mode (a first call in evaluation), a kept inference tensor would break training.
    with torch.inference_mode():
        made = shape_constants([35.0, 12.0, 0.5, 4.0], torch.float64, cpu)
    assert not made.is_inference()


def test_group_norm_affine_is_group_norm():
    torch.manual_seed(0)
    y = torch.randn(3, 32, 5, 7, dtype=torch.float64) * torch.rand(1, 32, 1, 1, dtype=torch.float64) * 4 + 3
    norm = random_norm(32)
    pixels = torch.full((1, 1, 1), 35.0, dtype=torch.float64)
    mean, m2 = moments(y)[None].unbind(-1)
    a, d = group_norm_affine(mean, m2, pixels, norm.weight[None, None], norm.bias[None, None], 16, norm.eps)
    torch.testing.assert_close(y * a[0, ..., None, None] + d[0, ..., None, None], norm(y), rtol=1e-12, atol=1e-12)


# Per level, the sizes of its branches (the first the level's, another size the coarser branch).
PYRAMIDS = {
    "one level": [[(7, 9)]],
    "three levels": [[(7, 9), (4, 5)], [(4, 5), (4, 5), (2, 3)], [(2, 3), (2, 3)]],
    "same+finer only": [[(7, 9), (7, 9)], [(3, 3)]],
}


@pytest.mark.parametrize("size_in, size_out", [(5, 9), (4, 7), (1, 3), (3, 1), (6, 6), (25, 50)])
def test_upsampled_mean_weights_give_the_mean_of_the_upsampled_map(size_in, size_out):
    x = torch.randn(2, 3, size_in, 4, dtype=torch.float64)
    rows = torch.tensor(upsampled_mean_weights(size_in, size_out), dtype=torch.float64)
    cols = torch.tensor(upsampled_mean_weights(4, 7), dtype=torch.float64)
    up = F.interpolate(x, size=(size_out, 7), mode="bilinear", align_corners=True)
    torch.testing.assert_close(torch.einsum("nchw,h,w->nc", x, rows, cols), up.mean(dim=(2, 3)),
                               rtol=1e-14, atol=1e-14)


def test_upsampling_pool_weights_are_made_once_per_pyramid():
    cpu = torch.device("cpu")
    resizes = [((4, 5), (7, 9)), ((2, 3), (4, 5))]
    pairs = upsampling_pool_weights(resizes, torch.float32, cpu)
    assert [tuple(t.shape) for pair in pairs for t in pair] == [(4,), (5,), (2,), (3,)]
    assert pairs[1][0]._base is pairs[0][0]._base  # one tensor, as the grouped moments need
    assert torch.equal(pairs[0][1], torch.tensor(upsampled_mean_weights(5, 9), dtype=torch.float32))
    again = upsampling_pool_weights(resizes, torch.float32, cpu)
    assert all(a is b for pair, other in zip(pairs, again) for a, b in zip(pair, other))
    assert all(t.dtype == torch.float64 for pair in upsampling_pool_weights(resizes, torch.float64, cpu) for t in pair)


@needs_kernels
@pytest.mark.parametrize("shared", [False, True], ids=["separate", "one_buffer"])
@pytest.mark.parametrize("pyramid", PYRAMIDS.values(), ids=PYRAMIDS.keys())
def test_block_forward_matches_the_reference_modules(pyramid, shared):
    """Output and every gradient (branches, GroupNorm, scale attention and MLP parameters) in float64; the
    branches as separate tensors or as views of one buffer (as the deformable convs return them: the moments
    then take one launch)."""
    torch.manual_seed(1)
    c = 32
    scale, task = ScaleAttention(c).double(), TaskAttention(c).double()
    with torch.no_grad():
        scale.conv.weight.normal_(0, 0.3)  # attention weights off the hard sigmoid's flat parts
        scale.conv.bias.fill_(0.5)
    norms = [random_norm(c) for _ in range(3)]  # same, finer, coarser: shared by the levels, as in a block
    sizes = [size for level in pyramid for size in level]

    def branches_of(buffer):
        views = iter(buffer.split([2 * c * h * w for h, w in sizes]))
        return [[next(views).view(2, c, h, w) for h, w in level] for level in pyramid]

    if shared:
        flat = torch.randn(sum(2 * c * h * w for h, w in sizes), dtype=torch.float64, requires_grad=True)
        flat_on_device = flat.detach().to(DEVICE).requires_grad_()
        ys, ys_on_device = branches_of(flat), branches_of(flat_on_device)
    else:
        ys = [[torch.randn(2, c, h, w, dtype=torch.float64, requires_grad=True) for h, w in level]
              for level in pyramid]
        ys_on_device = [[y.to(DEVICE) for y in level] for level in ys]

    def reference():
        out = []
        for level in ys:
            size = level[0].shape[-2:]
            branches = [norm(y) for y, norm in zip(level, norms)]
            out.append(task(scale([b if b.shape[-2:] == size else
                                   F.interpolate(b, size=size, mode="bilinear", align_corners=True)
                                   for b in branches])))
        return out

    params = [p for m in (*norms, scale, task) for p in m.parameters()]
    leaves = [flat, *params] if shared else [*(y for level in ys for y in level), *params]
    weights = [torch.randn(2, c, *level[0].shape[-2:], dtype=torch.float64) for level in ys]
    expected = reference()
    expected_grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(expected, weights)), leaves,
                                         allow_unused=True)  # a one-level pyramid has no finer branch
    out = block_forward([[(y, norm.to(DEVICE)) for y, norm in zip(level, norms)] for level in ys_on_device],
                        scale.to(DEVICE), task.to(DEVICE))
    leaves_on_device = [flat_on_device, *params] if shared else leaves
    grads = torch.autograd.grad(sum((o * w.to(DEVICE)).sum() for o, w in zip(out, weights)), leaves_on_device,
                                allow_unused=True)
    for o, e in zip(out, expected):
        torch.testing.assert_close(o.cpu(), e, rtol=1e-11, atol=1e-11)
    for g, e in zip(grads, expected_grads):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g.cpu(), e, rtol=1e-10, atol=1e-10)


@needs_kernels
def test_block_forward_traced_path_matches_the_reference_modules(monkeypatch):
    """Under torch.compile block_forward takes its torch-op attention (`_attention`, with the levels'
    1 / branches as shape constants) instead of kernels.block_attention; only a slow compile test reached it.
    Taken here eagerly, by making the block believe it is traced (the kernels then go through their custom ops),
    on levels of two branches, one of them upsampled: outputs against the reference modules in float64."""
    torch.manual_seed(2)
    c = 32
    scale, task = ScaleAttention(c).double(), TaskAttention(c).double()
    with torch.no_grad():
        scale.conv.weight.normal_(0, 0.3)
        scale.conv.bias.fill_(0.5)
    norms = [random_norm(c) for _ in range(2)]
    pyramid = [[(4, 5), (2, 3)], [(2, 3), (2, 3)]]
    ys = [[torch.randn(2, c, h, w, dtype=torch.float64) for h, w in level] for level in pyramid]
    expected = []
    for level in ys:
        size = level[0].shape[-2:]
        expected.append(task(scale([F.interpolate(b, size=size, mode="bilinear", align_corners=True)
                                    if b.shape[-2:] != size else b for b in (n(y) for y, n in zip(level, norms))])))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    out = block_forward([[(y.to(DEVICE), norm.to(DEVICE)) for y, norm in zip(level, norms)] for level in ys],
                        scale.to(DEVICE), task.to(DEVICE))
    for o, e in zip(out, expected):
        torch.testing.assert_close(o.cpu(), e, rtol=1e-11, atol=1e-11)


@needs_kernels
def test_block_forward_with_the_norms_own_groups_eps_and_slots():
    """The GroupNorms' own group count and eps (8 and 1e-2, not 16 and the default) are the ones used, and each
    branch gets its own GroupNorm whatever its slot: as DyHead pairs them, the finest level's second branch is the
    coarser one (slot 1 with the third norm) and the next level's the finer one (slot 1 with the second)."""
    torch.manual_seed(3)
    c = 32
    scale, task = ScaleAttention(c).double(), TaskAttention(c).double()
    same, finer, coarser = (nn.GroupNorm(8, c, eps=1e-2).double() for _ in range(3))
    for norm in (same, finer, coarser):
        nn.init.normal_(norm.weight, 1.0, 0.5)
        nn.init.normal_(norm.bias, 0.0, 0.5)
    big, small = (torch.randn(2, c, h, w, dtype=torch.float64, device=DEVICE) for h, w in [(4, 5), (2, 3)])
    scale, task, same, finer, coarser = (m.to(DEVICE) for m in (scale, task, same, finer, coarser))
    levels = [[(big, same), (small, coarser)], [(small, same), (small * 2.0 + 1.0, finer)]]
    out = block_forward(levels, scale, task)
    for o, level in zip(out, levels):
        size = level[0][0].shape[-2:]
        branches = [F.interpolate(n(y), size=size, mode="bilinear", align_corners=True) if y.shape[-2:] != size
                    else n(y) for y, n in level]
        torch.testing.assert_close(o, task(scale(branches)), rtol=1e-11, atol=1e-11)
