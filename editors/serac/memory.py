"""SERAC's edit memory and its routing (Mitchell et al., 2022, "Memory-Based Model Editing at
Scale", section 3), as forward hooks on the edited model.

SERAC answers an input x with the base model unless the scope classifier ``g`` says that x is in
the scope of a stored edit: the edit ``z*`` with the highest in-scope probability ``g(z, x)`` is
retrieved, and if that probability exceeds 0.5 the counterfactual model ``h(z*, x)`` answers
instead. Here the decision is taken **per position** of a causal LM: a position's feature is the
classifier's feature there, which summarises its prefix (see :meth:`SERACNetwork.pool`), so the
position that predicts an answer's first token is routed on the prompt alone; teacher-forced scoring (prompt + answer in one
pass) and KV-cache generation (one token at a time) therefore take the same decisions. A routed
position's final hidden state is replaced by the counterfactual model's hidden state at the same
token when it reads ``edit text + separator + the row's tokens``, so the model's own
unembedding (``model(...)``, ``model.generate``, ``unembed(model, hidden_states(model, ...))``)
yields the counterfactual logits. With several edits stored, each position goes to the edit
whose key is nearest (highest cosine, hence highest in-scope probability). Positions that are not routed keep the frozen model's hidden
states bit for bit, and the weights are never touched.

A stored edit holds its text's token ids (prompt + new target) followed by the separator, and one
key per position of the text that predicts a target token (so an input following the edit
prompt and the first k target tokens matches key k; untrained, routing is exact match).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from factedit.editors.base import EditError
from factedit.editors.core.hooks import trace
from factedit.editors.core.lm import cache_in, hidden_states, model_device
from factedit.editors.core.targets import get_module

from .network import SERACNetwork

logger = logging.getLogger(__name__)

MEMORY_ATTRIBUTE = "serac_memory"  # where a model keeps its EditMemory while SERAC edits are applied


@dataclass
class Bank:
    """The stored edits as the router sees them."""

    prefixes: list[torch.Tensor]  # per edit: its text's token ids followed by the separator's
    keys: torch.Tensor  # [n_keys, embedding_dim] unit vectors (the classifier's edit embeddings)
    owners: torch.Tensor  # [n_keys] the edit (index into prefixes) each key belongs to

    def detach(self) -> "Bank":
        return Bank(self.prefixes, self.keys.detach(), self.owners)


@dataclass
class Job:
    """One counterfactual forward pass: ``prefix`` then ``tokens``, read at ``positions`` of ``tokens``."""

    prefix: torch.Tensor
    tokens: torch.Tensor
    positions: torch.Tensor


def base_pass(model: nn.Module, network: SERACNetwork, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier features (pooled outputs of ``network.feature_module``) and the frozen
    model's final hidden states, both ``[batch, length, hidden]``, from one forward pass (not
    routed, also when the model holds edits)."""
    memory = EditMemory.of(model)
    with memory.bypassed() if memory is not None else contextlib.nullcontext(), trace(model, [network.feature_module], inputs=False, outputs=True) as traced:
        hidden = hidden_states(model, input_ids, attention_mask)
    features, _ = network.pool(traced[network.feature_module].output, attention_mask)
    return features, hidden


