"""kernels.deform_conv_op.modulated_deform_conv2d_sets: several weight sets, each over its own list of levels of
shared inputs, in one forward launch and one backward launch, against torchvision.ops.deform_conv2d in float64
on each conv, against the one-level op and against the pyramid op.

Runs the kernels in the CPU interpreter (TRITON_INTERPRET=1 set before pytest starts) or on a CUDA GPU, as
test_deform_conv.py does; input checks run everywhere. The main case is a DyHead block's spatial convs on three
levels, each ceil of the previous / 2: set A ("same") stride 1 on levels 0, 1, 2; set B ("finer") stride 2 on
levels 0, 1, whose outputs have the sizes of levels 1, 2; set C ("coarser") stride 1 on levels 1, 2. Every
input feeds several convs, so its gradient is a sum over sets. Each conv gets its own random output gradient:
convs with outputs of one shape would otherwise get the same one and hide gradients sent to the wrong conv.
"""

import numpy as np
import pytest
import torch
import torchvision
from deform_conv_cases import (DEVICE, INTERPRET, check_compiled_matches_eager, leaves, needs_kernels, out_size,
                               pyramid_grads, rel_err)

from kernels import (deform_conv_op, modulated_deform_conv2d, modulated_deform_conv2d_pyramid,
                     modulated_deform_conv2d_sets)

SIZES = [(7, 9), (4, 5), (2, 3)]
DYHEAD = ([[0, 1, 2], [0, 1], [1, 2]], [1, 2, 1])  # (levels, strides) of the sets A, B, C
# The same sets on the two smaller levels (faster in the interpreter): A on both, B on 0 and C on 1.
SMALL = (SIZES[1:], [[0, 1], [0], [1]], [1, 2, 1])
VIEW_SIZES = [(4, 5), (2, 3), (1, 2)]  # DyHead's three levels, smaller: each ceil of the previous / 2


def per_set(strides, sets):
    """The stride of each set: strides is an int for every set, or a list with one per set."""
    return list(strides) if isinstance(strides, list) else [strides] * sets


def flat(nested):
    return [item for items in nested for item in items]


def same(a, b):
    """Bitwise in the interpreter (both launches run the same tiles in order); close on a GPU (atomics)."""
    return torch.equal(a, b) if INTERPRET else torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def make_sets(n, cin, cout, sizes, levels, strides, bias=True, seed=0):
    """Random float64 inputs of a 3x3, padding 1 sets call: "input" (one per (H, W) of sizes), and per set a
    "weight", a "bias" (None where the set has none; bias: one bool for all sets or one per set) and lists of
    "offset" and "mask" (one per conv, shaped for its input and its set's stride). Offsets of a few pixels cross
    pixel borders and leave the image."""
    gen = torch.Generator().manual_seed(seed)
    strides = per_set(strides, len(levels))
    has_bias = [bias] * len(levels) if isinstance(bias, bool) else bias

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)

    p = {"input": [randn(n, cin, h, w) for h, w in sizes], "weight": [], "bias": [], "offset": [], "mask": []}
    for indices, stride, with_bias in zip(levels, strides, has_bias):
        p["weight"].append(randn(cout, cin, 3, 3, scale=(9 * cin) ** -0.5))
        p["bias"].append(randn(cout) if with_bias else None)
        outs = [out_size(*sizes[i], 3, stride, 1, 1) for i in indices]
        p["offset"].append([randn(n, 18, *hw, scale=2.5) for hw in outs])
        p["mask"].append([torch.rand(n, 9, *hw, generator=gen, dtype=torch.float64) for hw in outs])
    return p


def sets_leaves(p, dtype, device, wanted=None):
    """Copies of a `make_sets` dict that require grad (those named in wanted, or all), flattened to names:
    input0, ..., weight0, bias0, offset0_0, mask0_0 (set 0, conv 0), offset0_1, ..., weight1, ... (None stays
    None)."""
    named = {f"input{i}": x for i, x in enumerate(p["input"])}
    for s, (weight, bias, offsets, masks) in enumerate(zip(p["weight"], p["bias"], p["offset"], p["mask"])):
        named.update({f"weight{s}": weight, f"bias{s}": bias})
        for j, (offset, mask) in enumerate(zip(offsets, masks)):
            named.update({f"offset{s}_{j}": offset, f"mask{s}_{j}": mask})
    return leaves(named, dtype, device, wanted)


