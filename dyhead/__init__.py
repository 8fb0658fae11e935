"""Dynamic Head layers: the PyTorch reference path and, behind ``backend="triton"``, the fused kernels."""

from .block import DyHead, DyHeadBlock, check_pyramid
from .deform import (
    BACKENDS,
    ModulatedDeformConv2d,
    deform_conv2d,
    deform_conv2d_sampled,
    deform_conv2d_torchvision,
)
from .official import convert_state_dict, load_official
from .scale import ScaleAttention
from .spatial import DeformConvNorm, SpatialAttention, coarser_view
from .task import TaskAttention

__all__ = [
    "BACKENDS",
    "DeformConvNorm",
    "DyHead",
    "DyHeadBlock",
    "ModulatedDeformConv2d",
    "ScaleAttention",
    "SpatialAttention",
    "TaskAttention",
    "check_pyramid",
    "coarser_view",
    "convert_state_dict",
    "deform_conv2d",
    "deform_conv2d_sampled",
    "deform_conv2d_torchvision",
    "load_official",
]