def route(network: SERACNetwork, bank: Bank, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SERAC's routing per position: the stored edit with the highest in-scope probability (the
    nearest key), if that probability exceeds 0.5; ``features`` are pooled (:meth:`SERACNetwork.pool`). Returns ``(edit index or -1, in-scope probability)``, both ``[batch, length]``;
    positions where ``mask`` is false are never routed."""
    cosine = network.embed(features) @ bank.keys.T  # [batch, length, n_keys]
    best, key = cosine.max(-1)  # the logit is increasing in the cosine: the best key is the best edit
    logit = network.in_scope_logit(best)
    edit = torch.where((logit > 0) & mask.bool(), bank.owners[key], torch.full_like(key, -1))
    return edit, torch.sigmoid(logit)


def counterfactual_states(network: SERACNetwork, model: nn.Module, jobs: Sequence[Job]) -> list[torch.Tensor]:
    """The counterfactual model's final hidden states ``[len(positions), hidden]`` for each job,
    all jobs in one right-padded batch."""
    sequences = [torch.cat([job.prefix, job.tokens]) for job in jobs]
    width = max(len(s) for s in sequences)
    device = model_device(model)
    input_ids = torch.zeros((len(jobs), width), dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(jobs), width), dtype=torch.long, device=device)
    for i, sequence in enumerate(sequences):
        input_ids[i, : len(sequence)] = sequence
        attention_mask[i, : len(sequence)] = 1
    memory = EditMemory.of(model)
    with memory.bypassed() if memory is not None else contextlib.nullcontext():  # its lower blocks are the frozen model's
        hidden = network.counterfactual_hidden(model, input_ids, attention_mask)
    return [hidden[i, len(job.prefix) + job.positions] for i, job in enumerate(jobs)]


def routed_hidden(
    network: SERACNetwork,
    model: nn.Module,
    bank: Bank,
    hidden: torch.Tensor,
    features: torch.Tensor,
    history: torch.Tensor,
    history_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states with every routed position answered by the counterfactual model.

    ``hidden`` and ``features`` ``[batch, n, hidden]`` cover the last ``n`` columns of the rows'
    token ``history`` ``[batch, total]`` (all of it without a KV cache); ``history_mask`` marks its
    real tokens (padding may be on either side). Each routed row is read by the counterfactual
    model once per edit it is routed to, on ``edit prefix + the row's real tokens``. Returns the
    new hidden states (``hidden`` itself when nothing is routed) and the routing ``[batch, n]``.
    """
    n, total = hidden.shape[1], history.shape[1]
    edit, _ = route(network, bank, features, history_mask[:, total - n :])
    if not bool((edit >= 0).any()):
        return hidden, edit
    rank = history_mask.long().cumsum(1) - 1  # each column's index among its row's real tokens
    jobs, places = [], []
    for row in torch.nonzero((edit >= 0).any(1)).flatten().tolist():
        tokens = history[row][history_mask[row].bool()]
        for index in edit[row][edit[row] >= 0].unique().tolist():
            cols = torch.nonzero(edit[row] == index).flatten()
            jobs.append(Job(bank.prefixes[index], tokens, rank[row, total - n + cols]))
            places.append((row, cols))
    out = hidden.clone()
    for (row, cols), states in zip(places, counterfactual_states(network, model, jobs)):
        out[row, cols] = states.to(out.dtype)
    return out, edit


@dataclass
class Entry:
    owner: object  # the application of the edit that stored it
    prefix: torch.Tensor
    keys: torch.Tensor


