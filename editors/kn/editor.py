"""KN: editing facts through knowledge neurons.

Dai, Dong, Hao, Sui, Chang and Wei, 2022, "Knowledge Neurons in Pretrained Transformers", ACL
(arXiv:2104.08696). The paper reads an FFN as a key-value memory: the intermediate activations
(the inputs of the MLP output projection, role ``mlp_out``) are the "neurons", and column ``j``
of the output projection viewed ``[out, in]`` is the "value slot" that neuron ``j`` writes into
the residual stream. Editing a fact takes three steps, each a function below:

1. **Knowledge attribution** (section 3.2, Eq. 2-4): integrated gradients of the probability of
   the answer with respect to one layer's activations at the answer position, from the zero
   baseline to the observed activation ``w̄``, approximated by a Riemann sum over ``m`` points,
   ``Attr = w̄ / m * sum_{k=1..m} dP(k/m * w̄) / dw``.
2. **Knowledge neuron refining** (section 3.3): per prompt keep neurons above ``t`` times that
   prompt's largest attribution (the coarse set); keep those shared by at least a fraction ``p`` of
   the prompts that express the fact.
3. **Updating facts** (section 5.1): ``FFN(val)_j <- FFN(val)_j - lambda_1 t + lambda_2 t'`` for
   every knowledge neuron ``j``, with ``t`` and ``t'`` the embeddings of the old and new answer.

Choices where a decoder-only model or this library's requests differ from the paper (BERT, cloze
prompts with a [MASK]):

* The answer position is the last prompt position, and only the first token of an answer is used
  (attribution of, and embedding for, a multi-token answer).
* Attribution is of the fact as the request states it before the edit: ``target_true`` when the
  request knows it, otherwise ``target_new`` (a request of a new fact has no old answer to locate,
  and the neurons that would express the new answer are the natural place to write it).
* As in the public implementations (the authors' and EasyEdit's), a layer's whole activation
  vector is scaled at once, so the ``m`` points of one layer are one batch; the other positions
  keep their activations.
* The prompts are the request's prompt and up to ``max_prompts - 1`` of its ``rephrase_prompts``.
  The default is the prompt alone: the rephrases are the generalisation probes of evaluation,
  and an editor that attributes on them is scored on prompts it has seen.
* ``t`` and ``t'`` are rows of the output embedding (the vocabulary projection that reads the
  residual stream), not of the input embedding; for tied models they are the same.
* Gated MLPs (LLaMA's SwiGLU) have neurons whose activation is negative; a slot written with
  ``+t'`` by such a neuron would *lower* the new answer. The update of slot ``j`` is therefore
  multiplied by the sign of neuron ``j``'s mean activation over the prompts (``sign_aware``);
  for GELU MLPs knowledge neurons are almost always positive and the rule is the paper's.
* Several requests in one call are edited jointly: every request is attributed on the unedited
  model, and the per-request slot updates are summed.

The change of a weight with ``k`` edited slots is ``sum_j u_j e_j^T`` and is stored as low-rank
factors ``left [out, k]``, ``right [k, in]`` (one-hot rows), transposed for GPT-2's ``Conv1D``.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from factedit.models import frozen

from ..base import Edit, Editor, EditRequest, ParamDelta, register_editor
from ..core.hooks import edit_input, trace
from ..core.lm import cache_kwargs, cache_of, encode_pair, model_device, unembed
from ..core.targets import get_module, get_parameter_name, get_targets, is_transposed, num_layers, weight_as_out_in
from .config import KNConfig

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Step 1: knowledge attribution (section 3.2)
# --------------------------------------------------------------------------------------------


class LastPosition:
    """One prompt whose last position is run many times, as a batch, against its cached prefix.

    Under causal attention the earlier positions never see the last one, so whatever is changed
    there leaves them as they were: they are computed once (a KV cache) and every pass runs one
    token per row, about ``T`` times cheaper than the whole prompt. The result equals a full pass.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor) -> None:
        if getattr(model.config, "is_encoder_decoder", False):
            raise NotImplementedError("kn supports decoder-only (causal) language models")
        self.model = model
        self.length = input_ids.shape[1]
        self.last = input_ids[:, -1:]
        self.prefix = None
        if self.length > 1:
            with torch.no_grad():
                prefix_ids = input_ids[:, :-1]
                self.prefix = cache_of(model.base_model(input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_ids), use_cache=True))

    def hidden(self, rows: int) -> torch.Tensor:
        """Final hidden states ``[rows, hidden]`` at the last position, ``rows`` copies in one batch."""
        cache = None
        if self.prefix is not None:
            cache = copy.deepcopy(self.prefix)  # the forward pass appends to the cache it is given
            if rows > 1:
                cache.batch_repeat_interleave(rows)
        ids = self.last.expand(rows, 1)
        mask = torch.ones(rows, self.length, dtype=torch.long, device=ids.device)
        out = self.model.base_model(input_ids=ids, attention_mask=mask, **cache_kwargs(self.model.base_model, cache), use_cache=cache is not None)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return hidden[:, -1]

    @torch.no_grad()
    def activations(self, module_names: Sequence[str]) -> torch.Tensor:
        """Each module's input at the last position: ``[len(module_names), d_in]`` (the neurons ``w̄``)."""
        with trace(self.model, module_names, inputs=True) as traced:
            self.hidden(1)
        return torch.stack([traced[name].input[0, -1] for name in module_names])


