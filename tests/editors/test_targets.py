"""The target table against tiny random models of every architecture it lists (no downloads)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from factedit.editors.core.targets import (
    TARGETS,
    ModelTargets,
    UnknownArchitectureError,
    delta_to_param_layout,
    get_module,
    get_parameter_name,
    get_targets,
    is_transposed,
    num_layers,
    weight_as_out_in,
)

NUM_LAYERS = 2
HIDDEN = 32

TINY = dict(
    vocab_size=64,
    hidden_size=HIDDEN,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# settings whose names differ by architecture, or whose defaults would make the model large
EXTRA = {
    "gpt2": dict(n_inner=64),
    "gptj": dict(n_inner=64, rotary_dim=8),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=HIDDEN),
    "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16),
}

PROJECTIONS = ("mlp_in", "mlp_gate", "mlp_out", "attn_out")
PER_LAYER_ROLES = ("mlp", "mlp_in", "mlp_gate", "mlp_out", "attn", "attn_out")


def build_tiny(model_type: str) -> nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY, **EXTRA.get(model_type, {})})
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module", params=sorted(TARGETS))
def tiny(request):
    """(model_type, model) for each architecture in the table, built once per module."""
    return request.param, build_tiny(request.param)


def _roles(targets: ModelTargets, names) -> list[str]:
    return [role for role in names if getattr(targets, role) is not None]


def test_model_type_matches_table_key(tiny):
    model_type, model = tiny
    assert model.config.model_type == model_type
    assert get_targets(model) is TARGETS[model_type]


def test_every_template_resolves(tiny):
    _, model = tiny
    targets = get_targets(model)
    for field in dataclasses.fields(ModelTargets):
        template = getattr(targets, field.name)
        if template is None:
            continue
        for index in range(NUM_LAYERS):
            name = targets.layer(field.name, index)
            assert isinstance(get_module(model, name), nn.Module), name
            assert get_parameter_name(model, name) == f"{name}.weight"


def test_layer_templates_index_the_layer_list(tiny):
    """``{}`` is the index into ``layers``: layer i's modules live inside ``layers[i]``."""
    _, model = tiny
    targets = get_targets(model)
    layers = get_module(model, targets.layers)
    assert isinstance(layers, nn.ModuleList)
    for role in _roles(targets, PER_LAYER_ROLES):
        for index in range(NUM_LAYERS):
            name = targets.layer(role, index)
            # OPT's "mlp" is the block itself: its fc1/fc2 sit directly on the decoder layer
            assert name == f"{targets.layers}.{index}" or name.startswith(f"{targets.layers}.{index}."), name
            module = get_module(model, name)
            assert any(module is m for m in layers[index].modules()), name
    # projections sit inside their block's MLP / attention
    for index in range(NUM_LAYERS):
        for role, parent in (("mlp_in", "mlp"), ("mlp_gate", "mlp"), ("mlp_out", "mlp"), ("attn_out", "attn")):
            if getattr(targets, role) is not None:
                assert targets.layer(role, index).startswith(targets.layer(parent, index) + ".")


def test_num_layers(tiny):
    _, model = tiny
    assert num_layers(model, get_targets(model)) == NUM_LAYERS == model.config.num_hidden_layers


def test_projection_types_and_orientation(tiny):
    model_type, model = tiny
    targets = get_targets(model)
    for role in _roles(targets, PROJECTIONS):
        module = get_module(model, targets.layer(role, 0))
        assert isinstance(module, (nn.Linear, Conv1D)), (role, type(module))
        # GPT-2's Conv1D is the one layout stored [in, out]
        assert is_transposed(module) == (model_type == "gpt2"), role
        assert is_transposed(module) == isinstance(module, Conv1D), role
    assert isinstance(get_module(model, targets.embed), nn.Embedding)
    assert not is_transposed(get_module(model, targets.unembed))


@torch.no_grad()
def test_weight_as_out_in_matches_forward(tiny):
    """``x @ W.T + b`` with ``W = weight_as_out_in(m)`` reproduces ``m(x)``, and an update given
    as ``[out, in]`` lands in the right place once converted by ``delta_to_param_layout``."""
    _, model = tiny
    targets = get_targets(model)
    for role in _roles(targets, PROJECTIONS):
        for index in range(NUM_LAYERS):
            module = get_module(model, targets.layer(role, index))
            weight = weight_as_out_in(module)
            out_features, in_features = weight.shape
            if isinstance(module, nn.Linear):
                assert (out_features, in_features) == (module.out_features, module.in_features), role
            else:
                assert (out_features, in_features) == (module.nf, module.nx), role
            x = torch.randn(3, in_features)
            expected = x @ weight.T + (module.bias if module.bias is not None else 0)
            assert module(x).shape == (3, out_features), role
            torch.testing.assert_close(module(x), expected, msg=f"{role} layer {index}")

            delta = torch.randn(out_features, in_features) * 0.1
            original = module.weight.detach().clone()
            module.weight += delta_to_param_layout(module, delta)
            try:
                torch.testing.assert_close(module(x), expected + x @ delta.T, msg=f"{role} layer {index}")
            finally:
                module.weight.copy_(original)


