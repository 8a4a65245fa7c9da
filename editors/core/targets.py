"""Where things live inside each architecture, keyed by ``model.config.model_type``.

Editors name what they edit by role ("the MLP output projection of layer 5"), never by a
hard-coded module path; this table turns a role into a module name. A user whose architecture is
missing, or who wants other modules, passes overrides::

    targets = get_targets(model, overrides={"mlp_out": "model.layers.{}.mlp.w2"})

Weight orientation is decided by module type (GPT-2's ``Conv1D`` stores ``[in, out]``, a
``torch.nn.Linear`` stores ``[out, in]``), never by comparing tensor shapes, which is ambiguous
for square matrices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from ..base import ParamDelta


@dataclass(frozen=True)
class ModelTargets:
    """Module-name templates for one architecture; ``{}`` stands for the layer index."""

    layers: str  # the list of transformer blocks
    mlp: str  # the whole MLP of a block
    mlp_in: str  # MLP input (up) projection
    mlp_out: str  # MLP output (down) projection: the "value" matrix of locate-then-edit methods
    attn: str  # the whole attention of a block
    attn_out: str  # attention output projection
    final_norm: str  # norm before the unembedding
    unembed: str  # output embedding (vocabulary projection)
    embed: str  # input token embedding
    mlp_gate: str | None = None  # gated MLPs (LLaMA family) only

    def layer(self, role: str, index: int) -> str:
        template = getattr(self, role)
        if template is None:
            raise KeyError(f"this architecture has no {role!r} module")
        return template.format(index)


_LLAMA_LIKE = ModelTargets(
    layers="model.layers",
    mlp="model.layers.{}.mlp",
    mlp_in="model.layers.{}.mlp.up_proj",
    mlp_gate="model.layers.{}.mlp.gate_proj",
    mlp_out="model.layers.{}.mlp.down_proj",
    attn="model.layers.{}.self_attn",
    attn_out="model.layers.{}.self_attn.o_proj",
    final_norm="model.norm",
    unembed="lm_head",
    embed="model.embed_tokens",
)

_GPT2 = ModelTargets(
    layers="transformer.h",
    mlp="transformer.h.{}.mlp",
    mlp_in="transformer.h.{}.mlp.c_fc",
    mlp_out="transformer.h.{}.mlp.c_proj",
    attn="transformer.h.{}.attn",
    attn_out="transformer.h.{}.attn.c_proj",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    embed="transformer.wte",
)

_BLOOM_FALCON = ModelTargets(
    layers="transformer.h",
    mlp="transformer.h.{}.mlp",
    mlp_in="transformer.h.{}.mlp.dense_h_to_4h",
    mlp_out="transformer.h.{}.mlp.dense_4h_to_h",
    attn="transformer.h.{}.self_attention",
    attn_out="transformer.h.{}.self_attention.dense",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    embed="transformer.word_embeddings",
)

TARGETS: dict[str, ModelTargets] = {
    "gpt2": _GPT2,
    "gptj": ModelTargets(
        layers="transformer.h",
        mlp="transformer.h.{}.mlp",
        mlp_in="transformer.h.{}.mlp.fc_in",
        mlp_out="transformer.h.{}.mlp.fc_out",
        attn="transformer.h.{}.attn",
        attn_out="transformer.h.{}.attn.out_proj",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        embed="transformer.wte",
    ),
    "gpt_neox": ModelTargets(
        layers="gpt_neox.layers",
        mlp="gpt_neox.layers.{}.mlp",
        mlp_in="gpt_neox.layers.{}.mlp.dense_h_to_4h",
        mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        attn="gpt_neox.layers.{}.attention",
        attn_out="gpt_neox.layers.{}.attention.dense",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",  # transformers < 5 named it "embed_out": pass overrides={"unembed": "embed_out"}
        embed="gpt_neox.embed_in",
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "opt": ModelTargets(
        layers="model.decoder.layers",
        mlp="model.decoder.layers.{}",  # OPT's MLP is not a submodule: fc1/fc2 sit on the block
        mlp_in="model.decoder.layers.{}.fc1",
        mlp_out="model.decoder.layers.{}.fc2",
        attn="model.decoder.layers.{}.self_attn",
        attn_out="model.decoder.layers.{}.self_attn.out_proj",
        final_norm="model.decoder.final_layer_norm",
        unembed="lm_head",
        embed="model.decoder.embed_tokens",
    ),
    "phi": ModelTargets(
        layers="model.layers",
        mlp="model.layers.{}.mlp",
        mlp_in="model.layers.{}.mlp.fc1",
        mlp_out="model.layers.{}.mlp.fc2",
        attn="model.layers.{}.self_attn",
        attn_out="model.layers.{}.self_attn.dense",
        final_norm="model.final_layernorm",
        unembed="lm_head",
        embed="model.embed_tokens",
    ),
    "bloom": _BLOOM_FALCON,
    "falcon": _BLOOM_FALCON,
}


class UnknownArchitectureError(KeyError):
    pass


def get_targets(model: nn.Module, overrides: Mapping[str, str] | None = None) -> ModelTargets:
    """The module templates for ``model``, with ``overrides`` (role -> template) applied.

    An architecture missing from the table works when ``overrides`` names every role.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    overrides = dict(overrides or {})
    unknown_roles = set(overrides) - {f.name for f in dataclasses.fields(ModelTargets)}
    if unknown_roles:
        raise ValueError(f"unknown target roles {sorted(unknown_roles)}; roles are {[f.name for f in dataclasses.fields(ModelTargets)]}")
    base = TARGETS.get(model_type)
    if base is None:
        required = [f.name for f in dataclasses.fields(ModelTargets) if f.default is dataclasses.MISSING]
        missing = [r for r in required if r not in overrides]
        if missing:
            raise UnknownArchitectureError(
                f"model_type {model_type!r} is not in the target table (known: {', '.join(sorted(TARGETS))}). "
                f"Pass module templates for it, e.g. targets={{'mlp_out': 'model.layers.{{}}.mlp.down_proj', ...}}; "
                f"missing roles: {missing}"
            )
        return ModelTargets(**overrides)
    return dataclasses.replace(base, **overrides) if overrides else base