def sets_args(t):
    """(inputs, weights, biases, offsets, masks) of a `sets_leaves` dict, biases a list with None entries."""
    inputs = [t[f"input{i}"] for i in range(sum(name.startswith("input") for name in t))]
    sets = sum(name.startswith("weight") for name in t)
    convs = [sum(name.startswith(f"offset{s}_") for name in t) for s in range(sets)]
    return (inputs, [t[f"weight{s}"] for s in range(sets)], [t[f"bias{s}"] for s in range(sets)],
            [[t[f"offset{s}_{j}"] for j in range(convs[s])] for s in range(sets)],
            [[t[f"mask{s}_{j}"] for j in range(convs[s])] for s in range(sets)])


def sets_reference(t, levels, strides):
    """torchvision's op on every conv of a `sets_leaves` dict: out[s][j]."""
    inputs, weights, biases, offsets, masks = sets_args(t)
    return [[torchvision.ops.deform_conv2d(inputs[i], o, weights[s], biases[s], stride, padding=1, mask=m)
             for i, o, m in zip(levels[s], offsets[s], masks[s])]
            for s, stride in enumerate(per_set(strides, len(levels)))]


def one_level_ops(t, levels, strides, deterministic=None):
    """modulated_deform_conv2d on every conv of a `sets_leaves` dict: out[s][j]."""
    inputs, weights, biases, offsets, masks = sets_args(t)
    return [[modulated_deform_conv2d(inputs[i], o, m, weights[s], biases[s], stride, 1, 1,
                                     deterministic=deterministic)
             for i, o, m in zip(levels[s], offsets[s], masks[s])]
            for s, stride in enumerate(per_set(strides, len(levels)))]


def sets_op(t, levels, strides, deterministic=None):
    """The sets op on a `sets_leaves` dict (biases=None where no set has a bias)."""
    inputs, weights, biases, offsets, masks = sets_args(t)
    if all(b is None for b in biases):
        biases = None
    return modulated_deform_conv2d_sets(inputs, weights, biases, levels, offsets, masks, strides=strides,
                                        padding=1, dilation=1, deterministic=deterministic)


def grad_outs_like(ys):
    """A different random float64 output gradient for each output."""
    return [torch.randn(y.shape, generator=torch.Generator().manual_seed(1 + k), dtype=torch.float64)
            for k, y in enumerate(ys)]


def check(p, levels, strides, dtype, tol, deterministic):
    """Every conv's output and every gradient within tol (relative norm) of float64 torchvision."""
    ref = sets_leaves(p, torch.float64, "cpu")
    ys_ref = sets_reference(ref, levels, strides)
    g_outs = grad_outs_like(flat(ys_ref))
    g_ref = pyramid_grads(flat(ys_ref), g_outs, ref)
    out = sets_leaves(p, dtype, DEVICE)
    ys = sets_op(out, levels, strides, deterministic)
    assert [len(y) for y in ys] == [len(indices) for indices in levels]
    g = pyramid_grads(flat(ys), [g.to(DEVICE) for g in g_outs], out)
    for s, (y_set, y_ref_set) in enumerate(zip(ys, ys_ref)):
        for j, (y, y_ref) in enumerate(zip(y_set, y_ref_set)):
            assert y.dtype == dtype and y.shape == y_ref.shape, (s, j)
            assert rel_err(y, y_ref) < tol, (s, j, rel_err(y, y_ref))
    assert g.keys() == g_ref.keys()
    for name, expected in g_ref.items():
        assert g[name].shape == expected.shape and g[name].dtype == dtype, name
        assert rel_err(g[name], expected) < tol, (name, rel_err(g[name], expected))


