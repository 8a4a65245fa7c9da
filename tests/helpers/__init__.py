"""Builders and stand-ins shared by the tests (the fixtures are in ``tests/conftest.py``)."""

from .models import CORPUS, build_gpt2, build_llama, build_tokenizer, make_request

__all__ = ["CORPUS", "build_gpt2", "build_llama", "build_tokenizer", "make_request"]
