"""The reference DyHead against an independent restatement of the official forward, and its contract."""

from collections import OrderedDict, namedtuple
from types import MappingProxyType

import pytest
import torch

from dyhead import DyHead, DyHeadBlock, TaskAttention, convert_state_dict
from dyhead.deform import resolve_backend
from official_reference import official_forward, official_state_dict

SIZES = [(19, 25), (10, 13), (5, 7), (3, 4), (2, 2)]


def pyramid(channels, batch=2, dtype=torch.float64, sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, h, w, generator=g, dtype=dtype) for h, w in sizes]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("backend", ["torchvision", "sampled"])
@pytest.mark.parametrize("high_offsets", ["official", "crop"])
def test_matches_official_forward(backend, high_offsets):
    cin, c, blocks = 24, 32, 2
    sd = official_state_dict(blocks, cin, c, torch.Generator().manual_seed(1))
    model = DyHead(cin, c, blocks, backend=backend, high_offsets=high_offsets).double()
    model.load_state_dict(convert_state_dict(sd), strict=True)
    levels = pyramid(cin)
    expected = official_forward(sd, levels, blocks, high_offsets)
    got = model(levels)
    for l, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape
        assert rel_err(g, e) < 1e-9, f"level {l}"


def test_official_and_crop_differ():
    """The quirk matters: otherwise the test above could not tell the two modes apart."""
    cin, c = 16, 16
    sd = convert_state_dict(official_state_dict(1, cin, c, torch.Generator().manual_seed(2)))
    levels = pyramid(cin, sizes=SIZES[:3])
    outs = {}
    for mode in ("official", "crop"):
        m = DyHead(cin, c, 1, backend="torchvision", high_offsets=mode).double()
        m.load_state_dict(sd)
        outs[mode] = m(levels)
    assert rel_err(outs["official"][0], outs["crop"][0]) > 1e-3
    # The coarsest level has no coarser neighbour, so both modes agree there.
    assert rel_err(outs["official"][-1], outs["crop"][-1]) < 1e-12


