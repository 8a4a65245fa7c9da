"""CaliNET: calibration memory slots beside the FFNs of the top blocks (Dong et al., 2022). See :mod:`editors.calinet.editor`."""

from ..registry import lazy_attributes
from .config import CaliNETConfig

__all__ = ["CaliNETConfig", "CaliNET", "CaliNETEdit"]

# The method itself, and torch, are imported on first access to one of its names.
__getattr__ = lazy_attributes(__name__, ".editor")
