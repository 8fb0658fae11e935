"""Modulated deformable convolution (DCNv2): the backends DyHead's spatial attention can run on.

Three implementations share one signature and one semantics, that of
``torchvision.ops.deform_conv2d`` with a single offset group:

- ``"torchvision"``: ``torchvision.ops.deform_conv2d``, the ground truth (im2col + GEMM).
- ``"sampled"``: :func:`deform_conv2d_sampled`, plain PyTorch built from ``F.grid_sample``; much faster than
  torchvision on the CPU (above all in backward), and it runs in bf16/fp16 and under ``torch.compile``.
- ``"triton"``: ``kernels.modulated_deform_conv2d``, the fused Triton kernels.

``"auto"`` picks triton for CUDA tensors and sampled elsewhere. ``"torch"`` is accepted as the older name of
``"torchvision"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d as _torchvision_deform_conv2d

import kernels
from kernels.deform_conv import conv_output_size
from kernels.deform_conv_op import check_conv_arguments, check_offset_mask_shapes, conv_pair

BACKENDS = ("torchvision", "sampled", "triton", "auto")
_ALIASES = {"torch": "torchvision"}


def check_backend(backend: str) -> str:
    """Return the canonical name of ``backend`` ("torch" -> "torchvision"); ValueError if unknown."""
    name = _ALIASES.get(backend, backend)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)} (or 'torch')")
    return name


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` to the implementation used for tensors on ``device`` ("auto" -> triton on CUDA)."""
    name = check_backend(backend)
    if name == "auto":
        return "triton" if device.type == "cuda" else "sampled"
    return name


