"""T-Patcher (Huang et al., 2023): neurons per edit and answer token, margins, memory, stacking and exact revert."""

from __future__ import annotations

import pytest
import torch

from factedit.editors import Edit, get_editor
from factedit.editors.core.patch import GENERIC_TEXTS, fact_prompts, memory_texts, patch_hooks
from factedit.editors.core.lm import collate_pairs, encode_pair, logits_at
from factedit.editors.core.targets import get_module
from factedit.editors.t_patcher import TPatcherConfig, TPatcherEdit, last_token_queries


def _predicts(model, tokenizer, prompt, target) -> bool:
    p, t = encode_pair(tokenizer, prompt, target)
    with torch.no_grad():
        return int(logits_at(model, collate_pairs([(p, t)], tokenizer.pad_token_id))[0].argmax()) == t[0]


def _logits(model, tokenizer, prompts=("The capital of Italy is", "Angola is located in", "The mother tongue of Danielle Darrieux is")):
    batch = collate_pairs([encode_pair(tokenizer, p, "Paris") for p in prompts], tokenizer.pad_token_id)
    with torch.no_grad():
        return logits_at(model, batch)


def _edit(model, tokenizer, request, **settings):
    return get_editor("t_patcher")().apply(model, tokenizer, [request], TPatcherConfig(**settings))


def test_config_validation():
    with pytest.raises(ValueError, match="activation"):
        TPatcherConfig(activation="tanh")
    with pytest.raises(ValueError, match="memory_margin"):
        TPatcherConfig(act_margin=0.0, memory_margin=0.5)


def test_edit_predicts_target_with_one_neuron_in_the_last_layer(tiny_model, tokenizer, request_factory):
    req = request_factory(target_new="Paris")
    assert len(encode_pair(tokenizer, req.prompt, req.target_new)[1]) == 1
    assert not _predicts(tiny_model, tokenizer, req.prompt, req.target_new)
    edit = _edit(tiny_model, tokenizer, req)
    assert isinstance(edit, TPatcherEdit) and edit.num_neurons() == 1 and edit.info["neurons_per_request"] == [1]
    assert edit.param_names == []
    last = len(get_module(tiny_model, "model.layers" if tiny_model.config.model_type == "llama" else "transformer.h")) - 1
    assert edit.info["layer"] == last and str(last) in next(iter(edit.patches))
    assert _predicts(tiny_model, tokenizer, req.prompt, req.target_new)


def test_activation_above_margin_on_edit_and_below_on_held_out(tiny_model, tokenizer, request_factory):
    req = request_factory(target_new="Paris")
    config = TPatcherConfig(act_margin=1.0, memory_margin=-1.0)
    edit = get_editor("t_patcher")().apply(tiny_model, tokenizer, [req], config)
    module = next(iter(edit.patches))
    edit.revert(tiny_model)  # queries are the FFN inputs, which the patch does not change; read them unpatched
    z_edit = edit.preactivations(last_token_queries(tiny_model, tokenizer, module, [req.prompt]))
    assert z_edit.item() >= config.act_margin
    held_out = ["Angola is located in", "The Eiffel Tower is located in the city of", "Toko Yasuda plays the", "It was founded in"]
    z_held = edit.preactivations(last_token_queries(tiny_model, tokenizer, module, held_out))
    assert (z_held < config.memory_margin).all(), z_held
    # ReLU below zero: the patch adds exactly nothing on those inputs
    with edit.applied(tiny_model):
        patched = _logits(tiny_model, tokenizer, held_out)
    assert torch.equal(patched, _logits(tiny_model, tokenizer, held_out))


def test_memory_texts(request_factory):
    req = request_factory(target_new="Paris")
    assert memory_texts([req], generic=True, probes=False) == list(GENERIC_TEXTS)  # probes are held out by default
    texts = memory_texts([req], generic=True, probes=True)
    assert "The capital of Italy is Rome" in texts and req.neighborhood_prompts[0] in texts
    assert set(GENERIC_TEXTS) <= set(texts)
    assert memory_texts([req], generic=False, probes=True) == ["The capital of Italy is Rome", req.neighborhood_prompts[0]]
    # a locality probe that begins with the edit prompt cannot be memory
    other = request_factory(prompt="The capital of Italy is", subject="Italy")
    assert memory_texts([other], generic=False, probes=True) == [req.neighborhood_prompts[0]]
    # the built-in fact prompts: questions about other subjects, not the request's probes
    facts = memory_texts([req], generic=False, probes=False, facts=True)
    assert facts == list(dict.fromkeys(fact_prompts())) and len(facts) == 29  # one prompt is also another fact's neighbour
    assert "The mother tongue of Jacques Chirac is" in facts
    # an edit of one of them leaves exactly that prompt (and texts that extend it) out
    edited = request_factory(prompt="The official language of Brazil is", subject="Brazil", target_new="Spanish")
    left = memory_texts([edited], generic=False, probes=False, facts=True)
    assert "The official language of Brazil is" not in left and len(left) == 28


