"""MEMIT (Meng et al., 2023) and the methods that share its machinery: PMET and AlphaEdit."""

from ..registry import lazy_attributes
from .config import AlphaEditConfig, MEMITConfig, PMETConfig

__all__ = ["MEMITConfig", "MEMIT", "PMETConfig", "PMET", "AlphaEditConfig", "AlphaEdit"]

# The methods themselves, and torch, are imported on first access to one of their names.
__getattr__ = lazy_attributes(__name__, ".editor", ".pmet", ".alphaedit")
