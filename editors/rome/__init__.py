"""ROME (Meng et al., 2022) and the machinery MEMIT, PMET and AlphaEdit share with it."""

from ..registry import lazy_attributes
from .config import LocateConfig, ROMEConfig

__all__ = ["LocateConfig", "ROMEConfig", "ROME", "LocateEditor"]

# The method itself, and torch, are imported on first access to one of its names.
__getattr__ = lazy_attributes(__name__, ".editor")
