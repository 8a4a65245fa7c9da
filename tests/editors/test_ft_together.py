"""FT's independent edits computed together (``apply_each``) equal the edits made one at a time."""

from __future__ import annotations

import pytest
import torch

from factedit.editors import get_editor

REQUESTS = [
    dict(case_id="a", target_new="Paris"),
    dict(case_id="b", prompt="The capital of Italy is", subject="Italy", target_new="Rome", target_true="Milan"),
    dict(case_id="c", prompt="Danielle Darrieux was born in", target_new="the city of Lyon", target_true="Bordeaux"),
    dict(case_id="d", prompt="The official language of Peru is", subject="Peru", target_new="Dutch", target_true="Spanish"),
]


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _close(alone, together):
    """Adam divides each gradient by its running size, so the rounding of a near-zero gradient in a
    differently shaped batch can move a few elements by up to a step; the change as a whole agrees."""
    assert alone.case_ids == together.case_ids and alone.param_names == together.param_names
    assert alone.info["steps"] == together.info["steps"]
    assert together.info["final_loss"] == pytest.approx(alone.info["final_loss"], rel=1e-4, abs=1e-6)
    for name in alone.param_names:
        a, b = alone.deltas[name].dense(), together.deltas[name].dense()
        assert a.abs().max() > 0
        assert (a - b).norm() <= 1e-3 * a.norm(), name


@pytest.mark.parametrize("name,settings", [("ft_m", {}), ("ft_l", {"norm_constraint": 2e-3}), ("ft_m", {"layers": [0, 2]})])
def test_edits_computed_together_equal_edits_made_alone(name, settings, tiny_model, tokenizer, request_factory):
    editor = get_editor(name)()
    config = editor.config_class(**{"layers": [1], "lr": 1e-2, "steps": 6, **settings})
    units = [[request_factory(**r)] for r in REQUESTS]
    units[1].append(request_factory(**{**REQUESTS[0], "case_id": "b2", "target_new": "Berlin"}))  # a unit of two requests
    before = _params(tiny_model)
    together = editor.apply_each(tiny_model, tokenizer, units, config)
    assert all(torch.equal(p, before[n]) for n, p in tiny_model.named_parameters()), "apply_each changed the model"
    assert not any(edit.is_applied for edit in together)
    for unit, edit in zip(units, together):
        alone = editor.apply(tiny_model, tokenizer, unit, config)
        alone.revert(tiny_model)
        _close(alone, edit)
        assert edit.requests == alone.requests
        if config.norm_constraint is not None:
            assert all(d.dense().abs().max() <= config.norm_constraint * (1 + 1e-5) for d in edit.deltas.values())
    # each edit applies to the model it was computed on and reverts bit-exactly
    with together[2].applied(tiny_model):
        assert not torch.equal(dict(tiny_model.named_parameters())[together[2].param_names[0]], before[together[2].param_names[0]])
    assert all(torch.equal(p, before[n]) for n, p in tiny_model.named_parameters())


def test_a_case_that_stops_early_keeps_its_weights_while_the_others_train_on(tiny_model, tokenizer, request_factory):
    """Each case stops where it would alone (its loss under stop_loss before a step); the edit it
    keeps is the one of that moment, not one the later steps of the others moved."""
    editor = get_editor("ft_m")()
    units = [[request_factory(**r)] for r in REQUESTS]
    short = editor.config_class(layers=[1], lr=5e-2, steps=4, stop_loss=0.0)
    losses = sorted(edit.info["final_loss"] for edit in editor.apply_each(tiny_model, tokenizer, units, short))
    # a threshold that two cases pass by the fourth step, far from every case's loss there
    config = editor.config_class(layers=[1], lr=5e-2, steps=12, stop_loss=(losses[1] + losses[2]) / 2)
    together = editor.apply_each(tiny_model, tokenizer, units, config)
    steps = [edit.info["steps"] for edit in together]
    assert min(steps) < config.steps, f"test premise: some case stops early ({steps})"
    for unit, edit in zip(units, together):
        alone = editor.apply(tiny_model, tokenizer, unit, config)
        alone.revert(tiny_model)
        _close(alone, edit)


@pytest.mark.usefixtures("isolated_cache")
def test_the_default_apply_each_is_apply_then_revert_per_unit(tiny_model, tokenizer, request_factory):
    editor = get_editor("rome")()
    assert not editor.computes_together
    config = editor.config_class(layer=1, v_steps=5, context_count=2, stats_samples=8, stats_max_length=16)
    before = _params(tiny_model)
    units = [[request_factory(**r)] for r in REQUESTS[:2]]
    edits = editor.apply_each(tiny_model, tokenizer, units, config)
    assert all(torch.equal(p, before[n]) for n, p in tiny_model.named_parameters())
    for unit, edit in zip(units, edits):
        alone = editor.apply(tiny_model, tokenizer, unit, config)
        alone.revert(tiny_model)
        for name in alone.param_names:
            assert torch.equal(alone.deltas[name].dense(), edit.deltas[name].dense())
