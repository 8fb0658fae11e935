"""The benchmarked ops: for each (op, impl, dtype) a callable that runs one step, and its float64 reference.

Every impl of an op gets the same inputs: they are drawn once in float64 from a seeded generator and cast to the
impl's dtype. The reference is torchvision's op (the ground truth of DyHead's semantics) run in float64.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import flops
from .shapes import ShapeSet

IMPLS = ("triton", "torchvision", "sampled")
DTYPES = ("bfloat16", "float32", "float16")
# The impl whose own error in a dtype is the noise floor of the check (see `first_failure`).
BASELINE = "torchvision"
NOISE_FACTOR = 2.0
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

# Largest relative norm error against the float64 reference (over outputs and gradients) that passes the check;
# a row above it, or with non-finite results, is still timed but flagged "check": "fail". These catch broken
# results, they certify no precision. Grad offset is a sum over channels of differences of corner values: in
# bf16 it loses most of its bits, and torchvision's own fp16 kernel accumulates it in half (~9% error). A whole
# DyHead stack in bf16/fp16 (GroupNorm and attentions included) drifts far more than one conv, above all in the
# gradients of the small parameters.
REL_ERR_TOL = {
    "dcn": {"float32": 1e-4, "float16": 0.2, "bfloat16": 0.2},
    "dyhead": {"float32": 1e-3, "float16": 0.5, "bfloat16": 1.0},
}

# Learned DCNv2 offsets in detectors are mostly within a few pixels; zeros would make every impl read a plain
# 3x3 window (perfect locality, no samples outside the image) and flatter the gathers.
OFFSET_STD = 2.0
# DyHead's offset conv (C -> 27) at PyTorch's default init gives offsets of std ~0.58 * std(input): this gain
# brings them to ~OFFSET_STD pixels on unit-variance inputs (block 0; the later blocks, fed smaller activations,
# get ~0.4 px).
OFFSET_CONV_GAIN = 3.5
OFFSET_CONV_CHANNELS = 27  # 18 offsets + 9 mask logits for a 3x3 kernel


@dataclass(frozen=True)
class OpSpec:
    """What one benchmarked op runs.

    Args:
        name: the record's "op".
        num_blocks: 0 for one 3x3 256->256 deformable conv at P3, else that many DyHead blocks on the pyramid.
        backward: whether a step is forward+backward (all input and parameter gradients) or forward only.
    """

    name: str
    num_blocks: int
    backward: bool

    def flops(self, shapes: ShapeSet) -> int:
        """FLOP of one step of the op at shapes (the deformable convs' multiply-adds x 2, `benchmarks.flops`)."""
        return flops.op_flops(self.num_blocks, self.backward, shapes)

    def tolerance(self, dtype: str) -> float:
        """The check's bound on the relative error (see REL_ERR_TOL)."""
        return REL_ERR_TOL["dcn" if self.num_blocks == 0 else "dyhead"][dtype]


OPS = {
    spec.name: spec
    for spec in (
        OpSpec("dcn_fwd", 0, False),
        OpSpec("dcn_fwd_bwd", 0, True),
        OpSpec("dyhead_block_fwd", 1, False),
        OpSpec("dyhead_block_fwd_bwd", 1, True),
        OpSpec("dyhead_6block_fwd", 6, False),
        OpSpec("dyhead_6block_fwd_bwd", 6, True),
    )
}

Step = Callable[[], tuple[Tensor | None, ...]]


def autocast_dtype(impl: str, dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
    """The dtype `impl`'s step runs under autocast in, or None: torchvision's op has no bfloat16 kernels, and under
    CUDA autocast it computes in float32 and casts back. On the CPU, where torchvision registers no autocast for
    its op, NotImplementedError says so: the op's own error begins with a C++ source path, all of it that the
    table's note has room for."""
    if impl != "torchvision" or dtype != torch.bfloat16:
        return None
    if device.type != "cuda":
        raise NotImplementedError("torchvision has no bfloat16 CPU kernel nor CPU autocast")
    return dtype


def dcn_function(impl: str) -> Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]:
    """f(input, offset, mask, weight, bias) of one impl: 3x3, stride 1, padding 1, one offset group.

    Imports lazily, so a missing impl fails only its own rows (ImportError).
    """
    if impl == "torchvision":
        from torchvision.ops import deform_conv2d

        return lambda x, offset, mask, weight, bias: deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    if impl == "sampled":
        from dyhead.deform import deform_conv2d_sampled

        return lambda x, offset, mask, weight, bias: deform_conv2d_sampled(x, offset, mask, weight, bias, padding=1)
    if impl == "triton":
        from kernels import modulated_deform_conv2d

        return lambda x, offset, mask, weight, bias: modulated_deform_conv2d(x, offset, mask, weight, bias, padding=1)
    raise ValueError(f"unknown impl {impl!r}, expected one of {IMPLS}")


def make_step(forward: Callable[[], list[Tensor]], leaves: list[Tensor], grad_outputs: list[Tensor],
              backward: bool, autocast: torch.dtype | None) -> Step:
    """One benchmark step: forward, plus the gradients of all `leaves` when `backward`.

    Returns the outputs, followed by the gradients (None for a leaf the outputs do not depend on). A forward-only
    step runs under no_grad, as inference does; backward runs outside autocast, as in AMP training.
    """
    def autocast_context():
        if autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(leaves[0].device.type, dtype=autocast)

    if not backward:
        def step():
            with torch.no_grad(), autocast_context():
                return tuple(forward())
        return step

    def step():
        with autocast_context():
            outputs = forward()
        grads = [g.to(o.dtype) for o, g in zip(outputs, grad_outputs)]
        return (*outputs, *torch.autograd.grad(outputs, leaves, grads, allow_unused=True))
    return step


class Problem:
    """The float64 inputs of one op on one device, shared by every (impl, dtype), and their reference results."""

    def __init__(self, spec: OpSpec, shapes: ShapeSet, device: torch.device | str, seed: int = 0):
        self.spec, self.shapes, self.device = spec, shapes, torch.device(device)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self._reference: tuple[Tensor, ...] | None = None
        self._noise: dict[torch.dtype, list[float] | None] = {}

    def randn(self, *shape: int, std: float = 1.0) -> Tensor:
        """Seeded float64 normal values on the problem's device (drawn on the CPU: the same on every machine)."""
        return (torch.randn(shape, generator=self.generator, dtype=torch.float64) * std).to(self.device)

    def step(self, impl: str, dtype: torch.dtype) -> Step:
        """The step of `impl` with inputs (and parameters) cast to `dtype`."""
        raise NotImplementedError

    def result_names(self) -> list[str]:
        """What each result of a step is: outputs, then (forward+backward) the gradients."""
        raise NotImplementedError

    def reference(self) -> tuple[Tensor, ...]:
        """Outputs (and gradients) of torchvision's op in float64, computed once."""
        if self._reference is None:
            self._reference = tuple(t.detach() if t is not None else None
                                    for t in self.step("torchvision", torch.float64)())
        return self._reference

    def noise_floor(self, dtype: torch.dtype) -> list[float] | None:
        """The relative errors of BASELINE's own results in `dtype` (rel_errors order), computed once. Where
        BASELINE has no bfloat16 kernel (the CPU): its float16 errors times the ratio of the two formats' unit
        roundoffs (8), in proportion to which rounding errors grow; None where it runs in neither."""
        if dtype not in self._noise:
            try:
                self._noise[dtype] = rel_errors(self.step(BASELINE, dtype)(), self.reference())
            except (RuntimeError, NotImplementedError):
                half = self.noise_floor(torch.float16) if dtype == torch.bfloat16 else None
                ratio = UNIT_ROUNDOFF[torch.bfloat16] / UNIT_ROUNDOFF[torch.float16]
                self._noise[dtype] = None if half is None else [ratio * e for e in half]
        return self._noise[dtype]

    def check(self, impl: str, dtype: torch.dtype, errors: list[float]) -> tuple[str, int | None]:
        """(status, index of the first failing result or None) of `impl`'s errors in `dtype`: "pass", "fail", or
        for BASELINE beyond the fixed bound with finite errors "floor" (its errors are the others' bound, see
        `first_failure`)."""
        tolerance = self.spec.tolerance(str(dtype).removeprefix("torch."))
        bad = first_failure(errors, tolerance, None if impl == BASELINE else self.noise_floor(dtype))
        if bad is None:
            return "pass", None
        return ("floor" if impl == BASELINE and all(map(math.isfinite, errors)) else "fail"), bad


class DcnProblem(Problem):
    """One 3x3 C->C modulated deformable conv at P3: x (N, C, H, W), offset (N, 18, H, W), mask (N, 9, H, W)."""

    def __init__(self, spec: OpSpec, shapes: ShapeSet, device: torch.device | str, seed: int = 0):
        super().__init__(spec, shapes, device, seed)
        n, c, h, w = shapes.dcn_shape()
        bound = (9 * c) ** -0.5  # the release's init of the deformable conv weight
        self.inputs = [
            self.randn(n, c, h, w),
            self.randn(n, 18, h, w, std=OFFSET_STD),
            torch.sigmoid(self.randn(n, 9, h, w)),
            (torch.rand((c, c, 3, 3), generator=self.generator, dtype=torch.float64) * 2 - 1).to(self.device) * bound,
            self.randn(c, std=0.1),
        ]
        self.grad_output = self.randn(n, c, h, w)

    def result_names(self) -> list[str]:
        grads = ["grad input", "grad offset", "grad mask", "grad weight", "grad bias"]
        return ["output"] + (grads if self.spec.backward else [])

    def step(self, impl: str, dtype: torch.dtype) -> Step:
        function = dcn_function(impl)
        leaves = [t.detach().to(dtype).requires_grad_(self.spec.backward) for t in self.inputs]
        return make_step(lambda: [function(*leaves)], leaves, [self.grad_output.to(dtype)], self.spec.backward,
                         autocast_dtype(impl, dtype, self.device))


class DyHeadProblem(Problem):
    """`num_blocks` DyHead blocks on the pyramid: levels (N, C, H_l, W_l), finest first, C in and C out."""

    def __init__(self, spec: OpSpec, shapes: ShapeSet, device: torch.device | str, seed: int = 0):
        super().__init__(spec, shapes, device, seed)
        torch.manual_seed(seed)  # DyHead draws its initial weights from the global generator
        reference = self.module("torchvision", torch.float64)
        self.state = reference.state_dict()
        self.param_names = sorted(name for name, _ in reference.named_parameters())
        self.levels = [self.randn(*shape) for shape in shapes.level_shapes()]
        self.grad_outputs = [self.randn(*shape) for shape in shapes.level_shapes()]
        with torch.no_grad():
            for name, value in self.state.items():
                if name.endswith("weight") and value.dim() == 4 and value.shape[0] == OFFSET_CONV_CHANNELS:
                    value.mul_(OFFSET_CONV_GAIN)

    def module(self, impl: str, dtype: torch.dtype) -> nn.Module:
        from dyhead import DyHead

        c = self.shapes.channels
        return DyHead(c, c, self.spec.num_blocks, backend=impl).to(device=self.device, dtype=dtype)

    def result_names(self) -> list[str]:
        levels = [f"P{3 + i}" for i in range(len(self.levels))]
        grads = [f"grad {name}" for name in levels + self.param_names]
        return [f"output {name}" for name in levels] + (grads if self.spec.backward else [])

    def step(self, impl: str, dtype: torch.dtype) -> Step:
        module = self.module(impl, dtype)
        module.load_state_dict(self.state)
        levels = [t.detach().to(dtype).requires_grad_(self.spec.backward) for t in self.levels]
        named = dict(module.named_parameters())
        params = [named[name] for name in self.param_names]
        return make_step(lambda: list(module(levels)), levels + params, [g.to(dtype) for g in self.grad_outputs],
                         self.spec.backward, autocast_dtype(impl, dtype, self.device))


def make_problem(op: str, shapes: ShapeSet, device: torch.device | str, seed: int = 0) -> Problem:
    """The problem of a named op (a key of OPS)."""
    spec = OPS[op]
    cls = DcnProblem if spec.num_blocks == 0 else DyHeadProblem
    return cls(spec, shapes, device, seed)


def first_failure(errors: list[float], tolerance: float, noise: list[float] | None = None) -> int | None:
    """Index of the first result whose error passes its bound (or is not finite), None if every one is within.

    A result's bound is the op's tolerance, or NOISE_FACTOR times the baseline's own error on that result in the
    same dtype where that is larger: a gradient that is a cancelling sum (after six bf16 blocks, the scale
    attention's bias grad) carries more rounding error than any fixed relative bound, in every implementation.
    """
    for i, error in enumerate(errors):
        bound = tolerance if noise is None else max(tolerance, NOISE_FACTOR * noise[i])
        if not math.isfinite(error) or error > bound:
            return i
    return None


def rel_errors(results: tuple[Tensor | None, ...], reference: tuple[Tensor | None, ...]) -> list[float]:
    """Relative norm error ||result - ref|| / ||ref|| of every output and gradient, computed in float64.

    A missing gradient (None) counts as zeros: it is wrong unless the reference's is zero too. Non-finite
    results give inf.
    """
    if len(results) != len(reference):
        raise ValueError(f"{len(results)} results where the reference has {len(reference)}")
    errors = []
    for out, ref in zip(results, reference):
        if out is None and ref is None:
            errors.append(0.0)
            continue
        ref = torch.zeros_like(out, dtype=torch.float64) if ref is None else ref.double()
        out = torch.zeros_like(ref) if out is None else out.double()
        if out.shape != ref.shape:
            raise ValueError(f"result of shape {tuple(out.shape)} where the reference has {tuple(ref.shape)}")
        error = ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()
        errors.append(error if math.isfinite(error) else math.inf)
    return errors
