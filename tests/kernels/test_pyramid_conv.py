"""kernels.pyramid_conv2d (one convolution of a canvas holding every level) against F.conv2d level by level,
in float64 as the truth. Runs under TRITON_INTERPRET=1 on the CPU, compiled on a GPU (half precision there)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from kernels import pyramid_conv2d
from kernels.pyramid_conv import canvas_layout, canvas_to_levels, levels_to_canvas, plan_canvas
from kernels.runtime import INTERPRET

DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
needs_kernels = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET,
                                   reason="the kernels need a GPU or TRITON_INTERPRET=1")

# A DyHead pyramid (each level ceil(previous / 2)), one of odd sizes in no order, and a single level.
PYRAMID = [(9, 13), (5, 7), (3, 4), (2, 2), (1, 1)]
ODD = [(3, 11), (7, 2), (1, 5)]
COCO = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
# A canvas 64 wide: four column blocks of the interpreter's BLOCK_W (16) per row, where the others' fit in two.
WIDE = [(2, 42), (1, 21)]


def _reference(xs, weight, bias=None):
    padding = (weight.shape[2] // 2, weight.shape[3] // 2)
    return torch.cat([F.conv2d(x, weight, bias, padding=padding).reshape(-1) for x in xs])


def _inputs(sizes, n=2, cin=5, cout=7, k=(3, 3), bias=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, cin, h, w, generator=g, dtype=dtype) for h, w in sizes]
    weight = torch.randn(cout, cin, *k, generator=g, dtype=dtype)
    b = torch.randn(cout, generator=g, dtype=dtype) if bias else None
    return xs, weight, b


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("sizes", [PYRAMID, ODD, COCO, [(4, 6)]])
@pytest.mark.parametrize("gaps", [(1, 1), (2, 0), (0, 3)])
def test_layout_keeps_levels_apart_by_the_gaps(sizes, gaps):
    origins, height, width = canvas_layout(tuple(sizes), *gaps)
    boxes = [(y0, x0, y0 + h, x0 + w) for (y0, x0), (h, w) in zip(origins, sizes)]
    for y0, x0, y1, x1 in boxes:
        assert 0 <= y0 and 0 <= x0 and y1 <= height and x1 <= width
    for (ay0, ax0, ay1, ax1), (by0, bx0, by1, bx1) in itertools.combinations(boxes, 2):
        apart_rows = ay1 + gaps[0] <= by0 or by1 + gaps[0] <= ay0
        apart_cols = ax1 + gaps[1] <= bx0 or bx1 + gaps[1] <= ax0
        assert apart_rows or apart_cols
    # No row or column past the levels: the canvas ends where they do.
    assert max(y1 for _, _, y1, _ in boxes) == height and max(x1 for _, _, _, x1 in boxes) == width


def test_coco_canvas_wastes_little():
    _, height, width = canvas_layout(tuple(COCO), 1, 1)
    assert height * width <= 1.15 * sum(h * w for h, w in COCO)


@needs_kernels
@pytest.mark.parametrize("sizes", [PYRAMID, WIDE], ids=["pyramid", "wide"])
def test_canvas_holds_the_levels_and_zeros_between(sizes):
    n, c = 2, 3
    plan = plan_canvas(sizes, n, (1, 1), torch.device(DEVICE))
    xs = [torch.rand(n, c, h, w, dtype=torch.float64, device=DEVICE) + 1 for h, w in sizes]
    flat = torch.cat([x.reshape(-1) for x in xs])
    canvas = levels_to_canvas(flat, plan, c)
    expected = torch.zeros(n, c, plan.height, plan.width, dtype=torch.float64, device=DEVICE)
    for x, (y0, x0) in zip(xs, plan.origins):
        expected[:, :, y0:y0 + x.shape[2], x0:x0 + x.shape[3]] = x
    assert torch.equal(canvas, expected)
    assert torch.equal(canvas_to_levels(canvas, plan), flat)
    # Any strides on the canvas side (a convolution's gradient may come channels-last).
    assert torch.equal(canvas_to_levels(canvas.contiguous(memory_format=torch.channels_last), plan), flat)


@needs_kernels
@pytest.mark.parametrize("sizes,k,bias", [(PYRAMID, (3, 3), True), (ODD, (3, 3), False), (PYRAMID, (1, 5), True),
                                          ([(6, 5)], (3, 3), True)])
def test_matches_conv2d_per_level_with_all_gradients(sizes, k, bias):
    xs, weight, b = _inputs(sizes, k=k, bias=bias)
    xs = [x.to(DEVICE).requires_grad_() for x in xs]
    params = [t.to(DEVICE).requires_grad_() for t in (weight, b) if t is not None]
    out = pyramid_conv2d(xs, *params)
    expected = _reference(xs, *params)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, xs + params, grad)
    want = torch.autograd.grad(expected, xs + params, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@needs_kernels
def test_one_level_needing_a_gradient_given_a_strided_one():
    """Only one level needs a gradient (neither the weight nor the others do), and the output's gradient comes
    strided (every other element of a larger tensor): that level gets F.conv2d's gradient."""
    xs, weight, bias = _inputs(PYRAMID[:3])
    xs = [x.to(DEVICE).requires_grad_(l == 1) for l, x in enumerate(xs)]
    weight, bias = weight.to(DEVICE), bias.to(DEVICE)
    out = pyramid_conv2d(xs, weight, bias)
    grad = torch.randn(2 * out.numel(), generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(DEVICE)[::2]
    (got,) = torch.autograd.grad(out, xs[1], grad)
    (want,) = torch.autograd.grad(_reference(xs, weight, bias), xs[1], grad)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@needs_kernels
def test_empty_batch_as_conv2d_and_an_empty_level_refused_as_by_it():
    """No images: F.conv2d's empty outputs and zero gradients. A level of no pixels: F.conv2d's error (its padded
    size is below the kernel's), not a convolution of the canvas around it."""
    xs, weight, bias = _inputs(PYRAMID[:2], n=0)
    leaves = [t.to(DEVICE).requires_grad_() for t in (*xs, weight, bias)]
    out = pyramid_conv2d(leaves[:-2], *leaves[-2:])
    expected = _reference(leaves[:-2], *leaves[-2:])
    assert out.shape == expected.shape == (0,)
    for g, w in zip(torch.autograd.grad(out, leaves, out), torch.autograd.grad(expected, leaves, expected)):
        assert torch.equal(g, w)
    xs, weight, bias = _inputs([(4, 5), (0, 3)])
    with pytest.raises(RuntimeError, match="Kernel size"):
        pyramid_conv2d([x.to(DEVICE) for x in xs], weight.to(DEVICE), bias.to(DEVICE))


@needs_kernels
def test_differentiating_the_gradients_raises():
    """The backward is written without autograd: a gradient penalty that differentiates it must raise rather
    than get no graph (and train without its terms)."""
    xs, weight, bias = _inputs(PYRAMID[:2])
    xs = [x.to(DEVICE).requires_grad_() for x in xs]
    out = pyramid_conv2d(xs, weight.to(DEVICE).requires_grad_(), bias.to(DEVICE))
    grads = torch.autograd.grad(out.square().sum(), xs, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        sum(g.square().sum() for g in grads).backward()


@needs_kernels
def test_views_of_one_buffer_get_one_gradient():
    # A DyHead block's output levels are views of one buffer: read in place, its gradient one tensor.
    xs, weight, bias = _inputs(PYRAMID, dtype=torch.float32)
    buffer = torch.cat([x.reshape(-1) for x in xs]).to(DEVICE).requires_grad_()
    views = [part.view(x.shape) for part, x in zip(buffer.split([x.numel() for x in xs]), xs)]
    weight, bias = weight.to(DEVICE), bias.to(DEVICE)
    out = pyramid_conv2d(views, weight, bias)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, buffer, grad)
    assert got.grad_fn is None and got.is_contiguous()
    separate = [x.to(DEVICE).double().requires_grad_() for x in xs]
    expected = _reference(separate, weight.double(), bias.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(expected, separate, grad.double())])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_leaf_views_of_a_buffer_without_grad_get_their_own_gradients():
    # levels made leaves from views of one plain buffer: the buffer is no path to their gradients
    xs, weight, bias = _inputs(PYRAMID)
    buffer = torch.cat([x.reshape(-1) for x in xs]).to(DEVICE)
    views = [part.view(x.shape).requires_grad_() for part, x in zip(buffer.split([x.numel() for x in xs]), xs)]
    weight, bias = weight.to(DEVICE), bias.to(DEVICE)
    out = pyramid_conv2d(views, weight, bias)
    grad = torch.randn_like(out)
    separate = [x.to(DEVICE).requires_grad_() for x in xs]
    expected = _reference(separate, weight, bias)
    for g, w in zip(torch.autograd.grad(out, views, grad), torch.autograd.grad(expected, separate, grad)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@needs_kernels
def test_non_leaf_views_of_a_buffer_get_their_own_gradients():
    # levels that are views of another op's output: autograd.grad with respect to them, and to that op's input
    xs, weight, bias = _inputs(PYRAMID)
    leaf = torch.cat([x.reshape(-1) for x in xs]).to(DEVICE).requires_grad_()
    views = [part.view(x.shape) for part, x in zip((leaf * 2.0).split([x.numel() for x in xs]), xs)]
    weight, bias = weight.to(DEVICE), bias.to(DEVICE)
    out = pyramid_conv2d(views, weight, bias)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [*views, leaf], grad, retain_graph=True)
    want = torch.autograd.grad(_reference(views, weight, bias), [*views, leaf], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@needs_kernels
def test_views_of_one_buffer_out_of_level_order():
    """Levels that are views of one buffer but not level after level in it (here the coarser level first): the
    canvas is written from a buffer read as the levels in turn, so such views must be gathered in level order,
    forward and for the backward's canvas, not read in place."""
    xs, weight, bias = _inputs(PYRAMID[:3], n=1, cin=3, cout=4)
    order = [2, 0, 1]  # the levels' order in the buffer
    buffer = torch.cat([xs[l].reshape(-1) for l in order]).to(DEVICE).requires_grad_()
    parts = dict(zip(order, buffer.split([xs[l].numel() for l in order])))
    views = [parts[l].view(x.shape) for l, x in enumerate(xs)]
    params = [weight.to(DEVICE).requires_grad_(), bias.to(DEVICE).requires_grad_()]
    out = pyramid_conv2d(views, *params)
    expected = _reference(views, *params)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(DEVICE)
    for g, w in zip(torch.autograd.grad(out, [buffer, *params], grad),
                    torch.autograd.grad(expected, [buffer, *params], grad)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@needs_kernels
def test_contiguous_views_of_a_buffer_laid_out_otherwise():
    """Levels that are contiguous views of a tensor that is not (a column of a column-major one): that tensor is
    no flat run of the levels, so they must be gathered, not read through it."""
    xs, weight, bias = _inputs(PYRAMID[:2], n=1, cin=3, cout=4)
    numels = [x.numel() for x in xs]
    buffer = torch.empty_strided((sum(numels), 2), (1, sum(numels)), dtype=torch.float64, device=DEVICE)
    views = [part.view(x.shape) for part, x in zip(buffer[:, 0].split(numels), xs)]
    for view, x in zip(views, xs):
        view.copy_(x)
    assert all(view.is_contiguous() and view._base is buffer for view in views) and not buffer.is_contiguous()
    out = pyramid_conv2d(views, weight.to(DEVICE), bias.to(DEVICE))
    torch.testing.assert_close(out, _reference([x.to(DEVICE) for x in xs], weight.to(DEVICE), bias.to(DEVICE)),
                               rtol=1e-12, atol=1e-12)


@needs_kernels
def test_keeps_no_canvas_for_the_backward():
    # The canvas is written again in the backward: what is kept is the weight and the inputs themselves.
    xs, weight, bias = _inputs(PYRAMID)
    xs = [x.to(DEVICE).requires_grad_() for x in xs]
    weight, bias = weight.to(DEVICE).requires_grad_(), bias.to(DEVICE).requires_grad_()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = pyramid_conv2d(xs, weight, bias)
    assert {t.untyped_storage().data_ptr() for t in kept} == {t.data_ptr() for t in [weight, *xs]}
    got = torch.autograd.grad(out, xs + [weight, bias], torch.ones_like(out))
    want = torch.autograd.grad(_reference(xs, weight, bias), xs + [weight, bias], torch.ones_like(out))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@needs_kernels
def test_autocast_convolves_in_half_precision():
    """Under autocast the canvas and the convolution are in float16 (the CPU interpreter's bfloat16 is broken), as
    `F.conv2d` level by level under autocast; the float32 leaves get float32 gradients."""
    xs, weight, bias = _inputs(PYRAMID, cin=8, cout=6, dtype=torch.float32)
    xs = [x.to(DEVICE).requires_grad_() for x in xs]
    params = [weight.to(DEVICE).requires_grad_(), bias.to(DEVICE).requires_grad_()]
    with torch.autocast(DEVICE, dtype=torch.float16):
        out = pyramid_conv2d(xs, *params)
        expected = _reference(xs, *params)
    assert out.dtype == expected.dtype == torch.float16
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = torch.autograd.grad(out, xs + params, grad)
    want = torch.autograd.grad(expected, xs + params, grad)
    exact = [t.detach().double().requires_grad_() for t in xs + params]
    truth = torch.autograd.grad(_reference(exact[:-2], *exact[-2:]), exact, grad.double())
    for name, g, w, t in zip([f"level {i}" for i in range(len(xs))] + ["weight", "bias"], got, want, truth):
        assert g.dtype == torch.float32
        # Half-precision sums of thousands of products: as close to the float64 truth as F.conv2d's (an
        # element-wise bound flaked on one weight element, both results a few fp16 roundings off).
        err, reference_err = rel_err(g, t), rel_err(w, t)
        assert err <= 2 * reference_err + 1e-4, (name, err, reference_err)


@needs_kernels
def test_autocast_leaves_float64_alone_and_refuses_mixed_levels():
    """autocast casts no float64 (F.conv2d under it convolves float64 as float64): neither does the canvas. The
    levels share one buffer, so under autocast too levels of two dtypes are refused."""
    xs, weight, bias = _inputs(PYRAMID[:2], n=1, cin=3, cout=4)
    with torch.autocast(DEVICE, dtype=torch.float16):
        out = pyramid_conv2d(xs, weight, bias)
        with pytest.raises(TypeError, match=r"^inputs\[1\]"):
            pyramid_conv2d([xs[0].float(), xs[1]], weight.float(), bias.float())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _reference(xs, weight, bias), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(DEVICE != "cuda", reason="half precision needs a GPU (the interpreter's is not trustworthy)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_the_gpu(dtype):
    xs, weight, bias = _inputs(COCO, cin=32, cout=27, dtype=torch.float64)
    out = pyramid_conv2d([x.to(DEVICE, dtype) for x in xs], weight.to(DEVICE, dtype), bias.to(DEVICE, dtype))
    assert out.dtype == dtype
    expected = _reference([x.to(DEVICE, dtype).double() for x in xs], weight.to(DEVICE, dtype).double(),
                          bias.to(DEVICE, dtype).double())
    error = (out.double() - expected).norm() / expected.norm()
    assert error < (4e-3 if dtype == torch.float16 else 2e-2)


@pytest.mark.parametrize("case,error,name", [
    (lambda xs, w, b: ([], w, b), TypeError, "inputs"),
    (lambda xs, w, b: (xs[0], w, b), TypeError, "inputs"),  # a tensor, not a list of them
    (lambda xs, w, b: ([xs[0], "x"], w, b), TypeError, r"inputs\[1\]"),
    (lambda xs, w, b: (xs, w[:, :, :2], b), ValueError, "weight"),  # even kernel height
    (lambda xs, w, b: (xs, w[:, :, :, :2], b), ValueError, "weight"),  # even kernel width
    (lambda xs, w, b: (xs, w[0], b), ValueError, "weight"),  # not 4-D
    (lambda xs, w, b: (xs, w[:, :3], b), ValueError, r"inputs\[0\]"),  # weight channels != input channels
    (lambda xs, w, b: ([xs[0][:, :, 0]], w, b), ValueError, r"inputs\[0\]"),  # (N, Cin, W): not 4-D
    (lambda xs, w, b: ([xs[0], xs[1][:1]], w, b), ValueError, r"inputs\[1\]"),  # batch sizes differ
    (lambda xs, w, b: (xs, w, b[:3]), ValueError, "bias"),
    (lambda xs, w, b: ([xs[0].long()], w, b), TypeError, r"inputs\[0\]"),
    (lambda xs, w, b: (xs, w.to("meta"), b), ValueError, "weight"),  # devices differ
    (lambda xs, w, b: (xs, "w", b), TypeError, "weight"),
    (lambda xs, w, b: ([xs[0], xs[1].double()], w, b), TypeError, r"inputs\[1\]"),  # torch.cat would promote
    (lambda xs, w, b: (xs, w.double(), b), TypeError, "weight"),
])
def test_bad_input_names_the_argument(case, error, name):
    xs, weight, bias = _inputs(PYRAMID[:2], dtype=torch.float32)
    with pytest.raises(error, match=f"^{name}"):
        pyramid_conv2d(*case(xs, weight, bias))
