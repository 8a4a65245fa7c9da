"""CaliNET (Dong et al., 2022): calibration slots trained per call, base frozen, exact revert."""

from __future__ import annotations

import pytest
import torch

from factedit.editors import Edit, get_editor
from factedit.editors.calinet import CaliNETConfig, CaliNETEdit
from factedit.editors.core.patch import patch_hooks
from factedit.editors.core.lm import collate_pairs, encode_pair, logits_at
from factedit.editors.core.targets import get_module


def _predicts(model, tokenizer, prompt, target) -> bool:
    p, t = encode_pair(tokenizer, prompt, target)
    with torch.no_grad():
        return int(logits_at(model, collate_pairs([(p, t)], tokenizer.pad_token_id))[0].argmax()) == t[0]


def _logits(model, tokenizer):
    prompts = ("The capital of Italy is", "Angola is located in", "The mother tongue of Danielle Darrieux is")
    batch = collate_pairs([encode_pair(tokenizer, p, "Paris") for p in prompts], tokenizer.pad_token_id)
    with torch.no_grad():
        return logits_at(model, batch)


def _apply(model, tokenizer, requests, **settings):
    return get_editor("calinet")().apply(model, tokenizer, requests, CaliNETConfig(**settings))


def test_config_validation():
    with pytest.raises(ValueError):
        CaliNETConfig(layers=[])
    with pytest.raises(ValueError, match="activation"):
        CaliNETConfig(activation="tanh")


def test_edit_and_rephrase_predict_target_base_untouched(tiny_model, tokenizer, request_factory):
    req = request_factory(target_new="Paris", rephrase_prompts=("Danielle Darrieux speaks the language",))
    assert not _predicts(tiny_model, tokenizer, req.prompt, req.target_new)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    grads = {n: p.requires_grad for n, p in tiny_model.named_parameters()}
    edit = _apply(tiny_model, tokenizer, [req])
    assert isinstance(edit, CaliNETEdit) and edit.param_names == []
    assert _predicts(tiny_model, tokenizer, req.prompt, req.target_new)
    assert _predicts(tiny_model, tokenizer, req.rephrase_prompts[0], req.target_new)
    assert edit.info["training_pairs"] == 2
    for n, p in tiny_model.named_parameters():  # only the adaptor was trained
        assert torch.equal(p, before[n]), n
        assert p.requires_grad == grads[n] and p.grad is None, n


def test_slots_sit_in_the_top_layers(tiny_model, tokenizer, request_factory):
    edit = _apply(tiny_model, tokenizer, [request_factory(target_new="Paris")], layers=[-2, -1], n_slots=8)
    assert edit.info["layers"] == [1, 2] and len(edit.patches) == 2
    for name, parts in edit.patches.items():
        assert parts["keys"].shape == (8, 32) and parts["values"].shape == (8, 32) and "bias" not in parts
        assert len(patch_hooks(get_module(tiny_model, name))) == 1
    assert edit.num_stored_values() == 2 * 2 * 8 * 32


def test_untrained_adaptor_changes_nothing(tiny_model, tokenizer, request_factory):
    before = _logits(tiny_model, tokenizer)
    edit = _apply(tiny_model, tokenizer, [request_factory(target_new="Paris")], steps=1, stop_loss=1e9)
    assert edit.info["steps"] == 0  # stopped before any update: values still zero
    assert torch.equal(_logits(tiny_model, tokenizer), before)


def test_batch_and_revert_are_exact(tiny_model, tokenizer, request_factory):
    reqs = [request_factory("a", target_new="Paris"), request_factory("b", prompt="The capital of Italy is", subject="Italy", target_new="Africa")]
    before = _logits(tiny_model, tokenizer)
    first = _apply(tiny_model, tokenizer, reqs)
    assert first.case_ids == ["a", "b"]
    assert all(_predicts(tiny_model, tokenizer, r.prompt, r.target_new) for r in reqs)
    after_first = _logits(tiny_model, tokenizer)
    second = _apply(tiny_model, tokenizer, [request_factory("c", prompt="Angola is located in", subject="Angola", target_new="Rome")], seed=1)
    second.revert(tiny_model)
    assert torch.equal(_logits(tiny_model, tokenizer), after_first)
    first.revert(tiny_model)
    assert torch.equal(_logits(tiny_model, tokenizer), before)


def test_save_load_round_trip(tiny_model, tokenizer, request_factory, tmp_path):
    edit = _apply(tiny_model, tokenizer, [request_factory(target_new="Paris")])
    edited = _logits(tiny_model, tokenizer)
    edit.save(tmp_path / "edit")
    edit.revert(tiny_model)
    loaded = Edit.load(tmp_path / "edit")
    assert isinstance(loaded, CaliNETEdit) and loaded.info["activation"] == "gelu"
    with loaded.applied(tiny_model):
        assert torch.equal(_logits(tiny_model, tokenizer), edited)
