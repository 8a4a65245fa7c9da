"""WISE: a side memory beside one FFN value matrix, with routing, sharding and merging (Wang et al., 2024). See :mod:`editors.wise.editor`."""

from ..registry import lazy_attributes
from .config import WISEConfig

__all__ = ["WISEConfig", "WISE", "WISEEdit"]

# The method itself, and torch, are imported on first access to one of its names.
__getattr__ = lazy_attributes(__name__, ".editor")
