"""Triton kernels for DyHead. Each op has a PyTorch reference twin in ``dyhead``."""

from .deform_conv_op import modulated_deform_conv2d, modulated_deform_conv2d_pyramid, modulated_deform_conv2d_sets
from .grouped_combine import level_combine_grouped
from .grouped_moments import channel_moments_grouped
from .block_attention import block_attention
from .level_pass import channel_moments, level_combine
from .pyramid_conv import pyramid_conv2d
from .upsample import upsample_bilinear

__all__ = ["block_attention", "channel_moments", "channel_moments_grouped", "level_combine", "level_combine_grouped",
           "modulated_deform_conv2d", "modulated_deform_conv2d_pyramid", "modulated_deform_conv2d_sets",
           "pyramid_conv2d", "upsample_bilinear"]
