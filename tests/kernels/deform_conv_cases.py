"""Shared inputs and references of the deformable conv kernel tests (CPU interpreter and CUDA)."""

import contextlib

import pytest
import torch
import torchvision
from torch.nn.modules.utils import _pair

from kernels import modulated_deform_conv2d
from kernels.deform_conv_op import modulated_deform_conv2d_pyramid
from kernels.runtime import INTERPRET

# The kernels run in the CPU interpreter (TRITON_INTERPRET=1 set before pytest starts) or on a CUDA GPU.
DEVICE = "cpu" if INTERPRET else "cuda"
needs_kernels = pytest.mark.skipif(
    not INTERPRET and not torch.cuda.is_available(),
    reason="the Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 set before pytest starts")


@contextlib.contextmanager
def matmul_tf32(enabled):
    """torch's CUDA matmul TF32 switch set within the block, through the precision API, which can be read back
    whatever set it (the legacy allow_tf32 raises once that API was used). Not pytest's monkeypatch:
    cuBLASModule resolves allow_tf32 in __getattr__, so pytest 9 finds no instance attribute to restore and
    its undo raises AttributeError (an error at every such test's teardown)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32" if enabled else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def rel_err(actual, expected):
    return ((actual.detach().cpu().double() - expected).norm() / expected.norm()).item()


def out_size(h, w, k, stride, padding, dilation):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(_pair, (k, stride, padding, dilation))
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def make_inputs(n, cin, cout, h, w, k=3, stride=1, padding=1, dilation=1, bias=True, seed=0):
    """Random float64 DCN inputs; offsets of a few pixels cross pixel borders and leave the image."""
    gen = torch.Generator().manual_seed(seed)
    kh, kw = _pair(k)
    ho, wo = out_size(h, w, k, stride, padding, dilation)
    return {
        "input": torch.randn(n, cin, h, w, generator=gen, dtype=torch.float64),
        "offset": 2.5 * torch.randn(n, 2 * kh * kw, ho, wo, generator=gen, dtype=torch.float64),
        "mask": torch.rand(n, kh * kw, ho, wo, generator=gen, dtype=torch.float64),
        "weight": torch.randn(cout, cin, kh, kw, generator=gen, dtype=torch.float64) / (cin * kh * kw) ** 0.5,
        "bias": torch.randn(cout, generator=gen, dtype=torch.float64) if bias else None,
    }


def leaves(inputs, dtype, device, wanted=None):
    """Copies of the tensors in inputs that require grad (those named in wanted, or all)."""
    return {k: None if v is None else v.to(device, dtype, copy=True).requires_grad_(wanted is None or k in wanted)
            for k, v in inputs.items()}


def reference(t, conv):
    return torchvision.ops.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], mask=t["mask"], **conv)


def triton_op(t, conv, deterministic=None):
    return modulated_deform_conv2d(t["input"], t["offset"], t["mask"], t["weight"], t["bias"], **conv,
                                   deterministic=deterministic)


def grads(y, grad_out, tensors):
    """Gradients of sum(y * grad_out) w.r.t. every tensor in the dict."""
    names = [k for k, v in tensors.items() if v is not None]
    return dict(zip(names, torch.autograd.grad((y * grad_out.to(y)).sum(), [tensors[k] for k in names])))


def grad_out_like(y):
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


class DyConvLike(torch.nn.Module):
    """An offset conv whose 27 channels feed the DCN as slices (offsets) and a sigmoid (mask)."""

    def __init__(self, c):
        super().__init__()
        self.offset_conv = torch.nn.Conv2d(c, 27, 3, padding=1)
        self.weight = torch.nn.Parameter(torch.randn(c, c, 3, 3) / (9 * c) ** 0.5)
        self.bias = torch.nn.Parameter(torch.randn(c))

    def forward(self, x):
        om = self.offset_conv(x)
        return modulated_deform_conv2d(x, om[:, :18], om[:, 18:].sigmoid(), self.weight, self.bias)


def make_pyramid(n, cin, cout, sizes, k=3, stride=1, padding=1, dilation=1, bias=True, seed=0):
    """Random float64 inputs of a pyramid call: per-level "input", "offset", "mask" lists (sizes: (H, W) per
    level) and one "weight" and "bias"."""
    levels = [make_inputs(n, cin, cout, h, w, k, stride, padding, dilation, bias, seed + i)
              for i, (h, w) in enumerate(sizes)]
    return {**{name: [t[name] for t in levels] for name in ("input", "offset", "mask")},
            "weight": levels[0]["weight"], "bias": levels[0]["bias"]}


def pyramid_leaves(p, dtype, device):
    """Copies of a `make_pyramid` dict that require grad, flattened to names: input0, offset0, mask0, ...,
    weight, bias (None stays None)."""
    flat = {f"{name}{i}": t for name in ("input", "offset", "mask") for i, t in enumerate(p[name])}
    flat.update(weight=p["weight"], bias=p["bias"])
    return leaves(flat, dtype, device)


def pyramid_args(t):
    """(inputs, offsets, masks, weight, bias) of a `pyramid_leaves` dict."""
    levels = sum(name.startswith("input") for name in t)
    return ([t[f"input{i}"] for i in range(levels)], [t[f"offset{i}"] for i in range(levels)],
            [t[f"mask{i}"] for i in range(levels)], t["weight"], t["bias"])


def pyramid_reference(t, conv):
    """torchvision's op on each level of a `pyramid_leaves` dict."""
    inputs, offsets, masks, weight, bias = pyramid_args(t)
    return [torchvision.ops.deform_conv2d(x, o, weight, bias, mask=m, **conv) for x, o, m in zip(inputs, offsets,
                                                                                                 masks)]


