"""GRACE: a discrete key-value codebook at one layer (Hartvigsen et al., 2023). See :mod:`editors.grace.editor`."""

from ..registry import lazy_attributes
from .config import GRACEConfig

__all__ = ["GRACEConfig", "GRACE", "GRACEEdit"]

# The method itself, and torch, are imported on first access to one of its names.
__getattr__ = lazy_attributes(__name__, ".editor")
