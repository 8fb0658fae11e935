"""kernels.deform_conv_op.modulated_deform_conv2d_pyramid on a CUDA GPU: precision per dtype, determinism,
equality with the one-level op, torch.compile with inductor, a DyHead-sized pyramid with the official
coarser-level offsets. The reference is torchvision.ops.deform_conv2d in float64 on the CPU, fed the same
(rounded) inputs. Run with `pytest -m cuda tests/kernels` (without TRITON_INTERPRET).

Error bounds (relative norm error, every level's output and every gradient) as for the one-level op:
fp32 1e-5, fp32 with TF32 on 5e-3, fp16 5e-3, bf16 2e-2.
"""

import pytest
import torch
from deform_conv_cases import (PyramidConvLike, make_pyramid, matmul_tf32, pyramid_args, pyramid_grads,
                               pyramid_leaves, pyramid_op, pyramid_reference, rel_err)

from kernels import modulated_deform_conv2d
from kernels.deform_conv_op import modulated_deform_conv2d_pyramid
from kernels.runtime import INTERPRET

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(INTERPRET,
                       reason="TRITON_INTERPRET=1 would interpret the kernels instead of compiling them"),
]

# Odd, different level sizes: no level fills whole tiles or pixel runs, every level starts mid-buffer.
SIZES = [(23, 19), (12, 10), (6, 5)]


def rounded(p, dtype):
    """A `make_pyramid` dict rounded to dtype, so the reference sees exactly what the kernels see."""
    return {k: v if v is None else [t.to(dtype).double() for t in v] if isinstance(v, list) else v.to(dtype).double()
            for k, v in p.items()}


def run_both(p, conv, dtype, deterministic=None):
    """(outputs, grads) of the kernels in dtype on the GPU and of float64 torchvision on the CPU."""
    p = rounded(p, dtype)
    ref = pyramid_leaves(p, torch.float64, "cpu")
    ys_ref = pyramid_reference(ref, conv)
    gen = torch.Generator().manual_seed(1)
    g_outs = [torch.randn(y.shape, generator=gen).to(dtype).double() for y in ys_ref]
    out = pyramid_leaves(p, dtype, "cuda")
    ys = pyramid_op(out, conv, deterministic)
    return (ys, pyramid_grads(ys, [g.cuda() for g in g_outs], out)), (ys_ref, pyramid_grads(ys_ref, g_outs, ref))


def errors(ys, g, ys_ref, g_ref):
    return {**{f"output{i}": rel_err(y, r) for i, (y, r) in enumerate(zip(ys, ys_ref))},
            **{k: rel_err(g[k], g_ref[k]) for k in g_ref}}