class EditMemory:
    """The edits applied to one model and the two hooks that route its forward passes.

    Kept on the model object (``model.serac_memory``), so that every SERAC edit applied to a model
    shares one memory and one pair of hooks, whichever editor object or saved file it came from;
    removing the last entry removes the hooks and the attribute. ``key`` identifies the network
    (settings and checkpoint): edits made with another network cannot join.

    The hooks: one on the classifier's block keeps its output (the features of this forward
    pass); one on ``model.base_model`` routes the final hidden states. With a KV cache a forward
    pass sees only new tokens, so the rows' token history and the running sums of their pooled
    features are kept here (started afresh by every pass without a past) and the counterfactual
    model re-reads the whole history; beam search's reordering of the cache reorders them too (through the model's ``_reorder_cache``, which
    ``generate`` calls when a model has one).
    """

    def __init__(self, model: nn.Module, network: SERACNetwork, key: str) -> None:
        if EditMemory.of(model) is not None:
            raise EditError("this model already has a SERAC memory")
        self.model = model
        self.network = network
        self.key = key
        self.entries: list[Entry] = []
        self._bank: Bank | None = None
        self._features: torch.Tensor | None = None
        self._history: torch.Tensor | None = None
        self._carry: tuple[torch.Tensor, torch.Tensor] | None = None  # running sums of the pooled features
        self._bypass = False
        self._handles = [
            get_module(model, network.feature_module).register_forward_hook(self._capture),
            model.base_model.register_forward_hook(self._route, with_kwargs=True),
        ]
        setattr(model, MEMORY_ATTRIBUTE, self)
        # Beam search reorders the KV cache between steps; generate() lets a model do it through
        # ``_reorder_cache``, which is given here to the model object so the history follows.
        self._reorders = not hasattr(model, "_reorder_cache")
        if self._reorders:
            model._reorder_cache = self._reorder_cache

    @staticmethod
    def of(model: nn.Module) -> "EditMemory | None":
        return model.__dict__.get(MEMORY_ATTRIBUTE)

    # -- entries ---------------------------------------------------------------------------------
    def add(self, owner: object, texts: Sequence[torch.Tensor], target_lengths: Sequence[int], separator: torch.Tensor) -> None:
        """Store edits: token ids of ``prompt + target`` and the number of target tokens of each."""
        device = model_device(self.model)
        width = max(len(t) for t in texts)
        input_ids = torch.zeros((len(texts), width), dtype=torch.long, device=device)
        attention_mask = torch.zeros_like(input_ids)
        for i, text in enumerate(texts):
            input_ids[i, : len(text)] = text
            attention_mask[i, : len(text)] = 1
        with self.bypassed(), torch.no_grad():
            features, _ = base_pass(self.model, self.network, input_ids, attention_mask)
            for i, (text, n_target) in enumerate(zip(texts, target_lengths)):
                if not 1 <= n_target < len(text):
                    raise EditError(f"a stored edit needs a prompt and 1 to {len(text) - 1} target tokens, got {n_target} of {len(text)}")
                cols = torch.arange(len(text) - n_target - 1, len(text) - 1, device=device)  # positions predicting the target
                prefix = torch.cat([text.to(device), separator.to(device)])
                self.entries.append(Entry(owner, prefix, self.network.embed(features[i, cols])))
        self._bank = None
        logger.debug("SERAC memory: stored %d edit(s), now %d in all", len(texts), len(self.entries))

    def remove(self, owner: object) -> None:
        """Drop ``owner``'s entries; the last one out removes the hooks."""
        self.entries = [e for e in self.entries if e.owner is not owner]
        self._bank = None
        if not self.entries:
            self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._history = self._features = self._carry = None
        if EditMemory.of(self.model) is self:
            delattr(self.model, MEMORY_ATTRIBUTE)
        if self._reorders:
            del self.model._reorder_cache
            self._reorders = False

    @property
    def bank(self) -> Bank:
        if self._bank is None:
            keys = torch.cat([e.keys for e in self.entries])
            owners = torch.cat([torch.full((len(e.keys),), i, dtype=torch.long) for i, e in enumerate(self.entries)]).to(keys.device)
            self._bank = Bank([e.prefix for e in self.entries], keys, owners)
        return self._bank

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        """Forward passes inside the block see the unedited model."""
        previous, self._bypass = self._bypass, True
        try:
            yield
        finally:
            self._bypass = previous

    # -- hooks -----------------------------------------------------------------------------------
    def _capture(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._features = output[0] if isinstance(output, (tuple, list)) else output

    def _route(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        features, self._features = self._features, None
        if self._bypass or not self.entries:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise EditError("SERAC routes on token ids: call the edited model with input_ids, not inputs_embeds")
        if features is None:
            raise EditError(f"SERAC: the classifier block {self.network.feature_module} did not run in this forward pass")
        history, history_mask, carry = self._track(input_ids, kwargs)
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        features, self._carry = self.network.pool(features, history_mask[:, history.shape[1] - features.shape[1] :], carry)
        routed, _ = routed_hidden(self.network, self.model, self.bank, hidden, features, history, history_mask)
        self._features = None  # captured by the counterfactual model's (unrouted) passes
        if routed is hidden:
            return None
        if isinstance(output, tuple):
            return (routed, *output[1:])
        output.last_hidden_state = routed  # a ModelOutput keeps attribute and item in step
        return output

    def _reorder_cache(self, cache: Any, beam_idx: torch.Tensor) -> Any:
        cache.reorder_cache(beam_idx)
        if self._history is not None:
            self._history = self._history[beam_idx.to(self._history.device)]
        if self._carry is not None:
            self._carry = tuple(t[beam_idx.to(t.device)] for t in self._carry)
        return cache

    def _track(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The rows' whole token history and its padding mask, this pass's tokens last, and the
        pooled features' carry from earlier passes (``None`` for a pass without a past)."""
        new = input_ids.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise EditError("SERAC needs a 2-D attention mask (batch, tokens) to find each row's real tokens")
        if mask is not None:
            past = mask.shape[1] - new
        else:
            cache = cache_in(kwargs)
            past = max(cache.get_seq_length() - new, 0) if cache is not None and hasattr(cache, "get_seq_length") else 0
        carry = None
        if past == 0:
            history = input_ids
        elif self._history is not None and tuple(self._history.shape) == (input_ids.shape[0], past) and self._carry is not None:
            history = torch.cat([self._history, input_ids], 1)
            carry = self._carry
        else:
            raise EditError(
                "SERAC lost the token history of a cached forward pass: the cache was reused or "
                "reshaped in a way it cannot follow (e.g. assisted decoding)"
            )
        self._history = history
        return history, (mask if mask is not None else torch.ones_like(history)), carry