# (N, Cin, Cout, sizes, levels, strides, bias, dtype, deterministic). "odd": 2 sets out of order on the inputs,
# input 2 twice in one set, anisotropic strides per set, one set without bias; its deterministic case has two
# images, so that the deterministic backward's per-image rows are checked here too.
ODD = ([(6, 7), (5, 3), (3, 4)], [[2, 0, 2], [1], [0, 1]], [(2, 1), 1, (1, 2)])
CASES = {
    "dyhead_fp32": (1, 6, 5, SIZES, *DYHEAD, True, torch.float32, False),
    "dyhead_fp32_det_no_bias": (1, 6, 5, SIZES, *DYHEAD, False, torch.float32, True),
    "dyhead_fp64": (1, 6, 5, SIZES, *DYHEAD, True, torch.float64, False),
    "dyhead_fp64_det": (1, 6, 5, SIZES, *DYHEAD, True, torch.float64, True),
    "odd_mixed_bias_fp32": (2, 5, 7, *ODD, [True, False, True], torch.float32, False),
    "odd_mixed_bias_fp64_det": (2, 5, 7, *ODD, [False, True, True], torch.float64, True),
}


@needs_kernels
@pytest.mark.parametrize("case", CASES.keys())
def test_matches_torchvision(case):
    n, cin, cout, sizes, levels, strides, bias, dtype, deterministic = CASES[case]
    p = make_sets(n, cin, cout, sizes, levels, strides, bias)
    check(p, levels, strides, dtype, 1e-5 if dtype == torch.float32 else 1e-12, deterministic)


def dyhead_views(dtype, device):
    """Leaves and args (inputs, weights, biases, levels, offsets, masks) of the DyHead sets whose offsets and
    masks are views of one 27-channel tensor om_l per level (the offset conv's output at level l's size), used
    as DyHead uses them: offsets[l] = om_l[:, :18] and masks[l] = sigmoid(om_l[:, 18:]) feed set A at level l
    and set B's conv that produces level l (the same tensor objects); set C's conv on level l + 1 reads level
    l's offsets through the official coarser quirk (each image's first 18*H*W values, an `as_strided` view with
    a storage offset) and its mask through the same quirk as a flatten/unflatten view."""
    gen = torch.Generator().manual_seed(3)
    n, cin, cout = 2, 6, 5

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device, dtype).requires_grad_()

    t = {**{f"x{l}": leaf(n, cin, h, w) for l, (h, w) in enumerate(VIEW_SIZES)},
         **{f"om{l}": leaf(n, 27, h, w, scale=2.5) for l, (h, w) in enumerate(VIEW_SIZES)},
         **{f"weight{s}": leaf(cout, cin, 3, 3, scale=(9 * cin) ** -0.5) for s in range(3)},
         "bias1": leaf(cout)}
    oms = [t[f"om{l}"] for l in range(3)]
    offsets = [om[:, :18] for om in oms]
    masks = [om[:, 18:].sigmoid() for om in oms]

    def quirk_offset(o, h, w):
        return o.as_strided((n, 18, h, w), (o.stride(0), h * w, w, 1), o.storage_offset())

    def quirk_mask(m, h, w):
        return m.flatten(1)[:, :9 * h * w].unflatten(1, (9, h, w))

    set_offsets = [offsets, offsets[1:], [quirk_offset(offsets[l], *VIEW_SIZES[l + 1]) for l in range(2)]]
    set_masks = [masks, masks[1:], [quirk_mask(masks[l], *VIEW_SIZES[l + 1]) for l in range(2)]]
    inputs = [t[f"x{l}"] for l in range(3)]
    weights = [t[f"weight{s}"] for s in range(3)]
    return t, (inputs, weights, [None, t["bias1"], None], DYHEAD[0], set_offsets, set_masks)


@needs_kernels
def test_shared_sliced_and_quirk_view_offsets():
    """Gradients w.r.t. the 27-channel leaves sum over the sets that read them, through every kind of view."""
    ref, (xs, weights, biases, levels, offsets, masks) = dyhead_views(torch.float64, "cpu")
    ys_ref = [[torchvision.ops.deform_conv2d(xs[i], o, weights[s], biases[s], DYHEAD[1][s], padding=1, mask=m)
               for i, o, m in zip(levels[s], offsets[s], masks[s])] for s in range(3)]
    out, args = dyhead_views(torch.float32, DEVICE)
    assert not any(o.is_contiguous() for o in flat(args[4]))
    assert not any(m.is_contiguous() for m in args[5][2])
    ys = modulated_deform_conv2d_sets(*args, strides=DYHEAD[1])
    g_outs = grad_outs_like(flat(ys_ref))
    g_ref = pyramid_grads(flat(ys_ref), g_outs, ref)
    g = pyramid_grads(flat(ys), [g.to(DEVICE) for g in g_outs], out)
    for k, (y, y_ref) in enumerate(zip(flat(ys), flat(ys_ref), strict=True)):
        assert y.shape == y_ref.shape and rel_err(y, y_ref) < 1e-5, k
    for name in ref:
        assert rel_err(g[name], g_ref[name]) < 1e-5, name


