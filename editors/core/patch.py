"""Extra FFN neurons added to an MLP's output by a forward hook: the state of T-Patcher and CaliNET.

Both methods add key-value "memory" neurons next to a transformer block's feed-forward network
(Geva et al., 2021, "Transformer Feed-Forward Layers Are Key-Value Memories"): with ``x`` the
MLP's input at a position,

    FFN'(x) = FFN(x) + act(x K^T + b) V,    K: [n, d_in], b: [n], V: [n, d_out]

T-Patcher (Huang et al., 2023) adds one neuron per edit and answer token (:mod:`factedit.editors.t_patcher`); CaliNET
(Dong et al., 2022) adds a block of calibration memory slots (:mod:`editors.calinet`).

The neurons act through a forward hook on the MLP module, so no weight matrix is resized and no
parameter of the model changes. For gated MLPs (LLaMA's ``down(silu(gate(x)) * up(x))``) the
extra neurons are plain, ungated neurons on the MLP input ``x`` (the normed residual stream),
with their own activation; for GPT-2-style MLPs this is exactly one more column of ``c_fc`` and
one more row of ``c_proj``. Removing the hook restores the model's outputs bit for bit, and
several edits stack as several hooks, each adding its own neurons in the order applied.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..base import Edit, EditError, EditRequest, check_finite
from .facts import BUILTIN_POOL
from .lm import join_text
from .targets import get_module

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
}

# Short generic sentences of several registers: inputs on which T-Patcher's patches and WISE's
# side memory must stay silent (see memory_texts).
GENERIC_TEXTS: tuple[str, ...] = (
    "The weather today is cloudy with a chance of rain in the afternoon.",
    "She opened the door and walked slowly into the kitchen.",
    "The company reported higher profits in the third quarter of the year.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "He plays football with his friends every Saturday morning.",
    "The museum is open from nine in the morning until five in the evening.",
    "In 1969, astronauts landed on the Moon for the first time.",
    "The recipe calls for two cups of flour and three eggs.",
    "The city of Tokyo is the capital of Japan.",
    "Photosynthesis converts sunlight into chemical energy in plants.",
    "The train to the airport leaves every fifteen minutes.",
    "My favourite book is a novel about a long journey across the sea.",
    "The president gave a speech about the economy on Tuesday.",
    "Cats are popular pets because they are independent and clean.",
    "The river flows through the valley and into the ocean.",
    "The first language of most people in Brazil is Portuguese.",
)


def fact_prompts() -> list[str]:
    """Factual questions about other subjects: IKE's built-in pool's prompts, paraphrases and
    neighbour prompts (:data:`factedit.editors.core.facts.BUILTIN_POOL`)."""
    return [text for prompt, _, _, _, paraphrase, neighbour in BUILTIN_POOL for text in (prompt, paraphrase, neighbour)]


def memory_texts(requests: Sequence[EditRequest], generic: bool, probes: bool, facts: bool = False) -> list[str]:
    """Texts on which an edit must stay silent (T-Patcher's memory, WISE's irrelevant inputs):
    generic sentences, with ``facts`` the built-in
    fact prompts and, with ``probes``, the requests' locality probes (with answers) and
    neighbourhood prompts; texts that begin with one of the edit prompts are left out."""
    texts = []
    for r in requests if probes else ():
        texts += ["".join(join_text(qa.prompt, qa.answer)) for qa in r.locality]
        texts += list(r.neighborhood_prompts)
    if generic:
        texts += list(GENERIC_TEXTS)
    if facts:
        texts += fact_prompts()
    # A text that begins with an edit prompt holds that prompt's own query: it cannot be memory.
    prompts = [r.prompt for r in requests]
    return [t for t in dict.fromkeys(texts) if not any(t.startswith(p) for p in prompts)]


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")


def module_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states an MLP module is called with (first positional or keyword argument)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value
    raise EditError("cannot find the hidden states among the MLP module's inputs")


def add_to_output(output: Any, delta: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return output + delta
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return type(output)((output[0] + delta, *output[1:]))
    raise EditError(f"cannot add to an MLP output of type {type(output).__name__}")


def neuron_output(x: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None, values: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(x K^T + b) V`` for hidden states ``x [..., d_in]``."""
    z = x @ keys.T
    if bias is not None:
        z = z + bias
    return ACTIVATIONS[activation](z) @ values


