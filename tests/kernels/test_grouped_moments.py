"""kernels.channel_moments_grouped against plain torch expressions in float64.

Under the interpreter a reduction run is a multiple of 32 pixels and, for these batch and channel counts, the
largest map is cut into two runs: the cases cover maps of one run and of several, maps whose pixel count and
start are multiples of the kernels' ALIGN (the wide-load path) and maps that are not, None rows, and pooling
weights.
"""

import pytest
import torch
import torch.nn.functional as F
from deform_conv_cases import DEVICE, needs_kernels, rel_err

from kernels import channel_moments_grouped
from kernels.grouped_moments import ALIGN

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}

N, C = 2, 6
# (H, W) per map; None: a zero row. 8x12 and 10x10 are cut into two runs; 8x12 is the one whose start and
# pixel count are multiples of ALIGN.
SIZES = [(8, 12), None, (10, 10), (3, 5), None, (4, 2), (7, 9)]


def reference(maps, pool_weights):
    """(K, N, C, 3) [mean, M2, pooled] of float64 maps (None: zeros)."""
    n, c = next(m for m in maps if m is not None).shape[:2]
    rows = []
    for m, pair in zip(maps, pool_weights):
        if m is None:
            rows.append(torch.zeros(n, c, 3, dtype=torch.float64))
            continue
        mean = m.mean(dim=(2, 3))
        m2 = (m - mean[..., None, None]).square().sum(dim=(2, 3))
        pooled = mean if pair is None else torch.einsum("nchw,h,w->nc", m, *pair)
        rows.append(torch.stack([mean, m2, pooled], -1))
    return torch.stack(rows)


def buffer_and_maps(sizes, dtype, device, extra=0, seed=0, offset=0.0, n=N, c=C):
    """A flat buffer (requiring grad) and the maps (n, c, H, W) as consecutive NCHW views of it, `extra` elements
    left over at its end."""
    gen = torch.Generator().manual_seed(seed)
    counts = [0 if s is None else n * c * s[0] * s[1] for s in sizes]
    flat64 = (torch.randn(sum(counts) + extra, generator=gen, dtype=torch.float64) + offset).to(dtype).double()
    flat = flat64.to(device, dtype).requires_grad_()

    def views(t):
        parts = t.split([*counts, extra])
        return [None if s is None else p.view(n, c, *s) for p, s in zip(parts, sizes)]

    return flat, views, flat64


def weights_for(sizes, dtype, device, upsampled_to):
    """Pool weights: those of a bilinear upsampling (align_corners=True) to the given size, for the maps named
    in upsampled_to (index -> size), views of one tensor with a NaN after each axis (the kernels may read the
    weights of the maps' pixels only); None for the others."""
    from dyhead.fused import upsampled_mean_weights

    axes = []
    for k, size in upsampled_to.items():
        axes += [upsampled_mean_weights(sizes[k][0], size[0]), upsampled_mean_weights(sizes[k][1], size[1])]
    flat = torch.tensor([w for axis in axes for w in (*axis, float("nan"))], dtype=dtype, device=device)
    views = flat.split([size for axis in axes for size in (len(axis), 1)])[::2]
    pairs = [None] * len(sizes)
    for i, k in enumerate(upsampled_to):
        pairs[k] = (views[2 * i], views[2 * i + 1])
    return pairs


