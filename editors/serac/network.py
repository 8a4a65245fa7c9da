"""SERAC's trained parts (Mitchell et al., 2022, "Memory-Based Model Editing at Scale", section 3):
the scope classifier ``g`` and the counterfactual model ``h``, both built from the edited model.

The paper builds ``g`` and ``h`` from separate pretrained models (a small encoder and a small
seq2seq/decoder model). With only the edited model available offline, both are carved out of it:

* **Scope classifier**, in its embedding-similarity form (input and edit embedded separately and
  compared, rather than read jointly by a cross-encoder): the feature of a position is the frozen
  model's hidden state after block ``classifier_layer`` at that position (it summarises the
  prefix ending there). A trainable projection maps features to ``embedding_dim``; the in-scope
  logit of an input position for a stored key is ``scale * (cos(P h_input, P h_key) - threshold)``
  with ``scale`` and ``threshold`` learned, and ``sigmoid`` of it is SERAC's in-scope probability.
  Untrained, ``P`` is a seeded random orthogonal projection (an isometry when ``embedding_dim >=
  hidden``; cosines are roughly preserved otherwise), ``scale = 20`` and ``threshold = 0.95``:
  only positions whose feature almost equals a stored key are routed, an exact-match baseline.
  (Stored keys are the features of the edit text at its positions that predict the new target:
  see :mod:`editors.serac.memory`.)
* **Counterfactual model**: a trainable copy of the model's bottom ``cf_layers`` blocks and of its
  final norm. It reads the frozen model's token embedding and its outputs are unembedded by the
  frozen model's output embedding; neither is copied or saved. Untrained, it is the frozen
  model's own bottom blocks, i.e. an early exit of the model reading ``edit + separator + input``.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from editors.targets import ModelTargets, get_module, num_layers, resolve_layer


class SharedEmbedding(nn.Module):
    """Stands in for the copy's token embedding, which is never used: the counterfactual model is
    always fed ``inputs_embeds`` from the edited model's own (frozen, shared) embedding."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the counterfactual model reads the edited model's embedding; call SERACNetwork.counterfactual_hidden")


def counterfactual_body(model: nn.Module, n_layers: int) -> nn.Module:
    """A float32 copy of ``model.base_model`` with only its bottom ``n_layers`` blocks (and its
    final norm, position embeddings, rotary tables), without the token embedding.

    Built from the model's config by its own class, then loaded with the model's weights: this
    works for any architecture whose body iterates over ``config.num_hidden_layers`` blocks
    (GPT-2, LLaMA, ...), and copies none of the hooks an edited model may carry.
    """
    body = model.base_model
    config = copy.deepcopy(body.config)
    config.num_hidden_layers = n_layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:n_layers]
    clone = type(body)(config).float()
    clone.set_input_embeddings(SharedEmbedding())
    source = body.state_dict()
    wanted = clone.state_dict()
    missing = sorted(set(wanted) - set(source))
    if missing:
        raise ValueError(f"cannot copy the bottom {n_layers} blocks of {type(body).__name__}: no weights for {missing[:5]}")
    clone.load_state_dict({name: source[name] for name in wanted})
    return clone


class SERACNetwork(nn.Module):
    """The scope classifier's projection, slope and threshold, and the counterfactual model.

    ``feature_module`` names the block whose output is the classifier's feature (not a parameter:
    the block belongs to the frozen model).
    """

    def __init__(self, model: nn.Module, targets: ModelTargets, classifier_layer: int, embedding_dim: int, cf_layers: int, init_scale: float, init_threshold: float) -> None:
        super().__init__()
        depth = num_layers(model, targets)
        layer = resolve_layer(model, targets, classifier_layer, "classifier_layer")
        if cf_layers > depth:
            raise ValueError(f"cf_layers {cf_layers} exceeds the model's {depth} blocks")
        self.feature_module = f"{targets.layers}.{layer}"
        get_module(model, self.feature_module)  # a clear error when the template is wrong
        hidden = model.get_input_embeddings().weight.shape[1]
        self.proj = nn.Linear(hidden, embedding_dim)
        nn.init.orthogonal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.threshold = nn.Parameter(torch.tensor(float(init_threshold)))
        self.body = counterfactual_body(model, cf_layers)

    def classifier_parameters(self) -> list[nn.Parameter]:
        return [*self.proj.parameters(), self.log_scale, self.threshold]

    # -- scope classifier g ----------------------------------------------------------------------
    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Unit-length embeddings ``[..., embedding_dim]`` of classifier features ``[..., hidden]``."""
        return F.normalize(self.proj(features.to(self.proj.weight.dtype)), dim=-1)

    def in_scope_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        """log-odds that an input is in an edit's scope, from the cosine of their embeddings."""
        return self.log_scale.exp() * (cosine - self.threshold)

    # -- counterfactual model h ----------------------------------------------------------------
    def counterfactual_hidden(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[batch, length, hidden]`` (float32) of right-padded sequences;
        ``unembed(model, ...)`` of them are the counterfactual model's logits."""
        embeds = model.get_input_embeddings()(input_ids).to(self.proj.weight.dtype)
        out = self.body(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state
