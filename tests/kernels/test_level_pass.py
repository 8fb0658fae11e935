"""kernels.level_pass (channel_moments, level_combine) against plain torch expressions in float64.

The kernels run on the CPU under the interpreter (CI sets TRITON_INTERPRET=1 before pytest starts) or, without
it, on a CUDA GPU; input checks run everywhere. Shapes are tiny and odd: the interpreter's blocks are 4 channels
x 16 pixels and reduction runs 32 pixels, so these shapes cover partial blocks, several tiles per run and
several runs per image (and a single run).
"""

import pytest
import torch
import torch.nn.functional as F
from deform_conv_cases import rel_err

from kernels import level_pass
from kernels.level_pass import channel_moments, level_combine
from kernels.runtime import INTERPRET

DEVICE = "cpu" if INTERPRET else "cuda"
needs_kernels = pytest.mark.skipif(
    not INTERPRET and not torch.cuda.is_available(),
    reason="the Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 set before pytest starts")
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def moments_reference(x):
    """(N, C, 2): mean and sum of squared deviations over H, W."""
    mean = x.mean(dim=(2, 3))
    return torch.stack([mean, (x - mean[..., None, None]).square().sum(dim=(2, 3))], dim=-1)


def combine_reference(branches, scale, shift, coef):
    size = branches[0].shape[-2:]
    branches = [y if y.shape[-2:] == size else F.interpolate(y, size=size, mode="bilinear", align_corners=True)
                for y in branches]
    u = shift[..., None, None] + sum(scale[:, b, :, None, None] * y for b, y in enumerate(branches))
    a1, b1, a2, b2 = coef[..., None, None].unbind(1)
    return torch.maximum(a1 * u + b1, a2 * u + b2)


def combine_inputs(n, nb, c, h, w, seed=0, last_size=None):
    """float64 branches (list; the last of size last_size if given), scale, shift, coef: both lines of the max
    win on many pixels."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [(h, w)] * (nb - 1) + [last_size or (h, w)]
    branches = [torch.randn(n, c, *size, generator=gen, dtype=torch.float64) for size in sizes]
    scale = torch.rand(n, nb, c, generator=gen, dtype=torch.float64) + 0.5
    shift = torch.randn(n, c, generator=gen, dtype=torch.float64) * 0.5
    coef = torch.randn(n, 4, c, generator=gen, dtype=torch.float64)
    return branches, scale, shift, coef


def leaves(tensors, dtype, device=DEVICE):
    """Copies of the float64 tensors (a list or a tensor) that require grad; scale/shift/coef stay in the
    kernels' math dtype, so pass float32 for the low-precision branch types."""
    if isinstance(tensors, list):
        return [leaves(t, dtype, device) for t in tensors]
    return tensors.to(device, dtype, copy=True).requires_grad_()


def params_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def run_combine(inputs, dtype, memory_format=torch.contiguous_format, fn=level_combine):
    """Output and gradients of fn in dtype against float64 torch, for one random output gradient."""
    branches, scale, shift, coef = inputs
    ref = [leaves(branches, torch.float64, "cpu"), *leaves([scale, shift, coef], torch.float64, "cpu")]
    y_ref = combine_reference(*ref)
    g_out = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g_ref = torch.autograd.grad(y_ref, [*ref[0], *ref[1:]], g_out)
    ys = [b.to(memory_format=memory_format).detach().requires_grad_() for b in leaves(branches, dtype)]
    params = leaves([scale, shift, coef], params_dtype(dtype))
    y = fn(ys, *params)
    g = torch.autograd.grad(y, [*ys, *params], g_out.to(y))
    return (y, g), (y_ref, g_ref)


def assert_close(actual, expected, tol):
    assert actual[0].shape == expected[0].shape
    assert rel_err(actual[0], expected[0]) < tol, rel_err(actual[0], expected[0])
    for i, (a, b) in enumerate(zip(actual[1], expected[1])):
        assert a.shape == b.shape and rel_err(a, b) < tol, (i, rel_err(a, b))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("nb", [1, 2, 3])
def test_combine_matches_float64(nb, dtype):
    (y, g), expected = run_combine(combine_inputs(2, nb, 5, 7, 5), dtype)
    assert y.dtype == dtype and all(d.dtype == t for d, t in zip(g, [dtype] * nb + [params_dtype(dtype)] * 3))
    assert_close((y, g), expected, TOL[dtype])


