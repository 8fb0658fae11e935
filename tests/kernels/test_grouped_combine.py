"""kernels.level_combine_grouped against plain torch expressions (F.interpolate, torch.maximum) in float64.

The branches are consecutive NCHW views of one flat buffer, in the order of a DyHead block's sets op (every
level's same-size branch, then the finer ones, then the coarser ones). Under the interpreter a run is a multiple
of 32 pixels and, for these batch and channel counts, the largest level is cut into two runs; levels 0 and 1 have
pixel counts and places that are multiples of the kernels' ALIGN (the wide-load path), level 2 does not.
"""

import pytest
import torch
import torch.nn.functional as F
from deform_conv_cases import DEVICE, needs_kernels, rel_err

from kernels import level_combine_grouped

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
N, C = 2, 6
# A 3-level pyramid: per level its branches' sizes, (level, slot) of each map in buffer order.
PYRAMID = [(8, 12), (4, 6), (2, 3)]
DYHEAD_BRANCHES = [[(8, 12), (4, 6)], [(4, 6), (4, 6), (2, 3)], [(2, 3), (2, 3)]]
DYHEAD_ORDER = [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1), (0, 1), (1, 2)]


def reference(levels, scale, shift, coef):
    """Each level's max(a1 u + b1, a2 u + b2), u = sum_b scale_b * resize(y_b) + shift, in the inputs' dtype."""
    outs = []
    for l, branches in enumerate(levels):
        size = branches[0].shape[-2:]
        u = shift[l][..., None, None]
        for b, y in enumerate(branches):
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=True)
            u = u + scale[l, :, b][..., None, None] * y
        a1, b1, a2, b2 = (t[..., None, None] for t in coef[l].unbind(1))
        outs.append(torch.maximum(a1 * u + b1, a2 * u + b2))
    return outs


def make_inputs(branch_sizes, order, seed=0, n=N, c=C, gap=0):
    """float64 CPU leaves: the flat buffer, and scale (L, n, 3, c), shift, coef; a function mapping a buffer to
    the levels' branches (views in `order`, with `gap` NaN elements before, between and after them)."""
    gen = torch.Generator().manual_seed(seed)
    counts = [n * c * h * w for l, b in order for h, w in [branch_sizes[l][b]]]
    flat = torch.randn(sum(counts), generator=gen, dtype=torch.float64)
    num = len(branch_sizes)
    scale = torch.rand(num, n, 3, c, generator=gen, dtype=torch.float64) + 0.5
    shift = torch.randn(num, n, c, generator=gen, dtype=torch.float64)
    coef = torch.randn(num, n, 4, c, generator=gen, dtype=torch.float64)
    nan = torch.full((gap,), float("nan"), dtype=torch.float64)
    flat = torch.cat([t for part in flat.split(counts) for t in (nan, part)] + [nan])

    def levels_of(buffer):
        parts = buffer.split([size for count in counts for size in (gap, count)] + [gap])[1::2]
        levels = [[None] * len(sizes) for sizes in branch_sizes]
        for part, (l, b) in zip(parts, order):
            levels[l][b] = part.view(n, c, *branch_sizes[l][b])
        return levels

    return flat, scale, shift, coef, levels_of


def took_grouped_path(outs):
    """Whether the outputs are views of one buffer written by the grouped kernels."""
    base = outs[0]._base
    return base is not None and type(base.grad_fn).__name__ == "_GroupedCombineBackward" and all(
        o._base is base for o in outs)


