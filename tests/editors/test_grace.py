"""GRACE (Hartvigsen et al., 2023): codebook rules, the edit's effect, stacking, revert, save/load."""

from __future__ import annotations

import pytest
import torch

from factedit.editors import Edit, get_editor
from factedit.editors.grace import Codebook, Entries, GRACEConfig, plan_updates
from factedit.editors.core.lm import collate_pairs, encode_pair, logits_at


def _config(**overrides) -> GRACEConfig:
    return GRACEConfig(**{"layer": 1, **overrides})


def _logits(model, tokenizer, pairs) -> torch.Tensor:
    with torch.no_grad():
        return logits_at(model, collate_pairs([encode_pair(tokenizer, p, t) for p, t in pairs], tokenizer.pad_token_id))


def _predicts(model, tokenizer, prompt, target) -> bool:
    return int(_logits(model, tokenizer, [(prompt, target)])[0].argmax()) == encode_pair(tokenizer, prompt, target)[1][0]


PROBES = [("The capital of Italy is", "Rome"), ("Angola is located in", "Africa"), ("The mother tongue of Danielle Darrieux is", "Paris")]


# -- Algorithm 1 on hand-built keys ------------------------------------------------------------


def _entries(keys, radii, labels, uid="old") -> Entries:
    keys = torch.tensor(keys, dtype=torch.float32)
    return Entries(keys, torch.zeros_like(keys), torch.tensor(radii, dtype=torch.float32), list(labels), [(uid, i) for i in range(len(labels))])


def test_far_key_adds_an_entry():
    plan = plan_updates(_entries([[0.0, 0.0]], [1.0], ["A"]), torch.tensor([[5.0, 0.0]]), ["B"], eps_init=1.0, uid="new")
    assert plan.actions == ["add"] and plan.new_radii == [1.0] and not plan.overrides


def test_near_key_with_the_same_label_expands():
    plan = plan_updates(_entries([[0.0, 0.0]], [1.0], ["A"]), torch.tensor([[1.5, 0.0]]), ["A"], eps_init=1.0, uid="new")
    assert plan.actions == ["expand"] and not plan.new_keys
    assert plan.overrides == {("old", 0): pytest.approx(1.5)}


def test_near_key_with_another_label_splits():
    plan = plan_updates(_entries([[0.0, 0.0]], [1.0], ["A"]), torch.tensor([[1.5, 0.0]]), ["B"], eps_init=1.0, uid="new")
    assert plan.actions == ["split"] and len(plan.new_keys) == 1
    assert plan.overrides == {("old", 0): pytest.approx(0.75)} and plan.new_radii == [pytest.approx(0.75)]


def test_rules_apply_within_one_call():
    keys = torch.tensor([[0.0, 0.0], [0.5, 0.0], [1.0, 0.0]])
    plan = plan_updates(None, keys, ["A", "A", "B"], eps_init=1.0, uid="new")
    assert plan.actions == ["add", "expand", "split"]
    assert plan.new_radii == [pytest.approx(0.5), pytest.approx(0.5)] and not plan.overrides


# -- on tiny models ----------------------------------------------------------------------------


def test_edit_predicts_target_and_far_inputs_are_bit_identical(tiny_model, tokenizer, request_factory):
    req = request_factory(target_new="Paris", target_true="French")
    assert not _predicts(tiny_model, tokenizer, req.prompt, req.target_new)
    far = [("Angola is located in", "Africa"), ("Toko Yasuda plays the", "guitar")]
    before_far = _logits(tiny_model, tokenizer, far)
    edit = get_editor("grace")().apply(tiny_model, tokenizer, [req], _config())
    assert _predicts(tiny_model, tokenizer, req.prompt, req.target_new)
    assert torch.equal(_logits(tiny_model, tokenizer, far), before_far)
    assert not edit.param_names and edit.info["actions"] == ["add"]
    edit.revert(tiny_model)
    assert Codebook.of(tiny_model, edit.module) is None, "the hook goes with the last entry"


def test_generate_uses_the_codebook(tiny_model, tokenizer, request_factory):
    req = request_factory(target_new="Paris", target_true="French")
    prompt_ids, target_ids = encode_pair(tokenizer, req.prompt, req.target_new)
    edit = get_editor("grace")().apply(tiny_model, tokenizer, [req], _config())
    out = tiny_model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                              max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out[0, -1].item() == target_ids[0]
    edit.revert(tiny_model)


def test_sequential_edits_accumulate_and_middle_revert_is_exact(tiny_model, tokenizer, request_factory, tmp_path):
    reqs = [
        request_factory("a", target_new="Paris", target_true="French"),
        request_factory("b", prompt="The capital of Italy is", subject="Italy", target_new="Africa", target_true="Rome"),
        request_factory("c", prompt="Angola is located in", subject="Angola", target_new="Paris", target_true="Africa"),
    ]
    editor = get_editor("grace")()
    base = _logits(tiny_model, tokenizer, PROBES)
    e1 = editor.apply(tiny_model, tokenizer, [reqs[0]], _config())
    after1 = _logits(tiny_model, tokenizer, PROBES)
    e2 = editor.apply(tiny_model, tokenizer, [reqs[1]], _config())
    e3 = editor.apply(tiny_model, tokenizer, [reqs[2]], _config())
    assert len(Codebook.of(tiny_model, e1.module).entries.labels) == 3
    assert all(_predicts(tiny_model, tokenizer, r.prompt, r.target_new) for r in reqs)
    for i, e in enumerate((e1, e3)):
        e.save(tmp_path / str(i))

    e2.revert(tiny_model)
    assert len(Codebook.of(tiny_model, e1.module).entries.labels) == 2
    without_middle = _logits(tiny_model, tokenizer, PROBES)
    e3.revert(tiny_model)
    assert torch.equal(_logits(tiny_model, tokenizer, PROBES), after1), "reverting the last edit restores the state after the first"
    e1.revert(tiny_model)
    assert torch.equal(_logits(tiny_model, tokenizer, PROBES), base)

    # Applying only the first and third edits (loaded) gives exactly the state without the middle one.
    loaded = [Edit.load(tmp_path / str(i)) for i in range(2)]
    for e in loaded:
        e.apply(tiny_model)
    assert torch.equal(_logits(tiny_model, tokenizer, PROBES), without_middle)
    for e in reversed(loaded):
        e.revert(tiny_model)
    assert torch.equal(_logits(tiny_model, tokenizer, PROBES), base)


