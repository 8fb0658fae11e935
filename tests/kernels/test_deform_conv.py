"""kernels.modulated_deform_conv2d against torchvision.ops.deform_conv2d in float64 (the truth).

The kernel tests run the Triton kernels on the CPU under the interpreter (CI sets TRITON_INTERPRET=1 before
pytest starts: triton reads it at import) or, without it, on a CUDA GPU. Input checks run everywhere.
"""

import numpy as np
import pytest
import torch
import torchvision
from deform_conv_cases import (DEVICE, INTERPRET, DyConvLike, grad_out_like, grads, leaves, make_inputs, needs_kernels,
                               reference, rel_err, triton_op)

from kernels import deform_conv, deform_conv_op, modulated_deform_conv2d


def check(inputs, conv, dtype=torch.float32, tol=1e-5, deterministic=None):
    """Output and all gradients of the Triton op within tol (relative norm) of float64 torchvision."""
    ref = leaves(inputs, torch.float64, "cpu")
    y_ref = reference(ref, conv)
    g_out = grad_out_like(y_ref)
    g_ref = grads(y_ref, g_out, ref)
    out = leaves(inputs, dtype, DEVICE)
    y = triton_op(out, conv, deterministic)
    g = grads(y, g_out.to(DEVICE), out)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) < tol, rel_err(y, y_ref)
    for name, expected in g_ref.items():
        assert g[name].shape == expected.shape and g[name].dtype == dtype, name
        assert rel_err(g[name], expected) < tol, (name, rel_err(g[name], expected))


# (N, Cin, Cout, H, W) and conv arguments. Channel counts straddle the interpreter's 16-wide blocks and are not
# multiples of any GPU block; sizes are odd.
CASES = {
    "stride1": ((2, 5, 7, 7, 9), dict(stride=1, padding=1, dilation=1), True),
    "stride2_no_bias": ((2, 18, 17, 9, 7), dict(stride=2, padding=1, dilation=1), False),
    "k2x3_dilated": ((3, 6, 5, 5, 7), dict(stride=(1, 2), padding=(1, 2), dilation=(2, 1)), True),
}


@needs_kernels
@pytest.mark.parametrize("case", CASES.keys())
def test_fp32_matches_torchvision(case):
    shape, conv, bias = CASES[case]
    k = (2, 3) if case == "k2x3_dilated" else 3
    check(make_inputs(*shape, k=k, bias=bias, **conv), conv)


@needs_kernels
def test_fp32_deterministic_matches_torchvision():
    conv = dict(stride=2, padding=1, dilation=1)
    check(make_inputs(2, 18, 6, 9, 7, **conv), conv, deterministic=True)


@needs_kernels
@pytest.mark.parametrize("deterministic", [False, True])
def test_fp64_is_exact(deterministic):
    conv = dict(stride=1, padding=1, dilation=1)
    check(make_inputs(2, 6, 5, 7, 6, **conv), conv, dtype=torch.float64, tol=1e-12, deterministic=deterministic)


@needs_kernels
@pytest.mark.parametrize("deterministic", [False, True])
def test_samples_on_pixels_take_torchvision_one_sided_gradients(deterministic):
    """Integer offsets put every sample on a pixel, a kink of the bilinear blend: the offset gradient there is
    torchvision's (the cell to the lower right), also at y = -1 or x = -1, where zero offsets with padding 1 put
    every border tap and the sample reads 0 but its offset gradient does not vanish."""
    conv = dict(stride=1, padding=1, dilation=1)
    inputs = make_inputs(2, 5, 4, 6, 7, **conv)
    inputs["offset"] = torch.randint(-2, 3, inputs["offset"].shape, generator=torch.Generator().manual_seed(2))
    inputs["offset"][0] = 0
    check(inputs, conv, dtype=torch.float64, tol=1e-12, deterministic=deterministic)
    check(inputs, conv, deterministic=deterministic)


