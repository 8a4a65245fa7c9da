"""T-Patcher: trainable neurons added to the last FFN layer, one per edit and answer token.

Huang, Shen, Zhang, Zhou, Rong, Xiong (2023), "Transformer-Patcher: One Mistake Worth One
Neuron" (ICLR). An edit appends neurons (key ``k``, bias ``b``, value ``v``) to the FFN of one
block (by default the last, as in the paper), so that with ``q`` the FFN input

    FFN_p(q) = FFN(q) + act(q·k + b) v                                   (paper, eq. 3)

**Where the neurons fire.** The paper patches a classifier at the input's last token and, for
generation, adds several neurons to the decoder's last FFN. A neuron in the last block changes
only the logits of the position where it fires (no block reads its output), so one neuron at
the prompt's last token can set an answer's first token and nothing after it: on the first 200
zsRE records of the evaluation file token reliability was 0.62, with 1-6 nats of target NLL
left after 100 steps. With ``answer_neurons`` (default) each target token gets its own neuron,
which fires at the teacher-forced position that predicts that token (the prompt's last token
for the first, the answer's tokens before it for the others; greedy generation of the answer
reaches the same positions). On the first 6 zsRE records this fits every edit (reliability 1.0)
in 46 steps on average, where one neuron used all 100. ``answer_neurons: false`` is the
one-neuron-per-edit setting; one-token answers (most CounterFact targets) get one neuron either way.

The neurons are trained with the paper's three losses (section 3.2), the base model frozen:

* **edit loss** ``l_e``: the new target's teacher-forced NLL on the edit prompt, patched model;
* **activation loss** ``l_a``: each neuron fires at its own position,
  ``l_a = hinge(act_margin - (q_e·k + b))``;
* **memory loss** ``l_m``: the neurons stay silent on other inputs, ``hinge(q_i·k + b -
  memory_margin)`` for every memory query ``q_i``, and at the other neurons' positions. The
  paper keeps the queries of earlier training inputs; here the memory holds (a) every position
  of a fixed set of generic sentences (:data:`factedit.editors.core.patch.GENERIC_TEXTS`) and,
  with ``fact_memory``, of the built-in fact prompts (:func:`factedit.editors.core.patch.fact_prompts`,
  questions about other subjects, none of them evaluation data); these are encoded once per
  model and module and reused while the weights are unchanged; (b) every position of
  ``stand_ins`` questions per request that ask the edit's own relation about other subjects
  (:func:`factedit.editors.core.facts.stand_in_prompts`: facts of ``retain_path`` with the same
  true answer or wording, then built-in entities), the neighbours a patch keyed on the relation
  would otherwise fire on; (c) with ``retain_path``, ``retain_texts`` locality probes of that
  file per call (the paper's memory of training inputs); (d) the queries of the patches already
  applied to the same layer (a new patch does not fire on an earlier edit, the paper's
  sequential setting) and, only with ``request_memory``, (e) every position of the requests'
  locality probes and neighbourhood prompts. (e) is off by default: those are the very probes
  locality is scored on, so training on them would make the scores no longer held out; for the
  same reason no text a request is scored on is ever a stand-in or retained probe.

``hinge(x)`` is the mean of the positive entries (zero when every margin holds), the paper's
"margin" variant of its loss function S. The total is ``edit_weight·l_e + act_weight·l_a +
memory_weight·l_m`` (eq. 8). At inference the neurons are evaluated at every position, like any
FFN neuron.

With the default ReLU activation a pre-activation at or below zero gives exactly zero output, so
``memory_margin <= 0`` means the patch is exactly silent on the memory. For gated MLPs (LLaMA
family) the patch is a plain ungated neuron on the MLP input (see :mod:`factedit.editors.core.patch`).

Each call returns a :class:`TPatcherEdit` with its neurons (``info["neurons_per_request"]``);
sequential calls stack patches, and reverting one edit removes exactly its neurons.
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
from ..core.facts import KnownFactsFile, stand_in_prompts
from ..core.hooks import inputs_at_every_token, module_inputs, weights_version
from ..core.lm import PairBatch, collate_pairs, encode_pair, hinge, model_device, target_nll
from ..core.prefix import frozen_below
from ..core.targets import get_module, get_targets, resolve_layer
from .config import TPatcherConfig

logger = logging.getLogger(__name__)


class TPatcherEdit(FFNPatchEdit):
    """T-Patcher's neurons in one FFN; ``extras["queries"]`` holds the FFN inputs at the
    positions where they were trained to fire, the memory later patches must stay silent on."""

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


def answer_positions(batch: PairBatch, every_token: bool) -> torch.Tensor:
    """Indices into ``batch.rows``/``batch.cols`` of the positions that get a neuron: every
    position that predicts a target token, or (``every_token`` false) only each prompt's last."""
    if every_token:
        return torch.arange(len(batch.rows), device=batch.rows.device)
    first = torch.ones_like(batch.rows, dtype=torch.bool)
    first[1:] = batch.rows[1:] != batch.rows[:-1]
    return first.nonzero()[:, 0]


