"""Fine-tuning editors: FT-L and FT-M. See :mod:`editors.ft.editor`."""

from ..registry import lazy_attributes
from .config import FTConfig, FTLConfig, FTMConfig

__all__ = ["FTConfig", "FTLConfig", "FTMConfig", "FineTune", "FTL", "FTM"]

# The method itself, and torch, are imported on first access to one of its names.
__getattr__ = lazy_attributes(__name__, ".editor")
