"""MEND (Mitchell et al., 2022): a learned gradient transform per edited weight shape."""

from .config import MENDConfig
from .editor import MEND
from .network import GradientTransform, MENDNetwork

__all__ = ["MEND", "MENDConfig", "MENDNetwork", "GradientTransform"]