@needs_kernels
@pytest.mark.parametrize("deterministic", [False, True])
def test_equals_one_level_op(deterministic):
    """Each conv computes what modulated_deform_conv2d computes on it: the same outputs and offset and mask
    gradients (bitwise in the interpreter), and the input, weight and bias gradients summed over the convs
    that use them (in another order)."""
    sizes, levels, strides = SMALL
    t = sets_leaves(make_sets(1, 5, 4, sizes, levels, strides), torch.float32, DEVICE)
    ys, ys_one = flat(sets_op(t, levels, strides, deterministic)), flat(one_level_ops(t, levels, strides,
                                                                                        deterministic))
    g_outs = [g.to(DEVICE) for g in grad_outs_like(ys)]
    g, g_one = pyramid_grads(ys, g_outs, t), pyramid_grads(ys_one, g_outs, t)
    for k, (y, y_one) in enumerate(zip(ys, ys_one, strict=True)):
        assert same(y, y_one), k
    for name in g:
        if name.startswith(("input", "weight", "bias")):
            torch.testing.assert_close(g[name], g_one[name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name}: {m}")
        else:
            assert same(g[name], g_one[name]), name


@needs_kernels
def test_one_set_equals_pyramid_op():
    """One set on levels range(L) (stride as an int for every set) is the pyramid op."""
    t = sets_leaves(make_sets(1, 5, 4, VIEW_SIZES, [range(3)], 2), torch.float32, DEVICE)
    inputs, weights, biases, offsets, masks = sets_args(t)
    (ys,) = modulated_deform_conv2d_sets(inputs, weights, biases, [range(3)], offsets, masks, strides=2,
                                         deterministic=True)
    ys_pyramid = modulated_deform_conv2d_pyramid(inputs, offsets[0], masks[0], weights[0], biases[0], 2,
                                                 deterministic=True)
    g_outs = [g.to(DEVICE) for g in grad_outs_like(ys)]
    g, g_pyramid = pyramid_grads(ys, g_outs, t), pyramid_grads(ys_pyramid, g_outs, t)
    for level, (y, y_pyramid) in enumerate(zip(ys, ys_pyramid, strict=True)):
        assert same(y, y_pyramid), level
    for name in g:
        assert same(g[name], g_pyramid[name]), name


@needs_kernels
def test_deterministic_gradients_are_bitwise_equal():
    sizes, levels, strides = SMALL
    t = sets_leaves(make_sets(1, 4, 3, sizes, levels, strides), torch.float32, DEVICE)
    ys = flat(sets_op(t, levels, strides, deterministic=True))
    g_outs = [g.to(DEVICE) for g in grad_outs_like(ys)]
    first = pyramid_grads(ys, g_outs, t)
    second = pyramid_grads(flat(sets_op(t, levels, strides, deterministic=True)), g_outs, t)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@needs_kernels
@pytest.mark.parametrize("wanted", [("input1", "offset1_0", "mask2_1", "weight0", "bias1"), ("bias2",)])
def test_only_wanted_gradients(wanted):
    """Tensors that do not require grad get none; the others are still exact (input 1 feeds all three sets)."""
    levels, strides = DYHEAD
    p = make_sets(1, 4, 3, SIZES, levels, strides)
    ref = sets_leaves(p, torch.float64, "cpu")
    ys_ref = flat(sets_reference(ref, levels, strides))
    g_outs = grad_outs_like(ys_ref)
    g_ref = pyramid_grads(ys_ref, g_outs, ref)
    t = sets_leaves(p, torch.float32, DEVICE, wanted)
    ys = flat(sets_op(t, levels, strides))
    assert all(y.requires_grad for y in ys)
    g = pyramid_grads(ys, [g.to(DEVICE) for g in g_outs], {k: v for k, v in t.items() if k in wanted})
    assert g.keys() == set(wanted)
    for name in g:
        assert rel_err(g[name], g_ref[name]) < 1e-5, name


@needs_kernels
@pytest.mark.parametrize("bases", [False, True])
def test_double_backward_raises(bases):
    """As the one-conv op: a gradient penalty on a loss linear in the outputs raises instead of losing its
    terms, with the offsets and masks given as they are or as views of sample_bases."""
    p = make_sets(1, 3, 2, SIZES[2:], [[0]], 1)
    t = sets_leaves(p, torch.float32, DEVICE)
    inputs, weights, biases, offsets, masks = sets_args(t)
    sample_bases = None
    if bases:
        sample_bases = [torch.cat([offsets[0][0], masks[0][0]], 1).detach().requires_grad_()]
        offsets, masks = [[sample_bases[0][:, :18]]], [[sample_bases[0][:, 18:]]]
    ys = modulated_deform_conv2d_sets(inputs, weights, biases, [[0]], offsets, masks, sample_bases=sample_bases)
    out = ys[0][0].sum()
    g = torch.autograd.grad(out, inputs[0], create_graph=True)[0]
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(out + g.square().sum(), weights[0])


@needs_kernels
def test_unused_input_gets_no_gradient():
    """An input no set reads gets None or zeros; the others are exact."""
    levels, strides = [[0], [2, 0]], 1
    p = make_sets(1, 4, 3, SIZES, levels, strides)
    ref = sets_leaves(p, torch.float64, "cpu")
    ys_ref = flat(sets_reference(ref, levels, strides))
    g_outs = grad_outs_like(ys_ref)
    g_ref = pyramid_grads(ys_ref, g_outs, {k: v for k, v in ref.items() if k != "input1"})
    t = sets_leaves(p, torch.float32, DEVICE)
    ys = flat(sets_op(t, levels, strides))
    assert [y.shape for y in ys] == [y.shape for y in ys_ref]
    names = list(t)
    loss = sum((y * g.to(y)).sum() for y, g in zip(ys, g_outs))
    g = dict(zip(names, torch.autograd.grad(loss, [t[k] for k in names], allow_unused=True)))
    assert g["input1"] is None or not g["input1"].any()
    for name, expected in g_ref.items():
        assert rel_err(g[name], expected) < 1e-5, name


@needs_kernels
def test_no_input_channels_give_each_set_its_bias():
    """Cin = 0: nothing is sampled, so each conv's output is its own set's bias (zeros for the set without one),
    each bias gradient sums the output gradients of its set's convs, and the offsets and masks get zero
    gradients. Three sets, the middle one without bias, so that no set reads another's bias row. Kills filling
    every conv with set 0's bias (`deform_conv_forward`'s Cin = 0 path) and summing only a set's first conv
    into its bias gradient."""
    gen = torch.Generator().manual_seed(4)
    n, cout, levels, strides = 2, 3, [[0, 1], [1], [0]], [1, 2, 1]
    inputs = [torch.randn(n, 0, h, w, dtype=torch.float64) for h, w in SIZES[1:]]
    weights = [torch.randn(cout, 0, 3, 3, dtype=torch.float64) for _ in levels]
    biases = [torch.randn(cout, generator=gen, dtype=torch.float64), None,
              torch.randn(cout, generator=gen, dtype=torch.float64)]
    outs = [[out_size(*SIZES[1:][i], 3, strides[s], 1, 1) for i in indices] for s, indices in enumerate(levels)]
    offsets = [[torch.randn(n, 18, *hw, generator=gen, dtype=torch.float64) for hw in hws] for hws in outs]
    masks = [[torch.rand(n, 9, *hw, generator=gen, dtype=torch.float64) for hw in hws] for hws in outs]
    t = {k: v.to(DEVICE).requires_grad_() for k, v in {"bias0": biases[0], "bias2": biases[2],
                                                        **{f"offset{s}_{j}": o for s, seq in enumerate(offsets)
                                                           for j, o in enumerate(seq)}}.items()}
    ys = modulated_deform_conv2d_sets(
        [x.to(DEVICE) for x in inputs], [w.to(DEVICE) for w in weights], [t["bias0"], None, t["bias2"]], levels,
        [[t[f"offset{s}_{j}"] for j in range(len(seq))] for s, seq in enumerate(offsets)],
        [[m.to(DEVICE) for m in seq] for seq in masks], strides=strides)
    for s, y_set in enumerate(ys):
        for y, (ho, wo) in zip(y_set, outs[s], strict=True):
            expected = torch.zeros(n, cout, ho, wo, dtype=torch.float64) if biases[s] is None else (
                biases[s][None, :, None, None].expand(n, cout, ho, wo))
            assert torch.equal(y.cpu(), expected), s
    g_outs = grad_outs_like(flat(ys))
    loss = sum((y * g.to(y)).sum() for y, g in zip(flat(ys), g_outs))
    g = dict(zip(t, torch.autograd.grad(loss, list(t.values()))))
    bounds = [0, 2, 3, 4]  # each set's range of convs in flat(ys)
    for s in (0, 2):
        expected = sum(go.sum(dim=(0, 2, 3)) for go in g_outs[bounds[s]:bounds[s + 1]])
        torch.testing.assert_close(g[f"bias{s}"].cpu(), expected)
    assert all(not g[name].any() for name in t if name.startswith("offset"))


@needs_kernels
def test_custom_op_matches_eager_path():
    """The custom op (what torch.compile traces) computes what the eager path computes: one flat buffer, the
    convs' outputs set after set."""
    sizes, levels, strides = SMALL
    t = sets_leaves(make_sets(1, 5, 4, sizes, levels, strides, [True, False, True]), torch.float32, DEVICE)
    inputs, weights, biases, offsets, masks = sets_args(t)
    ys = flat(sets_op(t, levels, strides, deterministic=True))
    bias_sets = [s for s, b in enumerate(biases) if b is not None]
    bases, views = deform_conv_op._sample_args(flat(offsets), flat(masks))
    buffer = deform_conv_op._sets_forward_op(inputs, bases, weights, [biases[s] for s in bias_sets], bias_sets,
                                             views, flat(levels), [len(indices) for indices in levels],
                                             [1, 1, 2, 2, 1, 1], 1, 1, 1, 1, False, True)
    assert buffer.shape == (sum(y.numel() for y in ys),)
    ys_op = [part.view(y.shape) for part, y in zip(buffer.split([y.numel() for y in ys]), ys)]
    g_outs = [g.to(DEVICE) for g in grad_outs_like(ys)]
    g, g_op = pyramid_grads(ys, g_outs, t), pyramid_grads(ys_op, g_outs, t)
    for k, (y, y_op) in enumerate(zip(ys, ys_op)):
        assert torch.equal(y, y_op), k
    for name in g:
        assert torch.equal(g[name], g_op[name]), name


class SetsConvLike(torch.nn.Module):
    """A DyHead block's spatial convs on 2 levels in one call: one offset conv per level whose 27 channels feed
    the sets as slices (offsets) and a sigmoid (mask); set "same" (stride 1, both levels), "finer" (stride 2,
    level 0 to level 1's size) and "coarser" (stride 1 on level 1, level 0's offsets cropped). Sets 0 and 2
    share one bias, set 1 has none."""

    def __init__(self, c):
        super().__init__()
        self.offset_conv = torch.nn.Conv2d(c, 27, 3, padding=1)
        self.weights = torch.nn.ParameterList(torch.randn(c, c, 3, 3) / (9 * c) ** 0.5 for _ in range(3))
        self.bias = torch.nn.Parameter(torch.randn(c))

    def forward(self, xs):
        oms = [self.offset_conv(x) for x in xs]
        offsets, masks = [om[:, :18] for om in oms], [om[:, 18:].sigmoid() for om in oms]
        h, w = xs[1].shape[2:]
        return modulated_deform_conv2d_sets(
            xs, list(self.weights), [self.bias, None, self.bias], [[0, 1], [0], [1]],
            [offsets, offsets[1:], [offsets[0][..., :h, :w]]], [masks, masks[1:], [masks[0][..., :h, :w]]],
            strides=[1, 2, 1])


@needs_kernels
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend):
    """fullgraph=True fails on any graph break; inductor on the CPU needs a C++ compiler."""
    torch.manual_seed(0)
    module = SetsConvLike(4).to(DEVICE)
    xs = [torch.randn(1, 4, h, w, device=DEVICE, requires_grad=True) for h, w in [(5, 6), (3, 3)]]
    assert check_compiled_matches_eager(module, xs, backend, flat) == 4


