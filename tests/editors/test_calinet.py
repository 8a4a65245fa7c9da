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


def test_stand_in_prompts_ask_the_same_of_other_subjects(request_factory):
    from factedit.editors.core.facts import stand_in_prompts
    from factedit.editors.core.facts import STAND_IN_SUBJECTS

    reqs = [
        request_factory("a", target_new="Paris", rephrase_prompts=("Danielle Darrieux speaks the language",)),
        request_factory("b", prompt="Kenya is located in the continent of", subject="Kenya", target_new="Europe"),
    ]
    prompts = stand_in_prompts(reqs, 4, torch.Generator().manual_seed(0))
    assert len(prompts) == 8 and len(set(prompts)) == 8
    assert not any("Danielle Darrieux" in p or p.startswith("Kenya ") for p in prompts)  # "Kenya" is edited: never a stand-in
    assert sum(p.startswith("The mother tongue of ") for p in prompts) == 2  # a's prompt and rephrase alternate
    assert sum(p.endswith(" speaks the language") for p in prompts) == 2
    assert sum(p.endswith(" is located in the continent of") for p in prompts) == 4
    assert all(any(s in p for s in STAND_IN_SUBJECTS) for p in prompts)


def test_training_in_length_chunks_equals_one_batch(tiny_model, tokenizer, request_factory):
    """The step sums the chunks' gradients: the slots come out as from one padded batch (to float
    rounding, which Adam's division by small running gradient sizes magnifies)."""
    reqs = [request_factory("a", target_new="Paris", rephrase_prompts=("Danielle Darrieux speaks the language of",)),
            request_factory("b", prompt="Angola is located in", subject="Angola", target_new="Rome")]
    one = _apply(tiny_model, tokenizer, reqs, steps=5, stop_loss=0.0, chunk_tokens=10**6)
    one.revert(tiny_model)
    many = _apply(tiny_model, tokenizer, reqs, steps=5, stop_loss=0.0, chunk_tokens=16)
    many.revert(tiny_model)
    assert one.info["retained_texts"] == many.info["retained_texts"] > 8
    for name, parts in one.patches.items():
        for part, tensor in parts.items():
            torch.testing.assert_close(many.patches[name][part], tensor, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(many.info["final_loss"], one.info["final_loss"], atol=1e-5, rtol=1e-4)


def test_retention_keeps_other_subjects_answers(tiny_model, tokenizer, request_factory):
    """With the retained prompts in the objective, the same question about other subjects moves
    less than with the paper's objective alone. (The tiny models' final norm keeps every
    distribution near uniform, so the KL term is small there: the test weights it up and compares
    centred logits.)"""
    from factedit.editors.core.facts import stand_in_prompts

    req = request_factory(target_new="Paris")
    probes = stand_in_prompts([req], 48, torch.Generator().manual_seed(1))
    batch = collate_pairs([encode_pair(tokenizer, p, "Paris") for p in probes], tokenizer.pad_token_id)

    def centred_logits():
        with torch.no_grad():
            logits = logits_at(tiny_model, batch)
        return logits - logits.mean(-1, keepdim=True)

    before = centred_logits()
    shift = {}
    for weight in (0.0, 100.0):
        edit = _apply(tiny_model, tokenizer, [req], retain_weight=weight, stand_ins=16, steps=40, stop_loss=0.0)
        assert edit.info["retained_texts"] == (0 if weight == 0 else 16 + 30 + 16)  # stand-ins, fact prompts, generic sentences
        shift[weight] = (centred_logits() - before).norm(dim=-1).mean().item()
        edit.revert(tiny_model)
    assert shift[100.0] < 0.9 * shift[0.0]


def test_top_block_slots_train_from_a_readout_as_with_the_full_model(tiny_model, tokenizer, request_factory, monkeypatch):
    """Slots in the top block only: training reads the recorded MLP inputs and block outputs and
    gives the slots that training through the hooked model gives."""
    from factedit.editors.core import prefix

    reqs = [request_factory("a", target_new="Paris", rephrase_prompts=("Danielle Darrieux speaks the language of",)),
            request_factory("b", prompt="Angola is located in", subject="Angola", target_new="Rome")]
    calls = []
    original = prefix.TopMLPReadout._check
    monkeypatch.setattr(prefix.TopMLPReadout, "_check", lambda self, batch: calls.append(original(self, batch)) or calls[-1])
    fast = _apply(tiny_model, tokenizer, reqs, layers=[-1], steps=5, stop_loss=0.0)
    fast.revert(tiny_model)
    assert calls == [True]  # the check pass matched a full pass on this architecture
    monkeypatch.setattr(prefix.TopMLPReadout, "_check", lambda self, batch: False)
    full = _apply(tiny_model, tokenizer, reqs, layers=[-1], steps=5, stop_loss=0.0)
    full.revert(tiny_model)
    (name,) = fast.patches
    for part in ("keys", "values"):
        torch.testing.assert_close(fast.patches[name][part], full.patches[name][part], atol=1e-4, rtol=1e-3)
    assert abs(fast.info["final_loss"] - full.info["final_loss"]) < 1e-4
    assert abs(fast.info["retained_kl"] - full.info["retained_kl"]) < 1e-5


def test_stand_ins_come_first_from_facts_with_the_same_answer_or_wording(request_factory):
    from factedit.editors.core.facts import KnownFacts, stand_in_prompts

    facts = [
        request_factory("f0", prompt="The mother tongue of Maria Callas is", subject="Maria Callas", target_new="x", target_true="Greek"),
        request_factory("f1", prompt="Jean Gabin is a native speaker of", subject="Jean Gabin", target_new="x"),  # French, as a's
        request_factory("f2", prompt="The mother tongue of Michel Rocard is", subject="Michel Rocard", target_new="x"),  # a's neighbour: scored
        request_factory("f3", prompt="The mother tongue of Kenya is", subject="Kenya", target_new="x"),  # edited below
    ]
    known = KnownFacts.of(facts)
    assert known.by_template["The mother tongue of {} is"] == ["Maria Callas", "Michel Rocard", "Kenya"]
    assert [p for p, _ in known.by_answer["French"]] == [f.prompt for f in facts[1:]]
    reqs = [request_factory("a", target_new="Paris"), request_factory("b", prompt="Kenya is located in", subject="Kenya", target_new="Europe")]
    prompts = stand_in_prompts(reqs, 3, torch.Generator().manual_seed(0), known)
    # a same-answer fact as asked, then a same-wording subject; a's neighbour (scored) and Kenya (edited) never
    assert prompts[:2] == ["Jean Gabin is a native speaker of", "The mother tongue of Maria Callas is"]
    assert not any("Michel Rocard" in p or "Kenya" in p for p in prompts)
    # b (also French) draws the same fact (kept once) and two built-in entities
    assert len(prompts) == 5 and sum(p.startswith("The mother tongue of ") for p in prompts) == 2


def test_retain_path_must_be_read_first(tiny_model, tokenizer, request_factory):
    from factedit.editors.base import EditError

    editor = get_editor("calinet")()
    config = CaliNETConfig(retain_path="facts.json", steps=1)
    with pytest.raises(EditError, match="read_data"):
        editor.apply(tiny_model, tokenizer, [request_factory(target_new="Paris")], config)
    read = []
    editor.read_data(config, lambda path, limit: read.append((path, limit)) or [request_factory("f", prompt="The mother tongue of Jacques Chirac is", subject="Jacques Chirac", target_new="x")])
    edit = editor.apply(tiny_model, tokenizer, [request_factory(target_new="Paris")], config)
    assert read == [("facts.json", None)] and edit.info["retained_texts"] == config.stand_ins + 30 + 16


def test_a_later_call_keeps_what_earlier_calinet_edits_answer(tiny_model, tokenizer, request_factory):
    first = _apply(tiny_model, tokenizer, [request_factory("a", target_new="Paris", rephrase_prompts=("Danielle Darrieux speaks",))], layers=[-1])
    assert first.info["pairs"] == [["The mother tongue of Danielle Darrieux is", "Paris"], ["Danielle Darrieux speaks", "Paris"]]
    alone = _apply(tiny_model, tokenizer, [request_factory("b", prompt="Angola is located in", subject="Angola", target_new="Rome")], layers=[-2])
    after = _apply(tiny_model, tokenizer, [request_factory("c", prompt="Angola is located in", subject="Angola", target_new="Rome")], layers=[-1])
    assert after.info["retained_texts"] == alone.info["retained_texts"] + 2  # a's two pairs join those on the top MLP only
