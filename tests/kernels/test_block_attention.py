"""kernels.block_attention (a DyHead block's attention math in one launch each way) against dyhead.fused's torch
path with the modules' own math, in float64 (and float32): outputs and the gradients of the moments and of
every parameter. Runs under TRITON_INTERPRET=1 on the CPU, compiled on a GPU."""

import pytest
import torch
from torch import nn

from dyhead.fused import _attention
from dyhead.scale import ScaleAttention
from dyhead.task import TaskAttention
from kernels import block_attention
from kernels.runtime import INTERPRET

DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET,
                                reason="the kernels need a GPU or TRITON_INTERPRET=1")

# A DyHead block's (level, slot) grid: slot 0 the level's own branch (norm 0), then finer (1) and coarser (2)
# where they exist; an empty slot has norm -1 and one pixel.
PYRAMID_NORMS = [0, 2, -1, 0, 1, 2, 0, 1, -1]
PYRAMID_PIXELS = [30, 8, 1, 8, 30, 2, 2, 8, 1]


def _modules(c, dtype, seed, groups=16, eps=1e-5):
    torch.manual_seed(seed)
    norms = [nn.GroupNorm(groups, c, eps=eps) for _ in range(3)]
    scale, task = ScaleAttention(c), TaskAttention(c)
    for module in (*norms, scale, task):
        for p in module.parameters():
            nn.init.normal_(p, 0.0, 0.5)
    # The scale logit's bias near 0 so that the relu and the hard sigmoid's bends are both crossed.
    return [m.to(DEVICE, dtype) for m in norms], scale.to(DEVICE, dtype), task.to(DEVICE, dtype)


def _moments(norms_of_slots, pixels, n, c, dtype):
    g = torch.Generator().manual_seed(1)
    moments = torch.randn(len(norms_of_slots), n, c, 3, generator=g, dtype=torch.float64)
    moments[..., 1] = moments[..., 1].abs() * torch.tensor(pixels, dtype=torch.float64).view(-1, 1, 1)
    moments[torch.tensor(norms_of_slots) < 0] = 0  # an empty slot's moments
    return moments.to(DEVICE, dtype)


def _kernel_attention(moments, norms, scale, task, norms_of_slots=PYRAMID_NORMS, pixels=PYRAMID_PIXELS):
    """block_attention of the modules' parameters (task None: without the task attention)."""
    return block_attention(moments, pixels, norms_of_slots, torch.stack([m.weight for m in norms]),
                           torch.stack([m.bias for m in norms]), norms[0].num_groups, norms[0].eps, scale.conv.weight.view(-1),
                           scale.conv.bias,
                           None if task is None else (task.fc1.weight, task.fc1.bias, task.fc2.weight, task.fc2.bias))


def _run_both(c, n, with_task, dtype, norms_of_slots=PYRAMID_NORMS, pixels=PYRAMID_PIXELS, modules=None):
    norms, scale, task = modules or _modules(c, dtype, seed=c + n)
    task = task if with_task else None
    moments = _moments(norms_of_slots, pixels, n, c, dtype).requires_grad_()
    num = len(norms_of_slots) // 3
    branches = [sum(k >= 0 for k in norms_of_slots[3 * l:3 * l + 3]) for l in range(num)]
    params = [p for m in (*norms, scale, *([task] if task else [])) for p in m.parameters()]
    expected = _attention(moments, num, list(pixels), [1.0 / b for b in branches],
                          [k if k >= 0 else 3 for k in norms_of_slots], norms, norms[0].num_groups, norms[0].eps, scale,
                          task)
    got = _kernel_attention(moments, norms, scale, task, norms_of_slots, pixels)
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(DEVICE, t.dtype) for t in expected]
    # Without task attention the coefficients are constants: the torch path gives them no graph.
    used = [k for k, e in enumerate(expected) if e.requires_grad]
    want = torch.autograd.grad([expected[k] for k in used], [moments, *params], [grads[k] for k in used],
                               allow_unused=True)
    have = torch.autograd.grad([got[k] for k in used], [moments, *params], [grads[k] for k in used],
                               allow_unused=True)
    return expected, got, want, have