class NeuronHook:
    """A forward hook adding ``act(x K^T + b) V`` to an MLP module's output.

    ``fn(x)`` may replace the computation (training uses it to keep the graph and record the
    pre-activations); by default the stored tensors are used, cast to the hidden states' dtype.
    """

    def __init__(self, keys: torch.Tensor, bias: torch.Tensor | None, values: torch.Tensor, activation: str) -> None:
        self.keys, self.bias, self.values, self.activation = keys, bias, values, activation
        self.owner: Edit | None = None  # the applied edit these neurons belong to

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        x = module_input(args, kwargs)
        cast = lambda t: None if t is None else t.to(device=x.device, dtype=x.dtype)
        return add_to_output(output, neuron_output(x, cast(self.keys), cast(self.bias), cast(self.values), self.activation))


class FFNPatchEdit(Edit):
    """Neurons added to the MLPs of some blocks; applying hooks them in, reverting unhooks them.

    ``patches`` maps an MLP module name to its ``{"keys", "values"[, "bias"]}`` tensors; any
    further tensors (``extras``, e.g. the queries T-Patcher trained on) are saved alongside.
    ``param_names`` is empty: no parameter of the model changes. Saved as tensors
    ``<module>::keys``, ``<module>::bias``, ``<module>::values`` and ``extra::<name>``, with the
    activation in ``info["activation"]``.
    """

    kind = "ffn_patch"

    def __init__(
        self,
        editor: str,
        patches: dict[str, dict[str, torch.Tensor]],
        activation: str,
        case_ids: Sequence[str] = (),
        config: dict[str, Any] | None = None,
        info: dict[str, Any] | None = None,
        extras: dict[str, torch.Tensor] | None = None,
    ) -> None:
        info = dict(info or {})
        info["activation"] = activation
        super().__init__(editor, None, case_ids, config, info)
        check_activation(activation)
        if not patches:
            raise EditError(f"{editor} edit: no neurons")
        for module, parts in patches.items():
            if set(parts) - {"keys", "values", "bias"} or "keys" not in parts or "values" not in parts:
                raise EditError(f"{editor} edit of {module}: expected tensors keys, values and optionally bias; got {sorted(parts)}")
            n = parts["keys"].shape[0]
            if parts["values"].shape[0] != n or ("bias" in parts and parts["bias"].shape != (n,)):
                raise EditError(f"{editor} edit of {module}: keys, bias and values disagree on the number of neurons")
        self.patches = {m: {k: t.detach().to("cpu", torch.float32) for k, t in parts.items()} for m, parts in patches.items()}
        self.extras = {k: t.detach().to("cpu") for k, t in (extras or {}).items()}
        self.activation = activation
        self._handles: list[Any] = []
        self.hooks: dict[str, NeuronHook] = {}

    def num_neurons(self) -> int:
        return sum(parts["keys"].shape[0] for parts in self.patches.values())

    def num_stored_values(self) -> int:
        return sum(t.numel() for parts in self.patches.values() for t in parts.values())

    def _apply(self, model: nn.Module) -> None:
        hooks = {}
        for module_name, parts in self.patches.items():
            module = get_module(model, module_name)
            device = next(module.parameters()).device
            check_finite(f"{self.editor} edit of {module_name}", parts)
            on = {k: t.to(device) for k, t in parts.items()}
            hooks[module_name] = NeuronHook(on["keys"], on.get("bias"), on["values"], self.activation)
            hooks[module_name].owner = self
        # Only touch the model once every patch has been checked.
        for module_name, hook in hooks.items():
            self._handles.append(get_module(model, module_name).register_forward_hook(hook, with_kwargs=True))
        self.hooks = hooks

    def _revert(self, model: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.hooks = [], {}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"{m}::{part}": t.contiguous() for m, parts in self.patches.items() for part, t in parts.items()}
        out.update({f"extra::{k}": t.contiguous() for k, t in self.extras.items()})
        return out

    @classmethod
    def _from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "FFNPatchEdit":
        patches: dict[str, dict[str, torch.Tensor]] = {}
        extras: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            name, _, part = key.rpartition("::")
            if name == "extra":
                extras[part] = tensor
            elif part in ("keys", "values", "bias") and name:
                patches.setdefault(name, {})[part] = tensor
            else:
                raise EditError(f"unexpected tensor {key!r} in a {meta.get('kind')} edit")
        info = dict(meta.get("info") or {})
        if "activation" not in info:
            raise EditError(f"{meta.get('kind')} edit: field 'info.activation' is missing")
        return cls(meta["editor"], patches, info["activation"], meta.get("case_ids", ()), meta.get("config"), info, extras)


def patch_hooks(module: nn.Module) -> list[NeuronHook]:
    """The neuron hooks applied edits have put on ``module``, in the order they run."""
    return [hook for hook in module._forward_hooks.values() if isinstance(hook, NeuronHook)]


