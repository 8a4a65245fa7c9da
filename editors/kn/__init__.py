"""KN: editing facts through knowledge neurons (Dai et al., 2022). See :mod:`editors.kn.editor`."""

from ..registry import lazy_attributes
from .config import KNConfig

__all__ = ["KNConfig", "KnowledgeNeurons"]

# The method itself, and torch, are imported on first access to one of its names.
__getattr__ = lazy_attributes(__name__, ".editor")
