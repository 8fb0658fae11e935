"""Object detectors built on the DyHead neck (ATSS, RetinaNet, Faster R-CNN) with ResNet or Swin backbones and
an FPN, their data pipeline, training engine and the ``dyhead`` command line."""

from .atss import ATSS, ATSSHead, build_atss_dyhead
from .build import build_detector
from .config import Config, load_config

__all__ = ["ATSS", "ATSSHead", "Config", "build_atss_dyhead", "build_detector", "load_config"]