@pytest.mark.parametrize("c,n", [(32, 2), (48, 1)])  # 2 and 3 channels per group (the tile pads the 3)
@pytest.mark.parametrize("with_task", [True, False])
def test_matches_the_torch_path_with_every_gradient_in_float64(c, n, with_task):
    expected, got, want, have = _run_both(c, n, with_task, torch.float64)
    for e, o in zip(expected, got):
        assert o.shape == e.shape and o.dtype == torch.float64 and o.is_contiguous()
        torch.testing.assert_close(o, e, rtol=1e-10, atol=1e-12)
    for w, h in zip(want, have):
        if w is None:
            assert h is None or torch.count_nonzero(h) == 0
        else:
            torch.testing.assert_close(h, w, rtol=1e-9, atol=1e-11)


def test_float32():
    expected, got, want, have = _run_both(32, 2, True, torch.float32)
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, rtol=2e-5, atol=2e-6)
    for w, h in zip(want, have):
        torch.testing.assert_close(h, w, rtol=1e-4, atol=1e-5)


def _assert_float64_match(expected, got, want, have):
    """`_run_both`'s outputs and the gradients that the torch path has, equal to float64 rounding."""
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, rtol=1e-10, atol=1e-12)
    for w, h in zip(want, have):
        if w is not None:
            torch.testing.assert_close(h, w, rtol=1e-9, atol=1e-11)


def test_single_level_without_neighbours():
    _assert_float64_match(*_run_both(32, 2, True, torch.float64, [0, -1, -1], [12, 1, 1]))


@pytest.mark.parametrize("c", [80, 272])
def test_channels_and_hidden_width_past_one_chunk(c):
    """The MLP's mat-vecs run in chunks of BLOCK_M = 64: past 64 channels the fc1 mat-vec and the pooled mean's
    gradient take several chunks of C, and past 256 channels (hidden = C / 4 > 64) fc2's mat-vec and the hidden
    layer several chunks of the hidden width. The other tests' C <= 48 fit one chunk of both."""
    _assert_float64_match(*_run_both(c, 1, True, torch.float64))


def test_groups_past_a_power_of_two_and_the_norms_own_eps():
    """24 channels in 6 groups: the tile's 8 groups run past the channels, which must be masked off on every load
    and store; and the GroupNorms' own eps (1e-2, not the default 1e-5) is the one the kernels use."""
    modules = _modules(24, torch.float64, seed=8, groups=6, eps=1e-2)
    _assert_float64_match(*_run_both(24, 2, True, torch.float64, modules=modules))


@pytest.mark.parametrize("scale_bias", [0.0, 3.0])
def test_gradients_at_the_bends_are_torchs(scale_bias):
    """Where relu and relu6 bend torch's gradient is zero (relu at 0, relu6 at 0 and 6). Zero weights put the
    scale logit exactly at the bias (relu's bend at 0, the hard sigmoid's upper one at 3) and the fc2 outputs
    exactly at their biases, -3 and 3 (the hard sigmoid's bends): the kernels must give torch's gradients there."""
    norms, scale, task = _modules(32, torch.float64, seed=7)
    with torch.no_grad():
        scale.conv.weight.zero_()
        scale.conv.bias.fill_(scale_bias)
        task.fc2.weight.zero_()
        task.fc2.bias.copy_(torch.tensor([-3.0, 3.0], dtype=torch.float64).repeat(64))
    _assert_float64_match(*_run_both(32, 2, True, torch.float64, modules=(norms, scale, task)))


def test_one_image_with_incoming_gradients_of_any_image_stride():
    """With N = 1 torch leaves the image dim's stride free in a contiguous tensor (the combine's gradients can come
    so, e.g. through a transpose): the kernels must read the row stride off the level dim."""
    norms, scale, task = _modules(32, torch.float64, seed=5)
    moments = _moments(PYRAMID_NORMS, PYRAMID_PIXELS, 1, 32, torch.float64).requires_grad_()
    outputs = _kernel_attention(moments, norms, scale, task)
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(DEVICE) for t in outputs]
    odd = [t.as_strided(t.shape, (t.stride(0), 7, *t.stride()[2:])) for t in grads]  # the same elements
    assert all(o.is_contiguous() and o.stride(1) == 7 for o in odd)
    want = torch.autograd.grad(outputs, moments, grads, retain_graph=True)[0]
    have = torch.autograd.grad(outputs, moments, odd)[0]
    torch.testing.assert_close(have, want, rtol=1e-12, atol=1e-14)


