"""kernels.deform_conv_op.modulated_deform_conv2d_pyramid: one launch over a list of levels, against
torchvision.ops.deform_conv2d in float64 on each level and against the one-level op.

Runs the kernels in the CPU interpreter (TRITON_INTERPRET=1 set before pytest starts) or on a CUDA GPU, as
test_deform_conv.py does; input checks run everywhere. Level sizes are odd and different, so that no level's
pixels fill whole tiles and every level starts mid-buffer.
"""

import pytest
import torch
import torchvision
from deform_conv_cases import (DEVICE, INTERPRET, PyramidConvLike, check_compiled_matches_eager, grad_out_like,
                               make_pyramid, needs_kernels, pyramid_args, pyramid_grads, pyramid_leaves, pyramid_op,
                               pyramid_reference, rel_err)

from kernels import deform_conv_op, modulated_deform_conv2d
from kernels.deform_conv_op import modulated_deform_conv2d_pyramid

SIZES = [(7, 9), (5, 3), (3, 5)]


def check(p, conv, dtype, tol, deterministic):
    """Every level's output and every gradient within tol (relative norm) of float64 torchvision."""
    ref = pyramid_leaves(p, torch.float64, "cpu")
    ys_ref = pyramid_reference(ref, conv)
    g_outs = [grad_out_like(y) for y in ys_ref]
    g_ref = pyramid_grads(ys_ref, g_outs, ref)
    out = pyramid_leaves(p, dtype, DEVICE)
    ys = pyramid_op(out, conv, deterministic)
    g = pyramid_grads(ys, [g.to(DEVICE) for g in g_outs], out)
    assert len(ys) == len(ys_ref)
    for level, (y, y_ref) in enumerate(zip(ys, ys_ref)):
        assert y.dtype == dtype and y.shape == y_ref.shape, level
        assert rel_err(y, y_ref) < tol, (level, rel_err(y, y_ref))
    assert g.keys() == g_ref.keys()
    for name, expected in g_ref.items():
        assert g[name].shape == expected.shape and g[name].dtype == dtype, name
        assert rel_err(g[name], expected) < tol, (name, rel_err(g[name], expected))


# (levels, N, Cin, Cout, stride, bias, dtype, deterministic)
CASES = {
    "1level_fp32": (1, 2, 5, 7, 1, True, torch.float32, False),
    "2levels_stride2_no_bias_det": (2, 1, 18, 5, 2, False, torch.float32, True),
    "3levels_fp32": (3, 2, 5, 7, 1, True, torch.float32, False),
    "3levels_stride2_fp64_det": (3, 1, 6, 5, 2, True, torch.float64, True),
    "2levels_fp64_no_bias": (2, 1, 6, 5, 1, False, torch.float64, False),
    # Two output-channel chunks (the interpreter's blocks are 16 wide) in a grouped launch, whose backward reads
    # dY from its channels-last copy at each chunk's channels.
    "2levels_cout20_fp64": (2, 1, 5, 20, 1, True, torch.float64, False),
}


@needs_kernels
@pytest.mark.parametrize("case", CASES.keys())
def test_matches_torchvision(case):
    levels, n, cin, cout, stride, bias, dtype, deterministic = CASES[case]
    conv = dict(stride=stride, padding=1, dilation=1)
    p = make_pyramid(n, cin, cout, SIZES[:levels], stride=stride, bias=bias)
    check(p, conv, dtype, 1e-5 if dtype == torch.float32 else 1e-12, deterministic)


@needs_kernels
def test_non_square_kernel_with_anisotropic_conv_arguments():
    """A 2x3 kernel with different h and w stride, padding and dilation (as test_deform_conv.py's
    k2x3_dilated case, on two levels): the grouped launch takes each pair in (h, w) order, where the other
    tests' square kernel and padding 1 would not tell h from w. Kills swapping the padding (or dilation) pair
    on its way from the public function to the kernels."""
    conv = dict(stride=(1, 2), padding=(1, 2), dilation=(2, 1))
    check(make_pyramid(1, 3, 4, [(5, 7), (4, 3)], k=(2, 3), **conv), conv, torch.float64, 1e-12,
          deterministic=False)


