"""modulated_deform_conv2d_sets with sample_bases and mask_logits: DyHead's convs reading their offsets and
mask logits as views of each level's 27-channel offset-conv output, the sigmoid applied while sampling and the
gradients written straight into the outputs' gradients, against torchvision.ops.deform_conv2d in float64 on
the same views (sigmoid and view backward by autograd).

Three levels, each ceil of the previous / 2, as in a DyHead block: set A ("same") stride 1 on every level; set
B ("finer") stride 2 on levels 0, 1, reading levels 1, 2's offsets; set C ("coarser") on levels 1, 2, reading
levels 0, 1's offsets through the release's view (each image's first K*h*w values as (K, h, w)). Every base
element is read by up to three convs, so their gradients add.
"""

import pytest
import torch
import torchvision
from deform_conv_cases import DEVICE, check_compiled_matches_eager, needs_kernels, rel_err

from kernels import modulated_deform_conv2d_sets

SIZES = [(5, 6), (3, 3), (2, 2)]
LEVELS, STRIDES = [[0, 1, 2], [0, 1], [1, 2]], [1, 2, 1]


def quirk_view(t, h, w):
    """The release's coarser-level view of t (N, K, H, W), each image's block contiguous: its first K*h*w
    values as (K, h, w)."""
    n, k = t.shape[:2]
    return t.flatten(1)[:, :k * h * w].unflatten(1, (k, h, w))


