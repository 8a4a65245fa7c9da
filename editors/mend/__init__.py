"""MEND (Mitchell et al., 2022): a learned gradient transform per edited weight shape."""

from ..registry import lazy_attributes
from .config import MENDConfig

__all__ = ["MEND", "MENDConfig", "MENDNetwork", "GradientTransform"]

# The method itself, and torch, are imported on first access to one of its names.
__getattr__ = lazy_attributes(__name__, ".editor", ".network")
