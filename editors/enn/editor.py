"""ENN as an editor (Sinitsin et al., 2020, "Editable Neural Networks", ICLR; the baseline of
Mitchell et al., 2022, "Fast Model Editing at Scale").

The edit of every edited module is

    dW = (W_meta - W) + sum over n_edit_steps of  -eta_l * grad NLL(new target | prompt)

the meta-trained weights' offset from the original ones plus the inner loop's plain gradient steps
at the learned step sizes (see :mod:`editors.enn.network`), stored densely (several steps and the
offset are not low-rank). Untrained (no checkpoint) the offset is zero and the step size
``edit_lr_init``: ``n_edit_steps`` steps of gradient descent on the edit. Several requests in one
call are edited jointly, by steps on the sum of their losses.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from torch import nn

from factedit.editors.base import Edit, Editor, EditRequest, ParamDelta, register_editor
from factedit.editors.core.learned import LearnedEditorMixin, edited_modules, module_shape, request_batches
from factedit.editors.core.lm import model_device
from factedit.editors.core.targets import delta_to_param_layout, get_module, get_parameter_name

from .config import ENNConfig
from .network import ENNNetwork

logger = logging.getLogger(__name__)


@register_editor("enn", ENNConfig)
class ENN(LearnedEditorMixin, Editor):
    """Editable Neural Networks: the meta-trained offset plus a few gradient steps at learned step sizes."""

    supports_batch = True

    def __init__(self) -> None:
        LearnedEditorMixin.__init__(self)

    def network_modules(self, model: nn.Module, config: ENNConfig) -> list[str]:
        return edited_modules(model, config.roles, config.layers, config.targets)

    def build_network(self, model: nn.Module, tokenizer: Any, config: ENNConfig) -> ENNNetwork:
        shapes = {name: module_shape(model, name) for name in self.network_modules(model, config)}
        return ENNNetwork(shapes, config.n_edit_steps, config.edit_lr_init)

    def apply(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], config: ENNConfig) -> Edit:
        self.check_requests(requests)
        net = self.network(model, tokenizer, config)
        batch = request_batches(tokenizer, requests, model_device(model))
        loss, updates = net.updates(model, batch)
        deltas = {
            get_parameter_name(model, name): ParamDelta(delta=delta_to_param_layout(get_module(model, name), update.float()).cpu().contiguous())
            for name, update in updates.items()
        }
        info = {
            "edit_loss_before": float(loss),
            "edit_lrs": net.edit_lrs(),
            "n_edit_steps": net.n_edit_steps,
            "offset_norm": {name: float(offset.detach().norm()) for name, offset in net.offset_updates().items()},
            "update_norm": {name: float(update.norm()) for name, update in updates.items()},
            "trained": config.checkpoint is not None,
        }
        logger.debug("enn: %d request(s), edit loss before %.4f", len(requests), info["edit_loss_before"])
        return Edit(self.name, deltas, [r.case_id for r in requests], config.to_dict(), info).apply(model)