def make_case(n=2, c=4, seed=0):
    """float64 leaves: inputs, the offset-conv outputs "om" (N, 27, H, W) per level (offsets of a few pixels,
    logits around 0), three weights and biases."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=gen, dtype=torch.float64))
    om = []
    for h, w in SIZES:
        t = randn(n, 27, h, w)
        t[:, :18] *= 2.5
        om.append(t)
    return {"inputs": [randn(n, c, h, w) for h, w in SIZES], "om": om,
            "weights": [randn(c, c, 3, 3, scale=(9 * c) ** -0.5) for _ in range(3)],
            "biases": [randn(c) for _ in range(3)]}


def leaves_of(case, dtype):
    return {k: [t.to(DEVICE, dtype, copy=True).requires_grad_() for t in v] for k, v in case.items()}


def views(om, logits_as_masks):
    """Per set, the convs' offsets and masks: views of om (masks: the logits' views, or their sigmoid)."""
    offsets = [t[:, :18] for t in om]
    masks = [t[:, 18:] if logits_as_masks else t[:, 18:].sigmoid() for t in om]
    coarse = SIZES[1:]
    return ([offsets, offsets[1:], [quirk_view(o, *hw) for o, hw in zip(offsets, coarse)]],
            [masks, masks[1:], [quirk_view(m, *hw) for m, hw in zip(masks, coarse)]])


def reference(t):
    offsets, masks = views(t["om"], logits_as_masks=False)
    return [torchvision.ops.deform_conv2d(t["inputs"][i], o, t["weights"][s], t["biases"][s], STRIDES[s],
                                          padding=1, mask=m)
            for s in range(3) for i, o, m in zip(LEVELS[s], offsets[s], masks[s])]


def triton(t, bases=True, deterministic=None):
    offsets, masks = views(t["om"], logits_as_masks=True)
    ys = modulated_deform_conv2d_sets(t["inputs"], t["weights"], t["biases"], LEVELS, offsets, masks, STRIDES,
                                      deterministic=deterministic, sample_bases=t["om"] if bases else None,
                                      mask_logits=True)
    return [y for ys_set in ys for y in ys_set]


def gradients(ys, t):
    grad_outs = [torch.randn(y.shape, generator=torch.Generator().manual_seed(1 + k), dtype=torch.float64)
                 for k, y in enumerate(ys)]
    tensors = [x for v in t.values() for x in v]
    loss = sum((y * g.to(y)).sum() for y, g in zip(ys, grad_outs))
    return torch.autograd.grad(loss, tensors)


@needs_kernels
@pytest.mark.parametrize("bases", [True, False])
@pytest.mark.parametrize("deterministic", [False, True])
def test_matches_torchvision_on_views_of_the_offset_conv(bases, deterministic):
    case = make_case()
    expected_t = leaves_of(case, torch.float64)
    expected = reference(expected_t)
    g_expected = gradients(expected, expected_t)
    t = leaves_of(case, torch.float32)
    ys = triton(t, bases, deterministic)
    g = gradients(ys, t)
    for k, (y, e) in enumerate(zip(ys, expected, strict=True)):
        assert rel_err(y, e) < 1e-5, k
    names = [f"{k}{i}" for k, v in case.items() for i in range(len(v))]
    for name, a, b in zip(names, g, g_expected, strict=True):
        assert a.dtype == torch.float32 and rel_err(a, b) < 1e-5, name


@needs_kernels
def test_deterministic_gradients_are_bitwise_equal():
    t = leaves_of(make_case(seed=3), torch.float32)
    first, second = (gradients(triton(t, deterministic=True), t) for _ in range(2))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@needs_kernels
def test_only_the_bases_get_gradients():
    """The views are how the convs read: the gradient of an offset view taken as a leaf stays None."""
    t = leaves_of(make_case(), torch.float32)
    offsets, masks = views(t["om"], logits_as_masks=True)
    ys = modulated_deform_conv2d_sets(t["inputs"], t["weights"], t["biases"], LEVELS, offsets, masks, STRIDES,
                                      sample_bases=t["om"], mask_logits=True)
    grad = torch.autograd.grad(sum(y.sum() for ys_set in ys for y in ys_set), [offsets[0][0], *t["om"]],
                               allow_unused=True)
    assert grad[0] is None and all(g is not None and g.shape == om.shape for g, om in zip(grad[1:], t["om"]))


def _args(t):
    offsets, masks = views(t["om"], logits_as_masks=True)
    return [t["inputs"], t["weights"], t["biases"], LEVELS, offsets, masks, STRIDES]


@pytest.mark.parametrize("edit, message", [
    (lambda args, om: args[4][0].__setitem__(0, torch.zeros_like(args[4][0][0])),
     "offsets, conv 0 is not a view inside any of sample_bases"),
    (lambda args, om: om.__setitem__(1, om[1].transpose(2, 3)), "sample_bases\\[1\\] must be contiguous"),
    (lambda args, om: args[5][2].__setitem__(1, om[2][:, 18:][:1].expand(2, -1, -1, -1)),
     "masks, conv 6 may have elements that share memory"),
])
def test_offsets_outside_the_bases_are_refused(edit, message):
    t = {k: [x.float() for x in v] for k, v in make_case().items()}
    args, om = _args(t), list(t["om"])
    edit(args, om)
    with pytest.raises((ValueError, TypeError), match=message):
        modulated_deform_conv2d_sets(*args, sample_bases=om, mask_logits=True)


class SampleBasesConvLike(torch.nn.Module):
    """Two levels of a DyHead block's convs reading views of each level's offset conv, as DyHead's triton
    backend calls them: mask logits, sample_bases."""

    def __init__(self, c):
        super().__init__()
        self.offset_conv = torch.nn.Conv2d(c, 27, 3, padding=1)
        self.weights = torch.nn.ParameterList(torch.randn(c, c, 3, 3) / (9 * c) ** 0.5 for _ in range(3))

    def forward(self, xs):
        oms = [self.offset_conv(x) for x in xs]
        offsets, logits = [om[:, :18] for om in oms], [om[:, 18:] for om in oms]
        h, w = xs[1].shape[2:]
        ys = modulated_deform_conv2d_sets(
            xs, list(self.weights), None, [[0, 1], [0], [1]],
            [offsets, offsets[1:], [quirk_view(offsets[0], h, w)]], [logits, logits[1:], [quirk_view(logits[0], h, w)]],
            strides=[1, 2, 1], sample_bases=oms, mask_logits=True)
        return [y for ys_set in ys for y in ys_set]


@needs_kernels
def test_torch_compile_fullgraph_differentiates_the_views():
    """Traced calls leave sample_bases aside (the custom op gets the views) and still match eager."""
    torch.manual_seed(0)
    module = SampleBasesConvLike(4).to(DEVICE)
    xs = [torch.randn(1, 4, h, w, device=DEVICE, requires_grad=True) for h, w in [(5, 6), (3, 3)]]
    assert check_compiled_matches_eager(module, xs, "aot_eager") == 4


@needs_kernels
def test_autocast_copies_leave_the_bases_aside():
    """Under autocast float32 offsets and masks are cast to copies, which are no views of the bases: the call
    then differentiates the copies, and the bases get the same gradients as without sample_bases."""
    case = make_case()
    results = []
    for bases in (True, False):
        t = leaves_of(case, torch.float32)
        with torch.autocast(DEVICE, dtype=torch.float16):
            ys = triton(t, bases)
        assert all(y.dtype == torch.float16 for y in ys)
        results.append(gradients(ys, t))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def _check_against_torchvision(leaves, convs):
    """The sets op in float64 with mask_logits and sample_bases against torchvision on the same views (sigmoid
    and view backward by autograd): outputs and the gradients of every leaf. leaves: float64 tensors; convs(t)
    builds, from leaves t that require grad, (inputs, weights, levels, offsets, logits, sample_bases) of one
    call, the views taken of t's tensors."""
    def leaf_copies():
        return [t.to(DEVICE, copy=True).requires_grad_() for t in leaves]

    ref = leaf_copies()
    inputs, weights, levels, offsets, logits, _ = convs(ref)
    expected = [torchvision.ops.deform_conv2d(inputs[i], o, weights[s], padding=1, mask=m.sigmoid())
                for s in range(len(levels)) for i, o, m in zip(levels[s], offsets[s], logits[s])]
    t = leaf_copies()
    inputs, weights, levels, offsets, logits, bases = convs(t)
    ys = [y for ys_set in modulated_deform_conv2d_sets(inputs, weights, None, levels, offsets, logits,
                                                       sample_bases=bases, mask_logits=True) for y in ys_set]
    for k, (y, e) in enumerate(zip(ys, expected, strict=True)):
        assert rel_err(y, e) < 1e-12, k
    for k, (g, g_expected) in enumerate(zip(gradients(ys, {"t": t}), gradients(expected, {"t": ref}),
                                            strict=True)):
        assert rel_err(g, g_expected) < 1e-12, k


