"""Training MEND (Mitchell et al., 2022): the gradient transform learns to turn the edit's
fine-tuning gradient into an update that makes the *rephrase* predict the new target (the edit
generalises) while the model's predictions on unrelated inputs stay put (KL locality):

    L = c_edit * NLL(new target | rephrase; W~) + c_loc * KL(p_W || p_W~ on locality inputs)   (eq. 4-5)

The inner step is differentiable without copying the model: the edited weights ``W + dW`` are
passed to ``torch.func.functional_call``, so only the network receives gradients and the frozen
model is never modified. (This replaces the ``higher`` library of the original code: MEND's
inner step is a closed-form update, not an optimiser loop, so nothing needs to be unrolled, and
``functional_call`` swaps a few tensors without monkey-patching or copying modules.)

As in MEND's code, each inner update holds one edit (``edits_per_step: single``), and the factors'
standardisation statistics keep being updated while training. Before the first step they are
gathered on ``warmup_edits`` training edits (a deviation: the reference starts from its first
batch), so the network learns from the first step on standardised factors, and the untrained,
warmed network (``--trainer.max_steps 0``) is a fair baseline.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from factedit.editors.core.learned import gradient_pieces
from factedit.editors.mend import MENDConfig

from .base import WeightEditModule


class MENDModule(WeightEditModule):
    """Args: see :class:`lit_modules.base.WeightEditModule`; ``edit_weight`` is MEND's c_edit,
    ``lr_lr`` the learning rate of the per-module step sizes (MEND trains them separately),
    ``warmup_edits`` the number of training edits whose factors are gathered into the
    standardisation statistics before the first step (MEND's code starts from the statistics of
    the first training batch instead; a network trained without them would first learn on
    unstandardised factors). ``--trainer.max_steps 0`` makes just the warm-up and exports the
    untrained, warmed network: the baseline the trained one is compared with. ``edit_parts``
    (default ``["rephrase"]``, MEND's x_e') names the inputs whose NLL after the edit is the edit
    loss; ``["edit"]`` trains on the edit prompt itself (see ``configs/mend/counterfact-quick.yaml``).
    ``contrast_weight`` weights the contrast term of
    :meth:`lit_modules.base.WeightEditModule.contrast_loss` (0, MEND's own loss, by default)."""

    editor_name = "mend"

    def __init__(
        self,
        model: str | nn.Module = "smollm2-135m",
        editor: MENDConfig | None = None,
        lr: float = 1.0e-4,
        lr_lr: float = 1.0e-3,
        edit_weight: float = 1.0,
        locality_weight: float = 1.0,
        edits_per_step: str = "single",
        warmup_edits: int = 200,
        export_dir: str | None = None,
        edit_parts: list[str] | None = None,
        contrast_weight: float = 0.0,
    ) -> None:
        super().__init__(model, editor, lr, edit_weight, locality_weight, edits_per_step, export_dir, warmup_edits, edit_parts, contrast_weight)
        self.lr_lr = lr_lr

    def updates(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        _, pieces = gradient_pieces(self.base, batch["edit"], self.net.module_names)
        return self.net.updates(pieces)

    def configure_optimizers(self):
        step_sizes = [self.net.log_lr]
        others = [p for n, p in self.net.named_parameters() if n != "log_lr"]
        return torch.optim.Adam([{"params": others, "lr": self.lr}, {"params": step_sizes, "lr": self.lr_lr}])
