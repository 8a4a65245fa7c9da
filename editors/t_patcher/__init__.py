"""T-Patcher: one trainable neuron per edit in an FFN (Huang et al., 2023), registered as ``t_patcher``. See :mod:`factedit.editors.t_patcher.editor`."""

from ..registry import lazy_attributes
from .config import TPatcherConfig

__all__ = ["TPatcherConfig", "TPatcher", "TPatcherEdit"]

# The method itself, and torch, are imported on first access to one of its names.
__getattr__ = lazy_attributes(__name__, ".editor")