@needs_kernels
@pytest.mark.parametrize("order", [1, -1], ids=["storage_order", "reversed"])
def test_bases_that_start_inside_a_larger_buffer(order):
    """Sample bases that are contiguous views of one larger buffer, past its first element (the levels'
    offset-conv outputs as parts of one allocation): views are placed relative to their base's first element,
    where the convs read them and where their gradients land. Listed in reverse, the first base tried for
    level 0's views starts after them in the storage. Kills placing a view by its own storage offset
    (`_find_views` without subtracting the base's), and taking a view that starts before a base for one of
    it (without the check 0 <= first)."""
    sizes, n, c = [(3, 4), (2, 2)], 1, 2
    numels = [n * 27 * h * w for h, w in sizes]
    gen = torch.Generator().manual_seed(5)
    randn = lambda *shape, scale=1.0: scale * torch.randn(*shape, generator=gen, dtype=torch.float64)
    # One element before the first base, so that no base starts where the storage does.
    leaves = [randn(1 + sum(numels), scale=2.0), *(randn(n, c, h, w) for h, w in sizes),
              randn(c, c, 3, 3, scale=(9 * c) ** -0.5)]

    def convs(t):
        oms = [part.view(n, 27, h, w) for part, (h, w) in zip(t[0][1:].split(numels), sizes)]
        return (t[1:3], [t[3]], [[0, 1]], [[om[:, :18] for om in oms]], [[om[:, 18:] for om in oms]], oms[::order])

    _check_against_torchvision(leaves, convs)


@needs_kernels
def test_view_with_its_base_shape_and_other_strides():
    """An offset that has its base's shape but other strides (a square base transposed) is read through its
    strides, and its gradient lands transposed in the base's. Kills `_sample_views` taking a view at the base's
    start with the base's shape for the base itself, whatever its strides."""
    n, c, h = 1, 2, 3
    gen = torch.Generator().manual_seed(6)
    randn = lambda *shape, scale=1.0: scale * torch.randn(*shape, generator=gen, dtype=torch.float64)
    leaves = [randn(n, c, h, h), randn(n, 18, h, h, scale=2.0), randn(n, 9, h, h),
              *(randn(c, c, 3, 3, scale=(9 * c) ** -0.5) for _ in range(2))]

    def convs(t):
        x, offset, logits = t[:3]
        # Two sets on the one input: the second reads the offset base transposed.
        return ([x], t[3:], [[0], [0]], [[offset], [offset.transpose(2, 3)]], [[logits], [logits]],
                [offset, logits])

    _check_against_torchvision(leaves, convs)


@needs_kernels
def test_autocast_casting_some_views_leaves_the_bases_aside():
    """Under autocast, bases of mixed dtypes (one level's offset conv already in float16, another's in float32):
    the float16 views are used as they are, the float32 ones are cast to copies, and one cast copy is enough to
    leave sample_bases aside, as the docstring says: the gradients are those of a call without them. Kills
    leaving the bases aside only when every view was cast."""
    gen = torch.Generator().manual_seed(8)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    n, c, sizes = 1, 2, [(3, 3), (2, 2)]
    case = [*(randn(n, c, h, w) for h, w in sizes), *(randn(n, 27, h, w) for h, w in sizes), randn(c, c, 3, 3)]
    results = []
    for bases in (True, False):
        t = [x.to(DEVICE, dtype, copy=True).requires_grad_()
             for x, dtype in zip(case, [torch.float32] * 3 + [torch.float16, torch.float32])]
        oms = t[2:4]
        with torch.autocast(DEVICE, dtype=torch.float16):
            ys = modulated_deform_conv2d_sets(t[:2], [t[4]], None, [[0, 1]], [[om[:, :18] for om in oms]],
                                              [[om[:, 18:] for om in oms]], sample_bases=oms if bases else None,
                                              mask_logits=True)
        results.append(gradients(ys[0], {"t": t}))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@needs_kernels
def test_empty_batch_with_sample_bases():
    """A batch of no images (N = 0): empty outputs, and the bases' gradients zero in their shape; views of no
    elements lie in no storage, so any base of their dtype takes them. Kills refusing them as outside the
    bases (`_find_views` without its empty-view case)."""
    t = leaves_of({k: [x[:0] if k in ("inputs", "om") else x for x in v] for k, v in make_case().items()},
                  torch.float32)
    ys = triton(t)
    assert [y.shape[0] for y in ys] == [0] * len(ys)
    grads = torch.autograd.grad(sum(y.sum() for y in ys), t["om"] + t["weights"])
    assert all(g.shape == x.shape and not g.any() for g, x in zip(grads, t["om"] + t["weights"], strict=True))
