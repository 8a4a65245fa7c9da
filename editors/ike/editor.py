"""IKE: in-context knowledge editing; the model's weights are never changed.

Zheng, Li, Dong, Fan, Wu, Xu, Chang (2023), "Can We Edit Factual Knowledge by In-Context
Learning?" (EMNLP). The edited model answers ``context + input`` where the context holds ``k``
demonstrations followed by the new fact (section 3):

* **Demonstration types** (section 3.2), each written ``New Fact: <fact>\\n<prompt> <answer>``:
  *copy* (the fact's own prompt answered with its new target), *update* (a paraphrase of the
  fact's prompt answered with the new target) and *retain* (a neighbourhood prompt, another
  subject with the same relation, answered with its true answer).
* **Demonstration selection** (section 3.3): the ``k`` demonstrations of the pool nearest to the
  new fact by cosine similarity of sentence embeddings, placed in ascending similarity so that the
  most similar one is next to the query. The paper embeds with a sentence-transformer; here the
  embedding is the **mean-pooled final hidden state of the edited model itself** (no external
  encoder, no download).
* The new fact's own *copy* demonstration ends the demonstrations, and the context's last line is
  ``New Fact: <fact>`` right before the input (as in the paper's prompt format).

The paper's ``Prompt:`` label before each demonstration's prompt is left out: the input is not
prefixed with it, and a demonstration's prompt then follows a newline exactly as the input does,
which keeps their tokenisation alike.

**The pool** is built from the other requests of the same call, a small built-in set of generic
counterfactual facts (:data:`~factedit.editors.core.facts.BUILTIN_POOL`, on by default) and, optionally, a CounterFact-format
file ``pool_path``, whose records the application hands in through :meth:`IKE.read_data` (the editor
reads no file itself; ``edit.py`` does it with its record reader). Pool embeddings are computed once
per model in ``prepare``.

**How the model sees the context.** Applying an edit installs a forward pre-hook and a forward
hook on ``model.base_model`` (:class:`ContextPrefix`): the context's token ids are put in front of
``input_ids`` (or their embeddings in front of ``inputs_embeds``), the attention mask gets ones in
front and explicit ``position_ids`` are shifted by the context's length; the context's positions
are stripped from the outputs (``last_hidden_state``, ``hidden_states``, ``attentions``), so code
that indexes positions of the original input (teacher-forced scoring, ``model(...)``,
``model.generate``) works unchanged. With a KV cache the context is prepended once, on the pass
that starts the cache; later passes (cache not empty) only get the mask and positions shifted. A
cache built before the edit was applied must not be reused with it.

**The context is encoded once.** Where the model takes a ``transformers`` cache object (the
``cache``/``past_key_values`` argument of current releases), the context's keys and values are
computed once per context and weights (recomputed when an edit is added or removed, or when any
parameter changes in place) and every pass that starts afresh reads them from a cache instead of
re-encoding the context for each row: a case's probes then cost their own tokens only, not
``rows x (context + tokens)``. Outputs agree with the prepended-token pass to float rounding
(``tests/editors/test_ike.py`` checks 1e-5). Models without a cache object fall back to prepending tokens.

**Decoding behind a context** appends each step's keys and values into spare room of the cache
(:class:`_GrowingLayer`) instead of transformers' copy of the whole cache per step, which with a
context of a few hundred tokens was over half of a decoding step.

**Several cases' contexts in one batch** (:class:`RowContexts`, the evaluation's counterpart of
per-row weight edits): each row gets its own case's context, contexts left-padded to the longest
with the padding masked out and positions given explicitly, each context encoded once. A row
gives what the model carrying only its case's edit gives, up to float rounding.

**Several applied IKE edits** compose: the context is all their demonstrations in application
order followed by all their ``New Fact:`` lines in application order (most recent last), so the
query follows every new fact. Reverting an edit removes exactly its pieces; the hooks go with the
last one, and outputs are then bit-identical to the unedited model's.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, Sequence

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from factedit.batches import pad_id, right_pad

from ..base import Edit, EditError, Editor, EditRequest, register_editor
from ..core.facts import BUILTIN_POOL
from ..core.hooks import weights_version
from ..core.lm import cache_argument, cache_in, cache_of, join_text, model_device
from .config import IKEConfig

logger = logging.getLogger(__name__)

PREFIX_ATTRIBUTE = "ike_context"  # where a model keeps its ContextPrefix while IKE edits are applied


# Generic counterfactual facts for demonstrations, in CounterFact's shape (prompt, new target,
# true target, a paraphrase, a neighbour with the same true answer).
def builtin_requests() -> list[EditRequest]:
    return [
        EditRequest(f"ike-pool-{i}", p, s, new, true, rephrase_prompts=(para,), neighborhood_prompts=(nb,))
        for i, (p, s, new, true, para, nb) in enumerate(BUILTIN_POOL)
    ]


def fact_text(request: EditRequest) -> str:
    prompt, target = join_text(request.prompt, request.target_new)
    return f"{prompt}{target}."


def demo(fact: str, prompt: str, answer: str) -> str:
    prompt, answer = join_text(prompt, answer)
    return f"New Fact: {fact}\n{prompt}{answer}\n\n"


def demonstrations(request: EditRequest) -> list[str]:
    """The copy, update and retain demonstrations a pool fact gives (section 3.2)."""
    fact = fact_text(request)
    out = [demo(fact, request.prompt, request.target_new)]  # copy
    out += [demo(fact, p, request.target_new) for p in request.rephrase_prompts[:1]]  # update
    if request.target_true:
        out += [demo(fact, p, request.target_true) for p in request.neighborhood_prompts[:1]]  # retain
    return out


# --------------------------------------------------------------------------------------------
# The context in front of the model's inputs
# --------------------------------------------------------------------------------------------


SPARE_POSITIONS = 64
"""Room left after the contexts of a batch of rows for the pass's own tokens (a probe, a prompt and
its first new tokens) before the cache has to grow."""


class _GrowingLayer(DynamicLayer):
    """A cache layer that appends into spare room instead of copying the whole cache every step.

    transformers' :class:`DynamicLayer` concatenates the cached keys and values with each new
    token's, copying all of them on every decoding step; with a context of a few hundred tokens in
    front that copy was over half of a decoding step's time. This layer keeps them in a buffer of
    twice the needed length and hands out views of its filled part: the same values, written once.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.keys.shape[-2] if self.keys.numel() else 0
        needed = held + key_states.shape[-2]
        room = getattr(self, "_room", None)
        # a buffer still backing self.keys (not replaced by a crop, a reorder or a reset) with space left
        if room is None or room[2] is not self.keys or room[0].shape[-2] < needed or room[0].shape[:2] != key_states.shape[:2]:
            shape = (*key_states.shape[:2], max(2 * needed, 64), key_states.shape[-1])
            keys, values = key_states.new_empty(shape), value_states.new_empty(shape)
            if held:
                keys[..., :held, :] = self.keys
                values[..., :held, :] = self.values
            room = [keys, values, None]
        room[0][..., held:needed, :] = key_states
        room[1][..., held:needed, :] = value_states
        self.keys, self.values = room[0][..., :needed, :], room[1][..., :needed, :]
        room[2] = self.keys
        self._room = room
        return self.keys, self.values

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, filled: int) -> None:
        """Start the layer with buffers whose first ``filled`` positions hold the cached keys and
        values and whose remaining positions are spare room (a context's states written once,
        straight into the buffer that later steps append to)."""
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys[..., :filled, :], values[..., :filled, :]
        self._room = [keys, values, self.keys]