@pytest.mark.parametrize("backend", ["torchvision", "sampled"])
def test_block_gradcheck(backend):
    torch.manual_seed(0)
    block = DyHeadBlock(16, 16, backend=backend).double()
    with torch.no_grad():
        block.spatial.offset.bias.uniform_(-1.3, 1.3)
    levels = [t.requires_grad_() for t in pyramid(16, batch=1, sizes=[(5, 6), (3, 3), (2, 2)])]

    def f(*xs):
        return tuple(block(list(xs)))

    assert torch.autograd.gradcheck(f, tuple(levels), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_containers_keep_type_and_keys():
    model = DyHead(16, 16, 1, backend="sampled")
    levels = pyramid(16, dtype=torch.float32, sizes=SIZES[:3])
    as_list = model(levels)
    assert isinstance(as_list, list) and [t.shape for t in as_list] == [t.shape for t in levels]
    as_tuple = model(tuple(levels))
    assert isinstance(as_tuple, tuple)
    od = OrderedDict(zip(["p3", "p4", "p5"], levels))
    as_od = model(od)
    assert type(as_od) is OrderedDict and list(as_od) == ["p3", "p4", "p5"]
    as_dict = model(dict(od))
    assert type(as_dict) is dict and list(as_dict) == ["p3", "p4", "p5"]
    for a, b in zip(as_list, as_od.values()):
        torch.testing.assert_close(a, b)
    levels_tuple = namedtuple("Levels", "p3 p4 p5")
    as_named = model(levels_tuple(*levels))
    assert type(as_named) is levels_tuple
    torch.testing.assert_close(as_named.p5, as_list[2])
    as_proxy = model(MappingProxyType(od))  # a read-only mapping: back as a dict
    assert type(as_proxy) is dict and list(as_proxy) == ["p3", "p4", "p5"]


def test_channels_change_after_first_block():
    model = DyHead(24, 32, 2, backend="sampled")
    out = model(pyramid(24, dtype=torch.float32, sizes=SIZES[:2]))
    assert [tuple(t.shape) for t in out] == [(2, 32, 19, 25), (2, 32, 10, 13)]
    assert model.blocks[0].spatial.offset.in_channels == 24
    assert model.blocks[1].spatial.offset.in_channels == 32


def test_single_level_has_only_the_same_branch():
    cin = c = 16
    sd = official_state_dict(1, cin, c, torch.Generator().manual_seed(3))
    model = DyHead(cin, c, 1, backend="torchvision").double()
    model.load_state_dict(convert_state_dict(sd))
    levels = pyramid(cin, sizes=[(6, 5)])
    torch.testing.assert_close(model(levels)[0], official_forward(sd, levels, 1, "official")[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_sampled_close_to_float64(dtype):
    torch.manual_seed(0)
    model = DyHead(16, 16, 1, backend="sampled")
    levels = pyramid(16, sizes=SIZES[:3])
    expected = model.double()(levels)
    got = model.to(dtype)([t.to(dtype) for t in levels])
    bound = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    for g, e in zip(got, expected):
        assert g.dtype == dtype
        assert rel_err(g.double(), e) < bound


def test_initialisation_follows_the_release():
    torch.manual_seed(0)
    c = 64
    block = DyHead(c, c, 1).blocks[0]
    bound = 1 / (9 * c) ** 0.5
    for branch in (block.spatial.coarser, block.spatial.same, block.spatial.finer):
        w = branch.conv.weight
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
        assert torch.count_nonzero(branch.conv.bias) == 0
        assert torch.all(branch.norm.weight == 1) and torch.count_nonzero(branch.norm.bias) == 0
    # the release leaves its offset conv at PyTorch's default init (mmdetection zero-inits it)
    offset_bound = 1 / (9 * c) ** 0.5
    w = block.spatial.offset.weight
    assert w.abs().max() <= offset_bound and w.abs().max() > 0.9 * offset_bound
    b = block.spatial.offset.bias
    assert b.abs().max() <= offset_bound and torch.count_nonzero(b) == 27
    attn = block.scale.conv.weight
    assert 0.005 < attn.std().item() < 0.015 and torch.count_nonzero(block.scale.conv.bias) == 0
    assert block.task.fc1.out_features == 16 and block.task.fc2.out_features == 4 * c
    # the release's DYReLU squeezes to C // 4 at its reduction of 4, whatever C (no rounding to a multiple of 4)
    assert [TaskAttention(c).fc1.out_features for c in (24, 40, 72)] == [6, 10, 18]


def test_without_task_attention_is_the_scale_aware_mean_of_the_spatial_branches():
    torch.manual_seed(0)
    model = DyHead(16, 16, 2, backend="sampled", task_attention=False).double()
    assert all(block.task is None for block in model.blocks)
    assert not any(".task." in name for name in model.state_dict())
    levels = pyramid(16, sizes=SIZES[:3])
    expected = levels
    for block in model.blocks:
        expected = [block.scale(branches) for branches in block.spatial(expected)]
    for g, e in zip(model(levels), expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_task_attention_is_the_only_difference():
    """A default block loaded with a block's weights without task attention lacks exactly the task weights,
    and its output is the task attention applied to the other's."""
    torch.manual_seed(0)
    without = DyHead(16, 16, 1, backend="sampled", task_attention=False).double()
    with_task = DyHead(16, 16, 1, backend="sampled").double()
    missing, unexpected = with_task.load_state_dict(without.state_dict(), strict=False)
    assert not unexpected
    assert sorted(missing) == sorted(f"blocks.0.task.{name}" for name in with_task.blocks[0].task.state_dict())
    levels = pyramid(16, sizes=SIZES[:3])
    for g, e in zip(with_task(levels), without(levels)):
        torch.testing.assert_close(g, with_task.blocks[0].task(e), rtol=0, atol=0)


def test_hard_sigmoid_is_relu6_form():
    from dyhead.activations import hard_sigmoid

    x = torch.tensor([-4.0, -3.0, 0.0, 1.5, 3.0, 5.0])
    torch.testing.assert_close(hard_sigmoid(x), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))


# ---- bad input ----

def test_error_no_levels():
    with pytest.raises(ValueError, match="at least one"):
        DyHead(16, 16, 1)([])


def test_error_wrong_channels_names_level():
    levels = pyramid(16, dtype=torch.float32, sizes=SIZES[:2])
    levels[1] = torch.randn(2, 8, 10, 13)
    with pytest.raises(ValueError, match=r"level 'p4'.*8 channels.*in_channels=16"):
        DyHead(16, 16, 1)(OrderedDict(p3=levels[0], p4=levels[1]))


def test_error_batch_dtype_device_mismatch():
    model = DyHead(16, 16, 1)
    levels = pyramid(16, dtype=torch.float32, sizes=SIZES[:2])
    with pytest.raises(ValueError, match=r"level '1'.*batch size"):
        model([levels[0], levels[1][:1]])
    with pytest.raises(ValueError, match=r"level '1'.*dtype"):
        model([levels[0], levels[1].double()])
    with pytest.raises(ValueError, match=r"level '1'.*device"):
        model([levels[0], levels[1].to("meta")])


def test_error_integer_levels():
    levels = [torch.zeros(1, 16, 8, 8, dtype=torch.int64), torch.zeros(1, 16, 4, 4, dtype=torch.int64)]
    with pytest.raises(TypeError, match=r"level '0': dtype torch.int64 is not floating point"):
        DyHead(16, 16, 1)(levels)


def test_error_level_size_not_half():
    levels = pyramid(16, dtype=torch.float32, sizes=[(19, 25), (9, 13)])
    with pytest.raises(ValueError, match=r"level '1'.*ceil\(previous / 2\) = \(10, 13\)"):
        DyHead(16, 16, 1)(levels)


@pytest.mark.parametrize("backend", ["torchvision", "sampled"])
def test_error_level_without_pixels(backend):
    """An empty level would reach F.conv2d, whose error speaks of kernel sizes; an empty batch is fine."""
    with pytest.raises(ValueError, match=r"level '0': size \(0, 5\) has no pixels"):
        DyHead(16, 16, 1, backend=backend)([torch.randn(2, 16, 0, 5), torch.randn(2, 16, 0, 3)])


def test_error_not_a_4d_tensor():
    with pytest.raises(ValueError, match="4-d"):
        DyHead(16, 16, 1)([torch.randn(16, 5, 5)])


def test_error_constructor_arguments():
    with pytest.raises(ValueError, match="divisible by 16"):
        DyHead(16, 24)
    with pytest.raises(ValueError, match="unknown backend"):
        DyHead(16, 16, backend="cuda")
    with pytest.raises(ValueError, match="unknown high_offsets"):
        DyHead(16, 16, high_offsets="nearest")
    # no blocks would pass the levels through unchanged, whatever their channels
    with pytest.raises(ValueError, match="num_blocks=0 must be at least 1"):
        DyHead(16, 16, 0)


def test_error_channels_not_positive():
    """0 is divisible by 16 and passed the check, to fail at the first forward (IndexError); an empty input
    level count (in_channels=0) divided by zero in the deformable conv's init."""
    for cin, c in ((16, 0), (16, -16), (0, 16)):
        with pytest.raises(ValueError, match="must be positive"):
            DyHead(cin, c, 1)


def test_error_unknown_high_offsets_after_construction():
    """coarser_view is exported and high_offsets an attribute: a misspelt mode read as "official"."""
    from dyhead import coarser_view
    with pytest.raises(ValueError, match="unknown high_offsets 'Crop'"):
        coarser_view(torch.zeros(1, 18, 4, 4), 2, 2, "Crop")
    model = DyHead(16, 16, 1, backend="sampled")
    model.blocks[0].spatial.high_offsets = "cropped"
    with pytest.raises(ValueError, match="unknown high_offsets 'cropped'"):
        model(pyramid(16, dtype=torch.float32, sizes=SIZES[:2]))


def test_backend_switch_keeps_weights():
    model = DyHead(16, 16, 1, backend="torch")
    assert model.backend == "torchvision"
    levels = pyramid(16, dtype=torch.float64, sizes=SIZES[:3])
    model = model.double()
    a = model(levels)
    model.backend = "sampled"
    b = model(levels)
    for x, y in zip(a, b):
        assert rel_err(y, x) < 1e-10
    with pytest.raises(ValueError, match="unknown backend"):
        model.backend = "fast"


def test_auto_picks_triton_on_cuda_only():
    assert resolve_backend("auto", torch.device("cpu")) == "sampled"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "triton"
