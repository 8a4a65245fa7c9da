"""CaliNET: calibration memory slots added in parallel to the FFN of the top block.

Dong, Dai, Song, Xu, Sui, Li (2022), "Calibrating Factual Knowledge in Pretrained Language
Models" (Findings of EMNLP). Each chosen block's FFN gets an FFN-like adaptor of ``n_slots``
calibration memory slots (keys ``K_c``, values ``V_c``), evaluated on the FFN's input ``x`` and
added to its output:

    FFN'(x) = FFN(x) + act(x K_c^T) V_c                              (paper, section 3.2)

Only the slots are trained, the base model frozen, on the calibration data: the new targets'
teacher-forced NLL on the edit prompts and their rephrasings (the paper trains on several
paraphrased templates of each fact). The paper calibrates a few thousand slots on thousands of
facts at once, among them facts the model already knows and must keep. Here one ``apply`` call
trains one adaptor on its requests (batch mode: 100 edits in one call; sequential mode: each call
adds an adaptor), and the facts to keep are **retained prompts**, whose next-token distributions
the objective holds at the model's own (before the call) through a KL term weighted
``retain_weight``:

* per request, ``stand_ins`` questions about other subjects (:func:`stand_in_prompts`): with
  ``retain_path`` (a file of other facts, such as CounterFact's training split), facts with the
  request's true answer as the file asks them, and the request's prompt about the file's subjects
  of the same wording; then the request's own prompts about built-in named entities;
* generic sentences (every position) and built-in factual questions (``retain_generic``);
* the (prompt, target) pairs of CaliNET edits already on the same MLPs (sequential mode), as the
  model answers them now.

No text that is scored for a request (its prompts, rephrasings, neighbourhood or locality probes)
is ever retained.

Deviations, each measured on the first 100 CounterFact test records in one call (ES / PS / NS;
unedited 0.350 / 0.395 / 0.665):

* **Retention** is this library's addition. The paper's objective alone answers the new facts
  everywhere (0.92 / 0.91 / 0.19, token locality 0.03, with 64 slots in each of the top 3 blocks and
  40 steps; NS 0.00 on single edits).
  Retained built-in entities (weight 1) gave NS 0.25 to 0.28; facts of the training split with
  the same wording 0.33, weight 5 0.39, weight 20 with the same-answer facts 0.46 (ES 0.86, PS
  0.93, token locality 0.92: the defaults); weight 50 barely moved the NLL in 40 steps. The
  slots read the top block's last position, where a neighbour with the same true answer
  (CounterFact's neighbourhood prompts) looks much like the edit itself: no setting tried kept NS
  within 0.15 of the unedited model's.
* **The top block only, 256 slots** (the paper uses the top FFN layers). There the slots change
  nothing any block reads, so training records the MLP inputs and block outputs at the positions
  that matter once and each step runs only the final norm and the unembedding
  (:class:`factedit.editors.core.prefix.TopMLPReadout`); 100 steps for 100 edits with 1,530
  retained texts took 4.5 minutes on 2 cores, against 3 minutes for 40 steps on the edits alone
  through the top 3 blocks.
  64 slots reached ES 0.73 in 60 steps at the same rate; 256 reached 1.00 in 100. Lower blocks
  remain available (``layers``): training then runs the blocks from the lowest slots' up.

**Single edits** (one fact per call) run, but are not local: on the 30 CounterFact demo cases with
these defaults ES and PS 1.00, NS 0.23 (unedited 1.00), token locality 0.35, 13.9 s per edit on
two threads. CaliNET is meant for batches (batch mode, or sequential mode with several edits per
call).

Keys start random (``N(0, 1/d)``), values at zero, so an untrained adaptor leaves the model
unchanged. For gated MLPs (LLaMA family) the slots are plain ungated neurons on the MLP input (see
:mod:`factedit.editors.core.patch`). ``bias`` adds a trainable bias per slot (not in the paper;
with ReLU it converged far slower in a first trial and was not pursued).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
from torch import nn

from factedit.batches import pad_id
from factedit.models import frozen

from ..base import Editor, EditRequest, register_editor
from ..core.facts import KnownFactsFile, stand_in_prompts
from ..core.patch import GENERIC_TEXTS, FFNPatchEdit, NeuronHook, fact_prompts, neuron_output, patch_hooks
from ..core.lm import PairBatch, encode_pair, length_batches, logits_at, model_device, sequence_nll
from ..core.prefix import BelowRecorded, TopMLPReadout
from ..core.targets import get_module, get_targets, resolve_layer
from .config import CaliNETConfig

logger = logging.getLogger(__name__)


class CaliNETEdit(FFNPatchEdit):
    """CaliNET's calibration slots (keys, values and, with ``bias``, biases) in the FFNs of some blocks."""

    kind = "calinet_slots"


