"""T-Patcher: one trainable neuron per edit, added to the last FFN layer.

Huang, Shen, Zhang, Zhou, Rong, Xiong (2023), "Transformer-Patcher: One Mistake Worth One
Neuron" (ICLR). Each edit appends one neuron (key ``k``, bias ``b``, value ``v``) to the FFN of
one block (by default the last, as in the paper), so that with ``q`` the FFN input

    FFN_p(q) = FFN(q) + act(q·k + b) v                                   (paper, eq. 3)

The patch is trained with the paper's three losses (section 3.2), the base model frozen:

* **edit loss** ``l_e``: the new target's teacher-forced NLL on the edit prompt, patched model;
* **activation loss** ``l_a``: the patch fires on the edit input. As in the paper, only the
  prompt's **last token** is asked to fire: ``l_a = hinge(act_margin - (q_e·k + b))``;
* **memory loss** ``l_m``: the patch stays silent on other inputs, ``hinge(q_i·k + b -
  memory_margin)`` for every memory query ``q_i``. The paper keeps the queries of earlier
  training inputs; here the memory holds (a) every position of a fixed set of generic
  sentences (:data:`factedit.editors.core.patch.GENERIC_TEXTS`), (a') with ``fact_memory``, every position
  of the built-in fact prompts (:func:`factedit.editors.core.patch.fact_prompts`: the prompts, paraphrases and neighbour
  prompts of IKE's built-in counterfactual pool, none of them evaluation data), which share the
  wording of factual questions and teach the key to tell subjects apart, (b) the last-token queries of the other
  requests of the same call and of the patches already applied to the same layer (so that a new
  patch does not fire on an earlier edit, as in the paper's sequential setting) and, only with
  ``request_memory``, (c) every position of the requests' locality probes (with answers) and
  neighbourhood prompts. (c) is off by default: those are the very probes locality is scored
  on, so training on them would make the locality scores no longer held out.

``hinge(x)`` is the mean of the positive entries (zero when every margin holds), the paper's
"margin" variant of its loss function S. The total is ``edit_weight·l_e + act_weight·l_a +
memory_weight·l_m`` (eq. 8). At inference the neuron is evaluated at every position, like any
FFN neuron; training makes it fire at the edit prompt's last token only.

With the default ReLU activation a pre-activation at or below zero gives exactly zero output, so
``memory_margin <= 0`` means the patch is exactly silent on the memory. For gated MLPs (LLaMA
family) the patch is a plain ungated neuron on the MLP input (see :mod:`factedit.editors.core.patch`).

Each call returns a :class:`TPatcherEdit` with one neuron per request; sequential calls stack
patches, and reverting one edit removes exactly its neurons.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from factedit.batches import pad_id
from factedit.models import frozen

from ..base import Editor, EditRequest, register_editor
from ..core.patch import FFNPatchEdit, NeuronHook, memory_texts, patch_hooks
from ..core.hooks import inputs_at_every_token, module_inputs
from ..core.lm import collate_pairs, encode_pair, hinge, model_device, target_nll
from ..core.prefix import frozen_below
from ..core.targets import get_module, get_targets, resolve_layer
from .config import TPatcherConfig

logger = logging.getLogger(__name__)


class TPatcherEdit(FFNPatchEdit):
    """T-Patcher's neurons (one per request) in one FFN; ``extras["queries"]`` holds the FFN
    inputs at the edit prompts' last tokens, the memory later patches must stay silent on."""

    kind = "t_patcher_neurons"

    def preactivations(self, queries: torch.Tensor) -> torch.Tensor:
        """``q·k + b`` of every neuron for FFN inputs ``queries [..., d]``: ``[..., n_neurons]``."""
        (parts,) = self.patches.values()
        q = queries.detach().to("cpu", torch.float32)
        return q @ parts["keys"].T + parts["bias"]


def last_token_queries(model: nn.Module, tokenizer: Any, module_name: str, prompts: Sequence[str]) -> torch.Tensor:
    """FFN inputs ``[len(prompts), d]`` at each prompt's last token (prompts run one by one)."""
    device = model_device(model)
    rows = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
        rows.append(module_inputs(model, module_name, ids, torch.ones_like(ids))[0, -1])
    return torch.stack(rows)