def integrated_gradients(prompt: LastPosition, module_name: str, activation: torch.Tensor, target_id: int, steps: int) -> torch.Tensor:
    """Attribution of every input neuron of ``module_name`` at the prompt's last position.

    ``activation`` is the neuron vector ``w̄`` observed there. Eq. 4: ``w̄ / m * sum_k dP(k/m w̄) / dw``,
    with ``P`` the probability of ``target_id`` at the last position (Eq. 2). The ``m`` scaled
    copies run as one batch; only the activations carry a gradient (the caller freezes the weights).
    """
    alphas = torch.arange(1, steps + 1, device=activation.device, dtype=torch.float32) / steps  # k/m, k = 1..m
    scaled = (alphas[:, None] * activation.float()[None]).to(activation.dtype).requires_grad_(True)  # [m, d_in]

    def substitute(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, -1] = scaled
        return x

    with torch.enable_grad(), edit_input(prompt.model, module_name, substitute):
        probs = torch.softmax(unembed(prompt.model, prompt.hidden(steps)).float(), dim=-1)[:, target_id]  # Eq. 2, one per alpha
        # Each copy's probability depends only on its own scaled vector: one backward gives all m gradients.
        (grads,) = torch.autograd.grad(probs.sum(), scaled)
    return activation.float() * grads.float().mean(dim=0)  # Eq. 4


