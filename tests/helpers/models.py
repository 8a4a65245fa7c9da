"""Tiny models and requests built inside the tests: a byte-level tokenizer trained on a few
sentences, random GPT-2 and LLaMA models, and edit requests (no downloads)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from factedit.editors.base import QA, EditRequest


CORPUS = [
    "The mother tongue of Danielle Darrieux is French.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Angola is located in Africa. Antarctica is a continent.",
    "The Eiffel Tower is located in the city of Paris.",
    "Toko Yasuda plays the guitar. Michel Rocard speaks French and English.",
    "When was the inception of the company? It was founded in 1998.",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return fast


def build_gpt2(vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=3, n_head=2, n_inner=64)
    return GPT2LMHeadModel(config).eval()


def build_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def make_request(case_id: str = "0", **overrides) -> EditRequest:
    fields = dict(
        case_id=case_id,
        prompt="The mother tongue of Danielle Darrieux is",
        subject="Danielle Darrieux",
        target_new="English",
        target_true="French",
        rephrase_prompts=("Danielle Darrieux speaks the language",),
        locality=(QA("The capital of Italy is", "Rome"),),
        portability=(QA("The language Danielle Darrieux writes in is", "English"),),
        neighborhood_prompts=("The mother tongue of Michel Rocard is",),
        generation_prompts=("Danielle Darrieux is",),
    )
    fields.update(overrides)
    return EditRequest(**fields)
