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
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from factedit.batches import pad_id
from factedit.models import frozen

from ..base import Edit, Editor, EditRequest, register_editor, snapshot_deltas
from ..core.lm import PairBatch, collate_pairs, encode_pair, minimise_target_nll, model_device
from ..core.prefix import frozen_below
from ..core.targets import get_parameter_name, get_targets, resolve_layer
from .config import FTConfig, FTLConfig, FTMConfig

logger = logging.getLogger(__name__)


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
