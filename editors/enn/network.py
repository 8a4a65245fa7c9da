"""ENN's trained state and its inner loop (Sinitsin et al., 2020, "Editable Neural Networks", ICLR,
section 3; as MEND's reference code ``algs/enn.py`` runs it).

ENN does not predict an update. It meta-trains the edited weights themselves, together with a
step size per edited weight, so that the plain editor

    Edit(theta, x, y) = k steps of  theta <- theta - eta * grad_theta NLL(y | x; theta)      (section 3)

succeeds on the edit while the predictions elsewhere hold. The outer objective (section 3, eq. 2-4,
with the weights of MEND's code) is

    c_edit * NLL(y | x'; Edit(theta)) + c_loc * KL(p_theta0(. | x_loc) || p_Edit(theta)(. | x_loc))
        + c_base * KL(p_theta0(. | x_loc) || p_theta(. | x_loc))

where ``x'`` is a rephrase of the edit prompt and theta0 the original weights (the last term is the
paper's base loss as MEND's code computes it, ``base_loss: distill``); it is trained in
:mod:`lit_modules.enn`.

This module holds what is trained, and the inner loop:

* ``offsets``: one ``[out, in]`` tensor per edited module, the meta-trained weights minus the
  original ones, initialised at zero;
* ``log_lr``: the logarithm of each edited module's inner step size eta (one per weight matrix, as
  MEND's ``edit_lrs``), initialised at ``log(edit_lr_init)``.

The inner loop is unrolled with ``higher``: the edited weights' offsets are the only parameters of
a small module (:class:`InnerWeights`) whose forward runs the frozen model through
``torch.func.functional_call`` with ``W + offset`` in place of each edited weight;
``higher.innerloop_ctx(..., copy_initial_weights=False)`` steps them with SGD at the learned step
sizes (``override={"lr": ...}``), so that in training the outer loss differentiates through every
step (second order, as MEND's ``first_order: False``) into both the offsets and the step sizes.
While it does, scaled-dot-product attention runs its math kernel: the fused CPU and GPU kernels
have no second derivative.
A gradient with respect to ``offset`` is the gradient with respect to ``W + offset``, so these are
plain gradient steps on the meta-trained weights.

Deviations, each with its reason:

* **Only the edited weights are meta-trained**; the paper (and MEND's code, ``train_base: True``)
  trains the whole model. Here an edit is a reversible delta of the weights it declares, so
  everything ENN changes must be among them; it also keeps the trained state small (a copy of the
  edited weights: 8M numbers for SmolLM2-135M's last three MLPs) and training within a CPU budget.
* **The meta-trained weights are stored as offsets from the original weights**, zero at first:
  untrained ENN is exactly the original model plus ``n_edit_steps`` plain gradient steps of size
  ``edit_lr_init``. At edit time the offset is part of the edit (the edit is
  ``offset + inner-loop steps``), so the drift of meta-training counts against locality.
* **Locality is measured against the original model**, where MEND's code takes the KL to the
  meta-trained model before the edit: what ``edit.py`` scores is the edited model against the
  original one, drift included.
* **Step sizes are stored as logarithms** (positive, and Adam changes them multiplicatively).
* **Fixed number of steps**: the paper steps until the edit's target is the top prediction (at
  most k steps); MEND's code, followed here, always makes ``n_edit_steps``.
* **Several requests in one call**: the inner loss is the sum over requests of each one's mean
  answer NLL, so each request pulls as hard as when it is edited alone (the convention of
  :func:`editors.learned.gradient_pieces`); MEND's code averages over the batch's tokens.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import contextlib

import higher
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from factedit.editors.core.learned import answer_logits, answer_nll, edited_params


class InnerWeights(nn.Module):
    """The offsets of the edited weights as a module's only parameters (``w0``, ``w1``, ...), for
    ``higher``: its forward returns ``loss_fn`` of the current (fast) offsets. The frozen model
    is reached through ``loss_fn`` only, so ``higher`` patches these few tensors and nothing else."""

    def __init__(self, offsets: Sequence[nn.Parameter], loss_fn: Callable[[list[torch.Tensor]], torch.Tensor]) -> None:
        super().__init__()
        self.count = len(offsets)
        for index, offset in enumerate(offsets):
            self.register_parameter(f"w{index}", offset)
        self.loss_fn = loss_fn

    def forward(self) -> torch.Tensor:
        return self.loss_fn([getattr(self, f"w{index}") for index in range(self.count)])


class ENNNetwork(nn.Module):
    """Offsets and log step sizes of the edited modules (``module_shapes``: name -> (out, in))."""

    def __init__(self, module_shapes: Mapping[str, tuple[int, int]], n_edit_steps: int, edit_lr_init: float) -> None:
        super().__init__()
        self.module_names = list(module_shapes)
        self.n_edit_steps = n_edit_steps
        self.offsets = nn.ParameterList([nn.Parameter(torch.zeros(out, inp)) for out, inp in module_shapes.values()])
        self.log_lr = nn.Parameter(torch.full((len(self.module_names),), math.log(edit_lr_init)))

    def offset_updates(self) -> dict[str, torch.Tensor]:
        """``{module: offset [out, in]}``: the meta-trained weights minus the original ones."""
        return dict(zip(self.module_names, self.offsets))

    def edit_lrs(self) -> list[float]:
        return self.log_lr.detach().exp().tolist()

    def updates(self, model: nn.Module, edit: Mapping[str, torch.Tensor], track: bool | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The edit NLL before the inner loop, and ``{module: update [out, in]}``: the offset plus
        ``n_edit_steps`` SGD steps at the learned step sizes on ``edit`` (a teacher-forced batch,
        one row per request; the model is only read).

        With ``track`` (default: in training mode with gradients enabled) the steps are unrolled
        with their graph, so the updates are differentiable in the offsets and the step sizes;
        otherwise they are detached (``track_higher_grads=False``) and start from a copy of the offsets.
        """
        if track is None:
            track = self.training
        track = track and torch.is_grad_enabled()
        n_rows = edit["input_ids"].shape[0]

        def edit_nll(offsets: list[torch.Tensor]) -> torch.Tensor:
            params = edited_params(model, dict(zip(self.module_names, offsets)))
            logits, targets, rows = answer_logits(model, edit, params)
            return answer_nll(logits, targets, rows, n_rows).sum()

        start = list(self.offsets) if track else [nn.Parameter(offset.detach().clone()) for offset in self.offsets]
        holder = InnerWeights(start, edit_nll)
        lrs = self.log_lr.exp() if track else self.log_lr.detach().exp()
        # One parameter group per edited weight, so each gets its own step size; the lr given here
        # is replaced by the learned ones at every step.
        inner = torch.optim.SGD([{"params": [p]} for p in holder.parameters()], lr=1.0)
        # The outer gradient differentiates the inner gradient (second order): the fused attention
        # kernels have no double backward, the math one is plain differentiable operations.
        attention = sdpa_kernel(SDPBackend.MATH) if track else contextlib.nullcontext()
        with torch.enable_grad(), attention, higher.innerloop_ctx(holder, inner, copy_initial_weights=False, track_higher_grads=track) as (fholder, diffopt):
            for step in range(self.n_edit_steps):
                loss = fholder()
                if step == 0:
                    loss_before = loss.detach() / n_rows
                diffopt.step(loss, override={"lr": list(lrs)})
            final = list(fholder.fast_params)
        if not track:
            final = [p.detach() for p in final]
        return loss_before, dict(zip(self.module_names, final))