@needs_kernels
@pytest.mark.parametrize("case, shape, memory_format", [
    ("batch3_3x11", (3, 2, 6, 3, 11), torch.contiguous_format),  # one run per image
    ("channels_last", (2, 3, 9, 5, 7), torch.channels_last),
    ("runs", (1, 3, 7, 9, 13), torch.contiguous_format)])  # three runs of 64 pixels, the last 53
def test_combine_shapes_and_layouts(case, shape, memory_format):
    (y, g), expected = run_combine(combine_inputs(*shape), torch.float32, memory_format)
    assert y.is_contiguous(memory_format=memory_format)
    assert_close((y, g), expected, TOL[torch.float32])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("nb, size, last_size, memory_format", [
    (2, (9, 13), (5, 7), torch.contiguous_format),  # DyHead's coarser branch: about half the size
    (3, (9, 13), (5, 7), torch.channels_last),
    (3, (7, 20), (7, 3), torch.contiguous_format),  # up along one axis only, several runs
    (2, (4, 6), (1, 9), torch.contiguous_format)])  # one row; down along the other axis
def test_combine_resizes_a_last_branch_of_another_size(nb, size, last_size, memory_format, dtype):
    """The last branch is read as F.interpolate(bilinear, align_corners=True) of it, differentiably."""
    inputs = combine_inputs(2, nb, 5, *size, last_size=last_size)
    (y, g), expected = run_combine(inputs, dtype, memory_format)
    assert y.shape == expected[0].shape and y.is_contiguous(memory_format=memory_format)
    assert g[nb - 1].shape == (2, 5, *last_size) and g[nb - 1].dtype == dtype
    assert_close((y, g), expected, TOL[dtype])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_combine_ties_split_like_torch_maximum(dtype):
    """Channel 0 has equal lines everywhere; channel 1 equal lines where u == 0 (zero branches, zero shift)."""
    branches, scale, shift, coef = combine_inputs(2, 2, 3, 5, 7)
    coef[:, 2:, 0] = coef[:, :2, 0]
    coef[:, 3, 1] = coef[:, 1, 1]
    shift[:, 1] = 0
    for b in branches:
        b[:, 1, ::2] = 0
    assert_close(*run_combine((branches, scale, shift, coef), dtype), TOL[dtype])


@needs_kernels
def test_combine_nan_propagates_and_splits_the_gradient_like_torch_maximum():
    """A NaN in a branch makes u, both lines and the output NaN there, and torch.maximum's backward gives that
    pixel's gradient whole to both lines (neither wins, nor is it a tie): the branch gradients stay finite
    and equal torch's, and the coefficient sums that read u are NaN as torch's are."""
    branches, scale, shift, coef = combine_inputs(1, 2, 3, 5, 7)
    branches[0][0, 1, 2, 3] = float("nan")
    (y, g), (y_ref, g_ref) = run_combine((branches, scale, shift, coef), torch.float64)
    assert y[0, 1, 2, 3].isnan() and y.isnan().sum() == 1
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert g[0].isfinite().all()
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)


@needs_kernels
def test_combine_without_pixels_gives_zero_coefficient_gradients():
    """Images of H*W == 0: the per-channel gradients of scale, shift and coef are sums over no pixels, zero,
    not whatever an uninitialised buffer held."""
    n, c = 2, 3
    y = torch.randn(n, c, 0, 5, device=DEVICE, requires_grad=True)
    params = [torch.randn(shape, device=DEVICE, requires_grad=True) for shape in ((n, 1, c), (n, c), (n, 4, c))]
    for _ in range(3):
        # A freed NaN block the size of the kernels' gradient buffer: an allocation left unwritten reads it.
        torch.full((n, 6, c), float("nan"), device=DEVICE)
        grads = torch.autograd.grad(level_combine([y], *params).sum(), [y, *params])
        assert grads[0].shape == y.shape
        for g, p in zip(grads[1:], params):
            assert torch.equal(g, torch.zeros_like(p))


@needs_kernels
@pytest.mark.parametrize("wanted", ["branches", "scale", "shift", "coef"])
def test_combine_only_wanted_gradients(wanted):
    """Gradients autograd does not ask for are None; those it asks for stay exact."""
    inputs = combine_inputs(2, 2, 5, 3, 7)
    (_, g_all), _ = run_combine(inputs, torch.float64)
    branches = [b.to(DEVICE).requires_grad_(wanted == "branches") for b in inputs[0]]
    params = {k: t.to(DEVICE).requires_grad_(k == wanted) for k, t in zip(("scale", "shift", "coef"), inputs[1:])}
    y = level_combine(branches, *params.values())
    g_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    wrt = branches if wanted == "branches" else [params[wanted]]
    g = torch.autograd.grad(y, wrt, g_out.to(DEVICE))
    expected = g_all[:2] if wanted == "branches" else [g_all[2 + ["scale", "shift", "coef"].index(wanted)]]
    for a, b in zip(g, expected):
        assert rel_err(a, b.double().cpu()) < 1e-12