@needs_kernels
def test_channels_last_inputs():
    """Levels whose inputs are channels-last (NHWC memory, as a channels-last model hands them over) give
    torchvision's outputs and gradients: the grouped launch packs each input through its own strides. Kills
    packing the inputs as if they were NCHW-contiguous (`grouped_input`'s pack rows ignoring the strides)."""
    p = make_pyramid(1, 3, 4, [(4, 5), (3, 3)])
    p["input"] = [x.contiguous(memory_format=torch.channels_last) for x in p["input"]]
    # The leaves keep the layout (copies preserve it), else the test would not test it.
    t = pyramid_leaves(p, torch.float64, DEVICE)
    assert all(not t[f"input{i}"].is_contiguous() for i in range(2))
    check(p, dict(stride=1, padding=1, dilation=1), torch.float64, 1e-12, deterministic=False)


def quirk_pyramid(dtype, device):
    """Leaves and per-level (input, offset, mask) of a 3-level call whose offsets and masks are views:
    level 0 reads channel slices of its offset conv's output om0 (8x9), level 1 (4x5) the official coarser
    quirk's view of the same slices (each image's first 4*5 values of every channel plane, as
    dyhead.spatial.coarser_view builds it), level 2 (2x3) a crop of another output om1 (4x5)."""
    gen = torch.Generator().manual_seed(3)
    n, cin, cout = 2, 6, 5

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device, dtype).requires_grad_()

    t = {"x0": leaf(n, cin, 8, 9), "x1": leaf(n, cin, 4, 5), "x2": leaf(n, cin, 2, 3),
         "om0": leaf(n, 27, 8, 9, scale=2.5), "om1": leaf(n, 27, 4, 5, scale=2.5), "weight": leaf(cout, cin, 3, 3)}

    def quirk(s, k):
        return s.as_strided((n, k, 4, 5), (s.stride(0), 4 * 5, 5, 1), s.storage_offset())

    om0, om1 = t["om0"], t["om1"]
    offsets = [om0[:, :18], quirk(om0[:, :18], 18), om1[:, :18, :2, :3]]
    masks = [om0[:, 18:].sigmoid(), quirk(om0[:, 18:], 9), om1[:, 18:, :2, :3]]
    return t, [t["x0"], t["x1"], t["x2"]], offsets, masks


@needs_kernels
def test_sliced_and_quirk_view_offsets():
    ref, xs_ref, offsets_ref, masks_ref = quirk_pyramid(torch.float64, "cpu")
    out, xs, offsets, masks = quirk_pyramid(torch.float32, DEVICE)
    assert not any(o.is_contiguous() for o in offsets)
    ys_ref = [torchvision.ops.deform_conv2d(x, o, ref["weight"], padding=1, mask=m)
              for x, o, m in zip(xs_ref, offsets_ref, masks_ref)]
    ys = modulated_deform_conv2d_pyramid(xs, offsets, masks, out["weight"])
    g_outs = [grad_out_like(y) for y in ys_ref]
    g_ref = pyramid_grads(ys_ref, g_outs, ref)
    g = pyramid_grads(ys, [g.to(DEVICE) for g in g_outs], out)
    for y, y_ref in zip(ys, ys_ref):
        assert rel_err(y, y_ref) < 1e-5
    for name in ref:
        assert rel_err(g[name], g_ref[name]) < 1e-5, name


