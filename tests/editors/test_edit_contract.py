"""The Edit object: exact revert, refusal of bad updates, saving, loading, and the registry."""

from __future__ import annotations

import json

import pytest
import torch

from factedit.editors.base import Edit, EditError, Editor, EditorConfig, EditRequest, ParamDelta, register_editor


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


def _two_edits_of_one_weight(model):
    name = _name(model)
    param = dict(model.named_parameters())[name]
    first = Edit("first", {name: ParamDelta(delta=torch.full_like(param, 0.5))})
    second = Edit("second", {name: ParamDelta(left=torch.ones(param.shape[0], 1), right=torch.full((1, param.shape[1]), 0.25))})
    return name, param, first, second


def test_out_of_order_revert_is_refused_and_touches_nothing(tiny_model):
    name, param, first, second = _two_edits_of_one_weight(tiny_model)
    original = param.detach().clone()
    first.apply(tiny_model)
    second.apply(tiny_model)
    both = param.detach().clone()
    with pytest.raises(EditError, match=f"{name}.*revert later edits first"):
        first.revert(tiny_model)
    assert torch.equal(param, both) and first.is_applied and second.is_applied
    second.revert(tiny_model)
    first.revert(tiny_model)
    assert torch.equal(param, original)


def test_revert_refuses_when_weights_changed_by_hand(tiny_model):
    name = _name(tiny_model)
    params = dict(tiny_model.named_parameters())
    other = next(n for n in params if n != name)
    before = {n: params[n].detach().clone() for n in (name, other)}
    # Two parameters: the check covers all of them before restoring any.
    edit = Edit("test", {other: ParamDelta(delta=torch.ones_like(params[other])), name: ParamDelta(delta=torch.ones_like(params[name]))}).apply(tiny_model)
    with torch.no_grad():
        params[name].view(-1)[0] += 1.0
    touched = {n: params[n].detach().clone() for n in (name, other)}
    with pytest.raises(EditError, match=f"{name} changed since it was applied"):
        edit.revert(tiny_model)
    assert all(torch.equal(params[n], touched[n]) for n in touched)
    edit.revert(tiny_model, force=True)  # the way out: discard the change by hand
    assert all(torch.equal(params[n], before[n]) for n in before)


def test_revert_sees_a_sign_flip_of_zero(tiny_model):
    # torch.equal(0.0, -0.0) is true; the check compares bits.
    name = _name(tiny_model)
    param = dict(tiny_model.named_parameters())[name]
    edit = Edit("test", {name: ParamDelta(delta=-param.detach().clone())}).apply(tiny_model)
    with torch.no_grad():
        param.view(-1)[0] = -0.0 if not torch.signbit(param.view(-1)[0]) else 0.0
    with pytest.raises(EditError, match="changed since"):
        edit.revert(tiny_model)


def test_saved_edit_records_its_model_and_refuses_another(tmp_path, tokenizer):
    from helpers import build_gpt2, build_llama

    model = build_gpt2(len(tokenizer))
    name = _name(model)
    param = dict(model.named_parameters())[name]
    Edit("test", {name: ParamDelta(delta=torch.ones_like(param))}).apply(model).save(tmp_path)
    meta = json.loads((tmp_path / "edit.json").read_text())
    assert meta["model"]["model_type"] == "gpt2" and meta["model"]["shapes"] == {name: list(param.shape)}

    Edit.load(tmp_path).apply(build_gpt2(len(tokenizer)))  # a fresh copy of the same model
    other_weights = build_gpt2(len(tokenizer), seed=1)
    with pytest.raises(EditError, match="weights fingerprint.*force=True"):
        Edit.load(tmp_path).apply(other_weights)
    assert Edit.load(tmp_path).apply(other_weights, force=True).is_applied
    with pytest.raises(EditError, match="architecture 'llama', the edit was made for 'gpt2'"):
        Edit.load(tmp_path).apply(build_llama(len(tokenizer)))


def test_edit_saved_without_a_model_record_still_loads(tmp_path, tiny_model):
    name = _name(tiny_model)
    Edit("test", {name: ParamDelta(delta=torch.zeros_like(dict(tiny_model.named_parameters())[name]))}).save(tmp_path)
    meta = json.loads((tmp_path / "edit.json").read_text())
    assert meta["model"] is None  # never applied: no model to record
    del meta["model"]
    (tmp_path / "edit.json").write_text(json.dumps(meta))
    assert Edit.load(tmp_path).apply(tiny_model).made_for is not None


def _texts(request) -> dict:
    return {"case_id": request.case_id, "prompt": request.prompt, "subject": request.subject, "target_new": request.target_new, "target_true": request.target_true}


def test_saved_edit_records_its_requests_and_the_software(tmp_path, tokenizer, request_factory):
    from helpers import build_gpt2

    from factedit.editors import get_editor

    model = build_gpt2(len(tokenizer))
    requests = [request_factory("7"), request_factory("8", target_true=None, target_new="Dutch")]
    editor = get_editor("ft_m")()
    edit = editor.apply(model, tokenizer, requests, editor.config_class(layers=[1], steps=1))
    edit.save(tmp_path)
    edit.revert(model)
    meta = json.loads((tmp_path / "edit.json").read_text())
    assert meta["requests"] == [_texts(r) for r in requests]
    assert set(meta["provenance"]) == {"versions", "git_commit", "git_dirty", "date"}
    assert meta["provenance"]["versions"]["torch"] == torch.__version__
    assert meta["model"]["name"] is None  # built in memory: no name to record
    loaded = Edit.load(tmp_path)
    assert loaded.requests == meta["requests"] and loaded.provenance == meta["provenance"]
    # The records are for people: the edit still refuses another model's weights.
    with pytest.raises(EditError, match="weights fingerprint"):
        loaded.apply(build_gpt2(len(tokenizer), seed=1))
    assert loaded.apply(model).is_applied


def test_every_editor_records_requests_once_also_through_a_parent(tiny_model, request_factory):
    name = _name(tiny_model)

    class Plain(Editor):
        def apply(self, model, tokenizer, requests, config):
            return Edit("plain", {name: ParamDelta(delta=torch.zeros(1))}, [r.case_id for r in requests])

    class Child(Plain):
        def apply(self, model, tokenizer, requests, config):
            return super().apply(model, tokenizer, requests[:1], config)

    requests = [request_factory("1"), request_factory("2")]
    assert Plain().apply(tiny_model, None, requests, EditorConfig()).requests == [_texts(r) for r in requests]
    assert Child().apply(tiny_model, None, requests, EditorConfig()).requests == [_texts(requests[0])]  # what the parent carried out


def test_edit_without_recorded_requests_still_loads(tmp_path, tiny_model):
    name = _name(tiny_model)
    Edit("test", {name: ParamDelta(delta=torch.zeros(2))}).save(tmp_path)
    meta = json.loads((tmp_path / "edit.json").read_text())
    del meta["requests"], meta["provenance"]  # as saved before they were recorded
    (tmp_path / "edit.json").write_text(json.dumps(meta))
    loaded = Edit.load(tmp_path)
    assert loaded.requests == [] and loaded.provenance == {}
    meta["requests"] = "not a list"
    (tmp_path / "edit.json").write_text(json.dumps(meta))
    with pytest.raises(EditError, match="'requests'"):
        Edit.load(tmp_path)