@register_editor("t_patcher", TPatcherConfig)
class TPatcher(KnownFactsFile, Editor):
    """T-Patcher (Huang et al., 2023): trained neurons in one FFN layer, one per edit and answer token."""

    def __init__(self) -> None:
        super().__init__()
        # Memory queries of the fixed texts, per text, for each (model, module) while its weights are unchanged.
        self._fixed: dict[tuple[int, str], tuple[tuple, dict[str, torch.Tensor]]] = {}

    def apply(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], config: TPatcherConfig) -> TPatcherEdit:
        self.check_requests(requests)
        targets = get_targets(model, config.targets)
        layer = resolve_layer(model, targets, config.layer)
        module_name = targets.layer("mlp", layer)
        module = get_module(model, module_name)
        device = model_device(model)
        batch = collate_pairs([encode_pair(tokenizer, r.prompt, r.target_new) for r in requests], pad_id(tokenizer), device)

        # Queries: fixed during training (the patch acts on this FFN's output, not its input).
        chosen = answer_positions(batch, config.answer_neurons)
        owner = batch.rows[chosen]  # the request each neuron belongs to
        with torch.no_grad():
            hidden = module_inputs(model, module_name, batch.input_ids, batch.attention_mask)
        q_edit = hidden[batch.rows[chosen], batch.cols[chosen]].float()
        memory = [self._fixed_memory(model, tokenizer, module_name, memory_texts(requests, config.generic_memory, False, config.fact_memory))]
        varying = self._varying_texts(requests, config)
        if varying:
            memory.append(inputs_at_every_token(model, tokenizer, module_name, varying).float())
        previous = [h.owner.extras["queries"] for h in patch_hooks(module) if isinstance(h.owner, TPatcherEdit)]
        if previous:
            memory.append(torch.cat(previous).to(device, torch.float32))
        memory = [m for m in memory if len(m)]
        q_memory = torch.cat(memory) if memory else q_edit.new_zeros((0, q_edit.shape[1]))

        keys, bias = init_neurons(q_edit, q_memory, config.act_margin, config.memory_margin)
        d_out = model.config.hidden_size
        keys, bias = keys.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        values = torch.zeros(len(q_edit), d_out, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([keys, bias, values], lr=config.lr)
        others = ~torch.eye(len(q_edit), dtype=torch.bool, device=device)

        handle = module.register_forward_hook(NeuronHook(keys, bias, values, config.activation), with_kwargs=True)
        step, losses = 0, {}
        try:
            with frozen(model), frozen_below(model, targets, layer, batch.input_ids, batch.attention_mask):
                for step in range(1, config.steps + 1):
                    z_edit = q_edit @ keys.T + bias  # [neuron positions, neurons]
                    l_edit = target_nll(model, batch).mean()
                    l_act = hinge(config.act_margin - z_edit.diagonal())
                    l_mem = hinge(q_memory @ keys.T + bias - config.memory_margin)
                    if len(q_edit) > 1:  # each neuron ignores the other neurons' positions
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
            {"layer": layer, "module": module_name, "steps": step, "final_losses": losses, "memory_positions": len(q_memory), "neurons_per_request": torch.bincount(owner, minlength=len(requests)).tolist()},
            extras={"queries": q_edit.detach()},
        )
        return edit.apply(model)

    def _fixed_memory(self, model: nn.Module, tokenizer: Any, module_name: str, texts: list[str]) -> torch.Tensor:
        """Queries at every position of ``texts`` (the generic sentences and built-in fact
        prompts, the same in every call but for the rare one an edit prompt begins), kept per text
        for each model and module, and computed again only when a weight has changed since."""
        if not texts:
            return torch.zeros(0, 0)
        key, version = (id(model), module_name), weights_version(model)
        if key not in self._fixed or self._fixed[key][0] != version:
            if len(self._fixed) >= 4:
                self._fixed.clear()
            self._fixed[key] = (version, {})
        known = self._fixed[key][1]
        missing = [t for t in dict.fromkeys(texts) if t not in known]
        if missing:
            lengths = [len(tokenizer(t)["input_ids"]) for t in missing]
            rows = inputs_at_every_token(model, tokenizer, module_name, missing).float()
            known.update(zip(missing, rows.split(lengths)))
        return torch.cat([known[t] for t in texts])

    def _varying_texts(self, requests: Sequence[EditRequest], config: TPatcherConfig) -> list[str]:
        """Memory texts that depend on the requests: ``stand_ins`` of each request's own prompts
        about other subjects (same-relation neighbours the patch must not fire on: facts of
        ``retain_path`` first, then built-in entities), ``retain_texts`` locality probes of
        ``retain_path`` (the paper's memory of earlier training inputs) and, with
        ``request_memory``, the requests' own probes. No edit prompt, and no text a request is
        scored on unless ``request_memory`` asks for its probes."""
        texts = memory_texts(requests, False, True) if config.request_memory else []
        scored = [p for r in requests for p in (r.prompt, *r.rephrase_prompts, *r.neighborhood_prompts, *(qa.prompt for qa in r.locality))]
        unscored = lambda items: [t for t in items if not any(t.startswith(p) for p in scored)]
        known = self.known_facts(config)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + sum(len(r.prompt) for r in requests))
        if config.stand_ins:
            texts += unscored(stand_in_prompts(requests, config.stand_ins, generator, known))
        if config.retain_texts and known is not None and known.probes:
            order = torch.randperm(len(known.probes), generator=generator).tolist()
            texts += unscored(known.probes[j] for j in order)[: config.retain_texts]
        return list(dict.fromkeys(texts))
