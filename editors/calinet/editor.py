"""CaliNET: calibration memory slots added in parallel to the FFNs of the top blocks.

Dong, Dai, Song, Xu, Sui, Li (2022), "Calibrating Factual Knowledge in Pretrained Language
Models" (Findings of EMNLP). Each chosen block's FFN gets an FFN-like adaptor of ``n_slots``
calibration memory slots (keys ``K_c``, values ``V_c``), evaluated on the FFN's input ``x`` and
added to its output:

    FFN'(x) = FFN(x) + act(x K_c^T) V_c                              (paper, section 3.2)

Only the slots are trained, the base model frozen, on the calibration (edit) data with the
language-modelling objective: the new targets' teacher-forced NLL on the edit prompts and on
their rephrasings (the paper trains on several paraphrased templates of each fact).

The paper adds the slots to the top FFN layers of T5 and uses a few thousand slots for
thousands of facts. Here each ``apply`` call trains a fresh adaptor for its own requests, so the
default is sized for one call of a few facts on SmolLM2-135M (30 blocks, hidden 576): 64 slots in
each of the top 3 blocks (3 x 64 x 2 x 576 = 221k numbers per edit). Keys start random
(``N(0, 1/d)``), values at zero, so an untrained adaptor leaves the model unchanged. For gated
MLPs (LLaMA family) the slots are plain ungated neurons on the MLP input (see
:mod:`factedit.editors.core.patch`).

Measured on the default model (README, "Patch and memory editors on the default model"): trained
on one fact, nothing in this objective asks the slots to stay silent elsewhere, and they answer the
new target on unrelated prompts too (100 CounterFact edits: ES 1.00, NS 0.00, locality 0.05).
Learning rates down to 1e-3, 8 steps, and a penalty on the slots' output over generic sentences
(tried, not kept) all left locality near 0 on the demo set.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from factedit.batches import pad_id
from factedit.models import frozen

from ..base import Editor, EditRequest, register_editor
from ..core.patch import FFNPatchEdit, NeuronHook
from ..core.lm import collate_pairs, encode_pair, minimise_target_nll, model_device
from ..core.prefix import frozen_below
from ..core.targets import get_module, get_targets, resolve_layer
from .config import CaliNETConfig

logger = logging.getLogger(__name__)


class CaliNETEdit(FFNPatchEdit):
    """CaliNET's calibration slots (keys and values, no bias) in the FFNs of some blocks."""

    kind = "calinet_slots"


@register_editor("calinet", CaliNETConfig)
class CaliNET(Editor):
    """CaliNET (Dong et al., 2022): an FFN-like adaptor of calibration slots, trained per call."""

    def apply(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], config: CaliNETConfig) -> CaliNETEdit:
        self.check_requests(requests)
        targets = get_targets(model, config.targets)
        layers = sorted({resolve_layer(model, targets, l) for l in config.layers})
        device, d = model_device(model), model.config.hidden_size
        generator = torch.Generator().manual_seed(config.seed)
        std = config.init_std if config.init_std is not None else d**-0.5
        slots = {}
        for layer in layers:
            keys = (torch.randn(config.n_slots, d, generator=generator) * std).to(device).requires_grad_(True)
            values = torch.zeros(config.n_slots, d, device=device, requires_grad=True)
            slots[targets.layer("mlp", layer)] = (keys, values)

        pairs = []
        for r in requests:
            prompts = [r.prompt] + (list(r.rephrase_prompts) if config.rephrases else [])
            pairs += [encode_pair(tokenizer, p, r.target_new) for p in prompts]
        batch = collate_pairs(pairs, pad_id(tokenizer), device)
        optimizer = torch.optim.Adam([t for kv in slots.values() for t in kv], lr=config.lr, weight_decay=config.weight_decay)

        handles = [
            get_module(model, name).register_forward_hook(NeuronHook(keys, None, values, config.activation), with_kwargs=True)
            for name, (keys, values) in slots.items()
        ]
        try:
            with frozen(model), frozen_below(model, targets, layers[0], batch.input_ids, batch.attention_mask):  # the lowest slots' block up
                step, loss_value = minimise_target_nll(model, batch, optimizer, config.steps, config.stop_loss)
        finally:
            for handle in handles:
                handle.remove()
        logger.debug("calinet: %d steps, final loss %.4f", step, loss_value)
        edit = CaliNETEdit(
            self.name,
            {name: {"keys": k.detach(), "values": v.detach()} for name, (k, v) in slots.items()},
            config.activation,
            [r.case_id for r in requests],
            config.to_dict(),
            {"layers": layers, "steps": step, "final_loss": loss_value, "training_pairs": len(pairs)},
        )
        return edit.apply(model)