def test_projection_shapes_fit_together(tiny):
    """Roles are not swapped: mlp_in maps hidden -> inner, mlp_out maps inner -> hidden."""
    _, model = tiny
    targets = get_targets(model)
    for index in range(NUM_LAYERS):
        shape = {
            role: tuple(weight_as_out_in(get_module(model, targets.layer(role, index))).shape)
            for role in _roles(targets, PROJECTIONS)
        }
        inner = shape["mlp_in"][0]
        assert shape["mlp_in"] == (inner, HIDDEN)
        assert shape["mlp_out"] == (HIDDEN, inner)
        assert shape["attn_out"][0] == HIDDEN
        if "mlp_gate" in shape:
            assert shape["mlp_gate"] == shape["mlp_in"]
    assert tuple(weight_as_out_in(get_module(model, targets.unembed)).shape) == (model.config.vocab_size, HIDDEN)


def test_gated_roles_only_where_present():
    gpt2 = TARGETS["gpt2"]
    assert gpt2.mlp_gate is None
    with pytest.raises(KeyError, match="mlp_gate"):
        gpt2.layer("mlp_gate", 0)
    assert TARGETS["llama"].layer("mlp_gate", 3) == "model.layers.3.mlp.gate_proj"


# --------------------------------------------------------------------------------------------
# Architectures missing from the table, and overrides
# --------------------------------------------------------------------------------------------


class _ToyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ff = nn.Module()
        self.ff.w_in = nn.Linear(8, 16)
        self.ff.w_out = nn.Linear(16, 8)
        self.mix = nn.Module()
        self.mix.proj = nn.Linear(8, 8)


class _ToyModel(nn.Module):
    """A model of a ``model_type`` that the table does not know."""

    def __init__(self, model_type: str = "toy_lm", layers: int = 3) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type)
        self.emb = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(_ToyBlock() for _ in range(layers))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10)


TOY_OVERRIDES = dict(
    layers="blocks",
    mlp="blocks.{}.ff",
    mlp_in="blocks.{}.ff.w_in",
    mlp_out="blocks.{}.ff.w_out",
    attn="blocks.{}.mix",
    attn_out="blocks.{}.mix.proj",
    final_norm="norm",
    unembed="head",
    embed="emb",
)


def test_unknown_architecture_error_says_what_to_set():
    with pytest.raises(UnknownArchitectureError) as info:
        get_targets(_ToyModel())
    message = info.value.args[0]
    assert "'toy_lm'" in message
    assert "targets=" in message  # how to pass the templates
    for role in ("mlp_out", "mlp_in", "layers", "embed"):
        assert role in message
    assert "mlp_gate" not in message.split("missing roles")[1]  # optional roles are not demanded


def test_unknown_architecture_with_partial_overrides_lists_missing_roles():
    with pytest.raises(UnknownArchitectureError) as info:
        get_targets(_ToyModel(), overrides={"mlp_out": "blocks.{}.ff.w_out"})
    missing = info.value.args[0].split("missing roles")[1]
    assert "mlp_in" in missing and "mlp_out" not in missing


def test_full_overrides_make_unknown_architecture_work():
    model = _ToyModel(layers=3)
    targets = get_targets(model, overrides=TOY_OVERRIDES)
    assert targets.mlp_gate is None
    assert num_layers(model, targets) == 3
    assert get_module(model, targets.layer("mlp_out", 2)) is model.blocks[2].ff.w_out
    assert weight_as_out_in(get_module(model, targets.layer("mlp_in", 0))).shape == (16, 8)


def test_overrides_replace_single_roles_of_a_known_architecture():
    model = build_tiny("gpt2")
    targets = get_targets(model, overrides={"mlp_out": "transformer.h.{}.attn.c_proj"})
    assert targets.mlp_out == "transformer.h.{}.attn.c_proj"
    assert targets.mlp_in == TARGETS["gpt2"].mlp_in
    assert TARGETS["gpt2"].mlp_out == "transformer.h.{}.mlp.c_proj"  # the table is untouched


@pytest.mark.parametrize("model_type", ["toy_lm", "gpt2"])
def test_unknown_role_in_overrides_is_rejected(model_type):
    model = _ToyModel() if model_type == "toy_lm" else build_tiny(model_type)
    with pytest.raises(ValueError, match="unknown target roles.*down_proj"):
        get_targets(model, overrides={**TOY_OVERRIDES, "down_proj": "blocks.{}.ff.w_out"})


def test_missing_module_error_names_the_module():
    model = _ToyModel()
    with pytest.raises(KeyError, match="blocks.7.ff.w_out"):
        get_module(model, "blocks.7.ff.w_out")
