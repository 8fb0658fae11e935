"""DyHead on the Triton deformable conv against the torchvision path with the same weights."""

import pytest
import torch

from dyhead import DyHead
from kernels.runtime import INTERPRET

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and not INTERPRET,
    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1 (CPU interpreter)",
)
DEVICE = "cpu" if INTERPRET else "cuda"


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def run(model, levels):
    out = model(levels)
    loss = sum((t * torch.linspace(-1, 1, t.shape[-1], device=t.device)).square().sum() for t in out)
    names = [f"level {i}" for i in range(len(levels))] + [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, [*levels, *model.parameters()])
    return out, dict(zip(names, grads))


def assert_triton_matches(references, high_offsets="official", task_attention=True, batch=2):
    """DyHead on triton against each backend of ``references``, same weights: outputs and all gradients in fp32."""
    torch.manual_seed(0)
    model = DyHead(32, 32, 1, backend="triton", high_offsets=high_offsets, task_attention=task_attention).to(DEVICE)
    with torch.no_grad():
        model.blocks[0].spatial.offset.bias.uniform_(-2.0, 2.0)  # samples cross borders and leave the image
    sizes = [(9, 11), (5, 6), (3, 3)]
    levels = [torch.randn(batch, 32, h, w, device=DEVICE, requires_grad=True) for h, w in sizes]
    out, grads = run(model, levels)
    for reference in references:
        model.backend = reference
        ref_out, ref_grads = run(model, levels)
        for l, (a, b) in enumerate(zip(out, ref_out)):
            assert rel_err(a, b) < 2e-4, f"{reference}: output level {l}"
        for name, g in grads.items():
            assert rel_err(g, ref_grads[name]) < 2e-4, f"{reference}: {name}"


# One image where a second adds nothing the official case does not show: the interpreter's time grows with it.
@pytest.mark.parametrize("high_offsets, batch", [("official", 2), ("crop", 1)])
def test_triton_backend_matches_torchvision(high_offsets, batch):
    assert_triton_matches(["torchvision"], high_offsets, batch=batch)


def test_triton_backend_without_task_attention_matches_torch_and_sampled():
    """The two-stage neck: the fused level pass with identity dynamic-ReLU coefficients."""
    assert_triton_matches(["torch", "sampled"], task_attention=False, batch=1)


def test_empty_batch_runs_as_on_torchvision():
    """A batch of no images: empty levels out, and every parameter's gradient zero (not missing), as on the
    torchvision path."""
    torch.manual_seed(0)
    model = DyHead(16, 16, 2, backend="triton").to(DEVICE)
    levels = [torch.randn(0, 16, h, w, device=DEVICE, requires_grad=True) for h, w in [(8, 12), (4, 6)]]
    out, grads = run(model, levels)
    model.backend = "torchvision"
    ref_out, ref_grads = run(model, levels)
    assert [o.shape for o in out] == [o.shape for o in ref_out] == [x.shape for x in levels]
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name


def test_levels_that_are_views_of_one_buffer_get_their_whole_gradients():
    """Levels made by one op (an FPN writing one buffer, or an earlier block): the gradient with respect to
    them must hold every consumer's share. Computed through their buffer, the offset conv's was missing."""
    torch.manual_seed(0)
    model = DyHead(16, 16, 1, backend="triton").to(DEVICE).double()
    sizes = [(6, 7), (3, 4)]
    leaf = torch.randn(sum(2 * 16 * h * w for h, w in sizes), device=DEVICE, dtype=torch.float64,
                       requires_grad=True)
    parts = (leaf * 1.5).split([2 * 16 * h * w for h, w in sizes])
    levels = [part.view(2, 16, h, w) for part, (h, w) in zip(parts, sizes)]
    got = torch.autograd.grad(sum(o.square().sum() for o in model(levels)), [*levels, leaf], retain_graph=True)
    model.backend = "torchvision"
    want = torch.autograd.grad(sum(o.square().sum() for o in model(levels)), [*levels, leaf])
    for i, (g, w) in enumerate(zip(got, want)):
        assert rel_err(g, w) < 1e-10, i


def test_double_backward_raises_instead_of_dropping_terms():
    """A gradient penalty differentiates the input gradient again, which the kernels' backward does not support:
    it must raise, as torchvision's deform_conv2d does, rather than leave the penalty without a graph (a loss
    plus that penalty trained silently without it)."""
    torch.manual_seed(0)
    model = DyHead(16, 16, 1, backend="triton").to(DEVICE)
    levels = [torch.randn(1, 16, h, w, device=DEVICE, requires_grad=True) for h, w in [(5, 6), (3, 3)]]
    loss = sum(o.square().sum() for o in model(levels))
    grads = torch.autograd.grad(loss, levels, create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (loss.detach() + penalty).backward()


def test_a_first_call_under_inference_mode_leaves_training_working():
    """The block caches tensors per pyramid size; made under inference_mode they could not be saved for a later
    backward. Sizes no other test uses, so that this call is the one that fills the caches."""
    torch.manual_seed(0)
    model = DyHead(32, 32, 1, backend="triton").to(DEVICE)
    levels = [torch.randn(1, 32, h, w, device=DEVICE) for h, w in [(11, 7), (6, 4)]]
    with torch.inference_mode():
        expected = model(levels)
    out, grads = run(model, [x.requires_grad_() for x in levels])
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b)
    model.backend = "torchvision"
    _, ref_grads = run(model, levels)
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < 2e-4, name