def test_memory_includes_previous_patches(tiny_model, tokenizer, request_factory):
    req_b = request_factory("b", prompt="The capital of Italy is", subject="Italy", target_new="Africa")
    alone = _edit(tiny_model, tokenizer, req_b)
    alone.revert(tiny_model)
    first = _edit(tiny_model, tokenizer, request_factory("a", target_new="Paris"))
    second = _edit(tiny_model, tokenizer, req_b)
    # the second patch was trained to stay silent where the first one fires: its queries join the memory
    assert second.info["memory_positions"] == alone.info["memory_positions"] + len(first.extras["queries"])
    z = second.preactivations(first.extras["queries"])
    assert (z < TPatcherConfig().memory_margin).all()


def test_sequential_patches_accumulate_and_middle_revert_is_exact(tiny_model, tokenizer, request_factory):
    reqs = [
        request_factory("a", target_new="Paris"),
        request_factory("b", prompt="The capital of Italy is", subject="Italy", target_new="Africa"),
        request_factory("c", prompt="Angola is located in", subject="Angola", target_new="Rome"),
    ]
    base = _logits(tiny_model, tokenizer)
    edits = [_edit(tiny_model, tokenizer, r) for r in reqs]
    module = get_module(tiny_model, next(iter(edits[0].patches)))
    assert len(patch_hooks(module)) == 3
    for r in reqs:
        assert _predicts(tiny_model, tokenizer, r.prompt, r.target_new), r.case_id
    edits[1].revert(tiny_model)
    assert [h.owner for h in patch_hooks(module)] == [edits[0], edits[2]]
    without_middle = _logits(tiny_model, tokenizer)
    # the same state built directly: patches a and c only, in that order
    edits[0].revert(tiny_model)
    edits[2].revert(tiny_model)
    assert torch.equal(_logits(tiny_model, tokenizer), base)
    edits[0].apply(tiny_model)
    edits[2].apply(tiny_model)
    assert torch.equal(_logits(tiny_model, tokenizer), without_middle)
    edits[2].revert(tiny_model)
    edits[0].revert(tiny_model)
    assert patch_hooks(module) == [] and torch.equal(_logits(tiny_model, tokenizer), base)


def test_batch_call_gives_one_neuron_per_request(tiny_model, tokenizer, request_factory):
    reqs = [request_factory("a", target_new="Paris"), request_factory("b", prompt="The capital of Italy is", subject="Italy", target_new="Africa")]
    edit = get_editor("t_patcher")().apply(tiny_model, tokenizer, reqs, TPatcherConfig(steps=80, answer_neurons=False))
    assert edit.num_neurons() == 2 and edit.case_ids == ["a", "b"]
    z = edit.preactivations(edit.extras["queries"])  # [request, neuron]
    assert (z.diagonal() >= 1.0).all() and (z[~torch.eye(2, dtype=torch.bool)] < -1.0).all()


def _teacher_forced_hits(model, tokenizer, prompt, target) -> list[bool]:
    batch = collate_pairs([encode_pair(tokenizer, prompt, target)], tokenizer.pad_token_id)
    with torch.no_grad():
        return (logits_at(model, batch).argmax(-1) == batch.targets).tolist()


def test_multi_token_answer_gets_a_neuron_per_token_firing_at_its_own_position(tiny_model, tokenizer, request_factory):
    req = request_factory(target_new="Africa and Rome")
    prompt_ids, target_ids = encode_pair(tokenizer, req.prompt, req.target_new)
    assert len(target_ids) >= 3 and not all(_teacher_forced_hits(tiny_model, tokenizer, req.prompt, req.target_new))
    edit = _edit(tiny_model, tokenizer, req, steps=150)
    assert edit.num_neurons() == len(target_ids) and edit.info["neurons_per_request"] == [len(target_ids)]
    assert all(_teacher_forced_hits(tiny_model, tokenizer, req.prompt, req.target_new))
    # the queries are the MLP inputs at the positions predicting each target token, in order
    module = next(iter(edit.patches))
    from factedit.editors.core.hooks import module_inputs

    ids = torch.tensor([prompt_ids + target_ids])
    positions = module_inputs(tiny_model, module, ids, torch.ones_like(ids))[0, len(prompt_ids) - 1 : -1]
    assert torch.allclose(edit.extras["queries"], positions.float(), atol=1e-5)
    z = edit.preactivations(positions)  # [position, neuron]: each neuron fires at its own position only
    on = torch.eye(len(target_ids), dtype=torch.bool)
    assert (z[on] >= TPatcherConfig().act_margin).all() and (z[~on] < TPatcherConfig().memory_margin).all()
    edit.revert(tiny_model)
    # the one-neuron setting fires at the prompt's last token alone
    single = _edit(tiny_model, tokenizer, req, steps=150, answer_neurons=False)
    assert single.num_neurons() == 1 and torch.allclose(single.extras["queries"], positions[:1].float(), atol=1e-5)


