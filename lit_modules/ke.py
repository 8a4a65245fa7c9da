"""Training of KE's hyper-network (De Cao, Aziz and Titov, 2021, "Editing Factual Knowledge in
Language Models", EMNLP, section 3: the constrained objective and its Lagrangian relaxation).

For an edit (x, a) the network's update theta' = theta + g(x, a; phi) should make the new target
likely on the edit prompt and its paraphrases P^x, while leaving the predictions on other inputs
O^x unchanged (the constrained objective):

    min_phi  sum_{x^ in P^x} -log p(a | x^; theta')   subject to   C = KL(p(. | O^x; theta) || p(. | O^x; theta')) <= m

Here P^x is the edit prompt and its rephrase and O^x the locality prompt, with the KL averaged over
its answer positions. As in the paper, the constraint is relaxed into a Lagrangian with a
multiplier lambda >= 0 that is updated by dual ascent:

    L(phi, lambda) = edit_loss + lambda * (C - m),   phi <- Adam step on L,   lambda <- max(0, lambda + lr_lambda * (C - m)).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from editors.ke import KEConfig, predict_updates

from .base import WeightEditModule


class KEModule(WeightEditModule):
    """Trains :class:`editors.ke.KENetwork` by KE's constrained objective.

    Args:
        model: the model to edit: a bundled name, hub id or local path, or an ``nn.Module``.
        editor: KE's settings; their architecture fields (roles, layers, sizes, step size) are
            recorded in the exported network and must match at edit time.
        lr: the network's Adam learning rate.
        margin: m, the bound on the locality KL (nats per locality answer token); the paper's
            code starts from 1e-3.
        multiplier_init: initial Lagrange multiplier lambda of the KL constraint.
        multiplier_lr: dual-ascent step size of lambda (per training step, times the violation C - m).
        edits_per_step, export_dir: see :class:`lit_modules.base.WeightEditModule` (with single
            edits the Lagrangian is taken at the batch's mean losses, one dual-ascent step per batch).
    """

    editor_name = "ke"
    edit_parts = ("edit", "rephrase")  # KE sums the loss over the prompt and its paraphrases

    def __init__(
        self,
        model: str | nn.Module = "smollm2-135m",
        editor: KEConfig | None = None,
        lr: float = 1.0e-4,
        margin: float = 1.0e-3,
        multiplier_init: float = 1.0,
        multiplier_lr: float = 1.0,
        edits_per_step: str = "single",
        export_dir: str | None = None,
    ) -> None:
        super().__init__(model, editor, lr, edits_per_step=edits_per_step, export_dir=export_dir)
        if margin < 0 or multiplier_init < 0 or multiplier_lr < 0:
            raise ValueError("margin, multiplier_init and multiplier_lr must be non-negative")
        self.margin = margin
        self.multiplier_lr = multiplier_lr
        # A buffer: saved and restored with Lightning checkpoints, never touched by the optimiser.
        self.register_buffer("multiplier", torch.tensor(float(multiplier_init)))

    def updates(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        _, updates = predict_updates(self.net, self.base, batch["edit"])
        return {name: update.dense() for name, update in updates.items()}

    def combine(self, edit_loss: torch.Tensor, locality_kl: torch.Tensor) -> torch.Tensor:
        """The Lagrangian at the current multiplier; in training, then one dual-ascent step on it."""
        loss = edit_loss + self.multiplier.clone() * (locality_kl - self.margin)  # clone: updated in place below
        if self.training:
            with torch.no_grad():
                self.multiplier.add_(self.multiplier_lr * (locality_kl.detach() - self.margin)).clamp_(min=0.0)
        return loss

    def step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        out = super().step(batch)
        self.log(f"{'train' if self.training else 'val'}/multiplier", self.multiplier.clone(), on_step=self.training, on_epoch=True, batch_size=len(batch["case_id"]))
        return out
