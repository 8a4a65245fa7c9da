"""The Edit object: exact revert, refusal of bad updates, saving, loading, and the registry."""

from __future__ import annotations

import json

import pytest
import torch

from editors.base import Edit, EditError, Editor, EditorConfig, EditRequest, ParamDelta, register_editor


def _name(model) -> str:
    return [n for n, _ in model.named_parameters() if n.endswith("mlp.c_proj.weight") or n.endswith("mlp.down_proj.weight")][0]


def test_apply_revert_is_bit_exact_even_when_addition_rounds(tiny_model):
    name = _name(tiny_model)
    param = dict(tiny_model.named_parameters())[name]
    original = param.detach().clone()
    # A delta with tiny and huge entries: (w + d) - d != w in float32, so only a snapshot restores w.
    delta = torch.full_like(param, 1e-9)
    delta[0, 0] = 1e6
    edit = Edit("test", {name: ParamDelta(delta=delta)}).apply(tiny_model)
    assert not torch.equal(param, original)
    assert not torch.equal((param - delta), original)  # the premise: subtraction would not be exact
    edit.revert(tiny_model)
    assert torch.equal(param, original)


def test_context_manager_and_state_errors(tiny_model):
    name = _name(tiny_model)
    param = dict(tiny_model.named_parameters())[name]
    original = param.detach().clone()
    edit = Edit("test", {name: ParamDelta(delta=torch.ones_like(param))})
    with edit.applied(tiny_model):
        assert torch.equal(param, original + 1)
        with pytest.raises(EditError, match="already applied"):
            edit.apply(tiny_model)
    assert torch.equal(param, original)
    with pytest.raises(EditError, match="not applied"):
        edit.revert(tiny_model)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_refuses_non_finite_updates_and_leaves_model_untouched(tiny_model, bad):
    names = [n for n, _ in tiny_model.named_parameters()][:2]
    params = dict(tiny_model.named_parameters())
    before = {n: params[n].detach().clone() for n in names}
    poisoned = torch.zeros_like(params[names[1]])
    poisoned.view(-1)[0] = bad
    edit = Edit("test", {names[0]: ParamDelta(delta=torch.ones_like(params[names[0]])), names[1]: ParamDelta(delta=poisoned)})
    with pytest.raises(EditError, match="non-finite"):
        edit.apply(tiny_model)
    assert all(torch.equal(params[n], before[n]) for n in names)
    assert not edit.is_applied


def test_shape_mismatch_and_unknown_parameter(tiny_model):
    name = _name(tiny_model)
    with pytest.raises(EditError, match="shape"):
        Edit("test", {name: ParamDelta(delta=torch.zeros(3, 3))}).apply(tiny_model)
    with pytest.raises(EditError, match="does not have"):
        Edit("test", {"no.such.weight": ParamDelta(delta=torch.zeros(3))}).apply(tiny_model)


def test_low_rank_delta_is_saved_as_factors(tiny_model, tmp_path):
    name = _name(tiny_model)
    param = dict(tiny_model.named_parameters())[name]
    rows, cols = param.shape
    left, right = torch.randn(rows, 1), torch.randn(1, cols)
    edit = Edit("test", {name: ParamDelta(left=left, right=right)}, case_ids=["7"], config={"rank": 1})
    assert edit.deltas[name].rank == 1
    assert edit.num_stored_values() == rows + cols
    edit.save(tmp_path)
    meta = json.loads((tmp_path / "edit.json").read_text())
    assert set(meta["tensors"]) == {f"{name}::left", f"{name}::right"}
    loaded = Edit.load(tmp_path)
    assert torch.equal(loaded.deltas[name].dense(), left @ right)
    assert loaded.config == {"rank": 1} and loaded.case_ids == ["7"]


def test_load_reports_missing_and_corrupt_files(tiny_model, tmp_path):
    with pytest.raises(EditError, match="edit.json"):
        Edit.load(tmp_path)
    name = _name(tiny_model)
    Edit("test", {name: ParamDelta(delta=torch.zeros_like(dict(tiny_model.named_parameters())[name]))}).save(tmp_path)
    (tmp_path / "edit.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EditError, match="edit.safetensors"):
        Edit.load(tmp_path)
    (tmp_path / "edit.json").write_text("{broken")
    with pytest.raises(EditError, match="not valid JSON"):
        Edit.load(tmp_path)


def test_load_rejects_unknown_kind(tmp_path, tiny_model):
    name = _name(tiny_model)
    Edit("test", {name: ParamDelta(delta=torch.zeros(2))}).save(tmp_path)
    meta = json.loads((tmp_path / "edit.json").read_text())
    meta["kind"] = "hologram"
    (tmp_path / "edit.json").write_text(json.dumps(meta))
    with pytest.raises(EditError, match="unknown edit kind 'hologram'"):
        Edit.load(tmp_path)


def test_registry_rejects_duplicates_and_bad_names():
    class Dummy(Editor):
        def apply(self, model, tokenizer, requests, config):
            raise NotImplementedError

    with pytest.raises(ValueError, match="already registered"):
        register_editor("ft_m", EditorConfig)(Dummy)
    with pytest.raises(ValueError, match="lower-case"):
        register_editor("FT", EditorConfig)(Dummy)
    with pytest.raises(TypeError, match="EditorConfig"):
        register_editor("dummy_x", dict)(Dummy)


def test_request_validation_names_the_field():
    with pytest.raises(ValueError, match="'subject'.*does not occur"):
        EditRequest("1", "The capital of France is", "Germany", "Berlin")
    with pytest.raises(ValueError, match="'target_new'.*empty"):
        EditRequest("1", "The capital of France is", "France", "  ")
    with pytest.raises(ValueError, match="'prompt'.*string"):
        EditRequest("1", 5, "France", "Paris")  # type: ignore[arg-type]


def test_request_dict_round_trip(request_factory):
    req = request_factory()
    assert EditRequest.from_dict(req.to_dict()) == req
