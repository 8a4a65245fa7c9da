"""KE, the KnowledgeEditor (De Cao, Aziz and Titov, 2021): a hyper-network that predicts a
constrained weight update from an edit and its fine-tuning gradient."""

from ..registry import lazy_attributes
from .config import KEConfig

__all__ = ["KE", "KEConfig", "KENetwork", "LowRankUpdate", "predict_updates"]

# The method itself, and torch, are imported on first access to one of its names.
__getattr__ = lazy_attributes(__name__, ".editor", ".network")
