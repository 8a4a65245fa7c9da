"""Checks every registered editor must pass, on tiny random GPT-2 and LLaMA models.

Each editor needs an entry in ``TEST_SETTINGS`` (settings strong enough for a random tiny model);
a newly registered editor without one fails ``test_every_editor_has_test_settings``. Learned
editors whose untrained network cannot edit at all (``needs_trained_network``: SERAC routes to an
untrained copy of the model) are checked with a network trained for a few seconds on the requests
edited here (``TRAINERS``). What a check expects follows the editor's class attributes, not its
name. Edits that change no weights (memories, hooks) are checked on the model's outputs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers.editor_settings import TEST_SETTINGS
from factedit.editors import Edit, available_editors, get_editor
from factedit.editors.core.lm import collate_pairs, encode_pair, logits_at

pytestmark = pytest.mark.usefixtures("isolated_cache")


def _trained_serac(model, tokenizer, root):
    from helpers.training import train_serac

    return train_serac(model, tokenizer, _requests(), root)[1]


# How to train the network of an editor that ``needs_trained_network``:
# name -> function(model, tokenizer, folder) -> checkpoint.
TRAINERS = {"serac": _trained_serac}


def _requests():
    from helpers import make_request

    return [
        make_request(target_new="Paris", target_true="French"),
        make_request("b", prompt="The capital of Italy is", subject="Italy", target_new="Rome", target_true="Rome"),
    ]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer):
    """Trained networks of the editors that need one, one per tiny architecture, built on demand."""
    from helpers import build_gpt2, build_llama

    built: dict[tuple[str, str], str] = {}

    def get(name: str, model) -> str:
        arch = model.config.model_type
        if (name, arch) not in built:
            base = (build_gpt2 if arch == "gpt2" else build_llama)(len(tokenizer))
            built[name, arch] = str(TRAINERS[name](base, tokenizer, tmp_path_factory.mktemp(f"{name}-{arch}")))
        return built[name, arch]

    return get


def _config(name, model, checkpoints):
    settings = dict(TEST_SETTINGS[name])
    if get_editor(name).needs_trained_network:
        settings["checkpoint"] = checkpoints(name, model)
    return get_editor(name).config_class(**settings)


def _probe_logits(model, tokenizer) -> torch.Tensor:
    pairs = [encode_pair(tokenizer, p, t) for p, t in [("The mother tongue of Danielle Darrieux is", "Paris"), ("The capital of Italy is", "Rome"), ("Angola is located in", "Africa")]]
    with torch.no_grad():
        return logits_at(model, collate_pairs(pairs, tokenizer.pad_token_id))


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _first_token_prediction(model, tokenizer, prompt: str, target: str) -> tuple[int, int]:
    encoded = encode_pair(tokenizer, prompt, target)
    batch = collate_pairs([encoded], tokenizer.pad_token_id)
    with torch.no_grad():
        return int(logits_at(model, batch)[0].argmax()), encoded[1][0]


def _for(name, request):
    """Editors that write the fact at the subject's last token get a prompt the subject ends: in a
    tiny random model attention barely carries anything from there to a later position."""
    if get_editor(name).writes_at_subject:
        return dataclasses.replace(request, prompt="The mother tongue is Danielle Darrieux")
    return request


def _apply(name, model, tokenizer, request, checkpoints):
    return get_editor(name)().apply(model, tokenizer, [request], _config(name, model, checkpoints))


def test_every_editor_has_test_settings():
    assert set(available_editors()) <= set(TEST_SETTINGS), "add test settings for new editors"
    needing = {name for name in available_editors() if get_editor(name).needs_trained_network}
    assert needing <= set(TRAINERS), "add a trainer for editors that need a trained network"
    assert {name for name in available_editors() if get_editor(name).writes_at_subject} >= {"rome", "memit", "pmet", "alphaedit"}
    assert [name for name in available_editors() if get_editor(name).edits_in_context] == ["ike"] and needing == {"serac"}


@pytest.fixture
def single_token_request(request_factory):
    # " Paris" is one token for the test tokenizer, so "predicts the target" is a single argmax.
    return request_factory(target_new="Paris", target_true="French")


@pytest.mark.parametrize("name", sorted(TEST_SETTINGS))
def test_edit_changes_prediction_and_reverts_exactly(name, tiny_model, tokenizer, single_token_request, checkpoints):
    req = _for(name, single_token_request)
    before_pred, target = _first_token_prediction(tiny_model, tokenizer, req.prompt, req.target_new)
    assert before_pred != target, "test premise: the random model does not already predict the target"
    before, before_logits = _params(tiny_model), _probe_logits(tiny_model, tokenizer)

    edit = _apply(name, tiny_model, tokenizer, req, checkpoints)
    assert edit.is_applied
    after_pred, _ = _first_token_prediction(tiny_model, tokenizer, req.prompt, req.target_new)
    if not get_editor(name).edits_in_context:  # a random tiny model does no in-context learning
        assert after_pred == target  # (tests/editors/test_ike.py checks IKE's mechanism)

    changed = {n for n, p in tiny_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= set(edit.param_names), f"changed undeclared parameters: {changed - set(edit.param_names)}"
    if edit.param_names:
        assert changed, "the edit changed no weight"
    else:  # a memory or hook edit: the outputs change instead
        assert not torch.equal(_probe_logits(tiny_model, tokenizer), before_logits), "the edit changed nothing"

    edit.revert(tiny_model)
    for n, p in tiny_model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} not restored bit-exactly"
    assert torch.equal(_probe_logits(tiny_model, tokenizer), before_logits), "outputs not restored bit-exactly"


@pytest.mark.parametrize("name", sorted(TEST_SETTINGS))
def test_save_load_round_trip(name, tiny_model, tokenizer, single_token_request, tmp_path, checkpoints):
    single_token_request = _for(name, single_token_request)
    edit = _apply(name, tiny_model, tokenizer, single_token_request, checkpoints)
    edited, edited_logits = _params(tiny_model), _probe_logits(tiny_model, tokenizer)
    edit.save(tmp_path / "edit")
    edit.revert(tiny_model)

    loaded = Edit.load(tmp_path / "edit")
    assert loaded.editor == name and loaded.case_ids == [single_token_request.case_id]
    assert loaded.param_names == edit.param_names
    with loaded.applied(tiny_model):
        for n, p in tiny_model.named_parameters():
            assert torch.equal(p, edited[n]), f"{n} differs after load + apply"
        assert torch.equal(_probe_logits(tiny_model, tokenizer), edited_logits), "outputs differ after load + apply"
    assert not loaded.is_applied


@pytest.mark.parametrize("name", sorted(TEST_SETTINGS))
def test_batch_of_requests(name, tiny_model, tokenizer, request_factory, checkpoints):
    editor_cls = get_editor(name)
    if not editor_cls.supports_batch:
        pytest.skip(f"{name} edits one request per call")
    requests = [
        request_factory("a", target_new="Paris"),
        request_factory("b", prompt="The capital of Italy is", subject="Italy", target_new="Rome", target_true="Rome"),
    ]
    before, before_logits = _params(tiny_model), _probe_logits(tiny_model, tokenizer)
    edit = editor_cls().apply(tiny_model, tokenizer, requests, _config(name, tiny_model, checkpoints))
    assert edit.case_ids == ["a", "b"]
    edit.revert(tiny_model)
    assert all(torch.equal(p, before[n]) for n, p in tiny_model.named_parameters())
    assert torch.equal(_probe_logits(tiny_model, tokenizer), before_logits)


def test_ft_l_respects_norm_constraint(tiny_model, tokenizer, single_token_request):
    eps = 1e-3
    cfg = get_editor("ft_l").config_class(layers=[1], lr=1e-2, steps=5, norm_constraint=eps)
    edit = get_editor("ft_l")().apply(tiny_model, tokenizer, [single_token_request], cfg)
    for delta in edit.deltas.values():
        assert delta.dense().abs().max() <= eps * (1 + 1e-5)


def test_ft_edits_only_the_configured_layers(tiny_model, tokenizer, single_token_request):
    cfg = get_editor("ft_m").config_class(layers=[0, 2], lr=1e-2, steps=3)
    edit = get_editor("ft_m")().apply(tiny_model, tokenizer, [single_token_request], cfg)
    names = edit.param_names
    assert len(names) == 2 and all(name.endswith("weight") for name in names)
    assert any(".0." in n for n in names) and any(".2." in n for n in names)


def test_unknown_editor_lists_available():
    with pytest.raises(KeyError, match="ft_m"):
        get_editor("nope")


@pytest.mark.parametrize("name", ["ft_m", "rome", "memit"])
def test_edits_of_one_weight_revert_only_in_reverse_order(name, tiny_model, tokenizer, request_factory, checkpoints):
    from factedit.editors import EditError

    first = _for(name, request_factory("a", target_new="Paris"))
    second = _for(name, request_factory("b", target_new="Rome"))
    original = _params(tiny_model)
    edit_a = _apply(name, tiny_model, tokenizer, first, checkpoints)
    edit_b = _apply(name, tiny_model, tokenizer, second, checkpoints)
    assert set(edit_a.param_names) & set(edit_b.param_names), "test premise: both edits change the same weights"
    both = _params(tiny_model)

    with pytest.raises(EditError, match="revert later edits first"):
        edit_a.revert(tiny_model)
    assert all(torch.equal(p, both[n]) for n, p in tiny_model.named_parameters()), "a refused revert changed the model"
    assert edit_a.is_applied and edit_b.is_applied

    edit_b.revert(tiny_model)
    edit_a.revert(tiny_model)
    for n, p in tiny_model.named_parameters():
        assert torch.equal(p, original[n]), f"{n} not restored bit-exactly"


@pytest.mark.parametrize("name", ["ft_l", "ft_m"])
@pytest.mark.parametrize("bound", [-1e-3, 0.0, float("nan")])
def test_ft_refuses_a_norm_constraint_that_is_not_positive(name, bound):
    with pytest.raises(ValueError, match="norm_constraint .* must be positive"):
        get_editor(name).config_class(norm_constraint=bound)
