"""KE, the KnowledgeEditor (De Cao, Aziz and Titov, 2021): a hyper-network that predicts a
constrained weight update from an edit and its fine-tuning gradient."""

from .config import KEConfig
from .editor import KE
from .network import KENetwork, LowRankUpdate, predict_updates

__all__ = ["KE", "KEConfig", "KENetwork", "LowRankUpdate", "predict_updates"]
