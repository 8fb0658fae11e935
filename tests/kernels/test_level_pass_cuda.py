"""kernels.level_pass on a CUDA GPU: precision per dtype and layout, indices past 2**31, determinism, autocast,
torch.compile with inductor. The reference is the plain torch expressions of test_level_pass.py in float64 on
the CPU, fed the same (rounded) inputs. Run with `pytest -m cuda tests/kernels` (without TRITON_INTERPRET).

Documented error bounds (relative norm error):
- channel_moments (float32 output, fp32 math): 1e-5 for every input dtype; its input gradient and
  level_combine's output and branch gradients, stored in the input dtype: fp32 1e-5, fp16 2e-3, bf16 1e-2;
- level_combine's scale, shift and coef gradients (fp32 sums of fp32 products): 1e-5 for every dtype.
The 16-bit bounds are the storage rounding (rms ~3e-4 for fp16, ~2e-3 for bf16) with margin: estimates, not
yet measured on a GPU. Pixels where the two lines of the max are within 1e-4 of each other get a zero output
gradient: fp32 math can pick the other line there than float64, which moves that pixel's gradient.
"""

import pytest
import torch
from deform_conv_cases import rel_err
from test_level_pass import combine_inputs, combine_reference, moments_reference

from kernels.level_pass import channel_moments, level_combine
from kernels.runtime import INTERPRET

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(INTERPRET,
                       reason="TRITON_INTERPRET=1 would interpret the kernels instead of compiling them"),
]
STORAGE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SUM_TOL = 1e-5
DTYPES = pytest.mark.parametrize("dtype", STORAGE_TOL.keys(), ids=["fp32", "fp16", "bf16"])
LAYOUTS = pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                                  ids=["nchw", "channels_last"])
# DyHead's P4 at 800x1333 (H*W a multiple of 8) and an odd one (C off every block size, H*W odd).
SHAPES = pytest.mark.parametrize("shape", [(2, 256, 50, 84), (3, 70, 23, 19)], ids=["p4", "odd"])