@needs_kernels
@pytest.mark.parametrize("deterministic", [False, True])
def test_equals_one_level_op(deterministic):
    """Each level computes what modulated_deform_conv2d computes on it; the weight and bias gradients are the
    sum over the levels (bitwise equal in the interpreter, where both launches run the same tiles)."""
    conv = dict(stride=2, padding=1, dilation=1)
    t = pyramid_leaves(make_pyramid(1, 5, 4, SIZES, stride=2), torch.float32, DEVICE)
    inputs, offsets, masks, weight, bias = pyramid_args(t)
    ys = pyramid_op(t, conv, deterministic)
    ys_one = [modulated_deform_conv2d(x, o, m, weight, bias, **conv, deterministic=deterministic)
              for x, o, m in zip(inputs, offsets, masks)]
    g_outs = [grad_out_like(y).to(DEVICE) for y in ys]
    g, g_one = pyramid_grads(ys, g_outs, t), pyramid_grads(ys_one, g_outs, t)
    same = torch.equal if INTERPRET else lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    for y, y_one in zip(ys, ys_one):
        assert same(y, y_one)
    for name in g:
        if name in ("weight", "bias"):
            torch.testing.assert_close(g[name], g_one[name], rtol=1e-5, atol=1e-6)
        else:
            assert same(g[name], g_one[name]), name


@needs_kernels
def test_deterministic_gradients_are_bitwise_equal():
    conv = dict(stride=1, padding=1, dilation=1)
    t = pyramid_leaves(make_pyramid(1, 4, 3, SIZES), torch.float32, DEVICE)
    g_outs = [grad_out_like(y).to(DEVICE) for y in pyramid_op(t, conv, deterministic=True)]
    first = pyramid_grads(pyramid_op(t, conv, deterministic=True), g_outs, t)
    second = pyramid_grads(pyramid_op(t, conv, deterministic=True), g_outs, t)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@needs_kernels
@pytest.mark.parametrize("wanted", [("input1", "offset1", "mask0", "weight"), ("bias",)])
def test_only_wanted_gradients(wanted):
    """Tensors that do not require grad get none; the others are still exact."""
    conv = dict(stride=1, padding=1, dilation=1)
    p = make_pyramid(1, 4, 3, SIZES[:2])
    ref = pyramid_leaves(p, torch.float64, "cpu")
    ys_ref = pyramid_reference(ref, conv)
    g_ref = pyramid_grads(ys_ref, [grad_out_like(y) for y in ys_ref], ref)
    t = pyramid_leaves(p, torch.float32, DEVICE)
    for name, tensor in t.items():
        tensor.requires_grad_(name in wanted)
    ys = pyramid_op(t, conv)
    g = pyramid_grads(ys, [grad_out_like(y).to(DEVICE) for y in ys], {k: v for k, v in t.items() if k in wanted})
    assert g.keys() == set(wanted)
    for name in g:
        assert rel_err(g[name], g_ref[name]) < 1e-5, name


@needs_kernels
def test_custom_op_matches_eager_path():
    """The custom ops (what torch.compile traces) compute what the eager autograd.Function computes."""
    conv = dict(stride=1, padding=1, dilation=1)
    t = pyramid_leaves(make_pyramid(1, 5, 4, SIZES[1:]), torch.float32, DEVICE)
    ys = pyramid_op(t, conv, deterministic=True)
    inputs, offsets, masks, weight, bias = pyramid_args(t)
    bases, views = deform_conv_op._sample_args(offsets, masks)
    flat = deform_conv_op._sets_forward_op(inputs, bases, [weight], [bias], [0], views, [0, 1], [2], [1, 1], 1, 1,
                                           1, 1, False, True)
    ys_op = [part.view(y.shape) for part, y in zip(flat.split([y.numel() for y in ys]), ys)]
    g_outs = [grad_out_like(y).to(DEVICE) for y in ys]
    g, g_op = pyramid_grads(ys, g_outs, t), pyramid_grads(ys_op, g_outs, t)
    for y, y_op in zip(ys, ys_op):
        assert torch.equal(y, y_op)
    for name in g:
        assert torch.equal(g[name], g_op[name]), name


