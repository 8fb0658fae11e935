"""kernels.modulated_deform_conv2d on a CUDA GPU: precision per dtype, indices past 2**31, torch.compile
with inductor, determinism. The reference is torchvision.ops.deform_conv2d in float64 on the CPU, fed the
same (rounded) inputs. Run with `pytest -m cuda tests/kernels` (without TRITON_INTERPRET).

Documented error bounds (relative norm error, output and every gradient):
fp32 1e-5 (true fp32 products), fp32 with TF32 on 5e-3, fp16 5e-3, bf16 2e-2
(measured on an H100: ~4e-7, 8e-4, 3e-4, 7e-3). The low-precision error comes
from rounding the blended samples to the storage dtype before `tl.dot` and from storing results in it.
"""

import pytest
import torch

from kernels import modulated_deform_conv2d
from deform_conv_cases import DyConvLike, grads, leaves, make_inputs, matmul_tf32, reference, rel_err
from kernels.runtime import INTERPRET

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(INTERPRET,
                       reason="TRITON_INTERPRET=1 would interpret the kernels instead of compiling them"),
]


def rounded(inputs, dtype):
    """The float64 inputs rounded to dtype, so the reference sees exactly what the kernels see."""
    return {k: None if v is None else v.to(dtype).double() for k, v in inputs.items()}


def run_both(inputs, conv, dtype, deterministic=None):
    """(y, grads) of the kernels in dtype on the GPU and of float64 torchvision on the CPU."""
    inputs = rounded(inputs, dtype)
    ref = leaves(inputs, torch.float64, "cpu")
    y_ref = reference(ref, conv)
    g_out = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1)).to(dtype).double()
    out = leaves(inputs, dtype, "cuda")
    y = modulated_deform_conv2d(out["input"], out["offset"], out["mask"], out["weight"], out["bias"], **conv,
                                deterministic=deterministic)
    return (y, grads(y, g_out.cuda(), out)), (y_ref, grads(y_ref, g_out, ref))


@pytest.mark.parametrize("dtype, tf32, tol", [
    (torch.float32, False, 1e-5), (torch.float32, True, 5e-3), (torch.float16, False, 5e-3),
    (torch.bfloat16, False, 2e-2)], ids=["fp32", "tf32", "fp16", "bf16"])
@pytest.mark.parametrize("stride", [1, 2])
def test_dtype_against_float64(dtype, tf32, tol, stride):
    conv = dict(stride=stride, padding=1, dilation=1)
    with matmul_tf32(tf32):
        (y, g), (y_ref, g_ref) = run_both(make_inputs(2, 70, 45, 23, 19, **conv), conv, dtype)
    assert y.dtype == dtype
    errors = {"output": rel_err(y, y_ref), **{k: rel_err(g[k], g_ref[k]) for k in g_ref}}
    assert max(errors.values()) < tol, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_is_bitwise_repeatable(dtype):
    conv = dict(stride=1, padding=1, dilation=1)
    t = leaves(make_inputs(2, 64, 48, 33, 31, **conv), dtype, "cuda")

    def run(deterministic):
        y = modulated_deform_conv2d(t["input"], t["offset"], t["mask"], t["weight"], t["bias"], **conv,
                                    deterministic=deterministic)
        return grads(y, torch.ones_like(y), t)

    first, second, atomic = run(True), run(True), run(False)
    for name in first:
        assert torch.equal(first[name], second[name]), name
        assert rel_err(atomic[name], first[name].double().cpu()) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_torch_compile_inductor_bf16():
    torch.manual_seed(0)
    module = DyConvLike(32).cuda().to(torch.bfloat16)
    x = torch.randn(2, 32, 20, 17, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="inductor")
    y_eager = module(x)
    g_eager = torch.autograd.grad(y_eager.float().square().sum(), [x, *module.parameters()])
    y = compiled(x)
    g = torch.autograd.grad(y.float().square().sum(), [x, *module.parameters()])
    assert rel_err(y, y_eager.double().cpu()) < 1e-2
    for a, b in zip(g, g_eager):
        assert rel_err(a, b.double().cpu()) < 2e-2


