"""kernels.upsample_bilinear: torch's forward, a gathering backward that must be torch's gradient.

The truth is torch's own backward of ``F.interpolate(mode="bilinear", align_corners=True)`` on the CPU, in
float64 (and float32); the sizes cover upsampling by about two (DyHead's coarser branch), other ratios,
downsampling and sizes of one.
"""

import random

import pytest
import torch
import torch.nn.functional as F
from deform_conv_cases import DEVICE, needs_kernels, rel_err

from kernels import upsample_bilinear

SIZES = [((5, 7), (9, 13)), ((7, 11), (13, 21)), ((1, 3), (4, 5)), ((4, 4), (7, 8)),
         ((6, 5), (3, 1)), ((3, 2), (3, 2)), ((2, 3), (1, 1))]


def torch_gradient(x, size, g):
    x = x.detach().cpu().double().requires_grad_()
    y = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    return y.detach(), torch.autograd.grad(y, x, g.cpu().double())[0]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("sizes", SIZES, ids=[f"{a[0]}x{a[1]}->{b[0]}x{b[1]}" for a, b in SIZES])
def test_matches_torch(sizes, dtype):
    size_in, size_out = sizes
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *size_in, generator=gen, dtype=dtype).to(DEVICE).requires_grad_()
    g = torch.randn(2, 3, *size_out, generator=gen, dtype=dtype).to(DEVICE)
    y = upsample_bilinear(x, size_out)
    (d,) = torch.autograd.grad(y, x, g)
    y_ref, d_ref = torch_gradient(x, size_out, g)
    assert torch.equal(y, F.interpolate(x, size=size_out, mode="bilinear", align_corners=True))
    assert d.dtype == dtype and d.shape == x.shape
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert rel_err(d.cpu().double(), d_ref) < tol, rel_err(d.cpu().double(), d_ref)


@needs_kernels
def test_random_sizes_in_float64():
    """Every pair of sizes up to 12: the window of outputs each input scans must hold all that read it."""
    rng = random.Random(0)
    for _ in range(12):
        size_in = (rng.randint(1, 12), rng.randint(1, 12))
        size_out = (rng.randint(1, 12), rng.randint(1, 12))
        x = torch.randn(1, 2, *size_in, dtype=torch.float64, device=DEVICE, requires_grad=True)
        g = torch.randn(1, 2, *size_out, dtype=torch.float64, device=DEVICE)
        (d,) = torch.autograd.grad(upsample_bilinear(x, size_out), x, g)
        assert rel_err(d.cpu(), torch_gradient(x, size_out, g)[1]) < 1e-12, (size_in, size_out)


@needs_kernels
def test_expanded_gradient_and_bitwise_repeatable():
    x = torch.randn(2, 5, 7, 9, device=DEVICE, requires_grad=True)
    runs = [torch.autograd.grad(upsample_bilinear(x, (13, 17)).sum(), x)[0] for _ in range(2)]
    assert torch.equal(*runs)
    assert rel_err(runs[0].cpu().double(), torch_gradient(x, (13, 17), torch.ones(2, 5, 13, 17))[1]) < 1e-6


@needs_kernels
def test_a_gradient_inside_a_larger_tensor_is_read_at_the_outputs_only():
    """The gradient a window of a larger tensor, NaN around it: torch's gradient (the outputs each input scans
    run past the map's edges, and are not read there)."""
    x = torch.randn(1, 2, 5, 7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    g = torch.full((1, 2, 11, 15), float("nan"), dtype=torch.float64, device=DEVICE)[..., 1:10, 1:14]
    g.copy_(torch.randn(g.shape, dtype=torch.float64))
    (d,) = torch.autograd.grad(upsample_bilinear(x, (9, 13)), x, g)
    assert rel_err(d.cpu(), torch_gradient(x, (9, 13), g)[1]) < 1e-12


def test_the_backward_needs_cuda_or_the_interpreter(monkeypatch):
    """The forward is torch's and runs anywhere; the backward's kernels refuse CPU tensors without the
    interpreter, naming F.interpolate to use instead."""
    from kernels import runtime

    monkeypatch.setattr(runtime, "INTERPRET", False)
    y = upsample_bilinear(torch.randn(1, 2, 3, 4, requires_grad=True), (5, 6))
    with pytest.raises(RuntimeError, match="F.interpolate"):
        y.sum().backward()


def test_meta_tensors_go_through_torch():
    """Meta tensors (shapes only) take F.interpolate both ways: no kernel is asked to run on them."""
    x = torch.randn(1, 2, 3, 4, device="meta", requires_grad=True)
    (d,) = torch.autograd.grad(upsample_bilinear(x, (5, 6)).sum(), x)
    assert d.is_meta and d.shape == x.shape


@needs_kernels
def test_gradcheck_float64():
    x = torch.randn(1, 1, 2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: upsample_bilinear(t, (3, 5)), (x,))


@pytest.mark.parametrize("x, size, error, message", [
    (torch.randn(2, 3, 4), (5, 5), ValueError, r"x must be \(N, C, H, W\)"),
    (torch.ones(1, 2, 3, 4, dtype=torch.int32), (5, 5), TypeError, "x must be float32"),
    (torch.randn(1, 2, 3, 4), (5,), ValueError, "two positive ints"),
    (torch.randn(1, 2, 3, 4), (0, 5), ValueError, "two positive ints"),
    (torch.randn(1, 2, 3, 4), (2.5, 5), ValueError, "two positive ints"),
    (torch.randn(1, 2, 3, 4).to(torch.float8_e4m3fn), (5, 5), TypeError, "x must be float32"),
    ([1.0], (5, 5), TypeError, "x must be a Tensor")])
def test_bad_inputs_raise(x, size, error, message):
    with pytest.raises(error, match=message):
        upsample_bilinear(x, size)
