"""Context-managed tracing and editing of module inputs and outputs.

Locate-then-edit methods read what flows into a module (ROME's keys are the inputs of an MLP's
output projection) and replace what flows out of it (ROME's value optimisation adds a vector to
an MLP's output at one position). Both are done here with forward hooks that are removed when
the ``with`` block ends, also when it ends with an exception, so a model is never left hooked.

    with trace(model, ["model.layers.3.mlp.down_proj"], inputs=True, stop=True) as traced:
        model(**batch)                                         # stops after that module
    keys = traced["model.layers.3.mlp.down_proj"].input      # [batch, seq, d_in]

    with edit_output(model, "model.layers.3.mlp", lambda out: out + delta):
        model(**batch)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch import nn

from factedit.batches import pad_id, right_pad

from ..base import EditError
from .lm import model_device
from .targets import get_module


@dataclass
class Traced:
    """What one module saw on its last forward call while traced."""

    input: torch.Tensor | None = None
    output: torch.Tensor | None = None
    calls: int = 0


def first_tensor(value: Any) -> torch.Tensor:
    """A module's main tensor: the value itself, or the first element of a tuple output."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"cannot find a tensor in a module input/output of type {type(value).__name__}")


def replace_first(value: Any, tensor: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return tensor
    return type(value)((tensor, *value[1:]))


@contextlib.contextmanager
def trace(
    model: nn.Module, module_names: Sequence[str], inputs: bool = True, outputs: bool = False, detach: bool = True, stop: bool = False
) -> Iterator[dict[str, Traced]]:
    """Record the first positional input and/or the (first) output of each named module.

    ``detach=False`` keeps the autograd graph, for losses that read traced values. ``stop=True``
    ends the forward pass as soon as every named module has run (the block's remaining statements
    are skipped, as with ROME's ``nethook.Trace(stop=True)``): later layers and the unembedding are
    not computed, which makes statistics of an early layer's keys many times cheaper. A module
    that never ran has ``calls == 0``.
    """
    traced = {name: Traced() for name in module_names}
    handles = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach() if detach else tensor

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            record = traced[name]
            record.calls += 1
            if inputs:
                record.input = keep(first_tensor(args))
            if outputs:
                record.output = keep(first_tensor(output))
            if stop and all(traced[other].calls for other in module_names):
                raise StopForward

        return hook

    try:
        for name in module_names:
            handles.append(get_module(model, name).register_forward_hook(make_hook(name)))
        try:
            yield traced
        except StopForward:
            if not stop:
                raise
    finally:
        for handle in handles:
            handle.remove()


class StopForward(Exception):
    """Raised inside a traced forward pass once every module of ``trace(..., stop=True)`` has run."""


@contextlib.contextmanager
def edit_output(model: nn.Module, module_name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the (first) output tensor of ``module_name`` by ``fn(output)`` inside the block."""

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        return replace_first(output, fn(first_tensor(output)))

    handle = get_module(model, module_name).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def edit_input(model: nn.Module, module_name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the first positional input of ``module_name`` by ``fn(input)`` inside the block."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        return (fn(args[0]), *args[1:])

    handle = get_module(model, module_name).register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def weights_version(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """A value that changes whenever a parameter of ``model`` is written in place or replaced: for
    caches of activations that hold only while the weights do."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def module_inputs(model: nn.Module, module_name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The first positional input ``[batch, seq, d]`` of ``module_name`` (float32, no gradient).

    Runs the model's body only: nothing the unembedding computes is needed."""
    with torch.no_grad(), trace(model, [module_name], inputs=True) as traced:
        model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return traced[module_name].input.float()


def inputs_at_every_token(model: nn.Module, tokenizer: Any, module_name: str, texts: Sequence[str]) -> torch.Tensor:
    """The inputs of ``module_name`` at every (non-padding) position of ``texts``: ``[n_positions, d]``."""
    device = model_device(model)
    ids, mask = right_pad([tokenizer(t)["input_ids"] for t in texts], pad_id(tokenizer), device)
    hidden = module_inputs(model, module_name, ids, mask)
    return hidden[mask.bool()]


class ModuleMemory:
    """Edits that act through one forward hook on one module, kept in the order they were applied.

    Memory editors (GRACE's codebook, WISE's side memory) keep one of these per module, in
    ``model.__dict__[attribute]``. What the hook reads is derived from :attr:`edits` alone and
    rebuilt after every change (:meth:`changed`), so removing an edit gives exactly what applying
    the others in the same order gives; the hook is removed with the last edit. Subclasses set
    ``attribute`` and ``label`` and implement ``_hook`` (with ``kwargs`` when ``with_kwargs``).
    """

    attribute: ClassVar[str]
    label: ClassVar[str]
    with_kwargs: ClassVar[bool] = False

    def __init__(self, model: nn.Module, module_name: str) -> None:
        self.model, self.module_name = model, module_name
        self.edits: list[Any] = []
        self._handle = get_module(model, module_name).register_forward_hook(self._hook, with_kwargs=self.with_kwargs)
        model.__dict__.setdefault(self.attribute, {})[module_name] = self

    def _hook(self, *args: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def of(cls, model: nn.Module, module_name: str) -> "ModuleMemory | None":
        return model.__dict__.get(cls.attribute, {}).get(module_name)

    @classmethod
    def attach(cls, model: nn.Module, module_name: str, edit: Any) -> "ModuleMemory":
        """Add ``edit`` to the model's memory at ``module_name``, creating the memory if needed."""
        memory = cls.of(model, module_name) or cls(model, module_name)
        if any(e.uid == edit.uid for e in memory.edits):
            raise EditError(f"{edit.editor} edit {edit.uid} is already in this model's {cls.label}")
        memory.edits.append(edit)
        memory.changed()
        return memory

    @classmethod
    def detach(cls, model: nn.Module, module_name: str, edit: Any) -> None:
        """Remove ``edit`` from the model's memory at ``module_name``; the last one removes the hook."""
        memory = cls.of(model, module_name)
        if memory is None or not any(e is edit for e in memory.edits):
            raise EditError(f"{edit.editor} edit: the model's {cls.label} no longer holds this edit")
        memory.edits = [e for e in memory.edits if e is not edit]
        memory.changed()
        if not memory.edits:
            memory._handle.remove()
            memories = model.__dict__.get(cls.attribute, {})
            memories.pop(module_name, None)
            if not memories:
                model.__dict__.pop(cls.attribute, None)

    def changed(self) -> None:
        """Forget whatever was derived from the edits (they changed)."""
