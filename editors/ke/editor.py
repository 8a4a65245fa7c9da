"""KE, the KnowledgeEditor (De Cao, Aziz and Titov, 2021, "Editing Factual Knowledge in Language
Models", EMNLP): a hyper-network, trained once (:mod:`lit_modules.ke`), that turns an edit and the
fine-tuning gradient it induces into a constrained weight update (see :mod:`editors.ke.network`).

Several requests in one call are edited jointly: each is encoded on its own (its own condition
and its own gradient) and the per-request updates are summed, so each edited weight changes by a
matrix of rank ``sum(tokens of each request + 1)``, stored as its factors.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from ..base import Edit, Editor, EditRequest, register_editor
from ..core.learned import LearnedEditorMixin, edited_modules, module_shape, request_batches
from ..core.lm import model_device
from ..core.targets import factors_in_param_layout, get_module, get_parameter_name
from .config import KEConfig
from .network import KENetwork, predict_updates

logger = logging.getLogger(__name__)


@register_editor("ke", KEConfig)
class KE(LearnedEditorMixin, Editor):
    """KnowledgeEditor: one forward pass of the (trained or untrained) hyper-network per call."""

    supports_batch = True

    def __init__(self) -> None:
        LearnedEditorMixin.__init__(self)

    def network_modules(self, model: nn.Module, config: KEConfig) -> list[str]:
        return edited_modules(model, config.roles, config.layers, config.targets)

    def build_network(self, model: nn.Module, tokenizer: Any, config: KEConfig) -> KENetwork:
        shapes = {name: module_shape(model, name) for name in self.network_modules(model, config)}
        return KENetwork(shapes, model.get_input_embeddings().weight.shape[1], config)

    def apply(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], config: KEConfig) -> Edit:
        self.check_requests(requests)
        net = self.network(model, tokenizer, config)
        batch = request_batches(tokenizer, requests, model_device(model))
        with torch.no_grad():
            loss, updates = predict_updates(net, model, batch)
        deltas = {
            get_parameter_name(model, name): factors_in_param_layout(get_module(model, name), update.left, update.right)
            for name, update in updates.items()
        }
        info = {
            "loss_before": float(loss),
            "rank": {name: update.left.shape[1] for name, update in updates.items()},
            "update_norm": {name: float(update.norm()) for name, update in updates.items()},
            "trained": config.checkpoint is not None,
        }
        logger.debug("ke: %d request(s), edit loss before %.4f", len(requests), info["loss_before"])
        return Edit(self.name, deltas, [r.case_id for r in requests], config.to_dict(), info).apply(model)
