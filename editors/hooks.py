"""Context-managed tracing and editing of module inputs and outputs.

Locate-then-edit methods read what flows into a module (ROME's keys are the inputs of an MLP's
output projection) and replace what flows out of it (ROME's value optimisation adds a vector to
an MLP's output at one position). Both are done here with forward hooks that are removed when
the ``with`` block ends, also when it ends with an exception, so a model is never left hooked.

    with trace(model, ["model.layers.3.mlp.down_proj"], inputs=True) as traced:
        model(**batch)
    keys = traced["model.layers.3.mlp.down_proj"].input      # [batch, seq, d_in]

    with edit_output(model, "model.layers.3.mlp", lambda out: out + delta):
        model(**batch)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .targets import get_module


@dataclass
class Traced:
    """What one module saw on its last forward call while traced."""

    input: torch.Tensor | None = None
    output: torch.Tensor | None = None
    calls: int = 0


def _first_tensor(value: Any) -> torch.Tensor:
    """A module's main tensor: the value itself, or the first element of a tuple output."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"cannot find a tensor in a module input/output of type {type(value).__name__}")


def _replace_first(value: Any, tensor: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return tensor
    return type(value)((tensor, *value[1:]))


@contextlib.contextmanager
def trace(
    model: nn.Module, module_names: Sequence[str], inputs: bool = True, outputs: bool = False, detach: bool = True
) -> Iterator[dict[str, Traced]]:
    """Record the first positional input and/or the (first) output of each named module.

    ``detach=False`` keeps the autograd graph, for losses that read traced values.
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
                record.input = keep(_first_tensor(args))
            if outputs:
                record.output = keep(_first_tensor(output))

        return hook

    try:
        for name in module_names:
            handles.append(get_module(model, name).register_forward_hook(make_hook(name)))
        yield traced
    finally:
        for handle in handles:
            handle.remove()


class StopForward(Exception):
    """Raised by :func:`run_until_input` once the wanted input is captured."""


def run_until_input(model: nn.Module, module_name: str, **inputs: Any) -> torch.Tensor:
    """The first positional input of ``module_name``, running the model only as far as that module.

    Whatever comes after the module (later layers, the unembedding) is skipped, which makes
    statistics of an early layer's keys many times cheaper than a full forward pass.
    """
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple) -> None:
        captured.append(_first_tensor(args).detach())
        raise StopForward

    handle = get_module(model, module_name).register_forward_pre_hook(hook)
    try:
        model(**inputs)
    except StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"module {module_name!r} was not called during the forward pass")
    return captured[0]


@contextlib.contextmanager
def edit_output(model: nn.Module, module_name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the (first) output tensor of ``module_name`` by ``fn(output)`` inside the block."""

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        return _replace_first(output, fn(_first_tensor(output)))

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