@needs_kernels
def test_autocast_runs_in_half_precision():
    """Under autocast every conv goes to the kernels in float16, as the one-level op does; the gradients of
    the float32 leaves come back in float32."""
    sizes, levels, strides = SMALL
    t = sets_leaves(make_sets(1, 3, 2, sizes, levels, strides), torch.float32, DEVICE)
    with torch.autocast(DEVICE, dtype=torch.float16):
        ys = flat(sets_op(t, levels, strides))
        ys_one = flat(one_level_ops(t, levels, strides))
    for k, (y, y_one) in enumerate(zip(ys, ys_one, strict=True)):
        assert y.dtype == torch.float16 and same(y, y_one), k
    g_outs = [g.to(DEVICE) for g in grad_outs_like(ys)]
    g, g_one = pyramid_grads(ys, g_outs, t), pyramid_grads(ys_one, g_outs, t)
    for name in g:
        assert g[name].dtype == torch.float32 and rel_err(g[name], g_one[name].double().cpu()) < 5e-3, name


def test_fake_impl_shapes():
    """Fake tensors (what torch.compile traces with) get each conv's shape; strides per set, one of them a
    (h, w) pair."""
    levels, strides = [[0, 1, 2], [0, 1], [2]], [1, 2, (1, 2)]
    t = {k: v.detach() for k, v in sets_leaves(make_sets(2, 3, 4, SIZES, levels, strides), torch.float32,
                                                "cpu").items()}
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) for k, v in t.items()}
        ys = sets_op(fake, levels, strides)
    assert [[tuple(y.shape) for y in y_set] for y_set in ys] == [
        [(2, 4, 7, 9), (2, 4, 4, 5), (2, 4, 2, 3)], [(2, 4, 4, 5), (2, 4, 2, 3)], [(2, 4, 2, 2)]]


