"""Shared inputs and references of the deformable conv kernel tests (CPU interpreter and CUDA)."""

import torch
import torchvision
from torch.nn.modules.utils import _pair

from kernels import modulated_deform_conv2d


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