def output_gradient(branches, scale, shift, coef, dtype):
    """A random gradient in dtype, zero where the two lines are within 1e-4 (relative) of each other."""
    u = shift[..., None, None] + sum(scale[:, b, :, None, None] * y for b, y in enumerate(branches))
    a1, b1, a2, b2 = coef[..., None, None].unbind(1)
    line1, line2 = a1 * u + b1, a2 * u + b2
    near_tie = (line1 - line2).abs() <= 1e-4 * (line1.abs() + line2.abs() + 1)
    g = torch.randn(u.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return g.masked_fill(near_tie, 0).to(dtype).double()


def run_combine(inputs, dtype, memory_format=torch.contiguous_format):
    """(output, gradients) of level_combine on the GPU in dtype and of float64 torch on the CPU."""
    # Rounded as the GPU sees them: the branches to dtype, scale, shift and coef to float32.
    branches = [b.to(dtype).double() for b in inputs[0]]
    scale, shift, coef = (t.float().double() for t in inputs[1:])
    g_out = output_gradient(branches, scale, shift, coef, dtype)
    ref = [t.clone().requires_grad_() for t in (*branches, scale, shift, coef)]
    nb = len(branches)
    y_ref = combine_reference(ref[:nb], *ref[nb:])
    g_ref = torch.autograd.grad(y_ref, ref, g_out)
    ys = [b.to("cuda", dtype).contiguous(memory_format=memory_format).requires_grad_() for b in branches]
    params = [t.to("cuda", torch.float32).requires_grad_() for t in (scale, shift, coef)]
    y = level_combine(ys, *params)
    g = torch.autograd.grad(y, [*ys, *params], g_out.to("cuda", dtype))
    return (y, g), (y_ref, g_ref)


def check_combine(actual, expected, dtype, nb):
    (y, g), (y_ref, g_ref) = actual, expected
    assert y.dtype == dtype
    errors = {"output": rel_err(y, y_ref), **{f"branch{b}": rel_err(g[b], g_ref[b]) for b in range(nb)}}
    assert max(errors.values()) < STORAGE_TOL[dtype], errors
    errors = {name: rel_err(a, b) for name, a, b in zip(("scale", "shift", "coef"), g[nb:], g_ref[nb:])}
    assert max(errors.values()) < SUM_TOL, errors


@DTYPES
@LAYOUTS
@SHAPES
def test_combine_against_float64(shape, memory_format, dtype):
    n, c, h, w = shape
    (y, g), expected = run_combine(combine_inputs(n, 3, c, h, w), dtype, memory_format)
    assert y.is_contiguous(memory_format=memory_format)
    check_combine((y, g), expected, dtype, 3)


@DTYPES
@pytest.mark.parametrize("nb", [1, 2])
def test_combine_fewer_branches(nb, dtype):
    check_combine(*run_combine(combine_inputs(2, nb, 70, 23, 19), dtype), dtype, nb)


@DTYPES
@LAYOUTS
@SHAPES
@pytest.mark.parametrize("offset", [0, 50])
def test_moments_against_float64(shape, memory_format, dtype, offset):
    gen = torch.Generator().manual_seed(0)
    x64 = (torch.randn(shape, generator=gen, dtype=torch.float64) + offset).to(dtype).double()
    x_ref = x64.clone().requires_grad_()
    m_ref = moments_reference(x_ref)
    g_out = torch.randn(m_ref.shape, generator=gen, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(m_ref, x_ref, g_out)
    x = x64.to("cuda", dtype).contiguous(memory_format=memory_format).requires_grad_()
    m = channel_moments(x)
    (g,) = torch.autograd.grad(m, x, g_out.to("cuda", torch.float32))
    assert m.dtype == torch.float32 and g.dtype == dtype and g.is_contiguous(memory_format=memory_format)
    errors = [rel_err(m[..., k], m_ref[..., k].detach()) for k in range(2)]
    assert max(errors) < 1e-5, errors
    assert rel_err(g, g_ref) < STORAGE_TOL[dtype], rel_err(g, g_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_is_bitwise_repeatable(dtype):
    branches, scale, shift, coef = combine_inputs(2, 3, 256, 50, 84)
    ys = [b.to("cuda", dtype).requires_grad_() for b in branches]
    params = [t.to("cuda", torch.float32).requires_grad_() for t in (scale, shift, coef)]

    def run():
        m = channel_moments(level_combine(ys, *params))
        return [m, *torch.autograd.grad(m.square().sum(), [*ys, *params])]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_autocast_bf16_matches_fp32_coefficients():
    """Under autocast, bf16 scale/shift/coef (say, from autocast matmuls) are cast to fp32."""
    branches, scale, shift, coef = combine_inputs(2, 3, 64, 23, 19)
    ys = [b.to("cuda", torch.bfloat16) for b in branches]
    params = [t.to("cuda", torch.bfloat16) for t in (scale, shift, coef)]
    expected = level_combine(ys, *(t.float() for t in params))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = level_combine(ys, *params)
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)


def test_torch_compile_inductor_bf16():
    branches, scale, shift, coef = combine_inputs(2, 2, 64, 20, 17)

    def level(y0, y1, scale, shift, coef):
        moments = channel_moments(y0)
        shift = shift + moments[..., 0] * 0.1 + moments[..., 1] * 1e-3
        return channel_moments(level_combine([y0, y1], scale, shift, coef))

    t = [*(b.to("cuda", torch.bfloat16).requires_grad_() for b in branches),
         *(p.to("cuda", torch.float32).requires_grad_() for p in (scale, shift, coef))]
    compiled = torch.compile(level, fullgraph=True, backend="inductor")
    out_eager = level(*t)
    g_eager = torch.autograd.grad(out_eager.square().sum(), t)
    out = compiled(*t)
    g = torch.autograd.grad(out.square().sum(), t)
    assert rel_err(out, out_eager.double().cpu()) < 1e-5
    for a, b in zip(g, g_eager):
        assert rel_err(a, b.double().cpu()) < 1e-2


def _large(n=2, c=32, size=5800):
    """A bf16 (2, 32, 5800, 5800) map, 2.15e9 > 2**31 elements, and combine coefficients for it."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, c, size, size, device="cuda", dtype=torch.bfloat16, generator=gen)
    assert x.numel() > 2**31
    params = [torch.randn(shape, device="cuda", generator=gen) for shape in ((n, 1, c), (n, c), (n, 4, c))]
    return x, params


def _last_plane(*tensors):
    """The last image's last channel of each (N, C, ...) tensor, in float64 on the CPU."""
    return [t[-1, -1].double().cpu() for t in tensors]


def test_past_int32_forward():
    x, (scale, shift, coef) = _large()
    m = channel_moments(x)
    (plane,) = _last_plane(x)
    mean = plane.mean()
    assert rel_err(m[-1, -1], torch.stack([mean, (plane - mean).square().sum()])) < 1e-5
    y = level_combine([x], scale, shift, coef)
    s, d, (a1, b1, a2, b2) = scale[-1, 0, -1].item(), shift[-1, -1].item(), coef[-1, :, -1].tolist()
    corner = plane[-12:, -12:] * s + d
    assert rel_err(y[-1, -1, -12:, -12:], torch.maximum(a1 * corner + b1, a2 * corner + b2)) < 1e-2


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.mem_get_info()[0] < 40 * 2**30,
                    reason="needs 40 GiB of free GPU memory")
def test_past_int32_backward():
    x, params = _large()
    x.requires_grad_()
    for p in params:
        p.requires_grad_()
    y = level_combine([x], *params)
    g_out = torch.randn_like(y)
    dx, d_scale, d_shift, d_coef = torch.autograd.grad(y, [x, *params], g_out)
    # The last plane's gradients from the float64 expressions.
    plane, g_plane = _last_plane(x.detach(), g_out)
    ref = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in
           (params[0][-1, 0, -1].item(), params[1][-1, -1].item(), *params[2][-1, :, -1].tolist())]
    plane.requires_grad_()
    u = ref[0] * plane + ref[1]
    y_ref = torch.maximum(ref[2] * u + ref[3], ref[4] * u + ref[5])
    g_ref = torch.autograd.grad(y_ref, [plane, *ref], g_plane)
    assert rel_err(dx[-1, -1, -12:, -12:], g_ref[0][-12:, -12:]) < 1e-2
    got = torch.stack([d_scale[-1, 0, -1], d_shift[-1, -1], *d_coef[-1, :, -1]])
    assert rel_err(got, torch.stack(g_ref[1:])) < 1e-4
    (dx_m,) = torch.autograd.grad(channel_moments(x)[..., 1].sum(), x)
    mean = plane.detach().mean()
    assert rel_err(dx_m[-1, -1, -12:, -12:], 2 * (plane.detach()[-12:, -12:] - mean)) < 1e-2
