"""MEND as an editor: the fine-tuning gradient of the edit, transformed by the trained network.

Mitchell, Lin, Bosselut, Finn, Manning (2022), "Fast Model Editing at Scale" (ICLR). The edit is
``W~ = W - alpha_l sum_i delta~_i u~_i^T`` for every edited module (eq. 3), with ``u~, delta~`` the
transformed *standardised* factors (see :mod:`editors.mend.network`), stored as its factors: rank
at most the number of tokens of the edit requests.

Untrained (no checkpoint) the network has no statistics and the edit is a raw gradient step of
the tiny standardised step size; the honest untrained baseline is a warmed network with no
training step: ``python train.py fit --config configs/mend/zsre-quick.yaml --trainer.max_steps 0
--model.export_dir runs/train/mend-zsre-warmed``, then ``--editor.checkpoint runs/train/mend-zsre-warmed``.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from factedit.editors.base import Edit, Editor, EditRequest, register_editor
from factedit.editors.core.learned import LearnedEditorMixin, edited_modules, gradient_pieces, module_shape, request_batches
from factedit.editors.core.lm import model_device
from factedit.editors.core.targets import factors_in_param_layout, get_module, get_parameter_name

from .config import MENDConfig
from .network import MENDNetwork

logger = logging.getLogger(__name__)

@register_editor("mend", MENDConfig)
class MEND(LearnedEditorMixin, Editor):
    """Edits with MEND's gradient transform; with a warmed, untrained checkpoint it is one
    standardised gradient step."""

    def __init__(self) -> None:
        LearnedEditorMixin.__init__(self)

    def network_modules(self, model: nn.Module, config: MENDConfig) -> list[str]:
        return edited_modules(model, config.roles, config.layers, config.targets)

    def build_network(self, model: nn.Module, tokenizer: Any, config: MENDConfig) -> MENDNetwork:
        modules = {name: module_shape(model, name) for name in self.network_modules(model, config)}
        return MENDNetwork(modules, config.rank, config.n_hidden, config.edit_lr_init)

    def prepare(self, model: nn.Module, tokenizer: Any, config: MENDConfig) -> None:
        if self.network(model, tokenizer, config).observed() == 0:
            logger.warning(
                "MEND's network has no factor statistics (no checkpoint, or one trained without warm-up): "
                "each edit is a raw gradient step of the standardised step size %s", config.edit_lr_init,
            )

    def apply(self, model, tokenizer, requests: Sequence[EditRequest], config: MENDConfig) -> Edit:
        self.check_requests(requests)
        network = self.network(model, tokenizer, config)
        modules = network.module_names
        batch = request_batches(tokenizer, requests, model_device(model))
        loss, pieces = gradient_pieces(model, batch, modules)
        with torch.no_grad():
            factors = network.factors(pieces)
        deltas = {
            get_parameter_name(model, name): factors_in_param_layout(get_module(model, name), left.float().cpu(), right.float().cpu())
            for name, (left, right) in factors.items()
        }
        info = {"edit_loss_before": float(loss), "edit_lrs": network.edit_lrs(), "tokens": int(batch["attention_mask"].sum())}
        return Edit(self.name, deltas, [r.case_id for r in requests], config.to_dict(), info).apply(model)