def _growing(cache: Any) -> Any:
    """``cache`` with each of its plain, empty :class:`DynamicLayer` replaced by a :class:`_GrowingLayer`."""
    layers = getattr(cache, "layers", None)
    if isinstance(layers, list):
        for index, layer in enumerate(layers):
            if type(layer) is DynamicLayer and not layer.is_initialized:
                layers[index] = _GrowingLayer()
    return cache


class _ContextHooks:
    """Hooks on ``model.base_model`` that put a context in front of every input row; subclasses say
    which context each row gets (:meth:`_row_contexts`)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._strip = 0
        self._suspended = False
        self._encoded: dict[Any, tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]]] = {}  # key -> (weights, keys/values)
        self._banked: tuple | None = None  # (contexts and width, weights, per-layer banks, row of each key)
        self._signature = inspect.signature(model.base_model.forward)
        self._handles: list = []

    def _install_hooks(self) -> None:
        body = self.model.base_model
        self._handles = [
            body.register_forward_pre_hook(self._before, with_kwargs=True),
            body.register_forward_hook(self._after, with_kwargs=True),
        ]

    def _row_contexts(self, batch: int) -> list[tuple[Any, torch.Tensor]]:
        """``(key, token ids)`` of each row's context; rows with the same key share the context."""
        raise NotImplementedError

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def suspended(self):
        """``with prefix.suspended(): ...`` runs the model without the context (for embeddings)."""
        previous, self._suspended = self._suspended, True
        try:
            yield
        finally:
            self._suspended = previous

    def _weights_version(self) -> tuple[tuple[int, int], ...]:
        return weights_version(self.model)

    def _context_states(self, key: Any, ctx: torch.Tensor, version: tuple[int, ...] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The context's keys and values per layer (batch of one), computed once per context and
        weights (``version``: :meth:`_weights_version`, when the caller has it); ``None`` where the
        model does not return a cache with per-layer tensors."""
        version = self._weights_version() if version is None else version
        found = self._encoded.get(key)
        if found is None or found[0] != version:
            with self.suspended(), torch.no_grad():
                out = self.model.base_model(input_ids=ctx[None], use_cache=True)
            cache = cache_of(out)
            layers = getattr(cache, "layers", None)
            if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
                return None
            found = self._encoded[key] = (version, [(layer.keys, layer.values) for layer in layers])
        return found[1]

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self._strip = 0
        if self._suspended:
            return args, kwargs
        kw = dict(self._signature.bind_partial(*args, **kwargs).arguments)
        kw.update(kw.pop("kwargs", {}) or {})
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        batch, length = (ids if ids is not None else embeds).shape[:2]
        contexts = self._row_contexts(batch)
        distinct = dict(contexts)  # key -> ids, in order of first use
        if len(distinct) == 1:
            key, ctx = next(iter(distinct.items()))
            return self._before_shared(kw, key, ctx, batch) if len(ctx) else (args, kwargs)
        return self._before_per_row(kw, contexts, distinct, batch, length)

    def _before_shared(self, kw: dict, key: Any, ctx: torch.Tensor, batch: int) -> tuple[tuple, dict]:
        """Every row gets the same context ``ctx`` of ``c`` tokens."""
        c = len(ctx)
        past = cache_in(kw)
        started = past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        mask = kw.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise EditError("IKE: only 2-D attention masks are supported (a compiled/static cache passes 4-D masks)")
            kw["attention_mask"] = torch.cat([mask.new_ones(batch, c), mask], dim=1)
        positions = kw.get("position_ids")
        if started:  # the cache already holds the context: only the positions move
            if positions is not None:
                kw["position_ids"] = positions + c
            return (), kw
        states = self._context_states(key, ctx) if self._takes_cache() else None
        if states is not None:  # start the cache with the context's keys and values
            cache = _growing(past if past is not None else DynamicCache(config=self.model.config))
            for layer, (k, v) in enumerate(states):
                cache.update(k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:]), layer)
            kw[cache_argument(self.model.base_model)] = cache
            if positions is not None:
                kw["position_ids"] = positions + c
            return (), kw
        if ids is not None:
            kw["input_ids"] = torch.cat([ctx.to(ids.device).expand(batch, c), ids], dim=1)
        else:
            context_embeds = self.model.get_input_embeddings()(ctx.to(embeds.device)).to(embeds.dtype)
            kw["inputs_embeds"] = torch.cat([context_embeds.expand(batch, c, -1), embeds], dim=1)
        if positions is not None:
            lead = torch.arange(c, device=positions.device, dtype=positions.dtype).expand(*positions.shape[:-1], c)
            kw["position_ids"] = torch.cat([lead, positions + c], dim=-1)
        if kw.get("token_type_ids") is not None:
            types = kw["token_type_ids"]
            kw["token_type_ids"] = torch.cat([types.new_zeros(batch, c), types], dim=1)
        self._strip = c
        return (), kw

    def _before_per_row(self, kw: dict, contexts: list[tuple[Any, torch.Tensor]], distinct: dict, batch: int, length: int) -> tuple[tuple, dict]:
        """Rows with different contexts: each row's context is left-padded to the longest one
        (``width``), the padding masked out, and every position given explicitly, so that a row
        sees exactly its own context at the positions it has alone."""
        if not self._takes_cache():
            raise EditError("IKE: rows with different contexts need a model whose forward takes a key-value cache")
        lengths = [len(ctx) for _, ctx in contexts]
        width = max(lengths)
        past = cache_in(kw)
        started = past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0
        ref = kw.get("input_ids") if kw.get("input_ids") is not None else kw["inputs_embeds"]
        device = ref.device
        shift = torch.tensor(lengths, device=device)[:, None]
        mask = kw.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, (past.get_seq_length() - width if started else 0) + length, dtype=torch.long, device=device)
        if mask.dim() != 2:
            raise EditError("IKE: only 2-D attention masks are supported (a compiled/static cache passes 4-D masks)")
        lead = (torch.arange(width, device=device)[None, :] >= (width - shift)).to(mask.dtype)
        kw["attention_mask"] = torch.cat([lead, mask], dim=1)
        positions = kw.get("position_ids")
        if positions is None:
            before = past.get_seq_length() - width if started else 0
            positions = torch.arange(before, before + length, device=device)[None, :].expand(batch, length)
        kw["position_ids"] = positions + shift
        if started:
            return (), kw
        cache = _growing(past if past is not None else DynamicCache(config=self.model.config))
        banks, index = self._bank(distinct, width)
        rows = torch.tensor([index[key] for key, _ in contexts], device=device)
        layers = getattr(cache, "layers", None)
        for layer, (bank_k, bank_v) in enumerate(banks):
            keys, values = bank_k.index_select(0, rows), bank_v.index_select(0, rows)
            if isinstance(layers, list) and layer < len(layers) and isinstance(layers[layer], _GrowingLayer) and not layers[layer].is_initialized:
                layers[layer].adopt(keys, values, width)  # the gathered rows are the cache's buffer, spare room included
            else:
                cache.update(keys[..., :width, :], values[..., :width, :], layer)
        kw[cache_argument(self.model.base_model)] = cache
        return (), kw

    def _bank(self, distinct: dict, width: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[Any, int]]:
        """Per layer, the keys and values of the contexts ``distinct`` (key -> ids) left-padded with
        zeros to ``width`` and followed by :data:`SPARE_POSITIONS` of room for the pass's own
        tokens, one row per context, and each key's row: a batch's cache is then one
        ``index_select`` per layer, written once. Kept while the same contexts come at the same
        width (the passes of one chunk of cases) and the weights are unchanged."""
        version = self._weights_version()
        tag = (tuple(distinct), width)
        held = self._banked
        if held is not None and held[0] == tag and held[1] == version:
            return held[2], held[3]
        states = {key: self._context_states(key, ctx, version) for key, ctx in distinct.items() if len(ctx)}  # an empty context adds nothing
        if not states or any(value is None for value in states.values()):
            raise EditError("IKE: rows with different contexts need a model that returns its keys and values per layer")
        index = {key: i for i, key in enumerate(distinct)}
        some = next(iter(states.values()))
        banks = []
        for layer in range(len(some)):
            k0, v0 = some[layer]
            bank_k = k0.new_zeros(len(distinct), k0.shape[1], width + SPARE_POSITIONS, k0.shape[3])
            bank_v = v0.new_zeros(len(distinct), v0.shape[1], width + SPARE_POSITIONS, v0.shape[3])
            for key, per_layer in states.items():
                ck, cv = per_layer[layer]
                bank_k[index[key], :, width - ck.shape[2] : width] = ck[0]
                bank_v[index[key], :, width - cv.shape[2] : width] = cv[0]
            banks.append((bank_k, bank_v))
        self._banked = (tag, version, banks, index)
        return banks, index

    def _takes_cache(self) -> bool:
        return "cache" in self._signature.parameters or "past_key_values" in self._signature.parameters

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        c, self._strip = self._strip, 0
        if not c:
            return output
        if isinstance(output, tuple):
            return (output[0][:, c:], *output[1:])
        if getattr(output, "last_hidden_state", None) is not None:
            output.last_hidden_state = output.last_hidden_state[:, c:]
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(h[:, c:] for h in output.hidden_states)
        if getattr(output, "attentions", None) is not None:
            output.attentions = tuple(a[:, :, c:] for a in output.attentions)
        return output


class ContextPrefix(_ContextHooks):
    """Hooks on ``model.base_model`` that put the applied edits' context in front of every input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._install_hooks()
        self.pieces: list[tuple[object, torch.Tensor, torch.Tensor]] = []  # (owner, demo ids, fact ids)
        self._ids: torch.Tensor | None = None
        self._changes = 0  # counts add/remove, the encoded context's key
        setattr(model, PREFIX_ATTRIBUTE, self)

    @staticmethod
    def of(model: nn.Module) -> "ContextPrefix | None":
        return model.__dict__.get(PREFIX_ATTRIBUTE)

    def add(self, owner: object, demo_ids: torch.Tensor, fact_ids: torch.Tensor) -> None:
        self.pieces.append((owner, demo_ids, fact_ids))
        self._changed()

    def remove(self, owner: object) -> None:
        self.pieces = [p for p in self.pieces if p[0] is not owner]
        self._changed()
        if not self.pieces:
            self._remove_hooks()
            if ContextPrefix.of(self.model) is self:
                delattr(self.model, PREFIX_ATTRIBUTE)

    def _changed(self) -> None:
        self._ids = None
        self._changes += 1
        self._encoded.clear()
        self._banked = None

    def holds(self, owner: object) -> bool:
        return any(p[0] is owner for p in self.pieces)

    @property
    def ids(self) -> torch.Tensor:
        """All demonstrations in application order, then all ``New Fact:`` lines likewise."""
        if self._ids is None:
            self._ids = torch.cat([p[1] for p in self.pieces] + [p[2] for p in self.pieces]).to(model_device(self.model))
        return self._ids

    def _row_contexts(self, batch: int) -> list[tuple[Any, torch.Tensor]]:
        return [(self._changes, self.ids)] * batch


class RowContexts(_ContextHooks):
    """Several IKE edits measured in one batch: each batch row runs with its own case's context.

    The counterpart of :class:`~factedit.evaluation.row_edits.RowEdits` for in-context edits.
    ``per_case[i]`` is the list of (unapplied) :class:`IKEEdit` of case ``i``, whose context is
    theirs as :class:`ContextPrefix` would compose it (an empty list: no context). Before each
    forward pass the caller names the case of every row with :meth:`select`. Each case's context
    is encoded once (its keys and values), and rows of different cases are left-padded to the
    longest context with the padding masked out and their positions given explicitly, so a row
    gives what the model with only its case's edits applied gives, up to float rounding.
    """

    def __init__(self, model: nn.Module, per_case: Sequence[Sequence["IKEEdit"]]) -> None:
        if ContextPrefix.of(model) is not None:
            raise EditError("RowContexts: the model already carries applied IKE edits; revert them first")
        device = model_device(model)
        self.contexts: list[torch.Tensor] = []
        units: dict[tuple[int, ...], int] = {}
        self._unit_of_case: list[int] = []
        for edits in per_case:
            if any(not isinstance(edit, IKEEdit) for edit in edits):
                raise EditError("RowContexts measures IKE edits only")
            key = tuple(id(edit) for edit in edits)
            if key not in units:
                units[key] = len(self.contexts)
                ids = [e.demo_ids for e in edits] + [e.fact_ids for e in edits]
                self.contexts.append(torch.cat(ids).to(device) if ids else torch.zeros(0, dtype=torch.long, device=device))
            self._unit_of_case.append(units[key])
        self._rows: list[int] | None = None
        super().__init__(model)  # the hooks are installed while the block runs

    def select(self, cases: Sequence[int]) -> None:
        """Name the case of each row of the next forward passes (``cases[row]``: an index into ``per_case``)."""
        self._rows = [self._unit_of_case[case] for case in cases]

    def _row_contexts(self, batch: int) -> list[tuple[Any, torch.Tensor]]:
        if self._rows is None or len(self._rows) != batch:
            raise EditError(f"RowContexts: a batch of {batch} rows, but select named {0 if self._rows is None else len(self._rows)}")
        return [(unit, self.contexts[unit]) for unit in self._rows]

    def __enter__(self) -> "RowContexts":
        self._install_hooks()
        return self

    def __exit__(self, *exc) -> None:
        self._remove_hooks()
        self._rows, self._encoded, self._banked = None, {}, None


# --------------------------------------------------------------------------------------------
# The edit
# --------------------------------------------------------------------------------------------


class IKEEdit(Edit):
    """An in-context edit: the demonstrations' and the new facts' token ids.

    ``param_names`` is empty: no weight changes. Saved tensors: ``demo_ids`` and ``fact_ids``;
    ``edit.json``'s ``info`` holds the same as text (``context``) for reading.
    """

    kind = "ike_context"

    def __init__(
        self,
        editor: str,
        demo_ids: torch.Tensor,
        fact_ids: torch.Tensor,
        case_ids: Sequence[str] = (),
        config: dict[str, Any] | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(editor, None, case_ids, config, info)
        self.demo_ids = demo_ids.detach().to("cpu", torch.long).reshape(-1)
        self.fact_ids = fact_ids.detach().to("cpu", torch.long).reshape(-1)
        if not len(self.fact_ids):
            raise EditError("an IKE edit needs the new fact's token ids")
        self._owner: object | None = None

    def num_stored_values(self) -> int:
        return self.demo_ids.numel() + self.fact_ids.numel()

    def row_bytes(self, model: nn.Module) -> int:
        """Bytes of this context's keys and values when measured per row (:class:`RowContexts`)."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        element = next(model.parameters()).element_size()
        return self.num_stored_values() * layers * 2 * kv_heads * head_dim * element

    def _apply(self, model: nn.Module) -> None:
        vocab = model.get_input_embeddings().num_embeddings
        if int(torch.cat([self.demo_ids, self.fact_ids]).max()) >= vocab:
            raise EditError(f"IKE edit: token ids beyond the model's vocabulary of {vocab}; was it made with another tokenizer?")
        prefix = ContextPrefix.of(model) or ContextPrefix(model)
        owner = object()
        prefix.add(owner, self.demo_ids, self.fact_ids)
        self._owner = owner

    def _revert(self, model: nn.Module) -> None:
        prefix = ContextPrefix.of(model)
        if prefix is None or not prefix.holds(self._owner):
            raise EditError("IKE edit: the model's context no longer holds this edit")
        prefix.remove(self._owner)
        self._owner = None

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {"demo_ids": self.demo_ids.contiguous(), "fact_ids": self.fact_ids.contiguous()}

    @classmethod
    def _from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "IKEEdit":
        if set(tensors) != {"demo_ids", "fact_ids"}:
            raise EditError(f"IKE edit: expected tensors demo_ids and fact_ids, got {sorted(tensors)}")
        return cls(meta["editor"], tensors["demo_ids"], tensors["fact_ids"], meta.get("case_ids", ()), meta.get("config"), meta.get("info"))


IKEEdit.row_sharing = RowContexts  # how the runner measures several cases' IKE edits in one batch


# --------------------------------------------------------------------------------------------
# The editor
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def embed_sentences(model: nn.Module, tokenizer: Any, sentences: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Unit-norm mean-pooled final hidden states ``[n, hidden]`` of the model itself (section 3.3's
    sentence embeddings, without an external encoder); any applied IKE context is left out."""
    from ..core.lm import hidden_states

    prefix = ContextPrefix.of(model)
    device = model_device(model)
    out = []
    for start in range(0, len(sentences), batch_size):
        encoded = [list(tokenizer(s)["input_ids"]) for s in sentences[start : start + batch_size]]
        ids, mask = right_pad(encoded, pad_id(tokenizer), device)
        if prefix is not None:
            with prefix.suspended():
                hidden = hidden_states(model, ids, mask)
        else:
            hidden = hidden_states(model, ids, mask)
        m = mask[..., None].to(hidden.dtype)
        out.append(((hidden * m).sum(1) / m.sum(1)).float().cpu())
    if not out:
        return torch.zeros(0, model.get_input_embeddings().embedding_dim)
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


@register_editor("ike", IKEConfig)
class IKE(Editor):
    """IKE (Zheng et al., 2023): the edit is a context of chosen demonstrations and the new facts.

    Several requests in one call give one context: each request's ``k`` nearest demonstrations
    (pooled, without repeats), then each request's copy demonstration, then one ``New Fact:`` line
    per request.
    """

    edits_in_context = True

    supports_batch = True

    def __init__(self) -> None:
        self._pool: tuple[Any, list[str], torch.Tensor] | None = None  # (key, sentences, embeddings)
        self._pool_file: tuple[tuple[str, int], list[EditRequest]] | None = None  # ((pool_path, pool_limit), its records)

    def read_data(self, config: IKEConfig, read_requests) -> None:
        """Keep the records of ``pool_path`` (at most ``pool_limit``) for the pool."""
        if config.pool_path:
            self._pool_file = ((config.pool_path, config.pool_limit), list(read_requests(config.pool_path, config.pool_limit or None)))

    def _pool_key(self, model: nn.Module, config: IKEConfig) -> tuple:
        return (id(model), config.builtin_pool, config.pool_path, config.pool_limit)

    def prepare(self, model: nn.Module, tokenizer: Any, config: IKEConfig) -> None:
        """Read ``pool_path`` (if set) and embed the fixed pool's demonstrations, once per model."""
        key = self._pool_key(model, config)
        if self._pool is not None and self._pool[0] == key:
            return
        facts = builtin_requests() if config.builtin_pool else []
        if config.pool_path:
            if self._pool_file is None or self._pool_file[0] != (config.pool_path, config.pool_limit):
                raise self.data_not_read("pool_path", config.pool_path)
            facts += self._pool_file[1]
        sentences = [d for f in facts for d in demonstrations(f)]
        self._pool = (key, sentences, embed_sentences(model, tokenizer, sentences, config.embed_batch_size))
        logger.info("IKE: %d demonstrations in the pool from %d facts", len(sentences), len(facts))

    def select(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], config: IKEConfig) -> list[str]:
        """Each request's ``k`` nearest demonstrations (cosine), least similar first; no repeats."""
        self.prepare(model, tokenizer, config)
        _, fixed, fixed_emb = self._pool
        chosen: list[str] = []
        if config.k == 0:
            return chosen
        for i, request in enumerate(requests):
            others = [d for j, r in enumerate(requests) if j != i for d in demonstrations(r)]
            sentences = fixed + others
            if not sentences:
                continue
            emb = torch.cat([fixed_emb, embed_sentences(model, tokenizer, others, config.embed_batch_size)]) if others else fixed_emb
            query = embed_sentences(model, tokenizer, [fact_text(request)])[0]
            scores = emb @ query
            top = torch.topk(scores, min(config.k, len(sentences))).indices.tolist()
            for index in reversed(top):  # ascending similarity: the nearest ends next to the query
                if sentences[index] not in chosen:
                    chosen.append(sentences[index])
        return chosen

    def apply(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], config: IKEConfig) -> Edit:
        self.check_requests(requests)
        demos = self.select(model, tokenizer, requests, config)
        demos += [demo(fact_text(r), r.prompt, r.target_new) for r in requests]  # the new facts' copy demonstrations
        demo_text = "".join(demos)
        fact_lines = "".join(f"New Fact: {fact_text(r)}\n" for r in requests)
        demo_ids = torch.tensor(tokenizer(demo_text)["input_ids"], dtype=torch.long)
        fact_ids = torch.tensor(tokenizer(fact_lines, add_special_tokens=False)["input_ids"], dtype=torch.long)
        edit = IKEEdit(
            self.name,
            demo_ids,
            fact_ids,
            [r.case_id for r in requests],
            config.to_dict(),
            {"context": demo_text + fact_lines, "demonstrations": len(demos), "tokens": len(demo_ids) + len(fact_ids)},
        )
        return edit.apply(model)