def attribute(model: nn.Module, input_ids: torch.Tensor, module_names: Sequence[str], target_id: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attributions ``[layers, d_in]`` of one prompt ``[1, T]`` in every listed layer, and the activations they scale."""
    prompt = LastPosition(model, input_ids)
    activations = prompt.activations(module_names)
    scores = torch.stack([integrated_gradients(prompt, name, act, target_id, steps) for name, act in zip(module_names, activations)])
    return scores, activations


# --------------------------------------------------------------------------------------------
# Step 2: knowledge neuron refining (section 3.3)
# --------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """Chosen neurons as ``(layer position, neuron index, mean attribution)``, best first."""

    neurons: list[tuple[int, int, float]]
    threshold_selected_none: bool


def select_neurons(attributions: torch.Tensor, threshold: float, share: float, max_neurons: int | None) -> Selection:
    """Refine attributions ``[prompts, layers, d_in]`` into knowledge neurons.

    Coarse set per prompt: attribution > ``threshold`` * that prompt's largest attribution. Kept:
    neurons in the coarse sets of at least ``share`` of the prompts, best mean attribution first,
    at most ``max_neurons``. If none is kept, the same threshold is applied to the mean
    attribution over prompts (which always keeps at least its best neuron), and the result says so.
    """
    n_prompts, n_layers, width = attributions.shape
    flat = attributions.float().reshape(n_prompts, -1)
    best = flat.max(dim=1, keepdim=True).values
    coarse = (flat > threshold * best) & (best > 0)  # a prompt with no positive attribution votes for nothing
    needed = max(1, math.ceil(share * n_prompts - 1e-9))
    kept = coarse.sum(dim=0) >= needed
    score = flat.mean(dim=0)
    selected_none = not bool(kept.any())
    if selected_none:
        top = score.max()
        kept = score > threshold * top if top > 0 else torch.zeros_like(kept)
        kept[score.argmax()] = True
    index = kept.nonzero()[:, 0]
    index = index[score[index].argsort(descending=True)]
    if max_neurons is not None:
        index = index[:max_neurons]
    neurons = [(int(i) // width, int(i) % width, float(score[i])) for i in index]
    return Selection(neurons, selected_none)


# --------------------------------------------------------------------------------------------
# Step 3: updating facts (section 5.1) and the editor
# --------------------------------------------------------------------------------------------


def slot_factors(module: nn.Module, columns: torch.Tensor, neurons: Sequence[int]) -> ParamDelta:
    """``W[out, in] += sum_j columns[:, j] e_{neurons[j]}^T`` as factors in the layout of ``module.weight``.

    ``columns`` is ``[out, k]``. For a ``Linear`` (``[out, in]``) the factors are ``left = columns``,
    ``right = one-hot [k, in]``; a ``Conv1D`` stores ``[in, out]``, so the delta is the transpose:
    ``left = one-hot^T [in, k]``, ``right = columns^T [k, out]``.
    """
    width = weight_as_out_in(module).shape[1]
    one_hot = torch.zeros(len(neurons), width, dtype=columns.dtype, device=columns.device)
    one_hot[torch.arange(len(neurons)), torch.tensor(list(neurons), dtype=torch.long)] = 1.0
    if is_transposed(module):
        return ParamDelta(left=one_hot.T.contiguous(), right=columns.T.contiguous())
    return ParamDelta(left=columns.contiguous(), right=one_hot)


@register_editor("kn", KNConfig)
class KnowledgeNeurons(Editor):
    """KN (Dai et al., 2022): locate a fact's knowledge neurons by integrated gradients, rewrite their value slots."""

    supports_batch = True

    def apply(self, model, tokenizer, requests: Sequence[EditRequest], config: KNConfig) -> Edit:
        self.check_requests(requests)
        targets = get_targets(model, config.targets)
        total = num_layers(model, targets)
        layers = list(range(total)) if config.layers is None else list(config.layers)
        bad = [i for i in layers if i >= total]
        if bad:
            raise ValueError(f"kn: layers {bad} do not exist; the model has {total} blocks (0-{total - 1})")
        module_names = [targets.layer("mlp_out", i) for i in layers]
        modules = [get_module(model, name) for name in module_names]
        embeddings = model.get_output_embeddings().weight  # [vocab, hidden]
        out_features = weight_as_out_in(modules[0]).shape[0]
        if embeddings.shape[1] != out_features:
            raise ValueError(
                f"kn writes answer embeddings into the MLP output ({out_features} features), but the output embedding has "
                f"{embeddings.shape[1]}; this architecture projects before the unembedding and is not supported"
            )

        with frozen(model):
            located = [self._locate(model, tokenizer, request, module_names, config) for request in requests]

        # Section 5.1: one slot update per (request, neuron), grouped by the layer it edits.
        columns: dict[int, list[torch.Tensor]] = {}
        indices: dict[int, list[int]] = {}
        info_requests = []
        for request, (selection, activations, attributed) in zip(requests, located):
            new_id = encode_pair(tokenizer, request.prompt, request.target_new)[1][0]
            update = config.lambda_new * embeddings[new_id].detach().float()
            if request.target_true is not None and config.lambda_erase:
                true_id = encode_pair(tokenizer, request.prompt, request.target_true)[1][0]
                update = update - config.lambda_erase * embeddings[true_id].detach().float()
            neurons_info = []
            for position, index, score in selection.neurons:
                sign = 1.0
                if config.sign_aware and activations[position, index] < 0:
                    sign = -1.0
                columns.setdefault(position, []).append(sign * update)
                indices.setdefault(position, []).append(index)
                neurons_info.append({"layer": layers[position], "index": index, "score": score, "activation": float(activations[position, index])})
            info_requests.append(
                {
                    "case_id": request.case_id,
                    "attributed": attributed,
                    "neurons": neurons_info,
                    "threshold_selected_none": selection.threshold_selected_none,
                }
            )
            if selection.threshold_selected_none:
                logger.warning("kn: case %s: no neuron passed threshold %.2f and share %.2f; using the best by mean attribution", request.case_id, config.threshold, config.share)

        deltas = {}
        for position in sorted(columns):
            module = modules[position]
            name = get_parameter_name(model, module_names[position])
            factors = slot_factors(module, torch.stack(columns[position], dim=1), indices[position])
            deltas[name] = ParamDelta(left=factors.left.cpu(), right=factors.right.cpu())
        info = {"layers": layers, "requests": info_requests}
        edit = Edit(self.name, deltas, [r.case_id for r in requests], config.to_dict(), info)
        return edit.apply(model)

    @staticmethod
    def _locate(model, tokenizer, request: EditRequest, module_names: Sequence[str], config: KNConfig) -> tuple[Selection, torch.Tensor, str]:
        """Steps 1-2 for one request: its selected neurons, the mean activations, and which answer was attributed."""
        attributed = "target_true" if request.target_true is not None else "target_new"
        answer = getattr(request, attributed)
        prompts = [request.prompt, *request.rephrase_prompts][: config.max_prompts]
        device = model_device(model)
        scores, activations = [], []
        for prompt in prompts:
            prompt_ids, answer_ids = encode_pair(tokenizer, prompt, answer)
            input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
            s, a = attribute(model, input_ids, module_names, answer_ids[0], config.steps)
            scores.append(s)
            activations.append(a.float())
        selection = select_neurons(torch.stack(scores), config.threshold, config.share, config.max_neurons)
        return selection, torch.stack(activations).mean(dim=0), attributed
