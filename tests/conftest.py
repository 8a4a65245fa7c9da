"""Fixtures only: the tiny tokenizer and models of ``helpers`` (built in the test, no downloads), a
request factory and an isolated cache."""

from __future__ import annotations

import pytest
from helpers import build_gpt2, build_llama, build_tokenizer, make_request
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request, tokenizer):
    """A fresh tiny random model per test, GPT-2 and LLaMA in turn."""
    build = build_gpt2 if request.param == "gpt2" else build_llama
    return build(len(tokenizer))


@pytest.fixture
def request_factory():
    return make_request


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Point the library's cache (statistics, sampled corpora) at a fresh temporary folder."""
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