@needs_kernels
@pytest.mark.parametrize("deterministic", [False, True])
def test_nan_offsets_and_masks_make_their_output_pixels_nan(deterministic):
    """A NaN offset or mask makes its output pixel NaN in every channel, also where the sample lies outside the
    image, as torchvision's NaN bilinear weights do on CUDA (its CPU kernel crashes on NaN offsets): a diverging
    offset conv must reach the loss. A NaN offset reads no pixel; +-inf offsets are samples outside the image.
    Everything else is torchvision's result with the NaN samples dropped (offset far out, mask 0) and the
    infinite offsets finite and far out (where torchvision's CPU kernel gives the other coordinate's gradient
    NaN, not 0)."""
    conv = dict(stride=1, padding=1, dilation=1)
    t = make_inputs(1, 3, 4, 5, 6, **conv)
    nan, inf = float("nan"), float("inf")
    t["offset"][0, 0, 1, 1] = nan  # dy of tap 0
    t["offset"][0, 5, 2, 3] = nan  # dx of tap 2
    t["offset"][0, 14:16, 4, 5] = 50.0  # tap 7 outside the image, with a NaN mask
    t["mask"][0, 7, 4, 5] = nan
    t["offset"][0, 8:10, 3, 0] = torch.tensor([0.25, 0.5])  # tap 4 at (3.25, 0.5), with a NaN mask
    t["mask"][0, 4, 3, 0] = nan
    t["offset"][0, 1, 0, 2] = inf
    t["offset"][0, 2, 3, 3] = -inf
    poisoned_pixels = [(1, 1), (2, 3), (4, 5), (3, 0)]
    ref = {k: v.clone() for k, v in t.items()}
    ref["offset"] = torch.where(ref["offset"].isfinite(), ref["offset"], 50.0)
    ref["mask"] = torch.where(ref["mask"].isnan(), 0.0, ref["mask"])
    ref = leaves(ref, torch.float64, "cpu")
    y_ref = reference(ref, conv)
    g_out = grad_out_like(y_ref)
    for y, x in poisoned_pixels:
        g_out[0, :, y, x] = 0.0
    g_ref = grads(y_ref, g_out, ref)

    ours = leaves(t, torch.float64, DEVICE)
    y = triton_op(ours, conv, deterministic)
    g = grads(y, g_out.to(DEVICE), ours)
    y, g = y.detach().cpu(), {k: v.cpu() for k, v in g.items()}
    expected_nan = torch.zeros_like(y, dtype=torch.bool)
    for yy, xx in poisoned_pixels:
        expected_nan[0, :, yy, xx] = True
    assert torch.equal(y.isnan(), expected_nan)
    torch.testing.assert_close(y[~expected_nan], y_ref[~expected_nan].detach(), rtol=1e-12, atol=1e-12)

    # The NaN mask inside the image weighs its 4 corners with NaN; the other NaN samples read nothing.
    input_nan = torch.zeros_like(g["input"], dtype=torch.bool)
    input_nan[0, :, 3:5, 0:2] = True
    assert torch.equal(g["input"].isnan(), input_nan)
    torch.testing.assert_close(g["input"][~input_nan], g_ref["input"][~input_nan], rtol=1e-12, atol=1e-12)
    # The weights of the poisoned taps see NaN samples (times a zero output gradient).
    weight_nan = torch.zeros_like(g["weight"], dtype=torch.bool)
    for tap in (0, 2, 7, 4):
        weight_nan[:, :, tap // 3, tap % 3] = True
    assert torch.equal(g["weight"].isnan(), weight_nan)
    torch.testing.assert_close(g["weight"][~weight_nan], g_ref["weight"][~weight_nan], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g["bias"], g_ref["bias"], rtol=1e-12, atol=1e-12)
    for name, taps in (("offset", 2), ("mask", 1)):
        sample = torch.ones_like(g[name], dtype=torch.bool)
        for (yy, xx), tap in zip(poisoned_pixels, (0, 2, 7, 4)):
            sample[0, taps * tap:taps * (tap + 1), yy, xx] = False
        torch.testing.assert_close(g[name][sample], g_ref[name][sample], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("allow_tf32, dot", [(False, "ieee"), (True, "tf32")])
def test_fp32_products_follow_torch_tf32_switch(allow_tf32, dot):
    """Forward and backward both take their fp32 `tl.dot` precision from torch's matmul TF32 switch."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        assert deform_conv.launch_flags(torch.zeros(1))["DOT"] == dot
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert deform_conv.launch_flags(torch.zeros(1, dtype=torch.float64))["FP64"]


@pytest.mark.parametrize("matmul, everything, dot", [("tf32", "none", "tf32"), ("ieee", "none", "ieee"),
                                                     ("none", "tf32", "tf32")])
def test_fp32_products_follow_torch_precision_api(matmul, everything, dot, fp32_precision):
    """The same through torch's newer switch, after which reading the legacy allow_tf32 raises."""
    torch.backends.fp32_precision = everything
    torch.backends.cuda.matmul.fp32_precision = matmul
    assert deform_conv.launch_flags(torch.zeros(1))["DOT"] == dot


@needs_kernels
@pytest.mark.parametrize("wanted", [("input",), ("offset",), ("mask", "weight"), ("bias",)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_only_wanted_gradients(wanted, deterministic):
    """Gradients autograd does not ask for are skipped; the others stay exact."""
    conv = dict(stride=1, padding=1, dilation=1)
    inputs = make_inputs(2, 5, 4, 6, 5, **conv)
    ref = leaves(inputs, torch.float64, "cpu")
    y_ref = reference(ref, conv)
    g_ref = grads(y_ref, grad_out_like(y_ref), ref)
    t = leaves(inputs, torch.float32, DEVICE, wanted)
    y = triton_op(t, conv, deterministic)
    g = grads(y, grad_out_like(y).to(DEVICE), {k: t[k] for k in wanted})
    for name in wanted:
        assert rel_err(g[name], g_ref[name]) < 1e-5, name


def sliced_and_quirk_inputs(quirk, dtype, device):
    """Offset and mask as channel slices of one 27-channel tensor om, or as the official quirk's views.

    The quirk: the offset conv ran at the finer level (H, W); the coarser level (Hc, Wc) reads the first
    Hc*Wc elements of every channel plane, i.e. om.as_strided((N, 18, Hc, Wc), (27*H*W, Hc*Wc, Wc, 1)).
    """
    gen = torch.Generator().manual_seed(3)
    n, cin, cout, (h, w), (hc, wc) = 2, 6, 5, (8, 9), (4, 5)
    size = (hc, wc) if quirk else (h, w)
    om = (2.5 * torch.randn(n, 27, h, w, generator=gen, dtype=torch.float64)).to(device, dtype).requires_grad_()
    m = torch.rand(n, 9, h, w, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
    x = torch.randn(n, cin, *size, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
    weight = torch.randn(cout, cin, 3, 3, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
    if quirk:
        offset = om.as_strided((n, 18, hc, wc), (27 * h * w, hc * wc, wc, 1), om.storage_offset())
        mask = m.as_strided((n, 9, hc, wc), (9 * h * w, hc * wc, wc, 1))
        return {"x": x, "weight": weight, "om": om, "m": m}, offset, mask
    return {"x": x, "weight": weight, "om": om}, om[:, :18], om[:, 18:]


@needs_kernels
@pytest.mark.parametrize("quirk", [False, True], ids=["slice", "quirk_view"])
def test_strided_offset_and_mask(quirk):
    ref, off_ref, mask_ref = sliced_and_quirk_inputs(quirk, torch.float64, "cpu")
    out, off, mask = sliced_and_quirk_inputs(quirk, torch.float32, DEVICE)
    assert not off.is_contiguous() and not mask.is_contiguous()
    y_ref = torchvision.ops.deform_conv2d(ref["x"], off_ref, ref["weight"], padding=1, mask=mask_ref)
    y = modulated_deform_conv2d(out["x"], off, mask, out["weight"])
    g_out = grad_out_like(y_ref)
    g_ref = grads(y_ref, g_out, ref)
    g = grads(y, g_out.to(DEVICE), out)
    assert rel_err(y, y_ref) < 1e-5
    for name in ref:
        assert rel_err(g[name], g_ref[name]) < 1e-5, name


@needs_kernels
def test_channels_last_and_expanded_grad_out():
    """Input and weight in channels-last memory, and an output gradient with zero strides."""
    conv = dict(stride=1, padding=1, dilation=1)
    inputs = make_inputs(2, 5, 3, 6, 7, **conv)
    ref = leaves(inputs, torch.float64, "cpu")
    t = leaves(inputs, torch.float32, DEVICE)
    x = t["input"].to(memory_format=torch.channels_last)
    w = t["weight"].to(memory_format=torch.channels_last)
    y = modulated_deform_conv2d(x, t["offset"], t["mask"], w, t["bias"], **conv)
    y_ref = reference(ref, conv)
    g = torch.autograd.grad(y.sum(), list(t.values()))
    g_ref = torch.autograd.grad(y_ref.sum(), list(ref.values()))
    assert rel_err(y, y_ref) < 1e-5
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) < 1e-5


@needs_kernels
def test_bias_that_is_a_strided_view():
    """A bias sliced from a larger tensor (stride 2): the kernel read it as contiguous, so the output added
    other elements of the base as bias (its gradient was right)."""
    t = leaves(make_inputs(1, 4, 3, 5, 5), torch.float64, DEVICE)
    pairs = torch.stack([t["bias"], -10 * t["bias"]], 1)  # (Cout, 2): column 0 is a bias of stride 2
    out = modulated_deform_conv2d(t["input"], t["offset"], t["mask"], t["weight"], pairs[:, 0])
    expected = torchvision.ops.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], padding=1, mask=t["mask"])
    torch.testing.assert_close(out, expected)


@needs_kernels
def test_deterministic_gradients_are_bitwise_equal():
    conv = dict(stride=1, padding=1, dilation=1)
    t = leaves(make_inputs(2, 7, 5, 7, 7, **conv), torch.float32, DEVICE)
    y = triton_op(t, conv, deterministic=True)
    g_out = grad_out_like(y).to(DEVICE)
    first = grads(triton_op(t, conv, deterministic=True), g_out, t)
    second = grads(triton_op(t, conv, deterministic=True), g_out, t)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@needs_kernels
def test_custom_op_matches_eager_path():
    """The custom ops (what torch.compile traces) compute what the eager autograd.Function computes."""
    conv = dict(stride=1, padding=1, dilation=1)
    t = leaves(make_inputs(2, 5, 4, 6, 5, **conv), torch.float32, DEVICE)
    y = triton_op(t, conv, deterministic=True)
    y_op = deform_conv_op._forward_op(t["input"], t["offset"], t["mask"], t["weight"], t["bias"],
                                      1, 1, 1, 1, 1, 1, True)
    g_out = grad_out_like(y).to(DEVICE)
    assert torch.equal(y, y_op)
    g, g_op = grads(y, g_out, t), grads(y_op, g_out, t)
    for name in g:
        assert torch.equal(g[name], g_op[name]), name


@needs_kernels
@pytest.mark.parametrize("loss", ["linear", "square"])
def test_double_backward_raises(loss):
    """A gradient penalty differentiates the input gradient again, which the backward does not support: it must
    raise, as torchvision's op and the traced path do. A loss linear in the output gives the backward an output
    gradient that needs no grad, yet the input gradient depends on the weight: the penalty's terms were dropped
    silently."""
    conv = dict(stride=1, padding=1, dilation=1)
    t = leaves(make_inputs(1, 3, 2, 4, 4, **conv), torch.float32, DEVICE)
    y = triton_op(t, conv)
    out = y.sum() if loss == "linear" else y.square().sum()
    g = torch.autograd.grad(out, t["input"], create_graph=True)[0]
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(out + g.square().sum(), t["weight"])


@needs_kernels
@pytest.mark.parametrize("path", ["eager", "custom_op"])
def test_output_takes_in_place_ops(path):
    """torchvision's output may be modified in place under autograd (an in-place activation, a residual added
    with +=): it must be no view that autograd forbids modifying, on either path."""
    conv = dict(stride=1, padding=1, dilation=1)
    inputs = make_inputs(2, 4, 3, 5, 6, **conv)
    ref = leaves(inputs, torch.float64, "cpu")
    y_ref = reference(ref, conv).relu_()
    assert 0 < (y_ref > 0).sum() < y_ref.numel()
    t = leaves(inputs, torch.float64, DEVICE)
    if path == "eager":
        y = triton_op(t, conv)
    else:
        y = deform_conv_op._forward_op(t["input"], t["offset"], t["mask"], t["weight"], t["bias"], 1, 1, 1, 1, 1, 1,
                                       False)
    y.relu_()
    g_out = grad_out_like(y_ref)
    g, g_ref = grads(y, g_out.to(DEVICE), t), grads(y_ref, g_out, ref)
    assert rel_err(y, y_ref) < 1e-12
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) < 1e-12, name


@needs_kernels
def test_deterministic_default_follows_torch(monkeypatch):
    seen = []
    backward = deform_conv_op.deform_conv_backward.deform_conv_backward
    monkeypatch.setattr(deform_conv_op.deform_conv_backward, "deform_conv_backward",
                        lambda *args: seen.append(args[8]) or backward(*args))
    conv = dict(stride=1, padding=1, dilation=1)
    t = leaves(make_inputs(1, 3, 2, 4, 4, **conv), torch.float32, DEVICE)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        for flag in (True, False):
            torch.use_deterministic_algorithms(flag)
            triton_op(t, conv).sum().backward()
    finally:
        torch.use_deterministic_algorithms(was)
    assert seen == [True, False]


@needs_kernels
def test_autocast_runs_in_half_precision():
    """float32 tensors under autocast go to the kernels in float16 (the CPU interpreter's bfloat16 is broken)."""
    conv = dict(stride=1, padding=1, dilation=1)
    # Rounded to float16 first: a rounded offset may move a sample across a pixel border, where the offset
    # gradient jumps.
    inputs = {k: v.half().double() for k, v in make_inputs(2, 5, 4, 6, 6, **conv).items()}
    t = leaves(inputs, torch.float32, DEVICE)
    y32 = triton_op(t, conv)
    g32 = grads(y32, torch.ones_like(y32), t)
    with torch.autocast(DEVICE, dtype=torch.float16):
        y = triton_op(t, conv)
    g = grads(y, torch.ones_like(y), t)
    assert y.dtype == torch.float16
    assert rel_err(y, y32.double().cpu()) < 5e-3
    for name in g32:
        assert g[name].dtype == torch.float32 and rel_err(g[name], g32[name].double().cpu()) < 5e-3, name


@needs_kernels
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend):
    """fullgraph=True fails on any graph break; inductor on the CPU needs a C++ compiler (~1 min)."""
    torch.manual_seed(0)
    module = DyConvLike(4).to(DEVICE)
    x = torch.randn(2, 4, 6, 5, device=DEVICE, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    y_eager = module(x)
    g_eager = torch.autograd.grad(y_eager.square().sum(), [x, *module.parameters()])
    y = compiled(x)
    g = torch.autograd.grad(y.square().sum(), [x, *module.parameters()])
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_meta_tensors_give_shapes_forward_and_backward():
    t = {k: v.float().to("meta").requires_grad_() for k, v in make_inputs(2, 3, 4, 7, 6, stride=2).items()}
    y = triton_op(t, dict(stride=2, padding=1, dilation=1))
    assert y.is_meta and tuple(y.shape) == (2, 4, 4, 3)
    y.sum().backward()
    assert all(v.grad.is_meta and v.grad.shape == v.shape for v in t.values())


@needs_kernels
def test_offset_rows_further_apart_than_int32_reaches():
    """An offset view whose rows lie 2**29 elements apart puts the last row past 2**31: the tap addressing is
    int64. The view's storage (8 GiB) is allocated but never touched beyond the few values used."""
    rows = 2**29
    storage = torch.empty(4 * rows + 64, dtype=torch.float32, device=DEVICE)
    offset = storage.as_strided((1, 18, 5, 1), (0, 1, rows, 1))
    gen = torch.Generator().manual_seed(4)
    offset.copy_(0.7 * torch.randn(1, 18, 5, 1, generator=gen))
    x, mask = torch.randn(1, 3, 5, 1, generator=gen), torch.rand(1, 9, 5, 1, generator=gen)
    weight = torch.randn(2, 3, 3, 3, generator=gen)
    y = modulated_deform_conv2d(x.to(DEVICE), offset, mask.to(DEVICE), weight.to(DEVICE))
    y_ref = torchvision.ops.deform_conv2d(x.double(), offset.cpu().double(), weight.double(), padding=1,
                                          mask=mask.double())
    assert rel_err(y, y_ref) < 1e-6


def test_fake_impl_shapes():
    t = {k: v.float() for k, v in make_inputs(2, 3, 4, 7, 6, stride=2).items()}
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) for k, v in t.items()}
        y = triton_op(fake, dict(stride=2, padding=1, dilation=1))
    assert tuple(y.shape) == (2, 4, 4, 3)


@pytest.mark.skipif(INTERPRET, reason="checks the error raised when the interpreter is off")
def test_cpu_without_interpreter_raises():
    t = make_inputs(1, 2, 2, 4, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        modulated_deform_conv2d(t["input"], t["offset"], t["mask"], t["weight"])


def _bad(**change):
    """Float32 CPU inputs for a 3x3, stride-1 conv of a (2, 4, 5, 5) input, with some replaced."""
    t = {k: v.float() for k, v in make_inputs(2, 4, 3, 5, 5).items()}
    t.update(change)
    return t


BAD_INPUTS = {
    "input_rank": (_bad(input=torch.randn(4, 5, 5)), ValueError, "input must be"),
    "weight_rank": (_bad(weight=torch.randn(3, 4, 9)), ValueError, "weight must be"),
    "weight_channels": (_bad(weight=torch.randn(3, 3, 3, 3)), ValueError, r"weight must be \(Cout, 4"),
    "groups": (_bad(weight=torch.randn(3, 2, 3, 3)), NotImplementedError, "grouped"),
    "offset_size": (_bad(offset=torch.randn(2, 18, 4, 5)), ValueError, r"offset must be \(2, 18, 5, 5\)"),
    "offset_batch": (_bad(offset=torch.randn(1, 18, 5, 5)), ValueError, r"offset must be \(2, 18, 5, 5\)"),
    "offset_channels": (_bad(offset=torch.randn(2, 17, 5, 5)), ValueError, r"offset must be \(2, 18, 5, 5\)"),
    "offset_rank": (_bad(offset=torch.randn(2, 18, 25)), ValueError, "offset must be"),
    "offset_groups": (_bad(offset=torch.randn(2, 36, 5, 5)), NotImplementedError, "offset groups"),
    "mask_size": (_bad(mask=torch.randn(2, 9, 5, 6)), ValueError, r"mask must be \(2, 9, 5, 5\)"),
    # the offset says one group: 18 mask channels are a wrong shape, not a second group
    "mask_channels": (_bad(mask=torch.randn(2, 18, 5, 5)), ValueError, r"mask must be \(2, 9, 5, 5\)"),
    "bias_shape": (_bad(bias=torch.randn(4)), ValueError, r"bias must be \(3,\)"),
    "int_input": (_bad(input=torch.ones(2, 4, 5, 5, dtype=torch.int64)), TypeError, "input must be float"),
    "mixed_dtype": (_bad(weight=torch.randn(3, 4, 3, 3, dtype=torch.float64)), TypeError, "weight has dtype"),
    "mask_none": (_bad(mask=None), TypeError, "mask must be a Tensor"),
    "meta_device": (_bad(offset=torch.randn(2, 18, 5, 5, device="meta")), ValueError, "offset is on meta"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.keys())
def test_bad_inputs_raise(case):
    t, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        modulated_deform_conv2d(t["input"], t["offset"], t["mask"], t["weight"], t["bias"])


@pytest.mark.parametrize("cin, cout, w", [(2**15, 2**16, 1), (2**16, 1, 2**15)], ids=["weight", "input_row"])
def test_sizes_past_int32_indexing_raise(cin, cout, w):
    """A 1x1 conv with a weight, or an input row, of 2**31 elements (expanded views: no memory)."""
    x = torch.zeros(1, 1, 1, 1).expand(1, cin, 1, w)
    weight = torch.zeros(1, 1, 1, 1).expand(cout, cin, 1, 1)
    with pytest.raises(ValueError, match="beyond the kernels' int32 indexing"):
        modulated_deform_conv2d(x, torch.zeros(1, 2, 1, w), torch.zeros(1, 1, 1, w), weight, padding=0)


@pytest.mark.parametrize("conv, error", [(dict(stride=0), ValueError), (dict(padding=(1, 2, 3)), TypeError),
                                         (dict(dilation=1.5), TypeError), (dict(padding=-1), ValueError),
                                         (dict(stride=True), TypeError), (dict(padding=np.float64(1)), TypeError),
                                         (dict(dilation=(1, 1.0)), TypeError)])
def test_bad_conv_arguments_raise(conv, error):
    t = _bad()
    with pytest.raises(error):
        modulated_deform_conv2d(t["input"], t["offset"], t["mask"], t["weight"], **conv)


@needs_kernels
def test_integer_like_conv_arguments_act_as_ints():
    """numpy integers (sizes worked out with numpy) and integer 0-d tensors, which torchvision takes: the same
    output as torchvision's, where they raised TypeError."""
    conv = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    t = {k: v.float() for k, v in make_inputs(1, 4, 3, 5, 5, **conv).items()}
    expected = reference(t, conv)
    out = modulated_deform_conv2d(t["input"], t["offset"], t["mask"], t["weight"], t["bias"],
                                  stride=(np.int64(2), 1), padding=(np.int32(1), torch.tensor(2)),
                                  dilation=[np.int16(1), np.uint8(2)])
    torch.testing.assert_close(out, expected)


def test_too_small_input_raises():
    t = _bad()
    with pytest.raises(ValueError, match="smaller than"):
        modulated_deform_conv2d(t["input"], t["offset"], t["mask"], t["weight"], padding=0, dilation=3)


@needs_kernels
def test_deterministic_with_several_channel_and_output_chunks():
    """Deterministic partials over more than one input channel chunk and more than one output channel chunk
    (the interpreter's blocks are 16 wide: 18 in, 20 out): each (channel chunk, output chunk) program has its
    own row of offset and mask partials, and the grad input sums the gcol of every output chunk. Kills keying
    the partial row by the channel chunk alone and gathering only the first output chunk's gcol."""
    conv = dict(stride=1, padding=1, dilation=1)
    check(make_inputs(1, 18, 20, 5, 6, **conv), conv, dtype=torch.float64, tol=1e-12, deterministic=True)
