"""SERAC (Mitchell et al., 2022, "Memory-Based Model Editing at Scale", ICML): an explicit edit
memory, a scope classifier and a counterfactual model; inputs out of every edit's scope go to the
untouched model.

Parameters of the network for the default model (SmolLM2-135M: hidden 576, MLP 1536, 9 query and
3 key/value heads of 64), with the default settings:

* scope classifier: projection 576 x 256 + 256 bias, slope and threshold = 147,714;
* counterfactual model: 4 blocks of (q 576x576, k and v 576x192 each, o 576x576, gate/up/down
  3 x 576x1536, two RMSNorms of 576) = 4 x 3,540,096, plus the final norm (576) = 14,160,960.

Total 14,308,674 trained parameters (57 MB in float32); the token embedding (49152 x 576) and the
output embedding are the model's own, shared and frozen, and not saved.
"""

from .config import SERACConfig
from .editor import SERAC, SERACEdit
from .memory import Bank, EditMemory, Job, base_pass, counterfactual_states, route, routed_hidden
from .network import SERACNetwork

__all__ = ["SERAC", "SERACConfig", "SERACEdit", "SERACNetwork", "EditMemory", "Bank", "Job", "base_pass", "counterfactual_states", "route", "routed_hidden"]