def num_layers(model: nn.Module, targets: ModelTargets) -> int:
    return len(get_module(model, targets.layers))


def resolve_layer(model: nn.Module, targets: ModelTargets, layer: int, what: str = "layer") -> int:
    """The block index ``layer`` names (negative counts from the top); ``what`` names the setting
    in the error raised when it is out of range."""
    depth = num_layers(model, targets)
    index = layer + depth if layer < 0 else layer
    if not 0 <= index < depth:
        raise ValueError(f"{what} {layer} is out of range for a model with {depth} blocks: use 0 to {depth - 1}, or -1 to -{depth} counted from the last")
    return index


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise KeyError(f"{type(model).__name__} has no module {name!r} ({err}); check the target templates") from None


def get_parameter_name(model: nn.Module, module_name: str, param: str = "weight") -> str:
    get_module(model, module_name)  # raises a clear error if absent
    return f"{module_name}.{param}"


def is_transposed(module: nn.Module) -> bool:
    """True when ``module.weight`` is stored ``[in_features, out_features]`` (GPT-2's Conv1D)."""
    if isinstance(module, nn.Linear):
        return False
    if type(module).__name__ == "Conv1D":
        return True
    raise TypeError(f"cannot tell the weight orientation of {type(module).__name__}; expected nn.Linear or Conv1D")


def weight_as_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight viewed as ``[out_features, in_features]`` (a view, not a copy)."""
    return module.weight.T if is_transposed(module) else module.weight


def delta_to_param_layout(module: nn.Module, delta_out_in: torch.Tensor) -> torch.Tensor:
    """Convert a ``[out, in]`` update into the layout of ``module.weight``."""
    return delta_out_in.T if is_transposed(module) else delta_out_in


def factors_in_param_layout(module, left: torch.Tensor, right: torch.Tensor) -> ParamDelta:
    """A low-rank update ``left @ right`` of the ``[out, in]`` weight, in ``module.weight``'s layout."""
    if is_transposed(module):
        return ParamDelta(left=right.T.contiguous(), right=left.T.contiguous())
    return ParamDelta(left=left.contiguous(), right=right.contiguous())
