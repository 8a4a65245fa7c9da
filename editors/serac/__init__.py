"""SERAC (Mitchell et al., 2022, "Memory-Based Model Editing at Scale", ICML): an explicit edit
memory, a scope classifier and a counterfactual model; inputs out of every edit's scope go to the
untouched model.

Deviations from the paper, each measured on zsRE with the default model (details in
:mod:`editors.serac.network`):

* the counterfactual model is not a separately pretrained small model but the edited model itself
  reading ``edit text + separator + input``, with a trainable copy of its top ``cf_layers`` blocks
  (frozen: token accuracy 0.82 on the edit prompt, 0.79 on the rephrase; a copy of the bottom
  blocks unembedded by the frozen head, the earlier design, scored 0.033). A separate small causal
  LM given by name or path is not implemented;
* the scope classifier is the embedding-similarity variant, on the frozen model's own features
  (the prefix mean of block 8's unit-normalised states: ROC AUC 1.000 against other zsRE questions,
  against 0.824 for block 15's last position), and routing is decided per position.

Parameters of the network for the default model (SmolLM2-135M: hidden 576, MLP 1536, 9 query and
3 key/value heads of 64), with the default settings:

* scope classifier: projection 576 x 256 + 256 bias, slope and threshold = 147,714;
* counterfactual model: the top 4 blocks of (q 576x576, k and v 576x192 each, o 576x576,
  gate/up/down 3 x 576x1536, two RMSNorms of 576) = 4 x 3,540,096, plus the final norm (576) =
  14,160,960.

Total 14,308,674 trained parameters (57 MB in float32); the lower 26 blocks, the token embedding
(49152 x 576) and the output embedding are the model's own, shared and frozen, and not saved.
"""

from ..registry import lazy_attributes
from .config import SERACConfig

__all__ = ["SERAC", "SERACConfig", "SERACEdit", "SERACNetwork", "EditMemory", "Bank", "Job", "base_pass", "counterfactual_states", "route", "routed_hidden"]

# The method itself, and torch, are imported on first access to one of its names.
__getattr__ = lazy_attributes(__name__, ".editor", ".memory", ".network")