def retained_pairs(tokenizer: Any, prompts: Sequence[str], sentences: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """Prompts kept at their last position and sentences at every position, as (prompt, target)
    id pairs whose target positions are exactly the kept ones (the targets' ids are placeholders:
    retention compares whole distributions)."""
    pairs = []
    for text in prompts:
        ids = tokenizer(text)["input_ids"]
        pairs.append((list(ids), [ids[-1]]))
    for text in sentences:
        ids = tokenizer(text)["input_ids"]
        pairs.append((list(ids[:1]), list(ids[1:])))
    return pairs


@register_editor("calinet", CaliNETConfig)
class CaliNET(KnownFactsFile, Editor):
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
            bias = torch.zeros(config.n_slots, device=device, requires_grad=True) if config.bias else None
            slots[targets.layer("mlp", layer)] = (keys, bias, values)

        training = [(p, r.target_new) for r in requests for p in [r.prompt] + (list(r.rephrase_prompts) if config.rephrases else [])]
        pairs = [encode_pair(tokenizer, p, t) for p, t in training]
        kept: list[tuple[list[int], list[int]]] = []
        if config.retain_weight > 0:
            edit_prompts = {r.prompt for r in requests}
            prompts = stand_in_prompts(requests, config.stand_ins, generator, self.known_facts(config))
            sentences: list[str] = []
            if config.retain_generic:
                prompts += [p for p in fact_prompts() if p not in edit_prompts]
                sentences = list(GENERIC_TEXTS)
            kept = retained_pairs(tokenizer, prompts, sentences)
            # Earlier CaliNET edits' training pairs, as the model answers them now: a new adaptor must not undo them.
            kept += [encode_pair(tokenizer, p, t) for p, t in self._earlier_pairs(model, slots)]
        new_batches = length_batches(pairs, pad_id(tokenizer), device, config.chunk_tokens)
        kept_batches = length_batches(kept, pad_id(tokenizer), device, config.chunk_tokens) if kept else []
        optimizer = torch.optim.Adam([t for kbv in slots.values() for t in kbv if t is not None], lr=config.lr, weight_decay=config.weight_decay)

        batches = new_batches + kept_batches
        with frozen(model):
            readout = None
            if layers == [len(get_module(model, targets.layers)) - 1]:  # the top block only: no block needs to run
                readout = TopMLPReadout(model, targets, batches)
            if readout is not None and readout.exact:
                ((keys, bias, values),) = slots.values()
                slot_output = lambda x: neuron_output(x, keys, bias, values, config.activation)
                step, loss_value, kl_value = self._train(lambda i: readout.logits(i, slot_output), new_batches, kept_batches, optimizer, config)
            else:
                step, loss_value, kl_value = self._train_hooked(model, targets, layers[0], slots, batches, optimizer, config, len(new_batches))
        logger.debug("calinet: %d steps, final loss %.4f, retained KL %.4f", step, loss_value, kl_value)
        edit = CaliNETEdit(
            self.name,
            {name: {"keys": k.detach(), "values": v.detach(), **({} if b is None else {"bias": b.detach()})} for name, (k, b, v) in slots.items()},
            config.activation,
            [r.case_id for r in requests],
            config.to_dict(),
            {
                "layers": layers,
                "steps": step,
                "final_loss": loss_value,
                "retained_kl": kl_value,
                "training_pairs": len(pairs),
                "retained_texts": len(kept),
                "pairs": [list(pair) for pair in training],
            },
        )
        return edit.apply(model)

    @staticmethod
    def _earlier_pairs(model: nn.Module, slots: dict) -> list[tuple[str, str]]:
        """The (prompt, target) pairs that CaliNET edits already applied to these MLPs trained on."""
        pairs: dict[tuple[str, str], None] = {}
        for name in slots:
            for hook in patch_hooks(get_module(model, name)):
                if isinstance(hook.owner, CaliNETEdit):
                    pairs.update((tuple(pair), None) for pair in hook.owner.info.get("pairs", ()))
        return list(pairs)

    def _train_hooked(self, model, targets, lowest: int, slots, batches: list[PairBatch], optimizer, config: CaliNETConfig, n_new: int) -> tuple[int, float, float]:
        """Training with the slots hooked into their MLPs and the blocks from the lowest slots'
        up run on every step (the blocks below replayed from one recording per batch)."""
        handles = [
            get_module(model, name).register_forward_hook(NeuronHook(keys, bias, values, config.activation), with_kwargs=True)
            for name, (keys, bias, values) in slots.items()
        ]
        try:
            below = BelowRecorded(model, targets, lowest, [(b.input_ids, b.attention_mask) for b in batches])

            def logits_of(i: int) -> torch.Tensor:
                with below.replaying(i):
                    return logits_at(model, batches[i])

            return self._train(logits_of, batches[:n_new], batches[n_new:], optimizer, config)
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _train(logits_of: Callable[[int], torch.Tensor], new: list[PairBatch], kept: list[PairBatch], optimizer: torch.optim.Optimizer, config: CaliNETConfig) -> tuple[int, float, float]:
        """Adam steps on the new targets' mean NLL (per sequence) plus ``retain_weight`` times the
        mean KL divergence, over the retained positions, of the model's next-token distribution
        before the call from the patched one's; stops once the NLL is below ``stop_loss``.
        ``logits_of(i)`` gives the logits at the target positions of batch ``i`` of ``new + kept``
        with the slots as they are; each step sums the batches' gradients. Returns steps, NLL and KL."""
        n_sequences = sum(len(b.lengths) for b in new)
        n_kept = sum(len(b.rows) for b in kept)
        before = []  # per retained batch: the model's own next-token probabilities and their sum of p log p
        with torch.no_grad():  # the slots' values start at zero: these passes are the model's own
            for i in range(len(new), len(new) + len(kept)):
                logp = torch.log_softmax(logits_of(i).float(), dim=-1)
                p = logp.exp()
                before.append((p, (p * logp).sum()))
        step, loss_value, kl_value = 0, float("nan"), 0.0
        for step in range(1, config.steps + 1):
            optimizer.zero_grad(set_to_none=True)
            loss_value = kl_value = 0.0
            for i, b in enumerate(new):
                loss = sequence_nll(logits_of(i), b.rows, b.targets, b.lengths).sum() / n_sequences
                loss.backward()
                loss_value += loss.item()
            for i, (p_before, p_log_p) in enumerate(before, start=len(new)):
                logp = torch.log_softmax(logits_of(i).float(), dim=-1)
                kl = (p_log_p - (p_before * logp).sum()) / n_kept  # KL(before || now), summed over the batch's positions
                (config.retain_weight * kl).backward()
                kl_value += kl.item()
            if step % 10 == 0:
                logger.debug("calinet step %d: NLL %.4f, retained KL %.4f", step, loss_value, kl_value)
            if loss_value < config.stop_loss:
                step -= 1
                break
            optimizer.step()
        return step, loss_value, kl_value
