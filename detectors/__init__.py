"""Object detectors built on the DyHead neck: ATSS with a ResNet + FPN, its data pipeline, training engine
and the ``dyhead`` command line."""

from .atss import ATSS, ATSSHead, build_atss_dyhead
from .config import Config, load_config

__all__ = ["ATSS", "ATSSHead", "Config", "build_atss_dyhead", "load_config"]