def test_incoming_gradients_with_channels_apart_or_missing():
    """The kernels read a gradient's channels contiguous: gradients that are transposes (channels 3 or 4 apart)
    must be copied first, and an output left out of the loss (no gradient: zeros) must add nothing."""
    norms, scale, task = _modules(32, torch.float64, seed=9)
    moments = _moments(PYRAMID_NORMS, PYRAMID_PIXELS, 2, 32, torch.float64).requires_grad_()
    outputs = _kernel_attention(moments, norms, scale, task)
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(DEVICE) for t in outputs]
    transposed = [t if t.dim() == 3 else t.transpose(2, 3).contiguous().transpose(2, 3) for t in grads]
    assert transposed[2].stride(-1) == 4
    want = torch.autograd.grad(outputs, moments, grads, retain_graph=True)[0]
    have = torch.autograd.grad(outputs, moments, transposed, retain_graph=True)[0]
    torch.testing.assert_close(have, want, rtol=1e-12, atol=1e-14)
    want = torch.autograd.grad(outputs, moments, [*grads[:2], torch.zeros_like(grads[2])], retain_graph=True)[0]
    have = torch.autograd.grad(outputs[:2], moments, grads[:2])[0]
    torch.testing.assert_close(have, want, rtol=1e-12, atol=1e-14)


def test_incoming_gradients_with_unevenly_spaced_rows():
    """Gradients that are views of a larger batch (rows of one level N apart, levels more than N rows apart): the
    kernel steps rows by one stride, so such a gradient must be copied first, and give what a contiguous one does."""
    norms, scale, task = _modules(32, torch.float64, seed=6)
    moments = _moments(PYRAMID_NORMS, PYRAMID_PIXELS, 2, 32, torch.float64).requires_grad_()
    outputs = _kernel_attention(moments, norms, scale, task)
    g = torch.Generator().manual_seed(4)
    larger = [torch.randn(t.shape[0], 3, *t.shape[2:], generator=g, dtype=torch.float64).to(DEVICE) for t in outputs]
    views = [t[:, :2] for t in larger]
    assert all(v.stride(0) == 3 * v.stride(1) for v in views)
    want = torch.autograd.grad(outputs, moments, [v.contiguous() for v in views], retain_graph=True)[0]
    have = torch.autograd.grad(outputs, moments, views)[0]
    torch.testing.assert_close(have, want, rtol=1e-12, atol=1e-14)


def _good_args(c=32):
    norms, scale, task = _modules(c, torch.float32, seed=0)
    moments = _moments([0, -1, -1], [4, 1, 1], 2, c, torch.float32)
    return [moments, [4, 1, 1], [0, -1, -1], torch.stack([m.weight for m in norms]),
            torch.stack([m.bias for m in norms]), 16, 1e-5, scale.conv.weight.view(-1), scale.conv.bias,
            (task.fc1.weight, task.fc1.bias, task.fc2.weight, task.fc2.bias)]


@pytest.mark.parametrize("index,bad,error", [
    (0, lambda m: m[..., :2], ValueError),
    (0, lambda m: m.half(), TypeError),
    (1, lambda p: p[:2], ValueError),
    (1, lambda p: [0, 1, 1], ValueError),  # a slot of no pixels: GroupNorm would divide by zero
    (2, lambda k: k[:2], ValueError),
    (2, lambda k: [3, -1, -1], ValueError),
    (3, lambda w: w[:, :5], ValueError),
    (3, lambda w: w.int(), TypeError),
    (5, lambda g: 5, ValueError),
    (5, lambda g: 0, ValueError),
    (7, lambda w: w[:3], ValueError),
    (9, lambda t: (t[0][:, :3], *t[1:]), ValueError),
    (9, lambda t: (t[0][0, 0], *t[1:]), ValueError),  # fc1 weight not a matrix
    (8, lambda b: b.to("meta"), ValueError),
])
def test_bad_input_names_the_argument(index, bad, error):
    args = _good_args()
    args[index] = bad(args[index])
    with pytest.raises(error):
        block_attention(*args)