def test_autocast_bf16_matches_bf16_inputs():
    conv = dict(stride=1, padding=1, dilation=1)
    inputs = rounded(make_inputs(2, 40, 24, 15, 13, **conv), torch.bfloat16)
    t32, t16 = leaves(inputs, torch.float32, "cuda"), leaves(inputs, torch.bfloat16, "cuda")
    y16 = modulated_deform_conv2d(t16["input"], t16["offset"], t16["mask"], t16["weight"], t16["bias"])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = modulated_deform_conv2d(t32["input"], t32["offset"], t32["mask"], t32["weight"], t32["bias"])
    assert y.dtype == torch.bfloat16 and torch.equal(y, y16)
    g32, g16 = grads(y, torch.ones_like(y), t32), grads(y16, torch.ones_like(y16), t16)
    for name in g32:
        assert g32[name].dtype == torch.float32 and rel_err(g32[name], g16[name].double().cpu()) < 1e-2, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_and_inf_offsets_and_masks_as_torchvision_on_cuda(dtype):
    """The output pixels that NaN offsets and masks (inside the image and out) make NaN are torchvision's on
    CUDA (its CPU kernel crashes on NaN offsets), and the rest agrees; infinite offsets are samples outside."""
    import torchvision

    conv = dict(stride=1, padding=1, dilation=1)
    t = leaves(rounded(make_inputs(2, 24, 16, 9, 11, **conv), dtype), dtype, "cuda")
    offset, mask = t["offset"].detach(), t["mask"].detach()
    offset[0, 0, 1, 1] = offset[1, 5, 2, 3] = float("nan")
    # Their other coordinates inside: where it is outside, torchvision returns a zero sample before it blends.
    assert -1 < 0 + offset[0, 1, 1, 1] < 11 and -1 < 1 + offset[1, 4, 2, 3] < 9
    offset[0, 14:16, 4, 5] = 50.0
    mask[0, 7, 4, 5] = mask[1, 4, 3, 0] = float("nan")
    offset[0, 1, 0, 2], offset[1, 2, 3, 3] = float("inf"), -float("inf")
    y = modulated_deform_conv2d(t["input"], offset, mask, t["weight"], t["bias"], **conv)
    y_tv = torchvision.ops.deform_conv2d(t["input"], offset, t["weight"], t["bias"], mask=mask, **conv)
    assert torch.equal(y.isnan(), y_tv.isnan()) and y.isnan().any(dim=1).sum() == 4
    finite = ~y_tv.isnan()
    assert rel_err(y[finite], y_tv[finite].double().cpu()) < (1e-5 if dtype == torch.float32 else 5e-3)


def _large_inputs():
    """bf16 input of 2 x 32 x 5800 x 5800 = 2.15e9 > 2**31 elements; offsets below one pixel."""
    n, c, cout, h, w = 2, 32, 8, 5800, 5800
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16, generator=gen)
    offset = (torch.rand(n, 18, h, w, device="cuda", generator=gen, dtype=torch.bfloat16) - 0.5) * 1.8
    mask = torch.rand(n, 9, h, w, device="cuda", generator=gen, dtype=torch.bfloat16)
    weight = torch.randn(cout, c, 3, 3, device="cuda", generator=gen, dtype=torch.bfloat16) / 17
    assert x.numel() > 2**31
    return x, offset, mask, weight


def _corner_reference(x, offset, mask, weight, grad_out=None, crop=16, keep=12):
    """torchvision in float64 on the last image's bottom-right crop; only pixels at least 4 away from the
    crop's inner edges see the same samples as in the full image (offsets are below one pixel)."""
    import torchvision

    def corner(t):
        return t[-1:, :, -crop:, -crop:].detach().double().cpu().requires_grad_()

    xc, oc, mc, wc = corner(x), corner(offset), corner(mask), weight.detach().double().cpu().requires_grad_()
    y = torchvision.ops.deform_conv2d(xc, oc, wc, padding=1, mask=mc)
    inner = (slice(None), slice(None), slice(crop - keep, None), slice(crop - keep, None))
    if grad_out is None:
        return y[inner], None
    y.backward(corner(grad_out).detach())
    return y[inner], [t.grad[inner] for t in (xc, oc, mc)]


def test_past_int32_forward():
    x, offset, mask, weight = _large_inputs()
    y = modulated_deform_conv2d(x, offset, mask, weight)
    y_ref, _ = _corner_reference(x, offset, mask, weight)
    assert rel_err(y[-1:, :, -12:, -12:], y_ref.detach()) < 2e-2


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.mem_get_info()[0] < 40 * 2**30,
                    reason="needs 40 GiB of free GPU memory")
def test_past_int32_backward():
    x, offset, mask, weight = _large_inputs()
    for t in (x, offset, mask):
        t.requires_grad_()
    y = modulated_deform_conv2d(x, offset, mask, weight)
    grad_out = torch.randn_like(y)
    gx, goff, gmask = torch.autograd.grad(y, (x, offset, mask), grad_out)
    _, g_ref = _corner_reference(x, offset, mask, weight, grad_out)
    for g, ref in zip((gx, goff, gmask), g_ref):
        assert rel_err(g[-1:, :, -12:, -12:], ref) < 2e-2