def check_against_reference(branch_sizes, order, dtype, grouped=True, seed=0, n=N, c=C, tol=TOL, gap=0):
    """Outputs and gradients (buffer, scale, shift, coef) on DEVICE in dtype within tol[dtype] of float64 torch
    fed the same rounded values; returns them."""
    flat64, *params64, levels_of = make_inputs(branch_sizes, order, seed, n, c, gap)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    flat = flat64.to(DEVICE, dtype).requires_grad_()
    params = [p.to(DEVICE, acc).requires_grad_() for p in params64]
    ref_leaves = [flat.detach().cpu().double().requires_grad_()] + [p.detach().cpu().double().requires_grad_()
                                                                    for p in params]
    outs = level_combine_grouped(levels_of(flat), *params)
    expected = reference(levels_of(ref_leaves[0]), *ref_leaves[1:])
    gen = torch.Generator().manual_seed(seed + 1)
    g_outs = [torch.randn(e.shape, generator=gen, dtype=torch.float64).to(dtype).double() for e in expected]
    grads = torch.autograd.grad(outs, [flat, *params], [g.to(DEVICE, dtype) for g in g_outs])
    grads_ref = torch.autograd.grad(expected, ref_leaves, g_outs)
    assert took_grouped_path(outs) == grouped
    for l, (out, e) in enumerate(zip(outs, expected)):
        assert out.shape == e.shape and out.dtype == dtype, l
        assert rel_err(out, e.detach()) < tol[dtype], l
    for name, g, g_ref in zip(["buffer", "scale", "shift", "coef"], grads, grads_ref):
        assert g.dtype == (dtype if name == "buffer" else acc), name
        assert rel_err(g, g_ref) < tol[dtype], name
    return outs, grads


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_dyhead_levels_match_float64(dtype):
    check_against_reference(DYHEAD_BRANCHES, DYHEAD_ORDER, dtype)


# Other level structures: one level of one branch; a last branch of the level's size (not resized) among three;
# a resize down and a resize up along each axis; unaligned sizes only; resized branches of more pixels than a
# gather run (64 here: 90 and 72 pixels), so that their gradients are gathered in two runs each, the second partial
# and, for level 1, not the level's first.
STRUCTURES = {
    "large_resized": ([[(3, 4), (9, 10)], [(2, 3), (8, 9)]], [(0, 0), (1, 0), (0, 1), (1, 1)]),
    "one_branch": ([[(5, 7)]], [(0, 0)]),
    "same_size_last": ([[(4, 4), (4, 4), (4, 4)], [(3, 5), (6, 2)]], [(0, 0), (1, 0), (0, 1), (0, 2), (1, 1)]),
    "down_and_up": ([[(3, 5), (5, 2)], [(5, 3), (5, 3), (2, 7)]], [(1, 2), (0, 0), (1, 0), (0, 1), (1, 1)]),
}


@needs_kernels
@pytest.mark.parametrize("name", list(STRUCTURES))
def test_level_structures_match_float64(name):
    check_against_reference(*STRUCTURES[name], torch.float64, seed=2)


# Levels 1 and 3 have pixel counts and branch places that are multiples of ALIGN (8), but level 1's output place
# (12 * 3 pixels of level 0 before it) is not, nor is level 3's place in the scratch buffer of resized branches'
# gradients (level 0's 36 elements before it), while level 3's output place (36 + 96 + 60 = 192) is.
MISALIGNED_PLACES = ([[(1, 3), (1, 2)], [(2, 4)], [(1, 5)], [(2, 4), (1, 2)]],
                     [(1, 0), (3, 0), (0, 0), (0, 1), (2, 0), (3, 1)])


@needs_kernels
def test_image_counts_other_than_channel_blocks():
    """Three images of five channels (two channel blocks under the interpreter, 8 * 5 parameter-gradient values
    per level and image, not a multiple of the run sum's block): each image's coefficients and sums are found
    by the image count."""
    check_against_reference([[(3, 4), (3, 4)], [(2, 2)]], [(0, 0), (1, 0), (0, 1)], torch.float64, seed=4, n=3, c=5)


@needs_kernels
@pytest.mark.parametrize("branch_sizes, n", [([[(2, 3)], [(0, 4)]], N), ([[(2, 3)], [(1, 2)]], 0)],
                         ids=["a_level_without_pixels", "no_images"])
