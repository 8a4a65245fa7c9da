"""The target values v* of ROME and MEMIT, optimised for many requests at once.

For each request, a vector delta is added to the output of the edited MLP at the subject's last
token and optimised so that (ROME, Meng et al., 2022, eq. 4):

* the new target is predicted after every prefixed prompt (mean token NLL over the target);
* the prediction after the essence prompt ("{subject} is a", at the subject's last token) stays
  close to the unedited one: KL(p_edited || p_unedited), weighted by ``kl_factor``;
* the vector stays small: ``v_weight_decay * |delta| / |v0|^2``, and ``|delta|`` is clamped to
  ``clamp_norm_factor * |v0|``, where v0 is the unedited output for the (averaged) key.

Requests do not interact (each row of the batch carries its own request's vector), so optimising
them together gives each the result it would get alone. A request stops once its target is
reached (its NLL falls below ``stop_loss``); its rows are dropped from the batch and its vector
is frozen. ROME's code applies the threshold to the whole loss, which the KL and norm terms
usually keep above it, so that every edit runs all its steps. Each pass reuses the unchanged
prefix and runs only the edited block and those above it (:class:`factedit.editors.core.prefix.FrozenPrefix`);
logits are computed only where a loss reads them.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

from factedit.batches import pad_id
from factedit.models import frozen

from ..base import EditRequest
from ..core.hooks import edit_output
from ..core.lm import encode_pair, unembed
from ..core.prefix import FrozenPrefix
from ..core.targets import ModelTargets
from .config import LocateConfig
from .context import subject_last_index

logger = logging.getLogger(__name__)


@dataclass
class Values:
    """Per request and edited module: the optimised vector, and the averaged key and unedited
    output of the module at the subject's last token (averaged over the prefixed prompts)."""

    deltas: dict[str, torch.Tensor]  # module -> [n, d_out], added to the module's output
    keys: dict[str, torch.Tensor]  # module -> [n, d_in]
    outputs: dict[str, torch.Tensor]  # module -> [n, d_out], also for ``record_outputs``
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


@dataclass
class _Rows:
    sequences: list[list[int]]
    splits: list[int]
    request: list[int]  # request index (within the chunk) of each row
    is_kl: list[bool]
    targets: list[tuple[int, int, int]]  # (row, suffix column, token id) for every target token


def _build_rows(tokenizer, requests: Sequence[EditRequest], prefixes: Sequence[str], kl_prompt: str) -> _Rows:
    rows = _Rows([], [], [], [], [])
    for j, req in enumerate(requests):
        start = req.prompt.find(req.subject)
        for prefix in prefixes:
            text = prefix + req.prompt
            prompt_ids, target_ids = encode_pair(tokenizer, text, req.target_new)
            split = subject_last_index(tokenizer, text, req.subject, len(prefix) + start)
            row = len(rows.sequences)
            rows.sequences.append(prompt_ids + target_ids[:-1])
            rows.splits.append(split)
            rows.request.append(j)
            rows.is_kl.append(False)
            for k, token in enumerate(target_ids):
                rows.targets.append((row, len(prompt_ids) - 1 + k - split, token))
        text = kl_prompt.format(req.subject)
        ids = tokenizer(text)["input_ids"]
        split = subject_last_index(tokenizer, text, req.subject)
        rows.sequences.append(ids[: split + 1])
        rows.splits.append(split)
        rows.request.append(j)
        rows.is_kl.append(True)
    return rows


def optimise_values(
    model,
    tokenizer,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
    targets: ModelTargets,
    layer: int,
    config: LocateConfig,
    edited: Sequence[str] | None = None,
    record_outputs: Sequence[str] = (),
    norm_reference: dict[str, str] | None = None,
    decay_power: int = 2,
) -> Values:
    """Optimised vectors for every request, added to the outputs of the ``edited`` modules of
    block ``layer`` (by default its MLP output projection) at the subject's last token.

    ``record_outputs`` names further modules whose unedited outputs are returned, e.g. the block
    output MEMIT spreads its residual from. ``norm_reference`` maps an edited module to the module
    whose output is the v0 of its norm penalty and clamp (MEMIT: the residual stream); by default
    a module is its own reference (ROME). The penalty is ``|delta| / |v0|^decay_power``.
    """
    edited = list(edited or [targets.layer("mlp_out", layer)])
    reference = {m: (norm_reference or {}).get(m, m) for m in edited}
    # Batches are padded to their longest suffix (subject's last token to the target's end), so
    # requests of similar suffix length are batched together; results return in request order.
    order = sorted(range(len(requests)), key=lambda i: _suffix_length(tokenizer, requests[i]))
    chunks = [
        _optimise_chunk(model, tokenizer, [requests[i] for i in order[k : k + config.batch_requests]], prefixes, targets, layer, config, edited, record_outputs, reference, decay_power)
        for k in range(0, len(requests), config.batch_requests)
    ]
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))

    def join(field_: str) -> dict[str, torch.Tensor]:
        return {name: torch.cat([getattr(c, field_)[name] for c in chunks])[back.to(chunks[0].deltas[edited[0]].device)] for name in getattr(chunks[0], field_)}

    steps = [s for c in chunks for s in c.steps]
    losses = [x for c in chunks for x in c.losses]
    return Values(join("deltas"), join("keys"), join("outputs"), [steps[i] for i in back.tolist()], [losses[i] for i in back.tolist()])


def _suffix_length(tokenizer, request: EditRequest) -> int:
    prompt_ids, target_ids = encode_pair(tokenizer, request.prompt, request.target_new)
    split = subject_last_index(tokenizer, request.prompt, request.subject)
    return len(prompt_ids) + len(target_ids) - split


