"""FLOP counts of the benchmarked ops, and the dense peak of known GPUs to compare them with.

Only the multiply-adds of the deformable 3x3 convs are counted (2 FLOPs each): they are the GEMM work every
implementation has to do. Not counted: bilinear sampling, the offset conv (C -> 27, about 10% more), GroupNorm,
the attentions and the gradients of offsets and mask. A backward counts twice its forward (grad input and
grad weight are one GEMM each), so forward+backward is 3x the forward.
"""

from __future__ import annotations

from .shapes import ShapeSet

TAPS = 9  # 3x3 kernel
BACKWARD_FACTOR = 3  # forward + (grad input + grad weight)


def dcn_flops(batch: int, c_in: int, c_out: int, h_out: int, w_out: int) -> int:
    """Forward FLOPs of one 3x3 deformable conv: 2 * N * Cout * Cin * 9 * Hout * Wout."""
    return 2 * batch * c_out * c_in * TAPS * h_out * w_out


def block_flops(shapes: ShapeSet) -> int:
    """Forward FLOPs of the 13 deformable convs of one DyHead block on a 5-level pyramid.

    Every output lands on a level's grid: the same-level conv on each level (5), the stride-2 conv on the finer
    neighbour for every level but the finest (4), and the conv on the coarser neighbour, at that neighbour's
    size before upsampling, for every level but the coarsest (4).
    """
    n, c = shapes.batch, shapes.channels
    per_level = [dcn_flops(n, c, c, h, w) for h, w in shapes.levels]
    same = sum(per_level)
    from_finer = sum(per_level[1:])
    from_coarser = sum(per_level[1:])
    return same + from_finer + from_coarser


def op_flops(num_blocks: int, backward: bool, shapes: ShapeSet) -> int:
    """FLOPs of one call: a single deformable conv at P3 when num_blocks is 0, else num_blocks DyHead blocks."""
    if num_blocks == 0:
        n, c, h, w = shapes.dcn_shape()
        forward = dcn_flops(n, c, c, h, w)
    else:
        forward = num_blocks * block_flops(shapes)
    return forward * (BACKWARD_FACTOR if backward else 1)


# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets, per GPU name substring (first match wins).
# "float32" is the CUDA-core rate; "tf32" applies to float32 when torch allows TF32 matmuls. Data-sheet values,
# not measured ones: an H100 SXM reaches about 790 of its 989 bf16 TFLOP/s in a large cuBLAS GEMM.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "tf32": 378.0, "float32": 51.0}),
    ("H100 NVL", {"bfloat16": 835.0, "float16": 835.0, "tf32": 418.0, "float32": 60.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "tf32": 494.0, "float32": 67.0}),  # SXM
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "tf32": 494.0, "float32": 67.0}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0, "float32": 19.5}),
)


def peak_tflops(device_name: str, dtype: str, tf32: bool) -> float | None:
    """Dense peak of the named GPU for `dtype` (a torch dtype name), or None for an unknown GPU or the CPU."""
    key = "tf32" if dtype == "float32" and tf32 else dtype
    for pattern, peaks in PEAK_TFLOPS:
        if pattern in device_name:
            return peaks.get(key)
    return None
