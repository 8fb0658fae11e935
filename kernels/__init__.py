"""Triton kernels for DyHead. Each op has a PyTorch reference twin in ``dyhead``."""

from .deform_conv_op import modulated_deform_conv2d

__all__ = ["modulated_deform_conv2d"]