def pyramid_op(t, conv, deterministic=None):
    return modulated_deform_conv2d_pyramid(*pyramid_args(t), **conv, deterministic=deterministic)


def pyramid_grads(ys, grad_outs, tensors):
    """Gradients of sum_l sum(y_l * grad_out_l) w.r.t. every tensor in the dict."""
    names = [k for k, v in tensors.items() if v is not None]
    loss = sum((y * g.to(y)).sum() for y, g in zip(ys, grad_outs))
    return dict(zip(names, torch.autograd.grad(loss, [tensors[k] for k in names])))


class PyramidConvLike(torch.nn.Module):
    """`DyConvLike` over a list of levels: one offset conv per level, one deformable conv launch for all."""

    def __init__(self, c):
        super().__init__()
        self.offset_conv = torch.nn.Conv2d(c, 27, 3, padding=1)
        self.weight = torch.nn.Parameter(torch.randn(c, c, 3, 3) / (9 * c) ** 0.5)
        self.bias = torch.nn.Parameter(torch.randn(c))

    def forward(self, xs):
        oms = [self.offset_conv(x) for x in xs]
        return modulated_deform_conv2d_pyramid(xs, [om[:, :18] for om in oms], [om[:, 18:].sigmoid() for om in oms],
                                               self.weight, self.bias)


def check_compiled_matches_eager(module, xs, backend, outputs=list):
    """torch.compile(module, fullgraph=True) (which fails on any graph break) computes what the eager module
    computes: outputs, and the gradients of the inputs xs and the parameters. outputs: the module's result as a
    flat list. Returns the number of outputs."""
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    ys_eager = outputs(module(xs))
    g_eager = torch.autograd.grad(sum(y.square().sum() for y in ys_eager), [*xs, *module.parameters()])
    ys = outputs(compiled(xs))
    g = torch.autograd.grad(sum(y.square().sum() for y in ys), [*xs, *module.parameters()])
    assert len(ys) == len(ys_eager)
    for y, y_eager in zip(ys, ys_eager):
        torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    return len(ys)