def test_nothing_to_combine(branch_sizes, n):
    """A level without pixels, or no images: empty outputs, and zero gradients for what nothing reads (the
    empty level's parameters), as torch gives them."""
    flat, *params, levels_of = make_inputs(branch_sizes, [(0, 0), (1, 0)], n=n)
    leaves = [t.to(DEVICE).requires_grad_() for t in (flat, *params)]
    outs = level_combine_grouped(levels_of(leaves[0]), *leaves[1:])
    expected = reference(levels_of(leaves[0]), *leaves[1:])
    for out, e in zip(outs, expected):
        torch.testing.assert_close(out, e, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(sum(o.square().sum() for o in outs), leaves)
    for g, g_ref in zip(grads, torch.autograd.grad(sum(e.square().sum() for e in expected), leaves)):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


@needs_kernels
def test_no_element_outside_the_branches_is_read():
    """NaN before, between and after the branches in their buffer: the outputs and gradients are torch's (the
    bilinear reads of a resized branch's last row and column stay within it)."""
    check_against_reference(*STRUCTURES["down_and_up"], torch.float64, seed=6, gap=3)


@needs_kernels
def test_parameter_gradients_of_branches_that_need_none():
    """Branches that do not require grad (no branch gradient to write or gather): the parameters' gradients,
    torch's."""
    flat64, *params64, levels_of = make_inputs(*STRUCTURES["down_and_up"], seed=7)
    params = [p.to(DEVICE).requires_grad_() for p in params64]
    ref_params = [p.clone().requires_grad_() for p in params64]
    outs = level_combine_grouped(levels_of(flat64.to(DEVICE)), *params)
    assert took_grouped_path(outs)
    got = torch.autograd.grad(sum(o.square().sum() for o in outs), params)
    want = torch.autograd.grad(sum(e.square().sum() for e in reference(levels_of(flat64), *ref_params)), ref_params)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-12


@needs_kernels
def test_parameters_that_are_not_contiguous():
    """scale, shift and coef read through any layout: here (L, N, 3, C) and (L, N, 4, C) permuted views and a
    transposed (L, N, C)."""
    flat64, *params64, levels_of = make_inputs(*STRUCTURES["one_branch"])
    scale, shift, coef = params64
    views = (scale.permute(2, 1, 0, 3).contiguous().permute(2, 1, 0, 3), shift.mT.contiguous().mT,
             coef.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0))
    assert not any(v.is_contiguous() for v in views)
    outs = level_combine_grouped(levels_of(flat64.to(DEVICE).requires_grad_()), *(v.to(DEVICE) for v in views))
    assert took_grouped_path(outs)
    assert rel_err(outs[0], reference(levels_of(flat64), *params64)[0]) < 1e-12


@needs_kernels
def test_autocast_casts_half_precision_parameters_to_float32():
    """Under autocast, scale, shift and coef in float16 (autocast matmuls give them so) are cast to float32 as
    `level_combine` casts them, and the levels keep their branches."""
    flat64, *params64, levels_of = make_inputs(*STRUCTURES["same_size_last"])
    half = [t.to(DEVICE, torch.float16) for t in params64]
    with torch.autocast(DEVICE, dtype=torch.float16):
        outs = level_combine_grouped(levels_of(flat64.to(DEVICE, torch.float32).requires_grad_()), *half)
    assert took_grouped_path(outs)
    expected = reference(levels_of(flat64.float().double()), *(t.cpu().double() for t in half))
    for out, e in zip(outs, expected):
        assert out.dtype == torch.float32 and rel_err(out, e) < 1e-5


@needs_kernels
def test_a_nan_coefficient_gives_nan_as_torch_maximum_does():
    """A NaN in one line's coefficients makes the output NaN where the other line is a number, as
    torch.maximum gives it (a maximum that ignores NaN would return the other line)."""
    flat64, scale, shift, coef, levels_of = make_inputs(DYHEAD_BRANCHES, DYHEAD_ORDER)
    coef[0, 0, 0, 1] = float("nan")  # a1 of level 0, image 0, channel 1
    coef[2, 1, 3, 4] = float("nan")  # b2 of level 2, image 1, channel 4
    params = [t.to(DEVICE) for t in (scale, shift, coef)]
    outs = level_combine_grouped(levels_of(flat64.to(DEVICE).requires_grad_()), *params)
    assert took_grouped_path(outs)
    for out, e in zip(outs, reference(levels_of(flat64), scale, shift, coef)):
        torch.testing.assert_close(out.detach().cpu(), e, equal_nan=True, rtol=1e-12, atol=1e-12)
    assert outs[0][0, 1].isnan().all() and outs[2][1, 4].isnan().all()