@pytest.mark.parametrize("dtype, tf32, tol", [
    (torch.float32, False, 1e-5), (torch.float32, True, 5e-3), (torch.float16, False, 5e-3),
    (torch.bfloat16, False, 2e-2)], ids=["fp32", "tf32", "fp16", "bf16"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_dtype_against_float64(dtype, tf32, tol, stride, deterministic):
    conv = dict(stride=stride, padding=1, dilation=1)
    with matmul_tf32(tf32):
        (ys, g), (ys_ref, g_ref) = run_both(make_pyramid(2, 70, 45, SIZES, stride=stride), conv, dtype,
                                            deterministic)
    assert all(y.dtype == dtype for y in ys)
    assert max(errors(ys, g, ys_ref, g_ref).values()) < tol, errors(ys, g, ys_ref, g_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_is_bitwise_repeatable(dtype):
    conv = dict(stride=1, padding=1, dilation=1)
    t = pyramid_leaves(make_pyramid(2, 64, 48, [(33, 31), (17, 16), (9, 8)]), dtype, "cuda")

    def run(deterministic):
        ys = pyramid_op(t, conv, deterministic)
        return pyramid_grads(ys, [torch.ones_like(y) for y in ys], t)

    first, second, atomic = run(True), run(True), run(False)
    for name in first:
        assert torch.equal(first[name], second[name]), name
        assert rel_err(atomic[name], first[name].double().cpu()) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_one_level_op(dtype):
    """Each level as modulated_deform_conv2d computes it (autotuning may pick other tiles: close, not equal)."""
    conv = dict(stride=2, padding=1, dilation=1)
    t = pyramid_leaves(make_pyramid(2, 40, 24, SIZES, stride=2), dtype, "cuda")
    inputs, offsets, masks, weight, bias = pyramid_args(t)
    ys = pyramid_op(t, conv)
    ys_one = [modulated_deform_conv2d(x, o, m, weight, bias, **conv) for x, o, m in zip(inputs, offsets, masks)]
    g_outs = [torch.ones_like(y) for y in ys]
    g, g_one = pyramid_grads(ys, g_outs, t), pyramid_grads(ys_one, g_outs, t)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for y, y_one in zip(ys, ys_one):
        assert rel_err(y, y_one.double().cpu()) < tol
    for name in g:
        assert rel_err(g[name], g_one[name].double().cpu()) < tol, name


def test_dyhead_pyramid_with_official_coarser_offsets():
    """bf16, 256 channels, P3-P7 of a 256x384 image: the same-level call on all five levels in one launch,
    and the coarser-level call whose offsets are the official quirk's views of the finer level's."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    sizes = [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    xs = [torch.randn(2, 256, h, w, device="cuda", generator=gen, dtype=torch.bfloat16) for h, w in sizes]
    oms = [torch.randn(2, 27, h, w, device="cuda", generator=gen, dtype=torch.bfloat16) for h, w in sizes]
    weight = torch.randn(256, 256, 3, 3, device="cuda", generator=gen, dtype=torch.bfloat16) / 48
    for t in (*xs, *oms, weight):
        t.requires_grad_()

    def quirk(s, h, w):
        return s.as_strided((s.shape[0], s.shape[1], h, w), (s.stride(0), h * w, w, 1), s.storage_offset())

    def call(name):
        """(inputs, offsets, masks) of the same-level or the coarser-level call, built anew for each graph."""
        if name == "same":
            return xs, [om[:, :18] for om in oms], [om[:, 18:].sigmoid() for om in oms]
        return (xs[1:], [quirk(om[:, :18], *size) for om, size in zip(oms, sizes[1:])],
                [quirk(om[:, 18:].sigmoid(), *size) for om, size in zip(oms, sizes[1:])])

    for name in ("same", "coarser"):
        ys = modulated_deform_conv2d_pyramid(*call(name), weight)
        ys_one = [modulated_deform_conv2d(x, o, m, weight) for x, o, m in zip(*call(name))]
        leaves = [*xs, *oms, weight]
        g = torch.autograd.grad(sum(y.float().square().sum() for y in ys), leaves, allow_unused=True)
        g_one = torch.autograd.grad(sum(y.float().square().sum() for y in ys_one), leaves, allow_unused=True)
        for y, y_one in zip(ys, ys_one):
            assert rel_err(y, y_one.double().cpu()) < 1e-2, name
        for a, b in zip(g, g_one):
            assert (a is None) == (b is None), name
            if a is not None:
                assert rel_err(a, b.double().cpu()) < 2e-2, name


def test_torch_compile_inductor_bf16():
    torch.manual_seed(0)
    module = PyramidConvLike(32).cuda().to(torch.bfloat16)
    xs = [torch.randn(2, 32, h, w, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h, w in SIZES]
    compiled = torch.compile(module, fullgraph=True, backend="inductor")
    ys_eager = module(xs)
    g_eager = torch.autograd.grad(sum(y.float().square().sum() for y in ys_eager), [*xs, *module.parameters()])
    ys = compiled(xs)
    g = torch.autograd.grad(sum(y.float().square().sum() for y in ys), [*xs, *module.parameters()])
    for y, y_eager in zip(ys, ys_eager):
        assert rel_err(y, y_eager.double().cpu()) < 1e-2
    for a, b in zip(g, g_eager):
        assert rel_err(a, b.double().cpu()) < 2e-2


def test_replays_in_a_cuda_graph():
    """Forward and backward captured once and replayed on new values: the level tables are kernel-written, so
    the graph carries them (a copied-in table would be read from freed host memory)."""
    from benchmarks.timing import cuda_graph

    conv = dict(stride=1, padding=1, dilation=1)
    t = pyramid_leaves(make_pyramid(2, 48, 32, SIZES), torch.float32, "cuda")
    g_outs = [torch.randn(2, 32, h, w, device="cuda") for h, w in SIZES]

    def step():
        ys = pyramid_op(t, conv)
        return ys, pyramid_grads(ys, g_outs, t)

    replay = cuda_graph(step, "cuda")
    with torch.no_grad():
        for name, v in t.items():
            if name.startswith(("input", "offset", "mask")):
                v.copy_(torch.rand_like(v) * 2 - 0.5)
    ys, g = replay()
    ys, g = [y.clone() for y in ys], {k: v.clone() for k, v in g.items()}
    ys_eager, g_eager = step()
    for y, e in zip(ys, ys_eager):
        assert rel_err(y, e.double().cpu()) < 1e-5
    for name in g_eager:
        assert rel_err(g[name], g_eager[name].double().cpu()) < 1e-5, name