def _mean_by_request(values: torch.Tensor, request: torch.Tensor, n: int) -> torch.Tensor:
    total = torch.zeros((n, values.shape[1]), dtype=values.dtype, device=values.device).index_add_(0, request, values)
    count = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, request, torch.ones_like(values[:, 0]))
    return total / count[:, None]


def _optimise_chunk(model, tokenizer, requests, prefixes, targets, layer, config, edited, record_outputs, reference, decay_power) -> Values:
    n = len(requests)
    rows = _build_rows(tokenizer, requests, prefixes, config.kl_prompt)
    pad = pad_id(tokenizer)
    watched = list(dict.fromkeys([*edited, *record_outputs, *reference.values()]))
    prefix = FrozenPrefix(model, targets, rows.sequences, rows.splits, layer, pad, record=watched)
    device = prefix.suffix_ids.device
    request = torch.tensor(rows.request, device=device)
    is_kl = torch.tensor(rows.is_kl, device=device)
    rewrite = ~is_kl

    # Keys and unedited outputs at the subject's last token (suffix column 0), averaged over the
    # prefixed prompts; the KL rows are not part of the average.
    def averaged(tensor: torch.Tensor) -> torch.Tensor:
        return _mean_by_request(tensor[rewrite][:, 0].float(), request[rewrite], n)

    keys = {m: averaged(prefix.recorded[m].input) for m in edited}
    outputs = {m: averaged(prefix.recorded[m].output) for m in watched}

    # Essence prompts: the unedited next-token distribution at the subject's last token.
    kl_rows = is_kl.nonzero()[:, 0]
    with torch.no_grad():
        kl_reference = torch.log_softmax(unembed(model, prefix.unedited_hidden[kl_rows, 0]).float(), dim=-1)
    target_row = torch.tensor([r for r, _, _ in rows.targets], device=device)
    target_col = torch.tensor([c for _, c, _ in rows.targets], device=device)
    target_tok = torch.tensor([t for _, _, t in rows.targets], device=device)

    deltas = {m: torch.zeros_like(outputs[m], requires_grad=True) for m in edited}
    optimiser = torch.optim.Adam(list(deltas.values()), lr=config.v_lr)
    reference_norm = {m: outputs[reference[m]].norm(dim=1) for m in edited}
    done = torch.zeros(n, dtype=torch.bool, device=device)
    steps = torch.zeros(n, dtype=torch.long)
    final_loss = torch.full((n,), float("nan"))
    # Current rows of the batch (it shrinks as requests finish) as indices into the original rows.
    live = torch.arange(len(rows.sequences), device=device)

    def adder(delta: torch.Tensor):
        def add(out: torch.Tensor) -> torch.Tensor:
            return torch.cat([out[:, :1] + delta[request[live]][:, None].to(out.dtype), out[:, 1:]], dim=1)

        return add

    with frozen(model):
        for step in range(config.v_steps):
            with contextlib.ExitStack() as stack:
                for m in edited:
                    stack.enter_context(edit_output(model, m, adder(deltas[m])))
                hidden = prefix.hidden()
            # Map original row ids to positions in the live batch.
            position = torch.full((len(rows.sequences),), -1, dtype=torch.long, device=device)
            position[live] = torch.arange(len(live), device=device)
            keep = position[target_row] >= 0
            logits = unembed(model, hidden[position[target_row[keep]], target_col[keep]]).float()
            token_nll = -torch.log_softmax(logits, dim=-1).gather(1, target_tok[keep][:, None])[:, 0]
            row_of_token = target_row[keep]
            # Mean NLL per prompt, then mean over a request's prompts.
            row_nll = torch.zeros(len(rows.sequences), device=device).index_add(0, row_of_token, token_nll)
            row_len = torch.zeros(len(rows.sequences), device=device).index_add(0, row_of_token, torch.ones_like(token_nll))
            live_rewrite = live[rewrite[live]]
            nll = _mean_by_request((row_nll / row_len.clamp(min=1))[live_rewrite][:, None], request[live_rewrite], n)[:, 0]
            live_kl = live[is_kl[live]]
            kl_logp = torch.log_softmax(unembed(model, hidden[position[live_kl], 0]).float(), dim=-1)
            ref = kl_reference[torch.searchsorted(kl_rows, live_kl)]
            kl = torch.zeros(n, device=device).index_add(0, request[live_kl], (kl_logp.exp() * (kl_logp - ref)).sum(-1))
            decay = sum(config.v_weight_decay * deltas[m].norm(dim=1) / reference_norm[m].pow(decay_power) for m in edited)
            loss = nll + config.kl_factor * kl + decay
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("step %d nll %s kl %s decay %s", step, nll.tolist(), kl.tolist(), decay.tolist())
            active = ~done
            final_loss[active.cpu()] = loss.detach()[active].cpu()
            finished = active & (nll.detach() < config.stop_loss)
            if finished.any():
                done |= finished
                if done.all():
                    break
                live = live[~done[request[live]]]
                prefix.select(position[live])
            steps[(~done).cpu()] += 1
            optimiser.zero_grad(set_to_none=True)
            loss[~done].sum().backward()
            before = {m: d.detach().clone() for m, d in deltas.items()}
            optimiser.step()
            with torch.no_grad():
                for m, delta in deltas.items():
                    delta[done] = before[m][done]  # finished requests keep their vector
                    max_norm = config.clamp_norm_factor * reference_norm[m]
                    norms = delta.norm(dim=1)
                    delta.mul_(torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))[:, None])
    logger.debug("values: steps %s, final losses %s", steps.tolist(), final_loss.tolist())
    return Values({m: d.detach() for m, d in deltas.items()}, keys, outputs, steps.tolist(), final_loss.tolist())