def init_neurons(q_edit: torch.Tensor, q_memory: torch.Tensor, act_margin: float, memory_margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and biases that separate each edit query from the memory from the start.

    The key points from the memory's mean to the edit query; it is scaled and the bias set so
    that the edit's pre-activation is ``act_margin + 1`` and the highest memory pre-activation
    ``memory_margin - 1`` when the direction separates them (else the edit's value only is set).
    """
    keys, biases = [], []
    for q in q_edit:
        u = q - q_memory.mean(0) if len(q_memory) else q
        k = u / u.norm().clamp_min(1e-8)
        p_edit = q @ k
        p_memory = (q_memory @ k).max() if len(q_memory) else p_edit - 1.0
        gap = p_edit - p_memory
        scale = (act_margin - memory_margin + 2.0) / gap if gap > 1e-6 else torch.tensor(1.0)
        keys.append(k * scale)
        biases.append(act_margin + 1.0 - p_edit * scale)
    return torch.stack(keys), torch.stack(biases)


@register_editor("t_patcher", TPatcherConfig)
class TPatcher(Editor):
    """T-Patcher (Huang et al., 2023): one trained neuron per edit in one FFN layer."""

    def apply(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], config: TPatcherConfig) -> TPatcherEdit:
        self.check_requests(requests)
        targets = get_targets(model, config.targets)
        layer = resolve_layer(model, targets, config.layer)
        module_name = targets.layer("mlp", layer)
        module = get_module(model, module_name)
        device = model_device(model)

        # Queries: fixed during training (the patch acts on this FFN's output, not its input).
        q_edit = last_token_queries(model, tokenizer, module_name, [r.prompt for r in requests])
        memory = []
        texts = memory_texts(requests, config.generic_memory, config.request_memory, config.fact_memory)
        if texts:
            memory.append(inputs_at_every_token(model, tokenizer, module_name, texts))
        previous = [h.owner.extras["queries"] for h in patch_hooks(module) if isinstance(h.owner, TPatcherEdit)]
        if previous:
            memory.append(torch.cat(previous).to(device, torch.float32))
        q_memory = torch.cat(memory) if memory else q_edit.new_zeros((0, q_edit.shape[1]))

        keys, bias = init_neurons(q_edit, q_memory, config.act_margin, config.memory_margin)
        d_out = model.config.hidden_size
        keys, bias = keys.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        values = torch.zeros(len(requests), d_out, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([keys, bias, values], lr=config.lr)
        batch = collate_pairs([encode_pair(tokenizer, r.prompt, r.target_new) for r in requests], pad_id(tokenizer), device)
        others = ~torch.eye(len(requests), dtype=torch.bool, device=device)

        handle = module.register_forward_hook(NeuronHook(keys, bias, values, config.activation), with_kwargs=True)
        step, losses = 0, {}
        try:
            with frozen(model), frozen_below(model, targets, layer, batch.input_ids, batch.attention_mask):
                for step in range(1, config.steps + 1):
                    z_edit = q_edit @ keys.T + bias  # [n_requests, n_neurons]
                    l_edit = target_nll(model, batch).mean()
                    l_act = hinge(config.act_margin - z_edit.diagonal())
                    l_mem = hinge(q_memory @ keys.T + bias - config.memory_margin)
                    if len(requests) > 1:  # each neuron ignores the other requests' prompts
                        l_mem = l_mem + hinge(z_edit[others] - config.memory_margin)
                    loss = config.edit_weight * l_edit + config.act_weight * l_act + config.memory_weight * l_mem
                    losses = {"edit": l_edit.item(), "activation": l_act.item(), "memory": l_mem.item()}
                    if losses["edit"] < config.stop_loss and losses["activation"] == 0 and losses["memory"] == 0:
                        step -= 1
                        break
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        finally:
            handle.remove()
        logger.debug("t_patcher: %d steps, final losses %s", step, losses)
        edit = TPatcherEdit(
            self.name,
            {module_name: {"keys": keys.detach(), "bias": bias.detach(), "values": values.detach()}},
            config.activation,
            [r.case_id for r in requests],
            config.to_dict(),
            {"layer": layer, "module": module_name, "steps": step, "final_losses": losses, "memory_positions": len(q_memory)},
            extras={"queries": q_edit.detach()},
        )
        return edit.apply(model)