def deform_conv2d_torchvision(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """``torchvision.ops.deform_conv2d`` with DyHead's argument order.

    input: (N, Cin, H, W); offset: (N, 2*kh*kw, Hout, Wout), (dy, dx) per tap, taps row-major;
    mask: (N, kh*kw, Hout, Wout); weight: (Cout, Cin, kh, kw); bias: (Cout,) or None.
    float32/float64/float16 (torchvision has no bfloat16 kernel). Returns (N, Cout, Hout, Wout).
    FloatingPointError for NaN offsets on the CPU, where torchvision's kernel crashes the process on them (its
    CUDA kernel, like the other backends, makes their output pixels NaN, except where the other coordinate lies
    outside the image: a zero sample there).
    """
    if offset.device.type == "cpu" and not torch.compiler.is_compiling() and bool(offset.isnan().any()):
        raise FloatingPointError(
            "offset holds NaN (has the offset conv diverged?): torchvision's CPU deform_conv2d would crash the "
            "process on it; the 'sampled' and 'triton' backends give NaN output pixels instead")
    return _torchvision_deform_conv2d(
        input, offset, weight, bias, stride=conv_pair(stride, "stride"), padding=conv_pair(padding, "padding"),
        dilation=conv_pair(dilation, "dilation"), mask=mask
    )


# The largest all-taps column buffer deform_conv2d_sampled builds (bytes): beyond it, the tap loop's peak of one
# tap's samples matters more than its per-op cost.
COLUMN_BUDGET_BYTES = 64 * 2**20


def deform_conv2d_sampled(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """Modulated deformable conv from ``F.grid_sample``, with torchvision's semantics.

    For each tap (i, j) the input is sampled bilinearly at ``(ho*sh - ph + i*dh + dy, wo*sw - pw + j*dw + dx)``
    (corners outside the image read zero, so a sample outside (-1, H) x (-1, W) is zero), multiplied by the mask
    and contracted with ``weight[:, :, i, j]``. Where the column buffer of all taps (N, Cin*kh*kw, Hout*Wout)
    fits in `COLUMN_BUDGET_BYTES`, all taps are sampled in one ``grid_sample`` and contracted in one GEMM (on
    small maps the per-op cost dominates); otherwise tap by tap, so that the 9x buffer is never built.
    Gradients come from autograd. At a sample exactly on a pixel (zero offsets), where the bilinear blend has a
    kink, ``grid_sample``'s coordinate rounding picks either one-sided offset gradient; torchvision and triton
    take the one towards the next pixel.

    input: (N, Cin, H, W) float32/float64/bfloat16/float16; offset: (N, 2*kh*kw, Hout, Wout);
    mask: (N, kh*kw, Hout, Wout), Hout and Wout the conv's output size (ValueError otherwise);
    weight: (Cout, Cin, kh, kw); bias: (Cout,) or None. Offsets and mask may be strided views. Sampling
    coordinates and the bilinear blend are computed in at least float32 (a bf16 grid would be off by a fifth of a
    pixel at 100 px); the contraction runs in the input's dtype (or autocast's).
    Returns (N, Cout, Hout, Wout) in the contraction's dtype.
    """
    n, cin, h, w = input.shape
    cout, _, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = (conv_pair(v, name) for v, name in ((stride, "stride"), (padding, "padding"),
                                                                      (dilation, "dilation")))
    # as torchvision and triton: a zero stride divided by zero, a zero dilation sampled every tap at one place
    check_conv_arguments((sh, sw), (ph, pw), (dh, dw))
    hout, wout = conv_output_size(h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw))
    # The sampling below would take its output size from the offsets and broadcast a mask of one image or one
    # tap; torchvision and triton refuse such shapes, so this does too.
    check_offset_mask_shapes(offset, mask, n, kh, kw, hout, wout)
    sample_dtype = torch.promote_types(input.dtype, torch.float32)
    source = input.to(sample_dtype)
    # grid_sample with align_corners=False maps pixel coordinate p to (2p + 1) / size - 1; this form stays
    # defined for size 1, unlike align_corners=True.
    base_y = torch.arange(hout, device=input.device, dtype=sample_dtype).view(1, 1, hout, 1) * sh - ph
    base_x = torch.arange(wout, device=input.device, dtype=sample_dtype).view(1, 1, 1, wout) * sw - pw
    taps = kh * kw
    rows = torch.arange(kh, device=input.device, dtype=sample_dtype).repeat_interleave(kw).view(1, taps, 1, 1) * dh
    cols = torch.arange(kw, device=input.device, dtype=sample_dtype).repeat(kh).view(1, taps, 1, 1) * dw
    pairs = offset.unflatten(1, (taps, 2))  # (N, taps, 2, Hout, Wout): splitting a dim is a view of any strides
    weights = weight.flatten(2)  # (Cout, Cin, taps)
    chunk = taps if n * cin * taps * hout * wout * source.element_size() <= COLUMN_BUDGET_BYTES else 1
    out = None
    for first in range(0, taps, chunk):
        t = slice(first, first + chunk)
        # Past one pixel outside the image every sample is torchvision's outside one (zero, zero gradient):
        # clamping there keeps an infinite offset (a half-precision overflow) from turning NaN in grid_sample.
        y = (base_y + rows[:, t] + pairs[:, t, 0].to(sample_dtype)).clamp(-2, h + 1)  # (N, chunk, Hout, Wout)
        x = (base_x + cols[:, t] + pairs[:, t, 1].to(sample_dtype)).clamp(-2, w + 1)
        grid = torch.stack(((2 * x + 1) / w - 1, (2 * y + 1) / h - 1), dim=-1).flatten(1, 2)  # (N, chunk*Hout, Wout, 2)
        sample = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # A NaN coordinate makes the sample NaN on every device: grid_sample's CPU kernel blends with NaN weights,
        # but its CUDA kernel moves non-finite coordinates outside the image (a zero sample). y and x are finite
        # or NaN here, so 0 * (y + x) adds an exact zero to the mask, or NaN.
        m = mask[:, None, t].to(sample_dtype) + (0 * (y + x))[:, None]
        sample = sample.unflatten(2, (chunk, hout)) * m  # (N, Cin, chunk, Hout, Wout)
        # bmm on the expanded weight, not matmul: matmul folds (Cout, K) @ (N, K, P) into one GEMM over N*P
        # columns, which copies the columns transposed forward and their gradient back in backward
        columns = sample.to(input.dtype).flatten(1, 2).flatten(2)  # (N, Cin*chunk, Hout*Wout)
        term = torch.bmm(weights[:, :, t].flatten(1).expand(n, -1, -1), columns)
        out = term if out is None else out + term  # (N, Cout, Hout*Wout)
    out = out.view(n, cout, hout, wout)
    if bias is not None:
        out = out + bias.view(1, cout, 1, 1).to(out.dtype)
    return out


def deform_conv2d(
    backend: str,
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """Run the modulated deformable conv on ``backend`` (see the module docstring); shapes as
    :func:`deform_conv2d_torchvision`."""
    name = resolve_backend(backend, input.device)
    if name == "torchvision":
        fn = deform_conv2d_torchvision
    elif name == "sampled":
        fn = deform_conv2d_sampled
    else:
        fn = kernels.modulated_deform_conv2d
    return fn(input, offset, mask, weight, bias, stride, padding, dilation)


def deform_conv2d_sets(
    backend: str,
    inputs: Sequence[Tensor],
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    levels: Sequence[Sequence[int]],
    offsets: Sequence[Sequence[Tensor]],
    masks: Sequence[Sequence[Tensor]],
    strides: Sequence[int | tuple[int, int]],
    padding: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
    *,
    sample_bases: Sequence[Tensor] | None = None,
    mask_logits: bool = False,
) -> list[list[Tensor]]:
    """:func:`deform_conv2d` of several weight sets, each on some of one list of inputs:
    ``out[s][j] = deform_conv2d(backend, inputs[levels[s][j]], offsets[s][j], masks[s][j], weights[s], biases[s],
    strides[s], padding, dilation)``. One launch for all convs on triton (``kernels.modulated_deform_conv2d_sets``),
    a loop elsewhere. inputs: (N, Cin, H_i, W_i) of one N and Cin; weights: S of one shape (Cout, Cin, kh, kw).
    mask_logits: the masks are logits (the modulation is their sigmoid); sample_bases: tensors the offsets and
    masks are views of, where triton writes their gradients directly (see the kernel op; ignored elsewhere)."""
    if resolve_backend(backend, inputs[0].device) == "triton":
        return kernels.modulated_deform_conv2d_sets(inputs, weights, biases, levels, offsets, masks, strides,
                                                    padding, dilation, sample_bases=sample_bases,
                                                    mask_logits=mask_logits)
    if mask_logits:
        masks = [[m.sigmoid() for m in set_masks] for set_masks in masks]
    return [[deform_conv2d(backend, inputs[i], o, m, weight, bias, stride, padding, dilation)
             for i, o, m in zip(indices, set_offsets, set_masks)]
            for weight, bias, stride, indices, set_offsets, set_masks in zip(weights, biases, strides, levels,
                                                                              offsets, masks)]


class ModulatedDeformConv2d(nn.Module):
    """A k x k modulated deformable conv layer (weights only; offsets and mask come from the caller).

    Args:
        in_channels: Cin.
        out_channels: Cout.
        kernel_size: k (DyHead: 3).
        stride: 1, or 2 for DyHead's finer-level branch.
        padding: zero padding of the sampling grid.
        bias: whether to learn a bias (the official release does; mmdetection's DyHead does not).

    Initialised as the official release: weight U(-1/sqrt(Cin*k*k), +1/sqrt(Cin*k*k)), bias zero.
    forward(x: (N, Cin, H, W), offset: (N, 2*k*k, Hout, Wout), mask: (N, k*k, Hout, Wout), backend) ->
    (N, Cout, Hout, Wout).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.padding = padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform weights in +-1/sqrt(fan_in), zero bias (the release's ModulatedDeformConv init)."""
        bound = 1.0 / math.sqrt(self.weight[0].numel())
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor, backend: str = "auto") -> Tensor:
        return deform_conv2d(backend, x, offset, mask, self.weight, self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        cout, cin, k, _ = self.weight.shape
        return (f"{cin}, {cout}, kernel_size={k}, stride={self.stride}, padding={self.padding}, "
                f"bias={self.bias is not None}")
