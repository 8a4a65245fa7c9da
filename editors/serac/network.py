"""SERAC's trained parts (Mitchell et al., 2022, "Memory-Based Model Editing at Scale", section 3):
the scope classifier ``g`` and the counterfactual model ``h``, both built on the edited model.

The paper builds ``g`` and ``h`` from separate pretrained models (a small encoder and a small
seq2seq/decoder model). Here both are built on the edited model itself, which is loaded anyway
(a separate small causal LM given by name or path, which the paper allows, is not implemented):

* **Scope classifier**, in its embedding-similarity form (input and edit embedded separately and
  compared, rather than read jointly by a cross-encoder). The feature of a position summarises
  the prefix ending there: with ``pooling="mean"`` (the default) the mean, over the prefix's
  positions, of the unit-normalised hidden states after block ``classifier_layer``; with
  ``pooling="last"`` the hidden state at the position itself. A trainable projection maps
  features to ``embedding_dim``; the in-scope logit of an input position for a stored key is
  ``scale * (cos(P f_input, P f_key) - threshold)`` with ``scale`` and ``threshold`` learned, and
  ``sigmoid`` of it is SERAC's in-scope probability. Untrained, ``P`` is a seeded random
  orthogonal projection, ``scale = 20`` and ``threshold = 0.95``: only near-copies of a stored
  edit are routed.

  Measured on 100 zsRE training questions with the default model (frozen features, cosine, no
  projection): how well a question's rephrase is told from other zsRE questions / from NQ
  questions (ROC AUC), and how often its own edit is the nearest key (top-1):

  ======================================  =========  ========  =====
  feature                                 AUC zsRE   AUC NQ    top-1
  ======================================  =========  ========  =====
  block 15, last position (before)        0.824      1.000     0.44
  block 29 (last), last position          0.982      1.000     0.88
  block 8, prefix mean of raw states      0.997      0.998     0.93
  block 8, prefix mean of unit states     1.000      1.000     0.98
  ======================================  =========  ========  =====

  hence block 8 and ``pooling="mean"`` by default (unit-normalising keeps the first position's
  outsized state from dominating the mean).
* **Counterfactual model**: the edited model reading ``edit text + separator + input``, with its
  top ``cf_layers`` blocks and final norm replaced by a trainable float32 copy. The frozen lower
  blocks, the token embedding and the output embedding are the edited model's own, shared and
  not saved: the network's state holds only the copy. Untrained, it is exactly the frozen model
  reading the edit in context (token accuracy 0.82 on the edit prompt, 0.79 on the rephrase, on
  zsRE); the paper's separately pretrained small model is replaced by this, since the earlier
  design (a copy of the *bottom* 4 blocks, unembedded by the frozen head) scored 0.033.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from factedit.editors.core.hooks import trace
from factedit.editors.core.lm import hidden_states
from factedit.editors.core.targets import ModelTargets, get_module, num_layers, resolve_layer

POOLINGS = ("mean", "last")


class SharedEmbedding(nn.Module):
    """Stands in for the copy's token embedding, which is never used: the copy is fed the frozen
    lower blocks' output as ``inputs_embeds``."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the counterfactual model reads the edited model's lower blocks; call SERACNetwork.counterfactual_hidden")


class NoPositions(nn.Module):
    """Stands in for the copy's learned position embedding (GPT-2's ``wpe``, OPT's): the lower
    blocks' output already carries positions. Its zero broadcasts over the input."""

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        return torch.zeros(())


def top_blocks(model: nn.Module, targets: ModelTargets, n_layers: int) -> nn.Module:
    """A float32 copy of ``model.base_model`` holding only its top ``n_layers`` blocks and its
    final norm (and rotary tables), without token or position embeddings.

    Built from the model's config by its own class, then loaded with the model's weights (block
    ``depth - n_layers + i`` into the copy's block ``i``): this works for any architecture whose
    body iterates over ``config.num_hidden_layers`` blocks (GPT-2, LLaMA, ...), and copies none of
    the hooks an edited model may carry.
    """
    body = model.base_model
    blocks = get_module(model, targets.layers)
    depth = len(blocks)
    prefix = next(name for name, module in body.named_modules() if module is blocks)  # "layers", "h", ...
    config = copy.deepcopy(body.config)
    config.num_hidden_layers = n_layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[depth - n_layers :]
    clone = type(body)(config).float()
    clone.set_input_embeddings(SharedEmbedding())
    for name, child in list(clone.named_children()):
        if isinstance(child, nn.Embedding):  # the token embedding is already replaced: positions
            setattr(clone, name, NoPositions())

    def source_key(key: str) -> str:
        if not key.startswith(prefix + "."):
            return key
        index, rest = key[len(prefix) + 1 :].split(".", 1)
        return f"{prefix}.{int(index) + depth - n_layers}.{rest}"

    source = body.state_dict()
    wanted = {key: source_key(key) for key in clone.state_dict()}
    missing = sorted(v for v in wanted.values() if v not in source)
    if missing:
        raise ValueError(f"cannot copy the top {n_layers} blocks of {type(body).__name__}: no weights for {missing[:5]}")
    clone.load_state_dict({key: source[name] for key, name in wanted.items()})
    return clone