def test_stand_ins_and_retained_probes_join_the_memory(tiny_model, tokenizer, request_factory):
    from factedit.editors.base import EditError
    from factedit.editors.core.facts import KnownFacts
    from factedit.editors.requests import QA

    editor = get_editor("t_patcher")()
    request = request_factory(target_new="Paris")
    other = request_factory("o", prompt="The mother tongue of Jean Gabin is", subject="Jean Gabin", locality=(QA("Who wrote Hamlet?", "Shakespeare"),))
    editor._retain_file = ("facts.json", KnownFacts.of([other]))
    texts = editor._varying_texts([request], TPatcherConfig(stand_ins=2, retain_path="facts.json", retain_texts=4))
    assert "The mother tongue of Jean Gabin is" in texts and len(texts) == 3
    assert any(t.startswith("Who wrote Hamlet?") for t in texts)
    scored = {request.prompt, *request.rephrase_prompts, *request.neighborhood_prompts, *(qa.prompt for qa in request.locality)}
    assert not scored & set(texts)
    assert editor._varying_texts([request], TPatcherConfig(stand_ins=0)) == []
    with pytest.raises(EditError, match="retain_path"):
        get_editor("t_patcher")()._varying_texts([request], TPatcherConfig(retain_path="facts.json"))
    # every position of the stand-ins is memory: a call with them has more memory queries
    without = _edit(tiny_model, tokenizer, request, stand_ins=0)
    without.revert(tiny_model)
    with_stand_ins = _edit(tiny_model, tokenizer, request, stand_ins=2)
    assert with_stand_ins.info["memory_positions"] > without.info["memory_positions"]


def test_fixed_memory_is_encoded_once_per_text_and_again_after_a_weight_changes(tiny_model, tokenizer, monkeypatch):
    from factedit.editors.t_patcher import editor as tp

    editor = get_editor("t_patcher")()
    module = "model.layers.1.mlp" if tiny_model.config.model_type == "llama" else "transformer.h.1.mlp"
    texts = list(GENERIC_TEXTS[:3])
    encoded = []
    real = tp.inputs_at_every_token
    monkeypatch.setattr(tp, "inputs_at_every_token", lambda m, t, name, batch: encoded.append(list(batch)) or real(m, t, name, batch))
    first = editor._fixed_memory(tiny_model, tokenizer, module, texts)
    assert torch.allclose(first, real(tiny_model, tokenizer, module, texts).float(), atol=1e-5)
    # a call with a text left out, or the same texts again, encodes nothing
    assert torch.equal(editor._fixed_memory(tiny_model, tokenizer, module, texts[1:]), first[len(tokenizer(texts[0])["input_ids"]) :])
    assert torch.equal(editor._fixed_memory(tiny_model, tokenizer, module, texts), first)
    assert encoded == [texts]
    weight = next(tiny_model.parameters())
    with torch.no_grad():
        weight.mul_(2.0)
    again = editor._fixed_memory(tiny_model, tokenizer, module, texts)
    assert encoded == [texts, texts] and not torch.equal(again, first)
    with torch.no_grad():
        weight.div_(2.0)


def test_save_load_round_trip_reproduces_stacked_outputs(tiny_model, tokenizer, request_factory, tmp_path):
    a = _edit(tiny_model, tokenizer, request_factory("a", target_new="Paris"))
    b = _edit(tiny_model, tokenizer, request_factory("b", prompt="The capital of Italy is", subject="Italy", target_new="Africa"))
    edited = _logits(tiny_model, tokenizer)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    b.revert(tiny_model)
    a.revert(tiny_model)
    loaded = [Edit.load(tmp_path / "a"), Edit.load(tmp_path / "b")]
    assert all(isinstance(e, TPatcherEdit) for e in loaded)
    assert torch.equal(loaded[1].extras["queries"], b.extras["queries"])
    for e in loaded:
        e.apply(tiny_model)
    assert torch.equal(_logits(tiny_model, tokenizer), edited)


def test_refuses_non_finite_patch(tiny_model, tokenizer, request_factory):
    edit = _edit(tiny_model, tokenizer, request_factory(target_new="Paris"))
    edit.revert(tiny_model)
    before = _logits(tiny_model, tokenizer)
    next(iter(edit.patches.values()))["values"][0, 0] = float("nan")
    with pytest.raises(Exception, match="non-finite"):
        edit.apply(tiny_model)
    assert not edit.is_applied and torch.equal(_logits(tiny_model, tokenizer), before)