def _good_args():
    """Float32 CPU arguments of the DyHead sets call (N=2, Cin=4, Cout=3), as a dict of mutable lists."""
    p = make_sets(2, 4, 3, SIZES, *DYHEAD)
    return {"inputs": [x.float() for x in p["input"]], "weights": [w.float() for w in p["weight"]],
            "biases": [b.float() for b in p["bias"]], "levels": [list(indices) for indices in DYHEAD[0]],
            "offsets": [[o.float() for o in os] for os in p["offset"]],
            "masks": [[m.float() for m in ms] for ms in p["mask"]], "strides": list(DYHEAD[1])}


def _put(key, index, value):
    """An edit of `_good_args` that sets args[key][s][j] (index (s, j)) or args[key][i] (index (i,))."""
    def edit(args):
        *outer, last = index
        target = args[key]
        for i in outer:
            target = target[i]
        target[last] = value
    return edit


def _batch_of_input1(args):
    """Input 1 and every offset and mask of the convs on it (sets A, B conv 1, set C conv 0) with N=1."""
    args["inputs"][1] = torch.randn(1, 4, 4, 5)
    for s, j in ((0, 1), (1, 1), (2, 0)):
        args["offsets"][s][j], args["masks"][s][j] = args["offsets"][s][j][:1], args["masks"][s][j][:1]


