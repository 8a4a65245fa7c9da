"""ENN, Editable Neural Networks (Sinitsin et al., 2020): edited layers meta-trained, with learned
step sizes, so that a few plain gradient steps on an edit make it succeed."""

from ..registry import lazy_attributes
from .config import ENNConfig

__all__ = ["ENN", "ENNConfig", "ENNNetwork"]

# The method itself, and torch, are imported on first access to one of its names.
__getattr__ = lazy_attributes(__name__, ".editor", ".network")