class SERACNetwork(nn.Module):
    """The scope classifier's projection, slope and threshold, and the counterfactual model's top
    blocks (``top``).

    ``feature_module`` names the block whose output is the classifier's feature and
    ``entry_module`` the block whose output enters the top copy (neither is a parameter: they
    belong to the frozen model).
    """

    def __init__(
        self,
        model: nn.Module,
        targets: ModelTargets,
        classifier_layer: int,
        embedding_dim: int,
        cf_layers: int,
        init_scale: float,
        init_threshold: float,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        depth = num_layers(model, targets)
        layer = resolve_layer(model, targets, classifier_layer, "classifier_layer")
        if not 1 <= cf_layers < depth:
            raise ValueError(f"cf_layers must be between 1 and {depth - 1} (the model has {depth} blocks; at least one stays frozen), got {cf_layers}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.feature_module = f"{targets.layers}.{layer}"
        self.entry_module = f"{targets.layers}.{depth - cf_layers - 1}"
        get_module(model, self.feature_module)  # a clear error when the template is wrong
        hidden = model.get_input_embeddings().weight.shape[1]
        self.proj = nn.Linear(hidden, embedding_dim)
        nn.init.orthogonal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.threshold = nn.Parameter(torch.tensor(float(init_threshold)))
        self.top = top_blocks(model, targets, cf_layers)

    def classifier_parameters(self) -> list[nn.Parameter]:
        return [*self.proj.parameters(), self.log_scale, self.threshold]

    # -- scope classifier g ----------------------------------------------------------------------
    def pool(
        self, states: torch.Tensor, mask: torch.Tensor, carry: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Classifier features ``[batch, n, hidden]`` of the block outputs ``states`` of ``n``
        columns, ``mask`` ``[batch, n]`` marking real tokens. ``carry`` (sum of unit states, count
        of real tokens per row) continues the prefix means of earlier columns, as a KV-cached pass
        needs; the carry after these columns is returned with the features."""
        mask = mask.to(states.device)
        if self.pooling == "last":
            empty = states.new_zeros(states.shape[0], states.shape[-1])
            return states, (empty, mask.new_zeros(states.shape[0]))
        unit = F.normalize(states.float(), dim=-1) * mask[..., None]
        sums, counts = unit.cumsum(1), mask.long().cumsum(1)
        if carry is not None:
            sums, counts = sums + carry[0][:, None], counts + carry[1][:, None]
        features = sums / counts.clamp(min=1)[..., None]
        return features, (sums[:, -1], counts[:, -1])

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Unit-length embeddings ``[..., embedding_dim]`` of classifier features ``[..., hidden]``."""
        return F.normalize(self.proj(features.to(self.proj.weight.dtype)), dim=-1)

    def in_scope_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        """log-odds that an input is in an edit's scope, from the cosine of their embeddings."""
        return self.log_scale.exp() * (cosine - self.threshold)

    # -- counterfactual model h ----------------------------------------------------------------
    def counterfactual_hidden(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[batch, length, hidden]`` (float32) of right-padded sequences;
        ``unembed(model, ...)`` of them are the counterfactual model's logits. The frozen model
        runs whole (its top blocks' output is unused) and must not be routed meanwhile."""
        with torch.no_grad(), trace(model, [self.entry_module], inputs=False, outputs=True) as traced:
            hidden_states(model, input_ids, attention_mask)
        lower = traced[self.entry_module].output.to(self.proj.weight.dtype)
        out = self.top(inputs_embeds=lower, attention_mask=attention_mask, use_cache=False)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state