@needs_kernels
@pytest.mark.parametrize("weighted", [False, True], ids=["means", "pooled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_float64(dtype, weighted):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    upsampled_to = {2: (19, 20), 3: (5, 9), 6: (13, 17)} if weighted else {}
    pairs = weights_for(SIZES, acc, DEVICE, upsampled_to)
    flat, views, flat64 = buffer_and_maps(SIZES, dtype, DEVICE, offset=20.0)
    ref_flat = flat64.clone().requires_grad_()
    pairs64 = [None if p is None else tuple(t.cpu().double() for t in p) for p in pairs]
    expected = reference(views(ref_flat), pairs64)
    g_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(expected, ref_flat, g_out)

    out = channel_moments_grouped(views(flat), pairs if weighted else None)
    assert type(out.grad_fn).__name__ == "_GroupedMomentsBackward", "the one-launch path was not taken"
    assert out.shape == (len(SIZES), N, C, 3) and out.dtype == acc and out.is_contiguous()
    (g,) = torch.autograd.grad(out, flat, g_out.to(DEVICE, acc))
    for k in range(3):
        assert rel_err(out[..., k], expected[..., k].detach()) < TOL[dtype], k
    assert g.dtype == dtype and rel_err(g, g_ref) < TOL[dtype]


@needs_kernels
def test_m2_keeps_its_precision_where_the_mean_is_1e4_times_the_spread():
    """Every map's M2 as precise as torch's fp32 variance (~5e-8 relative), also the maps of two runs, whose
    runs were merged about their own fp32 means (off by ~1e-4); None rows stay zero."""
    flat, views, flat64 = buffer_and_maps(SIZES, torch.float32, DEVICE, offset=1e4)
    out = channel_moments_grouped(views(flat), None)
    expected = reference(views(flat64), [None] * len(SIZES))
    for k, size in enumerate(SIZES):
        if size is None:
            assert not out[k].any()
        else:
            assert rel_err(out[k, ..., 1], expected[k, ..., 1]) < 1e-6, (k, size)


@needs_kernels
def test_a_weighted_mean_is_the_mean_of_the_upsampled_map():
    """What DyHead relies on: the pooled column of a map with upsampling weights is the mean of
    F.interpolate(map, size, bilinear, align_corners=True), and so are its gradients."""
    sizes = [(4, 6), (3, 3)]
    flat, views, flat64 = buffer_and_maps(sizes, torch.float64, DEVICE)
    pairs = weights_for(sizes, torch.float64, DEVICE, {1: (5, 6)})
    out = channel_moments_grouped(views(flat), pairs)
    ref_flat = flat64.clone().requires_grad_()
    up = F.interpolate(views(ref_flat)[1], size=(5, 6), mode="bilinear", align_corners=True).mean(dim=(2, 3))
    torch.testing.assert_close(out[1, ..., 2].cpu(), up.detach(), rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(out[1, ..., 2].sum(), flat)
    (g_ref,) = torch.autograd.grad(up.sum(), ref_flat)
    torch.testing.assert_close(g.cpu(), g_ref, rtol=1e-12, atol=1e-12)


@needs_kernels
def test_the_maps_themselves_get_their_gradients():
    """Maps that are views of a buffer another op made (a non-leaf): autograd.grad with respect to the maps,
    and to the buffer, as through torch. Computed through the buffer, the maps got none."""
    leaf, views, _ = buffer_and_maps([(3, 4), None, (2, 5)], torch.float64, DEVICE)
    maps = views(leaf * 2.0)
    out = channel_moments_grouped(maps)
    expected = reference(maps, [None] * len(maps))
    tensors = [m for m in maps if m is not None] + [leaf]
    got = torch.autograd.grad((out * torch.arange(1.0, 4.0, device=DEVICE)).sum(), tensors, retain_graph=True)
    want = torch.autograd.grad((expected * torch.arange(1.0, 4.0, device=DEVICE)).sum(), tensors, retain_graph=True)
    for i, (g, w) in enumerate(zip(got, want)):
        assert rel_err(g, w) < 1e-12, i
    # buffer_gradient: the same gradient reaches the buffer as one tensor, and none the maps themselves
    out = channel_moments_grouped(maps, buffer_gradient=True)
    got = torch.autograd.grad((out * torch.arange(1.0, 4.0, device=DEVICE)).sum(), tensors, allow_unused=True)
    assert got[:-1] == (None, None) and rel_err(got[-1], want[-1]) < 1e-12


@needs_kernels
@pytest.mark.parametrize("buffer_gradient", [False, True])
def test_uncovered_elements_get_zero_gradient(buffer_gradient):
    flat, views, _ = buffer_and_maps([(3, 4), (2, 2)], torch.float32, DEVICE, extra=5)
    out = channel_moments_grouped(views(flat), buffer_gradient=buffer_gradient)
    (g,) = torch.autograd.grad(out.sum(), flat)
    assert torch.equal(g[-5:], torch.zeros(5, device=DEVICE))
    assert g[:-5].abs().sum() > 0


@needs_kernels
def test_maps_that_share_no_buffer_take_the_per_map_path():
    """Separate tensors, overlapping views (also by one element), strided and transposed views, views of a
    complex tensor's values and of a tensor that is not contiguous itself: each map on its own, with the same
    results."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(N, C, 9, 9, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    flat = base.flatten()
    # Every case's maps require grad: without a graph the path taken cannot be told.
    complex_values = torch.randn(N * C * 20, generator=gen, dtype=torch.complex128).to(DEVICE).requires_grad_()
    channels_last = torch.randn(N, C, 3, 5, generator=gen, dtype=torch.float64).to(DEVICE)
    channels_last = channels_last.to(memory_format=torch.channels_last).requires_grad_()
    cases = {
        "separate": [torch.randn(N, C, 3, 4, generator=gen, dtype=torch.float64).to(DEVICE), base],
        "overlapping": [flat[:N * C * 16].view(N, C, 4, 4), flat[8:8 + N * C * 16].view(N, C, 4, 4)],
        "one shared element": [flat[:N * C * 16].view(N, C, 4, 4),
                               flat[N * C * 16 - 1:N * C * 32 - 1].view(N, C, 4, 4)],
        "strided": [base[..., :4, :5], base[..., 4:, :]],
        "transposed": [flat[:N * C * 20].view(N, C, 4, 5), flat[N * C * 20:N * C * 40].view(N, C, 5, 4).mT],
        # The first half of the values: as many as the tensor's (complex) elements.
        "complex values": [torch.view_as_real(complex_values).flatten()[:N * C * 20].view(N, C, 4, 5)],
        # A contiguous (N, H, W, C) view of a channels-last tensor: a map (N, H, W, C) of its own.
        "not contiguous buffer": [channels_last.permute(0, 2, 3, 1)],
    }
    for name, maps in cases.items():
        out = channel_moments_grouped(maps)
        assert out.requires_grad and type(out.grad_fn).__name__ != "_GroupedMomentsBackward", name
        expected = reference([m.detach().cpu() for m in maps], [None] * len(maps))
        assert rel_err(out.detach().cpu(), expected) < 1e-12, name


@needs_kernels
def test_weights_that_share_no_float_buffer_take_the_per_map_path():
    """Pool weights in tensors of their own, or views of a complex tensor's values: each map on its own, the
    same results; the weights are constants there too (no gradient, though they require grad)."""
    sizes = [(3, 4), (2, 5)]
    flat, views, flat64 = buffer_and_maps(sizes, torch.float64, DEVICE)
    gen = torch.Generator().manual_seed(5)
    own = [torch.rand(size, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_() for size in sizes[1]]
    complex_values = torch.view_as_real(torch.rand(8, generator=gen, dtype=torch.complex128).to(DEVICE)).flatten()
    complex_pair = complex_values[:7].split([2, 5])
    for name, pair in (("complex values", complex_pair), ("own tensors", tuple(own))):
        out = channel_moments_grouped(views(flat), [None, pair])
        assert type(out.grad_fn).__name__ != "_GroupedMomentsBackward", name
        assert rel_err(out, reference(views(flat64), [None, tuple(t.detach().cpu() for t in pair)])) < 1e-12, name
    # The weights in tensors of their own (the last pair): their gradient is their own sum's only.
    grads = torch.autograd.grad(out.sum() + sum(t.sum() for t in own), [flat, *own])
    assert grads[0].abs().sum() > 0 and all(torch.equal(g, torch.ones_like(g)) for g in grads[1:])


@needs_kernels
def test_image_counts_other_than_channel_blocks():
    """Three images of five channels (two channel blocks under the interpreter): the kernels find each image's
    moments by the image count."""
    sizes = [(8, 12), None, (3, 5)]
    flat, views, flat64 = buffer_and_maps(sizes, torch.float64, DEVICE, n=3, c=5)
    pairs = weights_for(sizes, torch.float64, DEVICE, {2: (5, 9)})
    ref_flat = flat64.clone().requires_grad_()
    expected = reference(views(ref_flat), pairs)
    out = channel_moments_grouped(views(flat), pairs)
    assert type(out.grad_fn).__name__ == "_GroupedMomentsBackward"
    assert rel_err(out, expected.detach()) < 1e-12
    g_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    (g,) = torch.autograd.grad(out, flat, g_out.to(DEVICE))
    assert rel_err(g, torch.autograd.grad(expected, ref_flat, g_out)[0]) < 1e-12


@needs_kernels
@pytest.mark.parametrize("n, c", [(0, C), (N, 0)], ids=["no_images", "no_channels"])
def test_no_images_or_no_channels(n, c):
    """Nothing to take moments of: an empty (K, N, C, 3) result and an empty gradient."""
    flat, views, _ = buffer_and_maps(SIZES, torch.float32, DEVICE, n=n, c=c)
    out = channel_moments_grouped(views(flat))
    assert out.shape == (len(SIZES), n, c, 3) and out.dtype == torch.float32
    (g,) = torch.autograd.grad(out.sum(), flat)
    assert g.shape == flat.shape == (0,)


@needs_kernels
def test_gradcheck_float64():
    sizes = [(2, 3), None, (3, 2)]
    gen = torch.Generator().manual_seed(4)
    flat = torch.randn(2 * 12, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    pairs = weights_for(sizes, torch.float64, DEVICE, {2: (4, 3)})

    def fn(t):  # one image, two channels: each input element costs the interpreter two calls
        a, b = t.split(2 * 6)
        return channel_moments_grouped([a.view(1, 2, 2, 3), None, b.view(1, 2, 3, 2)], pairs)

    assert torch.autograd.gradcheck(fn, (flat,))


@needs_kernels
def test_backward_is_bitwise_deterministic():
    def run():
        flat, views, _ = buffer_and_maps(SIZES, torch.float32, DEVICE)
        out = channel_moments_grouped(views(flat))
        return out, torch.autograd.grad((out * out).sum(), flat)[0]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@needs_kernels
def test_aligned_and_unaligned_maps_are_both_present():
    """The cases above exercise both of the kernels' load paths (a guard on the test data, not the op)."""
    starts, first = [], 0
    for s in SIZES:
        if s is not None:
            starts.append((first, s[0] * s[1]))
            first += N * C * s[0] * s[1]
    aligned = [start % ALIGN == 0 and hw % ALIGN == 0 for start, hw in starts]
    assert any(aligned) and not all(aligned)


def test_bad_inputs_raise():
    x = torch.randn(2, 3, 4, 5)
    row, col = torch.ones(4), torch.ones(5)
    cases = [
        (x, {}, TypeError, "maps must be a list or tuple"),
        ([None, None], {}, ValueError, "at least one tensor"),
        ([x, torch.ones(2, 3, 4, 5, dtype=torch.int32)], {}, TypeError, r"maps\[1\] must be float32"),
        ([x, torch.randn(2, 3, 4)], {}, ValueError, r"maps\[1\] must be \(N, C, H, W\)"),
        ([x, torch.randn(2, 4, 4, 5)], {}, ValueError, r"maps\[1\] has \(N, C\) = \(2, 4\)"),
        ([x, x.double()], {}, TypeError, r"maps\[1\] has dtype torch.float64"),
        ([x, torch.randn(2, 3, 0, 5)], {}, ValueError, r"H\*W > 0"),
        ([x, torch.randn(2, 3, 4, 5, device="meta")], {}, ValueError, r"maps\[1\] is on meta"),
        ([x], {"pool_weights": []}, ValueError, "1 entries"),
        ([x, None], {"pool_weights": [None, (row, col)]}, ValueError, r"maps\[1\] is None"),
        ([x], {"pool_weights": [(row, torch.ones(4))]}, ValueError, r"column weights must be \(5,\)"),
        ([x], {"pool_weights": [(row.double(), col)]}, TypeError, "row weights must be torch.float32"),
        ([x], {"pool_weights": [row]}, ValueError, "must be None or a pair"),
        ([x, torch.randn(2, 3, 4, 0)], {}, ValueError, r"maps\[1\] must have H\*W > 0"),
        ([x], {"pool_weights": [(row.tolist(), col)]}, TypeError, "row weights must be a Tensor, got list"),
        ([x], {"pool_weights": [(row, col.to("meta"))]}, ValueError, r"pool_weights\[0\] is on meta"),
    ]
    for maps, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            channel_moments_grouped(maps, **kwargs)