@needs_kernels
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend):
    """fullgraph=True fails on any graph break; inductor on the CPU needs a C++ compiler."""
    torch.manual_seed(0)
    module = PyramidConvLike(4).to(DEVICE)
    xs = [torch.randn(1, 4, h, w, device=DEVICE, requires_grad=True) for h, w in SIZES[:2]]
    assert check_compiled_matches_eager(module, xs, backend) == 2


@needs_kernels
def test_autocast_runs_in_half_precision():
    """Under autocast every level goes to the kernels in float16, as the one-level op does."""
    conv = dict(stride=1, padding=1, dilation=1)
    t = pyramid_leaves(make_pyramid(1, 3, 2, SIZES[1:]), torch.float32, DEVICE)
    inputs, offsets, masks, weight, bias = pyramid_args(t)
    with torch.autocast(DEVICE, dtype=torch.float16):
        ys = pyramid_op(t, conv)
        ys_one = [modulated_deform_conv2d(x, o, m, weight, bias) for x, o, m in zip(inputs, offsets, masks)]
    for y, y_one in zip(ys, ys_one):
        assert y.dtype == torch.float16 and torch.equal(y, y_one)


def test_fake_impl_shapes():
    p = make_pyramid(2, 3, 4, SIZES, stride=2)
    t = {k: v.float() for k, v in pyramid_leaves(p, torch.float32, "cpu").items()}
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) for k, v in t.items()}
        ys = pyramid_op(fake, dict(stride=2, padding=1, dilation=1))
    assert [tuple(y.shape) for y in ys] == [(2, 4, 4, 5), (2, 4, 3, 2), (2, 4, 2, 3)]


def _bad(level, **change):
    """Float32 CPU args (inputs, offsets, masks, weight) of a 3-level 3x3 stride-1 call, with one level's
    tensors replaced."""
    p = make_pyramid(2, 4, 3, SIZES)
    args = {name: [t.float() for t in p[name]] for name in ("input", "offset", "mask")}
    for name, t in change.items():
        args[name][level] = t
    return args["input"], args["offset"], args["mask"], p["weight"].float()


BAD_INPUTS = {
    "offset_size": (_bad(1, offset=torch.randn(2, 18, 5, 4)), ValueError, r"level 1: offset must be \(2, 18, 5, 3\)"),
    "mask_channels": (_bad(2, mask=torch.randn(2, 18, 3, 5)), ValueError, r"level 2: mask must be \(2, 9, 3, 5\)"),
    "input_channels": (_bad(1, input=torch.randn(2, 5, 5, 3)), ValueError, r"level 1: weight must be \(Cout, 5"),
    "dtype": (_bad(2, input=torch.randn(2, 4, 3, 5, dtype=torch.float64)), TypeError, "level 2: .*dtype"),
    "batch": (_bad(1, input=torch.randn(1, 4, 5, 3), offset=torch.randn(1, 18, 5, 3), mask=torch.rand(1, 9, 5, 3)),
              ValueError, "level 1: input has batch size 1 but level 0 has 2"),
    "mask_none": (_bad(0, mask=None), TypeError, "level 0: mask must be a Tensor"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.keys())
def test_bad_inputs_name_the_level(case):
    (inputs, offsets, masks, weight), error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        modulated_deform_conv2d_pyramid(inputs, offsets, masks, weight)


def test_bad_lists_raise():
    inputs, offsets, masks, weight = _bad(0)
    with pytest.raises(ValueError, match="one entry per level"):
        modulated_deform_conv2d_pyramid(inputs, offsets[:2], masks, weight)
    with pytest.raises(ValueError, match="at least one level"):
        modulated_deform_conv2d_pyramid([], [], [], weight)
    with pytest.raises(TypeError, match="inputs must be a list or tuple"):
        modulated_deform_conv2d_pyramid(inputs[0], offsets[0], masks[0], weight)
