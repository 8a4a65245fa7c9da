"""Forward passes that recompute only what an edit at one position can change.

Value optimisation in ROME and MEMIT adds a trainable vector to one module's output at one
position per sequence (the subject's last token) and runs the model many times. Under causal
attention nothing before that position depends on the vector, and nothing below the edited layer
does either. :class:`FrozenPrefix` therefore splits each sequence at that position:

* the **prefix** (tokens before the split) runs once, and its keys and values are kept in a KV
  cache for every layer;
* the **suffix** (the split token and everything after it) runs once without the edit, to
  record the hidden states that enter the edited layer;
* every later pass runs only the suffix, only through the edited layer and those above it:
  the blocks below are replaced, for the duration of the pass, by stand-ins that return the
  recorded hidden states.

Prefixes are left-padded and suffixes right-padded, so that the split falls in the same column
(suffix column 0) for every row. Position ids are passed explicitly, so padding does not shift
positions.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .hooks import replace_first, trace
from .lm import cache_kwargs, cache_of, logits_at, model_device, unembed
from .patch import add_to_output, module_input
from .targets import ModelTargets, get_module


class _Recorded(nn.Module):
    """Stands in for a transformer block: returns recorded hidden states, ignores its inputs."""

    def __init__(self, template: Any, hidden: torch.Tensor) -> None:
        super().__init__()
        self.template = template
        self.hidden = hidden

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return replace_first(self.template, self.hidden) if not isinstance(self.template, torch.Tensor) else self.hidden


class FrozenPrefix:
    """A batch of token sequences, each split at ``splits[i]``; see the module docstring.

    ``layer`` is the first block whose computation may change (the edited one); blocks below it
    are never run again after construction. :meth:`hidden` returns the final hidden states
    (after the final norm) of the suffix positions, ``[rows, suffix_length, d_model]``.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: ModelTargets,
        sequences: Sequence[Sequence[int]],
        splits: Sequence[int],
        layer: int,
        pad_id: int,
        record: Sequence[str] = (),
    ) -> None:
        if len(sequences) != len(splits):
            raise ValueError("one split per sequence is needed")
        for seq, split in zip(sequences, splits):
            if not 0 <= split < len(seq):
                raise ValueError(f"split {split} is outside a sequence of length {len(seq)}")
        self.model = model
        self.body = model.base_model
        self.layer = layer
        self.blocks = get_module(model, targets.layers)
        device = model_device(model)
        prefix_len = max(splits)
        suffix_len = max(len(s) - p for s, p in zip(sequences, splits))
        n = len(sequences)
        prefix_ids = torch.full((n, prefix_len), pad_id, dtype=torch.long)
        prefix_mask = torch.zeros((n, prefix_len), dtype=torch.long)
        suffix_ids = torch.full((n, suffix_len), pad_id, dtype=torch.long)
        suffix_mask = torch.zeros((n, suffix_len), dtype=torch.long)
        for i, (seq, split) in enumerate(zip(sequences, splits)):
            if split:
                prefix_ids[i, prefix_len - split :] = torch.tensor(seq[:split])
                prefix_mask[i, prefix_len - split :] = 1
            suffix_ids[i, : len(seq) - split] = torch.tensor(seq[split:])
            suffix_mask[i, : len(seq) - split] = 1
        self.prefix_len, self.suffix_len = prefix_len, suffix_len
        self.suffix_lengths = torch.tensor([len(s) - p for s, p in zip(sequences, splits)])
        self.suffix_ids = suffix_ids.to(device)
        self.mask = torch.cat([prefix_mask, suffix_mask], dim=1).to(device)
        split_t = torch.tensor(list(splits))
        self.suffix_positions = (split_t[:, None] + torch.arange(suffix_len)[None, :]).to(device)

        self._prefix_kv = None
        with torch.no_grad():
            self.cache = None
            if prefix_len:
                prefix_positions = (prefix_mask.cumsum(1) - 1).clamp(min=0).to(device)
                out = self.body(
                    input_ids=prefix_ids.to(device),
                    attention_mask=prefix_mask.to(device),
                    position_ids=prefix_positions,
                    use_cache=True,
                )
                self.cache = cache_of(out)
            # The unedited suffix pass: records what enters the edited block, and whatever the
            # caller asked for (e.g. the edited module's inputs and outputs).
            with _block_input(self.blocks[layer]) as entering, trace(model, list(record), inputs=True, outputs=True) as traced:
                final = self._run()
            self.recorded = traced
            self.unedited_hidden = final
            self._entering = entering[0]
            self._template = entering[1]
            self._crop()

    # -- running -------------------------------------------------------------------------------
    def _run(self) -> torch.Tensor:
        out = self.body(
            input_ids=self.suffix_ids,
            attention_mask=self.mask,
            position_ids=self.suffix_positions,
            **cache_kwargs(self.body, self.cache),
            use_cache=self.cache is not None,
        )
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    def _crop(self) -> None:
        """Put back the prefix-only cache: a pass appends the suffix's keys and values (with their
        autograd history) to the cache of every block that ran."""
        if self.cache is None:
            return
        if self._prefix_kv is None:
            self._prefix_kv = [(cached.keys[..., : self.prefix_len, :], cached.values[..., : self.prefix_len, :]) for cached in self.cache.layers]
        for cached, (keys, values) in zip(self.cache.layers, self._prefix_kv):
            cached.keys, cached.values = keys, values

    def hidden(self) -> torch.Tensor:
        """Final hidden states of the suffix positions, running only the blocks from ``layer`` on.

        Call it inside the caller's hooks (e.g. :func:`editors.hooks.edit_output` on the edited
        module, adding the trainable vector at suffix column 0); gradients flow as usual.
        """
        try:
            with _blocks_recorded(self.blocks, self.layer, self._template, self._entering):
                return self._run()
        finally:
            self._crop()

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` of the batch (e.g. the requests still being optimised)."""
        rows = rows.to(self.suffix_ids.device)
        self.suffix_ids = self.suffix_ids[rows]
        self.mask = self.mask[rows]
        self.suffix_positions = self.suffix_positions[rows]
        self.suffix_lengths = self.suffix_lengths[rows.cpu()]
        self._entering = self._entering[rows]
        if self._prefix_kv is not None:
            self._prefix_kv = [(keys[rows], values[rows]) for keys, values in self._prefix_kv]
            self._crop()


@contextlib.contextmanager
def _blocks_recorded(blocks: nn.ModuleList, layer: int, template: Any, hidden: torch.Tensor) -> Iterator[None]:
    """Blocks ``0 .. layer-1`` replaced by one stand-in each that returns ``hidden``, inside the block."""
    originals = [blocks[i] for i in range(layer)]
    try:
        for i in range(layer):
            blocks[i] = _Recorded(template, hidden)
        yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


@contextlib.contextmanager
def frozen_below(model: nn.Module, targets: ModelTargets, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Iterator[None]:
    """Inside the block, forward passes run only blocks ``layer`` and above.

    For editors that train something at block ``layer`` or higher (a codebook value, a patch
    neuron, a side memory) on one fixed batch with the weights frozen: the blocks below compute
    the same thing on every step. They run once here, on ``input_ids``/``attention_mask``, and
    inside the block each returns what entered block ``layer`` on that pass. Only passes on
    exactly that batch are valid inside the block (a pass of another shape raises; one of the
    same shape but other tokens would be wrong). Results equal full passes: the upper blocks see
    the same inputs.
    """
    with BelowRecorded(model, targets, layer, [(input_ids, attention_mask)]).replaying(0):
        yield


class BelowRecorded:
    """:func:`frozen_below` for several batches: each batch's input to block ``layer`` is
    recorded once at construction, and :meth:`replaying` ``(i)`` is a block inside which forward
    passes on batch ``i`` run only blocks ``layer`` and above. For a training set split into
    batches of similar lengths (less padding) whose gradients are accumulated on every step."""

    def __init__(self, model: nn.Module, targets: ModelTargets, layer: int, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.blocks = get_module(model, targets.layers)
        self.layer = layer
        self.records: list[tuple[Any, torch.Tensor | None]] = []
        for input_ids, attention_mask in batches:
            if layer == 0:
                self.records.append((None, None))
                continue
            with torch.no_grad(), _block_input(self.blocks[layer]) as entering:
                model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            hidden, template = entering
            self.records.append((template, hidden))

    @contextlib.contextmanager
    def replaying(self, i: int) -> Iterator[None]:
        template, hidden = self.records[i]
        if hidden is None:
            yield
            return
        shape = tuple(hidden.shape[:2])

        def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
            given = args[0] if args else kwargs.get("hidden_states")
            if given is not None and tuple(given.shape[:2]) != shape:
                raise RuntimeError(f"the lower blocks' output is recorded for a batch of shape {shape}, not {tuple(given.shape[:2])}")

        with _blocks_recorded(self.blocks, self.layer, template, hidden):
            handle = self.blocks[0].register_forward_pre_hook(check, with_kwargs=True)
            try:
                yield
            finally:
                handle.remove()


class TopMLPReadout:
    """Logits at chosen positions when only the top block's MLP output changes.

    Neurons added to the MLP of the model's last block (CaliNET's slots there) change nothing
    that any block reads: attention in the last block runs before its MLP, and no block follows.
    At each position the final hidden state is then ``block_out + extra(x)``, with ``x`` the
    MLP's input and ``block_out`` the block's output without the extra neurons, both fixed. One
    pass per batch records them at the positions that matter (``rows``/``cols``); afterwards
    :meth:`logits` costs only the final norm and the unembedding of those positions, whatever
    the sequences' lengths. :attr:`exact` says whether a check pass, with random neurons hooked
    onto that MLP, matched a full forward pass: architectures that transform the MLP's output
    before adding it to the residual stream (a norm after the MLP, as in Gemma 2) do not, and
    their callers must run the full model instead.
    """

    def __init__(self, model: nn.Module, targets: ModelTargets, batches: Sequence[Any]) -> None:
        self.model = model
        top = len(get_module(model, targets.layers)) - 1
        self.mlp_name, self.block_name = targets.layer("mlp", top), f"{targets.layers}.{top}"
        self.norm = get_module(model, targets.final_norm)
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        for batch in batches:
            with torch.no_grad(), trace(model, [self.mlp_name, self.block_name], inputs=True, outputs=True) as traced:
                model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            self.inputs.append(traced[self.mlp_name].input[batch.rows, batch.cols])
            self.outputs.append(traced[self.block_name].output[batch.rows, batch.cols])
        self.exact = self._check(batches[0]) if batches else True

    def logits(self, i: int, extra: Any) -> torch.Tensor:
        """Logits ``[positions, vocab]`` of batch ``i`` with ``extra(x)`` added to the top MLP's output."""
        y = self.outputs[i]
        return unembed(self.model, self.norm(y + extra(self.inputs[i]).to(y.dtype)))

    def _check(self, batch: Any) -> bool:
        generator = torch.Generator().manual_seed(0)
        d_in, d_out = self.inputs[0].shape[-1], self.outputs[0].shape[-1]
        weight = (torch.randn(d_in, d_out, generator=generator) * d_in**-0.5).to(self.outputs[0])
        extra = lambda x: torch.tanh(x @ weight)

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            return add_to_output(output, extra(module_input(args, kwargs)))

        handle = get_module(self.model, self.mlp_name).register_forward_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                full = logits_at(self.model, batch)
        finally:
            handle.remove()
        with torch.no_grad():
            return bool(torch.allclose(self.logits(0, extra), full, rtol=1e-4, atol=1e-4))


@contextlib.contextmanager
def _block_input(block: nn.Module) -> Iterator[list]:
    """Capture the hidden states entering ``block`` and the structure of its output."""
    captured: list = [None, None]

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        captured[0] = hidden.detach()

    def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
        captured[1] = output

    handles = [block.register_forward_pre_hook(pre_hook, with_kwargs=True), block.register_forward_hook(post_hook)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