def test_split_radius_is_restored_on_revert(tiny_model, tokenizer, request_factory):
    # With a wide eps_init a paraphrase with another target conflicts: split shrinks the first radius.
    first = request_factory("a", target_new="Paris", target_true="French")
    second = request_factory("b", target_new="Rome", target_true="French", prompt="Danielle Darrieux speaks the language")
    editor = get_editor("grace")()
    e1 = editor.apply(tiny_model, tokenizer, [first], _config(eps_init=100.0))
    book = Codebook.of(tiny_model, e1.module)
    radius = book.entries.radii.clone()
    after1 = _logits(tiny_model, tokenizer, PROBES)
    e2 = editor.apply(tiny_model, tokenizer, [second], _config(eps_init=100.0))
    assert e2.info["actions"] == ["split"] and e2.override_refs == [(e1.uid, 0)]
    assert book.entries.radii[0] < radius[0]
    e2.revert(tiny_model)
    assert torch.equal(book.entries.radii, radius)
    assert torch.equal(_logits(tiny_model, tokenizer, PROBES), after1)
    e1.revert(tiny_model)


def test_save_load_reproduces_outputs(tiny_model, tokenizer, request_factory, tmp_path):
    reqs = [request_factory("a", target_new="Paris"), request_factory("b", prompt="The capital of Italy is", subject="Italy", target_new="Africa", target_true="Rome")]
    edit = get_editor("grace")().apply(tiny_model, tokenizer, reqs, _config())
    edited = _logits(tiny_model, tokenizer, PROBES)
    edit.save(tmp_path / "e")
    edit.revert(tiny_model)
    loaded = Edit.load(tmp_path / "e")
    assert type(loaded).__name__ == "GRACEEdit" and loaded.labels == ["Paris", "Africa"] and loaded.case_ids == ["a", "b"]
    with loaded.applied(tiny_model):
        assert torch.equal(_logits(tiny_model, tokenizer, PROBES), edited)


def test_a_saved_edit_loads_where_its_editor_was_never_imported(tiny_model, tokenizer, request_factory, tmp_path):
    """Methods are imported on first use, so loading names the editor that registers the kind."""
    import subprocess
    import sys
    from pathlib import Path

    edit = get_editor("grace")().apply(tiny_model, tokenizer, [request_factory(target_new="Paris")], _config(steps=1))
    edit.save(tmp_path / "e")
    edit.revert(tiny_model)
    code = f"import sys; from factedit.editors import Edit; edit = Edit.load({str(tmp_path / 'e')!r}); print(type(edit).__name__, 'factedit.editors.grace.editor' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["GRACEEdit", "True"]


def test_refuses_non_finite_values(tiny_model, tokenizer, request_factory):
    edit = get_editor("grace")().apply(tiny_model, tokenizer, [request_factory(target_new="Paris")], _config(steps=1))
    edit.revert(tiny_model)
    edit.values[0, 0] = float("nan")
    with pytest.raises(Exception, match="non-finite"):
        edit.apply(tiny_model)
    assert Codebook.of(tiny_model, edit.module) is None


def test_value_training_loss_is_the_full_sequence_target_nll(tiny_model, tokenizer, request_factory, caplog):
    """Values are trained on the split token onwards only (the prompt before it kept as keys and
    values): the loss that stopped training equals the target NLL of the full prompt + target
    sequence with the trained value in place, for a multi-token target."""
    import logging
    import re

    from factedit.editors.core.lm import target_nll

    req = request_factory(target_new="the city of Rome")
    prompt_ids, target_ids = encode_pair(tokenizer, req.prompt, req.target_new)
    assert len(target_ids) >= 3, "test premise: a multi-token target"
    batch = collate_pairs([(prompt_ids, target_ids)], tokenizer.pad_token_id)
    with torch.no_grad():
        before = float(target_nll(tiny_model, batch)[0])
    config = _config(stop_loss=before - 0.05)  # stops early, so the last loss is the final value's
    with caplog.at_level(logging.DEBUG, logger="factedit.editors.grace.editor"):
        edit = get_editor("grace")().apply(tiny_model, tokenizer, [req], config)
    trained = float(re.search(r"values: loss ([0-9.]+) after (\d+) steps", caplog.text).group(1))
    with torch.no_grad():
        after = float(target_nll(tiny_model, batch)[0])
    assert after < config.stop_loss and after == pytest.approx(trained, abs=1e-4)
    edit.revert(tiny_model)
