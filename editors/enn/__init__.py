"""ENN, Editable Neural Networks (Sinitsin et al., 2020): edited layers meta-trained, with learned
step sizes, so that a few plain gradient steps on an edit make it succeed."""

from .config import ENNConfig
from .editor import ENN
from .network import ENNNetwork

__all__ = ["ENN", "ENNConfig", "ENNNetwork"]