def _other_weight_shape(args):
    args.update(biases=None)
    args["weights"][1] = torch.randn(5, 4, 3, 3)


# (edit of the DyHead call's args, error, message). Where a conv's index j in its set and its input index
# differ, the message may name either as the level: these cases use convs where they coincide.
BAD_INPUTS = {
    "offset_size": (_put("offsets", (1, 1), torch.randn(2, 18, 2, 4)), ValueError,
                    r"set 1, level 1: offset must be \(2, 18, 2, 3\)"),
    "mask_none": (_put("masks", (0, 2), None), TypeError, "set 0, level 2: mask must be a Tensor"),
    "mask_channels": (_put("masks", (0, 1), torch.rand(2, 18, 4, 5)), ValueError,
                      r"set 0, level 1: mask must be \(2, 9, 4, 5\)"),
    "offset_dtype": (_put("offsets", (1, 0), torch.randn(2, 18, 4, 5, dtype=torch.float64)), TypeError,
                     "set 1, level 0: offset has dtype"),
    "bias_shape": (_put("biases", (2,), torch.randn(4)), ValueError, r"set 2\b.*bias must be \(3,\)"),
    "input_dtype": (_put("inputs", (2,), torch.randn(2, 4, 2, 3, dtype=torch.float64)), TypeError, "dtype"),
    "weight_dtype": (_put("weights", (1,), torch.randn(3, 4, 3, 3, dtype=torch.float64)), TypeError, "dtype"),
    "batch": (_batch_of_input1, ValueError, r"\b(N|batch)\b"),
    "weight_shapes": (_other_weight_shape, ValueError, "weights"),
    "index_out_of_range": (_put("levels", (0, 2), 5), ValueError, "out of range"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.keys())
def test_bad_inputs_name_the_set_and_level(case):
    edit, error, message = BAD_INPUTS[case]
    args = _good_args()
    edit(args)
    with pytest.raises(error, match=message):
        modulated_deform_conv2d_sets(args["inputs"], args["weights"], args["biases"], args["levels"],
                                     args["offsets"], args["masks"], strides=args["strides"])


BAD_LISTS = {
    "offsets_of_a_set": lambda a: a["offsets"].__setitem__(1, a["offsets"][1][:1]),
    "masks_of_a_set": lambda a: a["masks"][2].append(a["masks"][2][0]),
    "offsets_per_set": lambda a: a.update(offsets=a["offsets"][:2]),
    "masks_per_set": lambda a: a.update(masks=a["masks"][:2]),
    "weights_per_set": lambda a: a.update(weights=a["weights"][:2]),
    "levels_per_set": lambda a: a.update(levels=a["levels"][:2]),
    "biases_per_set": lambda a: a.update(biases=a["biases"][:2]),
    "no_sets": lambda a: a.update(weights=[], biases=None, levels=[], offsets=[], masks=[], strides=1),
}


@pytest.mark.parametrize("case", BAD_LISTS.keys())
def test_bad_lists_raise(case):
    args = _good_args()
    BAD_LISTS[case](args)
    with pytest.raises(ValueError):
        modulated_deform_conv2d_sets(args["inputs"], args["weights"], args["biases"], args["levels"],
                                     args["offsets"], args["masks"], strides=args["strides"])


@needs_kernels
def test_one_numpy_integer_stride_serves_every_set():
    """A numpy integer as the one stride of every set, as a Python int is (it was refused as no list)."""
    sizes, levels = SMALL[0], [[0, 1], [1]]
    t = sets_leaves(make_sets(1, 3, 2, sizes, levels, 2), torch.float32, DEVICE)
    for a, b in zip(flat(sets_op(t, levels, np.int64(2))), flat(sets_op(t, levels, 2))):
        assert torch.equal(a, b)


def test_strides_list_of_wrong_length_raises():
    args = _good_args()
    with pytest.raises((TypeError, ValueError)):
        modulated_deform_conv2d_sets(args["inputs"], args["weights"], args["biases"], args["levels"],
                                     args["offsets"], args["masks"], strides=[1, 2, 1, 1])


@needs_kernels
@pytest.mark.parametrize("op", ["sets", "pyramid"])
def test_deterministic_default_follows_torch(monkeypatch, op):
    """deterministic=None takes torch.are_deterministic_algorithms_enabled() in the sets and pyramid ops too,
    as in the one-level op. Kills the sets launch defaulting to False (atomics under
    torch.use_deterministic_algorithms(True))."""
    seen = []
    backward = deform_conv_op.deform_conv_backward.deform_conv_backward
    monkeypatch.setattr(deform_conv_op.deform_conv_backward, "deform_conv_backward",
                        lambda *args: seen.append(args[8]) or backward(*args))
    sizes, levels, strides = SMALL
    t = sets_leaves(make_sets(1, 3, 2, sizes, levels, strides), torch.float32, DEVICE)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        for flag in (True, False):
            torch.use_deterministic_algorithms(flag)
            if op == "sets":
                ys = flat(sets_op(t, levels, strides))
            else:
                ys = modulated_deform_conv2d_pyramid([t["input0"], t["input1"]], [t["offset0_0"], t["offset0_1"]],
                                                     [t["mask0_0"], t["mask0_1"]], t["weight0"], t["bias0"],
                                                     padding=1)
            sum(y.sum() for y in ys).backward()
    finally:
        torch.use_deterministic_algorithms(was)
    assert seen == [True, False]