def test_triton_backend_compiles_without_graph_breaks():
    """The whole block (deformable convs, level pass, the attentions' small math) traces as one graph, as CUDA
    graphs (torch.compile mode="reduce-overhead") need."""
    torch.manual_seed(0)
    model = DyHead(16, 16, 1, backend="triton").to(DEVICE)
    levels = [torch.randn(1, 16, h, w, device=DEVICE, requires_grad=True) for h, w in [(9, 13), (5, 7), (3, 4)]]
    expected, expected_grads = run(model, levels)
    out, grads = run(torch.compile(model, fullgraph=True, backend="aot_eager"), levels)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for g, (name, e) in zip(grads.values(), expected_grads.items()):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=name)


def test_warm_triton_step_makes_no_tensor_from_host_data():
    """What a CUDA graph needs of the triton path: once warm, a forward+backward creates no tensor from host
    values (``torch.tensor``, which the dispatcher sees as ``lift_fresh``), whose copy to the GPU a graph would
    replay from freed host memory. Level tables come from kernel arguments, shape constants from a cache."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostData(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func in (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = DyHead(16, 16, 1, backend="triton").to(DEVICE)
    levels = [torch.randn(1, 16, h, w, device=DEVICE, requires_grad=True) for h, w in [(8, 8), (4, 4), (2, 2)]]
    run(model, levels)
    with HostData() as mode:
        torch.tensor([1.0])  # the mode does see them
        assert mode.count == 1
        run(model, levels)
    assert mode.count == 1


def test_a_penalty_through_the_level_pass_alone_raises():
    """The task attention's parameters reach the loss only through the fused level pass, whose backward depends on
    the conv outputs (saved, requiring grad): a penalty on their gradient must raise too."""
    torch.manual_seed(0)
    model = DyHead(16, 16, 1, backend="triton").to(DEVICE)
    levels = [torch.randn(1, 16, h, w, device=DEVICE) for h, w in [(5, 6), (3, 3)]]
    loss = sum(o.sum() for o in model(levels))
    task = list(model.blocks[0].task.parameters())
    grads = torch.autograd.grad(loss, task, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(loss + sum(g.square().sum() for g in grads), model.blocks[0].spatial.offset.weight)


def test_one_value_per_group_raises_as_on_torchvision():
    """A 1x1 level of one image at 16 channels gives GroupNorm(16) one value per group: torch's GroupNorm raises
    on the reference path, and so must the fused path (it returned the GroupNorm bias). Two images pass torch's
    check (it counts N * C / groups * H * W): both paths then give the bias."""
    torch.manual_seed(0)
    model = DyHead(16, 16, 1, backend="triton").to(DEVICE)
    for backend in ("torchvision", "triton"):
        model.backend = backend
        with pytest.raises(ValueError, match="level 1: its 1x1 maps" if backend == "triton" else "more than 1"):
            model([torch.randn(1, 16, 2, 2, device=DEVICE), torch.randn(1, 16, 1, 1, device=DEVICE)])
    levels = [torch.randn(2, 16, 1, 1, device=DEVICE)]
    out = model(levels)  # on triton, the loop's last backend
    model.backend = "torchvision"
    torch.testing.assert_close(out[0], model(levels)[0], rtol=1e-4, atol=1e-5)


# A NaN in one weight, as a diverged step leaves it: offset conv (one dy channel), scale conv, task MLP (fc1
# feeds every coefficient, fc2's first row one channel's a1).
NAN_WEIGHTS = ["spatial.offset.weight", "scale.conv.weight", "task.fc1.weight", "task.fc2.weight"]


def test_a_nan_weight_reaches_the_outputs_that_it_reaches_on_sampled():
    """The outputs that a NaN weight makes NaN are those it makes NaN on the sampled path (torch's relu, hard
    sigmoid and max, torchvision's CUDA DCN). The triton path dropped NaN samples in the DCN and clamped NaN to
    0 in the attentions' relu and hard sigmoid (Triton's min and max drop NaN by default): its outputs stayed
    finite, hiding the divergence from the loss."""
    torch.manual_seed(0)
    levels = [torch.randn(1, 16, h, w, device=DEVICE) for h, w in [(6, 7), (3, 4)]]
    for name in NAN_WEIGHTS:
        model = DyHead(16, 16, 1, backend="triton").to(DEVICE)
        with torch.no_grad():
            model.blocks[0].get_parameter(name).view(-1)[0] = float("nan")
            out = model(levels)
            model.backend = "sampled"
            ref = model(levels)
        for a, b in zip(out, ref):
            assert b.isnan().any(), name
            assert torch.equal(a.isnan(), b.isnan()), name
