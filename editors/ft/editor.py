"""Fine-tuning editors: FT-L and FT-M.

* **FT-L** is the constrained fine-tuning baseline of ROME (Meng et al., 2022, "Locating and
  Editing Factual Associations in GPT", section 3 baselines, "FT+L"): gradient descent on the
  chosen MLP weights with an L-infinity constraint, ``|W - W0|_inf <= epsilon``, enforced by
  clamping after every step. As in that baseline, the loss reads only the last prompt position:
  it maximises the log-probability of every target token there (without feeding the target).
* **FT-M** (Zhang et al., 2024, "A Comprehensive Study of Knowledge Editing for Large Language
  Models") feeds prompt + target and takes the teacher-forced cross-entropy on the target tokens
  only (prompt tokens masked out), which makes multi-token targets well defined.

Both change only the parameters of the modules named by ``module`` and ``layers``; the model is
left as it was found and the change is returned as a dense delta through :class:`Edit`.

**Independent edits computed together** (:meth:`FineTune.apply_each`). Evaluating single edits
fine-tunes the same model once per case, and on a CPU each step of a short sequence is bound by
reading the weights of every block above the tuned one, not by arithmetic. ``apply_each`` trains
several cases' copies of the tuned weights in one batch: every batch row runs the tuned modules with
its own case's copy (the other weights are shared and frozen), the loss is the sum of the cases'
own mean losses, so each copy gets exactly its own case's gradient, and Adam, the L-infinity clamp
and the early stop act element by element and case by case as they do alone. Each edit equals the
one :meth:`~FineTune.apply` returns for its case alone up to the float rounding of a differently
shaped batch; the weights are read once per step for all cases instead of once per case.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Sequence

import torch

from factedit.batches import pad_id
from factedit.models import frozen

from ..base import Edit, Editor, EditRequest, ModelRecord, ParamDelta, register_editor, snapshot_deltas
from ..core.lm import PairBatch, collate_pairs, encode_pair, minimise_target_nll, model_device, target_nll
from ..core.prefix import frozen_below
from ..core.targets import get_parameter_name, get_targets, is_transposed, resolve_layer
from .config import FTConfig, FTLConfig, FTMConfig

logger = logging.getLogger(__name__)

# apply_each holds, per case computed together, its copy of the tuned weights, their gradient and
# Adam's two moments (and, for cases of several requests, one more copy per request): at most this
# many bytes in all, so a large model's cases go in smaller groups.
TOGETHER_BYTES = 1 << 30
_COPIES_PER_CASE = 5


@contextlib.contextmanager
def _own_weights(modules: Sequence[torch.nn.Module], stacks: Sequence[torch.Tensor], row_case: torch.Tensor | None) -> Iterator[None]:
    """Inside the block, batch row ``i`` runs each linear module of ``modules`` with the weight
    ``stacks[k][row_case[i]]`` (``row_case`` None: row ``i`` with ``stacks[k][i]``); the bias and
    every other module stay shared."""

    def hook_for(module: torch.nn.Module, stack: torch.Tensor):
        transposed = is_transposed(module)

        def hook(mod: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            weights = stack if row_case is None else stack.index_select(0, row_case)
            y = torch.bmm(x, weights if transposed else weights.transpose(1, 2))
            return y if mod.bias is None else y + mod.bias

        return hook

    handles = [module.register_forward_hook(hook_for(module, stack)) for module, stack in zip(modules, stacks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class FineTune(Editor):
    """Shared implementation; FT-L and FT-M differ only in their config defaults."""

    def check(self, model, config: FTConfig) -> None:
        """Resolving the tuned parameters refuses an unknown architecture or a layer out of range."""
        self._tuned(model, config)

    def prepare(self, model, tokenizer, config: FTConfig) -> None:
        """Nothing to precompute; the checks of :meth:`check` (for callers other than edit.py)."""
        self.check(model, config)

    @staticmethod
    def _tuned(model, config: FTConfig):
        """The architecture's targets, ``config.layers`` as block indices (negative layers count from
        the last block, as for the other editors; each once) and the parameters tuned there:
        ``config.module`` of each layer."""
        targets = get_targets(model, config.targets)
        layers = list(dict.fromkeys(resolve_layer(model, targets, layer, "layers entry") for layer in config.layers))
        return targets, layers, [get_parameter_name(model, targets.layer(config.module, layer)) for layer in layers]

    def apply(self, model, tokenizer, requests: Sequence[EditRequest], config: FTConfig) -> Edit:
        self.check_requests(requests)
        targets, layers, names = self._tuned(model, config)
        params = dict(model.named_parameters())
        originals = {n: params[n].detach().clone() for n in names}
        batch = self._batch(model, tokenizer, requests, config)

        tuned = [params[n] for n in names]
        optimizer = torch.optim.Adam(tuned, lr=config.lr, weight_decay=config.weight_decay)

        @torch.no_grad()
        def constrain() -> None:  # FT-L: stay within norm_constraint of the original weights
            for name, p in zip(names, tuned):
                eps = config.norm_constraint
                p.copy_(torch.clamp(p, originals[name] - eps, originals[name] + eps))

        try:
            # The blocks below the lowest tuned one compute the same on every step: run once.
            with frozen(model, trainable=tuned), frozen_below(model, targets, min(layers), batch.input_ids, batch.attention_mask):
                steps_run, loss_value = minimise_target_nll(model, batch, optimizer, config.steps, config.stop_loss, constrain if config.norm_constraint is not None else None)
        except BaseException:  # training changes the weights in place: put them back before failing
            with torch.no_grad():
                for name, original in originals.items():
                    params[name].copy_(original)
            raise
        deltas = snapshot_deltas(model, originals)
        logger.debug("%s: %d steps, final loss %.4f", self.name, steps_run, loss_value)
        edit = Edit(self.name, deltas, [r.case_id for r in requests], config.to_dict(), {"steps": steps_run, "final_loss": loss_value})
        return edit.apply(model)

    computes_together = True

    def apply_each(self, model, tokenizer, units: Sequence[Sequence[EditRequest]], config: FTConfig) -> list[Edit]:
        """One edit per unit of requests, each as :meth:`apply` makes it on the model as it is,
        trained together in groups (see the module docstring); the edits come back unapplied and
        the model is never changed. Falls back to one unit at a time where the tuned modules are
        not linear layers."""
        for unit in units:
            self.check_requests(unit)
        targets, layers, names = self._tuned(model, config)
        params = dict(model.named_parameters())
        modules = [model.get_submodule(name.rpartition(".")[0]) for name in names]
        if any(type(m).__name__ not in ("Linear", "Conv1D") or not name.endswith(".weight") for m, name in zip(modules, names)):
            return super().apply_each(model, tokenizer, units, config)
        per_case = _COPIES_PER_CASE * sum(params[n].numel() * params[n].element_size() for n in names)
        size = max(1, TOGETHER_BYTES // per_case)
        edits: list[Edit] = []
        for start in range(0, len(units), size):
            edits += self._train_together(model, tokenizer, units[start : start + size], config, targets, layers, names, modules)
        return edits

    def _train_together(self, model, tokenizer, units, config: FTConfig, targets, layers, names, modules) -> list[Edit]:
        requests = [r for unit in units for r in unit]
        batch = self._batch(model, tokenizer, requests, config)
        device = batch.input_ids.device
        n = len(units)
        row_case = torch.tensor([i for i, unit in enumerate(units) for _ in unit], dtype=torch.long, device=device)
        counts = torch.tensor([len(unit) for unit in units], dtype=torch.float32, device=device)
        originals = [model.get_parameter(name).detach() for name in names]
        stacks = [original.unsqueeze(0).repeat(n, *([1] * original.dim())).requires_grad_(True) for original in originals]
        optimizer = torch.optim.Adam(stacks, lr=config.lr, weight_decay=config.weight_decay)
        active = torch.ones(n, dtype=torch.bool, device=device)
        steps_run, losses = [0] * n, [float("nan")] * n
        finals: list[list[torch.Tensor] | None] = [None] * n
        with frozen(model), frozen_below(model, targets, min(layers), batch.input_ids, batch.attention_mask):
            with _own_weights(modules, stacks, None if len(requests) == n else row_case):
                for step in range(1, config.steps + 1):
                    per_seq = target_nll(model, batch)
                    per_case = torch.zeros(n, device=device, dtype=per_seq.dtype).index_add(0, row_case, per_seq) / counts
                    values = per_case.tolist()
                    for i in active.nonzero().flatten().tolist():
                        losses[i] = values[i]
                        if values[i] < config.stop_loss:  # as alone: stop before this step, keep the weights
                            active[i] = False
                            finals[i] = [stack[i].detach().clone() for stack in stacks]
                    if not bool(active.any()):
                        break
                    optimizer.zero_grad(set_to_none=True)
                    per_case[active].sum().backward()
                    optimizer.step()
                    if config.norm_constraint is not None:
                        with torch.no_grad():
                            eps = config.norm_constraint
                            for stack, original in zip(stacks, originals):
                                stack.copy_(torch.clamp(stack, original - eps, original + eps))
                    for i in active.nonzero().flatten().tolist():
                        steps_run[i] = step
        record = ModelRecord.of(model, names)
        edits = []
        for i, unit in enumerate(units):
            weights = finals[i] if finals[i] is not None else [stack[i].detach() for stack in stacks]
            deltas = {name: ParamDelta(delta=(w.float() - o.float()).cpu()) for name, w, o in zip(names, weights, originals)}
            edit = Edit(self.name, deltas, [r.case_id for r in unit], config.to_dict(), {"steps": steps_run[i], "final_loss": losses[i]})
            edit.requests = [r.texts() for r in unit]
            edit.made_for = record
            edits.append(edit)
        return edits

    @staticmethod
    def _batch(model, tokenizer, requests: Sequence[EditRequest], config: FTConfig) -> PairBatch:
        encoded = [encode_pair(tokenizer, r.prompt, r.target_new) for r in requests]
        batch = collate_pairs(encoded, pad_id(tokenizer), model_device(model))
        if config.objective == "prompt_last":
            # Every target token is scored at the prompt's last position; the target tokens that
            # follow in the input cannot influence that position under causal attention.
            last = [len(p) - 1 for p, t in encoded for _ in t]
            batch.cols = torch.tensor(last, dtype=torch.long, device=batch.cols.device)
        return batch


@register_editor("ft_l", FTLConfig)
class FTL(FineTune):
    """FT-L: L-infinity-constrained fine-tuning of MLP weights (ROME's FT+L baseline)."""


@register_editor("ft_m", FTMConfig)
class FTM(FineTune):
    """FT-M: fine-tuning with a loss on the target tokens only (teacher forcing, prompt masked)."""
