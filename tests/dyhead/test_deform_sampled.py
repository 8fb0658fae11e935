"""The grid_sample formulation of the modulated deformable conv against torchvision's op."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from dyhead import DyHead, coarser_view, deform, deform_conv2d_sampled


@pytest.fixture(autouse=True, params=["all taps", "tap by tap"])
def column_budget(request, monkeypatch):
    """Every test on both of the sampled conv's paths: the tests' maps fit the column budget, so a budget of
    zero makes it sample tap by tap."""
    if request.param == "tap by tap":
        monkeypatch.setattr(deform, "COLUMN_BUDGET_BYTES", 0)
    return request.param


def test_one_grid_sample_for_all_taps_where_their_column_buffer_fits(monkeypatch, column_budget):
    calls = []
    real = F.grid_sample
    monkeypatch.setattr(F, "grid_sample", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    x, offset, mask, weight, bias = make_case()
    out = deform_conv2d_sampled(x, offset, mask, weight, bias)
    assert len(calls) == (1 if column_budget == "all taps" else 9)
    ref = tv_deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    assert rel_err(out, ref) < 1e-12


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_case(n=2, cin=5, cout=7, h=9, w=11, stride=1, dilation=1, offset_scale=2.5, seed=0):
    """Inputs whose samples cross pixel borders and leave the image; fractional parts kept off integers."""
    g = torch.Generator().manual_seed(seed)
    hout = (h + 2 - dilation * 2 - 1) // stride + 1
    wout = (w + 2 - dilation * 2 - 1) // stride + 1
    x = torch.randn(n, cin, h, w, generator=g, dtype=torch.float64)
    offset = torch.randn(n, 18, hout, wout, generator=g, dtype=torch.float64) * offset_scale
    offset = offset.floor() + 0.1 + 0.8 * torch.rand(offset.shape, generator=g, dtype=torch.float64)
    mask = torch.rand(n, 9, hout, wout, generator=g, dtype=torch.float64)
    weight = torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    return x, offset, mask, weight, bias


def both(args, stride, dilation, bias=True):
    x, offset, mask, weight, b = args
    b = b if bias else None
    ours = deform_conv2d_sampled(x, offset, mask, weight, b, stride, 1, dilation)
    ref = tv_deform_conv2d(x, offset, weight, b, stride=stride, padding=1, dilation=dilation, mask=mask)
    return ours, ref


@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_all_gradients_float64(stride, dilation, bias):
    args = [t.requires_grad_() for t in make_case(stride=stride, dilation=dilation)]
    ours, ref = both(args, stride, dilation, bias)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < 1e-12
    g = torch.randn_like(ref)
    names = ["input", "offset", "mask", "weight", "bias"]
    used = args if bias else args[:4]
    grads_ours = torch.autograd.grad(ours, used, g)
    grads_ref = torch.autograd.grad(ref, used, g)
    for name, a, b in zip(names, grads_ours, grads_ref):
        assert rel_err(a, b) < 1e-10, name


@pytest.mark.parametrize("stride,padding,dilation", [((1, 2), (1, 0), 1), ((2, 1), (0, 2), (2, 1))])
def test_per_axis_stride_padding_dilation(stride, padding, dilation):
    """A pair gives each axis its own setting: the cases above have equal height and width settings, where the
    height's stride or padding taken for the width's (or the reverse) changed nothing."""
    g = torch.Generator().manual_seed(6)
    n, cin, cout, h, w = 2, 3, 4, 9, 11
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, (dilation, dilation) if isinstance(dilation, int) else dilation
    hout, wout = (h + 2 * ph - 2 * dh - 1) // sh + 1, (w + 2 * pw - 2 * dw - 1) // sw + 1
    x = torch.randn(n, cin, h, w, generator=g, dtype=torch.float64)
    offset = torch.randn(n, 18, hout, wout, generator=g, dtype=torch.float64) * 1.5
    mask = torch.rand(n, 9, hout, wout, generator=g, dtype=torch.float64)
    weight = torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64)
    ours = deform_conv2d_sampled(x, offset, mask, weight, None, stride, padding, dilation)
    ref = tv_deform_conv2d(x, offset, weight, stride=stride, padding=padding, dilation=dilation, mask=mask)
    assert ours.shape == ref.shape == (n, cout, hout, wout)
    assert rel_err(ours, ref) < 1e-12


def test_samples_wholly_outside_are_zero():
    x, offset, mask, weight, _ = make_case(h=5, w=6)
    offset = torch.full_like(offset, 40.0)  # every sample far below/right of the image
    out = deform_conv2d_sampled(x, offset, mask, weight)
    assert torch.count_nonzero(out) == 0
    ref = tv_deform_conv2d(x, offset, weight, mask=mask, padding=1)
    assert torch.count_nonzero(ref) == 0


def test_nan_offsets_give_nan_pixels_and_torchvision_refuses_them_on_the_cpu():
    """A NaN offset makes its output pixel NaN (torchvision's CUDA semantics); torchvision's CPU kernel crashes
    the process on it (a segfault), so its wrapper raises first. Infinite offsets (a half-precision overflow) are
    samples outside the image, as on torchvision and triton: grid_sample made them NaN."""
    x, offset, mask, weight, bias = make_case(h=5, w=6)
    offset[0, 3, 2, 4] = float("nan")
    offset[1, 0, 1, 1] = float("inf")
    offset[1, 5, 3, 3] = -float("inf")
    offset.requires_grad_()
    out = deform_conv2d_sampled(x, offset, mask, weight, bias)
    nan_pixels = torch.zeros_like(out, dtype=torch.bool)
    nan_pixels[0, :, 2, 4] = True
    assert torch.equal(out.isnan(), nan_pixels)
    far = torch.where(offset.isfinite(), offset, 40.0).detach().requires_grad_()
    expected = tv_deform_conv2d(x, far, weight, bias, mask=mask, padding=1)
    assert rel_err(out[~nan_pixels], expected[~nan_pixels]) < 1e-12
    (grad,) = torch.autograd.grad(out[1].sum(), offset)
    (grad_far,) = torch.autograd.grad(expected[1].sum(), far)
    assert rel_err(grad[1], grad_far[1]) < 1e-10 and grad[1, 0, 1, 1] == grad[1, 5, 3, 3] == 0
    with pytest.raises(FloatingPointError, match="offset holds NaN"):
        deform.deform_conv2d("torchvision", x, offset, mask, weight, bias)


def test_nan_offsets_give_nan_pixels_where_grid_sample_moves_non_finite_coordinates_outside(monkeypatch):
    """grid_sample's CUDA kernel maps a non-finite coordinate far outside the image (its
    safe_downgrade_to_int_range: a zero sample), where its CPU kernel blends with NaN weights: emulated here on
    the CPU, a NaN offset must still make its output pixel NaN (on CUDA the sampled path dropped the sample, so
    a NaN offset conv left DyHead's sampled output finite)."""
    real = F.grid_sample

    def cuda_like(source, grid, **kwargs):
        return real(source, torch.where(grid.isfinite(), grid, -100.0), **kwargs)

    monkeypatch.setattr(F, "grid_sample", cuda_like)
    x, offset, mask, weight, bias = make_case(h=5, w=6)
    offset[0, 3, 2, 4] = float("nan")  # dx of tap 1, its y inside
    offset[1, 0:2, 1, 1] = torch.tensor([float("nan"), 40.0])  # dy of tap 0, its x far outside
    out = deform_conv2d_sampled(x, offset, mask, weight, bias)
    nan_pixels = torch.zeros_like(out, dtype=torch.bool)
    nan_pixels[0, :, 2, 4] = nan_pixels[1, :, 1, 1] = True
    assert torch.equal(out.isnan(), nan_pixels)
    expected = tv_deform_conv2d(x, offset.nan_to_num(40.0), weight, bias, mask=mask, padding=1)
    assert rel_err(out[~nan_pixels], expected[~nan_pixels]) < 1e-12


def test_single_pixel_image():
    x, offset, mask, weight, bias = make_case(h=1, w=1, offset_scale=0.3)
    ours, ref = both((x, offset, mask, weight, bias), 1, 1)
    assert rel_err(ours, ref) < 1e-12


@pytest.mark.parametrize("backend", ["sampled", "torchvision"])
def test_conv_arguments_are_read_as_the_kernels_read_them(backend):
    """numpy integers act as ints, as torchvision's own op takes them (both wrappers indexed them as pairs:
    TypeError); a float pair is refused, not truncated (the sampled conv read (2.5, 2.5) as stride 2)."""
    x, offset, mask, weight, bias = make_case(stride=2)
    expected = tv_deform_conv2d(x, offset, weight, bias, stride=2, padding=1, mask=mask)
    out = deform.deform_conv2d(backend, x, offset, mask, weight, bias, np.int64(2), (np.int32(1), 1), np.int64(1))
    assert rel_err(out, expected) < 1e-12
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
        deform.deform_conv2d(backend, x, offset, mask, weight, bias, (2.5, 2.5))


@pytest.mark.parametrize("conv", [dict(stride=0), dict(dilation=(1, 0)), dict(padding=-1)])
def test_conv_arguments_out_of_range_raise(conv):
    """As torchvision and triton: a zero stride raised ZeroDivisionError, and a zero dilation with offsets of
    its output size sampled every tap at one place."""
    x, _, _, weight, bias = make_case(n=1, h=5, w=5)
    with pytest.raises(ValueError, match="need stride >= 1, dilation >= 1, padding >= 0"):
        deform_conv2d_sampled(x, torch.zeros(1, 18, 5, 7, dtype=x.dtype), torch.ones(1, 9, 5, 7, dtype=x.dtype),
                              weight, bias, **conv)


@pytest.mark.parametrize("mode", ["official", "crop"])
def test_strided_views_of_the_offset_conv_output(mode):
    """Offsets/mask as slices of a 27-channel tensor, read as the coarser-level quirk's view."""
    g = torch.Generator().manual_seed(4)
    n, c, h, w, hc, wc = 2, 4, 9, 11, 5, 6
    om = torch.randn(n, 27, h, w, generator=g, dtype=torch.float64) * 2
    om.requires_grad_()
    coarse = torch.randn(n, c, hc, wc, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c, c, 3, 3, generator=g, dtype=torch.float64)
    offset = coarser_view(om[:, :18], hc, wc, mode)
    mask = coarser_view(om[:, 18:].sigmoid(), hc, wc, mode)
    if mode == "official":
        assert offset.data_ptr() == om.data_ptr()  # a view, no copy
    ours = deform_conv2d_sampled(coarse, offset, mask, weight)
    ref = tv_deform_conv2d(coarse, offset.contiguous(), weight, padding=1, mask=mask.contiguous())
    assert rel_err(ours, ref) < 1e-12
    go, gc = torch.autograd.grad(ours.square().sum(), (om, coarse), retain_graph=True)
    ro, rc = torch.autograd.grad(ref.square().sum(), (om, coarse))
    assert rel_err(go, ro) < 1e-10 and rel_err(gc, rc) < 1e-10


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 3e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_low_precision_storage(dtype, bound):
    """Error of the computation alone: the reference sees the same rounded inputs."""
    stored = [t.to(dtype) for t in make_case(cin=16, cout=16, h=20, w=24, offset_scale=6.0)]
    x, offset, mask, weight, bias = (t.double() for t in stored)
    ref = tv_deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    out = deform_conv2d_sampled(*stored)
    assert out.dtype == dtype
    assert rel_err(out.double(), ref) < bound


def test_large_coordinates_keep_float32_sampling_in_bf16():
    """At x ~ 100 a bf16 grid would move samples by up to 0.25 px; bf16 storage must not."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 8, 200, generator=g, dtype=torch.float64)
    offset = torch.rand(1, 18, 8, 200, generator=g, dtype=torch.float64) * 0.8 + 0.1
    mask = torch.ones(1, 9, 8, 200, dtype=torch.float64)
    weight = torch.randn(16, 16, 3, 3, generator=g, dtype=torch.float64)
    ref = tv_deform_conv2d(x.bfloat16().double(), offset, weight.bfloat16().double(), padding=1, mask=mask)
    out = deform_conv2d_sampled(x.bfloat16(), offset.float(), mask.float(), weight.bfloat16())
    assert rel_err(out.double(), ref) < 1e-2


def test_autocast_cpu_bf16():
    x, offset, mask, weight, bias = (t.float() for t in make_case(cin=16, cout=16))
    ref = tv_deform_conv2d(x.double(), offset.double(), weight.double(), bias.double(), padding=1, mask=mask.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_conv2d_sampled(x, offset, mask, weight, bias)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.double(), ref) < 2e-2


def test_torch_compile_fullgraph():
    x, offset, mask, weight, bias = (t.float() for t in make_case())
    compiled = torch.compile(deform_conv2d_sampled, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, offset, mask, weight, bias),
                               deform_conv2d_sampled(x, offset, mask, weight, bias))


def test_dyhead_sampled_matches_torchvision_with_gradients():
    torch.manual_seed(0)
    model = DyHead(32, 32, 2, backend="torchvision").double()
    sizes = [(13, 15), (7, 8), (4, 4)]
    levels = [torch.randn(2, 32, h, w, dtype=torch.float64, requires_grad=True) for h, w in sizes]
    ref = model(levels)
    ref_grads = torch.autograd.grad(sum(t.square().sum() for t in ref), [*levels, *model.parameters()])
    model.backend = "sampled"
    out = model(levels)
    grads = torch.autograd.grad(sum(t.square().sum() for t in out), [*levels, *model.parameters()])
    for a, b in zip(out, ref):
        assert rel_err(a, b) < 1e-10
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 1e-8


def test_torch_compile_inductor_forward_and_backward():
    x, offset, mask, weight, bias = (t.float().requires_grad_() for t in make_case(h=7, w=8))
    compiled = torch.compile(deform_conv2d_sampled, fullgraph=True)
    out = compiled(x, offset, mask, weight, bias)
    ref = deform_conv2d_sampled(x, offset, mask, weight, bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (x, offset, mask, weight, bias))
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, offset, mask, weight, bias))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["sampled", "torchvision"])
def test_sets_with_mask_logits_take_their_sigmoid(backend):
    """The reference backends of deform_conv2d_sets read mask logits as the triton kernels do: sigmoid first
    (sample_bases only steer triton's gradients: the views' own autograd reaches the same leaves)."""
    from dyhead.deform import deform_conv2d_sets
    x, offset, logits, weight, bias = make_case()
    logits = (logits - 0.5) * 6
    om = torch.cat([offset, logits], 1).requires_grad_()
    args = dict(backend=backend, inputs=[x], weights=[weight], biases=[bias], levels=[[0]], strides=[1])
    (got,), = deform_conv2d_sets(**args, offsets=[[om[:, :18]]], masks=[[om[:, 18:]]], sample_bases=[om],
                                 mask_logits=True)
    expected = tv_deform_conv2d(x, om[:, :18], weight, bias, padding=1, mask=om[:, 18:].sigmoid())
    assert rel_err(got, expected) < 1e-12
    g, = torch.autograd.grad(got.square().sum(), om)
    g_expected, = torch.autograd.grad(expected.square().sum(), om)
    assert rel_err(g, g_expected) < 1e-9


@pytest.mark.parametrize("name,offset_shape,mask_shape", [
    ("offset", (2, 18, 5, 6), (2, 9, 9, 11)),  # offsets of another output size
    ("mask", (2, 18, 9, 11), (1, 9, 9, 11)),   # one image's mask, which would broadcast over the batch
    ("mask", (2, 18, 9, 11), (2, 1, 9, 11)),   # one mask channel, which would broadcast over the taps
])
def test_offset_and_mask_must_match_the_output(name, offset_shape, mask_shape):
    """As torchvision and triton, the sampled conv refuses offsets or masks not shaped as its output, instead of
    computing an output of the offsets' size or broadcasting the mask."""
    x, _, _, weight, bias = make_case()
    with pytest.raises(ValueError, match=rf"{name} must be \(2, (18|9), 9, 11\)"):
        deform_conv2d_sampled(x, torch.zeros(offset_shape, dtype=x.dtype), torch.ones(mask_shape, dtype=x.dtype),
                              weight, bias)


def test_block_refuses_levels_that_are_not_a_pyramid_on_sampled():
    """A DyHeadBlock called directly (DyHead checks its input first) on levels whose finer branch's stride-2
    output is not the next level's size: the sampled backend raised nothing and misaligned the branches."""
    from dyhead import DyHeadBlock
    block = DyHeadBlock(16, 16, backend="sampled")
    with pytest.raises(ValueError, match=r"offset must be \(1, 18, 4, 4\)"):
        block([torch.randn(1, 16, 7, 7), torch.randn(1, 16, 3, 3)])
