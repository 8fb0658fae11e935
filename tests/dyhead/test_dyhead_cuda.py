"""DyHead on the GPU, every backend and storage dtype, against the float64 CPU reference."""

import pytest
import torch

from dyhead import DyHead

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SIZES = [(40, 56), (20, 28), (10, 14), (5, 7), (3, 4)]
# Relative-norm bounds on the output of 2 blocks (C=64), about 3x what an H100 showed (2026-11-25): storage
# rounding of every intermediate dominates; in fp32 the offset conv runs in TF32 (cuDNN's default), 1.7e-4 for
# every backend alike.
BOUNDS = {torch.float32: 5e-4, torch.float16: 3e-2, torch.bfloat16: 5e-2}


def rel_err(a, b):
    return ((a.double().cpu() - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = DyHead(64, 64, 2, backend="torchvision").double()
    with torch.no_grad():
        for block in model.blocks:
            block.spatial.offset.bias.uniform_(-2.0, 2.0)
    levels = [torch.randn(2, 64, h, w, dtype=torch.float64) for h, w in SIZES]
    return model, levels, model(levels)


@pytest.mark.parametrize(
    "backend,dtype",
    [("torchvision", torch.float32), ("torchvision", torch.float16),
     ("sampled", torch.float32), ("sampled", torch.bfloat16), ("sampled", torch.float16),
     ("triton", torch.float32), ("triton", torch.bfloat16), ("triton", torch.float16)],
)
def test_backend_dtype_against_float64(reference, backend, dtype):
    model, levels, expected = reference
    gpu = DyHead(64, 64, 2, backend=backend).to("cuda", dtype)
    gpu.load_state_dict(model.state_dict())
    out = gpu([t.to("cuda", dtype) for t in levels])
    for l, (o, e) in enumerate(zip(out, expected)):
        assert o.dtype == dtype
        assert rel_err(o, e) < BOUNDS[dtype], f"level {l}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_without_task_attention_against_float64(reference, dtype):
    """The two-stage neck (identity dynamic-ReLU coefficients in the fused pass), forward and input gradients."""
    model, levels, _ = reference
    state = {k: v for k, v in model.state_dict().items() if ".task." not in k}
    cpu = DyHead(64, 64, 2, backend="torchvision", task_attention=False).double()
    cpu.load_state_dict(state)
    xs64 = [t.clone().requires_grad_() for t in levels]
    expected = cpu(xs64)
    sum((o * o.detach().sign()).mean() for o in expected).backward()
    gpu = DyHead(64, 64, 2, backend="triton", task_attention=False).to("cuda", dtype)
    gpu.load_state_dict(state)
    xs = [t.to("cuda", dtype).requires_grad_() for t in levels]
    out = gpu(xs)
    sum((o * e.detach().sign().to("cuda", dtype)).mean() for o, e in zip(out, expected)).backward()
    for l, (o, e, x, x64) in enumerate(zip(out, expected, xs, xs64)):
        assert rel_err(o, e.detach()) < BOUNDS[dtype], f"level {l}"
        assert rel_err(x.grad, x64.grad) < 2 * BOUNDS[dtype], f"grad level {l}"


def test_auto_under_bf16_autocast_trains(reference):
    model, levels, expected = reference
    gpu = DyHead(64, 64, 2, backend="auto").cuda()
    gpu.load_state_dict(model.state_dict())
    xs = [t.float().cuda().requires_grad_() for t in levels]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu(xs)
    for o, e in zip(out, expected):
        assert rel_err(o, e) < BOUNDS[torch.bfloat16]
    sum(o.float().square().mean() for o in out).backward()
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters())
    assert all(torch.isfinite(x.grad).all() for x in xs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_forward_backward_replays_in_a_cuda_graph(reference, dtype):
    """The whole triton DyHead step (grouped deformable convs, level pass, backward) captured once, replayed on
    new inputs: the same results as an eager call on those inputs. A stale level table or a constant read from
    freed host memory would give garbage."""
    from benchmarks.timing import cuda_graph

    model, levels, _ = reference
    gpu = DyHead(64, 64, 2, backend="triton").to("cuda", dtype)
    gpu.load_state_dict(model.state_dict())
    params = list(gpu.parameters())
    gen = torch.Generator(device="cuda").manual_seed(0)
    xs = [t.to("cuda", dtype).requires_grad_() for t in levels]
    grad_outs = [torch.randn(t.shape, device="cuda", generator=gen, dtype=dtype) for t in xs]

    def step():
        out = gpu(xs)
        grads = torch.autograd.grad(out, xs + params, grad_outs, allow_unused=True)
        return (*out, *(g for g in grads if g is not None))

    replay = cuda_graph(step, "cuda")
    with torch.no_grad():
        for x in xs:
            x.copy_(torch.randn(x.shape, device="cuda", generator=gen, dtype=dtype))
    replayed = [t.clone() for t in replay()]
    eager = step()
    bound = 1e-5 if dtype == torch.float32 else 2e-2  # the backward's atomics sum in another order
    for i, (r, e) in enumerate(zip(replayed, eager)):
        assert rel_err(r, e.double().cpu()) < bound, i


def test_triton_forward_under_reduce_overhead_compile(reference):
    """torch.compile(mode="reduce-overhead") captures the triton DyHead in CUDA graphs without skipping any."""
    from torch._dynamo.utils import counters

    model, levels, _ = reference
    gpu = DyHead(64, 64, 2, backend="triton").cuda().eval()
    gpu.load_state_dict(model.state_dict())
    compiled = torch.compile(gpu, mode="reduce-overhead", fullgraph=True)
    counters.clear()
    gen = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for _ in range(3):  # warm-up, record, replay
            xs = [torch.randn(t.shape, device="cuda", generator=gen) for t in levels]
            out = [t.clone() for t in compiled(xs)]
        expected = gpu(xs)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    for o, e in zip(out, expected):
        # cuDNN may pick another TF32 algorithm for the compiled offset conv: close, not equal
        assert rel_err(o, e.double().cpu()) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_trains_under_deterministic_algorithms_bitwise(reference, dtype):
    """Under torch.use_deterministic_algorithms(True) torch's CUDA backward of bilinear upsampling raises (every
    reference backend's DyHead does); the triton backend upsamples with kernels.upsample_bilinear, and its whole
    step gives bitwise-equal gradients twice."""
    model, levels, _ = reference
    gpu = DyHead(64, 64, 2, backend="triton").to("cuda", dtype)
    gpu.load_state_dict(model.state_dict())
    xs = [t.to("cuda", dtype).requires_grad_() for t in levels]
    params = list(gpu.parameters())
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            out = gpu(xs)
            runs.append(torch.autograd.grad(sum(o.float().square().mean() for o in out), xs + params))
        coarse = xs[1].detach().requires_grad_()
        up = torch.nn.functional.interpolate(coarse, size=xs[0].shape[-2:], mode="bilinear", align_corners=True)
        with pytest.raises(RuntimeError, match="deterministic"):
            up.sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
