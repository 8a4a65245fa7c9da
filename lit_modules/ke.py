"""Training of KE's hyper-network (De Cao, Aziz and Titov, 2021, "Editing Factual Knowledge in
Language Models", EMNLP, section 3: the constrained objective and its Lagrangian relaxation).

For an edit (x, a) the network's update theta' = theta + g(x, a; phi) should make the new target
likely on the edit prompt and its paraphrases P^x, while leaving the predictions on other inputs
O^x unchanged (the constrained objective):

    min_phi  sum_{x^ in P^x} -log p(a | x^; theta')   subject to   C = KL(p(. | O^x; theta) || p(. | O^x; theta')) <= m

Here P^x is the edit prompt and its rephrase and O^x the locality prompt, with the KL averaged over
its answer positions. As in the paper, the constraint is relaxed into a Lagrangian
L(phi, lambda) = edit_loss + lambda * (C - m), minimised in phi and maximised in lambda >= 0.

As in the authors' code, lambda is a trained parameter: the optimiser takes small *ascent* steps on
it (its gradient, C - m, is negated), so it rises by about ``multiplier_lr`` per step while the
constraint is violated and falls when it holds, and it is kept non-negative. The margin m starts
at ``margin`` and is multiplied by 0.8 (down to ``margin_min``) after each validation on which the
edit prompts' success exceeds ``anneal_at``: the constraint tightens only once edits succeed.
(The authors use centred RMSprop for both; here one Adam optimiser, whose step on lambda is
likewise about its learning rate whatever the size of the violation. An earlier version raised
lambda by 1.0 * (C - m) per step: 100 steps pushed it so high that the network only learnt to
shrink its update, reliability 0.776 -> 0.361, locality 0.385 -> 0.992 on zsRE.)

The gradient's factors are standardised with statistics gathered on ``warmup_edits`` training
edits before the first step (see :mod:`editors.ke.network`), so ``--trainer.max_steps 0`` exports
the untrained, warmed network: the baseline training is measured against.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torchmetrics import MeanMetric

from factedit.editors.ke import KEConfig, predict_updates

from .base import WeightEditModule


class KEModule(WeightEditModule):
    """Trains :class:`editors.ke.KENetwork` by KE's constrained objective.

    Args:
        model: the model to edit: a bundled name, hub id or local path, or an ``nn.Module``.
        editor: KE's settings; their architecture fields (roles, layers, sizes, step size) are
            recorded in the exported network and must match at edit time.
        lr: the network's Adam learning rate.
        margin: the initial bound m on the locality KL (nats per locality answer token); the
            authors' code starts from 1e-3.
        margin_min: the smallest margin annealing may reach (the authors' 1e-5).
        anneal_at: the validation edit success above which the margin is annealed (x 0.8).
        multiplier_init: initial Lagrange multiplier lambda of the KL constraint.
        multiplier_lr: the learning rate of lambda's ascent steps (the authors' 0.1).
        edits_per_step, export_dir: see :class:`lit_modules.base.WeightEditModule` (with single
            edits the Lagrangian is taken at the batch's mean losses).
        warmup_edits: training edits whose factors are gathered before the first step.
    """

    editor_name = "ke"
    edit_parts = ("edit", "rephrase")  # KE sums the loss over the prompt and its paraphrases

    def __init__(
        self,
        model: str | nn.Module = "smollm2-135m",
        editor: KEConfig | None = None,
        lr: float = 1.0e-4,
        margin: float = 1.0e-3,
        margin_min: float = 1.0e-5,
        anneal_at: float = 0.9,
        multiplier_init: float = 1.0,
        multiplier_lr: float = 1.0e-1,
        edits_per_step: str = "single",
        export_dir: str | None = None,
        warmup_edits: int = 200,
    ) -> None:
        super().__init__(model, editor, lr, edits_per_step=edits_per_step, export_dir=export_dir, warmup_edits=warmup_edits)
        if min(margin, margin_min, multiplier_init, multiplier_lr) < 0 or margin_min > margin:
            raise ValueError("margin, margin_min, multiplier_init and multiplier_lr must be non-negative, with margin_min <= margin")
        self.margin_min = margin_min
        self.anneal_at = anneal_at
        self.multiplier_lr = multiplier_lr
        # Saved and restored with Lightning checkpoints (the network alone is exported).
        self.multiplier = nn.Parameter(torch.tensor(float(multiplier_init)))
        self.multiplier.register_hook(lambda grad: -grad)  # ascent: lambda grows while C > m
        self.register_buffer("margin", torch.tensor(float(margin)))
        self.val_edit_success = MeanMetric()

    def updates(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        _, updates = predict_updates(self.net, self.base, batch["edit"])
        return {name: update.dense() for name, update in updates.items()}

    def combine(self, edit_loss: torch.Tensor, locality_kl: torch.Tensor) -> torch.Tensor:
        """The Lagrangian at the current multiplier and margin."""
        return edit_loss + self.multiplier * (locality_kl - self.margin)

    def configure_optimizers(self):
        return torch.optim.Adam([{"params": self.net.parameters(), "lr": self.lr}, {"params": [self.multiplier], "lr": self.multiplier_lr}])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.multiplier.clamp_(min=0.0)

    def step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        out = super().step(batch)
        stage = "train" if self.training else "val"
        if not self.training:
            self.val_edit_success.update(out["edit_success"].detach())
        size = len(batch["case_id"])
        self.log(f"{stage}/multiplier", self.multiplier.detach().clone(), on_step=self.training, on_epoch=True, batch_size=size)
        self.log(f"{stage}/margin", self.margin.clone(), on_step=self.training, on_epoch=True, batch_size=size)
        return out

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self.val_edit_success.update_count == 0:
            self.val_edit_success.reset()
            return
        success = float(self.val_edit_success.compute())
        self.val_edit_success.reset()
        if success > self.anneal_at:
            self.margin.copy_(torch.clamp(self.margin * 0.8, min=self.margin_min))