# (shape, offset, view): moments of view(randn(shape) + offset).
MOMENT_CASES = {
    "7x5": ((2, 5, 7, 5), 0, lambda t: t),
    "batch3_3x11": ((3, 6, 3, 11), 0, lambda t: t),
    "runs": ((1, 9, 12, 13), 0, lambda t: t),  # three runs of 64 pixels, the last 28
    "channels_last": ((2, 6, 5, 7), 0, lambda t: t.to(memory_format=torch.channels_last)),
    "channel_slice": ((2, 10, 7, 5), 0, lambda t: t[:, 1::2]),
    "crop": ((2, 5, 9, 8), 0, lambda t: t[..., 1:8, :5]),
    # One column of a wider map: W == 1 with rows W' apart, read in place along the row stride.
    "column": ((2, 5, 9, 4), 0, lambda t: t[..., 2:3]),
    # A mean 100x the spread: E[x^2] - E[x]^2 in fp32 would be off by ~1e-3 here.
    "large_mean": ((2, 5, 13, 17), 100, lambda t: t),
}


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", MOMENT_CASES.keys())
def test_moments_match_float64(case, dtype):
    shape, offset, view = MOMENT_CASES[case]
    gen = torch.Generator().manual_seed(0)
    # Rounded to dtype first: the reference sees what the kernels see.
    base64 = (torch.randn(shape, generator=gen, dtype=torch.float64) + offset).to(dtype).double()
    base_ref = base64.clone().requires_grad_()
    m_ref = moments_reference(view(base_ref))
    g_out = torch.randn(m_ref.shape, generator=gen, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(m_ref, base_ref, g_out)
    base = base64.to(DEVICE, dtype).requires_grad_()
    x = view(base)
    assert x.stride() == view(base_ref).stride()
    m = channel_moments(x)
    (g,) = torch.autograd.grad(m, base, g_out.to(DEVICE, m.dtype))
    assert m.shape == m_ref.shape and m.dtype == params_dtype(dtype) and g.dtype == dtype
    for k in range(2):
        assert rel_err(m[..., k], m_ref[..., k].detach()) < TOL[dtype], (k, rel_err(m[..., k], m_ref[..., k]))
    assert rel_err(g, g_ref) < TOL[dtype], rel_err(g, g_ref)


@needs_kernels
def test_moments_keep_m2_where_the_mean_is_1e4_times_the_spread():
    """M2 as precise as torch's fp32 variance (~5e-8 relative) with a mean 1e4x the spread over two pixel runs;
    runs merged about their own fp32 means were off by ~1e-4."""
    x = (torch.randn(2, 5, 13, 17, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 1e4).float()
    m2 = moments_reference(x.double())[..., 1]
    assert rel_err(channel_moments(x.to(DEVICE))[..., 1], m2) < 1e-6


@needs_kernels
def test_moments_expanded_and_partial_gradients():
    """An expanded output gradient (from .sum()) is read in place; a mean-only or M2-only use is exact."""
    x64 = torch.randn(2, 5, 7, 5, dtype=torch.float64) + 3
    x_ref = x64.clone().requires_grad_()
    x = x64.to(DEVICE).requires_grad_()
    for use in (lambda m: m.sum(), lambda m: m[..., 0].square().sum(), lambda m: m[..., 1].sum()):
        (g_ref,) = torch.autograd.grad(use(moments_reference(x_ref)), x_ref)
        (g,) = torch.autograd.grad(use(channel_moments(x)), x)
        assert rel_err(g, g_ref) < 1e-12


@needs_kernels
def test_gradcheck_float64():
    torch.manual_seed(0)
    branches, scale, shift, coef = combine_inputs(1, 2, 3, 2, 3)
    t = [b.to(DEVICE).requires_grad_() for b in (*branches, scale, shift, coef)]
    assert torch.autograd.gradcheck(lambda y0, y1, *p: level_combine([y0, y1], *p), t)
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(channel_moments, (x,))


@needs_kernels
def test_backward_is_bitwise_deterministic():
    branches, scale, shift, coef = combine_inputs(2, 3, 6, 9, 7)

    def run():
        ys = leaves(branches, torch.float32)
        params = leaves([scale, shift, coef], torch.float32)
        y = level_combine(ys, *params)
        m = channel_moments(y)
        return [m, *torch.autograd.grad((m * m).sum(), [*ys, *params])]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@needs_kernels
def test_custom_op_matches_eager_path():
    """The custom ops (what torch.compile traces) compute what the eager autograd.Functions compute."""
    ops = lambda ys, *p: level_pass._combine_op(ys, *p)
    for inputs in (combine_inputs(2, 2, 5, 3, 7), combine_inputs(2, 3, 5, 7, 9, last_size=(4, 5))):
        (y, g), _ = run_combine(inputs, torch.float32)
        (y_op, g_op), _ = run_combine(inputs, torch.float32, fn=ops)
        assert torch.equal(y, y_op) and all(torch.equal(a, b) for a, b in zip(g, g_op))
    x = leaves(inputs[0][0], torch.float32)
    m, m_op = channel_moments(x), level_pass._moments_op(x)
    assert torch.equal(m, m_op)
    assert torch.equal(*(torch.autograd.grad(t.square().sum(), x)[0] for t in (m, m_op)))


def level_like(branches, scale, shift, coef):
    """A small function of both ops, as a level of DyHead uses them."""
    moments = channel_moments(branches[0])
    shift = shift + moments[..., 0] * 0.1 + moments[..., 1] * 0.01
    return channel_moments(level_combine(branches, scale, shift, coef))


@needs_kernels
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend):
    """fullgraph=True fails on any graph break; inductor on the CPU needs a C++ compiler (~10 s)."""
    branches, scale, shift, coef = combine_inputs(2, 2, 5, 3, 7)
    t = [*leaves(branches, torch.float32), *leaves([scale, shift, coef], torch.float32)]
    compiled = torch.compile(lambda y0, y1, *p: level_like([y0, y1], *p), fullgraph=True, backend=backend)
    out_eager = level_like(t[:2], *t[2:])
    g_eager = torch.autograd.grad(out_eager.square().sum(), t)
    out = compiled(*t)
    g = torch.autograd.grad(out.square().sum(), t)
    torch.testing.assert_close(out, out_eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_autocast_keeps_branches_and_fp32_coefficients():
    """Half-precision scale/shift/coef (from autocast matmuls) are cast to float32; branches of two dtypes are
    promoted to the wider. (The interpreter's bfloat16 is broken, so float16 stands in for it.)"""
    branches, scale, shift, coef = combine_inputs(2, 2, 5, 3, 7)
    half = [b.to(DEVICE, torch.float16) for b in branches]
    params = [t.to(DEVICE, torch.float16) for t in (scale, shift, coef)]
    expected = level_combine(half, *(t.float() for t in params))
    with torch.autocast(DEVICE, dtype=torch.float16):
        y = level_combine(half, *params)
        y_mixed = level_combine([half[0], half[1].float()], *params)
    assert y.dtype == torch.float16 and torch.equal(y, expected)
    assert y_mixed.dtype == torch.float32
    assert torch.equal(y_mixed, level_combine([h.float() for h in half], *(t.float() for t in params)))


def test_fake_impl_shapes_and_layouts():
    x = torch.randn(2, 6, 5, 7).to(memory_format=torch.channels_last)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        m = level_pass._moments_op(fake)
        y = level_pass._combine_op([fake, fake], mode.from_tensor(torch.ones(2, 2, 6)),
                                   mode.from_tensor(torch.ones(2, 6)), mode.from_tensor(torch.ones(2, 4, 6)))
        d_branches, d_params = level_pass._combine_backward_op(fake, [fake, fake], *(
            mode.from_tensor(t) for t in (torch.ones(2, 2, 6), torch.ones(2, 6), torch.ones(2, 4, 6))), True, True)
        coarse = mode.from_tensor(torch.randn(2, 6, 3, 4).to(memory_format=torch.channels_last))
        d_resized, _ = level_pass._combine_backward_op(fake, [fake, coarse], *(
            mode.from_tensor(t) for t in (torch.ones(2, 2, 6), torch.ones(2, 6), torch.ones(2, 4, 6))), True, True)
    assert tuple(m.shape) == (2, 6, 2) and m.dtype == torch.float32
    assert tuple(y.shape) == (2, 6, 5, 7) and y.is_contiguous(memory_format=torch.channels_last)
    assert len(d_branches) == 2 and tuple(d_params.shape) == (2, 7, 6)
    assert tuple(d_resized[1].shape) == (2, 6, 3, 4) and d_resized[1].is_contiguous()


@needs_kernels
def test_empty_batch_and_channels():
    for shape in [(0, 3, 4, 5), (2, 0, 4, 5)]:
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        assert channel_moments(x).shape == (*shape[:2], 2)
        n, c = shape[:2]
        y = level_combine([x], torch.ones(n, 1, c), torch.zeros(n, c), torch.ones(n, 4, c))
        assert y.shape == shape


@pytest.mark.skipif(INTERPRET, reason="checks the error raised when the interpreter is off")
def test_cpu_without_interpreter_raises():
    branches, scale, shift, coef = (t.float() if isinstance(t, torch.Tensor) else [b.float() for b in t]
                                    for t in combine_inputs(1, 1, 2, 3, 3))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        channel_moments(branches[0])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        level_combine(branches, scale, shift, coef)


def _bad(**change):
    """Float32 CPU combine inputs for B = 2 branches (2, 3, 4, 5), with some replaced."""
    branches, scale, shift, coef = combine_inputs(2, 2, 3, 4, 5)
    t = {"branches": [b.float() for b in branches], "scale": scale.float(), "shift": shift.float(),
         "coef": coef.float()}
    t.update(change)
    return t


BAD_COMBINE = {
    "not_a_list": (_bad(branches=torch.randn(2, 3, 4, 5)), TypeError, "branches must be a list"),
    "no_branch": (_bad(branches=[]), ValueError, "1 to 3 tensors"),
    "four_branches": (_bad(branches=[torch.randn(2, 3, 4, 5)] * 4), ValueError,
                      r"1 to 3 tensors \(N, C, H, W\), got 4"),
    "branch_rank": (_bad(branches=[torch.randn(3, 4, 5)] * 2), ValueError, r"branches\[0\] must be \(N, C, H, W\)"),
    "branch_shape": (_bad(branches=[torch.randn(2, 3, 4, 5), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 4, 5)]),
                     ValueError, r"branches\[1\] must be \(2, 3, 4, 5\)"),
    "resized_channels": (_bad(branches=[torch.randn(2, 3, 4, 5), torch.randn(2, 4, 2, 3)]), ValueError,
                         r"branches\[1\] must be \(N, C, H', W'\) = \(2, 3\)"),
    "resized_empty": (_bad(branches=[torch.randn(2, 3, 4, 5), torch.randn(2, 3, 0, 3)]), ValueError,
                      r"H'\*W' > 0"),
    "branch_dtype": (_bad(branches=[torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5).half()]), TypeError,
                     r"branches\[1\] has dtype torch.float16"),
    "int_branch": (_bad(branches=[torch.ones(2, 3, 4, 5, dtype=torch.int32)] * 2), TypeError,
                   r"branches\[0\] must be float32"),
    "branch_device": (_bad(branches=[torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5, device="meta")]),
                      ValueError, r"branches\[1\] is on meta"),
    "scale_shape": (_bad(scale=torch.randn(2, 3, 3)), ValueError, r"scale must be \(N, B, C\) = \(2, 2, 3\)"),
    "shift_shape": (_bad(shift=torch.randn(2, 3, 1)), ValueError, r"shift must be \(N, C\) = \(2, 3\)"),
    "coef_shape": (_bad(coef=torch.randn(2, 3, 4)), ValueError, r"coef must be \(N, 4, C\) = \(2, 4, 3\)"),
    "coef_dtype": (_bad(coef=torch.randn(2, 4, 3).half()), TypeError, "coef must be torch.float32"),
    "fp64_scale": (_bad(scale=torch.randn(2, 2, 3, dtype=torch.float64)), TypeError, "scale must be torch.float32"),
    "shift_none": (_bad(shift=None), TypeError, "shift must be a Tensor"),
    "coef_device": (_bad(coef=torch.randn(2, 4, 3, device="meta")), ValueError, "coef is on meta"),
}


@pytest.mark.parametrize("case", BAD_COMBINE.keys())
def test_bad_combine_inputs_raise(case):
    t, error, message = BAD_COMBINE[case]
    with pytest.raises(error, match=message):
        level_combine(t["branches"], t["scale"], t["shift"], t["coef"])


@pytest.mark.parametrize("x, error, message", [
    (torch.randn(3, 4, 5), ValueError, r"x must be \(N, C, H, W\)"),
    (torch.ones(1, 2, 3, 4, dtype=torch.int64), TypeError, "x must be float32"),
    (torch.randn(1, 2, 0, 4), ValueError, "H\\*W > 0"),
    ([1.0], TypeError, "x must be a Tensor")])
def test_bad_moments_input_raises(x, error, message):
    with pytest.raises(error, match=message):
        channel_moments(x)
