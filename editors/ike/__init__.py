"""IKE: in-context knowledge editing (Zheng et al., 2023). See :mod:`editors.ike.editor`."""

from ..registry import lazy_attributes
from .config import IKEConfig

__all__ = ["IKEConfig", "IKE", "IKEEdit"]

# The method itself, and torch, are imported on first access to one of its names.
__getattr__ = lazy_attributes(__name__, ".editor")