def plan_table(branch_sizes, order):
    """The grouped kernels' table (levels x WIDTH, on the CPU) of make_inputs' layout."""
    from kernels.grouped_combine import WIDTH, plan_levels

    counts = {lb: N * C * branch_sizes[lb[0]][lb[1]][0] * branch_sizes[lb[0]][lb[1]][1] for lb in order}
    firsts = {lb: sum(counts[o] for o in order[:k]) for k, lb in enumerate(order)}
    places = [tuple((firsts[(l, b)], *size) for b, size in enumerate(sizes)) for l, sizes in enumerate(branch_sizes)]
    return plan_levels(places, N, C, torch.device(DEVICE)).table.view(-1, int(WIDTH)).cpu()


@needs_kernels
def test_a_level_with_one_misaligned_place_takes_the_element_path():
    """Every place a level reads or writes at its size counts for the wide-load path (which rounds places down to
    multiples of ALIGN): an unaligned output place, or an unaligned place of a resized branch's gradient in the
    scratch buffer, must put the level on the element path, or its output or that gradient lands elsewhere."""
    from kernels.grouped_moments import ALIGN

    table = plan_table(*MISALIGNED_PLACES)
    # The layout is the one meant: level 1 and 3 aligned but for one place each.
    assert ALIGN == 8 and table[1, 0] % 8 != 0 and table[3, 0] % 8 == 0 and table[3, 13] % 8 != 0
    assert table[:, 14].tolist() == [0, 0, 0, 0]
    check_against_reference(*MISALIGNED_PLACES, torch.float64, seed=3)


# Level 0 of three branches, then of two (DyHead's finest level: its own and the coarser one), its resized branch
# after the 12 * 3 elements of a (1, 3) level, so not at a multiple of ALIGN; a one-branch level of 8 pixels.
UNALIGNED_RESIZED = {
    "three_branches": ([[(2, 4), (2, 4), (1, 3)], [(2, 4)], [(1, 3)]], [(0, 0), (0, 1), (1, 0), (2, 0), (0, 2)], 7),
    "two_branches": ([[(2, 4), (1, 3)], [(2, 4)], [(1, 3)]], [(0, 0), (1, 0), (2, 0), (0, 1)], 6),
}


@needs_kernels
@pytest.mark.parametrize("name", list(UNALIGNED_RESIZED))
def test_a_resized_branch_at_an_unaligned_place_leaves_its_level_on_the_wide_path(name):
    """A resized branch is read at its own size, pixel by pixel, where it is: level 0 takes the wide-load path
    though its resized branch's place is not a multiple of ALIGN, and so does level 1, of one branch (the slots it
    lacks count not)."""
    branch_sizes, order, column = UNALIGNED_RESIZED[name]
    table = plan_table(branch_sizes, order)
    assert table[0, column] % 8 != 0 and table[:, 14].tolist() == [1, 1, 0]
    check_against_reference(branch_sizes, order, torch.float64, seed=5)


