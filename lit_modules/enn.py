"""Training ENN (Sinitsin et al., 2020, "Editable Neural Networks", ICLR, section 3; with the loss
weights of MEND's ENN baseline, Mitchell et al., 2022): the edited weights (as offsets from the
original ones) and their inner step sizes are meta-trained so that the inner loop's plain
gradient steps on the edit make the *rephrase* predict the new target while predictions elsewhere
hold:

    L = c_edit * NLL(new target | rephrase; Edit(theta))                    (the editing loss)
      + c_loc  * KL(p_theta0 || p_Edit(theta) on the locality input)        (locality)
      + c_base * KL(p_theta0 || p_theta on the batch's locality inputs)      (MEND's "base loss")

theta0 are the original weights, theta the meta-trained ones (original + offset) and Edit(theta)
the inner loop's result (see :mod:`editors.enn.network`: unrolled with ``higher``, second order).
The first two terms are the shared step of :class:`lit_modules.base.WeightEditModule` (per single
edit by default, as MEND's code trains ENN with one edit per inner loop); the base loss keeps the
meta-trained model itself close to the original, as MEND's code does with ``base_loss: distill``
(the paper's base loss is the original task's loss, which a language model edited here has no
data for). Its KL is taken on the locality prompts of the whole batch, once per step.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from factedit.editors.enn import ENNConfig
from factedit.editors.core.learned import answer_logits, edited_params

from .base import WeightEditModule


class ENNModule(WeightEditModule):
    """Args: see :class:`lit_modules.base.WeightEditModule`. ``lr`` is the Adam learning rate of the
    offsets (MEND's ``lr``, 1e-5, for weights of the model's own scale), ``lr_lr`` that of the log
    step sizes (Adam moves each by about ``lr_lr`` per step, i.e. the step size by ``lr_lr`` x 100
    percent), ``edit_weight`` is c_edit (MEND's 0.1), ``locality_weight`` c_loc and ``base_weight``
    c_base (both 1 in MEND's code)."""

    editor_name = "enn"

    def __init__(
        self,
        model: str | nn.Module = "smollm2-135m",
        editor: ENNConfig | None = None,
        lr: float = 1.0e-5,
        lr_lr: float = 1.0e-2,
        edit_weight: float = 1.0e-1,
        locality_weight: float = 1.0,
        base_weight: float = 1.0,
        edits_per_step: str = "single",
        export_dir: str | None = None,
    ) -> None:
        super().__init__(model, editor, lr, edit_weight, locality_weight, edits_per_step, export_dir)
        if base_weight < 0:
            raise ValueError(f"base_weight must be non-negative, got {base_weight}")
        self.lr_lr = lr_lr
        self.base_weight = base_weight

    def updates(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        # The inner loop is unrolled for the outer gradient only in a training step: decided by the
        # trainer's stage, not by the network's mode (Lightning leaves a module in eval mode at the
        # start of fitting when it was put there before).
        trainer = self._trainer
        training = trainer.training if trainer is not None else self.training
        _, updates = self.net.updates(self.base, batch["edit"], track=training)
        return updates

    def base_loss(self, locality: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """KL(original || meta-trained, without any edit) over the locality answer positions."""
        with torch.no_grad():
            original, _, _ = answer_logits(self.base, locality)
        meta, _, _ = answer_logits(self.base, locality, edited_params(self.base, self.net.offset_updates()))
        return F.kl_div(F.log_softmax(meta.float(), -1), F.log_softmax(original.float(), -1), log_target=True, reduction="batchmean")

    def step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        out = super().step(batch)
        out["loss_base"] = self.base_loss(batch["locality"])
        out["loss"] = out["loss"] + self.base_weight * out["loss_base"]
        return out

    def configure_optimizers(self):
        return torch.optim.Adam([{"params": list(self.net.offsets), "lr": self.lr}, {"params": [self.net.log_lr], "lr": self.lr_lr}])