@needs_kernels
def test_branches_that_share_no_buffer_take_the_per_level_path():
    """Separate tensors, overlapping views, views that share one element, views of a complex tensor's values
    and of a tensor that is not contiguous itself: each level on its own, with the same results (the one launch
    would write a shared element's gradient twice, one over the other). The branches come from leaves that
    require grad: without a graph `took_grouped_path` cannot tell the paths apart."""
    flat64, scale, shift, coef, levels_of = make_inputs(DYHEAD_BRANCHES, DYHEAD_ORDER)
    params = [t.to(DEVICE) for t in (scale, shift, coef)]
    leaf = flat64.to(DEVICE).clone().requires_grad_()
    separate = [[y.clone() for y in branches] for branches in levels_of(leaf)]
    size = len(flat64)
    # The first half of a complex tensor's values (as many as its elements); the columns of a (2, size / 2) tensor
    # laid out column by column, which read in turn are one contiguous view of it.
    complex_values = torch.zeros(size, dtype=torch.complex128, device=DEVICE)
    column_major = torch.empty_strided((2, size // 2), (1, 2), dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        torch.view_as_real(complex_values).flatten()[:size].copy_(flat64)
        column_major.mT.flatten().copy_(flat64)
    complex_values.requires_grad_()
    column_major.requires_grad_()
    overlapping = levels_of(leaf)
    overlapping[2][1] = overlapping[2][0]
    # A branch that starts one element before the previous one in the buffer ends: they share that element only.
    touching = levels_of(leaf)
    y = touching[2][1]
    touching[2][1] = y.as_strided(y.shape, y.stride(), y.storage_offset() - 1)
    for name, levels in (("separate", separate), ("overlapping", overlapping), ("one shared element", touching),
                         ("complex values", levels_of(torch.view_as_real(complex_values).flatten()[:size])),
                         ("not contiguous buffer", levels_of(column_major.mT.flatten()))):
        outs = level_combine_grouped(levels, *params)
        assert not took_grouped_path(outs), name
        expected = reference(levels, *params)
        for out, e in zip(outs, expected):
            assert rel_err(out, e) < 1e-12, name


@needs_kernels
def test_unused_slots_are_not_read_and_get_zero_gradient():
    flat64, scale, shift, coef, levels_of = make_inputs(DYHEAD_BRANCHES, DYHEAD_ORDER)
    scale[0, :, 2] = float("nan")  # level 0 has two branches, level 2 too
    scale[2, :, 2] = float("nan")
    flat = flat64.to(DEVICE).requires_grad_()
    scale = scale.to(DEVICE).requires_grad_()
    outs = level_combine_grouped(levels_of(flat), scale, shift.to(DEVICE), coef.to(DEVICE))
    assert took_grouped_path(outs) and all(torch.isfinite(o).all() for o in outs)
    (g,) = torch.autograd.grad(sum(o.sum() for o in outs), scale)
    assert torch.equal(g[[0, 2], :, 2], torch.zeros_like(g[[0, 2], :, 2]))
    assert g[1, :, 2].abs().sum() > 0


@needs_kernels
def test_gradients_are_bitwise_repeatable_and_partial_needs_agree():
    flat64, scale, shift, coef, levels_of = make_inputs(DYHEAD_BRANCHES, DYHEAD_ORDER)
    flat = flat64.to(DEVICE, torch.float32).requires_grad_()
    params = [t.to(DEVICE, torch.float32).requires_grad_() for t in (scale, shift, coef)]
    g_outs = [torch.randn(N, C, *size, generator=torch.Generator().manual_seed(l), device=DEVICE)
              for l, size in enumerate(PYRAMID)]

    def grads(inputs):
        return torch.autograd.grad(level_combine_grouped(levels_of(flat), *params), inputs, g_outs)

    first, second = grads([flat, *params]), grads([flat, *params])
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    (only_buffer,) = grads([flat])
    assert torch.equal(only_buffer, first[0])
    only_params = grads(params)
    assert all(torch.equal(a, b) for a, b in zip(only_params, first[1:]))


@needs_kernels
def test_the_branches_themselves_get_their_gradients():
    """Branches that are views of a buffer another op made (a non-leaf): autograd.grad with respect to the
    branches, and to the buffer, as through torch. Computed through the buffer, the branches got none."""
    flat64, scale, shift, coef, levels_of = make_inputs(DYHEAD_BRANCHES, DYHEAD_ORDER)
    leaf = flat64.to(DEVICE).requires_grad_()
    buffer = leaf * 2.0
    branches = levels_of(buffer)
    outs = level_combine_grouped(branches, scale.to(DEVICE), shift.to(DEVICE), coef.to(DEVICE))
    assert took_grouped_path(outs)
    expected = reference(branches, scale.to(DEVICE), shift.to(DEVICE), coef.to(DEVICE))
    flat = [y for level in branches for y in level]
    got = torch.autograd.grad(sum(o.square().sum() for o in outs), [*flat, leaf], retain_graph=True)
    want = torch.autograd.grad(sum(e.square().sum() for e in expected), [*flat, leaf], retain_graph=True)
    for i, (g, w) in enumerate(zip(got, want)):
        assert rel_err(g, w) < 1e-12, i
    # buffer_gradient: the same gradient reaches the buffer as one tensor, and none the branches themselves
    outs = level_combine_grouped(branches, scale.to(DEVICE), shift.to(DEVICE), coef.to(DEVICE), buffer_gradient=True)
    got = torch.autograd.grad(sum(o.square().sum() for o in outs), [*flat, leaf], allow_unused=True)
    assert all(g is None for g in got[:-1]) and rel_err(got[-1], want[-1]) < 1e-12


@needs_kernels
@pytest.mark.parametrize("buffer_gradient", [False, True])
def test_uncovered_elements_get_zero_gradient(buffer_gradient):
    """A gap between the branches and a tail past them get zero gradient; with buffer_gradient the backward's
    gradient, written only where the branches are, may not become the buffer's."""
    flat64, scale, shift, coef, levels_of = make_inputs([[(2, 3), (2, 3)]], [(0, 0), (0, 1)], n=1, c=2)
    gaps = torch.randn(8, dtype=torch.float64)
    flat = torch.cat([flat64[:12], gaps[:5], flat64[12:], gaps[5:]]).to(DEVICE).requires_grad_()
    branches = [[flat[:12].view(1, 2, 2, 3), flat[17:29].view(1, 2, 2, 3)]]
    outs = level_combine_grouped(branches, scale.to(DEVICE), shift.to(DEVICE), coef.to(DEVICE),
                                 buffer_gradient=buffer_gradient)
    assert took_grouped_path(outs)
    (g,) = torch.autograd.grad(outs[0].sum(), flat)
    assert torch.equal(g[12:17], torch.zeros_like(g[12:17])) and torch.equal(g[29:], torch.zeros_like(g[29:]))
    assert g[:12].abs().sum() > 0 and g[17:29].abs().sum() > 0


def test_bad_inputs_name_the_argument():
    flat64, scale, shift, coef, levels_of = make_inputs(DYHEAD_BRANCHES, DYHEAD_ORDER)
    levels = levels_of(flat64)
    with pytest.raises(ValueError, match=r"scale must be \(L, N, 3, C\) = \(3, 2, 3, 6\)"):
        level_combine_grouped(levels, scale[:, :, :2], shift, coef)
    with pytest.raises(ValueError, match=r"coef must be \(L, N, 4, C\)"):
        level_combine_grouped(levels, scale, shift, coef[:2])
    with pytest.raises(TypeError, match=r"levels\[1\]: branches\[2\] has dtype torch.float32"):
        level_combine_grouped([levels[0], [*levels[1][:2], levels[1][2].float()], levels[2]], scale, shift, coef)
    with pytest.raises(ValueError, match=r"levels\[1\]: branches\[1\] must be"):
        level_combine_grouped([levels[0], [levels[1][0], levels[1][2], levels[1][1]], levels[2]], scale, shift,
                              coef)
    with pytest.raises(ValueError, match=r"levels\[2\] has \(N, C\) = \(1, 6\)"):
        level_combine_grouped([*levels[:2], [y[:1] for y in levels[2]]], scale, shift,
                              coef)
    for other, error in (("a float32", r"torch.float32 on cpu"), ("a meta", r"torch.float64 on meta")):
        level = [levels[2][0].float() if other == "a float32" else levels[2][0].to("meta")]
        with pytest.raises(ValueError, match=r"levels\[2\] has \(N, C\) = \(2, 6\), " + error):
            level_combine_grouped([*levels[:2], level], scale, shift, coef)
    with pytest.raises(TypeError, match="non-empty list"):
        level_combine_grouped([], scale, shift, coef)
    with pytest.raises(TypeError, match=r"levels\[1\] must be a list"):
        level_combine_grouped([levels[0], levels[1][0], levels[2]], scale, shift, coef)
